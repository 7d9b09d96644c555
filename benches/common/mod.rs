//! What the benchmarks share: the API client, process measurements from /proc, percentiles.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};

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
