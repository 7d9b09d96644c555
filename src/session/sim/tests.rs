//! The simulator in CI: a fixed range of seeds within a time budget, and every seed that
//! once broke an invariant (each a regression for a defect it found).

use std::time::{Duration, Instant};

use super::*;

/// Seeds run by `cargo test` (override with `IMLINKD_SIM_SEEDS`), and the wall-clock budget
/// they get (`IMLINKD_SIM_BUDGET_SECS`): on a slow machine fewer seeds run, never a timeout.
const CI_SEEDS: u64 = 1_000;
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
                 {} restarts, {} peer messages ({} committed), {} sends ({} accepted), {} \
                 SUBSCRIBE faults, delivery judged at {} ends, in {:.1} s",
                r.steps,
                r.virtual_ms as f64 / 3_600_000.0,
                r.connects,
                r.fetches,
                r.restarts,
                r.messages.peer_messages,
                r.messages.committed,
                r.messages.device_sends,
                r.messages.accepted,
                r.subscribe_faults,
                r.delivery_checked,
                start.elapsed().as_secs_f64()
            );
            assert!(
                r.delivery_checked >= ran / 2,
                "delivery judged at only {} of {ran} ends",
                r.delivery_checked
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
    (
        1_000_000_076_692,
        "1-2 s sigs: every renewal a genuine expiry, a login every 3-6 s (no budget applied)",
    ),
    (
        15_801_999_086_997_842_518,
        "1-2 s sigs: a login every few seconds, 89 attempts in 10 min against a bound of 88",
    ),
    (
        17_337_918_024_001_990_801,
        "1-2 s sigs: a login every few seconds after every local reset of the budgets",
    ),
    (
        49_005,
        "provisioning handed back the sig the broker had just ended as expired, with a Date \
         2 h behind: connected with it again",
    ),
    (
        1_501_732_434_815_205_619,
        "an operator's login during a backoff, long after a fresh-sig retry that never became \
         stable: the sig in hand refused, and the engine stopped without a fresh UserSig",
    ),
    (
        11_944_901_725_755_262_090,
        "a local login kept a redirect pending from before it, followed uncounted: 4 redirects \
         in a row without a CONNACK",
    ),
    (
        17_187_273_270_013_559_447,
        "an account switch kept the old user's stability timer: it fired 37 s into the new \
         session and restored every budget",
    ),
    (
        26_106,
        "2 s sigs on a 3.1.1 cluster with node deaths: a fetch, CONNECT and CONNACK every 3 s",
    ),
    // The simulator over the engine (messaging): the courier's retries of failed commits.
    (
        134,
        "a received message whose commit failed was retried on its own backoff, after a later \
         message of the same peer had been committed (per-peer order broken)",
    ),
    (
        3_062,
        "the same defect in another world (a message retried alone, overtaken by a later one \
         of its peer)",
    ),
    (
        4_718,
        "retries sent together but ahead of an earlier message whose refusal was still on its \
         way: the later ones committed first",
    ),
    (
        1_637_990_106_571_519_856,
        "the checker's own: SUBSCRIBEs refused until the world turned healthy were judged from \
         the start of the subscribing phase (the healthy world clears the refusal)",
    ),
    (
        4_961_303_430_634_913_789,
        "the checker's own: a 0x87 heard, its record not committed (the store failing), then a \
         restart: the message went out once more, as the courier documents",
    ),
    (
        1_377_406_660_321_233_226,
        "an operator's login during a CONNECT (answered 7501) did not earn the fresh UserSig \
         after a refusal: the CONNECT was refused 0x86 and the engine stopped",
    ),
    (
        10_909_655_308_720_993_941,
        "the checker's own: a close 5 s after a publish (a 5 s suspend) is a stalled broker's \
         (engine::STALLED_AFTER), not an early close toward a suspected takeover: the oracle \
         did not know the rule and asked for the takeover cool-down",
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
    // DISCONNECT 0x87, judged against an oracle that allows one fresh retry (then one fresh
    // try per cool-down). Feed the oracle what the landed engine did (a fresh fetch and
    // CONNECT after every refusal).
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
        renewal_failures: 0,
        inbox_subscribed: true,
        next_subscribe_ms: None,
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
    // After the rejection budget the policy allows one fresh try per (long) cool-down.
    assert_eq!(v.invariant, "no loop: pacing", "{v:?}");
    assert!(
        v.detail.contains("cool-down after the rejection budget"),
        "{v:?}"
    );
}

#[test]
fn the_simulator_catches_a_steady_login_every_few_seconds_whatever_the_budgets() {
    // The storm that 1-2 s sigs caused: a fetch, a CONNECT and a CONNACK every 4 s, each
    // renewal a genuine expiry (so no budget applies), under the most generous policy the
    // simulator draws (a 10 s backoff cap, the largest budgets). The login rate breaks.
    let mut policy = policy_for(0, false);
    policy.backoff.base = 100;
    policy.backoff.cap = 10_000;
    policy.sig_expired_budget = 5;
    policy.takeover_closes = 3;
    let mut chk = check::Checker::new(policy, user("alice"));
    let mut t = 1_000;
    let mut n = 0;
    while chk.take_violation().is_none() {
        chk.attempt(t, false, false);
        chk.seen(t + 100, check::Seen::FetchOk, true);
        chk.attempt(t + 200, true, false);
        chk.seen(t + 300, check::Seen::Connack, true);
        t += 4_000;
        n += 1;
        assert!(n < 60, "a login every 4 s for {n} rounds went unnoticed");
    }
    assert!(n <= 31, "{n}");
    let mut chk2 = check::Checker::new(policy_for(0, false), user("alice"));
    let mut t = 1_000;
    for _ in 0..40 {
        // Even one every 19 s breaks it: at most 30 per 10 minutes.
        chk2.seen(t, check::Seen::Connack, true);
        t += 19_000;
    }
    let v = chk2.take_violation().expect("a login every 19 s breaks it");
    assert_eq!(v.invariant, "no loop: rate", "{v:?}");
}
