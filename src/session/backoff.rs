//! Exponential backoff with full jitter, and the small deterministic RNG that draws it.
//!
//! The RNG is seeded by the driver (from the OS) and by tests (fixed), so every policy can be
//! replayed exactly on a fake clock.

use super::model::Millis;

/// SplitMix64: tiny, fast, good enough for jitter (not for secrets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability 1/`n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next_u64().is_multiple_of(n.max(1))
    }

    /// Uniform in `lo..=hi` (returns `lo` when `hi <= lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// First ceiling (default 1 s).
    pub base: Millis,
    /// Largest ceiling (default 5 min).
    pub cap: Millis,
    /// A session must stay online this long before the backoff starts over (default 5 min).
    pub reset_after: Millis,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: 1_000,
            cap: 300_000,
            reset_after: 300_000,
        }
    }
}

/// Attempt counter for one kind of retry.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The ceiling of the next delay: `min(cap, base · 2^attempt)`.
    pub fn ceiling(&self, p: &BackoffPolicy) -> Millis {
        let factor = 1u64.checked_shl(self.attempt.min(40)).unwrap_or(u64::MAX);
        p.base.saturating_mul(factor).min(p.cap).max(1)
    }

    /// Draw the next delay (full jitter in `[floor, ceiling]`, floor = base/10 so even the
    /// luckiest draw is never a tight loop) and count the attempt.
    pub fn next(&mut self, p: &BackoffPolicy, rng: &mut Rng) -> Millis {
        self.next_within(p, rng, Millis::MAX)
    }

    /// [`Backoff::next`] with the ceiling also held at or under `limit` (never under `base`):
    /// the session's outage window. The jitter stays full (`[base/10, ceiling]`) and the
    /// attempt is counted as usual, so once the limit no longer binds the ceiling is where the
    /// doubling would have brought it.
    pub fn next_within(&mut self, p: &BackoffPolicy, rng: &mut Rng, limit: Millis) -> Millis {
        let ceiling = self.ceiling(p).min(limit.max(p.base));
        let floor = (p.base / 10).min(ceiling);
        self.attempt = self.attempt.saturating_add(1);
        rng.range(floor, ceiling)
    }

    /// Count an attempt that went without a delay (the first of a series).
    pub fn count(&mut self) {
        self.attempt = self.attempt.saturating_add(1);
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let p = BackoffPolicy::default();
        let mut b = Backoff::default();
        let mut rng = Rng::new(1);
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(b.ceiling(&p));
            let d = b.next(&p, &mut rng);
            assert!(d >= 100 && d <= *ceilings.last().unwrap(), "{d}");
        }
        assert_eq!(
            &ceilings[..10],
            &[
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000
            ]
        );
        assert_eq!(ceilings[11], 300_000);
        b.reset();
        assert_eq!(b.ceiling(&p), 1_000);
    }

    #[test]
    fn jitter_spreads_over_the_whole_window() {
        let p = BackoffPolicy {
            base: 10_000,
            ..BackoffPolicy::default()
        };
        let mut rng = Rng::new(42);
        let draws: Vec<u64> = (0..2000)
            .map(|_| Backoff::default().next(&p, &mut rng))
            .collect();
        let lo = draws.iter().filter(|d| **d < 4_000).count();
        let hi = draws.iter().filter(|d| **d > 7_000).count();
        assert!(lo > 400 && hi > 400, "lo {lo}, hi {hi}");
        assert!(draws.iter().all(|d| (1_000..=10_000).contains(d)));
    }

    #[test]
    fn a_limit_holds_the_ceiling_but_keeps_the_jitter_full_and_counts_the_attempt() {
        let p = BackoffPolicy::default();
        let mut b = Backoff { attempt: 20 };
        let mut rng = Rng::new(3);
        let draws: Vec<u64> = (0..2000)
            .map(|_| b.next_within(&p, &mut rng, 40_000))
            .collect();
        assert!(draws.iter().all(|d| (100..=40_000).contains(d)));
        assert!(draws.iter().any(|d| *d < 4_000) && draws.iter().any(|d| *d > 36_000));
        assert_eq!(b.attempts(), 2020);
        // Never under the base, and a limit above the doubling changes nothing.
        let mut short = Backoff::default();
        assert!(short.next_within(&p, &mut rng, 10) <= 1_000);
        let (mut x, mut y) = (Backoff { attempt: 3 }, Backoff { attempt: 3 });
        let (mut r1, mut r2) = (Rng::new(9), Rng::new(9));
        assert_eq!(
            x.next_within(&p, &mut r1, 40_000),
            y.next(&p, &mut r2),
            "the same draw when the limit does not bind"
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = BackoffPolicy::default();
        let mut b = Backoff { attempt: u32::MAX };
        assert_eq!(b.ceiling(&p), 300_000);
        let _ = b.next(&p, &mut Rng::new(0));
    }
}
