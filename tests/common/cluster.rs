//! Daemons on the IM service's real cluster (`scripts/im-cluster`, handled by
//! [`super::im_cluster`]): the cluster as a daemon's [`Service`], its config, a raw MQTT 3.1.1
//! client over TLS (a user the callout admits, for what a daemon would never send), the
//! sandbox's admin endpoint (provisioning faults, counters), imlink-auth's decisions per
//! client id, and a recorder of a daemon's notifications.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::im_cluster::{ImCluster, unix_now};
use super::{Client, Daemon, Opts, Service, inbox_all};

/// `"20s"`, `"15m"`, `"24h"`, `"2d"` or a number of seconds → seconds.
pub fn secs(text: &str) -> u64 {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("a duration: {text:?}"));
    n * match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => panic!("a duration: {text:?}"),
    }
}

/// The cluster as the IM service of a daemon logging in as `user`: its first node, its
/// provisioning, its CA and device token. The secrets its log must never hold: the device
/// token, both app keys, the operator's secret, the admin token, and every UserSig the
/// sandbox may have issued for `user` since now — the sandbox signs `(user, time, lifetime)`
/// deterministically, so they are made again here, one per second of the daemon's life.
pub fn service(c: &ImCluster, user: &str) -> Service {
    let key = c.app_key();
    let app = c.e.sdk_app_id;
    let lifetime = secs(&c.e.sig_lifetime);
    let since = unix_now().saturating_sub(2);
    let user = user.to_string();
    let token = read(&c.e.device_token_file);
    Service {
        sdk_app_id: app,
        mqtt_url: c.e.mqtt_urls[0].clone(),
        provisioning_url_template: c.e.provisioning_url_template.clone(),
        ca_pem: std::fs::read_to_string(&c.e.ca_path).expect("the cluster's CA"),
        device_token: token.clone(),
        secrets: vec![
            token,
            c.app_key(),
            c.next_app_key(),
            c.operator_password(),
            c.e.admin_token.clone(),
        ],
        issued: Arc::new(move || {
            (since..=unix_now() + 1)
                .map(|time| {
                    imlink_usersig::generate(&imlink_usersig::SigParams {
                        sdk_app_id: app,
                        secret_key: &key,
                        identifier: &user,
                        time,
                        expire: lifetime,
                        userbuf: None,
                    })
                })
                .collect()
        }),
    }
}

/// A daemon's options on the cluster: every node in `broker.urls`, starting with node `first`
/// (0-based), MQTT 3.1.1 (nats-server refuses MQTT 5).
pub fn opts(c: &ImCluster, user: &str, first: usize) -> Opts {
    let mut urls = c.e.mqtt_urls.clone();
    urls.rotate_left(first);
    let mut o = Opts::user(user);
    o.broker_urls = Some(urls);
    o.broker_extra = "protocol = \"v3.1.1\"\n".into();
    o
}

/// Start `user`'s daemon on the cluster (first node `first`) and wait until it is online.
pub async fn daemon(c: &ImCluster, user: &str, first: usize) -> Daemon {
    let d = Daemon::start_for(&service(c, user), opts(c, user, first)).await;
    d.wait_phase("online").await;
    d
}

/// The node (0-based) a status's `broker` names.
pub fn node_of(c: &ImCluster, status: &Value) -> usize {
    let b = status["broker"].as_str().expect("status.broker");
    c.e.mqtt_urls
        .iter()
        .position(|u| u == b)
        .unwrap_or_else(|| panic!("{b} is no node of the cluster"))
}

/// A counter of `status.counters`.
pub fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("status.counters.{name}: {status}"))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// One HTTP/1.1 request to `base` (plain HTTP on loopback) with the bearer token; the status
/// code and the body (0 and nothing when nothing listens).
pub fn http(base: &str, method: &str, target: &str, bearer: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let authority = base.strip_prefix("http://").expect("an http:// URL");
    let Ok(mut s) = std::net::TcpStream::connect(authority) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request sent");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    (
        code,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// POST to the sandbox's admin endpoint (provisioning faults…); asserts 200.
pub fn admin(c: &ImCluster, target: &str, body: &str) -> Value {
    let (code, text) = http(&c.e.admin_url, "POST", target, &c.e.admin_token, body);
    assert_eq!(code, 200, "admin {target}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The sandbox's counters for `user` (its provisioning: `provision_requests`, `sigs_issued`).
pub fn provisioning_counters(c: &ImCluster, user: &str) -> Value {
    let (code, text) = http(&c.e.admin_url, "GET", "/counters", &c.e.admin_token, "");
    assert_eq!(code, 200, "admin /counters: {text}");
    let v: Value = serde_json::from_str(&text).expect("counters as JSON");
    v["users"][user].clone()
}

/// The daemon's client id on the cluster (platform `linux`, instance 0).
pub fn client_id(c: &ImCluster, user: &str) -> String {
    c.client_id(user, "linux", "0")
}

/// A C2C message as a daemon would publish it (`src/message.rs`), with a fresh ULID.
pub fn wire_message(from: &str, to: &str, body: &str) -> Vec<u8> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let id = imlinkd::message::IdGen::new().next(now_ms);
    json!({ "id": id, "from": from, "to": to, "kind": "text", "body": body, "ts": now_ms })
        .to_string()
        .into_bytes()
}

/// A raw MQTT 3.1.1 client over TLS (rumqttc), logged in through the callout: for what a
/// daemon never does (forged senders) and for a peer that publishes without refreshing.
pub struct Raw {
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Raw {
    /// Log in on node `node` as `user` with `password`, client id `{app}:{user}:raw:{instance}`;
    /// panics unless CONNACK 0.
    pub async fn connect(
        c: &ImCluster,
        node: usize,
        user: &str,
        password: &str,
        instance: &str,
    ) -> Raw {
        let (host, port) = c.mqtt_addr(node);
        let mut o = rumqttc::MqttOptions::new(c.client_id(user, "raw", instance), host, port);
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(
                imlinkd::tls::client_config(
                    &imlinkd::config::CaSource::File(c.e.ca_path.clone()),
                    None,
                    &[],
                )
                .expect("the cluster's CA"),
            ),
        ));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
        match tokio::time::timeout(super::WAIT, el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))))
                if a.code == rumqttc::ConnectReturnCode::Success => {}
            other => panic!("{user} could not log in on node {node}: {other:?}"),
        }
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Raw {
            client,
            events,
            task,
        }
    }

    /// Publish at QoS 1 and wait for the PUBACK (on 3.1.1 it carries no code: nats-server
    /// acknowledges a publish outside the grant too, and drops it).
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish queued");
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(rumqttc::Packet::PubAck(_)))) => return,
                Ok(Some(Ok(_))) => {}
                other => panic!("no PUBACK for {topic}: {other:?}"),
            }
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Every notification a daemon sent to one watcher, with when it arrived (wall clock and
/// `Instant`), recorded by a task from the moment this returns.
#[derive(Clone)]
pub struct Recorder {
    pub events: Arc<Mutex<Vec<(Instant, f64, Value)>>>,
    changed: tokio::sync::watch::Receiver<usize>,
}

pub fn unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Recorder {
    pub async fn start(d: &Daemon) -> Recorder {
        let mut w = Client::connect(&d.socket).await;
        let snap = w.call("watch", json!({})).await;
        let events = Arc::new(Mutex::new(vec![(
            Instant::now(),
            unix_f64(),
            json!({ "method": "snapshot", "params": snap["result"]["status"] }),
        )]));
        let (tx, changed) = tokio::sync::watch::channel(1usize);
        let ev = events.clone();
        tokio::spawn(async move {
            while let Some(v) = w.next_or_eof().await {
                let mut e = ev.lock().unwrap();
                e.push((Instant::now(), unix_f64(), v));
                let _ = tx.send(e.len());
            }
        });
        Recorder { events, changed }
    }

    /// The notifications named `method` so far (their params, with the wall-clock second).
    pub fn named(&self, method: &str) -> Vec<(f64, Value)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, v)| v["method"] == method)
            .map(|(_, t, v)| (*t, v["params"].clone()))
            .collect()
    }

    /// The phases the daemon went through (`state_changed`) from index `from` on, in order,
    /// with the wall-clock second each was heard.
    pub fn phases(&self, from: usize) -> Vec<(f64, String)> {
        self.since(from)
            .into_iter()
            .filter(|(_, v)| v["method"] == "state_changed")
            .map(|(t, v)| (t, v["params"]["phase"].as_str().unwrap_or("").to_string()))
            .collect()
    }

    /// Wait until `n` notifications named `method` were recorded from index `from` on (see
    /// [`Recorder::len`]); returns their params.
    pub async fn wait_for(
        &mut self,
        from: usize,
        method: &str,
        n: usize,
        within: Duration,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got: Vec<Value> = self
                .since(from)
                .into_iter()
                .filter(|(_, v)| v["method"] == method)
                .map(|(_, v)| v["params"].clone())
                .collect();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "{} of {n} {method:?} notifications within {within:?}: {:?}",
                    got.len(),
                    self.phases(from)
                );
            }
        }
    }

    /// Wait until a notification from index `from` on satisfies `pred` (on the whole
    /// notification: `method`, `params`); returns it.
    pub async fn wait_match(
        &mut self,
        from: usize,
        within: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((_, v)) = self.since(from).into_iter().find(|(_, v)| pred(v)) {
                return v;
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                panic!(
                    "no such notification within {within:?}: {:?}",
                    self.phases(from)
                );
            }
        }
    }

    /// How many notifications so far (to look only at later ones).
    pub fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// The notifications from index `from` on.
    pub fn since(&self, from: usize) -> Vec<(f64, Value)> {
        self.events.lock().unwrap()[from..]
            .iter()
            .map(|(_, t, v)| (*t, v.clone()))
            .collect()
    }
}

/// Wait (woken by notifications) until `d`'s inbox holds a message satisfying `pred`;
/// returns the whole inbox then.
pub async fn inbox_until(
    d: &Daemon,
    within: Duration,
    mut pred: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut w = d.client().await;
    w.call("watch", json!({})).await;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let all = inbox_all(d).await;
        if pred(&all) {
            return all;
        }
        if tokio::time::timeout_at(deadline, w.next()).await.is_err() {
            panic!(
                "the inbox never got there within {within:?}: {} messages\n{}",
                all.len(),
                d.log_text()
            );
        }
    }
}

/// Wait (polling its HTTP monitor: another process's state) until node `i` says it is healthy.
pub async fn node_healthy(c: &ImCluster, i: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (code, _) = http(&c.e.monitor_urls[i], "GET", "/healthz", "", "");
        if code == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node n{} not healthy within {within:?}",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The JetStream leaders as a live node sees them: the meta leader and each stream's leader
/// in the APP account (`$MQTT_sess`, `$MQTT_msgs`, …), as node indexes (0-based).
pub fn jetstream_leaders(c: &ImCluster) -> Vec<(String, usize)> {
    let node = |name: &str| -> Option<usize> {
        name.strip_prefix('n')?
            .parse::<usize>()
            .ok()?
            .checked_sub(1)
    };
    for m in &c.e.monitor_urls {
        let (code, body) = http(m, "GET", "/jsz?accounts=true&streams=true", "", "");
        if code != 200 {
            continue;
        }
        let Ok(j) = serde_json::from_str::<Value>(&body) else {
            continue;
        };
        let mut out = Vec::new();
        if let Some(n) = j["meta_cluster"]["leader"].as_str().and_then(node) {
            out.push(("meta".to_string(), n));
        }
        for a in j["account_details"].as_array().into_iter().flatten() {
            for s in a["stream_detail"].as_array().into_iter().flatten() {
                if let (Some(name), Some(n)) = (
                    s["name"].as_str(),
                    s["cluster"]["leader"].as_str().and_then(node),
                ) {
                    out.push((name.to_string(), n));
                }
            }
        }
        return out;
    }
    Vec::new()
}
