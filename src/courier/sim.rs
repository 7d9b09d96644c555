//! A deterministic simulator of the courier: a store (FIFO, committing, sometimes failing), a
//! broker (acknowledging, refusing, asking to slow down, redelivering), links that drop,
//! account switches and crashes of the daemon, all interleaved by a seeded RNG. After every
//! step it checks the courier's invariants; at the end of a calm period, that everything
//! arrived.
//!
//! Invariants (each one a `Violation`):
//! * **publish**: only a message committed as queued for the current owner, on the current
//!   link, at most once outstanding per link; never one the store holds as sent or failed;
//! * **bounds**: at most `WINDOW` in flight and `LOAD` held in memory;
//! * **ack**: only for a message the store has committed (or one that can never be stored),
//!   on the link it came on, in the order the messages arrived;
//! * **notify**: `message_sent`/`message_failed` only once the store holds that outcome,
//!   `message_received` only for a message the store holds;
//! * **complete means complete**: when the courier says it has read the whole outbox,
//!   every queued message of its owner that it has been told about is in its memory
//!   (unless the peer is paused);
//! * **no wedge**: whenever nothing is in flight anywhere, every queued message of the
//!   owner is to a paused peer or has its outcome being recorded (a failed record is
//!   retried on a timer), and every message delivered on the link is acknowledged or
//!   waiting for a store retry;
//! * **delivery** (after the calm period): the owner's outbox is empty (sent or failed), a
//!   message refused for good was published exactly once per refusal, every message the
//!   broker holds for the owner has been stored exactly once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::{Action, Courier, Input, LOAD, LinkId, MessageEvent, Outcome, Seq, WINDOW};
use crate::message::{Kind, WireMessage};
use crate::session::{Millis, Rng};

/// The client's receive maximum: the broker has at most this many unacknowledged out.
const RECEIVE_MAX: usize = 8;
const USERS: [&str; 2] = ["alice", "carol"];
/// Peers: `bob` accepts, `busy` sometimes says 0x97, `mallory` is refused with 0x87.
const PEERS: [&str; 3] = ["bob", "busy", "mallory"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Queued,
    Sent,
    Failed,
}

enum Req {
    /// `send_message`: the API's commit (the courier hears of it only afterwards).
    Enqueue {
        owner: String,
        msg: WireMessage,
    },
    Load {
        token: u64,
        owner: String,
        after: Seq,
        limit: u32,
        skip: Vec<String>,
    },
    Settle {
        seq: Seq,
        outcome: Outcome,
    },
    Store {
        link: LinkId,
        pkid: Option<u16>,
        owner: String,
        msg: WireMessage,
    },
}

#[derive(Debug)]
pub struct Violation {
    pub seed: u64,
    pub step: usize,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seed {} step {}: {}", self.seed, self.step, self.what)
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: usize,
    pub enqueued: u64,
    pub publishes: u64,
    pub sent: u64,
    pub failed: u64,
    pub received: u64,
    pub acks: u64,
    pub crashes: u64,
    pub links: u64,
}

struct Inbound {
    pkid: u16,
    msg: Result<WireMessage, String>,
}

/// One user's session at the broker: what waits for it and what is out unacknowledged.
#[derive(Default)]
struct BrokerSession {
    queue: VecDeque<Result<WireMessage, String>>,
    /// Delivered on the current link (or before it dropped), unacknowledged, in order.
    unacked: VecDeque<Inbound>,
    next_pkid: u16,
}

struct World {
    seed: u64,
    step: usize,
    rng: Rng,
    now: Millis,
    courier: Courier,
    // The store.
    out: BTreeMap<Seq, (String, WireMessage, St)>,
    inbox: BTreeMap<(String, String), Seq>,
    next_seq: Seq,
    requests: VecDeque<Req>,
    /// The store's answers on their way to the courier (in order, but racing the API's).
    replies: VecDeque<Input>,
    /// Committed enqueues the API has not yet told the courier about.
    api: VecDeque<Input>,
    // The daemon's view.
    owner: Option<String>,
    link: Option<LinkId>,
    next_link: LinkId,
    // The broker.
    published: VecDeque<(LinkId, Seq, WireMessage)>,
    outstanding: BTreeSet<(LinkId, Seq)>,
    /// Messages the broker refused for good since the daemon last started: never again
    /// within this run (after a crash, only if the store still holds them as queued).
    refused: BTreeSet<String>,
    /// Messages the broker accepted (PUBACK 0x00), and per (sender, peer) the store order of
    /// the last one accepted for the first time: what the peer receives, in that order.
    accepted: BTreeSet<String>,
    peer_order: BTreeMap<(String, String), Seq>,
    sessions: BTreeMap<String, BrokerSession>,
    /// The link each session's delivered messages went out on.
    delivered_on: BTreeMap<String, LinkId>,
    busy_until: Millis,
    calm: bool,
    /// Print every input and action (`IMLINK_SIM_TRACE=1`).
    trace: bool,
    ids: crate::message::IdGen,
    stats: Stats,
}

fn msg(ids: &mut crate::message::IdGen, from: &str, to: &str, ts: i64) -> WireMessage {
    WireMessage {
        id: ids.next(ts),
        from: from.into(),
        to: to.into(),
        kind: Kind::Text,
        body: "x".into(),
        ts,
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng::new(seed);
        let courier = Courier::new(0, rng.next_u64());
        let mut sessions = BTreeMap::new();
        for u in USERS {
            sessions.insert(u.to_string(), BrokerSession::default());
        }
        World {
            seed,
            step: 0,
            rng,
            now: 0,
            courier,
            out: BTreeMap::new(),
            inbox: BTreeMap::new(),
            next_seq: 1,
            requests: VecDeque::new(),
            replies: VecDeque::new(),
            api: VecDeque::new(),
            owner: None,
            link: None,
            next_link: 1,
            published: VecDeque::new(),
            outstanding: BTreeSet::new(),
            refused: BTreeSet::new(),
            accepted: BTreeSet::new(),
            peer_order: BTreeMap::new(),
            sessions,
            delivered_on: BTreeMap::new(),
            busy_until: 0,
            calm: false,
            trace: std::env::var("IMLINK_SIM_TRACE").is_ok_and(|v| v == "1"),
            ids: crate::message::IdGen::with_seed(seed),
            stats: Stats::default(),
        }
    }

    fn fail(&self, what: impl Into<String>) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what: what.into(),
        }
    }

    fn feed(&mut self, input: Input) -> Result<(), Violation> {
        if self.trace {
            eprintln!("{:>6} t={} in  {input:?}", self.step, self.now);
        }
        self.courier.handle(self.now, input);
        self.drain()
    }

    fn drain(&mut self) -> Result<(), Violation> {
        self.drain_unchecked()?;
        self.check()
    }

    /// Carry out the courier's actions, without the step's checks (mid-way through a step
    /// made of several inputs).
    fn drain_unchecked(&mut self) -> Result<(), Violation> {
        while let Some(a) = self.courier.poll_action() {
            self.act(a)?;
        }
        Ok(())
    }

    fn act(&mut self, a: Action) -> Result<(), Violation> {
        if self.trace {
            eprintln!("{:>6} t={} out {a:?}", self.step, self.now);
        }
        match a {
            Action::LoadOutbox {
                token,
                owner,
                after,
                limit,
                skip,
            } => self.requests.push_back(Req::Load {
                token,
                owner,
                after,
                limit,
                skip,
            }),
            Action::Publish { link, seq, msg } => {
                if Some(link) != self.link {
                    return Err(self.fail(format!(
                        "published seq {seq} on link {link}, not the current link {:?}",
                        self.link
                    )));
                }
                match self.out.get(&seq) {
                    Some((o, m, St::Queued))
                        if Some(o) == self.owner.as_ref() && m.id == msg.id => {}
                    Some((o, _, st)) => {
                        return Err(self.fail(format!(
                            "published seq {seq} held as {st:?} for {o} (owner {:?})",
                            self.owner
                        )));
                    }
                    None => {
                        return Err(
                            self.fail(format!("published seq {seq}, which was never committed"))
                        );
                    }
                }
                if self.refused.contains(&msg.id) {
                    return Err(self.fail(format!(
                        "{} published again after a refusal that cannot change",
                        msg.id
                    )));
                }
                if !self.outstanding.insert((link, seq)) {
                    return Err(self.fail(format!(
                        "seq {seq} published twice on link {link} without an answer"
                    )));
                }
                self.stats.publishes += 1;
                self.published.push_back((link, seq, msg));
            }
            Action::Settle { seq, outcome, .. } => {
                self.requests.push_back(Req::Settle { seq, outcome })
            }
            Action::Store {
                link,
                pkid,
                owner,
                msg,
                order: _,
            } => self.requests.push_back(Req::Store {
                link,
                pkid,
                owner,
                msg,
            }),
            Action::Ack { link, pkid } => {
                self.stats.acks += 1;
                let Some(owner) = self.owner.clone() else {
                    return Err(self.fail("acknowledged with no owner"));
                };
                if self.delivered_on.get(&owner) != Some(&link) {
                    return Err(self.fail(format!(
                        "ack of pkid {pkid} on link {link}, not the link it came on"
                    )));
                }
                if Some(link) != self.link {
                    return Err(
                        self.fail(format!("ack of pkid {pkid} on link {link}, which is down"))
                    );
                }
                let front = self.sessions.get(&owner).and_then(|s| s.unacked.front());
                let Some(front) = front else {
                    return Err(
                        self.fail(format!("ack of pkid {pkid} with nothing unacknowledged"))
                    );
                };
                if front.pkid != pkid {
                    return Err(self.fail(format!(
                        "ack of pkid {pkid} out of order (the oldest unacknowledged is {})",
                        front.pkid
                    )));
                }
                if let Ok(m) = &front.msg
                    && !self.inbox.contains_key(&(owner.clone(), m.id.clone()))
                {
                    return Err(self.fail(format!("ack of {} before the store committed it", m.id)));
                }
                let sess = self.sessions.entry(owner.clone()).or_default();
                sess.unacked.pop_front();
            }
            Action::Notify(e) => match e {
                MessageEvent::MessageSent { id, .. } => {
                    if !self
                        .out
                        .values()
                        .any(|(_, m, st)| m.id == id && *st == St::Sent)
                    {
                        return Err(
                            self.fail(format!("message_sent for {id} before the store says sent"))
                        );
                    }
                }
                MessageEvent::MessageFailed { id, .. } => {
                    if !self
                        .out
                        .values()
                        .any(|(_, m, st)| m.id == id && *st == St::Failed)
                    {
                        return Err(self.fail(format!(
                            "message_failed for {id} before the store says failed"
                        )));
                    }
                }
                MessageEvent::MessageReceived { id, .. } => {
                    if !self.inbox.keys().any(|(_, i)| *i == id) {
                        return Err(self.fail(format!(
                            "message_received for {id}, which the store does not hold"
                        )));
                    }
                }
            },
        }
        Ok(())
    }

    fn check(&self) -> Result<(), Violation> {
        let (inflight, held) = self.courier.sizes();
        if inflight > WINDOW {
            return Err(self.fail(format!("{inflight} in flight (window {WINDOW})")));
        }
        if held > LOAD {
            return Err(self.fail(format!("{held} messages held in memory")));
        }
        // Complete means complete: a queued message of the owner that the courier has been
        // told about (its `Enqueued` is not still on the way) is in its memory, unless its
        // peer is paused.
        if self.courier.claims_complete()
            && let Some(owner) = self.courier.owner()
        {
            let paused = self.courier.paused_peers();
            let on_the_way: BTreeSet<Seq> = self
                .api
                .iter()
                .filter_map(|i| match i {
                    Input::Enqueued { seq, .. } => Some(*seq),
                    _ => None,
                })
                .collect();
            if let Some(seq) = self.out.iter().find_map(|(seq, (o, m, st))| {
                (o == owner
                    && *st == St::Queued
                    && !paused.contains(&m.to)
                    && !on_the_way.contains(seq)
                    && !self.courier.knows(*seq))
                .then_some(*seq)
            }) {
                return Err(self.fail(format!(
                    "the courier says its outbox is complete, but queued seq {seq} is not in it"
                )));
            }
        }
        // No wedge: nothing moving anywhere, yet something could move.
        let quiet = self.requests.is_empty()
            && self.replies.is_empty()
            && self.api.is_empty()
            && self.published.is_empty()
            && !self.courier.holding();
        if quiet && let (Some(owner), Some(_)) = (&self.owner, self.link) {
            let paused = self.courier.paused_peers();
            if let Some((seq, (_, m, _))) = self.out.iter().find(|(seq, (o, m, st))| {
                o == owner
                    && *st == St::Queued
                    && !paused.contains(&m.to)
                    && !self.courier.settling(**seq)
            }) {
                return Err(self.fail(format!(
                    "wedged: seq {seq} to {} is queued, nothing is in flight and no timer will move it",
                    m.to
                )));
            }
            let sess = &self.sessions[owner];
            if !sess.unacked.is_empty() && self.courier.poll_timeout().is_none() {
                return Err(self.fail(format!(
                    "wedged: {} delivered messages unacknowledged and no store retry planned",
                    sess.unacked.len()
                )));
            }
        }
        Ok(())
    }

    /// The store commits the oldest request and answers.
    fn commit_one(&mut self) -> Result<(), Violation> {
        let Some(req) = self.requests.pop_front() else {
            return Ok(());
        };
        let flaky = !self.calm && self.rng.one_in(25);
        match req {
            Req::Enqueue { owner, msg } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.out
                    .insert(seq, (owner.clone(), msg.clone(), St::Queued));
                self.stats.enqueued += 1;
                self.api.push_back(Input::Enqueued { owner, seq, msg });
                Ok(())
            }
            Req::Load {
                token,
                owner,
                after,
                limit,
                skip,
            } => {
                if flaky {
                    self.replies.push_back(Input::OutboxFailed { token });
                    return Ok(());
                }
                let all: Vec<(Seq, WireMessage)> = self
                    .out
                    .iter()
                    .filter(|(s, (o, m, st))| {
                        **s > after && *o == owner && *st == St::Queued && !skip.contains(&m.to)
                    })
                    .map(|(s, (_, m, _))| (*s, m.clone()))
                    .collect();
                let complete = all.len() <= limit as usize;
                let page = all.into_iter().take(limit as usize).collect();
                self.replies.push_back(Input::OutboxPage {
                    token,
                    page,
                    complete,
                });
                Ok(())
            }
            Req::Settle { seq, outcome } => {
                let committed = !flaky;
                if committed
                    && let Some(e) = self.out.get_mut(&seq)
                    && e.2 == St::Queued
                {
                    e.2 = match outcome {
                        Outcome::Sent => St::Sent,
                        Outcome::Failed { .. } => St::Failed,
                    };
                    match e.2 {
                        St::Sent => self.stats.sent += 1,
                        _ => self.stats.failed += 1,
                    }
                }
                self.replies.push_back(Input::Settled { seq, committed });
                Ok(())
            }
            Req::Store {
                link,
                pkid,
                owner,
                msg,
            } => {
                let result = if flaky {
                    Err(())
                } else {
                    let key = (owner, msg.id.clone());
                    if self.inbox.contains_key(&key) {
                        Ok(None)
                    } else {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        self.inbox.insert(key, seq);
                        self.stats.received += 1;
                        Ok(Some(seq))
                    }
                };
                self.replies.push_back(Input::Stored {
                    link,
                    pkid,
                    msg,
                    result,
                });
                Ok(())
            }
        }
    }

    fn enqueue(&mut self) -> Result<(), Violation> {
        let owner = match (&self.owner, self.rng.one_in(8)) {
            (Some(o), false) => o.clone(),
            _ => USERS[self.rng.range(0, 1) as usize].to_string(),
        };
        let to = PEERS[self.rng.range(0, PEERS.len() as u64 - 1) as usize];
        let m = msg(
            &mut self.ids,
            &owner,
            to,
            1_800_000_000_000 + self.now as i64,
        );
        self.requests.push_back(Req::Enqueue { owner, msg: m });
        Ok(())
    }

    fn broker_ack(&mut self) -> Result<(), Violation> {
        let Some((link, seq, m)) = self.published.pop_front() else {
            return Ok(());
        };
        self.outstanding.remove(&(link, seq));
        let code = match m.to.as_str() {
            "mallory" => 0x87,
            "busy" if self.now < self.busy_until => 0x97,
            _ => 0x00,
        };
        if code == 0x87 {
            self.refused.insert(m.id.clone());
        }
        if code == 0x00 && self.accepted.insert(m.id.clone()) {
            // Per-peer order: the peer receives a sender's messages in the order they were
            // sent (a redelivery of one already accepted is deduplicated there).
            let key = (m.from.clone(), m.to.clone());
            let last = self.peer_order.get(&key).copied().unwrap_or(0);
            if seq < last {
                return Err(self.fail(format!(
                    "per-peer order: {} (seq {seq}) to {} accepted after seq {last}",
                    m.id, m.to
                )));
            }
            self.peer_order.insert(key, seq);
        }
        self.feed(Input::PubAck { link, seq, code })
    }

    fn link_up(&mut self) -> Result<(), Violation> {
        let Some(owner) = self.owner.clone() else {
            return Ok(());
        };
        let link = self.next_link;
        self.next_link += 1;
        self.link = Some(link);
        self.stats.links += 1;
        // One step: the link comes up and the broker at once sends again what was not
        // acknowledged.
        self.courier.handle(self.now, Input::LinkUp(link));
        self.drain_unchecked()?;
        // The broker sends again what was not acknowledged, in order, then the rest.
        self.delivered_on.insert(owner.clone(), link);
        let again: Vec<(u16, Result<WireMessage, String>)> = self.sessions[&owner]
            .unacked
            .iter()
            .map(|i| (i.pkid, i.msg.clone()))
            .collect();
        for (pkid, m) in again {
            self.feed(Input::Received {
                link,
                pkid: Some(pkid),
                owner: owner.clone(),
                msg: m,
            })?;
        }
        self.check()
    }

    fn link_down(&mut self) -> Result<(), Violation> {
        if let Some(link) = self.link.take() {
            // Whatever was on the wire is lost either way (PUBACKs never come).
            self.published.retain(|(l, _, _)| *l != link);
            self.outstanding.retain(|(l, _)| *l != link);
            self.feed(Input::LinkDown(link))?;
        }
        Ok(())
    }

    fn deliver(&mut self) -> Result<(), Violation> {
        let (Some(owner), Some(link)) = (self.owner.clone(), self.link) else {
            return Ok(());
        };
        let sess = self.sessions.entry(owner.clone()).or_default();
        if sess.unacked.len() >= RECEIVE_MAX {
            return Ok(());
        }
        let Some(m) = sess.queue.pop_front() else {
            return Ok(());
        };
        sess.next_pkid = sess.next_pkid.wrapping_add(1).max(1);
        let pkid = sess.next_pkid;
        sess.unacked.push_back(Inbound {
            pkid,
            msg: m.clone(),
        });
        self.feed(Input::Received {
            link,
            pkid: Some(pkid),
            owner,
            msg: m,
        })
    }

    fn crash(&mut self) -> Result<(), Violation> {
        self.stats.crashes += 1;
        // What was not committed is gone with the process; the broker keeps its sessions.
        self.requests.clear();
        self.replies.clear();
        self.api.clear();
        self.link = None;
        self.published.clear();
        self.outstanding.clear();
        self.refused.clear();
        self.courier = Courier::new(self.now, self.rng.next_u64());
        if let Some(o) = self.owner.clone() {
            self.feed(Input::Account(Some(o)))?;
        }
        Ok(())
    }

    fn advance(&mut self) -> Result<(), Violation> {
        let to = match self.courier.poll_timeout() {
            Some(t) if t > self.now && self.rng.one_in(2) => t,
            _ => self.now + self.rng.range(1, 3_000),
        };
        self.now = to;
        self.courier.handle_timeout(self.now);
        self.drain()
    }

    fn random_step(&mut self) -> Result<(), Violation> {
        let r = self.rng.range(0, 99);
        match r {
            0..=14 => self.enqueue(),
            15..=26 => self.commit_one(),
            27..=34 => match self.replies.pop_front() {
                Some(i) => self.feed(i),
                None => Ok(()),
            },
            35..=39 => match self.api.pop_front() {
                Some(i) => self.feed(i),
                None => Ok(()),
            },
            40..=54 => self.broker_ack(),
            55..=64 => {
                // Someone writes to one of our users (now and then something that is not a
                // message).
                let to = USERS[self.rng.range(0, 1) as usize];
                let item = if self.rng.one_in(15) {
                    Err("not JSON".to_string())
                } else {
                    Ok(msg(
                        &mut self.ids,
                        "bob",
                        to,
                        1_800_000_000_000 + self.now as i64,
                    ))
                };
                self.sessions
                    .entry(to.to_string())
                    .or_default()
                    .queue
                    .push_back(item);
                Ok(())
            }
            65..=72 => self.deliver(),
            73..=76 if !self.calm => self.link_down(),
            77..=81 if self.link.is_none() => self.link_up(),
            82 if !self.calm => {
                // Account switch: the link goes, the other user logs in.
                self.link_down()?;
                let next = match self.owner.as_deref() {
                    Some("alice") => "carol",
                    _ => "alice",
                };
                self.owner = Some(next.to_string());
                self.feed(Input::Account(self.owner.clone()))
            }
            83 if !self.calm && self.rng.one_in(4) => self.crash(),
            84..=86 if !self.calm => {
                self.busy_until = self.now + self.rng.range(0, 20_000);
                Ok(())
            }
            _ => self.advance(),
        }
    }

    /// Run until nothing moves (timers included), with no faults.
    fn settle_down(&mut self) -> Result<(), Violation> {
        self.calm = true;
        self.busy_until = 0;
        if self.link.is_none() {
            self.link_up()?;
        }
        for _ in 0..200_000 {
            self.step += 1;
            if let Some(i) = self.api.pop_front() {
                self.feed(i)?;
            } else if let Some(i) = self.replies.pop_front() {
                self.feed(i)?;
            } else if !self.requests.is_empty() {
                self.commit_one()?;
            } else if !self.published.is_empty() {
                self.broker_ack()?;
            } else if self.owner.as_ref().is_some_and(|o| {
                let s = &self.sessions[o];
                !s.queue.is_empty() && s.unacked.len() < RECEIVE_MAX
            }) {
                self.deliver()?;
            } else if let Some(t) = self.courier.poll_timeout() {
                self.now = self.now.max(t);
                self.courier.handle_timeout(self.now);
                self.drain()?;
            } else {
                return self.check_delivery();
            }
        }
        Err(self.fail("the calm period never came to rest"))
    }

    fn check_delivery(&self) -> Result<(), Violation> {
        let Some(owner) = self.owner.as_ref() else {
            return Ok(());
        };
        if let Some((seq, (_, m, _))) = self
            .out
            .iter()
            .find(|(_, (o, _, st))| o == owner && *st == St::Queued)
        {
            return Err(self.fail(format!(
                "after the calm period seq {seq} to {} is still queued",
                m.to
            )));
        }
        let sess = &self.sessions[owner];
        if !sess.unacked.is_empty() || !sess.queue.is_empty() {
            return Err(self.fail(format!(
                "after the calm period {} messages for {owner} are still at the broker",
                sess.unacked.len() + sess.queue.len()
            )));
        }
        Ok(())
    }
}

/// Run `steps` random steps and a calm period for one seed.
pub fn run(seed: u64, steps: usize) -> Result<Stats, Violation> {
    let mut w = World::new(seed);
    w.owner = Some("alice".into());
    w.feed(Input::Account(w.owner.clone()))?;
    for _ in 0..steps {
        w.step += 1;
        w.random_step()?;
    }
    w.settle_down()?;
    w.stats.steps = w.step;
    Ok(w.stats.clone())
}
