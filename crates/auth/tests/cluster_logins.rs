//! Logins through imlink-auth on a real 3-node nats-server 2.15.1 JetStream cluster with two
//! imlink-auth instances (`scripts/im-cluster`), with a raw MQTT 3.1.1 client over TLS:
//! CONNACK 0 for a good UserSig on every node (the user JWT imlink-auth signs is accepted by
//! nats-server), CONNACK 5 for each refusal, and the IM code of each refusal in imlink-auth's
//! decision log. One cluster for the whole file.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_usersig_gets_connack_0_on_every_node_and_each_refusal_connack_5_with_its_code() {
    let c = ImCluster::up(&bin_dir(), "logins", &UpOptions::default());
    let app = c.e.sdk_app_id;
    let now = unix_now();
    let mut sigs = Vec::new();

    // CONNACK 0 on each node: the user JWT signed by imlink-auth is accepted, wherever the
    // client lands and whichever imlink-auth instance answers.
    for node in 0..3 {
        let sig = c.sig("alice", 60);
        sigs.push(sig.clone());
        assert_eq!(
            connack(login(&c, node, "alice", &sig, &node.to_string())).await,
            Connack::Code(0),
            "a good UserSig on node n{}",
            node + 1
        );
        let d = c.wait_decision(&c.client_id("alice", "linux", &node.to_string()), WAIT);
        assert!(
            d.contains("result=\"accepted\"") && d.contains(&format!("node=\"n{}\"", node + 1)),
            "{d}"
        );
    }

    // A key rotation in progress: a UserSig signed with the second key is accepted too.
    let sig = c.sig_with(&c.next_app_key(), app, "alice", now, 60);
    sigs.push(sig.clone());
    assert_eq!(
        connack(login(&c, 0, "alice", &sig, "rot")).await,
        Connack::Code(0),
        "the second key"
    );
    assert!(
        c.wait_decision(&c.client_id("alice", "linux", "rot"), WAIT)
            .contains("key=Some(1)")
    );

    // Each refusal: CONNACK 5 for the client, the IM code in imlink-auth's decision.
    let cases: Vec<(&str, String, String, String, u32)> = vec![
        // (what, username, password, client id, code)
        (
            "a UserSig signed with another key",
            "alice".into(),
            c.sig_with("not-the-app-key", app, "alice", now, 60),
            c.client_id("alice", "linux", "wk"),
            70009,
        ),
        (
            "a UserSig issued for another user",
            "alice".into(),
            c.sig("bob", 60),
            c.client_id("alice", "linux", "wu"),
            70013,
        ),
        (
            "a UserSig issued for another app",
            "alice".into(),
            c.sig_with(&c.app_key(), app + 1, "alice", now, 60),
            c.client_id("alice", "linux", "wa"),
            70014,
        ),
        (
            "an expired UserSig",
            "alice".into(),
            c.sig_with(&c.app_key(), app, "alice", now - 120, 60),
            c.client_id("alice", "linux", "ex"),
            70001,
        ),
        (
            "a malformed UserSig",
            "alice".into(),
            "not-a-usersig".into(),
            c.client_id("alice", "linux", "mf"),
            70003,
        ),
        (
            "a client id of another user",
            "alice".into(),
            c.sig("alice", 60),
            c.client_id("bob", "linux", "cid1"),
            6017,
        ),
        (
            "a client id that is not {app}:{user}:{platform}:{instance}",
            "alice".into(),
            c.sig("alice", 60),
            "alice-kiosk-7".into(),
            6017,
        ),
        (
            "a user id outside A-Za-z0-9_-",
            "al+ice".into(),
            c.sig("al+ice", 60),
            c.client_id("al+ice", "linux", "cid4"),
            6017,
        ),
        (
            "an app this service does not serve",
            "alice".into(),
            c.sig_with(&c.app_key(), 42, "alice", now, 60),
            "42:alice:linux:cid5".into(),
            70014,
        ),
        (
            "an operator with a wrong secret",
            "@monitor".into(),
            "0123456789abcdef-wrong".into(),
            format!("{app}:@monitor:console:1"),
            70009,
        ),
    ];
    for (i, (what, user, password, cid, code)) in cases.into_iter().enumerate() {
        sigs.push(password.clone());
        let mut l = login(&c, i % 3, &user, &password, "x");
        l.client_id = cid.clone();
        assert_eq!(connack(l).await, Connack::Code(5), "{what}: CONNACK 5");
        let d = c.wait_decision(&cid, WAIT);
        assert!(
            d.contains("result=\"refused\"") && d.contains(&format!("code={code}")),
            "{what}: expected code {code} in {d}"
        );
    }

    // nats-server 2.15 itself refuses a client id with whitespace, `.`, `*` or `>` (CONNACK 2,
    // "identifier rejected") before it asks the callout: a platform `lin.ux`, or a user `*`
    // (imlink-auth refuses both too, 6017, should another server ever ask).
    for (user, platform) in [("alice", "lin.ux"), ("*", "linux"), ("alice", "lin>")] {
        let sig = c.sig(user, 60);
        let mut l = login(&c, 0, user, &sig, "dot");
        l.client_id = c.client_id(user, platform, "dot");
        assert_eq!(
            connack(l).await,
            Connack::Code(2),
            "client id {user}/{platform}"
        );
        assert_eq!(c.decision_for(&c.client_id(user, platform, "dot")), None);
    }

    // An operator with its secret gets in.
    let mut l = login(&c, 1, "@monitor", &c.operator_password(), "x");
    l.client_id = format!("{app}:@monitor:console:1");
    assert_eq!(connack(l).await, Connack::Code(0), "the operator");

    // MQTT 5 is not served by nats-server: a 3.1.1 CONNACK with return code 1.
    assert_eq!(mqtt5_connack(&c, 0).await, Some(1));

    // Nothing secret in imlink-auth's logs (decisions name fingerprints only).
    assert_no_secrets_in_auth_logs(&c, &sigs);
    assert!(c.auth_logs().contains("sig=\"sha256:"));
}

/// An MQTT 5 CONNECT, raw, over TLS: the first byte pair of the answer.
async fn mqtt5_connack(c: &ImCluster, node: usize) -> Option<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, port) = c.mqtt_addr(node);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .ok()?;
    let cfg = imlink_auth::tls::client_config(&c.e.ca_path).ok()?;
    let name = rustls_pki_types::ServerName::try_from(host).ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .ok()?;
    // CONNECT, protocol level 5, clean start, keepalive 30, no properties, client id "v5".
    let body: Vec<u8> = [
        &[0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0][..],
        &[0, 2, b'v', b'5'][..],
    ]
    .concat();
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    tls.write_all(&pkt).await.ok()?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut ack))
        .await
        .ok()?
        .ok()?;
    (ack[0] == 0x20).then_some(ack[3])
}
