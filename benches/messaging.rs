//! `cargo bench --bench messaging` — messaging through two release daemons on loopback, over
//! the bundled reference IM service (TLS, MQTT v5), with the store at `synchronous=FULL`:
//!
//! - end-to-end throughput: alice's apps send N messages to bob (4 API clients at once); the
//!   clock stops when bob's store has committed the last one (bob's `message_received`);
//! - fsyncs per message on both sides (counted with `strace -c` on a separate run, when strace
//!   is installed: tracing slows the daemons, so it is not the timed run);
//! - store bytes per message, and imlinkd's RSS with a 100,000-message store next to a
//!   login-only daemon (same build, empty store).
//!
//! Targets: ≥ 500 messages/s end to end; RSS growth ≤ 2 MiB over the login-only daemon.
//! Prints a Markdown table and writes it to `target/messaging.md`. The README shows a run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imlink_sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};

mod common;
use common::{device_config, proc_kib, spawn_until_ready, wait_phase};

const N: usize = 5_000;
const SENDERS: usize = 4;
const TRACED: usize = 1_000;
const STORED: usize = 100_000;

fn call(s: &mut BufReader<UnixStream>, method: &str, params: Value) -> Value {
    let line = json!({"jsonrpc":"2.0","id":1,"method":method,"params":params}).to_string() + "\n";
    s.get_mut().write_all(line.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_line(&mut out).unwrap();
    serde_json::from_str(&out).unwrap()
}

fn connect(sock: &Path) -> BufReader<UnixStream> {
    BufReader::new(UnixStream::connect(sock).expect("connect"))
}

struct Daemon {
    child: Child,
    sock: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Start a release imlinkd for `user` in `dir` and wait until it is online.
fn start(sb: &Sandbox, root: &Path, user: &str) -> Daemon {
    let dir = root.join(user);
    let config = device_config(sb, &dir, user, "info", "[store]\nmax_bytes = \"1GiB\"\n");
    let (child, notify, _) = spawn_until_ready(&config, &dir, &[]);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while notify.recv(&mut buf).is_ok() {}
    });
    let sock = dir.join("api.sock");
    wait_phase(&sock, "online");
    Daemon { child, sock }
}

/// A watcher on `sock` that returns once it has seen `n` `message_received` notifications
/// (and when).
fn count_received(sock: &Path, n: usize) -> std::thread::JoinHandle<Instant> {
    let mut s = connect(sock);
    call(&mut s, "watch", json!({}));
    std::thread::spawn(move || {
        let mut seen = 0;
        let mut line = String::new();
        while seen < n {
            line.clear();
            s.read_line(&mut line).expect("notifications");
            if line.contains("\"message_received\"") {
                seen += 1;
            }
        }
        Instant::now()
    })
}

/// Send `n` messages from `sock` to `to` with `SENDERS` clients at once.
fn send_all(sock: &Path, to: &str, n: usize, tag: &str) {
    let threads: Vec<_> = (0..SENDERS)
        .map(|k| {
            let (sock, to, tag) = (sock.to_path_buf(), to.to_string(), tag.to_string());
            std::thread::spawn(move || {
                let mut s = connect(&sock);
                for i in (k..n).step_by(SENDERS) {
                    let v = call(
                        &mut s,
                        "send_message",
                        json!({ "to": to, "body": format!("{tag} message {i}: a kiosk says hello") }),
                    );
                    assert!(v["result"]["id"].is_string(), "{v}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// fsync + fdatasync calls by `pids` while `f` runs (strace -c), or `None` without strace.
fn count_fsyncs(pids: &[u32], f: impl FnOnce()) -> Option<u64> {
    let mut tracers = Vec::new();
    for pid in pids {
        let out = std::env::temp_dir().join(format!("imlinkd-strace-{pid}.txt"));
        let t = Command::new("strace")
            .args(["-f", "-c", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        tracers.push((t, out));
    }
    std::thread::sleep(Duration::from_millis(500)); // strace attaches
    f();
    std::thread::sleep(Duration::from_millis(500)); // the last commits
    let mut total = 0;
    for (t, out) in tracers {
        let _ = Command::new("kill")
            .args(["-INT", &t.id().to_string()])
            .status();
        let _ = t.wait_with_output();
        let text = std::fs::read_to_string(&out).ok()?;
        // strace -c: "% time seconds usecs/call calls errors syscall"
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let Some(name) = f.last()
                && (*name == "fsync" || *name == "fdatasync")
            {
                total += f.get(3).and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
            }
        }
        let _ = std::fs::remove_file(out);
    }
    Some(total)
}

/// Fill a store with `n` received messages for `owner` (100 peers), as if they had arrived.
fn prefill(path: &Path, owner: &str, n: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = imlinkd::store::open(path).unwrap();
    let mut ids = imlinkd::message::IdGen::new();
    c.execute_batch("BEGIN").unwrap();
    for i in 0..n {
        let ts = 1_790_000_000_000 + i as i64 * 1_000;
        let m = imlinkd::message::WireMessage {
            id: ids.next(ts),
            from: format!("peer-{}", i % 100),
            to: owner.to_string(),
            kind: imlinkd::message::Kind::Text,
            body: format!("stored message {i}: a kiosk says hello"),
            ts,
        };
        imlinkd::store::receive(&c, owner, &m, 1 << 30).unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    // A kiosk that has read them all.
    for p in 0..100 {
        imlinkd::store::mark_read(&c, owner, &format!("peer-{p}")).unwrap();
    }
}

fn main() {
    let rt = common::bench_runtime(None);
    let sb = rt
        .block_on(Sandbox::start(SandboxOptions {
            offline_limit: 1_000_000,
            ..Default::default()
        }))
        .unwrap();
    let root = std::env::temp_dir().join(format!("imlinkd-bench-msg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    // A login-only daemon, for the memory baseline.
    let idle = start(&sb, &root, "idle");
    std::thread::sleep(Duration::from_secs(3)); // settle before reading memory
    let idle_rss = proc_kib(idle.pid(), "status", "VmRSS:");
    let idle_anon = proc_kib(idle.pid(), "smaps_rollup", "Anonymous:");

    // Throughput, end to end.
    let alice = start(&sb, &root, "alice");
    let bob = start(&sb, &root, "bob");
    let done = count_received(&bob.sock, N);
    let t0 = Instant::now();
    send_all(&alice.sock, "bob", N, "timed");
    let accepted = t0.elapsed();
    let last = done.join().unwrap();
    let e2e = last.duration_since(t0);

    // fsyncs per message (a separate, traced run).
    let done = count_received(&bob.sock, TRACED);
    let fsyncs = count_fsyncs(&[alice.pid(), bob.pid()], || {
        send_all(&alice.sock, "bob", TRACED, "traced");
        done.join().unwrap();
    });

    // Store bytes per message, and RSS with a 100,000-message store.
    let carol_db = root.join("carol/state/messages.db");
    prefill(&carol_db, "carol", STORED);
    let file_bytes = std::fs::metadata(&carol_db).map(|m| m.len()).unwrap_or(0);
    let carol = start(&sb, &root, "carol");
    {
        let mut s = connect(&carol.sock);
        let conv = call(&mut s, "get_conversations", json!({ "limit": 100 }));
        assert_eq!(
            conv["result"]["conversations"].as_array().map(Vec::len),
            Some(100)
        );
        let mut before = Value::Null;
        for _ in 0..20 {
            let h = call(
                &mut s,
                "get_history",
                json!({ "peer": "peer-7", "before": before, "limit": 50 }),
            );
            before = h["result"]["next_before"].clone();
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let big_rss = proc_kib(carol.pid(), "status", "VmRSS:");
    let big_anon = proc_kib(carol.pid(), "smaps_rollup", "Anonymous:");
    let alice_rss = proc_kib(alice.pid(), "status", "VmRSS:");

    let size = std::fs::metadata(common::BIN).map(|m| m.len()).unwrap_or(0);
    let rate = N as f64 / e2e.as_secs_f64();
    let table = format!(
        "| measure | value |\n|---|---|\n\
         | binary size (this build, SQLite included) | {:.2} MB |\n\
         | end to end, alice → bob, {N} messages, {SENDERS} API clients | {:.0} messages/s ({:.2} s; sends accepted in {:.2} s) |\n\
         | fsyncs per message, sender + receiver ({TRACED} traced) | {} |\n\
         | store bytes per message ({STORED} stored, file / messages) | {:.0} B |\n\
         | RSS, login-only daemon (empty store) | {idle_rss} KiB (anonymous {idle_anon} KiB) |\n\
         | RSS, daemon with a {STORED}-message store, after conversations + 20 history pages | {big_rss} KiB (anonymous {big_anon} KiB) |\n\
         | RSS growth with the {STORED}-message store | {:+} KiB |\n\
         | RSS, alice after sending {} messages | {alice_rss} KiB |\n",
        size as f64 / 1e6,
        rate,
        e2e.as_secs_f64(),
        accepted.as_secs_f64(),
        fsyncs.map_or("n/a (strace not installed)".to_string(), |f| format!(
            "{:.3} ({f} fsyncs)",
            f as f64 / TRACED as f64
        )),
        file_bytes as f64 / STORED as f64,
        big_rss as i64 - idle_rss as i64,
        N + TRACED,
    );
    println!("{table}");
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target: ≥ 500 messages/s end to end: {} ({rate:.0}/s)",
        verdict(rate >= 500.0)
    );
    println!(
        "target: RSS growth ≤ 2 MiB with a {STORED}-message store: {} ({:+} KiB)",
        verdict(big_rss <= idle_rss + 2048),
        big_rss as i64 - idle_rss as i64
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/messaging.md");
    let _ = std::fs::write(out, &table);
    drop((idle, alice, bob, carol));
    let _ = std::fs::remove_dir_all(&root);
}
