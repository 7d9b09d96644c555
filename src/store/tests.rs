//! The store on a real SQLite file: order, deduplication, conversations, paging, the inbox
//! cursor, eviction limits, schema versions, and group commit on its thread.

use super::*;
use crate::message::IdGen;

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("imlinkd-store-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("messages.db")
}

fn msg(g: &mut IdGen, from: &str, to: &str, ts: i64, body: &str) -> WireMessage {
    WireMessage {
        id: g.next(ts),
        from: from.into(),
        to: to.into(),
        kind: Kind::Text,
        body: body.into(),
        ts,
    }
}

const CAP: u64 = 64 << 20;

#[test]
fn the_outbox_keeps_order_and_settles_once() {
    let c = open(&tmp("outbox")).unwrap();
    let mut g = IdGen::new();
    let ids: Vec<String> = (0..5)
        .map(|i| {
            let m = msg(
                &mut g,
                "alice",
                "bob",
                1_800_000_000_000 + i,
                &format!("m{i}"),
            );
            enqueue(&c, "alice", &m, CAP).unwrap();
            m.id
        })
        .collect();
    let out: Vec<String> = outbox(&c, "alice")
        .unwrap()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(out, ids);
    assert!(outbox(&c, "bob").unwrap().is_empty(), "per owner");
    assert!(settle(&c, "alice", &ids[0], None).unwrap());
    assert!(!settle(&c, "alice", &ids[0], None).unwrap(), "once");
    assert!(settle(&c, "alice", &ids[1], Some(70_009)).unwrap());
    let m1 = get(&c, "alice", &ids[1]).unwrap().unwrap();
    assert_eq!((m1.state, m1.code), (State::Failed, Some(70_009)));
    assert_eq!(outbox(&c, "alice").unwrap().len(), 3);
    // The courier's pages: after a cursor, a limit, peers left out, and whether that was all.
    let carol = msg(&mut g, "alice", "carol", 1_800_000_000_009, "to carol");
    let carol_seq = enqueue(&c, "alice", &carol, CAP).unwrap();
    let (page, complete) = outbox_page(&c, "alice", 0, 2, &[]).unwrap();
    assert_eq!(
        page.iter().map(|(_, m)| &m.id).collect::<Vec<_>>(),
        vec![&ids[2], &ids[3]]
    );
    assert!(!complete);
    assert_eq!(page[0].1.from, "alice");
    let (page, complete) = outbox_page(&c, "alice", page[1].0, 10, &["bob".into()]).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!((page[0].0, &page[0].1), (carol_seq, &carol));
    assert!(complete);
}

#[test]
fn received_messages_are_stored_once_and_counted_unread() {
    let c = open(&tmp("receive")).unwrap();
    let mut g = IdGen::new();
    let m = msg(&mut g, "alice", "bob", 1_800_000_000_000, "hi");
    assert!(matches!(
        receive(&c, "bob", &m, CAP).unwrap(),
        Received::New(_)
    ));
    assert_eq!(receive(&c, "bob", &m, CAP).unwrap(), Received::Duplicate);
    let m2 = msg(&mut g, "alice", "bob", 1_800_000_000_001, "again");
    receive(&c, "bob", &m2, CAP).unwrap();
    let reply = msg(&mut g, "bob", "alice", 1_800_000_000_002, "yes");
    enqueue(&c, "bob", &reply, CAP).unwrap();
    let conv = conversations(&c, "bob").unwrap();
    assert_eq!(conv.len(), 1);
    assert_eq!((conv[0].peer.as_str(), conv[0].unread), ("alice", 2));
    assert_eq!(conv[0].last.as_ref().unwrap().body, "yes");
    assert_eq!(mark_read(&c, "bob", "alice").unwrap(), 2);
    assert_eq!(conversations(&c, "bob").unwrap()[0].unread, 0);
}

#[test]
fn conversations_are_newest_first_and_history_pages_backwards() {
    let c = open(&tmp("history")).unwrap();
    let mut g = IdGen::new();
    let mut ids = Vec::new();
    for i in 0..25 {
        let m = msg(
            &mut g,
            "carol",
            "bob",
            1_800_000_000_000 + i / 3,
            &format!("c{i}"),
        );
        receive(&c, "bob", &m, CAP).unwrap();
        ids.push(m.id);
    }
    let m = msg(&mut g, "dave", "bob", 1_800_000_001_000, "d");
    receive(&c, "bob", &m, CAP).unwrap();
    let peers: Vec<String> = conversations(&c, "bob")
        .unwrap()
        .into_iter()
        .map(|c| c.peer)
        .collect();
    assert_eq!(peers, ["dave", "carol"]);
    // Pages of 10, backwards, with equal timestamps broken by id.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = history(&c, "bob", "carol", before.as_deref(), 10).unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|m| m.id.clone());
        seen.extend(page.into_iter().map(|m| m.id));
    }
    let mut want = ids.clone();
    want.reverse();
    assert_eq!(seen, want, "every message once, newest first");
    assert!(
        history(&c, "bob", "carol", Some("01ZZZZZZZZZZZZZZZZZZZZZZZZ"), 10)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_inbox_cursor_reads_in_order_and_only_moves_forward() {
    let c = open(&tmp("inbox")).unwrap();
    let mut g = IdGen::new();
    for i in 0..5 {
        receive(
            &c,
            "bob",
            &msg(&mut g, "alice", "bob", 1_800_000_000_000 + i, "x"),
            CAP,
        )
        .unwrap();
    }
    let first = read_inbox(&c, "bob", 0, 3).unwrap();
    assert_eq!(first.len(), 3);
    let rest = read_inbox(&c, "bob", first[2].seq, 10).unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(ack_inbox(&c, "bob", first[2].seq).unwrap(), first[2].seq);
    assert_eq!(
        ack_inbox(&c, "bob", 1).unwrap(),
        first[2].seq,
        "never backwards"
    );
    assert_eq!(inbox_cursor(&c, "bob").unwrap(), first[2].seq);
}

#[test]
fn eviction_takes_only_what_nobody_needs_and_a_full_store_refuses_sends() {
    let c = open(&tmp("evict")).unwrap();
    let mut g = IdGen::new();
    let cap = 256 * 1024;
    let big = "x".repeat(8 * 1024);
    // Fill with queued (unsent) messages: they are never evicted.
    let mut queued = 0;
    let full = loop {
        match enqueue(
            &c,
            "alice",
            &msg(&mut g, "alice", "bob", 1_800_000_000_000, &big),
            cap,
        ) {
            Ok(_) => queued += 1,
            Err(e) => break e,
        }
        assert!(queued < 1000, "the cap holds");
    };
    assert!(matches!(full, StoreError::Full { .. }), "{full}");
    assert!(full.to_string().contains("store.max_bytes"));
    assert_eq!(
        outbox(&c, "alice").unwrap().len(),
        queued,
        "nothing queued was lost"
    );
    // Once sent, they may go: the next send makes room.
    for (_, id) in outbox(&c, "alice").unwrap() {
        settle(&c, "alice", &id, None).unwrap();
    }
    enqueue(
        &c,
        "alice",
        &msg(&mut g, "alice", "bob", 1_800_000_000_001, "fits"),
        cap,
    )
    .unwrap();
    assert!(used_bytes(&c).unwrap() < cap);
    // Unread incoming messages stay; read ones may go.
    let c = open(&tmp("evict-in")).unwrap();
    for _ in 0..200 {
        receive(
            &c,
            "bob",
            &msg(&mut g, "alice", "bob", 1_800_000_000_000, &big),
            cap,
        )
        .unwrap();
    }
    assert_eq!(
        count(&c).unwrap(),
        200,
        "unread incoming messages are never evicted"
    );
    mark_read(&c, "bob", "alice").unwrap();
    receive(
        &c,
        "bob",
        &msg(&mut g, "alice", "bob", 1_800_000_000_001, &big),
        cap,
    )
    .unwrap();
    assert!(count(&c).unwrap() < 200, "read ones made room");
    let conv = conversations(&c, "bob").unwrap();
    assert!(
        conv[0].last.is_some(),
        "the conversation still shows its last message"
    );
}

#[test]
fn a_store_from_a_newer_imlinkd_is_refused_and_left_untouched() {
    let path = tmp("newer");
    {
        let c = open(&path).unwrap();
        enqueue(
            &c,
            "alice",
            &msg(&mut IdGen::new(), "alice", "bob", 1, "keep me"),
            CAP,
        )
        .unwrap();
        c.pragma_update(None, "user_version", 7).unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let e = open(&path).unwrap_err();
    assert!(matches!(e, StoreError::Newer { found: 7, .. }), "{e}");
    assert!(e.to_string().contains("newer imlinkd"));
    assert_eq!(std::fs::read(&path).unwrap(), before, "not a byte changed");
}

#[test]
fn a_committed_message_is_there_after_reopening() {
    let path = tmp("durable");
    let m = msg(
        &mut IdGen::new(),
        "alice",
        "bob",
        1_800_000_000_000,
        "durable",
    );
    {
        let c = open(&path).unwrap();
        enqueue(&c, "alice", &m, CAP).unwrap();
    }
    let c = open(&path).unwrap();
    assert_eq!(get(&c, "alice", &m.id).unwrap().unwrap().body, "durable");
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
    assert_eq!((mode.as_str(), sync), ("wal", 2), "WAL, synchronous=FULL");
    let cache: i64 = c.query_row("PRAGMA cache_size", [], |r| r.get(0)).unwrap();
    assert_eq!(cache, -512, "a 512 KiB page cache (the memory budget)");
}

#[tokio::test(flavor = "current_thread")]
async fn the_store_thread_commits_batches_and_answers_after_the_commit() {
    let path = tmp("thread");
    let (h, opened) = StoreHandle::open(path.clone(), CAP);
    opened.unwrap();
    let mut g = IdGen::new();
    let mut waits = Vec::new();
    for i in 0..300 {
        let m = msg(&mut g, "alice", "bob", 1_800_000_000_000 + i, "m");
        let (tx, rx) = oneshot::channel();
        h.send(StoreRequest::Enqueue {
            owner: "alice".into(),
            msg: m,
            reply: tx,
        })
        .unwrap();
        waits.push(rx);
    }
    let mut seqs = Vec::new();
    for w in waits {
        seqs.push(w.await.unwrap().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    // Answered means committed: a fresh connection sees every one.
    let c = open(&path).unwrap();
    assert_eq!(outbox(&c, "alice").unwrap().len(), 300);
    let (n, _) = h.ask(|reply| StoreRequest::Stats { reply }).await.unwrap();
    assert_eq!(n, 300);
    // A store that cannot open answers every request with the reason.
    let bad = tmp("bad");
    std::fs::create_dir_all(&bad).unwrap(); // a directory where the file should be
    let (h, opened) = StoreHandle::open(bad, CAP);
    assert!(opened.is_err());
    let r = h.ask(|reply| StoreRequest::Stats { reply }).await;
    assert!(r.is_err());
}

/// A store that falls behind (here: another process holds the write lock) tells senders
/// it is busy beyond its queue bound, and answers everything it accepted once it catches up.
#[tokio::test(flavor = "current_thread")]
async fn a_store_that_falls_behind_refuses_beyond_its_queue_and_answers_all_it_took() {
    let path = tmp("behind");
    let limit = 4;
    let (h, opened) = StoreHandle::open_bounded(path.clone(), CAP, limit);
    opened.unwrap();
    let blocker = open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut g = IdGen::new();
    let mut send = |i: i64| {
        let (tx, rx) = oneshot::channel();
        let r = h.send(StoreRequest::Enqueue {
            owner: "alice".into(),
            msg: msg(&mut g, "alice", "bob", 1_800_000_000_000 + i, "m"),
            reply: tx,
        });
        r.map(|()| rx)
    };
    // The first is taken by the store thread, which then waits for the lock.
    let mut accepted = vec![send(0).unwrap()];
    while h.waiting() > 0 {
        tokio::task::yield_now().await;
    }
    let mut busy = 0;
    for i in 1..=40 {
        match send(i) {
            Ok(rx) => accepted.push(rx),
            Err(e) => {
                assert!(e.to_string().contains("busy; try again"), "{e}");
                busy += 1;
            }
        }
    }
    assert!(h.waiting() <= limit, "never more than the bound waiting");
    assert!(
        busy >= 30,
        "beyond the bound senders hear 'busy' ({busy} of 40)"
    );
    blocker.execute_batch("COMMIT").unwrap();
    let n = accepted.len();
    for rx in accepted {
        rx.await.unwrap().expect("everything accepted is committed");
    }
    assert_eq!(outbox(&open(&path).unwrap(), "alice").unwrap().len(), n);
    assert_eq!(h.waiting(), 0);
}

use tokio::sync::oneshot;
