//! The invariants of `docs/login-policy.md`, checked after every step of every seed.
//!
//! * **Truth** — `online` exactly when the world has a CONNACKed session up; login status and
//!   the `STATUS=` text follow the phase; every state change is emitted once.
//! * **Safety** — one fetch and one connection at most; never a sig the machine believes
//!   expired, one for another user, or one the driver was told to drop (checked in
//!   `world.rs` as the actions happen); a refresh failure never stops a session whose sig is
//!   valid.
//! * **Liveness (no wedge)** — wanting to be online and not online, stopped or kicked ⇒ a
//!   timer is armed; a healthy world brings it online within a bound; an operator's `login`
//!   always gets it moving; requests are answered.
//! * **No loop** — an oracle that knows only what the world did (the outcome of every
//!   attempt) bounds the attempts that may follow each outcome, per class, and the attempt
//!   rate per sliding window. It does not read the machine's counters.

use std::collections::{HashMap, HashSet, VecDeque};

use super::world::World;
use crate::identity::UserId;
use crate::session::{
    Action, ConnEnd, EXPIRY_CLOSE_AFTER, EXPIRY_SKEW_MAX, EXPIRY_SKEW_MIN, ErrorClass, Event,
    FAST_LOGIN_DELAY_MAX, Input, KickReason, LastError, MIN_SESSION, MIN_SIG_LIFETIME, Machine,
    Millis, NetKind, OnKick, Phase, Policy, Proto, RequestId, Snapshot, TIMEOUT_SLACK, Target,
    login_status, summary,
};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

/// What the world saw happen (told to the oracle).
#[derive(Debug, Clone)]
pub enum Seen {
    Connack,
    FetchOk,
    /// The provisioning server answered with a sig that had already expired.
    FetchExpired,
    FetchFailed {
        class: ErrorClass,
        code: u32,
        retry_after: Option<Millis>,
        limited: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    Login,
    Logout,
}

/// The longest a healthy world may take to bring the engine online (and an operator's login
/// to succeed): the largest backoff or Retry-After, plus one fetch, one connect and one close,
/// each with the machine's backstop slack, plus one clock re-check.
pub fn healthy_bound(p: &Policy) -> Millis {
    // `Auto` learns the protocol per server: MQTT 5 may be refused once by a redirect target
    // still pending and once more by the node after it, each followed by a backoff.
    let extra = if p.protocol == crate::session::ProtocolMode::Auto {
        2 * (p.backoff.cap + p.connect_timeout + TIMEOUT_SLACK)
    } else {
        0
    };
    extra
        + p.backoff.cap.max(MAX_RETRY_AFTER)
        + p.fetch_timeout
        + p.connect_timeout
        + p.close_timeout
        + p.clock_retry
        + 3 * TIMEOUT_SLACK
        + 5_000
}

/// The largest Retry-After the simulated provisioning server sends.
pub const MAX_RETRY_AFTER: Millis = 120_000;
/// The sliding window of the rate rule.
const WINDOW: Millis = 600_000;
/// Logins (unplanned CONNACKs) and UserSigs issued for a login, each, in any [`WINDOW`], at
/// most (plus 3 per local request): whatever the policy's budgets and backoff, a steady state
/// of a login more often than every 20 s breaks it.
pub const LOGIN_RATE_MAX: u64 = 30;

/// A connection attempt or a session ended, as the world saw it.
pub struct Ended<'a> {
    pub t: Millis,
    /// This connection's CONNACK, if it had one.
    pub since: Option<Millis>,
    /// Since when the session was up, across the engine's own planned reconnects.
    pub session: Option<Millis>,
    pub end: &'a ConnEnd,
    /// The machine's boot-time clock now.
    pub mono: Millis,
    pub snap: &'a Snapshot,
    /// The fingerprint of the sig the connection used.
    pub in_use: &'a str,
}

/// Whether an end may be read as the sig's natural expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Yes,
    Maybe,
    No,
}

/// The oracle's budget state between resets.
#[derive(Debug, Default)]
struct Epoch {
    /// Why no attempt may happen at all until a reset.
    blocked: Option<String>,
    /// No attempt before this instant, and why.
    not_before: Option<(Millis, String)>,
    rejected: u32,
    protocol: u32,
    limited: Option<(u32, u32)>,
    early_closes: u32,
    /// Sig-expired outcomes (natural or premature): every renewal after the first is paced.
    expiries: u32,
}

pub struct Checker {
    pub policy: Policy,
    pub configured_user: UserId,
    pub shutting_down: bool,
    /// When the oldest publish of the device the broker has not answered on the link was
    /// published (the runner sets it from the messaging world before each world event).
    pub unanswered_since: Option<Millis>,
    violation: Option<Violation>,
    requests: HashMap<RequestId, (ReqKind, Millis)>,
    next_req: RequestId,
    epoch: Epoch,
    premature: VecDeque<Millis>,
    /// Unplanned attempts (connects and login fetches) in the window; planned reconnects.
    attempts: VecDeque<Millis>,
    planned: VecDeque<Millis>,
    locals: VecDeque<Millis>,
    /// Unplanned logins (CONNACKs) and UserSigs issued for a login, in the window.
    logins: VecDeque<Millis>,
    issued: VecDeque<Millis>,
    /// The last close was ours (a planned reconnect follows).
    our_close: bool,
    /// The CONNECT in flight is a planned reconnect.
    connect_planned: bool,
    /// The last instant a login that did not last may have been counted by the engine (a
    /// session that ended within `MIN_SESSION`, or the end of a sig that lived under
    /// `MIN_SIG_LIFETIME`): the engine may then wait up to `FAST_LOGIN_DELAY_MAX` before its
    /// next login, even once the world is healthy (an operator's login still gets it moving
    /// within the usual bound).
    last_fast: Option<Millis>,
    /// When each recent sig was delivered.
    delivered: HashMap<String, Millis>,
    /// The last end was an expiry signal at the end of this sig by the machine's own clock:
    /// the machine must read it as `sig_expired` (never a kick or a suspected takeover), and
    /// never CONNECT with that sig again.
    expiry_signal: Option<(String, &'static str)>,
    /// The machine said `user_sig_expired` in this step.
    said_expired: bool,
    expired_sig: Option<String>,
    /// Users a CONNACK was seen for since the daemon started.
    connacked: HashSet<String>,
    last_state: Option<(Phase, u8, String, Option<LastError>)>,
    healthy_from: Option<Millis>,
    /// Since when the engine has been trying to get online without being online (not
    /// counting idle, stopped or kicked), if it is.
    wanting_since: Option<Millis>,
    healthy_reported: bool,
    final_login: Option<Millis>,
    online_since_final: bool,
    stable_seen_for: Option<Millis>,
    /// Where the last CONNECT went, in which protocol.
    last_connect: Option<(Target, Proto)>,
    /// Servers whose MQTT 5 refusal was excused as their one fallback to 3.1.1 (`Auto`).
    fell_back: HashSet<Target>,
    /// Redirects followed since the last CONNACK.
    redirects: u32,
}

/// A one-line form of an action, for the trace.
pub fn short_action(a: &Action) -> String {
    match a {
        Action::FetchSig { user } => format!("FetchSig({user})"),
        Action::CancelFetch => "CancelFetch".into(),
        Action::Connect {
            user,
            fingerprint,
            target,
            proto,
        } => format!(
            "Connect({user},{fingerprint},{target:?},{})",
            proto.as_str()
        ),
        Action::Subscribe { .. } => "Subscribe".into(),
        Action::Disconnect => "Disconnect".into(),
        Action::Abandon => "Abandon".into(),
        Action::PersistSig { fingerprint, .. } => format!("Persist({fingerprint})"),
        Action::ForgetSig => "Forget".into(),
        Action::ReleaseSig { fingerprint } => format!("Release({fingerprint})"),
        Action::Emit(Event::StateChanged { phase, .. }) => format!("→{}", phase.as_str()),
        Action::Emit(e) => e.name().to_string(),
        Action::Reply { id, result } => format!(
            "Reply({id},{})",
            match result {
                Ok(()) => "ok".to_string(),
                Err(e) => e.code.to_string(),
            }
        ),
        Action::Exit => "Exit".into(),
    }
}

impl Checker {
    pub fn new(policy: Policy, user: UserId) -> Checker {
        Checker {
            policy,
            configured_user: user,
            shutting_down: false,
            unanswered_since: None,
            violation: None,
            requests: HashMap::new(),
            next_req: 1,
            epoch: Epoch::default(),
            premature: VecDeque::new(),
            attempts: VecDeque::new(),
            planned: VecDeque::new(),
            locals: VecDeque::new(),
            logins: VecDeque::new(),
            issued: VecDeque::new(),
            our_close: false,
            connect_planned: false,
            last_fast: None,
            delivered: HashMap::new(),
            expiry_signal: None,
            said_expired: false,
            expired_sig: None,
            connacked: HashSet::new(),
            last_state: None,
            healthy_from: None,
            wanting_since: None,
            healthy_reported: false,
            final_login: None,
            online_since_final: false,
            stable_seen_for: None,
            last_connect: None,
            fell_back: HashSet::new(),
            redirects: 0,
        }
    }

    /// A CONNECT with the sig `fp`.
    pub fn connect_sig(&mut self, fp: &str) {
        if self.expired_sig.as_deref() == Some(fp) {
            self.violate(
                "truth: expiry signals",
                format!("a CONNECT with {fp}, whose end the server had just enforced"),
            );
        }
    }

    /// A CONNECT goes to `target` in `proto`. Following a redirect is bounded.
    pub fn connect_target(&mut self, target: &Target, proto: Proto) {
        if matches!(target, Target::Redirect(_)) {
            self.redirects += 1;
            if self.redirects > crate::session::MAX_REDIRECTS {
                self.violate(
                    "no loop: redirects",
                    format!(
                        "{} redirects followed in a row without a CONNACK",
                        self.redirects
                    ),
                );
            }
        }
        self.last_connect = Some((target.clone(), proto));
    }

    pub fn violate(&mut self, invariant: &'static str, detail: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation { invariant, detail });
        }
    }

    pub fn take_violation(&mut self) -> Option<Violation> {
        self.violation.take()
    }

    // --- requests and resets ---------------------------------------------------------------

    pub fn request(&mut self, kind: ReqKind, t: Millis) -> RequestId {
        let id = self.next_req;
        self.next_req += 1;
        self.requests.insert(id, (kind, t));
        self.local(t);
        id
    }

    /// A local request or signal: the oracle's budgets start over (a local login, a reload and
    /// a restart are the policy's ways out of `stopped`).
    fn local(&mut self, t: Millis) {
        self.epoch = Epoch::default();
        self.redirects = 0;
        self.premature.clear();
        self.locals.push_back(t);
    }

    pub fn reply(&mut self, id: RequestId) {
        if self.requests.remove(&id).is_none() {
            self.violate(
                "liveness: requests",
                format!("a reply to {id}, which is not pending (answered twice?)"),
            );
        }
    }

    pub fn on_reload(&mut self, configured: &UserId, t: Millis) {
        self.configured_user = configured.clone();
        self.fell_back.clear();
        self.local(t);
    }

    pub fn on_shutdown_requested(&mut self) {
        self.shutting_down = true;
    }

    /// A new daemon process (after SIGTERM, a crash or a reboot).
    pub fn on_restart(&mut self, _w: &World) {
        self.shutting_down = false;
        // A dead process answers nobody: its clients see the socket close.
        self.requests.clear();
        self.connacked.clear();
        self.fell_back.clear();
        self.redirects = 0;
        self.last_state = None;
        self.our_close = false;
        self.stable_seen_for = None;
        let t = _w.t;
        self.local(t);
    }

    pub fn healthy_from(&mut self, t: Millis, _s: &Snapshot) {
        self.healthy_from = Some(t);
    }

    pub fn final_login(&mut self, t: Millis, s: &Snapshot) {
        self.final_login = Some(t);
        self.online_since_final = false;
        let _ = s;
    }

    // --- what the world saw ------------------------------------------------------------------

    /// An attempt starts (a connect, or a fetch; `refresh`: a proactive refresh).
    pub fn attempt(&mut self, t: Millis, connect: bool, refresh: bool) {
        if refresh {
            return; // background; the session's own attempts are what may loop
        }
        if let Some(why) = &self.epoch.blocked {
            let why = why.clone();
            self.violate(
                "no loop: budgets",
                format!(
                    "a {} at {t} ms after {why}: the policy says stop until a local login, a reload or a restart",
                    if connect { "CONNECT" } else { "provisioning fetch" }
                ),
            );
        }
        if let Some((nb, why)) = &self.epoch.not_before
            && t < *nb
        {
            let (nb, why) = (*nb, why.clone());
            self.violate(
                "no loop: pacing",
                format!(
                    "a {} at {t} ms, before {nb} ms ({why})",
                    if connect {
                        "CONNECT"
                    } else {
                        "provisioning fetch"
                    }
                ),
            );
        }
        self.epoch.not_before = None;
        let planned = connect && std::mem::take(&mut self.our_close);
        if connect {
            self.connect_planned = planned;
        }
        let q = if planned {
            &mut self.planned
        } else {
            &mut self.attempts
        };
        q.push_back(t);
        for q in [&mut self.attempts, &mut self.planned, &mut self.locals] {
            while q.front().is_some_and(|x| t.saturating_sub(*x) >= WINDOW) {
                q.pop_front();
            }
        }
        let max = self.rate_max() + 3 * self.locals.len() as u64;
        if self.attempts.len() as u64 > max {
            let n = self.attempts.len();
            self.violate(
                "no loop: rate",
                format!("{n} unplanned attempts within 10 min (at most {max} for this policy)"),
            );
        }
        // Planned reconnects (moves to a refreshed sig) are at least 10 s apart.
        if self.planned.len() as u64 > 61 + 3 * self.locals.len() as u64 {
            let n = self.planned.len();
            self.violate(
                "no loop: rate",
                format!("{n} planned reconnects within 10 min"),
            );
        }
    }

    /// A login (an unplanned CONNACK) or a UserSig issued for one (`sig`): at most
    /// [`LOGIN_RATE_MAX`] of each in any window, plus 3 per local request.
    fn login_rate(&mut self, t: Millis, sig: bool) {
        for q in [&mut self.logins, &mut self.issued, &mut self.locals] {
            while q.front().is_some_and(|x| t.saturating_sub(*x) >= WINDOW) {
                q.pop_front();
            }
        }
        let q = if sig {
            &mut self.issued
        } else {
            &mut self.logins
        };
        q.push_back(t);
        let n = q.len() as u64;
        let max = LOGIN_RATE_MAX + 3 * self.locals.len() as u64;
        if n > max {
            self.violate(
                "no loop: rate",
                format!(
                    "{n} {} within 10 min (at most {max}, whatever the policy): a steady state \
                     of a login every few seconds",
                    if sig {
                        "UserSigs fetched for a login"
                    } else {
                        "logins (CONNACKs other than planned reconnects)"
                    }
                ),
            );
        }
    }

    /// The most unplanned attempts a policy allows in a 10-minute window, by a wide margin
    /// (backoff draws are random: this bound is far beyond any plausible draw, yet far below
    /// a loop).
    fn rate_max(&self) -> u64 {
        let b = &self.policy.backoff;
        let ramp = 64 - (b.cap / b.base.max(1)).max(1).leading_zeros() as u64;
        let budgets = 2
            + u64::from(self.policy.protocol_budget)
            + u64::from(self.policy.sig_expired_budget)
            + u64::from(self.policy.takeover_closes)
            + 3;
        30 + 2 * ramp + 4 * WINDOW / b.cap.max(1) + 2 * budgets
    }

    fn floor(&self) -> Millis {
        (self.policy.backoff.base / 10).max(1)
    }

    fn pace(&mut self, t: Millis, delay: Millis, why: String) {
        let nb = t + delay;
        if self.epoch.not_before.as_ref().is_none_or(|(x, _)| *x < nb) {
            self.epoch.not_before = Some((nb, why));
        }
    }

    fn block(&mut self, why: String) {
        if self.epoch.blocked.is_none() {
            self.epoch.blocked = Some(why);
        }
    }

    /// What the world saw. `login`: the fetch was the session's own (not a refresh).
    pub fn seen(&mut self, t: Millis, s: Seen, login: bool) {
        if !login && !matches!(s, Seen::Connack) {
            return; // a background refresh: its failures lead to no session attempt
        }
        match s {
            Seen::Connack => {
                self.redirects = 0;
                if !self.connect_planned {
                    self.login_rate(t, false);
                }
            }
            Seen::FetchOk => {
                self.epoch.limited = None;
                self.login_rate(t, true);
            }
            Seen::FetchExpired => {
                self.login_rate(t, true);
                self.premature_expiry(t, "an expired sig from provisioning")
            }
            Seen::FetchFailed {
                class,
                code,
                retry_after,
                limited,
            } => match class {
                ErrorClass::Fatal => self.block(format!("a fatal provisioning answer ({code})")),
                ErrorClass::Network | ErrorClass::Busy => {
                    if let Some(limit) = limited {
                        let n = match self.epoch.limited {
                            Some((c, n)) if c == code => n + 1,
                            _ => 1,
                        };
                        self.epoch.limited = Some((code, n));
                        if n >= limit {
                            self.block(format!(
                                "{n} provisioning failures {code} in a row (limit {limit})"
                            ));
                        }
                    }
                    let ra = retry_after.unwrap_or(0);
                    let d = self.floor().max(ra);
                    self.pace(
                        t,
                        d,
                        format!(
                            "provisioning {} {code} (Retry-After {ra} ms)",
                            class.as_str()
                        ),
                    );
                }
                ErrorClass::Clock => {
                    let d = self.floor();
                    self.pace(t, d, "the clock wait".into());
                }
                _ => {}
            },
        }
    }

    /// A sig-expired outcome: the renewal after it may go at once only the first time.
    fn expiry(&mut self, t: Millis, what: &str) {
        self.epoch.expiries += 1;
        if self.epoch.expiries > 1 {
            let f = self.floor();
            self.pace(
                t,
                f,
                format!("renewal #{} after {what}", self.epoch.expiries),
            );
        }
    }

    fn premature_expiry(&mut self, t: Millis, what: &str) {
        self.expiry(t, what);
        let w = self.policy.sig_expired_window;
        while self
            .premature
            .front()
            .is_some_and(|x| t.saturating_sub(*x) >= w)
        {
            self.premature.pop_front();
        }
        self.premature.push_back(t);
        let budget = self.policy.sig_expired_budget as usize;
        if self.premature.len() > budget {
            let oldest = self.premature[self.premature.len() - budget - 1];
            self.pace(
                t,
                (oldest + w).saturating_sub(t),
                format!(
                    "{} premature sig expiries within the window (budget {budget}): {what}",
                    self.premature.len()
                ),
            );
        }
    }

    /// A connection attempt or a session ended.
    pub fn seen_end(&mut self, e: Ended<'_>) {
        let Ended {
            t,
            since,
            session,
            end,
            mono,
            snap,
            in_use,
        } = e;
        // Where the sig the connection used stands against its deadline, as the machine's
        // clock has it (what the engine classifies by). `None`: the oracle cannot tell (a
        // refresh replaced it meanwhile), so either reading is allowed.
        let to_deadline: Option<Option<i64>> = match snap.sig.as_ref() {
            Some(s) if s.fingerprint == in_use => {
                Some(s.deadline_ms.map(|d| d as i64 - mono as i64))
            }
            _ => None,
        };
        let at_end = match to_deadline {
            // Certainly its natural end: within the smallest skew the engine allows.
            Some(Some(d)) if d <= EXPIRY_SKEW_MIN as i64 => Reading::Yes,
            // Maybe (within the largest skew, which depends on the sig's lifetime).
            Some(Some(d)) if d <= EXPIRY_SKEW_MAX as i64 => Reading::Maybe,
            Some(_) => Reading::No,
            None => Reading::Maybe,
        };
        let closed_at_end = match (to_deadline, at_end) {
            (Some(Some(d)), _) if d < -(EXPIRY_CLOSE_AFTER as i64) => Reading::No,
            (_, r) => r,
        };
        let premature = at_end == Reading::No;
        let says_expired = |c: &Option<u32>| *c == Some(crate::session::codes::SVR_SIG_EXPIRED);
        let up_for = since.map(|s| t.saturating_sub(s));
        let young = self
            .delivered
            .get(in_use)
            .is_none_or(|d| t.saturating_sub(*d) < MIN_SIG_LIFETIME);
        if session.is_some_and(|s| t.saturating_sub(s) < MIN_SESSION) || young {
            self.fast_until(t);
        }
        if let Some(s) = session
            && t.saturating_sub(s) >= self.policy.backoff.reset_after
        {
            // It stayed up: every budget is restored.
            let premature_q = std::mem::take(&mut self.premature);
            self.epoch = Epoch::default();
            self.premature = premature_q;
        }
        let floor = self.floor();
        let closed = matches!(
            end,
            ConnEnd::Network {
                kind: NetKind::Closed | NetKind::Stalled,
                ..
            }
        );
        // A stalled broker's close (a publish unanswered for `engine::STALLED_AFTER`) is never
        // an early close, and does not clear the count either.
        let stalled = matches!(
            end,
            ConnEnd::Network {
                kind: NetKind::Stalled,
                ..
            }
        );
        let early = closed && !stalled && up_for.is_some_and(|u| u < self.policy.takeover_window);
        if up_for.is_some() && !early && !stalled {
            // Only consecutive silent closes right after login count toward a takeover.
            self.epoch.early_closes = 0;
        }
        // An expiry signal the engine may read either way: no constraint from it (counting
        // it as an expiry would pace the engine's next real renewal, counting it as a kick
        // or a rejection would forbid the renewal it may make).
        let maybe = |r: Reading| r == Reading::Maybe;
        let signal = match end {
            ConnEnd::Network { .. } if closed && closed_at_end == Reading::Yes => {
                Some("a close without DISCONNECT")
            }
            ConnEnd::Refused {
                code: 0x86 | 0x87, ..
            } if at_end == Reading::Yes => Some("CONNACK 0x86/0x87"),
            ConnEnd::ServerDisconnect {
                code: 0x86 | 0x87 | 0x98 | 0xA0,
                ..
            } if at_end == Reading::Yes => Some("DISCONNECT 0x86/0x87/0x98/0xA0"),
            _ => None,
        };
        self.expiry_signal = signal.map(|s| (in_use.to_string(), s));
        match end {
            ConnEnd::Network { .. } if closed && closed_at_end == Reading::Yes => {
                // A close at the sig's end is its expiry (NATS): renewed first, and never
                // counted toward a suspected takeover.
                self.expiry(t, "a close at the sig's expiry")
            }
            ConnEnd::Network { .. } if closed && maybe(closed_at_end) => {}
            ConnEnd::Network { kind, .. } => {
                if early {
                    self.epoch.early_closes += 1;
                    if self.epoch.early_closes >= self.policy.takeover_closes {
                        let cool =
                            self.policy.takeover_cooldown - self.policy.takeover_cooldown / 4;
                        self.pace(
                            t,
                            cool,
                            format!(
                                "{} early closes: a suspected takeover's cool-down",
                                self.epoch.early_closes
                            ),
                        );
                        return;
                    }
                }
                self.pace(t, floor, format!("a network error ({kind:?})"));
            }
            ConnEnd::CertNotYetValid { .. } => self.pace(t, floor, "the clock wait".into()),
            ConnEnd::Redirect { code, .. } => {
                self.pace(t, floor, format!("a redirect (0x{code:02X})"))
            }
            ConnEnd::Refused { code, im_code, .. } => match *code {
                0x86 | 0x87 if at_end == Reading::Yes => {
                    self.expiry(t, "CONNACK 0x87 for a sig at its end")
                }
                0x86 | 0x87 if maybe(at_end) => {}
                0x86 | 0x87 if says_expired(im_code) => {
                    self.premature_expiry(t, "CONNACK 0x87 70001")
                }
                0x86 | 0x87 => self.rejected(t, *code),
                0x84 if self.auto_fallback() => {
                    self.pace(t, floor, "MQTT 5 refused: the one fallback to 3.1.1".into())
                }
                0x8A | 0x85 | 0x84 | 0x8C => self.block(format!("CONNACK 0x{code:02X} (fatal)")),
                0x81 | 0x82 | 0x90 | 0x95 | 0x99 | 0x9A | 0x9B => self.protocol(t, *code),
                _ => self.pace(t, floor, format!("CONNACK 0x{code:02X} (busy)")),
            },
            ConnEnd::ServerDisconnect { code, im_code, .. } => match *code {
                0x98 if at_end == Reading::Yes => self.expiry(t, "DISCONNECT 0x98 at expiry"),
                0x98 if maybe(at_end) => {}
                0x8E | 0x98 => self.kicked(t),
                0xA0 if im_code.is_none() || says_expired(im_code) => {
                    if premature {
                        self.premature_expiry(t, "DISCONNECT 0xA0")
                    } else {
                        self.expiry(t, "DISCONNECT 0xA0")
                    }
                }
                0x86 | 0x87 if at_end == Reading::Yes => {
                    self.expiry(t, "DISCONNECT 0x87 at expiry")
                }
                0x86 | 0x87 if maybe(at_end) => {}
                0x86 | 0x87 => self.rejected(t, *code),
                0x81 | 0x82 | 0x8C | 0x8F | 0x90 | 0x93 | 0x94 | 0x95 | 0x99 | 0x9A | 0x9B
                | 0x9E | 0xA1 | 0xA2 => self.protocol(t, *code),
                _ => self.pace(t, floor, format!("DISCONNECT 0x{code:02X}")),
            },
        }
    }

    /// Whether the last CONNECT's refusal as "unsupported protocol version" is the one
    /// fallback `Auto` allows (an MQTT 5 attempt, not excused before).
    fn auto_fallback(&mut self) -> bool {
        match &self.last_connect {
            Some((target, Proto::V5))
                if self.policy.protocol == crate::session::ProtocolMode::Auto
                    && !self.fell_back.contains(target) =>
            {
                self.fell_back.insert(target.clone());
                true
            }
            _ => false,
        }
    }

    fn rejected(&mut self, t: Millis, code: u8) {
        self.epoch.rejected += 1;
        if self.epoch.rejected < 2 {
            return;
        }
        let cool = self.policy.rejected_cooldown;
        if cool == 0 || !self.policy.provisioning {
            self.block(format!(
                "{} refusals of the UserSig (0x{code:02X}) without a login that stayed up",
                self.epoch.rejected
            ));
            return;
        }
        // The rejection budget is spent: one fresh try per cool-down, doubling (± 25 %).
        let level = self.epoch.rejected - 2;
        let full = cool
            .saturating_mul(1u64 << level.min(20))
            .min(self.policy.rejected_cooldown_max.max(cool));
        self.pace(
            t,
            full - full / 4,
            format!(
                "{} refusals of the UserSig (0x{code:02X}): the cool-down after the rejection \
                 budget",
                self.epoch.rejected
            ),
        );
    }

    fn protocol(&mut self, t: Millis, code: u8) {
        self.epoch.protocol += 1;
        if self.epoch.protocol >= self.policy.protocol_budget {
            self.block(format!(
                "{} protocol errors (0x{code:02X}; budget {})",
                self.epoch.protocol, self.policy.protocol_budget
            ));
        } else {
            let f = self.floor();
            self.pace(t, f, format!("a protocol error 0x{code:02X}"));
        }
    }

    fn kicked(&mut self, t: Millis) {
        match self.policy.on_kick {
            OnKick::StayOffline => self.block("a kick (on_kick = stay_offline)".into()),
            OnKick::ReloginAfter(c) => self.pace(
                t,
                c.max(crate::session::RELOGIN_FLOOR),
                "relogin_after".into(),
            ),
        }
    }

    /// The broker accepted a login as `user`.
    pub fn connacked(&mut self, user: &UserId) {
        self.connacked.insert(user.to_string());
    }

    /// The machine took its own connection down (DISCONNECT): a planned reconnect may follow.
    pub fn our_close(&mut self) {
        self.our_close = true;
    }

    // --- after every step ---------------------------------------------------------------------

    pub fn emitted(&mut self, e: &Event) {
        if matches!(e, Event::UserSigExpired { .. }) {
            self.said_expired = true;
        }
        if let Event::StateChanged {
            phase,
            login_status,
            login_user,
            last_error,
        } = e
        {
            let cur = (
                *phase,
                *login_status,
                login_user.clone(),
                last_error.clone(),
            );
            if self.last_state.as_ref() == Some(&cur) {
                self.violate(
                    "truth: one emitter",
                    format!("state {phase:?} emitted twice in a row"),
                );
            }
            self.last_state = Some(cur);
        }
    }

    pub fn after_step(
        &mut self,
        before: &Snapshot,
        snap: &Snapshot,
        m: &Machine,
        w: &World,
        t: Millis,
        input: Option<&Input>,
    ) {
        let now = w.now().mono;
        let phase = snap.phase;
        // Truth: an expiry signal at the end of the sig in use (by the machine's own clock) is
        // the sig's expiry: renewed with another sig, never a kick, never a takeover.
        // (What the step did after it, e.g. the renewal fetch failing at the same instant, may
        // own `last_error`: the event says how the end was read.)
        let said_expired = std::mem::take(&mut self.said_expired);
        if let Some((fp, what)) = self.expiry_signal.take() {
            let kicked = phase == Phase::Kicked;
            if kicked || !said_expired {
                self.violate(
                    "truth: expiry signals",
                    format!(
                        "{what} at the end of {fp} was not read as its expiry (no \
                         user_sig_expired; phase {}, last error {:?})",
                        phase.as_str(),
                        snap.last_error.as_ref().map(|e| e.class.as_str())
                    ),
                );
            }
            self.expired_sig = Some(fp);
        }
        // Truth.
        let up = w.conn_state() == "up";
        if matches!(phase, Phase::Online | Phase::Subscribing) != up {
            self.violate(
                "truth: online",
                format!(
                    "phase {} while the connection is {}",
                    phase.as_str(),
                    w.conn_state()
                ),
            );
        }
        if phase == Phase::Online && !w.subscribed {
            self.violate(
                "truth: online",
                "online while the broker has not granted the inbox subscription".into(),
            );
        }
        let excluded = matches!(
            phase,
            Phase::Online | Phase::Idle | Phase::Stopped | Phase::Kicked
        );
        if excluded {
            self.wanting_since = None;
        } else if self.wanting_since.is_none() {
            self.wanting_since = Some(t);
        }
        if phase == Phase::Online {
            self.connacked.insert(snap.user_id.clone());
            if self.final_login.is_some() {
                self.online_since_final = true;
            }
        }
        let status_ok = match phase {
            Phase::Online | Phase::Subscribing => snap.login_status == login_status::LOGINED,
            Phase::Idle | Phase::Stopped | Phase::Kicked => {
                snap.login_status == login_status::LOGOUT
            }
            _ => true,
        };
        if !status_ok {
            self.violate(
                "truth: login status",
                format!(
                    "login_status {} in phase {}",
                    snap.login_status,
                    phase.as_str()
                ),
            );
        }
        if (snap.login_status == login_status::LOGINED) == snap.login_user.is_empty() {
            self.violate(
                "truth: login status",
                "login_user and login_status disagree".into(),
            );
        }
        if snap.login_status == login_status::LOGINED && !self.connacked.contains(&snap.user_id) {
            self.violate(
                "truth: login status",
                format!(
                    "LOGINED as {} with no CONNACK for it since the start",
                    snap.user_id
                ),
            );
        }
        match &self.last_state {
            Some((p, s, u, e))
                if (*p, *s, u.as_str(), e)
                    == (
                        phase,
                        snap.login_status,
                        snap.login_user.as_str(),
                        &snap.last_error,
                    ) => {}
            _ => self.violate(
                "truth: one emitter",
                format!("the state ({}) was never emitted", phase.as_str()),
            ),
        }
        let text = summary(snap, "mqtts://broker:8883", now);
        if text.chars().any(|c| c.is_control()) {
            self.violate("truth: STATUS=", format!("a control character in {text:?}"));
        }
        let prefix = match phase {
            Phase::Online => "online as ",
            Phase::Subscribing => "connected as ",
            Phase::Idle => "logged out",
            Phase::WaitingForClock => "waiting for clock sync",
            Phase::FetchingSig => "fetching a UserSig",
            Phase::Connecting => "connecting to",
            Phase::Backoff => "retrying",
            Phase::LoggingOut => "logging out",
            Phase::Kicked => "kicked: ",
            Phase::Stopped => "stopped: ",
        };
        if !text.starts_with(prefix) {
            self.violate(
                "truth: STATUS=",
                format!("{text:?} in phase {}", phase.as_str()),
            );
        }
        // Liveness: no wedge.
        let wanting = matches!(
            phase,
            Phase::FetchingSig
                | Phase::Connecting
                | Phase::Backoff
                | Phase::WaitingForClock
                | Phase::LoggingOut
        );
        if wanting && m.poll_timeout().is_none() {
            self.violate(
                "liveness: no wedge",
                format!(
                    "phase {} with no timer armed (fetch in flight: {}, connection: {})",
                    phase.as_str(),
                    w.fetch_in_flight(),
                    w.conn_state()
                ),
            );
        }
        if phase == Phase::Backoff && snap.next_retry_ms.is_none_or(|r| r <= now) {
            self.violate(
                "liveness: no wedge",
                "backoff without a future retry time".into(),
            );
        }
        if phase == Phase::FetchingSig && !w.fetch_in_flight() {
            self.violate(
                "liveness: no wedge",
                "fetching_sig with no fetch in flight".into(),
            );
        }
        if phase == Phase::Kicked
            && matches!(
                &snap.last_event,
                Some(Event::KickedOffline {
                    reason: KickReason::SuspectedTakeover,
                    ..
                })
            )
            && snap.next_retry_ms.is_none()
        {
            self.violate(
                "liveness: no wedge",
                "a suspected takeover with no cool-down timer (permanent)".into(),
            );
        }
        if phase == Phase::Stopped
            && snap
                .last_error
                .as_ref()
                .is_some_and(|e| e.class == ErrorClass::SigRejected)
            && self.policy.rejected_cooldown > 0
            && self.policy.provisioning
            && snap.next_retry_ms.is_none_or(|r| r <= now)
        {
            self.violate(
                "liveness: never stranded",
                "stopped on refused UserSigs with no next try (an auth outage would strand a \
                 fleet)"
                    .into(),
            );
        }
        if matches!(
            phase,
            Phase::Online | Phase::Idle | Phase::Stopped | Phase::Kicked
        ) && let Some((id, _)) = self
            .requests
            .iter()
            .find(|(_, (k, _))| *k == ReqKind::Login)
        {
            // A joined login can be answered in the step that reaches online, not later.
            self.violate(
                "liveness: requests",
                format!("login {id} still unanswered in phase {}", phase.as_str()),
            );
        }
        if phase != Phase::LoggingOut
            && let Some((id, _)) = self
                .requests
                .iter()
                .find(|(_, (k, _))| *k == ReqKind::Logout)
        {
            self.violate(
                "liveness: requests",
                format!("logout {id} unanswered in phase {}", phase.as_str()),
            );
        }
        // Safety: a refresh failure never stops a session whose sig is valid.
        let fetch_result = matches!(input, Some(Input::SigFetched(_) | Input::SigFetchFailed(_)))
            || (input.is_none() && before.sig.as_ref().is_some_and(|s| s.refreshing));
        if fetch_result
            && phase == Phase::Stopped
            && before.phase != Phase::Stopped
            && before
                .sig
                .as_ref()
                .is_some_and(|s| s.refreshing && s.deadline_ms.is_none_or(|d| d > now))
        {
            self.violate(
                "safety: refresh",
                format!(
                    "a refresh failure stopped a session whose sig was still valid: {:?}",
                    snap.last_error.as_ref().map(|e| &e.message)
                ),
            );
        }
        // A login that stays up restores the budgets (the oracle sees it as the world does).
        if let Some(since) = w.up_since()
            && t.saturating_sub(since) >= self.policy.backoff.reset_after
            && self.stable_seen_for != Some(since)
        {
            self.stable_seen_for = Some(since);
            let premature_q = std::mem::take(&mut self.premature);
            self.epoch = Epoch::default();
            self.premature = premature_q;
        }
    }

    /// The world delivered sig `fp`, which lives `lifetime` (on the issuer's clock).
    pub fn sig_delivered(&mut self, t: Millis, fp: &str, lifetime: Option<Millis>) {
        if self.delivered.len() > 64 {
            self.delivered.clear();
        }
        self.delivered.insert(fp.to_string(), t);
        if lifetime.is_some_and(|l| l < MIN_SIG_LIFETIME) {
            // Its renewal counts if it comes within MIN_SIG_LIFETIME of its arrival.
            self.fast_until(t + MIN_SIG_LIFETIME);
        }
    }

    fn fast_until(&mut self, t: Millis) {
        self.last_fast = Some(self.last_fast.map_or(t, |f| f.max(t)));
    }

    /// Checks that depend on time passing (run after every step).
    pub fn check_time(&mut self, snap: &Snapshot, t: Millis) {
        let bound = healthy_bound(&self.policy);
        // After logins that did not last, the engine may wait out the fast-login floor
        // (from the last of them) before its next login finds the world healthy.
        let floor = self
            .last_fast
            .map_or(0, |s| s + FAST_LOGIN_DELAY_MAX + bound);
        // In a healthy world, trying and not online for longer than the bound is a wedge.
        if let (Some(h), Some(w)) = (self.healthy_from, self.wanting_since)
            && t >= (h.max(w) + bound).max(floor)
            && !self.healthy_reported
        {
            self.healthy_reported = true;
            self.violate(
                "liveness: healthy world",
                format!(
                    "the world has been healthy for {} s, the engine has wanted to be online \
                     since {} ms and is still {}",
                    t.saturating_sub(h) / 1000,
                    w,
                    snap.phase.as_str()
                ),
            );
        }
        if let Some(f) = self.final_login
            && t >= f + bound
            && !self.online_since_final
        {
            self.online_since_final = true;
            self.violate(
                "liveness: operator login",
                format!(
                    "an operator's login in a healthy world, and {} s later the engine is {}",
                    bound / 1000,
                    snap.phase.as_str()
                ),
            );
        }
        let close = self.policy.close_timeout + 1_000;
        if let Some((id, at)) = self
            .requests
            .iter()
            .find(|(_, (k, at))| *k == ReqKind::Logout && t > at + close)
            .map(|(id, (_, at))| (*id, *at))
        {
            self.violate(
                "liveness: requests",
                format!("logout {id} from {at} ms still unanswered at {t} ms"),
            );
        }
    }
}
