//! The session machine on a fake clock: every row of brief §3.2, the budgets, the backoff
//! and its reset window, the UserSig lifecycle, and the local requests.

use super::*;

const WALL0: i64 = 2_000_000_000;

struct H {
    m: Machine,
    now: Now,
    next_fp: u32,
}

fn alice() -> UserId {
    UserId::parse("alice").unwrap()
}

fn bob() -> UserId {
    UserId::parse("bob").unwrap()
}

impl H {
    fn new(policy: Policy) -> H {
        let now = Now {
            mono: 1_000,
            wall: WALL0,
        };
        H {
            m: Machine::new(policy, alice(), now, 7),
            now,
            next_fp: 0,
        }
    }

    fn started() -> H {
        let mut h = H::new(Policy::default());
        h.input(Input::Start);
        h
    }

    /// Feed `i`. A CONNACK is followed by the broker granting the inbox subscription at
    /// once (what a healthy broker does; `input_raw` leaves the SUBACK to the test).
    fn input(&mut self, i: Input) -> Vec<Action> {
        let connack = matches!(i, Input::Connected { .. });
        let mut out = self.input_raw(i);
        if connack && out.iter().any(|a| matches!(a, Action::Subscribe { .. })) {
            out.extend(self.input_raw(Input::SubAck { granted: true }));
        }
        out
    }

    fn input_raw(&mut self, i: Input) -> Vec<Action> {
        self.m.handle(self.now, i);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.m.poll_action()).collect()
    }

    /// Move the clock forward by `ms`, firing every timer that falls due on the way (at its
    /// own time), and return all the actions.
    fn advance(&mut self, ms: u64) -> Vec<Action> {
        let end = self.now.mono + ms;
        let mut out = Vec::new();
        while let Some(t) = self.m.poll_timeout().filter(|t| *t <= end) {
            let t = t.max(self.now.mono);
            self.now.wall += ((t - self.now.mono) / 1000) as i64;
            self.now.mono = t;
            self.m.handle_timeout(self.now);
            out.extend(self.drain());
        }
        self.now.wall += ((end - self.now.mono) / 1000) as i64;
        self.now.mono = end;
        out
    }

    /// Move the clock forward timer by timer until an action matching `pred` comes out (at
    /// most `max` ms); returns every action on the way.
    fn advance_until(&mut self, max: u64, pred: impl Fn(&Action) -> bool) -> Vec<Action> {
        let end = self.now.mono + max;
        let mut out = Vec::new();
        while let Some(t) = self.m.poll_timeout().filter(|t| *t <= end) {
            let t = t.max(self.now.mono);
            self.now.wall += ((t - self.now.mono) / 1000) as i64;
            self.now.mono = t;
            self.m.handle_timeout(self.now);
            out.extend(self.drain());
            if out.iter().any(&pred) {
                return out;
            }
        }
        panic!("no such action within {max} ms; got {out:?}");
    }

    fn advance_to_fetch(&mut self, max: u64) -> Vec<Action> {
        self.advance_until(max, |a| matches!(a, Action::FetchSig { .. }))
    }

    fn advance_to_connect(&mut self, max: u64) -> Vec<Action> {
        self.advance_until(max, |a| matches!(a, Action::Connect { .. }))
    }

    /// A sig for `user` issued now (server clock = local wall), valid `lifetime_s`.
    fn sig_for(&mut self, user: UserId, lifetime_s: i64) -> SigInfo {
        self.next_fp += 1;
        SigInfo {
            fingerprint: format!("fp{}", self.next_fp),
            user_id: user,
            issued_at: Some(self.now.wall),
            expires_at: Some(self.now.wall + lifetime_s),
            server_now: self.now.wall,
            received_at: self.now.mono,
            wall_anchored: false,
        }
    }

    fn sig(&mut self, lifetime_s: i64) -> SigInfo {
        self.sig_for(alice(), lifetime_s)
    }

    /// Start → fetch → connect → online, with a sig of `lifetime_s`.
    fn online(lifetime_s: i64) -> H {
        let mut h = H::started();
        let s = h.sig(lifetime_s);
        h.input(Input::SigFetched(s));
        h.input(Input::Connected {
            session_present: false,
        });
        assert_eq!(h.m.phase(), Phase::Online);
        h
    }

    fn phase(&self) -> Phase {
        self.m.phase()
    }

    fn last_error(&self) -> LastError {
        self.m.snapshot().last_error.expect("a last_error")
    }

    fn retry_in(&self) -> u64 {
        self.m
            .snapshot()
            .next_retry_ms
            .expect("a retry is scheduled")
            - self.now.mono
    }
}

fn fetches(a: &[Action]) -> usize {
    a.iter()
        .filter(|a| matches!(a, Action::FetchSig { .. }))
        .count()
}

fn connects(a: &[Action]) -> Vec<String> {
    a.iter()
        .filter_map(|a| match a {
            Action::Connect { fingerprint, .. } => Some(fingerprint.clone()),
            _ => None,
        })
        .collect()
}

fn events(a: &[Action]) -> Vec<&'static str> {
    a.iter()
        .filter_map(|a| match a {
            Action::Emit(e) => Some(e.name()),
            _ => None,
        })
        .collect()
}

fn has(a: &[Action], want: &Action) -> bool {
    a.iter().any(|x| x == want)
}

fn network_closed() -> Input {
    Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Closed,
        detail: "connection closed by peer".into(),
    })
}

fn refused(code: u8) -> Input {
    Input::ConnectionEnded(ConnEnd::Refused {
        code,
        reason: None,
        im_code: None,
    })
}

/// A DISCONNECT as the reference service sends it: the reason string `"<code> <text>"` and the
/// same code as the `im-error-code` user property (which the relay hands over typed).
fn server_disconnect(code: u8, reason: &str) -> Input {
    Input::ConnectionEnded(ConnEnd::ServerDisconnect {
        code,
        reason: Some(reason.into()),
        im_code: im_code_of(reason),
    })
}

fn im_code_of(reason: &str) -> Option<u32> {
    reason.split(' ').next().and_then(|c| c.parse().ok())
}

// --- the happy path ---------------------------------------------------------------------------

#[test]
fn start_fetches_a_sig_then_connects_then_is_online() {
    let mut h = H::new(Policy::default());
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    let a = h.input(Input::Start);
    assert_eq!(fetches(&a), 1);
    assert_eq!(h.phase(), Phase::FetchingSig);
    assert_eq!(h.m.login_status(), login_status::LOGINING);
    let s = h.sig(3600);
    let a = h.input(Input::SigFetched(s));
    assert!(has(
        &a,
        &Action::PersistSig {
            user: alice(),
            fingerprint: "fp1".into()
        }
    ));
    assert_eq!(connects(&a), ["fp1"]);
    assert_eq!(h.phase(), Phase::Connecting);
    assert_eq!(h.m.login_user(), "", "not logged in until CONNACK");
    let a = h.input(Input::Connected {
        session_present: false,
    });
    // Logged in at the CONNACK (phase `subscribing`), online once the inbox is subscribed.
    assert_eq!(
        events(&a),
        ["connect_success", "state_changed", "state_changed"]
    );
    assert_eq!(h.phase(), Phase::Online);
    assert_eq!(h.m.login_status(), login_status::LOGINED);
    assert_eq!(h.m.login_user(), "alice");
    assert_eq!(h.m.snapshot().counters.logins, 1);
}

#[test]
fn login_on_start_false_waits_for_a_local_login() {
    let mut h = H::new(Policy {
        login_on_start: false,
        ..Policy::default()
    });
    let a = h.input(Input::Start);
    assert!(a.iter().all(|a| matches!(a, Action::Emit(_))));
    assert_eq!(h.phase(), Phase::Idle);
    assert!(
        h.advance(3_600_000).is_empty(),
        "nothing happens on its own"
    );
    let a = h.input(Input::Login {
        id: 1,
        user: None,
        sig: None,
    });
    assert_eq!(fetches(&a), 1);
}

#[test]
fn a_valid_cached_sig_logs_in_without_fetching() {
    let mut h = H::new(Policy::default());
    let s = h.sig(3600);
    h.input(Input::CachedSig(s));
    let a = h.input(Input::Start);
    assert_eq!(fetches(&a), 0);
    assert_eq!(connects(&a), ["fp1"]);
}

#[test]
fn a_cached_sig_for_another_user_is_ignored() {
    let mut h = H::new(Policy::default());
    let s = h.sig_for(bob(), 3600);
    h.input(Input::CachedSig(s));
    assert_eq!(fetches(&h.input(Input::Start)), 1);
}

#[test]
fn an_expired_sig_is_never_sent_6206_then_a_fresh_one_is_fetched() {
    let mut h = H::new(Policy::default());
    let mut s = h.sig(3600);
    s.server_now = s.expires_at.unwrap() + 5; // loaded after it expired
    h.input(Input::CachedSig(s));
    let a = h.input(Input::Start);
    assert!(connects(&a).is_empty(), "never sent");
    assert!(events(&a).contains(&"user_sig_expired"));
    assert!(a.contains(&Action::Emit(Event::UserSigExpired { code: 6206 })));
    assert!(has(&a, &Action::ForgetSig));
    assert_eq!(fetches(&a), 1);
}

// --- network class -----------------------------------------------------------------------------

#[test]
fn a_network_drop_reconnects_with_the_same_sig_and_no_fetch() {
    let mut h = H::online(86400);
    h.advance(60_000);
    let a = h.input(network_closed());
    assert_eq!(fetches(&a), 0);
    assert_eq!(h.phase(), Phase::Backoff);
    assert_eq!(
        h.m.login_status(),
        login_status::LOGINED,
        "the SDK stays logged in"
    );
    assert_eq!(h.m.login_user(), "alice");
    let delay = h.retry_in();
    assert!((100..=1_000).contains(&delay), "{delay}");
    assert!(h.advance(delay - 1).is_empty(), "never before the delay");
    let a = h.advance(1);
    assert_eq!(connects(&a), ["fp1"], "same UserSig");
    assert_eq!(fetches(&a), 0, "no provisioning call");
}

#[test]
fn connect_errors_back_off_exponentially_with_jitter_up_to_the_cap() {
    let mut h = H::online(10 * 86400);
    h.input(network_closed());
    let mut ceilings_hit = Vec::new();
    for i in 0..12u32 {
        let delay = h.retry_in();
        let ceiling = (1_000u64 << i).min(300_000);
        assert!(
            delay >= 100 && delay <= ceiling,
            "attempt {i}: {delay} > {ceiling}"
        );
        ceilings_hit.push(delay);
        let a = h.advance(delay);
        assert_eq!(connects(&a).len(), 1);
        h.input(Input::ConnectionEnded(ConnEnd::Network {
            kind: NetKind::Refused,
            detail: "connection refused".into(),
        }));
        assert_eq!(h.last_error().code, 9511);
        assert_eq!(h.last_error().class, ErrorClass::Network);
    }
    // Jittered: not all equal to their ceiling.
    assert!(ceilings_hit.windows(2).any(|w| w[0] * 2 != w[1]));
}

#[test]
fn backoff_resets_only_after_staying_online_for_the_reset_window() {
    let mut h = H::online(10 * 86400);
    // Drop, then fail four times: five draws so far.
    h.input(network_closed());
    for _ in 0..4 {
        let d = h.retry_in();
        h.advance(d);
        h.input(refused(0x88));
    }
    assert_eq!(h.m.connect_backoff.attempts(), 5);
    let d = h.retry_in();
    h.advance(d);
    // Online for one minute only: the backoff does not start over.
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(60_000);
    h.input(network_closed());
    assert_eq!(
        h.m.connect_backoff.attempts(),
        6,
        "no reset after 1 min online"
    );
    assert!(h.retry_in() <= 64_000);
    // Online for the whole 5-minute window: it starts over.
    let d = h.retry_in();
    h.advance(d);
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(299_999);
    assert_eq!(h.m.connect_backoff.attempts(), 6);
    h.advance(1);
    assert_eq!(h.m.connect_backoff.attempts(), 0, "reset at exactly 5 min");
    h.input(network_closed());
    assert!(h.retry_in() <= 1_000);
}

#[test]
fn dns_and_timeout_failures_report_their_sdk_codes() {
    for (kind, code) in [
        (NetKind::Dns, 9516),
        (NetKind::Timeout, 9510),
        (NetKind::Refused, 9511),
        (NetKind::Tls, 9508),
    ] {
        let mut h = H::started();
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        let a = h.input(Input::ConnectionEnded(ConnEnd::Network {
            kind,
            detail: "x".into(),
        }));
        assert!(a.iter().any(|a| matches!(a, Action::Emit(Event::ConnectFailed { code: c, class: ErrorClass::Network, .. }) if *c == code)));
        assert_eq!(h.phase(), Phase::Backoff);
    }
}

// --- busy class ----------------------------------------------------------------------------------

#[test]
fn busy_refusals_back_off_with_the_same_sig() {
    for code in [0x88u8, 0x89, 0x9F] {
        let mut h = H::started();
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        let a = h.input(refused(code));
        assert_eq!(fetches(&a), 0);
        assert_eq!(h.last_error().class, ErrorClass::Busy);
        let d = h.retry_in();
        assert_eq!(connects(&h.advance(d)), ["fp1"]);
    }
    let mut h = H::online(3600);
    h.input(server_disconnect(0x8B, "shutting down"));
    assert_eq!(h.last_error().class, ErrorClass::Busy);
    assert_eq!(h.phase(), Phase::Backoff);
}

#[test]
fn provisioning_busy_honours_retry_after() {
    let mut h = H::started();
    h.input(Input::SigFetchFailed(FetchFailure {
        class: ErrorClass::Busy,
        code: 503,
        message: "HTTP 503".into(),
        retry_after: Some(30_000),
        give_up_after: None,
    }));
    assert_eq!(h.phase(), Phase::Backoff);
    assert!(h.retry_in() >= 30_000);
    assert_eq!(fetches(&h.advance(29_999)), 0);
    assert_eq!(fetches(&h.advance(1)), 1);
}

#[test]
fn malformed_provisioning_responses_are_retried_with_backoff() {
    let mut h = H::started();
    for _ in 0..5 {
        h.input(Input::SigFetchFailed(FetchFailure {
            class: ErrorClass::Busy,
            code: 6017,
            message: "malformed".into(),
            retry_after: None,
            give_up_after: None,
        }));
        let d = h.retry_in();
        assert_eq!(fetches(&h.advance(d)), 1);
    }
    assert_eq!(h.phase(), Phase::FetchingSig);
}

// --- the outage window ---------------------------------------------------------------------------

/// Fail every CONNECT with `fail` for `for_ms` from now; returns each delay with the outage's
/// length (since `began`) when it was drawn.
fn fail_connects_for(h: &mut H, began: u64, for_ms: u64, fail: fn() -> Input) -> Vec<(u64, u64)> {
    let end = h.now.mono + for_ms;
    let mut out = Vec::new();
    while h.now.mono < end {
        let d = h.retry_in();
        out.push((h.now.mono - began, d));
        assert_eq!(
            connects(&h.advance(d)).len(),
            1,
            "one CONNECT after the delay"
        );
        h.input(fail());
    }
    out
}

fn net_refused() -> Input {
    Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Refused,
        detail: "connection refused".into(),
    })
}

fn busy_0x9f() -> Input {
    refused(0x9F)
}

#[test]
fn the_outage_ceiling_is_45_s_growing_with_a_sixth_of_the_outage() {
    let p = Policy::default();
    assert_eq!(p.outage_ceiling(0), 45_000);
    assert_eq!(p.outage_ceiling(240_000), 45_000);
    assert_eq!(p.outage_ceiling(270_000), 45_000);
    assert_eq!(p.outage_ceiling(300_000), 50_000);
    assert_eq!(
        p.outage_ceiling(1_800_000),
        300_000,
        "the plain cap from 30 min on"
    );
    let off = Policy {
        outage_retry_floor: 0,
        ..Policy::default()
    };
    assert_eq!(off.outage_ceiling(0), Millis::MAX);
}

#[test]
fn during_an_outage_reconnects_stay_within_the_outage_window_network_and_busy() {
    for fail in [net_refused as fn() -> Input, busy_0x9f] {
        let mut h = H::online(10 * 86400);
        h.advance(60_000);
        let began = h.now.mono;
        h.input(network_closed());
        let delays = fail_connects_for(&mut h, began, 240_000, fail);
        for (i, (outage, d)) in delays.iter().enumerate() {
            let doubling = (1_000u64 << i.min(20)).min(300_000);
            assert!(
                (100..=doubling.min(45_000)).contains(d),
                "attempt {i}, {outage} ms into the outage: {d} ms"
            );
        }
        // The window binds: the doubling alone would have reached 64 s and beyond.
        assert!(delays.len() >= 10, "{delays:?}");
        assert!(h.m.connect_backoff.ceiling(&h.m.policy.backoff) >= 300_000);
        // Jitter stays full: some short draws under the 45 s ceiling too.
        assert!(delays[6..].iter().any(|(_, d)| *d < 20_000), "{delays:?}");
    }
}

#[test]
fn the_outage_window_grows_with_the_outage_up_to_the_plain_cap() {
    let mut h = H::online(10 * 86400);
    let began = h.now.mono;
    h.input(network_closed());
    let delays = fail_connects_for(&mut h, began, 2_400_000, net_refused);
    for (outage, d) in &delays {
        let ceiling = (*outage / 6).clamp(45_000, 300_000);
        assert!(
            *d <= ceiling,
            "{outage} ms into the outage: {d} ms > {ceiling}"
        );
    }
    let max_in = |from: u64, to: u64| {
        delays
            .iter()
            .filter(|(o, _)| (from..to).contains(o))
            .map(|(_, d)| *d)
            .max()
            .unwrap_or(0)
    };
    assert!(max_in(0, 240_000) <= 45_000);
    assert!(max_in(600_000, 1_800_000) > 45_000, "it grows: {delays:?}");
    assert!(
        max_in(1_800_000, u64::MAX) > 100_000,
        "toward the cap: {delays:?}"
    );
    // Without the window, the same engine reaches the cap's draws within minutes.
    let mut plain = H::new(Policy {
        outage_retry_floor: 0,
        ..Policy::default()
    });
    plain.input(Input::Start);
    let s = plain.sig(10 * 86400);
    plain.input(Input::SigFetched(s));
    plain.input(Input::Connected {
        session_present: false,
    });
    let began = plain.now.mono;
    plain.input(network_closed());
    let d = fail_connects_for(&mut plain, began, 600_000, net_refused);
    assert!(d.iter().any(|(_, d)| *d > 60_000), "{d:?}");
}

#[test]
fn the_outage_window_starts_over_at_each_connack() {
    let mut h = H::online(10 * 86400);
    let began = h.now.mono;
    h.input(network_closed());
    fail_connects_for(&mut h, began, 900_000, net_refused);
    assert!(h.m.policy.outage_ceiling(h.now.mono - began) >= 150_000);
    let d = h.retry_in();
    h.advance(d);
    h.input(Input::Connected {
        session_present: true,
    });
    assert_eq!(h.m.outage_since, None, "the outage ended at the CONNACK");
    // A minute later (the backoff is not reset: not stable), a new outage: 45 s again.
    h.advance(60_000);
    let began = h.now.mono;
    h.input(network_closed());
    assert!(h.m.connect_backoff.attempts() > 10, "not reset");
    for (outage, d) in fail_connects_for(&mut h, began, 200_000, net_refused) {
        assert!(d <= 45_000, "{outage} ms into the new outage: {d} ms");
    }
    // A login that starts over (here after a logout) starts it over too.
    h.input(Input::Logout { id: 1 });
    assert_eq!(h.phase(), Phase::Idle);
    h.input(Input::Login {
        id: 2,
        user: None,
        sig: None,
    });
    assert_eq!(h.m.outage_since, None);
}

#[test]
fn the_outage_window_leaves_fetches_and_refusal_cool_downs_alone() {
    // Provisioning failures keep the plain doubling, even during a broker outage.
    let mut h = H::started();
    let s = h.sig(10 * 86400);
    h.input(Input::SigFetched(s));
    h.input(net_refused());
    assert!(h.m.outage_since.is_some());
    h.m.sig = None; // the sig is gone: the next attempt fetches
    let mut delays = Vec::new();
    for _ in 0..12 {
        let a = h.advance_to_fetch(400_000);
        assert_eq!(fetches(&a), 1);
        h.input(Input::SigFetchFailed(FetchFailure {
            class: ErrorClass::Busy,
            code: 503,
            message: "HTTP 503".into(),
            retry_after: None,
            give_up_after: None,
        }));
        delays.push(h.retry_in());
    }
    assert!(delays.iter().any(|d| *d > 60_000), "{delays:?}");
    // A refused sig, refused again after the fresh one: the cool-down of 30 min ± 25 %,
    // whatever the outage.
    let mut h = H::online(10 * 86400);
    let began = h.now.mono;
    h.input(network_closed());
    fail_connects_for(&mut h, began, 120_000, net_refused);
    h.advance_to_connect(60_000);
    h.input(refused(0x87));
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(refused(0x87));
    assert_eq!(h.phase(), Phase::Stopped);
    assert!(h.retry_in() >= 22 * 60_000, "{}", h.retry_in());
}

// --- sig expired class ---------------------------------------------------------------------------

#[test]
fn disconnect_0xa0_while_online_fetches_one_new_sig_and_logs_in_again() {
    let mut h = H::online(3600);
    let a = h.input(server_disconnect(0xA0, "70001 UserSig expired"));
    assert!(a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })));
    assert_eq!(fetches(&a), 1);
    assert_eq!(h.m.login_status(), login_status::LOGINING);
    let s = h.sig(3600);
    let a = h.input(Input::SigFetched(s));
    assert_eq!(connects(&a), ["fp2"]);
    h.input(Input::Connected {
        session_present: true,
    });
    assert_eq!(h.phase(), Phase::Online);
    assert_eq!(
        h.m.snapshot().last_event,
        Some(Event::UserSigExpired { code: 70001 }),
        "late watchers see the last expiry"
    );
}

#[test]
fn connack_0x87_for_a_sig_past_its_expiry_is_the_expired_path() {
    let mut h = H::started();
    let s = h.sig(10);
    h.input(Input::SigFetched(s));
    // CONNACK arrives after the deadline; the refresh timer already started a fetch on the
    // way, and the expiry reuses it rather than starting a second one.
    let on_the_way = h.advance(11_000);
    let a = h.input(refused(0x87));
    assert!(a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })));
    assert_eq!(fetches(&on_the_way) + fetches(&a), 1);
    assert_eq!(h.phase(), Phase::FetchingSig);
}

#[test]
fn the_im_code_is_read_typed_and_never_parsed_out_of_a_reason_string() {
    // The broker's `im-error-code` says 70001: an expiry, whatever the words (a premature one:
    // our clock says the sig is good, so it spends the budget).
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    let a = h.input(Input::ConnectionEnded(ConnEnd::Refused {
        code: 0x87,
        reason: Some("token no longer valid".into()),
        im_code: Some(70001),
    }));
    assert!(a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })));
    assert_eq!(h.last_error().class, ErrorClass::SigExpired);
    // A reason string that merely starts with "70001", with no IM code, is the broker's
    // words, not its code: a refusal of a sig our clock says is good is a rejection.
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    let a = h.input(Input::ConnectionEnded(ConnEnd::Refused {
        code: 0x87,
        reason: Some("70001 looks like a code".into()),
        im_code: None,
    }));
    assert!(!a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })));
    let e = h.last_error();
    assert_eq!((e.class, e.code), (ErrorClass::SigRejected, 70003));
    assert!(
        e.message.contains("\"70001 looks like a code\""),
        "{}",
        e.message
    );
    // A UserSig code in the IM code is reported as is.
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(Input::ConnectionEnded(ConnEnd::Refused {
        code: 0x86,
        reason: None,
        im_code: Some(70009),
    }));
    assert_eq!(h.last_error().code, 70009);
}

#[test]
fn sig_expired_budget_allows_three_relogins_per_window_then_stops() {
    let mut h = H::online(3600);
    let mut relogins = 0;
    loop {
        let before = h.now.mono;
        let a = h.input(server_disconnect(0xA0, "70001 UserSig expired"));
        if h.phase() == Phase::Stopped {
            assert_eq!(fetches(&a), 0);
            break;
        }
        if relogins == 0 {
            assert_eq!(fetches(&a), 1, "the first renewal goes at once");
        } else {
            assert_eq!(fetches(&a), 0, "later renewals are paced by backoff");
            assert_eq!(h.phase(), Phase::Backoff);
            assert_eq!(fetches(&h.advance_to_fetch(60_000)), 1);
            assert!(h.now.mono >= before + 100, "never at once");
        }
        relogins += 1;
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        h.input(Input::Connected {
            session_present: true,
        });
        h.advance(1_000);
    }
    assert_eq!(relogins, 3);
    let e = h.last_error();
    assert_eq!((e.code, e.class), (70001, ErrorClass::SigExpired));
    assert!(
        e.message
            .contains("stopped after 3 UserSig renewals within 10m"),
        "{}",
        e.message
    );
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    // Stopped means stopped: an hour later, nothing was attempted.
    assert!(
        h.advance(3_600_000)
            .iter()
            .all(|a| matches!(a, Action::Emit(_)))
    );
    // An explicit login starts over with a fresh budget.
    let a = h.input(Input::Login {
        id: 9,
        user: None,
        sig: None,
    });
    assert_eq!(fetches(&a), 1);
}

#[test]
fn the_sig_expired_budget_window_slides() {
    let mut h = H::online(3600);
    for _ in 0..3 {
        h.input(server_disconnect(0xA0, "70001"));
        if h.phase() == Phase::Backoff {
            h.advance_to_fetch(60_000);
        }
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        h.input(Input::Connected {
            session_present: true,
        });
        h.advance(240_000); // 4 minutes
    }
    // The first renewal is now 12 minutes old: outside the 10-minute window.
    h.input(server_disconnect(0xA0, "70001"));
    assert_ne!(h.phase(), Phase::Stopped);
    assert_eq!(fetches(&h.advance_to_fetch(60_000)), 1);
}

#[test]
fn an_expiry_at_the_sigs_natural_end_spends_no_budget_but_is_paced() {
    // A broker that ends sessions when the sig runs out, and a provisioning server that hands
    // out 20 s sigs while refreshes fail: renewals go on (they are not the server calling
    // fresh sigs expired), paced by backoff and, as each login lasts only 20 s, by the
    // fast-login floor; never stopped by the budget.
    let mut h = H::online(20);
    let mut renewals = 0;
    let start = h.now.mono;
    while h.now.mono < start + 1_800_000 {
        // Every refresh fails; the sig runs out and the broker says so.
        let d = h.m.snapshot().sig.unwrap().deadline_ms.unwrap();
        while h.now.mono < d {
            let step = (d - h.now.mono).min(1_000);
            if fetches(&h.advance(step)) > 0 {
                h.input(Input::SigFetchFailed(FetchFailure::new(
                    ErrorClass::Busy,
                    503,
                    "unavailable",
                )));
            }
        }
        assert_eq!(
            h.phase(),
            Phase::Online,
            "a refresh failure never ends the session"
        );
        h.input(server_disconnect(0xA0, "70001 UserSig expired"));
        assert_ne!(
            h.phase(),
            Phase::Stopped,
            "natural expiries spend no budget"
        );
        h.advance_to_fetch(FAST_LOGIN_DELAY_MAX);
        renewals += 1;
        let s = h.sig(20);
        h.input(Input::SigFetched(s));
        h.input(Input::Connected {
            session_present: true,
        });
    }
    assert!(renewals >= 5, "{renewals}");
    assert!(
        renewals <= 12,
        "paced by the fast-login floor: {renewals} renewals in 30 min"
    );
}

#[test]
fn sigs_that_arrive_already_expired_use_the_same_budget() {
    let mut h = H::started();
    for i in 0..3 {
        let mut s = h.sig(60);
        s.server_now = s.expires_at.unwrap() + 1; // the provisioning server's own clock says expired
        let a = h.input(Input::SigFetched(s));
        assert!(connects(&a).is_empty(), "an expired sig is never sent");
        if i == 0 {
            assert_eq!(fetches(&a), 1);
        } else {
            assert_eq!(fetches(&a), 0);
            assert_eq!(fetches(&h.advance_to_fetch(60_000)), 1, "after a backoff");
        }
    }
    let mut s = h.sig(60);
    s.server_now = s.expires_at.unwrap() + 1;
    h.input(Input::SigFetched(s));
    assert_eq!(h.phase(), Phase::Stopped);
    assert_eq!(h.last_error().code, 6206);
}

// --- sig rejected class --------------------------------------------------------------------------

#[test]
fn a_rejected_sig_earns_one_fresh_retry_then_stops() {
    for code in [0x86u8, 0x87] {
        let mut h = H::started();
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        let a = h.input(refused(code));
        assert!(has(&a, &Action::ForgetSig));
        assert_eq!(fetches(&a), 1, "one fresh UserSig");
        assert_eq!(h.last_error().class, ErrorClass::SigRejected);
        let s = h.sig(3600);
        assert_eq!(connects(&h.input(Input::SigFetched(s))), ["fp2"]);
        let a = h.input(refused(code));
        assert_eq!(fetches(&a), 0);
        assert_eq!(h.phase(), Phase::Stopped);
        let e = h.last_error();
        assert_eq!((e.code, e.class), (70003, ErrorClass::SigRejected));
        assert!(e.message.contains("refused too"));
        // Quiet for the whole cool-down (at least 22.5 min; the next try is another test's).
        assert!(
            h.advance(22 * 60_000)
                .iter()
                .all(|a| matches!(a, Action::Emit(_)))
        );
    }
}

#[test]
fn the_fresh_retry_allowance_comes_back_only_after_a_login_stays_up_for_the_reset_window() {
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(refused(0x86));
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: false,
    });
    h.advance(300_000); // stayed up for the reset window
    h.input(server_disconnect(0x87, "70052 revoked"));
    assert_eq!(h.phase(), Phase::FetchingSig, "one retry again");
}

#[test]
fn a_disconnect_0x87_after_every_connack_stops_after_the_one_fresh_retry() {
    // The landed engine restored the retry on every CONNACK: 2,474 CONNECTs in 30 s.
    let mut h = H::started();
    let mut connects_seen = 0;
    let mut fetches_seen = 1;
    for _ in 0..10 {
        let s = h.sig(3600);
        let a = h.input(Input::SigFetched(s));
        connects_seen += connects(&a).len();
        h.input(Input::Connected {
            session_present: false,
        });
        let a = h.input(server_disconnect(0x87, "not authorized"));
        fetches_seen += fetches(&a);
        if h.phase() == Phase::Stopped {
            break;
        }
    }
    assert_eq!(h.phase(), Phase::Stopped);
    assert_eq!((connects_seen, fetches_seen), (2, 2));
    assert_eq!(h.last_error().class, ErrorClass::SigRejected);
}

#[test]
fn a_network_error_while_fetching_the_fresh_sig_does_not_grant_another_retry() {
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(refused(0x86));
    h.input(Input::SigFetchFailed(FetchFailure {
        class: ErrorClass::Network,
        code: 9510,
        message: "timeout".into(),
        retry_after: None,
        give_up_after: None,
    }));
    let d = h.retry_in();
    assert_eq!(fetches(&h.advance(d)), 1);
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(refused(0x86));
    assert_eq!(h.phase(), Phase::Stopped);
}

// --- kicked class ----------------------------------------------------------------------------------

#[test]
fn a_takeover_kick_stays_offline() {
    let mut h = H::online(3600);
    let a = h.input(server_disconnect(
        0x8E,
        "6208 kicked offline by another login",
    ));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Emit(Event::KickedOffline {
            reason: KickReason::LoggedInElsewhere,
            code: 6208,
            ..
        })
    )));
    assert_eq!(h.phase(), Phase::Kicked);
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    assert_eq!(h.m.login_user(), "");
    assert_eq!(h.last_error().class, ErrorClass::Kicked);
    let later = h.advance(24 * 3_600_000);
    assert!(
        connects(&later).is_empty() && fetches(&later) == 0,
        "no reconnect"
    );
    assert!(matches!(
        h.m.snapshot().last_event,
        Some(Event::KickedOffline { .. })
    ));
}

#[test]
fn an_admin_kick_is_a_kick_too() {
    let mut h = H::online(3600);
    let a = h.input(server_disconnect(
        0x98,
        "6208 kicked offline by an administrator",
    ));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Emit(Event::KickedOffline {
            reason: KickReason::KickedByAdmin,
            ..
        })
    )));
    assert_eq!(h.phase(), Phase::Kicked);
}

#[test]
fn relogin_after_a_cool_down_logs_in_once() {
    let mut h = H::new(Policy {
        on_kick: OnKick::ReloginAfter(900_000),
        ..Policy::default()
    });
    h.input(Input::Start);
    let s = h.sig(86400);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: false,
    });
    h.input(server_disconnect(0x8E, "6208"));
    assert!(connects(&h.advance(899_999)).is_empty());
    let a = h.advance(1);
    assert_eq!(
        connects(&a),
        ["fp1"],
        "one login after the cool-down, same valid sig"
    );
    h.input(Input::Connected {
        session_present: true,
    });
    assert_eq!(h.phase(), Phase::Online);
}

#[test]
fn relogin_after_doubles_on_repeated_kicks_so_two_devices_do_not_swap_forever() {
    let mut h = H::new(Policy {
        on_kick: OnKick::ReloginAfter(900_000),
        ..Policy::default()
    });
    h.input(Input::Start);
    let s = h.sig(86400 * 30);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: false,
    });
    let mut waits = Vec::new();
    for _ in 0..8 {
        h.input(server_disconnect(0x8E, "6208"));
        let kicked_at = h.now.mono;
        h.advance_to_connect(48 * 3_600_000);
        waits.push((h.now.mono - kicked_at) / 60_000);
        h.input(Input::Connected {
            session_present: true,
        });
        h.advance(60_000);
    }
    assert_eq!(&waits[..5], &[15, 30, 60, 120, 240], "{waits:?}");
    assert!(
        waits.iter().all(|w| *w <= 24 * 60),
        "capped at a day: {waits:?}"
    );
    // A local login forgets the kicks.
    h.input(server_disconnect(0x8E, "6208"));
    h.input(Input::Login {
        id: 1,
        user: None,
        sig: None,
    });
    h.input(Input::Connected {
        session_present: true,
    });
    h.input(server_disconnect(0x8E, "6208"));
    let at = h.now.mono;
    h.advance_to_connect(48 * 3_600_000);
    assert_eq!((h.now.mono - at) / 60_000, 15);
}

#[test]
fn three_quick_closes_after_login_are_a_suspected_takeover_with_a_doubling_cool_down() {
    let mut h = H::online(86400 * 30);
    for i in 1..=3 {
        h.advance(2_000);
        let a = h.input(network_closed());
        if i < 3 {
            assert_eq!(h.phase(), Phase::Backoff);
            let d = h.retry_in();
            h.advance(d);
            h.input(Input::Connected {
                session_present: true,
            });
        } else {
            assert!(a.iter().any(|a| matches!(
                a,
                Action::Emit(Event::KickedOffline {
                    reason: KickReason::SuspectedTakeover,
                    ..
                })
            )));
        }
    }
    assert_eq!(h.phase(), Phase::Kicked);
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    // Never permanent, never a fight: one more try after each cool-down (10 min ± 25 %,
    // doubling to 1 h), and one early close is the next suspected takeover.
    let mut cool_downs = Vec::new();
    for _ in 0..5 {
        let kicked_at = h.now.mono;
        assert!(h.m.snapshot().next_retry_ms.is_some(), "a timer is armed");
        let a = h.advance_to_connect(2 * 3_600_000);
        assert_eq!(connects(&a).len(), 1);
        cool_downs.push(h.now.mono - kicked_at);
        h.input(Input::Connected {
            session_present: true,
        });
        h.advance(1_000);
        h.input(network_closed());
        assert_eq!(
            h.phase(),
            Phase::Kicked,
            "one early close after the cool-down"
        );
    }
    let mins: Vec<u64> = cool_downs.iter().map(|c| c / 60_000).collect();
    assert!((7..=12).contains(&mins[0]), "{mins:?}");
    assert!((15..=25).contains(&mins[1]), "{mins:?}");
    assert!((30..=50).contains(&mins[2]), "{mins:?}");
    assert!(
        mins[3..].iter().all(|m| (45..=75).contains(m)),
        "capped at 1 h: {mins:?}"
    );
    // A login that stays up for the reset window forgets it all.
    h.advance_to_connect(2 * 3_600_000);
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(300_000);
    h.input(network_closed());
    assert_eq!(h.phase(), Phase::Backoff);
}

#[test]
fn a_close_long_after_login_resets_the_takeover_count() {
    let mut h = H::online(86400);
    for _ in 0..2 {
        h.advance(2_000);
        h.input(network_closed());
        let d = h.retry_in();
        h.advance(d);
        h.input(Input::Connected {
            session_present: true,
        });
    }
    h.advance(20_000); // this one stayed up
    h.input(network_closed());
    let d = h.retry_in();
    h.advance(d);
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(2_000);
    h.input(network_closed());
    assert_eq!(h.phase(), Phase::Backoff, "count restarted");
}

// --- fatal class -----------------------------------------------------------------------------------

#[test]
fn fatal_refusals_stop_without_retrying() {
    for (code, im) in [(0x8Au8, 70051), (0x85, 6017), (0x84, 6017)] {
        let mut h = H::started();
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        h.input(refused(code));
        assert_eq!(h.phase(), Phase::Stopped);
        let e = h.last_error();
        assert_eq!((e.code, e.class), (im, ErrorClass::Fatal));
        let later = h.advance(3_600_000);
        assert!(connects(&later).is_empty() && fetches(&later) == 0);
    }
}

#[test]
fn fatal_provisioning_errors_stop() {
    for status in [401u32, 403, 404] {
        let mut h = H::started();
        h.input(Input::SigFetchFailed(FetchFailure {
            class: ErrorClass::Fatal,
            code: status,
            message: format!("HTTP {status}"),
            retry_after: None,
            give_up_after: None,
        }));
        assert_eq!(h.phase(), Phase::Stopped);
        assert_eq!(h.last_error().code, status);
        assert_eq!(fetches(&h.advance(3_600_000)), 0);
    }
}

#[test]
fn a_sig_for_another_user_is_fatal() {
    let mut h = H::started();
    let s = h.sig_for(bob(), 3600);
    h.input(Input::SigFetched(s));
    assert_eq!(h.phase(), Phase::Stopped);
    assert_eq!(h.last_error().code, 70013);
}

#[test]
fn a_reload_is_a_way_out_of_stopped() {
    let mut h = H::started();
    h.input(Input::SigFetchFailed(FetchFailure {
        class: ErrorClass::Fatal,
        code: 403,
        message: "x".into(),
        retry_after: None,
        give_up_after: None,
    }));
    let a = h.input(Input::Reconfigured {
        policy: Policy::default(),
        user: alice(),
        reconnect: false,
    });
    assert_eq!(fetches(&a), 1);
}

// --- clock class -----------------------------------------------------------------------------------

#[test]
fn an_implausible_wall_clock_waits_for_time_sync() {
    let mut h = H::new(Policy {
        min_wall_clock: WALL0 + 1_000_000,
        ..Policy::default()
    });
    let a = h.input(Input::Start);
    assert_eq!(fetches(&a), 0);
    assert_eq!(h.phase(), Phase::WaitingForClock);
    assert_eq!(h.last_error().class, ErrorClass::Clock);
    assert_eq!(h.m.snapshot().next_retry_ms, Some(h.now.mono + 30_000));
    assert_eq!(fetches(&h.advance(60_000)), 0, "still implausible");
    h.now.wall = WALL0 + 2_000_000; // time sync happened
    let a = h.advance(30_000);
    assert_eq!(fetches(&a), 1);
}

#[test]
fn certificate_not_yet_valid_waits_for_the_clock_slowly() {
    let mut h = H::started();
    let s = h.sig(86400);
    h.input(Input::SigFetched(s));
    h.input(Input::ConnectionEnded(ConnEnd::CertNotYetValid {
        detail: "NotValidYet".into(),
    }));
    assert_eq!(h.phase(), Phase::WaitingForClock);
    assert!(connects(&h.advance(29_999)).is_empty());
    assert_eq!(connects(&h.advance(1)).len(), 1);
}

// --- UserSig lifecycle -------------------------------------------------------------------------

#[test]
fn refresh_happens_at_80_percent_of_the_lifetime_with_jitter() {
    for seed in 0..50 {
        let mut h = H::new(Policy::default());
        h.m = Machine::new(Policy::default(), alice(), h.now, seed);
        h.input(Input::Start);
        let s = h.sig(1000);
        h.input(Input::SigFetched(s));
        h.input(Input::Connected {
            session_present: false,
        });
        let at = h.m.snapshot().sig.unwrap().refresh_at_ms.unwrap() - h.now.mono;
        assert!((750_000..=850_000).contains(&at), "seed {seed}: {at}");
    }
}

#[test]
fn refresh_is_anchored_on_the_servers_date_not_the_device_clock() {
    let mut h = H::started();
    // The device clock is a day fast; the provisioning server's Date is the truth.
    let mut s = h.sig(1000);
    s.server_now -= 86400;
    s.issued_at = Some(s.server_now);
    s.expires_at = Some(s.server_now + 1000);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: false,
    });
    let snap = h.m.snapshot().sig.unwrap();
    assert_eq!(snap.deadline_ms, Some(h.now.mono + 1_000_000));
    let refresh = snap.refresh_at_ms.unwrap() - h.now.mono;
    assert!((750_000..=850_000).contains(&refresh));
}

#[test]
fn proactive_refresh_moves_the_session_to_the_new_sig_before_expiry() {
    let mut h = H::online(1000);
    let a = h.advance_to_fetch(900_000);
    assert_eq!(fetches(&a), 1, "refresh started");
    assert_eq!(h.phase(), Phase::Online, "still online while fetching");
    assert!(h.m.snapshot().sig.unwrap().refreshing);
    let s = h.sig(1000);
    let a = h.input(Input::SigFetched(s));
    // Stored first, then a clean DISCONNECT, then CONNECT with the new sig.
    let persist = a.iter().position(|x| {
        *x == Action::PersistSig {
            user: alice(),
            fingerprint: "fp2".into(),
        }
    });
    let disconnect = a.iter().position(|x| *x == Action::Disconnect);
    assert!(persist.unwrap() < disconnect.unwrap());
    assert!(events(&a).contains(&"user_sig_refreshed"));
    let a = h.input(Input::Disconnected);
    assert_eq!(connects(&a), ["fp2"]);
    assert_eq!(
        h.m.login_status(),
        login_status::LOGINED,
        "a planned move stays logged in"
    );
    h.input(Input::Connected {
        session_present: true,
    });
    assert_eq!(h.phase(), Phase::Online);
}

#[test]
fn a_refresh_failure_keeps_the_session_and_retries() {
    let mut h = H::online(1000);
    h.advance(850_000);
    for _ in 0..3 {
        let a = h.input(Input::SigFetchFailed(FetchFailure {
            class: ErrorClass::Fatal, // even a "fatal" answer is retried while the sig is valid
            code: 503,
            message: "HTTP 503".into(),
            retry_after: None,
            give_up_after: None,
        }));
        assert!(a.iter().all(|a| !matches!(a, Action::Disconnect)));
        assert_eq!(h.phase(), Phase::Online);
        let next = h.m.snapshot().sig.unwrap().refresh_at_ms.unwrap();
        assert!(next < h.now.mono + 150_000, "retried before the deadline");
        let d = next - h.now.mono;
        assert_eq!(fetches(&h.advance(d)), 1);
    }
}

#[test]
fn an_offline_device_refreshes_its_sig_and_uses_it_on_the_next_attempt() {
    let mut h = H::online(1000);
    h.input(Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Refused,
        detail: "x".into(),
    }));
    // Keep failing to connect until the refresh point.
    let mut fetched = false;
    while h.now.mono < 1_000 + 900_000 {
        let d = h.m.poll_timeout().unwrap() - h.now.mono;
        let a = h.advance(d);
        if fetches(&a) == 1 {
            let s = h.sig(1000);
            let b = h.input(Input::SigFetched(s));
            assert!(
                connects(&b).is_empty(),
                "the backoff timer decides when to connect"
            );
            fetched = true;
        }
        if !connects(&a).is_empty() {
            h.input(Input::ConnectionEnded(ConnEnd::Network {
                kind: NetKind::Refused,
                detail: "x".into(),
            }));
        }
        if fetched {
            break;
        }
    }
    assert!(fetched);
    let d = h.retry_in();
    assert_eq!(connects(&h.advance(d)), ["fp2"]);
}

// --- local requests --------------------------------------------------------------------------------

#[test]
fn a_second_login_while_logging_in_answers_7501() {
    let mut h = H::new(Policy {
        login_on_start: false,
        ..Policy::default()
    });
    h.input(Input::Start);
    assert_eq!(
        fetches(&h.input(Input::Login {
            id: 1,
            user: None,
            sig: None
        })),
        1
    );
    let a = h.input(Input::Login {
        id: 2,
        user: None,
        sig: None,
    });
    assert_eq!(fetches(&a), 0, "never two logins");
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Reply {
            id: 2,
            result: Err(RequestError { code: 7501, .. })
        }
    )));
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    let a = h.input(Input::Connected {
        session_present: false,
    });
    assert!(has(
        &a,
        &Action::Reply {
            id: 1,
            result: Ok(())
        }
    ));
    // Logged in as the same user: answered at once.
    let a = h.input(Input::Login {
        id: 3,
        user: None,
        sig: None,
    });
    assert!(has(
        &a,
        &Action::Reply {
            id: 3,
            result: Ok(())
        }
    ));
}

#[test]
fn an_account_switch_logs_the_first_user_out_cleanly_then_the_second_in() {
    let mut h = H::online(3600);
    let a = h.input(Input::Login {
        id: 5,
        user: Some(bob()),
        sig: None,
    });
    assert!(has(&a, &Action::Disconnect));
    assert_eq!(h.phase(), Phase::LoggingOut);
    let a = h.input(Input::Disconnected);
    assert!(has(&a, &Action::FetchSig { user: bob() }));
    assert_eq!(h.m.login_user(), "");
    let s = h.sig_for(bob(), 3600);
    let a = h.input(Input::SigFetched(s));
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Connect { user, .. } if *user == bob()))
    );
    let a = h.input(Input::Connected {
        session_present: false,
    });
    assert!(has(
        &a,
        &Action::Reply {
            id: 5,
            result: Ok(())
        }
    ));
    assert_eq!(h.m.login_user(), "bob");
}

#[test]
fn logout_disconnects_cleanly_and_never_reconnects() {
    let mut h = H::online(3600);
    let a = h.input(Input::Logout { id: 4 });
    assert!(has(&a, &Action::Disconnect));
    assert_eq!(h.phase(), Phase::LoggingOut);
    let a = h.input(Input::Login {
        id: 6,
        user: None,
        sig: None,
    });
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Reply {
            id: 6,
            result: Err(RequestError { code: 7502, .. })
        }
    )));
    let a = h.input(Input::Disconnected);
    assert!(has(
        &a,
        &Action::Reply {
            id: 4,
            result: Ok(())
        }
    ));
    assert_eq!(h.phase(), Phase::Idle);
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    assert!(
        h.advance(86_400_000)
            .iter()
            .all(|a| matches!(a, Action::Emit(_)))
    );
}

#[test]
fn logout_during_backoff_cancels_the_retry() {
    let mut h = H::online(3600);
    h.input(network_closed());
    let a = h.input(Input::Logout { id: 1 });
    assert!(has(
        &a,
        &Action::Reply {
            id: 1,
            result: Ok(())
        }
    ));
    assert_eq!(h.phase(), Phase::Idle);
    assert!(connects(&h.advance(3_600_000)).is_empty());
}

#[test]
fn logout_while_fetching_cancels_the_fetch_and_fails_the_pending_login() {
    let mut h = H::new(Policy {
        login_on_start: false,
        ..Policy::default()
    });
    h.input(Input::Start);
    h.input(Input::Login {
        id: 1,
        user: None,
        sig: None,
    });
    let a = h.input(Input::Logout { id: 2 });
    assert!(has(&a, &Action::CancelFetch));
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Reply {
            id: 1,
            result: Err(_)
        }
    )));
    assert!(has(
        &a,
        &Action::Reply {
            id: 2,
            result: Ok(())
        }
    ));
    // A late fetch result is ignored.
    let s = h.sig(3600);
    assert!(connects(&h.input(Input::SigFetched(s))).is_empty());
}

#[test]
fn login_after_a_kick_logs_in_again() {
    let mut h = H::online(3600);
    h.input(server_disconnect(0x8E, "6208"));
    let a = h.input(Input::Login {
        id: 1,
        user: None,
        sig: None,
    });
    assert_eq!(connects(&a), ["fp1"], "the sig is still valid");
}

#[test]
fn shutdown_disconnects_then_exits() {
    let mut h = H::online(3600);
    let a = h.input(Input::Shutdown);
    assert!(has(&a, &Action::Disconnect));
    let a = h.input(Input::Disconnected);
    assert!(has(&a, &Action::Exit));
    let mut h = H::new(Policy::default());
    assert!(has(&h.input(Input::Shutdown), &Action::Exit));
}

#[test]
fn every_state_change_is_emitted_exactly_once() {
    let mut h = H::new(Policy::default());
    let mut all = h.input(Input::Start);
    let s = h.sig(3600);
    all.extend(h.input(Input::SigFetched(s)));
    all.extend(h.input(Input::Connected {
        session_present: false,
    }));
    all.extend(h.input(network_closed()));
    let d = h.retry_in();
    all.extend(h.advance(d));
    all.extend(h.input(Input::Connected {
        session_present: true,
    }));
    all.extend(h.input(Input::MessageReceived)); // no state change: no event
    let phases: Vec<Phase> = all
        .iter()
        .filter_map(|a| match a {
            Action::Emit(Event::StateChanged { phase, .. }) => Some(*phase),
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        [
            Phase::FetchingSig,
            Phase::Connecting,
            Phase::Subscribing,
            Phase::Online,
            Phase::Backoff,
            Phase::Connecting,
            Phase::Subscribing,
            Phase::Online
        ]
    );
}

// --- regressions: the defects of the interleaving review (issue 8), one test each -------------

fn fail(class: ErrorClass, code: u32) -> Input {
    Input::SigFetchFailed(FetchFailure::new(class, code, "test failure"))
}

#[test]
fn the_backoff_retry_acts_even_while_a_slow_refresh_is_in_flight() {
    // The landed wedge: in backoff after a drop, a slow refresh was under way when the retry
    // fell due; the retry was cleared with no effect and the refresh answer did nothing.
    let mut h = H::online(100);
    h.advance_to_fetch(100_000);
    assert!(
        h.m.snapshot().sig.unwrap().refreshing,
        "the refresh is in flight"
    );
    h.input(network_closed());
    assert_eq!(h.phase(), Phase::Backoff);
    // The retry falls due during the slow fetch: it connects with the still valid sig.
    let a = h.advance_to_connect(10_000);
    assert_eq!(connects(&a), ["fp1"]);
    assert!(
        h.m.snapshot().sig.unwrap().refreshing,
        "the refresh is still in flight"
    );
    // The slow refresh lands; the connection comes up and moves to the new sig.
    let s = h.sig(100);
    h.input(Input::SigFetched(s));
    let a = h.input(Input::Connected {
        session_present: true,
    });
    assert!(has(&a, &Action::Disconnect), "moves to the new sig");
    let a = h.input(Input::Disconnected);
    assert_eq!(connects(&a), ["fp2"]);
}

#[test]
fn a_refusal_while_a_refresh_is_in_flight_does_not_leave_a_logined_device_offline() {
    let mut h = H::online(1000);
    h.advance_to_fetch(900_000);
    assert!(h.m.snapshot().sig.unwrap().refreshing);
    // The broker ends the session as "not authorized" while the refresh is under way.
    h.input(server_disconnect(0x87, "70052 revoked"));
    assert_ne!(h.phase(), Phase::Online);
    // The refresh answer is the fresh sig: it is used at once.
    let s = h.sig(1000);
    let a = h.input(Input::SigFetched(s));
    assert_eq!(connects(&a).len(), 1, "{a:?}");
    assert_eq!(h.phase(), Phase::Connecting);
}

#[test]
fn a_refresh_answer_with_the_same_sig_is_a_failed_refresh_not_a_reconnect() {
    let mut h = H::online(3600);
    h.advance_to_fetch(3_600_000);
    let same = h.m.snapshot().sig.unwrap().fingerprint;
    let mut again = h.sig(3600);
    again.fingerprint = same;
    let a = h.input(Input::SigFetched(again));
    assert!(!has(&a, &Action::Disconnect) && connects(&a).is_empty());
    assert!(!events(&a).contains(&"user_sig_refreshed"));
    assert_eq!(h.phase(), Phase::Online);
    let next = h.m.snapshot().sig.unwrap().refresh_at_ms.unwrap() - h.now.mono;
    assert!(
        next >= REFRESH_FLOOR_MIN,
        "retried after a backoff, not at once: {next}"
    );
}

#[test]
fn short_lived_sigs_never_refresh_in_a_tight_loop() {
    // A 1 s sig used to refresh every 0 ms. Now: used until it ends, never refreshed
    // proactively; a refresh answer due again within the floor is a failed refresh.
    let mut h = H::online(1);
    assert_eq!(h.m.snapshot().sig.unwrap().refresh_at_ms, None);
    let a = h.advance(60_000);
    assert_eq!(fetches(&a), 0);
    assert_eq!(
        h.phase(),
        Phase::Online,
        "a broker that does not enforce expiry keeps it"
    );
    // A 12 s sig: its refresh point (9.6 s) is inside the 10 s floor.
    let h = H::online(12);
    assert_eq!(h.m.snapshot().sig.unwrap().refresh_at_ms, None);
    // A 20 s sig is refreshed (at 16 s); an answer due again within 10 s is refused.
    let mut h = H::online(20);
    h.advance_to_fetch(20_000);
    let short = h.sig(8);
    let a = h.input(Input::SigFetched(short));
    assert!(!has(&a, &Action::Disconnect));
    assert_eq!(h.phase(), Phase::Online);
}

#[test]
fn an_expired_refresh_answer_keeps_the_good_sig_and_the_session() {
    let mut h = H::online(3600);
    h.advance_to_fetch(3_600_000);
    let current = h.m.snapshot().sig.unwrap().fingerprint;
    for _ in 0..6 {
        let mut s = h.sig(60);
        s.server_now = s.expires_at.unwrap() + 1;
        let a = h.input(Input::SigFetched(s));
        assert!(!has(&a, &Action::ForgetSig), "the good sig is kept");
        assert_eq!(h.phase(), Phase::Online);
        assert_eq!(h.m.login_status(), login_status::LOGINED);
        assert_eq!(h.m.snapshot().sig.unwrap().fingerprint, current);
        // A login meanwhile answers at once, not 7501.
        let a = h.input(Input::Login {
            id: 5,
            user: None,
            sig: None,
        });
        assert!(has(
            &a,
            &Action::Reply {
                id: 5,
                result: Ok(())
            }
        ));
        let d = h.m.snapshot().sig.unwrap().refresh_at_ms.unwrap() - h.now.mono;
        h.advance(d);
    }
    assert_ne!(
        h.phase(),
        Phase::Stopped,
        "expired answers never stop a healthy session"
    );
}

#[test]
fn login_and_sighup_during_a_close_never_wedge() {
    // The landed engine: a login or SIGHUP while a stop was closing the connection left it
    // `stopped` with login_status 2, no timer, no reply, 7501 forever.
    // A logout close under way: a login answers 7502, a SIGHUP changes nothing, and the
    // close still ends with the logout answered.
    let mut h = H::online(3600);
    h.input(Input::Logout { id: 1 });
    assert_eq!(h.phase(), Phase::LoggingOut);
    let a = h.input(Input::Login {
        id: 2,
        user: None,
        sig: None,
    });
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Reply { id: 2, result: Err(e) } if e.code == 7502))
    );
    h.input(Input::Reconfigured {
        policy: Policy::default(),
        user: alice(),
        reconnect: true,
    });
    let a = h.input(Input::Disconnected);
    assert!(has(
        &a,
        &Action::Reply {
            id: 1,
            result: Ok(())
        }
    ));
    assert_eq!(h.phase(), Phase::Idle);
    // An account switch's close under way, then a stop for the new user: a login moves on.
    let mut h = H::online(3600);
    h.input(Input::Login {
        id: 3,
        user: Some(bob()),
        sig: None,
    });
    assert_eq!(h.phase(), Phase::LoggingOut);
    let a = h.input(Input::Disconnected);
    assert_eq!(fetches(&a), 1);
    let a = h.input(fail(ErrorClass::Fatal, 403));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Reply {
            id: 3,
            result: Err(_)
        }
    )));
    assert_eq!(h.phase(), Phase::Stopped);
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    let a = h.input(Input::Login {
        id: 4,
        user: None,
        sig: None,
    });
    assert_eq!(
        fetches(&a),
        1,
        "a login always gets a stopped engine moving"
    );
    let s = h.sig_for(bob(), 3600);
    h.input(Input::SigFetched(s));
    let a = h.input(Input::Connected {
        session_present: false,
    });
    assert!(has(
        &a,
        &Action::Reply {
            id: 4,
            result: Ok(())
        }
    ));
    // A close that never completes: the close timeout ends it, then the next step follows.
    let mut h = H::online(3600);
    h.input(Input::Reconfigured {
        policy: Policy::default(),
        user: alice(),
        reconnect: true,
    });
    let a = h.advance(Policy::default().close_timeout);
    assert!(has(&a, &Action::Abandon));
    assert_eq!(connects(&a).len(), 1);
}

#[test]
fn a_refresh_failing_after_the_deadline_on_a_broker_that_does_not_enforce_it_keeps_the_session() {
    // mosquitto and most brokers never end a session when the sig runs out.
    let mut h = H::online(100);
    let mut statuses = 0;
    while h.now.mono < 1_000 + 300_000 {
        let a = h.advance(1_000);
        if fetches(&a) > 0 {
            statuses += 1;
            let status = if statuses < 5 { 503 } else { 401 };
            let class = if status == 401 {
                ErrorClass::Fatal
            } else {
                ErrorClass::Busy
            };
            h.input(fail(class, status));
        }
        assert_eq!(h.phase(), Phase::Online, "never backoff while online");
    }
    assert!(statuses >= 5, "{statuses}");
    assert_eq!(
        h.m.snapshot().sig.unwrap().refresh_at_ms,
        None,
        "401 past the deadline: stop asking"
    );
    // When the connection drops, the expired sig needs a fetch; 401 then stops, as it must.
    h.input(network_closed());
    let a = h.advance_to_fetch(60_000);
    assert!(events(&a).contains(&"user_sig_expired"));
    h.input(fail(ErrorClass::Fatal, 401));
    assert_eq!(h.phase(), Phase::Stopped);
}

#[test]
fn a_cached_sig_anchored_on_a_wall_clock_at_1970_is_not_used() {
    let mut h = H::new(Policy {
        min_wall_clock: WALL0 - 86_400,
        ..Policy::default()
    });
    h.now.wall = 3_600; // no RTC: 1970
    let mut s = h.sig(86_400);
    // The driver estimated the issuer's time as the wall clock + the stored offset.
    s.server_now = h.now.wall;
    s.wall_anchored = true;
    h.input(Input::CachedSig(s));
    assert!(
        h.m.snapshot().sig.is_none(),
        "its deadline would be ~55 years away"
    );
    assert_eq!(h.input(Input::Start).len(), 1, "only the state change");
    assert_eq!(h.phase(), Phase::WaitingForClock);
    // Time sync: the next look fetches a sig (anchored on the server's Date).
    h.now.wall = WALL0;
    let a = h.advance_to_fetch(60_000);
    assert_eq!(fetches(&a), 1);
}

#[test]
fn a_suspend_past_the_refresh_point_refreshes_on_wake_and_never_sends_an_expired_sig() {
    // Boot time keeps counting through suspend: the machine wakes up at the real time.
    let mut h = H::online(3_600);
    h.now.mono += 5 * 3_600_000; // slept five hours; the session is dead but not yet seen so
    h.now.wall += 5 * 3_600;
    let a = h.advance(0);
    assert!(fetches(&a) <= 1);
    h.input(Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Timeout,
        detail: "keepalive".into(),
    }));
    let a = h.advance_to_fetch(60_000);
    assert!(connects(&a).is_empty(), "the expired sig is never sent");
}

#[test]
fn a_broker_change_during_connecting_is_applied_at_once() {
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    assert_eq!(h.phase(), Phase::Connecting);
    let a = h.input(Input::Reconfigured {
        policy: Policy::default(),
        user: alice(),
        reconnect: true,
    });
    assert!(has(&a, &Action::Abandon), "{a:?}");
    assert_eq!(
        connects(&a).len(),
        1,
        "connects again with the new settings"
    );
}

#[test]
fn an_unrelated_reload_keeps_a_local_account_switch() {
    let mut h = H::online(3600);
    h.input(Input::Login {
        id: 1,
        user: Some(bob()),
        sig: None,
    });
    h.input(Input::Disconnected);
    let s = h.sig_for(bob(), 3600);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: false,
    });
    assert_eq!(h.m.login_user(), "bob");
    let a = h.input(Input::Reconfigured {
        policy: Policy::default(),
        user: alice(), // the file still says alice, as before
        reconnect: false,
    });
    assert!(!has(&a, &Action::Disconnect));
    assert_eq!(h.m.login_user(), "bob");
    // A reload that changes user_id does switch.
    h.input(Input::Reconfigured {
        policy: Policy::default(),
        user: UserId::parse("carol").unwrap(),
        reconnect: false,
    });
    assert_eq!(h.m.user().as_str(), "carol");
}

#[test]
fn protocol_disconnects_are_bounded_like_rejections() {
    for code in [0x81u8, 0x82, 0x8F, 0x90, 0x95] {
        let mut h = H::online(86400);
        let mut connects_seen = 1;
        for _ in 0..10 {
            h.input(server_disconnect(code, "bad"));
            if h.phase() == Phase::Stopped {
                break;
            }
            assert_eq!(h.phase(), Phase::Backoff, "with backoff");
            connects_seen += connects(&h.advance_to_connect(600_000)).len();
            h.input(Input::Connected {
                session_present: true,
            });
        }
        assert_eq!(h.phase(), Phase::Stopped, "0x{code:02X}");
        assert_eq!(h.last_error().class, ErrorClass::Protocol);
        assert_eq!(connects_seen, 3, "0x{code:02X}: three tries");
    }
}

#[test]
fn transient_provisioning_failures_and_a_missing_token_back_off_then_give_up() {
    // 421 from a load balancer: backoff, forever (busy).
    let mut h = H::started();
    for _ in 0..10 {
        h.input(fail(ErrorClass::Busy, 421));
        assert_eq!(h.phase(), Phase::Backoff);
        h.advance_to_fetch(600_000);
    }
    // An empty token file mid-rotation: backoff, a few tries, then stop.
    let mut h = H::started();
    let mut tries = 1;
    loop {
        let mut f = FetchFailure::new(ErrorClass::Busy, 6017, "empty token");
        f.give_up_after = Some(3);
        h.input(Input::SigFetchFailed(f));
        if h.phase() == Phase::Stopped {
            break;
        }
        assert_eq!(h.phase(), Phase::Backoff);
        h.advance_to_fetch(600_000);
        tries += 1;
    }
    assert_eq!(tries, 3);
    // The rotation finished in time: a sig resets the count.
    let mut h = H::started();
    for _ in 0..2 {
        let mut f = FetchFailure::new(ErrorClass::Busy, 6017, "empty token");
        f.give_up_after = Some(3);
        h.input(Input::SigFetchFailed(f));
        h.advance_to_fetch(600_000);
    }
    let s = h.sig(3600);
    assert_eq!(connects(&h.input(Input::SigFetched(s))).len(), 1);
}

#[test]
fn an_operator_login_during_a_long_backoff_retries_now() {
    let mut h = H::online(86400);
    for _ in 0..12 {
        h.input(network_closed());
        let d = h.retry_in();
        h.advance(d);
    }
    h.input(network_closed());
    assert!(h.retry_in() > 10_000, "a long wait");
    h.advance(2_000);
    let a = h.input(Input::Login {
        id: 3,
        user: None,
        sig: None,
    });
    assert_eq!(connects(&a).len(), 1, "the login cuts the wait short");
    let a = h.input(Input::Connected {
        session_present: true,
    });
    assert!(has(
        &a,
        &Action::Reply {
            id: 3,
            result: Ok(())
        }
    ));
}

#[test]
fn every_timeout_belongs_to_the_machine() {
    // A provisioning server that never answers, a CONNACK that never comes, a DISCONNECT the
    // broker never completes: the machine's own deadlines end each one.
    let mut h = H::started();
    let a = h.advance(Policy::default().fetch_timeout + TIMEOUT_SLACK);
    assert!(has(&a, &Action::CancelFetch));
    assert_eq!(h.phase(), Phase::Backoff);
    let a = h.advance_to_fetch(60_000);
    assert_eq!(fetches(&a), 1);
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    let a = h.advance(Policy::default().connect_timeout + TIMEOUT_SLACK);
    assert!(has(&a, &Action::Abandon));
    assert_eq!(h.last_error().code, codes::NET_CONN_TIMEOUT);
    h.advance_to_connect(60_000);
    h.input(Input::Connected {
        session_present: true,
    });
    h.input(Input::Logout { id: 9 });
    assert_eq!(h.phase(), Phase::LoggingOut);
    let a = h.advance(Policy::default().close_timeout);
    assert!(has(&a, &Action::Abandon));
    assert!(has(
        &a,
        &Action::Reply {
            id: 9,
            result: Ok(())
        }
    ));
    assert_eq!(h.phase(), Phase::Idle);
}

// --- brokers: failover, protocol, redirects ---------------------------------------------------

/// (target, protocol) of every Connect in `a`.
fn vias(a: &[Action]) -> Vec<(Target, Proto)> {
    a.iter()
        .filter_map(|x| match x {
            Action::Connect { target, proto, .. } => Some((target.clone(), *proto)),
            _ => None,
        })
        .collect()
}

fn started_with(policy: Policy) -> H {
    let mut h = H::new(policy);
    h.input(Input::Start);
    let s = h.sig(86_400);
    h.input(Input::SigFetched(s));
    h
}

#[test]
fn network_failures_move_to_the_next_node_with_backoff_and_a_working_node_is_kept() {
    let mut h = H::new(Policy {
        brokers: 3,
        ..Policy::default()
    });
    let first = h.input(Input::Start);
    assert_eq!(fetches(&first), 1);
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V5)]);
    h.input(Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Refused,
        detail: "down".into(),
    }));
    assert_eq!(
        h.m.phase(),
        Phase::Backoff,
        "the same backoff: a fleet never storms node 1"
    );
    let a = h.advance_to_connect(2_000);
    assert_eq!(vias(&a), vec![(Target::Node(1), Proto::V5)]);
    h.input(Input::Connected {
        session_present: true,
    });
    assert_eq!(h.m.snapshot().via, Some((Target::Node(1), Proto::V5)));
    // A drop of a working session: back to the same node first? No — a drop is a network
    // failure on node 1, so node 2 is next; then it stays where it got in.
    h.input(network_closed());
    let a = h.advance_to_connect(10_000);
    assert_eq!(vias(&a), vec![(Target::Node(2), Proto::V5)]);
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(400_000); // stable
    h.input(Input::Logout { id: 1 });
    h.input(Input::Disconnected);
    let a = h.input(Input::Login {
        id: 2,
        user: None,
        sig: None,
    });
    assert_eq!(
        vias(&a),
        vec![(Target::Node(2), Proto::V5)],
        "stays with the node that works"
    );
}

#[test]
fn a_credential_refusal_does_not_fail_over() {
    let mut h = started_with(Policy {
        brokers: 2,
        ..Policy::default()
    });
    h.input(Input::ConnectionEnded(ConnEnd::Refused {
        code: 0x8A,
        reason: None,
        im_code: None,
    }));
    assert_eq!(
        h.m.phase(),
        Phase::Stopped,
        "banned on one node is banned on all"
    );
}

#[test]
fn auto_falls_back_to_3_1_1_once_and_remembers_what_worked() {
    for refusal in [
        ConnEnd::Refused {
            code: 0x84,
            reason: None,
            im_code: None,
        },
        ConnEnd::Network {
            kind: NetKind::Closed,
            detail: "closed before CONNACK".into(),
        },
    ] {
        let mut h = H::new(Policy {
            protocol: ProtocolMode::Auto,
            ..Policy::default()
        });
        h.input(Input::Start);
        let s = h.sig(86_400);
        let a = h.input(Input::SigFetched(s));
        assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V5)]);
        let a = h.input(Input::ConnectionEnded(refusal.clone()));
        assert!(
            a.iter().any(|x| matches!(x, Action::Emit(Event::ConnectFailed { message, .. }) if message.contains("3.1.1"))),
            "{a:?}"
        );
        let a = h.advance_to_connect(2_000);
        assert_eq!(
            vias(&a),
            vec![(Target::Node(0), Proto::V311)],
            "{refusal:?}"
        );
        // 3.1.1 refused the same way: no second fallback, no flip-flop; judged as usual.
        let a = h.input(Input::ConnectionEnded(refusal.clone()));
        if matches!(refusal, ConnEnd::Refused { .. }) {
            assert_eq!(h.m.phase(), Phase::Stopped, "0x84 twice is fatal: {a:?}");
            continue;
        }
        let a = h.advance_to_connect(10_000);
        assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V311)]);
        h.input(Input::Connected {
            session_present: false,
        });
        // Learned: a later close before CONNACK does not switch back to 5.
        h.input(network_closed());
        let a = h.advance_to_connect(10_000);
        assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V311)]);
    }
}

#[test]
fn auto_remembers_the_protocol_per_node() {
    // Three MQTT 5 nodes; node 0 restarts: it closes one CONNECT before any CONNACK, then
    // refuses TCP. That says nothing about nodes 1 and 2, which must still get MQTT 5.
    let mut h = H::new(Policy {
        protocol: ProtocolMode::Auto,
        brokers: 3,
        ..Policy::default()
    });
    h.input(Input::Start);
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V5)]);
    h.input(network_closed());
    let a = h.advance_to_connect(2_000);
    assert_eq!(
        vias(&a),
        vec![(Target::Node(0), Proto::V311)],
        "node 0: 3.1.1 next"
    );
    h.input(Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Refused,
        detail: "restarting".into(),
    }));
    let a = h.advance_to_connect(10_000);
    assert_eq!(
        vias(&a),
        vec![(Target::Node(1), Proto::V5)],
        "one node's close before CONNACK switched another node to 3.1.1"
    );
    h.input(Input::Connected {
        session_present: true,
    });
    // Node 1 goes away: node 2 has told us nothing either.
    h.input(network_closed());
    let a = h.advance_to_connect(10_000);
    assert_eq!(vias(&a), vec![(Target::Node(2), Proto::V5)]);
    h.input(Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Refused,
        detail: "down".into(),
    }));
    // Back round to node 0: it still gets the 3.1.1 it was found to need.
    let a = h.advance_to_connect(10_000);
    assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V311)]);
    h.input(Input::ConnectionEnded(ConnEnd::Network {
        kind: NetKind::Refused,
        detail: "down".into(),
    }));
    // And node 1 what earned its CONNACK.
    let a = h.advance_to_connect(10_000);
    assert_eq!(vias(&a), vec![(Target::Node(1), Proto::V5)]);
}

#[test]
fn a_fixed_protocol_never_falls_back() {
    let mut h = started_with(Policy::default());
    h.input(Input::ConnectionEnded(ConnEnd::Refused {
        code: 0x84,
        reason: None,
        im_code: None,
    }));
    assert_eq!(
        h.m.phase(),
        Phase::Stopped,
        "v5 only: a 3.1.1 broker is a configuration error"
    );
    let mut h = H::new(Policy {
        protocol: ProtocolMode::V311,
        ..Policy::default()
    });
    h.input(Input::Start);
    let s = h.sig(86_400);
    let a = h.input(Input::SigFetched(s));
    assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V311)]);
}

#[test]
fn redirects_are_followed_a_bounded_number_of_times_in_a_row() {
    let mut h = started_with(Policy {
        brokers: 2,
        ..Policy::default()
    });
    let redirect = |to: &str| {
        Input::ConnectionEnded(ConnEnd::Redirect {
            code: 0x9C,
            reference: to.into(),
            reason: None,
            im_code: None,
        })
    };
    let mut seen = Vec::new();
    for i in 0..MAX_REDIRECTS {
        h.input(redirect(&format!("other-{i}:8883")));
        let a = h.advance_to_connect(10_000);
        seen.extend(vias(&a));
    }
    assert_eq!(
        seen.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        (0..MAX_REDIRECTS)
            .map(|i| Target::Redirect(format!("other-{i}:8883")))
            .collect::<Vec<_>>()
    );
    // One more: not followed; the configured list goes on (node 0, still current).
    h.input(redirect("elsewhere:8883"));
    let a = h.advance_to_connect(60_000);
    assert!(matches!(vias(&a)[..], [(Target::Node(_), _)]), "{a:?}");
    // A CONNACK resets the count.
    h.input(Input::Connected {
        session_present: true,
    });
    h.input(Input::ConnectionEnded(ConnEnd::Redirect {
        code: 0x9D,
        reference: "moved:8883".into(),
        reason: None,
        im_code: None,
    }));
    let a = h.advance_to_connect(60_000);
    assert_eq!(vias(&a)[0].0, Target::Redirect("moved:8883".into()));
}

/// NEL, Unicode's line and paragraph separators, and the bidi controls that reorder what a
/// log reader sees.
const HOSTILE: &[char] = &[
    '\u{0085}', '\u{2028}', '\u{2029}', '\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}', '\u{200E}',
    '\u{200F}', '\u{061C}', '\n', '\r', '\u{1B}',
];

fn clean(text: &str) -> bool {
    !text.contains(HOSTILE) && !text.chars().any(char::is_control)
}

#[test]
fn quote_external_keeps_line_separators_and_bidi_controls_out() {
    for c in HOSTILE {
        let q = quote_external(&format!("a{c}b"), 80);
        assert_eq!(q, "\"a b\"", "{c:?}");
    }
}

#[test]
fn a_redirect_reference_with_line_separators_never_reaches_a_message_unescaped() {
    for c in HOSTILE {
        let mut h = H::started();
        let s = h.sig(3600);
        h.input(Input::SigFetched(s));
        let a = h.input(Input::ConnectionEnded(ConnEnd::Redirect {
            code: 0x9C,
            reference: format!("evil{c}host:8883\nWATCHDOG=trigger"),
            reason: Some(format!("moved{c}away")),
            im_code: None,
        }));
        let failed = a
            .iter()
            .find_map(|a| match a {
                Action::Emit(Event::ConnectFailed { message, .. }) => Some(message.clone()),
                _ => None,
            })
            .expect("connect_failed");
        assert!(clean(&failed), "{c:?}: {failed:?}");
        assert!(clean(&h.last_error().message), "{c:?}");
        let snap = h.m.snapshot();
        assert!(
            clean(&summary(&snap, "mqtts://b:8883", h.now.mono)),
            "{c:?}"
        );
    }
}

// --- expiry signals of real engines (NATS, EMQX, admin DISCONNECTs at expiry) ----------------

impl H {
    /// A sig for alice of `lifetime_s`, issued so that `left_s` of it remain.
    fn sig_ending(&mut self, lifetime_s: i64, left_s: i64) -> SigInfo {
        let mut s = self.sig(lifetime_s);
        s.issued_at = Some(self.now.wall - (lifetime_s - left_s));
        s.expires_at = Some(self.now.wall + left_s);
        s
    }

    /// Fetch (answering with `sig`), connect, CONNACK.
    fn log_in_with(&mut self, sig: SigInfo) -> Vec<Action> {
        let mut a = self.input(Input::SigFetched(sig));
        assert_eq!(connects(&a).len(), 1, "{a:?}");
        a.extend(self.input(Input::Connected {
            session_present: true,
        }));
        assert_eq!(self.phase(), Phase::Online);
        a
    }
}

#[test]
fn a_silent_close_at_the_sigs_expiry_is_sig_expired_renews_first_and_is_never_a_takeover() {
    // NATS closes the socket, with no MQTT packet, 0–1 s after the user JWT's exp. Each
    // session here is a login that lasted under the takeover window, and yet none counts
    // toward a suspected takeover; each is a natural end: no budget, never a stop.
    let mut h = H::started();
    for round in 0..6 {
        // An hour-long sig with 8 s left (its refresh is under way and slow).
        let s = h.sig_ending(3_600, 8);
        h.log_in_with(s);
        h.advance(8_400);
        let a = h.input(network_closed());
        assert!(
            a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })),
            "round {round}: {a:?}"
        );
        let e = h.last_error();
        assert_eq!((e.class, e.code), (ErrorClass::SigExpired, 70001), "{e:?}");
        assert!(e.message.contains("expiry"), "{}", e.message);
        assert!(connects(&a).is_empty(), "never the same sig again: {a:?}");
        assert_ne!(h.phase(), Phase::Kicked, "round {round}");
        assert_ne!(h.phase(), Phase::Stopped, "round {round}");
        // Renew first: a fetch (the one under way, or a new one once paced: these logins
        // last seconds, so after three the fast-login floor spaces them), then a CONNECT.
        if h.phase() != Phase::FetchingSig {
            h.advance_to_fetch(FAST_LOGIN_DELAY_MAX);
        }
    }
}

#[test]
fn a_silent_close_away_from_the_expiry_is_a_network_drop() {
    // Two minutes before the deadline: the same sig again, no fetch.
    let mut h = H::started();
    let s = h.sig_ending(3_600, 130);
    h.log_in_with(s);
    h.advance(10_000);
    let a = h.input(network_closed());
    assert_eq!(h.last_error().class, ErrorClass::Network);
    assert!(!events(&a).contains(&"user_sig_expired"));
    let a = h.advance_to_connect(10_000);
    assert_eq!(fetches(&a), 0);
    // Long after the deadline (a broker that does not enforce it): a close is a close, and
    // the engine then finds the sig expired on its own clock (6206) and renews it.
    let mut h = H::new(Policy {
        refresh_fraction: 0.999,
        ..Policy::default()
    });
    h.input(Input::Start);
    let s = h.sig_ending(3_600, 5);
    h.log_in_with(s);
    h.advance(30_000);
    let a = h.input(network_closed());
    assert!(!a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })));
    assert_eq!(h.last_error().class, ErrorClass::Network);
    h.advance_until(10_000, |a| {
        *a == Action::Emit(Event::UserSigExpired { code: 6206 })
    });
    assert_eq!(h.phase(), Phase::FetchingSig);
}

#[test]
fn disconnect_0x98_at_or_after_the_expiry_is_sig_expired_not_a_kick() {
    for left in [0i64, -3, 40] {
        // An hour-long sig: the skew is 60 s, so 40 s before the deadline is its end too.
        let mut h = H::started();
        let s = h.sig_ending(3_600, 61);
        h.log_in_with(s);
        h.advance((61 - left) as u64 * 1_000);
        let a = h.input(server_disconnect(0x98, "administrative action"));
        assert!(
            a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })),
            "{left} s left: {a:?}"
        );
        assert_ne!(h.phase(), Phase::Kicked);
        assert_eq!(h.last_error().class, ErrorClass::SigExpired);
    }
    // Well before its end, 0x98 is an administrator's kick.
    let mut h = H::started();
    let s = h.sig_ending(3_600, 600);
    h.log_in_with(s);
    h.input(server_disconnect(0x98, "administrative action"));
    assert_eq!(h.phase(), Phase::Kicked);
}

#[test]
fn disconnect_0x87_within_the_skew_of_the_expiry_is_sig_expired_and_spends_no_budget() {
    // EMQX ≥ 5.7 sends DISCONNECT 0x87 at `expire_at` on its clock, which may run a little
    // ahead of ours. More such ends than the premature budget never stop the engine.
    let mut h = H::started();
    for round in 0..5 {
        let s = h.sig_ending(3_600, 30);
        h.log_in_with(s);
        h.advance(29_000);
        let a = h.input(server_disconnect(0x87, "not authorized"));
        assert!(
            a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })),
            "round {round}: {a:?}"
        );
        assert_ne!(h.phase(), Phase::Stopped, "round {round}");
        if h.phase() != Phase::FetchingSig {
            h.advance_to_fetch(FAST_LOGIN_DELAY_MAX);
        }
    }
    // Well before the end, 0x87 is a revocation: one fresh sig, then stop.
    let mut h = H::started();
    let s = h.sig_ending(3_600, 600);
    h.log_in_with(s);
    h.input(server_disconnect(0x87, "not authorized"));
    assert_eq!(h.last_error().class, ErrorClass::SigRejected);
}

// --- logins that do not last: short-lived UserSigs, sessions that end within seconds ---------

/// Count the CONNECTs in `a`.
fn n_connects(a: &[Action]) -> usize {
    connects(a).len()
}

#[test]
fn two_second_sigs_never_become_a_login_every_few_seconds() {
    // The business server issues 2 s sigs (a unit mistake); the broker ends each session at
    // the sig's expiry. Every renewal is a genuine expiry, so no budget stops it: the
    // fast-login floor spaces them instead.
    let mut h = H::started();
    let mut logins = Vec::new();
    let start = h.now.mono;
    while h.now.mono < start + 3_600_000 {
        let s = h.sig(2);
        h.log_in_with(s);
        logins.push(h.now.mono);
        h.advance(2_000);
        let a = h.input(server_disconnect(0xA0, "70001 UserSig expired"));
        assert!(a.contains(&Action::Emit(Event::UserSigExpired { code: 70001 })));
        assert_ne!(
            h.phase(),
            Phase::Stopped,
            "a genuine expiry spends no budget"
        );
        if h.phase() != Phase::FetchingSig {
            h.advance_to_fetch(FAST_LOGIN_DELAY_MAX);
        }
    }
    // Three renewals at the pace of the backoff, then each waits at least half of 1, 2, 4,
    // 8, 16, 30, 30… minutes.
    let gaps: Vec<u64> = logins.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[..3].iter().all(|g| *g < 10_000), "{gaps:?}");
    for (i, g) in gaps[3..].iter().enumerate() {
        let full = (FAST_LOGIN_DELAY << i.min(20)).min(FAST_LOGIN_DELAY_MAX);
        assert!(
            *g >= full / 2,
            "login {}: {g} ms after the last ({gaps:?})",
            i + 5
        );
    }
    assert!(logins.len() <= 12, "{} logins in an hour", logins.len());
    // Within any 10 minutes, far fewer than "one every few seconds".
    for (i, t) in logins.iter().enumerate() {
        let n = logins[i..].iter().take_while(|x| **x < t + 600_000).count();
        assert!(n <= 7, "{n} logins in the 10 minutes from {t}");
    }
}

#[test]
fn the_fast_login_wait_shows_in_the_status_and_a_local_login_cuts_it_short() {
    let mut h = H::started();
    for _ in 0..4 {
        let s = h.sig(2);
        h.log_in_with(s);
        h.advance(2_000);
        h.input(server_disconnect(0xA0, "70001 UserSig expired"));
        if h.phase() == Phase::Backoff && h.retry_in() > 10_000 {
            break;
        }
        if h.phase() != Phase::FetchingSig {
            h.advance_to_fetch(60_000);
        }
    }
    assert_eq!(h.phase(), Phase::Backoff);
    let wait = h.retry_in();
    assert!((30_000..=60_000).contains(&wait), "{wait}");
    let e = h.last_error();
    assert_eq!(e.class, ErrorClass::SigExpired);
    assert!(
        e.message.contains("4 such logins in a row") && e.message.contains("the next one waits"),
        "{}",
        e.message
    );
    let line = summary(&h.m.snapshot(), "mqtts://b:8883", h.now.mono);
    assert!(line.starts_with("retrying in "), "{line}");
    // An operator's login gets it moving now (never closer than the backoff base).
    let a = h.input(Input::Login {
        id: 1,
        user: None,
        sig: None,
    });
    let a = [a, h.advance(1_000)].concat();
    assert_eq!(fetches(&a), 1, "{a:?}");
}

#[test]
fn a_one_second_sig_refused_at_connack_is_spaced_the_same_way() {
    // No session at all: each sig is past its end by the time the broker sees it.
    let mut h = H::started();
    let mut attempts = Vec::new();
    let start = h.now.mono;
    while h.now.mono < start + 1_800_000 {
        let s = h.sig(1);
        let a = h.input(Input::SigFetched(s));
        assert_eq!(n_connects(&a), 1);
        attempts.push(h.now.mono);
        h.advance(1_000);
        h.input(refused(0x87));
        assert_eq!(h.last_error().class, ErrorClass::SigExpired);
        if h.phase() != Phase::FetchingSig {
            h.advance_to_fetch(FAST_LOGIN_DELAY_MAX);
        }
    }
    assert!(
        attempts.len() <= 10,
        "{} attempts in 30 min",
        attempts.len()
    );
}

#[test]
fn twenty_second_sigs_are_still_refreshed_proactively_and_used() {
    // The integration tests' lifetimes: each sig is refreshed at ~80 % and the session moves
    // to it (a planned move, not a login that did not last), for as long as it goes on.
    let mut h = H::online(20);
    let mut moves = 0;
    let start = h.now.mono;
    while h.now.mono < start + 600_000 {
        let a = h.advance_to_fetch(20_000);
        assert!(
            h.now.mono <= h.m.snapshot().sig.unwrap().deadline_ms.unwrap(),
            "refreshed before it expired"
        );
        assert!(!events(&a).contains(&"user_sig_expired"));
        let s = h.sig(20);
        let fp = s.fingerprint.clone();
        let a = h.input(Input::SigFetched(s));
        assert!(has(&a, &Action::Disconnect), "{a:?}");
        let a = h.input(Input::Disconnected);
        assert_eq!(connects(&a), vec![fp], "at once, with the new sig");
        h.input(Input::Connected {
            session_present: true,
        });
        moves += 1;
    }
    assert!(moves >= 30, "{moves} moves in 10 minutes");
    assert!(h.m.snapshot().last_error.is_none());
}

#[test]
fn sessions_that_keep_ending_within_seconds_are_spaced_whatever_the_backoff_cap() {
    // A broker that accepts each login and ends it 200 ms later "busy" (0x97), with a 10 s
    // backoff cap: without a floor, a login every ~5 s for as long as it lasts.
    let mut h = H::new(Policy {
        backoff: BackoffPolicy {
            base: 100,
            cap: 10_000,
            reset_after: 300_000,
        },
        ..Policy::default()
    });
    h.input(Input::Start);
    let s = h.sig(86_400);
    h.input(Input::SigFetched(s));
    let mut logins = 0;
    let start = h.now.mono;
    while h.now.mono < start + 600_000 {
        h.input(Input::Connected {
            session_present: true,
        });
        logins += 1;
        h.advance(200);
        h.input(server_disconnect(0x97, "quota exceeded"));
        assert_eq!(h.last_error().class, ErrorClass::Busy);
        h.advance_to_connect(FAST_LOGIN_DELAY_MAX);
    }
    assert!(logins <= 8, "{logins} logins in 10 minutes");
    // A session that lasts a minute starts the count over: the next drop reconnects at the
    // pace of the backoff again.
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(61_000);
    h.input(network_closed());
    assert!(h.retry_in() <= 10_000, "{}", h.retry_in());
}

// --- refusals of fresh UserSigs: an auth outage must not strand a fleet --------------------

/// Refused (CONNACK 0x87, what NATS's CONNACK 5 becomes) with the sig in hand and with the one
/// fresh sig after it: the engine stops. Returns the actions on the way.
fn refused_twice(h: &mut H) -> Vec<Action> {
    let s = h.sig(3600);
    let mut a = h.input(Input::SigFetched(s));
    a.extend(h.input(refused(0x87)));
    assert_eq!(fetches(&a), 1, "one fresh UserSig: {a:?}");
    let s = h.sig(3600);
    a.extend(h.input(Input::SigFetched(s)));
    a.extend(h.input(refused(0x87)));
    assert_eq!(h.phase(), Phase::Stopped);
    a
}

#[test]
fn after_the_rejection_budget_one_more_fresh_try_after_a_long_doubling_cool_down() {
    let mut h = H::started();
    refused_twice(&mut h);
    let snap = h.m.snapshot();
    let wait = snap.next_retry_ms.expect("a next try") - h.now.mono;
    assert!(
        (1_350_000..=2_250_000).contains(&wait),
        "30 min ± 25 %: {wait}"
    );
    let e = h.last_error();
    assert_eq!(e.class, ErrorClass::SigRejected);
    assert!(
        e.message.contains("one more try with a fresh UserSig"),
        "{}",
        e.message
    );
    let line = summary(&snap, "mqtts://b:8883", h.now.mono);
    assert!(
        line.starts_with("stopped: ") && line.contains("next try in"),
        "{line}"
    );
    assert_eq!(h.m.login_status(), login_status::LOGOUT);
    // Nothing until then; then one fresh UserSig and one CONNECT, refused again: stopped for
    // twice as long. Over two days: 30 min, 1 h, 2 h, 4 h, 8 h, then every 8 h.
    let mut tries = Vec::new();
    let start = h.now.mono;
    while h.now.mono < start + 48 * 3_600_000 {
        let before = h.now.mono;
        let a = h.advance_to_fetch(11 * 3_600_000);
        assert!(connects(&a).is_empty());
        tries.push(h.now.mono - before);
        let s = h.sig(3600);
        let a = h.input(Input::SigFetched(s));
        assert_eq!(n_connects(&a), 1);
        let a = h.input(refused(0x87));
        assert_eq!(fetches(&a), 0, "no second fresh sig: {a:?}");
        assert_eq!(h.phase(), Phase::Stopped);
    }
    let hours: Vec<f64> = tries.iter().map(|t| *t as f64 / 3_600_000.0).collect();
    for (i, t) in tries.iter().enumerate() {
        let full = (1_800_000u64 << i.min(20)).min(8 * 3_600_000);
        assert!(
            *t >= full - full / 4 && *t <= full + full / 4,
            "try {i}: {hours:?}"
        );
    }
    assert!(tries.len() <= 10, "{hours:?}");
}

#[test]
fn an_auth_service_that_returns_brings_the_device_back_by_itself() {
    let mut h = H::started();
    refused_twice(&mut h);
    h.advance_to_fetch(40 * 60_000);
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: true,
    });
    assert_eq!(h.phase(), Phase::Online);
    assert_eq!(h.m.login_status(), login_status::LOGINED);
    // A refusal right after (before the session is stable) stops again, doubled.
    h.advance(10_000);
    h.input(server_disconnect(0x87, "not authorized"));
    assert_eq!(h.phase(), Phase::Stopped);
    assert!(h.m.snapshot().next_retry_ms.unwrap() - h.now.mono >= 45 * 60_000);
    // Once a session stays up for the reset window, the cool-downs start over.
    h.advance_to_fetch(80 * 60_000);
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(Policy::default().backoff.reset_after + 1_000);
    h.input(server_disconnect(0x87, "not authorized"));
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(refused(0x87));
    assert_eq!(h.phase(), Phase::Stopped);
    let wait = h.m.snapshot().next_retry_ms.unwrap() - h.now.mono;
    assert!(wait <= 2_250_000, "30 min again: {wait}");
}

#[test]
fn rejected_cooldown_0_stays_stopped_and_without_provisioning_only_the_app_can_help() {
    // The SDK's advice, by choice: no retry after the rejection budget.
    let mut h = H::new(Policy {
        rejected_cooldown: 0,
        ..Policy::default()
    });
    h.input(Input::Start);
    refused_twice(&mut h);
    assert_eq!(h.m.snapshot().next_retry_ms, None);
    assert!(h.advance(48 * 3_600_000).is_empty());
    assert!(summary(&h.m.snapshot(), "b", h.now.mono).ends_with("run `imlinkctl login`"));
    // Without provisioning there is no fresh UserSig to try: the app's sig was refused.
    let mut h = H::new(Policy {
        provisioning: false,
        ..Policy::default()
    });
    let s = h.sig(3600);
    h.input(Input::Login {
        id: 1,
        user: None,
        sig: Some(s),
    });
    h.input(refused(0x87));
    assert_eq!(h.phase(), Phase::Stopped);
    assert_eq!(h.m.snapshot().next_retry_ms, None);
}

#[test]
fn provisioning_handing_back_the_sig_that_just_expired_is_an_expired_sig_never_sent_again() {
    // A provisioning cache serves the sig the broker has just ended at its expiry, with a
    // `Date` two hours behind that makes it look good on our clock.
    let mut h = H::started();
    let s = h.sig_ending(3_600, 10);
    let stale = s.clone();
    h.log_in_with(s);
    h.advance(10_300);
    h.input(server_disconnect(0xA0, "70001 UserSig expired"));
    let mut again = stale;
    again.server_now -= 7_200;
    again.received_at = h.now.mono;
    if h.phase() != Phase::FetchingSig {
        h.advance_to_fetch(60_000);
    }
    let a = h.input(Input::SigFetched(again));
    assert!(connects(&a).is_empty(), "{a:?}");
    assert_eq!(h.last_error().code, 6206);
    let a = h.advance_to_fetch(60_000);
    assert!(connects(&a).is_empty());
}

#[test]
fn an_operators_login_during_a_backoff_earns_the_fresh_retry_after_a_refusal_again() {
    // A refusal spent the one fresh UserSig; that login never became stable. Later, in a
    // backoff, an operator logs in and the sig in hand is refused: a fresh UserSig, not a stop.
    let mut h = H::started();
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(refused(0x87));
    let s = h.sig(3600);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(20_000);
    h.input(network_closed());
    assert_eq!(h.phase(), Phase::Backoff);
    let a = h.input(Input::Login {
        id: 9,
        user: None,
        sig: None,
    });
    let a = if n_connects(&a) == 0 {
        h.advance_to_connect(2_000)
    } else {
        a
    };
    assert_eq!(n_connects(&a), 1);
    let a = h.input(refused(0x87));
    assert_eq!(fetches(&a), 1, "one fresh UserSig again: {a:?}");
    assert_ne!(h.phase(), Phase::Stopped);
}

#[test]
fn a_fresh_start_drops_a_redirect_still_pending() {
    // A redirect arrives, the engine waits its backoff; a logout and a login later it starts
    // over at the configured node (a redirect kept from before would be followed uncounted).
    let mut h = started_with(Policy::default());
    h.input(Input::ConnectionEnded(ConnEnd::Redirect {
        code: 0x9C,
        reference: "elsewhere:8883".into(),
        reason: None,
        im_code: None,
    }));
    assert_eq!(h.phase(), Phase::Backoff);
    h.input(Input::Logout { id: 1 });
    assert_eq!(h.phase(), Phase::Idle);
    let a = h.input(Input::Login {
        id: 2,
        user: None,
        sig: None,
    });
    let a = if n_connects(&a) == 0 {
        h.advance_to_connect(2_000)
    } else {
        a
    };
    assert_eq!(vias(&a), vec![(Target::Node(0), Proto::V5)]);
}

#[test]
fn a_session_of_the_old_user_does_not_make_the_new_one_stable() {
    // Alice has been online 200 s when the account switches to bob. Bob's first sigs arrive
    // already expired (renewals paced by backoff), then one works. Bob's session is not
    // stable 100 s later just because alice's would have been: his renewals stay paced.
    let mut h = H::online(86_400);
    h.advance(200_000);
    h.input(Input::Login {
        id: 1,
        user: Some(bob()),
        sig: None,
    });
    h.input(Input::Disconnected);
    for _ in 0..2 {
        let mut s = h.sig_for(bob(), 60);
        s.server_now = s.expires_at.unwrap() + 1;
        h.input(Input::SigFetched(s));
        h.advance_to_fetch(60_000);
    }
    let s = h.sig_for(bob(), 86_400);
    h.input(Input::SigFetched(s));
    h.input(Input::Connected {
        session_present: true,
    });
    h.advance(150_000);
    let a = h.input(server_disconnect(0xA0, "70001 UserSig expired"));
    assert_eq!(fetches(&a), 0, "paced, not at once: {a:?}");
    assert_eq!(h.phase(), Phase::Backoff);
}
