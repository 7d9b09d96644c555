//! The README's first command, `./scripts/demo`, really brings a session online against the
//! bundled reference IM service with no other set-up; `./scripts/demo --cluster` does the same
//! on the production shape (`scripts/im-cluster`: nats-server 2.15.1 nodes and imlink-auth)
//! and takes that cluster down when stopped.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a test stops the demo once it follows the first daemon's events.
#[derive(Clone, Copy)]
enum Stop {
    /// SIGINT to its process group, as Ctrl-C in a terminal.
    CtrlC,
    /// SIGTERM to the script alone, as `kill <demo pid>`.
    Term,
}

/// The live processes (not zombies) of process group `pgid`.
fn group_members(pgid: i32) -> Vec<u64> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp …
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.len() > 2 && f[0] != "Z" && f[2] == pgid.to_string() {
            found.push(pid);
        }
    }
    found
}

/// Run the demo with `args` until it follows the first daemon's events, then stop it as
/// `stop` says; its stdout lines, and whether it got that far. With [`Stop::Term`], the
/// script alone gets the signal, and everything it started (the IM service, both daemons,
/// the watch: its process group) must be gone soon after.
fn run_demo(args: &[&str], stop: Stop) -> (Vec<String>, bool) {
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_imlinkd"))
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        bin_dir.join("imlink-sandbox").exists(),
        "the workspace build has the sandbox binary"
    );
    let mut child = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo"))
        .args(args)
        .env("IMLINKD_DEMO_BIN", &bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600); // includes a first build
    let mut seen = Vec::new();
    let online = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let done = line.contains("following imlinkd's events");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    // The watch's first line (the status it starts from): it runs, so the signal comes
    // while it does (before it, bash is between commands and would run its trap at once).
    if online && let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        seen.push(line);
    }
    match stop {
        // Stop the whole demo (IM service and daemons) the way Ctrl-C would.
        Stop::CtrlC => {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGINT);
        }
        Stop::Term => {
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        }
    }
    // bash used to defer its trap while `imlinkctl watch` ran in the foreground: SIGTERM
    // then stopped nothing. The demo ends by itself within this.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left = loop {
        let left = group_members(pgid.as_raw());
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever happens below, nothing is left running.
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    assert!(
        status.is_some(),
        "the demo did not end within 30 s of its signal"
    );
    assert!(
        left.is_empty(),
        "processes of the demo still run after it ended: {left:?}"
    );
    // What it printed while stopping (the cluster going down).
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
        seen.push(line);
    }
    (seen, online)
}

fn assert_chatted(seen: &[String]) {
    assert!(
        seen.iter().any(|l| l.starts_with("online as kiosk-0042")),
        "{}",
        seen.join("\n")
    );
    // The two kiosks chatted: both messages are in kiosk-0042's history.
    for needle in [
        "→ kiosk-0043: hello from kiosk-0042",
        "← kiosk-0043: hello back from kiosk-0043",
    ] {
        assert!(
            seen.iter().any(|l| l.contains(needle)),
            "{needle:?} not in:\n{}",
            seen.join("\n")
        );
    }
}

#[test]
fn the_demo_script_comes_online_and_sigterm_stops_all_of_it() {
    let (seen, online) = run_demo(&[], Stop::Term);
    assert!(online, "the demo never came online:\n{}", seen.join("\n"));
    assert_chatted(&seen);
    assert!(
        seen.iter()
            .any(|l| l.contains("/expire?user_id=kiosk-0042"))
    );
}

/// Running and not a zombie.
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

#[test]
fn the_demo_script_runs_the_two_kiosks_on_the_cluster_and_takes_it_down() {
    let (seen, online) = run_demo(&["--cluster"], Stop::CtrlC);
    let text = seen.join("\n");
    // `im-cluster: up in DIR (…)`: where the cluster's endpoints are.
    let dir = seen
        .iter()
        .find_map(|l| l.strip_prefix("im-cluster: up in "))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("the cluster never came up:\n{text}"));
    let e: serde_json::Value = serde_json::from_slice(
        &std::fs::read(std::path::Path::new(dir).join("endpoints.json")).unwrap(),
    )
    .unwrap();
    assert!(online, "the demo never came online:\n{text}");
    assert_chatted(&seen);
    // kiosk-0042's status names a node of the cluster.
    let nodes: Vec<&str> = e["mqtt_urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let broker = seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("broker:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no broker in the status:\n{text}"));
    assert!(nodes.contains(&broker), "{broker} is not one of {nodes:?}");
    assert!(text.contains("scripts/im-cluster stop"), "{text}");
    // The operator's view from the broker: both kiosks' retained status documents, online.
    assert!(
        seen.iter().any(|l| l.contains(": 2 devices"))
            && seen.iter().any(|l| l.contains("by state:      online 2")),
        "imlinkctl fleet:\n{text}"
    );
    // Stopped: `im-cluster down` ran, nothing of the cluster is left running.
    assert!(text.contains("im-cluster: down"), "{text}");
    let mut pids: Vec<u64> = Vec::new();
    for key in ["node_pids", "auth_pids"] {
        pids.extend(
            e[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap()),
        );
    }
    pids.push(e["sandbox_pid"].as_u64().unwrap());
    for p in pids {
        assert!(!alive(p), "pid {p} of the demo's cluster still runs");
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new(dir).parent().unwrap());
}
