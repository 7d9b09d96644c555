//! Clustered and MQTT 3.1.1 brokers nobody here wrote: a 3-node NATS JetStream cluster
//! (Debian's nats-server 2.9.10, MQTT 3.1.1 only) and ejabberd 23.01 (MQTT 5 and 3.1.1), each
//! started here on ephemeral loopback ports with the sandbox's TLS certificate and
//! sandbox-issued UserSigs as passwords.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::process::Command;

/// A 3-node NATS cluster with JetStream (MQTT sessions replicated 3 times) and an MQTT
/// listener over TLS on each node.
struct Nats {
    nodes: Vec<Option<Logged>>,
    mqtt_ports: Vec<u16>,
}

impl Nats {
    async fn start(sb: &imlink_sandbox::Sandbox, dir: &Path, users: &[(&str, &str)]) -> Nats {
        std::fs::write(dir.join("nats-cert.pem"), sb.server_cert_pem()).unwrap();
        std::fs::write(dir.join("nats-key.pem"), sb.server_key_pem()).unwrap();
        let cluster: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mqtt_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = cluster
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        // The IM ACL (docs/brokers.md): MQTT topics are NATS subjects with / as '.'; each user
        // may publish to any inbox and subscribe to their own subtree only (`a/#` is `a` and
        // `a.>` in NATS: both are allowed; QoS 1 is delivered through a JetStream consumer on
        // a `$MQTT.sub.<id>` subject, which must be allowed too).
        let users = users
            .iter()
            .map(|(u, p)| {
                format!(
                    "    {{user: \"{u}\", password: \"{p}\", permissions: {{ publish: {{ allow: [\"im.*.u.*.in.{u}\", \"im.*.d.{u}.*.*.status\"] }}, subscribe: {{ allow: [\"im.*.u.{u}\", \"im.*.u.{u}.>\", \"$MQTT.sub.>\"] }} }} }}"
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut nodes = Vec::new();
        for i in 0..3 {
            let conf = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{client}\n\
                 jetstream {{ store_dir: \"{d}/js{i}\" }}\n\
                 cluster {{ name: c1, listen: 127.0.0.1:{cp}, routes: [{routes}] }}\n\
                 mqtt {{ listen: 127.0.0.1:{mp}\n  tls {{ cert_file: \"{d}/nats-cert.pem\", key_file: \"{d}/nats-key.pem\" }}\n}}\n\
                 authorization {{ users: [\n{users}\n] }}\n",
                client = free_port(),
                d = dir.display(),
                cp = cluster[i],
                mp = mqtt_ports[i],
            );
            let path = dir.join(format!("nats{i}.conf"));
            std::fs::write(&path, conf).unwrap();
            let mut cmd = Command::new("nats-server");
            cmd.arg("-c").arg(&path);
            nodes.push(Some(Logged::spawn(&format!("nats n{i}"), cmd)));
        }
        for n in nodes.iter_mut().flatten() {
            n.wait_count("Listening for MQTT clients", 1, Duration::from_secs(30))
                .await;
        }
        // JetStream needs its meta leader before MQTT sessions can be created.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !nodes.iter().flatten().any(|n| {
            n.count("JetStream cluster new metadata leader") > 0
                || n.count("Self is new JetStream cluster metadata leader") > 0
        }) {
            assert!(Instant::now() < deadline, "no JetStream meta leader");
            tokio::time::sleep(Duration::from_millis(100)).await; // polling another process's log
        }
        Nats { nodes, mqtt_ports }
    }

    fn urls(&self) -> Vec<String> {
        self.mqtt_ports
            .iter()
            .map(|p| format!("mqtts://127.0.0.1:{p}"))
            .collect()
    }

    /// The node a status's `broker` names.
    fn node_of(&self, status: &Value) -> usize {
        let b = status["broker"].as_str().unwrap();
        self.mqtt_ports
            .iter()
            .position(|p| b.ends_with(&format!(":{p}")))
            .unwrap_or_else(|| panic!("{b} is no node"))
    }
}

fn nats_opts(n: &Nats, user: &str, protocol: &str, reversed: bool) -> Opts {
    let mut o = Opts::user(user);
    let mut urls = n.urls();
    if reversed {
        urls.reverse();
    }
    o.broker_urls = Some(urls);
    o.broker_extra = format!("protocol = \"{protocol}\"\n");
    o
}

/// Wait until `d`'s inbox subscription is acknowledged (NATS creates a replicated JetStream
/// consumer for it, which can take a while after the CONNACK; a message published before is
/// dropped by the broker, not by imlinkd). Status is polled: there is no event for it.
async fn inbox_ready(d: &Daemon) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while d.status().await["inbox_subscribed"] != true {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no SUBACK\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait for a `connect_success` on `w` (a watching client); returns its params.
async fn next_connect_success(w: &mut Client, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = tokio::time::timeout_at(deadline, w.next())
            .await
            .expect("a connect_success");
        if v["method"] == "connect_success" {
            return v["params"].clone();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_node_dies_and_the_session_and_its_messages_survive() {
    let sb = sandbox().await;
    let dir = temp_dir("nats");
    let sa = sb.issue_sig("alice", Duration::from_secs(3600));
    let sbob = sb.issue_sig("bob", Duration::from_secs(3600));
    sb.pin_sig("alice", Some(&sa));
    sb.pin_sig("bob", Some(&sbob));
    let mut nats = Nats::start(&sb, &dir, &[("alice", &sa), ("bob", &sbob)]).await;

    // alice in auto mode (NATS answers MQTT 5 with CONNACK 0x01: she falls back to 3.1.1),
    // bob configured for 3.1.1 and listing the nodes in another order.
    let alice = Daemon::start(&sb, nats_opts(&nats, "alice", "auto", false)).await;
    let st = alice.wait_phase("online").await;
    assert_eq!(st["protocol"], "v3.1.1", "{st}");
    let bob = Daemon::start(&sb, nats_opts(&nats, "bob", "v3.1.1", true)).await;
    bob.wait_phase("online").await;
    inbox_ready(&alice).await;
    inbox_ready(&bob).await;
    let a_node = nats.node_of(&alice.status().await);
    let b_node = nats.node_of(&bob.status().await);
    assert_ne!(a_node, b_node, "alice and bob on different nodes");
    eprintln!("alice on n{a_node}, bob on n{b_node}");

    // A first exchange, then alice's node dies.
    let r = bob
        .rpc("send_message", json!({ "to": "alice", "body": "before" }))
        .await;
    assert!(r["result"]["id"].is_string(), "{r}");
    inbox_at_least(&alice, 1, WAIT).await;
    let mut w = alice.client().await;
    w.call("watch", json!({})).await;
    let connects_before = alice.status().await["counters"]["connect_attempts"]
        .as_u64()
        .unwrap();
    let killed_at = Instant::now();
    nats.nodes[a_node].take().unwrap().kill9().await;
    // During the outage, bob writes to alice: kept in her replicated session.
    let r = bob
        .rpc(
            "send_message",
            json!({ "to": "alice", "body": "during the outage" }),
        )
        .await;
    assert!(r["result"]["id"].is_string(), "{r}");
    let ok = next_connect_success(&mut w, Duration::from_secs(60)).await;
    let back = killed_at.elapsed();
    let st = alice.status().await;
    let now_node = nats.node_of(&st);
    assert_ne!(now_node, a_node, "on another node");
    assert_eq!(
        ok["session_present"], true,
        "the session survived in JetStream: {ok}"
    );
    let connects = st["counters"]["connect_attempts"].as_u64().unwrap() - connects_before;
    eprintln!("back online on n{now_node} {back:?} after the kill, {connects} CONNECTs");
    assert!(
        connects <= 12,
        "bounded through the leader election: {connects}"
    );
    let got = inbox_at_least(&alice, 2, Duration::from_secs(60)).await;
    let bodies: Vec<&str> = got.iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(
        bodies,
        ["before", "during the outage"],
        "nothing lost, nothing twice"
    );
    alice.assert_no_secrets_logged();
    alice.finish().await;
    bob.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_identity_on_two_nats_nodes_fights_a_bounded_number_of_times() {
    let sb = sandbox().await;
    let dir = temp_dir("nats-twin");
    let sa = sb.issue_sig("dev-9", Duration::from_secs(3600));
    sb.pin_sig("dev-9", Some(&sa));
    let nats = Nats::start(&sb, &dir, &[("dev-9", &sa)]).await;
    let a = Daemon::start(&sb, nats_opts(&nats, "dev-9", "v3.1.1", false)).await;
    a.wait_phase("online").await;
    let b = Daemon::start(&sb, nats_opts(&nats, "dev-9", "v3.1.1", true)).await;
    // On 3.1.1 a takeover is a silent close: the suspected-takeover rule ends the fight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let kicked = loop {
        let (sa_, sb_) = (a.status().await, b.status().await);
        if sa_["phase"] == "kicked" {
            break sa_;
        }
        if sb_["phase"] == "kicked" {
            break sb_;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still fighting: {sa_} / {sb_}"
        );
        // Polling the two daemons' status is the observation here.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        kicked["last_event"]["reason"], "suspected_takeover",
        "{kicked}"
    );
    let total = a.status().await["counters"]["connect_attempts"]
        .as_u64()
        .unwrap()
        + b.status().await["counters"]["connect_attempts"]
            .as_u64()
            .unwrap();
    eprintln!("the same identity on two NATS nodes: {total} CONNECTs in all before one backed off");
    assert!(total <= 10, "bounded: {total}");
    a.finish().await;
    b.finish().await;
}

// --- ejabberd --------------------------------------------------------------------------------

/// ejabberd from a private config dir (never Debian's default config: it listens on every
/// interface, 1883 included), with a loopback `mod_mqtt` listener over TLS.
struct Ejabberd {
    ctl: PathBuf,
    dir: PathBuf,
    node: String,
    port: u16,
}

impl Ejabberd {
    /// `status_acl`: the ACL lets each device write its status topic (docs/brokers.md); without
    /// it ejabberd refuses a CONNECT whose will names that topic.
    async fn start(
        sb: &imlink_sandbox::Sandbox,
        dir: &Path,
        users: &[(&str, &str)],
        status_acl: bool,
    ) -> Ejabberd {
        let port = free_port();
        let status_rule = if status_acl {
            "      \"im/+/d/%u/+/+/status\":\n        - allow: all\n"
        } else {
            ""
        };
        let node = format!("imlinkd{}@localhost", std::process::id());
        let pem = format!("{}{}", sb.server_cert_pem(), sb.server_key_pem());
        std::fs::write(dir.join("ejabberd.pem"), pem).unwrap();
        for d in ["db", "log"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let yml = format!(
            "hosts:\n  - localhost\nloglevel: info\ncertfiles:\n  - {d}/ejabberd.pem\n\
             listen:\n  -\n    port: {port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n    tls: true\n\
             auth_method: internal\n\
             modules:\n  mod_mqtt:\n    access_publish:\n      \"im/+/u/+/in/%u\":\n        - allow: all\n{status_rule}      \"#\":\n        - deny\n    access_subscribe:\n      \"im/+/u/%u/#\":\n        - allow: all\n      \"#\":\n        - deny\n",
            d = dir.display(),
        );
        std::fs::write(dir.join("ejabberd.yml"), yml).unwrap();
        // Nothing of Debian's: its ejabberdctl.cfg points at /etc/ejabberd/ejabberd.yml.
        std::fs::write(dir.join("ejabberdctl.cfg"), "").unwrap();
        std::fs::write(
            dir.join("inetrc"),
            "{lookup,[\"file\",\"native\"]}.\n{host,{127,0,0,1}, [\"localhost\"]}.\n",
        )
        .unwrap();
        // As root, ejabberdctl runs ejabberd as the `ejabberd` user: the files are its own.
        let st = std::process::Command::new("chown")
            .arg("-R")
            .arg("ejabberd:")
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "chown -R ejabberd: {}", dir.display());
        let e = Ejabberd {
            ctl: PathBuf::from("/usr/sbin/ejabberdctl"),
            dir: dir.to_path_buf(),
            node,
            port,
        };
        let out = e.run(&["start"]).await;
        assert!(out.status.success(), "ejabberdctl start: {out:?}");
        let out = e.run(&["started"]).await;
        assert!(
            out.status.success(),
            "ejabberd did not start: {out:?}\n{}",
            e.log()
        );
        for (u, p) in users {
            let out = e.run(&["register", u, "localhost", p]).await;
            assert!(out.status.success(), "register {u}: {out:?}");
        }
        e
    }

    /// ejabberdctl's options for this private instance (directories, node name).
    fn ctl_options(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--config-dir".into(),
            self.dir.clone().into(),
            "--config".into(),
            self.dir.join("ejabberd.yml").into(),
            "--spool".into(),
            self.dir.join("db").into(),
            "--logs".into(),
            self.dir.join("log").into(),
            "--node".into(),
            self.node.clone().into(),
        ]
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.ctl)
            .args(self.ctl_options())
            .args(args)
            .output()
            .await
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/ejabberd.log")).unwrap_or_default()
    }

    /// By name: ejabberd picks its certificate by the TLS server name (SNI), and clients
    /// send none for an IP address.
    fn url(&self) -> String {
        format!("mqtts://localhost:{}", self.port)
    }
}

impl Drop for Ejabberd {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.ctl)
            .args(self.ctl_options())
            .arg("stop")
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_v5_takeover_is_a_kick_with_its_reason_and_no_reconnect_follows() {
    let sb = sandbox().await;
    let dir = temp_dir("ejabberd");
    let sig = sb.issue_sig("kiosk-e", Duration::from_secs(3600));
    sb.pin_sig("kiosk-e", Some(&sig));
    // An ACL that does not know the device status topic: ejabberd refuses a CONNECT whose
    // will names it (CONNACK 0x90), and the daemon connects without the status at once.
    let ej = Ejabberd::start(&sb, &dir, &[("kiosk-e", &sig)], false).await;
    let mut o = Opts::user("kiosk-e");
    o.broker_url = Some(ej.url());
    let d = Daemon::start(&sb, o).await;
    let st = d.wait_phase("online").await;
    assert_eq!(st["protocol"], "v5", "{st}");
    assert_eq!(st["counters"]["connect_attempts"], 2, "{st}");
    assert_eq!(st["messages"]["status_published"], 0, "{st}");
    assert!(d.log_text().contains("refused the CONNECT's will"));
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let before = d.status().await["counters"]["connect_attempts"]
        .as_u64()
        .unwrap();
    let _thief = take_over_at(&ej.url(), &d.dir, sb.sdk_app_id(), "kiosk-e", &sig, false);
    let kick = loop {
        let v = tokio::time::timeout(WAIT, w.next()).await.expect("a kick");
        if v["method"] == "kicked_offline" {
            break v["params"].clone();
        }
    };
    assert_eq!(kick["reason"], "logged_in_elsewhere", "{kick}");
    let m = kick["message"].as_str().unwrap();
    assert!(
        m.contains("0x8E") && m.contains("Resumed by another connection"),
        "{m}"
    );
    let st = d.wait_phase("kicked").await;
    assert_eq!(st["login_status"], 3);
    // stay_offline: no reconnect follows (watched for 3 s).
    let quiet = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let v = w.next().await;
            if v["method"] == "connecting" {
                return v;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "a reconnect followed the kick: {quiet:?}");
    assert_eq!(
        d.status().await["counters"]["connect_attempts"]
            .as_u64()
            .unwrap(),
        before
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_over_mqtt_3_1_1_logs_in_and_carries_messages() {
    let sb = sandbox().await;
    let dir = temp_dir("ejabberd311");
    let sa = sb.issue_sig("ej-a", Duration::from_secs(3600));
    let sbb = sb.issue_sig("ej-b", Duration::from_secs(3600));
    sb.pin_sig("ej-a", Some(&sa));
    sb.pin_sig("ej-b", Some(&sbb));
    let ej = Ejabberd::start(&sb, &dir, &[("ej-a", &sa), ("ej-b", &sbb)], true).await;
    let mut o = Opts::user("ej-a");
    o.broker_url = Some(ej.url());
    o.broker_extra = "protocol = \"v3.1.1\"\n".into();
    let a = Daemon::start(&sb, o).await;
    let mut o = Opts::user("ej-b");
    o.broker_url = Some(ej.url());
    let b = Daemon::start(&sb, o).await;
    let st = a.wait_phase("online").await;
    assert_eq!(st["protocol"], "v3.1.1", "{st}");
    b.wait_phase("online").await;
    let r = a
        .rpc(
            "send_message",
            json!({ "to": "ej-b", "body": "3.1.1 to 5" }),
        )
        .await;
    assert!(r["result"]["id"].is_string(), "{r}");
    let r = b
        .rpc(
            "send_message",
            json!({ "to": "ej-a", "body": "5 to 3.1.1" }),
        )
        .await;
    assert!(r["result"]["id"].is_string(), "{r}");
    assert_eq!(inbox_at_least(&b, 1, WAIT).await[0]["body"], "3.1.1 to 5");
    assert_eq!(inbox_at_least(&a, 1, WAIT).await[0]["body"], "5 to 3.1.1");
    a.finish().await;
    b.finish().await;
}
