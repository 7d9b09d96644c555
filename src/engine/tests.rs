//! The engine on a fake clock: what joins the session and the courier — links, packet ids,
//! topics, the send gate, the outbox owner, what arrives on the inbox.

use super::*;
use crate::session::{Phase, Policy};

const WALL0: i64 = 2_000_000_000;

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

struct H {
    e: Engine,
    now: Now,
    out: Vec<Action>,
}

impl H {
    fn new() -> H {
        H::with_status(false)
    }

    fn with_status(publish_status: bool) -> H {
        let now = Now {
            mono: 1_000,
            wall: WALL0,
        };
        let m = Machine::new(Policy::default(), user("alice"), now, 3);
        let device = Device {
            platform: "linux".into(),
            instance: "k.1".into(),
            version: "9.9.9".into(),
            nodes: vec!["mqtts://n0:8883".into()],
            publish_status,
        };
        let e = Engine::new(
            m,
            Courier::new(now.mono, 4),
            Topics { sdk_app_id: 7 },
            device,
            now,
        );
        H {
            e,
            now,
            out: Vec::new(),
        }
    }

    fn input(&mut self, i: Input) -> Vec<Action> {
        self.e.handle(self.now, i);
        let out = self.drain();
        self.out.extend(out.clone());
        out
    }

    /// The actions, with the store's answer to every `Counts` question fed back at once
    /// (outbox 1, inbox 2): what the device status document asks before it goes out.
    fn drain(&mut self) -> Vec<Action> {
        let mut out: Vec<Action> = Vec::new();
        loop {
            let batch: Vec<Action> = std::iter::from_fn(|| self.e.poll_action()).collect();
            if batch.is_empty() {
                return out;
            }
            for a in &batch {
                if let Action::Store(StoreOp::Counts { owner }) = a {
                    self.e.handle(
                        self.now,
                        Input::Store(StoreAnswer::Counts {
                            owner: owner.clone(),
                            counts: Some(crate::store::Counts {
                                outbox_pending: 1,
                                inbox_unacked: 2,
                            }),
                        }),
                    );
                }
            }
            out.extend(batch);
        }
    }

    fn advance(&mut self, ms: u64) -> Vec<Action> {
        let end = self.now.mono + ms;
        let mut out = Vec::new();
        while let Some(t) = self.e.poll_timeout().filter(|t| *t <= end) {
            let t = t.max(self.now.mono);
            self.now.wall += ((t - self.now.mono) / 1000) as i64;
            self.now.mono = t;
            self.e.handle_timeout(self.now);
            let batch = self.drain();
            out.extend(batch);
        }
        self.now.wall += ((end - self.now.mono) / 1000) as i64;
        self.now.mono = end;
        self.out.extend(out.clone());
        out
    }

    fn sig(&self, lifetime_s: i64) -> SigInfo {
        SigInfo {
            fingerprint: format!("fp{}", self.now.mono),
            user_id: self.e.machine().user().clone(),
            issued_at: Some(self.now.wall),
            expires_at: Some(self.now.wall + lifetime_s),
            server_now: self.now.wall,
            received_at: self.now.mono,
            wall_anchored: false,
        }
    }

    fn link_ev(&mut self, link: LinkId, event: LinkEvent) -> Vec<Action> {
        self.input(Input::Link { link, event })
    }

    /// Start, fetch, connect: the link that is up (CONNACKed, inbox granted if `grant`).
    fn online(&mut self, grant: bool) -> LinkId {
        self.input(Input::Start);
        let s = self.sig(86_400);
        let a = self.input(Input::SigFetched(s));
        let link = connect_of(&a).expect("a Connect");
        let a = self.link_ev(
            link,
            LinkEvent::ConnAck {
                session_present: false,
            },
        );
        assert!(
            a.iter().any(|x| *x
                == Action::Subscribe {
                    link,
                    filter: "im/7/u/alice/#".into()
                }),
            "{a:?}"
        );
        if grant {
            self.link_ev(link, LinkEvent::SubAck { granted: true });
            assert_eq!(self.e.machine().phase(), Phase::Online);
        }
        // The outbox is empty.
        let loads: Vec<u64> = self
            .out
            .iter()
            .filter_map(|x| match x {
                Action::Store(StoreOp::LoadOutbox { token, .. }) => Some(*token),
                _ => None,
            })
            .collect();
        for token in loads {
            self.input(Input::Store(StoreAnswer::OutboxPage {
                token,
                page: Vec::new(),
                complete: true,
            }));
        }
        link
    }
}

fn connect_of(a: &[Action]) -> Option<LinkId> {
    a.iter().find_map(|x| match x {
        Action::Connect { link, .. } => Some(*link),
        _ => None,
    })
}

fn msg(id: &str, from: &str, to: &str) -> WireMessage {
    WireMessage {
        id: id.into(),
        from: from.into(),
        to: to.into(),
        kind: Kind::Text,
        body: "hi".into(),
        ts: 1,
    }
}

const ID1: &str = "01JAAAAAAAAAAAAAAAAAAAAAAA";
const ID2: &str = "01JAAAAAAAAAAAAAAAAAAAAAAB";

fn receive_ops(a: &[Action]) -> Vec<(Option<u16>, String)> {
    a.iter()
        .filter_map(|x| match x {
            Action::Store(StoreOp::Receive { pkid, msg, .. }) => Some((*pkid, msg.id.clone())),
            _ => None,
        })
        .collect()
}

fn acks(a: &[Action]) -> Vec<u16> {
    a.iter()
        .filter_map(|x| match x {
            Action::Ack { pkid, .. } => Some(*pkid),
            _ => None,
        })
        .collect()
}

#[test]
fn the_phase_is_subscribing_until_the_broker_grants_the_inbox_and_a_refusal_is_retried() {
    let mut h = H::new();
    let link = h.online(false);
    assert_eq!(h.e.machine().phase(), Phase::Subscribing);
    assert!(!h.e.snapshot().session.inbox_subscribed);
    // A cluster electing its leader refuses the SUBSCRIBE: still subscribing, retried later.
    let a = h.link_ev(link, LinkEvent::SubAck { granted: false });
    assert!(!a.iter().any(|x| matches!(x, Action::Subscribe { .. })));
    assert_eq!(h.e.machine().phase(), Phase::Subscribing);
    let next =
        h.e.snapshot()
            .session
            .next_subscribe_ms
            .expect("a retry is armed");
    assert!(next > h.now.mono && next <= h.now.mono + session::SUBSCRIBE_RETRY.base);
    let a = h.advance(next - h.now.mono);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Subscribe { link: l, .. } if *l == link))
    );
    h.link_ev(link, LinkEvent::SubAck { granted: true });
    assert_eq!(h.e.machine().phase(), Phase::Online);
    assert!(h.e.snapshot().session.inbox_subscribed);
}

#[test]
fn a_subscribe_left_unanswered_is_sent_again() {
    let mut h = H::new();
    let link = h.online(false);
    // No SUBACK within the connect timeout: counted as refused, sent again after the backoff.
    let a = h.advance(Policy::default().connect_timeout + session::SUBSCRIBE_RETRY.base);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Subscribe { link: l, .. } if *l == link))
    );
    assert_eq!(h.e.machine().phase(), Phase::Subscribing);
    assert_eq!(h.e.snapshot().session.counters.subscribe_refusals, 1);
}

#[test]
fn messages_go_to_the_peers_inbox_with_the_sender_in_the_topic() {
    let mut h = H::new();
    let link = h.online(true);
    let draft = Draft {
        id: ID1.into(),
        to: user("bob"),
        kind: Kind::Text,
        body: "hi".into(),
        ts: 5,
    };
    let a = h.input(Input::Send {
        id: 9,
        draft: Ok(draft),
    });
    // Whose message it is comes from the machine (alice), never from the API.
    let Some(Action::Store(StoreOp::Enqueue { owner, msg, .. })) = a.first().cloned() else {
        panic!("{a:?}")
    };
    assert_eq!((owner.as_str(), msg.from.as_str()), ("alice", "alice"));
    let a = h.input(Input::Store(StoreAnswer::Enqueued {
        req: 9,
        owner,
        msg: msg.clone(),
        result: Ok(1),
    }));
    assert!(a.contains(&Action::SendReply {
        id: 9,
        result: Ok(Queued {
            id: ID1.into(),
            seq: 1,
            to: "bob".into()
        })
    }));
    let topic = a.iter().find_map(|x| match x {
        Action::Publish { topic, link: l, .. } if *l == link => Some(topic.clone()),
        _ => None,
    });
    assert_eq!(topic.as_deref(), Some("im/7/u/bob/in/alice"));
    // rumqttc numbers it, the broker acknowledges it: settled as sent.
    h.link_ev(link, LinkEvent::OutPublish(42));
    let a = h.link_ev(link, LinkEvent::PubAck { pkid: 42, code: 0 });
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Store(StoreOp::Settle {
            seq: 1,
            outcome: courier::Outcome::Sent,
            ..
        })
    )));
}

#[test]
fn the_send_gate_is_the_machines_login_status_and_comes_before_the_params() {
    let mut h = H::new();
    // Logged out (login_on_start would log in; this one never started): 6014, even for a
    // request the API could not read.
    let a = h.input(Input::Send {
        id: 1,
        draft: Err(Refusal {
            code: -32602,
            message: "body is required".into(),
        }),
    });
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::SendReply { id: 1, result: Err(r) } if r.code == i64::from(codes::NOT_LOGGED_IN)
        )),
        "{a:?}"
    );
    // While a login is under way, sends are queued; bad params are answered as they came.
    h.input(Input::Start);
    let a = h.input(Input::Send {
        id: 2,
        draft: Err(Refusal {
            code: -32602,
            message: "body is required".into(),
        }),
    });
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::SendReply { id: 2, result: Err(r) } if r.code == -32602
        )),
        "{a:?}"
    );
}

#[test]
fn a_message_whose_sender_is_not_the_topics_is_acknowledged_and_dropped() {
    let mut h = H::new();
    let link = h.online(true);
    let forged = msg(ID1, "alice-boss", "alice");
    let a = h.link_ev(
        link,
        LinkEvent::Publish {
            topic: b"im/7/u/alice/in/mallory".to_vec(),
            pkid: Some(3),
            payload: forged.encode().unwrap(),
        },
    );
    assert!(receive_ops(&a).is_empty(), "never stored: {a:?}");
    assert_eq!(
        acks(&a),
        [3],
        "acknowledged in its turn, so it is not redelivered"
    );
    assert_eq!(h.e.snapshot().messages.dropped_forged, 1);
    // The real one from mallory goes in.
    let ok = msg(ID2, "mallory", "alice");
    let a = h.link_ev(
        link,
        LinkEvent::Publish {
            topic: b"im/7/u/alice/in/mallory".to_vec(),
            pkid: Some(4),
            payload: ok.encode().unwrap(),
        },
    );
    assert_eq!(receive_ops(&a), [(Some(4), ID2.to_string())]);
    assert!(acks(&a).is_empty(), "acknowledged only after its commit");
}

#[test]
fn an_oversized_publish_is_acknowledged_in_its_turn_and_the_connection_kept() {
    let mut h = H::new();
    let link = h.online(true);
    let ok = msg(ID1, "bob", "alice");
    h.link_ev(
        link,
        LinkEvent::Publish {
            topic: b"im/7/u/alice/in/bob".to_vec(),
            pkid: Some(1),
            payload: ok.encode().unwrap(),
        },
    );
    let a = h.link_ev(
        link,
        LinkEvent::Oversized {
            topic: b"im/7/u/alice/in/bob".to_vec(),
            pkid: Some(2),
            bytes: 300_000,
        },
    );
    // Not before the message ahead of it is committed (PUBACKs go in arrival order).
    assert!(acks(&a).is_empty());
    let a = h.input(Input::Store(StoreAnswer::Received {
        link,
        pkid: Some(1),
        msg: ok,
        result: Ok(Some(10)),
    }));
    assert_eq!(acks(&a), [1, 2]);
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Disconnect { .. } | Action::Abandon { .. }))
    );
    assert_eq!(h.e.snapshot().messages.dropped_oversized, 1);
    assert_eq!(h.e.machine().phase(), Phase::Online);
}

#[test]
fn events_of_a_link_the_engine_let_go_of_are_ignored() {
    let mut h = H::new();
    let link = h.online(true);
    h.link_ev(
        link,
        LinkEvent::Ended(ConnEnd::Network {
            kind: session::NetKind::Closed,
            detail: "reset".into(),
        }),
    );
    assert_eq!(h.e.link(), None);
    let before = h.e.snapshot();
    let a = h.link_ev(
        link,
        LinkEvent::Publish {
            topic: b"im/7/u/alice/in/bob".to_vec(),
            pkid: Some(1),
            payload: msg(ID1, "bob", "alice").encode().unwrap(),
        },
    );
    assert!(a.is_empty(), "{a:?}");
    let a = h.link_ev(
        link,
        LinkEvent::ConnAck {
            session_present: true,
        },
    );
    assert!(a.is_empty(), "a stale CONNACK is not a login: {a:?}");
    assert_eq!(h.e.snapshot(), before);
}

#[test]
fn the_end_of_a_link_being_closed_is_the_machines_disconnected() {
    let mut h = H::new();
    let link = h.online(true);
    let a = h.input(Input::Logout { id: 5 });
    assert!(a.contains(&Action::Disconnect { link }));
    assert_eq!(h.e.machine().phase(), Phase::LoggingOut);
    // However it ends (here: the broker closed its side), it was our own DISCONNECT.
    let a = h.link_ev(
        link,
        LinkEvent::Ended(ConnEnd::Network {
            kind: session::NetKind::Closed,
            detail: "closed".into(),
        }),
    );
    assert!(a.contains(&Action::Reply {
        id: 5,
        result: Ok(())
    }));
    assert_eq!(h.e.machine().phase(), Phase::Idle);
    assert!(
        h.e.machine().snapshot().last_error.is_none(),
        "not a failure"
    );
}

#[test]
fn a_publish_the_client_would_not_take_is_published_again_later() {
    let mut h = H::new();
    let link = h.online(true);
    h.input(Input::Send {
        id: 1,
        draft: Ok(Draft {
            id: ID1.into(),
            to: user("bob"),
            kind: Kind::Text,
            body: "x".into(),
            ts: 1,
        }),
    });
    let a = h.input(Input::Store(StoreAnswer::Enqueued {
        req: 1,
        owner: "alice".into(),
        msg: WireMessage {
            from: "alice".into(),
            ..msg(ID1, "alice", "bob")
        },
        result: Ok(1),
    }));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Publish {
            what: Out::Message(1),
            ..
        }
    )));
    h.link_ev(link, LinkEvent::NotTaken(Out::Message(1)));
    let a = h.advance(courier::HOLD);
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Publish {
                what: Out::Message(1),
                ..
            }
        )),
        "{a:?}"
    );
}

#[test]
fn a_brought_sig_is_checked_against_whom_the_machine_logs_in_as() {
    let mut h = H::new();
    // alice's session; an app brings a sig that says it is bob's, with no user_id: refused.
    let a = h.input(Input::Login {
        id: 1,
        user: None,
        sig: Some(BroughtSig {
            fingerprint: "b".into(),
            user: Some(user("bob")),
            issued_at: Some(WALL0),
            expires_at: Some(WALL0 + 600),
        }),
    });
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Reply { id: 1, result: Err(e) } if e.code == codes::SVR_SIG_MISMATCH_ID
        )),
        "{a:?}"
    );
    // An opaque sig (no user in it) is taken as the target user's.
    let a = h.input(Input::Login {
        id: 2,
        user: None,
        sig: Some(BroughtSig {
            fingerprint: "o".into(),
            user: None,
            issued_at: None,
            expires_at: None,
        }),
    });
    assert!(a.iter().any(|x| matches!(x, Action::Connect { fingerprint, user: u, .. } if fingerprint == "o" && u.as_str() == "alice")), "{a:?}");
}

#[test]
fn the_courier_serves_whom_the_session_logs_in_as_across_an_account_switch() {
    let mut h = H::new();
    h.online(true);
    assert_eq!(h.e.courier().owner(), Some("alice"));
    h.input(Input::Login {
        id: 1,
        user: Some(user("bob")),
        sig: None,
    });
    assert_eq!(
        h.e.courier().owner(),
        Some("bob"),
        "switched with the machine, at once"
    );
}

// --- the device status on the broker -------------------------------------------------------

fn status_publishes(a: &[Action]) -> Vec<serde_json::Value> {
    a.iter()
        .filter_map(|x| match x {
            Action::Publish {
                what: Out::Status,
                topic,
                payload,
                retain: true,
                ..
            } => {
                assert_eq!(topic, "im/7/d/alice/linux/k_1/status");
                Some(serde_json::from_slice(payload).unwrap())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn every_connect_carries_a_retained_will_that_says_offline() {
    let mut h = H::with_status(true);
    h.input(Input::Start);
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    let will = a.iter().find_map(|x| match x {
        Action::Connect { will, .. } => will.clone(),
        _ => None,
    });
    let will = will.expect("a will");
    assert_eq!(will.topic, "im/7/d/alice/linux/k_1/status");
    let doc: serde_json::Value = serde_json::from_slice(&will.payload).unwrap();
    assert_eq!(doc["v"], 1);
    assert_eq!(doc["state"], "offline");
    assert_eq!(doc["reason"], "connection lost");
    assert_eq!(doc["phase"], serde_json::Value::Null);
    assert_eq!(doc["version"], "9.9.9");
    assert_eq!(doc["since"], WALL0);
}

#[test]
fn the_status_is_published_once_the_inbox_is_answered_and_again_only_on_change() {
    let mut h = H::with_status(true);
    let link = h.online(false);
    assert!(status_publishes(&h.out).is_empty(), "not before the SUBACK");
    let a = h.link_ev(link, LinkEvent::SubAck { granted: true });
    let docs = status_publishes(&a);
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0]["state"], "online");
    assert_eq!(docs[0]["phase"], "online");
    assert_eq!(docs[0]["broker"], "mqtts://n0:8883");
    assert_eq!(docs[0]["user_sig"]["renewal"], "ok");
    assert_eq!(
        (&docs[0]["outbox_pending"], &docs[0]["inbox_unacked"]),
        (&serde_json::json!(1), &serde_json::json!(2)),
        "the store's counts, asked for before the document"
    );
    // Nothing changed: nothing published (no periodic status).
    let a = h.advance(60_000);
    assert!(status_publishes(&a).is_empty());
    // A change while one is in flight waits for its PUBACK; then the latest goes.
    h.link_ev(link, LinkEvent::OutPublish(7));
    let mut a = Vec::new();
    while !a.iter().any(|x| matches!(x, Action::FetchSig { .. })) {
        let next = h.e.poll_timeout().expect("the refresh is armed");
        a.extend(h.advance(next - h.now.mono));
    }
    assert!(status_publishes(&a).is_empty(), "one in flight at a time");
    let a = h.link_ev(link, LinkEvent::PubAck { pkid: 7, code: 0 });
    let docs = status_publishes(&a);
    assert_eq!(docs.len(), 1, "{a:?}");
    assert_eq!(docs[0]["user_sig"]["renewal"], "renewing");
    // The refresh fails: renewal failing, with the count an alert can watch.
    h.link_ev(link, LinkEvent::OutPublish(8));
    h.link_ev(link, LinkEvent::PubAck { pkid: 8, code: 0 });
    let a = h.input(Input::SigFetchFailed(session::FetchFailure::new(
        session::ErrorClass::Busy,
        codes::NET_DISCONNECT,
        "x",
    )));
    let docs = status_publishes(&a);
    assert_eq!(docs[0]["user_sig"]["renewal"], "failing");
    assert_eq!(docs[0]["user_sig"]["failures"], 1);
    assert_eq!(docs[0]["last_error"]["class"], "busy");
}

#[test]
fn the_status_is_not_published_again_for_the_second_the_two_clocks_drift_apart() {
    // The wall clock counts whole seconds, the boot clock milliseconds, out of phase: `since`
    // computed afresh at each event moved by a second back and forth, and each move
    // republished the retained status (most status publishes in the engine's simulator).
    let mut h = H::with_status(true);
    let link = h.online(false);
    let a = h.link_ev(link, LinkEvent::SubAck { granted: true });
    let first = status_publishes(&a);
    assert_eq!(first.len(), 1);
    h.link_ev(link, LinkEvent::OutPublish(1));
    h.link_ev(link, LinkEvent::PubAck { pkid: 1, code: 0 });
    // 1.5 s later on the boot clock, the wall clock has ticked twice (0.9 s → 2.4 s): a
    // message arrives (any event re-examines the status).
    h.now.mono += 1_500;
    h.now.wall += 2;
    let a = h.link_ev(
        link,
        LinkEvent::Publish {
            topic: b"im/7/u/alice/in/bob".to_vec(),
            pkid: None,
            payload: b"{not a message".to_vec(),
        },
    );
    assert!(status_publishes(&a).is_empty(), "{a:?}");
    // A wall clock set right (a time sync) moves `since`: published again.
    h.now.wall += 3_600;
    let a = h.advance(10);
    let a = if status_publishes(&a).is_empty() {
        h.link_ev(link, LinkEvent::OutDisconnect)
    } else {
        a
    };
    let docs = status_publishes(&a);
    assert_eq!(docs.len(), 1, "{a:?}");
    assert_eq!(
        docs[0]["since"],
        first[0]["since"].as_i64().unwrap() + 3_601
    );
}

#[test]
fn a_logout_and_a_stop_say_so_before_the_disconnect_and_a_rotation_says_nothing() {
    for (input, state) in [
        (Input::Logout { id: 1 }, "logged_out"),
        (Input::Shutdown, "stopped"),
    ] {
        let mut h = H::with_status(true);
        let link = h.online(true);
        let a = h.input(input);
        let publish = a
            .iter()
            .position(|x| {
                matches!(
                    x,
                    Action::Publish {
                        what: Out::Status,
                        ..
                    }
                )
            })
            .expect("a status");
        let disconnect = a
            .iter()
            .position(|x| *x == Action::Disconnect { link })
            .expect("a DISCONNECT");
        assert!(publish < disconnect);
        assert_eq!(status_publishes(&a)[0]["state"], state);
    }
    // A planned reconnect onto a new UserSig: the device is back at once; no status.
    let mut h = H::with_status(true);
    let link = h.online(true);
    let mut s = h.sig(86_400);
    s.fingerprint = "newer".into();
    // A fetched sig that is newer moves the session (the refresh is not due: force it by
    // handing it in as a login with a brought sig for the same user).
    let a = h.input(Input::Login {
        id: 3,
        user: None,
        sig: Some(BroughtSig {
            fingerprint: s.fingerprint,
            user: None,
            issued_at: s.issued_at,
            expires_at: s.expires_at,
        }),
    });
    assert!(a.contains(&Action::Disconnect { link }), "{a:?}");
    assert!(status_publishes(&a).is_empty());
}

#[test]
fn a_status_the_broker_refuses_is_not_sent_again_on_that_connection() {
    let mut h = H::with_status(true);
    let link = h.online(true);
    h.link_ev(link, LinkEvent::OutPublish(1));
    h.link_ev(
        link,
        LinkEvent::PubAck {
            pkid: 1,
            code: 0x87,
        },
    );
    let a = h.input(Input::SigFetchFailed(session::FetchFailure::new(
        session::ErrorClass::Busy,
        codes::NET_DISCONNECT,
        "x",
    )));
    assert!(status_publishes(&a).is_empty());
    let a = h.input(Input::Logout { id: 1 });
    assert!(status_publishes(&a).is_empty(), "not even the logout's");
}

#[test]
fn a_broker_that_refuses_the_will_gets_connects_without_it_at_no_budgets_cost() {
    let mut h = H::with_status(true);
    h.input(Input::Start);
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    let link = connect_of(&a).unwrap();
    // ejabberd with an ACL that does not know the status topic.
    h.link_ev(
        link,
        LinkEvent::Ended(ConnEnd::Refused {
            code: 0x90,
            reason: Some("Publishing to this will topic is forbidden by service policy".into()),
            im_code: None,
        }),
    );
    let snap = h.e.snapshot().session;
    assert_eq!(
        snap.last_error.as_ref().map(|e| e.class),
        Some(session::ErrorClass::Network)
    );
    let mut a = Vec::new();
    while connect_of(&a).is_none() {
        let next = h.e.poll_timeout().expect("a retry");
        a.extend(h.advance(next - h.now.mono));
    }
    let will = a.iter().find_map(|x| match x {
        Action::Connect { will, .. } => Some(will.clone()),
        _ => None,
    });
    assert_eq!(will, Some(None), "no will any more");
    let link = connect_of(&a).unwrap();
    h.link_ev(
        link,
        LinkEvent::ConnAck {
            session_present: false,
        },
    );
    let a = h.link_ev(link, LinkEvent::SubAck { granted: true });
    assert!(status_publishes(&a).is_empty(), "and no status");
    assert_eq!(h.e.machine().phase(), Phase::Online);
}

/// Log in (again) on the link the engine asks for next, within `wait`: CONNACK and the inbox
/// granted. The device status goes out at once (the engine publishes it on every login).
fn relogin(h: &mut H, wait: u64) -> LinkId {
    let end = h.now.mono + wait;
    let link = loop {
        let t = h.e.poll_timeout().expect("a timer while reconnecting");
        assert!(t <= end, "no Connect within {wait} ms");
        let a = h.advance(t.saturating_sub(h.now.mono));
        if let Some(link) = connect_of(&a) {
            break link;
        }
    };
    let a = h.link_ev(
        link,
        LinkEvent::ConnAck {
            session_present: true,
        },
    );
    let a2 = h.link_ev(link, LinkEvent::SubAck { granted: true });
    assert!(
        a.iter()
            .chain(&a2)
            .any(|x| matches!(x, Action::Publish { .. })),
        "the status document goes out after the login: {a:?} {a2:?}"
    );
    assert_eq!(h.e.machine().phase(), Phase::Online);
    link
}

/// Three closes 5 s after each login, each with the device status (a QoS 1 publish)
/// unanswered all along: nats-server closing connections whose publishes JetStream cannot
/// store during the elections after a node loss. Never a suspected takeover: the device keeps
/// trying (the same three closes with the publish answered are one: the next test).
#[test]
fn closes_with_a_publish_unanswered_for_seconds_are_never_a_suspected_takeover() {
    let mut h = H::with_status(true);
    for round in 0..5 {
        let l = if round == 0 {
            h.online(true)
        } else {
            relogin(&mut h, 400_000)
        };
        h.advance(5_000);
        h.link_ev(
            l,
            LinkEvent::Ended(ConnEnd::Network {
                kind: session::NetKind::Closed,
                detail: "connection closed".into(),
            }),
        );
        let snap = h.e.snapshot().session;
        assert_ne!(snap.phase, Phase::Kicked, "round {round}: {snap:?}");
        let e = snap.last_error.expect("the close is the last error");
        assert_eq!(e.class, session::ErrorClass::Network);
        assert!(
            e.message.contains("unanswered for 5s"),
            "the message says why: {}",
            e.message
        );
    }
}

#[test]
fn closes_soon_after_login_with_every_publish_answered_are_a_suspected_takeover() {
    let mut h = H::with_status(true);
    for round in 0..3 {
        let l = if round == 0 {
            h.online(true)
        } else {
            relogin(&mut h, 400_000)
        };
        // The broker answers the status (its packet id, then its PUBACK).
        h.link_ev(l, LinkEvent::OutPublish(1));
        h.link_ev(l, LinkEvent::PubAck { pkid: 1, code: 0 });
        h.advance(5_000);
        h.link_ev(
            l,
            LinkEvent::Ended(ConnEnd::Network {
                kind: session::NetKind::Closed,
                detail: "connection closed".into(),
            }),
        );
        let phase = h.e.snapshot().session.phase;
        if round < 2 {
            assert_ne!(phase, Phase::Kicked, "round {round}");
        } else {
            assert_eq!(phase, Phase::Kicked, "the third early close");
        }
    }
}

#[test]
fn a_retained_publish_is_acknowledged_in_its_turn_and_never_stored() {
    let mut h = H::new();
    let link = h.online(true);
    let ok = msg(ID1, "bob", "alice");
    h.link_ev(
        link,
        LinkEvent::Publish {
            topic: b"im/7/u/alice/in/bob".to_vec(),
            pkid: Some(1),
            payload: ok.encode().unwrap(),
        },
    );
    let a = h.link_ev(
        link,
        LinkEvent::Retained {
            topic: b"im/7/u/alice/in/mallory".to_vec(),
            pkid: Some(2),
        },
    );
    assert!(receive_ops(&a).is_empty(), "never stored: {a:?}");
    assert!(acks(&a).is_empty(), "not before the message ahead of it");
    let a = h.input(Input::Store(StoreAnswer::Received {
        link,
        pkid: Some(1),
        msg: ok,
        result: Ok(Some(10)),
    }));
    assert_eq!(acks(&a), [1, 2]);
    assert_eq!(h.e.snapshot().messages.dropped_invalid, 1);
    assert_eq!(h.e.machine().phase(), Phase::Online);
}

#[test]
fn an_operators_login_during_a_connect_earns_a_fresh_sig_if_that_connect_is_refused() {
    // The engine's simulator: a CONNECT under way, the operator's `login` answered 7501 (a
    // login in progress), then the broker refused the sig (0x86) after the one fresh retry
    // was already used: the engine stopped, and the operator's login got nothing moving.
    let mut h = H::new();
    let refused = || {
        LinkEvent::Ended(ConnEnd::Refused {
            code: 0x86,
            reason: Some("70009 signature mismatch".into()),
            im_code: Some(70009),
        })
    };
    h.input(Input::Start);
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    let link = connect_of(&a).expect("a Connect");
    // Refused: the one fresh UserSig.
    let a = h.link_ev(link, refused());
    assert!(
        a.iter().any(|x| matches!(x, Action::FetchSig { .. })),
        "{a:?}"
    );
    h.now.mono += 100;
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    let link = connect_of(&a).expect("a Connect with the fresh sig");
    // The operator logs in while that CONNECT is under way.
    let a = h.input(Input::Login {
        id: 9,
        user: None,
        sig: None,
    });
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Reply { id: 9, result: Err(e) } if e.code == codes::LOGIN_IN_PROCESS
        )),
        "{a:?}"
    );
    // The fresh sig is refused too: a person asked, so one more fresh sig, not a stop.
    let a = h.link_ev(link, refused());
    assert!(
        a.iter().any(|x| matches!(x, Action::FetchSig { .. })),
        "{a:?}"
    );
    assert_ne!(h.e.machine().phase(), Phase::Stopped);
}
