//! What a hostile broker or provisioning server can do, tried for real: the daemon keeps its
//! own words, its service manager's protocol and its process intact.

mod common;

use common::*;
use imlink_sandbox::LoginFault;
use serde_json::json;

/// A broker's DISCONNECT reason string with newlines. The landed daemon put it unescaped in
/// `STATUS=`: every `\n` starts a new sd_notify assignment (WATCHDOG=trigger fires the
/// watchdog: SIGABRT and a core dump; STOPPING=1, ERRNO=…), and forged log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reason_string_cannot_inject_sd_notify_assignments_or_log_lines() {
    let sb = sandbox().await;
    let evil = "busy\nWATCHDOG=trigger\nSTOPPING=1\nERRNO=42\r\nINFO forged log line \u{7}";
    sb.on_login(
        LoginFault::DisconnectWith {
            code: 0x89,
            reason: evil.into(),
        },
        Some(1),
        Some("evil-1"),
    );
    let mut d = Daemon::start(&sb, Opts::user("evil-1")).await;
    // Busy, then the next login works.
    d.wait_notify("retrying").await;
    d.wait_phase("online").await;
    for note in d.notes() {
        for line in note.lines() {
            assert!(
                !["WATCHDOG=trigger", "STOPPING=1", "ERRNO=42"].contains(&line),
                "an injected sd_notify assignment: {note:?}"
            );
            assert!(!line.starts_with("INFO forged"), "{note:?}");
        }
    }
    let shown = d
        .notes()
        .into_iter()
        .find(|n| n.contains("WATCHDOG=trigger"))
        .expect("the server's words are shown, quoted, on one line");
    assert!(shown.contains("\"busy WATCHDOG=trigger STOPPING=1 ERRNO=42  INFO forged log line"));
    let log = d.log_text();
    for line in log.lines() {
        assert!(
            !line.starts_with("WATCHDOG")
                && !line.starts_with("STOPPING")
                && !line.starts_with("INFO forged"),
            "a forged log line: {line:?}"
        );
    }
    // The API shows it quoted and capped too.
    let st = d.status().await;
    assert_eq!(st["phase"], "online");
    d.finish().await;
}

/// The landed provisioning client panicked on this answer (debug and release): a chunk size
/// of `usize::MAX` overflowed `out.len() + size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_size_overflow_from_provisioning_is_a_malformed_answer_not_a_panic() {
    let sb = sandbox().await;
    let (url, mut hits, _server) = hostile_http(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\nffffffffffffffff\r\nxxxx"
            .to_vec(),
    )
    .await;
    let mut o = Opts::user("evil-2");
    o.provisioning_url = Some(format!("{url}/v1/usersig?user_id={{user_id}}"));
    let d = Daemon::start(&sb, o).await;
    let st = d.wait_phase("backoff").await;
    assert_eq!(st["last_error"]["class"], "busy", "{st}");
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("chunked"),
        "{st}"
    );
    // And it keeps retrying with backoff, alive.
    let before = *hits.borrow();
    count_reaches(&mut hits, before + 1).await;
    assert!(!d.log_text().contains("panicked"), "{}", d.log_text());
    assert_eq!(
        d.rpc("version", json!({})).await["result"]["name"],
        "imlinkd"
    );
    d.finish().await;
}

/// `expire_at: i64::MAX` overflowed in the landed engine (a panic in debug; in release the
/// value wrapped, the sig counted as expired, and four such answers stopped the daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_expiry_from_provisioning_is_a_malformed_answer() {
    let sb = sandbox().await;
    let body = r#"{"user_id":"evil-3","user_sig":"opaque-sig","expire_at":9223372036854775807}"#;
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (url, mut hits, _server) = hostile_http(resp.into_bytes()).await;
    let mut o = Opts::user("evil-3");
    o.provisioning_url = Some(format!("{url}/sig/{{user_id}}"));
    let d = Daemon::start(&sb, o).await;
    let st = d.wait_phase("backoff").await;
    let m = st["last_error"]["message"].as_str().unwrap();
    assert!(m.contains("not plausible"), "{m}");
    // Retried (busy), never stopped, and the opaque sig was never sent.
    let before = *hits.borrow();
    count_reaches(&mut hits, before + 3).await;
    assert_ne!(d.status().await["phase"], "stopped");
    assert_eq!(sb.user("evil-3").connect_attempts, 0);
    assert!(!d.log_text().contains("panicked"));
    d.finish().await;
}
