//! One nats-server 2.15.1 node (JetStream standalone) with imlink-auth on its plain-TCP
//! loopback client port (`nats://`): MQTT logins work through it, and a client that is not
//! MQTT — a plain NATS client with a valid-looking user and password — is refused (6017) and
//! gets the server's authorization violation.

mod common;

use std::time::Duration;

use common::*;
use imlink_auth::proto::{self, Decoder, ServerOp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_plain_nats_mqtt_logs_in_and_a_plain_nats_client_is_refused() {
    let c = ImCluster::up(
        &bin_dir(),
        "plain",
        &UpOptions {
            nodes: 1,
            auth: 1,
            nats_plain: true,
            ..Default::default()
        },
    );
    assert!(c.e.nats_urls[0].starts_with("nats://127.0.0.1:"));
    assert!(
        c.auth_log(0).contains("url=nats://127.0.0.1:"),
        "imlink-auth uses plain TCP"
    );

    let sig = c.sig("alice", 60);
    assert_eq!(
        connack(login(&c, 0, "alice", &sig, "0")).await,
        Connack::Code(0)
    );

    // A NATS client, with alice's name and a valid UserSig: the callout is asked, and refuses.
    let addr = c.e.nats_urls[0]
        .strip_prefix("nats://")
        .unwrap()
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut d = Decoder::default();
    let mut buf = vec![0u8; 8192];
    let mut next = async |s: &mut tokio::net::TcpStream, d: &mut Decoder| loop {
        if let Some(op) = d.decode().unwrap() {
            return Some(op);
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => d.push(&buf[..n]),
            _ => return None,
        }
    };
    assert!(matches!(
        next(&mut s, &mut d).await,
        Some(ServerOp::Info(_))
    ));
    let mut hello = proto::connect("alice", &sig, "not-mqtt", false);
    hello.extend_from_slice(proto::PING);
    s.write_all(&hello).await.unwrap();
    match next(&mut s, &mut d).await {
        Some(ServerOp::Err(e)) => assert!(e.contains("Authorization Violation"), "{e}"),
        other => panic!("a plain NATS client got {other:?}"),
    }
    let deadline = std::time::Instant::now() + WAIT;
    let line = loop {
        let logs = c.auth_logs();
        if let Some(l) = logs
            .lines()
            .find(|l| l.contains("code=6017") && l.contains("only MQTT"))
        {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 6017 decision:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains("user=\"alice\""), "{line}");
    assert_no_secrets_in_auth_logs(&c, &[sig]);
}
