//! `cargo bench --bench compare` — imlinkd side by side with `mosquitto_sub -V mqttv5` holding
//! the same TLS MQTT 5 session to the same broker (the bundled sandbox), in the same run:
//! footprint, idle wake-ups and CPU, start-up; then the local API under many watchers, and a
//! planned UserSig rotation. Every figure sits beside its baseline as a ratio. Writes
//! `target/bench/compare.md` and `target/bench/watchers.csv`; `scripts/bench` puts them in
//! docs/benchmarks/. Run as root (raises the open-files limit for 1,000 watchers).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use imlink_sandbox::{Sandbox, SandboxOptions};
use serde_json::{Value, json};

mod common;
use common::*;

/// The idle window for wake-ups and CPU.
const IDLE: Duration = Duration::from_secs(120);
/// How long both hold their session before memory is read.
const SETTLE: Duration = Duration::from_secs(60);
/// The default config, but for the API's client limits (the 1,000-watcher runs).
const API_LIMITS: &str =
    "max_clients = 1200\nmax_clients_per_uid = 1100\nmax_watchers_per_uid = 1100\n";

struct Imlinkd {
    child: KillOnDrop,
    sock: PathBuf,
    notes: mpsc::Receiver<String>,
}

/// Start imlinkd (release) with a 30 s watchdog, as the unit has; returns when READY=1 came,
/// with the time it took.
fn start(dir: &Path, config: &Path) -> (Imlinkd, Duration) {
    let (child, notify, ready) = spawn_until_ready(config, dir, &[("WATCHDOG_USEC", "30000000")]);
    // Drain the notify socket as systemd would, keeping what came.
    let (tx, notes) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = notify.recv(&mut buf) {
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let sock = dir.join("api.sock");
    (
        Imlinkd {
            child: KillOnDrop(child),
            sock,
            notes,
        },
        ready,
    )
}

/// `mosquitto_sub -V mqttv5` holding a persistent QoS 1 session over TLS as `user`; returns
/// once its CONNACK came, with the time from spawn.
///
/// `timed`: run it under `stdbuf -oL` and wait for its own "received CONNACK" debug line
/// (piped, its stdout is block-buffered: the line would only appear at exit). Otherwise (the
/// footprint session, whose memory is measured: no preloaded libstdbuf) it runs bare and the
/// wait is for the sandbox's count of accepted logins.
fn mosquitto_sub(
    sb: &Sandbox,
    dir: &Path,
    user: &str,
    sig: &str,
    timed: bool,
) -> (KillOnDrop, Duration) {
    let e = sb.endpoints();
    let accepted = |sb: &Sandbox| sb.counters().user(user).logins_accepted;
    let before = accepted(sb);
    let t0 = Instant::now();
    let mut cmd = if timed {
        let mut c = Command::new("stdbuf");
        c.args(["-oL", "mosquitto_sub"]);
        c
    } else {
        Command::new("mosquitto_sub")
    };
    let mut child = cmd
        .args(["-h", &e.mqtt_addr.ip().to_string()])
        .args(["-p", &e.mqtt_addr.port().to_string()])
        .arg("--cafile")
        .arg(dir.join("ca.pem"))
        .args(["-V", "mqttv5", "-q", "1", "-c", "-k", "60", "-d"])
        .args(["-i", &format!("{}:{user}:linux:0", sb.sdk_app_id())])
        .args(["-u", user, "-P", sig])
        .args(["-t", &format!("im/{}/u/{user}/#", sb.sdk_app_id())])
        .stdin(Stdio::null())
        .stdout(if timed { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (Debian package mosquitto-clients)");
    if timed {
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if l.contains("received CONNACK") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("mosquitto_sub's CONNACK");
    } else {
        let deadline = Instant::now() + Duration::from_secs(30);
        while accepted(sb) == before {
            assert!(Instant::now() < deadline, "mosquitto_sub's CONNACK");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    (KillOnDrop(child), t0.elapsed())
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "—".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

/// `n` watchers connected (each has had its snapshot).
fn watchers(sock: &Path, n: usize) -> Vec<BufReader<UnixStream>> {
    (0..n)
        .map(|_| {
            let mut s = UnixStream::connect(sock).expect("watcher connect");
            s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"watch\"}\n")
                .unwrap();
            let mut r = BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"result\""), "watch refused: {line}");
            r
        })
        .collect()
}

fn main() {
    // 1,000 watchers need more than the default 1,024 open files (here and in the daemon).
    let rt = bench_runtime(Some(8192));
    let sb = rt
        .block_on(Sandbox::start(SandboxOptions {
            sig_lifetime: Duration::from_secs(86_400),
            ..Default::default()
        }))
        .unwrap();
    let root = std::env::temp_dir().join(format!("imlinkd-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join("kiosk");
    let config = device_config(&sb, &dir, "kiosk", "warn", API_LIMITS);
    let msub_sig = sb.issue_sig("msub", Duration::from_secs(86_400));
    let mut md = String::new();
    let now = chrono_free_date();
    md += &format!(
        "Run {now} on {} ({} cores), {}, mosquitto_sub {}. Command: `./scripts/bench`.\n\n",
        uname(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        env!("CARGO_PKG_VERSION")
            .split('.')
            .next()
            .map(|_| format!("imlinkd {}", env!("CARGO_PKG_VERSION")))
            .unwrap_or_default(),
        mosquitto_version(),
    );

    // --- start-up -----------------------------------------------------------------------------
    let (first, ready0) = start(&dir, &config);
    wait_phase(&first.sock, "online");
    drop(first); // kill: the next starts find the cached sig
    let mut readies = Vec::new();
    let mut onlines = Vec::new();
    for _ in 0..10 {
        let t0 = Instant::now();
        let (d, ready) = start(&dir, &config);
        wait_phase(&d.sock, "online");
        readies.push(ready);
        onlines.push(t0.elapsed());
        let _ = Command::new("kill")
            .arg(d.child.0.id().to_string())
            .status();
        drop(d);
    }
    let mut msub_connacks = Vec::new();
    for _ in 0..10 {
        let (m, t) = mosquitto_sub(&sb, &dir, "msub", &msub_sig, true);
        msub_connacks.push(t);
        drop(m);
    }
    let ready = stats(readies);
    let online = stats(onlines);
    let msub_online = stats(msub_connacks);

    // --- footprint, wake-ups, CPU: both holding their session ---------------------------------
    let (d, _) = start(&dir, &config);
    wait_phase(&d.sock, "online");
    let watcher = watchers(&d.sock, 1);
    let (msub, _) = mosquitto_sub(&sb, &dir, "msub", &msub_sig, false);
    let (pid, mpid) = (d.child.0.id(), msub.0.id());
    std::thread::sleep(SETTLE); // both hold their session, as a kiosk would
    let (rss, pss, anon) = memory(pid);
    let (mrss, mpss, manon) = memory(mpid);
    let (w0, c0) = wakeups_and_cpu(pid);
    let (mw0, mc0) = wakeups_and_cpu(mpid);
    // Only the window's pings: what came during start-up and the settle is not counted.
    let _before_the_window = d.notes.try_iter().count();
    std::thread::sleep(IDLE); // the idle window being measured
    let (w1, c1) = wakeups_and_cpu(pid);
    let (mw1, mc1) = wakeups_and_cpu(mpid);
    let pings = d
        .notes
        .try_iter()
        .filter(|n| n.contains("WATCHDOG=1"))
        .count();
    let (wake, mwake) = (w1 - w0, mw1 - mw0);
    let (cpu_ms, mcpu_ms) = ((c1 - c0) as f64 / 1e6, (mc1 - mc0) as f64 / 1e6);
    drop(msub);
    drop(watcher);

    md += "## Footprint and idle cost, beside mosquitto_sub\n\n";
    md += "Both hold one TLS MQTT 5 session (persistent, QoS 1 inbox, keepalive 60 s) to the same broker; imlinkd runs its default configuration (but for higher API client limits, for the watcher runs below), with its message store open, one API watcher, and systemd's watchdog at 30 s (as the unit sets). Memory after 60 s online; wake-ups are context switches of all threads over 120 s idle; CPU from `/proc/PID/task/*/schedstat`.\n\n";
    md += "| measure | imlinkd | mosquitto_sub | ratio | target |\n|---|---|---|---|---|\n";
    md += &format!(
        "| RSS | {rss} KiB | {mrss} KiB | {} | ≤ 0.7× — {} |\n",
        ratio(rss as f64, mrss as f64),
        verdict(rss as f64 <= 0.7 * mrss as f64)
    );
    md += &format!(
        "| PSS | {pss} KiB | {mpss} KiB | {} | — |\n",
        ratio(pss as f64, mpss as f64)
    );
    md += &format!(
        "| private anonymous | {anon} KiB | {manon} KiB | {} | ≤ 0.6× — {} |\n",
        ratio(anon as f64, manon as f64),
        verdict(anon as f64 <= 0.6 * manon as f64)
    );
    md += &format!(
        "| wake-ups in 120 s idle | {wake} | {mwake} | {} | ≤ 16 — {} |\n",
        ratio(wake as f64, mwake as f64),
        verdict(wake <= 16)
    );
    md += &format!(
        "| CPU in 120 s idle | {cpu_ms:.1} ms | {mcpu_ms:.1} ms | {} | ≤ 2× + 5 ms — {} |\n",
        ratio(cpu_ms, mcpu_ms),
        verdict(cpu_ms <= 2.0 * mcpu_ms + 5.0)
    );
    md += &format!("| watchdog pings in the window | {pings} | — | — | 8 at WatchdogSec=30s |\n\n");
    md += "## Start-up\n\n| measure | imlinkd | mosquitto_sub | ratio | target |\n|---|---|---|---|---|\n";
    md += &format!(
        "| start → READY=1 (p50 of 10) | {} | — | — | ≤ 10 ms — {} |\n",
        ms(ready.p50),
        verdict(ready.p50 <= Duration::from_millis(10))
    );
    md += &format!(
        "| start → online, cached UserSig (p50 of 10) | {} | {} (→ CONNACK) | {} | ≤ 1.2× — {} |\n",
        ms(online.p50),
        ms(msub_online.p50),
        ratio(online.p50.as_secs_f64(), msub_online.p50.as_secs_f64()),
        verdict(online.p50.as_secs_f64() <= 1.2 * msub_online.p50.as_secs_f64())
    );
    md += &format!(
        "| first start → READY=1 (fresh state dir) | {} | — | — | — |\n\n",
        ms(ready0)
    );
    md += "mosquitto_sub's start-up runs under `stdbuf -oL` so that its \"received CONNACK\" line \
           is seen when printed; its footprint run above is bare.\n\n";

    // --- the local API under watchers ------------------------------------------------------------
    let base_rss = proc_kib(pid, "status", "VmRSS:");
    let mut csv = String::from("watchers,rss_kib,per_watcher_kib\n");
    let mut held: Vec<BufReader<UnixStream>> = Vec::new();
    let mut per = Vec::new();
    for n in [1usize, 10, 100, 1000] {
        held.extend(watchers(&d.sock, n - held.len()));
        std::thread::sleep(Duration::from_millis(500)); // let the allocator settle
        let r = proc_kib(pid, "status", "VmRSS:");
        let each = (r as f64 - base_rss as f64) / n as f64;
        per.push((n, r, each));
        csv += &format!("{n},{r},{each:.2}\n");
        if n == 100 {
            // status latency with 100 watchers
            let lat: Vec<Duration> = (0..1000)
                .map(|_| {
                    let t = Instant::now();
                    let v = call(&d.sock, "status", json!({}));
                    assert!(v.get("result").is_some());
                    t.elapsed()
                })
                .collect();
            let s = stats(lat);
            md += "## Local API\n\n| measure | value | target |\n|---|---|---|\n";
            md += &format!(
                "| `status` (new connection) with 100 watchers, p50 / p99 | {} / {} | p99 ≤ 1 ms — {} |\n",
                ms(s.p50),
                ms(s.p99),
                verdict(s.p99 <= Duration::from_millis(1))
            );
        }
    }
    // One event fanned out to 1,000 watchers: logout is one state change.
    let (tx, rx) = mpsc::channel();
    let t0 = Instant::now();
    for mut w in held.drain(..) {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            w.get_mut()
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            while w.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line.contains("state_changed") {
                    let _ = tx.send(Instant::now());
                    return;
                }
                line.clear();
            }
        });
    }
    drop(tx);
    std::thread::sleep(Duration::from_millis(300)); // the reader threads are waiting
    let t0 = t0.max(Instant::now());
    call(&d.sock, "logout", json!({}));
    let arrivals: Vec<Instant> = rx.iter().collect();
    let fanout = arrivals
        .iter()
        .max()
        .map(|t| t.saturating_duration_since(t0))
        .unwrap_or_default();
    md += &format!(
        "| one event to 1,000 watchers: until the last has it | {} ({} received) | ≤ 50 ms — {} |\n",
        ms(fanout),
        arrivals.len(),
        verdict(fanout <= Duration::from_millis(50) && arrivals.len() == 1000)
    );
    for (n, r, each) in &per {
        md += &format!(
            "| RSS with {n} idle watchers | {r} KiB ({each:+.1} KiB each) | ≤ 16 KiB each — {} |\n",
            verdict(*each <= 16.0)
        );
    }
    md += "\n";
    call(&d.sock, "login", json!({}));
    drop(d);

    // --- planned UserSig rotation --------------------------------------------------------------
    // Short sigs: the refresh comes at ~80 % of 30 s, and the session moves to the new sig with
    // a clean DISCONNECT/CONNECT; meanwhile the service publishes to the inbox every 10 ms.
    sb.set_sig_lifetime(Duration::from_secs(30));
    let rdir = root.join("rotor");
    let rconfig = device_config(&sb, &rdir, "rotor", "warn", API_LIMITS);
    let (r, _) = start(&rdir, &rconfig);
    wait_phase(&r.sock, "online");
    let mut w = watchers(&r.sock, 1).pop().unwrap();
    w.get_mut()
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The sender in the topic (brief: `in/{sender}`), the payload's `from` the same.
    let topic = format!("im/{}/u/rotor/in/service", sb.sdk_app_id());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let ctl = sb.control_handle();
        let topic = topic.clone();
        std::thread::spawn(move || {
            let mut ids = imlinkd::message::IdGen::new();
            let mut sent = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now = imlinkd::clock::wall_ms();
                let m = imlinkd::message::WireMessage {
                    id: ids.next(now),
                    from: "service".into(),
                    to: "rotor".into(),
                    kind: imlinkd::message::Kind::Text,
                    body: "tick".into(),
                    ts: now,
                };
                ctl.publish(&topic, 1, &m.encode().unwrap());
                sent.push(m.id);
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        })
    };
    // Wait for the move: online → (not online) → online.
    let mut left: Option<Instant> = None;
    let mut gap = Duration::ZERO;
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        line.clear();
        if w.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["method"] != "state_changed" {
            continue;
        }
        let phase = v["params"]["phase"].as_str().unwrap_or("");
        match (phase, left) {
            ("online", Some(t)) => {
                gap = t.elapsed();
                break;
            }
            ("online", None) => {}
            (_, None) => left = Some(Instant::now()),
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = publisher.join().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut got = std::collections::BTreeSet::new();
    // From the start of rotor's inbox, whatever was acknowledged.
    let mut cursor = "rotor:0".to_string();
    loop {
        let v = call(
            &r.sock,
            "read_inbox",
            json!({ "cursor": cursor, "limit": 100 }),
        );
        let page = v["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if page.is_empty() {
            break;
        }
        cursor = v["result"]["cursor"]
            .as_str()
            .unwrap_or(&cursor)
            .to_string();
        for m in page {
            got.insert(m["id"].as_str().unwrap_or("").to_string());
        }
    }
    let lost = sent.iter().filter(|id| !got.contains(*id)).count();
    md += "## Planned UserSig rotation\n\n| measure | value | target |\n|---|---|---|\n";
    md += &format!(
        "| offline during the move to a new UserSig | {} | ≤ 200 ms — {} |\n",
        ms(gap),
        verdict(gap > Duration::ZERO && gap <= Duration::from_millis(200))
    );
    md += &format!(
        "| QoS 1 messages published to the inbox during the run / lost | {} / {lost} | 0 lost — {} |\n\n",
        sent.len(),
        verdict(lost == 0)
    );
    drop(r);

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("compare.md"), &md).unwrap();
    std::fs::write(out.join("watchers.csv"), &csv).unwrap();
    println!("{md}");
    let _ = std::fs::remove_dir_all(&root);
}

fn uname() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/debian_version")
        .map(|v| format!("Debian {}", v.trim()))
        .unwrap_or_default();
    format!("{cpu}, {os}")
}

fn mosquitto_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "mosquitto-clients"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn chrono_free_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
