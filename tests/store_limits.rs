//! The message store's promises against the real binary (issue 18): eviction never takes
//! what the inbox consumer has not acknowledged; the cap bounds received messages too, and a
//! peer's flood never blocks local sends (the broker keeps what the store cannot take);
//! inbox cursors name their user and survive account switches (the API and `imlinkctl inbox
//! --follow`); readers that never read their answers cannot exhaust the daemon's memory.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A 1 MiB store (the smallest the config allows): about 75 messages of 8 KB.
const SMALL_STORE: &str = "[store]\nmax_bytes = \"1MiB\"\n";
const CAP: u64 = 1 << 20;

fn body(tag: &str, i: usize) -> String {
    let head = format!("{tag} {i} ");
    head.clone() + &"y".repeat(8000 - head.len())
}

fn label(m: &Value) -> String {
    m["body"]
        .as_str()
        .unwrap()
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn send(d: &Daemon, to: &str, body: &str) {
    let r = d
        .rpc("send_message", json!({ "to": to, "body": body }))
        .await;
    assert!(r["result"]["id"].is_string(), "send_message: {r}");
}

/// Bytes in use in a store file (pages in use), read beside the running daemon.
fn used(db: &Path) -> u64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let q = |p: &str| -> i64 {
        c.query_row(&format!("PRAGMA {p}"), [], |r| r.get(0))
            .unwrap()
    };
    ((q("page_count") - q("freelist_count")) * q("page_size")) as u64
}

fn error_of(r: &Value) -> (i64, String) {
    (
        r["error"]["code"]
            .as_i64()
            .unwrap_or_else(|| panic!("expected an error: {r}")),
        r["error"]["message"].as_str().unwrap().to_string(),
    )
}

async fn switch_to(d: &Daemon, user: &str) {
    let r = d.rpc("login", json!({ "user_id": user })).await;
    assert_eq!(r["result"]["login_user"], user, "{r}");
}

/// What the log says when the store refuses a received message for space.
const REFUSED: &str = "cannot take a received message";

/// docs/api.md promised "unacknowledged messages are never evicted", but received messages
/// that were marked read and never acknowledged through the inbox were evicted (the messages
/// right after the consumer's position went first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_never_takes_a_message_the_inbox_consumer_has_not_acknowledged() {
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    let mut o = Opts::user("bob");
    o.top_extra = SMALL_STORE.into();
    let bob = Daemon::start(&sb, o).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    for i in 0..20 {
        send(&alice, "bob", &body("m", i)).await;
    }
    let got = inbox_at_least(&bob, 20, WAIT).await;
    // The consumer handled the first 10; an app marks everything read.
    let cursor = format!("bob:{}", got[9]["seq"]);
    let r = bob.rpc("ack_inbox", json!({ "cursor": cursor })).await;
    assert_eq!(r["result"]["cursor"], cursor.as_str(), "{r}");
    bob.rpc("mark_read", json!({ "peer": "alice" })).await;
    // More than the store holds: it evicts what was acknowledged, then holds the rest back.
    for i in 20..120 {
        send(&alice, "bob", &body("m", i)).await;
    }
    log_line(&bob, REFUSED, WAIT).await;
    let after = bob
        .rpc("read_inbox", json!({ "cursor": cursor, "limit": 100 }))
        .await;
    let after = after["result"]["messages"].as_array().unwrap().clone();
    let labels: Vec<String> = after.iter().map(label).collect();
    let want: Vec<String> = (10..10 + labels.len()).map(|i| format!("m {i}")).collect();
    assert_eq!(
        labels, want,
        "every message after the acknowledged position is there, read or not"
    );
    assert!(after.len() > 10, "later ones arrived too: {}", after.len());
    let all = inbox_all(&bob).await;
    assert_eq!(
        label(&all[0]),
        "m 10",
        "the acknowledged ones made room (eviction ran)"
    );
    alice.finish().await;
    bob.finish().await;
}

/// A peer flooding unread messages grew the store past `store.max_bytes` (received messages
/// were never refused) and then every local send failed with 6022. Now received messages
/// fill at most 90 % of the cap; beyond, the daemon does not acknowledge them and the broker
/// keeps them; local sends still fit; and when the inbox consumer catches up, the held
/// messages arrive, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_fills_only_its_share_of_the_store_and_never_blocks_local_sends() {
    const FLOOD: usize = 150;
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    let mut o = Opts::user("bob");
    o.top_extra = SMALL_STORE.into();
    let bob = Daemon::start(&sb, o).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    for i in 0..FLOOD {
        send(&alice, "bob", &body("flood", i)).await;
    }
    let line = log_line(&bob, REFUSED, WAIT).await;
    assert!(line.contains("nothing can be evicted"), "{line}");
    let db = bob.dir.join("state/messages.db");
    let u = used(&db);
    assert!(
        u <= CAP / 100 * 90 + 16 * 1024,
        "received messages stay within 90 % of the cap: {u} of {CAP}"
    );
    // Local sends go on.
    for i in 0..3 {
        let r = bob
            .rpc(
                "send_message",
                json!({ "to": "alice", "body": body("reply", i) }),
            )
            .await;
        assert!(r["result"]["id"].is_string(), "a local send: {r}");
    }
    assert!(used(&db) <= CAP);
    // The broker keeps what bob did not acknowledge.
    let delivered = sb.user("bob").messages_delivered;
    assert!(
        (delivered as usize) < FLOOD,
        "held at the broker: {delivered} of {FLOOD} acknowledged"
    );
    // The consumer catches up: everything arrives, each once.
    let mut w = bob.client().await;
    w.call("watch", json!({})).await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen.len() < FLOOD {
        let page = bob.rpc("read_inbox", json!({})).await;
        let msgs = page["result"]["messages"].as_array().unwrap().clone();
        if msgs.is_empty() {
            if tokio::time::timeout_at(deadline, w.next()).await.is_err() {
                panic!(
                    "{} of {FLOOD} arrived after the consumer caught up\n{}",
                    seen.len(),
                    bob.log_text()
                );
            }
            continue;
        }
        for m in &msgs {
            *seen.entry(label(m)).or_default() += 1;
        }
        let r = bob
            .rpc("ack_inbox", json!({ "cursor": page["result"]["cursor"] }))
            .await;
        assert!(r.get("result").is_some(), "{r}");
    }
    assert!(seen.values().all(|n| *n == 1), "each once: {seen:?}");
    let want: std::collections::BTreeSet<String> =
        (0..FLOOD).map(|i| format!("flood {i}")).collect();
    assert_eq!(
        seen.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        want
    );
    assert!(used(&db) <= CAP);
    alice.finish().await;
    bob.finish().await;
}

/// `ack_inbox` applied to whoever was logged in at that moment, with a cursor that named no
/// one: a consumer whose account switched between its read and its ack acknowledged the
/// other user's unread messages, and a cursor beyond every message was taken and hid every
/// later one. Cursors now name their user and are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_cursors_name_their_user_and_are_checked() {
    let sb = sandbox().await;
    let carol = Daemon::start(&sb, Opts::user("carol")).await;
    let d = Daemon::start(&sb, Opts::user("bob")).await;
    carol.wait_phase("online").await;
    d.wait_phase("online").await;
    send(&carol, "bob", "b1").await;
    send(&carol, "bob", "b2").await;
    inbox_at_least(&d, 2, WAIT).await;
    switch_to(&d, "alice").await;
    send(&carol, "alice", "a1").await;
    inbox_at_least(&d, 1, WAIT).await;

    // A consumer reads alice's inbox; the account switches before it acknowledges.
    let page = d.rpc("read_inbox", json!({})).await;
    assert_eq!(page["result"]["user_id"], "alice", "{page}");
    let cursor = page["result"]["cursor"].as_str().unwrap().to_string();
    assert!(cursor.starts_with("alice:"), "{cursor}");
    switch_to(&d, "bob").await;
    let r = d.rpc("ack_inbox", json!({ "cursor": cursor })).await;
    assert_eq!(
        r["result"],
        json!({ "user_id": "alice", "cursor": cursor }),
        "alice's position, whoever is logged in"
    );
    let bob = d.rpc("read_inbox", json!({})).await;
    assert_eq!(bob["result"]["user_id"], "bob");
    let bodies: Vec<&str> = bob["result"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["b1", "b2"],
        "bob's messages are still unacknowledged"
    );

    // Reading alice's inbox while the session is bob's: refused (readers read the current
    // account), and says what to do.
    let (code, msg) = error_of(&d.rpc("read_inbox", json!({ "cursor": cursor })).await);
    assert_eq!(code, 6017);
    assert!(
        msg.contains("alice's inbox, but the session is bob's") && msg.contains("without a cursor"),
        "{msg}"
    );
    // Beyond the newest message, an unknown user, malformed, and the old integer forms.
    let bob_cursor = bob["result"]["cursor"].as_str().unwrap();
    let future = format!("bob:{}", 1_000_000);
    for (method, params, says) in [
        (
            "ack_inbox",
            json!({ "cursor": future }),
            "beyond bob's newest",
        ),
        (
            "read_inbox",
            json!({ "cursor": future }),
            "beyond bob's newest",
        ),
        (
            "ack_inbox",
            json!({ "cursor": "zed:1" }),
            "no inbox for zed",
        ),
        (
            "ack_inbox",
            json!({ "cursor": "bob" }),
            "is not an inbox cursor",
        ),
        (
            "ack_inbox",
            json!({ "cursor": "bob:-1" }),
            "is not an inbox cursor",
        ),
        (
            "read_inbox",
            json!({ "cursor": "b o b:1" }),
            "is not an inbox cursor",
        ),
        (
            "ack_inbox",
            json!({ "cursor": 3 }),
            "strings naming their user",
        ),
        ("read_inbox", json!({ "after": 0 }), "takes no \"after\""),
        ("ack_inbox", json!({}), "cursor is required"),
    ] {
        let (code, msg) = error_of(&d.rpc(method, params.clone()).await);
        assert_eq!(code, 6017, "{method} {params}: {msg}");
        assert!(msg.contains(says), "{method} {params}: {msg}");
    }
    // Acknowledged up to the newest: nothing later is hidden.
    d.rpc("ack_inbox", json!({ "cursor": bob_cursor })).await;
    send(&carol, "bob", "b3").await;
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let later = loop {
        let r = d.rpc("read_inbox", json!({})).await;
        let m = r["result"]["messages"].as_array().unwrap().clone();
        if !m.is_empty() {
            break m;
        }
        tokio::time::timeout(WAIT, w.next()).await.expect("b3");
    };
    assert_eq!(later.len(), 1);
    assert_eq!(later[0]["body"], "b3");
    // Back to alice: what her consumer acknowledged stays acknowledged.
    switch_to(&d, "alice").await;
    let r = d.rpc("read_inbox", json!({})).await;
    assert_eq!(r["result"]["messages"], json!([]), "{r}");
    assert_eq!(r["result"]["cursor"], cursor.as_str());
    carol.finish().await;
    d.finish().await;
}

/// `imlinkctl inbox --follow` across alice → bob → alice: every message printed once, with
/// the user whose inbox it is, and each acknowledged for its own user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imlinkctl_inbox_follows_across_account_switches() {
    let sb = sandbox().await;
    let carol = Daemon::start(&sb, Opts::user("carol")).await;
    let d = Daemon::start(&sb, Opts::user("alice")).await;
    carol.wait_phase("online").await;
    d.wait_phase("online").await;
    let mut follow = std::process::Command::new(CTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["inbox", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(serde_json::from_str(&l).unwrap()).is_err() {
                break;
            }
        }
    });
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    let next = || {
        let rx = rx.clone();
        async move {
            tokio::task::spawn_blocking(move || rx.lock().unwrap().recv_timeout(WAIT))
                .await
                .unwrap()
                .expect("a line from imlinkctl inbox --follow")
        }
    };
    let mut lines = Vec::new();
    send(&carol, "alice", "a1").await;
    lines.push(next().await);
    switch_to(&d, "bob").await;
    send(&carol, "bob", "b1").await;
    // For alice while the device is bob: the broker keeps it for her.
    send(&carol, "alice", "a2").await;
    lines.push(next().await);
    switch_to(&d, "alice").await;
    lines.push(next().await);
    send(&carol, "alice", "a3").await;
    lines.push(next().await);
    let got: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            (
                l["user_id"].as_str().unwrap().to_string(),
                l["body"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("alice", "a1"),
        ("bob", "b1"),
        ("alice", "a2"),
        ("alice", "a3"),
    ];
    assert_eq!(
        got,
        want.map(|(u, b)| (u.to_string(), b.to_string())),
        "each once, with its user"
    );
    // It acknowledges each page after printing it: wait for the last acknowledgement (the
    // daemon's state, polled), then nothing is left unacknowledged for either user.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = d.rpc("read_inbox", json!({})).await;
        if r["result"]["messages"] == json!([]) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never acknowledged: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling the daemon's state
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        rx.lock().unwrap().try_recv().is_err(),
        "nothing was printed twice"
    );
    switch_to(&d, "bob").await;
    let r = d.rpc("read_inbox", json!({})).await;
    assert_eq!(r["result"]["messages"], json!([]), "{r}");
    carol.finish().await;
    d.finish().await;
}

/// 2,000 conversations whose last messages are ~12 KB: `get_conversations` returned all of
/// them in one 23 MB answer, and readers that asked and never read made the daemon hold one
/// each (279 MB for six; the packaged unit has MemoryMax=64M). Lists are paged now, and
/// answers being written share a byte budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_never_read_cannot_exhaust_memory() {
    const CONVERSATIONS: usize = 2_000;
    let sb = sandbox().await;
    let dir = temp_dir("readers");
    let db = dir.join("state/messages.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        db.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    {
        let c = imlinkd::store::open(&db).unwrap();
        let mut ids = imlinkd::message::IdGen::new();
        c.execute_batch("BEGIN").unwrap();
        for i in 0..CONVERSATIONS {
            let ts = 1_790_000_000_000 + i as i64;
            let m = imlinkd::message::WireMessage {
                id: ids.next(ts),
                from: format!("peer-{i}"),
                to: "bob".into(),
                kind: imlinkd::message::Kind::Text,
                body: "z".repeat(12_000),
                ts,
            };
            assert!(m.encode().is_ok(), "a message that fits the 12 KB limit");
            imlinkd::store::receive(&c, "bob", &m, 1 << 34).unwrap();
        }
        c.execute_batch("COMMIT").unwrap();
    }
    let mut o = Opts::user("bob");
    o.dir = Some(dir);
    o.top_extra = "[store]\nmax_bytes = \"1GiB\"\n".into();
    let d = Daemon::start(&sb, o).await;
    let pid = d.child.as_ref().unwrap().id().unwrap();

    // Paged: 20 by default, at most 100, every conversation once, newest first.
    let r = d.rpc("get_conversations", json!({})).await;
    assert_eq!(r["result"]["conversations"].as_array().unwrap().len(), 20);
    assert_eq!(r["result"]["conversations"][0]["peer"], "peer-1999");
    let (code, _) = error_of(&d.rpc("get_conversations", json!({ "limit": 101 })).await);
    assert_eq!(code, -32602);
    let (code, _) = error_of(&d.rpc("get_conversations", json!({ "before": "x" })).await);
    assert_eq!(code, -32602);

    // Six readers (another uid) ask for the largest page and never read the answer.
    let mut slow = connect_as(52_100, 0, d.socket.clone(), 6);
    for s in &mut slow {
        s.write_all(
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"get_conversations\",\"params\":{\"limit\":100}}\n",
        )
        .unwrap();
    }
    // Meanwhile another client reads the whole list, a page at a time.
    let mut c = d.client().await;
    let mut peers = Vec::new();
    let mut before = Value::Null;
    loop {
        let r = c
            .call(
                "get_conversations",
                json!({ "limit": 100, "before": before }),
            )
            .await;
        let page = r["result"]["conversations"]
            .as_array()
            .unwrap_or_else(|| panic!("{r}"))
            .clone();
        assert!(page.len() <= 100);
        peers.extend(page.iter().map(|c| c["peer"].as_str().unwrap().to_string()));
        if r["result"]["next_before"].is_null() {
            break;
        }
        before = r["result"]["next_before"].clone();
    }
    let want: Vec<String> = (0..CONVERSATIONS)
        .rev()
        .map(|i| format!("peer-{i}"))
        .collect();
    assert_eq!(peers, want, "every conversation once, newest first");
    let peak = vm_hwm_kib(pid);
    eprintln!("peak RSS with six readers that never read: {peak} KiB");
    assert!(
        peak < 40 * 1024,
        "the daemon's peak stays far below MemoryMax=64M: {peak} KiB"
    );
    drop(slow);
    assert_eq!(d.status().await["phase"], "online");
    d.finish().await;
}
