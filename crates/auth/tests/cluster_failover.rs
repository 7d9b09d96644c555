//! imlink-auth's availability on a real 3-node nats-server 2.15.1 cluster: with one of two
//! instances killed, logins go on through the other; with the node that one is connected to
//! killed, it reconnects to another node and logins work again (the times are printed); with
//! no instance left, every CONNECT gets CONNACK 5 after the callout timeout while sessions
//! already open go on; an instance started again serves at once.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A fresh login of alice on `node`, with a client id of its own (to find its decision).
fn login_on<'a>(c: &'a ImCluster, n: &mut u32, node: usize) -> (Login<'a>, String) {
    *n += 1;
    let sig = c.sig("alice", 300);
    let inst = format!("f{n}");
    (
        login(c, node, "alice", &sig, &inst),
        c.client_id("alice", "linux", &inst),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_survive_an_auth_instance_and_its_node_and_fail_closed_without_any() {
    let mut c = ImCluster::up(&bin_dir(), "failover", &UpOptions::default());
    let mut n = 0;

    // kill -9 one imlink-auth: every node still gets answers, from the other.
    c.stop(Piece::Auth, 0, true);
    for node in 0..3 {
        let (l, cid) = login_on(&c, &mut n, node);
        assert_eq!(
            connack(l).await,
            Connack::Code(0),
            "node n{} with auth 1 killed",
            node + 1
        );
        let d = c.wait_decision(&cid, WAIT);
        assert!(
            c.auth_log(1).contains(&d),
            "answered by the surviving instance"
        );
    }

    // kill -9 the node the surviving instance is connected to. Times come from imlink-auth's
    // own log: the loss is seen at once (the dead node's sockets close), then the next node.
    let gone = c.auth_node(1).expect("auth 2 is connected to a node");
    let connections = c.auth_connections(1);
    c.stop(Piece::Node, gone, true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.auth_connections(1) == connections {
        assert!(
            Instant::now() < deadline,
            "imlink-auth did not reconnect:\n{}",
            c.auth_log(1)
        );
        std::thread::sleep(Duration::from_millis(10)); // polling another process's log
    }
    let now_on = c.auth_node(1).expect("a node");
    assert_ne!(now_on, gone, "reconnected to another node");
    let lost_at = c
        .auth_log_time(1, "lost NATS node")
        .expect("the loss is logged");
    let back_at = c
        .auth_log_time(1, "connected to NATS node")
        .expect("the reconnection");
    // Logins on the surviving nodes work again (JetStream may first elect a new leader).
    let other = (0..3).find(|i| *i != gone).expect("another node");
    let mut attempts = 0;
    let working_at = loop {
        attempts += 1;
        let (l, _) = login_on(&c, &mut n, other);
        match connack(l).await {
            Connack::Code(0) => break unix_f64(),
            r => {
                eprintln!(
                    "a login on n{} {:.1} s after the loss: {r:?}",
                    other + 1,
                    unix_f64() - lost_at
                );
                assert!(
                    Instant::now() < deadline,
                    "no login within 30 s of the node's loss: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!(
        "node n{} killed: imlink-auth saw it and served again on n{} {:.0} ms later; the first \
         login on n{} completed {:.0} ms after the loss ({attempts} attempt(s))",
        gone + 1,
        now_on + 1,
        (back_at - lost_at) * 1000.0,
        other + 1,
        (working_at - lost_at) * 1000.0,
    );
    assert!(back_at >= lost_at);
    for node in (0..3).filter(|i| *i != gone) {
        let (l, _) = login_on(&c, &mut n, node);
        assert_eq!(
            connack(l).await,
            Connack::Code(0),
            "node n{} after the loss",
            node + 1
        );
    }

    // QoS 1 through the surviving nodes. Until JetStream has new leaders for the MQTT streams
    // that had theirs on the lost node, a QoS 1 SUBSCRIBE gets SUBACK 0x80 (no consumer can
    // be created) and a QoS 1 publish is not stored — after 5 s nats-server closes the
    // publisher's connection ("no JetStream ack within 5s"). Retry, with fresh connections,
    // until a message goes through, and say how long it took.
    let app = c.e.sdk_app_id;
    let (bob_sig, carol_sig) = (c.sig("bob", 300), c.sig("carol", 300));
    let mut k = 0;
    let (mut bob, mut carol, qos1_at) = loop {
        k += 1;
        assert!(
            Instant::now() < deadline + Duration::from_secs(60),
            "no QoS 1 within 90 s of the node's loss"
        );
        let Ok(mut bob) = Mqtt::connect(login(&c, other, "bob", &bob_sig, "0")).await else {
            continue;
        };
        if bob.subscribe(&format!("im/{app}/u/bob/#")).await != 1 {
            bob.disconnect().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let Ok(carol) = Mqtt::connect(login(&c, other, "carol", &carol_sig, "0")).await else {
            continue;
        };
        carol
            .client
            .publish(
                format!("im/{app}/u/bob/in/carol"),
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("probe {k}"),
            )
            .await
            .expect("queued");
        if bob.message(Duration::from_secs(6)).await.is_some() {
            break (bob, carol, unix_f64());
        }
        bob.disconnect().await;
        carol.disconnect().await;
    };
    eprintln!(
        "QoS 1 through the surviving nodes again {:.1} s after the loss ({k} attempt(s))",
        qos1_at - lost_at
    );

    // No imlink-auth at all: CONNACK 5, after the callout timeout (authorization.timeout 2 s).
    c.stop(Piece::Auth, 1, false);
    let (l, cid) = login_on(&c, &mut n, other);
    let t = Instant::now();
    assert_eq!(connack(l).await, Connack::Code(5), "no callout answers");
    let waited = t.elapsed();
    eprintln!("with no imlink-auth running: CONNACK 5 after {waited:?}");
    assert!(
        waited >= Duration::from_millis(1500),
        "refused after {waited:?}: before the timeout?"
    );
    assert_eq!(c.decision_for(&cid), None);
    // Open sessions go on: the callout is asked at CONNECT only.
    carol
        .publish(
            &format!("im/{app}/u/bob/in/carol"),
            b"no auth service needed",
            false,
        )
        .await;
    let m = bob
        .message(WAIT)
        .await
        .expect("a session opened before keeps working");
    assert_eq!(&m.payload[..], b"no auth service needed");

    // One instance back: logins work again.
    c.start(Piece::Auth, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.auth_connections(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "the restarted imlink-auth does not serve"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Its subscription reached its own node; the others learn of it over the routes, a moment
    // later: a login on another node may still time out (CONNACK 5) in that moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (l, _) = login_on(&c, &mut n, other);
        match connack(l).await {
            Connack::Code(0) => break,
            r => assert!(Instant::now() < deadline, "after a restart: {r:?}"),
        }
    }
}
