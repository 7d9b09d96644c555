//! Kicks and expiry in both encodings of a server DISCONNECT: the long form (with a property
//! block: reason string, `im-error-code`) and the short form `E0 01 <code>` that mosquitto
//! ≥ 2.0.15 sends (rumqttc alone cannot decode it; the daemon's relay reads it). Against the
//! sandbox, which sends either form on kicks, expiry and `/on-login`.

mod common;

use common::*;
use serde_json::json;

/// A takeover (another login with the same client id): one CONNECT, `kicked_offline` 6208,
/// and no reconnect for 30 s.
async fn takeover_in(short: bool) {
    let sb = sandbox().await;
    sb.set_short_disconnect(short);
    let user = if short { "take-short" } else { "take-long" };
    let d = Daemon::start(&sb, Opts::user(user)).await;
    d.wait_phase("online").await;
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let other = take_over(&sb, &d.dir, user);
    let kick = loop {
        let v = tokio::time::timeout(WAIT, w.next()).await.expect("a kick");
        if v["method"] == "kicked_offline" {
            break v;
        }
    };
    assert_eq!(kick["params"]["reason"], "logged_in_elsewhere", "{kick}");
    assert_eq!(kick["params"]["code"], 6208);
    let st = d.wait_phase("kicked").await;
    assert_eq!(
        (st["login_status"].clone(), st["login_user"].clone()),
        (json!(3), json!(""))
    );
    assert_eq!(st["last_error"]["code"], 6208);
    assert_eq!(st["counters"]["connect_attempts"], 1, "one CONNECT: {st}");
    // Stays offline: no CONNECT and no provisioning for 30 s.
    assert_flat(&sb, user, 30).await;
    assert_eq!(d.status().await["counters"]["connect_attempts"], 1);
    assert_eq!(sb.user(user).server_disconnects.get("0x8E"), Some(&1));
    other.abort();
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_in_either_form_is_a_kick_that_stays_offline() {
    let (short, long) = tokio::join!(
        tokio::spawn(takeover_in(true)),
        tokio::spawn(takeover_in(false))
    );
    short.expect("the short form E0 01 8E");
    long.expect("the long form");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_in_either_form_costs_one_fetch_and_comes_back_online() {
    for short in [true, false] {
        let sb = sandbox().await;
        sb.set_short_disconnect(short);
        let d = Daemon::start(&sb, Opts::user("exp-1")).await;
        d.wait_phase("online").await;
        assert_eq!(sb.expire_sig("exp-1"), 1);
        counters_until(&sb, "the new login", |c| {
            c.user("exp-1").logins_accepted >= 2
        })
        .await;
        let st = d.wait_phase("online").await;
        let u = sb.user("exp-1");
        assert_eq!(
            u.provision_requests, 2,
            "short {short}: exactly one fetch: {u:?}"
        );
        assert_eq!(u.server_disconnects.get("0xA0"), Some(&1));
        assert_eq!(
            st["last_event"]["event"], "user_sig_expired",
            "short {short}"
        );
        d.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_kick_in_either_form_is_a_kick() {
    for short in [true, false] {
        let sb = sandbox().await;
        sb.set_short_disconnect(short);
        let d = Daemon::start(&sb, Opts::user("adm-1")).await;
        d.wait_phase("online").await;
        sb.kick("adm-1");
        let st = d.wait_phase("kicked").await;
        assert_eq!(
            st["last_event"]["reason"], "kicked_by_admin",
            "short {short}: {st}"
        );
        assert_eq!(st["last_error"]["class"], "kicked");
        if !short {
            // The long form carries the service's words, quoted.
            let m = st["last_error"]["message"].as_str().unwrap();
            assert!(
                m.contains("\"6208 kicked offline by an administrator\""),
                "{m}"
            );
        }
        assert_flat(&sb, "adm-1", 3).await;
        d.finish().await;
    }
}

/// The CONNACK's reason string reaches `last_error` (rumqttc alone drops it): quoted, capped,
/// and with no control characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_reason_strings_reach_last_error_quoted() {
    let sb = sandbox().await;
    sb.ban("ban-1");
    let d = Daemon::start(&sb, Opts::user("ban-1")).await;
    let st = d.wait_phase("stopped").await;
    let e = &st["last_error"];
    assert_eq!(
        (e["code"].clone(), e["class"].clone()),
        (json!(70051), json!("fatal"))
    );
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("CONNACK 0x8A: \"70051 account banned\""), "{m}");
    d.finish().await;
}
