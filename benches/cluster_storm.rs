//! `cargo bench --bench cluster_storm` — the fleet after a node loss, on the real cluster
//! (issue 19 item 4): `scripts/im-cluster` (3 nats-server 2.15.1 nodes, JetStream R3, MQTT over
//! TLS, 2 imlink-auth in the callout's queue group, the sandbox as provisioning), N release
//! imlinkd processes configured as a fleet would be (one config: the three nodes in the same
//! order, MQTT 3.1.1, the default session policy), all on this machine.
//!
//! 1. Measures the cluster's CONNECT capacity first, on its own: 32 clients logging in
//!    continuously for 10 s (fresh TCP + TLS each time, a distinct user, CONNECT → CONNACK →
//!    DISCONNECT): CONNACK 0 per second.
//! 2. Starts the fleet (50 devices a second) and an operator: a raw MQTT 3.1.1 subscriber as
//!    the operator identity im-cluster configures (`@monitor`), on the status tree
//!    `im/{app}/d/#` (retained status documents and last wills), on a node the fleet is not on.
//! 3. Once the operator sees every device online, waits `IMLINKD_CLUSTER_STORM_SETTLE` seconds
//!    (default 30), then kills -9 the node most devices are on (all of them: one config).
//! 4. Every second: the fleet as the operator sees it (each device's latest status document:
//!    back — online on another node; subscribing; offline — its will; stale — still "online"
//!    on the dead node, whose wills died with it; other), the client connections the nodes
//!    accepted that second (each CONNECT is a fresh TCP connection) and those open.
//! 5. At the end, every daemon's own counters (CONNECTs, logins, fetches), when each was online
//!    again by its own log (the truth beside the operator's view), and imlink-auth's stats
//!    (requests, refused).
//!
//! Writes `target/bench/storm-cluster.csv` and `target/bench/storm-cluster.md`. Environment:
//! IMLINKD_CLUSTER_STORM_DEVICES (default 1000: what this 2-core machine holds with the cluster
//! on it every time; 2000 started once in two runs, 3000 never: JetStream fell behind),
//! IMLINKD_CLUSTER_STORM_SETTLE (s, default 30), IMLINKD_CLUSTER_STORM_WINDOW (s after the
//! kill, default 300), IMLINKD_CLUSTER_STORM_ON (the fleet's node: `n1`, `n2`, `n3`, or by
//! default the one leading the MQTT session stream, the worst case). Run as root.

#[path = "../tests/common/im_cluster.rs"]
mod im_cluster;

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use im_cluster::{ImCluster, Piece, UpOptions, unix_now};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One GET to a node's monitoring port (HTTP/1.0: no chunking); the JSON body, if any.
fn monitor(base: &str, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let authority = base.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(authority).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let text = String::from_utf8_lossy(&resp);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

// --- the capacity probe ----------------------------------------------------------------------

fn mqtt_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// MQTT 3.1.1 CONNECT: clean session, keepalive 30 s, username and password.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt_string(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]);
    mqtt_string(&mut body, client_id);
    mqtt_string(&mut body, user);
    mqtt_string(&mut body, password);
    let mut pkt = vec![0x10];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        pkt.push(b);
        if n == 0 {
            break;
        }
    }
    pkt.extend_from_slice(&body);
    pkt
}

/// One login: TCP, TLS, CONNECT, the CONNACK's code, DISCONNECT.
async fn login_once(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    client_id: &str,
    user: &str,
    password: &str,
) -> std::io::Result<u8> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name =
        rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let mut s = tls.connect(name, tcp).await?;
    s.write_all(&connect_packet(client_id, user, password))
        .await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[0] != 0x20 {
        return Err(std::io::Error::other("not a CONNACK"));
    }
    if ack[3] == 0 {
        let _ = s.write_all(&[0xE0, 0]).await;
    }
    let _ = s.shutdown().await;
    Ok(ack[3])
}

/// CONNACK 0 per second with `clients` logging in continuously for `secs` (round robin over
/// the nodes), and how many logins failed.
async fn capacity(c: &ImCluster, clients: usize, secs: u64) -> (f64, u64) {
    let tls = tokio_rustls::TlsConnector::from(
        imlinkd::tls::client_config(
            &imlinkd::config::CaSource::File(c.e.ca_path.clone()),
            None,
            &[],
        )
        .expect("the cluster's CA"),
    );
    let ports: Vec<u16> = (0..c.e.mqtt_urls.len()).map(|i| c.mqtt_addr(i).1).collect();
    let (app, key) = (c.e.sdk_app_id, c.app_key());
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (tls, ports, key) = (tls.clone(), ports.clone(), key.clone());
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let user = format!("cap-{k}-{i}");
                let sig = imlink_usersig::generate(&imlink_usersig::SigParams {
                    sdk_app_id: app,
                    secret_key: &key,
                    identifier: &user,
                    time: unix_now(),
                    expire: 3600,
                    userbuf: None,
                });
                let cid = format!("{app}:{user}:bench:0");
                match login_once(&tls, ports[(k + i) % ports.len()], &cid, &user, &sig).await {
                    Ok(0) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
            }
        }));
    }
    // Count only the steady part: from 2 s in to the end.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok0, t0) = (ok.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let rate = (ok.load(Ordering::Relaxed) - ok0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (rate, failed.load(Ordering::Relaxed))
}

// --- the operator --------------------------------------------------------------------------

/// A device's latest status document as the operator got it.
#[derive(Clone, Debug)]
struct Seen {
    state: String,
    phase: String,
    broker: String,
}

/// Subscribe to the status tree as the operator on node `node`; every document lands in the
/// map (by user). Reconnects and subscribes again if its connection ends.
fn operator(
    rt: &tokio::runtime::Runtime,
    c: &ImCluster,
    node: usize,
) -> Arc<Mutex<HashMap<String, Seen>>> {
    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::default();
    let (host, port) = c.mqtt_addr(node);
    let app = c.e.sdk_app_id;
    let mut o = rumqttc::MqttOptions::new(format!("{app}:@monitor:bench:0"), host, port);
    o.set_credentials(c.e.operator.username.clone(), c.operator_password());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(64 * 1024, 64 * 1024);
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
    let map = seen.clone();
    rt.spawn(async move {
        let (client, mut el) = rumqttc::AsyncClient::new(o, 1024);
        let filter = format!("im/{app}/d/#");
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
                        .await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    // im/{app}/d/{user}/{platform}/{instance}/status
                    let user = p.topic.split('/').nth(3).unwrap_or("").to_string();
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
                        map.lock().unwrap().insert(
                            user,
                            Seen {
                                state: s("state"),
                                phase: s("phase"),
                                broker: s("broker"),
                            },
                        );
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    });
    seen
}

/// The operator's view, counted: (back, subscribing, offline, stale, other). `dead`: the URL
/// of the killed node (none before the kill).
fn view(seen: &HashMap<String, Seen>, dead: Option<&str>) -> [usize; 5] {
    let mut v = [0usize; 5];
    for s in seen.values() {
        let on_dead = dead.is_some_and(|d| s.broker == d);
        let i = match (s.state.as_str(), s.phase.as_str()) {
            ("online", _) if on_dead => 3,
            ("online", "online") => 0,
            ("online", _) => 1,
            ("offline", _) => 2,
            _ => 4,
        };
        v[i] += 1;
    }
    v
}

// --- the fleet -----------------------------------------------------------------------------

/// Device `i`: its config lists the nodes from `first` on (the same list for the whole fleet).
fn device(c: &ImCluster, root: &Path, i: usize, first: usize) -> (Child, PathBuf) {
    let user = format!("dev-{i:04}");
    let dir = root.join(&user);
    std::fs::create_dir_all(&dir).unwrap();
    let mut urls = c.e.mqtt_urls.clone();
    urls.rotate_left(first);
    let urls = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = format!(
        "user_id = \"{user}\"\nsdk_app_id = {app}\nstate_dir = \"{d}/state\"\nlog_level = \"info\"\n\
         [broker]\nurls = [{urls}]\nprotocol = \"v3.1.1\"\nca_file = \"{ca}\"\nkeepalive = \"60s\"\n\
         [provisioning]\nurl = \"{prov}\"\ntoken_file = \"{token}\"\nca_file = \"{ca}\"\n\
         [store]\nmax_bytes = \"1MiB\"\n\
         [api]\nsocket = \"{d}/api.sock\"\n",
        app = c.e.sdk_app_id,
        d = dir.display(),
        ca = c.e.ca_path.display(),
        prov = c.e.provisioning_url_template,
        token = c.e.device_token_file.display(),
    );
    let config = dir.join("imlinkd.toml");
    std::fs::write(&config, cfg).unwrap();
    // Its log (info: a line per phase change) tells when it was back, by its own account.
    let log = std::fs::File::create(dir.join("imlinkd.log")).unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn imlinkd");
    (child, dir)
}

/// When the daemon in `dir` was first online after `since` (Unix seconds), by its log.
fn online_after(dir: &Path, since: f64) -> Option<f64> {
    let log = std::fs::read_to_string(dir.join("imlinkd.log")).ok()?;
    log.lines()
        .filter(|l| l.contains("phase=\"online\""))
        .filter_map(|l| im_cluster::rfc3339_unix(l.split_whitespace().next()?))
        .find(|t| *t > since)
}

/// The JetStream leaders as node `asked` sees them: the meta group's and each stream's (the MQTT
/// streams), as node indexes.
fn leaders(c: &ImCluster, asked: usize) -> Vec<(String, usize)> {
    let node = |v: &Value| -> Option<usize> {
        v.as_str()?
            .strip_prefix('n')?
            .parse::<usize>()
            .ok()?
            .checked_sub(1)
    };
    let Some(j) = monitor(&c.e.monitor_urls[asked], "/jsz?accounts=true&streams=true") else {
        return Vec::new();
    };
    let mut v = Vec::new();
    if let Some(n) = node(&j["meta_cluster"]["leader"]) {
        v.push(("meta".to_string(), n));
    }
    for a in j["account_details"].as_array().into_iter().flatten() {
        for s in a["stream_detail"].as_array().into_iter().flatten() {
            if let Some(n) = node(&s["cluster"]["leader"]) {
                v.push((s["name"].as_str().unwrap_or("?").to_string(), n));
            }
        }
    }
    v
}

/// imlink-auth's last stats line, summed over the instances: (requests, refused).
fn auth_stats(c: &ImCluster) -> (u64, u64) {
    let mut total = (0, 0);
    for i in 0..c.e.auth_logs.len() {
        let log = c.auth_log(i);
        if let Some(l) = log.lines().rev().find(|l| l.contains("stats: requests=")) {
            let field = |k: &str| -> u64 {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            total.0 += field("requests=");
            total.1 += field("refused=");
        }
    }
    total
}

fn main() {
    let n = env_num("IMLINKD_CLUSTER_STORM_DEVICES", 1000) as usize;
    let settle = env_num("IMLINKD_CLUSTER_STORM_SETTLE", 30);
    let window = env_num("IMLINKD_CLUSTER_STORM_WINDOW", 300);
    // Before the cluster: its nodes inherit the open-files limit (each holds the fleet's sockets).
    let rt = bench_runtime(Some(65_536));
    let bin = Path::new(BIN).parent().expect("a directory").to_path_buf();
    let mut c = ImCluster::up(
        &bin,
        "storm",
        &UpOptions {
            sig_lifetime: Some("24h".into()),
            ..Default::default()
        },
    );
    let nodes = c.e.mqtt_urls.len();

    eprintln!("measuring the cluster's CONNECT capacity (32 clients, 10 s)");
    let (cap, cap_failed) = rt.block_on(capacity(&c, 32, 10));
    eprintln!("capacity: {cap:.0} CONNACK 0 per second ({cap_failed} failed)");

    // Where the fleet goes (its first node, the one killed): by default the node leading the
    // MQTT session stream, the worst case (every reconnecting CONNECT waits for its election).
    let first = match std::env::var("IMLINKD_CLUSTER_STORM_ON").as_deref() {
        Ok("n1") => 0,
        Ok("n2") => 1,
        Ok("n3") => 2,
        _ => leaders(&c, 0)
            .iter()
            .find(|(s, _)| s == "$MQTT_sess")
            .map_or(0, |(_, n)| *n),
    };
    // The operator on another node: every device's status as it comes.
    let seen = operator(&rt, &c, (first + nodes - 1) % nodes);

    let root: PathBuf =
        std::env::temp_dir().join(format!("imlinkd-cluster-storm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    eprintln!("starting {n} imlinkd processes");
    let t0 = Instant::now();
    let mut children: Vec<KillOnDrop> = Vec::with_capacity(n);
    let mut dirs = Vec::with_capacity(n);
    for i in 0..n {
        let (child, dir) = device(&c, &root, i, first);
        children.push(KillOnDrop(child));
        dirs.push(dir);
        if i % 25 == 24 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let v = view(&seen.lock().unwrap(), None);
        if v[0] >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} online as the operator sees it: {v:?}",
            v[0]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let startup = t0.elapsed();
    eprintln!("all {n} online after {startup:?}; settling {settle} s");
    std::thread::sleep(Duration::from_secs(settle));
    let pss: u64 = children
        .iter()
        .map(|c| proc_kib(c.0.id(), "smaps_rollup", "Pss:"))
        .sum();
    let nodes_pss: u64 =
        c.e.node_pids
            .iter()
            .map(|p| proc_kib(*p, "smaps_rollup", "Pss:"))
            .sum();
    let before: Vec<Value> = dirs
        .iter()
        .map(|d| call(&d.join("api.sock"), "status", json!({}))["result"].clone())
        .collect();
    let sum = |v: &[Value], k: &str| -> u64 {
        v.iter()
            .map(|s| s["counters"][k].as_u64().unwrap_or(0))
            .sum()
    };

    // The node most devices are on.
    let per_node: Vec<u64> =
        c.e.monitor_urls
            .iter()
            .map(|m| monitor(m, "/varz").map_or(0, |v| v["connections"].as_u64().unwrap_or(0)))
            .collect();
    let victim = (0..nodes).max_by_key(|i| per_node[*i]).expect("a node");
    let dead_url = c.e.mqtt_urls[victim].clone();
    // What the node leads in JetStream (its loss means elections: the meta group, and the MQTT
    // streams — sessions, QoS 1 messages, retained messages).
    let led: Vec<String> = leaders(&c, (victim + 1) % nodes)
        .into_iter()
        .filter(|(_, n)| *n == victim)
        .map(|(s, _)| s)
        .collect();
    let on_victim = before
        .iter()
        .filter(|s| s["broker"].as_str() == Some(dead_url.as_str()))
        .count();
    let alive: Vec<usize> = (0..nodes).filter(|i| *i != victim).collect();
    let totals = |alive: &[usize]| -> Vec<u64> {
        alive
            .iter()
            .map(|i| {
                monitor(&c.e.monitor_urls[*i], "/varz")
                    .map_or(0, |v| v["total_connections"].as_u64().unwrap_or(0))
            })
            .collect()
    };
    eprintln!(
        "killing n{} ({on_victim} devices on it; connections per node {per_node:?}; \
         it leads {led:?})",
        victim + 1
    );
    let mut csv = String::from(
        "second,attempts,open,back,subscribing,offline,stale,other,devices,capacity\n",
    );
    let mut last_totals = totals(&alive);
    let kill_at = Instant::now();
    let kill_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    c.stop(Piece::Node, victim, true);
    let mut back_99: Option<f64> = None;
    let mut back_all: Option<f64> = None;
    let mut peak = 0u64;
    let mut attempts_sum = 0u64;
    for second in 1..=window {
        let tick = kill_at + Duration::from_secs(second);
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        let now_totals = totals(&alive);
        let attempts: u64 = now_totals
            .iter()
            .zip(&last_totals)
            .map(|(a, b)| a.saturating_sub(*b))
            .sum();
        last_totals = now_totals;
        let open: u64 = alive
            .iter()
            .map(|i| {
                monitor(&c.e.monitor_urls[*i], "/varz")
                    .map_or(0, |v| v["connections"].as_u64().unwrap_or(0))
            })
            .sum();
        let v = view(&seen.lock().unwrap(), Some(&dead_url));
        peak = peak.max(attempts);
        attempts_sum += attempts;
        csv += &format!(
            "{second},{attempts},{open},{},{},{},{},{},{n},{cap:.0}\n",
            v[0], v[1], v[2], v[3], v[4]
        );
        let t = kill_at.elapsed().as_secs_f64();
        if back_99.is_none() && v[0] * 100 >= n * 99 {
            back_99 = Some(t);
        }
        if back_all.is_none() && v[0] >= n {
            back_all = Some(t);
        }
        if back_all.is_some_and(|b| t > b + 15.0) && second >= 60 {
            break;
        }
    }
    let observed = kill_at.elapsed();
    // The truth beside the operator's view: when each daemon on the dead node was online again
    // by its own log (seconds after the kill).
    let mut truth: Vec<f64> = dirs
        .iter()
        .zip(&before)
        .filter(|(_, s)| s["broker"].as_str() == Some(dead_url.as_str()))
        .filter_map(|(d, _)| online_after(d, kill_unix).map(|t| t - kill_unix))
        .collect();
    truth.sort_by(f64::total_cmp);
    let truth_99 = (on_victim > 0)
        .then(|| {
            truth
                .get((on_victim * 99).div_ceil(100).saturating_sub(1))
                .copied()
        })
        .flatten();
    let truth_all = (truth.len() == on_victim)
        .then(|| truth.last().copied())
        .flatten();
    let mut with_truth = String::new();
    for (i, line) in csv.lines().enumerate() {
        if i == 0 {
            with_truth += &format!("{line},online_truth\n");
            continue;
        }
        let second: f64 = line
            .split(',')
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0.0);
        let unaffected = n - on_victim;
        let back = unaffected + truth.iter().filter(|t| **t <= second).count();
        with_truth += &format!("{line},{back}\n");
    }
    let csv = with_truth;
    let after: Vec<Value> = dirs
        .iter()
        .map(|d| call(&d.join("api.sock"), "status", json!({}))["result"].clone())
        .collect();
    let phases: HashMap<String, usize> = after.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s["phase"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
        m
    });
    let connects = sum(&after, "connect_attempts") - sum(&before, "connect_attempts");
    let logins = sum(&after, "logins") - sum(&before, "logins");
    let refusals = sum(&after, "subscribe_refusals") - sum(&before, "subscribe_refusals");
    let fetches = sum(&after, "sig_fetches") - sum(&before, "sig_fetches");
    drop(children);
    c.down(); // imlink-auth writes its last stats line as it stops
    let (auth_requests, auth_refused) = auth_stats(&c);

    let limit = n as f64 / cap;
    let target = 2.0 * limit + 10.0;
    let fmt_t =
        |t: Option<f64>| t.map_or("not within the window".to_string(), |t| format!("{t:.0} s"));
    let mut phases: Vec<(String, usize)> = phases.into_iter().collect();
    phases.sort();
    let md = format!(
        "| measure | value | target |\n|---|---|---|\n\
         | devices (real imlinkd processes, MQTT 3.1.1, one config: the 3 nodes in the same order) | {n} (PSS {:.0} MiB in all, {:.2} MiB each; the 3 nodes {:.0} MiB) | as many as this machine holds |\n\
         | start-up of the fleet (50 a second), until the operator saw every device online | {:.0} s | — |\n\
         | the cluster's CONNECT capacity, measured first (32 clients, fresh TLS logins, 10 s) | {cap:.0} CONNACK 0/s ({cap_failed} failed) | — |\n\
         | node killed (-9) | n{} — {on_victim} devices on it; JetStream leader of: {} | — |\n\
         | 99 % back online, as the operator sees it (status documents) | {} | ≤ 2 × N ÷ capacity + 10 s = {target:.0} s — {} |\n\
         | all back online, as the operator sees it | {} | — |\n\
         | 99 % / all back online, as the daemons know it (their logs: phase online again) | {} / {} | — |\n\
         | N ÷ capacity | {limit:.1} s | — |\n\
         | peak connections accepted by the surviving nodes in one second | {peak} | ≤ capacity ({cap:.0}) — {} |\n\
         | CONNECTs after the kill (the daemons' counters) / logins (CONNACK 0) / needed | {connects} / {logins} / {on_victim} | — |\n\
         | wasted: CONNECTs without a login / logins that did not last | {} / {} | — |\n\
         | connections accepted by the surviving nodes in the window | {attempts_sum} | — |\n\
         | inbox SUBSCRIBEs refused on the way (SUBACK 0x80) / UserSig fetches | {refusals} / {fetches} | — |\n\
         | imlink-auth over the whole run: requests / refused | {auth_requests} / {auth_refused} | — |\n\
         | phases at the end ({:.0} s after the kill) | {} | all online |\n",
        pss as f64 / 1024.0,
        pss as f64 / 1024.0 / n as f64,
        nodes_pss as f64 / 1024.0,
        startup.as_secs_f64(),
        victim + 1,
        if led.is_empty() {
            "nothing".to_string()
        } else {
            led.join(", ")
        },
        fmt_t(back_99),
        if back_99.is_some_and(|t| t <= target) {
            "met"
        } else {
            "**missed**"
        },
        fmt_t(back_all),
        fmt_t(truth_99),
        fmt_t(truth_all),
        if (peak as f64) <= cap {
            "met"
        } else {
            "**missed**"
        },
        connects.saturating_sub(logins),
        logins.saturating_sub(on_victim as u64),
        observed.as_secs_f64(),
        phases
            .iter()
            .map(|(p, k)| format!("{p} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("storm-cluster.csv"), &csv).unwrap();
    std::fs::write(out.join("storm-cluster.md"), &md).unwrap();
    println!("{md}");
    let _ = std::fs::remove_dir_all(&root);
}
