//! `imlink-auth keygen --out DIR`: the issuer's account nkey and the service's NATS password,
//! and the nats-server configuration that goes with them.
//!
//! Writes (each 0600, atomically; an existing file is kept unless `--force`):
//! - `DIR/issuer.nk` — the issuer account seed (`SA…`): `callout.issuer_seed_file`;
//! - `DIR/nats-password` — the service's NATS password: `nats.password_file`;
//! - `DIR/nats-auth.conf` — the `accounts`, `system_account` and `authorization { auth_callout
//!   { … } }` blocks for nats-server, with that password: `include` it in each node's config.
//!
//! Prints the issuer's public key and the same blocks with the password left out (a secret
//! goes to a 0600 file, never to a terminal or a log).

use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::nkeys::{KeyPair, Kind};
use crate::secret::write_secret_file;

#[derive(Debug, Clone)]
pub struct KeygenOptions {
    pub out: PathBuf,
    /// The account MQTT users land in.
    pub account: String,
    /// The service's NATS user.
    pub auth_user: String,
    /// nats-server's `authorization.timeout`: how long a CONNECT waits for the callout.
    pub timeout_s: u32,
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system has no random source")]
    Random,
    #[error("{0}")]
    Usage(String),
}

/// The nats-server blocks. `password`: the real one (the include file) or a placeholder.
pub fn nats_blocks(
    account: &str,
    auth_user: &str,
    issuer_public: &str,
    password: &str,
    timeout_s: u32,
) -> String {
    format!(
        r#"# The IM service's accounts: AUTH holds only imlink-auth's own user; MQTT clients land in
# {account} (JetStream is what MQTT sessions, QoS 1 and retained messages live in).
accounts {{
  AUTH {{ users: [ {{ user: "{auth_user}", password: "{password}" }} ] }}
  {account} {{ jetstream: enabled }}
  SYS {{ }}
}}
system_account: SYS
# Every other CONNECT (every MQTT client) is decided by imlink-auth on $SYS.REQ.USER.AUTH;
# with no answer within `timeout` seconds it is refused (MQTT: CONNACK 5).
authorization {{
  timeout: {timeout_s}
  auth_callout {{
    issuer: "{issuer_public}"
    auth_users: [ "{auth_user}" ]
    account: AUTH
  }}
}}
"#
    )
}

fn random_password() -> Result<String, KeygenError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| KeygenError::Random)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn write(path: &Path, contents: &str, force: bool) -> Result<(), KeygenError> {
    write_secret_file(path, contents, force).map_err(|source| KeygenError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Write the files; returns what to print.
pub fn keygen(o: &KeygenOptions) -> Result<String, KeygenError> {
    let ok_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !ok_name(&o.account) || o.account == "AUTH" || o.account == "SYS" {
        return Err(KeygenError::Usage(format!(
            "--account {:?}: 1-64 of A-Za-z0-9_-, not AUTH or SYS",
            o.account
        )));
    }
    if !ok_name(&o.auth_user) {
        return Err(KeygenError::Usage(format!(
            "--auth-user {:?}: 1-64 of A-Za-z0-9_-",
            o.auth_user
        )));
    }
    if !(1..=60).contains(&o.timeout_s) {
        return Err(KeygenError::Usage("--timeout: 1 to 60 seconds".into()));
    }
    std::fs::create_dir_all(&o.out).map_err(|source| KeygenError::Write {
        path: o.out.clone(),
        source,
    })?;
    let seed_path = o.out.join("issuer.nk");
    let pw_path = o.out.join("nats-password");
    let conf_path = o.out.join("nats-auth.conf");
    if !o.force {
        for p in [&seed_path, &pw_path, &conf_path] {
            if p.exists() {
                return Err(KeygenError::Write {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "it exists; keygen never replaces keys silently (use --force to replace them all)",
                    ),
                });
            }
        }
    }
    let issuer = KeyPair::generate(Kind::Account).map_err(|_| KeygenError::Random)?;
    let public = issuer.public().encode();
    let password = random_password()?;
    write(&seed_path, &format!("{}\n", issuer.seed_text()), o.force)?;
    write(&pw_path, &format!("{password}\n"), o.force)?;
    let conf = format!(
        "# Written by `imlink-auth keygen`. Holds the password of imlink-auth's NATS user: keep it\n\
         # 0600, readable by nats-server only. Include it in every node's config:\n\
         #   include \"{}\"\n{}",
        conf_path.display(),
        nats_blocks(&o.account, &o.auth_user, &public, &password, o.timeout_s)
    );
    write(&conf_path, &conf, o.force)?;
    Ok(format!(
        "imlink-auth keygen: wrote (each 0600)\n  {seed}  the issuer account seed (callout.issuer_seed_file)\n  {pw}  the NATS password of user {user} (nats.password_file)\n  {conf}  the nats-server blocks below, with the password\n\n\
         issuer (auth_callout.issuer): {public}\n\n\
         Give every node the same blocks: copy {conf} next to its config (owned by the user\n\
         nats-server runs as, 0600) and add\n  include \"nats-auth.conf\"\n\
         or paste these, with the password from {pw}:\n\n{blocks}",
        seed = seed_path.display(),
        pw = pw_path.display(),
        conf = conf_path.display(),
        user = o.auth_user,
        blocks = nats_blocks(
            &o.account,
            &o.auth_user,
            &public,
            "<the contents of nats-password>",
            o.timeout_s
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::read_secret_file;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn keygen_writes_private_files_and_prints_no_secret() {
        let d = std::env::temp_dir().join(format!("imlink-auth-keygen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let o = KeygenOptions {
            out: d.clone(),
            account: "APP".into(),
            auth_user: "auth".into(),
            timeout_s: 2,
            force: false,
        };
        let printed = keygen(&o).unwrap();
        for f in ["issuer.nk", "nats-password", "nats-auth.conf"] {
            assert_eq!(
                std::fs::metadata(d.join(f)).unwrap().mode() & 0o777,
                0o600,
                "{f}"
            );
        }
        let seed = read_secret_file(&d.join("issuer.nk")).unwrap();
        let kp = KeyPair::from_seed_text_kind(seed.expose(), Kind::Account).unwrap();
        let pw = read_secret_file(&d.join("nats-password")).unwrap();
        assert!(printed.contains(&kp.public().encode()));
        assert!(!printed.contains(seed.expose()));
        assert!(!printed.contains(pw.expose()));
        let conf = std::fs::read_to_string(d.join("nats-auth.conf")).unwrap();
        assert!(conf.contains(pw.expose()) && conf.contains(&kp.public().encode()));
        assert!(
            conf.contains("auth_users: [ \"auth\" ]")
                && conf.contains("APP { jetstream: enabled }")
        );
        // A second run keeps the keys.
        assert!(keygen(&o).unwrap_err().to_string().contains("--force"));
        assert_eq!(read_secret_file(&d.join("issuer.nk")).unwrap(), seed);
        let forced = KeygenOptions {
            force: true,
            ..o.clone()
        };
        keygen(&forced).unwrap();
        assert_ne!(read_secret_file(&d.join("issuer.nk")).unwrap(), seed);
        let bad = KeygenOptions {
            account: "A.B".into(),
            ..o
        };
        assert!(matches!(keygen(&bad), Err(KeygenError::Usage(_))));
    }
}
