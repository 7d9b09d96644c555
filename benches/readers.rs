//! `cargo bench --bench readers` — what readers that never read their answers can make the
//! daemon hold (issue 18), on the release binary against the bundled sandbox:
//!
//! - a store with 2,000 conversations whose last messages are ~12 KB (the largest a message
//!   may be);
//! - six readers (another uid, as a local app would be) each ask for the largest page of
//!   conversations and never read the answer, while a seventh client (root) reads the whole
//!   list a page at a time;
//! - the daemon's peak memory (VmHWM, from /proc) against the packaged unit's `MemoryMax=64M`,
//!   its RSS before and after, the time the seventh client took, and what the six got.
//!
//! Run as root (the readers run as another uid). Prints a Markdown table and writes it to
//! `target/readers.md` (scripts/bench puts it in docs/benchmarks).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use imlink_sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};

mod common;
use common::*;

const CONVERSATIONS: usize = 2_000;
const SLOW_READERS: usize = 6;
const READER_UID: u32 = 61_020;
/// The packaged unit's `MemoryMax=` (systemd/imlinkd.service).
const MEMORY_MAX_KIB: u64 = 64 * 1024;

/// Fill a store with `CONVERSATIONS` conversations, each with one received message of about
/// 12 KB (as if they had arrived).
fn prefill(path: &Path, owner: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = imlinkd::store::open(path).unwrap();
    let mut ids = imlinkd::message::IdGen::new();
    c.execute_batch("BEGIN").unwrap();
    for i in 0..CONVERSATIONS {
        let ts = 1_790_000_000_000 + i as i64;
        let m = imlinkd::message::WireMessage {
            id: ids.next(ts),
            from: format!("peer-{i}"),
            to: owner.to_string(),
            kind: imlinkd::message::Kind::Text,
            body: "z".repeat(12_000),
            ts,
        };
        imlinkd::store::receive(&c, owner, &m, 1 << 34).unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
}

/// `n` connections as `uid` (this thread's credentials only, raw syscalls), each sending
/// `line` and never reading.
fn slow_readers(sock: &Path, uid: u32, n: usize, line: &'static [u8]) -> Vec<UnixStream> {
    let sock = sock.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: thread-local credential change (raw syscalls), this thread only.
        unsafe {
            libc::syscall(libc::SYS_setresgid, 0, 0, 0);
            libc::syscall(libc::SYS_setresuid, uid, uid, uid);
        }
        (0..n)
            .map(|_| {
                let mut s = UnixStream::connect(&sock).expect("a reader connects");
                s.write_all(line).unwrap();
                s
            })
            .collect()
    })
    .join()
    .unwrap()
}

fn main() {
    let rt = bench_runtime(None);
    let sb = rt
        .block_on(Sandbox::start(SandboxOptions::default()))
        .unwrap();
    let dir = std::env::temp_dir().join(format!("imlinkd-bench-readers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    prefill(&dir.join("state/messages.db"), "kiosk");
    let config = device_config(
        &sb,
        &dir,
        "kiosk",
        "info",
        "[store]\nmax_bytes = \"1GiB\"\n",
    );
    let sock = dir.join("api.sock");
    let (child, notify, _) = spawn_until_ready(&config, &dir, &[]);
    let pid = child.id();
    let mut daemon = KillOnDrop(child);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while notify.recv(&mut buf).is_ok() {}
    });
    wait_phase(&sock, "online");
    std::thread::sleep(Duration::from_secs(2)); // settle before reading memory
    let idle_rss = proc_kib(pid, "status", "VmRSS:");

    let slow = slow_readers(
        &sock,
        READER_UID,
        SLOW_READERS,
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get_conversations\",\"params\":{\"limit\":100}}\n",
    );
    // The seventh client reads the whole list, a page at a time.
    let t0 = Instant::now();
    let mut s = BufReader::new(UnixStream::connect(&sock).unwrap());
    let (mut pages, mut listed, mut bytes) = (0, 0, 0usize);
    let mut before = Value::Null;
    loop {
        let line = json!({"jsonrpc":"2.0","id":1,"method":"get_conversations",
                          "params":{"limit":100,"before":before}})
        .to_string()
            + "\n";
        s.get_mut().write_all(line.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_line(&mut out).unwrap();
        bytes = bytes.max(out.len());
        let v: Value = serde_json::from_str(&out).unwrap();
        pages += 1;
        listed += v["result"]["conversations"].as_array().map_or(0, Vec::len);
        before = v["result"]["next_before"].clone();
        if before.is_null() {
            break;
        }
    }
    let listing = t0.elapsed();
    let rss_loaded = proc_kib(pid, "status", "VmRSS:");
    // The six go on not reading, past the write timeout (5 s) and the wait for the answer
    // budget (10 s); the resident set is sampled meanwhile (VmHWM is updated lazily).
    let mut sampled = rss_loaded;
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        sampled = sampled.max(proc_kib(pid, "status", "VmRSS:"));
        std::thread::sleep(Duration::from_millis(50)); // sampling /proc
    }
    // What the six got once they read: their answer, a "busy" refusal, or a closed
    // connection (the write timeout dropped them).
    let (mut answered, mut busy, mut dropped) = (0, 0, 0);
    for r in slow {
        // The first line: the answer, a refusal, or what was written before the drop.
        let _ = r.set_read_timeout(Some(Duration::from_secs(15)));
        let mut first = String::new();
        let _ = BufReader::new(r).read_line(&mut first);
        match serde_json::from_str::<Value>(&first) {
            Ok(v) if v.get("result").is_some() => answered += 1,
            Ok(v) if v["error"]["code"] == -32004 => busy += 1,
            _ => dropped += 1,
        }
    }
    let peak = proc_kib(pid, "status", "VmHWM:").max(sampled);
    let after = proc_kib(pid, "status", "VmRSS:");
    let _ = std::process::Command::new("kill")
        .arg(pid.to_string())
        .status();
    let _ = daemon.0.wait();
    let table = format!(
        "| measure | value |\n|---|---|\n\
         | store | {CONVERSATIONS} conversations, last messages of ~12 KB |\n\
         | RSS online, idle, before the readers | {idle_rss} KiB |\n\
         | {SLOW_READERS} readers (another uid) ask for 100 conversations each and do not read; \
         meanwhile root lists all {listed} in {pages} pages | {} (largest answer {:.2} MB) |\n\
         | RSS right after the listing | {rss_loaded} KiB |\n\
         | **peak RSS** (VmHWM, and VmRSS sampled every 50 ms for 12 s while the six do not read) against the unit's MemoryMax=64M | **{peak} KiB ({:.0} % of it)** |\n\
         | RSS at the end | {after} KiB |\n\
         | the six readers, reading 12 s later: answered / refused busy / dropped by the write timeout | {answered} / {busy} / {dropped} |\n",
        ms(listing),
        bytes as f64 / 1e6,
        peak as f64 * 100.0 / MEMORY_MAX_KIB as f64,
    );
    println!("{table}");
    println!(
        "target: peak RSS well below MemoryMax=64M with readers that never read: {} ({peak} KiB)",
        if peak * 2 <= MEMORY_MAX_KIB {
            "met"
        } else {
            "MISSED"
        }
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/readers.md");
    let _ = std::fs::write(out, &table);
    let _ = std::fs::remove_dir_all(&dir);
}
