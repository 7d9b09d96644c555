//! The store on a real SQLite file: order, deduplication, conversations, paging, the inbox
//! cursor, eviction limits, schema versions and migration, and group commit on its thread
//! (savepoints per request, answers only after the COMMIT).

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
    let conv = conversations(&c, "bob", None, 100).unwrap().0;
    assert_eq!(conv.len(), 1);
    assert_eq!((conv[0].peer.as_str(), conv[0].unread), ("alice", 2));
    assert_eq!(conv[0].last.as_ref().unwrap().body, "yes");
    assert_eq!(mark_read(&c, "bob", "alice").unwrap(), 2);
    assert_eq!(conversations(&c, "bob", None, 100).unwrap().0[0].unread, 0);
}

/// v1 deduplicated on (owner, id): a peer that sent a message with a predictable id first
/// pre-empted another peer's message with that id. Received messages are now deduplicated
/// on (owner, sender, id): only a redelivery from the same sender is a duplicate.
#[test]
fn only_a_redelivery_from_the_same_sender_is_a_duplicate() {
    let c = open(&tmp("dedupe")).unwrap();
    let mut g = IdGen::new();
    let real = msg(&mut g, "alice", "bob", 1_800_000_000_000, "from alice");
    let mut forged = msg(&mut g, "mallory", "bob", 1_800_000_000_000, "first!");
    forged.id = real.id.clone();
    assert!(matches!(
        receive(&c, "bob", &forged, CAP).unwrap(),
        Received::New(_)
    ));
    assert!(
        matches!(receive(&c, "bob", &real, CAP).unwrap(), Received::New(_)),
        "mallory's message does not pre-empt alice's"
    );
    assert_eq!(receive(&c, "bob", &real, CAP).unwrap(), Received::Duplicate);
    assert_eq!(
        receive(&c, "bob", &forged, CAP).unwrap(),
        Received::Duplicate
    );
    // Within a conversation an id is unique, whichever direction: alice reusing one of
    // bob's ids to her is a duplicate (acknowledged, dropped), but mallory, in another
    // conversation, may use it.
    let mine = msg(&mut g, "bob", "alice", 1_800_000_000_001, "mine");
    enqueue(&c, "bob", &mine, CAP).unwrap();
    let mut echo = msg(&mut g, "alice", "bob", i64::MAX - 1, "echo");
    echo.id = mine.id.clone();
    assert_eq!(receive(&c, "bob", &echo, CAP).unwrap(), Received::Duplicate);
    let mut elsewhere = msg(&mut g, "mallory", "bob", 1_800_000_000_003, "elsewhere");
    elsewhere.id = mine.id.clone();
    assert!(matches!(
        receive(&c, "bob", &elsewhere, CAP).unwrap(),
        Received::New(_)
    ));
    assert_eq!(get(&c, "bob", &mine.id).unwrap().unwrap().body, "mine");
    let page = read_inbox(&c, "bob", None, 10).unwrap();
    assert_eq!(
        page.messages
            .iter()
            .map(|m| m.body.as_str())
            .collect::<Vec<_>>(),
        ["first!", "from alice", "elsewhere"]
    );
    // The other way round: a send whose id a received message of the conversation has is
    // refused, nothing stored.
    let mut predicted = msg(&mut g, "bob", "alice", 1_800_000_000_004, "predicted");
    predicted.id = real.id.clone();
    let before = count(&c).unwrap();
    let e = enqueue(&c, "bob", &predicted, CAP).unwrap_err();
    assert!(matches!(e, StoreError::IdTaken { .. }), "{e}");
    assert!(e.to_string().contains("send it again"), "{e}");
    assert_eq!(count(&c).unwrap(), before);
    predicted.to = "carol".into();
    enqueue(&c, "bob", &predicted, CAP).unwrap();
}

/// The order of `get_history`: newest first by `(ts, id)`, as a list of seqs.
fn history_order(c: &Connection, owner: &str, peer: &str) -> Vec<i64> {
    let mut rows: Vec<(i64, String, i64)> = c
        .prepare("SELECT ts, id, seq FROM messages WHERE owner = ?1 AND peer = ?2")
        .unwrap()
        .query_map(params![owner, peer], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    rows.into_iter().map(|r| r.2).collect()
}

/// Every page size from 1 to `n`: paging from the newest (the next page before the last
/// id of the one before) yields `want`, each message once, in order.
fn assert_pages(c: &Connection, owner: &str, peer: &str, want: &[i64], n: u32, what: &str) {
    for limit in 1..=n {
        let mut seen = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let page = history(c, owner, peer, before.as_deref(), limit).unwrap();
            assert!(page.len() <= limit as usize);
            seen.extend(page.iter().map(|m| m.seq));
            assert!(seen.len() <= want.len(), "{what}, limit {limit}: repeats");
            if page.len() < limit as usize {
                break;
            }
            before = page.last().map(|m| m.id.clone());
        }
        assert_eq!(seen, want, "{what}, limit {limit}");
    }
}

/// A peer chooses its messages' ids and ts: reusing our ids, its own, another peer's, with
/// equal, extreme and out-of-order timestamps. Whatever it sends, paging the conversation
/// with pages of every size yields every message once, newest first by `(ts, id)`; and
/// what was refused as a duplicate is an id the conversation already had.
#[test]
fn history_pages_hold_every_message_once_whatever_ids_and_ts_peers_choose() {
    for seed in 0..12u64 {
        let c = open(&tmp(&format!("history-prop-{seed}"))).unwrap();
        let mut rng = crate::session::Rng::new(seed);
        let mut g = IdGen::with_seed(seed);
        let tss = [
            i64::MIN,
            -1,
            0,
            1_800_000_000_000,
            1_800_000_000_001,
            i64::MAX - 1,
            i64::MAX,
        ];
        // Every id used so far, by anyone, to draw collisions from.
        let mut ids: Vec<String> = Vec::new();
        let mut accepted = 0usize;
        for step in 0..60 {
            let ts = tss[rng.range(0, tss.len() as u64 - 1) as usize];
            let who = ["kiosk-0043", "kiosk-0043", "kiosk-0043", "mallory", "me"]
                [rng.range(0, 4) as usize];
            let mut m = msg(
                &mut g,
                if who == "me" { "kiosk-0042" } else { who },
                if who == "me" {
                    "kiosk-0043"
                } else {
                    "kiosk-0042"
                },
                ts,
                &format!("{seed}/{step}"),
            );
            if !ids.is_empty() && rng.one_in(2) {
                m.id = ids[rng.range(0, ids.len() as u64 - 1) as usize].clone();
            }
            ids.push(m.id.clone());
            let peer = if who == "me" { &m.to } else { &m.from };
            let had = in_conversation(&c, "kiosk-0042", peer, &m.id).unwrap();
            if who == "me" {
                match enqueue(&c, "kiosk-0042", &m, CAP) {
                    Ok(_) => assert!(had.is_none()),
                    Err(StoreError::IdTaken { .. }) => assert!(had.is_some()),
                    Err(e) => panic!("{e}"),
                }
            } else {
                match receive(&c, "kiosk-0042", &m, CAP).unwrap() {
                    Received::New(_) => assert!(had.is_none(), "seed {seed}: a duplicate kept"),
                    Received::Duplicate => assert!(had.is_some(), "seed {seed}: a message lost"),
                }
            }
            accepted += usize::from(had.is_none() && peer == "kiosk-0043");
        }
        let want = history_order(&c, "kiosk-0042", "kiosk-0043");
        assert_eq!(want.len(), accepted, "seed {seed}");
        assert_pages(
            &c,
            "kiosk-0042",
            "kiosk-0043",
            &want,
            want.len() as u32 + 1,
            &format!("seed {seed}"),
        );
    }
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
    let peers: Vec<String> = conversations(&c, "bob", None, 100)
        .unwrap()
        .0
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

/// Conversations come a page at a time, newest first; every one at most once, those whose
/// messages were all evicted last, and the page's end is a position, not a peer: a
/// conversation that moves to the top meanwhile does not shift the pages after it (it is
/// above them, where the next read from the top finds it).
#[test]
fn conversations_come_in_pages_newest_first_each_once() {
    let c = open(&tmp("conv-pages")).unwrap();
    let mut g = IdGen::new();
    for i in 0..45 {
        let m = msg(
            &mut g,
            &format!("p{i:02}"),
            "bob",
            1_800_000_000_000 + i,
            "hi",
        );
        receive(&c, "bob", &m, CAP).unwrap();
    }
    // Two conversations whose messages are gone: last_seq 0, at the end, ordered by peer.
    c.execute_batch(
        "INSERT INTO conversations (owner, peer, last_seq, unread) VALUES
             ('bob', 'gone-a', 0, 0), ('bob', 'gone-b', 0, 0)",
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut before: Option<(i64, String)> = None;
    loop {
        let (page, more) = conversations(
            &c,
            "bob",
            before.as_ref().map(|(s, p)| (*s, p.as_str())),
            10,
        )
        .unwrap();
        assert!(page.len() <= 10);
        if seen.is_empty() {
            // A new message from an old conversation while the pages are read.
            let m = msg(&mut g, "p00", "bob", 1_800_000_001_000, "again");
            receive(&c, "bob", &m, CAP).unwrap();
        }
        seen.extend(page.iter().map(|c| c.peer.clone()));
        if !more {
            break;
        }
        let last = page.last().unwrap();
        before = Some((last.last_seq, last.peer.clone()));
    }
    // p00 moved to the top while the pages were read: not seen again down here.
    let mut want: Vec<String> = (1..45).rev().map(|i| format!("p{i:02}")).collect();
    want.extend(["gone-b".to_string(), "gone-a".to_string()]);
    assert_eq!(seen, want);
    assert!(
        conversations(&c, "bob", None, 100).unwrap().0[46]
            .last
            .is_none()
    );
    assert_eq!(conversations(&c, "bob", None, 100).unwrap().0.len(), 47);
    assert_eq!(
        conversations(&c, "bob", None, 100).unwrap().0[0].peer,
        "p00"
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
    let first = read_inbox(&c, "bob", None, 3).unwrap();
    assert_eq!(first.messages.len(), 3);
    assert_eq!(first.cursor, first.messages[2].seq);
    let rest = read_inbox(&c, "bob", Some(first.cursor), 10).unwrap();
    assert_eq!(rest.messages.len(), 2);
    let newest = rest.cursor;
    assert_eq!(inbox(&c, "bob").unwrap().acked, None, "no consumer yet");
    assert_eq!(
        ack_inbox(&c, "bob", first.cursor, "bob").unwrap(),
        first.cursor
    );
    assert_eq!(
        ack_inbox(&c, "bob", 1, "carol").unwrap(),
        first.cursor,
        "never backwards (and whoever is logged in)"
    );
    assert_eq!(
        inbox(&c, "bob").unwrap(),
        Inbox {
            acked: Some(first.cursor),
            newest,
            known: true
        }
    );
    // Without a cursor: from the acknowledged position.
    let next = read_inbox(&c, "bob", None, 10).unwrap();
    assert_eq!(next.messages, rest.messages);
    // Nothing new: the cursor stays where it was read from.
    assert_eq!(
        read_inbox(&c, "bob", Some(newest), 10).unwrap().cursor,
        newest
    );
    // A position from the future is refused (v1 took it and hid every later message).
    for e in [
        ack_inbox(&c, "bob", newest + 1, "bob").unwrap_err(),
        read_inbox(&c, "bob", Some(1_000_000), 10).unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::Cursor(_)), "{e}");
        assert!(e.to_string().contains("beyond bob's newest"), "{e}");
    }
    // An owner the store never saw: refused, unless it is the session's (an empty inbox
    // acknowledged at 0 declares a consumer).
    let e = ack_inbox(&c, "zed", 0, "bob").unwrap_err();
    assert!(e.to_string().contains("no inbox for zed"), "{e}");
    assert_eq!(ack_inbox(&c, "carol", 0, "carol").unwrap(), 0);
    assert_eq!(inbox(&c, "carol").unwrap().acked, Some(0));
    // Every later message is seen: the acknowledged position never passed the newest.
    receive(
        &c,
        "bob",
        &msg(&mut g, "alice", "bob", 1_800_000_000_100, "later"),
        CAP,
    )
    .unwrap();
    ack_inbox(&c, "bob", newest, "bob").unwrap();
    let later = read_inbox(&c, "bob", None, 10).unwrap();
    assert_eq!(later.messages.len(), 1);
    assert_eq!(later.messages[0].body, "later");
}

fn big() -> String {
    "x".repeat(8 * 1024)
}

fn receive_n(c: &Connection, g: &mut IdGen, owner: &str, from: &str, n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| {
            match receive(
                c,
                owner,
                &msg(g, from, owner, 1_800_000_000_000, &big()),
                1 << 30,
            )
            .unwrap()
            {
                Received::New(s) => s,
                Received::Duplicate => unreachable!("fresh ids"),
            }
        })
        .collect()
}

#[test]
fn eviction_takes_only_consumed_messages_and_a_full_store_refuses_sends() {
    let c = open(&tmp("evict")).unwrap();
    let mut g = IdGen::new();
    let cap = 256 * 1024;
    // Fill with queued (unsent) messages: they are never evicted.
    let mut queued = 0;
    let full = loop {
        match enqueue(
            &c,
            "alice",
            &msg(&mut g, "alice", "bob", 1_800_000_000_000, &big()),
            cap,
        ) {
            Ok(_) => queued += 1,
            Err(e) => break e,
        }
        assert!(queued < 1000, "the cap holds");
    };
    assert!(
        matches!(
            full,
            StoreError::Full {
                evicted: 0,
                incoming: false,
                ..
            }
        ),
        "{full}"
    );
    assert!(
        full.to_string().contains("nothing can be evicted"),
        "{full}"
    );
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
    let free: i64 = c
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    assert_eq!(free, 0, "what eviction freed went back to the file system");
}

/// docs/api.md promised "unacknowledged messages are never evicted", but v1 evicted
/// received messages that were marked read and never acknowledged through the inbox cursor.
/// For a user with an inbox consumer, only what it acknowledged is evictable; for a user
/// that never had one, being marked read is what consumes a message.
#[test]
fn eviction_never_takes_what_the_inbox_consumer_has_not_acknowledged() {
    let c = open(&tmp("evict-acked")).unwrap();
    let mut g = IdGen::new();
    let cap = 1 << 20;
    let seqs = receive_n(&c, &mut g, "bob", "alice", 20);
    ack_inbox(&c, "bob", seqs[9], "bob").unwrap();
    mark_read(&c, "bob", "alice").unwrap();
    // More arrive, up to the received share of the cap, then are refused.
    let mut refused = None;
    for i in 0..200 {
        match receive(
            &c,
            "bob",
            &msg(&mut g, "alice", "bob", 1_800_000_000_100 + i, &big()),
            cap,
        ) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("the store filled up");
    assert!(
        matches!(refused, StoreError::Full { incoming: true, .. }),
        "{refused}"
    );
    let after = read_inbox(&c, "bob", Some(seqs[9]), 100).unwrap().messages;
    assert_eq!(
        after.first().map(|m| m.seq),
        Some(seqs[10]),
        "nothing after the acknowledged position was evicted, read or not"
    );
    assert_eq!(
        read_inbox(&c, "bob", Some(0), 100).unwrap().messages[0].seq,
        seqs[10],
        "the 10 acknowledged ones were evicted"
    );

    // Carol never had a consumer: her read messages go, her unread ones stay.
    let c = open(&tmp("evict-read")).unwrap();
    let read = receive_n(&c, &mut g, "carol", "alice", 10);
    mark_read(&c, "carol", "alice").unwrap();
    let unread = receive_n(&c, &mut g, "carol", "dave", 10);
    let e = loop {
        if let Err(e) = receive(
            &c,
            "carol",
            &msg(&mut g, "dave", "carol", 1_800_000_000_200, &big()),
            cap,
        ) {
            break e;
        }
    };
    assert!(matches!(e, StoreError::Full { incoming: true, .. }), "{e}");
    let left: Vec<i64> = read_inbox(&c, "carol", Some(0), 100)
        .unwrap()
        .messages
        .iter()
        .map(|m| m.seq)
        .collect();
    assert!(read.iter().all(|s| !left.contains(s)), "read ones evicted");
    assert!(unread.iter().all(|s| left.contains(s)), "unread ones kept");
}

/// A flood of unread messages grew v1's store past its cap and then blocked every local
/// send with 6022. Received messages now fill at most their share of the cap and are then
/// refused (the broker keeps them); sends still have the rest.
#[test]
fn received_messages_fill_only_their_share_and_never_block_sends() {
    let c = open(&tmp("flood")).unwrap();
    let mut g = IdGen::new();
    let cap: u64 = 1 << 20;
    let mut taken = 0;
    let e = loop {
        match receive(
            &c,
            "bob",
            &msg(&mut g, "mallory", "bob", 1_800_000_000_000, &big()),
            cap,
        ) {
            Ok(_) => taken += 1,
            Err(e) => break e,
        }
        assert!(taken < 1000);
    };
    let used = used_bytes(&c).unwrap();
    assert!(
        used <= cap / 100 * RECEIVE_SHARE + 16 * 1024,
        "received messages stay within their share: {used} of {cap}"
    );
    assert!(
        matches!(
            e,
            StoreError::Full {
                incoming: true,
                evicted: 0,
                ..
            }
        ),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("nothing can be evicted") && text.contains("broker keeps it"),
        "{text}"
    );
    // Sends go on, into the headroom.
    for i in 0..5 {
        enqueue(
            &c,
            "bob",
            &msg(&mut g, "bob", "alice", 1_800_000_000_001 + i, &big()),
            cap,
        )
        .unwrap();
    }
    assert!(used_bytes(&c).unwrap() <= cap);
    // A redelivery of a stored message is still recognised when full (its PUBACK can go).
    let first = read_inbox(&c, "bob", Some(0), 1)
        .unwrap()
        .messages
        .remove(0);
    let again = WireMessage {
        id: first.id,
        from: "mallory".into(),
        to: "bob".into(),
        kind: Kind::Text,
        body: first.body,
        ts: first.ts,
    };
    assert_eq!(
        receive(&c, "bob", &again, cap).unwrap(),
        Received::Duplicate
    );
}

/// v1 did not count evicted unread messages out of the conversation's unread count.
#[test]
fn unread_counts_follow_eviction() {
    let c = open(&tmp("unread")).unwrap();
    let mut g = IdGen::new();
    let cap = 1 << 20;
    let seqs = receive_n(&c, &mut g, "bob", "alice", 60);
    // Consumed through the inbox, never marked read: evictable, still unread.
    ack_inbox(&c, "bob", seqs[59], "bob").unwrap();
    let mut received = 60;
    for i in 0..100 {
        if receive(
            &c,
            "bob",
            &msg(&mut g, "alice", "bob", 1_800_000_000_100 + i, &big()),
            cap,
        )
        .is_err()
        {
            break;
        }
        received += 1;
    }
    let rows: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM messages WHERE owner = 'bob' AND state = 3",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        rows < received,
        "some were evicted: {rows} of {received} left"
    );
    let conv = conversations(&c, "bob", None, 10).unwrap().0;
    assert_eq!(
        conv[0].unread as i64, rows,
        "the unread count is what is left"
    );
    assert_eq!(conv[0].last.as_ref().map(|m| m.seq), Some(conv[0].last_seq));
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

/// A version 1 file (as imlinkd 0.1 wrote it) with data in every table opens, migrates to
/// version 2 in one transaction, and keeps everything: seqs, states, codes, bodies, the
/// acknowledged positions, conversations; the sequence does not reuse evicted seqs; unread
/// counts v1 left wrong are recounted; a v1 cursor from the future is brought back.
#[test]
fn a_version_1_store_with_data_migrates_and_keeps_everything() {
    let path = tmp("v1");
    let mut g = IdGen::new();
    let ids: Vec<String> = (0..6).map(|i| g.next(1_800_000_000_000 + i)).collect();
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "auto_vacuum", "INCREMENTAL").unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        let rows = [
            // seq, owner, id (index), peer, dir, kind, body, state (ts and code follow)
            (1i64, "bob", 0, "alice", 0, "text", "hello bob", 3),
            (2, "bob", 1, "alice", 1, "text", "hello alice", 1),
            (3, "bob", 2, "carol", 0, "custom", "{\"k\":1}", 4),
            (5, "bob", 3, "carol", 1, "text", "refused", 2),
            (6, "alice", 4, "bob", 0, "text", "for alice", 3),
            (8, "bob", 5, "alice", 1, "text", "queued", 0),
        ];
        for (seq, owner, id, peer, dir, kind, body, state) in rows {
            c.execute(
                "INSERT INTO messages (seq, owner, id, peer, dir, kind, body, ts, state, code)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    seq,
                    owner,
                    ids[id],
                    peer,
                    dir,
                    kind,
                    body,
                    1_800_000_000_000 + seq,
                    state,
                    (state == 2).then_some(20_003)
                ],
            )
            .unwrap();
        }
        // Seqs up to 9 were given (9 and the others missing were evicted).
        c.execute(
            "UPDATE sqlite_sequence SET seq = 9 WHERE name = 'messages'",
            [],
        )
        .unwrap();
        c.execute_batch(
            "INSERT INTO conversations VALUES ('bob', 'alice', 8, 7), ('bob', 'carol', 5, 0),
                 ('alice', 'bob', 6, 1);
             INSERT INTO inbox_cursor VALUES ('bob', 1), ('alice', 1000000);",
        )
        .unwrap();
    }
    let before: Vec<Stored> = {
        let c = Connection::open(&path).unwrap();
        let mut st = c
            .prepare(
                "SELECT seq, id, peer, dir, kind, ts, state, code, body FROM messages ORDER BY seq",
            )
            .unwrap();
        st.query_map([], row_to_stored)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let c = open(&path).unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let free: i64 = c
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        free, 0,
        "the old table's pages went back to the file system"
    );
    let after: Vec<Stored> = c
        .prepare(&format!("SELECT {COLUMNS} FROM messages ORDER BY seq"))
        .unwrap()
        .query_map([], row_to_stored)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(after, before, "every message, as it was");
    assert_eq!(after[3].code, Some(20_003));
    // Conversations kept; bob's unread count with alice was 7 for one unread message.
    let conv = conversations(&c, "bob", None, 10).unwrap().0;
    assert_eq!(
        conv.iter()
            .map(|c| (c.peer.as_str(), c.unread, c.last_seq))
            .collect::<Vec<_>>(),
        [("alice", 1, 8), ("carol", 0, 5)]
    );
    // Inboxes: bob's consumer is where it was; alice's future cursor is brought back to
    // the last seq ever given, and later messages are seen.
    assert_eq!(
        inbox(&c, "bob").unwrap(),
        Inbox {
            acked: Some(1),
            newest: 3,
            known: true
        }
    );
    assert_eq!(inbox(&c, "alice").unwrap().acked, Some(9));
    let m = msg(&mut g, "bob", "alice", 1_800_000_001_000, "after the move");
    let Received::New(seq) = receive(&c, "alice", &m, CAP).unwrap() else {
        panic!("new")
    };
    assert_eq!(seq, 10, "evicted seqs are never given again");
    assert_eq!(
        read_inbox(&c, "alice", None, 10).unwrap().messages[0].seq,
        10
    );
    // The outbox, and v2's deduplication by sender.
    assert_eq!(outbox(&c, "bob").unwrap(), vec![(8, ids[5].clone())]);
    let mut other = msg(&mut g, "dave", "bob", 1, "same id, other sender");
    other.id = ids[0].clone();
    assert!(matches!(
        receive(&c, "bob", &other, CAP).unwrap(),
        Received::New(_)
    ));
    drop(c);
    // Opening again changes nothing.
    let c = open(&path).unwrap();
    assert_eq!(count(&c).unwrap(), 8);
}

/// A version 2 store in which a peer stored a message with one of our ids in its
/// conversation with us (v2 deduplicated per direction; the demo's repro: ts i64::MAX - 1,
/// and pages of 2 skipped messages) migrates to version 3: that received message is dropped
/// (a duplicate, as receiving it is now), ours and everything else kept, unread counts and
/// last messages follow; the page anchor is found by an index; history pages hold every
/// message once. Another peer's message with the same id stays.
#[test]
fn a_version_2_store_with_a_reused_id_migrates_and_pages_every_message_once() {
    let path = tmp("v2");
    let mut g = IdGen::new();
    let mut mine = Vec::new();
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "auto_vacuum", "INCREMENTAL").unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        v1_to_v2(&c).unwrap();
        for (i, body) in ["hello from", "hello back", "again"]
            .into_iter()
            .enumerate()
        {
            let (from, to) = if i == 1 {
                ("kiosk-0043", "kiosk-0042")
            } else {
                ("kiosk-0042", "kiosk-0043")
            };
            let m = msg(&mut g, from, to, 1_800_000_000_000 + i as i64, body);
            if i == 1 {
                receive(&c, "kiosk-0042", &m, CAP).unwrap();
            } else {
                enqueue(&c, "kiosk-0042", &m, CAP).unwrap();
                mine.push(m.id);
            }
        }
        // Unique in v2: one in, one out (v2 received it, as v2's receive did: inserted). The
        // peer's reuse of our first id, at the end.
        for (from, body) in [("kiosk-0043", "hidden"), ("mallory", "other peer")] {
            let mut m = msg(&mut g, from, "kiosk-0042", i64::MAX - 1, body);
            m.id = mine[0].clone();
            insert(&c, "kiosk-0042", &m, from, 0, 3, 1).unwrap();
        }
        assert_eq!(
            history(&c, "kiosk-0042", "kiosk-0043", None, 2)
                .unwrap()
                .iter()
                .map(|m| m.body.as_str())
                .collect::<Vec<_>>(),
            ["hidden", "again"]
        );
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
    }
    let c = open(&path).unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    let bodies = |peer: &str| -> Vec<String> {
        history(&c, "kiosk-0042", peer, None, 100)
            .unwrap()
            .into_iter()
            .map(|m| m.body)
            .collect()
    };
    assert_eq!(bodies("kiosk-0043"), ["again", "hello back", "hello from"]);
    assert_eq!(bodies("mallory"), ["other peer"]);
    let conv = conversations(&c, "kiosk-0042", None, 10).unwrap().0;
    let k43 = conv.iter().find(|c| c.peer == "kiosk-0043").unwrap();
    assert_eq!(k43.unread, 1, "the dropped message no longer counts");
    assert_eq!(k43.last.as_ref().map(|m| m.body.as_str()), Some("again"));
    let want = history_order(&c, "kiosk-0042", "kiosk-0043");
    assert_pages(&c, "kiosk-0042", "kiosk-0043", &want, 4, "migrated");
    // The anchor of a page, a message to settle or get by id: found by the index.
    let plan: String = c
        .prepare(
            "EXPLAIN QUERY PLAN SELECT ts, id FROM messages
             WHERE owner = ?1 AND id = ?2 AND peer = ?3",
        )
        .unwrap()
        .query_map(params!["kiosk-0042", mine[0], "kiosk-0043"], |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .join("; ");
    assert!(plan.contains("messages_by_id"), "{plan}");
    // From now on the reuse is a duplicate; our message is still ours to settle.
    let mut again = msg(&mut g, "kiosk-0043", "kiosk-0042", i64::MAX - 1, "hidden");
    again.id = mine[0].clone();
    assert_eq!(
        receive(&c, "kiosk-0042", &again, CAP).unwrap(),
        Received::Duplicate
    );
    assert!(settle(&c, "kiosk-0042", &mine[0], None).unwrap());
    drop(c);
    let c = open(&path).unwrap();
    assert_eq!(count(&c).unwrap(), 4, "opening again changes nothing");
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

/// Hold the store's write lock from another connection while `requests` are sent, so that
/// they all go into one batch once it is released; returns their answers' receivers.
async fn one_batch(h: &StoreHandle, path: &std::path::Path, requests: Vec<StoreRequest>) {
    let blocker = open(path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    // The thread takes this one alone and waits for the lock...
    let (tx, first) = oneshot::channel();
    h.send(StoreRequest::Stats { reply: tx }).unwrap();
    while h.waiting() > 0 {
        tokio::task::yield_now().await;
    }
    // ...while these queue up behind it.
    for r in requests {
        h.send(r).unwrap();
    }
    blocker.execute_batch("COMMIT").unwrap();
    first.await.unwrap().unwrap();
}

/// A read in a batch may see a write of the same batch; v1 answered reads at once, so when
/// the COMMIT then failed, an app had been shown a message that was never stored. A read
/// after a write of its batch is now answered after the COMMIT, and fails with it; a read
/// before any write saw only committed data and is answered as it was.
#[tokio::test(flavor = "current_thread")]
async fn reads_are_answered_after_the_commit_and_fail_with_it() {
    let path = tmp("commit-fails");
    {
        let c = open(&path).unwrap();
        // A real COMMIT failure: a deferred foreign key that a message with the body
        // 'poison' violates, which SQLite checks only at COMMIT.
        c.execute_batch(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);
             CREATE TRIGGER poison AFTER INSERT ON messages WHEN NEW.body = 'poison'
             BEGIN INSERT INTO child VALUES (42); END;",
        )
        .unwrap();
    }
    let (h, opened) = StoreHandle::open(path.clone(), CAP);
    opened.unwrap();
    let mut g = IdGen::new();
    let (before_tx, before) = oneshot::channel();
    let (sent_tx, sent) = oneshot::channel();
    let (seen_tx, seen) = oneshot::channel();
    let (inbox_tx, inbox_rx) = oneshot::channel();
    one_batch(
        &h,
        &path,
        vec![
            StoreRequest::History {
                owner: "alice".into(),
                peer: "bob".into(),
                before: None,
                limit: 10,
                reply: before_tx,
            },
            StoreRequest::Enqueue {
                owner: "alice".into(),
                msg: msg(&mut g, "alice", "bob", 1, "poison"),
                reply: sent_tx,
            },
            StoreRequest::History {
                owner: "alice".into(),
                peer: "bob".into(),
                before: None,
                limit: 10,
                reply: seen_tx,
            },
            StoreRequest::ReadInbox {
                owner: "alice".into(),
                after: None,
                limit: 10,
                reply: inbox_tx,
            },
        ],
    )
    .await;
    assert_eq!(
        before.await.unwrap(),
        Ok(vec![]),
        "before the write: committed data"
    );
    let sent = sent.await.unwrap();
    assert!(sent.is_err(), "the COMMIT failed: {sent:?}");
    let seen = seen.await.unwrap();
    let e = seen.expect_err("the read shared the failed batch");
    assert!(e.to_string().contains("could not commit"), "{e}");
    assert!(inbox_rx.await.unwrap().is_err());
    // Nothing was kept, and the next batch works.
    let h2 = h
        .ask(|reply| StoreRequest::History {
            owner: "alice".into(),
            peer: "bob".into(),
            before: None,
            limit: 10,
            reply,
        })
        .await
        .unwrap();
    assert!(h2.is_empty());
}

/// v1 ran only sends and receives in a savepoint: a `mark_read` whose second statement
/// failed left its first (messages marked read) in the batch, which then committed.
#[tokio::test(flavor = "current_thread")]
async fn a_request_that_fails_leaves_nothing_behind() {
    let path = tmp("half");
    {
        let c = open(&path).unwrap();
        receive(
            &c,
            "bob",
            &msg(&mut IdGen::new(), "alice", "bob", 1_800_000_000_000, "x"),
            CAP,
        )
        .unwrap();
        // The second statement of mark_read fails (an injected fault).
        c.execute_batch(
            "CREATE TRIGGER boom BEFORE UPDATE ON conversations
             BEGIN SELECT RAISE(ABORT, 'injected'); END",
        )
        .unwrap();
    }
    let (h, opened) = StoreHandle::open(path.clone(), CAP);
    opened.unwrap();
    let r = h
        .ask(|reply| StoreRequest::MarkRead {
            owner: "bob".into(),
            peer: "alice".into(),
            reply,
        })
        .await;
    assert!(r.is_err(), "{r:?}");
    let c = open(&path).unwrap();
    let m = read_inbox(&c, "bob", None, 10).unwrap().messages;
    assert_eq!(
        m[0].state,
        State::Unread,
        "nothing of the failed mark_read stayed"
    );
}

/// When eviction frees some space but not enough, v1 rolled the eviction back with the
/// refused send, and said nothing could be evicted. The eviction now stays done, and the
/// error says what it evicted.
#[tokio::test(flavor = "current_thread")]
async fn an_eviction_that_frees_too_little_stays_done_and_says_so() {
    let path = tmp("partial");
    let cap: u64 = 1 << 20;
    {
        let c = open(&path).unwrap();
        let mut g = IdGen::new();
        for i in 0..15 {
            let m = msg(&mut g, "bob", "alice", 1_800_000_000_000 + i, &big());
            enqueue(&c, "bob", &m, 1 << 30).unwrap();
            settle(&c, "bob", &m.id, None).unwrap();
        }
        // Unsent messages beyond the cap (as v1 could leave them).
        while used_bytes(&c).unwrap() < cap + 256 * 1024 {
            enqueue(
                &c,
                "bob",
                &msg(&mut g, "bob", "alice", 1_800_000_000_100, &big()),
                1 << 30,
            )
            .unwrap();
        }
    }
    let (h, opened) = StoreHandle::open(path.clone(), cap);
    opened.unwrap();
    let stats = || h.ask(|reply| StoreRequest::Stats { reply });
    let before = stats().await.unwrap().0;
    let e = h
        .ask(|reply| StoreRequest::Enqueue {
            owner: "bob".into(),
            msg: msg(&mut IdGen::new(), "bob", "alice", 1_800_000_001_000, "hi"),
            reply,
        })
        .await
        .unwrap_err();
    let after = stats().await.unwrap().0;
    assert_eq!(
        after,
        before - 15,
        "the 15 sent messages were evicted, and stay so"
    );
    assert!(matches!(e, StoreError::Full { evicted: 15, .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("evicting 15 consumed messages did not free enough")
            && !text.contains("nothing can be evicted"),
        "{text}"
    );
}

use tokio::sync::oneshot;

/// Received messages are committed in the order they arrived on their link: one refused for
/// room holds back the later ones (the app must not see message 2 before message 1), until
/// it goes in; another link starts afresh.
#[tokio::test]
async fn a_received_message_refused_for_room_holds_back_the_later_ones_of_its_link() {
    let path = tmp("held");
    let cap: u64 = 1 << 20;
    let (h, opened) = StoreHandle::open(path.clone(), cap);
    opened.unwrap();
    let mut g = IdGen::new();
    let receive = |m: WireMessage, order: Option<(u64, u64)>| {
        h.ask(move |reply| StoreRequest::Receive {
            owner: "bob".into(),
            msg: m,
            order,
            reply,
        })
    };
    // Fill bob's share of the store with received messages (link 1).
    let mut pos = 0;
    let mut last_seq = 0;
    let refused = loop {
        let m = msg(&mut g, "mallory", "bob", 1_800_000_000_000, &big());
        match receive(m.clone(), Some((1, pos))).await {
            Ok(Received::New(seq)) => {
                pos += 1;
                last_seq = seq;
            }
            Ok(Received::Duplicate) => unreachable!("every id is new"),
            Err(e) => break (m, e),
        }
        assert!(pos < 1000);
    };
    assert!(matches!(refused.1, StoreError::Full { incoming: true, .. }));
    let held_at = pos;
    // The consumer makes room: acknowledging everything so far.
    h.ask(|reply| StoreRequest::AckInbox {
        owner: "bob".into(),
        cursor: last_seq,
        session_user: "bob".into(),
        reply,
    })
    .await
    .unwrap();
    // A later message of that link is still refused: the held one goes first.
    let later = msg(&mut g, "mallory", "bob", 1_800_000_000_001, "later");
    let e = receive(later.clone(), Some((1, held_at + 1)))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Full { incoming: true, .. }), "{e}");
    // The held one goes in, then the later one.
    let first = receive(refused.0.clone(), Some((1, held_at))).await;
    assert!(first.is_ok(), "{first:?}");
    let second = receive(later, Some((1, held_at + 1))).await;
    assert!(second.is_ok(), "{second:?}");
}

/// Messages are private: the store and the -wal and -shm files SQLite makes beside it (they
/// hold message bodies until a checkpoint) are 0600 from the start, whatever the umask.
/// (The daemon made the file 0600 only after opening it in WAL mode: the first run's -wal and
/// -shm were 0644.)
#[test]
fn a_new_store_and_its_wal_are_private_from_the_start() {
    use std::os::unix::fs::PermissionsExt;
    let path = tmp("private");
    let m = msg(
        &mut IdGen::new(),
        "alice",
        "bob",
        1_800_000_000_000,
        "secret",
    );
    let c = open(&path).unwrap();
    enqueue(&c, "alice", &m, CAP).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let f = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} is {mode:o}");
    }
    drop(c);
    // A store an older imlinkd left open to others is made private when opened.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _c = open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
