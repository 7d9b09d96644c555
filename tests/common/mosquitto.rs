//! Debian's mosquitto 2.0.11, started by a test: TLS with the sandbox's server certificate, a
//! password file, an optional ACL, an ephemeral loopback port, its log collected.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::{Logged, WAIT, free_port};

pub struct Mosquitto {
    pub url: String,
    /// The running broker and its log lines, as they arrive.
    pub log: Logged,
}

impl Mosquitto {
    /// Start mosquitto with TLS (the sandbox's server certificate) and one user/password.
    pub async fn start(
        sb: &imlink_sandbox::Sandbox,
        dir: &Path,
        user: &str,
        password: &str,
    ) -> Mosquitto {
        Self::start_with(sb, dir, &[(user, password)], None).await
    }

    /// Start mosquitto with these users and, optionally, an ACL file's text.
    pub async fn start_with(
        sb: &imlink_sandbox::Sandbox,
        dir: &Path,
        users: &[(&str, &str)],
        acl: Option<&str>,
    ) -> Mosquitto {
        let write = |name: &str, text: &str| -> PathBuf {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = write("mq-ca.pem", &sb.endpoints().ca_pem);
        let cert = write("mq-cert.pem", sb.server_cert_pem());
        let key = write("mq-key.pem", sb.server_key_pem());
        let pw = dir.join("mq-passwd");
        for (i, (user, password)) in users.iter().enumerate() {
            let mut c = std::process::Command::new("mosquitto_passwd");
            if i == 0 {
                c.arg("-c");
            }
            let st = c
                .arg("-b")
                .arg(&pw)
                .arg(user)
                .arg(password)
                .status()
                .expect("mosquitto_passwd (Debian package mosquitto; .ci/run installs it)");
            assert!(st.success());
        }
        let acl_line = match acl {
            Some(text) => format!("acl_file {}\n", write("mq-acl", text).display()),
            None => String::new(),
        };
        let port = free_port();
        let run_as_root = nix::unistd::geteuid().is_root();
        let conf = write(
            "mosquitto.conf",
            &format!(
                "listener {port} 127.0.0.1\n\
                 cafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
                 allow_anonymous false\npassword_file {pw}\n\
                 persistence false\nlog_dest stderr\nlog_type all\nconnection_messages true\n{user_line}{acl_line}",
                ca = ca.display(),
                cert = cert.display(),
                key = key.display(),
                pw = pw.display(),
                user_line = if run_as_root { "user root\n" } else { "" },
                acl_line = acl_line,
            ),
        );
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let mut m = Mosquitto {
            url: format!("mqtts://127.0.0.1:{port}"),
            log: Logged::spawn("mosquitto", cmd),
        };
        m.wait_line("running").await;
        m
    }

    pub async fn wait_line(&mut self, needle: &str) -> String {
        self.log.wait_count(needle, 1, WAIT).await;
        let lines = self.log.lines.lock().unwrap();
        let found = lines.iter().find(|l| l.contains(needle));
        found.cloned().unwrap_or_default()
    }

    /// How many CONNECTs mosquitto has seen (its "New client connected" lines).
    pub fn connects(&self) -> usize {
        self.log.count("New client connected")
    }

    pub fn refusals(&self) -> usize {
        self.log.count("not authorised")
    }
}
