//! kill -9 of either daemon at random moments during a 1,000-message exchange (both
//! directions, repeated kills): nothing a daemon acknowledged is lost, and nothing arrives
//! twice at the app level: each id is exactly once in each side's history.
//!
//! The moments come from a seeded RNG (the seed is printed; `IMLINK_CRASH_SEED` replays one).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const PER_SIDE: usize = 500;
const KILLS: usize = 8;

/// One request on a fresh connection; `None` when the daemon is not there (killed,
/// restarting) or closed before answering.
async fn try_call(socket: &Path, method: &str, params: Value) -> Option<Value> {
    let s = UnixStream::connect(socket).await.ok()?;
    let (r, mut w) = s.into_split();
    let line =
        json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }).to_string() + "\n";
    w.write_all(line.as_bytes()).await.ok()?;
    let mut r = BufReader::new(r);
    let mut out = String::new();
    let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut out))
        .await
        .ok()?
        .ok()?;
    (n > 0).then(|| serde_json::from_str(&out).ok()).flatten()
}

/// Send `n` messages from the daemon at `socket` to `peer`, retrying whatever got no answer
/// (an unanswered send may or may not have been committed: the app cannot know, so it is
/// not in the confirmed set, and may show up once more with a new id — never twice with
/// one). Returns the ids the daemon confirmed.
async fn sender(socket: PathBuf, peer: &'static str, n: usize) -> Vec<String> {
    let mut confirmed = Vec::new();
    let mut i = 0;
    while confirmed.len() < n {
        let body = format!("{peer} #{i}");
        match try_call(&socket, "send_message", json!({ "to": peer, "body": body })).await {
            Some(v) if v["result"]["id"].is_string() => {
                confirmed.push(v["result"]["id"].as_str().unwrap().to_string());
                i += 1;
            }
            Some(v) if v["error"]["code"] == 6014 => {
                // Logged out for a moment (restarting): the app tries again.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(v) => panic!("send_message refused: {v}"),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    confirmed
}

/// `d`'s whole history with `peer` (ids, direction, state), oldest first.
async fn history(socket: &Path, peer: &str) -> Option<Vec<Value>> {
    let mut all = Vec::new();
    let mut before = Value::Null;
    loop {
        let r = try_call(
            socket,
            "get_history",
            json!({ "peer": peer, "before": before, "limit": 100 }),
        )
        .await?;
        all.extend(r["result"]["messages"].as_array()?.iter().cloned());
        match r["result"]["next_before"].as_str() {
            Some(id) => before = json!(id),
            None => {
                all.reverse();
                return Some(all);
            }
        }
    }
}

fn ids_of(h: &[Value], dir: &str) -> Vec<String> {
    h.iter()
        .filter(|m| m["direction"] == dir)
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

async fn kill9(d: &mut Daemon) {
    d.signal(nix::sys::signal::Signal::SIGKILL);
    if let Some(c) = d.child.as_mut() {
        let _ = c.wait().await;
    }
    d.child = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_duplicates_nothing() {
    let seed: u64 = std::env::var("IMLINK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash seed {seed} (IMLINK_CRASH_SEED={seed} replays the kill moments)");
    let mut rng = imlinkd::session::Rng::new(seed);
    let sb = sandbox().await;
    let mut alice = Daemon::start(&sb, Opts::user("alice")).await;
    let mut bob = Daemon::start(&sb, Opts::user("bob")).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    let (a_dir, b_dir) = (alice.dir.clone(), bob.dir.clone());
    let to_bob = tokio::spawn(sender(alice.socket.clone(), "bob", PER_SIDE));
    let to_alice = tokio::spawn(sender(bob.socket.clone(), "alice", PER_SIDE));
    let kills = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.range(100, 700))).await;
        let (d, dir, name) = if rng.one_in(2) {
            (&mut alice, a_dir.clone(), "alice")
        } else {
            (&mut bob, b_dir.clone(), "bob")
        };
        kill9(d).await;
        kills.lock().unwrap().push(name);
        // systemd would start it again.
        *d = Daemon::start(
            &sb,
            Opts {
                dir: Some(dir),
                ..Opts::user(name)
            },
        )
        .await;
    }
    let sent_to_bob = to_bob.await.unwrap();
    let sent_to_alice = to_alice.await.unwrap();
    eprintln!("kills: {:?}", kills.lock().unwrap());

    // Let both sides converge: everything sent, everything stored on the other side.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (mut w_a, mut w_b) = (alice.client().await, bob.client().await);
    w_a.call("watch", json!({})).await;
    w_b.call("watch", json!({})).await;
    let (ha, hb) = loop {
        let ha = history(&alice.socket, "bob").await.unwrap();
        let hb = history(&bob.socket, "alice").await.unwrap();
        let settled = |h: &[Value]| h.iter().all(|m| m["state"] != "queued");
        let a_out = ids_of(&ha, "out");
        let b_out = ids_of(&hb, "out");
        let done = settled(&ha)
            && settled(&hb)
            && ids_of(&hb, "in").len() >= a_out.len()
            && ids_of(&ha, "in").len() >= b_out.len();
        if done {
            break (ha, hb);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: alice out {} / bob in {}, bob out {} / alice in {}\nalice log:\n{}",
            a_out.len(),
            ids_of(&hb, "in").len(),
            b_out.len(),
            ids_of(&ha, "in").len(),
            alice.log_text()
        );
        tokio::select! {
            _ = w_a.next() => {}
            _ = w_b.next() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    for (what, out, inbound, confirmed) in [
        (
            "alice → bob",
            ids_of(&ha, "out"),
            ids_of(&hb, "in"),
            &sent_to_bob,
        ),
        (
            "bob → alice",
            ids_of(&hb, "out"),
            ids_of(&ha, "in"),
            &sent_to_alice,
        ),
    ] {
        let out_set: BTreeSet<&String> = out.iter().collect();
        let in_set: BTreeSet<&String> = inbound.iter().collect();
        assert_eq!(
            out_set.len(),
            out.len(),
            "{what}: an id twice in the sender's history"
        );
        assert_eq!(
            in_set.len(),
            inbound.len(),
            "{what}: an id twice in the receiver's history"
        );
        assert_eq!(out_set, in_set, "{what}: sent and received differ");
        let lost: Vec<&String> = confirmed
            .iter()
            .filter(|id| !out_set.contains(id))
            .collect();
        assert!(lost.is_empty(), "{what}: confirmed sends lost: {lost:?}");
        assert!(out.len() >= PER_SIDE, "{what}: {} of {PER_SIDE}", out.len());
        eprintln!(
            "{what}: {} confirmed, {} stored and delivered once each",
            confirmed.len(),
            out.len()
        );
    }
    for h in [&ha, &hb] {
        assert!(
            h.iter()
                .filter(|m| m["direction"] == "out")
                .all(|m| m["state"] == "sent")
        );
    }
    alice.finish().await;
    bob.finish().await;
}
