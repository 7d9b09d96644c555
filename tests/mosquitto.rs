//! Interop with a real broker: Debian's mosquitto 2.0.11, started here with TLS on an
//! ephemeral port and a password file holding a sandbox-issued UserSig. mosquitto says less
//! than the IM service (0x87 with no reason string for any bad password; a client-id takeover
//! just closes the old socket), and the engine must still do the right thing.

mod common;

use std::path::Path;
use std::time::Duration;

use common::mosquitto::Mosquitto;
use common::*;

fn opts_for(m: &Mosquitto, user: &str) -> Opts {
    let mut o = Opts::user(user);
    o.broker_url = Some(m.url.clone());
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_in_to_mosquitto_over_tls() {
    let sb = sandbox().await;
    let dir = temp_dir("mq-login");
    let sig = sb.issue_sig("dev-1", Duration::from_secs(3600));
    sb.pin_sig("dev-1", Some(&sig));
    let mut m = Mosquitto::start(&sb, &dir, "dev-1", &sig).await;
    let d = Daemon::start(&sb, opts_for(&m, "dev-1")).await;
    let st = d.wait_phase("online").await;
    assert_eq!(st["login_user"], "dev-1");
    let line = m.wait_line("New client connected").await;
    assert!(line.contains("as 1400000000:dev-1:linux:0"), "{line}");
    assert!(line.contains("p5"), "MQTT v5: {line}");
    d.finish().await;
    m.wait_line("disconnected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_gets_one_fresh_sig_then_stops() {
    let sb = sandbox().await;
    let dir = temp_dir("mq-wrong");
    let good = sb.issue_sig("dev-2", Duration::from_secs(3600));
    let m = Mosquitto::start(&sb, &dir, "dev-2", &good).await;
    // Provisioning hands out a sig mosquitto does not know: CONNACK 0x87, no reason string.
    let stale = sb.issue_sig("dev-2", Duration::from_secs(7200));
    sb.pin_sig("dev-2", Some(&stale));
    let d = Daemon::start(&sb, opts_for(&m, "dev-2")).await;
    let st = d.wait_phase("stopped").await;
    assert_eq!(st["last_error"]["class"], "sig_rejected");
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("0x87")
    );
    assert_eq!(sb.user("dev-2").provision_requests, 2, "one fresh sig");
    assert_flat(&sb, "dev-2", 5).await;
    assert_eq!(
        d.status().await["counters"]["connect_attempts"],
        2,
        "exactly two CONNECTs"
    );
    assert_eq!(m.connects(), 0, "mosquitto accepted none");
    assert_eq!(
        m.refusals(),
        2,
        "mosquitto refused two CONNECTs: {:?}",
        m.log.lines.lock().unwrap()
    );
    d.finish().await;
}

/// Two daemons with one identity: mosquitto silently closes the older socket on each
/// takeover. The suspected-takeover rule must end the fight within 3 reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_with_one_client_id_do_not_fight() {
    let sb = sandbox().await;
    let dir = temp_dir("mq-fight");
    let sig = sb.issue_sig("dev-3", Duration::from_secs(3600));
    sb.pin_sig("dev-3", Some(&sig));
    let m = Mosquitto::start(&sb, &dir, "dev-3", &sig).await;
    let a = Daemon::start(&sb, opts_for(&m, "dev-3")).await;
    a.wait_phase("online").await;
    let b = Daemon::start(&sb, opts_for(&m, "dev-3")).await;
    // The fight ends with one of them kicked (suspected takeover).
    let deadline = tokio::time::Instant::now() + WAIT;
    let (kicked, other) = loop {
        let (sa, sb_) = (a.status().await, b.status().await);
        if sa["phase"] == "kicked" {
            break (sa, sb_);
        }
        if sb_["phase"] == "kicked" {
            break (sb_, sa);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still fighting: {sa} / {sb_}"
        );
        // Status polling at a modest rate is the observation here, not synchronisation of
        // the daemons themselves.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        kicked["last_event"]["reason"], "suspected_takeover",
        "{kicked}"
    );
    let reconnects = kicked["counters"]["connect_attempts"].as_u64().unwrap() - 1;
    assert!(reconnects <= 3, "stopped within 3 reconnects: {kicked}");
    // And the fight is really over: mosquitto sees no new connection for 10 s.
    let settled = m.connects();
    assert!(settled <= 8, "mosquitto saw {settled} connections");
    tokio::time::sleep(Duration::from_secs(10)).await; // the quiet period under test
    assert_eq!(m.connects(), settled, "no more connections after the fight");
    let _ = other;
    a.finish().await;
    b.finish().await;
}

/// The IM ACL for a plain MQTT broker (docs/brokers.md): each user reads only their own
/// subtree and may write only to inboxes, as themselves, and their own device status. mosquitto cannot check `from` inside the payload:
/// that stays the IM service's job (the receiving daemon keeps what the broker delivers).
const IM_ACL: &str =
    "pattern read im/+/u/%u/#\npattern write im/+/u/+/in/%u\npattern write im/+/d/%u/+/+/status\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_exchange_messages_through_mosquitto_with_the_im_acl() {
    let sb = sandbox().await;
    let dir = temp_dir("mq-chat");
    let sa = sb.issue_sig("alice", Duration::from_secs(3600));
    let sbob = sb.issue_sig("bob", Duration::from_secs(3600));
    sb.pin_sig("alice", Some(&sa));
    sb.pin_sig("bob", Some(&sbob));
    let m = Mosquitto::start_with(&sb, &dir, &[("alice", &sa), ("bob", &sbob)], Some(IM_ACL)).await;
    let alice = Daemon::start(&sb, opts_for(&m, "alice")).await;
    let mut bob = Daemon::start(&sb, opts_for(&m, "bob")).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(send(&alice, "bob", format!("via mosquitto {i}")).await);
    }
    let reply = send(&bob, "alice", "back at you".into()).await;
    // Bob goes offline; his persistent session on mosquitto queues alice's next ones.
    wait_inbox(&bob, 10).await;
    bob.terminate().await;
    for i in 10..15 {
        sent.push(send(&alice, "bob", format!("while away {i}")).await);
    }
    let bob = Daemon::start(
        &sb,
        Opts {
            dir: Some(bob.dir.clone()),
            ..opts_for(&m, "bob")
        },
    )
    .await;
    let got = wait_inbox(&bob, 15).await;
    let got_ids: Vec<String> = got
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got_ids, sent, "every message once, in order");
    let at_alice = wait_inbox(&alice, 1).await;
    assert_eq!(at_alice[0]["id"], reply.as_str());
    // Everything went through the ACL: nothing was denied.
    assert!(
        !m.log
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("Denied PUBLISH")),
        "the daemons never publish outside the ACL"
    );
    alice.finish().await;
    bob.finish().await;
}

async fn send(d: &Daemon, to: &str, body: String) -> String {
    let r = d
        .rpc(
            "send_message",
            serde_json::json!({ "to": to, "body": body }),
        )
        .await;
    r["result"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string()
}

/// Wait (woken by notifications) until `d`'s inbox holds `n` messages; returns them in order.
async fn wait_inbox(d: &Daemon, n: usize) -> Vec<serde_json::Value> {
    inbox_at_least(d, n, WAIT).await
}

/// A raw MQTT 3.1.1 client over TLS, as `user` with `password`: a peer with no daemon.
async fn raw_v311(
    m: &Mosquitto,
    dir: &Path,
    user: &str,
    password: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let port: u16 = m.url.rsplit(':').next().unwrap().parse().unwrap();
    let mut o = rumqttc::MqttOptions::new(format!("raw-{user}"), "127.0.0.1", port);
    o.set_credentials(user, password);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let tls = imlinkd::tls::client_config(
        &imlinkd::config::CaSource::File(dir.join("mq-ca.pem")),
        None,
        &[],
    )
    .unwrap();
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    rumqttc::AsyncClient::new(o, 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_large_message_on_mqtt_3_1_1_is_dropped_and_the_session_stays_online() {
    // MQTT 3.1.1 has no Maximum Packet Size: the broker delivers whatever a peer the ACL lets
    // write sends. One QoS 1 message over the daemon's 256 KiB limit used to end the
    // connection — and, redelivered first on every reconnect, keep the device offline for
    // good. Now it is acknowledged and dropped, counted, and the session goes on.
    let sb = sandbox().await;
    let dir = temp_dir("mq-large");
    let sa = sb.issue_sig("alice", Duration::from_secs(3600));
    let sm = sb.issue_sig("mallory", Duration::from_secs(3600));
    sb.pin_sig("alice", Some(&sa));
    let m =
        Mosquitto::start_with(&sb, &dir, &[("alice", &sa), ("mallory", &sm)], Some(IM_ACL)).await;
    let mut o = opts_for(&m, "alice");
    o.broker_extra = "protocol = \"v3.1.1\"\n".into();
    let alice = Daemon::start(&sb, o).await;
    alice.wait_phase("online").await;
    let (peer, mut ev) = raw_v311(&m, &dir, "mallory", &sm).await;
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let topic = format!("im/{}/u/alice/in/mallory", sb.sdk_app_id());
    let msg = |id: &str, from: &str, body: &str| {
        serde_json::json!({
            "id": id, "from": from, "to": "alice", "kind": "text", "body": body, "ts": 1
        })
        .to_string()
    };
    use rumqttc::QoS::AtLeastOnce;
    let big = msg(
        "01JAAAAAAAAAAAAAAAAAAAAAAA",
        "mallory",
        &"x".repeat(300 * 1024),
    );
    peer.publish(&topic, AtLeastOnce, false, big).await.unwrap();
    // A payload that claims another sender than its topic: forged, dropped too.
    let forged = msg("01JAAAAAAAAAAAAAAAAAAAAAAB", "bob", "it's me, bob");
    peer.publish(&topic, AtLeastOnce, false, forged)
        .await
        .unwrap();
    let fine = msg("01JAAAAAAAAAAAAAAAAAAAAAAC", "mallory", "after the big one");
    peer.publish(&topic, AtLeastOnce, false, fine)
        .await
        .unwrap();
    let got = wait_inbox(&alice, 1).await;
    assert_eq!(got[0]["id"], "01JAAAAAAAAAAAAAAAAAAAAAAC");
    let st = alice.status().await;
    assert_eq!(st["phase"], "online");
    assert_eq!(st["messages"]["dropped_oversized"], 1, "{st}");
    assert_eq!(st["messages"]["dropped_forged"], 1, "{st}");
    assert_eq!(
        st["counters"]["connect_attempts"], 1,
        "the connection was never lost: {st}"
    );
    assert_eq!(m.connects(), 2, "alice once, mallory once");
    // Both were acknowledged: a new session of alice's gets nothing redelivered.
    let log = alice.log_text();
    assert!(log.contains("over the size limit"), "said so in the log");
    pump.abort();
    alice.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_on_the_inbox_is_dropped_not_taken_at_every_login() {
    // A peer that publishes a message with RETAIN makes the broker keep it and deliver it at
    // every subscription (RETAIN=1): as a message it would come again at every login, and as
    // a new one once the store had evicted it. A message is never retained: the daemon
    // acknowledges and drops it, and counts it.
    let sb = sandbox().await;
    let dir = temp_dir("mq-retained");
    let sa = sb.issue_sig("alice", Duration::from_secs(3600));
    let sm = sb.issue_sig("mallory", Duration::from_secs(3600));
    sb.pin_sig("alice", Some(&sa));
    let m =
        Mosquitto::start_with(&sb, &dir, &[("alice", &sa), ("mallory", &sm)], Some(IM_ACL)).await;
    let (peer, mut ev) = raw_v311(&m, &dir, "mallory", &sm).await;
    let topic = format!("im/{}/u/alice/in/mallory", sb.sdk_app_id());
    let msg = |id: &str, body: &str| {
        serde_json::json!({
            "id": id, "from": "mallory", "to": "alice", "kind": "text", "body": body, "ts": 1
        })
        .to_string()
    };
    use rumqttc::QoS::AtLeastOnce;
    peer.publish(
        &topic,
        AtLeastOnce,
        true,
        msg("01JAAAAAAAAAAAAAAAAAAAAAAR", "retained"),
    )
    .await
    .unwrap();
    // The broker has it (its PUBACK) before alice ever subscribes.
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                ev.poll().await.expect("mallory's connection")
            {
                break;
            }
        }
    })
    .await
    .expect("the retained message's PUBACK");
    let pump = tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    let alice = Daemon::start(&sb, opts_for(&m, "alice")).await;
    alice.wait_phase("online").await;
    peer.publish(
        &topic,
        AtLeastOnce,
        false,
        msg("01JAAAAAAAAAAAAAAAAAAAAAAC", "a message"),
    )
    .await
    .unwrap();
    let got = wait_inbox(&alice, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], "01JAAAAAAAAAAAAAAAAAAAAAAC", "{got:?}");
    let st = alice.status().await;
    assert_eq!(st["messages"]["dropped_invalid"], 1, "{st}");
    assert!(
        alice
            .log_text()
            .contains("dropped a retained message on the inbox")
    );
    pump.abort();
    alice.finish().await;
}

/// The operator's view of the status tree: a raw MQTT 5 client reading `im/+/d/#`.
struct StatusReader {
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, serde_json::Value, bool)>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusReader {
    async fn start(
        m: &Mosquitto,
        dir: &Path,
        user: &str,
        password: &str,
        app: u64,
    ) -> StatusReader {
        let port: u16 = m.url.rsplit(':').next().unwrap().parse().unwrap();
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut o = rumqttc::v5::MqttOptions::new(format!("reader-{user}-{n}"), "127.0.0.1", port);
        o.set_credentials(user, password);
        let tls = imlinkd::tls::client_config(
            &imlinkd::config::CaSource::File(dir.join("mq-ca.pem")),
            None,
            &[],
        )
        .unwrap();
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
        let (client, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
        client
            .subscribe(
                format!("im/{app}/d/#"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _keep = client;
            while let Ok(e) = ev.poll().await {
                if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(
                    p,
                )) = e
                {
                    let doc = serde_json::from_slice(&p.payload).unwrap_or_default();
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    if tx.send((topic, doc, p.retain)).is_err() {
                        return;
                    }
                }
            }
        });
        StatusReader { rx, task }
    }

    /// The next status document whose `state` is `state` (within `within`).
    async fn until_state(&mut self, state: &str, within: Duration) -> (String, serde_json::Value) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (topic, doc, _) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no status {state:?} within {within:?}"))
                .expect("the reader is running");
            if doc["state"] == state {
                return (topic, doc);
            }
        }
    }
}

impl Drop for StatusReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_status_on_mosquitto_is_online_then_offline_by_the_will_or_says_why() {
    let sb = sandbox().await;
    let dir = temp_dir("mq-status");
    let sa = sb.issue_sig("alice", Duration::from_secs(3600));
    sb.pin_sig("alice", Some(&sa));
    let ops_secret = "operator-secret-1";
    let acl = format!("{IM_ACL}user ops\ntopic read im/+/d/#\n");
    let m = Mosquitto::start_with(
        &sb,
        &dir,
        &[("alice", &sa), ("ops", ops_secret)],
        Some(&acl),
    )
    .await;
    let app = sb.sdk_app_id();
    let mut reader = StatusReader::start(&m, &dir, "ops", ops_secret, app).await;
    let mut o = opts_for(&m, "alice");
    o.env
        .push(("IMLINKD__BROKER__KEEPALIVE".into(), "5s".into()));
    let mut alice = Daemon::start(&sb, o.clone()).await;
    alice.wait_phase("online").await;
    let (topic, doc) = reader.until_state("online", WAIT).await;
    assert_eq!(topic, format!("im/{app}/d/alice/linux/0/status"));
    assert_eq!(doc["v"], 1);
    assert_eq!(doc["phase"], "online");
    assert_eq!(doc["login_status"], 1);
    assert_eq!(doc["user_sig"]["renewal"], "ok");
    assert_eq!(doc["protocol"], "v5");
    // Power lost (kill -9): the broker publishes the will, retained.
    let t = std::time::Instant::now();
    alice.kill9().await;
    let (_, doc) = reader
        .until_state("offline", Duration::from_millis(7_500))
        .await;
    eprintln!("offline after {:?}", t.elapsed());
    assert_eq!(doc["reason"], "connection lost");
    // A late reader sees it retained.
    let mut late = StatusReader::start(&m, &dir, "ops", ops_secret, app).await;
    let (_, doc) = late.until_state("offline", WAIT).await;
    assert_eq!(doc["reason"], "connection lost");
    // Back, then a clean logout says so (no will), then a service stop.
    o.dir = Some(alice.dir.clone());
    let mut alice = Daemon::start(&sb, o).await;
    alice.wait_phase("online").await;
    reader.until_state("online", WAIT).await;
    let r = alice.rpc("logout", serde_json::json!({})).await;
    assert!(r.get("result").is_some(), "{r}");
    // Published before the logout answered: only mosquitto and the reader are in between (the
    // figure is printed; the one-second promise is tests/fleet.rs's, end to end).
    let t = std::time::Instant::now();
    let (_, doc) = reader.until_state("logged_out", WAIT).await;
    eprintln!(
        "logged_out read {:?} after the logout answered",
        t.elapsed()
    );
    assert_eq!(doc["reason"], "logged out");
    alice.rpc("login", serde_json::json!({})).await;
    reader.until_state("online", WAIT).await;
    alice.terminate().await;
    let (_, doc) = reader.until_state("stopped", WAIT).await;
    assert_eq!(doc["reason"], "service stopped");
    // The device never receives its own status: it is outside its inbox subtree.
    assert!(!alice.log_text().contains("not on the inbox"));
    alice.finish().await;
}
