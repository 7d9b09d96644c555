//! The session engine: a sans-IO state machine.
//!
//! [`Machine`] is a pure `(state, input) → (state, actions)`: no tokio, no sockets, no clock
//! reads. The driver ([`crate::driver`]) feeds it [`Input`]s stamped with [`Now`] (monotonic
//! milliseconds plus the wall clock), fires [`Machine::handle_timeout`] at
//! [`Machine::poll_timeout`], and carries out the [`Action`]s it drains with
//! [`Machine::poll_action`]. Every policy of brief §3 lives here and is tested on a fake clock
//! (`tests.rs`).
//!
//! Invariants:
//! * at most one provisioning fetch and one connection at a time, and never a connect or a
//!   fetch while the phase is `idle`, `kicked` or `stopped`;
//! * errors a new UserSig cannot fix stop the engine; the sig-expired path has a budget
//!   (3 per 10 min by default) and a rejected sig earns exactly one fresh retry;
//! * network errors reconnect with the same UserSig and no provisioning call;
//! * every change of the observable state is emitted exactly once, as one
//!   [`Event::StateChanged`], after the specific events of the same step.

mod backoff;
mod model;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

pub use backoff::{Backoff, BackoffPolicy, Rng};
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
    pub const SVR_FREQ_LIMIT: u32 = 70050;
    pub const SVR_BANNED: u32 = 70051;
}

/// "Now", as the driver reads it: monotonic milliseconds since the driver started, and Unix
/// seconds from the wall clock (only used to judge whether the clock is plausible).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Millis,
    pub wall: i64,
}

/// What to do when kicked offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnKick {
    /// Stay logged out until a local app logs in (default).
    StayOffline,
    /// Log in again after this cool-down.
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
    /// Sig-expired re-logins allowed per window before stopping (default 3 per 10 min).
    pub sig_expired_budget: u32,
    pub sig_expired_window: Millis,
    /// Socket closes within `takeover_window` of CONNACK, this many in a row, mean a
    /// suspected takeover (default 3 within 10 s).
    pub takeover_closes: u32,
    pub takeover_window: Millis,
    /// A wall clock before this Unix time is implausible (default: the build date).
    pub min_wall_clock: i64,
    /// How often to look again while waiting for the clock.
    pub clock_retry: Millis,
}

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
            takeover_closes: 3,
            takeover_window: 10_000,
            min_wall_clock: 0,
            clock_retry: 30_000,
        }
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
    /// The issuer's "now" when the sig was received: the provisioning server's `Date` (or the
    /// local wall clock when it sent none). Anchors the deadline.
    pub server_now: i64,
    /// Monotonic time the sig was received (or loaded from the cache).
    pub received_at: Millis,
}

/// Why a connection attempt or an established session ended, as the driver observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// CONNACK with a failure reason code.
    Refused { code: u8 },
    /// The server sent DISCONNECT.
    ServerDisconnect { code: u8, reason: Option<String> },
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
    Tls,
    Other,
}

impl NetKind {
    fn code(self) -> u32 {
        match self {
            NetKind::Dns => codes::NET_DNS,
            NetKind::Refused => codes::NET_CONN_REFUSE,
            NetKind::Timeout => codes::NET_CONN_TIMEOUT,
            NetKind::Closed | NetKind::Tls | NetKind::Other => codes::NET_DISCONNECT,
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
    /// A valid cached UserSig was found at start (give before `Start`).
    CachedSig(SigInfo),
    /// A local app asks to log in (optionally as another user: account switch).
    Login {
        id: RequestId,
        user: Option<UserId>,
    },
    Logout {
        id: RequestId,
    },
    /// SIGTERM: disconnect cleanly, then [`Action::Exit`].
    Shutdown,
    /// The config was reloaded. `user` is the configured UserID; `reconnect` says the
    /// connection settings changed.
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
    /// Our own DISCONNECT went out (or the attempt was abandoned).
    Disconnected,
    MessageReceived,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fetch a UserSig for `user`; answer with `SigFetched` or `SigFetchFailed`.
    FetchSig { user: UserId },
    /// Abandon the fetch in flight (its result must not be delivered).
    CancelFetch,
    /// Connect as `user` with the sig that has this fingerprint; answer with `Connected` or
    /// `ConnectionEnded`.
    Connect { user: UserId, fingerprint: String },
    /// Send DISCONNECT (or abandon the attempt); answer with `Disconnected`.
    Disconnect,
    /// Store the sig with this fingerprint in the cache (0600, atomic).
    PersistSig { fingerprint: String },
    /// Delete the cached sig.
    ForgetSig,
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
enum FetchPurpose {
    /// No usable sig: the first fetch of a login.
    Initial,
    /// The sig expired (locally, or the server said so).
    Expired,
    /// The server refused the sig: the one fresh retry.
    Rejected,
    /// Proactive refresh before expiry.
    Refresh,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Conn {
    None,
    Connecting { fingerprint: String },
    Online { since: Millis, fingerprint: String },
    Closing { then: AfterClose },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterClose {
    /// Planned move to a new UserSig or new settings: connect again.
    Reconnect,
    /// Account switch: log in as this user.
    Switch(UserId),
    Logout,
    /// Close after a stop; the phase stays `stopped`.
    Stay,
    Shutdown,
}

#[derive(Debug, Clone)]
struct Sig {
    info: SigInfo,
    deadline: Option<Millis>,
    refresh_at: Option<Millis>,
}

#[derive(Debug, Default, Clone)]
struct Timers {
    /// Backoff: try again (connect or fetch, whatever is next).
    retry: Option<Millis>,
    /// Proactive UserSig refresh (or its retry).
    refresh: Option<Millis>,
    /// Online long enough: reset the backoff.
    backoff_reset: Option<Millis>,
    /// `on_kick.relogin_after` cool-down.
    relogin: Option<Millis>,
    /// Look at the wall clock again.
    clock: Option<Millis>,
}

/// The session engine. See the module docs.
pub struct Machine {
    policy: Policy,
    now: Now,
    phase: Phase,
    since: Millis,
    /// Whom we log in as.
    user: UserId,
    /// A login is wanted (not idle, kicked or stopped).
    want_online: bool,
    /// The current login reached CONNACK (SDK LOGINED); survives network reconnects.
    logged_in: bool,
    sig: Option<Sig>,
    fetch: Option<FetchPurpose>,
    conn: Conn,
    connect_backoff: Backoff,
    fetch_backoff: Backoff,
    refresh_backoff: Backoff,
    timers: Timers,
    /// When sig-expired re-logins happened, within the budget window.
    expiry_spent: VecDeque<Millis>,
    /// The one fresh-sig retry after a refusal has been used.
    rejected_retry_used: bool,
    /// Consecutive socket closes shortly after CONNACK.
    early_closes: u32,
    pending_logins: Vec<RequestId>,
    pending_logouts: Vec<RequestId>,
    last_error: Option<LastError>,
    last_event: Option<Event>,
    counters: Counters,
    rng: Rng,
    actions: VecDeque<Action>,
    /// What the last StateChanged said, to emit each change exactly once.
    emitted: Option<(Phase, u8, String, Option<LastError>)>,
}

impl Machine {
    pub fn new(policy: Policy, user: UserId, now: Now, seed: u64) -> Machine {
        Machine {
            policy,
            now,
            phase: Phase::Idle,
            since: now.mono,
            user,
            want_online: false,
            logged_in: false,
            sig: None,
            fetch: None,
            conn: Conn::None,
            connect_backoff: Backoff::default(),
            fetch_backoff: Backoff::default(),
            refresh_backoff: Backoff::default(),
            timers: Timers::default(),
            expiry_spent: VecDeque::new(),
            rejected_retry_used: false,
            early_closes: 0,
            pending_logins: Vec::new(),
            pending_logouts: Vec::new(),
            last_error: None,
            last_event: None,
            counters: Counters::default(),
            rng: Rng::new(seed),
            actions: VecDeque::new(),
            emitted: None,
        }
    }

    // --- the driver's interface ---------------------------------------------------------

    pub fn handle(&mut self, now: Now, input: Input) {
        self.now = now;
        match input {
            Input::Start => {
                if self.policy.login_on_start {
                    self.begin_login();
                }
            }
            Input::CachedSig(info) => {
                if info.user_id == self.user {
                    let sig = self.derive(info);
                    self.sig = Some(sig);
                    self.arm_refresh();
                }
            }
            Input::Login { id, user } => self.on_login_request(id, user),
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
            Input::Disconnected => self.on_disconnected(),
            Input::MessageReceived => self.counters.messages_received += 1,
        }
        self.emit_state();
    }

    /// Fire every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        let due = |t: &mut Option<Millis>| {
            if t.is_some_and(|at| at <= now.mono) {
                *t = None;
                true
            } else {
                false
            }
        };
        if due(&mut self.timers.backoff_reset) {
            self.connect_backoff.reset();
        }
        if due(&mut self.timers.clock) && self.want_online && self.idle_io() {
            self.proceed();
        }
        if due(&mut self.timers.retry) && self.want_online && self.idle_io() {
            self.proceed();
        }
        if due(&mut self.timers.refresh) && self.want_online && self.fetch.is_none() {
            self.start_fetch(FetchPurpose::Refresh);
        }
        if due(&mut self.timers.relogin) && !self.want_online {
            self.begin_login();
        }
        self.emit_state();
    }

    /// The next instant [`Machine::handle_timeout`] should be called at.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let t = &self.timers;
        [t.retry, t.refresh, t.backoff_reset, t.relogin, t.clock]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase,
            login_status: self.login_status(),
            login_user: self.login_user(),
            user_id: self.user.to_string(),
            since_ms: self.since,
            last_error: self.last_error.clone(),
            sig: self.sig.as_ref().map(|s| SigStatus {
                fingerprint: s.info.fingerprint.clone(),
                expires_at: s.info.expires_at,
                deadline_ms: s.deadline,
                refresh_at_ms: self.timers.refresh.or(s.refresh_at),
                refreshing: self.fetch == Some(FetchPurpose::Refresh),
            }),
            next_retry_ms: self
                .timers
                .retry
                .or(self.timers.relogin)
                .or(self.timers.clock),
            counters: self.counters.clone(),
            last_event: self.last_event.clone(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// SDK `getLoginStatus`: 1 logged in, 2 logging in, 3 logged out.
    pub fn login_status(&self) -> u8 {
        if self.logged_in {
            login_status::LOGINED
        } else if self.want_online {
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

    fn set_phase(&mut self, p: Phase) {
        if self.phase != p {
            self.phase = p;
            self.since = self.now.mono;
        }
    }

    fn emit_state(&mut self) {
        let cur = (
            self.phase,
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

    /// No fetch and no connection in flight.
    fn idle_io(&self) -> bool {
        self.fetch.is_none() && self.conn == Conn::None
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
            };
        };
        let remaining_s = expires_at - info.server_now;
        let deadline = offset(info.received_at, remaining_s * 1000);
        // Lifetime: from issue when known, else what was left at receipt.
        let (start, lifetime_s) = match info.issued_at {
            Some(t) if t < expires_at => (t, expires_at - t),
            _ => (info.server_now, remaining_s.max(0)),
        };
        let point_s = start as f64 + lifetime_s as f64 * self.policy.refresh_fraction;
        let jitter_ms = (lifetime_s as f64 * 1000.0 * self.policy.refresh_jitter) as u64;
        let jitter = self.rng.range(0, 2 * jitter_ms) as i64 - jitter_ms as i64;
        let refresh_ms = ((point_s - info.server_now as f64) * 1000.0) as i64 + jitter;
        let mut refresh_at = offset(info.received_at, refresh_ms).max(self.now.mono);
        // Always leave room before the deadline (a tenth of what remains, at least 1 s).
        let margin = ((deadline.saturating_sub(self.now.mono)) / 10).max(1_000);
        refresh_at = refresh_at
            .min(deadline.saturating_sub(margin))
            .max(self.now.mono);
        Sig {
            info,
            deadline: Some(deadline),
            refresh_at: Some(refresh_at),
        }
    }

    fn sig_expired_locally(&self) -> bool {
        self.sig
            .as_ref()
            .and_then(|s| s.deadline)
            .is_some_and(|d| self.now.mono >= d)
    }

    fn arm_refresh(&mut self) {
        self.timers.refresh = self.sig.as_ref().and_then(|s| s.refresh_at);
    }

    // --- login flow -----------------------------------------------------------------------

    /// Start (or restart) a login from scratch: budgets and retries start over.
    fn begin_login(&mut self) {
        self.want_online = true;
        self.rejected_retry_used = false;
        self.expiry_spent.clear();
        self.early_closes = 0;
        self.connect_backoff.reset();
        self.fetch_backoff.reset();
        self.timers.relogin = None;
        self.timers.retry = None;
        if self.idle_io() {
            self.proceed();
        }
    }

    /// Take the next step toward online: check the clock, then connect with a usable sig or
    /// fetch one. Only called with nothing in flight.
    fn proceed(&mut self) {
        if !self.want_online || !self.idle_io() {
            return;
        }
        self.timers.retry = None;
        self.timers.clock = None;
        if self.now.wall < self.policy.min_wall_clock {
            self.set_phase(Phase::WaitingForClock);
            self.last_error = Some(LastError::new(
                0,
                ErrorClass::Clock,
                format!(
                    "the wall clock reads Unix time {}, before this build ({}): waiting for time sync",
                    self.now.wall, self.policy.min_wall_clock
                ),
            ));
            self.timers.clock = Some(self.now.mono + self.policy.clock_retry);
            return;
        }
        match &self.sig {
            Some(s) if s.info.user_id != self.user => {
                self.sig = None;
                self.start_fetch(FetchPurpose::Initial);
            }
            Some(_) if self.sig_expired_locally() => self.on_sig_expired(
                codes::USER_SIG_EXPIRED,
                "the UserSig expired before it could be used".into(),
            ),
            Some(_) => self.connect(),
            None => self.start_fetch(FetchPurpose::Initial),
        }
    }

    fn connect(&mut self) {
        let Some(sig) = &self.sig else {
            return self.start_fetch(FetchPurpose::Initial);
        };
        let fingerprint = sig.info.fingerprint.clone();
        self.conn = Conn::Connecting {
            fingerprint: fingerprint.clone(),
        };
        self.set_phase(Phase::Connecting);
        self.counters.connect_attempts += 1;
        self.event(Event::Connecting {
            user_id: self.user.to_string(),
        });
        self.act(Action::Connect {
            user: self.user.clone(),
            fingerprint,
        });
    }

    fn start_fetch(&mut self, purpose: FetchPurpose) {
        if self.fetch.is_some() {
            return;
        }
        self.fetch = Some(purpose);
        self.counters.sig_fetches += 1;
        if purpose == FetchPurpose::Refresh {
            // A refresh happens beside whatever the session is doing.
            self.timers.refresh = None;
        } else {
            self.set_phase(Phase::FetchingSig);
        }
        self.act(Action::FetchSig {
            user: self.user.clone(),
        });
    }

    /// Backoff before the next step; `retry_after` (the server's word) is a floor.
    fn backoff(&mut self, err: LastError, which: WhichBackoff, retry_after: Option<Millis>) {
        let b = match which {
            WhichBackoff::Connect => &mut self.connect_backoff,
            WhichBackoff::Fetch => &mut self.fetch_backoff,
        };
        let delay = b
            .next(&self.policy.backoff, &mut self.rng)
            .max(retry_after.unwrap_or(0));
        self.timers.retry = Some(self.now.mono + delay);
        self.last_error = Some(err);
        self.set_phase(Phase::Backoff);
    }

    /// Stop: no more attempts until a local login, a reload or a restart.
    fn stop(&mut self, err: LastError) {
        self.want_online = false;
        self.logged_in = false;
        self.timers = Timers {
            backoff_reset: None,
            ..Timers::default()
        };
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        if !matches!(self.conn, Conn::None | Conn::Closing { .. }) {
            self.conn = Conn::Closing {
                then: AfterClose::Stay,
            };
            self.act(Action::Disconnect);
        }
        self.set_phase(Phase::Stopped);
        self.reply_logins(Err(RequestError {
            code: err.code,
            message: err.message.clone(),
        }));
        self.last_error = Some(err);
    }

    fn kicked(&mut self, reason: KickReason, message: String) {
        self.want_online = false;
        self.logged_in = false;
        self.timers = Timers::default();
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        self.counters.kicks += 1;
        self.set_phase(Phase::Kicked);
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
        if let OnKick::ReloginAfter(after) = self.policy.on_kick {
            self.timers.relogin = Some(self.now.mono + after);
        }
    }

    /// The sig expired (server said so, or the local clock): renew within the budget.
    fn on_sig_expired(&mut self, code: u32, why: String) {
        self.logged_in = false;
        self.event(Event::UserSigExpired { code });
        self.sig = None;
        self.timers.refresh = None;
        self.act(Action::ForgetSig);
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
        self.last_error = Some(LastError::new(code, ErrorClass::SigExpired, why));
        if self.fetch.is_none() {
            self.start_fetch(FetchPurpose::Expired);
        } else {
            // A refresh is already under way: let it count as the renewal.
            self.fetch = Some(FetchPurpose::Expired);
            self.set_phase(Phase::FetchingSig);
        }
    }

    /// The server refused a sig that is not expired: one fresh sig, then stop.
    fn on_sig_rejected(&mut self, err: LastError) {
        self.sig = None;
        self.timers.refresh = None;
        self.act(Action::ForgetSig);
        if self.rejected_retry_used {
            let message = format!(
                "{}; a freshly fetched UserSig was refused too, so the engine stopped \
                 (check sdk_app_id, user_id and the provisioning server's key), then run \
                 `imlinkctl login`",
                err.message
            );
            return self.stop(LastError { message, ..err });
        }
        self.rejected_retry_used = true;
        self.last_error = Some(err);
        self.start_fetch(FetchPurpose::Rejected);
    }

    // --- inputs ---------------------------------------------------------------------------

    fn on_login_request(&mut self, id: RequestId, user: Option<UserId>) {
        let user = user.unwrap_or_else(|| self.user.clone());
        let reply_err = |code: u32, message: &str| Action::Reply {
            id,
            result: Err(RequestError {
                code,
                message: message.to_string(),
            }),
        };
        if self.phase == Phase::LoggingOut {
            return self.act(reply_err(
                codes::LOGOUT_IN_PROCESS,
                "a logout is in progress; try again when it is done",
            ));
        }
        if self.logged_in && user == self.user {
            return self.act(Action::Reply { id, result: Ok(()) });
        }
        if self.want_online && !self.logged_in {
            return self.act(reply_err(
                codes::LOGIN_IN_PROCESS,
                "a login is already in progress",
            ));
        }
        self.pending_logins.push(id);
        if self.logged_in {
            // Account switch: log the current user out cleanly, then log in as `user`.
            self.timers = Timers::default();
            if self.fetch.take().is_some() {
                self.act(Action::CancelFetch);
            }
            self.close_then(AfterClose::Switch(user));
            return;
        }
        if user != self.user {
            self.user = user;
            self.sig = None;
        }
        self.last_error = None;
        self.begin_login();
    }

    /// Close the connection (if any), then carry out `then`. Never sends a second
    /// DISCONNECT while one is under way.
    fn close_then(&mut self, then: AfterClose) {
        match self.conn {
            Conn::None => {
                self.conn = Conn::Closing { then };
                self.on_disconnected();
            }
            Conn::Closing { .. } => self.conn = Conn::Closing { then },
            Conn::Connecting { .. } | Conn::Online { .. } => {
                self.conn = Conn::Closing { then };
                self.set_phase(Phase::LoggingOut);
                self.act(Action::Disconnect);
            }
        }
    }

    fn switch_to(&mut self, user: UserId) {
        self.logged_in = false;
        if user != self.user {
            self.user = user;
            self.sig = None;
            self.act(Action::ForgetSig);
        }
        self.last_error = None;
        self.begin_login();
    }

    fn on_logout_request(&mut self, id: RequestId) {
        self.want_online = false;
        self.timers = Timers::default();
        self.reply_logins(Err(RequestError {
            code: codes::LOGOUT_IN_PROCESS,
            message: "login cancelled by a logout".into(),
        }));
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        self.pending_logouts.push(id);
        let shutting_down = self.conn
            == Conn::Closing {
                then: AfterClose::Shutdown,
            };
        self.close_then(if shutting_down {
            AfterClose::Shutdown
        } else {
            AfterClose::Logout
        });
    }

    fn on_shutdown(&mut self) {
        self.want_online = false;
        self.timers = Timers::default();
        self.reply_logins(Err(RequestError {
            code: codes::LOGOUT_IN_PROCESS,
            message: "the daemon is shutting down".into(),
        }));
        if self.fetch.take().is_some() {
            self.act(Action::CancelFetch);
        }
        self.close_then(AfterClose::Shutdown);
    }

    fn on_reconfigured(&mut self, policy: Policy, user: UserId, reconnect: bool) {
        self.policy = policy;
        if user != self.user && (self.want_online || self.logged_in) {
            // The configured identity changed: switch accounts.
            if self.fetch.take().is_some() {
                self.act(Action::CancelFetch);
            }
            self.timers = Timers::default();
            self.close_then(AfterClose::Switch(user));
            return;
        }
        if user != self.user {
            self.user = user;
            self.sig = None;
        }
        match self.phase {
            // A reload is one of the three ways out of `stopped`.
            Phase::Stopped if self.policy.login_on_start => {
                self.last_error = None;
                self.begin_login();
            }
            Phase::Online if reconnect => {
                self.conn = Conn::Closing {
                    then: AfterClose::Reconnect,
                };
                self.act(Action::Disconnect);
            }
            _ => {}
        }
    }

    fn on_sig_fetched(&mut self, info: SigInfo) {
        let Some(purpose) = self.fetch.take() else {
            return; // cancelled
        };
        if info.user_id != self.user {
            return self.stop(LastError::new(
                codes::SVR_SIG_MISMATCH_ID,
                ErrorClass::Fatal,
                format!(
                    "the provisioning server returned a UserSig for {:?}, not {:?}",
                    info.user_id.as_str(),
                    self.user.as_str()
                ),
            ));
        }
        let sig = self.derive(info);
        if sig.deadline.is_some_and(|d| d <= self.now.mono) {
            // Expired on arrival (by the issuer's own Date): never sent.
            self.counters.sig_fetch_failures += 1;
            return self.on_sig_expired(
                codes::USER_SIG_EXPIRED,
                "the provisioning server issued a UserSig that had already expired".into(),
            );
        }
        self.counters.sig_refreshes += 1;
        self.fetch_backoff.reset();
        self.refresh_backoff.reset();
        let fingerprint = sig.info.fingerprint.clone();
        let expires_at = sig.info.expires_at;
        self.sig = Some(sig);
        self.arm_refresh();
        self.act(Action::PersistSig {
            fingerprint: fingerprint.clone(),
        });
        self.event(Event::UserSigRefreshed {
            fingerprint,
            expires_at,
        });
        if !self.want_online {
            return;
        }
        match &self.conn {
            Conn::Online { .. } if purpose == FetchPurpose::Refresh => {
                // Move the session to the new sig: clean DISCONNECT (the persistent session
                // keeps QoS 1 messages), then CONNECT with the new sig.
                self.conn = Conn::Closing {
                    then: AfterClose::Reconnect,
                };
                self.act(Action::Disconnect);
            }
            Conn::None if self.phase == Phase::FetchingSig => self.proceed(),
            // Connecting: `on_connected` notices the newer sig. Backoff: the timer connects
            // with the new sig.
            _ => {}
        }
    }

    fn on_fetch_failed(&mut self, f: FetchFailure) {
        let Some(purpose) = self.fetch.take() else {
            return; // cancelled
        };
        self.counters.sig_fetch_failures += 1;
        let err = LastError::new(f.code, f.class, f.message.clone());
        let current_valid = self.sig.is_some() && !self.sig_expired_locally();
        if purpose == FetchPurpose::Refresh && current_valid {
            // Never fatal while the current sig is valid: retry, keep the session.
            let delay = self
                .refresh_backoff
                .next(&self.policy.backoff, &mut self.rng)
                .max(f.retry_after.unwrap_or(0));
            let deadline = self.sig.as_ref().and_then(|s| s.deadline);
            let at = self.now.mono + delay;
            // Try at least once more shortly before the deadline.
            self.timers.refresh = Some(match deadline {
                Some(d) if at >= d => {
                    self.now.mono + delay.min(d.saturating_sub(self.now.mono) / 2).max(1_000)
                }
                _ => at,
            });
            self.last_error = Some(err);
            return;
        }
        if !self.want_online {
            return;
        }
        match f.class {
            ErrorClass::Fatal => self.stop(err),
            ErrorClass::Clock => {
                self.set_phase(Phase::WaitingForClock);
                self.last_error = Some(err);
                self.timers.clock = Some(self.now.mono + self.policy.clock_retry);
            }
            _ => {
                // The retry fetches anew; if this was the fresh-sig retry after a refusal, it stays
                // used (`rejected_retry_used` is reset only by a successful login).
                self.backoff(err, WhichBackoff::Fetch, f.retry_after);
            }
        }
    }

    fn on_connected(&mut self, session_present: bool) {
        let Conn::Connecting { fingerprint } = &self.conn else {
            return;
        };
        let fingerprint = fingerprint.clone();
        self.conn = Conn::Online {
            since: self.now.mono,
            fingerprint: fingerprint.clone(),
        };
        self.logged_in = true;
        self.rejected_retry_used = false;
        self.last_error = None;
        self.counters.logins += 1;
        self.set_phase(Phase::Online);
        self.timers.retry = None;
        self.timers.backoff_reset = Some(self.now.mono + self.policy.backoff.reset_after);
        if self.fetch.is_none() && self.timers.refresh.is_none() {
            self.arm_refresh();
        }
        self.event(Event::ConnectSuccess {
            user_id: self.user.to_string(),
            session_present,
        });
        self.reply_logins(Ok(()));
        let newer = self
            .sig
            .as_ref()
            .is_some_and(|s| s.info.fingerprint != fingerprint);
        if newer {
            // The sig was refreshed while connecting: move to it.
            self.conn = Conn::Closing {
                then: AfterClose::Reconnect,
            };
            self.act(Action::Disconnect);
        }
    }

    fn on_connection_ended(&mut self, end: ConnEnd) {
        let was = std::mem::replace(&mut self.conn, Conn::None);
        let online_since = match was {
            Conn::Online { since, .. } => Some(since),
            Conn::Connecting { .. } => None,
            Conn::Closing { then } => {
                // We were closing anyway: treat as done.
                self.conn = Conn::Closing { then };
                return self.on_disconnected();
            }
            Conn::None => return, // stale
        };
        self.timers.backoff_reset = None;
        let (class, err) = self.classify(&end, online_since);
        if online_since.is_none() {
            self.event(Event::ConnectFailed {
                code: err.code,
                class,
                message: err.message.clone(),
            });
        }
        if !self.want_online {
            return;
        }
        match class {
            ErrorClass::Network | ErrorClass::Busy => {
                if let ConnEnd::Network {
                    kind: NetKind::Closed,
                    ..
                } = end
                {
                    let early = online_since.is_some_and(|s| {
                        self.now.mono.saturating_sub(s) < self.policy.takeover_window
                    });
                    self.early_closes = if early { self.early_closes + 1 } else { 0 };
                    if self.early_closes >= self.policy.takeover_closes {
                        return self.kicked(
                            KickReason::SuspectedTakeover,
                            format!(
                                "the server closed the session {} times within {} of login: \
                                 another device is probably logged in with this identity; \
                                 staying offline instead of fighting for it",
                                self.early_closes,
                                human_ms(self.policy.takeover_window)
                            ),
                        );
                    }
                } else if online_since.is_some() {
                    self.early_closes = 0;
                }
                self.backoff(err, WhichBackoff::Connect, None);
            }
            ErrorClass::SigExpired => self.on_sig_expired(err.code, err.message),
            ErrorClass::SigRejected => self.on_sig_rejected(err),
            ErrorClass::Kicked => {
                let reason = match end {
                    ConnEnd::ServerDisconnect { code: 0x98, .. } => KickReason::KickedByAdmin,
                    _ => KickReason::LoggedInElsewhere,
                };
                self.kicked(reason, err.message)
            }
            ErrorClass::Fatal => self.stop(err),
            ErrorClass::Clock => {
                self.set_phase(Phase::WaitingForClock);
                self.last_error = Some(err);
                self.timers.clock = Some(self.now.mono + self.policy.clock_retry);
            }
        }
    }

    fn on_disconnected(&mut self) {
        let Conn::Closing { then } = std::mem::replace(&mut self.conn, Conn::None) else {
            return;
        };
        match then {
            AfterClose::Reconnect => {
                if self.want_online {
                    self.proceed();
                }
            }
            AfterClose::Switch(user) => self.switch_to(user),
            AfterClose::Logout => {
                self.logged_in = false;
                self.set_phase(Phase::Idle);
                self.reply_logouts();
            }
            AfterClose::Stay => self.reply_logouts(),
            AfterClose::Shutdown => {
                self.logged_in = false;
                self.reply_logouts();
                self.act(Action::Exit);
            }
        }
    }

    /// Classify an ended connection (brief §3.2) into a class and an error.
    fn classify(&self, end: &ConnEnd, online_since: Option<Millis>) -> (ErrorClass, LastError) {
        use ErrorClass::*;
        let e =
            |class: ErrorClass, code: u32, msg: String| (class, LastError::new(code, class, msg));
        match end {
            ConnEnd::Network { kind, detail } => {
                let what = if online_since.is_some() {
                    "connection lost"
                } else {
                    "could not connect"
                };
                e(Network, kind.code(), format!("{what}: {detail}"))
            }
            ConnEnd::CertNotYetValid { detail } => e(
                Clock,
                0,
                format!(
                    "TLS says the server certificate is not valid yet ({detail}): the device \
                     clock is probably behind; waiting for time sync"
                ),
            ),
            ConnEnd::Refused { code } => match *code {
                0x87 if self.sig_expired_locally() => e(
                    SigExpired,
                    codes::SVR_SIG_EXPIRED,
                    "the IM service refused the UserSig (CONNACK 0x87) and it is past its expiry"
                        .into(),
                ),
                0x87 | 0x86 => e(
                    SigRejected,
                    codes::SVR_SIG_CHECK_FAILED,
                    format!(
                        "the IM service refused the UserSig (CONNACK 0x{code:02X} {})",
                        if *code == 0x87 {
                            "Not authorized"
                        } else {
                            "Bad user name or password"
                        }
                    ),
                ),
                0x8A => e(
                    Fatal,
                    codes::SVR_BANNED,
                    "the IM service says this account is banned (CONNACK 0x8A); ask the app's \
                     administrator, then run `imlinkctl login`"
                        .into(),
                ),
                0x85 => e(
                    Fatal,
                    codes::INVALID_PARAMETERS,
                    "the IM service refused the MQTT client id (CONNACK 0x85); check \
                     broker.client_id in the config"
                        .into(),
                ),
                0x84 | 0x8C => e(
                    Fatal,
                    codes::INVALID_PARAMETERS,
                    format!("the IM service does not accept this client (CONNACK 0x{code:02X})"),
                ),
                0x9F => e(
                    Busy,
                    codes::SVR_FREQ_LIMIT,
                    "the IM service limits the login rate (CONNACK 0x9F); retrying later".into(),
                ),
                _ => e(
                    Busy,
                    codes::NET_DISCONNECT,
                    format!("the IM service refused the connection for now (CONNACK 0x{code:02X})"),
                ),
            },
            ConnEnd::ServerDisconnect { code, reason } => {
                let said = reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                match *code {
                    0x8E => e(
                        Kicked,
                        codes::KICKED_OFF_BY_OTHER,
                        format!(
                            "logged in elsewhere: another login took the session (DISCONNECT 0x8E{said})"
                        ),
                    ),
                    0x98 => e(
                        Kicked,
                        codes::KICKED_OFF_BY_OTHER,
                        format!("kicked offline by an administrator (DISCONNECT 0x98{said})"),
                    ),
                    0xA0 => {
                        let says_sig = reason.as_deref().is_none_or(|r| r.starts_with("70001"));
                        let near_expiry = self
                            .sig
                            .as_ref()
                            .and_then(|s| s.deadline)
                            .is_some_and(|d| d <= self.now.mono + 60_000);
                        if says_sig || near_expiry {
                            e(
                                SigExpired,
                                codes::SVR_SIG_EXPIRED,
                                format!("the UserSig expired while online (DISCONNECT 0xA0{said})"),
                            )
                        } else {
                            e(
                                Network,
                                codes::NET_DISCONNECT,
                                format!("the server ended the session (DISCONNECT 0xA0{said})"),
                            )
                        }
                    }
                    0x87 => e(
                        SigRejected,
                        codes::SVR_SIG_CHECK_FAILED,
                        format!("the IM service revoked the UserSig (DISCONNECT 0x87{said})"),
                    ),
                    0x89 | 0x8B | 0x97 | 0x96 => e(
                        Busy,
                        codes::NET_DISCONNECT,
                        format!(
                            "the server is busy or shutting down (DISCONNECT 0x{code:02X}{said})"
                        ),
                    ),
                    _ => e(
                        Network,
                        codes::NET_DISCONNECT,
                        format!("the server ended the session (DISCONNECT 0x{code:02X}{said})"),
                    ),
                }
            }
        }
    }
}

enum WhichBackoff {
    Connect,
    Fetch,
}

/// `base + delta` on the monotonic clock, clamped at 0.
fn offset(base: Millis, delta_ms: i64) -> Millis {
    if delta_ms >= 0 {
        base.saturating_add(delta_ms as u64)
    } else {
        base.saturating_sub(delta_ms.unsigned_abs())
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
