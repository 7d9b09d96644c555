//! The daemon's metrics in the Prometheus text format, rendered from a [`Status`] (and the
//! store's figures when there are some): what the `metrics` API method answers, what
//! `imlinkctl metrics` prints, and what goes into `metrics.textfile` for node_exporter's
//! textfile collector.
//!
//! The format is the text exposition format 0.0.4 that Prometheus, promtool and the textfile
//! collector read — `# HELP` and `# TYPE` for every family, counters named `…_total` in both —
//! ended by OpenMetrics' `# EOF` line (a comment to a 0.0.4 reader). Names follow Prometheus'
//! conventions: the `imlinkd_` prefix, base units (seconds, bytes), Unix times as
//! `…_timestamp_seconds` or `…_since_seconds`. `promtool check metrics` passes on it with no
//! lint (`tests/metrics.rs`).
//!
//! Every value is a function of the status, which changes only when something happens: no
//! "seconds since" durations that would change every second, so a textfile written on change
//! is never stale. Alerts compute ages with `time() - …`.
//!
//! Label values come from the daemon's own config and state (version, UserID, phase names,
//! error classes, the broker URL): they are escaped as the format requires, never trusted.

use std::fmt::Write;

use crate::session::Phase;
use crate::status::Status;

/// What the store adds, when it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreFigures {
    /// Messages held (either direction, any state).
    pub messages: u64,
    /// Bytes in use (pages in use, not free ones).
    pub bytes: u64,
    /// What the current user has waiting, when the store said.
    pub counts: Option<crate::store::Counts>,
}

/// The metrics now: the status, and the store's figures when it answers (a busy or broken
/// store leaves them out rather than failing the scrape). What the API's `metrics` method
/// answers and what `metrics.textfile` holds.
pub async fn current(session: &crate::status::SessionHandle) -> String {
    use crate::store::StoreRequest;
    let st = session.status.borrow().clone();
    let counts = session
        .store
        .ask(|reply| StoreRequest::Counts {
            owner: st.user_id.clone(),
            reply,
        })
        .await
        .ok();
    let store = session
        .store
        .ask(|reply| StoreRequest::Stats { reply })
        .await
        .ok()
        .map(|(messages, bytes)| StoreFigures {
            messages,
            bytes,
            counts,
        });
    render(&st, store)
}

/// How often `metrics.textfile` may be rewritten at most (a burst of changes is one write).
pub const TEXTFILE_PACE: std::time::Duration = std::time::Duration::from_secs(5);

/// node_exporter's textfile collector: the metrics written to `path` (atomically, 0644)
/// whenever the status changed, at most once per [`TEXTFILE_PACE`]; nothing is written — and
/// nothing wakes — while nothing changes.
pub async fn textfile(session: crate::status::SessionHandle, path: std::path::PathBuf) {
    let mut rx = session.status.clone();
    let mut last = String::new();
    loop {
        rx.borrow_and_update();
        let text = current(&session).await;
        if text != last {
            let (p, bytes) = (path.clone(), text.clone().into_bytes());
            let r = tokio::task::spawn_blocking(move || {
                crate::usersig::write_atomic(&p, &bytes, 0o644)
            })
            .await;
            match r {
                Ok(Ok(())) => last = text,
                Ok(Err(e)) => tracing::warn!(
                    "could not write the metrics to {} (metrics.textfile): {e}",
                    path.display()
                ),
                Err(_) => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(TEXTFILE_PACE).await;
    }
}

/// Every phase, in the order the metrics list them.
const PHASES: [Phase; 10] = Phase::ALL;

/// Consecutive failed UserSig renewals, for the alert.
///
/// Consecutive failed UserSig fetches since the last usable one (the status contract's
/// `user_sig.failures`): an alert fires on it staying above 0.
fn renewal_failures(st: &Status) -> Option<u64> {
    Some(u64::from(st.renewal_failures))
}

/// Queued outgoing messages of the current user, when the store answered.
fn outbox_pending(store: Option<&StoreFigures>) -> Option<u64> {
    store.and_then(|s| s.counts).map(|c| c.outbox_pending)
}

/// Received messages of the current user its inbox consumer has not acknowledged.
fn inbox_unacked(store: Option<&StoreFigures>) -> Option<u64> {
    store.and_then(|s| s.counts).map(|c| c.inbox_unacked)
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }
}

/// The metrics of `st` (and of the store, when `store` is given), ending with `# EOF`.
pub fn render(st: &Status, store: Option<StoreFigures>) -> String {
    let mut t = Text(String::with_capacity(6 * 1024));
    t.family(
        "imlinkd_info",
        "gauge",
        "The daemon's version and identity (always 1).",
    );
    let app = st.sdk_app_id.to_string();
    t.sample(
        "imlinkd_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("user_id", &st.user_id),
            ("sdk_app_id", &app),
        ],
        1,
    );

    t.family(
        "imlinkd_phase",
        "gauge",
        "The session's phase: 1 for the current one, 0 for the others.",
    );
    for p in PHASES {
        t.sample(
            "imlinkd_phase",
            &[("phase", p.as_str())],
            u8::from(p == st.phase),
        );
    }
    t.gauge(
        "imlinkd_phase_since_seconds",
        "Unix time (seconds) when the current phase began.",
        st.since,
    );
    t.gauge(
        "imlinkd_login_status",
        "The SDK's login status: 1 logged in, 2 logging in, 3 logged out.",
        st.login_status,
    );
    t.gauge(
        "imlinkd_inbox_subscribed",
        "1 when the broker granted the inbox subscription (messages to this user arrive).",
        u8::from(st.inbox_subscribed),
    );
    t.family(
        "imlinkd_broker_info",
        "gauge",
        "The broker node in use (or the first configured) and the MQTT version (always 1).",
    );
    t.sample(
        "imlinkd_broker_info",
        &[
            ("broker", &st.broker),
            ("protocol", st.protocol.map_or("none", |p| p.as_str())),
        ],
        1,
    );
    t.family(
        "imlinkd_last_error_code",
        "gauge",
        "The IM code of the last error (docs/errors.md), by class; 0 with class none when there is none.",
    );
    match &st.last_error {
        Some(e) => t.sample(
            "imlinkd_last_error_code",
            &[("class", e.class.as_str())],
            e.code,
        ),
        None => t.sample("imlinkd_last_error_code", &[("class", "none")], 0),
    }
    if let Some(ms) = st.next_retry_at_ms {
        t.gauge(
            "imlinkd_next_attempt_timestamp_seconds",
            "Unix time (seconds) of the next login attempt, when one is scheduled.",
            ms.div_euclid(1000),
        );
    }

    let c = &st.counters;
    t.counter(
        "imlinkd_connect_attempts_total",
        "CONNECTs sent to the broker.",
        c.connect_attempts,
    );
    t.counter(
        "imlinkd_logins_total",
        "CONNECTs the broker accepted.",
        c.logins,
    );
    t.counter(
        "imlinkd_kicks_total",
        "Times the session was kicked offline.",
        c.kicks,
    );
    t.counter(
        "imlinkd_subscribe_refusals_total",
        "Inbox SUBSCRIBEs the broker refused or left unanswered.",
        c.subscribe_refusals,
    );
    t.counter(
        "imlinkd_usersig_fetches_total",
        "UserSig fetches from the provisioning URL.",
        c.sig_fetches,
    );
    t.counter(
        "imlinkd_usersig_fetch_failures_total",
        "UserSig fetches that failed.",
        c.sig_fetch_failures,
    );
    t.counter(
        "imlinkd_usersig_refreshes_total",
        "UserSigs renewed before they expired.",
        c.sig_refreshes,
    );

    if let Some(sig) = &st.sig {
        if let Some(exp) = sig.expires_at {
            t.gauge(
                "imlinkd_usersig_expiry_timestamp_seconds",
                "Unix time (seconds, the issuer's clock) when the current UserSig expires.",
                exp,
            );
        }
        if let Some(at) = sig.refresh_at {
            t.gauge(
                "imlinkd_usersig_refresh_timestamp_seconds",
                "Unix time (seconds) of the next proactive UserSig renewal.",
                at,
            );
        }
        t.gauge(
            "imlinkd_usersig_refreshing",
            "1 while a UserSig renewal is in progress (or being retried).",
            u8::from(sig.refreshing),
        );
    }
    if let Some(n) = renewal_failures(st) {
        t.gauge(
            "imlinkd_usersig_renewal_failures",
            "Consecutive failed UserSig renewals (0 once one succeeds).",
            n,
        );
    }

    let m = &st.messages;
    t.counter(
        "imlinkd_messages_sent_total",
        "Messages the broker acknowledged as sent.",
        m.counters.sent,
    );
    t.counter(
        "imlinkd_messages_received_total",
        "Messages received and stored (not counting redeliveries).",
        m.counters.received,
    );
    t.counter(
        "imlinkd_messages_failed_total",
        "Outgoing messages the broker refused for good.",
        m.counters.failed,
    );
    t.family(
        "imlinkd_messages_dropped_total",
        "counter",
        "Incoming PUBLISHes acknowledged and dropped, by reason.",
    );
    for (reason, n) in [
        ("forged", m.counters.dropped_forged),
        ("oversized", m.counters.dropped_oversized),
        ("invalid", m.counters.dropped_invalid),
    ] {
        t.sample("imlinkd_messages_dropped_total", &[("reason", reason)], n);
    }
    t.gauge(
        "imlinkd_messages_in_flight",
        "Outgoing messages published and not yet acknowledged by the broker.",
        m.in_flight,
    );
    if let Some(n) = outbox_pending(store.as_ref()) {
        t.gauge(
            "imlinkd_outbox_pending",
            "Outgoing messages queued in the store, not yet acknowledged by the broker.",
            n,
        );
    }
    if let Some(n) = inbox_unacked(store.as_ref()) {
        t.gauge(
            "imlinkd_inbox_unacked",
            "Received messages the inbox consumer has not acknowledged.",
            n,
        );
    }
    t.gauge(
        "imlinkd_inbound_held",
        "1 while the store is full and received messages wait at the broker.",
        u8::from(m.inbound_held),
    );
    if let Some(s) = store {
        t.gauge(
            "imlinkd_store_messages",
            "Messages in the store, either direction.",
            s.messages,
        );
        t.gauge(
            "imlinkd_store_bytes",
            "Bytes the message store uses (pages in use).",
            s.bytes,
        );
    }
    t.0.push_str("# EOF\n");
    t.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Counters, ErrorClass, LastError, Proto};
    use crate::status::{MessagesView, SigView};

    fn status() -> Status {
        Status {
            phase: Phase::Online,
            summary: "online as kiosk-0042".into(),
            login_status: 1,
            login_user: "kiosk-0042".into(),
            user_id: "kiosk-0042".into(),
            sdk_app_id: 1_400_000_000,
            broker: "mqtts://n1.example:8883".into(),
            protocol: Some(Proto::V5),
            inbox_subscribed: true,
            next_subscribe_at_ms: None,
            since: 1_765_000_000,
            last_error: Some(LastError::new(9508, ErrorClass::Network, "x")),
            sig: Some(SigView {
                fingerprint: "f".into(),
                expires_at: Some(1_765_086_400),
                valid_until: Some(1_765_086_000),
                refresh_at: Some(1_765_070_000),
                refreshing: false,
            }),
            renewal_failures: 0,
            next_retry_at_ms: None,
            counters: Counters {
                connect_attempts: 3,
                logins: 2,
                ..Counters::default()
            },
            messages: MessagesView::default(),
            last_event: None,
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_the_text_ends_with_eof() {
        let text = render(
            &status(),
            Some(StoreFigures {
                messages: 7,
                bytes: 4096,
                counts: Some(crate::store::Counts {
                    outbox_pending: 2,
                    inbox_unacked: 3,
                }),
            }),
        );
        assert!(text.ends_with("# EOF\n"));
        let mut helped = std::collections::HashSet::new();
        let mut typed = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap().to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split(' ');
                typed.insert(w.next().unwrap().to_string(), w.next().unwrap().to_string());
            } else if line != "# EOF" {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with("imlinkd_"), "{line}");
                assert!(helped.contains(name) && typed.contains_key(name), "{line}");
                assert_eq!(
                    typed[name] == "counter",
                    name.ends_with("_total"),
                    "counters and only counters end in _total: {line}"
                );
            }
        }
        for want in [
            "imlinkd_phase{phase=\"online\"} 1",
            "imlinkd_phase{phase=\"backoff\"} 0",
            "imlinkd_phase_since_seconds 1765000000",
            "imlinkd_login_status 1",
            "imlinkd_connect_attempts_total 3",
            "imlinkd_logins_total 2",
            "imlinkd_usersig_expiry_timestamp_seconds 1765086400",
            "imlinkd_last_error_code{class=\"network\"} 9508",
            "imlinkd_messages_dropped_total{reason=\"forged\"} 0",
            "imlinkd_store_bytes 4096",
            "imlinkd_info{version=\"",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
        assert_eq!(text.matches("imlinkd_phase{").count(), 10);
    }

    #[test]
    fn label_values_are_escaped_and_absent_figures_left_out() {
        let mut st = status();
        st.user_id = "a\"b\\c\nd".into();
        st.sig = None;
        st.last_error = None;
        let text = render(&st, None);
        assert!(text.contains(r#"user_id="a\"b\\c\nd""#), "escaped: {text}");
        assert!(text.contains("imlinkd_last_error_code{class=\"none\"} 0"));
        assert!(!text.contains("imlinkd_usersig_expiry"));
        assert!(!text.contains("imlinkd_store_bytes"));
    }
}
