//! The sandbox broker speaks the wire contract of brief §2, checked with a real MQTT v5 client
//! (rumqttc over rustls) and, where exact bytes matter, a raw client.

mod common;

use std::time::Duration;

use common::*;
use imlink_sandbox::LoginFault;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode};
use rumqttc::v5::{ConnectionError, StateError};
use tokio::io::AsyncWriteExt;

fn server_disconnect(e: &ConnectionError) -> (DisconnectReasonCode, Option<String>) {
    match e {
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => (*reason_code, reason_string.clone()),
        other => panic!("expected a server DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn valid_sig_logs_in_and_counts() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(3600));
    let (_c, _el, ack) = connect(options(&sb, "alice", "1", &sig)).await;
    let ack = ack.expect("login accepted");
    assert!(!ack.session_present);
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.max_qos, Some(1));
    assert_eq!(props.retain_available, Some(1));
    let u = sb.user("alice");
    assert_eq!((u.connect_attempts, u.logins_accepted), (1, 1));
    assert_eq!(sb.counters().connections_open, 1);
}

/// Each refusal of brief §2: CONNACK code, reason string `"<code> <text>"`, `im-error-code`.
#[tokio::test]
async fn refusals_carry_code_reason_string_and_im_error_code() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    let key = sb.secret_key().to_string();
    let now = imlink_sandbox::state::unix_now();
    let sig_for = |user: &str, app: u64, key: &str, time: u64, expire: u64| {
        imlink_usersig::generate(&imlink_usersig::SigParams {
            sdk_app_id: app,
            secret_key: key,
            identifier: user,
            time,
            expire,
            userbuf: None,
        })
    };
    let cid = |u: &str| client_id(&sb, u, "1");
    let cases: Vec<(&str, String, String, u8, u32)> = vec![
        (
            "expired",
            cid("u1"),
            sig_for("u1", app, &key, now - 100, 10),
            0x87,
            70001,
        ),
        ("malformed", cid("u2"), "not-a-sig".into(), 0x86, 70003),
        (
            "wrong key",
            cid("u3"),
            sig_for("u3", app, "other-key", now, 600),
            0x86,
            70009,
        ),
        (
            "other user",
            cid("u4"),
            sig_for("someone", app, &key, now, 600),
            0x86,
            70013,
        ),
        (
            "other app",
            cid("u5"),
            sig_for("u5", app + 1, &key, now, 600),
            0x86,
            70014,
        ),
        ("empty sig", cid("u6"), String::new(), 0x86, 70002),
        (
            "bad client id",
            "u7".into(),
            sig_for("u7", app, &key, now, 600),
            0x85,
            6017,
        ),
    ];
    for (what, client, sig, code, im) in &cases {
        let user = client
            .split(':')
            .nth(1)
            .unwrap_or(client.as_str())
            .to_string();
        let (_s, p) = raw_login(&sb, client, &user, sig).await;
        assert_eq!(p.kind, 2, "{what}: CONNACK");
        let (got, reason, props) = p.reason_and_props();
        assert_eq!(got, *code, "{what}: reason code");
        let reason = reason.unwrap_or_default();
        assert!(
            reason.starts_with(&format!("{im} ")),
            "{what}: reason string {reason:?}"
        );
        assert!(
            props.contains(&("im-error-code".into(), im.to_string())),
            "{what}: {props:?}"
        );
    }
    // Banned: a valid sig, refused with 0x8A / 70051.
    sb.ban("u8");
    let (_s, p) = raw_login(
        &sb,
        &cid("u8"),
        "u8",
        &sb.issue_sig("u8", Duration::from_secs(60)),
    )
    .await;
    let (code, reason, _) = p.reason_and_props();
    assert_eq!(
        (code, reason.as_deref().map(|r| &r[..5])),
        (0x8A, Some("70051"))
    );
    sb.unban("u8");
    let (_s, p) = raw_login(
        &sb,
        &cid("u8"),
        "u8",
        &sb.issue_sig("u8", Duration::from_secs(60)),
    )
    .await;
    assert_eq!(p.reason_and_props().0, 0, "unban lets the user in");

    let c = sb.counters();
    assert_eq!(c.user("u1").refusals.get("0x87"), Some(&1));
    assert_eq!(c.user("u3").refusals.get("0x86"), Some(&1));
    assert_eq!(c.user("u8").refusals.get("0x8A"), Some(&1));
    assert_eq!(c.user("u8").logins_accepted, 1);
    assert_eq!(c.user("u7").refusals.get("0x85"), Some(&1));

    // rumqttc sees the code (it drops the reason string).
    let (_c, _el, r) = connect(options(&sb, "u1", "1", &cases[0].2)).await;
    assert!(matches!(
        r,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        ))
    ));
}

#[tokio::test]
async fn repeated_failed_logins_hit_the_rate_limit() {
    let sb = imlink_sandbox::Sandbox::start(imlink_sandbox::SandboxOptions {
        failed_login_limit: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let cid = client_id(&sb, "eve", "1");
    for _ in 0..3 {
        let (_s, p) = raw_login(&sb, &cid, "eve", "bad").await;
        assert_eq!(p.reason_and_props().0, 0x86);
    }
    let (_s, p) = raw_login(
        &sb,
        &cid,
        "eve",
        &sb.issue_sig("eve", Duration::from_secs(60)),
    )
    .await;
    let (code, reason, _) = p.reason_and_props();
    assert_eq!(code, 0x9F);
    assert!(reason.unwrap().starts_with("70050 "));
}

#[tokio::test]
async fn refuse_next_switch_refuses_with_the_given_code_then_disarms() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("bob", Duration::from_secs(600));
    sb.refuse_next(0x89, Some(2), Some("bob"));
    for _ in 0..2 {
        let (_c, _el, r) = connect(options(&sb, "bob", "1", &sig)).await;
        assert!(matches!(
            r,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::ServerBusy
            ))
        ));
    }
    let (_c, _el, r) = connect(options(&sb, "bob", "1", &sig)).await;
    assert!(r.is_ok());
    // Armed for someone else: bob is not affected.
    sb.refuse_next(0x88, None, Some("carol"));
    let (_c2, _el2, r) = connect(options(&sb, "bob", "2", &sig)).await;
    assert!(r.is_ok());
    let u = sb.user("bob");
    assert_eq!(u.refusals.get("0x89"), Some(&2));
    assert_eq!(u.connect_attempts, 4);
}

#[tokio::test]
async fn takeover_sends_0x8e_with_6208_to_the_older_session() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (_c1, mut el1, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    let (_c2, _el2, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    let (e, _) = run_until_error(&mut el1).await;
    let (code, reason) = server_disconnect(&e);
    assert_eq!(code, DisconnectReasonCode::SessionTakenOver);
    assert!(reason.unwrap().starts_with("6208 "));
    let u = sb
        .wait_for("the takeover to be counted", WAIT, |c| {
            c.user("alice").server_disconnects.get("0x8E") == Some(&1)
        })
        .await
        .unwrap()
        .user("alice");
    assert_eq!(u.logins_accepted, 2);
}

#[tokio::test]
async fn sig_expiry_while_online_sends_0xa0_with_70001() {
    let sb = sandbox().await;
    // 3 s: valid through its last second, which can begin 2.0 s after the issue; the login
    // (TLS and CONNECT) has to fit in that on a loaded machine.
    let sig = sb.issue_sig("alice", Duration::from_secs(3));
    let (_c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    let (e, _) = run_until_error(&mut el).await;
    let (code, reason) = server_disconnect(&e);
    assert_eq!(code, DisconnectReasonCode::MaximumConnectTime);
    assert!(reason.unwrap().starts_with("70001 "));
}

#[tokio::test]
async fn expire_switch_disconnects_with_0xa0_and_refuses_the_old_sig() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(3600));
    let (_c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    assert_eq!(sb.expire_sig("alice"), 1);
    let (e, _) = run_until_error(&mut el).await;
    assert_eq!(
        server_disconnect(&e).0,
        DisconnectReasonCode::MaximumConnectTime
    );
    let (_c, _el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    assert!(matches!(
        r,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        ))
    ));
    // A freshly issued sig is a different one, and works.
    let fresh = sb.issue_sig("alice", Duration::from_secs(3600));
    assert_ne!(fresh, sig);
    let (_c, _el, r) = connect(options(&sb, "alice", "1", &fresh)).await;
    r.unwrap();
}

#[tokio::test]
async fn admin_kick_sends_0x98() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (_c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    assert_eq!(sb.kick("alice"), 1);
    let (e, _) = run_until_error(&mut el).await;
    let (code, reason) = server_disconnect(&e);
    assert_eq!(code, DisconnectReasonCode::AdministrativeAction);
    assert!(reason.unwrap().starts_with("6208 "));
    sb.wait_for("kick counted", WAIT, |c| {
        c.user("alice").server_disconnects.get("0x98") == Some(&1)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn session_present_follows_clean_start_and_session_expiry() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    assert!(!r.unwrap().session_present);
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;
    sb.wait_for("normal disconnect", WAIT, |c| {
        c.user("alice").disconnects_normal == 1
    })
    .await
    .unwrap();

    let (c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    assert!(r.unwrap().session_present, "persistent session resumed");
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;

    let mut o = options(&sb, "alice", "1", &sig);
    o.set_clean_start(true);
    let (c, mut el, r) = connect(o).await;
    assert!(
        !r.unwrap().session_present,
        "clean start discards the session"
    );
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;

    // Session expiry 0: the session ends with the connection.
    let mut o = options(&sb, "alice", "2", &sig);
    o.set_session_expiry_interval(None);
    let (c, mut el, r) = connect(o.clone()).await;
    r.unwrap();
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;
    sb.wait_for("disconnects", WAIT, |c| {
        c.user("alice").disconnects_normal == 4
    })
    .await
    .unwrap();
    let (_c, _el, r) = connect(o).await;
    assert!(!r.unwrap().session_present);

    // Session expiry honoured: 1 s, then gone.
    let mut o = options(&sb, "alice", "3", &sig);
    o.set_session_expiry_interval(Some(1));
    let (c, mut el, r) = connect(o.clone()).await;
    r.unwrap();
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;
    sb.wait_for("disconnects", WAIT, |c| {
        c.user("alice").disconnects_normal == 5
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // the interval under test
    let (_c, _el, r) = connect(o).await;
    assert!(!r.unwrap().session_present, "expired session not resumed");
}

#[tokio::test]
async fn qos1_waits_for_an_offline_persistent_session_and_is_delivered_on_reconnect() {
    let sb = sandbox().await;
    let alice_sig = sb.issue_sig("alice", Duration::from_secs(600));
    let bob_sig = sb.issue_sig("bob", Duration::from_secs(600));
    let topic = format!("im/{}/u/alice/inbox", sb.sdk_app_id());

    let (alice, mut ael, r) = connect(options(&sb, "alice", "1", &alice_sig)).await;
    r.unwrap();
    alice
        .subscribe(
            format!("im/{}/u/alice/#", sb.sdk_app_id()),
            QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let suback = until_suback(&mut ael).await;
    assert_eq!(
        format!("{:?}", suback.return_codes),
        "[Success(AtLeastOnce)]"
    );
    alice.disconnect().await.unwrap();
    let _ = run_until_error(&mut ael).await;

    let (bob, mut bel, r) = connect(options(&sb, "bob", "1", &bob_sig)).await;
    r.unwrap();
    let bob_loop = tokio::spawn(async move { while bel.poll().await.is_ok() {} });
    bob.publish(&topic, QoS::AtLeastOnce, false, "while you were away")
        .await
        .unwrap();
    bob.publish(&topic, QoS::AtMostOnce, false, "qos0 is not kept")
        .await
        .unwrap();
    sb.wait_for("bob's publishes", WAIT, |c| {
        c.user("bob").messages_published == 2
    })
    .await
    .unwrap();
    bob_loop.abort();

    let (_alice, mut ael, r) = connect(options(&sb, "alice", "1", &alice_sig)).await;
    assert!(r.unwrap().session_present);
    let got = receive(&mut ael, 1).await;
    assert_eq!(&got[0].payload[..], b"while you were away");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    sb.wait_for("the ack", WAIT, |c| c.user("alice").messages_delivered == 1)
        .await
        .unwrap();
}

#[tokio::test]
async fn routing_honours_wildcards_and_the_topic_acl() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (alice, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    alice
        .subscribe(format!("im/{app}/u/alice/+/x"), QoS::AtMostOnce)
        .await
        .unwrap();
    let s = until_suback(&mut el).await;
    assert_eq!(format!("{:?}", s.return_codes), "[Success(AtMostOnce)]");
    // Someone else's topics, shared subscriptions and bad filters are refused.
    alice
        .subscribe(format!("im/{app}/u/bob/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        format!("{:?}", until_suback(&mut el).await.return_codes),
        "[NotAuthorized]"
    );
    alice
        .subscribe(format!("$share/g/im/{app}/u/alice/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        format!("{:?}", until_suback(&mut el).await.return_codes),
        "[SharedSubscriptionsNotSupported]"
    );

    assert_eq!(sb.publish(&format!("im/{app}/u/alice/a/x"), 1, b"one"), 1);
    assert_eq!(sb.publish(&format!("im/{app}/u/alice/a/y"), 1, b"no"), 0);
    assert_eq!(sb.publish(&format!("im/{app}/u/alice/a/b/x"), 1, b"no"), 0);
    assert_eq!(sb.publish(&format!("im/{app}/u/alice/b/x"), 1, b"two"), 1);
    let got = receive(&mut el, 2).await;
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, [&b"one"[..], &b"two"[..]]);
    // Granted QoS 0 caps delivery.
    assert!(got.iter().all(|p| p.qos == QoS::AtMostOnce));
}

#[tokio::test]
async fn publishing_outside_the_user_tree_or_to_ctl_is_refused() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    assert!(imlink_sandbox::broker::publish_allowed(
        app,
        &format!("im/{app}/u/bob/inbox")
    ));
    assert!(!imlink_sandbox::broker::publish_allowed(
        app,
        &format!("im/{app}/u/bob/ctl")
    ));
    assert!(!imlink_sandbox::broker::publish_allowed(
        app,
        &format!("im/{app}/u/bob")
    ));
    assert!(!imlink_sandbox::broker::publish_allowed(app, "elsewhere/x"));
    let sig = sb.issue_sig("bob", Duration::from_secs(600));
    let (bob, mut el, r) = connect(options(&sb, "bob", "1", &sig)).await;
    r.unwrap();
    bob.publish("elsewhere/x", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    loop {
        match el.poll().await.unwrap() {
            rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) => {
                assert_eq!(format!("{:?}", a.reason), "NotAuthorized");
                break;
            }
            _ => continue,
        }
    }
    assert_eq!(sb.user("bob").messages_published, 0);
}

#[tokio::test]
async fn on_login_switch_disconnects_or_closes_right_after_connack() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    sb.on_login(
        LoginFault::Disconnect { code: 0xA0 },
        Some(1),
        Some("alice"),
    );
    let (_c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    let (e, _) = run_until_error(&mut el).await;
    assert_eq!(
        server_disconnect(&e).0,
        DisconnectReasonCode::MaximumConnectTime
    );

    sb.on_login(LoginFault::Close, Some(1), None);
    let (_c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    let (e, _) = run_until_error(&mut el).await;
    assert!(
        matches!(
            e,
            ConnectionError::MqttState(StateError::ConnectionAborted)
                | ConnectionError::Io(_)
                | ConnectionError::MqttState(StateError::Io(_))
        ),
        "a silent close, not a DISCONNECT: {e:?}"
    );
    // Disarmed after one use each.
    let (_c, _el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    sb.wait_for("counters", WAIT, |c| {
        let u = c.user("alice");
        u.logins_accepted == 3 && u.connections_lost == 1
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn drop_all_closes_sockets_without_disconnect_and_publishes_wills() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let watcher_sig = sb.issue_sig("bob", Duration::from_secs(600));
    let (bob, mut bel, r) = connect(options(&sb, "bob", "1", &watcher_sig)).await;
    r.unwrap();
    bob.subscribe(format!("im/{app}/u/bob/presence"), QoS::AtLeastOnce)
        .await
        .unwrap();
    until_suback(&mut bel).await;

    let mut o = options(&sb, "alice", "1", &sig);
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        format!("im/{app}/u/bob/presence"),
        "alice gone",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (_c, mut el, r) = connect(o).await;
    r.unwrap();
    assert_eq!(sb.drop_all(), 2);
    let (e, _) = run_until_error(&mut el).await;
    assert!(!matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect { .. })
    ));
    sb.wait_for("both lost, one will", WAIT, |c| {
        c.user("alice").connections_lost == 1
            && c.user("bob").connections_lost == 1
            && c.user("alice").wills_published == 1
            && c.connections_open == 0
    })
    .await
    .unwrap();
    // bob's persistent session got the will while he was offline.
    let (_bob, mut bel, r) = connect(options(&sb, "bob", "1", &watcher_sig)).await;
    assert!(r.unwrap().session_present);
    assert_eq!(&receive(&mut bel, 1).await[0].payload[..], b"alice gone");
}

#[tokio::test]
async fn normal_disconnect_publishes_no_will() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let mut o = options(&sb, "alice", "1", &sig);
    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
        format!("im/{app}/u/bob/presence"),
        "x",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    let (c, mut el, r) = connect(o).await;
    r.unwrap();
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;
    let u = sb
        .wait_for("normal disconnect", WAIT, |c| {
            c.user("alice").disconnects_normal == 1
        })
        .await
        .unwrap()
        .user("alice");
    assert_eq!(u.wills_published, 0);
    assert_eq!(u.connections_lost, 0);
}

#[tokio::test]
async fn listener_stop_refuses_connections_and_start_brings_it_back() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (_c, mut el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    r.unwrap();
    sb.stop_listener().await.unwrap();
    let (e, _) = run_until_error(&mut el).await;
    assert!(!matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect { .. })
    ));
    let refused = tokio::net::TcpStream::connect(sb.endpoints().mqtt_addr).await;
    assert!(refused.is_err(), "nothing listens while stopped");
    sb.start_listener().await.unwrap();
    let (_c, _el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    assert!(r.unwrap().session_present);
}

#[tokio::test]
async fn keepalive_is_enforced_with_0x8d() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet(
        &client_id(&sb, "alice", "1"),
        "alice",
        &sig,
        1,
        5,
    ))
    .await
    .unwrap();
    let ack = read_raw(&mut s).await.unwrap();
    assert_eq!(ack.reason_and_props().0, 0);
    // Silent for 1.5 × keepalive: the broker gives up.
    let p = tokio::time::timeout(Duration::from_secs(5), read_raw(&mut s))
        .await
        .expect("DISCONNECT within 5 s")
        .expect("a packet");
    assert_eq!((p.kind, p.reason_and_props().0), (14, 0x8D));
}

#[tokio::test]
async fn mqtt_3_clients_get_a_v3_connack_refusal() {
    let sb = sandbox().await;
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet("c", "alice", "x", 30, 4))
        .await
        .unwrap();
    let p = read_raw(&mut s).await.unwrap();
    assert_eq!((p.kind, p.body.as_slice()), (2, &[0u8, 1][..]));
}

#[tokio::test]
async fn client_certificates_are_accepted_and_counted() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let mut o = options(&sb, "alice", "1", &sig);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls_config(
            &sb.endpoints().ca_pem,
            Some((sb.client_cert_pem(), sb.client_key_pem())),
        )),
    ));
    let (_c, _el, r) = connect(o).await;
    r.unwrap();
    assert_eq!(sb.user("alice").client_cert_logins, 1);
}

#[tokio::test]
async fn required_client_certificate_is_enforced() {
    let sb = imlink_sandbox::Sandbox::start(imlink_sandbox::SandboxOptions {
        require_client_cert: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (_c, _el, r) = connect(options(&sb, "alice", "1", &sig)).await;
    assert!(r.is_err(), "no client certificate, no session");
    sb.wait_for("handshake failure", WAIT, |c| c.tls_handshake_failures >= 1)
        .await
        .unwrap();
}
