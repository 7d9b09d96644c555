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
mod schedule;
pub mod storm;
mod world;

pub use check::Violation;
pub use schedule::{BrokerMode, Ext, Flavor, Local, ProvMode, Scheduled};
pub use world::{Outcome, World};

use super::{Machine, Millis, Policy, Rng, SigInfo};
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
}

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
    pub machine: Machine,
    pub world: World,
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
        let machine = Machine::new(policy.clone(), user("alice"), now, machine_rng.next_u64());
        let bound = check::healthy_bound(&policy);
        let healthy_from = cfg.chaos;
        let final_login_at = healthy_from + bound + 1;
        let end = final_login_at + bound + 1;
        let sim = Sim {
            seed,
            checker: check::Checker::new(policy, user("alice")),
            cfg,
            machine,
            world,
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

    fn log(&mut self, line: String) {
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
                return Err(Box::new(Failure {
                    seed: self.seed,
                    step: self.step,
                    at: self.world.t,
                    violation: v,
                    trace: std::mem::take(&mut self.trace),
                    schedule_len: (self.schedule.len(), self.schedule.len()),
                }));
            }
            if self.world.t >= self.end {
                break;
            }
        }
        let mut r = self.report.clone();
        r.steps = self.step;
        r.virtual_ms = self.world.t;
        r.connects = self.world.connects;
        r.fetches = self.world.fetches;
        Ok(r)
    }

    /// (Re)start the daemon process: a new machine, the cache, `Start`.
    fn start_daemon(&mut self, restarted: bool) {
        let policy = self.checker.policy.clone();
        let configured = self.checker.configured_user.clone();
        let now = self.world.now();
        self.machine = Machine::new(policy.clone(), configured, now, self.machine_rng.next_u64());
        self.world.daemon_started();
        self.checker.on_restart(&self.world);
        if restarted {
            self.report.restarts += 1;
        }
        let before = self.machine.snapshot();
        if let Some(info) = self.world.cached_sig_info(&policy) {
            let what = format!("daemon: cached sig {}", info.fingerprint);
            self.machine
                .handle(now, super::Input::CachedSig(info.clone()));
            self.after(before, Some(super::Input::CachedSig(info)), what);
        }
        let before = self.machine.snapshot();
        self.machine.handle(now, super::Input::Start);
        self.after(before, Some(super::Input::Start), "daemon: start".into());
    }

    /// Feed one input, carry out the actions, check the invariants.
    /// The sig a local app brings with its login: none with provisioning, a fresh one from
    /// its app server without.
    fn app_sig(&mut self, u: &UserId) -> Option<SigInfo> {
        (!self.checker.policy.provisioning).then(|| self.world.app_sig(u.clone()))
    }

    fn deliver(&mut self, input: super::Input, what: &str) {
        let before = self.machine.snapshot();
        let now = self.world.now();
        self.machine.handle(now, input.clone());
        self.after(before, Some(input), what.to_string());
    }

    fn timeout(&mut self, what: &str) {
        let before = self.machine.snapshot();
        let now = self.world.now();
        self.machine.handle_timeout(now);
        self.after(before, None, what.to_string());
    }

    /// The world's next delivery, fed to the machine.
    fn world_event(&mut self) {
        let before = self.machine.snapshot();
        if let Some((input, what)) = self.world.pop_event(&self.machine, &mut self.checker) {
            let now = self.world.now();
            self.machine.handle(now, input.clone());
            self.after(before, Some(input), what);
        }
    }

    /// Carry out the actions of the step just taken and check every invariant.
    fn after(&mut self, before: super::Snapshot, input: Option<super::Input>, what: String) {
        let mut actions = Vec::new();
        while let Some(a) = self.machine.poll_action() {
            actions.push(a);
        }
        let snap = self.machine.snapshot();
        let line = format!(
            "{what} → {} | {} {}{}",
            actions
                .iter()
                .map(check::short_action)
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
        let mut exit = false;
        for a in &actions {
            match a {
                super::Action::Reply { id, .. } => self.checker.reply(*id),
                super::Action::Emit(e) => {
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
                super::Action::Exit => exit = true,
                super::Action::Disconnect => {
                    self.checker.our_close();
                    self.world.act(a, &self.machine, &mut self.checker);
                }
                _ => self.world.act(a, &self.machine, &mut self.checker),
            }
        }
        let t = self.world.t;
        self.checker.after_step(
            &before,
            &snap,
            &self.machine,
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

    /// Advance to the next event (a world event, a schedule entry, a machine timer), handle it.
    fn step_once(&mut self) -> Result<(), Violation> {
        self.step += 1;
        let machine_t = self.machine.poll_timeout().map(|m| self.world.from_mono(m));
        let world_t = self.world.next_event_time();
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
        let snap = self.machine.snapshot();
        self.checker.check_time(&snap, self.world.t);
        // At one instant: the world's deliveries, then the schedule, then the timers.
        if world_t.is_some_and(|w| w <= t) {
            self.world_event();
        } else if sched_t.is_some_and(|x| x <= t) {
            let s = self.schedule[self.next_sched].clone();
            self.next_sched += 1;
            self.external(s.ext);
        } else if healthy_t.is_some_and(|x| x <= t) {
            self.world.make_healthy();
            self.checker.healthy_from(t, &self.machine.snapshot());
            self.log("world: healthy from now on".into());
            // The machine sees the corrected wall clock at its next step.
            self.timeout("world: healthy");
        } else if login_t.is_some_and(|x| x <= t) {
            self.final_login_sent = true;
            self.checker.final_login(t, &self.machine.snapshot());
            let id = self.checker.request(check::ReqKind::Login, t);
            let u = self.machine.user().clone();
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
            let u = self.machine.user().clone();
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
                let runtime_user = self.machine.user().clone();
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
                if !changed && *self.machine.user() != runtime_user {
                    self.checker.violate(
                        "truth: account",
                        format!(
                            "a reload that left user_id alone switched the account from {runtime_user} to {}",
                            self.machine.user()
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
                    let machine_t = self.machine.poll_timeout().map(|m| self.world.from_mono(m));
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

/// Run one seed.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<Report, Box<Failure>> {
    let (sim, _) = Sim::new(seed, cfg.clone(), None);
    sim.run()
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
                total.steps += r.steps;
                total.virtual_ms += r.virtual_ms;
                total.connects += r.connects;
                total.fetches += r.fetches;
                total.restarts += r.restarts;
                ran += 1;
            }
            Err(_) => return Err(shrink(seed, cfg, 300)),
        }
    }
    Ok((ran, total))
}

#[cfg(test)]
mod tests;
