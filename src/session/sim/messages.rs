//! The messaging half of the simulated world, for the simulator over the [`Engine`]
//! (`crate::engine::Engine`): the broker's side of messages and the device's disk.
//!
//! * **Peers** publish to the device's users (`alice`, `bob`) through the broker, each in its
//!   own order: mostly QoS 1 messages, sometimes a forged sender (the payload's `from` is not
//!   the topic's sender), malformed JSON, a packet over the size limit (the relay's stub,
//!   [`LinkEvent::Oversized`]) or a QoS 0 message; sometimes in floods.
//! * **The broker** keeps a persistent session per device user: what it delivered and was not
//!   acknowledged goes back to the head of the queue when the connection ends, and is
//!   delivered again (at most [`RECEIVE_MAX`] unacknowledged at a time) once the inbox
//!   subscription is granted. It answers the device's PUBLISHes with PUBACKs at random
//!   delays, so out of order across peers: `busy` says 0x97 (quota exceeded) during busy
//!   spells, `mallory` 0x87 (not authorized) always; a PUBLISH whose PUBACK was lost with the
//!   connection may or may not have been taken. (SUBACKs are the login world's: it refuses
//!   them during elections and loses some; see `World::refuse_subscribe_until`.)
//! * **The store** (a model of `crate::store`): answers in request order, a little later;
//!   commits a received message once per (owner, sender, id); sometimes fails a commit,
//!   sometimes is full for received messages (then, like the real store thread, it refuses
//!   every later message of the same link until the held one is in, and an app's `ack_inbox`
//!   makes room: [`Input::StoreRoom`]).
//! * **Apps** send messages to peers at random moments (as whoever the session logs in as:
//!   the engine decides).
//!
//! It keeps the ground truth the messaging invariants are judged by, and checks the ones it
//! can see as it acts (each violation is collected and reported by the runner after the step):
//! * **acks**: a PUBACK only on the link the message came on, never after our DISCONNECT, in
//!   arrival order, and only for a message the store has committed (or one that can never be
//!   stored);
//! * **publish**: only a message the store holds as queued for the logged-in user, never
//!   again once its outcome is recorded or after a lasting refusal, on the link that is up;
//!   at most one in flight per peer (the courier's promise) and `WINDOW` in all;
//! * **order**: messages are committed per (user, peer) in the order the peer published them,
//!   and the broker accepts the device's messages per (user, peer) in store order;
//! * **once**: `message_received` once per message, never before its commit; a send's outcome
//!   told once, after its commit, never both; `Sent` only for a message the broker accepted,
//!   `Failed` only for a lasting refusal (`mallory`);
//! * **answers**: every `send_message` is answered, once, within a bound;
//! * **delivery** (at the end of the healthy tail, [`Messages::final_check`]): every QoS 1
//!   message a peer published to the logged-in user is committed, exactly once; the user's
//!   outbox is empty (every send `Sent`, or `Failed` for a lasting refusal).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::courier::{LinkId, MessageEvent, Outcome, Seq, WINDOW};
use crate::engine::{Action, Draft, Input, LinkEvent, Out, StoreAnswer, StoreFailure, StoreOp};
use crate::identity::UserId;
use crate::message::{IdGen, Kind, WireMessage};
use crate::session::{Millis, Rng};

/// The broker gives a client at most this many unacknowledged QoS 1 messages.
pub const RECEIVE_MAX: usize = 32;

/// Peers of the device's users: `busy` answers 0x97 in busy spells, `mallory` 0x87 always.
pub const PEERS: [&str; 4] = ["carol", "dave", "busy", "mallory"];

/// The SDKAppID the simulated engine runs with.
pub const APP: u64 = 1_400_000_001;

/// Unix milliseconds at the world's t = 0 (ids and timestamps).
const EPOCH_MS: i64 = 1_800_000_000_000;

/// The mean gaps between two messages of peers (outside floods) and two sends of apps:
/// enough for every path many times a run, few enough for the CI seeds' wall time.
const PEER_GAP: Millis = 150_000;
const SEND_GAP: Millis = 240_000;

/// A send must be answered within this.
const ANSWER_BOUND: Millis = 10_000;

/// A message a peer published to a device user, as the broker holds it.
#[derive(Debug, Clone)]
struct Pub {
    topic: String,
    payload: Vec<u8>,
    qos1: bool,
    /// Over the size limit: the relay passes it on as a stub (`LinkEvent::Oversized`).
    oversized: bool,
    /// A real QoS 1 message the device must keep: (sender, id).
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

/// A PUBLISH of the device the broker was given (waiting for its PUBACK).
#[derive(Debug, Clone)]
struct Outgoing {
    link: LinkId,
    pkid: u16,
    what: Out,
    msg: Option<WireMessage>,
    due: Millis,
    /// When the device published it.
    at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Queued,
    Sent,
    Failed,
}

/// A sent message the model store holds.
#[derive(Debug, Clone)]
struct Sent {
    owner: String,
    msg: WireMessage,
    state: St,
}

/// The link the broker has with the device, as the broker sees it.
#[derive(Debug, Clone)]
struct BrokerLink {
    id: LinkId,
    user: String,
    subscribed: bool,
    /// Our DISCONNECT went out on it.
    closing: bool,
    next_out_pkid: u16,
}

/// What the messaging world did (the report).
#[derive(Debug, Default, Clone)]
pub struct MsgStats {
    /// PUBLISHes of peers (all kinds).
    pub peer_messages: u64,
    /// `send_message`s of the device's apps.
    pub device_sends: u64,
    /// Inbound PUBLISHes the device acknowledged.
    pub acked: u64,
    /// Received messages committed (new).
    pub committed: u64,
    /// The device's messages the broker accepted.
    pub accepted: u64,
    pub store_failures: u64,
}

pub struct Messages {
    rng: Rng,
    ids: IdGen,
    pub t: Millis,
    /// Faults and traffic happen before then (the chaos); after, the world is healthy.
    chaos_until: Millis,
    // --- the device's disk
    next_seq: Seq,
    received: BTreeMap<(String, String, String), Seq>,
    by_seq: BTreeMap<Seq, (String, String, String)>,
    sent: BTreeMap<Seq, Sent>,
    /// Store answers, in request order, each due at an instant.
    answers: VecDeque<(Millis, StoreAnswer)>,
    failing_until: Millis,
    full_until: Millis,
    /// Like the store thread: (link, place) of a received message refused for room; later
    /// ones of that link are refused too until it is in.
    held: Option<(LinkId, u64)>,
    /// An app consumes messages then (`ack_inbox`): room is made.
    room_at: Option<Millis>,
    // --- the broker
    link: Option<BrokerLink>,
    sessions: BTreeMap<String, Session>,
    outgoing: Vec<Outgoing>,
    /// Inputs due now (the local client numbering a PUBLISH, or refusing it).
    immediate: VecDeque<Input>,
    busy_until: Millis,
    flood_until: Millis,
    next_peer_at: Millis,
    next_send_at: Millis,
    next_fault_at: Millis,
    /// Retained documents (the device status), by topic; the will of the link up now.
    pub retained: BTreeMap<String, Vec<u8>>,
    will: Option<(String, Vec<u8>)>,
    /// The will the engine gave with the CONNECT being made.
    pending_will: Option<(String, Vec<u8>)>,
    // --- the truth
    /// Per (device user, peer): the ids of QoS 1 messages the broker accepted from the peer,
    /// in order.
    published: BTreeMap<(String, String), Vec<String>>,
    /// Per (device user, peer): the place (in `published`) of the last message committed.
    last_in: BTreeMap<(String, String), usize>,
    /// Per (device user, peer): the store order of the last device message the broker
    /// accepted.
    last_out: BTreeMap<(String, String), Seq>,
    accepted_ids: BTreeSet<String>,
    /// Sends refused for good (0x87): never published again.
    refused: BTreeSet<String>,
    /// `send_message` requests not yet answered: id → when asked.
    send_requests: BTreeMap<u64, Millis>,
    next_req: u64,
    /// `message_received` per store seq.
    notified: BTreeSet<Seq>,
    /// Outcomes told, by message id.
    told: BTreeSet<String>,
    pub stats: MsgStats,
    violations: Vec<(&'static str, String)>,
}

impl Messages {
    pub fn new(mut rng: Rng, t: Millis, chaos_until: Millis) -> Messages {
        let ids = IdGen::with_seed(rng.next_u64());
        let next_peer_at = t + rng.range(1_000, 20_000);
        let next_send_at = t + rng.range(1_000, 60_000);
        let next_fault_at = t + rng.range(60_000, 1_800_000);
        Messages {
            rng,
            ids,
            t,
            chaos_until,
            next_seq: 1,
            received: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            sent: BTreeMap::new(),
            answers: VecDeque::new(),
            failing_until: 0,
            full_until: 0,
            held: None,
            room_at: None,
            link: None,
            sessions: BTreeMap::new(),
            outgoing: Vec::new(),
            immediate: VecDeque::new(),
            busy_until: 0,
            flood_until: 0,
            next_peer_at,
            next_send_at,
            next_fault_at,
            retained: BTreeMap::new(),
            will: None,
            pending_will: None,
            published: BTreeMap::new(),
            last_in: BTreeMap::new(),
            last_out: BTreeMap::new(),
            accepted_ids: BTreeSet::new(),
            refused: BTreeSet::new(),
            send_requests: BTreeMap::new(),
            next_req: 1_000_000,
            notified: BTreeSet::new(),
            told: BTreeSet::new(),
            stats: MsgStats::default(),
            violations: Vec::new(),
        }
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        self.violations.push((invariant, detail));
    }

    /// The violations found since the last call.
    pub fn take_violations(&mut self) -> Vec<(&'static str, String)> {
        std::mem::take(&mut self.violations)
    }

    /// A healthy world: the store works, nobody is busy or flooding, peers and apps stop
    /// (what they sent must arrive).
    pub fn make_healthy(&mut self) {
        self.failing_until = 0;
        self.full_until = 0;
        self.busy_until = 0;
        self.flood_until = 0;
        self.next_fault_at = Millis::MAX;
        self.next_peer_at = Millis::MAX;
        self.next_send_at = Millis::MAX;
        if self.held.is_some() || self.room_at.is_some() {
            self.room_at = Some(self.t);
        }
    }

    /// The device slept for `d`: nothing ran (the answer bound counts awake time).
    pub fn suspended(&mut self, d: Millis) {
        self.send_requests.values_mut().for_each(|at| *at += d);
    }

    // --- the device's connection, as the login world reports it ---------------------------

    /// The engine is connecting with this will.
    pub fn connecting(&mut self, will: Option<(String, Vec<u8>)>) {
        self.pending_will = will;
    }

    /// The connection `link` (as `user`) has its CONNACK.
    pub fn link_up(&mut self, link: LinkId, user: &UserId) {
        self.link_down(false);
        self.link = Some(BrokerLink {
            id: link,
            user: user.to_string(),
            subscribed: false,
            closing: false,
            next_out_pkid: 1,
        });
        self.will = self.pending_will.take();
    }

    /// The broker granted the inbox subscription on the link up now.
    pub fn subscribed(&mut self) {
        if let Some(l) = self.link.as_mut() {
            l.subscribed = true;
        }
    }

    /// Our DISCONNECT went out on `link`.
    pub fn disconnecting(&mut self, link: LinkId) {
        if let Some(l) = self.link.as_mut().filter(|l| l.id == link) {
            l.closing = true;
        }
    }

    /// The connection is over. Unacknowledged messages go back to the head of the session's
    /// queue (redelivered on the next connection); a PUBLISH of ours without its PUBACK may
    /// or may not have been taken; the will is published unless we closed cleanly.
    pub fn link_down(&mut self, clean_if_closing: bool) {
        let Some(l) = self.link.take() else { return };
        if let Some(s) = self.sessions.get_mut(&l.user) {
            while let Some((_, p)) = s.unacked.pop_back() {
                s.queue.push_front(p);
            }
        }
        let (lost, kept): (Vec<Outgoing>, Vec<Outgoing>) = std::mem::take(&mut self.outgoing)
            .into_iter()
            .partition(|o| o.link == l.id);
        self.outgoing = kept;
        for o in lost {
            if self.rng.one_in(2) {
                // The broker took it; its PUBACK was lost with the connection.
                let code = self.verdict(o.msg.as_ref());
                self.accept(&o, code, false);
            }
        }
        let clean = clean_if_closing && l.closing;
        if let Some((topic, payload)) = self.will.take()
            && !clean
        {
            self.retained.insert(topic, payload);
        }
    }

    /// The daemon process ends (a crash, a reboot, or an exit): what was in flight between it
    /// and its store is lost (answers never come; what was committed stays), and so is the
    /// connection; unanswered `send_message`s go with the process.
    pub fn process_gone(&mut self) {
        // A lasting refusal whose record the store never committed is forgotten with the
        // process: the message is still queued on disk and goes out once more (and is
        // refused again), as `courier::Input::Settled` says.
        let recorded: BTreeSet<String> = self
            .sent
            .values()
            .filter(|q| q.state != St::Queued)
            .map(|q| q.msg.id.clone())
            .collect();
        self.refused.retain(|id| recorded.contains(id));
        self.answers.clear();
        self.immediate.clear();
        self.send_requests.clear();
        self.held = None;
        self.pending_will = None;
        self.link_down(false);
    }

    // --- the engine's actions ----------------------------------------------------------

    /// Carry out a messaging action of the engine (publish, acknowledge, the store, replies).
    pub fn act(&mut self, a: &Action) {
        match a {
            Action::Publish {
                link,
                what,
                topic,
                payload,
                retain,
            } => self.publish(*link, *what, topic, payload, *retain),
            Action::Ack { link, pkid } => self.ack(*link, *pkid),
            Action::Store(op) => self.store(op.clone()),
            Action::SendReply { id, result } => {
                if self.send_requests.remove(id).is_none() {
                    self.violate(
                        "messages: answers",
                        format!(
                            "a send_message reply to request {id}, not asked or answered already"
                        ),
                    );
                }
                if let Ok(q) = result
                    && self.sent.get(&q.seq).is_none_or(|s| s.msg.id != q.id)
                {
                    self.violate(
                        "messages: commit before answer",
                        format!("send {} answered queued but not committed", q.id),
                    );
                }
            }
            Action::Notify(e) => self.notify(e),
            _ => {}
        }
    }

    fn publish(&mut self, link: LinkId, what: Out, topic: &str, payload: &[u8], retain: bool) {
        let Some(l) = self.link.as_mut().filter(|l| l.id == link) else {
            // The client has no such connection (it ended meanwhile): it does not take it.
            self.immediate.push_back(Input::Link {
                link,
                event: LinkEvent::NotTaken(what),
            });
            return;
        };
        let closing = l.closing;
        let pkid = l.next_out_pkid;
        l.next_out_pkid = l.next_out_pkid.wrapping_add(1).max(1);
        let user = l.user.clone();
        // (The status document that says why we leave goes out just before the DISCONNECT.)
        if closing && what != Out::Status {
            let v = format!("a PUBLISH ({what:?}) on link {link} after our DISCONNECT");
            self.violate("messages: publish", v);
        }
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
                self.retained.insert(topic.to_string(), payload.to_vec());
                None
            }
            Out::Message(seq) => {
                let Ok(m) = serde_json::from_slice::<WireMessage>(payload) else {
                    return self.violate("messages: publish", format!("seq {seq}: not a message"));
                };
                let want = format!("im/{APP}/u/{}/in/{}", m.to, m.from);
                if topic != want || m.from != user || retain {
                    self.violate(
                        "messages: publish",
                        format!(
                            "{} from {} on {topic:?} (retain {retain}) while logged in as {user}",
                            m.id, m.from
                        ),
                    );
                }
                match self.sent.get(&seq) {
                    Some(q) if q.msg == m && q.owner == user => {
                        if q.state != St::Queued {
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
                let mine = |o: &&Outgoing| o.link == link && o.msg.is_some();
                let to_peer = self
                    .outgoing
                    .iter()
                    .filter(mine)
                    .filter(|o| o.msg.as_ref().is_some_and(|x| x.to == m.to))
                    .count();
                if to_peer >= 1 {
                    self.violate(
                        "bounds: one in flight per peer",
                        format!("{} published to {} with another one in flight", m.id, m.to),
                    );
                }
                if self.outgoing.iter().filter(mine).count() >= WINDOW {
                    self.violate(
                        "bounds: window",
                        format!("{} published with {WINDOW} in flight", m.id),
                    );
                }
                Some(m)
            }
        };
        let due = self.t + self.rng.range(1, 400);
        self.outgoing.push(Outgoing {
            link,
            pkid,
            what,
            msg,
            due,
            at: self.t,
        });
    }

    /// When the oldest PUBLISH of the device on `link` the broker has not answered yet was
    /// published (what makes a close a stalled broker's: `engine::STALLED_AFTER`).
    pub fn oldest_unanswered(&self, link: LinkId) -> Option<Millis> {
        self.outgoing
            .iter()
            .filter(|o| o.link == link)
            .map(|o| o.at)
            .min()
    }

    /// The broker's verdict on a PUBLISH of the device.
    fn verdict(&mut self, m: Option<&WireMessage>) -> u8 {
        match m.map(|m| m.to.as_str()) {
            Some("mallory") => 0x87,
            Some("busy") if self.t < self.busy_until => 0x97,
            _ => 0x00,
        }
    }

    /// The broker took `o` with `code`; `told`: the device gets the PUBACK.
    fn accept(&mut self, o: &Outgoing, code: u8, told: bool) {
        let Some(m) = o.msg.as_ref() else { return };
        if code == 0x87 && told {
            self.refused.insert(m.id.clone());
        }
        if code != 0x00 || !self.accepted_ids.insert(m.id.clone()) {
            return;
        }
        self.stats.accepted += 1;
        let Some(seq) = self
            .sent
            .iter()
            .find(|(_, q)| q.msg.id == m.id)
            .map(|(s, _)| *s)
        else {
            return;
        };
        let k = (m.from.clone(), m.to.clone());
        if let Some(last) = self.last_out.get(&k).copied()
            && last > seq
        {
            let v = format!(
                "{} (seq {seq}) from {} to {} accepted after seq {last}",
                m.id, m.from, m.to
            );
            self.violate("messages: per-peer order (out)", v);
        }
        self.last_out.insert(k, seq);
    }

    fn ack(&mut self, link: LinkId, pkid: u16) {
        let Some(l) = self.link.as_ref() else {
            return self.violate(
                "messages: acks",
                format!("PUBACK {pkid} on link {link} with no connection"),
            );
        };
        if l.id != link {
            return self.violate(
                "messages: acks",
                format!("PUBACK {pkid} for link {link} on link {}", l.id),
            );
        }
        if l.closing {
            return self.violate(
                "messages: acks",
                format!("PUBACK {pkid} on link {link} after our DISCONNECT"),
            );
        }
        let user = l.user.clone();
        let Some(s) = self.sessions.get_mut(&user) else {
            return self.violate(
                "messages: acks",
                format!("PUBACK {pkid}: nothing delivered"),
            );
        };
        match s.unacked.front() {
            Some((p, _)) if *p == pkid => {}
            other => {
                let first = other.map(|x| x.0);
                return self.violate(
                    "messages: acks",
                    format!("PUBACK {pkid} out of order (the oldest unacknowledged is {first:?})"),
                );
            }
        }
        let Some((_, p)) = s.unacked.pop_front() else {
            return;
        };
        self.stats.acked += 1;
        if let Some((from, id)) = p.key {
            let k = (user, from, id.clone());
            if !self.received.contains_key(&k) {
                self.violate(
                    "messages: acks",
                    format!("{id} acknowledged before it was committed"),
                );
            }
        }
    }

    fn notify(&mut self, e: &MessageEvent) {
        match e {
            MessageEvent::MessageReceived { seq, id, from, .. } => {
                match self.by_seq.get(seq) {
                    Some((_, f, i)) if f == from && i == id => {}
                    _ => {
                        return self.violate(
                            "messages: once",
                            format!("message_received for {id} (seq {seq}) before its commit"),
                        );
                    }
                }
                if !self.notified.insert(*seq) {
                    self.violate(
                        "messages: once",
                        format!("message_received for {id} from {from} twice"),
                    );
                }
            }
            MessageEvent::MessageSent { id, .. } | MessageEvent::MessageFailed { id, .. } => {
                let st = self
                    .sent
                    .values()
                    .find(|q| q.msg.id == *id)
                    .map(|q| q.state);
                let sent = matches!(e, MessageEvent::MessageSent { .. });
                let ok = match st {
                    Some(St::Sent) => sent,
                    Some(St::Failed) => !sent,
                    _ => false,
                };
                if !ok {
                    self.violate(
                        "messages: once",
                        format!("{} of {id} told while the store holds {st:?}", e.name()),
                    );
                }
                if !self.told.insert(id.clone()) {
                    self.violate("messages: once", format!("the outcome of {id} told twice"));
                }
            }
        }
    }

    // --- the store model ---------------------------------------------------------------

    fn store(&mut self, op: StoreOp) {
        let fails = self.t < self.failing_until && self.rng.one_in(3);
        let failure = |full: bool| StoreFailure {
            full,
            message: if full { "full" } else { "failed" }.into(),
        };
        let answer = match op {
            StoreOp::Enqueue { req, owner, msg } => {
                let result = if fails {
                    self.stats.store_failures += 1;
                    Err(failure(false))
                } else {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.sent.insert(
                        seq,
                        Sent {
                            owner: owner.clone(),
                            msg: msg.clone(),
                            state: St::Queued,
                        },
                    );
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
                order,
            } => {
                let k = (owner.clone(), msg.from.clone(), msg.id.clone());
                let behind_held =
                    matches!((order, self.held), (Some(n), Some((hl, hn))) if hl == link && n > hn);
                let result = if behind_held {
                    Err(failure(true))
                } else if fails {
                    self.stats.store_failures += 1;
                    Err(failure(false))
                } else if self.received.contains_key(&k) {
                    Ok(None)
                } else if self.t < self.full_until {
                    Err(failure(true))
                } else {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.received.insert(k.clone(), seq);
                    self.by_seq.insert(seq, k);
                    self.stats.committed += 1;
                    self.check_order_in(&owner, &msg);
                    Ok(Some(seq))
                };
                // Like the store thread: a refusal for room, or a failed commit, holds the
                // later messages of the link until this one is in.
                match (order, &result) {
                    (Some(n), Err(f)) if self.held.is_none_or(|h| h.0 != link || n < h.1) => {
                        self.held = Some((link, n));
                        if f.full {
                            self.room_at.get_or_insert(self.full_until.max(self.t + 1));
                        }
                    }
                    (Some(n), Ok(_))
                        if self.held == Some((link, n))
                            || self.held.is_some_and(|h| h.0 != link) =>
                    {
                        self.held = None;
                    }
                    _ => {}
                }
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
                    self.stats.store_failures += 1;
                    StoreAnswer::OutboxFailed { token }
                } else {
                    let mut page: Vec<(Seq, WireMessage)> = self
                        .sent
                        .iter()
                        .filter(|(s, q)| {
                            **s > after
                                && q.owner == owner
                                && q.state == St::Queued
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
                if fails {
                    self.stats.store_failures += 1;
                }
                self.settle(committed, &owner, seq, &id, &outcome);
                StoreAnswer::Settled { seq, committed }
            }
            StoreOp::Counts { owner } => {
                let outbox_pending = self
                    .sent
                    .values()
                    .filter(|q| q.owner == owner && q.state == St::Queued)
                    .count() as u64;
                StoreAnswer::Counts {
                    owner,
                    counts: (!fails).then_some(crate::store::Counts {
                        outbox_pending,
                        inbox_unacked: 0,
                    }),
                }
            }
        };
        // Answers come in request order, a little later.
        let last = self.answers.back().map_or(self.t, |(at, _)| *at);
        let at = last.max(self.t) + self.rng.range(0, 20);
        self.answers.push_back((at, answer));
    }

    fn settle(&mut self, committed: bool, owner: &str, seq: Seq, id: &str, outcome: &Outcome) {
        let accepted = self.accepted_ids.contains(id);
        let Some(q) = self
            .sent
            .get_mut(&seq)
            .filter(|q| q.msg.id == id && q.owner == owner)
        else {
            let v = format!("settling {id} (seq {seq}), not a sent message of {owner}");
            return self.violate("messages: settle", v);
        };
        let to = q.msg.to.clone();
        let before = q.state;
        if committed {
            q.state = match outcome {
                Outcome::Sent => St::Sent,
                Outcome::Failed { .. } => St::Failed,
            };
        }
        if before != St::Queued {
            let v = format!("{id} settled as {outcome:?} after {before:?}: never both");
            return self.violate("messages: once", v);
        }
        match outcome {
            Outcome::Sent if !accepted => {
                let v = format!("{id} to {to} recorded as sent, but the broker never accepted it");
                self.violate("messages: outcomes", v);
            }
            Outcome::Failed { reason, .. } if to != "mallory" => {
                let v = format!("{id} to {to} failed (0x{reason:02X}): not a lasting refusal");
                self.violate("messages: outcomes", v);
            }
            _ => {}
        }
    }

    /// A message of `owner` committed new: after every earlier one of its peer.
    fn check_order_in(&mut self, owner: &str, m: &WireMessage) {
        let k = (owner.to_string(), m.from.clone());
        let Some(place) = self
            .published
            .get(&k)
            .and_then(|ids| ids.iter().position(|i| *i == m.id))
        else {
            return; // QoS 0: no order promised
        };
        if let Some(last) = self.last_in.get(&k).copied()
            && last > place
        {
            let later = self
                .published
                .get(&k)
                .and_then(|ids| ids.get(last))
                .cloned();
            let v = format!(
                "{} from {} to {owner} committed after a later one, {later:?} (place {place} < \
                 {last})",
                m.id, m.from
            );
            self.violate("messages: per-peer order (in)", v);
        }
        self.last_in.insert(k, place);
    }

    // --- the app's sends ---------------------------------------------------------------

    /// A local app sends a message to a peer: the input to feed.
    fn app_send(&mut self) -> Input {
        let id = self.next_req;
        self.next_req += 1;
        self.send_requests.insert(id, self.t);
        self.stats.device_sends += 1;
        let peer = PEERS[self.rng.range(0, PEERS.len() as u64 - 1) as usize];
        let to = UserId::parse(peer).unwrap_or_else(|_| unreachable!("the peers are valid"));
        let ts = EPOCH_MS + self.t as i64;
        Input::Send {
            id,
            draft: Ok(Draft {
                id: self.ids.next(ts),
                to,
                kind: Kind::Text,
                body: format!("from the device at {}", self.t),
                ts,
            }),
        }
    }

    // --- the peers ---------------------------------------------------------------------

    /// A peer publishes to `user`'s inbox (the broker keeps it in the user's session).
    fn peer_publish(&mut self, user: &str) {
        let peer = PEERS[self.rng.range(0, PEERS.len() as u64 - 1) as usize];
        let roll = self.rng.range(0, 99);
        let ts = EPOCH_MS + self.t as i64;
        let id = self.ids.next(ts);
        let topic = format!("im/{APP}/u/{user}/in/{peer}");
        let real = WireMessage {
            id: id.clone(),
            from: peer.into(),
            to: user.into(),
            kind: Kind::Text,
            body: format!("hello {user}"),
            ts,
        };
        let encode = |m: &WireMessage| serde_json::to_vec(m).unwrap_or_default();
        let other = if peer == "carol" { "dave" } else { "carol" };
        let stub = |payload: Vec<u8>, qos1: bool, oversized: bool| Pub {
            topic: topic.clone(),
            payload,
            qos1,
            oversized,
            key: None,
        };
        let p = match roll {
            // A forged sender: the topic says `peer`, the payload someone else.
            0..=3 => stub(
                encode(&WireMessage {
                    from: other.into(),
                    ..real
                }),
                true,
                false,
            ),
            4..=5 => stub(b"{not a message".to_vec(), true, false),
            6..=7 => stub(Vec::new(), true, true),
            8 => stub(Vec::new(), false, true),
            9..=10 => stub(encode(&real), false, false),
            _ => {
                self.published
                    .entry((user.to_string(), peer.to_string()))
                    .or_default()
                    .push(id.clone());
                Pub {
                    key: Some((peer.to_string(), id)),
                    ..stub(encode(&real), true, false)
                }
            }
        };
        self.stats.peer_messages += 1;
        self.sessions
            .entry(user.to_string())
            .or_default()
            .queue
            .push_back(p);
    }

    /// A fault of the messaging world starts (during the chaos only).
    fn fault(&mut self) -> String {
        let t = self.t;
        let len = self.rng.range(5_000, 300_000);
        match self.rng.range(0, 3) {
            0 => {
                self.failing_until = t + len;
                format!("messages: the store fails commits for {} s", len / 1000)
            }
            1 => {
                self.full_until = t + len;
                format!("messages: the store is full for {} s", len / 1000)
            }
            2 => {
                self.busy_until = t + len;
                format!("messages: busy answers 0x97 for {} s", len / 1000)
            }
            _ => {
                let len = len / 20;
                self.flood_until = t + len;
                format!("messages: peers flood for {} s", len / 1000)
            }
        }
    }

    // --- events ------------------------------------------------------------------------

    /// When the next event is due.
    pub fn next_event_time(&self) -> Option<Millis> {
        if !self.immediate.is_empty() {
            return Some(self.t);
        }
        let answer = self.answers.front().map(|a| a.0);
        let ack = self.outgoing.iter().map(|o| o.due).min();
        let chaos = |at: Millis| (at < self.chaos_until).then_some(at);
        let deliver = self.can_deliver().then_some(self.t);
        [
            answer,
            ack,
            self.room_at,
            chaos(self.next_peer_at),
            chaos(self.next_send_at),
            chaos(self.next_fault_at),
            deliver,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn can_deliver(&self) -> bool {
        let Some(l) = self.link.as_ref().filter(|l| l.subscribed && !l.closing) else {
            return false;
        };
        self.sessions
            .get(&l.user)
            .is_some_and(|s| !s.queue.is_empty() && s.unacked.len() < RECEIVE_MAX)
    }

    /// Take the event due now: an input for the engine, or something that happened in the
    /// world only; with a line for the trace.
    pub fn pop_event(&mut self, t: Millis) -> Option<(Option<Input>, String)> {
        self.t = t;
        if let Some(i) = self.immediate.pop_front() {
            return Some((Some(i), "client: the PUBLISH numbered".into()));
        }
        if self.answers.front().is_some_and(|a| a.0 <= t) {
            let (_, a) = self.answers.pop_front()?;
            let what = format!("store: {}", short_answer(&a));
            return Some((Some(Input::Store(a)), what));
        }
        if let Some(i) = self
            .outgoing
            .iter()
            .enumerate()
            .filter(|(_, o)| o.due <= t)
            .min_by_key(|(_, o)| o.due)
            .map(|(i, _)| i)
        {
            // Out of order across peers: each PUBACK comes at its own delay.
            let o = self.outgoing.remove(i);
            let code = self.verdict(o.msg.as_ref());
            // A PUBACK that comes after our DISCONNECT is not heeded (what was in flight
            // went back to the outbox when the engine began closing).
            let heeded = self
                .link
                .as_ref()
                .is_some_and(|l| l.id == o.link && !l.closing);
            self.accept(&o, code, heeded);
            return Some((
                Some(Input::Link {
                    link: o.link,
                    event: LinkEvent::PubAck { pkid: o.pkid, code },
                }),
                format!("broker: PUBACK {} 0x{code:02X} ({:?})", o.pkid, o.what),
            ));
        }
        if self.room_at.is_some_and(|r| r <= t) {
            self.room_at = None;
            return Some((Some(Input::StoreRoom), "app: ack_inbox (room made)".into()));
        }
        if self.next_fault_at < self.chaos_until && self.next_fault_at <= t {
            self.next_fault_at = t + self.rng.range(60_000, 3_600_000);
            return Some((None, self.fault()));
        }
        if self.next_peer_at < self.chaos_until && self.next_peer_at <= t {
            let mean: Millis = if t < self.flood_until { 30 } else { PEER_GAP };
            self.next_peer_at = t + self.rng.range(1, 2 * mean);
            let user = if self.rng.one_in(4) { "bob" } else { "alice" };
            self.peer_publish(user);
            return Some((None, format!("peer: publishes to {user}")));
        }
        if self.next_send_at < self.chaos_until && self.next_send_at <= t {
            self.next_send_at = t + self.rng.range(1, 2 * SEND_GAP);
            return Some((Some(self.app_send()), "app: send_message".into()));
        }
        if self.can_deliver() {
            let l = self.link.as_ref()?;
            let (link, user) = (l.id, l.user.clone());
            let s = self.sessions.get_mut(&user)?;
            let p = s.queue.pop_front()?;
            let pkid = p.qos1.then(|| {
                s.next_pkid = s.next_pkid.wrapping_add(1).max(1);
                s.next_pkid
            });
            if let Some(pk) = pkid {
                s.unacked.push_back((pk, p.clone()));
            }
            let topic = p.topic.clone().into_bytes();
            let event = if p.oversized {
                LinkEvent::Oversized {
                    topic,
                    pkid,
                    bytes: 300_000,
                }
            } else {
                LinkEvent::Publish {
                    topic,
                    pkid,
                    payload: p.payload.clone(),
                }
            };
            let what = format!("broker: PUBLISH to {user} {pkid:?}");
            return Some((Some(Input::Link { link, event }), what));
        }
        None
    }

    // --- checks ------------------------------------------------------------------------

    /// After every step: every `send_message` answered within a bound.
    pub fn check_step(&mut self) {
        let t = self.t;
        if let Some((id, at)) = self
            .send_requests
            .iter()
            .find(|(_, at)| t > **at + ANSWER_BOUND)
            .map(|(i, a)| (*i, *a))
        {
            self.violate(
                "messages: answers",
                format!("send_message {id} of t = {at} ms unanswered after {ANSWER_BOUND} ms"),
            );
        }
    }

    /// At the end of the healthy tail, with the session online as `user`: everything
    /// published to it arrived exactly once, and its outbox is empty.
    pub fn final_check(&mut self, user: &str) {
        let owed = self
            .sessions
            .get(user)
            .map_or(0, |s| s.queue.len() + s.unacked.len());
        if owed > 0 {
            self.violate(
                "messages: delivery",
                format!("the broker still holds {owed} messages for {user} at the end"),
            );
        }
        let missing: Vec<String> = self
            .published
            .iter()
            .filter(|((u, _), _)| u == user)
            .flat_map(|((u, peer), ids)| {
                ids.iter()
                    .filter(|id| {
                        !self
                            .received
                            .contains_key(&(u.clone(), peer.clone(), (*id).clone()))
                    })
                    .map(move |id| format!("{id} from {peer}"))
            })
            .collect();
        if !missing.is_empty() {
            self.violate(
                "messages: delivery",
                format!(
                    "{} messages published to {user} never committed: {}",
                    missing.len(),
                    missing
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        let queued: Vec<String> = self
            .sent
            .values()
            .filter(|q| q.owner == user && q.state == St::Queued)
            .map(|q| format!("{} to {}", q.msg.id, q.msg.to))
            .collect();
        if !queued.is_empty() {
            self.violate(
                "messages: delivery",
                format!(
                    "{} sends of {user} still queued at the end: {}",
                    queued.len(),
                    queued
                        .iter()
                        .take(5)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }
}

fn short_answer(a: &StoreAnswer) -> String {
    match a {
        StoreAnswer::Enqueued { result, msg, .. } => {
            format!(
                "enqueued {} {:?}",
                msg.id,
                result.as_ref().map_err(|f| f.full)
            )
        }
        StoreAnswer::Received { result, msg, .. } => {
            format!(
                "received {} from {} {:?}",
                msg.id,
                msg.from,
                result.as_ref().map_err(|f| f.full)
            )
        }
        StoreAnswer::OutboxPage { page, complete, .. } => {
            format!("outbox page of {} (complete {complete})", page.len())
        }
        StoreAnswer::OutboxFailed { .. } => "outbox read failed".into(),
        StoreAnswer::Settled { seq, committed } => format!("settled {seq} {committed}"),
        StoreAnswer::Counts { counts, .. } => format!("counts {counts:?}"),
    }
}
