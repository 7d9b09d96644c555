//! Bad input never crashes the sandbox: garbage bytes, wrong TLS, oversized and malformed
//! packets, junk HTTP. After each, the sandbox still serves a normal login.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn still_serves(sb: &imlink_sandbox::Sandbox) {
    let sig = sb.issue_sig("ok", Duration::from_secs(60));
    let (_c, _el, r) = connect(options(sb, "ok", "probe", &sig)).await;
    r.expect("the sandbox still accepts a normal login");
    let p = provision_get(
        sb,
        "/v1/usersig?user_id=ok",
        Some(&sb.endpoints().device_token),
    )
    .await;
    assert_eq!(p.status, 200);
}

#[tokio::test]
async fn plaintext_and_garbage_on_the_tls_ports_fail_the_handshake_only() {
    let sb = sandbox().await;
    for addr in [sb.endpoints().mqtt_addr, sb.endpoints().provisioning_addr] {
        // Plain MQTT CONNECT on a TLS port.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect_packet("c", "u", "p", 30, 5))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
        // Random bytes.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0xFF, 0xFF, 1, 2, 3])
            .await
            .unwrap();
        let _ = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
    }
    sb.wait_for("4 failed handshakes", WAIT, |c| {
        c.tls_handshake_failures >= 4
    })
    .await
    .unwrap();
    still_serves(&sb).await;
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_cleanly() {
    let sb = sandbox().await;
    let other = imlink_sandbox::pki::Pki::generate(false).unwrap();
    let tcp = tokio::net::TcpStream::connect(sb.endpoints().mqtt_addr)
        .await
        .unwrap();
    let r = tokio_rustls::TlsConnector::from(tls_config(&other.ca_pem, None))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await;
    assert!(r.is_err());
    sb.wait_for("a failed handshake", WAIT, |c| {
        c.tls_handshake_failures >= 1
    })
    .await
    .unwrap();
    still_serves(&sb).await;
}

#[tokio::test]
async fn malformed_and_oversized_mqtt_packets_get_a_disconnect() {
    let sb = sandbox().await;
    let sig = sb.issue_sig("alice", Duration::from_secs(600));
    let cid = client_id(&sb, "alice", "1");

    // Garbage instead of CONNECT: CONNACK with an error code, then closed.
    let mut s = tls_connect(&sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&[0x10, 0x03, 0xFF, 0xFF, 0xFF]).await.unwrap();
    let p = read_raw(&mut s).await.expect("a CONNACK");
    assert_eq!(p.kind, 2);
    assert_eq!(p.body[1], 0x81);

    // After login: a packet over the maximum size → DISCONNECT 0x95.
    let (mut s, ack) = raw_login(&sb, &cid, "alice", &sig).await;
    assert_eq!(ack.reason_and_props().0, 0);
    let mut big = vec![0x30, 0xFF, 0xFF, 0x7F];
    big.extend(std::iter::repeat_n(0u8, 1024));
    s.write_all(&big).await.unwrap();
    let p = read_raw(&mut s).await.expect("DISCONNECT");
    assert_eq!((p.kind, p.body[0]), (14, 0x95));

    // After login: a malformed PUBLISH (topic length past the end) → DISCONNECT 0x81.
    let (mut s, _) = raw_login(&sb, &cid, "alice", &sig).await;
    s.write_all(&[0x30, 0x03, 0x00, 0x09, b'a']).await.unwrap();
    let p = read_raw(&mut s).await.expect("DISCONNECT");
    assert_eq!((p.kind, p.body[0]), (14, 0x81));

    // A second CONNECT is a protocol error (0x82); QoS 2 is not supported (0x9B).
    let (mut s, _) = raw_login(&sb, &cid, "alice", &sig).await;
    s.write_all(&connect_packet(&cid, "alice", &sig, 30, 5))
        .await
        .unwrap();
    assert_eq!(read_raw(&mut s).await.unwrap().body[0], 0x82);
    let (mut s, _) = raw_login(&sb, &cid, "alice", &sig).await;
    s.write_all(&[0x34, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00])
        .await
        .unwrap();
    assert_eq!(read_raw(&mut s).await.unwrap().body[0], 0x9B);

    // Half a packet then silence, and random bytes after login: nothing crashes.
    let (mut s, _) = raw_login(&sb, &cid, "alice", &sig).await;
    s.write_all(&[0x30, 0x10, 0x00]).await.unwrap();
    drop(s);
    let (mut s, _) = raw_login(&sb, &cid, "alice", &sig).await;
    let mut x: u32 = 12345;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    let _ = s.write_all(&junk).await;
    let _ = read_raw(&mut s).await;

    sb.wait_for("protocol errors counted", WAIT, |c| c.protocol_errors >= 5)
        .await
        .unwrap();
    still_serves(&sb).await;
}

#[tokio::test]
async fn junk_http_gets_4xx_and_the_endpoint_keeps_serving() {
    let sb = sandbox().await;
    let url = admin_host(&sb);
    let send = |bytes: Vec<u8>| {
        let url = url.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(url).await.unwrap();
            let _ = s.write_all(&bytes).await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    assert!(
        send(b"\x00\x01\x02 garbage\r\n\r\n".to_vec())
            .await
            .starts_with("HTTP/1.1 400")
    );
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 40 * 1024));
    assert!(send(huge).await.starts_with("HTTP/1.1 431"));
    let big_body = b"POST /publish HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec();
    assert!(send(big_body).await.starts_with("HTTP/1.1 413"));
    assert!(
        send(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec())
            .await
            .starts_with("HTTP/1.1 400")
    );
    sb.wait_for("bad requests counted", WAIT, |c| c.http_bad_requests >= 4)
        .await
        .unwrap();
    still_serves(&sb).await;
}
