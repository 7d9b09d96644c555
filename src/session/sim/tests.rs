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
