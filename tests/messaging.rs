//! Messaging end to end: two real daemons (alice and bob) on the reference IM service, over
//! TLS, through their stores; what the sandbox enforces; history without a login.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use imlink_sandbox::SandboxOptions;
use serde_json::{Value, json};

/// Wait (woken by `message_received` notifications) until `d`'s inbox holds `n` messages.
async fn inbox_reaches(d: &Daemon, n: usize) -> Vec<Value> {
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let all = inbox_all(d).await;
        if all.len() >= n {
            return all;
        }
        if tokio::time::timeout_at(deadline, w.next()).await.is_err() {
            panic!(
                "{} of {n} messages arrived\nlog:\n{}",
                all.len(),
                d.log_text()
            );
        }
    }
}

/// Wait until every message `d` sent to `peer` is settled (sent or failed); returns them.
async fn outbox_settles(d: &Daemon, peer: &str, n: usize) -> Vec<Value> {
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let h = history(d, peer).await;
        let mine: Vec<Value> = h.into_iter().filter(|m| m["direction"] == "out").collect();
        if mine.len() >= n && mine.iter().all(|m| m["state"] != "queued") {
            return mine;
        }
        if tokio::time::timeout_at(deadline, w.next()).await.is_err() {
            panic!(
                "not all of {n} sends settled: {mine:?}\nlog:\n{}",
                d.log_text()
            );
        }
    }
}

/// The whole history with `peer`, newest first, paging backwards.
async fn history(d: &Daemon, peer: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut before = Value::Null;
    loop {
        let r = d
            .rpc(
                "get_history",
                json!({ "peer": peer, "before": before, "limit": 100 }),
            )
            .await;
        let page = r["result"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("{r}"));
        all.extend(page);
        match r["result"]["next_before"].as_str() {
            Some(id) => before = json!(id),
            None => return all,
        }
    }
}

async fn send(d: &Daemon, to: &str, body: &str) -> String {
    let r = d
        .rpc("send_message", json!({ "to": to, "body": body }))
        .await;
    r["result"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("send_message: {r}"))
        .to_string()
}

fn ids(ms: &[Value]) -> Vec<String> {
    ms.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn bodies(ms: &[Value]) -> Vec<String> {
    ms.iter()
        .map(|m| m["body"].as_str().unwrap().to_string())
        .collect()
}

fn assert_unique(what: &str, ms: &[Value]) {
    let set: BTreeSet<String> = ids(ms).into_iter().collect();
    assert_eq!(set.len(), ms.len(), "{what}: an id appears twice: {ms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_chat_and_messages_for_an_offline_peer_arrive_when_it_returns() {
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    let mut bob = Daemon::start(&sb, Opts::user("bob")).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;

    for i in 0..5 {
        send(&alice, "bob", &format!("hello {i}")).await;
    }
    let got = inbox_reaches(&bob, 5).await;
    assert_eq!(
        bodies(&got),
        (0..5).map(|i| format!("hello {i}")).collect::<Vec<_>>()
    );
    assert!(
        got.iter()
            .all(|m| m["peer"] == "alice" && m["direction"] == "in")
    );
    let reply = send(&bob, "alice", "hi alice").await;
    let at_alice = inbox_reaches(&alice, 1).await;
    assert_eq!(ids(&at_alice), vec![reply]);
    let sent = outbox_settles(&alice, "bob", 5).await;
    assert!(sent.iter().all(|m| m["state"] == "sent"), "{sent:?}");

    // Bob goes away (his persistent session stays); alice writes on.
    bob.terminate().await;
    for i in 5..8 {
        send(&alice, "bob", &format!("while you were out {i}")).await;
    }
    outbox_settles(&alice, "bob", 8).await;
    let dir = bob.dir.clone();
    let bob = Daemon::start(
        &sb,
        Opts {
            dir: Some(dir),
            ..Opts::user("bob")
        },
    )
    .await;
    let got = inbox_reaches(&bob, 8).await;
    assert_eq!(
        bodies(&got)[5..],
        [
            "while you were out 5",
            "while you were out 6",
            "while you were out 7"
        ]
    );
    assert_unique("bob's inbox", &got);
    // Conversations: the last message and the unread count; mark_read clears it.
    let conv = bob.rpc("get_conversations", json!({})).await;
    let c = &conv["result"]["conversations"][0];
    assert_eq!(
        (c["peer"].as_str(), c["unread"].as_u64()),
        (Some("alice"), Some(8)),
        "{conv}"
    );
    assert_eq!(c["last"]["body"], "while you were out 7");
    bob.rpc("mark_read", json!({ "peer": "alice" })).await;
    let conv = bob.rpc("get_conversations", json!({})).await;
    assert_eq!(conv["result"]["conversations"][0]["unread"], 0);
    // The sandbox counted it all.
    let c = sb.user("alice");
    assert_eq!(c.messages_published, 8);
    assert!(c.messages_refused.is_empty(), "{c:?}");
    assert!(sb.user("bob").messages_delivered >= 8);
    alice.assert_no_secrets_logged();
    bob.assert_no_secrets_logged();
    alice.finish().await;
    bob.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_made_while_the_broker_is_down_go_out_in_order_when_it_returns() {
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    let bob = Daemon::start(&sb, Opts::user("bob")).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    sb.stop_listener().await.unwrap();
    sb.drop_all();
    alice.wait_phase("backoff").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(send(&alice, "bob", &format!("queued {i}")).await);
    }
    // Queued, committed, visible in history while offline.
    let h = history(&alice, "bob").await;
    assert_eq!(h.len(), 20);
    assert!(h.iter().all(|m| m["state"] == "queued"));
    sb.start_listener().await.unwrap();
    let got = inbox_reaches(&bob, 20).await;
    assert_eq!(ids(&got), sent, "in the order they were sent");
    outbox_settles(&alice, "bob", 20).await;
    alice.finish().await;
    bob.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_conversations_answer_logged_out_kicked_stopped_and_offline() {
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    let bob = Daemon::start(&sb, Opts::user("bob")).await;
    alice.wait_phase("online").await;
    bob.wait_phase("online").await;
    send(&alice, "bob", "one").await;
    send(&bob, "alice", "two").await;
    inbox_reaches(&alice, 1).await;
    inbox_reaches(&bob, 1).await;
    let expect = |h: Vec<Value>, when: &str| {
        assert_eq!(bodies(&h), ["two", "one"], "{when}: {h:?}");
    };
    // Broker down.
    sb.stop_listener().await.unwrap();
    sb.drop_all();
    alice.wait_phase("backoff").await;
    expect(history(&alice, "bob").await, "broker down");
    sb.start_listener().await.unwrap();
    alice.wait_phase("online").await;
    // Kicked.
    sb.kick("alice");
    alice.wait_phase("kicked").await;
    expect(history(&alice, "bob").await, "kicked");
    let conv = alice.rpc("get_conversations", json!({})).await;
    assert_eq!(conv["result"]["conversations"][0]["peer"], "bob", "{conv}");
    // Logged out.
    alice.rpc("login", json!({})).await;
    alice.rpc("logout", json!({})).await;
    assert_eq!(alice.status().await["login_status"], 3);
    expect(history(&alice, "bob").await, "logged out");
    let r = alice
        .rpc("send_message", json!({ "to": "bob", "body": "x" }))
        .await;
    assert_eq!(r["error"]["code"], 6014, "sending needs a login: {r}");
    // Stopped (banned).
    sb.ban("alice");
    alice.rpc("login", json!({ "timeout_ms": 10_000 })).await;
    alice.wait_phase("stopped").await;
    expect(history(&alice, "bob").await, "stopped");
    alice.finish().await;
    bob.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_12_kb_is_refused_before_it_is_stored() {
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    alice.wait_phase("online").await;
    let r = alice
        .rpc(
            "send_message",
            json!({ "to": "bob", "body": "x".repeat(12 * 1024) }),
        )
        .await;
    assert_eq!(r["error"]["code"], 8001, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not stored")
    );
    assert!(history(&alice, "bob").await.is_empty());
    let conv = alice.rpc("get_conversations", json!({})).await;
    assert_eq!(conv["result"]["conversations"], json!([]));
    assert_eq!(sb.user("alice").messages_published, 0);
    alice.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_offline_queue_holds_sends_back_and_they_go_when_it_drains() {
    let sb = sandbox_with(SandboxOptions {
        offline_limit: 3,
        ..Default::default()
    })
    .await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    alice.wait_phase("online").await;
    // Bob has never logged in: the service keeps 3 messages for him, then says 0x97.
    for i in 0..6 {
        send(&alice, "bob", &format!("m{i}")).await;
    }
    counters_until(&sb, "the quota refusals", |c| {
        c.user("alice")
            .messages_refused
            .get("0x97")
            .copied()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let h = history(&alice, "bob").await;
    assert_eq!(
        h.iter().filter(|m| m["state"] == "queued").count(),
        3,
        "{h:?}"
    );
    assert!(
        h.iter().all(|m| m["state"] != "failed"),
        "quota is not a failure: {h:?}"
    );
    // Bob logs in and drains his queue; alice's held messages follow, nothing lost.
    let bob = Daemon::start(&sb, Opts::user("bob")).await;
    let got = inbox_reaches(&bob, 6).await;
    let mut b = bodies(&got);
    b.sort();
    assert_eq!(b, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    assert_unique("bob's inbox", &got);
    outbox_settles(&alice, "bob", 6).await;
    alice.finish().await;
    bob.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_refuses_a_forged_sender_and_the_message_fails_for_good() {
    let sb = sandbox().await;
    // A raw client logged in as mallory publishes a message claiming to be from alice.
    let sig = sb.issue_sig("mallory", Duration::from_secs(3600));
    let dir = temp_dir("mallory");
    std::fs::write(dir.join("ca.pem"), &sb.endpoints().ca_pem).unwrap();
    let addr = sb.endpoints().mqtt_addr;
    let mut o = rumqttc::v5::MqttOptions::new(
        format!("{}:mallory:linux:0", sb.sdk_app_id()),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_credentials("mallory", sig);
    let tls = imlinkd::tls::client_config(
        &imlinkd::config::CaSource::File(dir.join("ca.pem")),
        None,
        &[],
    )
    .unwrap();
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(tls),
    ));
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
    let forged = json!({
        "id": "01JZZZZZZZZZZZZZZZZZZZZZZZ", "from": "alice", "to": "bob",
        "kind": "text", "body": "trust me", "ts": 1
    });
    // The sender goes in the topic: claiming alice there, or in the payload on mallory's own
    // topic, is refused alike.
    let as_alice = format!("im/{}/u/bob/in/alice", sb.sdk_app_id());
    let topic = format!("im/{}/u/bob/in/mallory", sb.sdk_app_id());
    for t in [&as_alice, &topic] {
        client
            .publish(
                t.clone(),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                forged.to_string(),
            )
            .await
            .unwrap();
    }
    let oversize = "x".repeat(13 * 1024);
    client
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            oversize,
        )
        .await
        .unwrap();
    let mut codes = Vec::new();
    while codes.len() < 3 {
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)) =
            tokio::time::timeout(WAIT, ev.poll())
                .await
                .unwrap()
                .unwrap()
        {
            codes.push(a.reason)
        }
    }
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    assert_eq!(
        codes,
        [R::NotAuthorized, R::NotAuthorized, R::PayloadFormatInvalid]
    );
    let c = sb.user("mallory");
    assert_eq!(c.messages_refused.get("0x87"), Some(&2));
    assert_eq!(c.messages_refused.get("0x99"), Some(&1));
    assert_eq!(c.messages_published, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_beyond_the_policy_kicks_the_first_which_reports_it_and_stays_offline() {
    let sb = sandbox_with(SandboxOptions {
        max_instances_per_platform: 1,
        ..Default::default()
    })
    .await;
    let first = Daemon::start(&sb, Opts::user("kiosk-7")).await;
    first.wait_phase("online").await;
    let mut w = first.client().await;
    w.call("watch", json!({})).await;
    let second = Daemon::start(
        &sb,
        Opts {
            instance: "1".into(),
            ..Opts::user("kiosk-7")
        },
    )
    .await;
    second.wait_phase("online").await;
    let kicked = loop {
        let v = tokio::time::timeout(WAIT, w.next()).await.expect("a kick");
        if v["method"] == "kicked_offline" {
            break v;
        }
    };
    assert_eq!(kicked["params"]["code"], 6208, "{kicked}");
    let msg = kicked["params"]["message"].as_str().unwrap();
    assert!(
        msg.contains("multi-login policy"),
        "the reason names the policy: {msg}"
    );
    let st = first.wait_phase("kicked").await;
    assert_eq!(st["login_status"], 3);
    // It stays offline: no new CONNECT from the first instance.
    assert_flat(&sb, "kiosk-7", 3).await;
    assert_eq!(second.status().await["phase"], "online");
    first.finish().await;
    second.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_provisioning_the_app_brings_the_usersig_and_a_new_one_when_it_expires() {
    let sb = sandbox().await;
    let d = Daemon::start(
        &sb,
        Opts {
            provisioning: false,
            ..Opts::user("kiosk-app")
        },
    )
    .await;
    // No sig yet: logged out, saying what it waits for.
    let st = d.wait_phase("idle").await;
    assert_eq!(st["login_status"], 3);
    assert_eq!(st["last_error"]["code"], 6206, "{st}");
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("user_sig")
    );
    // A sig for someone else, or from another app, is refused before it is used.
    let other = sb.issue_sig("somebody", Duration::from_secs(600));
    let r = d.rpc("login", json!({ "user_sig": other })).await;
    assert_eq!(r["error"]["code"], 70013, "{r}");
    assert!(
        !r.to_string().contains(&other),
        "the sig is never quoted back"
    );
    // The app's sig: online.
    let sig = sb.issue_sig("kiosk-app", Duration::from_secs(600));
    let r = d.rpc("login", json!({ "user_sig": sig })).await;
    assert_eq!(r["result"]["login_status"], 1, "{r}");
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    // The service expires it: user_sig_expired, logged out, waiting for the app.
    sb.expire_sig("kiosk-app");
    let ev = loop {
        let v = tokio::time::timeout(WAIT, w.next())
            .await
            .expect("an event");
        if v["method"] == "user_sig_expired" {
            break v;
        }
    };
    assert_eq!(ev["params"]["code"], 70001, "{ev}");
    let st = d.wait_phase("idle").await;
    assert_eq!(st["last_error"]["code"], 6206, "{st}");
    assert_flat(&sb, "kiosk-app", 2).await;
    assert_eq!(sb.user("kiosk-app").provision_requests, 0, "never fetched");
    // The app's next login.
    let sig2 = sb.issue_sig("kiosk-app", Duration::from_secs(600));
    let r = d.rpc("login", json!({ "user_sig": sig2 })).await;
    assert_eq!(r["result"]["login_status"], 1, "{r}");
    // Cached like a fetched one: a restart logs in with it.
    let mut d = d;
    d.terminate().await;
    let d = Daemon::start(
        &sb,
        Opts {
            provisioning: false,
            dir: Some(d.dir.clone()),
            ..Opts::user("kiosk-app")
        },
    )
    .await;
    d.wait_phase("online").await;
    d.assert_no_secrets_logged();
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_from_a_newer_imlinkd_is_left_alone_and_messaging_says_why() {
    let sb = sandbox().await;
    let dir = temp_dir("newer-store");
    let db = dir.join("state/messages.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        db.parent().unwrap(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE future (x); INSERT INTO future VALUES (1); PRAGMA user_version = 99;",
        )
        .unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let d = Daemon::start(
        &sb,
        Opts {
            dir: Some(dir),
            ..Opts::user("alice")
        },
    )
    .await;
    // The session runs regardless.
    d.wait_phase("online").await;
    let r = d
        .rpc("send_message", json!({ "to": "bob", "body": "x" }))
        .await;
    assert_eq!(r["error"]["code"], 6019, "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("newer imlinkd") && m.contains("messages.db"),
        "{m}"
    );
    let r = d.rpc("get_history", json!({ "peer": "bob" })).await;
    assert_eq!(r["error"]["code"], 6019, "{r}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "not a byte changed");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_inbox_subscription_is_retried_and_the_daemon_is_never_online_and_deaf() {
    // A NATS cluster electing a leader refuses SUBSCRIBEs for a few seconds after a node
    // dies. The daemon used to log a warning and stay `online`, receiving nothing, for good.
    // Now it says `subscribing` until the broker grants the inbox, retrying with backoff.
    let sb = sandbox().await;
    let alice = Daemon::start(&sb, Opts::user("alice")).await;
    alice.wait_phase("online").await;
    let mut o = Opts::user("bob");
    o.top_extra = "login_on_start = false".into();
    let bob = Daemon::start(&sb, o).await;
    let mut w = bob.client().await;
    w.call("watch", json!({})).await;
    sb.refuse_subscribe(Some(2), Some("bob"));
    let login = bob.rpc("login", json!({})).await;
    assert_eq!(
        login["result"]["login_status"], 1,
        "logged in at the CONNACK: {login}"
    );
    // Sent while bob cannot receive: it waits at the service, and arrives once he can.
    let id = send(&alice, "bob", "during the election").await;
    let mut phases = Vec::new();
    while phases.last().map(String::as_str) != Some("online") {
        let v = tokio::time::timeout(WAIT, w.next()).await.expect("events");
        if v["method"] == "state_changed" {
            phases.push(v["params"]["phase"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        phases,
        ["fetching_sig", "connecting", "subscribing", "online"]
    );
    let got = inbox_reaches(&bob, 1).await;
    assert_eq!(ids(&got), [id]);
    let st = bob.status().await;
    assert_eq!(st["inbox_subscribed"], true);
    assert_eq!(st["counters"]["subscribe_refusals"], 2, "{st}");
    assert_eq!(
        st["counters"]["connect_attempts"], 1,
        "no reconnect for it: {st}"
    );
    let c = sb.user("bob");
    assert_eq!((c.subscribes, c.subscribes_refused), (3, 2));
    alice.finish().await;
    bob.finish().await;
}
