//! The IM service on a real clustered engine, for tests: a handle on what
//! `scripts/im-cluster up` starts (nats-server 2.15.1 nodes with JetStream and MQTT over TLS,
//! imlink-auth instances in their queue group, imlink-sandbox for provisioning). The script is
//! the one definition of that cluster; this only calls it and reads `endpoints.json`.
//!
//! Shared by the daemon's tests (`tests/`, through `common`) and imlink-auth's
//! (`crates/auth/tests/`, by path). Only std, serde and imlink-usersig: both can use it.
//!
//! ```ignore
//! let c = ImCluster::up(&bin_dir, "chat", &UpOptions { sig_lifetime: Some("30s".into()), ..Default::default() });
//! let sig = c.sig("alice", 60);                  // signed with the app key
//! c.stop(Piece::Node, 0, true);                  // kill -9 node n1
//! c.start(Piece::Node, 0);                       // and back
//! // dropped: `scripts/im-cluster down`
//! ```
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `DIR/endpoints.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Endpoints {
    pub dir: PathBuf,
    pub sdk_app_id: u64,
    /// `mqtts://127.0.0.1:PORT`, one per node (n1, n2, …).
    pub mqtt_urls: Vec<String>,
    /// `tls://127.0.0.1:PORT`: the nodes' NATS client ports.
    pub nats_urls: Vec<String>,
    /// `http://127.0.0.1:PORT`: the nodes' monitoring (healthz, connz, jsz).
    pub monitor_urls: Vec<String>,
    /// The sandbox's provisioning (UserSigs signed with `app_key_file`).
    pub provisioning_url_template: String,
    /// The sandbox's admin endpoint (provisioning faults) and its bearer token.
    pub admin_url: String,
    pub admin_token: String,
    /// The CA of every TLS listener (MQTT, NATS, provisioning).
    pub ca_path: PathBuf,
    pub device_token_file: PathBuf,
    /// The app key the sandbox signs with, and the second key imlink-auth also accepts (a key
    /// rotation in progress).
    pub app_key_file: PathBuf,
    pub app_next_key_file: PathBuf,
    pub sig_lifetime: String,
    /// An operator identity: may subscribe to `im/{app}/d/#` only.
    pub operator: Operator,
    pub node_pids: Vec<u32>,
    pub auth_pids: Vec<u32>,
    pub sandbox_pid: u32,
    pub node_logs: Vec<PathBuf>,
    pub auth_logs: Vec<PathBuf>,
    pub sandbox_log: PathBuf,
    pub node_configs: Vec<PathBuf>,
    pub auth_configs: Vec<PathBuf>,
    pub nats_server: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Operator {
    pub username: String,
    pub password_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The lifetime of the UserSigs the provisioning issues (`30s`, `15m`, …; default 24h).
    pub sig_lifetime: Option<String>,
    pub nodes: usize,
    pub auth: usize,
    /// The nodes' client port (imlink-auth's) in plain TCP on loopback instead of TLS.
    pub nats_plain: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            sig_lifetime: None,
            nodes: 3,
            auth: 2,
            nats_plain: false,
        }
    }
}

/// A piece of the cluster that can be stopped and started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Node,
    Auth,
}

impl Piece {
    fn arg(self) -> &'static str {
        match self {
            Piece::Node => "node",
            Piece::Auth => "auth",
        }
    }
}

/// A running cluster; dropping it runs `im-cluster down`.
pub struct ImCluster {
    pub e: Endpoints,
    script: PathBuf,
    bin: PathBuf,
}

/// The repository root: the nearest ancestor of the crate being tested that holds
/// `scripts/im-cluster` (the root package or `crates/auth`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|a| a.join("scripts/im-cluster").exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn script() -> PathBuf {
    repo_root().join("scripts/im-cluster")
}

/// The nats-server 2.15.1 binary (`scripts/im-cluster nats-server`: checks `--version`).
pub fn nats_server_2_15() -> PathBuf {
    let out = Command::new(script())
        .arg("nats-server")
        .output()
        .expect("running scripts/im-cluster");
    assert!(
        out.status.success(),
        "{} (run scripts/setup as root: it installs nats-server 2.15.1)",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Make sure `bin_dir` holds imlink-auth and imlink-sandbox (a workspace build has them; a
/// build of one package may not).
fn ensure_binaries(bin_dir: &Path) {
    if ["imlink-auth", "imlink-sandbox"]
        .iter()
        .all(|b| bin_dir.join(b).exists())
    {
        return;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).args([
        "build",
        "-q",
        "-p",
        "imlink-auth",
        "-p",
        "imlink-sandbox",
        "--bins",
    ]);
    if bin_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("cargo build");
    assert!(st.success(), "building imlink-auth and imlink-sandbox");
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl ImCluster {
    /// `im-cluster up` in a fresh directory (under the system temp dir, named after `tag`).
    /// `bin_dir`: where the test build put imlink-auth and imlink-sandbox (the directory of
    /// `CARGO_BIN_EXE_*`). A start that fails (a port taken between its choice and its use)
    /// is retried once in another directory.
    pub fn up(bin_dir: &Path, tag: &str, o: &UpOptions) -> ImCluster {
        ensure_binaries(bin_dir);
        let mut last = String::new();
        for _ in 0..2 {
            let dir = std::env::temp_dir().join(format!(
                "imc-{}-{tag}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let mut cmd = Command::new(script());
            cmd.arg("up")
                .arg(&dir)
                .args([
                    "--nodes",
                    &o.nodes.to_string(),
                    "--auth",
                    &o.auth.to_string(),
                ])
                .env("IMLINK_BIN", bin_dir);
            if let Some(l) = &o.sig_lifetime {
                cmd.args(["--sig-lifetime", l]);
            }
            if o.nats_plain {
                cmd.arg("--nats-plain");
            }
            let out = cmd.output().expect("running scripts/im-cluster up");
            if out.status.success() {
                let e: Endpoints = serde_json::from_slice(
                    &std::fs::read(dir.join("endpoints.json")).expect("endpoints.json"),
                )
                .expect("endpoints.json parses");
                return ImCluster {
                    e,
                    script: script(),
                    bin: bin_dir.to_path_buf(),
                };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if dir.join("endpoints.json").exists() {
                let _ = Command::new(script()).arg("down").arg(&dir).output();
            }
            // A partial start: stop what runs from this directory.
            kill_leftovers(&dir);
        }
        panic!("scripts/im-cluster up failed twice:\n{last}");
    }

    pub fn dir(&self) -> &Path {
        &self.e.dir
    }

    fn reload(&mut self) {
        self.e = serde_json::from_slice(
            &std::fs::read(self.e.dir.join("endpoints.json")).expect("endpoints.json"),
        )
        .expect("endpoints.json parses");
    }

    /// Stop node or imlink-auth `i` (0-based: node 0 is n1): SIGKILL with `kill`, else
    /// SIGTERM. Returns when the process is gone.
    pub fn stop(&self, piece: Piece, i: usize, kill: bool) {
        let mut cmd = Command::new(&self.script);
        cmd.arg("stop")
            .arg(&self.e.dir)
            .arg(piece.arg())
            .arg((i + 1).to_string());
        if kill {
            cmd.arg("--kill");
        }
        let out = cmd.output().expect("im-cluster stop");
        assert!(
            out.status.success(),
            "im-cluster stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start node or imlink-auth `i` again with its config (its pid is updated).
    pub fn start(&mut self, piece: Piece, i: usize) {
        let out = Command::new(&self.script)
            .arg("start")
            .arg(&self.e.dir)
            .arg(piece.arg())
            .arg((i + 1).to_string())
            .env("IMLINK_BIN", &self.bin)
            .output()
            .expect("im-cluster start");
        assert!(
            out.status.success(),
            "im-cluster start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.reload();
    }

    /// `(host, port)` of node `i`'s MQTT listener.
    pub fn mqtt_addr(&self, i: usize) -> (String, u16) {
        let u = self.e.mqtt_urls[i]
            .strip_prefix("mqtts://")
            .expect("mqtts URL");
        let (h, p) = u.rsplit_once(':').expect("host:port");
        (h.to_string(), p.parse().expect("port"))
    }

    pub fn app_key(&self) -> String {
        read_trimmed(&self.e.app_key_file)
    }

    pub fn next_app_key(&self) -> String {
        read_trimmed(&self.e.app_next_key_file)
    }

    pub fn operator_password(&self) -> String {
        read_trimmed(&self.e.operator.password_file)
    }

    /// A UserSig for `user`, issued now, valid `lifetime_s` seconds, signed with the app key.
    pub fn sig(&self, user: &str, lifetime_s: u64) -> String {
        self.sig_with(
            &self.app_key(),
            self.e.sdk_app_id,
            user,
            unix_now(),
            lifetime_s,
        )
    }

    /// A UserSig with every field chosen.
    pub fn sig_with(&self, key: &str, app: u64, user: &str, time: u64, expire: u64) -> String {
        imlink_usersig::generate(&imlink_usersig::SigParams {
            sdk_app_id: app,
            secret_key: key,
            identifier: user,
            time,
            expire,
            userbuf: None,
        })
    }

    /// A UserSig for `user` from the sandbox's provisioning endpoint (HTTPS, the device token),
    /// as a device would fetch it: `(user_sig, expire_at)`. It lives `sig_lifetime`.
    pub fn fetch_sig(&self, user: &str) -> (String, u64) {
        let url = self.e.provisioning_url_template.replace("{user_id}", user);
        let rest = url.strip_prefix("https://").expect("an https URL");
        let (authority, path) = rest.split_at(rest.find('/').expect("a path"));
        let (host, port) = authority.rsplit_once(':').expect("host:port");
        let token = read_trimmed(&self.e.device_token_file);
        let body = https_get(
            &self.e.ca_path,
            host,
            port.parse().expect("port"),
            path,
            &token,
        );
        let v: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
        (
            v["user_sig"].as_str().expect("user_sig").to_string(),
            v["expire_at"].as_u64().expect("expire_at"),
        )
    }

    /// `{app}:{user}:{platform}:{instance}`.
    pub fn client_id(&self, user: &str, platform: &str, instance: &str) -> String {
        format!("{}:{user}:{platform}:{instance}", self.e.sdk_app_id)
    }

    pub fn auth_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.e.auth_logs[i]).unwrap_or_default()
    }

    pub fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.e.node_logs[i]).unwrap_or_default()
    }

    /// All imlink-auth logs, concatenated.
    pub fn auth_logs(&self) -> String {
        (0..self.e.auth_logs.len())
            .map(|i| self.auth_log(i))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The node (0-based) imlink-auth `i` last connected to, from its log.
    pub fn auth_node(&self, i: usize) -> Option<usize> {
        let log = self.auth_log(i);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("connected to NATS node"))?;
        let at = line.find("node \"n")? + "node \"n".len();
        let n: usize = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()?;
        n.checked_sub(1)
    }

    /// The Unix time (seconds, with the fraction) of the last line of imlink-auth `i`'s log
    /// containing `needle`: its own clock, for measuring what it did.
    pub fn auth_log_time(&self, i: usize, needle: &str) -> Option<f64> {
        let log = self.auth_log(i);
        let line = log.lines().rev().find(|l| l.contains(needle))?;
        rfc3339_unix(line.split_whitespace().next()?)
    }

    /// How many times imlink-auth `i` has connected to a node so far.
    pub fn auth_connections(&self, i: usize) -> usize {
        self.auth_log(i).matches("connected to NATS node").count()
    }

    /// The decision line logged last for `client_id` by any imlink-auth instance, if any: the
    /// latest by its timestamp (the logs are separate files, so "the last line" of their
    /// concatenation would be the last of the last instance's file, not the latest).
    pub fn decision_for(&self, client_id: &str) -> Option<String> {
        self.decisions_for(client_id).pop()
    }

    /// Every decision line for `client_id` (each is one CONNECT that reached the callout) from
    /// every instance, oldest first (by timestamp).
    pub fn decisions_for(&self, client_id: &str) -> Vec<String> {
        let needle = format!("client_id=\"{client_id}\"");
        let mut lines: Vec<(f64, String)> = (0..self.e.auth_logs.len())
            .flat_map(|i| {
                self.auth_log(i)
                    .lines()
                    .filter(|l| l.contains(" decision ") && l.contains(&needle))
                    .map(|l| {
                        let at = l
                            .split_whitespace()
                            .next()
                            .and_then(rfc3339_unix)
                            .unwrap_or(0.0);
                        (at, l.to_string())
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        lines.sort_by(|a, b| a.0.total_cmp(&b.0));
        lines.into_iter().map(|(_, l)| l).collect()
    }

    /// Wait (polling the logs: another process's state) for a decision line for `client_id`.
    pub fn wait_decision(&self, client_id: &str, within: Duration) -> String {
        self.wait_decision_with(client_id, "", within)
    }

    /// Wait for a decision line for `client_id` that contains `needle` (`code=70001`, ...):
    /// a later decision for the same client is told from an earlier one by what it says, never
    /// by which file or line it is in.
    pub fn wait_decision_with(&self, client_id: &str, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self
                .decisions_for(client_id)
                .into_iter()
                .rev()
                .find(|l| l.contains(needle))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no decision for {client_id} containing {needle:?} within {within:?}:\n{}",
                self.auth_logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `im-cluster down` (also on drop).
    pub fn down(&mut self) {
        let _ = Command::new(&self.script)
            .arg("down")
            .arg(&self.e.dir)
            .output();
    }
}

impl Drop for ImCluster {
    fn drop(&mut self) {
        self.down();
        if std::thread::panicking() {
            eprintln!("im-cluster: logs kept in {}", self.e.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.e.dir);
        }
    }
}

/// `2026-12-06T12:46:43.920607Z` → Unix seconds.
pub fn rfc3339_unix(t: &str) -> Option<f64> {
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, dd) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut h = time.split(':');
    let (hh, mm) = (
        h.next()?.parse::<i64>().ok()?,
        h.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = h.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Kill whatever still runs with `dir` in its command line (a start that failed half-way).
fn kill_leftovers(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// One HTTPS GET (rustls, ring) trusting `ca`; the body of a 200 answer.
fn https_get(ca: &Path, host: &str, port: u16, path: &str, bearer: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("the CA file") {
        roots.add(c.expect("a PEM certificate")).expect("a CA");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.to_string()).expect("a server name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).expect("TLS");
    let tcp = std::net::TcpStream::connect((host, port)).expect("provisioning reachable");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {bearer}\r\nConnection: close\r\n\r\n"
    )
    .expect("request sent");
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&resp[..split]);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "provisioning answered {head}"
    );
    resp[split + 4..].to_vec()
}

fn read_trimmed(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
