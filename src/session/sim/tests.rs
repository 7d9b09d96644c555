//! The simulator in CI: a fixed range of seeds within a time budget, and every seed that
//! once broke an invariant (each a regression for a defect it found).

use std::time::{Duration, Instant};

use super::*;

/// Seeds run by `cargo test` (override with `IMLINKD_SIM_SEEDS`), and the wall-clock budget
/// they get (`IMLINKD_SIM_BUDGET_SECS`): on a slow machine fewer seeds run, never a timeout.
const CI_SEEDS: u64 = 3_000;
const CI_BUDGET: Duration = Duration::from_secs(90);

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

#[test]
fn every_invariant_holds_after_every_step_of_every_seed() {
    let n = env_u64("IMLINKD_SIM_SEEDS").unwrap_or(CI_SEEDS);
    let budget = env_u64("IMLINKD_SIM_BUDGET_SECS").map_or(CI_BUDGET, Duration::from_secs);
    let start = Instant::now();
    let cfg = SimConfig::default();
    match run_range(0, n, &cfg, || start.elapsed() > budget) {
        Ok((ran, r)) => {
            eprintln!(
                "simulator: {ran} seeds, {} steps, {:.0} virtual hours, {} CONNECTs, {} fetches, \
                 {} restarts, in {:.1} s",
                r.steps,
                r.virtual_ms as f64 / 3_600_000.0,
                r.connects,
                r.fetches,
                r.restarts,
                start.elapsed().as_secs_f64()
            );
            assert!(ran >= n.min(200), "only {ran} seeds ran within the budget");
        }
        Err(f) => panic!("{f}"),
    }
}

/// Seeds that broke an invariant of the engine while it was rebuilt, each for a real defect,
/// now fixed. (Seeds are tied to this version of the world model: if the model changes, keep
/// the fake-clock regression in `session/tests.rs`, which pins the same defect on its own.)
const REGRESSIONS: &[(u64, &str)] = &[
    (
        2,
        "2 s sigs: a planned reconnect every second (the refresh floor was 1 s)",
    ),
    (11, "a logout during connecting was never answered"),
    (
        60,
        "a background refresh failure cut a sig-expired backoff short",
    ),
    (
        14_528,
        "other failures in between reset the give-up count of a missing token",
    ),
];

#[test]
fn every_seed_that_once_broke_an_invariant_now_holds() {
    let cfg = SimConfig::default();
    for (seed, what) in REGRESSIONS {
        if let Err(f) = run_seed(*seed, &cfg) {
            panic!("regression ({what}):\n{f}");
        }
    }
}

#[test]
fn the_simulator_catches_a_reintroduced_loop() {
    // The checker must be able to fail: a world where every login is followed by
    // DISCONNECT 0x87, judged against an oracle that allows one fresh retry. Feed the
    // oracle what the landed engine did (a fresh fetch and CONNECT after every refusal).
    let policy = policy_for(0, false);
    let mut chk = check::Checker::new(policy, user("alice"));
    let snap = |deadline: Millis| crate::session::Snapshot {
        phase: crate::session::Phase::Online,
        login_status: 1,
        login_user: "alice".into(),
        user_id: "alice".into(),
        since_ms: 0,
        last_error: None,
        sig: Some(crate::session::SigStatus {
            fingerprint: "s".into(),
            expires_at: None,
            deadline_ms: Some(deadline),
            refresh_at_ms: None,
            refreshing: false,
        }),
        next_retry_ms: None,
        counters: Default::default(),
        last_event: None,
        via: None,
    };
    let mut t = 1_000;
    for _ in 0..3 {
        chk.attempt(t, false, false);
        chk.attempt(t + 10, true, false);
        chk.seen_end(check::Ended {
            t: t + 20,
            since: Some(t + 15),
            session: Some(t + 15),
            end: &crate::session::ConnEnd::ServerDisconnect {
                code: 0x87,
                reason: None,
                im_code: None,
            },
            mono: t + 20,
            snap: &snap(t + 3_600_000),
            in_use: "s",
        });
        t += 100;
    }
    let v = chk.take_violation().expect("the loop is caught");
    assert_eq!(v.invariant, "no loop: budgets", "{v:?}");
}
