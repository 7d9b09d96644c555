//! Capacity of the IM service on a real cluster (`scripts/im-cluster`: 3 nats-server 2.15.1
//! nodes, 2 imlink-auth, all on this machine): how long a login takes through the auth
//! callout, and how many logins per second the cluster sustains.
//!
//!   cargo bench -p imlink-auth --bench callout       (scripts/bench runs it)
//!
//! Measures, with a minimal MQTT 3.1.1 client over TLS written here (so the client adds as
//! little as possible to what is measured), each login a fresh TCP + TLS connection, CONNECT,
//! CONNACK, DISCONNECT, a distinct user and client id, clean session:
//! - sequential logins: CONNECT → CONNACK (the callout round trip, plus nats-server's MQTT
//!   session work in JetStream) and the whole login (TCP + TLS + CONNECT → CONNACK);
//! - N concurrent clients for a fixed time: CONNACK 0 per second, and CONNECT → CONNACK
//!   under that load;
//! - what imlink-auth itself spent per request (its stats line: decode, verify, sign).
//!
//! Writes target/bench/callout.md (docs/benchmarks and docs/deploy.md quote it). The
//! clients run on the same cores as the cluster: the rate is a floor for a machine of its own.
//! Environment: IMLINK_BENCH_SECONDS (default 20), IMLINK_BENCH_CLIENTS (default 32).

#[path = "../../../tests/common/im_cluster.rs"]
mod im_cluster;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use im_cluster::{ImCluster, Piece, UpOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn mqtt_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An MQTT 3.1.1 CONNECT: clean session, keepalive 30 s, username and password.
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

struct Login {
    connack: Duration,
    whole: Duration,
    code: u8,
}

async fn login(
    tls: &tokio_rustls::TlsConnector,
    port: u16,
    client_id: &str,
    user: &str,
    password: &str,
) -> std::io::Result<Login> {
    let t0 = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let name =
        rustls_pki_types::ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let mut s = tls.connect(name, tcp).await?;
    let pkt = connect_packet(client_id, user, password);
    let t1 = Instant::now();
    s.write_all(&pkt).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    let t2 = Instant::now();
    if ack[0] != 0x20 {
        return Err(std::io::Error::other("not a CONNACK"));
    }
    if ack[3] == 0 {
        let _ = s.write_all(&[0xE0, 0]).await;
    }
    let _ = s.shutdown().await;
    Ok(Login {
        connack: t2 - t1,
        whole: t2 - t0,
        code: ack[3],
    })
}

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = env_u64("IMLINK_BENCH_SECONDS", 20);
    let clients = env_u64("IMLINK_BENCH_CLIENTS", 32) as usize;
    let bin = Path::new(env!("CARGO_BIN_EXE_imlink-auth"))
        .parent()
        .expect("a directory")
        .to_path_buf();
    let c = ImCluster::up(&bin, "bench", &UpOptions::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let tls = tokio_rustls::TlsConnector::from(
        imlink_auth::tls::client_config(&c.e.ca_path).expect("the cluster's CA"),
    );
    let ports: Vec<u16> = (0..c.e.mqtt_urls.len()).map(|i| c.mqtt_addr(i).1).collect();
    let app = c.e.sdk_app_id;
    let key = c.app_key();
    let sig = |user: &str| c.sig_with(&key, app, user, im_cluster::unix_now(), 3600);

    // Sequential logins (after a warm-up).
    let (mut connack, mut whole, refused) = rt.block_on(async {
        let (mut a, mut b, mut refused) = (Vec::new(), Vec::new(), 0);
        for i in 0..330 {
            let user = format!("seq-{i}");
            let l = login(
                &tls,
                ports[i % ports.len()],
                &format!("{app}:{user}:bench:0"),
                &user,
                &sig(&user),
            )
            .await
            .expect("a login");
            if l.code != 0 {
                refused += 1;
            }
            if i >= 30 {
                a.push(l.connack);
                b.push(l.whole);
            }
        }
        (a, b, refused)
    });
    assert_eq!(refused, 0, "sequential logins refused");
    // Refused logins (a UserSig signed with another key): the callout round trip without the
    // MQTT session work a CONNACK 0 costs.
    let mut refused_lat = rt.block_on(async {
        let mut v = Vec::new();
        for i in 0..200 {
            let user = format!("bad-{i}");
            let bad = c.sig_with("not-the-app-key", app, &user, im_cluster::unix_now(), 3600);
            let l = login(
                &tls,
                ports[i % ports.len()],
                &format!("{app}:{user}:bench:0"),
                &user,
                &bad,
            )
            .await
            .expect("a refusal");
            assert_eq!(l.code, 5, "a wrong key is refused");
            v.push(l.connack);
        }
        v
    });
    let refused_q = (
        quantile(&mut refused_lat, 0.5),
        quantile(&mut refused_lat, 0.99),
    );
    let seq = (
        quantile(&mut connack, 0.5),
        quantile(&mut connack, 0.99),
        quantile(&mut whole, 0.5),
        quantile(&mut whole, 0.99),
    );
    eprintln!(
        "sequential: CONNECT→CONNACK p50 {} p99 {}",
        ms(seq.0),
        ms(seq.1)
    );

    // Concurrent logins for `seconds`.
    let sigs: Arc<Vec<(String, String)>> = Arc::new(
        (0..clients * 4)
            .map(|i| {
                let user = format!("load-{i}");
                let s = sig(&user);
                (user, s)
            })
            .collect(),
    );
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut under_load: Vec<Duration> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..clients {
            let (tls, ports, sigs) = (tls.clone(), ports.clone(), sigs.clone());
            let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let (user, s) = &sigs[(w * 4 + n % 4) % sigs.len()];
                    let cid = format!("{app}:{user}:bench:{w}");
                    match login(&tls, ports[(w + n) % ports.len()], &cid, user, s).await {
                        Ok(l) if l.code == 0 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            lat.push(l.connack);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    let rate = ok as f64 / elapsed;
    let load = (
        quantile(&mut under_load, 0.5),
        quantile(&mut under_load, 0.99),
    );
    eprintln!("{clients} concurrent clients: {rate:.0} logins/s, {failed} failed");

    // What imlink-auth spent per request: its stats line, written when it stops.
    let mut auth_lines = Vec::new();
    for i in 0..c.e.auth_pids.len() {
        c.stop(Piece::Auth, i, false);
        let log = c.auth_log(i);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("stats: requests="))
            .unwrap_or("")
            .to_string();
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or("?")
                .to_string()
        };
        auth_lines.push((
            i + 1,
            field("requests"),
            field("decide_p50_us"),
            field("decide_p99_us"),
            field("decide_max_us"),
        ));
    }

    let mut md = String::new();
    md.push_str(&format!(
        "Run of {}: `cargo bench -p imlink-auth --bench callout` (3 nats-server {} nodes, 2 imlink-auth, \
         MQTT 3.1.1 over TLS, all on this {}-core machine with the clients; each login a fresh TCP + TLS \
         connection, a distinct user, clean session).\n\n",
        today(),
        "2.15.1",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    md.push_str("| measure | p50 | p99 |\n|---|---|---|\n");
    md.push_str(&format!(
        "| CONNECT → CONNACK 0, one login at a time (300) | {} | {} |\n",
        ms(seq.0),
        ms(seq.1)
    ));
    md.push_str(&format!(
        "| CONNECT → CONNACK 5 (refused: the callout round trip without session work), one at a time (200) | {} | {} |\n",
        ms(refused_q.0),
        ms(refused_q.1)
    ));
    md.push_str(&format!(
        "| whole login (TCP + TLS + CONNECT → CONNACK), one at a time | {} | {} |\n",
        ms(seq.2),
        ms(seq.3)
    ));
    md.push_str(&format!(
        "| CONNECT → CONNACK 0 with {clients} clients logging in continuously | {} | {} |\n",
        ms(load.0),
        ms(load.1)
    ));
    for (i, req, p50, p99, max) in &auth_lines {
        md.push_str(&format!(
            "| imlink-auth {i}: time spent per request (decode, verify, sign; {req} requests, max {max} µs) | {p50} µs | {p99} µs |\n"
        ));
    }
    md.push_str(&format!(
        "\n**{rate:.0} logins per second** sustained by the cluster and the 2 imlink-auth instances \
         ({clients} concurrent clients for {seconds} s: {ok} CONNACK 0, {failed} failures).\n"
    ));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("callout.md"), &md);
    print!("{md}");
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
