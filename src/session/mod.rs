//! The session engine: a sans-IO state machine.
//!
//! [`Machine`] is a pure `(state, input) → (state, actions)`: no tokio, no sockets, no clock
//! reads. The driver ([`crate::driver`]) feeds it [`Input`]s stamped with [`Now`] (boot-time
//! milliseconds plus the wall clock), calls [`Machine::handle_timeout`] at
//! [`Machine::poll_timeout`], and carries out the [`Action`]s it drains with
//! [`Machine::poll_action`]. Every policy of the brief §3 lives here, and so does every timeout
//! (fetch, connect, close): what the simulator (`sim`) cannot see, it cannot prove.
//!
//! **Shape.** Inputs and timeouts only *record* what happened (a failure spends a budget and
//! arms a retry time, a success stores a sig, a request changes the goal). Then one function,
//! [`Machine::next_step`], looks at the whole state and decides what to do next; the phase
//! shown to the world is *derived* from the same state ([`Machine::phase`]). So a due timer
//! always acts (it cannot be cleared by one handler while another was meant to act on it), and
//! the phase cannot disagree with what is in flight.
//!
//! Invariants (the simulator asserts them after every step, `docs/login-policy.md`):
//! * at most one provisioning fetch and one connection at a time;
//! * wanting to be online and not online, stopped or kicked ⇒ a timer is armed (every fetch and
//!   connection in flight has a deadline here);
//! * `online` exactly when a CONNACKed connection is up; login status follows the phase;
//! * errors a new UserSig cannot fix stop the engine; budgets per class bound every retry, and
//!   only network/busy errors retry forever, never faster than the backoff;
//! * never a connect with a sig this machine believes expired, or one for another user; a
//!   refresh failure never stops a session whose sig is valid;
//! * every change of the observable state is emitted exactly once, as one
//!   [`Event::StateChanged`], after the specific events of the same step.

mod backoff;
mod classify;
mod model;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};

pub use backoff::{Backoff, BackoffPolicy, Rng};
pub use classify::expiry_skew;
pub use model::*;

use crate::identity::UserId;

/// IM codes the engine uses (see `docs/errors.md`).
pub mod codes {
    pub const NOT_LOGGED_IN: u32 = 6014;
    pub const INVALID_PARAMETERS: u32 = 6017;
    pub const USER_SIG_EXPIRED: u32 = 6206;
    pub const KICKED_OFF_BY_OTHER: u32 = 6208;
    pub const LOGIN_IN_PROCESS: u32 = 7501;
    pub const LOGOUT_IN_PROCESS: u32 = 7502;
    pub const NET_DISCONNECT: u32 = 9508;
    pub const NET_CONN_TIMEOUT: u32 = 9510;
    pub const NET_CONN_REFUSE: u32 = 9511;
    pub const NET_DNS: u32 = 9516;
    pub const SVR_SIG_EXPIRED: u32 = 70001;
    pub const SVR_SIG_CHECK_FAILED: u32 = 70003;
    pub const SVR_SIG_MISMATCH_ID: u32 = 70013;
    pub const SVR_SIG_MISMATCH_APP: u32 = 70014;
    pub const SVR_FREQ_LIMIT: u32 = 70050;
    pub const SVR_BANNED: u32 = 70051;
}

/// `rejected_cooldown` is 0 (stay stopped) or at least this, and `rejected_cooldown_max` at
/// least [`REJECTED_COOLDOWN_MAX_FLOOR`]: after refusals, at most a few fresh tries in the
/// first ten minutes and one per half hour in the long run.
pub const REJECTED_COOLDOWN_MIN: Millis = 60_000;
pub const REJECTED_COOLDOWN_MAX_FLOOR: Millis = 30 * 60_000;
/// The outage window's floor (see [`Policy::outage_retry_floor`]): while the broker is away,
/// a CONNECT's backoff ceiling stays at most this (or the outage's length ÷
/// [`OUTAGE_RETRY_DIVISOR`], if longer), so a fleet's retries at the broker's return are
/// spread over at most this long (docs/login-policy.md, "During an outage: the outage window").
pub const OUTAGE_RETRY_FLOOR: Millis = 45_000;
/// The outage window grows with the outage: its ceiling is at least the outage's length ÷
/// this. A device is back at most about a sixth of the outage after the broker's return (or
/// the floor, if longer), and a long outage costs a bounded number of extra CONNECTs: the
/// window reaches the plain `backoff_cap` after `6 × backoff_cap` (30 min by default).
pub const OUTAGE_RETRY_DIVISOR: Millis = 6;
/// `relogin_after` is never shorter than this (a kick must never turn into a fight).
pub const RELOGIN_FLOOR: Millis = 60_000;
/// Repeated kicks double the `relogin_after` cool-down up to this.
pub const RELOGIN_MAX: Millis = 24 * 3_600_000;
/// Kicks are remembered this long for the doubling.
pub const KICK_MEMORY: Millis = 24 * 3_600_000;
/// The refresh floor's bounds (see [`Machine::refresh_floor`]).
pub const REFRESH_FLOOR_MIN: Millis = 10_000;
pub const REFRESH_FLOOR_MAX: Millis = 30_000;
/// A login whose session ends (not by us) within this of its CONNACK, counting the engine's
/// own planned moves to a refreshed sig as the same session, did not last.
pub const MIN_SESSION: Millis = 60_000;
/// A UserSig renewed less than this after it arrived lived too short: renewing each one as it
/// ends would be a login every few seconds (a unit mistake on the business server issues
/// 1–2 s sigs).
pub const MIN_SIG_LIFETIME: Millis = 60_000;
/// Logins that did not last, or renewals of short-lived sigs, in a row before the next login
/// waits [`FAST_LOGIN_DELAY`], doubling up to [`FAST_LOGIN_DELAY_MAX`] (half to all of it,
/// jittered). A session that lasts [`MIN_SESSION`], a stable session, or a local login,
/// reload or restart start the count over.
pub const FAST_LOGIN_BUDGET: u32 = 3;
pub const FAST_LOGIN_DELAY: Millis = 60_000;
pub const FAST_LOGIN_DELAY_MAX: Millis = 30 * 60_000;
/// The expiry skew's bounds (see [`expiry_skew`]).
pub const EXPIRY_SKEW_MIN: Millis = 2_000;
pub const EXPIRY_SKEW_MAX: Millis = 60_000;
/// A close without DISCONNECT up to this long after the deadline of the sig in use is the
/// server enforcing the expiry (`sig_expired`), not a network failure.
pub const EXPIRY_CLOSE_AFTER: Millis = 10_000;
/// Pending `login` requests joined to one attempt, at most.
const MAX_PENDING_LOGINS: usize = 16;

/// "Now", as the driver reads it: milliseconds on the boot-time clock (`CLOCK_BOOTTIME`: it
/// keeps counting through suspend), and Unix seconds from the wall clock (only used to judge
/// whether the clock is plausible, and as the server's time when it sends no `Date`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Millis,
    pub wall: i64,
}

/// What to do when kicked offline (DISCONNECT 0x8E or 0x98).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnKick {
    /// Stay logged out until a local app logs in (default).
    StayOffline,
    /// Log in again after this cool-down (at least [`RELOGIN_FLOOR`]), doubled for every
    /// other kick within [`KICK_MEMORY`], up to [`RELOGIN_MAX`].
    ReloginAfter(Millis),
}

/// The engine's policy knobs (from the config file).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub login_on_start: bool,
    pub backoff: BackoffPolicy,
    /// Fraction of the UserSig lifetime at which to refresh it (default 0.8).
    pub refresh_fraction: f64,
    /// ± jitter around the refresh point, as a fraction of the lifetime (default 0.05).
    pub refresh_jitter: f64,
    pub on_kick: OnKick,
    /// Premature sig-expired renewals allowed per window before stopping (default 3 / 10 min).
    pub sig_expired_budget: u32,
    pub sig_expired_window: Millis,
    /// Protocol-class failures allowed before stopping (default 3), restored by a login that
    /// stays up for the backoff reset window.
    pub protocol_budget: u32,
    /// Socket closes within `takeover_window` of CONNACK, this many in a row, mean a
    /// suspected takeover (default 3 within 10 s).
    pub takeover_closes: u32,
    pub takeover_window: Millis,
    /// After the rejection budget (a refusal, one fresh UserSig, refused too): one more fresh
    /// try after this cool-down (default 30 min, ± 25 % jitter; 0: stay stopped), doubling on
    /// each further one up to `rejected_cooldown_max` (default 8 h: a few tries a day).
    pub rejected_cooldown: Millis,
    pub rejected_cooldown_max: Millis,
    /// Cool-down after a suspected takeover (default 10 min, ± 25 % jitter), doubling on
    /// each further one up to `takeover_cooldown_max` (default 1 h).
    pub takeover_cooldown: Millis,
    pub takeover_cooldown_max: Millis,
    /// A wall clock before this Unix time is implausible (default: the build date).
    pub min_wall_clock: i64,
    /// How often to look again while waiting for the clock.
    pub clock_retry: Millis,
    /// A fetch with no answer after this (plus slack: the driver's own timeout normally fires
    /// first) is abandoned as a timeout.
    pub fetch_timeout: Millis,
    /// A connection with no CONNACK after this (plus slack) is abandoned as a timeout.
    pub connect_timeout: Millis,
    /// A clean DISCONNECT that has not completed after this is abandoned (default 3 s).
    pub close_timeout: Millis,
    /// A provisioning URL is configured. Without one, UserSigs come only from local apps
    /// (`login {user_id, user_sig}`): no fetch, no proactive refresh, and when the sig runs
    /// out the engine logs out and waits for the app's next login, as the SDK does.
    pub provisioning: bool,
    /// How many broker nodes are configured (`broker.urls`); network and busy failures move
    /// to the next one, with the same backoff.
    pub brokers: u32,
    /// Which MQTT protocol to speak.
    pub protocol: ProtocolMode,
    /// The outage window: while CONNECTs keep failing for network or busy reasons, the
    /// connect backoff's ceiling is at most `max(outage_retry_floor, outage ÷
    /// OUTAGE_RETRY_DIVISOR)` (and `backoff.cap`), the outage counted from the first such
    /// failure since the last CONNACK. Default [`OUTAGE_RETRY_FLOOR`]; 0: off (the plain
    /// doubling, what the storm simulation compares against). Not a config key.
    pub outage_retry_floor: Millis,
}

/// The configured protocol (`broker.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolMode {
    V5,
    V311,
    /// MQTT 5 first; a node that answers it with CONNACK "unsupported protocol version" (or
    /// closes before any CONNACK) gets MQTT 3.1.1 next, and whatever earns a CONNACK is
    /// remembered for that node.
    Auto,
}

/// What `Auto` knows about one server: the protocol that earned a CONNACK there, or that
/// MQTT 5 was refused as unsupported (or closed before any CONNACK) there, so 3.1.1 is next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ServerProto {
    proto: Option<Proto>,
    fallback: bool,
}

/// [`ServerProto`] per server: the configured nodes, and the last few redirect targets (a
/// broker names those, so they are bounded: the oldest is forgotten first).
#[derive(Debug, Clone, Default)]
struct Learned(VecDeque<(Target, ServerProto)>);

/// Redirect targets remembered by [`Learned`], at most.
const LEARNED_REDIRECTS: usize = 4;

impl Learned {
    fn get(&self, target: &Target) -> ServerProto {
        self.0
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, p)| *p)
            .unwrap_or_default()
    }

    fn set(&mut self, target: &Target, p: ServerProto) {
        self.0.retain(|(t, _)| t != target);
        self.0.push_back((target.clone(), p));
        let redirects = |l: &Learned| {
            l.0.iter()
                .filter(|(t, _)| matches!(t, Target::Redirect(_)))
                .count()
        };
        while redirects(self) > LEARNED_REDIRECTS {
            if let Some(i) = self
                .0
                .iter()
                .position(|(t, _)| matches!(t, Target::Redirect(_)))
            {
                self.0.remove(i);
            }
        }
    }
}

/// Consecutive redirects followed without a CONNACK before they are ignored (a redirect loop
/// between two servers must not become a login loop).
pub const MAX_REDIRECTS: u32 = 3;

/// Added to the driver's own fetch and connect timeouts: the machine's deadline is a backstop.
pub const TIMEOUT_SLACK: Millis = 2_000;

impl Default for Policy {
    fn default() -> Self {
        Policy {
            login_on_start: true,
            backoff: BackoffPolicy::default(),
            refresh_fraction: 0.8,
            refresh_jitter: 0.05,
            on_kick: OnKick::StayOffline,
            sig_expired_budget: 3,
            sig_expired_window: 600_000,
            protocol_budget: 3,
            rejected_cooldown: 30 * 60_000,
            rejected_cooldown_max: 8 * 3_600_000,
            takeover_closes: 3,
            takeover_window: 10_000,
            takeover_cooldown: 600_000,
            takeover_cooldown_max: 3_600_000,
            min_wall_clock: 0,
            clock_retry: 30_000,
            fetch_timeout: 15_000,
            connect_timeout: 10_000,
            close_timeout: 3_000,
            provisioning: true,
            brokers: 1,
            protocol: ProtocolMode::V5,
            outage_retry_floor: OUTAGE_RETRY_FLOOR,
        }
    }
}

impl Policy {
    /// The connect backoff's ceiling after an outage of `outage` ms (network or busy failures
    /// since the last CONNACK): `max(outage_retry_floor, outage ÷ OUTAGE_RETRY_DIVISOR)`;
    /// unlimited when the window is off. `backoff.cap` (and `backoff.base`) still apply.
    pub fn outage_ceiling(&self, outage: Millis) -> Millis {
        if self.outage_retry_floor == 0 {
            return Millis::MAX;
        }
        self.outage_retry_floor.max(outage / OUTAGE_RETRY_DIVISOR)
    }
}

/// What the session knows about a UserSig it holds (the secret stays with the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigInfo {
    pub fingerprint: String,
    /// Whom the sig is for (from the decoded sig, or the provisioning response).
    pub user_id: UserId,
    /// `TLS.time`, when the sig decodes.
    pub issued_at: Option<i64>,
    /// Unix seconds on the issuer's clock; `None`: unknown (opaque sig) → reactive refresh only.
    pub expires_at: Option<i64>,
    /// The issuer's "now" at `received_at`: the provisioning server's `Date` (or the local
    /// wall clock when it sent none). Anchors the deadline.
    pub server_now: i64,
    /// Boot-time milliseconds the sig was received (for a cache written in this boot: when it
    /// was fetched, so the anchor is exact).
    pub received_at: Millis,
    /// `server_now` was estimated from the local wall clock (a cache written in an earlier
    /// boot): meaningless while the wall clock is implausible, so such a sig is not used then.
    pub wall_anchored: bool,
}

/// Why a connection attempt or an established session ended, as the driver observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// CONNACK with a failure reason code (and the reason string and the IM code, when the
    /// broker sent them).
    Refused {
        code: u8,
        reason: Option<String>,
        im_code: Option<u32>,
    },
    /// CONNACK or DISCONNECT 0x9C (use another server) / 0x9D (server moved) with a Server
    /// Reference.
    Redirect {
        code: u8,
        reference: String,
        reason: Option<String>,
        im_code: Option<u32>,
    },
    /// The server sent DISCONNECT.
    ServerDisconnect {
        code: u8,
        reason: Option<String>,
        im_code: Option<u32>,
    },
    /// DNS, TCP, TLS I/O, timeouts, the socket closing without DISCONNECT.
    Network { kind: NetKind, detail: String },
    /// TLS said a certificate is not valid yet: the local clock is behind.
    CertNotYetValid { detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetKind {
    Dns,
    Refused,
    Timeout,
    /// The socket closed (EOF or reset) without a DISCONNECT.
    Closed,
    /// The socket closed without a DISCONNECT while a QoS 1 publish had waited for its PUBACK
    /// for `engine::STALLED_AFTER`: the broker could not store it (the engine tells). Like
    /// `Closed`, except that it is never an early close toward a suspected takeover.
    Stalled,
    Tls,
    Other,
}

impl NetKind {
    fn code(self) -> u32 {
        match self {
            NetKind::Dns => codes::NET_DNS,
            NetKind::Refused => codes::NET_CONN_REFUSE,
            NetKind::Timeout => codes::NET_CONN_TIMEOUT,
            NetKind::Closed | NetKind::Stalled | NetKind::Tls | NetKind::Other => {
                codes::NET_DISCONNECT
            }
        }
    }
}

/// A failed UserSig fetch, classified by the provisioning client (brief §3.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFailure {
    pub class: ErrorClass,
    pub code: u32,
    pub message: String,
    /// `Retry-After`, in milliseconds.
    pub retry_after: Option<Millis>,
    /// Retry with backoff, but stop after this many failures with this code in a row (a device
    /// token file that is empty mid-rotation, an odd 4xx): neither fatal at once nor forever.
    pub give_up_after: Option<u32>,
}

impl FetchFailure {
    pub fn new(class: ErrorClass, code: u32, message: impl Into<String>) -> FetchFailure {
        FetchFailure {
            class,
            code,
            message: message.into(),
            retry_after: None,
            give_up_after: None,
        }
    }
}

/// Identifies a local request (login/logout) so its reply can be routed back.
pub type RequestId = u64;

/// An error answered to a local request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub code: u32,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The daemon started: log in if `login_on_start`.
    Start,
    /// A cached UserSig was found at start (give before `Start`).
    CachedSig(SigInfo),
    /// A local app asks to log in (optionally as another user: account switch), optionally
    /// with a UserSig it brings (validated by the driver: user, app, expiry; the secret stays
    /// with the driver).
    Login {
        id: RequestId,
        user: Option<UserId>,
        sig: Option<SigInfo>,
    },
    Logout {
        id: RequestId,
    },
    /// SIGTERM: disconnect cleanly, then [`Action::Exit`].
    Shutdown,
    /// The config was reloaded. `user` is the configured UserID (compared with the previously
    /// *configured* one, so a reload does not undo a local app's account switch); `reconnect`
    /// says the connection settings changed.
    Reconfigured {
        policy: Policy,
        user: UserId,
        reconnect: bool,
    },
    SigFetched(SigInfo),
    SigFetchFailed(FetchFailure),
    /// CONNACK success.
    Connected {
        session_present: bool,
    },
    /// The connection attempt or the session ended (not by our own DISCONNECT).
    ConnectionEnded(ConnEnd),
    /// Our own DISCONNECT completed (the broker closed its side).
    Disconnected,
    /// The broker answered the inbox SUBSCRIBE (`granted`: every filter granted).
    SubAck {
        granted: bool,
    },
    MessageReceived,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch a UserSig for `user`; answer with `SigFetched` or `SigFetchFailed`.
    FetchSig { user: UserId },
    /// Abandon the fetch in flight (its result must not be delivered).
    CancelFetch,
    /// Connect as `user` with the sig that has this fingerprint, to `target`, speaking
    /// `proto`; answer with `Connected` or `ConnectionEnded`.
    Connect {
        user: UserId,
        fingerprint: String,
        target: Target,
        proto: Proto,
    },
    /// Subscribe to `user`'s inbox on the established connection (on every login: a session
    /// can exist without its subscription, and subscribing again is idempotent); again after
    /// a refusal. Answer with `SubAck`.
    Subscribe { user: UserId },
    /// Send DISCONNECT on the established connection; answer with `Disconnected` once the
    /// broker has closed its side.
    Disconnect,
    /// Drop the connection now, without waiting (an attempt with no CONNACK yet, or a clean
    /// close that took longer than the close timeout). No answer.
    Abandon,
    /// Store the sig with this fingerprint (issued for `user`) in the cache (0600, atomic).
    PersistSig { fingerprint: String, user: UserId },
    /// Delete the cached sig.
    ForgetSig,
    /// The machine will never name this sig again: the driver may drop the secret.
    ReleaseSig { fingerprint: String },
    /// Tell the API, systemd and the log.
    Emit(Event),
    /// Answer a local request.
    Reply {
        id: RequestId,
        result: Result<(), RequestError>,
    },
    /// Everything is closed: the daemon may exit.
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// The session needs a sig to log in (none, expired, or refused).
    Login,
    /// Proactive refresh beside a session whose sig is still good.
    Refresh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fetch {
    purpose: Purpose,
    deadline: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Conn {
    None,
    Connecting {
        fingerprint: String,
        user: UserId,
        deadline: Millis,
        /// The deadline and lifetime of the sig it was sent with.
        sig: SigClock,
    },
    Online {
        fingerprint: String,
        user: UserId,
        since: Millis,
        /// The inbox subscription on this connection.
        inbox: Inbox,
        sig: SigClock,
    },
    /// Our DISCONNECT is out; waiting for the broker to close (bounded by `deadline`).
    Closing {
        user: UserId,
        deadline: Millis,
    },
}

/// The inbox subscription of an established connection. Until the broker grants it, the
/// phase is `subscribing`, not `online`: a session that cannot receive is not online (a
/// cluster electing a leader refuses SUBSCRIBEs for a while; an ACL may refuse them for
/// good). A refusal is retried on the same connection with its own backoff
/// ([`SUBSCRIBE_RETRY`]); a SUBSCRIBE with no SUBACK within the connect timeout counts as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbox {
    /// SUBSCRIBE sent; no SUBACK yet (given up on at `deadline`).
    Pending {
        deadline: Millis,
    },
    Subscribed,
    /// Refused (or unanswered): SUBSCRIBE again at `retry_at`.
    Refused {
        retry_at: Millis,
    },
}

/// The backoff between SUBSCRIBEs the broker refused (cheap: one packet on an open
/// connection; capped low so the inbox comes back soon after a cluster election).
pub const SUBSCRIBE_RETRY: BackoffPolicy = BackoffPolicy {
    base: 1_000,
    cap: 30_000,
    reset_after: 0,
};

/// What the engine is trying to do. The phase is derived from this and from what is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// Logged out and not trying (initial with `login_on_start = false`, or after `logout`).
    Idle,
    /// Logged in, or trying to be.
    Online,
    /// Stopped on an error a new attempt cannot fix; `retry_at`: one more fresh try then
    /// (after refusals of fresh UserSigs: an auth service that is down must not strand a
    /// fleet).
    Stopped { retry_at: Option<Millis> },
    /// Kicked offline; `relogin_at`: one more login then (policy or suspected takeover).
    Kicked {
        reason: KickReason,
        relogin_at: Option<Millis>,
    },
    /// Shutting down: close, then [`Action::Exit`].
    Exit,
}

/// What a connection knows of the sig it was sent with: an expiry signal is judged against
/// that sig, not against one a refresh brought meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SigClock {
    /// Boot-time deadline (the issuer's expiry, anchored on its `Date`); `None`: unknown.
    deadline: Option<Millis>,
    lifetime: Option<Millis>,
    /// Boot-time instant the sig arrived.
    received_at: Millis,
}

#[derive(Debug, Clone)]
struct Sig {
    info: SigInfo,
    deadline: Option<Millis>,
    refresh_at: Option<Millis>,
    /// Lifetime in milliseconds (from issue when known, else what was left at receipt).
    lifetime: Option<Millis>,
}

/// The session engine. See the module docs.
pub struct Machine {
    policy: Policy,
    now: Now,
    /// The UserID in the config (a reload compares against it, not against `user`).
    configured_user: UserId,
    /// Whom we log in as (the configured user, or the last account switch).
    user: UserId,
    goal: Goal,
    /// The current login reached CONNACK (SDK LOGINED); survives network reconnects.
    logged_in: bool,
    /// The best sig for `user`.
    sig: Option<Sig>,
    /// Fingerprints of the sigs the driver holds secrets for.
    held: BTreeSet<String>,
    fetch: Option<Fetch>,
    conn: Conn,
    /// No attempt (connect or login fetch) before this: backoff, or the clock wait.
    retry_at: Option<Millis>,
    /// `retry_at` is a wait for the wall clock (phase `waiting_for_clock`).
    clock_wait: bool,
    /// When the last connect or login fetch started (a local login never forces attempts
    /// closer together than the backoff base).
    last_attempt: Option<Millis>,
    /// When to start the next proactive refresh (or retry a failed one).
    refresh_due: Option<Millis>,
    /// A refresh failed fatally while the sig is past its deadline: no more refreshes on this
    /// connection (it still works); the next login fetch decides.
    refresh_blocked: bool,
    /// The session has been up since this CONNACK without an unplanned end; at this time it
    /// counts as stable and every budget is restored.
    stable_at: Option<Millis>,
    connect_backoff: Backoff,
    fetch_backoff: Backoff,
    expired_backoff: Backoff,
    refresh_backoff: Backoff,
    /// Between refused SUBSCRIBEs on one connection ([`SUBSCRIBE_RETRY`]).
    subscribe_backoff: Backoff,
    /// Consecutive failed fetches since the last usable sig (see `Snapshot::renewal_failures`).
    renewal_failures: u32,
    /// The outage window: when the first network or busy CONNECT failure since the last
    /// CONNACK (or since the login began) happened (see [`Policy::outage_ceiling`]).
    outage_since: Option<Millis>,
    /// When premature sig-expired renewals happened, within the budget window.
    expiry_spent: VecDeque<Millis>,
    /// Logins in a row that did not last (see [`FAST_LOGIN_BUDGET`]).
    fast_logins: u32,
    /// The last sig that ended at its expiry: provisioning handing it out again is handing out
    /// an expired sig.
    ended_sig: Option<String>,
    /// The CONNACK that started the current session, across planned moves to a new sig.
    session_since: Option<Millis>,
    /// The one fresh-sig retry after a refusal has been used.
    rejected_retry_used: bool,
    /// Cool-downs after refusals since the session was last stable (doubles the next).
    rejected_level: u32,
    protocol_spent: u32,
    /// Consecutive fetch failures with a `give_up_after` limit: (code, count).
    limited: Option<(u32, u32)>,
    /// Consecutive socket closes shortly after CONNACK.
    early_closes: u32,
    /// Suspected takeovers since the session was last stable (doubles the cool-down).
    suspect_level: u32,
    /// Confirmed kicks within [`KICK_MEMORY`] (doubles `relogin_after`).
    kick_times: VecDeque<Millis>,
    /// The configured node to try (and stay with while it works).
    node: u32,
    /// What `Auto` learned, per server: a node restarting (a close before CONNACK) says
    /// nothing about the others.
    learned: Learned,
    /// The next attempt goes to this server (a broker's redirect).
    redirect: Option<String>,
    /// Redirects followed since the last CONNACK.
    redirects: u32,
    /// Where the current (or last) connection went, and in which protocol.
    via: Option<(Target, Proto)>,
    pending_logins: Vec<RequestId>,
    pending_logouts: Vec<RequestId>,
    last_error: Option<LastError>,
    last_event: Option<Event>,
    counters: Counters,
    rng: Rng,
    actions: VecDeque<Action>,
    exit_sent: bool,
    /// The derived phase as of the last emit, and since when.
    phase: Phase,
    since: Millis,
    /// What the last StateChanged said, to emit each change exactly once.
    emitted: Option<(Phase, u8, String, Option<LastError>)>,
}

impl Machine {
    pub fn new(policy: Policy, user: UserId, now: Now, seed: u64) -> Machine {
        Machine {
            node: 0,
            learned: Learned::default(),
            redirect: None,
            redirects: 0,
            via: None,
            policy,
            now,
            configured_user: user.clone(),
            user,
            goal: Goal::Idle,
            logged_in: false,
            sig: None,
            held: BTreeSet::new(),
            fetch: None,
            conn: Conn::None,
            retry_at: None,
            clock_wait: false,
            last_attempt: None,
            refresh_due: None,
            refresh_blocked: false,
            stable_at: None,
            connect_backoff: Backoff::default(),
            fetch_backoff: Backoff::default(),
            expired_backoff: Backoff::default(),
            refresh_backoff: Backoff::default(),
            subscribe_backoff: Backoff::default(),
            renewal_failures: 0,
            outage_since: None,
            expiry_spent: VecDeque::new(),
            fast_logins: 0,
            ended_sig: None,
            session_since: None,
            rejected_retry_used: false,
            rejected_level: 0,
            protocol_spent: 0,
            limited: None,
            early_closes: 0,
            suspect_level: 0,
            kick_times: VecDeque::new(),
            pending_logins: Vec::new(),
            pending_logouts: Vec::new(),
            last_error: None,
            last_event: None,
            counters: Counters::default(),
            rng: Rng::new(seed),
            actions: VecDeque::new(),
            exit_sent: false,
            phase: Phase::Idle,
            since: now.mono,
            emitted: None,
        }
    }

    // --- the driver's interface ---------------------------------------------------------

    pub fn handle(&mut self, now: Now, input: Input) {
        self.now = now;
        match input {
            Input::Start => {
                if self.policy.login_on_start && self.goal == Goal::Idle {
                    self.begin_login();
                }
            }
            Input::CachedSig(info) => self.on_cached_sig(info),
            Input::Login { id, user, sig } => self.on_login_request(id, user, sig),
            Input::Logout { id } => self.on_logout_request(id),
            Input::Shutdown => self.on_shutdown(),
            Input::Reconfigured {
                policy,
                user,
                reconnect,
            } => self.on_reconfigured(policy, user, reconnect),
            Input::SigFetched(info) => self.on_sig_fetched(info),
            Input::SigFetchFailed(f) => self.on_fetch_failed(f),
            Input::Connected { session_present } => self.on_connected(session_present),
            Input::ConnectionEnded(end) => self.on_connection_ended(end),
            Input::Disconnected => {
                if matches!(self.conn, Conn::Closing { .. }) {
                    self.conn = Conn::None;
                }
            }
            Input::MessageReceived => self.counters.messages_received += 1,
            Input::SubAck { granted } => self.on_suback(granted),
        }
        self.next_step();
        self.emit_state();
    }

    /// Time passed: act on whatever is due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        self.next_step();
        self.emit_state();
    }

    /// The next instant [`Machine::handle_timeout`] should be called at. Only future instants:
    /// a deadline that is due but waits on something in flight is not returned (what it waits
    /// on has its own deadline).
    pub fn poll_timeout(&self) -> Option<Millis> {
        let now = self.now.mono;
        let fetch = self.fetch.map(|f| f.deadline);
        let conn = match &self.conn {
            Conn::Connecting { deadline, .. } | Conn::Closing { deadline, .. } => Some(*deadline),
            Conn::Online { inbox, .. } => match inbox {
                Inbox::Pending { deadline } => Some(*deadline),
                Inbox::Refused { retry_at } => Some(*retry_at),
                Inbox::Subscribed => None,
            },
            _ => None,
        };
        let relogin = match self.goal {
            Goal::Kicked { relogin_at, .. }
            | Goal::Stopped {
                retry_at: relogin_at,
            } => relogin_at,
            _ => None,
        };
        let online_goal = self.goal == Goal::Online;
        let refresh = self
            .refresh_due
            .filter(|_| online_goal && !self.refresh_blocked);
        let retry = self.retry_at.filter(|_| online_goal);
        [fetch, conn, relogin, refresh, retry, self.stable_at]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn snapshot(&self) -> Snapshot {
        let next_retry_ms = match self.goal {
            Goal::Kicked { relogin_at, .. } => relogin_at,
            Goal::Stopped { retry_at } => retry_at,
            Goal::Online if self.conn == Conn::None => self.retry_at,
            _ => None,
        };
        Snapshot {
            phase: self.phase(),
            login_status: self.login_status(),
            login_user: self.login_user(),
            user_id: self.user.to_string(),
            since_ms: if self.phase() == self.phase {
                self.since
            } else {
                self.now.mono
            },
            last_error: self.last_error.clone(),
            sig: self.sig.as_ref().map(|s| SigStatus {
                fingerprint: s.info.fingerprint.clone(),
                expires_at: s.info.expires_at,
                deadline_ms: s.deadline,
                refresh_at_ms: if self.refresh_blocked {
                    None
                } else {
                    self.refresh_due
                },
                refreshing: self.fetch.is_some_and(|f| f.purpose == Purpose::Refresh),
            }),
            next_retry_ms,
            counters: self.counters.clone(),
            last_event: self.last_event.clone(),
            via: self.via.clone(),
            renewal_failures: self.renewal_failures,
            inbox_subscribed: matches!(
                self.conn,
                Conn::Online {
                    inbox: Inbox::Subscribed,
                    ..
                }
            ),
            next_subscribe_ms: match self.conn {
                Conn::Online {
                    inbox: Inbox::Refused { retry_at },
                    ..
                } => Some(retry_at),
                _ => None,
            },
        }
    }

    /// The phase, derived from the goal and from what is in flight.
    pub fn phase(&self) -> Phase {
        match self.goal {
            Goal::Stopped { .. } => Phase::Stopped,
            Goal::Kicked { .. } => Phase::Kicked,
            Goal::Idle | Goal::Exit => match self.conn {
                Conn::None => Phase::Idle,
                _ => Phase::LoggingOut,
            },
            Goal::Online => match &self.conn {
                Conn::Online {
                    user,
                    inbox: Inbox::Subscribed,
                    ..
                } if *user == self.user => Phase::Online,
                Conn::Online { user, .. } if *user == self.user => Phase::Subscribing,
                Conn::Online { .. } => Phase::LoggingOut,
                Conn::Closing { user, .. } if *user != self.user => Phase::LoggingOut,
                Conn::Closing { .. } | Conn::Connecting { .. } => Phase::Connecting,
                Conn::None => {
                    if self.clock_wait {
                        Phase::WaitingForClock
                    } else if self.retry_at.is_some_and(|t| t > self.now.mono) {
                        Phase::Backoff
                    } else if self.fetch.is_some() {
                        Phase::FetchingSig
                    } else {
                        // Only between an input and `next_step`.
                        Phase::Connecting
                    }
                }
            },
        }
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Shutting down (SIGTERM): whatever is closed now is closed for good.
    pub fn exiting(&self) -> bool {
        self.goal == Goal::Exit
    }

    /// Logged out on request (`logout`), or logging out.
    pub fn logged_out(&self) -> bool {
        self.goal == Goal::Idle
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// SDK `getLoginStatus`: 1 logged in, 2 logging in, 3 logged out.
    pub fn login_status(&self) -> u8 {
        if self.logged_in {
            login_status::LOGINED
        } else if self.goal == Goal::Online {
            login_status::LOGINING
        } else {
            login_status::LOGOUT
        }
    }

    /// SDK `getLoginUser`: the UserID when logged in, else empty.
    pub fn login_user(&self) -> String {
        if self.logged_in {
            self.user.to_string()
        } else {
            String::new()
        }
    }

    // --- the one place that decides -------------------------------------------------------

    /// Look at the whole state and take the next step. Called after every input and timeout.
    fn next_step(&mut self) {
        let now = self.now.mono;
        // Deadlines of what is in flight.
        if self.fetch.is_some_and(|f| f.deadline <= now) {
            self.act(Action::CancelFetch);
            self.on_fetch_failed(FetchFailure::new(
                ErrorClass::Network,
                codes::NET_CONN_TIMEOUT,
                format!(
                    "the provisioning server did not answer within {}",
                    human_ms(self.policy.fetch_timeout)
                ),
            ));
        }
        match &self.conn {
            Conn::Connecting { deadline, .. } if *deadline <= now => {
                self.act(Action::Abandon);
                self.on_connection_ended(ConnEnd::Network {
                    kind: NetKind::Timeout,
                    detail: format!(
                        "no CONNACK within {}",
                        human_ms(self.policy.connect_timeout)
                    ),
                });
            }
            Conn::Closing { deadline, .. } if *deadline <= now => {
                // The broker did not close after our DISCONNECT: drop the socket.
                self.act(Action::Abandon);
                self.conn = Conn::None;
            }
            _ => {}
        }
        if self.stable_at.is_some_and(|t| t <= now) {
            self.stable_at = None;
            if matches!(self.conn, Conn::Online { .. }) {
                self.on_stable();
            }
        }
        if let Goal::Stopped { retry_at: Some(t) } = self.goal
            && t <= now
        {
            // The cool-down after refusals is over: one more fresh try (a fresh UserSig, one
            // CONNECT). Refused again, it stops again for twice as long.
            self.goal = Goal::Online;
            self.retry_at = None;
            self.clock_wait = false;
            self.rejected_retry_used = true;
        }
        if let Goal::Kicked {
            relogin_at: Some(t),
            ..
        } = self.goal
            && t <= now
        {
            // The cool-down is over: one more login, with the budgets as they are (a
            // suspected takeover stays one early close away from the next, longer cool-down).
            self.goal = Goal::Online;
            self.retry_at = None;
            self.clock_wait = false;
        }
        match self.goal {
            Goal::Online => self.step_online(),
            _ => self.step_offline(),
        }
        self.release_unused_sigs();
    }

    fn step_offline(&mut self) {
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        if matches!(self.conn, Conn::Online { .. } | Conn::Connecting { .. }) {
            // An attempt is abandoned at once; a session gets a clean DISCONNECT.
            self.begin_close();
        }
        if self.conn == Conn::None {
            if matches!(self.goal, Goal::Idle | Goal::Exit) {
                self.reply_logouts();
            }
            if self.goal == Goal::Exit && !self.exit_sent {
                self.exit_sent = true;
                self.act(Action::Exit);
            }
        }
    }

    fn step_online(&mut self) {
        let now = self.now.mono;
        match &self.conn {
            Conn::Closing { .. } => return,
            Conn::Connecting { user, .. } if *user != self.user => self.begin_close(),
            Conn::Connecting { .. } => {
                self.maybe_refresh();
                return;
            }
            Conn::Online {
                user, fingerprint, ..
            } => {
                if *user != self.user {
                    // Account switch: log the old user out cleanly first.
                    return self.begin_close();
                }
                let newer = self
                    .usable_sig()
                    .is_some_and(|s| s.info.fingerprint != *fingerprint);
                if newer {
                    // Move the session to the new sig: clean DISCONNECT (the persistent
                    // session keeps QoS 1 messages), then CONNECT with the new sig.
                    return self.begin_close();
                }
                self.step_inbox();
                self.maybe_refresh();
                return;
            }
            Conn::None => {}
        }
        // Not connected: wait for the retry time, the clock, or what is in flight.
        if self.retry_at.is_some_and(|t| t > now) {
            self.maybe_refresh();
            return;
        }
        self.retry_at = None;
        self.clock_wait = false;
        if self.now.wall < self.policy.min_wall_clock {
            let err = LastError::new(
                0,
                ErrorClass::Clock,
                format!(
                    "the wall clock reads Unix time {}, before this build ({}): waiting for time sync",
                    self.now.wall, self.policy.min_wall_clock
                ),
            );
            return self.wait_for_clock(err);
        }
        if self.usable_sig().is_some() {
            return self.connect();
        }
        if let Some(ended) = self.sig.take() {
            self.ended_sig = Some(ended.info.fingerprint.clone());
            // The sig reached its end on our own clock while we held it: renew it. This is not
            // the server calling fresh sigs expired, so it spends no budget; it only happens
            // when an attempt is due, so backoff paces it (and, for a sig that arrived under
            // a minute ago, the fast-login floor).
            self.refresh_due = None;
            self.logged_in = false;
            self.event(Event::UserSigExpired {
                code: codes::USER_SIG_EXPIRED,
            });
            self.act(Action::ForgetSig);
            let lived = self.now.mono.saturating_sub(ended.info.received_at);
            if lived < MIN_SIG_LIFETIME && self.policy.provisioning {
                self.last_error = Some(LastError::new(
                    codes::USER_SIG_EXPIRED,
                    ErrorClass::SigExpired,
                    "the UserSig reached its end before a login could use it",
                ));
                if self.fast_login_floor(&format!("a UserSig that lived only {}", human_s(lived))) {
                    return;
                }
            }
        }
        match &mut self.fetch {
            Some(f) if f.purpose == Purpose::Refresh => {
                // The refresh under way becomes the login fetch.
                f.purpose = Purpose::Login;
            }
            Some(_) => {}
            None => self.start_fetch(Purpose::Login),
        }
    }

    /// The broker answered the inbox SUBSCRIBE.
    fn on_suback(&mut self, granted: bool) {
        let now = self.now.mono;
        let Conn::Online { inbox, .. } = &mut self.conn else {
            return; // stale: that connection is gone
        };
        if !matches!(inbox, Inbox::Pending { .. }) {
            return; // an answer to a SUBSCRIBE already given up on
        }
        if granted {
            *inbox = Inbox::Subscribed;
            self.subscribe_backoff.reset();
            return;
        }
        let wait = self.subscribe_backoff.next(&SUBSCRIBE_RETRY, &mut self.rng);
        *inbox = Inbox::Refused {
            retry_at: now + wait,
        };
        self.counters.subscribe_refusals += 1;
    }

    /// The inbox subscription's timers: a SUBSCRIBE unanswered for the connect timeout counts
    /// as refused; a refused one goes out again when its backoff is over.
    fn step_inbox(&mut self) {
        let now = self.now.mono;
        let Conn::Online { inbox, user, .. } = &mut self.conn else {
            return;
        };
        match *inbox {
            Inbox::Pending { deadline } if deadline <= now => {
                let wait = self.subscribe_backoff.next(&SUBSCRIBE_RETRY, &mut self.rng);
                *inbox = Inbox::Refused {
                    retry_at: now + wait,
                };
                self.counters.subscribe_refusals += 1;
            }
            Inbox::Refused { retry_at } if retry_at <= now => {
                *inbox = Inbox::Pending {
                    deadline: now + self.policy.connect_timeout,
                };
                let user = user.clone();
                self.act(Action::Subscribe { user });
            }
            _ => {}
        }
    }

    /// Start the proactive refresh when it is due and the fetch slot is free.
    fn maybe_refresh(&mut self) {
        if self.policy.provisioning
            && self.fetch.is_none()
            && !self.refresh_blocked
            && self.sig.is_some()
            && self.refresh_due.is_some_and(|t| t <= self.now.mono)
        {
            self.start_fetch(Purpose::Refresh);
        }
    }

    /// Tell the driver to forget every sig this machine no longer refers to.
    fn release_unused_sigs(&mut self) {
        let current = self.sig.as_ref().map(|s| s.info.fingerprint.as_str());
        let in_use = match &self.conn {
            Conn::Connecting { fingerprint, .. } | Conn::Online { fingerprint, .. } => {
                Some(fingerprint.as_str())
            }
            _ => None,
        };
        let unused: Vec<String> = self
            .held
            .iter()
            .filter(|fp| Some(fp.as_str()) != current && Some(fp.as_str()) != in_use)
            .cloned()
            .collect();
        for fingerprint in unused {
            self.held.remove(&fingerprint);
            self.act(Action::ReleaseSig { fingerprint });
        }
    }

    // --- helpers ------------------------------------------------------------------------

    fn act(&mut self, a: Action) {
        self.actions.push_back(a);
    }

    fn event(&mut self, e: Event) {
        if matches!(
            e,
            Event::KickedOffline { .. } | Event::UserSigExpired { .. }
        ) {
            self.last_event = Some(e.clone());
        }
        self.act(Action::Emit(e));
    }

    fn emit_state(&mut self) {
        let phase = self.phase();
        if phase != self.phase {
            self.phase = phase;
            self.since = self.now.mono;
        }
        let cur = (
            phase,
            self.login_status(),
            self.login_user(),
            self.last_error.clone(),
        );
        if self.emitted.as_ref() != Some(&cur) {
            self.emitted = Some(cur.clone());
            self.act(Action::Emit(Event::StateChanged {
                phase: cur.0,
                login_status: cur.1,
                login_user: cur.2,
                last_error: cur.3,
            }));
        }
    }

    fn reply_logins(&mut self, result: Result<(), RequestError>) {
        for id in std::mem::take(&mut self.pending_logins) {
            self.act(Action::Reply {
                id,
                result: result.clone(),
            });
        }
    }

    fn reply_logouts(&mut self) {
        for id in std::mem::take(&mut self.pending_logouts) {
            self.act(Action::Reply { id, result: Ok(()) });
        }
    }

    fn derive(&mut self, info: SigInfo) -> Sig {
        let Some(expires_at) = info.expires_at else {
            return Sig {
                info,
                deadline: None,
                refresh_at: None,
                lifetime: None,
            };
        };
        // Saturating everywhere: these numbers come from outside.
        let remaining_ms = expires_at
            .saturating_sub(info.server_now)
            .saturating_mul(1000);
        let deadline = offset(info.received_at, remaining_ms);
        let (start, lifetime_s) = match info.issued_at {
            Some(t) if t < expires_at => (t, expires_at.saturating_sub(t)),
            _ => (
                info.server_now,
                expires_at.saturating_sub(info.server_now).max(0),
            ),
        };
        let lifetime = (lifetime_s.max(0) as u64).saturating_mul(1000);
        let point_ms = (start.saturating_sub(info.server_now) as f64 * 1000.0
            + lifetime as f64 * self.policy.refresh_fraction) as i64;
        let jitter_ms = (lifetime as f64 * self.policy.refresh_jitter) as u64;
        let jitter = self.rng.range(0, jitter_ms.saturating_mul(2)) as i64 - jitter_ms as i64;
        let now = self.now.mono;
        let mut refresh_at = offset(info.received_at, point_ms.saturating_add(jitter)).max(now);
        // Always leave room before the deadline (a tenth of what remains, at least 1 s).
        let margin = (deadline.saturating_sub(now) / 10).max(1_000);
        refresh_at = refresh_at.min(deadline.saturating_sub(margin)).max(now);
        // A sig so short-lived that any fresh one would be due again within the refresh
        // floor is never refreshed proactively: it is renewed when it ends (paced by backoff).
        let refreshable = (lifetime as f64 * self.policy.refresh_fraction) as Millis
            >= Self::refresh_floor(Some(lifetime));
        Sig {
            info,
            deadline: Some(deadline),
            refresh_at: refreshable.then_some(refresh_at),
            lifetime: Some(lifetime),
        }
    }

    /// A refresh answer due for refresh again sooner than this is a failed refresh: a tenth
    /// of its lifetime, between 10 s and 30 s. So planned reconnects are never closer than
    /// 10 s apart, whatever lifetimes the provisioning server hands out.
    pub fn refresh_floor(lifetime: Option<Millis>) -> Millis {
        lifetime.map_or(REFRESH_FLOOR_MAX, |l| {
            (l / 10).clamp(REFRESH_FLOOR_MIN, REFRESH_FLOOR_MAX)
        })
    }

    fn sig_valid(s: &Sig, now: Millis) -> bool {
        s.deadline.is_none_or(|d| now < d)
    }

    /// The current sig, if it can be sent: for our user and not expired on our clock.
    fn usable_sig(&self) -> Option<&Sig> {
        self.sig
            .as_ref()
            .filter(|s| s.info.user_id == self.user && Self::sig_valid(s, self.now.mono))
    }

    // --- login flow -----------------------------------------------------------------------

    /// Start a login from scratch: budgets, backoffs and cool-downs start over (a local
    /// login, a reload out of `stopped`, or the start).
    fn begin_login(&mut self) {
        self.goal = Goal::Online;
        // A fresh start goes to the configured nodes: a redirect still pending from before
        // would be followed without being counted.
        self.redirect = None;
        self.redirects = 0;
        self.fast_logins = 0;
        self.session_since = None;
        self.rejected_retry_used = false;
        self.rejected_level = 0;
        self.expiry_spent.clear();
        self.protocol_spent = 0;
        self.limited = None;
        self.early_closes = 0;
        self.suspect_level = 0;
        self.kick_times.clear();
        self.connect_backoff.reset();
        self.fetch_backoff.reset();
        self.expired_backoff.reset();
        self.outage_since = None;
        self.retry_at = None;
        self.clock_wait = false;
        self.refresh_blocked = false;
    }

    /// The session stayed up for the reset window: every budget and backoff is restored.
    fn on_stable(&mut self) {
        self.fast_logins = 0;
        self.rejected_level = 0;
        self.connect_backoff.reset();
        self.fetch_backoff.reset();
        self.expired_backoff.reset();
        self.rejected_retry_used = false;
        self.protocol_spent = 0;
        self.limited = None;
        self.early_closes = 0;
        self.suspect_level = 0;
    }

    fn connect(&mut self) {
        let Some(sig) = self.usable_sig() else {
            return;
        };
        let fingerprint = sig.info.fingerprint.clone();
        let clock = SigClock {
            deadline: sig.deadline,
            lifetime: sig.lifetime,
            received_at: sig.info.received_at,
        };
        let (target, proto) = self.next_target();
        self.via = Some((target.clone(), proto));
        self.conn = Conn::Connecting {
            fingerprint: fingerprint.clone(),
            user: self.user.clone(),
            deadline: self.now.mono + self.policy.connect_timeout + TIMEOUT_SLACK,
            sig: clock,
        };
        self.last_attempt = Some(self.now.mono);
        self.counters.connect_attempts += 1;
        self.event(Event::Connecting {
            user_id: self.user.to_string(),
        });
        self.act(Action::Connect {
            user: self.user.clone(),
            fingerprint,
            target,
            proto,
        });
    }

    /// Where the next attempt goes and in which protocol: a pending redirect, else the
    /// current node; the configured protocol, or (`Auto`) what worked there before, else
    /// MQTT 5 unless it was just refused there as unsupported.
    fn next_target(&mut self) -> (Target, Proto) {
        let nodes = self.policy.brokers.max(1);
        if self.node >= nodes {
            self.node = 0;
        }
        let target = match self.redirect.take() {
            Some(r) => Target::Redirect(r),
            None => Target::Node(self.node),
        };
        let proto = match self.policy.protocol {
            ProtocolMode::V5 => Proto::V5,
            ProtocolMode::V311 => Proto::V311,
            ProtocolMode::Auto => match self.learned.get(&target) {
                ServerProto { proto: Some(p), .. } => p,
                ServerProto { fallback: true, .. } => Proto::V311,
                ServerProto { .. } => Proto::V5,
            },
        };
        (target, proto)
    }

    /// The next configured node (after a network or busy failure on this one).
    fn next_node(&mut self) {
        let nodes = self.policy.brokers.max(1);
        self.node = (self.node + 1) % nodes;
    }

    fn start_fetch(&mut self, purpose: Purpose) {
        if self.fetch.is_some() {
            return;
        }
        if !self.policy.provisioning {
            if purpose == Purpose::Login {
                self.await_app_sig();
            }
            return;
        }
        self.fetch = Some(Fetch {
            purpose,
            deadline: self.now.mono + self.policy.fetch_timeout + TIMEOUT_SLACK,
        });
        if purpose == Purpose::Login {
            self.last_attempt = Some(self.now.mono);
            // A login fetch: no session is up (an account switch, a renewal), so none goes on
            // across it toward stability or toward a login that lasted.
            self.stable_at = None;
            self.session_since = None;
        }
        self.refresh_due = None;
        self.counters.sig_fetches += 1;
        self.act(Action::FetchSig {
            user: self.user.clone(),
        });
    }

    /// Close the connection: DISCONNECT an established one, abandon an attempt.
    fn begin_close(&mut self) {
        match std::mem::replace(&mut self.conn, Conn::None) {
            Conn::Online { user, .. } => {
                self.act(Action::Disconnect);
                self.conn = Conn::Closing {
                    user,
                    deadline: self.now.mono + self.policy.close_timeout,
                };
            }
            Conn::Connecting { .. } => self.act(Action::Abandon),
            other => self.conn = other,
        }
    }

    /// Backoff before the next attempt; `retry_after` (the server's word) is a floor. A
    /// CONNECT after a network or busy failure is held within the outage window
    /// ([`Policy::outage_ceiling`]); fetches and every other class keep the plain doubling.
    fn backoff(&mut self, err: LastError, which: WhichBackoff, retry_after: Option<Millis>) {
        let now = self.now.mono;
        let limit = match which {
            WhichBackoff::Connect
                if matches!(err.class, ErrorClass::Network | ErrorClass::Busy) =>
            {
                let since = *self.outage_since.get_or_insert(now);
                self.policy.outage_ceiling(now.saturating_sub(since))
            }
            _ => Millis::MAX,
        };
        let b = match which {
            WhichBackoff::Connect => &mut self.connect_backoff,
            WhichBackoff::Fetch => &mut self.fetch_backoff,
        };
        let delay = b
            .next_within(&self.policy.backoff, &mut self.rng, limit)
            .max(retry_after.unwrap_or(0));
        self.retry_later(self.now.mono + delay);
        self.last_error = Some(err);
    }

    /// No attempt before `at`. A failure never brings the next attempt closer than a wait
    /// already set (a background refresh failing during a backoff must not cut it short).
    fn retry_later(&mut self, at: Millis) {
        let now = self.now.mono;
        self.retry_at = Some(match self.retry_at {
            Some(t) if t > now => t.max(at),
            _ => at,
        });
    }

    fn wait_for_clock(&mut self, err: LastError) {
        self.clock_wait = true;
        self.retry_at = Some(self.now.mono + self.policy.clock_retry);
        self.last_error = Some(err);
    }

    /// Stop: no more attempts until a local login, a reload or a restart.
    fn stop(&mut self, err: LastError) {
        self.stop_until(err, None);
    }

    /// Stop; `retry_at`: one more fresh try then (see [`Machine::on_sig_rejected`]).
    fn stop_until(&mut self, err: LastError, retry_at: Option<Millis>) {
        self.goal = Goal::Stopped { retry_at };
        self.logged_in = false;
        self.retry_at = None;
        self.clock_wait = false;
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        self.reply_logins(Err(RequestError {
            code: err.code,
            message: err.message.clone(),
        }));
        self.last_error = Some(err);
    }

    fn kicked(&mut self, reason: KickReason, message: String) {
        let relogin_at = match reason {
            KickReason::SuspectedTakeover => {
                // Never permanent, never a fight: a long jittered cool-down, doubling.
                let base = self
                    .policy
                    .takeover_cooldown
                    .saturating_mul(1u64 << self.suspect_level.min(20))
                    .min(self.policy.takeover_cooldown_max);
                self.suspect_level = self.suspect_level.saturating_add(1);
                // One more early close after the cool-down is the next suspected takeover.
                self.early_closes = self.policy.takeover_closes.saturating_sub(1);
                Some(self.now.mono + self.rng.range(base - base / 4, base + base / 4))
            }
            _ => match self.policy.on_kick {
                OnKick::StayOffline => None,
                OnKick::ReloginAfter(after) => {
                    let now = self.now.mono;
                    while self
                        .kick_times
                        .front()
                        .is_some_and(|t| now.saturating_sub(*t) >= KICK_MEMORY)
                    {
                        self.kick_times.pop_front();
                    }
                    let doublings = self.kick_times.len().min(20) as u32;
                    self.kick_times.push_back(now);
                    let cool = after
                        .max(RELOGIN_FLOOR)
                        .saturating_mul(1u64 << doublings)
                        .min(RELOGIN_MAX);
                    Some(now + cool)
                }
            },
        };
        self.goal = Goal::Kicked { reason, relogin_at };
        self.logged_in = false;
        self.retry_at = None;
        self.clock_wait = false;
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        self.counters.kicks += 1;
        let code = codes::KICKED_OFF_BY_OTHER;
        self.event(Event::KickedOffline {
            reason,
            code,
            message: message.clone(),
        });
        self.reply_logins(Err(RequestError {
            code,
            message: message.clone(),
        }));
        self.last_error = Some(LastError::new(code, ErrorClass::Kicked, message));
    }

    /// The sig is over (the server said so, or it arrived expired): renew it. A premature
    /// expiry (the server calls a sig expired that our clock says is good, or provisioning
    /// hands out expired sigs) spends the budget; every renewal after the first is paced by
    /// backoff.
    /// `forget`: the current sig is the one that ended (not a newer one a refresh brought).
    fn on_sig_expired(&mut self, premature: bool, forget: bool, code: u32, why: String) {
        self.logged_in = false;
        self.event(Event::UserSigExpired { code });
        if forget {
            if let Some(ended) = self.sig.take() {
                // At its end, the server enforced the expiry: that sig is over for good. (A
                // premature one the budget bounds: provisioning may hand the same sig again,
                // as a TLS-sig issued in the same second is the same sig.)
                if !premature {
                    self.ended_sig = Some(ended.info.fingerprint);
                }
                self.act(Action::ForgetSig);
            }
            self.refresh_due = None;
        }
        if premature {
            let window = self.policy.sig_expired_window;
            let now = self.now.mono;
            while self
                .expiry_spent
                .front()
                .is_some_and(|t| now.saturating_sub(*t) >= window)
            {
                self.expiry_spent.pop_front();
            }
            if self.expiry_spent.len() >= self.policy.sig_expired_budget as usize {
                return self.stop(LastError::new(
                    code,
                    ErrorClass::SigExpired,
                    format!(
                        "{why}; stopped after {} UserSig renewals within {}: the IM service keeps \
                         calling fresh UserSigs expired (check the provisioning and IM servers' \
                         clocks), then run `imlinkctl login`",
                        self.expiry_spent.len(),
                        human_ms(window)
                    ),
                ));
            }
            self.expiry_spent.push_back(now);
        }
        let err = LastError::new(code, ErrorClass::SigExpired, why);
        self.last_error = Some(err);
        if self.expired_backoff.attempts() == 0 {
            // The first renewal goes at once (a refresh under way counts as it).
            self.expired_backoff.count();
        } else {
            let delay = self
                .expired_backoff
                .next(&self.policy.backoff, &mut self.rng);
            self.retry_later(self.now.mono + delay);
            // The renewal waits: a refresh under way must not renew early behind its back.
            if self.fetch.take().is_some() {
                self.act(Action::CancelFetch);
            }
        }
    }

    /// Another login is needed after `why` (a login that lasted under [`MIN_SESSION`], or
    /// the renewal of a UserSig that lived under [`MIN_SIG_LIFETIME`]). Beyond
    /// [`FAST_LOGIN_BUDGET`] such logins in a row, the next one waits [`FAST_LOGIN_DELAY`],
    /// doubling up to [`FAST_LOGIN_DELAY_MAX`] (half to all of it, so a fleet spreads out),
    /// whatever the class said: never a login every few seconds. Returns whether it waits.
    fn fast_login_floor(&mut self, why: &str) -> bool {
        if self.goal != Goal::Online {
            return false;
        }
        self.fast_logins = self.fast_logins.saturating_add(1);
        let Some(over) = self.fast_logins.checked_sub(FAST_LOGIN_BUDGET + 1) else {
            return false;
        };
        let full = FAST_LOGIN_DELAY
            .saturating_mul(1u64 << over.min(20))
            .min(FAST_LOGIN_DELAY_MAX);
        let delay = self.rng.range(full / 2, full);
        self.retry_later(self.now.mono + delay);
        self.clock_wait = false;
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        let floor = format!(
            "{why}, {} such logins in a row: the next one waits {} (a login every few seconds \
             would be a storm; check the UserSig lifetime the business server sets and the \
             broker's logs)",
            self.fast_logins,
            human_s(delay)
        );
        self.last_error = Some(match self.last_error.take() {
            Some(e) => LastError {
                message: format!("{}; {floor}", e.message),
                ..e
            },
            None => LastError::new(codes::NET_DISCONNECT, ErrorClass::Network, floor),
        });
        true
    }

    /// The server refused a sig that is not expired: one fresh sig, then stop.
    fn on_sig_rejected(&mut self, err: LastError) {
        if self.sig.take().is_some() {
            self.act(Action::ForgetSig);
        }
        self.refresh_due = None;
        if self.rejected_retry_used {
            // The rejection budget is spent. With provisioning, a long cool-down (doubling,
            // jittered), then one more fresh try: when the auth service behind the broker is
            // down, every CONNECT of a fleet is refused, and none of it may stay stopped for
            // good. Without provisioning only the app can bring another sig.
            let cool = self.policy.rejected_cooldown;
            let retry_at = (cool > 0 && self.policy.provisioning).then(|| {
                let base = cool
                    .saturating_mul(1u64 << self.rejected_level.min(20))
                    .min(self.policy.rejected_cooldown_max.max(cool));
                self.rejected_level = self.rejected_level.saturating_add(1);
                self.now.mono + self.rng.range(base - base / 4, base + base / 4)
            });
            let then = match retry_at {
                Some(t) => format!(
                    "one more try with a fresh UserSig after a cool-down of {} (or run \
                     `imlinkctl login`)",
                    human_s(t - self.now.mono)
                ),
                None => "then run `imlinkctl login`".into(),
            };
            let message = format!(
                "{}; a freshly fetched UserSig was refused too, so the engine stopped (check \
                 sdk_app_id, user_id, the provisioning server's key, and the broker's auth \
                 service); {then}",
                err.message
            );
            return self.stop_until(LastError { message, ..err }, retry_at);
        }
        self.rejected_retry_used = true;
        self.last_error = Some(err);
        // `next_step` fetches the fresh sig at once.
    }

    fn on_protocol_error(&mut self, err: LastError) {
        self.protocol_spent += 1;
        if self.protocol_spent >= self.policy.protocol_budget {
            let message = format!(
                "{}; stopped after {} such errors without a stable session (a reconnect does \
                 not fix this: check the broker's limits and ACLs), then run `imlinkctl login`",
                err.message, self.protocol_spent
            );
            return self.stop(LastError { message, ..err });
        }
        self.backoff(err, WhichBackoff::Connect, None);
    }

    // --- inputs ---------------------------------------------------------------------------

    fn on_cached_sig(&mut self, info: SigInfo) {
        if info.user_id != self.user || self.sig.is_some() {
            return;
        }
        self.held.insert(info.fingerprint.clone());
        if info.wall_anchored && self.now.wall < self.policy.min_wall_clock {
            // Its deadline would be anchored on a clock we know is wrong.
            return;
        }
        // Kept even when already expired: the next attempt then says so (6206) and fetches.
        let sig = self.derive(info);
        self.refresh_due = sig.refresh_at;
        self.sig = Some(sig);
    }

    fn on_login_request(&mut self, id: RequestId, user: Option<UserId>, sig: Option<SigInfo>) {
        let user = user.unwrap_or_else(|| self.user.clone());
        let reply_err = |code: u32, message: &str| Action::Reply {
            id,
            result: Err(RequestError {
                code,
                message: message.to_string(),
            }),
        };
        if self.goal == Goal::Exit {
            return self.act(reply_err(
                codes::LOGOUT_IN_PROCESS,
                "the daemon is shutting down",
            ));
        }
        if self.goal == Goal::Idle && self.conn != Conn::None {
            return self.act(reply_err(
                codes::LOGOUT_IN_PROCESS,
                "a logout is in progress; try again when it is done",
            ));
        }
        if let Some(info) = &sig {
            if info.user_id != user {
                return self.act(reply_err(
                    codes::SVR_SIG_MISMATCH_ID,
                    "the UserSig given was issued for another UserID",
                ));
            }
            let derived = self.derive(info.clone());
            if !Self::sig_valid(&derived, self.now.mono) {
                return self.act(reply_err(
                    codes::USER_SIG_EXPIRED,
                    "the UserSig given has already expired",
                ));
            }
        }
        if self.goal == Goal::Online && user == self.user {
            if let Some(info) = sig.clone() {
                // A fresh sig from the app while trying (or online): use it from now on.
                self.install_app_sig(info);
            }
            if matches!(self.conn, Conn::Online { .. })
                && matches!(self.phase(), Phase::Online | Phase::Subscribing)
            {
                return self.act(Action::Reply { id, result: Ok(()) });
            }
            let waiting = self.conn == Conn::None
                && self.retry_at.is_some_and(|t| t > self.now.mono)
                && self.fetch.is_none_or(|f| f.purpose == Purpose::Refresh);
            // A person asked: the one fresh UserSig after a refusal is earned again, also when
            // the login comes while an attempt is under way (answered 7501): if that attempt's
            // sig is refused, the daemon tries a fresh one instead of stopping (the engine's
            // simulator: an operator's login during a CONNECT refused 0x86 ended stopped).
            self.rejected_retry_used = false;
            if waiting {
                // While only a timer is pending, an operator's login cuts the wait short
                // (never closer than the backoff base to the last attempt): a daemon that
                // looks stuck gets moving, even when many logins already wait for it.
                let earliest = self
                    .last_attempt
                    .map_or(0, |t| t + self.policy.backoff.base);
                self.retry_at = Some(earliest.max(self.now.mono));
                if self.retry_at.is_some_and(|t| t <= self.now.mono) {
                    self.retry_at = None;
                    self.clock_wait = false;
                }
            }
            if (waiting || self.logged_in) && self.pending_logins.len() < MAX_PENDING_LOGINS {
                // Join the login under way.
                self.pending_logins.push(id);
                return;
            }
            return self.act(reply_err(
                codes::LOGIN_IN_PROCESS,
                "a login is already in progress",
            ));
        }
        if self.goal == Goal::Online && !self.logged_in {
            return self.act(reply_err(
                codes::LOGIN_IN_PROCESS,
                "a login is already in progress",
            ));
        }
        self.pending_logins.push(id);
        if user != self.user {
            // Account switch (or a login as someone else).
            self.switch_account(user);
        }
        if let Some(info) = sig {
            self.install_app_sig(info);
        }
        self.last_error = None;
        self.begin_login();
    }

    /// Log in as `user` from now on: the old user's sig and any fetch for it are of no use
    /// (the session of the old user, if up, is closed by `next_step`). One function for both
    /// ways to switch: a local `login {user_id}` and a reload that changes `user_id`.
    fn switch_account(&mut self, user: UserId) {
        self.user = user;
        self.logged_in = false;
        self.session_since = None;
        if self.sig.take().is_some() {
            self.act(Action::ForgetSig);
        }
        self.refresh_due = None;
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
    }

    /// Hold a sig a local app brought (already checked: the target user, not expired): it
    /// becomes the session's sig and is cached like a fetched one.
    fn install_app_sig(&mut self, info: SigInfo) {
        if self
            .sig
            .as_ref()
            .is_some_and(|s| s.info.fingerprint == info.fingerprint)
        {
            return;
        }
        self.held.insert(info.fingerprint.clone());
        let sig = self.derive(info);
        let fingerprint = sig.info.fingerprint.clone();
        let user = sig.info.user_id.clone();
        self.refresh_due = sig.refresh_at.filter(|_| self.policy.provisioning);
        self.sig = Some(sig);
        self.refresh_blocked = false;
        self.act(Action::PersistSig { fingerprint, user });
    }

    /// No usable sig and no provisioning URL: only a local app can bring one. Log out and
    /// wait for its `login` (a refusal of the app's sig stays a stop, with the server's word).
    fn await_app_sig(&mut self) {
        if let Some(err) = self
            .last_error
            .clone()
            .filter(|e| e.class == ErrorClass::SigRejected)
        {
            return self.stop(err);
        }
        let err = LastError::new(
            codes::USER_SIG_EXPIRED,
            ErrorClass::SigExpired,
            "no valid UserSig and no provisioning URL: waiting for a local app to log in with \
             one (login {user_id, user_sig}; imlinkctl login --user-sig-file FILE)",
        );
        self.goal = Goal::Idle;
        self.logged_in = false;
        self.retry_at = None;
        self.clock_wait = false;
        self.reply_logins(Err(RequestError {
            code: err.code,
            message: err.message.clone(),
        }));
        self.last_error = Some(err);
    }

    fn on_logout_request(&mut self, id: RequestId) {
        self.pending_logouts.push(id);
        if self.goal == Goal::Exit {
            return;
        }
        self.goal = Goal::Idle;
        self.logged_in = false;
        self.retry_at = None;
        self.clock_wait = false;
        self.reply_logins(Err(RequestError {
            code: codes::LOGOUT_IN_PROCESS,
            message: "login cancelled by a logout".into(),
        }));
    }

    fn on_shutdown(&mut self) {
        self.goal = Goal::Exit;
        self.logged_in = false;
        self.retry_at = None;
        self.clock_wait = false;
        self.reply_logins(Err(RequestError {
            code: codes::LOGOUT_IN_PROCESS,
            message: "the daemon is shutting down".into(),
        }));
    }

    fn on_reconfigured(&mut self, policy: Policy, user: UserId, reconnect: bool) {
        let nodes_changed =
            policy.brokers != self.policy.brokers || policy.protocol != self.policy.protocol;
        self.policy = policy;
        if nodes_changed || reconnect {
            // Other brokers (or another protocol): what was learned about the old ones is void.
            self.learned = Learned::default();
            self.redirect = None;
            self.redirects = 0;
            if self.node >= self.policy.brokers.max(1) {
                self.node = 0;
            }
        }
        if self.goal == Goal::Exit {
            return;
        }
        let configured_changed = user != self.configured_user;
        self.configured_user = user.clone();
        if configured_changed && user != self.user {
            // The configured identity changed: switch accounts (or just remember whom to log
            // in as). A reload that leaves `user_id` alone keeps a local app's switch.
            self.switch_account(user);
            self.reply_logins(Err(RequestError {
                code: codes::LOGIN_IN_PROCESS,
                message: "the configured user_id changed; logging in as the new user".into(),
            }));
            if self.goal == Goal::Online {
                self.last_error = None;
                self.begin_login();
            }
        }
        if matches!(self.goal, Goal::Stopped { .. }) && self.policy.login_on_start {
            // A reload is one of the three ways out of `stopped`.
            self.last_error = None;
            self.begin_login();
        }
        if reconnect && self.goal == Goal::Online {
            // New connection settings: apply them now, also to an attempt under way.
            if matches!(self.conn, Conn::Online { .. } | Conn::Connecting { .. }) {
                self.begin_close();
            }
            self.retry_at = None;
            self.clock_wait = false;
        }
    }

    fn on_sig_fetched(&mut self, info: SigInfo) {
        self.held.insert(info.fingerprint.clone());
        let Some(fetch) = self.fetch.take() else {
            return; // cancelled
        };
        match self.judge(info, fetch.purpose) {
            Ok(sig) => self.adopt(sig),
            Err(f) => self.fetch_outcome_failed(fetch.purpose, f),
        }
    }

    /// Is a fetched sig fit to use? A refresh answer must also be an improvement.
    fn judge(&mut self, info: SigInfo, purpose: Purpose) -> Result<Sig, FetchFailure> {
        if info.user_id != self.user {
            return Err(FetchFailure::new(
                ErrorClass::Fatal,
                codes::SVR_SIG_MISMATCH_ID,
                format!(
                    "the provisioning server returned a UserSig for {:?}, not {:?}",
                    info.user_id.as_str(),
                    self.user.as_str()
                ),
            ));
        }
        let same = self
            .sig
            .as_ref()
            .is_some_and(|s| s.info.fingerprint == info.fingerprint);
        if self.ended_sig.as_ref() == Some(&info.fingerprint) {
            // Its own `Date` may say it is good: the IM service has just said otherwise.
            return Err(FetchFailure::new(
                ErrorClass::SigExpired,
                codes::USER_SIG_EXPIRED,
                "the provisioning server returned the UserSig that had just expired",
            ));
        }
        let sig = self.derive(info);
        let now = self.now.mono;
        if !Self::sig_valid(&sig, now) {
            return Err(FetchFailure::new(
                ErrorClass::SigExpired,
                codes::USER_SIG_EXPIRED,
                "the provisioning server issued a UserSig that had already expired",
            ));
        }
        if purpose == Purpose::Refresh {
            let useless = |why: String| {
                FetchFailure::new(
                    ErrorClass::Busy,
                    codes::SVR_SIG_CHECK_FAILED,
                    format!("the UserSig refresh brought nothing new: {why}"),
                )
            };
            if same {
                return Err(useless(
                    "the provisioning server returned the UserSig in use".into(),
                ));
            }
            let floor = Self::refresh_floor(sig.lifetime);
            if let Some(d) = sig.deadline
                && sig.refresh_at.is_none_or(|r| r < now + floor)
            {
                return Err(useless(format!(
                    "the new UserSig would be due for refresh again within {} (it expires in {})",
                    human_ms(floor),
                    human_ms(d.saturating_sub(now))
                )));
            }
        }
        Ok(sig)
    }

    fn adopt(&mut self, sig: Sig) {
        self.counters.sig_refreshes += 1;
        self.renewal_failures = 0;
        self.fetch_backoff.reset();
        self.refresh_backoff.reset();
        self.limited = None;
        self.refresh_blocked = false;
        let fingerprint = sig.info.fingerprint.clone();
        let user = sig.info.user_id.clone();
        let expires_at = sig.info.expires_at;
        self.refresh_due = sig.refresh_at;
        self.sig = Some(sig);
        if matches!(self.conn, Conn::Online { .. }) {
            // A refresh failure shown beside a working session is over.
            self.last_error = None;
        }
        self.act(Action::PersistSig {
            fingerprint: fingerprint.clone(),
            user,
        });
        self.event(Event::UserSigRefreshed {
            fingerprint,
            expires_at,
        });
    }

    fn on_fetch_failed(&mut self, f: FetchFailure) {
        let Some(fetch) = self.fetch.take() else {
            return; // cancelled
        };
        self.fetch_outcome_failed(fetch.purpose, f);
    }

    fn fetch_outcome_failed(&mut self, purpose: Purpose, f: FetchFailure) {
        self.counters.sig_fetch_failures += 1;
        self.renewal_failures = self.renewal_failures.saturating_add(1);
        let online = matches!(self.conn, Conn::Online { .. });
        let current_valid = self.usable_sig().is_some();
        if purpose == Purpose::Refresh && (current_valid || online) {
            return self.refresh_failed(f);
        }
        if self.goal != Goal::Online {
            return;
        }
        let err = LastError::new(f.code, f.class, f.message.clone());
        match f.class {
            ErrorClass::Fatal | ErrorClass::Kicked => self.stop(err),
            ErrorClass::Clock => self.wait_for_clock(err),
            ErrorClass::SigExpired => self.on_sig_expired(true, true, f.code, f.message),
            ErrorClass::SigRejected | ErrorClass::Protocol => self.on_protocol_error(err),
            ErrorClass::Network | ErrorClass::Busy => {
                if let Some(limit) = f.give_up_after {
                    let n = match self.limited {
                        Some((code, n)) if code == f.code => n + 1,
                        _ => 1,
                    };
                    self.limited = Some((f.code, n));
                    if n >= limit {
                        let message = format!("{}; gave up after {n} tries", f.message);
                        return self.stop(LastError::new(f.code, ErrorClass::Fatal, message));
                    }
                }
                // Other failures in between do not reset the count: only a sig does.
                // The retry fetches anew; a fresh-sig retry after a refusal stays used.
                self.backoff(err, WhichBackoff::Fetch, f.retry_after);
            }
        }
    }

    /// A proactive refresh failed: never fatal while the sig is valid or the session is up.
    fn refresh_failed(&mut self, f: FetchFailure) {
        let now = self.now.mono;
        let deadline = self.sig.as_ref().and_then(|s| s.deadline);
        if matches!(self.conn, Conn::Online { .. }) || self.last_error.is_none() {
            // Beside a working session, say why the refresh failed; in a backoff, the
            // connection's error stays the one shown.
            self.last_error = Some(LastError::new(
                f.code,
                f.class,
                format!(
                    "UserSig refresh failed (the session continues): {}",
                    f.message
                ),
            ));
        }
        if f.class == ErrorClass::Fatal && deadline.is_some_and(|d| d <= now) {
            // Past its deadline, on a broker that does not enforce it: keep the working
            // session, stop asking; the next login fetch decides.
            self.refresh_blocked = true;
            self.refresh_due = None;
            return;
        }
        // Refresh attempts are never closer than the refresh floor's minimum.
        let delay = self
            .refresh_backoff
            .next(&self.policy.backoff, &mut self.rng)
            .max(f.retry_after.unwrap_or(0))
            .max(REFRESH_FLOOR_MIN);
        let mut at = now + delay;
        if let Some(d) = deadline
            && d > now
            && at >= d
        {
            // Try at least once more shortly before the deadline.
            at = now + delay.min((d - now) / 2).max(REFRESH_FLOOR_MIN);
        }
        self.refresh_due = Some(at);
    }

    fn on_connected(&mut self, session_present: bool) {
        let Conn::Connecting {
            fingerprint,
            user,
            sig,
            ..
        } = std::mem::replace(&mut self.conn, Conn::None)
        else {
            return; // stale
        };
        self.conn = Conn::Online {
            fingerprint,
            user: user.clone(),
            since: self.now.mono,
            inbox: Inbox::Pending {
                deadline: self.now.mono + self.policy.connect_timeout,
            },
            sig,
        };
        self.subscribe_backoff.reset();
        if let Some((target, proto)) = &self.via {
            // Remember what this server speaks; stay with a node that works.
            self.learned.set(
                target,
                ServerProto {
                    proto: Some(*proto),
                    fallback: false,
                },
            );
            if let Target::Node(i) = target {
                self.node = *i;
            }
        }
        self.redirects = 0;
        self.outage_since = None;
        self.session_since.get_or_insert(self.now.mono);
        self.logged_in = true;
        self.counters.logins += 1;
        self.retry_at = None;
        self.clock_wait = false;
        if self.stable_at.is_none() {
            self.stable_at = Some(self.now.mono + self.policy.backoff.reset_after);
        }
        self.last_error = None;
        self.act(Action::Subscribe { user: user.clone() });
        self.event(Event::ConnectSuccess {
            user_id: user.to_string(),
            session_present,
        });
        self.reply_logins(Ok(()));
    }

    fn on_connection_ended(&mut self, end: ConnEnd) {
        let (online_since, sig, used) = match std::mem::replace(&mut self.conn, Conn::None) {
            Conn::Online {
                since,
                sig,
                fingerprint,
                ..
            } => (Some(since), sig, fingerprint),
            Conn::Connecting {
                sig, fingerprint, ..
            } => (None, sig, fingerprint),
            // We were closing anyway: done.
            Conn::Closing { .. } | Conn::None => return,
        };
        // How long the session lasted, across the engine's own planned moves.
        let lasted = online_since.map(|since| {
            self.now
                .mono
                .saturating_sub(self.session_since.take().unwrap_or(since))
        });
        if lasted.is_some_and(|l| l >= MIN_SESSION) {
            // A login that lasted: logins are not coming too fast.
            self.fast_logins = 0;
        }
        // The sig the connection used is over (if that is what this end says); one a refresh
        // brought meanwhile is not.
        let newer = self
            .usable_sig()
            .is_some_and(|s| s.info.fingerprint != used);
        let class = self.react_to_end(&end, online_since, sig, newer);
        let short_session = lasted.is_some_and(|l| l < MIN_SESSION);
        let lived = self.now.mono.saturating_sub(sig.received_at);
        // A new UserSig is fetched after an expiry or a refusal: one that arrived under a
        // minute ago means UserSigs are being issued too fast.
        let short_sig = matches!(class, ErrorClass::SigExpired | ErrorClass::SigRejected)
            && !newer
            && self.policy.provisioning
            && lived < MIN_SIG_LIFETIME;
        if short_session || short_sig {
            let why = match lasted {
                Some(l) if short_session => format!("a login that lasted {}", human_s(l)),
                _ => format!("a UserSig that lived only {}", human_s(lived)),
            };
            self.fast_login_floor(&why);
        }
    }

    /// Classify how a connection ended and react to it; returns the class.
    fn react_to_end(
        &mut self,
        end: &ConnEnd,
        online_since: Option<Millis>,
        sig: SigClock,
        newer: bool,
    ) -> ErrorClass {
        self.stable_at = None;
        let via = self.via.clone();
        let mut c = classify::classify(
            end,
            &classify::Context::new(online_since.is_some(), sig, self.now.mono),
        );
        // Auto: a node that will not take an MQTT 5 CONNECT gets 3.1.1 next (once per node:
        // what follows is judged as usual).
        let mut fallback = false;
        if online_since.is_none()
            && self.policy.protocol == ProtocolMode::Auto
            && c.class != ErrorClass::SigExpired
            && let Some((target, Proto::V5)) = &via
            && self.learned.get(target) == ServerProto::default()
            && matches!(
                end,
                ConnEnd::Refused { code: 0x84, .. }
                    | ConnEnd::Network {
                        kind: NetKind::Closed,
                        ..
                    }
            )
        {
            self.learned.set(
                target,
                ServerProto {
                    proto: None,
                    fallback: true,
                },
            );
            fallback = true;
            c = classify::Classified {
                class: ErrorClass::Network,
                err: LastError::new(
                    codes::NET_DISCONNECT,
                    ErrorClass::Network,
                    format!(
                        "{}; the broker may not speak MQTT 5: trying MQTT 3.1.1",
                        c.err.message
                    ),
                ),
                kick: None,
                premature: false,
            };
        }
        if online_since.is_none() {
            self.event(Event::ConnectFailed {
                code: c.err.code,
                class: c.class,
                message: c.err.message.clone(),
            });
        }
        let class = c.class;
        if self.goal != Goal::Online {
            return class;
        }
        if let ConnEnd::Redirect { reference, .. } = end
            && self.redirects < MAX_REDIRECTS
        {
            // Follow it (once per redirect, a bounded number in a row), paced by backoff.
            self.redirects += 1;
            self.redirect = Some(reference.clone());
            self.backoff(c.err, WhichBackoff::Connect, None);
            return class;
        }
        if matches!(c.class, ErrorClass::Network | ErrorClass::Busy)
            && !fallback
            && matches!(via, Some((Target::Node(i), _)) if i == self.node)
        {
            // Fail over: the next node, with the same backoff (a fleet never storms one).
            self.next_node();
        }
        match c.class {
            ErrorClass::Network | ErrorClass::Busy => {
                if let Some(since) = online_since {
                    let closed = matches!(
                        end,
                        ConnEnd::Network {
                            kind: NetKind::Closed,
                            ..
                        }
                    );
                    let stalled = matches!(
                        end,
                        ConnEnd::Network {
                            kind: NetKind::Stalled,
                            ..
                        }
                    );
                    let early =
                        closed && self.now.mono.saturating_sub(since) < self.policy.takeover_window;
                    // A stalled broker neither adds to nor clears the count of early closes.
                    if !stalled {
                        self.early_closes = if early { self.early_closes + 1 } else { 0 };
                    }
                    if self.early_closes >= self.policy.takeover_closes {
                        let message = format!(
                            "the server closed the session {} times within {} of login: another \
                             device is probably logged in with this identity (or the broker \
                             cannot serve this session, e.g. its queue is on a node that is \
                             down); not fighting for it",
                            self.early_closes,
                            human_ms(self.policy.takeover_window)
                        );
                        self.kicked(KickReason::SuspectedTakeover, message);
                        return ErrorClass::Kicked;
                    }
                }
                self.backoff(c.err, WhichBackoff::Connect, None);
            }
            ErrorClass::SigExpired => {
                self.on_sig_expired(c.premature, !newer, c.err.code, c.err.message)
            }
            ErrorClass::SigRejected => self.on_sig_rejected(c.err),
            ErrorClass::Protocol => self.on_protocol_error(c.err),
            ErrorClass::Kicked => self.kicked(
                c.kick.unwrap_or(KickReason::LoggedInElsewhere),
                c.err.message,
            ),
            ErrorClass::Fatal => self.stop(c.err),
            ErrorClass::Clock => self.wait_for_clock(c.err),
        }
        class
    }
}

enum WhichBackoff {
    Connect,
    Fetch,
}

/// `base + delta` on the boot-time clock, clamped at 0.
fn offset(base: Millis, delta_ms: i64) -> Millis {
    if delta_ms >= 0 {
        base.saturating_add(delta_ms as u64)
    } else {
        base.saturating_sub(delta_ms.unsigned_abs())
    }
}

/// A measured duration for a message: `1.5s`, `42s`, `3m`, `5h`.
fn human_s(ms: Millis) -> String {
    if ms < 10_000 && !ms.is_multiple_of(1000) {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 120_000 {
        format!("{}s", ms / 1000)
    } else if ms < 2 * 3_600_000 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}h", ms / 3_600_000)
    }
}

/// `600000` → `10m`, `10000` → `10s`.
pub fn human_ms(ms: Millis) -> String {
    if ms >= 3_600_000 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms >= 60_000 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
