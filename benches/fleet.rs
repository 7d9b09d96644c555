//! `cargo bench --bench fleet` — how much memory `imlinkctl fleet` needs for a large fleet:
//! N retained status documents (`IMLINKD_FLEET_DEVICES`, default 10,000; a realistic mix of
//! states, about 420 bytes each) on one sandbox, read by the release `imlinkctl fleet --watch`
//! as an operator. For each run: the time until the report is out (the 0.5 s settle
//! included), the peak RSS (VmHWM) and the RSS then, and both again after 1,000 devices
//! changed state while it watched. Writes `target/fleet.md`.
//!
//! The documents are published retained by the sandbox itself (as the service, which is
//! exactly what the operator receives either way): 10,000 device logins would measure the
//! sandbox, not the tool.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use imlink_sandbox::{Sandbox, SandboxOptions};

mod common;
use common::*;

const CTL: &str = env!("CARGO_BIN_EXE_imlinkctl");
const TOKEN: &str = "bench-operator-token";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Device `i`'s status: most online, some offline (a will), logged out, stopped, kicked,
/// failing renewal.
fn doc(i: usize, flipped: bool) -> String {
    let t = now();
    let (state, phase, err, renewal) = match (i % 100, flipped) {
        (_, true) => ("offline", None, None, "ok"),
        (0..=4, _) => ("offline", None, Some(("network", 9508)), "ok"),
        (5 | 6, _) => ("logged_out", Some("idle"), None, "ok"),
        (7, _) => ("stopped", Some("logging_out"), None, "ok"),
        (8, _) => ("online", Some("online"), Some(("kicked", 6208)), "ok"),
        (9, _) => ("online", Some("online"), Some(("network", 9508)), "failing"),
        _ => ("online", Some("online"), None, "ok"),
    };
    serde_json::json!({
        "v": 1, "state": state,
        "reason": if state == "offline" { Some("connection lost") } else { None },
        "phase": phase, "login_status": 1,
        "user_id": format!("kiosk-{i:05}"), "platform": "linux", "instance": "0",
        "version": "0.1.0", "since": t - (i as i64 % 86_400), "at": t,
        "last_error": err.map(|(c, n)| serde_json::json!({"class": c, "code": n})),
        "user_sig": {"expires_at": t + 86_400, "renewal": renewal, "failures": u32::from(renewal == "failing") * 3},
        "broker": "mqtts://n2.fleet.example.com:8883", "protocol": "v5",
        "outbox_pending": 0, "inbox_unacked": 0
    })
    .to_string()
}

fn topic(sb: &Sandbox, i: usize) -> String {
    format!("im/{}/d/kiosk-{i:05}/linux/0/status", sb.sdk_app_id())
}

struct Row {
    devices: usize,
    json: bool,
    to_report: Duration,
    hwm: u64,
    rss: u64,
    hwm_after: u64,
    rss_after: u64,
    bytes: u64,
}

/// Start `imlinkctl fleet --watch` against `sb`, wait for its report, measure; flip `changes`
/// devices to offline and wait for their lines, measure again.
fn run(rt: &tokio::runtime::Runtime, sb: &Sandbox, dir: &Path, n: usize, json: bool) -> Row {
    let changes = n.min(1000);
    let mut cmd = Command::new(CTL);
    cmd.args(["fleet", "--broker", &sb.endpoints().mqtt_url])
        .arg("--ca")
        .arg(dir.join("ca.pem"))
        .args(["--user", "ops"])
        .arg("--password-file")
        .arg(dir.join("ops.pw"))
        .args(["--sdk-app-id", &sb.sdk_app_id().to_string()])
        .args(["--settle", "500ms", "--watch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if json {
        cmd.arg("--json");
    }
    let started = Instant::now();
    let mut child = KillOnDrop(cmd.spawn().expect("imlinkctl"));
    let pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    // The report ends with the summary object (NDJSON) or with the last line of the list of
    // devices that need attention (text); every line after it is one change.
    let (tx, rx) = mpsc::channel::<&'static str>();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut left: Option<usize> = None;
        while let Some(Ok(l)) = lines.next() {
            if json {
                if l.contains("\"type\":\"summary\"") {
                    let _ = tx.send("report");
                    break;
                }
            } else if let Some(k) = l.strip_prefix("needs attention: ") {
                left = k.split(' ').next().and_then(|k| k.parse().ok());
            } else if l.starts_with("no device needs attention") {
                left = Some(0);
            } else if let Some(k) = left.as_mut() {
                *k -= 1;
            }
            if left == Some(0) {
                let _ = tx.send("report");
                break;
            }
        }
        for l in lines.map_while(Result::ok) {
            // Not the connection's own lines (text: `HH:MM:SS connection lost: …`).
            let connection =
                l.contains("\"type\":\"connection\"") || l.get(9..20) == Some("connection ");
            if !connection {
                let _ = tx.send("change");
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(120)),
        Ok("report"),
        "the report"
    );
    let to_report = started.elapsed();
    let hwm = proc_kib(pid, "status", "VmHWM:");
    let rss = proc_kib(pid, "status", "VmRSS:");
    rt.block_on(async {
        for i in 0..changes {
            sb.publish_with(&topic(sb, i), 1, true, doc(i, true).as_bytes())
                .unwrap();
        }
    });
    // Every one of them changes something a watcher sees (state, or its last error).
    for _ in 0..changes {
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(60)),
            Ok("change"),
            "a change line"
        );
    }
    let row = Row {
        devices: n,
        json,
        to_report,
        hwm,
        rss,
        hwm_after: proc_kib(pid, "status", "VmHWM:"),
        rss_after: proc_kib(pid, "status", "VmRSS:"),
        bytes: sb.counters().retained_bytes,
    };
    // Put the flipped ones back for the next run.
    rt.block_on(async {
        for i in 0..changes {
            sb.publish_with(&topic(sb, i), 1, true, doc(i, false).as_bytes())
                .unwrap();
        }
    });
    drop(child);
    row
}

fn main() {
    let n: usize = std::env::var("IMLINKD_FLEET_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = bench_runtime(None);
    let dir = std::env::temp_dir().join(format!("imlinkd-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("ops.pw");
    std::fs::write(&pw, TOKEN).unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut rows = Vec::new();
    for size in [0, n / 10, n] {
        let sb = rt
            .block_on(Sandbox::start(SandboxOptions {
                operators: vec![("ops".into(), TOKEN.into())],
                ..Default::default()
            }))
            .unwrap();
        std::fs::write(dir.join("ca.pem"), &sb.endpoints().ca_pem).unwrap();
        rt.block_on(async {
            for i in 0..size {
                sb.publish_with(&topic(&sb, i), 1, true, doc(i, false).as_bytes())
                    .unwrap();
            }
        });
        rows.push(run(&rt, &sb, &dir, size, false));
        if size == n {
            rows.push(run(&rt, &sb, &dir, size, true));
        }
        rt.block_on(async { drop(sb) });
    }
    let mut table = String::from(
        "| devices | output | retained bytes | report after | peak RSS | RSS | peak RSS after 1,000 changes | RSS then |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {:.2} s | {} | {} | {} | {} |\n",
            r.devices,
            if r.json { "--json" } else { "text" },
            mib(r.bytes / 1024),
            r.to_report.as_secs_f64(),
            mib(r.hwm),
            mib(r.rss),
            mib(r.hwm_after),
            mib(r.rss_after),
        ));
    }
    if let (Some(base), Some(big)) = (rows.first(), rows.iter().find(|r| r.devices == n)) {
        table.push_str(&format!(
            "\nPer device (peak, text, {n} devices over none): {:.0} bytes.\n",
            (big.hwm.saturating_sub(base.hwm) * 1024) as f64 / n.max(1) as f64
        ));
    }
    print!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fleet.md");
    let _ = std::fs::write(out, &table);
    let _ = std::fs::remove_dir_all(&dir);
}
