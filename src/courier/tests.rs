use super::*;
use crate::message::{IdGen, Kind};

fn m(g: &mut IdGen, from: &str, to: &str) -> WireMessage {
    WireMessage {
        id: g.next(1_800_000_000_000),
        from: from.into(),
        to: to.into(),
        kind: Kind::Text,
        body: "hi".into(),
        ts: 1_800_000_000_000,
    }
}

fn drain(c: &mut Courier) -> Vec<Action> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

fn publishes(actions: &[Action]) -> Vec<Seq> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect()
}

/// A courier for alice with `n` queued messages to `to` loaded, link 1 up.
fn loaded(n: i64, to: &str) -> (Courier, Vec<WireMessage>) {
    let peers = vec![to.to_string(); n as usize];
    loaded_to(&peers)
}

/// A courier for alice with one queued message to each of `peers` (in that order) loaded,
/// link 1 up.
fn loaded_to(peers: &[String]) -> (Courier, Vec<WireMessage>) {
    let mut g = IdGen::with_seed(1);
    let mut c = Courier::new(0, 7);
    c.handle(0, Input::Account(Some("alice".into())));
    let token = match drain(&mut c).as_slice() {
        [
            Action::LoadOutbox {
                token, after: 0, ..
            },
        ] => *token,
        other => panic!("{other:?}"),
    };
    let msgs: Vec<WireMessage> = peers.iter().map(|to| m(&mut g, "alice", to)).collect();
    let page = msgs
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, m)| (i as Seq + 1, m))
        .collect();
    c.handle(
        0,
        Input::OutboxPage {
            token,
            page,
            complete: true,
        },
    );
    assert!(drain(&mut c).is_empty(), "no link: nothing is published");
    c.handle(0, Input::LinkUp(1));
    (c, msgs)
}

#[test]
fn the_outbox_goes_out_in_order_within_the_window_and_again_after_a_reconnect() {
    // Twenty peers, one message each: up to WINDOW in flight at once.
    let peers: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    let (mut c, _) = loaded_to(&peers);
    let first = publishes(&drain(&mut c));
    assert_eq!(first, (1..=WINDOW as Seq).collect::<Vec<_>>());
    c.handle(
        10,
        Input::PubAck {
            link: 1,
            seq: 1,
            code: 0,
        },
    );
    let a = drain(&mut c);
    assert!(matches!(
        &a[0],
        Action::Settle {
            seq: 1,
            outcome: Outcome::Sent,
            ..
        }
    ));
    assert_eq!(
        publishes(&a),
        vec![WINDOW as Seq + 1],
        "one answered, one more goes out"
    );
    // The link drops: what was in flight goes out again, oldest first, on the next link.
    c.handle(20, Input::LinkDown(1));
    assert!(publishes(&drain(&mut c)).is_empty());
    c.handle(30, Input::LinkUp(2));
    let again = drain(&mut c);
    assert_eq!(
        publishes(&again),
        (2..=WINDOW as Seq + 1).collect::<Vec<_>>()
    );
    assert!(
        again
            .iter()
            .all(|a| !matches!(a, Action::Publish { link: 1, .. }))
    );
    // A PUBACK from the old link means nothing any more.
    c.handle(
        40,
        Input::PubAck {
            link: 1,
            seq: 2,
            code: 0,
        },
    );
    assert!(drain(&mut c).is_empty());
}

#[test]
fn a_refusal_that_cannot_change_fails_the_message_once_and_it_is_never_sent_again() {
    let (mut c, msgs) = loaded(2, "mallory");
    assert_eq!(publishes(&drain(&mut c)), vec![1], "one in flight per peer");
    c.handle(
        10,
        Input::PubAck {
            link: 1,
            seq: 1,
            code: 0x87,
        },
    );
    let a = drain(&mut c);
    assert_eq!(
        a[0],
        Action::Settle {
            owner: "alice".into(),
            seq: 1,
            id: msgs[0].id.clone(),
            outcome: Outcome::Failed {
                code: codes::MSG_NOT_AUTHORIZED,
                reason: 0x87
            },
        }
    );
    assert_eq!(publishes(&a), vec![2], "the next one to that peer goes now");
    // The store could not record it: it is asked again, and the message is not published
    // again meanwhile.
    c.handle(
        11,
        Input::Settled {
            seq: 1,
            committed: false,
        },
    );
    c.handle(12, Input::LinkDown(1));
    c.handle(13, Input::LinkUp(2));
    assert_eq!(publishes(&drain(&mut c)), vec![2]);
    let retry = c.poll_timeout().expect("the settle is retried");
    c.handle_timeout(retry);
    assert!(matches!(
        drain(&mut c).as_slice(),
        [Action::Settle { seq: 1, .. }]
    ));
    // Recorded: `message_failed` goes out only after the commit.
    c.handle(
        retry,
        Input::PubAck {
            link: 2,
            seq: 2,
            code: 0x99,
        },
    );
    drain(&mut c);
    c.handle(
        retry,
        Input::Settled {
            seq: 2,
            committed: true,
        },
    );
    assert_eq!(
        drain(&mut c),
        vec![Action::Notify(MessageEvent::MessageFailed {
            id: msgs[1].id.clone(),
            to: "mallory".into(),
            code: codes::MSG_INVALID,
            reason: 0x99
        })]
    );
}

#[test]
fn one_message_in_flight_per_peer_so_a_refusal_for_now_cannot_be_overtaken() {
    // The courier's simulator found it (seed 3, step 3138): with several messages to one
    // peer in flight, a 0x97 on the first and a success on the next delivered them out of
    // order. Now the second goes only once the first is answered.
    let (mut c, _) = loaded_to(&["busy".into(), "busy".into(), "bob".into()]);
    assert_eq!(publishes(&drain(&mut c)), vec![1, 3]);
    c.handle(
        10,
        Input::PubAck {
            link: 1,
            seq: 1,
            code: 0x97,
        },
    );
    // Refused for now: busy is paused; its second message stays behind the first.
    assert!(publishes(&drain(&mut c)).is_empty());
    let resume = c.poll_timeout().expect("the pause ends");
    c.handle_timeout(resume);
    let a = drain(&mut c);
    // The outbox is read again; seq 1 goes first, alone.
    let token = a
        .iter()
        .find_map(|x| match x {
            Action::LoadOutbox { token, .. } => Some(*token),
            _ => None,
        })
        .expect("a reload");
    let mut g = IdGen::with_seed(9);
    c.handle(
        resume,
        Input::OutboxPage {
            token,
            page: vec![
                (1, m(&mut g, "alice", "busy")),
                (2, m(&mut g, "alice", "busy")),
            ],
            complete: true,
        },
    );
    assert_eq!(publishes(&drain(&mut c)), vec![1]);
}

#[test]
fn quota_exceeded_pauses_that_peer_only_and_its_messages_go_later_in_order() {
    let mut g = IdGen::with_seed(2);
    let mut c = Courier::new(0, 3);
    c.handle(0, Input::Account(Some("alice".into())));
    let Some(Action::LoadOutbox { token, .. }) = c.poll_action() else {
        panic!()
    };
    let page = vec![
        (1, m(&mut g, "alice", "busy")),
        (2, m(&mut g, "alice", "bob")),
        (3, m(&mut g, "alice", "busy")),
    ];
    c.handle(
        0,
        Input::OutboxPage {
            token,
            page,
            complete: true,
        },
    );
    c.handle(0, Input::LinkUp(1));
    // One in flight per peer: busy's second message waits behind its first.
    assert_eq!(publishes(&drain(&mut c)), vec![1, 2]);
    c.handle(
        5,
        Input::PubAck {
            link: 1,
            seq: 1,
            code: 0x97,
        },
    );
    let a = drain(&mut c);
    assert!(
        matches!(&a[..], [Action::LoadOutbox { skip, .. }] if skip == &["busy".to_string()]),
        "kept, not settled, not republished; the outbox is read on without busy: {a:?}"
    );
    assert!(c.paused_peers().contains("busy"));
    c.handle(
        6,
        Input::PubAck {
            link: 1,
            seq: 2,
            code: 0,
        },
    );
    assert!(matches!(
        drain(&mut c).as_slice(),
        [Action::Settle { seq: 2, .. }]
    ));
    let until = c.poll_timeout().expect("a pause ends");
    assert!((100..=PAUSE.base + 5).contains(&(until - 5)), "{until}");
    // The pause ends: the outbox is read again from the start, busy's messages in order.
    c.handle_timeout(until);
    let Some(Action::LoadOutbox {
        token,
        after: 0,
        skip,
        ..
    }) = c.poll_action()
    else {
        panic!()
    };
    assert!(skip.is_empty());
    let page = vec![
        (1, m(&mut g, "alice", "busy")),
        (3, m(&mut g, "alice", "busy")),
    ];
    c.handle(
        until,
        Input::OutboxPage {
            token,
            page,
            complete: true,
        },
    );
    assert_eq!(publishes(&drain(&mut c)), vec![1]);
    c.handle(
        until,
        Input::PubAck {
            link: 1,
            seq: 1,
            code: 0,
        },
    );
    assert_eq!(
        publishes(&drain(&mut c)),
        vec![3],
        "then the next, in order"
    );
}

#[test]
fn received_messages_are_acknowledged_after_their_commit_in_arrival_order() {
    let mut g = IdGen::with_seed(3);
    let mut c = Courier::new(0, 4);
    c.handle(0, Input::Account(Some("bob".into())));
    drain(&mut c);
    let (a, b) = (m(&mut g, "alice", "bob"), m(&mut g, "alice", "bob"));
    for (pkid, msg) in [
        (1, Ok(a.clone())),
        (2, Err("not JSON".into())),
        (3, Ok(b.clone())),
    ] {
        c.handle(
            0,
            Input::Received {
                link: 9,
                pkid: Some(pkid),
                owner: "bob".into(),
                msg,
            },
        );
    }
    let stores = drain(&mut c);
    assert_eq!(
        stores.len(),
        2,
        "the two messages go to the store; nothing is acknowledged"
    );
    // The third commits first: still nothing (the first holds the line).
    c.handle(
        1,
        Input::Stored {
            link: 9,
            pkid: Some(3),
            msg: b.clone(),
            result: Ok(Some(11)),
        },
    );
    let after_third = drain(&mut c);
    assert!(after_third.iter().all(|a| !matches!(a, Action::Ack { .. })));
    assert!(matches!(
        &after_third[..],
        [Action::Notify(MessageEvent::MessageReceived {
            seq: 11,
            ..
        })]
    ));
    // The first fails to commit: retried later, never acknowledged meanwhile.
    c.handle(
        2,
        Input::Stored {
            link: 9,
            pkid: Some(1),
            msg: a.clone(),
            result: Err(()),
        },
    );
    assert!(drain(&mut c).is_empty());
    let retry = c.poll_timeout().expect("a retry is planned");
    c.handle_timeout(retry);
    assert!(matches!(
        drain(&mut c).as_slice(),
        [Action::Store { pkid: Some(1), .. }]
    ));
    // A duplicate (already stored): acknowledged, no notification; then all three in order.
    c.handle(
        retry,
        Input::Stored {
            link: 9,
            pkid: Some(1),
            msg: a,
            result: Ok(None),
        },
    );
    assert_eq!(
        drain(&mut c),
        vec![
            Action::Ack { link: 9, pkid: 1 },
            Action::Ack { link: 9, pkid: 2 },
            Action::Ack { link: 9, pkid: 3 },
        ]
    );
}

#[test]
fn acknowledgements_never_cross_links() {
    let mut g = IdGen::with_seed(4);
    let mut c = Courier::new(0, 5);
    c.handle(0, Input::Account(Some("bob".into())));
    drain(&mut c);
    let a = m(&mut g, "alice", "bob");
    c.handle(
        0,
        Input::Received {
            link: 1,
            pkid: Some(5),
            owner: "bob".into(),
            msg: Ok(a.clone()),
        },
    );
    drain(&mut c);
    c.handle(1, Input::LinkDown(1));
    c.handle(
        2,
        Input::Stored {
            link: 1,
            pkid: Some(5),
            msg: a.clone(),
            result: Ok(Some(1)),
        },
    );
    let after = drain(&mut c);
    assert!(
        after.iter().all(|x| !matches!(x, Action::Ack { .. })),
        "{after:?}"
    );
    // Redelivered on the next link: stored again (a duplicate), acknowledged there.
    c.handle(
        3,
        Input::Received {
            link: 2,
            pkid: Some(1),
            owner: "bob".into(),
            msg: Ok(a.clone()),
        },
    );
    drain(&mut c);
    c.handle(
        4,
        Input::Stored {
            link: 2,
            pkid: Some(1),
            msg: a,
            result: Ok(None),
        },
    );
    assert_eq!(drain(&mut c), vec![Action::Ack { link: 2, pkid: 1 }]);
}

#[test]
fn an_account_switch_sends_each_users_outbox_as_that_user() {
    let (mut c, _) = loaded(3, "bob");
    assert_eq!(publishes(&drain(&mut c)).len(), 1, "one in flight per peer");
    c.handle(1, Input::LinkDown(1));
    c.handle(2, Input::Account(Some("carol".into())));
    let a = drain(&mut c);
    assert!(matches!(&a[..], [Action::LoadOutbox { owner, after: 0, .. }] if owner == "carol"));
    // A PUBACK for alice's message on a link of carol's means nothing.
    c.handle(3, Input::LinkUp(2));
    c.handle(
        4,
        Input::PubAck {
            link: 2,
            seq: 1,
            code: 0,
        },
    );
    assert!(
        drain(&mut c)
            .iter()
            .all(|a| !matches!(a, Action::Settle { .. }))
    );
}

#[test]
fn the_simulator_finds_no_violation_over_many_seeds() {
    let mut total = sim::Stats::default();
    for seed in 0..400 {
        let s = sim::run(seed, 3_000).unwrap_or_else(|v| panic!("{v}"));
        total.steps += s.steps;
        total.publishes += s.publishes;
        total.sent += s.sent;
        total.failed += s.failed;
        total.received += s.received;
        total.crashes += s.crashes;
    }
    // The runs exercise what they claim to.
    assert!(
        total.sent > 10_000 && total.failed > 1_000 && total.received > 10_000,
        "{total:?}"
    );
    assert!(total.crashes > 20, "{total:?}");
}

/// Replays one seed (`IMLINK_COURIER_SEED`, with `IMLINK_SIM_TRACE=1` for every step).
#[test]
fn replay_one_seed() {
    let Some(seed) = std::env::var("IMLINK_COURIER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    else {
        return;
    };
    if let Err(v) = sim::run(seed, 3_000) {
        panic!("{v}");
    }
}

#[test]
fn received_messages_waiting_for_room_are_retried_at_once_when_room_is_made() {
    let mut g = IdGen::with_seed(5);
    let mut c = Courier::new(0, 3);
    let m1 = m(&mut g, "bob", "alice");
    c.handle(
        0,
        Input::Received {
            link: 1,
            pkid: Some(1),
            owner: "alice".into(),
            msg: Ok(m1.clone()),
        },
    );
    let a = drain(&mut c);
    assert!(
        matches!(&a[..], [Action::Store { order: Some(0), .. }]),
        "{a:?}"
    );
    // The store is full: no PUBACK, a retry later.
    c.handle(
        1,
        Input::Stored {
            link: 1,
            pkid: Some(1),
            msg: m1.clone(),
            result: Err(()),
        },
    );
    assert!(drain(&mut c).is_empty());
    assert!(c.poll_timeout().is_some_and(|t| t > 1));
    // An app consumed messages: tried again now, not at the end of the backoff.
    c.handle(2, Input::StoreRoom);
    let a = drain(&mut c);
    assert!(
        matches!(
            &a[..],
            [Action::Store {
                pkid: Some(1),
                order: Some(0),
                ..
            }]
        ),
        "{a:?}"
    );
    c.handle(
        3,
        Input::Stored {
            link: 1,
            pkid: Some(1),
            msg: m1,
            result: Ok(Some(7)),
        },
    );
    let a = drain(&mut c);
    assert!(a.contains(&Action::Ack { link: 1, pkid: 1 }), "{a:?}");
}

#[test]
fn received_messages_waiting_for_a_retry_are_retried_together_in_arrival_order() {
    // Two messages whose commits failed wait with their own backoffs: when the first retry
    // is due, both go to the store, the earlier first (alone, the later one could be
    // committed before the earlier one: the engine's simulator found it).
    let mut g = IdGen::with_seed(9);
    let mut c = Courier::new(0, 11);
    let msgs = [m(&mut g, "bob", "alice"), m(&mut g, "bob", "alice")];
    for (i, msg) in msgs.iter().enumerate() {
        c.handle(
            0,
            Input::Received {
                link: 1,
                pkid: Some(i as u16 + 1),
                owner: "alice".into(),
                msg: Ok(msg.clone()),
            },
        );
    }
    assert_eq!(drain(&mut c).len(), 2);
    for (i, msg) in msgs.iter().enumerate() {
        c.handle(
            1,
            Input::Stored {
                link: 1,
                pkid: Some(i as u16 + 1),
                msg: msg.clone(),
                result: Err(()),
            },
        );
    }
    assert!(drain(&mut c).is_empty());
    let first = c.poll_timeout().expect("a retry is due");
    c.handle_timeout(first);
    let stores: Vec<(Option<u16>, Option<u64>)> = drain(&mut c)
        .into_iter()
        .filter_map(|a| match a {
            Action::Store { pkid, order, .. } => Some((pkid, order)),
            _ => None,
        })
        .collect();
    assert_eq!(stores, vec![(Some(1), Some(0)), (Some(2), Some(1))]);
}

#[test]
fn a_message_arriving_while_an_earlier_one_waits_for_a_retry_waits_with_it() {
    let mut g = IdGen::with_seed(13);
    let mut c = Courier::new(0, 17);
    let (m1, m2) = (m(&mut g, "bob", "alice"), m(&mut g, "bob", "alice"));
    let received = |pkid: u16, msg: &WireMessage| Input::Received {
        link: 1,
        pkid: Some(pkid),
        owner: "alice".into(),
        msg: Ok(msg.clone()),
    };
    c.handle(0, received(1, &m1));
    assert_eq!(drain(&mut c).len(), 1);
    c.handle(
        1,
        Input::Stored {
            link: 1,
            pkid: Some(1),
            msg: m1.clone(),
            result: Err(()),
        },
    );
    // The second one arrives while the first waits: not sent to the store before it.
    c.handle(2, received(2, &m2));
    assert!(drain(&mut c).is_empty());
    let due = c.poll_timeout().expect("a retry is due");
    c.handle_timeout(due);
    let ids: Vec<String> = drain(&mut c)
        .into_iter()
        .filter_map(|a| match a {
            Action::Store { msg, .. } => Some(msg.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![m1.id, m2.id]);
}

#[test]
fn a_retry_waits_for_the_store_answers_still_outstanding() {
    // An earlier message failed while a later one's request was still with the store: the
    // retry of the earlier one must not go ahead of that answer (the later one, refused
    // behind it, would then be retried after newer messages were committed — the engine's
    // simulator found exactly that); it goes when the answer is in, with the later one.
    let mut g = IdGen::with_seed(21);
    let mut c = Courier::new(0, 23);
    let (m1, m2) = (m(&mut g, "bob", "alice"), m(&mut g, "bob", "alice"));
    for (pkid, msg) in [(1, &m1), (2, &m2)] {
        c.handle(
            0,
            Input::Received {
                link: 1,
                pkid: Some(pkid),
                owner: "alice".into(),
                msg: Ok(msg.clone()),
            },
        );
    }
    assert_eq!(drain(&mut c).len(), 2);
    c.handle(
        1,
        Input::Stored {
            link: 1,
            pkid: Some(1),
            msg: m1.clone(),
            result: Err(()),
        },
    );
    assert!(drain(&mut c).is_empty());
    // The second one's answer is outstanding: no retry timer, nothing at a later time.
    assert_eq!(c.poll_timeout(), None);
    c.handle_timeout(60_000);
    assert!(drain(&mut c).is_empty());
    // Its answer (refused behind the first): both go again, in arrival order.
    c.handle(
        60_001,
        Input::Stored {
            link: 1,
            pkid: Some(2),
            msg: m2.clone(),
            result: Err(()),
        },
    );
    let mut a = drain(&mut c);
    if a.is_empty() {
        let due = c.poll_timeout().expect("a retry is due");
        c.handle_timeout(due);
        a = drain(&mut c);
    }
    let ids: Vec<String> = a
        .into_iter()
        .filter_map(|x| match x {
            Action::Store { msg, .. } => Some(msg.id),
            _ => None,
        })
        .collect();
    assert_eq!(ids, vec![m1.id, m2.id]);
}
