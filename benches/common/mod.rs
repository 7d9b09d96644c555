//! What the benchmarks share: the API client, process measurements from /proc, percentiles.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imlink_sandbox::Sandbox;
use serde_json::{Value, json};

/// The release daemon `cargo bench` built.
pub const BIN: &str = env!("CARGO_BIN_EXE_imlinkd");

/// The runtime the benchmarks run the sandbox on; with `open_files`, this process's limit of
/// open files is raised first (the daemons started from here inherit it).
pub fn bench_runtime(open_files: Option<u64>) -> tokio::runtime::Runtime {
    if let Some(n) = open_files {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: plain setrlimit on this process, with a valid struct.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A device against `sb` in `dir`: the CA and the device token beside `imlinkd.toml`, the
/// state directory and the API socket inside `dir`. The file ends in the `[api]` table:
/// `extra` adds keys to it first, then any other tables. Returns the config's path.
pub fn device_config(
    sb: &Sandbox,
    dir: &Path,
    user: &str,
    log_level: &str,
    extra: &str,
) -> PathBuf {
    let e = sb.endpoints();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), &e.ca_pem).unwrap();
    std::fs::write(dir.join("token"), &e.device_token).unwrap();
    let cfg = format!(
        "user_id = \"{user}\"\nsdk_app_id = {}\nstate_dir = \"{d}/state\"\nlog_level = \"{log_level}\"\n\
         [broker]\nurl = \"{}\"\nca_file = \"{d}/ca.pem\"\nkeepalive = \"60s\"\n\
         [provisioning]\nurl = \"{}\"\ntoken_file = \"{d}/token\"\nca_file = \"{d}/ca.pem\"\n\
         [api]\nsocket = \"{d}/api.sock\"\n{extra}",
        sb.sdk_app_id(),
        e.mqtt_url,
        e.provisioning_url_template,
        d = dir.display()
    );
    let p = dir.join("imlinkd.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Start the daemon with `config` and `env`, its sd_notify socket at `dir/notify.sock`;
/// returns once READY=1 came, with the socket (still receiving) and the time from spawn.
pub fn spawn_until_ready(
    config: &Path,
    dir: &Path,
    env: &[(&str, &str)],
) -> (Child, UnixDatagram, Duration) {
    let notify_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let t0 = Instant::now();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", &notify_path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn imlinkd");
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("READY=1");
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    (child, notify, t0.elapsed())
}

/// One request on a fresh connection; the response.
pub fn call(sock: &Path, method: &str, params: Value) -> Value {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    let line = json!({"jsonrpc":"2.0","id":1,"method":method,"params":params}).to_string() + "\n";
    s.write_all(line.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out).unwrap();
    serde_json::from_str(&out).unwrap()
}

/// Block until the daemon reports `phase` (via `watch`).
pub fn wait_phase(sock: &Path, phase: &str) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"watch\"}\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    if v["result"]["status"]["phase"] == phase {
        return;
    }
    loop {
        line.clear();
        r.read_line(&mut line).expect("events until the phase");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["method"] == "state_changed" && v["params"]["phase"] == phase {
            return;
        }
    }
}

/// A `key:` line of /proc/PID/FILE, in kB.
pub fn proc_kib(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Memory of a process: (RSS, PSS, anonymous) in KiB.
pub fn memory(pid: u32) -> (u64, u64, u64) {
    (
        proc_kib(pid, "status", "VmRSS:"),
        proc_kib(pid, "smaps_rollup", "Pss:"),
        proc_kib(pid, "smaps_rollup", "Anonymous:"),
    )
}

/// (context switches, CPU time in ns) summed over every thread of `pid` — the wake-ups and
/// the CPU a process costs (schedstat is in nanoseconds; utime ticks are 10 ms).
pub fn wakeups_and_cpu(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    let mut cpu = 0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    for t in tasks.flatten() {
        let dir = t.path();
        if let Ok(status) = std::fs::read_to_string(dir.join("status")) {
            for l in status.lines() {
                if let Some(v) = l
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    switches += v.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
        if let Ok(s) = std::fs::read_to_string(dir.join("schedstat")) {
            cpu += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (switches, cpu)
}

/// A child that dies with the benchmark, even when it panics.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Stats {
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.5),
        p99: at(0.99),
        max: *v.last().unwrap(),
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
