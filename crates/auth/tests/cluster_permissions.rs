//! What the user JWT imlink-auth signs lets a client do on a real 3-node nats-server 2.15.1
//! JetStream cluster: the sender is pinned in the topic, a device sees only its own subtree,
//! QoS 1 reaches a persistent session across nodes and while it is offline, and the device
//! status tree (retained status, last will) is an operator's only. One cluster for the file.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grant_pins_the_sender_and_the_subtree_and_carries_qos1_and_status() {
    let c = ImCluster::up(&bin_dir(), "perms", &UpOptions::default());
    let app = c.e.sdk_app_id;
    let topic = |peer: &str, sender: &str| format!("im/{app}/u/{peer}/in/{sender}");

    // Bob: a persistent session on node n2, subscribed to his subtree.
    let bob_sig = c.sig("bob", 300);
    let mut bl = login(&c, 1, "bob", &bob_sig, "0");
    bl.clean = false;
    let mut bob = Mqtt::connect(bl).await.expect("bob logs in");
    assert_eq!(
        bob.subscribe(&format!("im/{app}/u/bob/#")).await,
        1,
        "bob's own subtree: SUBACK 1"
    );

    // Alice on node n1.
    let alice_sig = c.sig("alice", 300);
    let mut alice = Mqtt::connect(login(&c, 0, "alice", &alice_sig, "0"))
        .await
        .expect("alice logs in");
    assert_eq!(alice.subscribe(&format!("im/{app}/u/alice/#")).await, 1);

    // SUBACK 0x80 for someone else's subtree (and for the status tree: operators only).
    assert_eq!(
        alice.subscribe(&format!("im/{app}/u/bob/#")).await,
        0x80,
        "bob's subtree"
    );
    assert_eq!(
        alice.subscribe(&format!("im/{app}/u/bob/in/+")).await,
        0x80,
        "bob's inbox"
    );
    assert_eq!(alice.subscribe("#").await, 0x80, "everything");
    assert_eq!(
        alice.subscribe(&format!("im/{app}/d/#")).await,
        0x80,
        "the status tree"
    );

    // QoS 1 alice → bob, across nodes.
    alice
        .publish(&topic("bob", "alice"), b"hello bob", false)
        .await;
    let m = bob
        .message(WAIT)
        .await
        .expect("bob receives alice's message");
    assert_eq!(m.topic, topic("bob", "alice"));
    assert_eq!(&m.payload[..], b"hello bob");

    // A forged sender: alice publishes as mallory. PUBACK (3.1.1: no code, "0") — and dropped.
    alice
        .publish(&topic("bob", "mallory"), b"forged", false)
        .await;
    // And a message that is not C2C at all, into bob's ctl.
    alice
        .publish(&format!("im/{app}/u/bob/ctl"), b"forged ctl", false)
        .await;
    // A genuine one after them: when it arrives, the forged ones (sent before, same
    // connection, same path) would have arrived first.
    alice
        .publish(&topic("bob", "alice"), b"after the forgery", false)
        .await;
    let m = bob.message(WAIT).await.expect("the genuine message");
    assert_eq!(
        &m.payload[..],
        b"after the forgery",
        "a forged message reached bob: {:?}",
        m.topic
    );
    assert!(
        c.node_log(0).contains(&format!(
            "Publish Violation - Subject \"im.{app}.u.bob.in.mallory\""
        )),
        "the node logged the forged publish as a violation"
    );

    // Bob goes offline (his session persists), alice sends, bob comes back on another node.
    bob.disconnect().await;
    alice
        .publish(&topic("bob", "alice"), b"while you were away", false)
        .await;
    let mut bl = login(&c, 2, "bob", &c.sig("bob", 300), "0");
    bl.clean = false;
    let mut bob = Mqtt::connect(bl).await.expect("bob logs in again, on n3");
    let m = bob
        .message(WAIT)
        .await
        .expect("bob's persistent session delivers it");
    assert_eq!(&m.payload[..], b"while you were away");

    // Device status: carol's retained status and last will, on her own status topic.
    let status = |user: &str, inst: &str| format!("im/{app}/d/{user}/linux/{inst}/status");
    let mut cl = login(&c, 0, "carol", &c.sig("carol", 300), "0");
    cl.will = Some((status("carol", "0"), b"offline".to_vec()));
    let mut carol = Mqtt::connect(cl).await.expect("carol logs in with a will");
    carol.publish(&status("carol", "0"), b"online", true).await;
    // Another device's status, or another instance's: dropped.
    carol.publish(&status("carol", "1"), b"forged", true).await;
    carol.publish(&status("bob", "0"), b"forged", true).await;
    assert_eq!(
        carol.subscribe(&format!("im/{app}/d/carol/#")).await,
        0x80,
        "a device cannot read the status tree"
    );

    // The operator, on another node, gets the retained status (and only the genuine one).
    let op_login = |node: usize, inst: &str| {
        let mut l = login(&c, node, "@monitor", &c.operator_password(), inst);
        l.client_id = format!("{app}:@monitor:console:{inst}");
        l
    };
    let mut op = Mqtt::connect(op_login(1, "1"))
        .await
        .expect("the operator logs in");
    assert_eq!(
        op.subscribe(&format!("im/{app}/d/#")).await,
        1,
        "the status tree"
    );
    let m = op.message(WAIT).await.expect("the retained status");
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.retain),
        (status("carol", "0").as_str(), &b"online"[..], true)
    );
    assert!(
        op.message(Duration::from_secs(1)).await.is_none(),
        "a forged status was kept"
    );
    // The operator reads nothing else and writes nothing.
    assert_eq!(op.subscribe(&format!("im/{app}/u/alice/#")).await, 0x80);
    op.publish(&topic("alice", "alice"), b"from the operator", false)
        .await;

    // Carol drops off without DISCONNECT: her will (retained) reaches the operator…
    carol.abort();
    let m = op.message(WAIT).await.expect("carol's last will");
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        (status("carol", "0").as_str(), &b"offline"[..])
    );
    // …and stays as her retained status for an operator who comes later.
    op.disconnect().await;
    let mut op2 = Mqtt::connect(op_login(2, "2"))
        .await
        .expect("a second operator session");
    assert_eq!(op2.subscribe(&format!("im/{app}/d/#")).await, 1);
    let m = op2.message(WAIT).await.expect("the retained will");
    assert_eq!((&m.payload[..], m.retain), (&b"offline"[..], true));

    // Nothing reached alice from the operator's publish (she is subscribed to her subtree).
    assert!(
        alice.message(Duration::from_millis(500)).await.is_none(),
        "the operator published"
    );
    assert_no_secrets_in_auth_logs(&c, &[bob_sig, alice_sig]);
}
