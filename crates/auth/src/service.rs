//! One authorization request in, one reply out, sans I/O: decode the request, ask the
//! [`Rules`], sign the answer. Plus the two pieces of bookkeeping around it that must not
//! grow with load: the decision log's rate limit ([`DecisionLog`]) and the latency
//! statistics ([`Stats`]). Clocks are parameters (Unix seconds for the rules, milliseconds
//! of any monotonic clock for the bookkeeping), so all of it is tested on a fake clock.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::callout::{self, Request, RequestError};
use crate::nkeys::KeyPair;
use crate::rules::{Grant, Login, Refusal, Rules, Who};

/// What was decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted {
        expires_at: u64,
        key_slot: Option<usize>,
    },
    Refused(Refusal),
    /// Not answered: the request itself did not verify (nobody to address an answer to).
    Dropped(RequestError),
}

impl Verdict {
    /// A request over the payload cap, skipped unread ([`crate::proto::ServerOp::Oversized`]):
    /// dropped like one that does not verify (nothing to address an answer to).
    pub fn oversized(len: usize) -> Verdict {
        Verdict::Dropped(RequestError::Oversized(len))
    }

    /// A short stable name: `accepted`, the refusal code, or `dropped`.
    pub fn class(&self) -> String {
        match self {
            Verdict::Accepted { .. } => "accepted".into(),
            Verdict::Refused(r) => r.code.to_string(),
            Verdict::Dropped(_) => "dropped".into(),
        }
    }
}

/// One decision, for the log. Text from the request is the client's: quote it
/// ([`quote`]) before it reaches a log line.
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub username: String,
    pub client_id: String,
    pub node: String,
    /// `imlink_usersig::fingerprint` of the password (UserSigs only; never the sig itself).
    pub sig_fingerprint: Option<String>,
}

/// The signing side: rules, issuer, account.
pub struct Service {
    rules: Rules,
    issuer: KeyPair,
    account: String,
    skew: u64,
}

impl Service {
    pub fn new(rules: Rules, issuer: KeyPair, account: String, skew: Duration) -> Service {
        Service {
            rules,
            issuer,
            account,
            skew: skew.as_secs(),
        }
    }

    pub fn issuer(&self) -> &KeyPair {
        &self.issuer
    }

    /// Decide one request payload at Unix time `now`: the reply to publish (if any) and what
    /// to log.
    pub fn handle(&self, now: u64, payload: &[u8]) -> (Option<String>, Decision) {
        let req = match callout::decode_request(payload, now, self.skew) {
            Ok(r) => r,
            Err(e) => {
                return (
                    None,
                    Decision {
                        verdict: Verdict::Dropped(e),
                        username: String::new(),
                        client_id: String::new(),
                        node: String::new(),
                        sig_fingerprint: None,
                    },
                );
            }
        };
        let decided = self.rules.decide(
            now,
            &Login {
                client_type: &req.client_type,
                username: &req.username,
                password: &req.password,
                client_id: &req.mqtt_id,
            },
        );
        let fingerprint = match &decided {
            Ok(Grant {
                who: Who::Operator { .. },
                ..
            }) => None,
            _ if req.username.starts_with('@') => None,
            _ if req.password.is_empty() => None,
            _ => Some(imlink_usersig::fingerprint(req.password.expose())),
        };
        let (answer, verdict) = match decided {
            Ok(grant) => (
                Ok(callout::user_jwt(
                    &self.issuer,
                    &self.account,
                    &req.user_nkey,
                    &grant,
                    now,
                )),
                Verdict::Accepted {
                    expires_at: grant.expires_at,
                    key_slot: grant.key_slot,
                },
            ),
            Err(r) => (Err(r.text()), Verdict::Refused(r)),
        };
        let reply = callout::response(&self.issuer, &req, answer, now);
        let Request {
            username,
            mqtt_id,
            server_name,
            ..
        } = req;
        (
            Some(reply),
            Decision {
                verdict,
                username,
                client_id: mqtt_id,
                node: server_name,
                sig_fingerprint: fingerprint,
            },
        )
    }
}

/// Text from outside, ready for a log line: control characters, Unicode's line and
/// paragraph separators and the bidirectional controls dropped (as imlinkd's
/// `quote_external` does), at most 64 characters (an ellipsis says it was cut), in quotes
/// with `"` and `\` escaped.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(64) + 2);
    out.push('"');
    for (n, c) in s
        .chars()
        .filter(|c| !c.is_control() && !is_separator_or_bidi(*c))
        .enumerate()
    {
        if n == 64 {
            out.push('…');
            break;
        }
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Characters that break or reorder a line without being control characters.
fn is_separator_or_bidi(c: char) -> bool {
    matches!(
        c,
        '\u{2028}'
            | '\u{2029}'
            | '\u{061C}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// A token bucket for decision lines: `rate` per second on average, bursts of `burst`.
/// Decisions beyond it are counted by class and come out as one summary per interval.
#[derive(Debug)]
pub struct DecisionLog {
    rate_per_s: u32,
    burst: u32,
    /// Tokens, in thousandths (one line costs 1000).
    milli_tokens: u64,
    last_ms: u64,
    suppressed: BTreeMap<String, u64>,
    interval_ms: u64,
    next_summary_ms: u64,
}

impl DecisionLog {
    pub fn new(rate_per_s: u32, burst: u32, interval: Duration, now_ms: u64) -> DecisionLog {
        let interval_ms = interval.as_millis().max(1) as u64;
        DecisionLog {
            rate_per_s,
            burst,
            milli_tokens: u64::from(burst) * 1000,
            last_ms: now_ms,
            suppressed: BTreeMap::new(),
            interval_ms,
            next_summary_ms: now_ms + interval_ms,
        }
    }

    /// Whether this decision gets its own line; if not, it is counted under `class`.
    pub fn admit(&mut self, now_ms: u64, class: &str) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.milli_tokens = (self.milli_tokens + elapsed * u64::from(self.rate_per_s))
            .min(u64::from(self.burst) * 1000);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            *self.suppressed.entry(class.to_string()).or_default() += 1;
            false
        }
    }

    /// When the next summary could be due (for the driver's timer).
    pub fn next_summary_ms(&self) -> u64 {
        self.next_summary_ms
    }

    /// The counts not logged since the last summary, once per interval, if any.
    pub fn summary(&mut self, now_ms: u64) -> Option<BTreeMap<String, u64>> {
        if now_ms < self.next_summary_ms {
            return None;
        }
        self.next_summary_ms = now_ms.saturating_add(self.interval_ms);
        if self.suppressed.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.suppressed))
        }
    }
}

/// The bookkeeping of every request, whatever became of it — decided by the [`Service`], or
/// dropped unread over the size cap: it is counted in the [`Stats`], and it gets a log line
/// of its own only when the [`DecisionLog`] admits it, so a storm of either kind is
/// summarised, never logged line by line.
#[derive(Debug)]
pub struct Ledger {
    pub log: DecisionLog,
    pub stats: Stats,
}

impl Ledger {
    pub fn new(log: DecisionLog) -> Ledger {
        Ledger {
            log,
            stats: Stats::default(),
        }
    }

    /// Count `verdict` (which took `took`); whether it gets a log line of its own.
    pub fn record(&mut self, now_ms: u64, verdict: &Verdict, took: Duration) -> bool {
        self.stats.record(verdict, took);
        self.log.admit(now_ms, &verdict.class())
    }
}

/// Time spent per request, as a histogram with ~3 % resolution (fixed size, whatever the
/// load): exact below 64 µs, then 32 buckets per power of two.
#[derive(Debug, Clone)]
pub struct Stats {
    counts: Vec<u64>,
    pub total: u64,
    pub accepted: u64,
    pub refused: u64,
    pub dropped: u64,
    pub max_us: u64,
}

const LINEAR: u64 = 64;
const SUB_BUCKETS: u64 = 32;

fn bucket(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let e = 63 - u64::from(us.leading_zeros()); // ≥ 6
    let m = (us >> (e - 5)) & (SUB_BUCKETS - 1);
    (LINEAR + (e - 6) * SUB_BUCKETS + m) as usize
}

/// The upper bound of a bucket, in µs.
fn bucket_top(i: usize) -> u64 {
    let i = i as u64;
    if i < LINEAR {
        return i;
    }
    let e = (i - LINEAR) / SUB_BUCKETS + 6;
    let m = (i - LINEAR) % SUB_BUCKETS;
    let top = (u128::from(SUB_BUCKETS + m + 1) << (e - 5)) - 1;
    top.min(u128::from(u64::MAX)) as u64
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            counts: vec![0; bucket(u64::MAX) + 1],
            total: 0,
            accepted: 0,
            refused: 0,
            dropped: 0,
            max_us: 0,
        }
    }
}

impl Stats {
    pub fn record(&mut self, verdict: &Verdict, took: Duration) {
        let us = took.as_micros().min(u128::from(u64::MAX)) as u64;
        self.counts[bucket(us)] += 1;
        self.total += 1;
        self.max_us = self.max_us.max(us);
        match verdict {
            Verdict::Accepted { .. } => self.accepted += 1,
            Verdict::Refused(_) => self.refused += 1,
            Verdict::Dropped(_) => self.dropped += 1,
        }
    }

    /// The `q` quantile (0..=1) in µs (a bucket's upper bound), 0 with no data.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_top(i).min(self.max_us);
            }
        }
        self.max_us
    }

    /// The stats line's fields.
    pub fn line(&self) -> String {
        format!(
            "requests={} accepted={} refused={} dropped={} decide_p50_us={} decide_p99_us={} decide_max_us={}",
            self.total,
            self.accepted,
            self.refused,
            self.dropped,
            self.quantile_us(0.5),
            self.quantile_us(0.99),
            self.max_us
        )
    }
}

/// Reconnect delays: from `min`, doubling up to `max`, each drawn in [d/2, d] (jitter, so
/// instances that lost the same node do not come back in step). Seeded: tests replay it.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
            rng: seed | 1,
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The delay before the next attempt, after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        let d = self.min.saturating_mul(factor).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = d / 2;
        let span = (d - half).as_micros() as u64;
        let jitter = if span == 0 {
            0
        } else {
            self.next_random() % (span + 1)
        };
        half + Duration::from_micros(jitter)
    }

    /// A connection worked: the next failure starts from `min` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// A random index below `n` (the first node to try).
    pub fn pick(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_random() % n as u64) as usize
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nkeys::Kind;
    use crate::rules::{App, Operator};
    use crate::secret::Secret;

    const NOW: u64 = 1_800_000_000;

    fn service() -> Service {
        let k = Rules::new_operator_key().unwrap();
        let mut ops = BTreeMap::new();
        ops.insert(
            "monitor".to_string(),
            Operator::new(1400000000, &Secret::new("0123456789abcdef".into()), &k),
        );
        Service::new(
            Rules::new(
                vec![App {
                    sdk_app_id: 1400000000,
                    keys: vec![Secret::new("key".into())],
                }],
                ops,
                k,
                30,
                3600,
            ),
            KeyPair::from_raw_seed(Kind::Account, [3u8; 32]),
            "APP".into(),
            Duration::from_secs(30),
        )
    }

    fn request(user: &str, password: &str, cid: &str) -> String {
        let server = KeyPair::from_raw_seed(Kind::Server, [1u8; 32]);
        let unk = KeyPair::from_raw_seed(Kind::User, [2u8; 32]);
        callout::request_jwt(&server, unk.public(), "mqtt", user, password, cid, NOW)
    }

    #[test]
    fn a_request_gets_a_signed_reply_and_a_decision() {
        let s = service();
        let sig = imlink_usersig::generate(&imlink_usersig::SigParams {
            sdk_app_id: 1400000000,
            secret_key: "key",
            identifier: "alice",
            time: NOW,
            expire: 60,
            userbuf: None,
        });
        let (reply, d) = s.handle(
            NOW,
            request("alice", &sig, "1400000000:alice:linux:0").as_bytes(),
        );
        assert_eq!(
            d.verdict,
            Verdict::Accepted {
                expires_at: NOW + 60,
                key_slot: Some(0)
            }
        );
        assert_eq!(d.username, "alice");
        assert_eq!(d.node, "n1");
        assert_eq!(d.sig_fingerprint, Some(imlink_usersig::fingerprint(&sig)));
        let r: crate::jwt::Verified<callout::ResponseNats> =
            crate::jwt::decode(&reply.unwrap()).unwrap();
        assert!(!r.nats.jwt.is_empty());
        // Nothing of the sig in the decision.
        assert!(!format!("{d:?}").contains(&sig));

        let (reply, d) = s.handle(
            NOW,
            request("alice", "garbage", "1400000000:alice:linux:0").as_bytes(),
        );
        assert_eq!(d.verdict.class(), "70003");
        let r: crate::jwt::Verified<callout::ResponseNats> =
            crate::jwt::decode(&reply.unwrap()).unwrap();
        assert_eq!(r.nats.error, "70003 UserSig is malformed");

        // An operator: no fingerprint of its secret.
        let (_, d) = s.handle(
            NOW,
            request("@monitor", "0123456789abcdef", "1400000000:@monitor:web:1").as_bytes(),
        );
        assert_eq!(d.verdict.class(), "accepted");
        assert_eq!(d.sig_fingerprint, None);

        let (reply, d) = s.handle(NOW, b"not a jwt");
        assert!(reply.is_none());
        assert_eq!(d.verdict.class(), "dropped");
    }

    #[test]
    fn quote_strips_and_caps() {
        assert_eq!(quote("a\"b\\c\r\nd"), "\"a\\\"b\\\\cd\"");
        let q = quote(&"x".repeat(100));
        assert!(q.ends_with("…\"") && q.chars().count() == 64 + 3);
    }

    #[test]
    fn quote_drops_line_separators_and_bidirectional_controls() {
        // A username or client id is the client's choice: U+202E would show the rest of
        // the decision line (the code, the reason) reversed to whoever reads the log; U+2028
        // and U+2029 break the line for many viewers.
        let q = quote("mal\u{202e}lory\u{2028}x\u{2029}y\u{200f}\u{2066}\u{61c}z\u{85}");
        assert_eq!(q, "\"malloryxyz\"");
    }

    #[test]
    fn a_storm_of_decisions_is_summarised_not_logged_line_by_line() {
        let mut l = DecisionLog::new(20, 100, Duration::from_secs(10), 0);
        // 10,000 decisions in one second: the burst of 100 is logged, plus 20 refilled.
        let mut logged = 0;
        for i in 0..10_000u64 {
            if l.admit(i / 10, if i % 2 == 0 { "accepted" } else { "70009" }) {
                logged += 1;
            }
        }
        assert_eq!(logged, 100 + 19);
        assert_eq!(l.summary(5_000), None, "not before the interval");
        let s = l.summary(10_000).unwrap();
        assert_eq!(s.values().sum::<u64>(), 10_000 - logged);
        assert_eq!(s.len(), 2);
        assert_eq!(l.summary(20_000), None, "nothing suppressed since");
        // A quiet second later, lines come one by one again.
        assert!(l.admit(30_000, "accepted"));
        // Steady state: 20 per second are logged.
        let mut l = DecisionLog::new(20, 20, Duration::from_secs(10), 0);
        let mut logged = 0;
        for ms in 0..60_000u64 {
            if l.admit(ms, "accepted") {
                logged += 1;
            }
        }
        assert!((1200..=1221).contains(&logged), "{logged}");
    }

    /// 150 requests over the size cap in one instant (a CONNECT with a 65,000-byte
    /// password each) are dropped, counted and summarised like any other storm: the burst
    /// gets lines, the rest one summary, and the stats line says dropped=150.
    #[test]
    fn requests_over_the_size_cap_are_counted_and_rate_limited() {
        let mut l = Ledger::new(DecisionLog::new(20, 10, Duration::from_secs(10), 0));
        let v = Verdict::oversized(65_000 + 600);
        assert_eq!(v.class(), "dropped");
        let Verdict::Dropped(e) = &v else {
            panic!("{v:?}")
        };
        assert!(e.to_string().contains("over the size cap"), "{e}");
        let logged = (0..150).filter(|_| l.record(0, &v, Duration::ZERO)).count();
        assert_eq!(logged, 10, "the burst, no more");
        assert!(
            l.stats
                .line()
                .contains("requests=150 accepted=0 refused=0 dropped=150")
        );
        let s = l.log.summary(10_000).unwrap();
        assert_eq!(s.get("dropped"), Some(&140));
    }

    #[test]
    fn stats_quantiles_are_within_their_resolution() {
        let mut s = Stats::default();
        for us in 1..=10_000u64 {
            s.record(
                &Verdict::Accepted {
                    expires_at: 0,
                    key_slot: None,
                },
                Duration::from_micros(us),
            );
        }
        let p50 = s.quantile_us(0.5);
        let p99 = s.quantile_us(0.99);
        assert!((5000..=5000 * 103 / 100).contains(&p50), "{p50}");
        assert!((9900..=10_000).contains(&p99), "{p99}");
        assert_eq!(s.max_us, 10_000);
        assert_eq!(s.quantile_us(1.0), 10_000);
        assert!(s.line().contains("requests=10000 accepted=10000"));
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1000, 1 << 40, u64::MAX] {
            let b = bucket(v);
            assert!(bucket_top(b) >= v, "{v}");
            if b > 0 {
                assert!(bucket_top(b - 1) < v, "{v}");
            }
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 7);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let full = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(5));
            assert!(*d >= full / 2 && *d <= full, "{i}: {d:?}");
        }
        assert!(delays[9] >= Duration::from_millis(2500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Two instances seeded differently do not step together.
        let mut a = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 1);
        let mut c = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), 2);
        let same = (0..10).filter(|_| a.next_delay() == c.next_delay()).count();
        assert!(same < 3);
        assert!(b.pick(3) < 3);
    }
}
