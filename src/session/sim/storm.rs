//! A fleet reconnect storm, simulated: many session engines (the real [`Machine`], the code
//! the daemon runs) on one virtual clock against a broker model that goes away for a while and
//! then accepts at most `capacity` CONNECTs per second (beyond: CONNACK 0x9F, as EMQX's
//! `max_conn_rate` or AWS IoT do). The same fleet with the engine's plain doubling (its policy
//! before the outage window), a naive reconnect (what rumqttc does on its own: poll again at
//! once, so a failed attempt is followed by the next one a round trip later, modelled as
//! 10 ms) and a fixed 1 s retry, for comparison.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::super::{Action, ConnEnd, Input, Machine, Millis, NetKind, Now, Policy, Rng, SigInfo};
use crate::identity::UserId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// imlinkd's session engine with its default policy.
    Imlinkd,
    /// The same engine without the outage window (`outage_retry_floor = 0`): the plain
    /// doubling up to the cap, imlinkd's policy before it.
    ImlinkdDoubling,
    /// Reconnect as soon as an attempt fails (a round trip later: 10 ms).
    Naive,
    /// Retry every second.
    Fixed1s,
}

impl Strategy {
    /// Whether it runs the real engine.
    pub fn engine(self) -> bool {
        matches!(self, Strategy::Imlinkd | Strategy::ImlinkdDoubling)
    }

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Imlinkd => "imlinkd",
            Strategy::ImlinkdDoubling => "imlinkd before (plain doubling)",
            Strategy::Naive => "naive (immediate reconnect)",
            Strategy::Fixed1s => "fixed 1 s",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StormConfig {
    pub devices: usize,
    /// CONNECTs per second the broker accepts once back.
    pub capacity: u32,
    /// When the broker goes away (every session drops), and for how long.
    pub outage_at: Millis,
    pub outage: Millis,
    /// How long to simulate after the outage starts.
    pub horizon: Millis,
    pub seed: u64,
}

impl Default for StormConfig {
    fn default() -> Self {
        StormConfig {
            devices: 10_000,
            capacity: 500,
            outage_at: 600_000,
            outage: 30_000,
            horizon: 600_000,
            seed: 1,
        }
    }
}

/// Per second from the outage: CONNECTs accepted and refused, and devices online.
#[derive(Debug, Clone, Default)]
pub struct Second {
    pub accepted: u32,
    pub refused: u32,
    pub online: u32,
}

#[derive(Debug, Clone)]
pub struct StormReport {
    pub strategy: Strategy,
    pub seconds: Vec<Second>,
    pub peak_attempts: u32,
    /// The peak from the broker's return on (what a live broker has to absorb).
    pub peak_after_return: u32,
    pub total_attempts: u64,
    /// From the broker's return until 99 % of the fleet is online (ms), if it happened.
    pub to_99_percent: Option<Millis>,
    /// The most refusals (0x9F, or refused while down) any one device saw after the broker's
    /// return.
    pub max_refused_per_device: u32,
}

const WALL0: i64 = 2_000_000_000;
const LATENCY: Millis = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// The broker answers device `d`'s CONNECT.
    Answer(usize, bool),
    /// Device `d`'s timer (engine) or retry (naive strategies).
    Timer(usize),
    /// Every session drops.
    Outage,
}

struct Fleet {
    cfg: StormConfig,
    strategy: Strategy,
    machines: Vec<Machine>,
    /// Naive strategies: online?
    online: Vec<bool>,
    armed: Vec<Option<Millis>>,
    refused_after_return: Vec<u32>,
    queue: BinaryHeap<Reverse<(Millis, u64, Ev)>>,
    seq: u64,
    /// The current second's start and accepted count (capacity).
    bucket: (Millis, u32),
    seconds: Vec<Second>,
    rng: Rng,
}

impl Fleet {
    fn push(&mut self, t: Millis, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, ev)));
    }

    fn now(t: Millis) -> Now {
        Now {
            mono: t,
            wall: WALL0 + (t / 1000) as i64,
        }
    }

    fn broker_up(&self, t: Millis) -> bool {
        !(self.cfg.outage_at..self.cfg.outage_at + self.cfg.outage).contains(&t)
    }

    fn second(&mut self, t: Millis) -> Option<&mut Second> {
        let i = t.checked_sub(self.cfg.outage_at)? / 1000;
        let i = i as usize;
        if i >= self.seconds.len() {
            return None;
        }
        self.seconds.get_mut(i)
    }

    /// A CONNECT from `d` at `t`: decide the answer now, deliver it after the latency.
    fn attempt(&mut self, d: usize, t: Millis) {
        let ok = if !self.broker_up(t) {
            false
        } else {
            if t >= self.bucket.0 + 1000 {
                self.bucket = (t - (t - self.bucket.0) % 1000, 0);
            }
            if self.bucket.1 < self.cfg.capacity {
                self.bucket.1 += 1;
                true
            } else {
                false
            }
        };
        if let Some(s) = self.second(t) {
            if ok {
                s.accepted += 1;
            } else {
                s.refused += 1;
            }
        }
        if !ok && t >= self.cfg.outage_at + self.cfg.outage {
            self.refused_after_return[d] += 1;
        }
        self.push(t + LATENCY, Ev::Answer(d, ok));
    }

    fn run_actions(&mut self, d: usize, t: Millis) {
        let mut subscribe = false;
        while let Some(a) = self.machines[d].poll_action() {
            match a {
                Action::Connect { .. } => self.attempt(d, t),
                Action::Subscribe { .. } => subscribe = true,
                _ => {}
            }
        }
        if subscribe {
            // The broker grants the inbox subscription with the CONNACK's round trip (the
            // storm measures CONNECTs; a SUBSCRIBE is not one).
            self.machines[d].handle(Self::now(t), Input::SubAck { granted: true });
            while self.machines[d].poll_action().is_some() {}
        }
        let next = self.machines[d].poll_timeout();
        if next != self.armed[d]
            && let Some(at) = next
        {
            self.armed[d] = Some(at);
            self.push(at, Ev::Timer(d));
        }
    }

    fn feed(&mut self, d: usize, t: Millis, input: Input) {
        self.machines[d].handle(Self::now(t), input);
        self.run_actions(d, t);
    }

    fn is_online(&self, d: usize) -> bool {
        match self.strategy {
            Strategy::Imlinkd | Strategy::ImlinkdDoubling => {
                self.machines[d].phase() == super::super::Phase::Online
            }
            _ => self.online[d],
        }
    }

    fn retry_delay(&mut self) -> Millis {
        match self.strategy {
            Strategy::Naive => 10,
            // A little spread, as real clocks have.
            _ => 1_000 + self.rng.range(0, 20),
        }
    }
}

/// Run one strategy.
pub fn run(cfg: &StormConfig, strategy: Strategy) -> StormReport {
    let n = cfg.devices;
    let mut rng = Rng::new(cfg.seed);
    let user = UserId::parse("device").unwrap_or_else(|_| unreachable!());
    let policy = Policy {
        outage_retry_floor: if strategy == Strategy::ImlinkdDoubling {
            0
        } else {
            Policy::default().outage_retry_floor
        },
        ..Policy::default()
    };
    let seconds = (cfg.horizon / 1000) as usize;
    let mut f = Fleet {
        cfg: cfg.clone(),
        strategy,
        machines: Vec::with_capacity(if strategy.engine() { n } else { 0 }),
        online: vec![false; n],
        armed: vec![None; n],
        refused_after_return: vec![0; n],
        queue: BinaryHeap::new(),
        seq: 0,
        bucket: (0, 0),
        seconds: vec![Second::default(); seconds],
        rng: Rng::new(rng.next_u64()),
    };
    // Every device logs in during the first minutes (spread out), long before the outage.
    for d in 0..n {
        let start = rng.range(0, cfg.outage_at / 2);
        if strategy.engine() {
            let mut m = Machine::new(policy.clone(), user.clone(), Fleet::now(0), rng.next_u64());
            m.handle(
                Fleet::now(0),
                Input::CachedSig(SigInfo {
                    fingerprint: format!("s{d}"),
                    user_id: user.clone(),
                    issued_at: Some(WALL0),
                    expires_at: Some(WALL0 + 30 * 86_400),
                    server_now: WALL0,
                    received_at: 0,
                    wall_anchored: false,
                }),
            );
            f.machines.push(m);
        }
        f.push(start, Ev::Timer(d));
    }
    f.push(cfg.outage_at, Ev::Outage);
    let end = cfg.outage_at + cfg.horizon;
    let mut started = vec![false; n];
    let mut last_second_recorded = 0usize;
    while let Some(Reverse((t, _, ev))) = f.queue.pop() {
        if t >= end {
            break;
        }
        // Sample who is online, once per second of the window.
        while t >= cfg.outage_at + last_second_recorded as Millis * 1000
            && last_second_recorded < seconds
        {
            let online = (0..n).filter(|d| f.is_online(*d)).count() as u32;
            f.seconds[last_second_recorded].online = online;
            last_second_recorded += 1;
        }
        match ev {
            Ev::Outage => {
                for d in 0..n {
                    match strategy {
                        Strategy::Imlinkd | Strategy::ImlinkdDoubling => f.feed(
                            d,
                            t,
                            Input::ConnectionEnded(ConnEnd::Network {
                                kind: NetKind::Closed,
                                detail: "broker gone".into(),
                            }),
                        ),
                        _ => {
                            if f.online[d] {
                                f.online[d] = false;
                                let delay = f.retry_delay();
                                f.push(t + delay, Ev::Timer(d));
                            }
                        }
                    }
                }
            }
            Ev::Timer(d) => match strategy {
                Strategy::Imlinkd | Strategy::ImlinkdDoubling => {
                    if !started[d] {
                        started[d] = true;
                        f.feed(d, t, Input::Start);
                    } else {
                        if f.armed[d] != Some(t) {
                            continue; // stale
                        }
                        f.armed[d] = None;
                        f.machines[d].handle_timeout(Fleet::now(t));
                        f.run_actions(d, t);
                    }
                }
                _ => {
                    started[d] = true;
                    if !f.online[d] {
                        f.attempt(d, t);
                    }
                }
            },
            Ev::Answer(d, ok) => match strategy {
                Strategy::Imlinkd | Strategy::ImlinkdDoubling => {
                    let input = if ok {
                        Input::Connected {
                            session_present: true,
                        }
                    } else if f.broker_up(t - LATENCY) {
                        Input::ConnectionEnded(ConnEnd::Refused {
                            code: 0x9F,
                            reason: None,
                            im_code: None,
                        })
                    } else {
                        Input::ConnectionEnded(ConnEnd::Network {
                            kind: NetKind::Refused,
                            detail: "connection refused".into(),
                        })
                    };
                    f.feed(d, t, input);
                }
                _ => {
                    if ok {
                        f.online[d] = true;
                    } else {
                        let delay = f.retry_delay();
                        f.push(t + delay, Ev::Timer(d));
                    }
                }
            },
        }
    }
    // Nothing more happened: the rest of the window looks like its last moment.
    let online = (0..n).filter(|d| f.is_online(*d)).count() as u32;
    for s in f.seconds.iter_mut().skip(last_second_recorded) {
        s.online = online;
    }
    let back = cfg.outage_at + cfg.outage;
    let target = (n as f64 * 0.99).ceil() as u32;
    let to_99 = f
        .seconds
        .iter()
        .enumerate()
        .skip((cfg.outage / 1000) as usize)
        .find(|(_, s)| s.online >= target)
        .map(|(i, _)| (cfg.outage_at + i as Millis * 1000).saturating_sub(back));
    let peak = f
        .seconds
        .iter()
        .map(|s| s.accepted + s.refused)
        .max()
        .unwrap_or(0);
    let peak_after_return = f
        .seconds
        .iter()
        .skip((cfg.outage / 1000) as usize)
        .map(|s| s.accepted + s.refused)
        .max()
        .unwrap_or(0);
    let total = f
        .seconds
        .iter()
        .map(|s| u64::from(s.accepted + s.refused))
        .sum();
    StormReport {
        strategy,
        seconds: f.seconds,
        peak_attempts: peak,
        peak_after_return,
        total_attempts: total,
        to_99_percent: to_99,
        max_refused_per_device: f.refused_after_return.iter().copied().max().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_an_outage_the_engine_spreads_its_reconnects_and_everyone_gets_back() {
        let cfg = StormConfig {
            devices: 500,
            capacity: 25,
            horizon: 400_000,
            ..StormConfig::default()
        };
        let ours = run(&cfg, Strategy::Imlinkd);
        let naive = run(&cfg, Strategy::Naive);
        let fixed = run(&cfg, Strategy::Fixed1s);
        // Everyone is back, within the backoff cap and the capacity's pace.
        let t99 = ours.to_99_percent.expect("99 % back online");
        assert!(t99 <= 330_000, "{t99} ms");
        assert!(naive.to_99_percent.is_some() && fixed.to_99_percent.is_some());
        // The peak is a small fraction of the naive one, and nobody is refused many times.
        assert!(
            ours.peak_attempts * 10 <= naive.peak_attempts,
            "peak {} vs naive {}",
            ours.peak_attempts,
            naive.peak_attempts
        );
        assert!(
            ours.peak_after_return * 4 < fixed.peak_after_return,
            "after the return: {} vs fixed {}",
            ours.peak_after_return,
            fixed.peak_after_return
        );
        assert!(ours.total_attempts * 5 < fixed.total_attempts);
        assert!(
            ours.max_refused_per_device <= 8,
            "{} refusals for one device",
            ours.max_refused_per_device
        );
        assert!(naive.max_refused_per_device > 100);
    }

    #[test]
    fn the_outage_window_brings_the_fleet_back_within_twice_n_over_capacity_plus_10_s() {
        // N ÷ capacity = 20 s: the target is 99 % back within 50 s of the return.
        for outage in [30_000, 120_000, 300_000] {
            let cfg = StormConfig {
                devices: 500,
                capacity: 25,
                outage,
                horizon: outage + 400_000,
                ..StormConfig::default()
            };
            let ours = run(&cfg, Strategy::Imlinkd);
            let before = run(&cfg, Strategy::ImlinkdDoubling);
            let t99 = ours.to_99_percent.expect("99 % back online");
            let t99_before = before.to_99_percent.expect("99 % back online");
            assert!(t99 <= 50_000, "{outage} ms outage: {t99} ms");
            assert!(
                t99 * 3 / 2 < t99_before,
                "{t99} ms vs {t99_before} ms before"
            );
            // What it costs: more CONNECTs while the broker is away, at most about 2× the
            // plain doubling's for a 5-minute outage, and still few per device.
            assert!(
                ours.total_attempts <= before.total_attempts * 5 / 2,
                "{} vs {}",
                ours.total_attempts,
                before.total_attempts
            );
            assert!(ours.total_attempts <= 25 * cfg.devices as u64);
            assert!(ours.max_refused_per_device <= 3);
        }
    }
}
