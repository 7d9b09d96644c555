//! Helpers shared by the sandbox's integration tests: a rumqttc v5 client configured as the
//! daemon configures it (rustls + ring), a raw-bytes MQTT client for checking exact wire
//! contents, and raw HTTP(S) requests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use imlink_sandbox::{Sandbox, SandboxOptions};
use rumqttc::v5::mqttbytes::v5::{ConnAck, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub const WAIT: Duration = Duration::from_secs(15);

pub async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default())
        .await
        .expect("sandbox starts")
}

pub fn tls_config(ca_pem: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA cert");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(cfg)
}

pub fn client_id(sb: &Sandbox, user: &str, instance: &str) -> String {
    format!("{}:{}:linux:{}", sb.sdk_app_id(), user, instance)
}

/// MQTT v5 options as imlinkd uses them: TLS with the sandbox CA, persistent session.
pub fn options(sb: &Sandbox, user: &str, instance: &str, sig: &str) -> MqttOptions {
    let addr = sb.endpoints().mqtt_addr;
    let mut o = MqttOptions::new(
        client_id(sb, user, instance),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config(&sb.endpoints().ca_pem, None),
    )));
    o.set_credentials(user, sig);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(300));
    o.set_outgoing_inflight_upper_limit(16);
    o
}

/// Poll until the CONNACK (or the error that replaces it).
pub async fn connect(o: MqttOptions) -> (AsyncClient, EventLoop, Result<ConnAck, ConnectionError>) {
    let (client, mut el) = AsyncClient::new(o, 16);
    let r = loop {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("poll timed out")
        {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => break Ok(ack),
            Ok(_) => continue,
            Err(e) => break Err(e),
        }
    };
    (client, el, r)
}

/// Poll until the connection ends; returns the error that ended it. Incoming publishes seen
/// on the way are returned too.
pub async fn run_until_error(
    el: &mut EventLoop,
) -> (ConnectionError, Vec<rumqttc::v5::mqttbytes::v5::Publish>) {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("poll timed out")
        {
            Ok(Event::Incoming(Packet::Publish(p))) => seen.push(p),
            Ok(_) => {}
            Err(e) => return (e, seen),
        }
    }
}

/// Poll until `n` publishes arrived.
pub async fn receive(el: &mut EventLoop, n: usize) -> Vec<rumqttc::v5::mqttbytes::v5::Publish> {
    let mut seen = Vec::new();
    while seen.len() < n {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("poll timed out")
        {
            Ok(Event::Incoming(Packet::Publish(p))) => seen.push(p),
            Ok(_) => {}
            Err(e) => panic!("connection ended while waiting for messages: {e}"),
        }
    }
    seen
}

/// Poll until the SUBACK.
pub async fn until_suback(el: &mut EventLoop) -> rumqttc::v5::mqttbytes::v5::SubAck {
    loop {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("poll timed out")
        {
            Ok(Event::Incoming(Packet::SubAck(s))) => return s,
            Ok(_) => {}
            Err(e) => panic!("connection ended while waiting for SUBACK: {e}"),
        }
    }
}

// --- raw MQTT over TLS ----------------------------------------------------------------------

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn tls_connect(sb: &Sandbox, addr: std::net::SocketAddr) -> Tls {
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    TlsConnector::from(tls_config(&sb.endpoints().ca_pem, None))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("tls handshake")
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A v5 CONNECT, built by hand.
pub fn connect_packet(
    client_id: &str,
    user: &str,
    password: &str,
    keep_alive: u16,
    level: u8,
) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(level);
    body.push(0x80 | 0x40 | 0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    put_str(&mut body, client_id.as_bytes());
    put_str(&mut body, user.as_bytes());
    put_str(&mut body, password.as_bytes());
    frame(0x10, &body)
}

/// A v5 CONNECT with a last will (`will_props`: the will's raw property bytes), built by hand.
pub fn connect_packet_with_will(
    client_id: &str,
    user: &str,
    password: &str,
    keep_alive: u16,
    will: (&str, &[u8], u8, bool),
    will_props: &[u8],
) -> Vec<u8> {
    let (topic, payload, qos, retain) = will;
    let mut body = Vec::new();
    put_str(&mut body, b"MQTT");
    body.push(5);
    body.push(0x80 | 0x40 | 0x02 | 0x04 | (qos << 3) | if retain { 0x20 } else { 0 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.push(0);
    put_str(&mut body, client_id.as_bytes());
    body.push(will_props.len() as u8); // test properties are short
    body.extend_from_slice(will_props);
    put_str(&mut body, topic.as_bytes());
    put_str(&mut body, payload);
    put_str(&mut body, user.as_bytes());
    put_str(&mut body, password.as_bytes());
    frame(0x10, &body)
}

/// A packet read off the wire: type nibble, flags, body.
#[derive(Debug)]
pub struct RawPacket {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl RawPacket {
    /// For CONNACK/DISCONNECT: the reason code, the reason string and the user properties.
    pub fn reason_and_props(&self) -> (u8, Option<String>, Vec<(String, String)>) {
        let (code, props_at) = match self.kind {
            2 => (self.body[1], 2),
            14 => (self.body.first().copied().unwrap_or(0), 1),
            k => panic!("packet type {k} has no reason code here"),
        };
        let mut reason_string = None;
        let mut user = Vec::new();
        if self.body.len() > props_at {
            let len = self.body[props_at] as usize; // test packets are small
            let mut p = &self.body[props_at + 1..props_at + 1 + len];
            let take_str = |p: &mut &[u8]| {
                let n = u16::from_be_bytes([p[0], p[1]]) as usize;
                let s = String::from_utf8(p[2..2 + n].to_vec()).unwrap();
                *p = &p[2 + n..];
                s
            };
            while !p.is_empty() {
                let id = p[0];
                p = &p[1..];
                match id {
                    0x1F => reason_string = Some(take_str(&mut p)),
                    0x26 => {
                        let k = take_str(&mut p);
                        let v = take_str(&mut p);
                        user.push((k, v));
                    }
                    0x12 | 0x1A | 0x1C => {
                        take_str(&mut p);
                    }
                    0x24 | 0x25 | 0x28 | 0x29 | 0x2A => p = &p[1..],
                    0x13 | 0x21 | 0x22 => p = &p[2..],
                    0x11 | 0x27 => p = &p[4..],
                    other => panic!("unexpected property 0x{other:02X}"),
                }
            }
        }
        (code, reason_string, user)
    }
}

pub async fn read_raw<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<RawPacket> {
    let mut h = [0u8; 1];
    if s.read_exact(&mut h).await.is_err() {
        return None;
    }
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        len |= ((b[0] & 0x7F) as usize) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(RawPacket {
        kind: h[0] >> 4,
        body,
    })
}

/// Connect raw, send a CONNECT, return the stream and the first packet back.
pub async fn raw_login(
    sb: &Sandbox,
    client_id: &str,
    user: &str,
    password: &str,
) -> (Tls, RawPacket) {
    let mut s = tls_connect(sb, sb.endpoints().mqtt_addr).await;
    s.write_all(&connect_packet(client_id, user, password, 30, 5))
        .await
        .unwrap();
    let p = tokio::time::timeout(WAIT, read_raw(&mut s))
        .await
        .expect("CONNACK in time")
        .expect("a packet");
    (s, p)
}

// --- HTTP ------------------------------------------------------------------------------------

pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> HttpReply {
    s.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete HTTP head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head[9..12].parse().expect("status code");
    HttpReply {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

/// GET over HTTPS from the provisioning endpoint, raw (so truncation and chunking show).
pub async fn provision_get(sb: &Sandbox, target: &str, token: Option<&str>) -> HttpReply {
    let addr = sb.endpoints().provisioning_addr;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(tls_config(&sb.endpoints().ca_pem, None))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    exchange(
        tls,
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n").as_bytes(),
    )
    .await
}

/// The admin endpoint's `host:port`.
pub fn admin_host(sb: &Sandbox) -> String {
    sb.endpoints()
        .admin_url
        .trim_start_matches("http://")
        .to_string()
}

/// A request to the admin endpoint (plain HTTP on loopback).
pub async fn admin(sb: &Sandbox, method: &str, target: &str, body: &str) -> HttpReply {
    let tcp = TcpStream::connect(admin_host(sb)).await.unwrap();
    let token = &sb.endpoints().admin_token;
    exchange(
        tcp,
        format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
}
