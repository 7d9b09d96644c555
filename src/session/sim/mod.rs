//! A deterministic simulator of the session engine (in the spirit of FoundationDB's
//! simulation testing and TigerBeetle's VOPR).
//!
//! One seed is one run: virtual time, no sockets, no threads. The real [`Machine`] — the very
//! code the daemon runs — is driven against a randomized world: a broker (every CONNACK
//! refusal, every DISCONNECT code, silent closes, slow CONNACKs, drops, another device with the
//! same identity, two flavours: the reference service and mosquitto), a provisioning server
//! (ok, slow, hanging, every HTTP class with and without Retry-After, malformed, the same sig
//! again, expired, another user or app, a missing token, opaque and short-lived sigs, skewed
//! clocks), the device's clocks (wall-clock jumps, suspend, reboots, boot at 1970) and local
//! requests at any moment (login, logout, account switch, SIGHUP, restart, crash).
//!
//! After **every** step the invariants of `docs/login-policy.md` are checked ([`check`]):
//! truth, safety, liveness (no wedge) and no loop (per-class attempt budgets, judged by an
//! oracle from what the world saw, not from the machine's own counters). A run ends with a
//! healthy world, where the engine must come online within a bound, and an operator's
//! `login`, which must always get it moving.
//!
//! The root seed is split into a machine seed and a world seed. A failure carries the seed,
//! the broken invariant and the event trace; [`shrink`] deletes schedule entries while the
//! failure persists, to print the shortest trace it can find.

mod check;
mod messages;
mod schedule;
pub mod storm;
mod world;

pub use check::Violation;
pub use messages::MsgStats;
pub use schedule::{BrokerMode, Ext, Flavor, Local, ProvMode, Scheduled};
pub use world::{Outcome, World};

use super::{Action as SAction, ConnEnd, Machine, Millis, NetKind, Policy, Rng, SigInfo};
use crate::courier::{Courier, LOAD, LinkId, WINDOW};
use crate::engine::{self, Action as EAction, BroughtSig, Device, Engine, LinkEvent, Topics};
use crate::identity::UserId;

/// How a run is shaped.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Virtual time of random faults.
    pub chaos: Millis,
    /// Vary the policy knobs per seed (backoff, budgets, kick policy).
    pub vary_policy: bool,
    /// Keep the whole trace (for printing a failure), not only the last lines.
    pub full_trace: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            chaos: 6 * 3_600_000,
            vary_policy: true,
            full_trace: false,
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub steps: u64,
    pub virtual_ms: Millis,
    pub connects: u64,
    pub fetches: u64,
    pub logins: u64,
    pub kicks: u64,
    pub stops: u64,
    pub restarts: u64,
    /// The messaging world's figures.
    pub messages: MsgStats,
    /// SUBACK refusals and lost SUBSCRIBEs the world handed out.
    pub subscribe_faults: u64,
    /// Runs whose end was judged for delivery (online and drained at the end), and runs
    /// that could not be (not online long enough at the end even after the extensions).
    pub delivery_checked: u64,
    pub delivery_unchecked: u64,
}

impl Report {
    /// Add another run's figures.
    pub fn add(&mut self, r: &Report) {
        self.steps += r.steps;
        self.virtual_ms += r.virtual_ms;
        self.connects += r.connects;
        self.fetches += r.fetches;
        self.logins += r.logins;
        self.kicks += r.kicks;
        self.stops += r.stops;
        self.restarts += r.restarts;
        let (m, o) = (&mut self.messages, &r.messages);
        m.peer_messages += o.peer_messages;
        m.device_sends += o.device_sends;
        m.acked += o.acked;
        m.committed += o.committed;
        m.accepted += o.accepted;
        m.store_failures += o.store_failures;
        self.subscribe_faults += r.subscribe_faults;
        self.delivery_checked += r.delivery_checked;
        self.delivery_unchecked += r.delivery_unchecked;
    }
}

/// The messaging world's lanes of the root seed (new lanes: the login side of every older
/// seed is unchanged).
const LANE_MESSAGES: u64 = 11;
const LANE_ENGINE: u64 = 12;
const LANE_SUBSCRIBE: u64 = 13;

/// How long the engine must have been online at the end for its messages to be judged
/// (store retries and peer pauses are at most a minute), and how often the run is extended
/// by that much when it was not.
const DRAIN: Millis = 150_000;
const MAX_EXTENSIONS: u32 = 4;

/// A failing run.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub step: u64,
    pub at: Millis,
    pub violation: Violation,
    pub trace: Vec<String>,
    /// Schedule entries left after shrinking (of how many).
    pub schedule_len: (usize, usize),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke {} at step {} (t = {:.3} s): {}",
            self.seed,
            self.violation.invariant,
            self.step,
            self.at as f64 / 1000.0,
            self.violation.detail
        )?;
        writeln!(
            f,
            "replay: cargo run --release --features sim --bin imlink-sim -- --seed {} --trace",
            self.seed
        )?;
        writeln!(
            f,
            "trace ({} of {} schedule entries kept by shrinking):",
            self.schedule_len.0, self.schedule_len.1
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Split a root seed into independent streams.
fn split(seed: u64, lane: u64) -> u64 {
    let mut r = Rng::new(seed ^ lane.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.next_u64()
}

/// The policy a seed runs with.
pub fn policy_for(seed: u64, vary: bool) -> Policy {
    let mut p = Policy {
        min_wall_clock: world::MIN_WALL,
        ..Policy::default()
    };
    if !vary {
        return p;
    }
    let mut r = Rng::new(split(seed, 7));
    let pick = |r: &mut Rng, xs: &[u64]| xs[(r.next_u64() % xs.len() as u64) as usize];
    p.backoff.base = pick(&mut r, &[100, 500, 1_000, 1_000, 2_000]);
    p.backoff.cap = pick(&mut r, &[10_000, 60_000, 300_000, 300_000]).max(p.backoff.base);
    p.backoff.reset_after = pick(&mut r, &[60_000, 300_000, 300_000]);
    p.sig_expired_budget = pick(&mut r, &[1, 3, 3, 5]) as u32;
    p.protocol_budget = pick(&mut r, &[1, 3, 3]) as u32;
    p.takeover_closes = pick(&mut r, &[1, 2, 3, 3]) as u32;
    p.on_kick = if r.one_in(3) {
        super::OnKick::ReloginAfter(pick(&mut r, &[60_000, 900_000]))
    } else {
        super::OnKick::StayOffline
    };
    p.login_on_start = !r.one_in(8);
    p.fetch_timeout = pick(&mut r, &[5_000, 15_000]);
    p.connect_timeout = pick(&mut r, &[5_000, 10_000]);
    // Drawn last, so the seeds' other knobs stay what they were. Without provisioning the
    // simulated app brings every sig (and a fresh one when told the last expired).
    p.provisioning = !r.one_in(5);
    p.brokers = pick(&mut r, &[1, 1, 2, 3]) as u32;
    p.protocol = match r.next_u64() % 4 {
        0 => super::ProtocolMode::Auto,
        1 => super::ProtocolMode::V311,
        _ => super::ProtocolMode::V5,
    };
    // Drawn after every older knob (those stay what they were for each seed).
    p.rejected_cooldown = pick(&mut r, &[1_800_000, 1_800_000, 60_000, 60_000, 0]);
    p.rejected_cooldown_max = pick(&mut r, &[8 * 3_600_000, 1_800_000]).max(p.rejected_cooldown);
    p
}

/// One simulated run.
pub struct Sim {
    pub seed: u64,
    cfg: SimConfig,
    /// The engine the daemon runs (its session [`Machine`] is judged by the checker).
    pub engine: Engine,
    pub world: World,
    /// The messaging half of the world.
    msgs: messages::Messages,
    /// The connection the world has (the engine's number for it) and as whom.
    link: Option<(LinkId, UserId)>,
    engine_rng: Rng,
    sub_rng: Rng,
    next_sub_fault: Millis,
    /// Until when the broker refuses SUBSCRIBEs (as the runner told the world; cut short
    /// when the world turns healthy), when a SUBSCRIBE was last lost (no SUBACK ever), and
    /// when the device last woke from a suspend (nothing ran while it slept).
    sub_refused_until: Millis,
    sub_lost_at: Millis,
    resumed_at: Millis,
    /// Since when the phase has been `subscribing` / `online` (now).
    subscribing_since: Option<Millis>,
    online_since: Option<Millis>,
    extensions: u32,
    checker: check::Checker,
    schedule: Vec<Scheduled>,
    next_sched: usize,
    machine_rng: Rng,
    step: u64,
    pub trace: Vec<String>,
    report: Report,
    /// Where the run must stop (end of chaos + the healthy tail), and the phases of the end.
    end: Millis,
    healthy_from: Millis,
    final_login_at: Millis,
    final_login_sent: bool,
    /// Without provisioning: when the simulated app logs in again with a fresh sig (after
    /// it was told the last one expired).
    app_relogin_at: Option<Millis>,
    same_instant: u64,
    print: bool,
}

/// The users the simulator logs in as.
pub fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap_or_else(|_| unreachable!("the simulator's user names are valid"))
}

impl Sim {
    /// Set up seed `seed`. `keep`: which schedule entries to keep (shrinking), `None`: all.
    pub fn new(seed: u64, cfg: SimConfig, keep: Option<&[bool]>) -> (Sim, usize) {
        let policy = policy_for(seed, cfg.vary_policy);
        let mut world_rng = Rng::new(split(seed, 1));
        let mix = schedule::Mix::draw(&mut world_rng);
        let mut full = schedule::draw(&mut world_rng, cfg.chaos, mix);
        let mut total = full.len();
        if let Some(keep) = keep {
            let mut i = 0;
            full.retain(|_| {
                let k = keep.get(i).copied().unwrap_or(true);
                i += 1;
                k
            });
        }
        let world = World::new(Rng::new(split(seed, 2)), &policy);
        if world.flavor() == Flavor::NatsCallout {
            // Its own stream, merged in: every other seed's schedule stays what it was.
            let mut r = Rng::new(split(seed, 4));
            let mut outages = schedule::draw_auth_outages(&mut r, cfg.chaos);
            let first = total;
            total += outages.len();
            if let Some(keep) = keep {
                let mut i = first;
                outages.retain(|_| {
                    let k = keep.get(i).copied().unwrap_or(true);
                    i += 1;
                    k
                });
            }
            full.extend(outages);
            full.sort_by_key(|s| s.at);
        }
        let mut machine_rng = Rng::new(split(seed, 3));
        let now = world.now();
        let mut engine_rng = Rng::new(split(seed, LANE_ENGINE));
        let machine = Machine::new(policy.clone(), user("alice"), now, machine_rng.next_u64());
        let engine = new_engine(machine, &mut engine_rng, &policy, now);
        let bound = check::healthy_bound(&policy);
        let healthy_from = cfg.chaos;
        let final_login_at = healthy_from + bound + 1;
        let end = final_login_at + bound + 1;
        let msgs =
            messages::Messages::new(Rng::new(split(seed, LANE_MESSAGES)), world.t, healthy_from);
        let mut sub_rng = Rng::new(split(seed, LANE_SUBSCRIBE));
        let next_sub_fault = world.t + sub_rng.range(60_000, 3_600_000);
        let sim = Sim {
            seed,
            checker: check::Checker::new(policy, user("alice")),
            cfg,
            engine,
            world,
            msgs,
            link: None,
            engine_rng,
            sub_rng,
            next_sub_fault,
            sub_refused_until: 0,
            sub_lost_at: 0,
            resumed_at: 0,
            subscribing_since: None,
            online_since: None,
            extensions: 0,
            schedule: full,
            next_sched: 0,
            machine_rng,
            step: 0,
            trace: Vec::new(),
            report: Report::default(),
            end,
            healthy_from,
            final_login_at,
            final_login_sent: false,
            app_relogin_at: None,
            same_instant: 0,
            print: false,
        };
        (sim, total)
    }

    /// Whether the run keeps a trace (a replay, a shrink, `--trace`): the fast path formats
    /// nothing, and a failing seed is run again with its trace ([`run_seed`]).
    fn tracing(&self) -> bool {
        self.cfg.full_trace || self.print
    }

    fn log(&mut self, line: String) {
        if !self.tracing() {
            return;
        }
        if self.print {
            println!("{:>10.3}s {line}", self.world.t as f64 / 1000.0);
        }
        self.trace
            .push(format!("{:>10.3}s {line}", self.world.t as f64 / 1000.0));
        if !self.cfg.full_trace && self.trace.len() > 400 {
            self.trace.drain(..200);
        }
    }

    /// Like [`Sim::run`], printing every step as it happens when `print`.
    pub fn run_traced(mut self, print: bool) -> Result<Report, Box<Failure>> {
        self.print = print;
        if print {
            println!("policy: {:?}", self.checker.policy);
            println!("world: {:?}", self.world.flavor());
        }
        self.run()
    }

    /// Run to the end; the first violated invariant ends the run.
    pub fn run(mut self) -> Result<Report, Box<Failure>> {
        self.start_daemon(false);
        loop {
            if let Err(v) = self.step_once() {
                return Err(self.failure(v));
            }
            if self.world.t >= self.end {
                // Messages are judged once the engine has been online for a while: extend a
                // healthy tail that ended too soon after a reconnect.
                if self.online_for() < DRAIN && self.extensions < MAX_EXTENSIONS {
                    self.extensions += 1;
                    // (A suspend may have carried the world past the end.)
                    self.end = self.end.max(self.world.t) + DRAIN;
                    continue;
                }
                break;
            }
        }
        if self.online_for() >= DRAIN {
            let me = self.machine().user().to_string();
            self.msgs.t = self.world.t;
            self.msgs.final_check(&me);
            self.report.delivery_checked += 1;
            if let Some((invariant, detail)) = self.msgs.take_violations().into_iter().next() {
                return Err(self.failure(Violation { invariant, detail }));
            }
        } else {
            self.report.delivery_unchecked += 1;
        }
        let mut r = self.report.clone();
        r.steps = self.step;
        r.virtual_ms = self.world.t;
        r.connects = self.world.connects;
        r.fetches = self.world.fetches;
        r.messages = self.msgs.stats.clone();
        Ok(r)
    }

    /// How long the engine has been online and awake (nothing runs while the device sleeps).
    fn online_for(&self) -> Millis {
        self.online_since
            .map_or(0, |s| self.world.t.saturating_sub(s.max(self.resumed_at)))
    }

    fn failure(&mut self, v: Violation) -> Box<Failure> {
        Box::new(Failure {
            seed: self.seed,
            step: self.step,
            at: self.world.t,
            violation: v,
            trace: std::mem::take(&mut self.trace),
            schedule_len: (self.schedule.len(), self.schedule.len()),
        })
    }

    /// The session machine inside the engine (what the checker judges).
    pub fn machine(&self) -> &Machine {
        self.engine.machine()
    }

    /// (Re)start the daemon process: a new engine, the cache, `Start`.
    fn start_daemon(&mut self, restarted: bool) {
        let policy = self.checker.policy.clone();
        let configured = self.checker.configured_user.clone();
        let now = self.world.now();
        let machine = Machine::new(policy.clone(), configured, now, self.machine_rng.next_u64());
        self.engine = new_engine(machine, &mut self.engine_rng, &policy, now);
        self.link = None;
        self.msgs.t = self.world.t;
        self.msgs.process_gone();
        self.world.daemon_started();
        self.checker.on_restart(&self.world);
        if restarted {
            self.report.restarts += 1;
        }
        if let Some(info) = self.world.cached_sig_info(&policy) {
            let what = format!("daemon: cached sig {}", info.fingerprint);
            self.deliver(super::Input::CachedSig(info), &what);
        }
        self.deliver(super::Input::Start, "daemon: start");
    }

    /// The sig a local app brings with its login: none with provisioning, a fresh one from
    /// its app server without.
    fn app_sig(&mut self, u: &UserId) -> Option<SigInfo> {
        (!self.checker.policy.provisioning).then(|| self.world.app_sig(u.clone()))
    }

    /// Feed one input of the login world (in the session's terms: the engine's input is made
    /// from it, as the driver would), carry out the actions, check the invariants.
    fn deliver(&mut self, input: super::Input, what: &str) {
        let before = self.machine().snapshot();
        self.feed(input.clone());
        self.after(before, Some(input), what.to_string());
    }

    /// What the driver does with a login-world event: the engine's input (a connection's
    /// events name the connection), and the broker's side of messages told first.
    fn feed(&mut self, input: super::Input) {
        use super::Input as S;
        let now = self.world.now();
        self.msgs.t = self.world.t;
        let link = self.link.as_ref().map_or(0, |l| l.0);
        let on_link = |event| engine::Input::Link { link, event };
        let input = match input {
            S::Start => engine::Input::Start,
            S::CachedSig(i) => engine::Input::CachedSig(i),
            S::Login { id, user, sig } => engine::Input::Login {
                id,
                user,
                sig: sig.map(|s| BroughtSig {
                    fingerprint: s.fingerprint,
                    user: Some(s.user_id),
                    issued_at: s.issued_at,
                    expires_at: s.expires_at,
                }),
            },
            S::Logout { id } => engine::Input::Logout { id },
            S::Shutdown => engine::Input::Shutdown,
            S::Reconfigured {
                policy,
                user,
                reconnect,
            } => engine::Input::Reconfigured {
                policy,
                user,
                reconnect,
                topics: topics(),
                device: device(&self.checker.policy),
            },
            S::SigFetched(i) => engine::Input::SigFetched(i),
            S::SigFetchFailed(f) => engine::Input::SigFetchFailed(f),
            S::Connected { session_present } => {
                if let Some((l, u)) = self.link.clone() {
                    self.msgs.link_up(l, &u);
                }
                on_link(LinkEvent::ConnAck { session_present })
            }
            S::SubAck { granted } => {
                if granted {
                    self.msgs.subscribed();
                }
                on_link(LinkEvent::SubAck { granted })
            }
            S::ConnectionEnded(end) => {
                self.msgs.link_down(false);
                self.link = None;
                on_link(LinkEvent::Ended(end))
            }
            S::Disconnected => {
                self.msgs.link_down(true);
                self.link = None;
                on_link(LinkEvent::Ended(ConnEnd::Network {
                    kind: NetKind::Closed,
                    detail: "the broker closed after our DISCONNECT".into(),
                }))
            }
            S::MessageReceived => return,
        };
        self.engine.handle(now, input);
    }

    fn timeout(&mut self, what: &str) {
        let before = self.machine().snapshot();
        let now = self.world.now();
        self.engine.handle_timeout(now);
        self.after(before, None, what.to_string());
    }

    /// The world's next delivery, fed to the engine.
    fn world_event(&mut self) {
        let before = self.machine().snapshot();
        // What the broker knows of the device's publishes on the link (a close while one has
        // waited `engine::STALLED_AFTER` is a stalled broker's: world.rs).
        self.checker.unanswered_since = self
            .link
            .as_ref()
            .and_then(|(l, _)| self.msgs.oldest_unanswered(*l));
        if let Some((input, what)) = self
            .world
            .pop_event(self.engine.machine(), &mut self.checker)
        {
            self.feed(input.clone());
            self.after(before, Some(input), what);
        }
    }

    /// The messaging world's next event (an input for the engine, or a change in the world).
    fn messages_event(&mut self) {
        let before = self.machine().snapshot();
        if let Some((input, what)) = self.msgs.pop_event(self.world.t) {
            if let Some(input) = input {
                let now = self.world.now();
                self.engine.handle(now, input);
            }
            // For the session checker, a messaging input (never a fetch result).
            self.after(before, Some(super::Input::MessageReceived), what);
        }
    }

    /// A SUBSCRIBE fault of the world: refusals for a while (an election), or lost ones.
    fn subscribe_fault(&mut self) {
        let t = self.world.t;
        self.next_sub_fault = t + self.sub_rng.range(60_000, 3_600_000);
        self.report.subscribe_faults += 1;
        let what = if self.sub_rng.one_in(3) {
            let n = self.sub_rng.range(1, 2) as u32;
            self.world.lose_subscribes = n;
            format!("broker: the next {n} SUBSCRIBEs are never answered")
        } else {
            let d = self.sub_rng.range(2_000, 90_000);
            self.world.refuse_subscribe_until = t + d;
            self.sub_refused_until = t + d;
            format!(
                "broker: SUBSCRIBEs refused (0x80) for {} s: a leader election",
                d / 1000
            )
        };
        self.log(format!("world: {what}"));
    }

    /// Carry out the actions of the step just taken and check every invariant.
    fn after(&mut self, before: super::Snapshot, input: Option<super::Input>, what: String) {
        let mut actions = Vec::new();
        while let Some(a) = self.engine.poll_action() {
            actions.push(a);
        }
        let snap = self.machine().snapshot();
        if self.tracing() {
            let line = format!(
                "{what} → {} | {} {}{}",
                actions
                    .iter()
                    .map(short_engine_action)
                    .collect::<Vec<_>>()
                    .join(", "),
                snap.phase.as_str(),
                snap.login_status,
                snap.last_error
                    .as_ref()
                    .map(|e| format!(" [{} {}]", e.class.as_str(), e.code))
                    .unwrap_or_default()
            );
            self.log(line);
        }
        self.msgs.t = self.world.t;
        let mut exit = false;
        for a in &actions {
            match a {
                EAction::Reply { id, .. } => self.checker.reply(*id),
                EAction::Emit(e) => {
                    self.checker.emitted(e);
                    if matches!(e, super::Event::UserSigExpired { .. })
                        && !self.checker.policy.provisioning
                        && self.app_relogin_at.is_none()
                    {
                        // The app reacts like an SDK app: a new sig from its server, soon.
                        let delay = self.machine_rng.range(1_000, 60_000);
                        self.app_relogin_at = Some(self.world.t + delay);
                    }
                    if matches!(e, super::Event::KickedOffline { .. }) {
                        self.report.kicks += 1;
                    }
                    if let super::Event::StateChanged {
                        phase: super::Phase::Stopped,
                        ..
                    } = e
                    {
                        self.report.stops += 1;
                    }
                    if matches!(e, super::Event::ConnectSuccess { .. }) {
                        self.report.logins += 1;
                    }
                }
                EAction::Exit => exit = true,
                EAction::Connect {
                    link,
                    user,
                    fingerprint,
                    target,
                    proto,
                    will,
                } => {
                    self.link = Some((*link, user.clone()));
                    self.msgs
                        .connecting(will.as_ref().map(|w| (w.topic.clone(), w.payload.clone())));
                    let sa = SAction::Connect {
                        user: user.clone(),
                        fingerprint: fingerprint.clone(),
                        target: target.clone(),
                        proto: *proto,
                    };
                    self.world
                        .act(&sa, self.engine.machine(), &mut self.checker);
                }
                EAction::Subscribe { link, filter } => match self.link.clone() {
                    Some((l, u)) if l == *link => {
                        if *filter != topics().inbox_filter(&u) {
                            self.checker.violate(
                                "messages: subscription",
                                format!("SUBSCRIBE {filter:?} on a connection of {u}"),
                            );
                        }
                        let lost = self.world.lose_subscribes;
                        self.world.act(
                            &SAction::Subscribe { user: u },
                            self.engine.machine(),
                            &mut self.checker,
                        );
                        if self.world.lose_subscribes < lost {
                            self.sub_lost_at = self.world.t;
                        }
                    }
                    _ => self.checker.violate(
                        "messages: subscription",
                        format!("SUBSCRIBE on link {link}, not the connection the world has"),
                    ),
                },
                EAction::Disconnect { link } => {
                    self.checker.our_close();
                    self.msgs.disconnecting(*link);
                    self.world.act(
                        &SAction::Disconnect,
                        self.engine.machine(),
                        &mut self.checker,
                    );
                }
                EAction::Abandon { link } => {
                    if self.link.as_ref().is_some_and(|l| l.0 == *link) {
                        self.link = None;
                        self.msgs.link_down(true);
                        self.world
                            .act(&SAction::Abandon, self.engine.machine(), &mut self.checker);
                    }
                }
                EAction::FetchSig { user } => self.world.act(
                    &SAction::FetchSig { user: user.clone() },
                    self.engine.machine(),
                    &mut self.checker,
                ),
                EAction::CancelFetch => self.world.act(
                    &SAction::CancelFetch,
                    self.engine.machine(),
                    &mut self.checker,
                ),
                EAction::PersistSig { fingerprint, user } => self.world.act(
                    &SAction::PersistSig {
                        fingerprint: fingerprint.clone(),
                        user: user.clone(),
                    },
                    self.engine.machine(),
                    &mut self.checker,
                ),
                EAction::ForgetSig => self.world.act(
                    &SAction::ForgetSig,
                    self.engine.machine(),
                    &mut self.checker,
                ),
                EAction::ReleaseSig { fingerprint } => self.world.act(
                    &SAction::ReleaseSig {
                        fingerprint: fingerprint.clone(),
                    },
                    self.engine.machine(),
                    &mut self.checker,
                ),
                EAction::Publish { .. }
                | EAction::Ack { .. }
                | EAction::Store(_)
                | EAction::SendReply { .. }
                | EAction::Notify(_) => self.msgs.act(a),
            }
        }
        let t = self.world.t;
        self.check_engine(&snap, t);
        self.checker.after_step(
            &before,
            &snap,
            self.engine.machine(),
            &self.world,
            t,
            input.as_ref(),
        );
        if exit {
            // systemd starts it again.
            self.log("daemon: exited; systemd starts it again".into());
            self.start_daemon(true);
        }
    }

    /// The engine-level invariants (docs/login-policy.md, "Invariants": messaging).
    fn check_engine(&mut self, snap: &super::Snapshot, t: Millis) {
        self.msgs.check_step();
        for (invariant, detail) in self.msgs.take_violations() {
            self.checker.violate(invariant, detail);
        }
        // Bounds: what the courier holds.
        let (in_flight, held) = self.engine.courier().sizes();
        if in_flight > WINDOW || held > LOAD {
            self.checker.violate(
                "bounds: courier",
                format!("{in_flight} in flight (≤ {WINDOW}), {held} held (≤ {LOAD})"),
            );
        }
        // The courier serves whom the session logs in as.
        if self.engine.courier().owner() != Some(self.machine().user().as_str()) {
            self.checker.violate(
                "messages: account",
                format!(
                    "the courier serves {:?} while the session logs in as {}",
                    self.engine.courier().owner(),
                    self.machine().user()
                ),
            );
        }
        // Never online while the inbox is not subscribed, and `subscribing` only as long as
        // the broker refuses or loses SUBSCRIBEs (then the retry's backoff, one SUBSCRIBE
        // timeout and one more backoff at most).
        if snap.phase == super::Phase::Online {
            self.online_since.get_or_insert(t);
            if !snap.inbox_subscribed {
                self.checker.violate(
                    "inbox: online means subscribed",
                    "phase online with the inbox subscription not granted".into(),
                );
            }
        } else {
            self.online_since = None;
        }
        if snap.phase == super::Phase::Subscribing {
            let since = *self.subscribing_since.get_or_insert(t);
            let p = &self.checker.policy;
            let bound = 2 * (super::SUBSCRIBE_RETRY.cap + p.connect_timeout) + 1_000;
            let from = since
                .max(self.sub_refused_until)
                .max(self.sub_lost_at)
                .max(self.resumed_at);
            if t > from + bound {
                self.checker.violate(
                    "inbox: subscribing bounded",
                    format!(
                        "phase subscribing since t = {since} ms, {} s after the broker last \
                         refused or lost a SUBSCRIBE (bound {} s)",
                        (t - from) / 1000,
                        bound / 1000
                    ),
                );
            }
        } else {
            self.subscribing_since = None;
        }
    }

    /// Advance to the next event (a world event, a schedule entry, a machine timer), handle it.
    fn step_once(&mut self) -> Result<(), Violation> {
        self.step += 1;
        let machine_t = self.engine.poll_timeout().map(|m| self.world.from_mono(m));
        let world_t = self.world.next_event_time();
        let msgs_t = self.msgs.next_event_time();
        let sub_t = (!self.world.healthy && self.next_sub_fault < self.healthy_from)
            .then_some(self.next_sub_fault);
        let sched_t = if self.world.t < self.healthy_from {
            self.schedule
                .get(self.next_sched)
                .map(|s| s.at)
                .filter(|at| *at < self.healthy_from)
        } else {
            None
        };
        let healthy_t = (!self.world.healthy).then_some(self.healthy_from);
        let login_t = (!self.final_login_sent).then_some(self.final_login_at);
        let relogin_t = self.app_relogin_at;
        let t = [
            relogin_t,
            machine_t,
            world_t,
            msgs_t,
            sub_t,
            sched_t,
            healthy_t,
            login_t,
            Some(self.end),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.end)
        .max(self.world.t);
        if t == self.world.t {
            self.same_instant += 1;
            if self.same_instant > 10_000 {
                return Err(Violation {
                    invariant: "no loop: livelock",
                    detail: format!("10,000 steps at one instant ({t} ms) without time passing"),
                });
            }
        } else {
            self.same_instant = 0;
        }
        self.world.advance_to(t);
        // Time has passed: the state since the last step held until now.
        let snap = self.machine().snapshot();
        self.checker.check_time(&snap, self.world.t);
        // At one instant: the world's deliveries, then the schedule, then the timers, then
        // messaging (the login side's order of every older seed is kept).
        if world_t.is_some_and(|w| w <= t) {
            self.world_event();
        } else if sched_t.is_some_and(|x| x <= t) {
            let s = self.schedule[self.next_sched].clone();
            self.next_sched += 1;
            self.external(s.ext);
        } else if healthy_t.is_some_and(|x| x <= t) {
            self.world.make_healthy();
            self.sub_refused_until = self.sub_refused_until.min(t);
            self.msgs.t = t;
            self.msgs.make_healthy();
            self.checker.healthy_from(t, &self.machine().snapshot());
            self.log("world: healthy from now on".into());
            // The machine sees the corrected wall clock at its next step.
            self.timeout("world: healthy");
        } else if login_t.is_some_and(|x| x <= t) {
            self.final_login_sent = true;
            self.checker.final_login(t, &self.machine().snapshot());
            let id = self.checker.request(check::ReqKind::Login, t);
            let u = self.machine().user().clone();
            let sig = self.app_sig(&u);
            self.deliver(
                super::Input::Login {
                    id,
                    user: None,
                    sig,
                },
                "operator: login (final)",
            );
        } else if relogin_t.is_some_and(|x| x <= t) {
            self.app_relogin_at = None;
            let id = self.checker.request(check::ReqKind::Login, t);
            let u = self.machine().user().clone();
            let sig = self.app_sig(&u);
            self.deliver(
                super::Input::Login {
                    id,
                    user: None,
                    sig,
                },
                "app: login with a fresh sig (the last one expired)",
            );
        } else if machine_t.is_some_and(|x| x <= t) {
            self.timeout("timer");
        } else if msgs_t.is_some_and(|w| w <= t) {
            self.messages_event();
        } else if sub_t.is_some_and(|x| x <= t) {
            self.subscribe_fault();
        }
        match self.checker.take_violation() {
            Some(v) => Err(v),
            None => Ok(()),
        }
    }

    fn external(&mut self, ext: Ext) {
        let text = format!("{ext:?}");
        match ext {
            Ext::Local(l) => self.local(l),
            Ext::Suspend(d) => {
                self.log(format!("world: suspend {} s", d / 1000));
                self.world.suspend(d);
                self.msgs.suspended(d);
                self.resumed_at = self.world.t;
                self.timeout("resume after suspend");
            }
            Ext::Reboot { rtc } => {
                self.log(format!("world: reboot (rtc {rtc})"));
                self.world.reboot(rtc);
                self.start_daemon(true);
            }
            other => {
                self.world.external(other);
                self.log(format!("world: {text}"));
                // Wall-clock changes are seen at the machine's next step; give it one now.
                self.timeout("world changed");
            }
        }
    }

    fn local(&mut self, l: Local) {
        let t = self.world.t;
        match l {
            Local::Login => {
                let id = self.checker.request(check::ReqKind::Login, t);
                self.deliver(
                    super::Input::Login {
                        id,
                        user: None,
                        sig: None,
                    },
                    "local: login",
                );
            }
            Local::LoginAs(name) => {
                let id = self.checker.request(check::ReqKind::Login, t);
                self.deliver(
                    super::Input::Login {
                        id,
                        user: Some(user(name)),
                        sig: None,
                    },
                    &format!("local: login as {name}"),
                );
            }
            Local::Logout => {
                let id = self.checker.request(check::ReqKind::Logout, t);
                self.deliver(super::Input::Logout { id }, "local: logout");
            }
            Local::Reload { user: u, reconnect } => {
                let configured = u
                    .map(user)
                    .unwrap_or_else(|| self.checker.configured_user.clone());
                let changed = configured != self.checker.configured_user;
                let runtime_user = self.machine().user().clone();
                self.checker.on_reload(&configured, t);
                let policy = self.checker.policy.clone();
                self.deliver(
                    super::Input::Reconfigured {
                        policy,
                        user: configured,
                        reconnect,
                    },
                    &format!("local: SIGHUP (user {u:?}, reconnect {reconnect})"),
                );
                if !changed && *self.machine().user() != runtime_user {
                    self.checker.violate(
                        "truth: account",
                        format!(
                            "a reload that left user_id alone switched the account from {runtime_user} to {}",
                            self.machine().user()
                        ),
                    );
                }
            }
            Local::Restart => {
                self.checker.on_shutdown_requested();
                self.deliver(super::Input::Shutdown, "local: SIGTERM");
                // A stopping daemon only finishes its close: drive it to the exit (`after`
                // restarts it). The daemon's own stop timeout is 10 s.
                let give_up = self.world.t + 10_000;
                while self.checker.shutting_down && self.world.t < give_up {
                    let machine_t = self.engine.poll_timeout().map(|m| self.world.from_mono(m));
                    let t = [machine_t, self.world.next_event_time()]
                        .into_iter()
                        .flatten()
                        .min()
                        .unwrap_or(give_up)
                        .min(give_up);
                    self.world.advance_to(t);
                    if self.world.next_event_time() == Some(self.world.t) {
                        self.world_event();
                    } else {
                        self.timeout("timer (stopping)");
                    }
                }
                if self.checker.shutting_down {
                    self.checker.violate(
                        "liveness: shutdown",
                        "SIGTERM, and the daemon had not exited after 10 s".into(),
                    );
                }
            }
            Local::Crash => {
                self.log("local: SIGKILL".into());
                self.world.crash();
                self.start_daemon(true);
            }
        }
    }
}

/// The topics the simulated engine uses.
fn topics() -> Topics {
    Topics {
        sdk_app_id: messages::APP,
    }
}

/// The simulated device (its status is published: retained documents and wills).
fn device(p: &Policy) -> Device {
    Device {
        platform: "linux".into(),
        instance: "kiosk-1".into(),
        version: "sim".into(),
        nodes: (0..p.brokers.max(1))
            .map(|i| format!("mqtts://node{i}.sim:8883"))
            .collect(),
        publish_status: true,
    }
}

/// The engine over `machine`, with a courier seeded from the engine's lane.
fn new_engine(machine: Machine, rng: &mut Rng, p: &Policy, now: super::Now) -> Engine {
    let courier = Courier::new(now.mono, rng.next_u64());
    Engine::new(machine, courier, topics(), device(p), now)
}

/// A one-line form of an engine action, for the trace.
fn short_engine_action(a: &EAction) -> String {
    match a {
        EAction::FetchSig { user } => format!("FetchSig({user})"),
        EAction::CancelFetch => "CancelFetch".into(),
        EAction::Connect {
            link,
            user,
            fingerprint,
            target,
            proto,
            will,
        } => format!(
            "Connect#{link}({user},{fingerprint},{target:?},{}{})",
            proto.as_str(),
            if will.is_some() { ",will" } else { "" }
        ),
        EAction::Subscribe { link, .. } => format!("Subscribe#{link}"),
        EAction::Publish { link, what, .. } => format!("Publish#{link}({what:?})"),
        EAction::Ack { link, pkid } => format!("Ack#{link}({pkid})"),
        EAction::Disconnect { link } => format!("Disconnect#{link}"),
        EAction::Abandon { link } => format!("Abandon#{link}"),
        EAction::PersistSig { fingerprint, .. } => format!("Persist({fingerprint})"),
        EAction::ForgetSig => "Forget".into(),
        EAction::ReleaseSig { fingerprint } => format!("Release({fingerprint})"),
        EAction::Emit(e) => check::short_action(&SAction::Emit(e.clone())),
        EAction::Reply { id, result } => check::short_action(&SAction::Reply {
            id: *id,
            result: result.clone(),
        }),
        EAction::SendReply { id, result } => format!(
            "SendReply({id},{})",
            match result {
                Ok(q) => format!("seq {}", q.seq),
                Err(r) => r.code.to_string(),
            }
        ),
        EAction::Store(op) => match op {
            engine::StoreOp::Enqueue { .. } => "Store(enqueue)".into(),
            engine::StoreOp::Receive { msg, .. } => format!("Store(receive {})", msg.id),
            engine::StoreOp::LoadOutbox { .. } => "Store(load outbox)".into(),
            engine::StoreOp::Settle { seq, outcome, .. } => {
                format!("Store(settle {seq} {outcome:?})")
            }
            engine::StoreOp::Counts { .. } => "Store(counts)".into(),
        },
        EAction::Notify(e) => e.name().to_string(),
        EAction::Exit => "Exit".into(),
    }
}

/// Run one seed. A failure is run again with its trace (the last 400 lines of it).
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<Report, Box<Failure>> {
    let (sim, _) = Sim::new(seed, cfg.clone(), None);
    let first = match sim.run() {
        Ok(r) => return Ok(r),
        Err(f) if cfg.full_trace => return Err(f),
        Err(f) => f,
    };
    let mut traced = cfg.clone();
    traced.full_trace = true;
    let (sim, _) = Sim::new(seed, traced, None);
    let mut f = sim.run().err().unwrap_or(first);
    let cut = f.trace.len().saturating_sub(400);
    f.trace.drain(..cut);
    Err(f)
}

/// Shrink a failing seed: delete schedule entries (halves, then quarters, … then single
/// entries) while the run still breaks the same invariant; return the smallest failure.
pub fn shrink(seed: u64, cfg: &SimConfig, budget: usize) -> Box<Failure> {
    let mut cfg = cfg.clone();
    cfg.full_trace = true;
    let (sim, total) = Sim::new(seed, cfg.clone(), None);
    let Err(first) = sim.run() else {
        unreachable!("shrink is only called on a failing seed")
    };
    let invariant = first.violation.invariant;
    let mut keep = vec![true; total];
    let mut best = first;
    let mut runs = 0;
    let mut chunk = total.div_ceil(2).max(1);
    while chunk >= 1 && runs < budget {
        let mut i = 0;
        let mut progressed = false;
        while i < total && runs < budget {
            let end = (i + chunk).min(total);
            if keep[i..end].iter().any(|k| *k) {
                let mut trial = keep.clone();
                trial[i..end].iter_mut().for_each(|k| *k = false);
                runs += 1;
                let (sim, _) = Sim::new(seed, cfg.clone(), Some(&trial));
                if let Err(f) = sim.run()
                    && f.violation.invariant == invariant
                {
                    keep = trial;
                    best = f;
                    progressed = true;
                }
            }
            i = end;
        }
        if chunk == 1 && !progressed {
            break;
        }
        if !progressed || chunk > 1 {
            chunk /= 2;
        }
        if chunk == 0 {
            break;
        }
    }
    best.schedule_len = (keep.iter().filter(|k| **k).count(), total);
    best
}

/// Run seeds `from..from + n`, stopping at the first failure (shrunk) or when `deadline`
/// says so. Returns the reports and the number of seeds run.
pub fn run_range(
    from: u64,
    n: u64,
    cfg: &SimConfig,
    mut out_of_time: impl FnMut() -> bool,
) -> Result<(u64, Report), Box<Failure>> {
    let mut total = Report::default();
    let mut ran = 0;
    for seed in from..from + n {
        if out_of_time() {
            break;
        }
        match run_seed(seed, cfg) {
            Ok(r) => {
                total.add(&r);
                ran += 1;
            }
            Err(_) => return Err(shrink(seed, cfg, 300)),
        }
    }
    Ok((ran, total))
}

#[cfg(test)]
mod tests;
