//! The session ends at the UserSig's expiry: imlink-auth gives the user JWT the sig's expiry as
//! `exp`, and nats-server 2.15.1 closes the connection then (a bare TCP close: MQTT 3.1.1 has
//! no server DISCONNECT). The sig comes from the sandbox's provisioning, as a device gets it.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

fn unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_closes_the_session_at_the_usersig_expiry_and_a_new_sig_logs_in_again() {
    let c = ImCluster::up(
        &bin_dir(),
        "expiry",
        &UpOptions {
            sig_lifetime: Some("15s".into()),
            ..Default::default()
        },
    );
    let app = c.e.sdk_app_id;
    let (sig, expire_at) = c.fetch_sig("erin");
    let mut erin = Mqtt::connect(login(&c, 1, "erin", &sig, "0"))
        .await
        .expect("erin logs in with a fresh 15 s UserSig");
    let d = c.wait_decision(&c.client_id("erin", "linux", "0"), WAIT);
    assert!(
        d.contains(&format!("exp={expire_at}")),
        "the user JWT expires with the sig: {d}"
    );
    assert_eq!(erin.subscribe(&format!("im/{app}/u/erin/#")).await, 1);

    // Until the expiry the session works: a message to erin arrives.
    let mut alice = Mqtt::connect(login(&c, 0, "alice", &c.sig("alice", 300), "0"))
        .await
        .expect("alice logs in");
    alice
        .publish(
            &format!("im/{app}/u/erin/in/alice"),
            b"before expiry",
            false,
        )
        .await;
    assert!(
        erin.message(WAIT).await.is_some(),
        "erin's session works before expiry"
    );

    // Then the server closes it, at the expiry (the sig is valid through its last second;
    // nats-server's timer runs in whole seconds from the login: 0-1 s after `exp`; the rest of
    // the bound is for a loaded machine's scheduling).
    let closed = erin
        .closed_by_server(Duration::from_secs(30))
        .await
        .expect("the server closes the session at the expiry");
    let closed_at = unix_f64() - closed.elapsed().as_secs_f64();
    let late = closed_at - expire_at as f64;
    eprintln!(
        "closed {late:+.2} s from the UserSig's expiry ({:?})",
        erin.ended
    );
    assert!(
        (-1.0..=4.0).contains(&late),
        "the session ended {late:+.2} s from the expiry at {expire_at}"
    );

    // The expired sig is refused (70001); a new one from provisioning logs in again.
    let mut l = login(&c, 1, "erin", &sig, "0");
    l.clean = false;
    assert_eq!(connack(l).await, Connack::Code(5), "the expired sig");
    let d = c.wait_decision_with(
        &c.client_id("erin", "linux", "0"),
        "result=\"refused\"",
        WAIT,
    );
    assert!(d.contains("code=70001"), "refused as expired: {d}");
    let (fresh, _) = c.fetch_sig("erin");
    assert_eq!(
        connack(login(&c, 2, "erin", &fresh, "0")).await,
        Connack::Code(0),
        "a fresh sig"
    );
    assert_no_secrets_in_auth_logs(&c, &[sig, fresh]);
}
