//! The session engine against imlink-sandbox over real TLS: each test asserts the sandbox's
//! counters (CONNECT attempts, provisioning requests) as well as the daemon's phase.

mod common;

use std::time::{Duration, Instant};

use common::*;
use imlink_sandbox::{LoginFault, ProvisionFault, SandboxOptions};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_and_a_restart_with_a_valid_cached_sig_fetches_nothing() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-1")).await;
    let st = d.wait_phase("online").await;
    assert_eq!(st["login_status"], 1);
    assert_eq!(st["login_user"], "kiosk-1");
    assert!(
        st["sig"]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let u = sb.user("kiosk-1");
    assert_eq!(
        (u.provision_requests, u.connect_attempts, u.logins_accepted),
        (1, 1, 1)
    );
    // The cache is 0600 and holds the sig the sandbox issued.
    let cache = d.dir.join("state/usersig.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cache).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let dir = d.dir.clone();
    d.finish().await;
    counters_until(&sb, "a clean DISCONNECT", |c| {
        c.user("kiosk-1").disconnects_normal == 1
    })
    .await;

    let mut o = Opts::user("kiosk-1");
    o.dir = Some(dir);
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    let u = sb.user("kiosk-1");
    assert_eq!(
        u.provision_requests, 1,
        "zero provisioning requests after the restart"
    );
    assert_eq!(u.logins_accepted, 2, "{u:?}");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_is_ignored_and_refetched() {
    let sb = sandbox().await;
    let dir = temp_dir("corrupt");
    std::fs::create_dir_all(dir.join("state")).unwrap();
    std::fs::write(dir.join("state/usersig.json"), b"{not json").unwrap();
    let mut o = Opts::user("kiosk-2");
    o.dir = Some(dir);
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    assert_eq!(sb.user("kiosk-2").provision_requests, 1);
    assert!(d.log_text().contains("ignoring the UserSig cache"));
    d.finish().await;
}

/// A short-lived sig is refreshed proactively; the session moves to the new sig before the
/// old one expires (no DISCONNECT 0xA0 ever), and QoS 1 messages published during the move
/// are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_sig_is_refreshed_before_expiry_without_losing_qos1() {
    // 20 s: the shortest lifetime the policy refreshes proactively at 80 % (its refresh point,
    // 16 s, clears the 10 s refresh floor).
    let sb = sandbox_with(SandboxOptions {
        sig_lifetime: Duration::from_secs(20),
        ..Default::default()
    })
    .await;
    let d = Daemon::start(&sb, Opts::user("kiosk-3")).await;
    d.wait_phase("online").await;
    let topic = format!("im/{}/u/kiosk-3/c2c", sb.sdk_app_id());
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let mut published = 0;
    let mut moves = 0;
    // Two refresh cycles: more than one original lifetime.
    while moves < 2 {
        let v = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("events keep coming");
        match v["method"].as_str() {
            // The new sig is stored; the DISCONNECT/CONNECT move starts right after.
            Some("user_sig_refreshed") => {
                published += sb.publish(&topic, 1, b"during the move");
            }
            // Between the old session's DISCONNECT and the new CONNACK: offline.
            Some("connecting") => {
                published += sb.publish(&topic, 1, b"while offline");
            }
            Some("connect_success") => moves += 1,
            _ => {}
        }
    }
    assert!(
        published >= 4,
        "the persistent session got every message ({published})"
    );
    let c = counters_until(&sb, "every QoS 1 message delivered", |c| {
        c.user("kiosk-3").messages_delivered >= 4
    })
    .await;
    let u = c.user("kiosk-3");
    assert_eq!(
        u.server_disconnects.get("0xA0"),
        None,
        "never expired at the server"
    );
    assert!(u.provision_requests >= 3, "refreshed twice: {u:?}");
    assert_eq!(u.connections_lost, 0);
    // Logged in at the CONNACK; online once the inbox SUBSCRIBE is granted.
    let st = d.wait_phase("online").await;
    assert!(st["counters"]["messages_received"].as_u64().unwrap() >= 4);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sig_expired_by_the_server_while_online_costs_one_fetch() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-4")).await;
    d.wait_phase("online").await;
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    assert_eq!(sb.expire_sig("kiosk-4"), 1);
    let mut seen = Vec::new();
    loop {
        let v = tokio::time::timeout(WAIT, w.next()).await.unwrap();
        let m = v["method"].as_str().unwrap_or("").to_string();
        seen.push(m.clone());
        if m == "connect_success" {
            break;
        }
    }
    assert_eq!(
        seen.first().map(String::as_str),
        Some("user_sig_expired"),
        "{seen:?}"
    );
    let u = sb.user("kiosk-4");
    assert_eq!(u.provision_requests, 2, "exactly one fetch");
    assert_eq!(u.logins_accepted, 2);
    assert_eq!(u.server_disconnects.get("0xA0"), Some(&1));
    let st = d.status().await;
    assert_eq!(st["last_event"]["event"], "user_sig_expired");
    d.finish().await;
}

/// A server that calls every fresh sig expired (0xA0 right after each login): at most three
/// re-logins within the window, then stopped with a clear error, and quiet after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sig_the_server_always_calls_expired_stops_after_three_relogins() {
    let sb = sandbox().await;
    sb.on_login(LoginFault::Disconnect { code: 0xA0 }, None, Some("kiosk-5"));
    let mut o = Opts::user("kiosk-5");
    o.session_extra = "sig_expired_budget = 3\nsig_expired_window = \"1m\"".into();
    let d = Daemon::start(&sb, o).await;
    let st = d.wait_phase("stopped").await;
    let u = sb.user("kiosk-5");
    assert_eq!(
        u.logins_accepted, 4,
        "the first login and three re-logins: {u:?}"
    );
    assert_eq!(u.provision_requests, 4);
    assert_eq!(st["last_error"]["class"], "sig_expired");
    assert_eq!(st["last_error"]["code"], 70001);
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("stopped after 3 UserSig renewals within 1m")
    );
    assert_eq!(st["login_status"], 3);
    assert_flat(&sb, "kiosk-5", 5).await;
    d.finish().await;
}

/// A provisioning server whose clock is far behind issues sigs that are already expired by
/// its own `Date`: they are never sent (6206), and the same budget stops the loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigs_expired_on_arrival_are_never_sent_and_the_budget_stops_the_loop() {
    let sb = sandbox().await;
    sb.provision_fault(ProvisionFault::ExpiredSig, None, Some("kiosk-6"));
    let d = Daemon::start(&sb, Opts::user("kiosk-6")).await;
    let st = d.wait_phase("stopped").await;
    let u = sb.user("kiosk-6");
    assert_eq!(u.connect_attempts, 0, "an expired sig is never sent");
    assert_eq!(u.provision_requests, 4);
    assert_eq!(st["last_error"]["code"], 6206);
    assert_flat(&sb, "kiosk-6", 3).await;
    d.finish().await;
}

/// One refusal scenario: how to provoke it, and exactly what the engine may do.
struct Refusal {
    name: &'static str,
    connects: u64,
    provisions: u64,
    code: u64,
    class: &'static str,
}

async fn refusal_scenario(r: Refusal) {
    let sb = sandbox().await;
    let user = format!("r-{}", r.name);
    let mut o = Opts::user(&user);
    match r.name {
        "70003" => sb.provision_fault(ProvisionFault::GarbageSig, None, None),
        "70009" => sb.provision_fault(ProvisionFault::WrongKey, None, None),
        "70013" => sb.provision_fault(ProvisionFault::WrongUser, None, None),
        "70014" => sb.provision_fault(ProvisionFault::WrongApp, None, None),
        "banned" => sb.ban(&user),
        "client-id" => o.broker_extra = "client_id = \"{user_id}\"".into(),
        "401" => o.token = Some("not-the-device-token".into()),
        "403" => sb.provision_fault(
            ProvisionFault::Status {
                status: 403,
                retry_after: None,
            },
            None,
            None,
        ),
        "404" => sb.provision_fault(
            ProvisionFault::Status {
                status: 404,
                retry_after: None,
            },
            None,
            None,
        ),
        other => panic!("unknown scenario {other}"),
    }
    let d = Daemon::start(&sb, o).await;
    let st = d.wait_phase("stopped").await;
    let u = sb.user(&user);
    assert_eq!(
        (u.connect_attempts, u.provision_requests),
        (r.connects, r.provisions),
        "{}: CONNECTs and provisioning requests: {u:?}",
        r.name
    );
    assert_eq!(st["last_error"]["code"], r.code, "{}: {st}", r.name);
    assert_eq!(st["last_error"]["class"], r.class, "{}: {st}", r.name);
    assert_eq!(st["login_status"], 3);
    // Stopped means stopped: the counters stay flat for 30 s.
    assert_flat(&sb, &user, 30).await;
    assert_eq!(d.status().await["phase"], "stopped", "{}", r.name);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_stop_after_exactly_the_allowed_attempts_and_stay_quiet() {
    let cases = [
        // Refused by the broker: one fresh UserSig, then stop.
        Refusal {
            name: "70003",
            connects: 2,
            provisions: 2,
            code: 70003,
            class: "sig_rejected",
        },
        // The relay reads the CONNACK's reason string, so the service's own code shows.
        Refusal {
            name: "70009",
            connects: 2,
            provisions: 2,
            code: 70009,
            class: "sig_rejected",
        },
        // Caught on the device: never sent.
        Refusal {
            name: "70013",
            connects: 0,
            provisions: 1,
            code: 70013,
            class: "fatal",
        },
        Refusal {
            name: "70014",
            connects: 0,
            provisions: 1,
            code: 70014,
            class: "fatal",
        },
        // Errors no new UserSig fixes.
        Refusal {
            name: "banned",
            connects: 1,
            provisions: 1,
            code: 70051,
            class: "fatal",
        },
        Refusal {
            name: "client-id",
            connects: 1,
            provisions: 1,
            code: 6017,
            class: "fatal",
        },
        Refusal {
            name: "401",
            connects: 0,
            provisions: 1,
            code: 401,
            class: "fatal",
        },
        Refusal {
            name: "403",
            connects: 0,
            provisions: 1,
            code: 403,
            class: "fatal",
        },
        Refusal {
            name: "404",
            connects: 0,
            provisions: 1,
            code: 404,
            class: "fatal",
        },
    ];
    let tasks: Vec<_> = cases
        .into_iter()
        .map(|c| tokio::spawn(refusal_scenario(c)))
        .collect();
    for t in tasks {
        t.await.expect("scenario passed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_kick_stays_offline() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-7")).await;
    d.wait_phase("online").await;
    // Another login with the same client id takes the session over.
    let sig = sb.issue_sig("kiosk-7", Duration::from_secs(600));
    let addr = sb.endpoints().mqtt_addr;
    let mut mo = rumqttc::v5::MqttOptions::new(
        format!("{}:kiosk-7:linux:0", sb.sdk_app_id()),
        addr.ip().to_string(),
        addr.port(),
    );
    mo.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            imlinkd::tls::client_config(
                &imlinkd::config::CaSource::File(d.dir.join("ca.pem")),
                None,
                &[],
            )
            .unwrap(),
        ),
    ));
    mo.set_credentials("kiosk-7", sig);
    let (_other, mut el) = rumqttc::v5::AsyncClient::new(mo, 10);
    let other_loop = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let st = d.wait_phase("kicked").await;
    assert_eq!(st["last_event"]["event"], "kicked_offline");
    assert_eq!(st["last_event"]["reason"], "logged_in_elsewhere");
    assert_eq!(st["last_error"]["code"], 6208);
    assert_eq!(st["login_status"], 3);
    assert_eq!(st["login_user"], "");
    assert_flat(&sb, "kiosk-7", 5).await;
    assert_eq!(sb.user("kiosk-7").server_disconnects.get("0x8E"), Some(&1));
    other_loop.abort();
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_kick_stays_offline_and_relogin_after_logs_in_once() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-8")).await;
    d.wait_phase("online").await;
    sb.kick("kiosk-8");
    let st = d.wait_phase("kicked").await;
    assert_eq!(st["last_event"]["reason"], "kicked_by_admin");
    assert_flat(&sb, "kiosk-8", 5).await;
    d.finish().await;

    // The shortest cool-down the policy allows is 1 minute.
    let mut o = Opts::user("kiosk-9");
    o.session_extra = "on_kick = { relogin_after = \"1m\" }".into();
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    sb.kick("kiosk-9");
    let kicked_at = Instant::now();
    d.wait_phase("kicked").await;
    d.wait_phase_within("online", Duration::from_secs(90)).await;
    assert!(
        kicked_at.elapsed() >= Duration::from_millis(59_900),
        "waited the cool-down"
    );
    let u = sb.user("kiosk-9");
    assert_eq!(u.logins_accepted, 2, "one login after the cool-down");
    assert_eq!(u.provision_requests, 1, "the valid sig is reused");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_reconnects_with_backoff_and_no_provisioning() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-10")).await;
    d.wait_phase("online").await;
    sb.stop_listener().await.unwrap();
    d.wait_phase("backoff").await;
    // Three seconds of outage: with base 200 ms and cap 2 s the attempts are spaced, not a
    // tight loop.
    let before = sb.user("kiosk-10").connect_attempts;
    tokio::time::sleep(Duration::from_secs(3)).await; // the outage under test
    let during = sb.user("kiosk-10").connect_attempts - before;
    assert_eq!(
        during, 0,
        "the listener is down: attempts never reach the broker"
    );
    let st = d.status().await;
    let tries = st["counters"]["connect_attempts"].as_u64().unwrap();
    // About 5 on an idle machine; a tight loop would be hundreds. The window ends when the
    // sleep does, which a loaded machine stretches: the bound leaves room for that.
    assert!(
        (2..=20).contains(&(tries - 1)),
        "backoff spaced the retries: {tries}"
    );
    let attempts_before = sb.user("kiosk-10").connect_attempts;
    sb.start_listener().await.unwrap();
    let back = Instant::now();
    d.wait_phase("online").await;
    // Within one backoff step: the first attempt that reaches the broker after it returns is
    // the one that logs in.
    assert_eq!(
        sb.user("kiosk-10").connect_attempts - attempts_before,
        1,
        "one CONNECT after the listener returned"
    );
    assert!(
        back.elapsed() <= Duration::from_secs(8),
        "within the 2 s backoff cap (plus slack for a loaded machine): {:?}",
        back.elapsed()
    );
    let u = sb.user("kiosk-10");
    assert_eq!(
        u.provision_requests, 1,
        "no provisioning call for a network error"
    );
    // Dropped connections: same story. The watch opens before the drop: with the broker up,
    // `backoff` lasts one drawn delay (20 ms or more), which a watch opened after the drop could
    // miss.
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    sb.drop_all();
    loop {
        let v = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("backoff after the drop");
        if v["method"] == "state_changed" && v["params"]["phase"] == "backoff" {
            break;
        }
    }
    d.wait_phase("online").await;
    let u = sb.user("kiosk-10");
    assert_eq!(u.provision_requests, 1);
    assert_eq!(u.logins_accepted, 3);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_refusals_back_off_with_the_same_sig() {
    let sb = sandbox().await;
    sb.refuse_next(0x89, Some(2), Some("kiosk-11"));
    let d = Daemon::start(&sb, Opts::user("kiosk-11")).await;
    d.wait_phase("online").await;
    let u = sb.user("kiosk-11");
    assert_eq!((u.connect_attempts, u.provision_requests), (3, 1));
    sb.refuse_next(0x9F, Some(1), Some("kiosk-11"));
    sb.drop_all();
    d.wait_phase("online").await;
    assert_eq!(sb.user("kiosk-11").provision_requests, 1);
    d.finish().await;
}

/// The server keeps closing the socket right after CONNACK (what a broker does when two
/// devices share a client id and it says nothing): a suspected takeover, no fight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_closes_after_login_are_a_suspected_takeover() {
    let sb = sandbox().await;
    let d = Daemon::start(&sb, Opts::user("kiosk-12")).await;
    d.wait_phase("online").await;
    sb.on_login(LoginFault::Close, None, Some("kiosk-12"));
    sb.drop_all();
    let st = d.wait_phase("kicked").await;
    assert_eq!(st["last_event"]["reason"], "suspected_takeover");
    let u = sb.user("kiosk-12");
    assert!(u.logins_accepted <= 4, "stopped within 3 reconnects: {u:?}");
    assert_flat(&sb, "kiosk-12", 5).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_failures_are_retried_with_backoff() {
    let sb = sandbox().await;
    let t0 = Instant::now();
    sb.provision_fault(
        ProvisionFault::Status {
            status: 503,
            retry_after: Some(2),
        },
        Some(1),
        None,
    );
    let d = Daemon::start(&sb, Opts::user("kiosk-13")).await;
    counters_until(&sb, "the first request", |c| {
        c.user("kiosk-13").provision_requests == 1
    })
    .await;
    let st = d.wait_phase("online").await;
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "Retry-After: 2 honoured"
    );
    assert_eq!(sb.user("kiosk-13").provision_requests, 2);
    assert_eq!(st["counters"]["sig_fetch_failures"], 1);
    d.finish().await;

    for (i, fault) in [
        ProvisionFault::Status {
            status: 500,
            retry_after: None,
        },
        ProvisionFault::Malformed,
        ProvisionFault::Truncated,
        ProvisionFault::Oversized,
        ProvisionFault::Delay { ms: 6_000 }, // longer than provisioning.timeout (5 s)
    ]
    .into_iter()
    .enumerate()
    {
        let user = format!("kiosk-p{i}");
        sb.provision_fault(fault.clone(), Some(2), Some(&user));
        let d = Daemon::start(&sb, Opts::user(&user)).await;
        let st = d.wait_phase("online").await;
        let u = sb.user(&user);
        assert_eq!(
            u.provision_requests, 3,
            "{fault:?}: two failures, then success"
        );
        assert_eq!(st["counters"]["sig_fetch_failures"], 2, "{fault:?}");
        assert_eq!(u.connect_attempts, 1, "{fault:?}");
        d.finish().await;
    }

    // A chunked answer is a fine answer.
    sb.provision_fault(ProvisionFault::Chunked, None, Some("kiosk-14"));
    let d = Daemon::start(&sb, Opts::user("kiosk-14")).await;
    d.wait_phase("online").await;
    assert_eq!(sb.user("kiosk-14").provision_requests, 1);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_sig_keeps_the_session_online_while_provisioning_fails() {
    // A 60 s sig refreshed at half its life: two failed refreshes (at least 10 s apart) fit
    // before it expires.
    let sb = sandbox_with(SandboxOptions {
        sig_lifetime: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let mut o = Opts::user("kiosk-15");
    o.session_extra = "refresh_at = 0.5".into();
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    sb.provision_fault(
        ProvisionFault::Status {
            status: 500,
            retry_after: None,
        },
        None,
        None,
    );
    // The refresh (at ~50 % of 60 s) fails, and is retried; the session stays up.
    sb.wait_for("two failed refreshes", Duration::from_secs(60), |c| {
        c.user("kiosk-15").provision_requests >= 3
    })
    .await
    .unwrap();
    let st = d.status().await;
    assert_eq!(st["phase"], "online");
    assert_eq!(st["last_error"]["code"], 500);
    sb.clear_faults();
    sb.wait_for(
        "the refresh succeeded and the session moved",
        Duration::from_secs(30),
        |c| c.user("kiosk-15").logins_accepted >= 2,
    )
    .await
    .unwrap();
    d.wait_phase("online").await;
    assert_eq!(sb.user("kiosk-15").server_disconnects.get("0xA0"), None);
    let dir = d.dir.clone();
    d.finish().await;

    // A restart with a valid cached sig comes online while provisioning is down.
    sb.set_sig_lifetime(Duration::from_secs(3600));
    sb.provision_fault(
        ProvisionFault::Status {
            status: 503,
            retry_after: None,
        },
        None,
        None,
    );
    let mut o = Opts::user("kiosk-15");
    o.session_extra = "refresh_at = 0.5".into();
    o.dir = Some(dir);
    let before = sb.user("kiosk-15").provision_requests;
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    assert_eq!(
        sb.user("kiosk-15").provision_requests,
        before,
        "the cache was enough"
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_not_yet_valid_means_waiting_for_the_clock() {
    let sb = sandbox_with(SandboxOptions {
        server_cert_not_yet_valid: true,
        ..Default::default()
    })
    .await;
    let d = Daemon::start(&sb, Opts::user("kiosk-16")).await;
    let st = d.wait_phase("waiting_for_clock").await;
    assert_eq!(st["last_error"]["class"], "clock");
    assert!(
        st["summary"]
            .as_str()
            .unwrap()
            .starts_with("waiting for clock sync")
    );
    assert_eq!(sb.user("kiosk-16").connect_attempts, 0);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_to_broker_and_provisioning() {
    let dir = temp_dir("mtls");
    let sb = sandbox_with(SandboxOptions {
        require_client_cert: true,
        state_dir: Some(dir.join("sandbox")),
        ..Default::default()
    })
    .await;
    let cert = dir.join("sandbox/client.pem");
    let key = dir.join("sandbox/client.key");
    let mut o = Opts::user("kiosk-17");
    o.broker_extra = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        cert.display(),
        key.display()
    );
    o.provisioning_extra = o.broker_extra.clone();
    let d = Daemon::start(&sb, o).await;
    d.wait_phase("online").await;
    assert_eq!(sb.user("kiosk-17").client_cert_logins, 1);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_on_start_false_waits_for_a_local_login() {
    let sb = sandbox().await;
    let mut o = Opts::user("kiosk-18");
    o.top_extra = "login_on_start = false".into();
    let d = Daemon::start(&sb, o).await;
    let st = d.status().await;
    assert_eq!(st["phase"], "idle");
    assert_eq!(st["login_status"], 3);
    assert_flat(&sb, "kiosk-18", 2).await;
    let r = d.rpc("login", json!({})).await;
    assert_eq!(r["result"]["login_user"], "kiosk-18", "{r}");
    assert_eq!(sb.user("kiosk-18").logins_accepted, 1);
    d.finish().await;
}

/// A slow link: CONNACK takes longer than the driver's heartbeat. The connect must not be
/// abandoned and retried under the broker's feet (rumqttc's poll is not cancel-safe; the
/// driver keeps it in a task of its own): exactly one CONNECT, one login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_connack_is_waited_for_not_abandoned() {
    let sb = sandbox().await;
    sb.set_connack_delay(Duration::from_millis(2_500));
    let d = Daemon::start(&sb, Opts::user("kiosk-19")).await;
    // Meanwhile the driver is woken by its heartbeat and by API requests.
    for _ in 0..5 {
        d.rpc("login", json!({"timeout_ms": 100})).await;
    }
    d.wait_phase("online").await;
    let u = sb.user("kiosk-19");
    assert_eq!((u.connect_attempts, u.logins_accepted), (1, 1), "{u:?}");
    assert_eq!(u.connections_lost, 0);
    d.finish().await;
}

// --- the two end-to-end reproductions of the interleaving review (issue 8) -------------------

/// An ACL denial or a revoked account on a real broker: CONNACK, then DISCONNECT 0x87 at once,
/// every time. The landed engine restored its one fresh-sig retry on every CONNACK and made
/// 2,474 CONNECTs and 2,474 provisioning requests in 30 s. Now: the one fresh retry, then
/// stopped, and quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_0x87_after_every_login_stops_after_the_one_fresh_retry() {
    let sb = sandbox().await;
    sb.on_login(
        LoginFault::Disconnect { code: 0x87 },
        None,
        Some("kiosk-30"),
    );
    let started = Instant::now();
    let d = Daemon::start(&sb, Opts::user("kiosk-30")).await;
    let st = d.wait_phase("stopped").await;
    assert_eq!(st["last_error"]["class"], "sig_rejected", "{st}");
    assert_eq!(st["login_status"], 3);
    // The rest of the 30 s: nothing more.
    let rest = Duration::from_secs(30).saturating_sub(started.elapsed());
    assert_flat(&sb, "kiosk-30", rest.as_secs().max(5)).await;
    let u = sb.user("kiosk-30");
    assert!(
        u.connect_attempts <= 3 && u.provision_requests <= 3,
        "at most 3 CONNECTs and 3 provisioning requests in 30 s: {u:?}"
    );
    assert_eq!((u.connect_attempts, u.provision_requests), (2, 2), "{u:?}");
    // An operator's login gets it moving again (and the broker still refuses: one more try).
    sb.clear_faults();
    let r = d.rpc("login", json!({})).await;
    assert_eq!(r["result"]["login_status"], 1, "{r}");
    d.finish().await;
}

/// The landed wedge: in backoff after a drop, the proactive refresh started and was slow but
/// succeeded; the backoff retry fell due during the fetch and was cleared; the refresh answer
/// did nothing. No CONNECT ever again. Now the retry acts (with the still valid sig), and the
/// daemon is back online within a backoff step of the broker's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_refresh_during_backoff_does_not_keep_the_daemon_offline() {
    let sb = sandbox_with(SandboxOptions {
        sig_lifetime: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let d = Daemon::start(&sb, Opts::user("kiosk-31")).await;
    d.wait_phase("online").await;
    // Provisioning becomes slow (4 s, under the 5 s fetch timeout of the test config).
    sb.provision_fault(ProvisionFault::Delay { ms: 4_000 }, None, Some("kiosk-31"));
    sb.stop_listener().await.unwrap();
    d.wait_phase("backoff").await;
    // The refresh (at ~80 % of 30 s) starts while the daemon is in backoff.
    sb.wait_for("the refresh to start", Duration::from_secs(40), |c| {
        c.user("kiosk-31").provision_requests >= 2
    })
    .await
    .unwrap();
    // The broker comes back while the slow refresh is still under way.
    sb.start_listener().await.unwrap();
    let back = Instant::now();
    // Within a backoff step (2 s cap) on an idle machine; the slack is for a loaded one: the
    // wedge this guards against never came back at all.
    d.wait_phase_within("online", Duration::from_secs(10)).await;
    eprintln!(
        "online again {:?} after the broker's return",
        back.elapsed()
    );
    // And the refresh's new sig is used: the session moves to it.
    sb.wait_for(
        "the move to the refreshed sig",
        Duration::from_secs(20),
        |c| c.user("kiosk-31").logins_accepted >= 3,
    )
    .await
    .unwrap();
    assert_eq!(sb.user("kiosk-31").server_disconnects.get("0xA0"), None);
    d.finish().await;
}

/// A broker that accepts only so many CONNECTs per second (the sandbox's `/connect-rate`, as
/// EMQX's `max_conn_rate`): the refused ones (0x9F) back off and get in later, nobody loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_rate_limit_is_busy_and_everyone_gets_in_by_backing_off() {
    let sb = sandbox().await;
    sb.set_connect_rate(Some(1));
    let mut ds = Vec::new();
    for i in 0..4 {
        ds.push(Daemon::start(&sb, Opts::user(&format!("rate-{i}"))).await);
    }
    for d in &ds {
        d.wait_phase_within("online", Duration::from_secs(60)).await;
    }
    let c = sb.counters();
    let refused: u64 = (0..4)
        .map(|i| {
            c.user(&format!("rate-{i}"))
                .refusals
                .get("0x9F")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert!(refused >= 1, "the limit refused someone: {c:?}");
    // 4 devices, 1 login per second, backoff from 200 ms to 2 s (the test config): a handful
    // of refusals each, not a loop.
    assert!(
        refused <= 20,
        "{refused} refusals: the refused must back off"
    );
    for d in ds {
        d.finish().await;
    }
}
