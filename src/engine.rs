//! The engine: the session [`Machine`] and the message [`Courier`] under one pure type, and
//! every decision that joins them.
//!
//! Like quinn-proto's `Endpoint`, the engine is driven from outside and does no I/O: the
//! driver (`crate::driver`) feeds it [`Input`]s stamped with [`Now`] — a local request, a
//! fetched UserSig, something that happened on a connection, a store answer — calls
//! [`Engine::handle_timeout`] at [`Engine::poll_timeout`], and carries out the [`Action`]s it
//! drains with [`Engine::poll_action`]. The simulator (`crate::sim`) drives the very same type.
//!
//! What lives here, and nowhere else:
//! * the link numbering: every connection gets a [`LinkId`]; events of an older link are
//!   stale and ignored; every end of a connection arrives as one input
//!   ([`LinkEvent::Ended`]) and the engine knows whether it was closing it (then it is the
//!   machine's `Disconnected`) or not (the machine's `ConnectionEnded`);
//! * when the courier may publish (the link is up: CONNACK seen) and when it must stop
//!   (the machine closes or abandons the link, or it ends);
//! * the topics: where a message is published (`im/{app}/u/{peer}/in/{sender}`), what a
//!   PUBLISH on the inbox is (a message whose payload's `from` is the topic's sender, or
//!   something to acknowledge and drop: a forged sender, a malformed or oversized packet);
//! * the packet-id table: rumqttc numbers our PUBLISHes in the order it takes them
//!   ([`LinkEvent::OutPublish`]); a PUBACK settles the message with that number;
//! * the account the courier serves (whom the session logs in as) and the send gate (a
//!   send needs a login, or one under way), decided from the machine itself, never from a
//!   status copy that can trail it;
//! * the counters of what was received, sent, refused and dropped.
//!
//! Invariants (the simulator checks them after every step): the courier publishes only on
//! the link the machine has up; nothing is acknowledged on a link other than the one it
//! arrived on; a message is never handed to the app twice or lost (the store deduplicates,
//! the broker redelivers what was not acknowledged); the inbox subscription is part of the
//! session's state (phase `subscribing` until the broker grants it).

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::courier::{self, Courier, LinkId, MessageEvent, Seq};
use crate::identity::UserId;
use crate::message::{Kind, MessageError, WireMessage};
use crate::session::{
    self, Action as SAction, ConnEnd, Input as SInput, Machine, Now, Proto, RequestError,
    RequestId, SigInfo, Snapshot, codes,
};

/// Where the session's traffic goes, for one SDKAppID (brief §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topics {
    pub sdk_app_id: u64,
}

/// What a PUBLISH on the session's subscription is, by its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// `im/{app}/u/{me}/in/{sender}`: a message from `sender`.
    Message { sender: UserId },
    /// Anything else under the subscription (control notices, unknown layouts).
    Other,
}

impl Topics {
    /// Everything `user` receives: `im/{app}/u/{user}/#`.
    pub fn inbox_filter(&self, user: &UserId) -> String {
        format!("im/{}/u/{}/#", self.sdk_app_id, user)
    }

    /// Where a message from `sender` to `peer` is published: the sender is the last level,
    /// so a broker's ACL can pin it to the login (docs/brokers.md).
    pub fn inbox_of(&self, peer: &str, sender: &str) -> String {
        format!("im/{}/u/{}/in/{}", self.sdk_app_id, peer, sender)
    }

    /// Read the topic of a PUBLISH that reached `me`.
    pub fn arrival(&self, me: &UserId, topic: &[u8]) -> Arrival {
        let Ok(topic) = std::str::from_utf8(topic) else {
            return Arrival::Other;
        };
        let prefix = format!("im/{}/u/{}/in/", self.sdk_app_id, me);
        match topic.strip_prefix(&prefix).map(UserId::parse) {
            Some(Ok(sender)) => Arrival::Message { sender },
            _ => Arrival::Other,
        }
    }
}

/// Something that happened on connection `link` (the driver reports it as it happened; the
/// engine decides what it means).
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// CONNACK success (a refusal ends the connection: `Ended`).
    ConnAck { session_present: bool },
    /// A PUBLISH arrived. `pkid` is `None` for QoS 0.
    Publish {
        topic: Vec<u8>,
        pkid: Option<u16>,
        payload: Vec<u8>,
    },
    /// A PUBLISH over the size limit arrived (the relay skipped its payload; with a packet id
    /// it must still be acknowledged, in its turn).
    Oversized {
        topic: Vec<u8>,
        pkid: Option<u16>,
        bytes: usize,
    },
    /// The local MQTT client gave our next PUBLISH this packet id (in the order it took them).
    OutPublish(u16),
    /// The local MQTT client would not take the PUBLISH of `seq` (its queue is full).
    NotTaken(Seq),
    /// A PUBACK (3.1.1: code 0).
    PubAck { pkid: u16, code: u8 },
    /// The broker answered the inbox SUBSCRIBE.
    SubAck { granted: bool },
    /// Our DISCONNECT is on the wire.
    OutDisconnect,
    /// The connection is over (what the broker said, or the transport's error).
    Ended(ConnEnd),
}

/// A UserSig a local app brought with `login` (the secret stays with the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroughtSig {
    pub fingerprint: String,
    /// Whom it says it is for (a TLS-sig v2 identifier); `None` for formats that do not say.
    pub user: Option<UserId>,
    pub issued_at: Option<i64>,
    pub expires_at: Option<i64>,
}

/// A message a local app wants sent (`send_message`), before the engine knows whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub id: String,
    pub to: UserId,
    pub kind: Kind,
    pub body: String,
    /// Unix milliseconds.
    pub ts: i64,
}

/// Why a `send_message` was not taken: an IM code, or (for parameters the API could not
/// read) its JSON-RPC code, passed back as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: i64,
    pub message: String,
}

impl Refusal {
    pub fn im(code: u32, message: impl Into<String>) -> Refusal {
        Refusal {
            code: i64::from(code),
            message: message.into(),
        }
    }
}

/// A send committed to the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub id: String,
    pub seq: Seq,
    pub to: String,
}

/// Why the store did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFailure {
    /// Full and nothing to evict (as opposed to failing).
    pub full: bool,
    pub message: String,
}

/// What the store did (answers arrive in the order the requests went out).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreAnswer {
    /// [`StoreOp::Enqueue`] done.
    Enqueued {
        req: RequestId,
        owner: String,
        msg: WireMessage,
        result: Result<Seq, StoreFailure>,
    },
    /// [`StoreOp::Receive`] done: `Ok(Some(seq))` new, `Ok(None)` a duplicate.
    Received {
        link: LinkId,
        pkid: Option<u16>,
        msg: WireMessage,
        result: Result<Option<Seq>, StoreFailure>,
    },
    /// [`StoreOp::LoadOutbox`] done.
    OutboxPage {
        token: u64,
        page: Vec<(Seq, WireMessage)>,
        complete: bool,
    },
    OutboxFailed {
        token: u64,
    },
    /// [`StoreOp::Settle`] done (`committed` false: it failed).
    Settled {
        seq: Seq,
        committed: bool,
    },
}

/// What to ask the store (it answers with a [`StoreAnswer`], in request order).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// Queue an outgoing message (a `send_message`).
    Enqueue {
        req: RequestId,
        owner: String,
        msg: WireMessage,
    },
    /// Commit a received message once (by sender and id).
    Receive {
        link: LinkId,
        pkid: Option<u16>,
        owner: String,
        msg: WireMessage,
    },
    /// Queued messages of `owner` with seq > `after`, oldest first, up to `limit`, leaving
    /// out messages to the `skip` peers.
    LoadOutbox {
        token: u64,
        owner: String,
        after: Seq,
        limit: u32,
        skip: Vec<String>,
    },
    /// Record how a send ended.
    Settle {
        owner: String,
        seq: Seq,
        id: String,
        outcome: courier::Outcome,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The daemon started: log in if `login_on_start`.
    Start,
    /// A cached UserSig was found at start (give before `Start`).
    CachedSig(SigInfo),
    /// `login` (optionally as another user: account switch; optionally with a UserSig).
    Login {
        id: RequestId,
        user: Option<UserId>,
        sig: Option<BroughtSig>,
    },
    Logout {
        id: RequestId,
    },
    /// SIGTERM: disconnect cleanly, then [`Action::Exit`].
    Shutdown,
    /// The config was reloaded (see [`session::Input::Reconfigured`]).
    Reconfigured {
        policy: session::Policy,
        user: UserId,
        reconnect: bool,
        topics: Topics,
    },
    SigFetched(SigInfo),
    SigFetchFailed(session::FetchFailure),
    /// Something happened on connection `link`.
    Link {
        link: LinkId,
        event: LinkEvent,
    },
    /// `send_message`: the message, or why the API could not read it (answered only once
    /// the send gate let it through: a logged-out daemon says 6014 first).
    Send {
        id: RequestId,
        draft: Result<Draft, Refusal>,
    },
    Store(StoreAnswer),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch a UserSig for `user`; answer `SigFetched` or `SigFetchFailed`.
    FetchSig {
        user: UserId,
    },
    CancelFetch,
    /// Open connection `link` (report its events as `Input::Link { link, .. }`).
    Connect {
        link: LinkId,
        user: UserId,
        fingerprint: String,
        target: session::Target,
        proto: Proto,
    },
    /// Send SUBSCRIBE (QoS 1) for `filter` on `link`.
    Subscribe {
        link: LinkId,
        filter: String,
    },
    /// Publish QoS 1 on `link` (report `OutPublish` with its packet id, or `NotTaken(seq)`).
    Publish {
        link: LinkId,
        seq: Seq,
        topic: String,
        payload: Vec<u8>,
    },
    /// PUBACK `pkid` on `link`.
    Ack {
        link: LinkId,
        pkid: u16,
    },
    /// Send DISCONNECT on `link` and keep reading until the broker closes (report `Ended`).
    Disconnect {
        link: LinkId,
    },
    /// Drop `link` now, without waiting. No report.
    Abandon {
        link: LinkId,
    },
    /// Store the sig with this fingerprint (issued for `user`) in the cache (0600, atomic).
    PersistSig {
        fingerprint: String,
        user: UserId,
    },
    ForgetSig,
    /// The engine will never name this sig again.
    ReleaseSig {
        fingerprint: String,
    },
    /// Tell the API, systemd and the log.
    Emit(session::Event),
    /// Answer a `login`/`logout`.
    Reply {
        id: RequestId,
        result: Result<(), RequestError>,
    },
    /// Answer a `send_message`.
    SendReply {
        id: RequestId,
        result: Result<Queued, Refusal>,
    },
    Store(StoreOp),
    /// Tell local apps about a message (after its commit).
    Notify(MessageEvent),
    Exit,
}

/// Counters of the message traffic (status, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageCounters {
    /// Messages received and committed (new ones, not redeliveries).
    pub received: u64,
    /// Messages the broker acknowledged as sent.
    pub sent: u64,
    /// Messages refused for good.
    pub failed: u64,
    /// PUBLISHes on the inbox whose payload's sender is not the topic's: acknowledged and
    /// dropped.
    pub dropped_forged: u64,
    /// PUBLISHes over the size limit: acknowledged and dropped, the connection kept.
    pub dropped_oversized: u64,
    /// PUBLISHes that are not a message (or not for us): acknowledged and dropped.
    pub dropped_invalid: u64,
}

/// What the engine shows (the session's snapshot, and the messages').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSnapshot {
    pub session: Snapshot,
    pub messages: MessageCounters,
    /// Outgoing messages published and not yet acknowledged.
    pub in_flight: usize,
    /// The store refused the last received message for space: inbound messages wait at the
    /// broker (unacknowledged) until room is made.
    pub inbound_held: bool,
}

/// The connection the engine has open.
#[derive(Debug)]
struct Link {
    id: LinkId,
    user: UserId,
    /// CONNACK seen.
    up: bool,
    /// The courier has been told it may publish on it.
    courier_up: bool,
    /// Our DISCONNECT was asked for: its end is the machine's `Disconnected`.
    closing: bool,
    /// Publishes handed to the client, waiting for their packet id.
    unnumbered: VecDeque<Seq>,
    /// Packet id → the courier's seq, until the PUBACK.
    pkids: HashMap<u16, Seq>,
    /// What was already said in the log about this link (one line per kind and link).
    warned_forged: bool,
    warned_invalid: bool,
    warned_oversized: bool,
    warned_subscribe: bool,
}

pub struct Engine {
    machine: Machine,
    courier: Courier,
    topics: Topics,
    link: Option<Link>,
    next_link: LinkId,
    now: Now,
    counters: MessageCounters,
    inbound_held: bool,
    actions: VecDeque<Action>,
}

impl Engine {
    pub fn new(machine: Machine, courier: Courier, topics: Topics, now: Now) -> Engine {
        Engine {
            machine,
            courier,
            topics,
            link: None,
            next_link: 1,
            now,
            counters: MessageCounters::default(),
            inbound_held: false,
            actions: VecDeque::new(),
        }
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn courier(&self) -> &Courier {
        &self.courier
    }

    pub fn topics(&self) -> Topics {
        self.topics
    }

    /// The link the engine has open, if any.
    pub fn link(&self) -> Option<LinkId> {
        self.link.as_ref().map(|l| l.id)
    }

    pub fn snapshot(&self) -> EngineSnapshot {
        EngineSnapshot {
            session: self.machine.snapshot(),
            messages: self.counters.clone(),
            in_flight: self.courier.in_flight(),
            inbound_held: self.inbound_held,
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next instant [`Engine::handle_timeout`] should be called at.
    pub fn poll_timeout(&self) -> Option<session::Millis> {
        [self.machine.poll_timeout(), self.courier.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        self.machine.handle_timeout(now);
        self.courier.handle_timeout(now.mono);
        self.pump();
    }

    pub fn handle(&mut self, now: Now, input: Input) {
        self.now = now;
        match input {
            Input::Start => self.session(SInput::Start),
            Input::CachedSig(info) => self.session(SInput::CachedSig(info)),
            Input::Login { id, user, sig } => {
                // Whom a brought sig is checked against: the user asked for, else whom the
                // session logs in as now (the machine's word, not a status copy).
                let target = user.clone().unwrap_or_else(|| self.machine.user().clone());
                let sig = sig.map(|b| SigInfo {
                    fingerprint: b.fingerprint,
                    user_id: b.user.unwrap_or(target),
                    issued_at: b.issued_at,
                    expires_at: b.expires_at,
                    // No issuer's clock to compare with: the wall clock is the reference.
                    server_now: now.wall,
                    received_at: now.mono,
                    wall_anchored: true,
                });
                self.session(SInput::Login { id, user, sig })
            }
            Input::Logout { id } => self.session(SInput::Logout { id }),
            Input::Shutdown => self.session(SInput::Shutdown),
            Input::Reconfigured {
                policy,
                user,
                reconnect,
                topics,
            } => {
                // Another SDKAppID means other topics: only a new connection can use them.
                let reconnect = reconnect || topics != self.topics;
                self.topics = topics;
                self.session(SInput::Reconfigured {
                    policy,
                    user,
                    reconnect,
                })
            }
            Input::SigFetched(info) => self.session(SInput::SigFetched(info)),
            Input::SigFetchFailed(f) => self.session(SInput::SigFetchFailed(f)),
            Input::Link { link, event } => self.on_link(link, event),
            Input::Send { id, draft } => self.on_send(id, draft),
            Input::Store(answer) => self.on_store(answer),
        }
        self.pump();
    }

    // --- routing ------------------------------------------------------------------------

    fn session(&mut self, input: SInput) {
        self.machine.handle(self.now, input);
    }

    fn courier_in(&mut self, input: courier::Input) {
        self.courier.handle(self.now.mono, input);
    }

    /// Route what the machines asked for until neither has anything more to say.
    fn pump(&mut self) {
        loop {
            if let Some(a) = self.machine.poll_action() {
                self.route_session(a);
                continue;
            }
            // The courier sends the outbox of whom the session logs in as.
            let user = self.machine.user().as_str();
            if self.courier.owner() != Some(user) {
                let owner = Some(user.to_string());
                self.courier_in(courier::Input::Account(owner));
            }
            if let Some(a) = self.courier.poll_action() {
                self.route_courier(a);
                continue;
            }
            break;
        }
    }

    fn route_session(&mut self, a: SAction) {
        match a {
            SAction::FetchSig { user } => self.act(Action::FetchSig { user }),
            SAction::CancelFetch => self.act(Action::CancelFetch),
            SAction::Connect {
                user,
                fingerprint,
                target,
                proto,
            } => {
                if let Some(old) = self.link.take() {
                    // Cannot happen (the machine connects only with no connection): fail safe.
                    self.courier_in(courier::Input::LinkDown(old.id));
                    self.act(Action::Abandon { link: old.id });
                }
                let link = self.next_link;
                self.next_link += 1;
                self.link = Some(Link {
                    id: link,
                    user: user.clone(),
                    up: false,
                    courier_up: false,
                    closing: false,
                    unnumbered: VecDeque::new(),
                    pkids: HashMap::new(),
                    warned_forged: false,
                    warned_invalid: false,
                    warned_oversized: false,
                    warned_subscribe: false,
                });
                self.act(Action::Connect {
                    link,
                    user,
                    fingerprint,
                    target,
                    proto,
                });
            }
            SAction::Subscribe { user } => {
                let filter = self.topics.inbox_filter(&user);
                let Some(l) = self.link.as_mut().filter(|l| l.up && !l.closing) else {
                    return;
                };
                let link = l.id;
                let first = !l.courier_up;
                l.courier_up = true;
                self.act(Action::Subscribe { link, filter });
                if first {
                    // The session is up: the courier may publish on it.
                    self.courier_in(courier::Input::LinkUp(link));
                }
            }
            SAction::Disconnect => match self.link.as_mut() {
                Some(l) => {
                    l.closing = true;
                    let link = l.id;
                    self.courier_in(courier::Input::LinkDown(link));
                    self.act(Action::Disconnect { link });
                }
                // Nothing to close: done already.
                None => self.session(SInput::Disconnected),
            },
            SAction::Abandon => {
                if let Some(l) = self.link.take() {
                    self.courier_in(courier::Input::LinkDown(l.id));
                    self.act(Action::Abandon { link: l.id });
                }
            }
            SAction::PersistSig { fingerprint, user } => {
                self.act(Action::PersistSig { fingerprint, user })
            }
            SAction::ForgetSig => self.act(Action::ForgetSig),
            SAction::ReleaseSig { fingerprint } => self.act(Action::ReleaseSig { fingerprint }),
            SAction::Emit(e) => self.act(Action::Emit(e)),
            SAction::Reply { id, result } => self.act(Action::Reply { id, result }),
            SAction::Exit => self.act(Action::Exit),
        }
    }

    fn route_courier(&mut self, a: courier::Action) {
        match a {
            courier::Action::Publish { link, seq, msg } => self.publish(link, seq, msg),
            courier::Action::Ack { link, pkid } => {
                if self.link.as_ref().is_some_and(|l| l.id == link && l.up) {
                    self.act(Action::Ack { link, pkid });
                }
            }
            courier::Action::Notify(e) => {
                match &e {
                    MessageEvent::MessageReceived { .. } => {
                        self.counters.received += 1;
                        self.inbound_held = false;
                    }
                    MessageEvent::MessageSent { .. } => self.counters.sent += 1,
                    MessageEvent::MessageFailed { .. } => self.counters.failed += 1,
                }
                self.act(Action::Notify(e));
            }
            courier::Action::LoadOutbox {
                token,
                owner,
                after,
                limit,
                skip,
            } => self.act(Action::Store(StoreOp::LoadOutbox {
                token,
                owner,
                after,
                limit,
                skip,
            })),
            courier::Action::Settle {
                owner,
                seq,
                id,
                outcome,
            } => self.act(Action::Store(StoreOp::Settle {
                owner,
                seq,
                id,
                outcome,
            })),
            courier::Action::Store {
                link,
                pkid,
                owner,
                msg,
            } => self.act(Action::Store(StoreOp::Receive {
                link,
                pkid,
                owner,
                msg,
            })),
        }
    }

    /// Publish one message of the outbox on the current link.
    fn publish(&mut self, link: LinkId, seq: Seq, msg: WireMessage) {
        let current = self
            .link
            .as_ref()
            .is_some_and(|l| l.id == link && l.up && !l.closing);
        if !current {
            return self.courier_in(courier::Input::PublishRefused { link, seq });
        }
        let payload = match msg.encode() {
            Ok(p) => p,
            Err(e) => {
                // Checked when it was sent; a stored message cannot grow. Fail it for good.
                tracing::error!(id = %msg.id, "cannot send a stored message: {e}");
                return self.courier_in(courier::Input::PubAck {
                    link,
                    seq,
                    code: 0x99,
                });
            }
        };
        let topic = self.topics.inbox_of(&msg.to, &msg.from);
        if let Some(l) = self.link.as_mut() {
            l.unnumbered.push_back(seq);
        }
        self.act(Action::Publish {
            link,
            seq,
            topic,
            payload,
        });
    }

    fn act(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    // --- inputs -------------------------------------------------------------------------

    fn on_link(&mut self, link: LinkId, event: LinkEvent) {
        let Some(l) = self.link.as_mut().filter(|l| l.id == link) else {
            return; // stale: a link the engine already let go of
        };
        match event {
            LinkEvent::ConnAck { session_present } => {
                if !l.up {
                    l.up = true;
                    self.session(SInput::Connected { session_present });
                }
            }
            LinkEvent::Publish {
                topic,
                pkid,
                payload,
            } => self.on_publish(link, topic, pkid, payload),
            LinkEvent::Oversized { topic, pkid, bytes } => {
                let user = l.user.clone();
                self.counters.dropped_oversized += 1;
                if !std::mem::replace(&mut l.warned_oversized, true) {
                    tracing::warn!(
                        bytes,
                        topic = %session::quote_external(&String::from_utf8_lossy(&topic), 120),
                        "dropped a PUBLISH over the size limit (acknowledged, the connection kept; \
                         further ones on this connection are only counted)"
                    );
                }
                self.session(SInput::MessageReceived);
                self.courier_in(courier::Input::Received {
                    link,
                    pkid,
                    owner: user.to_string(),
                    msg: Err(format!("a PUBLISH of {bytes} bytes, over the size limit")),
                });
            }
            LinkEvent::OutPublish(pkid) => {
                if let Some(seq) = l.unnumbered.pop_front() {
                    l.pkids.insert(pkid, seq);
                }
            }
            LinkEvent::NotTaken(seq) => {
                l.unnumbered.retain(|s| *s != seq);
                self.courier_in(courier::Input::PublishRefused { link, seq });
            }
            LinkEvent::PubAck { pkid, code } => {
                if let Some(seq) = l.pkids.remove(&pkid) {
                    self.courier_in(courier::Input::PubAck { link, seq, code });
                }
            }
            LinkEvent::SubAck { granted } => {
                if !granted && !std::mem::replace(&mut l.warned_subscribe, true) {
                    tracing::warn!(
                        "the broker refused the inbox subscription: messages to this user do not \
                         arrive until it is granted; retrying with backoff (a cluster electing a \
                         leader does this for a while; if it lasts, check the broker's ACL: \
                         docs/brokers.md)"
                    );
                }
                if granted {
                    l.warned_subscribe = false;
                }
                self.session(SInput::SubAck { granted });
            }
            LinkEvent::OutDisconnect => {
                // DISCONNECT is on the wire. Keep reading until the broker closes its side (it
                // must, after a DISCONNECT): dropping the socket now, with anything unread in
                // flight, would send a TCP reset that can destroy the DISCONNECT on the broker's
                // side and turn a clean logout into a lost connection (and a published will).
                // The machine's close timeout bounds the wait.
            }
            LinkEvent::Ended(end) => {
                let closing = l.closing;
                self.link = None;
                self.courier_in(courier::Input::LinkDown(link));
                if closing {
                    self.session(SInput::Disconnected);
                } else {
                    self.session(SInput::ConnectionEnded(end));
                }
            }
        }
    }

    fn on_publish(&mut self, link: LinkId, topic: Vec<u8>, pkid: Option<u16>, payload: Vec<u8>) {
        let Some(l) = self.link.as_mut().filter(|l| l.id == link) else {
            return;
        };
        let me = l.user.clone();
        let msg = match self.topics.arrival(&me, &topic) {
            Arrival::Other => Err(format!(
                "a PUBLISH on {}, not on the inbox",
                session::quote_external(&String::from_utf8_lossy(&topic), 120)
            )),
            Arrival::Message { sender } => match WireMessage::decode(&payload, &me) {
                Ok(m) if m.from == sender.as_str() => Ok(m),
                // The topic names the sender the broker let publish there (its ACL pins it
                // to the login); a payload claiming someone else is forged.
                Ok(m) => Err(format!(
                    "a message on {sender}'s topic that claims to be from {}: a forged sender",
                    session::quote_external(&m.from, 40)
                )),
                Err(MessageError::NotForMe) => Err("a message addressed to another user".into()),
                Err(e) => Err(e.to_string()),
            },
        };
        if let Err(why) = &msg {
            let forged = why.ends_with("a forged sender");
            let warned = if forged {
                self.counters.dropped_forged += 1;
                &mut l.warned_forged
            } else {
                self.counters.dropped_invalid += 1;
                &mut l.warned_invalid
            };
            if !std::mem::replace(warned, true) {
                tracing::warn!(
                    "dropped {why} (acknowledged; further ones on this connection are only \
                     counted: status.messages)"
                );
            }
        }
        self.session(SInput::MessageReceived);
        self.courier_in(courier::Input::Received {
            link,
            pkid,
            owner: me.to_string(),
            msg,
        });
    }

    fn on_send(&mut self, id: RequestId, draft: Result<Draft, Refusal>) {
        let refuse = |r: Refusal| Action::SendReply { id, result: Err(r) };
        // Like the SDK: sending needs a login, or one under way (offline sends are queued).
        if self.machine.login_status() == session::login_status::LOGOUT {
            return self.act(refuse(Refusal::im(
                codes::NOT_LOGGED_IN,
                "not logged in: sending needs a login (or one in progress; sends made while \
                 offline are queued); run `imlinkctl login`",
            )));
        }
        let draft = match draft {
            Ok(d) => d,
            Err(r) => return self.act(refuse(r)),
        };
        let owner = self.machine.user().to_string();
        let msg = WireMessage {
            id: draft.id,
            from: owner.clone(),
            to: draft.to.to_string(),
            kind: draft.kind,
            body: draft.body,
            ts: draft.ts,
        };
        match msg.encode() {
            Ok(_) => {}
            Err(MessageError::TooLarge(n)) => {
                return self.act(refuse(Refusal::im(
                    courier::codes::MSG_TOO_LARGE,
                    format!(
                        "the message is {n} bytes encoded; at most {} (12 KB) are allowed: it \
                         was not stored or sent",
                        crate::message::MAX_MESSAGE_BYTES
                    ),
                )));
            }
            Err(e) => {
                return self.act(refuse(Refusal::im(
                    codes::INVALID_PARAMETERS,
                    e.to_string(),
                )));
            }
        }
        self.act(Action::Store(StoreOp::Enqueue {
            req: id,
            owner,
            msg,
        }));
    }

    fn on_store(&mut self, answer: StoreAnswer) {
        match answer {
            StoreAnswer::Enqueued {
                req,
                owner,
                msg,
                result,
            } => match result {
                Ok(seq) => {
                    self.act(Action::SendReply {
                        id: req,
                        result: Ok(Queued {
                            id: msg.id.clone(),
                            seq,
                            to: msg.to.clone(),
                        }),
                    });
                    self.courier_in(courier::Input::Enqueued { owner, seq, msg });
                }
                Err(f) => {
                    let code = if f.full {
                        courier::codes::STORE_FULL
                    } else {
                        courier::codes::STORE_FAILED
                    };
                    self.act(Action::SendReply {
                        id: req,
                        result: Err(Refusal::im(code, f.message)),
                    });
                }
            },
            StoreAnswer::Received {
                link,
                pkid,
                msg,
                result,
            } => {
                if let Err(f) = &result {
                    self.inbound_held = f.full;
                }
                self.courier_in(courier::Input::Stored {
                    link,
                    pkid,
                    msg,
                    result: result.map_err(|_| ()),
                });
            }
            StoreAnswer::OutboxPage {
                token,
                page,
                complete,
            } => self.courier_in(courier::Input::OutboxPage {
                token,
                page,
                complete,
            }),
            StoreAnswer::OutboxFailed { token } => {
                self.courier_in(courier::Input::OutboxFailed { token })
            }
            StoreAnswer::Settled { seq, committed } => {
                self.courier_in(courier::Input::Settled { seq, committed })
            }
        }
    }
}

#[cfg(test)]
mod tests;
