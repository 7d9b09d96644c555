//! Broker and provisioning state shared by every connection: sessions, live connections,
//! counters, fault switches, and the login admission rules of the wire contract (brief §2).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, watch};

use crate::acl::Identity;
use crate::codec::{self, Connect, Props, Publish, Will, reason};

/// Per-user counters that tests assert on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserCounters {
    /// CONNECT packets received with this username (accepted or not).
    pub connect_attempts: u64,
    /// CONNECTs answered with CONNACK success.
    pub logins_accepted: u64,
    /// Refused CONNECTs by CONNACK reason code (`"0x87"` → count).
    pub refusals: BTreeMap<String, u64>,
    /// Provisioning requests naming this user (whatever the answer).
    pub provision_requests: u64,
    /// Provisioning requests answered 200 with a UserSig.
    pub sigs_issued: u64,
    /// Sessions the client ended with DISCONNECT 0x00.
    pub disconnects_normal: u64,
    /// Connections that ended without a client DISCONNECT (socket closed, reset, timeout).
    pub connections_lost: u64,
    /// DISCONNECTs the sandbox sent, by reason code (`"0x8E"` → count).
    pub server_disconnects: BTreeMap<String, u64>,
    /// Wills published for this user's sessions.
    pub wills_published: u64,
    /// Retained PUBLISHes of this user the broker kept (or, with an empty payload, that
    /// deleted the retained message of their topic).
    #[serde(default)]
    pub retained_published: u64,
    /// PUBLISH packets this user sent.
    pub messages_published: u64,
    /// This user's PUBLISHes refused, by PUBACK reason code (`"0x97"` → count).
    #[serde(default)]
    pub messages_refused: BTreeMap<String, u64>,
    /// Messages delivered to this user (QoS 1: acknowledged; QoS 0: written).
    pub messages_delivered: u64,
    /// SUBSCRIBE packets of this user, and those refused (SUBACK ≥ 0x80 for a filter).
    #[serde(default)]
    pub subscribes: u64,
    #[serde(default)]
    pub subscribes_refused: u64,
    /// Logins that presented a client certificate.
    pub client_cert_logins: u64,
}

/// Everything the sandbox counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub users: BTreeMap<String, UserCounters>,
    /// TLS handshakes that failed on the MQTT or provisioning listener.
    pub tls_handshake_failures: u64,
    /// MQTT packets that failed to decode or broke the protocol.
    pub protocol_errors: u64,
    /// HTTP requests that could not be parsed or were refused before routing.
    pub http_bad_requests: u64,
    /// MQTT connections open right now.
    pub connections_open: u64,
    /// Retained messages held now, and their bytes (topic + payload).
    #[serde(default)]
    pub retained: u64,
    #[serde(default)]
    pub retained_bytes: u64,
    /// Copies of a status message not queued for a subscriber whose queue was full (a status
    /// publisher is never refused for someone else's backlog).
    #[serde(default)]
    pub deliveries_dropped: u64,
}

impl Counters {
    /// This user's counters (zero when the user never showed up).
    pub fn user(&self, user: &str) -> UserCounters {
        self.users.get(user).cloned().unwrap_or_default()
    }
}

pub fn code_key(code: u8) -> String {
    format!("0x{code:02X}")
}

/// What the provisioning endpoint does wrong, on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ProvisionFault {
    /// Answer with this HTTP status (and `Retry-After` seconds, if given).
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Wait this long before answering normally.
    Delay { ms: u64 },
    /// 200 with a body that is not JSON.
    Malformed,
    /// 200 whose body stops half-way (Content-Length promises more), then the socket closes.
    Truncated,
    /// 200 with a 2 MiB body.
    Oversized,
    /// A correct answer sent with `Transfer-Encoding: chunked`.
    Chunked,
    /// A UserSig that had already expired when it was issued.
    ExpiredSig,
    /// A UserSig issued for another UserID.
    WrongUser,
    /// A UserSig issued for another SDKAppID.
    WrongApp,
    /// A `user_sig` that is not a TLS-sig-api v2 UserSig at all (an opaque token the broker
    /// refuses with 0x86 / 70003).
    GarbageSig,
    /// A well-formed UserSig for the right user and app, signed with the wrong key (the broker
    /// refuses it with 0x86 / 70009).
    WrongKey,
}

/// What the broker does right after accepting a login, on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum LoginFault {
    /// Send DISCONNECT with this reason code (e.g. 0xA0 "UserSig expired").
    Disconnect { code: u8 },
    /// Send DISCONNECT with this reason code and exactly this reason string (a hostile or
    /// careless broker: control characters, huge text, anything).
    DisconnectWith { code: u8, reason: String },
    /// Close the socket without a DISCONNECT (what mosquitto does on a takeover).
    Close,
}

/// A fault switch: how many more times it fires (`None`: until cleared), and for whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Armed<T> {
    pub fault: T,
    pub remaining: Option<u32>,
    pub user: Option<String>,
}

impl<T: Clone> Armed<T> {
    /// Fire for `user` if armed for them; consumes one use.
    pub fn fire(slot: &mut Option<Armed<T>>, user: &str) -> Option<T> {
        let armed = slot.as_mut()?;
        if armed.user.as_deref().is_some_and(|u| u != user) {
            return None;
        }
        let fault = armed.fault.clone();
        match &mut armed.remaining {
            Some(0) => {
                *slot = None;
                return None;
            }
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    *slot = None;
                }
            }
            None => {}
        }
        Some(fault)
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    pub refuse: Option<Armed<u8>>,
    /// SUBSCRIBEs answered with SUBACK 0x80 (a cluster electing a leader does this).
    pub refuse_subscribe: Option<Armed<()>>,
    pub on_login: Option<Armed<LoginFault>>,
    pub provision: Option<Armed<ProvisionFault>>,
}

/// A message waiting for (or in flight to) a session.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub qos: u8,
    pub properties: Vec<u8>,
    pub payload: Vec<u8>,
    pub dup: bool,
    pub pkid: u16,
    /// The RETAIN flag it goes out with: 1 for a retained message sent because of a new
    /// subscription; on live delivery, as published only under Retain As Published.
    pub retain: bool,
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sub {
    pub filter: String,
    /// The QoS granted.
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
}

/// A retained message (the last retained PUBLISH on its topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMsg {
    pub qos: u8,
    pub payload: Vec<u8>,
}

/// What the broker counts against its retained-message bounds for one message.
fn retained_size(topic: &str, payload: &[u8]) -> usize {
    topic.len() + payload.len()
}

/// Retained messages kept at most by default (see `SandboxOptions::max_retained`).
pub const MAX_RETAINED: usize = 100_000;
/// Their bytes at most by default (topic + payload).
pub const MAX_RETAINED_BYTES: usize = 64 * 1024 * 1024;

/// Why a retained PUBLISH was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainFull {
    pub max_messages: usize,
    pub max_bytes: usize,
}

/// An MQTT session (persists across connections when the client asks for it).
#[derive(Debug)]
pub struct Session {
    pub user: String,
    pub subs: Vec<Sub>,
    pub pending: VecDeque<Msg>,
    pub inflight: BTreeMap<u16, Msg>,
    pub next_pkid: u16,
    pub expiry: u32,
    pub receive_max: u16,
    /// The connection that owns the session now; `None` while offline.
    pub owner: Option<u64>,
    pub offline_since: Option<Instant>,
}

/// Messages a session keeps for an offline client by default (see `Settings::offline_limit`).
pub const MAX_PENDING: usize = 1000;
/// How long the service keeps a user's offline messages (a session's expiry is capped at it).
pub const RETENTION_SECS: u32 = 7 * 86_400;

/// The user of an inbox topic `im/{app}/u/{user}/in/{sender}`.
fn inbox_user(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix("im/")?;
    let mut l = rest.split('/');
    let (_app, u, user, inbox, sender) = (l.next()?, l.next()?, l.next()?, l.next()?, l.next()?);
    (u == "u" && inbox == "in" && l.next().is_none() && !user.is_empty() && !sender.is_empty())
        .then_some(user)
}

/// The `{platform}` of a client id `{sdk_app_id}:{user_id}:{platform}:{instance}`.
fn platform_of(client_id: &str, app: u64, user: &str) -> String {
    let prefix = format!("{app}:{user}:");
    client_id
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_default()
        .to_string()
}

/// Whether `topic` is a device status topic (`im/{app}/d/…`).
fn in_status_tree(topic: &str) -> bool {
    let mut l = topic.split('/');
    l.next() == Some("im") && l.next().is_some() && l.next() == Some("d")
}

/// Compare a presented secret with the expected one without an early exit on the first
/// differing byte.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Why a CONNECT's will is refused, if it is (after the login itself was accepted).
fn will_refusal(s: &Settings, c: &Connect, user: &str) -> Option<(u8, u32, String)> {
    let w = c.will.as_ref()?;
    if w.qos > 1 {
        return Some((
            reason::QOS_NOT_SUPPORTED,
            0,
            "the broker's maximum QoS is 1: the will may not ask for 2".into(),
        ));
    }
    if w.retain && !s.retain_available {
        return Some((
            reason::RETAIN_NOT_SUPPORTED,
            0,
            "this broker keeps no retained messages: set the will without Will Retain".into(),
        ));
    }
    if !codec::valid_topic(&w.topic) {
        return Some((
            reason::TOPIC_NAME_INVALID,
            0,
            "the will's topic is not a topic name".into(),
        ));
    }
    let who = Identity::Device {
        user: user.to_string(),
        status_topic: crate::acl::status_topic(s.sdk_app_id, &c.client_id, user),
    };
    let as_publish = Publish {
        dup: false,
        qos: w.qos,
        retain: w.retain,
        topic: w.topic.clone(),
        pkid: 0,
        properties: Vec::new(),
        payload: w.payload.clone(),
    };
    crate::acl::may_publish(s.sdk_app_id, &who, &as_publish)
        .err()
        .map(|(code, im, text)| (code, im, format!("the will: {text}")))
}

/// Why a message could not be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// A recipient's offline queue is full.
    QueueFull { user: String, limit: usize },
}

impl Session {
    fn new(user: &str) -> Self {
        Session {
            user: user.to_string(),
            subs: Vec::new(),
            pending: VecDeque::new(),
            inflight: BTreeMap::new(),
            next_pkid: 1,
            expiry: 0,
            receive_max: 32,
            owner: None,
            offline_since: None,
        }
    }

    fn expired(&self, now: Instant) -> bool {
        match self.offline_since {
            None => false,
            Some(_) if self.expiry == u32::MAX => false,
            Some(since) => now.duration_since(since) >= Duration::from_secs(self.expiry as u64),
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
            if !self.inflight.contains_key(&id) {
                return id;
            }
        }
    }
}

/// How a connection task is told to end.
#[derive(Debug, Clone)]
pub enum Kill {
    /// Send DISCONNECT with this code and reason string, then close.
    Disconnect { code: u8, text: String },
    /// Close the socket, no DISCONNECT.
    Drop,
}

#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub user: String,
    /// The `{platform}` part of the client id.
    pub platform: String,
    pub sig_hmac: String,
    pub flush: Arc<Notify>,
    pub kill: mpsc::UnboundedSender<Kill>,
    /// The connection's last will, until a normal DISCONNECT discards it. It lives here, not
    /// in the connection's task, so whoever ends the connection publishes it at that moment:
    /// a takeover publishes the old connection's will *before* the new one's CONNACK, so the
    /// new connection's first status is never overwritten by the old one's will.
    pub will: Option<Will>,
    /// An operator identity (reads the status tree, publishes nothing, no multi-login policy).
    pub operator: bool,
}

/// The mutable state behind one lock.
pub struct BrokerState {
    pub sessions: HashMap<String, Session>,
    pub conns: HashMap<String, ConnEntry>,
    pub next_conn_id: u64,
    pub counters: Counters,
    pub faults: Faults,
    pub banned: HashSet<String>,
    /// HMACs of UserSigs the sandbox was told to treat as expired.
    pub expired_sigs: HashSet<String>,
    /// HMACs issued per user (so "expire now" also covers sigs not yet used).
    pub issued: HashMap<String, Vec<String>>,
    /// Every UserSig text issued, so tests can check none leaks into a log.
    pub issued_texts: Vec<String>,
    /// UserSigs the provisioning endpoint returns as they are, per user (interop tests with a
    /// broker that holds a fixed password).
    pub pinned: HashMap<String, String>,
    pub failed_logins: HashMap<String, VecDeque<Instant>>,
    pub sig_lifetime: Duration,
    /// Seconds added to the provisioning server's clock (sig `time` and `Date`).
    pub provision_clock_offset: i64,
    /// How long the broker waits before sending a successful CONNACK (a slow link).
    pub connack_delay: Duration,
    /// CONNECTs accepted per second at most (`None`: no limit), and the current second's
    /// start and count.
    pub connect_rate: Option<u32>,
    pub rate_window: Option<(Instant, u32)>,
    /// C2C messages for users with no session subscribed to their inbox yet, kept for when
    /// one does (the IM service keeps offline messages per user).
    pub offline: HashMap<String, VecDeque<Msg>>,
    /// Send every server DISCONNECT in its short form (`E0 01 <code>`, no properties, so no
    /// reason string), as mosquitto ≥ 2.0.15 does, instead of the long form.
    pub short_disconnect: bool,
    /// The last retained PUBLISH per topic, and the bytes they hold (see [`retained_size`]).
    pub retained: BTreeMap<String, RetainedMsg>,
    pub retained_bytes: usize,
    /// Operator identities: name → token. An operator logs in with user name = name and
    /// password = token (any client id), may subscribe within `im/{app}/d/#` and may
    /// publish nothing.
    pub operators: HashMap<String, String>,
}

/// The seed's multi-terminal login policies: which platforms may be online at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiLogin {
    /// One platform at a time: a login on another platform kicks the others.
    Single,
    /// A mobile or desktop platform, plus the web.
    Dual,
    /// One mobile, one desktop and the web at once.
    Triple,
    /// Every platform at once.
    Multi,
}

impl MultiLogin {
    pub fn parse(s: &str) -> Option<MultiLogin> {
        match s {
            "single" => Some(MultiLogin::Single),
            "dual" => Some(MultiLogin::Dual),
            "triple" => Some(MultiLogin::Triple),
            "multi" => Some(MultiLogin::Multi),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MultiLogin::Single => "single",
            MultiLogin::Dual => "dual",
            MultiLogin::Triple => "triple",
            MultiLogin::Multi => "multi",
        }
    }

    /// Whether a login on `new` ends one on `old` (another platform).
    fn excludes(self, old: &str, new: &str) -> bool {
        if old == new {
            return false;
        }
        let class = |p: &str| match p {
            "android" | "ios" | "ipad" | "harmony" => "mobile",
            "web" | "miniprogram" => "web",
            _ => "desktop",
        };
        match self {
            MultiLogin::Single => true,
            MultiLogin::Dual => class(old) != "web" && class(new) != "web",
            MultiLogin::Triple => class(old) == class(new),
            MultiLogin::Multi => false,
        }
    }
}

/// Fixed settings of one sandbox.
#[derive(Clone)]
pub struct Settings {
    pub sdk_app_id: u64,
    pub multi_login: MultiLogin,
    /// At most this many instances of one platform online at once (0: no limit); a login
    /// beyond it kicks the earliest.
    pub max_instances_per_platform: usize,
    /// Messages kept for one user (or session) while they are offline; beyond it, PUBACK
    /// 0x97 (quota exceeded) instead of dropping the oldest.
    pub offline_limit: usize,
    pub secret_key: String,
    pub device_token: String,
    pub admin_token: String,
    pub max_packet_size: usize,
    pub failed_login_limit: u32,
    pub failed_login_window: Duration,
    /// Retained messages are supported (CONNACK Retain Available = 1). Without: a retained
    /// PUBLISH gets DISCONNECT 0x9A, a will with Will Retain CONNACK 0x9A (MQTT 5 §3.2.2.3.5).
    pub retain_available: bool,
    /// Bounds on the retained messages kept; a retained PUBLISH beyond them gets PUBACK 0x97.
    pub max_retained: usize,
    pub max_retained_bytes: usize,
}

pub struct Shared {
    pub settings: Settings,
    state: Mutex<BrokerState>,
    /// Bumped on every counter change, so waiters re-check without polling.
    changed: watch::Sender<u64>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The IM error code and text the sandbox puts in a refusal's reason string.
pub fn im_error_for(code: u8) -> (u32, &'static str) {
    match code {
        reason::NOT_AUTHORIZED => (70001, "UserSig expired"),
        reason::BAD_USERNAME_OR_PASSWORD => (70003, "UserSig check failed"),
        reason::BANNED => (70051, "account banned"),
        reason::CLIENT_ID_NOT_VALID => (6017, "client id not valid"),
        reason::CONNECTION_RATE_EXCEEDED => (70050, "too many failed logins, retry later"),
        reason::SESSION_TAKEN_OVER => (6208, "kicked offline by another login"),
        reason::ADMINISTRATIVE_ACTION => (6208, "kicked offline by an administrator"),
        reason::MAXIMUM_CONNECT_TIME => (70001, "UserSig expired"),
        reason::SERVER_BUSY => (9508, "server busy, retry later"),
        reason::SERVER_UNAVAILABLE => (9508, "server unavailable, retry later"),
        reason::SERVER_SHUTTING_DOWN => (9508, "server shutting down"),
        _ => (0, "refused"),
    }
}

/// Reason string and `im-error-code` user property for a refusal or server DISCONNECT.
pub fn im_props(code: u32, text: &str) -> Props {
    Props {
        reason_string: Some(format!("{code} {text}")),
        user: vec![("im-error-code".into(), code.to_string())],
        ..Props::default()
    }
}

/// The outcome of a CONNECT.
pub enum Admission {
    Refused {
        code: u8,
        props: Props,
    },
    Accepted {
        conn_id: u64,
        session_present: bool,
        assigned_client_id: Option<String>,
        /// 0 for an operator (no UserSig: the session has no expiry).
        sig_expires_at: u64,
        flush: Arc<Notify>,
        kill: mpsc::UnboundedReceiver<Kill>,
        after_login: Option<LoginFault>,
        /// Who it is, for the topic rules ([`crate::acl`]).
        identity: Identity,
    },
}

/// How a connection ended, for counters, wills and session bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Client sent DISCONNECT 0x00.
    Normal,
    /// Client sent DISCONNECT 0x04 (disconnect with will).
    WithWill,
    /// The sandbox sent DISCONNECT with this code.
    Server(u8),
    /// The socket closed or failed without a DISCONNECT.
    Lost,
}

impl Shared {
    pub fn new(settings: Settings, sig_lifetime: Duration) -> Arc<Shared> {
        let (changed, _) = watch::channel(0);
        Arc::new(Shared {
            settings,
            state: Mutex::new(BrokerState {
                sessions: HashMap::new(),
                conns: HashMap::new(),
                next_conn_id: 1,
                counters: Counters::default(),
                faults: Faults::default(),
                banned: HashSet::new(),
                expired_sigs: HashSet::new(),
                issued: HashMap::new(),
                issued_texts: Vec::new(),
                pinned: HashMap::new(),
                failed_logins: HashMap::new(),
                sig_lifetime,
                provision_clock_offset: 0,
                connack_delay: Duration::ZERO,
                short_disconnect: false,
                offline: HashMap::new(),
                connect_rate: None,
                rate_window: None,
                retained: BTreeMap::new(),
                retained_bytes: 0,
                operators: HashMap::new(),
            }),
            changed,
        })
    }

    /// Lock the state. A poisoned lock (a panic elsewhere) is recovered: the sandbox keeps
    /// serving rather than cascading the panic.
    pub fn lock(&self) -> MutexGuard<'_, BrokerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the state and wake everyone waiting on counters.
    pub fn update<R>(&self, f: impl FnOnce(&mut BrokerState) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        r
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// Decide on a CONNECT, in the order a real IM service checks.
    pub fn admit(&self, c: &Connect, has_client_cert: bool, now_unix: u64) -> Admission {
        let s = &self.settings;
        self.update(|st| {
            let user = c.username.clone().unwrap_or_default();
            st.counters
                .users
                .entry(user.clone())
                .or_default()
                .connect_attempts += 1;

            let refusal = st.refusal_for(s, c, &user, now_unix);
            if let Some((code, im_code, text)) = refusal {
                let uc = st.counters.users.entry(user.clone()).or_default();
                *uc.refusals.entry(code_key(code)).or_default() += 1;
                if code != reason::CONNECTION_RATE_EXCEEDED {
                    let now = Instant::now();
                    let q = st.failed_logins.entry(user).or_default();
                    q.push_back(now);
                    while q.len() > s.failed_login_limit as usize + 1 {
                        q.pop_front();
                    }
                }
                return Admission::Refused {
                    code,
                    props: im_props(im_code, &text),
                };
            }

            // Accepted: the sig verified above, so decode cannot fail here.
            let password = c.password.as_deref().unwrap_or_default();
            let sig_text = String::from_utf8_lossy(password);
            let decoded = imlink_usersig::decode(&sig_text).ok();
            let sig_expires_at = decoded.as_ref().map(|d| d.expires_at()).unwrap_or(0);
            let sig_hmac = decoded.map(|d| d.hmac_base64()).unwrap_or_default();

            let (client_id, assigned) = if c.client_id.is_empty() {
                let id = format!("auto-{}", st.next_conn_id);
                (id.clone(), Some(id))
            } else {
                (c.client_id.clone(), None)
            };
            let conn_id = st.next_conn_id;
            st.next_conn_id += 1;

            // Takeover: the older connection with this client id is told and closed, and its
            // will published now, before this connection's CONNACK.
            if let Some(old) = st.conns.remove(&client_id) {
                let (im, text) = im_error_for(reason::SESSION_TAKEN_OVER);
                let _ = old.kill.send(Kill::Disconnect {
                    code: reason::SESSION_TAKEN_OVER,
                    text: format!("{im} {text}"),
                });
                st.publish_will(s, old);
            }

            let operator = st.operators.contains_key(&user);
            // The multi-login policy (devices only): other platforms it excludes, and the
            // earliest instances of this platform beyond the limit, are kicked.
            let platform = if operator {
                String::new()
            } else {
                platform_of(&client_id, s.sdk_app_id, &user)
            };
            let mut same: Vec<(u64, String)> = Vec::new();
            let mut kicked: Vec<String> = Vec::new();
            for (cid, e) in st.conns.iter() {
                if operator || e.operator || e.user != user {
                    continue;
                }
                if s.multi_login.excludes(&e.platform, &platform) {
                    kicked.push(cid.clone());
                } else if e.platform == platform {
                    same.push((e.id, cid.clone()));
                }
            }
            if s.max_instances_per_platform > 0 && same.len() >= s.max_instances_per_platform {
                same.sort();
                let excess = same.len() + 1 - s.max_instances_per_platform;
                kicked.extend(same.into_iter().take(excess).map(|(_, cid)| cid));
            }
            for cid in kicked {
                if let Some(old) = st.conns.remove(&cid) {
                    let text = format!(
                        "6208 kicked by a newer login on {platform} (client {client_id}): the \
                         multi-login policy {} allows {} instance(s) per platform",
                        s.multi_login.as_str(),
                        if s.max_instances_per_platform == 0 {
                            "any number of".to_string()
                        } else {
                            s.max_instances_per_platform.to_string()
                        }
                    );
                    let _ = old.kill.send(Kill::Disconnect {
                        code: reason::SESSION_TAKEN_OVER,
                        text,
                    });
                    st.publish_will(s, old);
                }
            }

            let now = Instant::now();
            let reuse = !c.clean_start
                && st
                    .sessions
                    .get(&client_id)
                    .is_some_and(|sess| !sess.expired(now) && sess.user == user);
            if !reuse {
                st.sessions.remove(&client_id);
            }
            let session_present = reuse;
            let session = st
                .sessions
                .entry(client_id.clone())
                .or_insert_with(|| Session::new(&user));
            session.owner = Some(conn_id);
            session.offline_since = None;
            // The service keeps offline messages for its retention period at most.
            session.expiry = c.session_expiry.min(RETENTION_SECS);
            session.receive_max = c.receive_maximum.clamp(1, 1024);
            // Unacknowledged messages go out again first, marked DUP.
            let inflight = std::mem::take(&mut session.inflight);
            for (_, mut m) in inflight.into_iter().rev() {
                m.dup = true;
                session.pending.push_front(m);
            }

            let flush = Arc::new(Notify::new());
            let (kill_tx, kill_rx) = mpsc::unbounded_channel();
            let identity = if operator {
                Identity::Operator
            } else {
                Identity::Device {
                    user: user.clone(),
                    status_topic: crate::acl::status_topic(s.sdk_app_id, &client_id, &user),
                }
            };
            st.conns.insert(
                client_id,
                ConnEntry {
                    id: conn_id,
                    user: user.clone(),
                    platform,
                    sig_hmac,
                    flush: flush.clone(),
                    kill: kill_tx,
                    will: c.will.clone(),
                    operator,
                },
            );
            let after_login = Armed::fire(&mut st.faults.on_login, &user);
            let uc = st.counters.users.entry(user.clone()).or_default();
            uc.logins_accepted += 1;
            if has_client_cert {
                uc.client_cert_logins += 1;
            }
            st.counters.connections_open += 1;
            st.failed_logins.remove(&user);
            Admission::Accepted {
                conn_id,
                session_present,
                assigned_client_id: assigned,
                sig_expires_at,
                flush,
                kill: kill_rx,
                after_login,
                identity,
            }
        })
    }

    /// A normal DISCONNECT (0x00) discards the connection's will (MQTT 5 §3.1.2.5).
    pub fn discard_will(&self, client_id: &str, conn_id: u64) {
        self.update(|st| {
            if let Some(e) = st.conns.get_mut(client_id)
                && e.id == conn_id
            {
                e.will = None;
            }
        });
    }

    /// Bookkeeping when a connection ends: counters, the will (unless the connection ended
    /// with a normal DISCONNECT, or a takeover already published it), the session's fate.
    pub fn conn_ended(
        &self,
        client_id: &str,
        conn_id: u64,
        user: &str,
        ending: Ending,
        session_expiry: u32,
    ) {
        let s = &self.settings;
        self.update(|st| {
            st.counters.connections_open = st.counters.connections_open.saturating_sub(1);
            let uc = st.counters.users.entry(user.to_string()).or_default();
            match ending {
                Ending::Normal => uc.disconnects_normal += 1,
                Ending::WithWill => uc.disconnects_normal += 1,
                Ending::Server(code) => {
                    *uc.server_disconnects.entry(code_key(code)).or_default() += 1
                }
                Ending::Lost => uc.connections_lost += 1,
            }
            let entry = if st.conns.get(client_id).is_some_and(|e| e.id == conn_id) {
                st.conns.remove(client_id)
            } else {
                None
            };
            if let Some(sess) = st.sessions.get_mut(client_id)
                && sess.owner == Some(conn_id)
            {
                sess.owner = None;
                sess.expiry = session_expiry;
                sess.offline_since = Some(Instant::now());
                if session_expiry == 0 {
                    st.sessions.remove(client_id);
                }
            }
            if ending != Ending::Normal
                && let Some(entry) = entry
            {
                st.publish_will(s, entry);
            }
        });
    }

    /// Tell every connection of `user` to go, the given way. Returns how many were told.
    pub fn kill_user(&self, user: &str, kill: Kill) -> usize {
        self.update(|st| {
            st.conns
                .values()
                .filter(|e| e.user == user)
                .filter(|e| e.kill.send(kill.clone()).is_ok())
                .count()
        })
    }

    pub fn kill_all(&self, kill: Kill) -> usize {
        self.update(|st| {
            st.conns
                .values()
                .filter(|e| e.kill.send(kill.clone()).is_ok())
                .count()
        })
    }

    /// Treat every UserSig issued to or used by `user` so far as expired, and disconnect the
    /// user's sessions with 0xA0 / 70001.
    pub fn expire_user_sigs(&self, user: &str) -> usize {
        self.update(|st| {
            let issued = st.issued.remove(user).unwrap_or_default();
            st.expired_sigs.extend(issued);
            let live: Vec<String> = st
                .conns
                .values()
                .filter(|e| e.user == user)
                .map(|e| e.sig_hmac.clone())
                .collect();
            st.expired_sigs.extend(live);
        });
        let (im, text) = im_error_for(reason::MAXIMUM_CONNECT_TIME);
        self.kill_user(
            user,
            Kill::Disconnect {
                code: reason::MAXIMUM_CONNECT_TIME,
                text: format!("{im} {text}"),
            },
        )
    }

    /// Route a message to every matching session; returns how many sessions got it. A
    /// retained one is kept first (within the bounds; beyond them nothing is routed).
    pub fn publish(&self, msg: &Publish, from_client: Option<&str>) -> Result<usize, RetainFull> {
        let s = &self.settings;
        self.update(|st| {
            if msg.retain {
                st.retain(s, msg)?;
            }
            Ok(st.route(msg, from_client))
        })
    }

    /// Add (or replace) an operator identity.
    pub fn add_operator(&self, name: &str, token: &str) {
        self.update(|st| {
            st.operators.insert(name.to_string(), token.to_string());
        });
    }

    /// Remove an operator identity; its connections get DISCONNECT 0x98. Returns how many.
    pub fn remove_operator(&self, name: &str) -> usize {
        let known = self.update(|st| st.operators.remove(name).is_some());
        if !known {
            return 0;
        }
        let (im, text) = im_error_for(reason::ADMINISTRATIVE_ACTION);
        self.kill_user(
            name,
            Kill::Disconnect {
                code: reason::ADMINISTRATIVE_ACTION,
                text: format!("{im} {text}"),
            },
        )
    }

    /// The retained messages whose topics match `filter`, in topic order.
    pub fn retained(&self, filter: &str) -> Vec<(String, RetainedMsg)> {
        self.lock()
            .retained
            .iter()
            .filter(|(t, _)| codec::matches(filter, t))
            .map(|(t, m)| (t.clone(), m.clone()))
            .collect()
    }
}

impl BrokerState {
    /// The refusal (CONNACK code, IM code, text) for a CONNECT, or `None` to accept.
    fn refusal_for(
        &mut self,
        s: &Settings,
        c: &Connect,
        user: &str,
        now_unix: u64,
    ) -> Option<(u8, u32, String)> {
        let refuse = |code: u8| {
            let (im, text) = im_error_for(code);
            Some((code, im, text.to_string()))
        };
        if let Some(code) = Armed::fire(&mut self.faults.refuse, user) {
            return refuse(code);
        }
        if let Some(limit) = self.connect_rate {
            let now = Instant::now();
            let (start, n) = match self.rate_window {
                Some((start, n)) if now.duration_since(start) < Duration::from_secs(1) => {
                    (start, n)
                }
                _ => (now, 0),
            };
            self.rate_window = Some((start, n + 1));
            if n >= limit {
                return Some((
                    reason::CONNECTION_RATE_EXCEEDED,
                    70050,
                    format!("the service accepts {limit} logins per second; try again later"),
                ));
            }
        }
        if c.auth_method.is_some() {
            return Some((
                reason::BAD_AUTH_METHOD,
                0,
                "enhanced authentication is not supported".into(),
            ));
        }
        if user.is_empty() {
            return Some((
                reason::BAD_USERNAME_OR_PASSWORD,
                7003,
                "the user name must be the UserID".into(),
            ));
        }
        let operator_token = self.operators.get(user).cloned();
        let prefix = format!("{}:{}:", s.sdk_app_id, user);
        if operator_token.is_none()
            && (!c.client_id.starts_with(&prefix) || c.client_id.len() > 256)
        {
            return Some((
                reason::CLIENT_ID_NOT_VALID,
                6017,
                format!("client id must look like {prefix}<platform>:<instance>"),
            ));
        }
        let now = Instant::now();
        if let Some(q) = self.failed_logins.get_mut(user) {
            while q
                .front()
                .is_some_and(|t| now.duration_since(*t) > s.failed_login_window)
            {
                q.pop_front();
            }
            if q.len() >= s.failed_login_limit as usize {
                return refuse(reason::CONNECTION_RATE_EXCEEDED);
            }
        }
        if let Some(token) = operator_token {
            let given = c.password.as_deref().unwrap_or_default();
            return if !same_secret(given, token.as_bytes()) {
                Some((
                    reason::BAD_USERNAME_OR_PASSWORD,
                    0,
                    "wrong operator token".into(),
                ))
            } else if c.will.is_some() {
                Some((
                    reason::NOT_AUTHORIZED,
                    20003,
                    "an operator identity publishes nothing, not even a will".into(),
                ))
            } else {
                None
            };
        }
        let password = match c.password.as_deref() {
            None | Some([]) => {
                return Some((
                    reason::BAD_USERNAME_OR_PASSWORD,
                    70002,
                    "UserSig is empty".into(),
                ));
            }
            Some(p) => String::from_utf8_lossy(p).into_owned(),
        };
        let refused =
            match imlink_usersig::verify(&password, &s.secret_key, s.sdk_app_id, user, now_unix) {
                Ok(d) if self.expired_sigs.contains(&d.hmac_base64()) => {
                    refuse(reason::NOT_AUTHORIZED)
                }
                Ok(_) if self.banned.contains(user) => refuse(reason::BANNED),
                Ok(_) => None,
                Err(imlink_usersig::VerifyError::Expired) => refuse(reason::NOT_AUTHORIZED),
                Err(e) => Some((
                    reason::BAD_USERNAME_OR_PASSWORD,
                    e.code(),
                    e.to_string()
                        .split_once(' ')
                        .map(|(_, t)| t.to_string())
                        .unwrap_or_default(),
                )),
            };
        refused.or_else(|| will_refusal(s, c, user))
    }

    fn route(&mut self, msg: &Publish, from_client: Option<&str>) -> usize {
        self.try_route(msg, from_client, MAX_PENDING).unwrap_or(0)
    }

    /// Route to every matching session, all or nothing: when a recipient's queue is at
    /// `limit`, nothing is routed. A C2C message to a user with no session subscribed to
    /// their inbox is kept for them (per user) until one subscribes.
    pub fn try_route(
        &mut self,
        msg: &Publish,
        from_client: Option<&str>,
        limit: usize,
    ) -> Result<usize, RouteError> {
        let now = Instant::now();
        self.sessions.retain(|_, s| !s.expired(now));
        // A status message is never refused for a subscriber's backlog: that copy is dropped,
        // and only beyond a bound as large as the retained messages' (an operator watching a
        // whole fleet change at once must keep up, not lose the changes).
        let status = in_status_tree(&msg.topic);
        let limit = if status {
            limit.max(MAX_RETAINED)
        } else {
            limit
        };
        let mut dropped = 0;
        let mut targets: Vec<(String, u8, bool)> = Vec::new();
        for (client_id, sess) in self.sessions.iter() {
            let matching = sess.subs.iter().filter(|sub| {
                codec::matches(&sub.filter, &msg.topic)
                    && !(sub.no_local && from_client == Some(client_id.as_str()))
            });
            let mut granted = None;
            let mut keep_retain = false;
            for sub in matching {
                granted = granted.max(Some(sub.qos));
                keep_retain |= sub.retain_as_published;
            }
            let Some(sub_qos) = granted else { continue };
            let qos = msg.qos.min(sub_qos);
            if qos == 0 && sess.owner.is_none() {
                continue;
            }
            if qos == 1 && sess.pending.len() + sess.inflight.len() >= limit {
                if status {
                    dropped += 1;
                    continue;
                }
                return Err(RouteError::QueueFull {
                    user: sess.user.clone(),
                    limit,
                });
            }
            targets.push((client_id.clone(), qos, msg.retain && keep_retain));
        }
        self.counters.deliveries_dropped += dropped;
        let item = |qos: u8, retain: bool| Msg {
            topic: msg.topic.clone(),
            qos,
            properties: msg.properties.clone(),
            payload: msg.payload.clone(),
            dup: false,
            pkid: 0,
            retain,
        };
        if targets.is_empty()
            && msg.qos == 1
            && let Some(user) = inbox_user(&msg.topic)
        {
            let q = self.offline.entry(user.to_string()).or_default();
            if q.len() >= limit {
                return Err(RouteError::QueueFull {
                    user: user.to_string(),
                    limit,
                });
            }
            q.push_back(item(1, false));
            return Ok(1);
        }
        for (client_id, qos, retain) in &targets {
            if let Some(sess) = self.sessions.get_mut(client_id) {
                sess.pending.push_back(item(*qos, *retain));
            }
            if let Some(entry) = self.conns.get(client_id) {
                entry.flush.notify_one();
            }
        }
        Ok(targets.len())
    }

    /// Keep `p` as its topic's retained message — an empty payload deletes it — within the
    /// bounds on count and bytes.
    pub fn retain(&mut self, s: &Settings, p: &Publish) -> Result<(), RetainFull> {
        let old = self
            .retained
            .get(&p.topic)
            .map(|m| retained_size(&p.topic, &m.payload));
        if p.payload.is_empty() {
            if let Some(old) = old {
                self.retained.remove(&p.topic);
                self.retained_bytes -= old;
            }
        } else {
            let count = self.retained.len() + usize::from(old.is_none());
            let bytes =
                self.retained_bytes - old.unwrap_or(0) + retained_size(&p.topic, &p.payload);
            if count > s.max_retained || bytes > s.max_retained_bytes {
                return Err(RetainFull {
                    max_messages: s.max_retained,
                    max_bytes: s.max_retained_bytes,
                });
            }
            self.retained.insert(
                p.topic.clone(),
                RetainedMsg {
                    qos: p.qos.min(1),
                    payload: p.payload.clone(),
                },
            );
            self.retained_bytes = bytes;
        }
        self.counters.retained = self.retained.len() as u64;
        self.counters.retained_bytes = self.retained_bytes as u64;
        Ok(())
    }

    /// Delete the retained messages whose topics match `filter`; returns how many.
    pub fn clear_retained(&mut self, filter: &str) -> usize {
        let before = self.retained.len();
        self.retained.retain(|t, _| !codec::matches(filter, t));
        self.retained_bytes = self
            .retained
            .iter()
            .map(|(t, m)| retained_size(t, &m.payload))
            .sum();
        self.counters.retained = self.retained.len() as u64;
        self.counters.retained_bytes = self.retained_bytes as u64;
        before - self.retained.len()
    }

    /// A new subscription of `client_id` to `filter`, granted `qos`: the retained messages it
    /// matches go to the session, with the RETAIN flag set (MQTT 5 §3.3.1.3), at the lower of
    /// their QoS and the one granted.
    pub fn send_retained(&mut self, client_id: &str, filter: &str, qos: u8) {
        let Some(sess) = self.sessions.get_mut(client_id) else {
            return;
        };
        // Only the topics that share the filter's literal beginning can match.
        let literal = &filter[..filter.find(['+', '#']).unwrap_or(filter.len())];
        let from = literal.to_string();
        for (topic, m) in self
            .retained
            .range(from..)
            .take_while(|(t, _)| t.starts_with(literal))
        {
            if codec::matches(filter, topic) {
                sess.pending.push_back(Msg {
                    topic: topic.clone(),
                    qos: m.qos.min(qos),
                    properties: Vec::new(),
                    payload: m.payload.clone(),
                    dup: false,
                    pkid: 0,
                    retain: true,
                });
            }
        }
        if let Some(entry) = self.conns.get(client_id) {
            entry.flush.notify_one();
        }
    }

    /// Publish the will of a connection that ended (or was taken over) without a normal
    /// DISCONNECT: retained when it asked for that (within the bounds), and to every
    /// matching subscriber.
    fn publish_will(&mut self, s: &Settings, entry: ConnEntry) {
        let Some(w) = entry.will else {
            return;
        };
        let msg = Publish {
            dup: false,
            qos: w.qos.min(1),
            retain: w.retain,
            topic: w.topic,
            pkid: 0,
            properties: Vec::new(),
            payload: w.payload,
        };
        let kept = !msg.retain || self.retain(s, &msg).is_ok();
        let uc = self.counters.users.entry(entry.user).or_default();
        uc.wills_published += 1;
        if !kept {
            *uc.messages_refused
                .entry(code_key(reason::QUOTA_EXCEEDED))
                .or_default() += 1;
        }
        self.route(&msg, None);
    }

    /// A session subscribed to `filter`: what was kept for its user while no session was
    /// listening goes to it.
    pub fn hand_over_offline(&mut self, client_id: &str, filter: &str) {
        let Some(sess) = self.sessions.get_mut(client_id) else {
            return;
        };
        let Some(kept) = self.offline.get_mut(&sess.user) else {
            return;
        };
        let mut rest = VecDeque::new();
        while let Some(m) = kept.pop_front() {
            if codec::matches(filter, &m.topic) {
                sess.pending.push_back(m);
            } else {
                rest.push_back(m);
            }
        }
        *kept = rest;
        if let Some(entry) = self.conns.get(client_id) {
            entry.flush.notify_one();
        }
    }

    /// Take the next batch of messages a connection may send now (within its receive
    /// maximum), as encoded PUBLISH packets. QoS 0 messages count as delivered here.
    pub fn take_outgoing(&mut self, client_id: &str, conn_id: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let Some(sess) = self.sessions.get_mut(client_id) else {
            return out;
        };
        if sess.owner != Some(conn_id) {
            return out;
        }
        let mut qos0 = 0;
        while (sess.inflight.len() as u16) < sess.receive_max {
            let Some(mut m) = sess.pending.pop_front() else {
                break;
            };
            if m.qos == 1 {
                if m.pkid == 0 {
                    m.pkid = sess.alloc_pkid();
                }
                sess.inflight.insert(m.pkid, m.clone());
            } else {
                qos0 += 1;
            }
            out.push(codec::publish(&Publish {
                dup: m.dup,
                qos: m.qos,
                retain: m.retain,
                topic: m.topic,
                pkid: m.pkid,
                properties: m.properties,
                payload: m.payload,
            }));
        }
        let user = sess.user.clone();
        if qos0 > 0 {
            self.counters
                .users
                .entry(user)
                .or_default()
                .messages_delivered += qos0;
        }
        out
    }

    /// A PUBACK from the client: the message is delivered.
    pub fn acked(&mut self, client_id: &str, pkid: u16) {
        if let Some(sess) = self.sessions.get_mut(client_id)
            && sess.inflight.remove(&pkid).is_some()
        {
            let user = sess.user.clone();
            self.counters
                .users
                .entry(user)
                .or_default()
                .messages_delivered += 1;
        }
    }
}
