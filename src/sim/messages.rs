//! The messaging half of the simulated world: the broker's side of messages (peers that
//! publish to the device's users — in order, sometimes forged, malformed, oversized or QoS 0,
//! sometimes in floods — persistent sessions that redeliver what was not acknowledged, PUBACK
//! codes per peer: accepted, "quota exceeded" for a while, refused for good, retained status
//! documents and wills) and the device's disk (a model of the message store that commits in
//! request order, deduplicates on (owner, sender, id), sometimes fails a commit and sometimes
//! is full), and the app's sends.
//!
//! It answers the engine's messaging actions with inputs at later instants and keeps the
//! ground truth the invariants are judged against (`check`): what each peer published and the
//! broker accepted, what the device's apps sent and were told, what the store committed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::courier::{LinkId, MessageEvent, Outcome, Seq};
use crate::engine::{Action, Draft, Input, LinkEvent, Out, StoreAnswer, StoreFailure, StoreOp};
use crate::identity::UserId;
use crate::message::{IdGen, Kind, WireMessage};
use crate::session::{Millis, Rng};

/// The broker gives a client at most this many unacknowledged QoS 1 messages (the daemon's
/// receive maximum).
pub const RECEIVE_MAX: usize = 32;

/// Peers of the device's users, and how the broker treats messages to them.
pub const PEERS: [&str; 4] = ["bob", "carol", "busy", "mallory"];

/// A message a peer published to a device user, as the broker holds it.
#[derive(Debug, Clone)]
struct Pub {
    topic: String,
    payload: Vec<u8>,
    qos1: bool,
    /// Over the size limit: the relay passes it on as a stub (`LinkEvent::Oversized`).
    oversized: bool,
    /// The real message, when it is one the device must keep: (sender, id).
    key: Option<(String, String)>,
}

/// One device user's session at the broker (persistent: it outlives connections).
#[derive(Debug, Default)]
struct Session {
    queue: VecDeque<Pub>,
    /// Delivered on the current link, unacknowledged, in order: (pkid, message).
    unacked: VecDeque<(u16, Pub)>,
    next_pkid: u16,
}

/// A message of the device's outbox the broker was given (waiting for its PUBACK).
#[derive(Debug, Clone)]
struct Outgoing {
    link: LinkId,
    pkid: u16,
    what: Out,
    msg: Option<WireMessage>,
    due: Millis,
}

/// A received message the model store holds.
#[derive(Debug, Clone)]
struct Kept {
    seq: Seq,
}

/// A sent message the model store holds.
#[derive(Debug, Clone)]
struct Queued {
    owner: String,
    msg: WireMessage,
    state: Outcome2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome2 {
    Queued,
    Sent,
    Failed,
}

/// The link the broker has with the device, as the broker sees it.
#[derive(Debug, Clone)]
struct BrokerLink {
    id: LinkId,
    user: String,
    subscribed: bool,
    next_out_pkid: u16,
}

#[derive(Debug, Default, Clone)]
pub struct MsgStats {
    pub peer_messages: u64,
    pub device_sends: u64,
    pub delivered: u64,
    pub accepted: u64,
    pub store_failures: u64,
}

pub struct Messages {
    rng: Rng,
    ids: IdGen,
    pub t: Millis,
    // --- the device's disk
    next_seq: Seq,
    received: BTreeMap<(String, String, String), Kept>,
    sent: BTreeMap<Seq, Queued>,
    /// Store answers, in request order, each due at an instant.
    answers: VecDeque<(Millis, StoreAnswer)>,
    /// The store fails commits (a full disk, I/O errors) until then.
    failing_until: Millis,
    /// The store is full for received messages until then.
    full_until: Millis,
    // --- the broker
    link: Option<BrokerLink>,
    sessions: BTreeMap<String, Session>,
    outgoing: VecDeque<Outgoing>,
    /// Inputs due now that the broker or the client produced at once (OutPublish).
    immediate: VecDeque<Input>,
    /// `busy` answers 0x97 until then.
    busy_until: Millis,
    /// Peers publish more often until then.
    flood_until: Millis,
    /// Peers publish until then (nothing after: what was sent must arrive).
    pub peers_stop_at: Millis,
    next_peer_at: Millis,
    /// Retained documents (the device status), by topic.
    pub retained: BTreeMap<String, Vec<u8>>,
    /// Wills of the connection up now: (topic, payload).
    will: Option<(String, Vec<u8>)>,
    // --- the truth the invariants judge by
    /// Per (device user, peer): the ids the broker accepted from the peer, in order.
    pub published: BTreeMap<(String, String), Vec<String>>,
    /// Per (device user, peer): the ids the store committed as new, in order.
    pub committed_in: BTreeMap<(String, String), Vec<String>>,
    /// Per (device user, peer): the ids of the device's messages the broker accepted first,
    /// with their store order.
    pub accepted_out: BTreeMap<(String, String), Vec<(Seq, String)>>,
    accepted_ids: BTreeSet<String>,
    /// Sends the API was told are queued: id → (owner, peer).
    pub queued: BTreeMap<String, (String, String)>,
    /// Sends refused for good (PUBACK 0x87 from mallory): they must never be published again.
    pub refused: BTreeSet<String>,
    /// Sends answered (Ok or Err), by request id, and the send requests still unanswered.
    pub send_requests: BTreeMap<u64, Millis>,
    /// Notifications for received messages, per (owner, sender, id): how many.
    pub notified: BTreeMap<(String, String, String), u32>,
    pub stats: MsgStats,
    /// Violations found while acting (checked by the runner after each step).
    pub violations: Vec<(&'static str, String)>,
    /// Published on a link the engine has not CONNACKed, or after a lasting refusal, etc.
    next_req: u64,
}

fn key_of(owner: &str, m: &WireMessage) -> (String, String, String) {
    (owner.to_string(), m.from.clone(), m.id.clone())
}

impl Messages {
    pub fn new(mut rng: Rng, t: Millis) -> Messages {
        let ids = IdGen::with_seed(rng.next_u64());
        Messages {
            rng,
            ids,
            t,
            next_seq: 1,
            received: BTreeMap::new(),
            sent: BTreeMap::new(),
            answers: VecDeque::new(),
            failing_until: 0,
            full_until: 0,
            link: None,
            sessions: BTreeMap::new(),
            outgoing: VecDeque::new(),
            immediate: VecDeque::new(),
            busy_until: 0,
            flood_until: 0,
            peers_stop_at: Millis::MAX,
            next_peer_at: t + 5_000,
            retained: BTreeMap::new(),
            will: None,
            published: BTreeMap::new(),
            committed_in: BTreeMap::new(),
            accepted_out: BTreeMap::new(),
            accepted_ids: BTreeSet::new(),
            queued: BTreeMap::new(),
            refused: BTreeSet::new(),
            send_requests: BTreeMap::new(),
            notified: BTreeMap::new(),
            stats: MsgStats::default(),
            violations: Vec::new(),
            next_req: 1_000_000,
        }
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        self.violations.push((invariant, detail));
    }

    // --- faults the schedule turns on ----------------------------------------------------

    pub fn store_failing(&mut self, until: Millis) {
        self.failing_until = self.failing_until.max(until);
    }

    pub fn store_full(&mut self, until: Millis) {
        self.full_until = self.full_until.max(until);
    }

    pub fn busy(&mut self, until: Millis) {
        self.busy_until = self.busy_until.max(until);
    }

    pub fn flood(&mut self, until: Millis) {
        self.flood_until = self.flood_until.max(until);
    }

    /// A healthy world: the store works, nobody is busy or flooding.
    pub fn make_healthy(&mut self) {
        self.failing_until = 0;
        self.full_until = 0;
        self.busy_until = 0;
        self.flood_until = 0;
    }

    // --- the device's connection, as the login world reports it ---------------------------

    /// The connection `link` (as `user`) has its CONNACK.
    pub fn link_up(&mut self, link: LinkId, user: &UserId, will: Option<(String, Vec<u8>)>) {
        self.link = Some(BrokerLink {
            id: link,
            user: user.to_string(),
            subscribed: false,
            next_out_pkid: 1,
        });
        self.will = will;
    }

    /// The broker granted the inbox subscription on the link up now.
    pub fn subscribed(&mut self) {
        if let Some(l) = self.link.as_mut() {
            l.subscribed = true;
        }
    }

    /// The connection is over; `clean`: our DISCONNECT (no will). Unacknowledged messages go
    /// back to the session's queue (redelivered on the next connection); a PUBLISH of ours
    /// without its PUBACK may or may not have been taken.
    pub fn link_down(&mut self, clean: bool) {
        let Some(l) = self.link.take() else { return };
        if let Some(s) = self.sessions.get_mut(&l.user) {
            while let Some((_, p)) = s.unacked.pop_back() {
                s.queue.push_front(p);
            }
        }
        let lost: Vec<Outgoing> = std::mem::take(&mut self.outgoing)
            .into_iter()
            .filter(|o| o.link == l.id)
            .collect();
        for o in lost {
            if self.rng.one_in(2) {
                // The broker took it; its PUBACK was lost with the connection.
                self.accept(&o, 0x00);
            }
        }
        if !clean && let Some((topic, payload)) = self.will.take() {
            self.retained.insert(topic, payload);
        }
        self.will = None;
    }

    // --- the engine's actions ----------------------------------------------------------

    /// Carry out a messaging action of the engine. Returns whether it was one.
    pub fn act(&mut self, a: &Action) -> bool {
        match a {
            Action::Publish {
                link,
                what,
                topic,
                payload,
                retain,
            } => {
                self.publish(*link, *what, topic, payload, *retain);
                true
            }
            Action::Ack { link, pkid } => {
                self.ack(*link, *pkid);
                true
            }
            Action::Store(op) => {
                self.store(op.clone());
                true
            }
            Action::SendReply { id, result } => {
                if self.send_requests.remove(id).is_none() {
                    self.violate("api: answers", format!("a send reply to {id}, not asked"));
                }
                if let Ok(q) = result
                    && !self.sent.values().any(|s| s.msg.id == q.id)
                {
                    self.violate(
                        "messages: commit before answer",
                        format!("send {} answered queued but not committed", q.id),
                    );
                }
                true
            }
            Action::Notify(e) => {
                self.notify(e);
                true
            }
            _ => false,
        }
    }

    fn publish(&mut self, link: LinkId, what: Out, topic: &str, payload: &[u8], retain: bool) {
        let Some(l) = self.link.as_mut().filter(|l| l.id == link) else {
            // The driver has no such connection: the client would not take it.
            self.immediate.push_back(Input::Link {
                link,
                event: LinkEvent::NotTaken(what),
            });
            return;
        };
        let pkid = l.next_out_pkid;
        l.next_out_pkid = l.next_out_pkid.wrapping_add(1).max(1);
        let user = l.user.clone();
        self.immediate.push_back(Input::Link {
            link,
            event: LinkEvent::OutPublish(pkid),
        });
        let msg = match what {
            Out::Status => {
                if !retain || !topic.contains("/d/") || !topic.ends_with("/status") {
                    self.violate(
                        "messages: status",
                        format!("a status PUBLISH on {topic:?} (retain {retain})"),
                    );
                }
                None
            }
            Out::Message(seq) => {
                let m: Option<WireMessage> = serde_json::from_slice(payload).ok();
                let Some(m) = m else {
                    self.violate("messages: publish", format!("seq {seq}: not a message"));
                    return;
                };
                let want = format!("/u/{}/in/{}", m.to, m.from);
                if !topic.ends_with(&want) || m.from != user {
                    self.violate(
                        "messages: publish",
                        format!("{} from {} on {topic:?} while logged in as {user}", m.id, m.from),
                    );
                }
                match self.sent.get(&seq) {
                    Some(q) if q.msg.id == m.id && q.owner == user => {
                        if q.state != Outcome2::Queued {
                            self.violate(
                                "messages: publish",
                                format!("{} published again after its outcome was recorded", m.id),
                            );
                        }
                    }
                    _ => self.violate(
                        "messages: publish",
                        format!("seq {seq} ({}) is not a queued message of {user}", m.id),
                    ),
                }
                if self.refused.contains(&m.id) {
                    self.violate(
                        "messages: publish",
                        format!("{} published again after a lasting refusal", m.id),
                    );
                }
                Some(m)
            }
        };
        let due = self.t + self.rng.range(1, 300);
        self.outgoing.push_back(Outgoing {
            link,
            pkid,
            what,
            msg,
            due,
        });
        if let Out::Status = what {
            // Retained at once (the broker processes it in order with what follows).
            self.retained.insert(topic.to_string(), payload.to_vec());
        }
    }

    /// The broker's verdict on a message of the device's outbox.
    fn verdict(&mut self, m: &WireMessage) -> u8 {
        match m.to.as_str() {
            "mallory" => 0x87,
            "busy" if self.t < self.busy_until => 0x97,
            _ => 0x00,
        }
    }

    fn accept(&mut self, o: &Outgoing, code: u8) {
        let Some(m) = o.msg.as_ref() else { return };
        if code == 0x87 {
            self.refused.insert(m.id.clone());
        }
        if code != 0x00 || !self.accepted_ids.insert(m.id.clone()) {
            return;
        }
        self.stats.accepted += 1;
        let seq = self
            .sent
            .iter()
            .find(|(_, q)| q.msg.id == m.id)
            .map(|(s, _)| *s)
            .unwrap_or(0);
        let list = self
            .accepted_out
            .entry((m.from.clone(), m.to.clone()))
            .or_default();
        if list.last().is_some_and(|(last, _)| *last > seq) {
            let last = list.last().map(|x| x.0).unwrap_or(0);
            self.violations.push((
                "messages: per-peer order",
                format!(
                    "{} (seq {seq}) to {} accepted after seq {last}",
                    m.id, m.to
                ),
            ));
        }
        list.push((seq, m.id.clone()));
    }

    fn ack(&mut self, link: LinkId, pkid: u16) {
        let Some(l) = self.link.as_ref() else {
            return self.violate(
                "messages: ack",
                format!("PUBACK {pkid} on link {link} with no connection"),
            );
        };
        if l.id != link {
            return self.violate(
                "messages: ack",
                format!("PUBACK {pkid} for link {link} on link {}", l.id),
            );
        }
        let user = l.user.clone();
        let Some(s) = self.sessions.get_mut(&user) else {
            return self.violate("messages: ack", format!("PUBACK {pkid}: nothing delivered"));
        };
        match s.unacked.front() {
            Some((p, _)) if *p == pkid => {}
            other => {
                let first = other.map(|x| x.0);
                return self.violate(
                    "messages: ack",
                    format!("PUBACK {pkid} out of order (the oldest unacknowledged is {first:?})"),
                );
            }
        }
        let Some((_, p)) = s.unacked.pop_front() else {
            return;
        };
        // Acknowledged: it must be committed (or be one that can never be stored).
        if let Some((from, id)) = p.key {
            let k = (user.clone(), from, id.clone());
            if !self.received.contains_key(&k) {
                self.violate(
                    "messages: ack",
                    format!("{id} acknowledged before it was committed"),
                );
            }
        }
        self.stats.delivered += 1;
    }

    fn notify(&mut self, e: &MessageEvent) {
        match e {
            MessageEvent::MessageReceived { id, from, .. } => {
                let owner = self.link.as_ref().map(|l| l.user.clone());
                // Whose: the message's `to` is not in the event; find the commit.
                let k = self
                    .received
                    .keys()
                    .find(|(o, f, i)| f == from && i == id && owner.as_deref().is_none_or(|x| x == o))
                    .cloned();
                match k {
                    Some(k) => {
                        let n = self.notified.entry(k).or_default();
                        *n += 1;
                        if *n > 1 {
                            self.violations.push((
                                "messages: once",
                                format!("{id} from {from} notified twice"),
                            ));
                        }
                    }
                    None => self.violate(
                        "messages: notify",
                        format!("message_received for {id} before its commit"),
                    ),
                }
            }
            MessageEvent::MessageSent { id, .. } | MessageEvent::MessageFailed { id, .. } => {
                let st = self.sent.values().find(|q| q.msg.id == *id).map(|q| q.state);
                if !matches!(st, Some(Outcome2::Sent | Outcome2::Failed)) {
                    self.violate(
                        "messages: notify",
                        format!("the outcome of {id} told before its commit"),
                    );
                }
            }
        }
    }

    // --- the store model ---------------------------------------------------------------

    fn store(&mut self, op: StoreOp) {
        let fails = self.t < self.failing_until && self.rng.one_in(3);
        if fails {
            self.stats.store_failures += 1;
        }
        let failure = |full: bool| StoreFailure {
            full,
            message: if full { "full" } else { "failed" }.into(),
        };
        let answer = match op {
            StoreOp::Enqueue { req, owner, msg } => {
                let result = if fails {
                    Err(failure(false))
                } else {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.sent.insert(
                        seq,
                        Queued {
                            owner: owner.clone(),
                            msg: msg.clone(),
                            state: Outcome2::Queued,
                        },
                    );
                    self.queued
                        .insert(msg.id.clone(), (owner.clone(), msg.to.clone()));
                    Ok(seq)
                };
                StoreAnswer::Enqueued {
                    req,
                    owner,
                    msg,
                    result,
                }
            }
            StoreOp::Receive {
                link,
                pkid,
                owner,
                msg,
                order: _,
            } => {
                let k = key_of(&owner, &msg);
                let result = if fails {
                    Err(failure(false))
                } else if self.received.contains_key(&k) {
                    Ok(None)
                } else if self.t < self.full_until {
                    Err(failure(true))
                } else {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.received.insert(k, Kept { seq });
                    let list = self
                        .committed_in
                        .entry((owner.clone(), msg.from.clone()))
                        .or_default();
                    list.push(msg.id.clone());
                    Ok(Some(seq))
                };
                StoreAnswer::Received {
                    link,
                    pkid,
                    msg,
                    result,
                }
            }
            StoreOp::LoadOutbox {
                token,
                owner,
                after,
                limit,
                skip,
            } => {
                if fails {
                    StoreAnswer::OutboxFailed { token }
                } else {
                    let mut page: Vec<(Seq, WireMessage)> = self
                        .sent
                        .iter()
                        .filter(|(s, q)| {
                            **s > after
                                && q.owner == owner
                                && q.state == Outcome2::Queued
                                && !skip.contains(&q.msg.to)
                        })
                        .map(|(s, q)| (*s, q.msg.clone()))
                        .take(limit as usize + 1)
                        .collect();
                    let complete = page.len() <= limit as usize;
                    page.truncate(limit as usize);
                    StoreAnswer::OutboxPage {
                        token,
                        page,
                        complete,
                    }
                }
            }
            StoreOp::Settle {
                owner,
                seq,
                id,
                outcome,
            } => {
                let committed = !fails;
                if committed {
                    match self.sent.get_mut(&seq) {
                        Some(q) if q.msg.id == id && q.owner == owner => {
                            q.state = match outcome {
                                Outcome::Sent => Outcome2::Sent,
                                Outcome::Failed { .. } => Outcome2::Failed,
                            };
                        }
                        _ => self.violate(
                            "messages: settle",
                            format!("settling {id} (seq {seq}), not a sent message of {owner}"),
                        ),
                    }
                }
                StoreAnswer::Settled { seq, committed }
            }
        };
        // Answers come in request order, a little later.
        let last = self.answers.back().map_or(self.t, |(at, _)| *at);
        let at = last.max(self.t) + self.rng.range(0, 20);
        self.answers.push_back((at, answer));
    }

    // --- the app's sends ---------------------------------------------------------------

    /// A local app sends a message to `peer` (as whoever the session logs in as: the engine
    /// decides). The input to feed, and its request id.
    pub fn app_send(&mut self, peer: &str) -> Input {
        let id = self.next_req;
        self.next_req += 1;
        self.send_requests.insert(id, self.t);
        self.stats.device_sends += 1;
        let to = UserId::parse(peer).unwrap_or_else(|_| unreachable!("the peers are valid"));
        Input::Send {
            id,
            draft: Ok(Draft {
                id: self.ids.next(1_800_000_000_000 + self.t as i64),
                to,
                kind: Kind::Text,
                body: format!("from the device at {}", self.t),
                ts: 1_800_000_000_000 + self.t as i64,
            }),
        }
    }

    // --- the peers ---------------------------------------------------------------------

    /// A peer publishes to `user`'s inbox (the broker keeps it in the user's session).
    fn peer_publish(&mut self, user: &str) {
        let peer = PEERS[self.rng.range(0, 2) as usize];
        let roll = self.rng.range(0, 99);
        let id = self.ids.next(1_800_000_000_000 + self.t as i64);
        let topic = format!("im/1/u/{user}/in/{peer}");
        let real = WireMessage {
            id: id.clone(),
            from: peer.into(),
            to: user.into(),
            kind: Kind::Text,
            body: format!("hello {user}"),
            ts: 1_800_000_000_000 + self.t as i64,
        };
        let encode = |m: &WireMessage| serde_json::to_vec(m).unwrap_or_default();
        let p = match roll {
            // A forged sender: the topic says `peer`, the payload someone else.
            0..=3 => Pub {
                topic,
                payload: encode(&WireMessage {
                    from: "carol-boss".into(),
                    ..real
                }),
                qos1: true,
                oversized: false,
                key: None,
            },
            4..=5 => Pub {
                topic,
                payload: b"{not a message".to_vec(),
                qos1: true,
                oversized: false,
                key: None,
            },
            6..=7 => Pub {
                topic,
                payload: Vec::new(),
                qos1: true,
                oversized: true,
                key: None,
            },
            8 => Pub {
                topic,
                payload: encode(&real),
                qos1: false,
                oversized: false,
                key: None,
            },
            _ => {
                self.published
                    .entry((user.to_string(), peer.to_string()))
                    .or_default()
                    .push(id.clone());
                Pub {
                    topic,
                    payload: encode(&real),
                    qos1: true,
                    oversized: false,
                    key: Some((peer.to_string(), id)),
                }
            }
        };
        self.stats.peer_messages += 1;
        self.sessions.entry(user.to_string()).or_default().queue.push_back(p);
    }

    // --- events ------------------------------------------------------------------------

    /// When the next delivery is due (`users`: the device's users the peers write to).
    pub fn next_event_time(&self) -> Option<Millis> {
        if !self.immediate.is_empty() {
            return Some(self.t);
        }
        let answer = self.answers.front().map(|a| a.0);
        let ack = self.outgoing.iter().map(|o| o.due).min();
        let peer = (self.next_peer_at < self.peers_stop_at).then_some(self.next_peer_at);
        let deliver = self.can_deliver().then_some(self.t);
        [answer, ack, peer, deliver].into_iter().flatten().min()
    }

    fn can_deliver(&self) -> bool {
        let Some(l) = self.link.as_ref().filter(|l| l.subscribed) else {
            return false;
        };
        self.sessions
            .get(&l.user)
            .is_some_and(|s| !s.queue.is_empty() && s.unacked.len() < RECEIVE_MAX)
    }

    /// Take the delivery due now, as an input for the engine. `users` are who peers write to.
    pub fn pop_event(&mut self, users: &[&str]) -> Option<(Input, String)> {
        let t = self.t;
        if let Some(i) = self.immediate.pop_front() {
            return Some((i, "client: numbered".into()));
        }
        if self.answers.front().is_some_and(|a| a.0 <= t) {
            let (_, a) = self.answers.pop_front()?;
            let what = format!("store: {}", short_answer(&a));
            return Some((Input::Store(a), what));
        }
        if let Some(i) = self
            .outgoing
            .iter()
            .enumerate()
            .filter(|(_, o)| o.due <= t)
            .min_by_key(|(_, o)| o.due)
            .map(|(i, _)| i)
        {
            // PUBACKs come in the order the PUBLISHes went (per link).
            let link = self.outgoing[i].link;
            let j = self
                .outgoing
                .iter()
                .position(|o| o.link == link)
                .unwrap_or(i);
            let o = self.outgoing.remove(j)?;
            let code = match (&o.what, o.msg.as_ref()) {
                (Out::Message(_), Some(m)) => {
                    let m = m.clone();
                    self.verdict(&m)
                }
                _ => 0x00,
            };
            self.accept(&o, code);
            return Some((
                Input::Link {
                    link: o.link,
                    event: LinkEvent::PubAck {
                        pkid: o.pkid,
                        code,
                    },
                },
                format!("broker: PUBACK {} 0x{code:02X}", o.pkid),
            ));
        }
        if self.next_peer_at <= t && self.next_peer_at < self.peers_stop_at {
            let mean: Millis = if t < self.flood_until { 20 } else { 8_000 };
            self.next_peer_at = t + self.rng.range(1, 2 * mean);
            if let Some(u) = users.get(self.rng.range(0, users.len() as u64 - 1) as usize) {
                let u = u.to_string();
                self.peer_publish(&u);
            }
            return None;
        }
        if self.can_deliver() {
            let l = self.link.as_ref()?;
            let (link, user) = (l.id, l.user.clone());
            let s = self.sessions.get_mut(&user)?;
            let p = s.queue.pop_front()?;
            let pkid = if p.qos1 {
                s.next_pkid = s.next_pkid.wrapping_add(1).max(1);
                Some(s.next_pkid)
            } else {
                None
            };
            if let Some(pk) = pkid {
                s.unacked.push_back((pk, p.clone()));
            }
            let event = if p.oversized {
                LinkEvent::Oversized {
                    topic: p.topic.clone().into_bytes(),
                    pkid,
                    bytes: 300_000,
                }
            } else {
                LinkEvent::Publish {
                    topic: p.topic.clone().into_bytes(),
                    pkid,
                    payload: p.payload.clone(),
                }
            };
            return Some((
                Input::Link { link, event },
                format!("broker: PUBLISH to {user} ({:?})", pkid),
            ));
        }
        None
    }

    // --- the end -----------------------------------------------------------------------

    /// Everything still owed to `user` at the broker.
    pub fn owed_to(&self, user: &str) -> usize {
        self.sessions
            .get(user)
            .map_or(0, |s| s.queue.len() + s.unacked.len())
    }

    /// Whether the store holds `id` from `from` for `owner`.
    pub fn holds(&self, owner: &str, from: &str, id: &str) -> bool {
        self.received
            .contains_key(&(owner.to_string(), from.to_string(), id.to_string()))
    }

    /// Queued sends of `owner` the store still holds as queued.
    pub fn outbox_of(&self, owner: &str) -> Vec<String> {
        self.sent
            .values()
            .filter(|q| q.owner == owner && q.state == Outcome2::Queued)
            .map(|q| q.msg.id.clone())
            .collect()
    }

    /// A crash: what was in flight between the daemon and its store is lost (answers never
    /// come; what was committed stays), and so is the connection.
    pub fn crash(&mut self) {
        self.answers.clear();
        self.immediate.clear();
        self.send_requests.clear();
        self.link_down(false);
    }
}

fn short_answer(a: &StoreAnswer) -> String {
    match a {
        StoreAnswer::Enqueued { result, .. } => format!("enqueued {:?}", result.as_ref().ok()),
        StoreAnswer::Received { result, msg, .. } => {
            format!("received {} {:?}", msg.id, result.as_ref().map_err(|f| f.full))
        }
        StoreAnswer::OutboxPage { page, complete, .. } => {
            format!("outbox page of {} (complete {complete})", page.len())
        }
        StoreAnswer::OutboxFailed { .. } => "outbox read failed".into(),
        StoreAnswer::Settled { seq, committed } => format!("settled {seq} {committed}"),
    }
}
