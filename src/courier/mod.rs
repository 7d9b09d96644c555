//! The courier: what happens to messages, decided without I/O.
//!
//! Like the session [`Machine`](crate::session::Machine), it is a pure state machine: the
//! driver feeds it [`Input`]s (the store committed this, the broker acknowledged that, the
//! link came up) and carries out its [`Action`]s (load a page of the outbox, publish, settle,
//! store a received message, acknowledge it). Every decision about order, retries and
//! acknowledgements is here, where the simulator (`sim.rs`) checks its invariants after every
//! step.
//!
//! **Sending.** The outbox lives in the store; the courier holds a bounded page of it
//! (`LOAD` messages) plus at most `WINDOW` in flight — and at most **one per peer**: a broker
//! may refuse a message for now (0x97) and accept the next one, so a second message in flight
//! to the same peer could overtake the first. It publishes in store order, oldest
//! first, only on the link it was told is up, and at most once per link. A PUBACK settles a
//! message: below 0x80 it was sent; a refusal that cannot change (0x87 not authorized, 0x95
//! too large, 0x99 payload invalid, ...) fails it for good and it is never published again;
//! a refusal that can change (0x97 quota exceeded, 0x80, 0x91) pauses that *peer* with a
//! backoff, its messages stay queued in order, and other peers' messages go on. A message
//! is out of the courier's hands only once the store has committed its settlement, so a
//! page loaded meanwhile cannot bring it back. When the link drops, whatever was in flight
//! goes back in order and is published again on the next link (the receiver deduplicates
//! by id).
//!
//! **Receiving.** Each QoS 1 message is committed to the store before its PUBACK; PUBACKs go
//! out in the order the PUBLISHes arrived (MQTT requires it), so one slow commit holds the
//! ones behind it; acknowledgements never cross links (after a reconnect the broker sends
//! the unacknowledged ones again and the store keeps one copy). A message that can never be
//! stored (not a valid message) is acknowledged and dropped, so it cannot block the inbox;
//! a store failure is retried with a backoff, never acknowledged: the messages waiting for a
//! retry go again together, in arrival order, once no store answer is outstanding, and those
//! arriving meanwhile wait behind them, so each peer's messages are committed in the order
//! they arrived.

#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::message::WireMessage;
use crate::session::{Backoff, BackoffPolicy, Millis, Rng};

/// A connection, as the driver numbers them (never reused within one run).
pub type LinkId = u64;
/// The store's order of a message.
pub type Seq = i64;

/// Messages published and not yet acknowledged, at most (across peers: one per peer).
pub const WINDOW: usize = 16;
/// Messages of the outbox held in memory (loaded, in flight or being settled), at most.
pub const LOAD: usize = 64;

/// The pause of a peer whose messages were refused for a reason that can change.
pub const PAUSE: BackoffPolicy = BackoffPolicy {
    base: 1_000,
    cap: 60_000,
    reset_after: 0,
};
/// How long before a publish the local MQTT client refused is tried again (a failed outbox
/// read waits at least this, with the store backoff).
pub const HOLD: Millis = 200;
/// The retry of a received message the store could not commit.
pub const STORE_RETRY: BackoffPolicy = BackoffPolicy {
    base: 500,
    cap: 30_000,
    reset_after: 0,
};

/// IM codes for what a send can come to (see docs/errors.md).
pub mod codes {
    /// The message is over 12 KB (refused locally, never stored).
    pub const MSG_TOO_LARGE: u32 = 8001;
    /// The broker or service refused the sender (PUBACK 0x87: `from` is not the login, or
    /// the ACL does not allow the peer's inbox).
    pub const MSG_NOT_AUTHORIZED: u32 = 20003;
    /// The service says the message is too long (PUBACK 0x95).
    pub const MSG_SVR_TOO_LONG: u32 = 80002;
    /// The service could not read the message, or refused it for another lasting reason
    /// (PUBACK 0x99, 0x83, 0x90, ...).
    pub const MSG_INVALID: u32 = 20001;
    /// The local store is full and nothing can be evicted.
    pub const STORE_FULL: u32 = 6022;
    /// The local store failed.
    pub const STORE_FAILED: u32 = 6019;
}

/// What a PUBACK reason code means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckClass {
    Sent,
    /// Refused for a reason that can change: keep it, pause its peer.
    Retry,
    /// Refused for good, with this IM code.
    Failed(u32),
}

pub fn classify_puback(code: u8) -> AckClass {
    match code {
        c if c < 0x80 => AckClass::Sent,
        // Quota exceeded, unspecified error, packet identifier in use.
        0x97 | 0x80 | 0x91 => AckClass::Retry,
        0x87 => AckClass::Failed(codes::MSG_NOT_AUTHORIZED),
        0x95 => AckClass::Failed(codes::MSG_SVR_TOO_LONG),
        _ => AckClass::Failed(codes::MSG_INVALID),
    }
}

/// How a send ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Sent,
    Failed {
        /// The IM code (see [`codes`]).
        code: u32,
        /// The PUBACK reason code.
        reason: u8,
    },
}

/// What local apps are told (JSON-RPC notifications; hints: the store is the truth).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MessageEvent {
    MessageReceived {
        seq: Seq,
        id: String,
        from: String,
        kind: crate::message::Kind,
        body: String,
        ts: i64,
    },
    MessageSent {
        id: String,
        to: String,
    },
    MessageFailed {
        id: String,
        to: String,
        code: u32,
        reason: u8,
    },
}

impl MessageEvent {
    pub fn name(&self) -> &'static str {
        match self {
            MessageEvent::MessageReceived { .. } => "message_received",
            MessageEvent::MessageSent { .. } => "message_sent",
            MessageEvent::MessageFailed { .. } => "message_failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Whose outbox to send (the user the session logs in as), or nobody.
    Account(Option<String>),
    /// The session is up on this link (CONNACK seen, inbox subscription queued).
    LinkUp(LinkId),
    /// The link is going or gone: publish nothing more on it.
    LinkDown(LinkId),
    /// The store committed an outgoing message.
    Enqueued {
        owner: String,
        seq: Seq,
        msg: WireMessage,
    },
    /// The answer to [`Action::LoadOutbox`]: queued messages after the cursor, in order;
    /// `complete` when there are no more.
    OutboxPage {
        token: u64,
        page: Vec<(Seq, WireMessage)>,
        complete: bool,
    },
    OutboxFailed {
        token: u64,
    },
    /// The local MQTT client would not take the publish (its queue is full).
    PublishRefused {
        link: LinkId,
        seq: Seq,
    },
    PubAck {
        link: LinkId,
        seq: Seq,
        code: u8,
    },
    /// The store's answer to [`Action::Settle`] (`committed` false: it failed; the message
    /// stays queued in the store and goes out again after a restart).
    Settled {
        seq: Seq,
        committed: bool,
    },
    /// A PUBLISH arrived on the inbox. `pkid` is `None` for QoS 0 (nothing to acknowledge);
    /// `msg` is the decoded message, or why it is not one.
    Received {
        link: LinkId,
        pkid: Option<u16>,
        owner: String,
        msg: Result<WireMessage, String>,
    },
    /// Room was made in the store (an app consumed messages): retry the received messages
    /// that wait for it now, in order, instead of at the end of their backoff.
    StoreRoom,
    /// The store's answer to [`Action::Store`] (with the message it was given):
    /// `Ok(Some(seq))` stored new, `Ok(None)` a duplicate, `Err` not stored.
    Stored {
        link: LinkId,
        pkid: Option<u16>,
        msg: WireMessage,
        result: Result<Option<Seq>, ()>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read up to `limit` queued messages of `owner` with seq > `after`, oldest first,
    /// leaving out the `skip` peers; answer with [`Input::OutboxPage`] carrying `token`.
    LoadOutbox {
        token: u64,
        owner: String,
        after: Seq,
        limit: u32,
        skip: Vec<String>,
    },
    /// Publish QoS 1 to the peer's inbox on `link`; report the packet's PUBACK (or a local
    /// refusal) with this seq.
    Publish {
        link: LinkId,
        seq: Seq,
        msg: WireMessage,
    },
    /// Record the outcome in the store; answer [`Input::Settled`].
    Settle {
        owner: String,
        seq: Seq,
        id: String,
        outcome: Outcome,
    },
    /// Commit a received message (deduplicated by sender and id); answer [`Input::Stored`].
    /// `order`: its place in the arrival order on `link` (QoS 1): the store commits none
    /// after one it refused for room until that one is in.
    Store {
        link: LinkId,
        pkid: Option<u16>,
        owner: String,
        msg: WireMessage,
        order: Option<u64>,
    },
    /// Send the PUBACK for `pkid` on `link` (only if that link is still the current one).
    Ack {
        link: LinkId,
        pkid: u16,
    },
    Notify(MessageEvent),
}

/// A message published on the current link, waiting for its PUBACK.
#[derive(Debug, Clone)]
struct Flight {
    msg: WireMessage,
}

/// A message whose outcome the store is recording.
#[derive(Debug, Clone)]
struct Settling {
    owner: String,
    msg: WireMessage,
    outcome: Outcome,
    /// The store failed to record it: ask again then (until it does, the message stays
    /// here, so no page of the outbox can bring it back).
    retry_at: Option<Millis>,
}

/// A received QoS 1 message, in arrival order, until its PUBACK is sent.
#[derive(Debug, Clone)]
struct Inbound {
    pkid: u16,
    /// Its place in the order of arrival on its link (the store refuses a later one while an
    /// earlier one waits for room, so messages are committed in the order they arrived).
    pos: u64,
    /// `None`: nothing to store (not a message); acknowledge when its turn comes.
    msg: Option<WireMessage>,
    owner: String,
    committed: bool,
    /// The store is working on it.
    storing: bool,
    /// A failed commit is tried again then.
    retry_at: Option<Millis>,
}

#[derive(Debug, Clone)]
struct Paused {
    until: Millis,
    backoff: Backoff,
}

pub struct Courier {
    now: Millis,
    owner: Option<String>,
    link: Option<LinkId>,
    /// Loaded queued messages, not in flight, by seq.
    pending: BTreeMap<Seq, WireMessage>,
    inflight: BTreeMap<Seq, Flight>,
    settling: BTreeMap<Seq, Settling>,
    /// Every queued message with seq ≤ cursor (and a peer not skipped) has been loaded.
    cursor: Seq,
    /// The store holds nothing beyond `cursor` for peers that are not paused.
    complete: bool,
    /// A load is out: its token.
    loading: Option<u64>,
    /// A message was enqueued while a load was out (the page may not have it).
    dirty: bool,
    next_token: u64,
    /// No publishing or loading before this (the local client refused, or a load failed).
    hold_until: Option<Millis>,
    paused: BTreeMap<String, Paused>,
    /// Backoff levels of peers recently paused (kept until a send to them succeeds).
    pause_levels: BTreeMap<String, Backoff>,
    /// The link the inbound queue belongs to, and the next arrival position on it.
    rx_link: Option<LinkId>,
    rx_pos: u64,
    inbound: VecDeque<Inbound>,
    store_backoff: Backoff,
    rng: Rng,
    actions: VecDeque<Action>,
}

impl Courier {
    pub fn new(now: Millis, seed: u64) -> Courier {
        Courier {
            now,
            owner: None,
            link: None,
            pending: BTreeMap::new(),
            inflight: BTreeMap::new(),
            settling: BTreeMap::new(),
            cursor: 0,
            complete: false,
            loading: None,
            dirty: false,
            next_token: 1,
            hold_until: None,
            paused: BTreeMap::new(),
            pause_levels: BTreeMap::new(),
            rx_link: None,
            rx_pos: 0,
            inbound: VecDeque::new(),
            store_backoff: Backoff::default(),
            rng: Rng::new(seed),
            actions: VecDeque::new(),
        }
    }

    pub fn handle(&mut self, now: Millis, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::Account(owner) => self.account(owner),
            Input::LinkUp(link) => {
                self.link = Some(link);
                self.requeue_inflight();
            }
            Input::LinkDown(link) => {
                if self.link == Some(link) {
                    self.link = None;
                    self.requeue_inflight();
                }
                if self.rx_link == Some(link) {
                    // Unacknowledged messages come again on the next link; the store keeps one.
                    self.rx_link = None;
                    self.inbound.clear();
                }
            }
            Input::Enqueued { owner, seq, msg } => self.enqueued(owner, seq, msg),
            Input::OutboxPage {
                token,
                page,
                complete,
            } => self.page(token, page, complete),
            Input::OutboxFailed { token } => {
                if self.loading == Some(token) {
                    self.loading = None;
                    // The store is failing (a full disk, a newer schema): back off, up to 30 s,
                    // rather than asking five times a second.
                    let wait = self.store_backoff.next(&STORE_RETRY, &mut self.rng);
                    self.hold_until = Some(self.now + wait.max(HOLD));
                }
            }
            Input::PublishRefused { link, seq } => {
                if self.link == Some(link)
                    && let Some(f) = self.inflight.remove(&seq)
                {
                    self.pending.insert(seq, f.msg);
                    self.hold_until = Some(self.now + HOLD);
                }
            }
            Input::PubAck { link, seq, code } => self.puback(link, seq, code),
            Input::Settled { seq, committed } => self.settled(seq, committed),
            Input::Received {
                link,
                pkid,
                owner,
                msg,
            } => self.received(link, pkid, owner, msg),
            Input::Stored {
                link,
                pkid,
                msg,
                result,
            } => self.stored(link, pkid, msg, result),
            Input::StoreRoom => {
                // Every message waiting for room is due now (in order, with the others).
                let now = self.now;
                for e in self.inbound.iter_mut() {
                    if let Some(t) = e.retry_at.as_mut() {
                        *t = now;
                    }
                }
                self.retry_inbound();
            }
        }
        self.step();
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        self.now = self.now.max(now);
        if self.hold_until.is_some_and(|t| t <= self.now) {
            self.hold_until = None;
        }
        let ended: Vec<String> = self
            .paused
            .iter()
            .filter(|(_, p)| p.until <= self.now)
            .map(|(peer, _)| peer.clone())
            .collect();
        if !ended.is_empty() {
            for peer in ended {
                if let Some(p) = self.paused.remove(&peer) {
                    self.pause_levels.insert(peer, p.backoff);
                }
            }
            // The resumed peers' messages were left in the store: read it again from the
            // start (what is in flight or settling is skipped when the page comes).
            self.reload();
        }
        let now = self.now;
        for (seq, st) in self.settling.iter_mut() {
            if st.retry_at.is_some_and(|t| t <= now) {
                st.retry_at = None;
                self.actions.push_back(Action::Settle {
                    owner: st.owner.clone(),
                    seq: *seq,
                    id: st.msg.id.clone(),
                    outcome: st.outcome.clone(),
                });
            }
        }
        self.retry_inbound();
        self.step();
    }

    /// Send the received messages waiting for a retry to the store again, all of them, in
    /// arrival order, once one's retry is due and no answer of the store is outstanding.
    /// Each has its own backoff, and the store keeps the arrival order only while it refuses
    /// one (later ones are refused with it; once that one is in, the next commits go in
    /// request order): a later message retried alone, or ahead of an earlier one whose
    /// refusal is still on its way, could be committed first (the engine's simulator found
    /// both).
    fn retry_inbound(&mut self) {
        if self.inbound.iter().any(|e| e.storing) {
            return; // when the last answer comes
        }
        let now = self.now;
        if self
            .inbound
            .iter()
            .any(|e| e.retry_at.is_some_and(|t| t <= now))
        {
            for i in 0..self.inbound.len() {
                if self.inbound[i].retry_at.take().is_some() {
                    self.store_inbound(i);
                }
            }
        }
    }

    /// The earliest time [`Courier::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let pauses = self.paused.values().map(|p| p.until);
        // (While an answer of the store is outstanding, the retries wait for it.)
        let answered = !self.inbound.iter().any(|e| e.storing);
        let retries = self
            .inbound
            .iter()
            .filter(|_| answered)
            .filter_map(|i| i.retry_at);
        let settles = self.settling.values().filter_map(|s| s.retry_at);
        pauses
            .chain(retries)
            .chain(settles)
            .chain(self.hold_until)
            .min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Messages in flight now (for the status).
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether the outbox in memory is empty and nothing more is known to be queued.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
            && self.inflight.is_empty()
            && self.settling.is_empty()
            && self.complete
            && self.paused.is_empty()
    }

    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// (in flight, held in memory in all) — the simulator checks the bounds.
    pub fn sizes(&self) -> (usize, usize) {
        (self.inflight.len(), self.held())
    }

    /// Outgoing messages in memory: loaded, in flight, or being settled. A page is asked
    /// for only up to `LOAD` of them, so this never exceeds `LOAD`.
    fn held(&self) -> usize {
        self.pending.len() + self.inflight.len() + self.settling.len()
    }

    /// Publishing is held back for a moment (the local client refused, or a read failed).
    pub fn holding(&self) -> bool {
        self.hold_until.is_some()
    }

    /// Whether the courier says it holds every queued message of its owner (to peers not
    /// paused) that it has been told about or has read: the simulator holds it to that.
    pub fn claims_complete(&self) -> bool {
        self.complete && self.loading.is_none()
    }

    /// Whether `seq` is in memory: loaded, in flight, or being settled.
    pub fn knows(&self, seq: Seq) -> bool {
        self.pending.contains_key(&seq)
            || self.inflight.contains_key(&seq)
            || self.settling.contains_key(&seq)
    }

    /// Whether the outcome of `seq` is being recorded (a failed record is retried on a timer).
    pub fn settling(&self, seq: Seq) -> bool {
        self.settling.contains_key(&seq)
    }

    /// Peers whose messages wait for their pause to end.
    pub fn paused_peers(&self) -> BTreeSet<String> {
        self.paused.keys().cloned().collect()
    }

    fn account(&mut self, owner: Option<String>) {
        if owner == self.owner {
            return;
        }
        self.owner = owner;
        // The previous user's messages stay queued in the store for their next login; what
        // was in flight for them is answered by nobody (and published again then).
        self.inflight.clear();
        self.paused.clear();
        self.pause_levels.clear();
        self.reload();
    }

    /// Forget the loaded page and read the outbox again from the start.
    fn reload(&mut self) {
        self.pending.clear();
        self.cursor = 0;
        self.complete = false;
        self.loading = None;
        self.dirty = false;
    }

    fn requeue_inflight(&mut self) {
        for (seq, f) in std::mem::take(&mut self.inflight) {
            self.pending.insert(seq, f.msg);
        }
    }

    fn enqueued(&mut self, owner: String, seq: Seq, msg: WireMessage) {
        if self.owner.as_deref() != Some(owner.as_str()) {
            return;
        }
        if self.loading.is_some() {
            self.dirty = true;
        } else if self.complete
            && seq > self.cursor
            && self.held() < LOAD
            && !self.paused.contains_key(&msg.to)
        {
            self.pending.insert(seq, msg);
            self.cursor = seq;
        } else {
            self.complete = false;
        }
    }

    fn page(&mut self, token: u64, page: Vec<(Seq, WireMessage)>, complete: bool) {
        if self.loading != Some(token) {
            return;
        }
        self.loading = None;
        self.store_backoff = Backoff::default();
        for (seq, msg) in page {
            self.cursor = self.cursor.max(seq);
            if self.inflight.contains_key(&seq)
                || self.settling.contains_key(&seq)
                || self.paused.contains_key(&msg.to)
            {
                continue;
            }
            self.pending.insert(seq, msg);
        }
        self.complete = complete && !self.dirty;
        self.dirty = false;
    }

    fn puback(&mut self, link: LinkId, seq: Seq, code: u8) {
        if self.link != Some(link) {
            return;
        }
        let Some(f) = self.inflight.remove(&seq) else {
            return;
        };
        let Some(owner) = self.owner.clone() else {
            return;
        };
        let outcome = match classify_puback(code) {
            AckClass::Sent => {
                self.pause_levels.remove(&f.msg.to);
                Outcome::Sent
            }
            AckClass::Failed(im) => Outcome::Failed {
                code: im,
                reason: code,
            },
            AckClass::Retry => {
                let peer = f.msg.to.clone();
                self.pending.insert(seq, f.msg);
                self.pause(peer);
                return;
            }
        };
        self.actions.push_back(Action::Settle {
            owner: owner.clone(),
            seq,
            id: f.msg.id.clone(),
            outcome: outcome.clone(),
        });
        self.settling.insert(
            seq,
            Settling {
                owner,
                msg: f.msg,
                outcome,
                retry_at: None,
            },
        );
    }

    fn settled(&mut self, seq: Seq, committed: bool) {
        if !committed {
            if let Some(s) = self.settling.get_mut(&seq) {
                let wait = self.store_backoff.next(&STORE_RETRY, &mut self.rng);
                tracing::warn!(
                    id = %s.msg.id,
                    retry_ms = wait,
                    "could not record the outcome of a sent message in the store; trying again"
                );
                s.retry_at = Some(self.now + wait);
            }
            return;
        }
        let Some(s) = self.settling.remove(&seq) else {
            return;
        };
        self.store_backoff = Backoff::default();
        self.actions.push_back(Action::Notify(match s.outcome {
            Outcome::Sent => MessageEvent::MessageSent {
                id: s.msg.id,
                to: s.msg.to,
            },
            Outcome::Failed { code, reason } => MessageEvent::MessageFailed {
                id: s.msg.id,
                to: s.msg.to,
                code,
                reason,
            },
        }));
    }

    /// Hold `peer`'s messages for a while: they stay queued (in the store), in order; the
    /// others go on.
    fn pause(&mut self, peer: String) {
        if self.paused.contains_key(&peer) {
            self.pending.retain(|_, m| m.to != peer);
            return;
        }
        let mut backoff = self.pause_levels.remove(&peer).unwrap_or_default();
        let wait = backoff.next(&PAUSE, &mut self.rng);
        tracing::info!(
            peer = %peer,
            wait_ms = wait,
            "the broker asked to slow down for this peer (PUBACK 0x97 or similar); holding its messages"
        );
        self.pending.retain(|_, m| m.to != peer);
        self.paused.insert(
            peer,
            Paused {
                until: self.now + wait,
                backoff,
            },
        );
        // Messages beyond the page may now be for other peers: keep reading.
        self.complete = false;
    }

    fn received(
        &mut self,
        link: LinkId,
        pkid: Option<u16>,
        owner: String,
        msg: Result<WireMessage, String>,
    ) {
        if self.rx_link != Some(link) {
            // A new link: acknowledgements owed on the old one are void.
            self.rx_link = Some(link);
            self.rx_pos = 0;
            self.inbound.clear();
        }
        let msg = match msg {
            Ok(m) => Some(m),
            Err(why) => {
                // The engine said why (once per connection, in the log); here it is only
                // acknowledged in its turn.
                tracing::debug!(
                    "acknowledging and dropping {}",
                    crate::session::quote_external(&why, 200)
                );
                None
            }
        };
        let Some(pkid) = pkid else {
            // QoS 0: nothing to acknowledge; store it if it is a message.
            if let Some(m) = msg {
                self.actions.push_back(Action::Store {
                    link,
                    pkid: None,
                    owner,
                    msg: m,
                    order: None,
                });
            }
            return;
        };
        let stores = msg.is_some();
        let pos = self.rx_pos;
        self.rx_pos += 1;
        self.inbound.push_back(Inbound {
            pkid,
            pos,
            msg,
            owner,
            committed: !stores,
            storing: false,
            retry_at: None,
        });
        if stores {
            let i = self.inbound.len() - 1;
            // An earlier message of this link waits for a retry: this one waits with it and
            // goes to the store after it (sent now, it could be committed first — the store
            // holds later messages back only while the earlier one is being refused).
            match self.inbound.iter().filter_map(|e| e.retry_at).min() {
                Some(at) => self.inbound[i].retry_at = Some(at),
                None => self.store_inbound(i),
            }
        }
    }

    fn store_inbound(&mut self, i: usize) {
        let Some(link) = self.rx_link else { return };
        let e = &mut self.inbound[i];
        let Some(msg) = e.msg.clone() else { return };
        e.storing = true;
        self.actions.push_back(Action::Store {
            link,
            pkid: Some(e.pkid),
            owner: e.owner.clone(),
            msg,
            order: Some(e.pos),
        });
    }

    fn stored(
        &mut self,
        link: LinkId,
        pkid: Option<u16>,
        msg: WireMessage,
        result: Result<Option<Seq>, ()>,
    ) {
        let entry = match pkid {
            Some(p) if self.rx_link == Some(link) => self.inbound.iter_mut().find(|e| {
                e.pkid == p && e.storing && e.msg.as_ref().is_some_and(|m| m.id == msg.id)
            }),
            _ => None,
        };
        match result {
            Ok(new) => {
                if let Some(e) = entry {
                    e.storing = false;
                    e.committed = true;
                }
                self.store_backoff = Backoff::default();
                if let Some(seq) = new {
                    self.actions
                        .push_back(Action::Notify(MessageEvent::MessageReceived {
                            seq,
                            id: msg.id,
                            from: msg.from,
                            kind: msg.kind,
                            body: msg.body,
                            ts: msg.ts,
                        }));
                }
            }
            Err(()) => {
                if let Some(e) = entry {
                    e.storing = false;
                    let wait = self.store_backoff.next(&STORE_RETRY, &mut self.rng);
                    e.retry_at = Some(self.now + wait);
                }
            }
        }
        self.retry_inbound();
    }

    /// Acknowledge the committed prefix, publish, and read more of the outbox.
    fn step(&mut self) {
        if let Some(link) = self.rx_link {
            while self.inbound.front().is_some_and(|e| e.committed) {
                if let Some(e) = self.inbound.pop_front() {
                    self.actions.push_back(Action::Ack { link, pkid: e.pkid });
                }
            }
        }
        if self.hold_until.is_some() {
            return;
        }
        if let (Some(link), Some(_)) = (self.link, self.owner.as_ref()) {
            // One message in flight per peer, up to WINDOW across peers: a broker may refuse
            // one for now (0x97) and accept the next, so a second one in flight to the same
            // peer could overtake the first (the courier's simulator found exactly that).
            let mut busy: BTreeSet<&str> =
                self.inflight.values().map(|f| f.msg.to.as_str()).collect();
            let mut picked = Vec::new();
            for (seq, m) in &self.pending {
                if self.inflight.len() + picked.len() >= WINDOW {
                    break;
                }
                // Earlier messages to a peer go first: a peer with one in flight or one
                // picked, or paused, waits.
                if self.paused.contains_key(&m.to) || !busy.insert(m.to.as_str()) {
                    continue;
                }
                picked.push(*seq);
            }
            for seq in picked {
                let Some(msg) = self.pending.remove(&seq) else {
                    continue;
                };
                self.inflight.insert(seq, Flight { msg: msg.clone() });
                self.actions.push_back(Action::Publish { link, seq, msg });
            }
        }
        if let Some(owner) = self.owner.clone()
            && self.loading.is_none()
            && !self.complete
            && self.held() < LOAD / 2
        {
            let token = self.next_token;
            self.next_token += 1;
            self.loading = Some(token);
            self.actions.push_back(Action::LoadOutbox {
                token,
                owner,
                after: self.cursor,
                limit: (LOAD - self.held()) as u32,
                skip: self.paused.keys().cloned().collect(),
            });
        }
    }
}
