//! The integration-test harness: a real `imlinkd` process against an in-process
//! `imlink-sandbox` (real TLS, real MQTT v5, real HTTPS), observed through its real local API
//! and a real sd_notify socket. No sleeps for synchronisation: READY=1 arrives on the notify
//! socket, phases arrive as `watch` notifications, sandbox counters are awaited on change.
//!
//! Every daemon logs at trace level to a file; [`Daemon::finish`] (and `Drop`) asserts that no
//! UserSig the sandbox issued, no device token and no app key appears in it.
#![allow(dead_code)]

/// Daemons on that cluster: their service, configs, a raw MQTT 3.1.1 client, the admin
/// endpoint, what imlink-auth decided.
pub mod cluster;
/// The IM service on a real clustered engine (`scripts/im-cluster`): nats-server 2.15.1,
/// imlink-auth, the sandbox's provisioning.
pub mod im_cluster;
pub mod mosquitto;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imlink_sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixDatagram, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::watch;

pub const BIN: &str = env!("CARGO_BIN_EXE_imlinkd");
pub const CTL: &str = env!("CARGO_BIN_EXE_imlinkctl");
pub const WAIT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `bin` copied where any uid can run it (for tests that run a binary as another user): the
/// build's own directory may not be reachable — a clone under a 0700 home or `mktemp -d`
/// puts `target/` out of other users' reach. Copied once per binary and process, into a
/// 0755 directory under the temporary directory, whose every ancestor must let others
/// through (else the test says how to fix it).
pub fn runnable_by_anyone(bin: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static COPIES: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut copies = COPIES.lock().unwrap();
    if let Some((_, p)) = copies.iter().find(|(b, _)| b == bin) {
        return p.clone();
    }
    let dir = std::env::temp_dir().join(format!("imlk-{}-bin", std::process::id()));
    for a in dir.ancestors().skip(1) {
        let mode = std::fs::metadata(a)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        assert!(
            mode & 0o001 != 0,
            "{} is not reachable by other users (mode {mode:o}): run the tests with TMPDIR \
             pointing at a directory everyone can traverse, such as /tmp",
            a.display()
        );
    }
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let name = Path::new(bin).file_name().unwrap();
    let copy = dir.join(name);
    // A fresh name first, then rename: a copy another test is running is never rewritten.
    let tmp = dir.join(format!("{}.tmp", name.to_string_lossy()));
    std::fs::copy(bin, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, &copy).unwrap();
    copies.push((bin.to_string(), copy.clone()));
    copy
}

/// A fresh directory for one daemon (short: socket paths are limited to 108 bytes).
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("imlk-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default()).await.unwrap()
}

pub async fn sandbox_with(opts: SandboxOptions) -> Sandbox {
    Sandbox::start(opts).await.unwrap()
}

/// How to configure one daemon. The `*_extra` strings are TOML lines added to that section.
#[derive(Clone)]
pub struct Opts {
    pub user: String,
    pub instance: String,
    pub top_extra: String,
    pub broker_extra: String,
    pub provisioning_extra: String,
    pub session_extra: String,
    pub api_extra: String,
    pub env: Vec<(String, String)>,
    /// Override the broker URL (e.g. a mosquitto instance).
    pub broker_url: Option<String>,
    /// A failover list instead (`broker.urls`).
    pub broker_urls: Option<Vec<String>>,
    /// Override the provisioning URL template (e.g. a hostile HTTP server on loopback).
    pub provisioning_url: Option<String>,
    pub ca_pem: Option<String>,
    /// Reuse this directory (state, socket) — e.g. to restart a daemon.
    pub dir: Option<PathBuf>,
    /// Wait for READY=1 (almost always wanted).
    pub wait_ready: bool,
    /// A device token other than the sandbox's.
    pub token: Option<String>,
    /// Write a `[provisioning]` section (false: UserSigs only from `login {user_sig}`).
    pub provisioning: bool,
}

impl Opts {
    pub fn user(user: &str) -> Opts {
        Opts {
            user: user.into(),
            instance: "0".into(),
            top_extra: String::new(),
            broker_extra: String::new(),
            provisioning_extra: String::new(),
            session_extra: String::new(),
            api_extra: String::new(),
            env: Vec::new(),
            broker_url: None,
            broker_urls: None,
            provisioning_url: None,
            ca_pem: None,
            dir: None,
            wait_ready: true,
            token: None,
            provisioning: true,
        }
    }
}

/// The IM service a daemon is configured for: the in-process sandbox ([`Service::of`]), or the
/// IM service on the real cluster (`cluster::service`).
#[derive(Clone)]
pub struct Service {
    pub sdk_app_id: u64,
    /// `broker.url` unless [`Opts`] says otherwise.
    pub mqtt_url: String,
    pub provisioning_url_template: String,
    /// The CA of the broker and of provisioning (`ca.pem` beside the config).
    pub ca_pem: String,
    pub device_token: String,
    /// Secrets no daemon log may contain (device token, app keys, …).
    pub secrets: Vec<String>,
    /// Every UserSig the service may have issued to this daemon so far (checked against its
    /// log at the end).
    pub issued: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
}

impl Service {
    /// The in-process sandbox: its broker, its provisioning, the UserSigs it issued.
    pub fn of(sb: &Sandbox) -> Service {
        let e = sb.endpoints();
        let ctl = sb.control_handle();
        Service {
            sdk_app_id: sb.sdk_app_id(),
            mqtt_url: e.mqtt_url.clone(),
            provisioning_url_template: e.provisioning_url_template.clone(),
            ca_pem: e.ca_pem.clone(),
            device_token: e.device_token.clone(),
            secrets: vec![e.device_token.clone(), sb.secret_key().to_string()],
            issued: Arc::new(move || ctl.issued_sigs()),
        }
    }
}

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    /// Every sd_notify datagram received, in order (a task drains the socket continuously,
    /// as systemd does).
    pub notify_log: Arc<Mutex<Vec<String>>>,
    notify_changed: watch::Receiver<usize>,
    notify_task: tokio::task::JoinHandle<()>,
    secrets: Vec<String>,
    issued: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    finished: bool,
}

/// Write the config for `sb` and `o` into `dir`; returns its path.
pub fn write_config(sb: &Sandbox, o: &Opts, dir: &Path) -> PathBuf {
    write_config_for(&Service::of(sb), o, dir)
}

/// Write the config for a daemon of `svc` with `o` into `dir`; returns its path.
pub fn write_config_for(svc: &Service, o: &Opts, dir: &Path) -> PathBuf {
    std::fs::write(
        dir.join("ca.pem"),
        o.ca_pem.as_deref().unwrap_or(&svc.ca_pem),
    )
    .unwrap();
    let token = dir.join("token");
    std::fs::write(
        &token,
        format!("{}\n", o.token.as_deref().unwrap_or(&svc.device_token)),
    )
    .unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = format!(
        r#"user_id = "{user}"
sdk_app_id = {app}
instance = "{instance}"
state_dir = "{dir}/state"
log_level = "trace"
{top}
[broker]
{mqtt}
ca_file = "{dir}/ca.pem"
keepalive = "30s"
connect_timeout = "5s"
{broker}
{provisioning}
[session]
backoff_base = "200ms"
backoff_cap = "2s"
{session}
[api]
socket = "{dir}/api.sock"
{api}
"#,
        user = o.user,
        app = svc.sdk_app_id,
        instance = o.instance,
        dir = dir.display(),
        top = o.top_extra,
        mqtt = match &o.broker_urls {
            Some(list) => format!(
                "urls = [{}]",
                list.iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!(
                "url = \"{}\"",
                o.broker_url.clone().unwrap_or_else(|| svc.mqtt_url.clone())
            ),
        },
        broker = o.broker_extra,
        provisioning = if o.provisioning {
            format!(
                "[provisioning]\nurl = \"{prov}\"\ntoken_file = \"{dir}/token\"\nca_file = \"{dir}/ca.pem\"\ntimeout = \"5s\"\n{extra}\n",
                prov = o
                    .provisioning_url
                    .clone()
                    .unwrap_or_else(|| svc.provisioning_url_template.clone()),
                dir = dir.display(),
                extra = o.provisioning_extra,
            )
        } else {
            String::new()
        },
        session = o.session_extra,
        api = o.api_extra,
    );
    let path = dir.join("imlinkd.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

impl Daemon {
    pub async fn start(sb: &Sandbox, o: Opts) -> Daemon {
        Self::start_for(&Service::of(sb), o).await
    }

    /// A daemon of another IM service (the cluster: `cluster::service`).
    pub async fn start_for(svc: &Service, o: Opts) -> Daemon {
        let dir = o.dir.clone().unwrap_or_else(|| temp_dir(&o.user));
        let config = write_config_for(svc, &o, &dir);
        Self::spawn_for(svc, o, dir, config).await
    }

    /// Spawn with an already written config.
    pub async fn spawn(sb: &Sandbox, o: Opts, dir: PathBuf, config: PathBuf) -> Daemon {
        Self::spawn_for(&Service::of(sb), o, dir, config).await
    }

    /// Spawn a daemon of `svc` with an already written config.
    pub async fn spawn_for(svc: &Service, o: Opts, dir: PathBuf, config: PathBuf) -> Daemon {
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        let log = dir.join(format!(
            "imlinkd-{}.log",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        for (k, v) in &o.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let secrets = svc.secrets.clone();
        let issued = svc.issued.clone();
        let notify_log = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, notify_changed) = watch::channel(0usize);
        let log_for_task = notify_log.clone();
        let notify_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = notify.recv(&mut buf).await {
                let mut l = log_for_task.lock().unwrap();
                l.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = count_tx.send(l.len());
            }
        });
        let mut d = Daemon {
            child: Some(child),
            socket: dir.join("api.sock"),
            dir,
            log,
            config,
            notify_log,
            notify_changed,
            notify_task,
            secrets,
            issued,
            finished: false,
        };
        if o.wait_ready {
            d.wait_notify("READY=1").await;
        }
        d
    }

    /// Wait for a datagram on the notify socket containing `needle`; returns it.
    pub async fn wait_notify(&mut self, needle: &str) -> String {
        self.wait_notify_after(0, needle).await
    }

    /// Like [`Daemon::wait_notify`], looking only at datagrams from index `from` on.
    pub async fn wait_notify_after(&mut self, from: usize, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(m) = self
                .notify_log
                .lock()
                .unwrap()
                .iter()
                .skip(from)
                .find(|m| m.contains(needle))
            {
                return m.clone();
            }
            if tokio::time::timeout_at(deadline, self.notify_changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "no {needle:?} on the notify socket within {WAIT:?}; got {:?}\nlog:\n{}",
                    self.notify_log.lock().unwrap(),
                    self.log_text()
                );
            }
        }
    }

    /// All sd_notify datagrams so far.
    pub fn notes(&self) -> Vec<String> {
        self.notify_log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await
    }

    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        self.client().await.call(method, params).await
    }

    pub async fn status(&self) -> Value {
        let r = self.rpc("status", json!({})).await;
        r["result"].clone()
    }

    /// Wait (on `watch` notifications) until the phase is `phase`; returns the status then.
    pub async fn wait_phase(&self, phase: &str) -> Value {
        self.wait_phase_within(phase, WAIT).await
    }

    pub async fn wait_phase_within(&self, phase: &str, within: Duration) -> Value {
        wait_phase_at(&self.socket, phase, within, || self.log_text()).await;
        self.status().await
    }

    /// Send SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("imlinkd exits within the wait")
            .unwrap();
        self.child = None;
        status
    }

    /// SIGKILL (a power loss, as far as the broker can tell) and wait for it to be gone.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// Assert the log holds no secret (every UserSig the sandbox issued, the device token,
    /// the app key).
    pub fn assert_no_secrets_logged(&self) {
        let log = self.log_text();
        assert!(!log.is_empty(), "the daemon logged nothing at trace level?");
        let mut secrets = self.secrets.clone();
        secrets.extend((self.issued)());
        for s in &secrets {
            assert!(
                !log.contains(s.as_str()),
                "a secret appears in the daemon log {}",
                self.log.display()
            );
            // Also no long fragment of it (a truncated dump is a leak too).
            if s.len() >= 48 {
                let mid = &s[s.len() / 2 - 12..s.len() / 2 + 12];
                assert!(
                    !log.contains(mid),
                    "a fragment of a secret appears in {}",
                    self.log.display()
                );
            }
        }
    }

    /// Stop the daemon (SIGTERM), check it exited 0 and logged no secret.
    pub async fn finish(mut self) {
        if self.child.is_some() {
            let status = self.terminate().await;
            assert!(
                status.success(),
                "imlinkd exited with {status:?}\n{}",
                self.log_text()
            );
        }
        self.assert_no_secrets_logged();
        self.finished = true;
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.notify_task.abort();
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
        if !self.finished && !std::thread::panicking() {
            self.assert_no_secrets_logged();
        }
    }
}

/// A JSON-RPC client over the daemon's socket.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", path.display()));
        let (r, w) = s.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// Like `send_raw`, reporting a closed connection instead of panicking.
    pub async fn send_raw_checked(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// The next line from the daemon, as JSON.
    pub async fn next(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).await.unwrap();
        assert!(n > 0, "the daemon closed the connection");
        serde_json::from_str(&line).unwrap()
    }

    /// The next line, or `None` at EOF.
    pub async fn next_or_eof(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    /// Call and return the whole response object (`result` or `error`).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let line = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
            .to_string()
            + "\n";
        self.writer.write_all(line.as_bytes()).await.unwrap();
        loop {
            let v = tokio::time::timeout(Duration::from_secs(60), self.next())
                .await
                .expect("a response within 60 s");
            if v.get("id") == Some(&json!(id)) {
                return v;
            }
        }
    }
}

/// Wait until the sandbox counters satisfy `pred`.
pub async fn counters_until(
    sb: &Sandbox,
    what: &str,
    pred: impl FnMut(&imlink_sandbox::Counters) -> bool,
) -> imlink_sandbox::Counters {
    sb.wait_for(what, WAIT, pred)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Assert the user's CONNECT and provisioning counters do not move for `secs` seconds.
pub async fn assert_flat(sb: &Sandbox, user: &str, secs: u64) {
    let before = sb.user(user);
    let r = sb
        .wait_for("any new attempt", Duration::from_secs(secs), |c| {
            let u = c.user(user);
            u.connect_attempts != before.connect_attempts
                || u.provision_requests != before.provision_requests
        })
        .await;
    assert!(
        r.is_err(),
        "{user}: attempts continued: before {before:?}, after {:?}",
        sb.user(user)
    );
}

/// Another login with `user`'s client id (instance 0) takes the session over: a real rumqttc
/// client over TLS with a fresh UserSig. Keep the handle: dropping it ends that client.
pub fn take_over(sb: &Sandbox, ca_dir: &Path, user: &str) -> tokio::task::JoinHandle<()> {
    let sig = sb.issue_sig(user, Duration::from_secs(600));
    let url = sb.endpoints().mqtt_url.clone();
    take_over_at(&url, ca_dir, sb.sdk_app_id(), user, &sig, true)
}

/// A raw rumqttc v5 client logging in with `user`'s client id (instance 0) on the broker at
/// `url` (its CA in `ca_dir/ca.pem`), polled until it ends; dropping the handle ends it.
pub fn take_over_at(
    url: &str,
    ca_dir: &Path,
    app: u64,
    user: &str,
    password: &str,
    clean_start: bool,
) -> tokio::task::JoinHandle<()> {
    let (host, port) = imlinkd::config::parse_broker_url(url).unwrap();
    let mut mo = rumqttc::v5::MqttOptions::new(format!("{app}:{user}:linux:0"), host, port);
    mo.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            imlinkd::tls::client_config(
                &imlinkd::config::CaSource::File(ca_dir.join("ca.pem")),
                None,
                &[],
            )
            .unwrap(),
        ),
    ));
    mo.set_credentials(user, password);
    mo.set_clean_start(clean_start);
    let (client, mut el) = rumqttc::v5::AsyncClient::new(mo, 10);
    tokio::spawn(async move {
        let _client = client;
        while el.poll().await.is_ok() {}
    })
}

/// A hostile HTTP server on 127.0.0.1: every request gets exactly `response`, then the socket
/// closes. Returns its base URL and a watch of how many requests it saw.
pub async fn hostile_http(
    response: Vec<u8>,
) -> (String, watch::Receiver<u64>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (hits_tx, hits) = watch::channel(0u64);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            hits_tx.send_modify(|n| *n += 1);
            let response = response.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(&response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (url, hits, task)
}

/// Wait until a watched count reaches `at_least`.
pub async fn count_reaches(w: &mut watch::Receiver<u64>, at_least: u64) {
    tokio::time::timeout(WAIT, w.wait_for(|n| *n >= at_least))
        .await
        .expect("the count within the wait")
        .expect("the counter lives");
}

/// An external process (a broker) whose output lines are kept and can be awaited.
pub struct Logged {
    pub child: Child,
    pub name: String,
    pub lines: Arc<Mutex<Vec<String>>>,
    changed: watch::Receiver<usize>,
}

impl Logged {
    /// Spawn `cmd` (killed when dropped), collecting stdout and stderr lines.
    pub fn spawn(name: &str, mut cmd: Command) -> Logged {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e} (.ci/run installs it)"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = watch::channel(0usize);
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (lines, tx) = (lines.clone(), tx.clone());
            tokio::spawn(async move {
                let mut r = BufReader::new(out).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    let mut v = lines.lock().unwrap();
                    v.push(l);
                    let _ = tx.send(v.len());
                }
            });
        }
        Logged {
            child,
            name: name.into(),
            lines,
            changed,
        }
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Wait until `n` lines contain `needle` (within `within`).
    pub async fn wait_count(&mut self, needle: &str, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.count(needle) < n {
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the process is gone (its output ended): it never will.
                waited => panic!(
                    "{} never logged {needle:?} {n} times ({}):\n{}",
                    self.name,
                    if waited.is_err() {
                        "timed out"
                    } else {
                        "its output ended"
                    },
                    self.lines.lock().unwrap().join("\n")
                ),
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for it.
    pub async fn kill9(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A free TCP port on loopback (for brokers that need one in their config).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Every message in the inbox of `d`'s current account, from the start (acknowledged or
/// not), oldest first: read_inbox from the cursor `USER:0`.
pub async fn inbox_all(d: &Daemon) -> Vec<Value> {
    let user = d.status().await["user_id"]
        .as_str()
        .expect("status.user_id")
        .to_string();
    let mut cursor = format!("{user}:0");
    let mut all = Vec::new();
    loop {
        let r = d
            .rpc("read_inbox", json!({ "cursor": cursor, "limit": 100 }))
            .await;
        let page = r["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("read_inbox: {r}"));
        if page.is_empty() {
            return all;
        }
        cursor = r["result"]["cursor"].as_str().unwrap().to_string();
        all.extend(page);
    }
}

/// Wait (woken by notifications) until `d`'s inbox holds `n` messages; returns them in order.
pub async fn inbox_at_least(d: &Daemon, n: usize, within: Duration) -> Vec<Value> {
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let all = inbox_all(d).await;
        if all.len() >= n {
            return all;
        }
        if tokio::time::timeout_at(deadline, w.next()).await.is_err() {
            panic!("{} of {n} messages\n{}", all.len(), d.log_text());
        }
    }
}

/// Wait (on `watch` notifications of the API at `sock`) until the phase is `phase`; `log`
/// gives the daemon's log for the failure message.
pub async fn wait_phase_at(sock: &Path, phase: &str, within: Duration, log: impl Fn() -> String) {
    let mut w = Client::connect(sock).await;
    let snap = w.call("watch", json!({})).await;
    let mut current = snap["result"]["status"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let deadline = tokio::time::Instant::now() + within;
    while current != phase {
        let v = tokio::time::timeout_at(deadline, w.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "phase {phase:?} not reached within {within:?} (still {current:?})\nlog:\n{}",
                    log()
                )
            });
        if v["method"] == "state_changed" {
            current = v["params"]["phase"].as_str().unwrap_or("").to_string();
        }
    }
}

/// Open `n` connections to `path` as `uid`/`gid`, from a thread whose own credentials are
/// switched with raw syscalls (thread-local, unlike libc's process-wide setuid). The peer
/// credentials the daemon sees are that thread's.
pub fn connect_as(
    uid: u32,
    gid: u32,
    path: std::path::PathBuf,
    n: usize,
) -> Vec<std::os::unix::net::UnixStream> {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches uids and must run as root"
    );
    std::thread::spawn(move || {
        // SAFETY: plain syscalls changing this thread's credentials only; the thread ends
        // right after.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        (0..n)
            .filter_map(|_| std::os::unix::net::UnixStream::connect(&path).ok())
            .collect()
    })
    .join()
    .unwrap()
}

/// A `key:` line of /proc/PID/status, in KiB (`VmHWM:` the peak resident set, `VmRSS:`).
pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

pub fn vm_hwm_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Wait until the daemon's log holds a line containing `needle` (the log is a file another
/// process writes: polled, with a deadline); returns that line.
pub async fn log_line(d: &Daemon, needle: &str, within: Duration) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(l) = d.log_text().lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {needle:?} in the daemon's log within {within:?}:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling a file
    }
}
