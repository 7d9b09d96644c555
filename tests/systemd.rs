//! systemd integration with a fake service manager (a datagram socket as NOTIFY_SOCKET) and a
//! real systemd-journald: READY/STATUS/WATCHDOG/STOPPING/RELOADING, the watchdog that stops
//! when the driver wedges, SIGTERM, SIGHUP, config errors, journal fields.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use imlink_sandbox::ProvisionFault;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

fn count(notes: &[String], needle: &str) -> usize {
    notes.iter().filter(|n| n.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_the_api_serves_not_that_the_session_is_online() {
    let sb = sandbox().await;
    sb.provision_fault(ProvisionFault::Delay { ms: 2_000 }, Some(1), None);
    let mut d = Daemon::start(&sb, Opts::user("alice")).await; // returns at READY=1
    let ready = d.wait_notify("READY=1").await;
    assert!(ready.contains("STATUS="), "READY carries a status: {ready}");
    // The API serves at READY, and the session is not online yet.
    let st = d.status().await;
    assert_eq!(st["phase"], "fetching_sig");
    d.wait_phase("online").await;
    d.wait_notify("STATUS=online as alice (sig valid").await;
    let notes = d.notes();
    let first_online = notes
        .iter()
        .position(|n| n.contains("STATUS=online"))
        .unwrap();
    let ready_at = notes.iter().position(|n| n.contains("READY=1")).unwrap();
    assert!(ready_at < first_online, "{notes:?}");
    // STATUS follows the phase: a kick shows up in words.
    sb.kick("alice");
    d.wait_notify("STATUS=kicked: kicked by an administrator — run `imlinkctl login`")
        .await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_stopping_then_exits_0_after_a_clean_disconnect() {
    let sb = sandbox().await;
    let mut d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    let status = d.terminate().await;
    assert!(status.success(), "{status:?}");
    let notes = d.notes();
    assert_eq!(count(&notes, "STOPPING=1"), 1, "{notes:?}");
    let u = counters_until(&sb, "the DISCONNECT", |c| {
        c.user("alice").disconnects_normal == 1
    })
    .await
    .user("alice");
    assert_eq!(
        (u.connections_lost, u.wills_published),
        (0, 0),
        "a normal disconnect, no will"
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_error_exits_78_with_status_and_errno() {
    let sb = sandbox().await;
    let dir = temp_dir("bad");
    let config = write_config(&sb, &Opts::user("alice"), &dir);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("user_id = \"alice\"", "user_id = \"a b\"");
    std::fs::write(&config, text).unwrap();
    let mut o = Opts::user("alice");
    o.wait_ready = false;
    let mut d = Daemon::spawn(&sb, o, dir, config).await;
    let status = tokio::time::timeout(WAIT, d.child.as_mut().unwrap().wait())
        .await
        .unwrap()
        .unwrap();
    d.child = None;
    assert_eq!(status.code(), Some(78));
    let errno = d.wait_notify("ERRNO=78").await;
    assert!(
        errno.contains("STATUS=configuration error:") && errno.contains("user_id"),
        "{errno}"
    );
    assert!(d.log_text().contains("7003"));
    assert_eq!(count(&d.notes(), "READY=1"), 0);
}

/// The hooks these tests use exist only with the `test-hooks` feature (release builds and the
/// .deb never have them); `scripts/test` enables it.
fn hooks_compiled_in() {
    if !cfg!(feature = "test-hooks") {
        panic!(
            "this test needs the test hooks: run `cargo nextest run --all-features` (scripts/test does)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_pings_only_while_the_driver_makes_progress() {
    hooks_compiled_in();
    let sb = sandbox().await;
    let mut o = Opts::user("alice");
    o.env = vec![
        ("WATCHDOG_USEC".into(), "1000000".into()),
        ("IMLINKD_TEST_HOOKS".into(), "1".into()),
    ];
    let mut d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    // Pinging at half the interval while healthy.
    let n = d.notes().len();
    d.wait_notify_after(n, "WATCHDOG=1").await;
    let n = d.notes().len();
    d.wait_notify_after(n, "WATCHDOG=1").await;
    // Wedge the session driver (test-only hook): pings must stop within the interval.
    let r = d.rpc("debug_wedge", json!({})).await;
    assert_eq!(r["result"]["wedged"], true, "{r}");
    tokio::time::sleep(Duration::from_millis(800)).await; // more than half the interval
    let stalled = count(&d.notes(), "WATCHDOG=1");
    tokio::time::sleep(Duration::from_millis(2_000)).await; // two intervals under test
    assert_eq!(
        count(&d.notes(), "WATCHDOG=1"),
        stalled,
        "no ping from a wedged driver"
    );
    // The API still answers (only the driver is stuck): the pings stop because the loop that
    // sends them is the one that stopped.
    assert!(d.status().await.get("phase").is_some());
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.child.as_mut().unwrap().wait().await.unwrap();
    d.child = None;
    d.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_session_driver_exits_non_zero_so_systemd_restarts_it() {
    hooks_compiled_in();
    // The landed daemon exited 0 ("imlinkd stopped"): Restart=on-failure never fired.
    let sb = sandbox().await;
    let mut o = Opts::user("alice");
    o.env = vec![("IMLINKD_TEST_HOOKS".into(), "1".into())];
    let mut d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    let mut c = d.client().await;
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"debug_panic\"}\n")
        .await;
    let status = tokio::time::timeout(WAIT, d.child.as_mut().unwrap().wait())
        .await
        .expect("imlinkd exits after the driver panics")
        .unwrap();
    d.child = None;
    assert_eq!(
        status.code(),
        Some(70),
        "EX_SOFTWARE, not success: {status:?}"
    );
    let n = d.notes();
    assert!(
        n.iter().any(|m| m.contains("ERRNO=70")),
        "systemd is told why: {n:?}"
    );
    assert!(d.log_text().contains("the session driver failed"));
    d.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_a_bad_new_config_keeps_the_running_one() {
    let sb = sandbox().await;
    let mut d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    // Same file, another user: the reload switches accounts.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace("user_id = \"alice\"", "user_id = \"bob\""),
    )
    .unwrap();
    let n = d.notes().len();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_notify_after(n, "RELOADING=1").await;
    d.wait_notify_after(n, "READY=1").await;
    counters_until(&sb, "bob online", |c| c.user("bob").logins_accepted == 1).await;
    let st = d.wait_phase("online").await;
    assert_eq!(st["login_user"], "bob");
    assert_eq!(
        sb.user("alice").disconnects_normal,
        1,
        "alice logged out cleanly"
    );
    // What a reload cannot apply ([api], log_level) is said, not silently dropped.
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        text.replace("[api]\n", "[api]\nmax_clients = 32\n")
            .replace("log_level = \"trace\"", "log_level = \"debug\""),
    )
    .unwrap();
    let n = d.notes().len();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_notify_after(n, "READY=1").await;
    let log = d.log_text();
    assert!(
        log.contains("[api] changed") && log.contains("systemctl restart imlinkd"),
        "{log}"
    );
    assert!(log.contains("log_level changed"));
    // A broken file: the running config stays.
    std::fs::write(&d.config, "this is = = not toml").unwrap();
    let n = d.notes().len();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let ready = d.wait_notify_after(n, "READY=1").await;
    assert!(
        ready.contains("reload failed, running configuration kept"),
        "{ready}"
    );
    assert!(d.log_text().contains("keeping the running one"));
    let st = d.status().await;
    assert_eq!(
        (st["phase"].as_str(), st["login_user"].as_str()),
        (Some("online"), Some("bob"))
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_unchanged_without_systemd() {
    let sb = sandbox().await;
    let dir = temp_dir("nosd");
    let config = write_config(&sb, &Opts::user("alice"), &dir);
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            !l.contains('\u{1b}'),
            "no colour codes when stderr is not a terminal: {l}"
        );
        if l.contains("state: online") {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().await.unwrap().success());
}

// --- journald ------------------------------------------------------------------------------------

/// Use the running journald, or start one (standalone, as the test runs as root).
async fn journald() -> Option<tokio::process::Child> {
    if std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect("/run/systemd/journal/socket"))
        .is_ok()
    {
        return None;
    }
    let child = tokio::process::Command::new("/lib/systemd/systemd-journald")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-journald (Debian package systemd; .ci/run installs it)");
    // It is ready when its stdout socket accepts connections.
    for _ in 0..100 {
        if tokio::net::UnixStream::connect("/run/systemd/journal/stdout")
            .await
            .is_ok()
        {
            return Some(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // start-up poll of an external daemon
    }
    panic!("systemd-journald did not come up");
}

/// A stream connection to journald, set up as systemd sets up a service's stderr.
async fn journal_stream(identifier: &str) -> (OwnedFd, String) {
    let mut s = tokio::net::UnixStream::connect("/run/systemd/journal/stdout")
        .await
        .unwrap();
    // identifier, unit id, priority, level prefix, syslog, kmsg, console
    s.write_all(format!("{identifier}\n\n6\n0\n0\n0\n0\n").as_bytes())
        .await
        .unwrap();
    let std = s.into_std().unwrap();
    std.set_nonblocking(false).unwrap();
    let st = nix::sys::stat::fstat(&std).unwrap();
    (OwnedFd::from(std), format!("{}:{}", st.st_dev, st.st_ino))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_go_to_journald_with_queryable_fields() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "starting journald needs root (CI runs as root)"
    );
    let _journald = journald().await;
    let sb = sandbox().await;
    let user = format!("j{}", std::process::id());
    let dir = temp_dir("journal");
    let config = write_config(&sb, &Opts::user(&user), &dir);
    let (stderr, stream) = journal_stream("imlinkd").await;
    let raw = stderr.as_raw_fd();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("JOURNAL_STREAM", &stream)
        .env_remove("NOTIFY_SOCKET")
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _ = raw;
    counters_until(&sb, "online", |c| c.user(&user).logins_accepted == 1).await;
    // Online (the inbox subscribed, after the CONNACK) before the kick.
    wait_phase_at(&dir.join("api.sock"), "online", WAIT, String::new).await;
    sb.kick(&user);
    counters_until(&sb, "kicked", |c| {
        c.user(&user).server_disconnects.get("0x98") == Some(&1)
    })
    .await;
    // Read back from the journal files, by our fields.
    let query = |filters: Vec<String>| {
        let mut args = vec![
            "-D".to_string(),
            "/run/log/journal".into(),
            "-o".into(),
            "json".into(),
            "--no-pager".into(),
        ];
        args.extend(filters);
        std::process::Command::new("journalctl")
            .args(&args)
            .output()
            .unwrap()
    };
    let mut kicked = Vec::new();
    for _ in 0..100 {
        let out = query(vec![
            format!("IMLINKD_USER_ID={user}"),
            "IMLINKD_PHASE=kicked".into(),
        ]);
        kicked = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        if !kicked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // journald writes asynchronously
    }
    assert!(
        !kicked.is_empty(),
        "no entry with IMLINKD_PHASE=kicked for {user}"
    );
    let e: serde_json::Value = serde_json::from_str(&kicked[0]).unwrap();
    assert_eq!(e["SYSLOG_IDENTIFIER"], "imlinkd");
    assert_eq!(e["IMLINKD_CODE"], "6208");
    assert_eq!(e["IMLINKD_CLASS"], "kicked");
    assert!(e["MESSAGE"].as_str().unwrap().contains("kicked"));
    let online = query(vec![
        format!("IMLINKD_USER_ID={user}"),
        "IMLINKD_PHASE=online".into(),
    ]);
    assert!(
        !online.stdout.is_empty(),
        "the online transition is in the journal too"
    );
    // Nothing secret in any entry of ours.
    let all = query(vec![format!("_PID={}", child.id().unwrap())]);
    let text = String::from_utf8_lossy(&all.stdout);
    for s in sb
        .issued_sigs()
        .iter()
        .chain([&sb.endpoints().device_token])
    {
        assert!(!text.contains(s.as_str()));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().await.unwrap().success());
}

/// A build without the `test-hooks` feature (what release builds and the .deb are) has no
/// wedge or panic hook, whatever the environment says.
#[test]
fn release_builds_have_no_test_hooks() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_imlinkd"));
    let release = bin
        .parent()
        .and_then(|p| p.parent())
        .map(|target| target.join("release").join("imlinkd"));
    // The strings only exist in a build with the feature.
    let has_hooks = |p: &std::path::Path| {
        std::fs::read(p)
            .map(|b| b.windows(11).any(|w| w == b"debug_panic"))
            .unwrap_or(false)
    };
    assert_eq!(
        has_hooks(bin),
        cfg!(feature = "test-hooks"),
        "the test binary's hooks follow the feature"
    );
    if let Some(r) = release.filter(|r| r.exists()) {
        assert!(!has_hooks(&r), "{} carries test hooks", r.display());
    }
}
