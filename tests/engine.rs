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
    assert_eq!(u.logins_accepted, 2);
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
    let sb = sandbox_with(SandboxOptions {
        sig_lifetime: Duration::from_secs(8),
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
    let st = d.status().await;
    assert_eq!(st["phase"], "online");
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
