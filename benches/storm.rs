//! `cargo bench --bench storm` — a real fleet reconnect storm on loopback: N release imlinkd
//! processes (`IMLINKD_STORM_DEVICES`, default 1,000) against one sandbox that, after they are
//! all online, drops every connection and stops listening for 30 s, then comes back accepting
//! at most C CONNECTs per second (`IMLINKD_STORM_CAPACITY`, default 100; beyond: CONNACK
//! 0x9F). Samples the sandbox's counters every second and writes `target/bench/storm-real.csv`
//! (second, CONNECTs accepted and refused in that second, sessions open) and
//! `target/bench/storm-real.md`. Run as root (raises the process and file limits).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imlink_sandbox::{Sandbox, SandboxOptions};

mod common;
use common::*;

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn(sb: &Sandbox, root: &Path, i: usize) -> Child {
    let user = format!("dev-{i:04}");
    let dir = root.join(&user);
    device_config(sb, &dir, &user, "warn", "[store]\nmax_bytes = \"1MiB\"\n");
    Command::new(BIN)
        .arg("--config")
        .arg(dir.join("imlinkd.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn imlinkd")
}

/// (CONNECT attempts in all, 0x9F refusals in all, sessions open).
fn sample(sb: &Sandbox) -> (u64, u64, u64) {
    let c = sb.counters();
    let attempts = c.users.values().map(|u| u.connect_attempts).sum();
    let refused = c
        .users
        .values()
        .map(|u| u.refusals.get("0x9F").copied().unwrap_or(0))
        .sum();
    (attempts, refused, c.connections_open)
}

fn main() {
    let n = env_num("IMLINKD_STORM_DEVICES", 1_000) as usize;
    let capacity = env_num("IMLINKD_STORM_CAPACITY", 100) as u32;
    let rt = bench_runtime(Some(65_536)); // 1,000 daemons' sockets
    let sb = rt
        .block_on(Sandbox::start(SandboxOptions {
            sig_lifetime: Duration::from_secs(86_400),
            failed_login_limit: u32::MAX,
            ..Default::default()
        }))
        .unwrap();
    let root: PathBuf = std::env::temp_dir().join(format!("imlinkd-storm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();

    eprintln!("starting {n} imlinkd processes");
    let t0 = Instant::now();
    let mut children: Vec<KillOnDrop> = Vec::with_capacity(n);
    for i in 0..n {
        children.push(KillOnDrop(spawn(&sb, &root, i)));
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(500)); // let the handshakes through
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while sample(&sb).2 < n as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} online",
            sample(&sb).2
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let startup = t0.elapsed();
    // Stable sessions (the default backoff_reset_after is 5 min): the fleet is settled.
    eprintln!("all {n} online after {startup:?}; settling 5 min");
    std::thread::sleep(Duration::from_secs(310));
    let pss: u64 = children
        .iter()
        .map(|c| proc_kib(c.0.id(), "smaps_rollup", "Pss:"))
        .sum();

    // The outage.
    sb.set_connect_rate(Some(capacity));
    let (a0, r0, _) = sample(&sb);
    let outage_at = Instant::now();
    rt.block_on(sb.stop_listener()).unwrap();
    sb.drop_all();
    let mut csv = String::from("second,accepted,refused,online,capacity\n");
    let (mut last_a, mut last_r) = (a0, r0);
    let mut back_at: Option<Duration> = None;
    let mut peak = 0u64;
    let mut restarted = false;
    for second in 0..(30 + 300 + 60) {
        let tick = outage_at + Duration::from_secs(second + 1);
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        if !restarted && outage_at.elapsed() >= Duration::from_secs(30) {
            rt.block_on(sb.start_listener()).unwrap();
            restarted = true;
        }
        let (a, r, online) = sample(&sb);
        let attempts = a - last_a;
        let refused = r - last_r;
        // While the listener is down, attempts never reach the sandbox (TCP refused): they
        // are not counted here; the simulated curve shows them.
        csv += &format!(
            "{second},{},{refused},{online},{capacity}\n",
            attempts - refused
        );
        peak = peak.max(attempts);
        (last_a, last_r) = (a, r);
        if restarted && online >= n as u64 && back_at.is_none() {
            back_at = Some(outage_at.elapsed() - Duration::from_secs(30));
            if second > 60 {
                break;
            }
        }
    }
    let (a_end, r_end, _) = sample(&sb);
    let md = format!(
        "| measure | value | target |\n|---|---|---|\n\
         | devices (real imlinkd processes on loopback) | {n} (PSS {:.0} MiB in all, {:.2} MiB each) | 1,000 |\n\
         | start-up of the fleet (50 every 0.5 s) | {:.0} s | — |\n\
         | broker capacity after the outage | {capacity} CONNECTs/s (CONNACK 0x9F beyond) | — |\n\
         | all back online after the broker's return | {} | ≤ backoff_cap + 10 s (310 s) — {} |\n\
         | peak CONNECTs reaching the broker in one second | {peak} | — |\n\
         | CONNECTs in all after the outage / refused with 0x9F | {} / {} | — |\n",
        pss as f64 / 1024.0,
        pss as f64 / 1024.0 / n as f64,
        startup.as_secs_f64(),
        back_at.map_or("not within the window".into(), |d| format!(
            "{:.0} s",
            d.as_secs_f64()
        )),
        if back_at.is_some_and(|d| d <= Duration::from_secs(310)) {
            "met"
        } else {
            "**missed**"
        },
        a_end - a0,
        r_end - r0,
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("storm-real.csv"), &csv).unwrap();
    std::fs::write(out.join("storm-real.md"), &md).unwrap();
    println!("{md}");
    drop(children);
    let _ = std::fs::remove_dir_all(&root);
}
