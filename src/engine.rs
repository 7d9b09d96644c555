//! The engine: the session [`Machine`] and the message [`Courier`] under one pure type, and
//! every decision that joins them.
//!
//! Like quinn-proto's `Endpoint`, the engine is driven from outside and does no I/O: the
//! driver (`crate::driver`) feeds it [`Input`]s stamped with [`Now`] — a local request, a
//! fetched UserSig, something that happened on a connection, a store answer — calls
//! [`Engine::handle_timeout`] at [`Engine::poll_timeout`], and carries out the [`Action`]s it
//! drains with [`Engine::poll_action`]. The simulator (`crate::session::sim`) drives the very
//! same type.
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
    self, Action as SAction, ConnEnd, Input as SInput, Machine, Millis, Now, Proto, RequestError,
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

    /// Where the device publishes its status (retained) and its will: outside the inbox
    /// subtree, so the daemon never receives its own status. `.` in platform or instance is
    /// written `_` (NATS uses `.` as its subject separator).
    pub fn status_of(&self, user: &UserId, platform: &str, instance: &str) -> String {
        format!(
            "im/{}/d/{}/{}/{}/status",
            self.sdk_app_id,
            user,
            platform.replace('.', "_"),
            instance.replace('.', "_")
        )
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

/// This device, as its status on the broker describes it (docs/api.md, "Device status").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub platform: String,
    pub instance: String,
    /// imlinkd's version.
    pub version: String,
    /// The configured broker nodes, as shown (`mqtts://host:port`), by node number.
    pub nodes: Vec<String>,
    /// Publish the retained status and set the will (`broker.publish_status`).
    pub publish_status: bool,
}

/// The version of the status document.
pub const STATUS_DOC_VERSION: u32 = 1;

/// A connection that closes, without DISCONNECT, while a QoS 1 publish has waited this long
/// for its PUBACK ended because the broker could not store it (nats-server closes it after
/// 5 s without a JetStream ack: the elections after a node loss), not because another device
/// took the session over: it is `NetKind::Stalled`, which never counts toward a suspected
/// takeover. A takeover answers publishes until it closes; a broker this slow is not one.
pub const STALLED_AFTER: Millis = 4_000;

/// A will for a CONNECT: published by the broker, retained, if the connection ends without
/// a normal DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What an outgoing PUBLISH carries: a message of the outbox, or the device's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    Message(Seq),
    Status,
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
    /// A PUBLISH with the RETAIN flag arrived: a retained message the broker delivers at every
    /// subscription. A C2C message is never retained (a peer that retains one makes it come
    /// again at every login, as new once the store has evicted it), so it is acknowledged in
    /// its turn and dropped; its payload is not carried.
    Retained { topic: Vec<u8>, pkid: Option<u16> },
    /// A PUBLISH over the size limit arrived (the relay skipped its payload; with a packet id
    /// it must still be acknowledged, in its turn).
    Oversized {
        topic: Vec<u8>,
        pkid: Option<u16>,
        bytes: usize,
    },
    /// The local MQTT client gave our next PUBLISH this packet id (in the order it took them).
    OutPublish(u16),
    /// The local MQTT client would not take this PUBLISH (its queue is full).
    NotTaken(Out),
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
    /// [`StoreOp::Counts`] done (`None`: the store did not say).
    Counts {
        owner: String,
        counts: Option<crate::store::Counts>,
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
    /// Commit a received message once (by sender and id). `order`: its place in the arrival
    /// order on `link`: the store commits none after one it refused for room until that one
    /// is in (so the app sees messages in the order they arrived).
    Receive {
        link: LinkId,
        pkid: Option<u16>,
        owner: String,
        msg: WireMessage,
        order: Option<u64>,
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
    /// What `owner` has waiting (for the device status document).
    Counts { owner: String },
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
        device: Device,
    },
    SigFetched(SigInfo),
    SigFetchFailed(session::FetchFailure),
    /// Something happened on connection `link`.
    Link {
        link: LinkId,
        event: LinkEvent,
    },
    /// An app consumed messages (`ack_inbox`, `mark_read`): room may have been made for the
    /// received messages the store refused.
    StoreRoom,
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
    /// Open connection `link` (report its events as `Input::Link { link, .. }`), with this
    /// last will (retained, QoS 1).
    Connect {
        link: LinkId,
        user: UserId,
        fingerprint: String,
        target: session::Target,
        proto: Proto,
        will: Option<Will>,
    },
    /// Send SUBSCRIBE (QoS 1) for `filter` on `link`.
    Subscribe {
        link: LinkId,
        filter: String,
    },
    /// Publish QoS 1 on `link` (report `OutPublish` with its packet id, or `NotTaken(what)`).
    Publish {
        link: LinkId,
        what: Out,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
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
    /// Status documents published (retained).
    #[serde(default)]
    pub status_published: u64,
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
    /// The CONNECT carried the status will.
    will: bool,
    /// Publishes handed to the client, waiting for their packet id (with when they were).
    unnumbered: VecDeque<(Out, Millis)>,
    /// Packet id → what it carries and when it was handed over, until the PUBACK.
    pkids: HashMap<u16, (Out, Millis)>,
    /// The status document the broker holds from this link (without its `at`; serialized,
    /// as `Engine::counts_for`), and whether one is on its way; `status_refused`: the
    /// broker refused one (an ACL): no more tries on this link.
    status_sent: Option<Vec<u8>>,
    status_in_flight: bool,
    status_refused: bool,
    /// What was already said in the log about this link (one line per kind and link).
    warned_forged: bool,
    warned_invalid: bool,
    warned_oversized: bool,
    warned_retained: bool,
    warned_subscribe: bool,
}

pub struct Engine {
    machine: Machine,
    courier: Courier,
    topics: Topics,
    device: Device,
    link: Option<Link>,
    next_link: LinkId,
    now: Now,
    counters: MessageCounters,
    inbound_held: bool,
    /// The broker refused a CONNECT for its will (ejabberd: CONNACK 0x90 "Publishing to this
    /// will topic is forbidden"): the status is off until a reload, so an ACL that does not
    /// know the status topic never keeps a device from logging in.
    status_unwelcome: bool,
    /// The store's last word on what the session's user has waiting, for the status
    /// document: asked for before each document (a change of these alone publishes nothing),
    /// and whether an answer is on its way.
    counts: Option<(String, crate::store::Counts)>,
    counts_asked: bool,
    /// The document (without counts) the last answer was asked for, serialized: kept for the
    /// daemon's life, the two documents as `serde_json::Value` trees were some 5 KB of small
    /// heap blocks on an idle daemon (heaptrack), as JSON a few hundred bytes each; the map's
    /// keys are sorted, so equal documents serialize to equal bytes.
    counts_for: Option<Vec<u8>>,
    /// The status document's `since` (wall clock) for the phase that began at this boot-clock
    /// instant, kept while a fresh computation is within a second of it: the wall clock counts
    /// whole seconds and the boot clock milliseconds, out of phase, so `now.wall - elapsed`
    /// moves a second back and forth from one event to the next — and each move republished
    /// the retained status (the engine's simulator found most status publishes were that).
    since_wall: Option<(session::Millis, i64)>,
    actions: VecDeque<Action>,
}

impl Engine {
    pub fn new(
        machine: Machine,
        courier: Courier,
        topics: Topics,
        device: Device,
        now: Now,
    ) -> Engine {
        Engine {
            machine,
            courier,
            topics,
            device,
            link: None,
            next_link: 1,
            now,
            counters: MessageCounters::default(),
            inbound_held: false,
            status_unwelcome: false,
            counts: None,
            counts_asked: false,
            counts_for: None,
            since_wall: None,
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
        self.publish_status();
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
                device,
            } => {
                // Another SDKAppID, platform or instance means other topics (and another
                // will): only a new connection can use them.
                let reconnect = reconnect
                    || topics != self.topics
                    || device.platform != self.device.platform
                    || device.instance != self.device.instance
                    || device.publish_status != self.device.publish_status;
                self.topics = topics;
                self.device = device;
                self.status_unwelcome = false;
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
            Input::StoreRoom => self.courier_in(courier::Input::StoreRoom),
        }
        self.pump();
        self.publish_status();
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
                let will = self.status_on().then(|| Will {
                    topic: self.status_topic(&user),
                    payload: self.status_doc(&user, "offline", Some("connection lost"), true),
                });
                self.link = Some(Link {
                    id: link,
                    user: user.clone(),
                    up: false,
                    courier_up: false,
                    closing: false,
                    will: will.is_some(),
                    unnumbered: VecDeque::new(),
                    pkids: HashMap::new(),
                    status_sent: None,
                    status_in_flight: false,
                    status_refused: false,
                    warned_forged: false,
                    warned_invalid: false,
                    warned_oversized: false,
                    warned_retained: false,
                    warned_subscribe: false,
                });
                self.act(Action::Connect {
                    link,
                    user,
                    fingerprint,
                    target,
                    proto,
                    will,
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
                    let (link, user, up) = (l.id, l.user.clone(), l.up && !l.status_refused);
                    self.courier_in(courier::Input::LinkDown(link));
                    // A clean end says why, before the DISCONNECT (which suppresses the will);
                    // a planned reconnect (a new UserSig, a reload) says nothing: the device is
                    // back in a moment.
                    let since_ms = self.machine.snapshot().since_ms;
                    self.settle_since(since_ms);
                    let why = if self.machine.exiting() {
                        Some(("stopped", "service stopped"))
                    } else if self.machine.logged_out() || user != *self.machine.user() {
                        Some(("logged_out", "logged out"))
                    } else {
                        None
                    };
                    if let Some((state, reason)) = why.filter(|_| up && self.status_on()) {
                        let mut doc = self.with_counts(
                            self.status_value(&user, state, Some(reason), false),
                            &user,
                        );
                        doc["at"] = serde_json::json!(self.now.wall);
                        let payload = serde_json::to_vec(&doc).unwrap_or_default();
                        let topic = self.status_topic(&user);
                        let at = self.now.mono;
                        if let Some(l) = self.link.as_mut() {
                            l.unnumbered.push_back((Out::Status, at));
                        }
                        self.counters.status_published += 1;
                        self.act(Action::Publish {
                            link,
                            what: Out::Status,
                            topic,
                            payload,
                            retain: true,
                        });
                    }
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
                order,
            } => self.act(Action::Store(StoreOp::Receive {
                link,
                pkid,
                owner,
                msg,
                order,
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
        let at = self.now.mono;
        if let Some(l) = self.link.as_mut() {
            l.unnumbered.push_back((Out::Message(seq), at));
        }
        self.act(Action::Publish {
            link,
            what: Out::Message(seq),
            topic,
            payload,
            retain: false,
        });
    }

    fn act(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn status_topic(&self, user: &UserId) -> String {
        self.topics
            .status_of(user, &self.device.platform, &self.device.instance)
    }

    /// The status document (docs/api.md, "Device status") of `user`'s session, as
    /// `state`; `will`: the document the broker publishes if the connection is lost.
    fn status_doc(&self, user: &UserId, state: &str, reason: Option<&str>, will: bool) -> Vec<u8> {
        let mut v = self.status_value(user, state, reason, will);
        v["at"] = serde_json::json!(self.now.wall);
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The document without its `at` (what "changed" compares).
    fn status_value(
        &self,
        user: &UserId,
        state: &str,
        reason: Option<&str>,
        will: bool,
    ) -> serde_json::Value {
        let s = self.machine.snapshot();
        let wall_of = |mono: session::Millis| match self.since_wall {
            Some((m, w)) if m == mono => w,
            _ => self.wall_of(mono),
        };
        let broker = s.via.as_ref().map(|(t, _)| match t {
            session::Target::Node(i) => self
                .device
                .nodes
                .get(*i as usize)
                .cloned()
                .unwrap_or_default(),
            session::Target::Redirect(r) => format!(
                "mqtts://{}",
                session::quote_external(r, 80).trim_matches('"')
            ),
        });
        let user_sig = s.sig.as_ref().map(|g| {
            let renewal = if g.refreshing {
                "renewing"
            } else if s.renewal_failures > 0 {
                "failing"
            } else {
                "ok"
            };
            serde_json::json!({
                "expires_at": g.expires_at,
                "renewal": renewal,
                "failures": s.renewal_failures,
            })
        });
        serde_json::json!({
            "v": STATUS_DOC_VERSION,
            "state": state,
            "reason": reason,
            "phase": if will { None } else { Some(s.phase.as_str()) },
            "login_status": if will { session::login_status::LOGOUT } else { s.login_status },
            "user_id": user.as_str(),
            "platform": self.device.platform,
            "instance": self.device.instance,
            "version": self.device.version,
            "since": if will { self.now.wall } else { wall_of(s.since_ms) },
            "last_error": s.last_error.as_ref().map(|e| serde_json::json!({
                "class": e.class.as_str(),
                "code": e.code,
            })),
            "user_sig": user_sig,
            "broker": broker,
            "protocol": s.via.as_ref().map(|(_, p)| p.as_str()),
            "outbox_pending": serde_json::Value::Null,
            "inbox_unacked": serde_json::Value::Null,
        })
    }

    /// The wall-clock time of a boot-clock instant, from the two clocks now.
    fn wall_of(&self, mono: session::Millis) -> i64 {
        self.now.wall - (self.now.mono as i64 - mono as i64).div_euclid(1000)
    }

    /// Fix the `since` of the phase that began at `since_ms` (see [`Engine::since_wall`]): a
    /// new phase, or a wall clock that moved (a time sync), gives a new one; the second's
    /// jitter between the two clocks does not.
    fn settle_since(&mut self, since_ms: session::Millis) {
        let fresh = self.wall_of(since_ms);
        match self.since_wall {
            Some((m, w)) if m == since_ms && (fresh - w).abs() <= 1 => {}
            _ => self.since_wall = Some((since_ms, fresh)),
        }
    }

    /// `doc` with the store's counts for `user`, when it has them.
    fn with_counts(&self, mut doc: serde_json::Value, user: &UserId) -> serde_json::Value {
        if let Some((_, c)) = self.counts.as_ref().filter(|(o, _)| o == user.as_str()) {
            doc["outbox_pending"] = serde_json::json!(c.outbox_pending);
            doc["inbox_unacked"] = serde_json::json!(c.inbox_unacked);
        }
        doc
    }

    /// Publish the status when it changed (retained, QoS 1): one in flight at a time, the
    /// latest wins. Not before the broker answered the inbox SUBSCRIBE (the phase would
    /// change again at once), never on a link being closed.
    /// Whether the device status (and its will) is published.
    fn status_on(&self) -> bool {
        self.device.publish_status && !self.status_unwelcome
    }

    fn publish_status(&mut self) {
        if !self.status_on() {
            return;
        }
        let s = self.machine.snapshot();
        self.settle_since(s.since_ms);
        let Some(l) = self.link.as_ref() else { return };
        let ready = l.up
            && !l.closing
            && !l.status_in_flight
            && !l.status_refused
            && l.user == *self.machine.user()
            && matches!(
                s.phase,
                session::Phase::Online | session::Phase::Subscribing
            )
            && (s.inbox_subscribed || s.next_subscribe_ms.is_some());
        if !ready {
            return;
        }
        let user = l.user.clone();
        let value = self.status_value(&user, "online", None, false);
        let key = serde_json::to_vec(&value).unwrap_or_default();
        if l.status_sent.as_ref() == Some(&key) {
            return;
        }
        // First the store's counts for this very document (one question at a time).
        if self.counts_for.as_ref() != Some(&key) {
            if !self.counts_asked {
                self.counts_asked = true;
                self.counts_for = Some(key);
                self.act(Action::Store(StoreOp::Counts {
                    owner: user.to_string(),
                }));
            }
            return;
        }
        if self.counts_asked {
            return;
        }
        let mut doc = self.with_counts(value, &user);
        doc["at"] = serde_json::json!(self.now.wall);
        let payload = serde_json::to_vec(&doc).unwrap_or_default();
        let topic = self.status_topic(&user);
        let link = l.id;
        let at = self.now.mono;
        if let Some(l) = self.link.as_mut() {
            l.status_sent = Some(key);
            l.status_in_flight = true;
            l.unnumbered.push_back((Out::Status, at));
        }
        self.counters.status_published += 1;
        self.act(Action::Publish {
            link,
            what: Out::Status,
            topic,
            payload,
            retain: true,
        });
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
            LinkEvent::Retained { topic, pkid } => {
                let user = l.user.clone();
                self.counters.dropped_invalid += 1;
                if !std::mem::replace(&mut l.warned_retained, true) {
                    tracing::warn!(
                        topic = %session::quote_external(&String::from_utf8_lossy(&topic), 120),
                        "dropped a retained message on the inbox (a message is never retained: \
                         the broker would deliver it again at every login; acknowledged, further \
                         ones on this connection are only counted: status.messages.dropped_invalid)"
                    );
                }
                self.session(SInput::MessageReceived);
                self.courier_in(courier::Input::Received {
                    link,
                    pkid,
                    owner: user.to_string(),
                    msg: Err("a retained message".into()),
                });
            }
            LinkEvent::OutPublish(pkid) => {
                if let Some(out) = l.unnumbered.pop_front() {
                    l.pkids.insert(pkid, out);
                }
            }
            LinkEvent::NotTaken(what) => {
                // The last one handed over is the one not taken.
                if let Some(i) = l.unnumbered.iter().rposition(|(o, _)| *o == what) {
                    l.unnumbered.remove(i);
                }
                match what {
                    Out::Message(seq) => {
                        self.courier_in(courier::Input::PublishRefused { link, seq })
                    }
                    Out::Status => {
                        // Tried again at the next change or event.
                        l.status_in_flight = false;
                        l.status_sent = None;
                    }
                }
            }
            LinkEvent::PubAck { pkid, code } => match l.pkids.remove(&pkid).map(|(o, _)| o) {
                Some(Out::Message(seq)) => {
                    self.courier_in(courier::Input::PubAck { link, seq, code })
                }
                Some(Out::Status) => {
                    l.status_in_flight = false;
                    if code >= 0x80 && !std::mem::replace(&mut l.status_refused, true) {
                        tracing::warn!(
                            code = format!("0x{code:02X}"),
                            "the broker refused the device status (its ACL must let this \
                             device write its own status topic: docs/brokers.md); not \
                             publishing it again on this connection"
                        );
                    }
                }
                None => {}
            },
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
                let (closing, will, up) = (l.closing, l.will, l.up);
                // How long the oldest publish the broker had not answered had waited.
                let now = self.now.mono;
                let waited = l
                    .unnumbered
                    .iter()
                    .map(|(_, at)| *at)
                    .chain(l.pkids.values().map(|(_, at)| *at))
                    .min()
                    .map(|t| now.saturating_sub(t));
                self.link = None;
                self.courier_in(courier::Input::LinkDown(link));
                let end = match end {
                    // A broker whose ACL does not know the status topic refuses the will
                    // itself: connect without it from now on, at once, at no budget's cost.
                    ConnEnd::Refused {
                        code: code @ (0x90 | 0x9A | 0x9B),
                        reason,
                        ..
                    } if will && !up => {
                        self.status_unwelcome = true;
                        tracing::warn!(
                            code = format!("0x{code:02X}"),
                            "the broker refused the CONNECT's will (the device status topic{}); \
                             connecting without the device status until the config is reloaded \
                             (docs/brokers.md: let the device write its status topic)",
                            reason
                                .as_deref()
                                .map(|r| format!(": {}", session::quote_external(r, 120)))
                                .unwrap_or_default()
                        );
                        ConnEnd::Network {
                            kind: session::NetKind::Other,
                            detail: format!(
                                "the broker refused the status will (CONNACK 0x{code:02X}); \
                                 connecting without it"
                            ),
                        }
                    }
                    // A close while a QoS 1 publish had gone unanswered for `STALLED_AFTER`: the
                    // broker could not store it (nats-server closes such a connection after 5 s,
                    // as during the JetStream elections after a node loss), not another device
                    // taking the session over.
                    ConnEnd::Network {
                        kind: session::NetKind::Closed,
                        detail,
                    } if up && waited.is_some_and(|w| w >= STALLED_AFTER) => ConnEnd::Network {
                        kind: session::NetKind::Stalled,
                        detail: format!(
                            "{detail}, with a publish unanswered for {} (the broker could \
                                 not store it)",
                            session::human_ms(waited.unwrap_or_default())
                        ),
                    },
                    end => end,
                };
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
            StoreAnswer::Counts { owner, counts } => {
                self.counts_asked = false;
                self.counts = counts.map(|c| (owner, c));
            }
        }
    }
}

#[cfg(test)]
mod tests;
