//! The simulated world: a broker, a provisioning server, the device's clocks and disk, and
//! what the driver would do with each action. It answers the machine's actions with inputs
//! at later virtual instants, and tells the checker what it saw.

use std::collections::{BTreeSet, HashMap};

use super::check::{Checker, Ended, Seen};
use super::schedule::{BrokerMode, Ext, Flavor, ProvMode};
use super::user;
use crate::identity::UserId;
use crate::session::{
    Action, ConnEnd, ErrorClass, FetchFailure, Input, Machine, Millis, NetKind, Now, Policy, Proto,
    Rng, SigInfo, Target, codes,
};

/// The simulated "build date": a wall clock before this is implausible.
pub const MIN_WALL: i64 = 1_700_000_000;
/// True Unix time at the world's t = 0.
const WALL_BASE: i64 = 1_800_000_000;
/// The broker's certificate is valid from this Unix time.
const CERT_NOT_BEFORE: i64 = MIN_WALL - 86_400;
/// Boot time when the daemon first starts after a boot.
const BOOT_AT: Millis = 7_000;

/// What the world knows about a sig it issued.
#[derive(Debug, Clone)]
struct Issued {
    user: UserId,
    /// On the provisioning server's clock.
    issued: i64,
    /// On the provisioning server's clock.
    expires: Option<i64>,
    /// Signed with the wrong key: the broker refuses it.
    bad: bool,
    /// The server calls it expired from now on.
    revoked: bool,
    /// Where the daemon received it: (boot number, boot-time ms, the server's time then).
    received: Option<(u64, Millis, i64)>,
    /// The device's wall clock minus the server's, at receipt (the cache's offset).
    offset: i64,
}

#[derive(Debug, Clone)]
enum FetchResult {
    /// A sig (by fingerprint), delivered with the server's time of the answer.
    Sig {
        fp: String,
        user: UserId,
    },
    Fail(FetchFailure),
}

#[derive(Debug, Clone)]
struct FetchFlight {
    /// `None`: never answers.
    at: Option<Millis>,
    result: FetchResult,
    user: UserId,
    /// Decided by a healthy world (or by a suspend): the answer stands. Otherwise, delivered
    /// once the world is healthy, it is decided again ("healthy from now on" includes answers
    /// still on their way).
    settled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Connack,
    End(ConnEnd),
}

#[derive(Debug, Clone)]
enum ConnW {
    None,
    Connecting {
        fp: String,
        at: Option<Millis>,
        outcome: Outcome,
        target: Target,
        proto: Proto,
        /// As for [`FetchFlight::settled`].
        settled: bool,
    },
    Up {
        fp: String,
        since: Millis,
        end: Option<(Millis, ConnEnd)>,
    },
    Closing {
        at: Option<Millis>,
    },
}

pub struct World {
    rng: Rng,
    /// True time since the world began (ms).
    pub t: Millis,
    boot_origin: Millis,
    boot_no: u64,
    /// The device's wall clock minus true time (s).
    wall_skew: i64,
    pub healthy: bool,
    flavor: Flavor,
    broker: BrokerMode,
    prov: ProvMode,
    twin: bool,
    lifetime: i64,
    prov_skew: i64,
    broker_skew: i64,
    sigs: HashMap<String, Issued>,
    next_sig: u64,
    /// Fingerprints the driver holds secrets for.
    held: BTreeSet<String>,
    fetch: Option<FetchFlight>,
    conn: ConnW,
    /// The cache file: a fingerprint.
    cache: Option<String>,
    /// Since when the session has been up, across the engine's own planned reconnects.
    session_since: Option<Millis>,
    pub connects: u64,
    pub fetches: u64,
    /// Broker nodes (the policy's `brokers`); the ones that are down.
    nodes: u32,
    node_down: Vec<bool>,
    /// The broker speaks only MQTT 3.1.1 (NATS, RabbitMQ), and how it answers an MQTT 5
    /// CONNECT: CONNACK 0x01 (`true`, NATS) or a close (`false`, RabbitMQ).
    v3_only: bool,
    v3_answers_connack: bool,
    /// After a node dies, the others close CONNECTs without a CONNACK until then (a leader
    /// election).
    election_until: Millis,
    /// The next CONNECT is redirected (0x9C) to this node.
    redirect_next: Option<u32>,
    /// Server References the world has handed out (a Connect may name only these).
    given_refs: BTreeSet<String>,
    /// The protocol of the connection up now (3.1.1: no DISCONNECT; kicks are closes).
    conn_proto: Proto,
    /// The SUBACK the broker owes the session up now, due then (granted).
    suback: Option<Millis>,
    /// The broker granted the inbox subscription on the session up now.
    pub subscribed: bool,
    /// The auth service (NATS's callout) is down until then: CONNECTs get CONNACK 5.
    auth_down_until: Millis,
    /// Messaging (set by the engine's runner from its own stream, so the login side of every
    /// older seed stays what it was): SUBSCRIBEs are refused (SUBACK 0x80, as during a
    /// JetStream leader election) until then, and this many of the next SUBSCRIBEs are never
    /// answered. A healthy world clears both.
    pub refuse_subscribe_until: Millis,
    pub lose_subscribes: u32,
}

/// The IM code at the head of the reference service's reason string (`"70001 UserSig
/// expired"`), which it also sends as the `im-error-code` user property.
fn im_code_of(reason: &str) -> Option<u32> {
    let code = reason.split(' ').next()?;
    (code.len() >= 4).then(|| code.parse().ok()).flatten()
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

impl World {
    pub fn new(mut rng: Rng, policy: &Policy) -> World {
        // Drawn from a copy: the main stream (and so every older seed's world) is unchanged.
        let mut r2 = Rng::new(rng.clone().next_u64() ^ 0x6e6f_6465_7321);
        let nodes = policy.brokers.max(1);
        let v3_only = policy.protocol != crate::session::ProtocolMode::V5 && r2.one_in(2);
        let v3_answers_connack = r2.one_in(2);
        // A NATS broker with an auth callout: half of the brokers that speak only 3.1.1 and
        // answer MQTT 5 with a CONNACK, drawn from the copy as well (that bit of the draw
        // leaves every regression seed of `tests.rs` in the world it was found in).
        let nats = v3_only && v3_answers_connack && (r2.next_u64() >> 17).is_multiple_of(2);
        let flavor = if rng.one_in(3) {
            Flavor::Mosquitto
        } else {
            Flavor::Reference
        };
        let flavor = if nats { Flavor::NatsCallout } else { flavor };
        let lifetime = pick(&mut rng, &[20, 600, 3_600, 86_400, 86_400, 15_552_000]);
        // Some devices boot with no RTC: the wall clock reads 1970 until time sync.
        let wall_skew = if rng.one_in(10) { -WALL_BASE } else { 0 };
        World {
            rng,
            t: BOOT_AT,
            boot_origin: 0,
            boot_no: 0,
            wall_skew,
            healthy: false,
            flavor,
            broker: BrokerMode::Healthy,
            prov: ProvMode::Healthy,
            twin: false,
            lifetime,
            prov_skew: 0,
            broker_skew: 0,
            sigs: HashMap::new(),
            next_sig: 0,
            held: BTreeSet::new(),
            fetch: None,
            conn: ConnW::None,
            cache: None,
            session_since: None,
            connects: 0,
            fetches: 0,
            nodes,
            node_down: vec![false; nodes as usize],
            v3_only,
            v3_answers_connack,
            election_until: 0,
            redirect_next: None,
            given_refs: BTreeSet::new(),
            conn_proto: Proto::V5,
            suback: None,
            subscribed: false,
            auth_down_until: 0,
            refuse_subscribe_until: 0,
            lose_subscribes: 0,
        }
    }

    /// What the machine reads as "now".
    pub fn now(&self) -> Now {
        Now {
            mono: self.t - self.boot_origin,
            wall: self.true_wall() + self.wall_skew,
        }
    }

    /// World time of a boot-time instant of this boot.
    pub fn from_mono(&self, mono: Millis) -> Millis {
        mono + self.boot_origin
    }

    fn true_wall(&self) -> i64 {
        WALL_BASE + (self.t / 1000) as i64
    }

    fn prov_now(&self) -> i64 {
        self.true_wall() + self.prov_skew
    }

    fn broker_now(&self) -> i64 {
        self.true_wall() + self.broker_skew
    }

    fn jitter(&mut self, lo: Millis, hi: Millis) -> Millis {
        self.rng.range(lo, hi)
    }

    pub fn advance_to(&mut self, t: Millis) {
        self.t = self.t.max(t);
    }

    /// Is a connection attempt, a session or a close in flight (as the driver sees it)?
    pub fn conn_state(&self) -> &'static str {
        match self.conn {
            ConnW::None => "none",
            ConnW::Connecting { .. } => "connecting",
            ConnW::Up { .. } => "up",
            ConnW::Closing { .. } => "closing",
        }
    }

    pub fn fetch_in_flight(&self) -> bool {
        self.fetch.is_some()
    }

    /// Since when the session has been up (across the engine's own planned reconnects).
    pub fn up_since(&self) -> Option<Millis> {
        match self.conn {
            ConnW::Up { .. } => self.session_since,
            _ => None,
        }
    }

    pub fn next_event_time(&self) -> Option<Millis> {
        let f = self.fetch.as_ref().and_then(|f| f.at);
        let c = match &self.conn {
            ConnW::Connecting { at, .. } | ConnW::Closing { at } => *at,
            ConnW::Up { end, .. } => end.as_ref().map(|e| e.0),
            ConnW::None => None,
        };
        let sub = self
            .suback
            .filter(|_| matches!(self.conn, ConnW::Up { .. }));
        [f, c, sub].into_iter().flatten().min()
    }

    /// A subscription belongs to the session up now: it goes with it.
    fn forget_subscription_unless_up(&mut self) {
        if !matches!(self.conn, ConnW::Up { .. }) {
            self.suback = None;
            self.subscribed = false;
        }
    }

    /// Take the world's next delivery (at `self.t`), as an input for the machine.
    pub fn pop_event(&mut self, m: &Machine, chk: &mut Checker) -> Option<(Input, String)> {
        let r = self.pop_event_inner(m, chk);
        self.forget_subscription_unless_up();
        r
    }

    fn pop_event_inner(&mut self, m: &Machine, chk: &mut Checker) -> Option<(Input, String)> {
        let t = self.t;
        if matches!(self.conn, ConnW::Up { .. }) && self.suback.is_some_and(|a| a <= t) {
            self.suback = None;
            let granted = t >= self.refuse_subscribe_until;
            self.subscribed = granted;
            return Some(if granted {
                (Input::SubAck { granted }, "broker: SUBACK granted".into())
            } else {
                (
                    Input::SubAck { granted },
                    "broker: SUBACK 0x80 (refused)".into(),
                )
            });
        }
        let conn_due = match &self.conn {
            ConnW::Connecting { at, .. } | ConnW::Closing { at } => at.is_some_and(|a| a <= t),
            ConnW::Up { end, .. } => end.as_ref().is_some_and(|e| e.0 <= t),
            ConnW::None => false,
        };
        if !conn_due
            && self
                .fetch
                .as_ref()
                .is_none_or(|f| f.at.is_none_or(|a| a > t))
        {
            return None;
        }
        if conn_due {
            return Some(self.pop_conn(m, chk));
        }
        let mut fetch = self.fetch.take()?;
        if self.healthy && !fetch.settled {
            // Decided before the world turned healthy, delivered after: decided again.
            let at = fetch.at;
            fetch = self.decide_fetch(fetch.user.clone(), m);
            fetch.at = at;
        }
        // The session's own fetch, or a background refresh (the machine may have turned a
        // refresh into the login fetch since).
        let login = m.snapshot().sig.is_none_or(|s| !s.refreshing);
        Some(match fetch.result {
            FetchResult::Sig { fp, user } => {
                let server_now = self.prov_now();
                let mono = self.now().mono;
                let wall = self.now().wall;
                let (expires, issued_at) = match self.sigs.get_mut(&fp) {
                    Some(s) => {
                        if s.received.is_none() {
                            s.received = Some((self.boot_no, mono, server_now));
                            s.offset = server_now - wall;
                        }
                        (s.expires, Some(s.issued))
                    }
                    None => (None, None),
                };
                self.held.insert(fp.clone());
                chk.sig_delivered(
                    t,
                    &fp,
                    expires
                        .zip(issued_at)
                        .map(|(e, i)| (e - i).max(0) as Millis * 1000),
                );
                let expired = expires.is_some_and(|e| e <= server_now);
                let seen = if expired {
                    Seen::FetchExpired
                } else {
                    Seen::FetchOk
                };
                chk.seen(t, seen, login);
                let info = SigInfo {
                    fingerprint: fp.clone(),
                    user_id: user,
                    issued_at: issued_at.filter(|i| expires.is_some_and(|e| *i < e)),
                    expires_at: expires,
                    server_now,
                    received_at: mono,
                    wall_anchored: false,
                };
                (Input::SigFetched(info), format!("provisioning: sig {fp}"))
            }
            FetchResult::Fail(f) => {
                chk.seen(
                    t,
                    Seen::FetchFailed {
                        class: f.class,
                        retry_after: f.retry_after,
                        limited: f.give_up_after,
                        code: f.code,
                    },
                    login,
                );
                let what = format!("provisioning: failed {} {}", f.class.as_str(), f.code);
                (Input::SigFetchFailed(f), what)
            }
        })
    }

    fn pop_conn(&mut self, m: &Machine, chk: &mut Checker) -> (Input, String) {
        let t = self.t;
        match std::mem::replace(&mut self.conn, ConnW::None) {
            ConnW::Connecting {
                fp,
                outcome,
                target,
                proto,
                settled,
                ..
            } => match if self.healthy && !settled {
                // Decided before the world turned healthy, delivered after: decided again.
                self.decide_connect(&fp, &target, proto).1
            } else {
                outcome
            } {
                Outcome::Connack => {
                    self.session_since.get_or_insert(t);
                    let end = self.schedule_end(&fp);
                    if let Some(u) = self.sigs.get(&fp).map(|s| s.user.clone()) {
                        chk.connacked(&u);
                    }
                    self.conn = ConnW::Up { fp, since: t, end };
                    chk.seen(t, Seen::Connack, true);
                    (
                        Input::Connected {
                            session_present: true,
                        },
                        "broker: CONNACK".into(),
                    )
                }
                Outcome::End(end) => {
                    self.session_since = None;
                    chk.seen_end(Ended {
                        t,
                        since: None,
                        session: None,
                        end: &end,
                        mono: self.now().mono,
                        snap: &m.snapshot(),
                        in_use: &fp,
                    });
                    let what = format!("broker: {end:?}");
                    (Input::ConnectionEnded(end), what)
                }
            },
            ConnW::Up { since, end, fp } => {
                let end = end.map(|e| e.1).unwrap_or(ConnEnd::Network {
                    kind: NetKind::Closed,
                    detail: "closed".into(),
                });
                // A silent close while a publish of the device has waited
                // `engine::STALLED_AFTER` for its PUBACK: a broker that could not store it
                // (the engine reads it so; the checker judges it so).
                let end = match end {
                    ConnEnd::Network {
                        kind: NetKind::Closed,
                        detail,
                    } if chk
                        .unanswered_since
                        .is_some_and(|at| t.saturating_sub(at) >= crate::engine::STALLED_AFTER) =>
                    {
                        ConnEnd::Network {
                            kind: NetKind::Stalled,
                            detail,
                        }
                    }
                    end => end,
                };
                let session = self.session_since.take().unwrap_or(since);
                chk.seen_end(Ended {
                    t,
                    since: Some(since),
                    session: Some(session),
                    end: &end,
                    mono: self.now().mono,
                    snap: &m.snapshot(),
                    in_use: &fp,
                });
                let what = format!("broker: {end:?}");
                (Input::ConnectionEnded(end), what)
            }
            ConnW::Closing { .. } => (
                Input::Disconnected,
                "broker: closed after DISCONNECT".into(),
            ),
            ConnW::None => unreachable!("pop_conn is only called with a due connection event"),
        }
    }

    /// What ends a session that just came up, and when.
    fn schedule_end(&mut self, fp: &str) -> Option<(Millis, ConnEnd)> {
        let t = self.t;
        let closed = ConnEnd::Network {
            kind: NetKind::Closed,
            detail: "the server closed the connection".into(),
        };
        let mut ends: Vec<(Millis, ConnEnd)> = Vec::new();
        if self.twin {
            let at = t + self.jitter(300, 8_000);
            ends.push((at, self.takeover()));
        }
        if !self.healthy {
            match self.broker {
                BrokerMode::DisconnectAfter(code, d) => {
                    let end = self.disconnect(code);
                    ends.push((t + d, end));
                }
                BrokerMode::CloseAfter(d) => ends.push((t + d, closed.clone())),
                BrokerMode::Flaky(mean) => {
                    let d = self.jitter(mean / 8, mean * 2);
                    ends.push((t + d, closed.clone()));
                }
                _ => {}
            }
        }
        if self.flavor == Flavor::Reference
            && let Some(e) = self.sigs.get(fp).and_then(|s| s.expires)
        {
            // The reference service ends the session when the sig expires on its clock.
            let left_s = (e - self.broker_now() + 1).max(0) as u64;
            ends.push((t + left_s * 1000, self.disconnect(0xA0)));
        }
        if self.flavor == Flavor::NatsCallout
            && let Some(e) = self.sigs.get(fp).and_then(|s| s.expires)
        {
            ends.push(self.nats_expiry_close(e));
        }
        ends.into_iter().min_by_key(|e| e.0)
    }

    /// NATS ends a session at its user JWT's `exp` (the sig's expiry) on its own clock: the
    /// socket closes with no MQTT packet, 0–1 s later.
    fn nats_expiry_close(&mut self, expires: i64) -> (Millis, ConnEnd) {
        let exp_at = (expires - self.broker_skew - WALL_BASE).max(0) as Millis * 1000;
        let at = exp_at.max(self.t) + self.jitter(0, 1_000);
        (
            at,
            ConnEnd::Network {
                kind: NetKind::Closed,
                detail: "the server closed the connection (MQTT 3.1.1 says no more)".into(),
            },
        )
    }

    /// The server's DISCONNECT with `code`, as this flavour sends it.
    fn disconnect(&mut self, code: u8) -> ConnEnd {
        if self.conn_proto == Proto::V311 {
            // MQTT 3.1.1 has no server DISCONNECT: whatever the reason, the socket closes.
            return ConnEnd::Network {
                kind: NetKind::Closed,
                detail: "closed (MQTT 3.1.1)".into(),
            };
        }
        match (self.flavor, code) {
            (Flavor::Mosquitto, 0x8E) => ConnEnd::Network {
                kind: NetKind::Closed,
                detail: "closed (takeover)".into(),
            },
            (Flavor::NatsCallout, _) => ConnEnd::Network {
                kind: NetKind::Closed,
                detail: "closed (NATS)".into(),
            },
            (Flavor::Mosquitto, _) => ConnEnd::ServerDisconnect {
                code,
                reason: None,
                im_code: None,
            },
            (Flavor::Reference, _) => {
                let reason = match code {
                    0xA0 => Some("70001 UserSig expired".to_string()),
                    0x8E => Some("6208 kicked offline by another login".to_string()),
                    0x98 => Some("6208 kicked offline by an administrator".to_string()),
                    0x87 => Some("70052 UserSig revoked\nWATCHDOG=trigger".to_string()),
                    _ if self.rng.one_in(2) => None,
                    _ => Some(format!("server says 0x{code:02X}")),
                };
                // The reference service sends its code twice: at the head of the reason
                // string and as the `im-error-code` user property (what the relay types).
                let im_code = reason.as_deref().and_then(im_code_of);
                ConnEnd::ServerDisconnect {
                    code,
                    reason,
                    im_code,
                }
            }
        }
    }

    fn takeover(&mut self) -> ConnEnd {
        self.disconnect(0x8E)
    }

    /// Carry out one action of the machine, as the driver and the world would.
    pub fn act(&mut self, a: &Action, m: &Machine, chk: &mut Checker) {
        self.act_inner(a, m, chk);
        self.forget_subscription_unless_up();
    }

    fn act_inner(&mut self, a: &Action, m: &Machine, chk: &mut Checker) {
        let t = self.t;
        match a {
            Action::FetchSig { user } => {
                if !chk.policy.provisioning {
                    chk.violate(
                        "safety: no provisioning, no fetch",
                        "FetchSig with no provisioning URL configured".into(),
                    );
                }
                if self.fetch.is_some() {
                    chk.violate(
                        "safety: one fetch at most",
                        "a second FetchSig while one is in flight".into(),
                    );
                }
                self.fetches += 1;
                let refresh = m.snapshot().sig.is_some_and(|s| s.refreshing);
                if !refresh && matches!(self.conn, ConnW::None) {
                    // A login fetch between two connections: not a planned move, so the
                    // session does not go on across it.
                    self.session_since = None;
                }
                chk.attempt(t, false, refresh);
                let flight = self.decide_fetch(user.clone(), m);
                self.fetch = Some(flight);
            }
            Action::CancelFetch => self.fetch = None,
            Action::Connect {
                user,
                fingerprint,
                target,
                proto,
            } => {
                match target {
                    Target::Node(i) if *i >= self.nodes => chk.violate(
                        "safety: targets",
                        format!("Connect to node {i} of {}", self.nodes),
                    ),
                    Target::Redirect(r) if !self.given_refs.contains(r) => chk.violate(
                        "safety: targets",
                        format!("Connect to {r:?}, which no broker named"),
                    ),
                    _ => {}
                }
                match (chk.policy.protocol, proto) {
                    (crate::session::ProtocolMode::V5, Proto::V311)
                    | (crate::session::ProtocolMode::V311, Proto::V5) => chk.violate(
                        "safety: protocol",
                        format!(
                            "a {} CONNECT with broker.protocol {:?}",
                            proto.as_str(),
                            chk.policy.protocol
                        ),
                    ),
                    _ => {}
                }
                chk.connect_target(target, *proto);
                chk.connect_sig(fingerprint);
                if !matches!(self.conn, ConnW::None) {
                    chk.violate(
                        "safety: one connection at most",
                        format!("Connect while the connection is {}", self.conn_state()),
                    );
                }
                if !self.held.contains(fingerprint) {
                    chk.violate(
                        "safety: sigs",
                        format!("Connect names {fingerprint}, which the driver no longer holds"),
                    );
                }
                match self.sigs.get(fingerprint) {
                    Some(s) if s.user != *user => chk.violate(
                        "safety: sigs",
                        format!("a sig for {} sent as {user}", s.user),
                    ),
                    None => chk.violate("safety: sigs", format!("unknown sig {fingerprint}")),
                    _ => {}
                }
                if user != m.user() {
                    chk.violate(
                        "safety: sigs",
                        format!(
                            "Connect as {user} while the machine logs in as {}",
                            m.user()
                        ),
                    );
                }
                let snap = m.snapshot();
                match snap.sig.as_ref() {
                    Some(s) if s.fingerprint == *fingerprint => {
                        if s.deadline_ms.is_some_and(|d| d <= self.now().mono) {
                            chk.violate(
                                "safety: sigs",
                                "Connect with a sig the machine believes expired".into(),
                            );
                        }
                    }
                    _ => chk.violate(
                        "safety: sigs",
                        format!("Connect with {fingerprint}, not the machine's current sig"),
                    ),
                }
                self.connects += 1;
                chk.attempt(t, true, false);
                self.conn_proto = *proto;
                let (at, outcome) = self.decide_connect(fingerprint, target, *proto);
                self.conn = ConnW::Connecting {
                    fp: fingerprint.clone(),
                    at,
                    outcome,
                    target: target.clone(),
                    proto: *proto,
                    settled: self.healthy,
                };
            }
            Action::Subscribe { .. } => {
                // SUBACK 0x80 while `refuse_subscribe_until` (NATS during a JetStream leader
                // election; the runner sets it), or no SUBACK at all for a lost one. (NATS also
                // answers a publish outside the JWT's permissions with PUBACK 0 and drops it:
                // not modelled.)
                if !matches!(self.conn, ConnW::Up { .. }) {
                    chk.violate("truth", "Subscribe without a session".into());
                }
                // Answered a moment later (a fixed delay: the world's random stream, and so
                // every older seed's world, is unchanged), or never.
                if self.lose_subscribes > 0 {
                    self.lose_subscribes -= 1;
                    self.suback = None;
                } else {
                    self.suback = Some(t + 5);
                }
            }
            Action::Disconnect => match self.conn {
                ConnW::Up { .. } => {
                    let at = if self.rng.one_in(50) {
                        None // the broker never closes: the close timeout must fire
                    } else {
                        Some(t + self.jitter(2, 200))
                    };
                    self.conn = ConnW::Closing { at };
                }
                _ => chk.violate(
                    "safety: closing",
                    format!("DISCONNECT while the connection is {}", self.conn_state()),
                ),
            },
            Action::Abandon => match self.conn {
                ConnW::Connecting { .. } => {
                    self.conn = ConnW::None;
                    self.session_since = None;
                }
                ConnW::Closing { .. } => self.conn = ConnW::None,
                ConnW::Up { .. } => chk.violate(
                    "safety: closing",
                    "an established session dropped without DISCONNECT".into(),
                ),
                ConnW::None => {}
            },
            Action::PersistSig { fingerprint, .. } => {
                if !self.held.contains(fingerprint) {
                    chk.violate(
                        "safety: sigs",
                        format!("persisting {fingerprint}, not held"),
                    );
                }
                self.cache = Some(fingerprint.clone());
            }
            Action::ForgetSig => self.cache = None,
            Action::ReleaseSig { fingerprint } => {
                let in_use = match &self.conn {
                    ConnW::Connecting { fp, .. } | ConnW::Up { fp, .. } => fp == fingerprint,
                    _ => false,
                };
                if in_use {
                    chk.violate(
                        "safety: sigs",
                        format!("released {fingerprint} while its connection is up"),
                    );
                }
                self.held.remove(fingerprint);
            }
            Action::Emit(_) | Action::Reply { .. } | Action::Exit => {}
        }
    }

    fn new_sig(&mut self, user: UserId, lifetime: Option<i64>, bad: bool, expired: bool) -> String {
        self.next_sig += 1;
        let fp = format!("s{}", self.next_sig);
        let now = self.prov_now();
        let expires = lifetime.map(|l| if expired { now - 5 } else { now + l });
        let issued = match (expires, lifetime) {
            (Some(e), Some(l)) => e - l,
            _ => now,
        };
        self.sigs.insert(
            fp.clone(),
            Issued {
                user,
                issued,
                expires,
                bad,
                revoked: false,
                received: None,
                offset: 0,
            },
        );
        fp
    }

    /// A local app's `login {user_id, user_sig}` (no provisioning URL): its app server issues
    /// a fresh sig on the issuer's clock; the driver describes it on the device's wall clock.
    pub fn app_sig(&mut self, user: UserId) -> SigInfo {
        let fp = self.new_sig(user.clone(), Some(self.lifetime), false, false);
        let (mono, wall) = (self.now().mono, self.now().wall);
        let server_now = self.prov_now();
        let (issued, expires) = match self.sigs.get_mut(&fp) {
            Some(s) => {
                s.received = Some((self.boot_no, mono, server_now));
                s.offset = 0;
                (Some(s.issued), s.expires)
            }
            None => (None, None),
        };
        self.held.insert(fp.clone());
        SigInfo {
            fingerprint: fp,
            user_id: user,
            issued_at: issued,
            expires_at: expires,
            server_now: wall,
            received_at: mono,
            wall_anchored: true,
        }
    }

    fn decide_fetch(&mut self, user: UserId, m: &Machine) -> FetchFlight {
        let asked_for = user.clone();
        let t = self.t;
        let quick = t + self.jitter(10, 400);
        let mode = if self.healthy {
            ProvMode::Healthy
        } else {
            self.prov
        };
        let fail = |class: ErrorClass, code: u32, msg: &str| {
            FetchResult::Fail(FetchFailure::new(class, code, msg))
        };
        let lifetime = Some(self.lifetime);
        let (at, result) = match mode {
            ProvMode::Healthy => {
                let fp = self.new_sig(user.clone(), lifetime, false, false);
                (Some(quick), FetchResult::Sig { fp, user })
            }
            ProvMode::Slow(d) => {
                let fp = self.new_sig(user.clone(), lifetime, false, false);
                (Some(t + d), FetchResult::Sig { fp, user })
            }
            ProvMode::Hang => (None, fail(ErrorClass::Network, 0, "never answers")),
            ProvMode::Status(code, ra) => {
                let mut f = match code {
                    401 | 403 | 404 => {
                        FetchFailure::new(ErrorClass::Fatal, u32::from(code), "refused")
                    }
                    408 | 421 | 425 | 429 | 500..=599 => {
                        FetchFailure::new(ErrorClass::Busy, u32::from(code), "unavailable")
                    }
                    _ => {
                        let mut f = FetchFailure::new(ErrorClass::Busy, u32::from(code), "odd 4xx");
                        f.give_up_after = Some(3);
                        f
                    }
                };
                f.retry_after = ra;
                (Some(quick), FetchResult::Fail(f))
            }
            ProvMode::Malformed => (
                Some(quick),
                fail(ErrorClass::Busy, codes::INVALID_PARAMETERS, "malformed"),
            ),
            ProvMode::SameSig => match m.snapshot().sig {
                Some(s)
                    if self
                        .sigs
                        .get(&s.fingerprint)
                        .is_some_and(|i| i.user == user) =>
                {
                    (
                        Some(quick),
                        FetchResult::Sig {
                            fp: s.fingerprint,
                            user,
                        },
                    )
                }
                _ => {
                    let fp = self.new_sig(user.clone(), lifetime, false, false);
                    (Some(quick), FetchResult::Sig { fp, user })
                }
            },
            ProvMode::Expired => {
                let fp = self.new_sig(user.clone(), lifetime, false, true);
                (Some(quick), FetchResult::Sig { fp, user })
            }
            ProvMode::WrongUser => {
                if self.rng.one_in(2) {
                    // An opaque sig with a user_id the client cannot check: the machine must.
                    let other = if user.as_str() == "alice" {
                        "bob"
                    } else {
                        "alice"
                    };
                    let fp = self.new_sig(super::user(other), None, false, false);
                    (
                        Some(quick),
                        FetchResult::Sig {
                            fp,
                            user: super::user(other),
                        },
                    )
                } else {
                    (
                        Some(quick),
                        fail(ErrorClass::Fatal, codes::SVR_SIG_MISMATCH_ID, "other user"),
                    )
                }
            }
            ProvMode::WrongApp => (
                Some(quick),
                fail(ErrorClass::Fatal, codes::SVR_SIG_MISMATCH_APP, "other app"),
            ),
            ProvMode::TokenMissing => {
                let mut f =
                    FetchFailure::new(ErrorClass::Busy, codes::INVALID_PARAMETERS, "no token");
                f.give_up_after = Some(3);
                (Some(quick), FetchResult::Fail(f))
            }
            ProvMode::Opaque => {
                let fp = self.new_sig(user.clone(), None, false, false);
                (Some(quick), FetchResult::Sig { fp, user })
            }
            ProvMode::BadKey => {
                let fp = self.new_sig(user.clone(), lifetime, true, false);
                (Some(quick), FetchResult::Sig { fp, user })
            }
            ProvMode::Unreachable => (
                Some(quick),
                fail(ErrorClass::Network, codes::NET_CONN_REFUSE, "refused"),
            ),
            ProvMode::ClockBehind => (
                Some(quick),
                fail(ErrorClass::Clock, 0, "cert not yet valid"),
            ),
        };
        // The device clock behind the certificate: TLS fails whatever the server would say.
        if self.now().wall < CERT_NOT_BEFORE && !matches!(result, FetchResult::Fail(_)) {
            return FetchFlight {
                at: Some(quick),
                result: fail(ErrorClass::Clock, 0, "certificate not valid yet"),
                user: asked_for,
                settled: self.healthy,
            };
        }
        FetchFlight {
            at,
            result,
            user: asked_for,
            settled: self.healthy,
        }
    }

    fn decide_connect(
        &mut self,
        fp: &str,
        target: &Target,
        proto: Proto,
    ) -> (Option<Millis>, Outcome) {
        let t = self.t;
        let quick = t + self.jitter(5, 300);
        if self.now().wall < CERT_NOT_BEFORE {
            return (
                Some(quick),
                Outcome::End(ConnEnd::CertNotYetValid {
                    detail: "certificate not valid yet".into(),
                }),
            );
        }
        let node = match target {
            Target::Node(i) => *i,
            Target::Redirect(r) => r.trim_start_matches("node").parse().unwrap_or(0),
        };
        let closed_early = |why: &str| {
            Outcome::End(ConnEnd::Network {
                kind: NetKind::Closed,
                detail: why.into(),
            })
        };
        if self.node_down.get(node as usize).copied().unwrap_or(true) {
            return (
                Some(quick),
                Outcome::End(ConnEnd::Network {
                    kind: NetKind::Refused,
                    detail: format!("node {node} is down"),
                }),
            );
        }
        if t < self.election_until {
            return (
                Some(quick),
                closed_early("closed without CONNACK (leader election)"),
            );
        }
        if self.flavor != Flavor::NatsCallout
            && let Some(to) = self.redirect_next.take()
        {
            let reference = format!("node{to}");
            self.given_refs.insert(reference.clone());
            return (
                Some(quick),
                Outcome::End(ConnEnd::Redirect {
                    code: 0x9C,
                    reference,
                    reason: None,
                    im_code: None,
                }),
            );
        }
        if self.v3_only && proto == Proto::V5 {
            return (
                Some(quick),
                if self.v3_answers_connack {
                    Outcome::End(ConnEnd::Refused {
                        code: 0x84,
                        reason: None,
                        im_code: None,
                    })
                } else {
                    closed_early("closed: an MQTT 5 CONNECT to a 3.1.1 broker")
                },
            );
        }
        let mode = if self.healthy {
            BrokerMode::Healthy
        } else {
            self.broker
        };
        let net = |kind: NetKind| {
            Outcome::End(ConnEnd::Network {
                kind,
                detail: format!("{kind:?}"),
            })
        };
        match mode {
            BrokerMode::Down => {
                let kind = pick(
                    &mut self.rng,
                    &[
                        NetKind::Refused,
                        NetKind::Dns,
                        NetKind::Tls,
                        NetKind::Closed,
                        NetKind::Timeout,
                    ],
                );
                return (Some(quick), net(kind));
            }
            BrokerMode::Blackhole => return (None, net(NetKind::Timeout)),
            BrokerMode::Refuse(code) => {
                let code = if self.flavor == Flavor::NatsCallout {
                    // What a 3.1.1 return code can say (1–5), as the relay maps it.
                    match code {
                        0x84..=0x88 => code,
                        _ => 0x88,
                    }
                } else {
                    code
                };
                let reason = (self.flavor == Flavor::Reference && self.rng.one_in(2))
                    .then(|| format!("{code} refused"));
                return (
                    Some(quick),
                    Outcome::End(ConnEnd::Refused {
                        code,
                        reason,
                        im_code: None,
                    }),
                );
            }
            _ => {}
        }
        if self.flavor == Flavor::NatsCallout && t < self.auth_down_until {
            // No callout service answers: CONNACK 5 after the callout's 2 s timeout.
            let at = t + 2_000 + self.jitter(0, 300);
            return (
                Some(at),
                Outcome::End(ConnEnd::Refused {
                    code: 0x87,
                    reason: None,
                    im_code: None,
                }),
            );
        }
        let at = match mode {
            BrokerMode::SlowConnack(d) => t + d,
            _ => quick,
        };
        // The broker checks the sig.
        let sig = self.sigs.get(fp).cloned();
        let refuse = |code: u8, why: &str, flavor: Flavor, rng: &mut Rng| {
            // NATS: CONNACK 5 (not authorized) for whatever the callout refused.
            let code = if flavor == Flavor::NatsCallout {
                0x87
            } else {
                code
            };
            // The reference service's words (reason string and im-error-code), or none.
            let reason = (flavor == Flavor::Reference && rng.one_in(2)).then(|| why.to_string());
            let im_code = reason.as_deref().and_then(im_code_of);
            Outcome::End(ConnEnd::Refused {
                code,
                reason,
                im_code,
            })
        };
        let outcome = match sig {
            None => refuse(0x86, "70003 malformed", self.flavor, &mut self.rng),
            Some(s) if s.bad => {
                let code = if self.flavor == Flavor::Mosquitto {
                    0x87
                } else {
                    0x86
                };
                refuse(code, "70009 signature mismatch", self.flavor, &mut self.rng)
            }
            Some(s) if s.revoked || s.expires.is_some_and(|e| self.broker_now() > e) => {
                refuse(0x87, "70001 UserSig expired", self.flavor, &mut self.rng)
            }
            Some(_) => Outcome::Connack,
        };
        (Some(at), outcome)
    }

    /// A schedule entry about the world (not a local request, suspend or reboot).
    pub fn external(&mut self, ext: Ext) {
        let t = self.t;
        match ext {
            Ext::Broker(mode) => {
                self.broker = mode;
                if matches!(mode, BrokerMode::Down | BrokerMode::Blackhole)
                    && let ConnW::Up { end, .. } = &mut self.conn
                {
                    *end = Some((
                        t,
                        ConnEnd::Network {
                            kind: NetKind::Closed,
                            detail: "the broker went away".into(),
                        },
                    ));
                }
            }
            Ext::Prov(mode) => self.prov = mode,
            Ext::Twin(on) => {
                self.twin = on;
                if on {
                    let at = t + self.jitter(100, 5_000);
                    let kick = self.takeover();
                    if let ConnW::Up { end, .. } = &mut self.conn
                        && end.as_ref().is_none_or(|e| e.0 > at)
                    {
                        *end = Some((at, kick));
                    }
                }
            }
            Ext::SigLifetime(s) => self.lifetime = s,
            Ext::ServerSkew { prov, broker } => {
                self.prov_skew = prov;
                self.broker_skew = broker;
            }
            Ext::WallJump(d) => self.wall_skew += d,
            Ext::TimeSync => self.wall_skew = 0,
            Ext::Drop => self.end_now(ConnEnd::Network {
                kind: NetKind::Closed,
                detail: "dropped".into(),
            }),
            Ext::ServerDisconnect(code) => {
                let end = self.disconnect(code);
                self.end_now(end);
            }
            Ext::RevokeExpiry => {
                if let ConnW::Up { fp, .. } = &self.conn {
                    let fp = fp.clone();
                    if let Some(s) = self.sigs.get_mut(&fp) {
                        s.revoked = true;
                    }
                    if self.flavor == Flavor::Reference {
                        let end = self.disconnect(0xA0);
                        self.end_now(end);
                    }
                }
            }
            Ext::NodeDown(i) => {
                let i = i % self.nodes;
                if let Some(d) = self.node_down.get_mut(i as usize) {
                    *d = true;
                }
                // The others elect a new leader: CONNECTs closed without a CONNACK a while.
                self.election_until = t + self.jitter(3_000, 8_000);
                if let ConnW::Up { end, .. } = &mut self.conn {
                    // Sessions on the dead node drop (the world does not track which node a
                    // session is on beyond the attempt: every session drops).
                    *end = Some((
                        t,
                        ConnEnd::Network {
                            kind: NetKind::Closed,
                            detail: "the node died".into(),
                        },
                    ));
                }
            }
            Ext::NodeUp(i) => {
                let i = i % self.nodes;
                if let Some(d) = self.node_down.get_mut(i as usize) {
                    *d = false;
                }
            }
            Ext::RedirectNext(i) => self.redirect_next = Some(i % self.nodes),
            Ext::AuthOutage(d) => {
                if self.flavor == Flavor::NatsCallout {
                    self.auth_down_until = t + d;
                }
            }
            Ext::Suspend(_) | Ext::Reboot { .. } | Ext::Local(_) => {}
        }
    }

    fn end_now(&mut self, e: ConnEnd) {
        let t = self.t;
        if let ConnW::Up { end, .. } = &mut self.conn {
            *end = Some((t, e));
        }
    }

    /// The device sleeps for `d`: nothing runs; boot time keeps counting.
    pub fn suspend(&mut self, d: Millis) {
        self.t += d;
        if d < 15_000 {
            return;
        }
        let t = self.t;
        match &mut self.conn {
            ConnW::Up { end, .. } => {
                *end = Some((
                    t + 50,
                    ConnEnd::Network {
                        kind: NetKind::Timeout,
                        detail: "keepalive timeout after suspend".into(),
                    },
                ))
            }
            ConnW::Connecting {
                at,
                outcome,
                settled,
                ..
            } => {
                *at = Some(t + 10);
                *outcome = Outcome::End(ConnEnd::Network {
                    kind: NetKind::Timeout,
                    detail: "suspended".into(),
                });
                *settled = true;
            }
            ConnW::Closing { at } => *at = Some(t + 10),
            ConnW::None => {}
        }
        if let Some(f) = &mut self.fetch {
            f.at = Some(t + 10);
            f.result = FetchResult::Fail(FetchFailure::new(
                ErrorClass::Network,
                codes::NET_DISCONNECT,
                "suspended",
            ));
            f.settled = true;
        }
    }

    /// The process dies: the broker loses the socket, the driver its secrets; disk stays.
    pub fn crash(&mut self) {
        self.conn = ConnW::None;
        self.session_since = None;
        self.fetch = None;
        self.held.clear();
    }

    pub fn reboot(&mut self, rtc: bool) {
        self.crash();
        self.t += self.jitter(5_000, 90_000);
        self.boot_origin = self.t - BOOT_AT;
        self.boot_no += 1;
        if !rtc {
            // No RTC: the wall clock starts at 1970 (plus the boot time).
            self.wall_skew = -WALL_BASE - (self.t / 1000) as i64;
        }
    }

    /// A new daemon process: it holds the cached secret, if any.
    pub fn daemon_started(&mut self) {
        self.held.clear();
        self.fetch = None;
        // A new process: its first login starts a new session.
        self.session_since = None;
        if let Some(fp) = &self.cache {
            self.held.insert(fp.clone());
        }
    }

    /// What the driver would feed as `CachedSig`, anchored like `Driver::new`.
    pub fn cached_sig_info(&self, _policy: &Policy) -> Option<SigInfo> {
        let fp = self.cache.clone()?;
        let s = self.sigs.get(&fp)?;
        let (boot, received_mono, server_then) = s.received?;
        let now = self.now();
        let (server_now, received_at, wall_anchored) = if boot == self.boot_no {
            (server_then, received_mono, false)
        } else {
            (now.wall.saturating_add(s.offset), now.mono, true)
        };
        Some(SigInfo {
            fingerprint: fp,
            user_id: s.user.clone(),
            issued_at: None,
            expires_at: s.expires,
            server_now,
            received_at,
            wall_anchored,
        })
    }

    /// From now on the world is healthy: every fault off, clocks right, sane sigs.
    pub fn make_healthy(&mut self) {
        self.healthy = true;
        self.node_down.iter_mut().for_each(|d| *d = false);
        self.election_until = 0;
        self.redirect_next = None;
        self.auth_down_until = 0;
        self.refuse_subscribe_until = 0;
        self.lose_subscribes = 0;
        self.broker = BrokerMode::Healthy;
        self.prov = ProvMode::Healthy;
        self.twin = false;
        self.wall_skew = 0;
        self.prov_skew = 0;
        self.broker_skew = 0;
        if self.lifetime < 600 {
            self.lifetime = 3_600;
        }
        let t = self.t;
        if let ConnW::Up { fp, end, .. } = &mut self.conn {
            let fp = fp.clone();
            *end = None;
            // Only the sig's own expiry still ends it (on the reference service and NATS).
            let expires = self.sigs.get(&fp).and_then(|s| s.expires);
            if self.flavor == Flavor::Reference
                && let Some(e) = expires
            {
                let left_s = (e - self.broker_now() + 1).max(0) as u64;
                let end_at = t + left_s * 1000;
                if let ConnW::Up { end, .. } = &mut self.conn {
                    *end = Some((
                        end_at,
                        ConnEnd::ServerDisconnect {
                            code: 0xA0,
                            reason: Some("70001 UserSig expired".into()),
                            im_code: Some(codes::SVR_SIG_EXPIRED),
                        },
                    ));
                }
            }
            if self.flavor == Flavor::NatsCallout
                && let Some(e) = expires
            {
                let close = self.nats_expiry_close(e);
                if let ConnW::Up { end, .. } = &mut self.conn {
                    *end = Some(close);
                }
            }
        }
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn default_user() -> UserId {
        user("alice")
    }
}
