//! The fleet view's logic on a fixed clock: documents decoded totally, who needs attention and
//! in what order, what "offline for" can mean, the `--watch` changes, the renderings and the
//! command line.

use super::*;

const APP: u64 = 1_400_000_000;
const NOW: i64 = 1_765_000_000;

fn topic(user: &str, instance: &str) -> String {
    format!("im/{APP}/d/{user}/linux/{instance}/status")
}

fn doc(state: &str, phase: Option<&str>, since: i64) -> Vec<u8> {
    json!({
        "v": 1, "state": state,
        "reason": match state { "offline" => json!("connection lost"), "stopped" => json!("service stopped"),
                                "logged_out" => json!("logged out"), _ => Value::Null },
        "phase": phase, "login_status": 1, "user_id": "ignored", "platform": "linux", "instance": "0",
        "version": "0.1.0", "since": since, "at": since + 1,
        "last_error": null, "user_sig": {"expires_at": NOW + 86_400, "renewal": "ok", "failures": 0},
        "broker": "mqtts://n1.example:8883", "protocol": "v5", "outbox_pending": 0, "inbox_unacked": 0
    })
    .to_string()
    .into_bytes()
}

fn with(mut base: Value, patch: Value) -> Vec<u8> {
    if let (Some(b), Some(p)) = (base.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            b.insert(k.clone(), v.clone());
        }
    }
    base.to_string().into_bytes()
}

fn doc_value(state: &str, phase: Option<&str>, since: i64) -> Value {
    serde_json::from_slice(&doc(state, phase, since)).unwrap()
}

fn fleet() -> Fleet {
    Fleet::new(APP, Duration::from_secs(600))
}

#[test]
fn a_v1_document_is_read_and_unknown_fields_are_ignored() {
    let d = parse_doc(&with(
        doc_value("online", Some("online"), NOW - 60),
        json!({"newer_field": {"x": [1, 2]}, "last_error": {"class": "network", "code": 9508, "message": "ignored"}}),
    ))
    .unwrap();
    assert_eq!(d.state, State::Online);
    assert_eq!(d.phase.as_deref(), Some("online"));
    assert_eq!(
        d.last_error,
        Some(ErrorKey {
            class: "network".into(),
            code: 9508
        })
    );
    assert_eq!(d.user_sig.as_ref().unwrap().renewal, Renewal::Ok);
    assert_eq!(d.since, Some(NOW - 60));
    // The will: phase null, and the minimal document still reads.
    let will =
        parse_doc(br#"{"v":1,"state":"offline","reason":"connection lost","phase":null}"#).unwrap();
    assert_eq!((will.state, will.phase), (State::Offline, None));
}

#[test]
fn what_is_not_a_v1_document_is_unreadable_with_the_reason() {
    let cases: [(&[u8], &str); 9] = [
        (b"not json", "not JSON"),
        (b"[1,2]", "not a JSON object"),
        (br#"{"state":"online"}"#, "no version"),
        (br#"{"v":2,"state":"online"}"#, "version 2"),
        (br#"{"v":1}"#, "no state"),
        (br#"{"v":1,"state":"dancing"}"#, "state \"dancing\""),
        (
            br#"{"v":1,"state":"online","since":"yesterday"}"#,
            "since is not",
        ),
        (
            br#"{"v":1,"state":"online","login_status":7}"#,
            "login_status",
        ),
        (
            br#"{"v":1,"state":"online","user_sig":{"renewal":"meh"}}"#,
            "renewal",
        ),
    ];
    for (payload, says) in cases {
        let e = parse_doc(payload).unwrap_err();
        assert!(e.contains(says), "{e:?} should say {says:?}");
    }
    let big = vec![b' '; MAX_DOC_BYTES + 1];
    assert!(parse_doc(&big).unwrap_err().contains("at most"));
}

#[test]
fn strings_from_devices_lose_control_characters_and_are_capped() {
    let d = parse_doc(&with(
        doc_value("online", Some("online"), NOW),
        json!({"version": "1.0\u{1b}[31m\nred", "broker": "x".repeat(500)}),
    ))
    .unwrap();
    assert_eq!(d.version.as_deref(), Some("1.0[31mred"));
    assert_eq!(d.broker.as_ref().unwrap().chars().count(), 129, "128 and …");
    let id = parse_topic(APP, &format!("im/{APP}/d/evil\u{7}\u{1b}/linux/0/status")).unwrap();
    assert_eq!(id.user, "evil");
    // What a text report prints of it is quoted.
    let mut f = fleet();
    f.apply(
        &format!("im/{APP}/d/a\"b\nc/linux/0/status"),
        &doc("stopped", Some("stopped"), NOW - 5),
        true,
        NOW,
    );
    let text = render_text(&f, NOW);
    assert!(text.contains("\"a'bc/linux/0\""), "{text}");
    assert!(!text.contains('\u{1b}'));
}

#[test]
fn only_this_apps_status_topics_count() {
    assert!(parse_topic(APP, &topic("u", "0")).is_some());
    for t in [
        format!("im/{}/d/u/linux/0/status", APP + 1),
        format!("im/{APP}/d/u/linux/0/other"),
        format!("im/{APP}/d/u/linux/status"),
        format!("im/{APP}/d/u/linux/0/status/x"),
        format!("im/{APP}/u/u/linux/0/status"),
        format!("im/{APP}/d//linux/0/status"),
    ] {
        assert!(parse_topic(APP, &t).is_none(), "{t}");
    }
    let mut f = fleet();
    assert_eq!(f.apply(&format!("im/{APP}/d/x"), b"{}", true, NOW), None);
    assert_eq!((f.len(), f.ignored), (0, 1));
}

#[test]
fn attention_is_sorted_by_severity_then_age() {
    let mut f = fleet();
    let put = |f: &mut Fleet, user: &str, payload: Vec<u8>| {
        f.apply(&topic(user, "0"), &payload, true, NOW);
    };
    put(&mut f, "fine", doc("online", Some("online"), NOW - 9_000));
    put(
        &mut f,
        "stopped-new",
        doc("stopped", Some("stopped"), NOW - 10),
    );
    put(
        &mut f,
        "stopped-old",
        doc("stopped", Some("stopped"), NOW - 9_000),
    );
    // Phase stopped on an error (the document of the last connection said so).
    put(
        &mut f,
        "gave-up",
        with(
            doc_value("online", Some("stopped"), NOW - 100),
            json!({"last_error": {"class": "sig_rejected", "code": 70003}}),
        ),
    );
    put(
        &mut f,
        "kicked",
        with(
            doc_value("online", Some("online"), NOW - 50),
            json!({"last_error": {"class": "kicked", "code": 6208}}),
        ),
    );
    put(
        &mut f,
        "failing",
        with(
            doc_value("online", Some("online"), NOW - 50),
            json!({"user_sig": {"expires_at": NOW + 60, "renewal": "failing", "failures": 4}}),
        ),
    );
    put(&mut f, "gone-long", doc("offline", None, NOW - 7_200));
    put(&mut f, "gone-short", doc("offline", None, NOW - 300));
    put(&mut f, "out", doc("logged_out", Some("idle"), NOW - 20));
    f.apply(&topic("junk", "0"), br#"{"v":9}"#, true, NOW);

    let order: Vec<(&str, Vec<Concern>)> = f
        .attention(NOW)
        .into_iter()
        .map(|(id, _, c)| (id.user.as_str(), c))
        .collect();
    assert_eq!(
        order,
        [
            ("stopped-old", vec![Concern::Stopped]),
            ("gave-up", vec![Concern::Stopped]),
            ("stopped-new", vec![Concern::Stopped]),
            ("kicked", vec![Concern::Kicked]),
            ("failing", vec![Concern::RenewalFailing]),
            ("gone-long", vec![Concern::Offline]),
            ("out", vec![Concern::LoggedOut]),
            ("junk", vec![Concern::Unreadable]),
        ]
    );
    // Offline 5 minutes at most: below the threshold, not listed.
    let s = f.summary(NOW);
    assert_eq!(s.devices, 10);
    assert_eq!(s.attention, 8);
    assert_eq!(s.unreadable, 1);
    assert_eq!(s.by_state["online"], 4);
    assert_eq!(s.by_state["offline"], 2);
    assert_eq!(s.by_state["stopped"], 2);
    assert_eq!(s.by_state["logged_out"], 1);
    assert_eq!(s.by_phase["none"], 2, "the wills have no phase");
    assert_eq!(
        s.by_error[&ErrorKey {
            class: "kicked".into(),
            code: 6208
        }],
        1
    );
}

/// A retained will says when the connection *began*: a reader that did not see the device go
/// offline knows only an upper bound. One that watched knows when.
#[test]
fn offline_for_is_known_only_when_watched() {
    let mut f = fleet();
    f.apply(
        &topic("a", "0"),
        &doc("offline", None, NOW - 3_600),
        true,
        NOW,
    );
    let d = f
        .device(&parse_topic(APP, &topic("a", "0")).unwrap())
        .unwrap();
    assert_eq!(f.offline(d, NOW), Some(Offline::AtMost(3_600)));
    assert_eq!(f.concerns(d, NOW), [Concern::Offline], "possibly too long");
    let text = render_text(&f, NOW);
    assert!(text.contains("last connected 60m ago"), "{text}");

    // Watched: online, then the will arrives live at NOW.
    f.apply(
        &topic("b", "0"),
        &doc("online", Some("online"), NOW - 3_600),
        true,
        NOW,
    );
    f.apply(
        &topic("b", "0"),
        &doc("offline", None, NOW - 3_600),
        false,
        NOW,
    );
    let b = parse_topic(APP, &topic("b", "0")).unwrap();
    assert_eq!(
        f.offline(f.device(&b).unwrap(), NOW + 5),
        Some(Offline::For(5))
    );
    assert!(
        f.concerns(f.device(&b).unwrap(), NOW + 5).is_empty(),
        "5 s: fine"
    );
    // It crosses the threshold once, when it has been offline longer than 600 s.
    assert_eq!(f.next_crossing(), Some(NOW + 601));
    assert!(f.crossed(NOW + 600).is_empty());
    assert!(f.concerns(f.device(&b).unwrap(), NOW + 600).is_empty());
    assert_eq!(
        f.crossed(NOW + 601),
        [Change::OfflineTooLong { id: b.clone() }]
    );
    assert!(f.crossed(NOW + 10_000).is_empty());
    assert_eq!(
        f.concerns(f.device(&b).unwrap(), NOW + 601),
        [Concern::Offline]
    );
    // Re-read after a reconnect (retained, still offline): what was known is kept.
    assert_eq!(
        f.apply(
            &topic("b", "0"),
            &doc("offline", None, NOW - 3_600),
            true,
            NOW + 700
        ),
        None
    );
    assert_eq!(
        f.offline(f.device(&b).unwrap(), NOW + 700),
        Some(Offline::For(700))
    );
    // Back online before crossing: no crossing is left behind.
    f.apply(&topic("c", "0"), &doc("offline", None, NOW), false, NOW);
    f.apply(
        &topic("c", "0"),
        &doc("online", Some("online"), NOW + 1),
        false,
        NOW + 1,
    );
    assert_eq!(f.next_crossing(), None);
}

#[test]
fn watch_sees_what_an_operator_cares_about_and_not_the_rest() {
    let mut f = fleet();
    let id = parse_topic(APP, &topic("k", "0")).unwrap();
    let online = doc_value("online", Some("online"), NOW - 10);
    assert_eq!(
        f.apply(
            &topic("k", "0"),
            &with(online.clone(), json!({})),
            false,
            NOW
        ),
        Some(Change::Updated {
            id: id.clone(),
            was: None
        })
    );
    // Only `at` and the queue counts changed: no line.
    assert_eq!(
        f.apply(
            &topic("k", "0"),
            &with(online.clone(), json!({"at": NOW, "outbox_pending": 5})),
            false,
            NOW
        ),
        None
    );
    // Renewal starts failing: a line.
    let failing = with(
        online.clone(),
        json!({"user_sig": {"expires_at": NOW + 60, "renewal": "failing", "failures": 1}}),
    );
    let c = f.apply(&topic("k", "0"), &failing, false, NOW).unwrap();
    let line = change_line(&f, &c, NOW, false);
    assert!(
        line.contains("online → online") && line.contains("renewal failing (1 failed)"),
        "{line}"
    );
    assert!(
        line.ends_with("[needs attention: renewal_failing]"),
        "{line}"
    );
    // The will: offline, as JSON.
    let c = f
        .apply(
            &topic("k", "0"),
            &doc("offline", None, NOW - 10),
            false,
            NOW,
        )
        .unwrap();
    let v: Value = serde_json::from_str(&change_line(&f, &c, NOW, true)).unwrap();
    assert_eq!(v["type"], "change");
    assert_eq!(v["was"], json!({"state": "online", "phase": "online"}));
    assert_eq!(v["device"]["state"], "offline");
    assert_eq!(v["device"]["offline_for"], 0);
    assert_eq!(v["device"]["user_id"], "k");
    // Deleted: removed.
    let c = f.apply(&topic("k", "0"), b"", false, NOW).unwrap();
    assert_eq!(c, Change::Removed { id: id.clone() });
    assert!(change_line(&f, &c, NOW, false).contains("removed"));
    let v: Value = serde_json::from_str(&change_line(&f, &c, NOW, true)).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["instance"].as_str()),
        (Some("removed"), Some("0"))
    );
    assert!(f.is_empty());
    assert_eq!(f.apply(&topic("k", "0"), b"", false, NOW), None);
}

#[test]
fn the_ndjson_report_is_one_object_per_device_then_the_summary() {
    let mut f = fleet();
    f.apply(
        &topic("a", "0"),
        &doc("online", Some("online"), NOW - 10),
        true,
        NOW,
    );
    f.apply(
        &topic("b", "1"),
        &doc("stopped", Some("stopped"), NOW - 10),
        true,
        NOW,
    );
    f.apply(&topic("c", "0"), b"{", true, NOW);
    let lines: Vec<Value> = render_ndjson(&f, NOW)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["type"], "device");
    assert_eq!(lines[0]["user_id"], "a");
    assert_eq!(lines[0]["attention"], json!([]));
    assert_eq!(lines[0]["user_sig"]["renewal"], "ok");
    assert_eq!(lines[0]["unreadable"], Value::Null);
    assert_eq!(lines[1]["attention"], json!(["stopped"]));
    assert_eq!(lines[1]["instance"], "1");
    assert_eq!(lines[2]["unreadable"], "not JSON");
    assert_eq!(lines[2]["attention"], json!(["unreadable"]));
    let s = &lines[3];
    assert_eq!(s["type"], "summary");
    assert_eq!(s["devices"], 3);
    assert_eq!(
        s["by_state"],
        json!({"online": 1, "offline": 0, "logged_out": 0, "stopped": 1})
    );
    assert_eq!(s["unreadable"], 1);
    assert_eq!(s["attention"], 2);
    assert_eq!(s["offline_longer_than"], 600);
}

#[test]
fn the_text_report_counts_then_lists() {
    let mut f = fleet();
    assert!(render_text(&f, NOW).contains("no device needs attention"));
    f.apply(
        &topic("a", "0"),
        &with(
            doc_value("online", Some("backoff"), NOW - 10),
            json!({"last_error": {"class": "network", "code": 9508}}),
        ),
        true,
        NOW,
    );
    f.apply(
        &topic("b", "0"),
        &doc("logged_out", Some("idle"), NOW - 7_200),
        true,
        NOW,
    );
    let t = render_text(&f, NOW);
    assert!(t.contains(": 2 devices"), "{t}");
    assert!(
        t.contains("by state:      online 1, offline 0, logged_out 1, stopped 0"),
        "{t}"
    );
    assert!(t.contains("by phase:      backoff 1, idle 1"), "{t}");
    assert!(t.contains("by last error: network 9508 ×1"), "{t}");
    assert!(t.contains("needs attention: 1"), "{t}");
    assert!(
        t.contains("logged_out       \"b/linux/0\" logged_out for 2h, phase idle, \"logged out\""),
        "{t}"
    );
}

#[test]
fn utc_formats_unix_seconds() {
    assert_eq!(utc(0), "1970-01-01 00:00:00Z");
    assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
    assert_eq!(utc(1_765_000_000), "2025-12-06 05:46:40Z");
}

#[test]
fn ten_thousand_devices_fit() {
    let mut f = fleet();
    for i in 0..10_000 {
        let state = ["online", "offline", "logged_out", "stopped"][i % 4];
        f.apply(
            &topic(&format!("kiosk-{i:05}"), "0"),
            &doc(state, Some("online"), NOW - i as i64),
            true,
            NOW,
        );
    }
    let s = f.summary(NOW);
    assert_eq!(s.devices, 10_000);
    assert_eq!(s.by_state["stopped"], 2_500);
    assert_eq!(render_ndjson(&f, NOW).lines().count(), 10_001);
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_command_line_and_the_config_file() {
    let no_file = |p: &Path| Err(format!("{}: no such file", p.display()));
    let a = parse_args(
        &args(&[
            "--broker",
            "mqtts://n1:8883",
            "--broker",
            "mqtts://n2",
            "--user",
            "ops",
            "--password-file",
            "/etc/pw",
            "--sdk-app-id",
            "7",
            "--protocol",
            "auto",
            "--json",
            "--watch",
            "--settle",
            "250ms",
        ]),
        no_file,
    )
    .unwrap();
    assert_eq!(a.brokers[0], ("n1".into(), 8883, "mqtts://n1:8883".into()));
    assert_eq!(a.brokers[1].1, 8883, "the default port");
    assert_eq!((a.protocol, a.json, a.watch), (Protocol::Auto, true, true));
    assert_eq!(a.settle, Duration::from_millis(250));
    assert_eq!(a.offline_longer_than, Duration::from_secs(600));

    let file = |_: &Path| {
        Ok("brokers = [\"mqtts://a:1\", \"mqtts://b:2\"]\nuser = \"ops\"\npassword_file = \"pw\"\n\
            sdk_app_id = 9\nprotocol = \"v3.1.1\"\noffline_longer_than = \"1h\"\nca = \"ca.pem\"\n"
            .to_string())
    };
    let a = parse_args(
        &args(&["--config", "/etc/fleet/f.toml", "--sdk-app-id", "8"]),
        file,
    )
    .unwrap();
    assert_eq!(a.brokers.len(), 2);
    assert_eq!(a.sdk_app_id, 8, "the flag wins");
    assert_eq!(a.protocol, Protocol::V311);
    assert_eq!(
        a.password_file,
        PathBuf::from("/etc/fleet/pw"),
        "relative to the file"
    );
    assert_eq!(a.ca, Some(PathBuf::from("/etc/fleet/ca.pem")));
    assert_eq!(a.offline_longer_than, Duration::from_secs(3600));

    for (list, says) in [
        (vec!["--user", "o"], "no broker"),
        (vec!["--broker", "mqtt://x:1"], "plaintext"),
        (
            vec!["--broker", "mqtts://x:1", "--password", "hunter2"],
            "--password-file",
        ),
        (vec!["--broker", "mqtts://x:1"], "--user"),
        (
            vec!["--broker", "mqtts://x:1", "--user", "o"],
            "--password-file",
        ),
        (
            vec![
                "--broker",
                "mqtts://x:1",
                "--user",
                "o",
                "--password-file",
                "p",
            ],
            "--sdk-app-id",
        ),
        (vec!["--protocol", "v4"], "v5, v3.1.1 or auto"),
        (vec!["--settle", "soon"], "--settle"),
        (vec!["--bogus"], "unexpected"),
        (vec!["--config", "/nope.toml"], "no such file"),
    ] {
        let e = parse_args(&args(&list), no_file).unwrap_err();
        assert!(e.contains(says), "{list:?}: {e}");
        assert!(!e.contains("hunter2"), "never echoes a password");
    }
    let bad = |_: &Path| Ok("password = \"x\"\n".to_string());
    let e = parse_args(&args(&["--config", "f.toml"]), bad).unwrap_err();
    assert!(e.contains("unknown field") && e.contains("password"), "{e}");
}

/// A device chooses its own document: times at the ends of the i64 range (an offline will
/// "since" the year -292 billion, a renewal "expiring" at i64::MAX) are rendered, sorted and
/// watched without an overflow (a debug build's `imlinkctl fleet` panicked on `now - since`).
#[test]
fn times_at_the_ends_of_the_range_do_not_overflow() {
    let mut f = fleet();
    for (n, (since, at, exp)) in [
        (i64::MIN, i64::MIN, i64::MIN),
        (i64::MAX, i64::MAX, i64::MAX),
        (i64::MIN, i64::MAX, 0),
    ]
    .into_iter()
    .enumerate()
    {
        for state in ["online", "offline", "stopped"] {
            let body = with(
                doc_value(state, Some("online"), NOW),
                json!({"since": since, "at": at,
                       "user_sig": {"expires_at": exp, "renewal": "failing", "failures": 3}}),
            );
            let instance = format!("{n}{state}");
            f.apply(&topic("edge", &instance), &body, true, NOW);
            f.apply(&topic("edge", &instance), &body, false, NOW);
        }
    }
    for now in [NOW, NOW + 86_400] {
        let _ = render_text(&f, now);
        let _ = render_ndjson(&f, now);
        let _ = f.attention(now);
        let _ = f.crossed(now);
    }
}
