//! Authorization requests over imlink-auth's 64 KiB payload cap, on a real nats-server
//! 2.15.1 node: MQTT CONNECTs with a 65,000-byte password (the request JWT carries it, base64:
//! about 87 KB). Each is skipped unread and dropped — and, like a decided request, counted
//! in the stats line and logged under the decision log's rate limit, so a storm of them is
//! summarised instead of flooding the journal.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STORM: usize = 150;

/// An MQTT 3.1.1 CONNECT (clean session, user name and password).
fn connect_packet(client_id: &str, user: &str, password: &[u8]) -> Vec<u8> {
    let s = |b: &[u8]| {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let mut body = s(b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]);
    body.extend(s(client_id.as_bytes()));
    body.extend(s(user.as_bytes()));
    body.extend(s(password));
    let mut p = vec![0x10];
    let mut n = body.len();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        p.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

/// Send one CONNECT over TLS: the CONNACK's return code, or `None` when the node closed
/// the connection without one.
async fn connack_of(
    addr: (String, u16),
    tls: std::sync::Arc<rustls::ClientConfig>,
    packet: Vec<u8>,
) -> Option<u8> {
    let tcp = tokio::net::TcpStream::connect((addr.0.as_str(), addr.1))
        .await
        .ok()?;
    let name = ServerName::try_from(addr.0.clone()).ok()?;
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .ok()?;
    s.write_all(&packet).await.ok()?;
    let mut ack = [0u8; 4];
    match tokio::time::timeout(WAIT, s.read_exact(&mut ack)).await {
        Ok(Ok(_)) if ack[0] == 0x20 => Some(ack[3]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_counted_and_their_lines_rate_limited() {
    let mut c = ImCluster::up(
        &bin_dir(),
        "oversized",
        &UpOptions {
            nodes: 1,
            auth: 1,
            ..Default::default()
        },
    );
    // One line a second at most, summaries and stats every second.
    c.stop(Piece::Auth, 0, false);
    let conf = c.e.auth_configs[0].clone();
    let text = std::fs::read_to_string(&conf).unwrap();
    let text = text.trim_end();
    assert!(
        text.ends_with("\n[log]\nlevel = \"info\"\nstats_interval = \"10s\""),
        "{text}"
    );
    let text = text.replace("stats_interval = \"10s\"", "stats_interval = \"1s\"")
        + "\ndecisions_per_second = 1\ndecisions_burst = 1\nsummary_interval = \"1s\"\n";
    std::fs::write(&conf, text).unwrap();
    let from = c.auth_log(0).len();
    c.start(Piece::Auth, 0);
    let log = |c: &ImCluster| c.auth_log(0)[from..].to_string();
    let deadline = Instant::now() + WAIT;
    while !log(&c).contains("connected to NATS node") {
        assert!(
            Instant::now() < deadline,
            "imlink-auth is not back:\n{}",
            log(&c)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let tls = imlink_auth::tls::client_config(&c.e.ca_path).unwrap();
    let password = vec![b'x'; 65_000];
    let tasks: Vec<_> = (0..STORM)
        .map(|i| {
            let packet = connect_packet(
                &c.client_id("alice", "linux", &format!("big{i}")),
                "alice",
                &password,
            );
            tokio::spawn(connack_of(c.mqtt_addr(0), tls.clone(), packet))
        })
        .collect();
    for t in tasks {
        let code = t.await.unwrap();
        assert_ne!(
            code,
            Some(0),
            "a CONNECT with an oversized request was accepted"
        );
    }

    // The stats line counts every one of them as dropped.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        let l = log(&c);
        if let Some(line) = l
            .lines()
            .rev()
            .find(|l| l.contains("stats:") && l.contains(&format!("dropped={STORM}")))
        {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no stats line with dropped={STORM}:\n{}",
            l.lines()
                .filter(|l| l.contains("stats:"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(stats.contains("accepted=0 refused=0"), "{stats}");
    // Lines one by one only within the rate limit (1 a second: a handful while they came),
    // the rest summarised.
    let l = log(&c);
    let lines = l
        .lines()
        .filter(|l| l.contains("an authorization request over the size cap was dropped"))
        .count();
    assert!(
        (1..=STORM / 3).contains(&lines),
        "{lines} lines for {STORM} oversized requests"
    );
    assert!(
        l.lines()
            .any(|l| l.contains("not logged one by one (rate limit): dropped=")),
        "no summary:\n{l}"
    );
    c.down();
}
