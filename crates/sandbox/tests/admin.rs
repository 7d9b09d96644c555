//! The admin endpoint drives the same switches over HTTP, behind its token.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
use rumqttc::v5::{ConnectionError, StateError};

#[tokio::test]
async fn admin_needs_its_token() {
    let sb = sandbox().await;
    let url = admin_host(&sb);
    let tcp = tokio::net::TcpStream::connect(url).await.unwrap();
    let mut s = tcp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /counters HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
}

#[tokio::test]
async fn admin_switches_work_over_http() {
    let sb = sandbox().await;
    let app = sb.sdk_app_id();

    // issue-sig, then log in with it.
    let r = admin(&sb, "POST", "/issue-sig?user_id=alice&seconds=600", "").await;
    assert_eq!(r.status, 200);
    let sig = r.json()["user_sig"].as_str().unwrap().to_string();
    let (alice, mut el, ack) = connect(options(&sb, "alice", "1", &sig)).await;
    ack.unwrap();
    alice
        .subscribe(
            format!("im/{app}/u/alice/#"),
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    until_suback(&mut el).await;

    // publish as the service.
    let r = admin(
        &sb,
        "POST",
        &format!("/publish?topic=im/{app}/u/alice/ctl&qos=1"),
        "hello",
    )
    .await;
    assert_eq!(r.json()["routed_to"], 1);
    assert_eq!(&receive(&mut el, 1).await[0].payload[..], b"hello");

    // kick → 0x98.
    assert_eq!(
        admin(&sb, "POST", "/kick?user_id=alice", "").await.json()["kicked"],
        1
    );
    let (e, _) = run_until_error(&mut el).await;
    assert!(matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::AdministrativeAction,
            ..
        })
    ));

    // expire → 0xA0.
    let (_a, mut el, ack) = connect(options(&sb, "alice", "1", &sig)).await;
    ack.unwrap();
    assert_eq!(
        admin(&sb, "POST", "/expire?user_id=alice", "").await.json()["disconnected"],
        1
    );
    let (e, _) = run_until_error(&mut el).await;
    assert!(matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code: DisconnectReasonCode::MaximumConnectTime,
            ..
        })
    ));

    // ban / unban.
    let fresh = sb.issue_sig("alice", Duration::from_secs(600));
    assert_eq!(
        admin(&sb, "POST", "/ban?user_id=alice", "").await.status,
        200
    );
    let (_a, _el, ack) = connect(options(&sb, "alice", "1", &fresh)).await;
    assert!(ack.is_err());
    assert_eq!(
        admin(&sb, "POST", "/unban?user_id=alice", "").await.status,
        200
    );

    // refuse with a code, for a count.
    assert_eq!(
        admin(&sb, "POST", "/refuse?code=0x88&count=1&user_id=alice", "")
            .await
            .status,
        200
    );
    let (_a, _el, ack) = connect(options(&sb, "alice", "1", &fresh)).await;
    assert!(matches!(ack, Err(ConnectionError::ConnectionRefused(_))));

    // on-login close, then drop-all and listener stop/start.
    assert_eq!(
        admin(&sb, "POST", "/on-login?action=close&count=1", "")
            .await
            .status,
        200
    );
    let (_a, mut el, ack) = connect(options(&sb, "alice", "1", &fresh)).await;
    ack.unwrap();
    let (e, _) = run_until_error(&mut el).await;
    assert!(!matches!(
        e,
        ConnectionError::MqttState(StateError::ServerDisconnect { .. })
    ));
    let (_a, _el, ack) = connect(options(&sb, "alice", "1", &fresh)).await;
    ack.unwrap();
    assert_eq!(
        admin(&sb, "POST", "/drop-all", "").await.json()["dropped"],
        1
    );
    assert_eq!(admin(&sb, "POST", "/listener/stop", "").await.status, 200);
    assert!(
        tokio::net::TcpStream::connect(sb.endpoints().mqtt_addr)
            .await
            .is_err()
    );
    assert_eq!(admin(&sb, "POST", "/listener/start", "").await.status, 200);
    let (_a, _el, ack) = connect(options(&sb, "alice", "1", &fresh)).await;
    ack.unwrap();

    // provisioning faults, clock offset, sig lifetime, clear.
    let r = admin(
        &sb,
        "POST",
        "/provisioning/fault",
        r#"{"mode":"status","status":503,"retry_after":3,"count":1}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let p = provision_get(
        &sb,
        "/v1/usersig?user_id=alice",
        Some(&sb.endpoints().device_token),
    )
    .await;
    assert_eq!(
        (p.status, p.header("retry-after").as_deref()),
        (503, Some("3"))
    );
    assert_eq!(
        admin(&sb, "POST", "/provisioning/fault", r#"{"mode":"explode"}"#)
            .await
            .status,
        400
    );
    assert_eq!(
        admin(&sb, "POST", "/provisioning/clock-offset?seconds=-60", "")
            .await
            .status,
        200
    );
    assert_eq!(
        admin(&sb, "POST", "/sig-lifetime?seconds=90", "")
            .await
            .status,
        200
    );
    let p = provision_get(
        &sb,
        "/v1/usersig?user_id=alice",
        Some(&sb.endpoints().device_token),
    )
    .await;
    let d = imlink_usersig::decode(p.json()["user_sig"].as_str().unwrap()).unwrap();
    assert_eq!(d.expire, 90);
    assert_eq!(admin(&sb, "POST", "/faults/clear", "").await.status, 200);

    // Counters over HTTP match the library's.
    let c = admin(&sb, "GET", "/counters", "").await.json();
    assert_eq!(c["users"]["alice"]["server_disconnects"]["0x98"], 1);
    assert_eq!(c["users"]["alice"]["server_disconnects"]["0xA0"], 1);
    assert_eq!(c["users"]["alice"]["refusals"]["0x8A"], 1);
    assert_eq!(c["users"]["alice"]["refusals"]["0x88"], 1);

    // Errors are clear.
    assert_eq!(admin(&sb, "POST", "/kick", "").await.status, 400);
    assert_eq!(admin(&sb, "POST", "/refuse", "").await.status, 400);
    assert_eq!(admin(&sb, "POST", "/nope", "").await.status, 404);
    assert_eq!(admin(&sb, "DELETE", "/kick", "").await.status, 405);
}
