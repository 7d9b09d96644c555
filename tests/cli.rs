//! `imlinkctl` against a real daemon: output, exit codes, and `sig decode`.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;

fn ctl(socket: &std::path::Path, args: &[&str]) -> Output {
    Command::new(CTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_login_logout_wait_and_watch() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    let s = d.socket.clone();
    let out = tokio::task::spawn_blocking({
        let s = s.clone();
        move || ctl(&s, &["wait", "--phase", "online", "--timeout", "20s"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = ctl(&s, &["status"]);
    assert!(out.status.success());
    let t = text(&out);
    assert!(t.starts_with("online as alice (sig valid"), "{t}");
    assert!(t.contains("login status:  1 LOGINED as alice"), "{t}");
    assert!(t.contains("UserSig:       sha256:"), "{t}");
    for sig in sb.issued_sigs() {
        assert!(!t.contains(&sig), "the UserSig never appears");
    }
    let out = ctl(&s, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "online");

    // A phase that does not come: exit 1 after the timeout.
    let out = ctl(&s, &["wait", "--phase", "kicked", "--timeout", "500ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the phase is online, not kicked"));

    // watch --json prints NDJSON: a snapshot line, then one line per event.
    let mut watch = Command::new(CTL)
        .arg("--socket")
        .arg(&s)
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for l in std::io::BufReader::new(stdout).lines() {
            let l = l.unwrap();
            let done = l.contains("\"phase\":\"idle\"");
            if lines.is_empty() {
                let _ = first_tx.send(());
            }
            lines.push(l);
            if done {
                break;
            }
        }
        lines
    });
    // The snapshot line means the watcher is subscribed; then logging out makes the events.
    tokio::task::spawn_blocking(move || first_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the watcher's snapshot line");
    let out = tokio::task::spawn_blocking({
        let s = s.clone();
        move || ctl(&s, &["logout"])
    })
    .await
    .unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out).trim(), "logged out");
    let lines = reader.join().unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert!(first.get("snapshot").is_some(), "{lines:?}");
    for l in &lines[1..] {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["method"].is_string(), "{l}");
    }

    let out = ctl(&s, &["login"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text(&out).trim(), "logged in as alice");
    let out = ctl(&s, &["login", "not valid"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("7003"));
    let out = ctl(&s, &["version"]);
    assert!(
        text(&out).contains("imlinkd 0.1.0 (API 1)"),
        "{}",
        text(&out)
    );
    d.finish().await;
}

fn decode_stdin(input: &str, args: &[&str]) -> Output {
    let mut child = Command::new(CTL)
        .args(["sig", "decode"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn sig_decode_prints_the_fields_never_the_hmac() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../crates/usersig/tests/data/usersig-v2.json")).unwrap();
    let case = &vectors["cases"][2];
    let sig = case["usersig"].as_str().unwrap();
    // From stdin, with a trailing newline (as from a file).
    let out = decode_stdin(&format!("{sig}\n"), &[]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identifier"], "xiaojun");
    assert_eq!(v["sdk_app_id"], 1_400_000_000u64);
    assert_eq!(v["expires_at"], 1_569_910_200u64 + 15_552_000);
    assert_eq!(v["expired"], true);
    assert!(v["fingerprint"].as_str().unwrap().starts_with("sha256:"));
    let hmac = case["sig_hmac_b64"].as_str().unwrap();
    assert!(!text(&out).contains(hmac) && !text(&out).contains(&hmac[..16]));
    assert!(decode_stdin(sig, &["-"]).status.success());

    // From a file.
    let f = std::env::temp_dir().join(format!("imlk-sig-{}", std::process::id()));
    std::fs::write(&f, sig).unwrap();
    let out = Command::new(CTL)
        .args(["sig", "decode", "--file"])
        .arg(&f)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&f);
    assert!(out.status.success());

    // Never on the command line, where every local user can read it (ps, /proc/PID/cmdline)
    // and the shell history keeps it: a usage error that says why, without echoing it.
    let out = Command::new(CTL)
        .args(["sig", "decode", sig])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stdin") && err.contains("ps"), "{err}");
    assert!(!err.contains(&sig[..24]));

    // A bad sig: exit 1 and a clear reason, without echoing the input.
    let out = decode_stdin("eJxgarbage+", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a valid TLS-sig-api v2 UserSig") && err.contains("alphabet"),
        "{err}"
    );
    assert!(!err.contains("eJxgarbage"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_history_conversations_and_an_at_least_once_inbox() {
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    let bob = Daemon::start(&sb, Opts::user("bob")).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    let (a, b) = (alice.socket.clone(), bob.socket.clone());

    // bob's `inbox --follow` runs first and prints what arrives, as JSON lines.
    let mut follow = Command::new(CTL)
        .arg("--socket")
        .arg(&b)
        .args(["inbox", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if line_tx.send(serde_json::from_str(&l).unwrap()).is_err() {
                break;
            }
        }
    });

    let out = ctl(&a, &["send", "bob", "hello\tbob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = text(&out).trim().to_string();
    assert_eq!(id.len(), 26, "a ULID: {id}");
    // From stdin, a custom message.
    let mut p = Command::new(CTL)
        .arg("--socket")
        .arg(&a)
        .args(["send", "bob", "-", "--custom"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    p.stdin
        .take()
        .unwrap()
        .write_all(br#"{"app":"data"}"#)
        .unwrap();
    assert!(p.wait_with_output().unwrap().status.success());

    let first = tokio::task::spawn_blocking(move || {
        let a = line_rx
            .recv_timeout(WAIT)
            .expect("the first message printed");
        let b = line_rx
            .recv_timeout(WAIT)
            .expect("the second message printed");
        (a, b, line_rx)
    })
    .await
    .unwrap();
    assert_eq!(first.0["id"], id.as_str());
    assert_eq!(first.0["body"], "hello\tbob");
    assert_eq!(first.1["kind"], "custom");
    follow.kill().unwrap();
    let _ = follow.wait();
    // At least once: whatever the follower printed but had not yet acknowledged when it was
    // killed comes again; once a run has printed and acknowledged, nothing does.
    let out = ctl(&b, &["inbox"]);
    assert!(out.status.success());
    for l in text(&out).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["id"] == first.0["id"] || v["id"] == first.1["id"], "{v}");
    }
    let out = ctl(&b, &["inbox"]);
    assert!(out.status.success());
    assert_eq!(text(&out), "", "nothing unacknowledged");
    let r = bob.rpc("read_inbox", serde_json::json!({})).await;
    assert_eq!(
        r["result"]["cursor"],
        format!("bob:{}", first.1["seq"]),
        "the cursor is at the last one"
    );
    assert_eq!(
        first.0["user_id"], "bob",
        "each line says whose inbox it is"
    );

    // History and conversations, for people: control characters escaped.
    let out = ctl(&b, &["history", "alice"]);
    let t = text(&out);
    assert!(t.contains("← alice: hello\\tbob"), "{t}");
    let out = ctl(&a, &["history", "bob"]);
    assert!(text(&out).contains("→ bob"), "{}", text(&out));
    let out = ctl(&b, &["conversations"]);
    let t = text(&out);
    assert!(t.starts_with("alice") && t.contains("2 unread"), "{t}");
    // Too big: refused with the reason, exit 1.
    let big = "x".repeat(13 * 1024);
    let out = ctl(&a, &["send", "bob", &big]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("8001"));
    alice.finish().await;
    bob.finish().await;
}
