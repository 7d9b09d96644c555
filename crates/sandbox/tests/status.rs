//! The device status contract on the sandbox, checked with real MQTT v5 clients (rumqttc over
//! rustls) and, where exact bytes matter, a raw client: retained messages (kept, replaced,
//! deleted, bounded, sent to new subscribers with the RETAIN flag), last wills (published on
//! every ending but a normal DISCONNECT), the status-topic ACL, and operator identities.

mod common;

use std::time::Duration;

use common::*;
use imlink_sandbox::{Sandbox, SandboxOptions};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, DisconnectReasonCode, Filter, LastWill, Packet, PubAckReason, Publish,
    RetainForwardRule, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use tokio::io::AsyncWriteExt;

const OPS: (&str, &str) = ("ops", "operator-token-123");

async fn sandbox_with_ops() -> Sandbox {
    Sandbox::start(SandboxOptions {
        operators: vec![(OPS.0.into(), OPS.1.into())],
        ..Default::default()
    })
    .await
    .unwrap()
}

fn status_topic(sb: &Sandbox, user: &str, instance: &str) -> String {
    format!("im/{}/d/{user}/linux/{instance}/status", sb.sdk_app_id())
}

/// A device's options with a retained QoS 1 will on its status topic.
fn device_with_will(sb: &Sandbox, user: &str, instance: &str, will: &str) -> MqttOptions {
    let sig = sb.issue_sig(user, Duration::from_secs(600));
    let mut o = options(sb, user, instance, &sig);
    o.set_last_will(LastWill::new(
        status_topic(sb, user, instance),
        will.to_string(),
        QoS::AtLeastOnce,
        true,
        None,
    ));
    o
}

fn operator_options(sb: &Sandbox, client_id: &str, token: &str) -> MqttOptions {
    let addr = sb.endpoints().mqtt_addr;
    let mut o = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls_config(&sb.endpoints().ca_pem, None)),
    ));
    o.set_credentials(OPS.0, token);
    o.set_clean_start(true);
    o
}

/// An operator connected and subscribed to every status topic; returns it once the SUBACK
/// granted the subscription.
async fn operator(sb: &Sandbox) -> (AsyncClient, EventLoop) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (c, mut el, ack) = connect(operator_options(sb, &format!("ops-console-{n}"), OPS.1)).await;
    ack.expect("the operator logs in");
    c.subscribe(
        format!("im/{}/d/+/+/+/status", sb.sdk_app_id()),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    let s = until_suback(&mut el).await;
    assert_eq!(
        s.return_codes,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    (c, el)
}

/// Poll until the next PUBLISH.
async fn next_publish(el: &mut EventLoop) -> Publish {
    receive(el, 1).await.remove(0)
}

/// Poll until the PUBACK of the last publish; returns its reason.
async fn until_puback(el: &mut EventLoop) -> PubAckReason {
    loop {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("poll timed out")
        {
            Ok(Event::Incoming(Packet::PubAck(a))) => return a.reason,
            Ok(_) => {}
            Err(e) => panic!("connection ended while waiting for PUBACK: {e}"),
        }
    }
}

fn text(p: &Publish) -> (String, String, bool) {
    (
        String::from_utf8_lossy(&p.topic).into_owned(),
        String::from_utf8_lossy(&p.payload).into_owned(),
        p.retain,
    )
}

/// Keep an event loop polled in the background (a connected client that does nothing).
fn pump(mut el: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while el.poll().await.is_ok() {} })
}

#[tokio::test]
async fn retained_status_is_kept_replaced_deleted_and_sent_to_new_subscribers_flagged() {
    let sb = sandbox_with_ops().await;
    let topic = status_topic(&sb, "alice", "0");
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (alice, mut ael, ack) = connect(options(&sb, "alice", "0", &sig)).await;
    assert_eq!(ack.unwrap().properties.unwrap().retain_available, Some(1));
    alice
        .publish(&topic, QoS::AtLeastOnce, true, "online-1")
        .await
        .unwrap();
    assert_eq!(until_puback(&mut ael).await, PubAckReason::Success);

    // A new subscriber gets it with RETAIN = 1.
    let (_op, mut oel) = operator(&sb).await;
    assert_eq!(
        text(&next_publish(&mut oel).await),
        (topic.clone(), "online-1".into(), true)
    );

    // A live replacement reaches the subscriber with RETAIN = 0 (no Retain As Published)
    // and replaces what a later subscriber gets.
    alice
        .publish(&topic, QoS::AtLeastOnce, true, "online-2")
        .await
        .unwrap();
    assert_eq!(until_puback(&mut ael).await, PubAckReason::Success);
    assert_eq!(
        text(&next_publish(&mut oel).await),
        (topic.clone(), "online-2".into(), false)
    );
    let (_op2, mut oel2) = operator(&sb).await;
    assert_eq!(
        text(&next_publish(&mut oel2).await),
        (topic.clone(), "online-2".into(), true)
    );
    let c = sb.counters();
    assert_eq!((c.retained, c.user("alice").retained_published), (1, 2));
    assert_eq!(
        c.retained_bytes,
        (topic.len() + "online-2".len()) as u64,
        "topic + payload"
    );

    // An empty payload deletes it (and is delivered to current subscribers as it is).
    alice
        .publish(&topic, QoS::AtLeastOnce, true, Vec::<u8>::new())
        .await
        .unwrap();
    assert_eq!(until_puback(&mut ael).await, PubAckReason::Success);
    assert_eq!(text(&next_publish(&mut oel).await).1, "");
    assert!(sb.retained("#").is_empty());
    assert_eq!(sb.counters().retained_bytes, 0);
    // A new subscriber gets nothing for alice now: bob's status is the first it sees.
    let bob_sig = sb.issue_sig("bob", Duration::from_secs(600));
    let (bob, mut bel, ack) = connect(options(&sb, "bob", "0", &bob_sig)).await;
    ack.unwrap();
    bob.publish(status_topic(&sb, "bob", "0"), QoS::AtLeastOnce, true, "b")
        .await
        .unwrap();
    assert_eq!(until_puback(&mut bel).await, PubAckReason::Success);
    let (_op3, mut oel3) = operator(&sb).await;
    assert_eq!(
        text(&next_publish(&mut oel3).await).0,
        status_topic(&sb, "bob", "0")
    );
}

#[tokio::test]
async fn subscription_options_decide_about_retained_messages() {
    let sb = sandbox_with_ops().await;
    let app = sb.sdk_app_id();
    sb.publish_with(&status_topic(&sb, "alice", "0"), 1, true, b"kept")
        .unwrap();
    let (op, mut el, ack) = connect(operator_options(&sb, "ops-1", OPS.1)).await;
    ack.unwrap();
    // Retain Handling 2 (never): nothing at subscribe; Retain As Published: live messages
    // keep their RETAIN flag.
    let mut never = Filter::new(format!("im/{app}/d/alice/#"), QoS::AtLeastOnce);
    never.retain_forward_rule = RetainForwardRule::Never;
    never.preserve_retain = true;
    op.subscribe_many([never]).await.unwrap();
    until_suback(&mut el).await;
    sb.publish_with(&status_topic(&sb, "alice", "0"), 1, true, b"live")
        .unwrap();
    assert_eq!(
        text(&next_publish(&mut el).await),
        (status_topic(&sb, "alice", "0"), "live".into(), true),
        "only the live one, flagged as published"
    );
    // Retain Handling 1 (only for a new subscription): the same filter again sends nothing;
    // a new filter sends the retained message.
    let mut again = Filter::new(format!("im/{app}/d/alice/#"), QoS::AtLeastOnce);
    again.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    op.subscribe_many([again]).await.unwrap();
    until_suback(&mut el).await;
    let mut fresh = Filter::new(format!("im/{app}/d/+/linux/#"), QoS::AtMostOnce);
    fresh.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
    op.subscribe_many([fresh]).await.unwrap();
    until_suback(&mut el).await;
    let p = next_publish(&mut el).await;
    assert_eq!(
        text(&p),
        (status_topic(&sb, "alice", "0"), "live".into(), true)
    );
    assert_eq!(p.qos, QoS::AtMostOnce, "at the lower of the two QoS");
}

#[tokio::test]
async fn retained_messages_are_bounded_by_count_and_bytes_with_puback_0x97() {
    let sb = Sandbox::start(SandboxOptions {
        max_retained: 2,
        max_retained_bytes: 200,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut clients = Vec::new();
    let mut publish = async |user: &str, payload: Vec<u8>| -> PubAckReason {
        let sig = sb.issue_sig(user, Duration::from_secs(600));
        let (c, mut el, ack) = connect(options(&sb, user, "0", &sig)).await;
        ack.unwrap();
        c.publish(
            status_topic(&sb, user, "0"),
            QoS::AtLeastOnce,
            true,
            payload,
        )
        .await
        .unwrap();
        let r = until_puback(&mut el).await;
        clients.push((c, el));
        r
    };
    assert_eq!(publish("u1", b"a".to_vec()).await, PubAckReason::Success);
    assert_eq!(publish("u2", b"b".to_vec()).await, PubAckReason::Success);
    // A third topic is beyond the count.
    assert_eq!(
        publish("u3", b"c".to_vec()).await,
        PubAckReason::QuotaExceeded
    );
    // Replacing one of the two is fine; growing it beyond the bytes is not.
    assert_eq!(
        publish("u1", b"again".to_vec()).await,
        PubAckReason::Success
    );
    assert_eq!(
        publish("u1", vec![b'x'; 180]).await,
        PubAckReason::QuotaExceeded
    );
    let kept = sb.retained("#");
    assert_eq!(kept.len(), 2);
    assert_eq!(
        kept[0].1.payload, b"again",
        "the refused one changed nothing"
    );
    let c = sb.counters();
    assert_eq!(c.user("u3").messages_refused.get("0x97"), Some(&1));
    assert_eq!(c.user("u1").messages_refused.get("0x97"), Some(&1));
    assert_eq!(c.retained, 2);
}

/// Every way a connection can end without a normal DISCONNECT publishes its retained will,
/// which an operator connected at the time sees and a later one reads.
#[tokio::test]
async fn wills_are_published_on_every_ending_but_a_normal_disconnect() {
    let sb = sandbox_with_ops().await;
    let (_op, mut oel) = operator(&sb).await;

    // Socket loss: the client's event loop (and its socket) just goes away.
    let (_c, el, ack) = connect(device_with_will(&sb, "lost", "0", "lost:offline")).await;
    ack.unwrap();
    drop(el);
    assert_eq!(text(&next_publish(&mut oel).await).1, "lost:offline");

    // Admin kick (0x98), UserSig expiry (0xA0), takeover (0x8E), DISCONNECT with will (0x04).
    let (_c, mut el, ack) = connect(device_with_will(&sb, "kicked", "0", "kicked:offline")).await;
    ack.unwrap();
    assert_eq!(sb.kick("kicked"), 1);
    let (e, _) = run_until_error(&mut el).await;
    assert!(matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::AdministrativeAction,
            ..
        })
    ));
    assert_eq!(text(&next_publish(&mut oel).await).1, "kicked:offline");

    let (_c, mut el, ack) = connect(device_with_will(&sb, "expired", "0", "expired:offline")).await;
    ack.unwrap();
    assert_eq!(sb.expire_sig("expired"), 1);
    let _ = run_until_error(&mut el).await;
    assert_eq!(text(&next_publish(&mut oel).await).1, "expired:offline");

    // DISCONNECT 0x04 "disconnect with will message" (rumqttc sends only 0x00: raw bytes).
    let sig = sb.issue_sig("bye", Duration::from_secs(600));
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet_with_will(
        &client_id(&sb, "bye", "0"),
        "bye",
        &sig,
        30,
        (&status_topic(&sb, "bye", "0"), b"bye:offline", 1, true),
        &[],
    ))
    .await
    .unwrap();
    assert_eq!(read_raw(&mut s).await.unwrap().reason_and_props().0, 0);
    s.write_all(&[0xE0, 0x01, 0x04]).await.unwrap();
    assert_eq!(text(&next_publish(&mut oel).await).1, "bye:offline");
    drop(s);

    // drop-all: every socket closed, every will published (the operator's own connection
    // goes too, so a new operator reads them).
    let (_c, el, ack) = connect(device_with_will(&sb, "dropped", "0", "dropped:offline")).await;
    ack.unwrap();
    let _p = pump(el);
    sb.drop_all();
    sb.wait_for("the will of the dropped one", WAIT, |c| {
        c.user("dropped").wills_published == 1
    })
    .await
    .unwrap();

    // A normal DISCONNECT: no will.
    let (c, mut el, ack) = connect(device_with_will(&sb, "clean", "0", "clean:offline")).await;
    ack.unwrap();
    c.disconnect().await.unwrap();
    let _ = run_until_error(&mut el).await;
    sb.wait_for("the clean disconnect", WAIT, |c| {
        c.user("clean").disconnects_normal == 1
    })
    .await
    .unwrap();

    let (_op, mut oel) = operator(&sb).await;
    let mut seen: Vec<(String, bool)> = receive(&mut oel, 5)
        .await
        .iter()
        .map(|p| (text(p).1, p.retain))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("bye:offline".to_string(), true),
            ("dropped:offline".to_string(), true),
            ("expired:offline".to_string(), true),
            ("kicked:offline".to_string(), true),
            ("lost:offline".to_string(), true),
        ]
    );
    let c = sb.counters();
    assert_eq!(c.user("clean").wills_published, 0);
    assert_eq!(c.retained, 5, "no will for the clean one");
    for u in ["lost", "kicked", "expired", "bye", "dropped"] {
        assert_eq!(c.user(u).wills_published, 1, "{u}");
    }
}

#[tokio::test]
async fn keepalive_timeout_publishes_the_will() {
    let sb = sandbox_with_ops().await;
    let sig = sb.issue_sig("quiet", Duration::from_secs(600));
    let topic = status_topic(&sb, "quiet", "0");
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet_with_will(
        &client_id(&sb, "quiet", "0"),
        "quiet",
        &sig,
        1,
        (&topic, b"quiet:offline", 1, true),
        // A Will Delay Interval of 0 and a content type: parsed, and not in the way.
        &[0x18, 0, 0, 0, 0, 0x03, 0, 4, b'j', b's', b'o', b'n'],
    ))
    .await
    .unwrap();
    assert_eq!(read_raw(&mut s).await.unwrap().reason_and_props().0, 0);
    // Silent past 1.5 × keepalive: DISCONNECT 0x8D, and the will.
    let p = tokio::time::timeout(WAIT, read_raw(&mut s))
        .await
        .expect("a DISCONNECT")
        .expect("a packet");
    assert_eq!((p.kind, p.reason_and_props().0), (14, 0x8D));
    sb.wait_for("the will", WAIT, |c| c.user("quiet").wills_published == 1)
        .await
        .unwrap();
    let kept = sb.retained(&topic);
    assert_eq!(kept[0].1.payload, b"quiet:offline");
    assert_eq!(kept[0].1.qos, 1);
}

/// A takeover publishes the old connection's will before the new connection's CONNACK, so
/// the status the new connection publishes next is never overwritten by the old will.
#[tokio::test]
async fn a_takeover_publishes_the_old_will_before_the_new_connack() {
    let sb = sandbox().await;
    let topic = status_topic(&sb, "alice", "0");
    let (_c1, mut el1, ack) = connect(device_with_will(&sb, "alice", "0", "will-1")).await;
    ack.unwrap();
    let (c2, mut el2, ack) = connect(device_with_will(&sb, "alice", "0", "will-2")).await;
    ack.unwrap();
    // At the new CONNACK, the old will is already the retained status.
    assert_eq!(sb.retained(&topic)[0].1.payload, b"will-1");
    c2.publish(&topic, QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    assert_eq!(until_puback(&mut el2).await, PubAckReason::Success);
    let (e, _) = run_until_error(&mut el1).await;
    assert!(matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::SessionTakenOver,
            ..
        })
    ));
    sb.wait_for("the old connection's end", WAIT, |c| {
        c.user("alice").server_disconnects.get("0x8E") == Some(&1)
    })
    .await
    .unwrap();
    assert_eq!(sb.retained(&topic)[0].1.payload, b"online");
    assert_eq!(sb.user("alice").wills_published, 1, "once, at the takeover");
}

#[tokio::test]
async fn a_device_writes_only_its_own_status_and_reads_no_status() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (alice, mut el, ack) = connect(options(&sb, "alice", "0", &sig)).await;
    ack.unwrap();
    for (topic, retain) in [
        (status_topic(&sb, "bob", "0"), true),
        (status_topic(&sb, "alice", "1"), true),
        (format!("im/{app}/d/alice/linux/0/other"), true),
        (format!("im/{app}/u/bob/presence"), true),
    ] {
        alice
            .publish(&topic, QoS::AtLeastOnce, retain, "x")
            .await
            .unwrap();
        assert_eq!(
            until_puback(&mut el).await,
            PubAckReason::NotAuthorized,
            "{topic}"
        );
    }
    assert!(sb.retained("#").is_empty());
    alice
        .subscribe(format!("im/{app}/d/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        until_suback(&mut el).await.return_codes,
        [SubscribeReasonCode::NotAuthorized]
    );
    // A platform or instance with a '.' is written with '_'.
    let dotted = format!("{app}:carol:web.v2:a.b");
    let sig = sb.issue_sig("carol", Duration::from_secs(600));
    let mut o = options(&sb, "carol", "0", &sig);
    o.set_client_id(dotted);
    let (carol, mut cel, ack) = connect(o).await;
    ack.unwrap();
    carol
        .publish(
            format!("im/{app}/d/carol/web_v2/a_b/status"),
            QoS::AtLeastOnce,
            true,
            "ok",
        )
        .await
        .unwrap();
    assert_eq!(until_puback(&mut cel).await, PubAckReason::Success);
}

/// What a CONNECT's will may be: checked after the login, refused with a CONNACK that says
/// why (reason string and `im-error-code`).
#[tokio::test]
async fn a_will_outside_the_acl_or_beyond_qos_1_is_refused_at_connect() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let cid = client_id(&sb, "alice", "0");
    let cases: [(&str, String, u8, bool, u8); 4] = [
        (
            "someone else's status",
            status_topic(&sb, "bob", "0"),
            1,
            true,
            0x87,
        ),
        (
            "retained outside the status tree",
            format!("im/{}/u/bob/presence", sb.sdk_app_id()),
            1,
            true,
            0x87,
        ),
        ("QoS 2", status_topic(&sb, "alice", "0"), 2, true, 0x9B),
        ("a wildcard topic", "im/+/x".to_string(), 1, false, 0x90),
    ];
    for (what, topic, qos, retain, code) in cases {
        let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
        s.write_all(&connect_packet_with_will(
            &cid,
            "alice",
            &sig,
            30,
            (&topic, b"x", qos, retain),
            &[],
        ))
        .await
        .unwrap();
        let p = read_raw(&mut s).await.unwrap();
        let (got, reason, _) = p.reason_and_props();
        assert_eq!((p.kind, got), (2, code), "{what}: {reason:?}");
        assert!(reason.unwrap().contains("will"), "{what}");
    }
    // A will property that has no place in a will: a protocol error.
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet_with_will(
        &cid,
        "alice",
        &sig,
        30,
        (&status_topic(&sb, "alice", "0"), b"x", 1, true),
        &[0x11, 0, 0, 0, 5],
    ))
    .await
    .unwrap();
    let p = read_raw(&mut s).await.unwrap();
    assert_eq!((p.kind, p.reason_and_props().0), (2, 0x82));
    assert_eq!(sb.counters().connections_open, 0);
}

#[tokio::test]
async fn an_operator_reads_the_status_tree_and_nothing_else() {
    let sb = sandbox_with_ops().await;
    let app = sb.sdk_app_id();
    sb.publish_with(&status_topic(&sb, "alice", "0"), 1, true, b"s")
        .unwrap();

    // A wrong token: 0x86. An operator with a will: 0x87.
    let (_c, _el, r) = connect(operator_options(&sb, "ops-x", "wrong")).await;
    assert!(matches!(
        r,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::BadUserNamePassword
        ))
    ));
    let mut o = operator_options(&sb, "ops-x", OPS.1);
    o.set_last_will(LastWill::new(
        status_topic(&sb, "ops", "0"),
        "x",
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let (_c, _el, r) = connect(o).await;
    assert!(matches!(
        r,
        Err(ConnectionError::ConnectionRefused(
            ConnectReturnCode::NotAuthorized
        ))
    ));

    // Any client id; the status tree yes, anything else no.
    let (op, mut el, r) = connect(operator_options(&sb, "whatever-id", OPS.1)).await;
    r.unwrap();
    op.subscribe_many([
        Filter::new(format!("im/{app}/d/#"), QoS::AtLeastOnce),
        Filter::new(format!("im/{app}/u/alice/#"), QoS::AtLeastOnce),
        Filter::new("#", QoS::AtLeastOnce),
        Filter::new(format!("im/{}/d/#", app + 1), QoS::AtLeastOnce),
    ])
    .await
    .unwrap();
    assert_eq!(
        until_suback(&mut el).await.return_codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::NotAuthorized,
        ]
    );
    assert_eq!(text(&next_publish(&mut el).await).1, "s");
    // It publishes nothing, its "own" status included.
    for topic in [
        status_topic(&sb, "ops", "0"),
        format!("im/{app}/u/alice/in/ops"),
    ] {
        op.publish(&topic, QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        assert_eq!(until_puback(&mut el).await, PubAckReason::NotAuthorized);
    }
    // Removing the identity ends its connections with 0x98 and refuses it afterwards.
    assert_eq!(sb.remove_operator(OPS.0), 1);
    let (e, _) = run_until_error(&mut el).await;
    assert!(matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::AdministrativeAction,
            ..
        })
    ));
    let (_c, _el, r) = connect(operator_options(&sb, "whatever-id", OPS.1)).await;
    assert!(r.is_err(), "no such operator any more");
}

#[tokio::test]
async fn a_broker_without_retain_refuses_retained_publishes_and_wills_with_0x9a() {
    let sb = Sandbox::start(SandboxOptions {
        retain_available: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let (alice, mut el, ack) = connect(options(&sb, "alice", "0", &sig)).await;
    assert_eq!(ack.unwrap().properties.unwrap().retain_available, Some(0));
    alice
        .publish(status_topic(&sb, "alice", "0"), QoS::AtLeastOnce, true, "x")
        .await
        .unwrap();
    let (e, _) = run_until_error(&mut el).await;
    assert!(matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::RetainNotSupported,
            ..
        })
    ));
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet_with_will(
        &client_id(&sb, "alice", "0"),
        "alice",
        &sig,
        30,
        (&status_topic(&sb, "alice", "0"), b"x", 1, true),
        &[],
    ))
    .await
    .unwrap();
    let p = read_raw(&mut s).await.unwrap();
    assert_eq!((p.kind, p.reason_and_props().0), (2, 0x9A));
}

#[tokio::test]
async fn the_admin_endpoint_publishes_lists_and_clears_retained_messages_and_adds_operators() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();
    let topic = status_topic(&sb, "alice", "0");
    let r = admin(
        &sb,
        "POST",
        &format!("/publish?topic={topic}&retain=1"),
        "{\"v\":1}",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = admin(&sb, "GET", &format!("/retained?filter=im/{app}/u/%23"), "").await;
    assert_eq!(r.json()["matching"], 0);
    let r = admin(&sb, "GET", &format!("/retained?filter=im/{app}/d/%23"), "").await;
    assert_eq!(r.json()["matching"], 1);
    assert_eq!(r.json()["messages"][0]["topic"], topic.as_str());
    assert_eq!(r.json()["messages"][0]["payload"], "{\"v\":1}");

    let r = admin(&sb, "POST", "/operator?name=ops2", "").await;
    let token = r.json()["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 32, "a random token");
    let (op, mut el, ack) = connect({
        let mut o = operator_options(&sb, "c", &token);
        o.set_credentials("ops2", token.clone());
        o
    })
    .await;
    ack.unwrap();
    op.subscribe(format!("im/{app}/d/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    until_suback(&mut el).await;
    assert_eq!(text(&next_publish(&mut el).await).1, "{\"v\":1}");

    let r = admin(&sb, "POST", "/retained/clear", "").await;
    assert_eq!(r.json()["cleared"], 1);
    assert_eq!(sb.counters().retained, 0);
    let r = admin(&sb, "POST", "/operator/remove?name=ops2", "").await;
    assert_eq!(r.json()["disconnected"], 1);
}

/// An operator watching a whole fleet change at once gets every change: status copies are
/// queued far beyond the 1,000 a C2C inbox keeps, and never refuse the device publishing.
#[tokio::test]
async fn an_operator_behind_by_thousands_of_status_changes_loses_none() {
    let sb = sandbox_with_ops().await;
    let (_op, mut el) = operator(&sb).await;
    // Nobody polls the operator's connection while 3,000 devices change.
    for i in 0..3000 {
        sb.publish_with(
            &status_topic(&sb, &format!("d{i}"), "0"),
            1,
            true,
            b"changed",
        )
        .unwrap();
    }
    assert_eq!(receive(&mut el, 3000).await.len(), 3000);
    assert_eq!(sb.counters().deliveries_dropped, 0);
}
