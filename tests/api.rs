//! The local API driven against a real imlinkd (and imlink-sandbox): every method and
//! notification, account switch, 7501, 6014, late watchers, roles with real uids, abuse, and
//! the socat example of docs/api.md.

mod common;

use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use imlink_sandbox::ProvisionFault;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn result(v: &Value) -> &Value {
    assert!(v.get("error").is_none(), "unexpected error: {v}");
    &v["result"]
}

fn error_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_methods_answer_as_the_sdk_would() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    let mut c = d.client().await;
    let v = c.call("version", json!({})).await;
    assert_eq!(result(&v)["name"], "imlinkd");
    assert_eq!(result(&v)["api"], 1);
    assert_eq!(
        result(&c.call("get_login_user", json!(null)).await),
        "alice"
    );
    assert_eq!(result(&c.call("get_login_status", json!({})).await), 1);
    let st = result(&c.call("status", json!({})).await).clone();
    for key in [
        "phase",
        "summary",
        "login_status",
        "login_user",
        "user_id",
        "sdk_app_id",
        "broker",
        "since",
        "last_error",
        "sig",
        "next_retry_at_ms",
        "counters",
        "last_event",
    ] {
        assert!(st.get(key).is_some(), "status lacks {key}: {st}");
    }
    assert!(
        st["sig"]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(st["sig"]["valid_until"].as_i64().unwrap() > st["since"].as_i64().unwrap());
    // Never the UserSig itself, in any response.
    let all = st.to_string();
    for sig in sb.issued_sigs() {
        assert!(!all.contains(&sig));
    }
    // Bad input: a JSON-RPC error each time, and the connection stays usable.
    c.send_raw(b"this is not json\n").await;
    assert_eq!(error_code(&c.next().await), -32700);
    c.send_raw(&[0xff, 0xfe, b'\n']).await;
    let v = c.next().await;
    assert_eq!(error_code(&v), -32700);
    assert!(v["error"]["message"].as_str().unwrap().contains("UTF-8"));
    c.send_raw(b"[1,2]\n").await;
    assert_eq!(error_code(&c.next().await), -32600);
    c.send_raw(b"{\"jsonrpc\":\"1.0\",\"id\":5,\"method\":\"status\"}\n")
        .await;
    assert_eq!(error_code(&c.next().await), -32600);
    assert_eq!(error_code(&c.call("nope", json!({})).await), -32601);
    assert_eq!(
        error_code(&c.call("login", json!({"user_id": 7})).await),
        6017
    );
    assert_eq!(
        error_code(&c.call("login", json!({"timeout_ms": "soon"})).await),
        -32602
    );
    assert_eq!(
        error_code(&c.call("debug_wedge", json!({})).await),
        -32601,
        "test hooks are off"
    );
    // A notification (no id) is not answered; the next request is.
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"status\"}\n")
        .await;
    assert_eq!(result(&c.call("get_login_status", json!({})).await), 1);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_validates_the_user_id_and_sends_nothing_for_a_bad_one() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    for bad in ["", "has space", "ä", "x/y", &"x".repeat(33)] {
        let v = d.rpc("login", json!({ "user_id": bad })).await;
        assert_eq!(error_code(&v), 7003, "{bad:?}: {v}");
    }
    assert_eq!(
        sb.counters().users.len(),
        1,
        "nothing reached the server: {:?}",
        sb.counters()
    );
    d.finish().await;
}

/// Read notifications until one named `until`; returns the names seen.
async fn next_until(w: &mut Client, until: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let v = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("a notification");
        let m = v["method"].as_str().unwrap().to_string();
        assert_eq!(v["jsonrpc"], "2.0");
        assert!(v.get("id").is_none(), "notifications carry no id");
        got.push(m.clone());
        if m == until {
            return got;
        }
    }
}

/// Every notification, in the order the SDK listener would see them, through one watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_every_notification() {
    let sb = sandbox().await;
    let mut o = Opts::user("alice");
    o.top_extra = "login_on_start = false".into();
    let d = Daemon::start(&sb, o).await;
    let mut w = d.client().await;
    let snap = w.call("watch", json!({})).await;
    assert_eq!(result(&snap)["status"]["phase"], "idle");
    let mut seen: Vec<String> = Vec::new();
    // Refused once (busy), then online.
    sb.refuse_next(0x89, Some(1), None);
    let mut c = d.client().await;
    let login = tokio::spawn(async move { c.call("login", json!({})).await });
    seen.extend(next_until(&mut w, "connect_success").await);
    assert_eq!(result(&login.await.unwrap())["login_status"], 1);
    sb.expire_sig("alice");
    seen.extend(next_until(&mut w, "connect_success").await);
    sb.kick("alice");
    seen.extend(next_until(&mut w, "kicked_offline").await);
    for name in [
        "state_changed",
        "connecting",
        "connect_failed",
        "connect_success",
        "user_sig_refreshed",
        "user_sig_expired",
        "kicked_offline",
    ] {
        assert!(
            seen.iter().any(|s| s == name),
            "{name} missing from {seen:?}"
        );
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_switch_logs_alice_out_cleanly_and_bob_in() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    let v = d.rpc("login", json!({ "user_id": "bob" })).await;
    assert_eq!(result(&v)["login_user"], "bob", "{v}");
    let c = counters_until(&sb, "alice's clean DISCONNECT", |c| {
        c.user("alice").disconnects_normal == 1
    })
    .await;
    assert_eq!(c.user("alice").connections_lost, 0);
    assert_eq!(c.user("bob").logins_accepted, 1);
    let st = d.status().await;
    assert_eq!(
        (st["login_user"].as_str(), st["user_id"].as_str()),
        (Some("bob"), Some("bob"))
    );
    // bob's sig is not alice's.
    assert_eq!(c.user("bob").provision_requests, 1);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_login_answers_7501() {
    let sb = sandbox().await;
    sb.provision_fault(ProvisionFault::Delay { ms: 1_500 }, Some(1), None);
    let mut o = Opts::user("alice");
    o.top_extra = "login_on_start = false".into();
    let d = Daemon::start(&sb, o).await;
    let mut first = d.client().await;
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let t = tokio::spawn(async move { first.call("login", json!({})).await });
    // Once the first login is under way, a second one is refused.
    loop {
        let v = w.next().await;
        if v["params"]["phase"] == "fetching_sig" {
            break;
        }
    }
    let v = d.rpc("login", json!({})).await;
    assert_eq!(error_code(&v), 7501, "{v}");
    assert_eq!(result(&t.await.unwrap())["login_status"], 1);
    assert_eq!(sb.user("alice").connect_attempts, 1, "never two logins");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kick_calls_that_need_a_login_answer_6014_and_late_watchers_see_the_kick() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    // Logged in: the call is judged on its params (no body: -32602).
    assert_eq!(
        error_code(&d.rpc("send_message", json!({"to": "bob"})).await),
        -32602
    );
    sb.kick("alice");
    d.wait_phase("kicked").await;
    let v = d.rpc("send_message", json!({"to": "bob"})).await;
    assert_eq!(error_code(&v), 6014, "{v}");
    assert_eq!(result(&d.rpc("get_login_user", json!({})).await), "");
    assert_eq!(result(&d.rpc("get_login_status", json!({})).await), 3);
    // A watcher that connects after the kick sees it in its snapshot.
    let mut late = d.client().await;
    let snap = late.call("watch", json!({})).await;
    let ev = &result(&snap)["status"]["last_event"];
    assert_eq!(ev["event"], "kicked_offline");
    assert_eq!(ev["reason"], "kicked_by_admin");
    // logout from kicked is fine; login brings it back.
    assert_eq!(result(&d.rpc("logout", json!({})).await)["login_status"], 3);
    assert_eq!(d.status().await["phase"], "idle");
    assert_eq!(result(&d.rpc("login", json!({})).await)["login_status"], 1);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_disconnects_cleanly_and_stays_logged_out() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    assert_eq!(result(&d.rpc("logout", json!({})).await)["login_status"], 3);
    counters_until(&sb, "a clean DISCONNECT", |c| {
        c.user("alice").disconnects_normal == 1
    })
    .await;
    assert_flat(&sb, "alice", 3).await;
    assert_eq!(d.status().await["phase"], "idle");
    d.finish().await;
}

// --- roles -------------------------------------------------------------------------------------

fn ctl_as(uid: u32, gid: u32, socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    ctl_as_with_groups(uid, gid, &[], socket, args)
}

fn ctl_as_with_groups(
    uid: u32,
    gid: u32,
    groups: &[u32],
    socket: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    let groups = groups.to_vec();
    // The build's copy may be out of that uid's reach (a clone under a 0700 directory).
    let mut cmd = std::process::Command::new(runnable_by_anyone(CTL));
    cmd.arg("--socket").arg(socket).args(args);
    // SAFETY: setgroups/setgid/setuid are async-signal-safe; they run in the child before
    // exec, in the order that keeps the privilege to make each change.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// Roles with real uids: the suite runs as root (CI does), and the clients run as throwaway
/// numeric uids/gids that exist in no passwd file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_follow_the_peer_credentials() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches uids and must run as root (CI runs the suite as root)"
    );
    const CLIENTS_GID: u32 = 61_001;
    const READER: u32 = 61_002;
    const OUTSIDER: u32 = 61_003;
    const OPERATOR: u32 = 61_004;
    const OPERATOR_GROUP: u32 = 61_005;
    const GROUP_OPERATOR: u32 = 61_006;
    let sb = sandbox().await;
    let mut o = Opts::user("alice");
    o.api_extra = format!(
        "group = \"{CLIENTS_GID}\"\noperator_uids = [{OPERATOR}]\noperator_gids = [{OPERATOR_GROUP}]"
    );
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    // The socket: 0660, the clients' group. The directory must let others reach it.
    let meta = std::fs::metadata(&d.socket).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), CLIENTS_GID);
    std::fs::set_permissions(&d.dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    // A reader in the group: status works, logout does not.
    let out = ctl_as(READER, CLIENTS_GID, &d.socket, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl_as(READER, CLIENTS_GID, &d.socket, &["logout"]);
    assert_eq!(out.status.code(), Some(4), "permission denied exit code");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs an operator") && err.contains("uid 61002"),
        "{err}"
    );
    assert_eq!(d.status().await["phase"], "online", "not logged out");

    // Someone outside the group cannot even connect.
    let out = ctl_as(OUTSIDER, OUTSIDER, &d.socket, &["status"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("add your user to the socket's group"));

    // A configured operator may log out.
    let out = ctl_as(OPERATOR, CLIENTS_GID, &d.socket, &["logout"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.status().await["phase"], "idle");
    // So may a member of an operator group, through a supplementary group (SO_PEERGROUPS).
    let out = ctl_as_with_groups(
        GROUP_OPERATOR,
        CLIENTS_GID,
        &[OPERATOR_GROUP],
        &d.socket,
        &["login"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.status().await["phase"], "online");
    // Without that group, the same user is a reader.
    let out = ctl_as(GROUP_OPERATOR, CLIENTS_GID, &d.socket, &["logout"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(d.status().await["phase"], "online");
    d.finish().await;
}

// --- the socket itself -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_refuses_a_second_daemon() {
    let sb = sandbox().await;
    let dir = temp_dir("sock");
    // A stale socket file: bound, then its owner went away.
    drop(std::os::unix::net::UnixListener::bind(dir.join("api.sock")).unwrap());
    let mut o = Opts::user("alice");
    o.dir = Some(dir.clone());
    let d = Daemon::start(&sb, o.clone()).await;
    d.wait_phase("online").await;
    // A second daemon on the same socket path refuses to start.
    let config = d.config.clone();
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    assert_eq!(
        d.status().await["phase"],
        "online",
        "the first one is unharmed"
    );
    // A regular file at the socket path is never deleted.
    let dir2 = temp_dir("notsock");
    std::fs::write(dir2.join("api.sock"), b"precious").unwrap();
    let config2 = write_config(&sb, &Opts::user("bob"), &dir2);
    let out = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&config2)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(dir2.join("api.sock")).unwrap(), b"precious");
    d.finish().await;
    assert!(!dir.join("api.sock").exists(), "removed on exit");
}

/// systemd socket activation: the listening socket arrives as fd 3 with LISTEN_FDS=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_socket_passed_by_systemd() {
    let sb = sandbox().await;
    let dir = temp_dir("activ");
    let config = write_config(&sb, &Opts::user("alice"), &dir);
    let path = dir.join("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --config \"$1\"")
        .arg(BIN)
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::process::Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut c = Client::connect(&path).await;
    let v = c.call("version", json!({})).await;
    assert_eq!(result(&v)["name"], "imlinkd");
    assert!(
        !dir.join("api.sock").exists(),
        "the configured path is not used"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(path.exists(), "systemd's socket is systemd's to remove");
}

// --- abuse ---------------------------------------------------------------------------------------

const ABUSER: u32 = 61_010;

/// How many of these connections the daemon kept (the others got an error line and EOF).
fn count_open(conns: &[std::os::unix::net::UnixStream]) -> usize {
    use std::io::Read;
    conns
        .iter()
        .filter(|c| {
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut buf = [0u8; 512];
            // Kept connections have nothing to say (a timeout); refused ones answer, then EOF.
            matches!((&**c).read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count()
}

/// 1,000 connections at once, a 10 MiB line, invalid UTF-8, half-written requests and a
/// watcher that never reads: the session stays online (sandbox counters flat), memory stays
/// bounded, and other clients are still served. (Latency under this load is measured by the
/// `api_under_abuse` benchmark, not asserted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_does_not_disturb_the_session() {
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let sb = sandbox().await;
    let mut o = Opts::user("alice");
    o.api_extra = "idle_timeout = \"2s\"\nwatcher_queue = 8".into();
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    let pid = d.child.as_ref().unwrap().id().unwrap();
    let baseline = vm_hwm_kib(pid);
    let before = sb.user("alice");

    // A watcher that never reads.
    let mut lazy = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    lazy.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"watch\"}\n")
        .await
        .unwrap();

    // 1,000 connections at once from another local user: the daemon keeps at most
    // max_clients_per_uid (16) of them and turns the rest away.
    let conns = connect_as(ABUSER, 0, d.socket.clone(), 1000);
    assert!(conns.len() >= 900, "connected {}", conns.len());
    let held = count_open(&conns);
    assert!(
        held <= 16,
        "at most max_clients_per_uid connections kept: {held}"
    );
    // A 10 MiB line without a newline.
    let mut big = d.client().await;
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..10 {
        // The daemon closes the connection once the line passes 64 KiB; later writes fail.
        let _ = tokio::time::timeout(Duration::from_secs(5), big.send_raw_checked(&chunk)).await;
    }
    // Half-written requests that never finish.
    let mut halves = Vec::new();
    for _ in 0..5 {
        let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        let _ = s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"meth").await;
        halves.push(s);
    }
    // Meanwhile the session lives on: three UserSig expiries and renewals.
    for i in 1..=3 {
        sb.expire_sig("alice");
        counters_until(&sb, "back online", |c| {
            c.user("alice").logins_accepted >= before.logins_accepted + i
        })
        .await;
        d.wait_phase("online").await;
    }

    // Other clients are still served.
    let t = Instant::now();
    let st = d.status().await;
    assert_eq!(st["phase"], "online");
    eprintln!("status answered in {:?} under abuse", t.elapsed());

    // The watcher that never reads cost the session nothing (its backlog is bounded by the
    // socket buffer and the watcher queue; the lag path itself is tested in `api::tests`).
    drop(lazy);
    // Half-written requests were closed by the idle timeout.
    for mut s in halves {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
        assert!(
            String::from_utf8_lossy(&rest).contains("-32005"),
            "idle timeout"
        );
    }
    drop(conns);
    let peak = vm_hwm_kib(pid);
    eprintln!("imlinkd peak RSS (VmHWM): {baseline} KiB before, {peak} KiB after the abuse");
    assert!(
        peak < baseline + 32 * 1024,
        "memory stayed bounded: {baseline} → {peak} KiB"
    );
    let after = sb.user("alice");
    assert_eq!(
        after.logins_accepted - before.logins_accepted,
        3,
        "only the three expiries we caused reached the broker"
    );
    assert_eq!(after.connections_lost, before.connections_lost);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socat_example_in_docs_api_md_works() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let start = doc.find("<!-- socat-example").expect("marked example");
    let block = &doc[start..];
    let body = &block[block.find("```sh\n").unwrap() + 6..];
    let body = &body[..body.find("```").unwrap()];
    let script = body.replace("/run/imlinkd/api.sock", d.socket.to_str().unwrap());
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["result"], 1);
    assert_eq!(lines[1]["result"]["phase"], "online");
    d.finish().await;
}

/// The landed admission applied the global cap before the role was known: four reader uids
/// with 16 connections each took all 64 slots, and root's `imlinkctl status` failed with
/// "Broken pipe". Now an eighth of the slots are kept for operators, watchers are capped per
/// uid, and a refused reader is told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_holding_every_slot_they_may_cannot_lock_root_out() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    d.wait_phase("online").await;
    let mut held = Vec::new();
    let mut watchers = 0;
    for uid in 52_001..52_005u32 {
        // gid 0: the socket is 0660 root:root here (the packaged one has a clients' group).
        let conns = connect_as(uid, 0, d.socket.clone(), 16);
        assert_eq!(conns.len(), 16);
        // Half of them watch (up to max_watchers_per_uid, 8).
        for c in conns.iter().take(8) {
            use std::io::Write;
            let _ = (&*c).write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"watch\"}\n");
        }
        held.extend(conns);
    }
    for c in &held {
        use std::io::{BufRead, BufReader};
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut line = String::new();
        if BufReader::new(c).read_line(&mut line).is_ok() && line.contains("\"status\"") {
            watchers += 1;
        }
    }
    assert!(watchers >= 24, "readers got their watchers: {watchers}");
    // Root is still served, at once.
    let t = Instant::now();
    let out = std::process::Command::new(CTL)
        .arg("--socket")
        .arg(&d.socket)
        .arg("status")
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(out.status.success(), "root's status: {out:?}");
    eprintln!("root's imlinkctl status with readers holding their slots: {took:?}");
    // A fifth reader is refused, and imlinkctl prints the daemon's words, not a broken pipe.
    let out = ctl_as(52_009, 0, &d.socket, &["status"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("too many API clients") && err.contains("-32002"),
        "{err}"
    );
    assert!(!err.contains("Broken pipe"), "{err}");
    // Nine watchers for one uid: the ninth is refused.
    drop(held);
    let more = connect_as(52_010, 0, d.socket.clone(), 9);
    let mut refused = 0;
    for c in &more {
        use std::io::{BufRead, BufReader, Write};
        (&*c)
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"watch\"}\n")
            .unwrap_or(());
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut line = String::new();
        let _ = BufReader::new(c).read_line(&mut line);
        if line.contains("-32002") {
            refused += 1;
        }
    }
    assert_eq!(refused, 1, "the watcher cap per uid holds");
    drop(more);
    d.finish().await;
}

/// One byte every little while used to hold a slot forever (the idle timer restarted on
/// every read). The timeout now counts whole lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_of_bytes_does_not_hold_a_connection_past_the_idle_timeout() {
    let sb = sandbox().await;
    let mut o = Opts::user("alice");
    o.api_extra = "idle_timeout = \"2s\"".into();
    let d = Daemon::start(&sb, o).await;
    let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for b in b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"status\"}" {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        // A byte every 500 ms: each read restarted the landed idle timer.
        tokio::time::sleep(Duration::from_millis(500)).await; // the trickle under test
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(closed || text.contains("-32005"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "closed after the timeout"
    );
    d.finish().await;
}
