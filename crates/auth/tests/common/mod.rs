//! imlink-auth's integration tests: the shared cluster harness (`tests/common/im_cluster.rs`
//! of the repository, the same the daemon's tests use) and a raw MQTT 3.1.1 client over TLS
//! (rumqttc) that reports exactly what the broker answered.
#![allow(dead_code)]

#[path = "../../../../tests/common/im_cluster.rs"]
pub mod im_cluster;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Packet, Publish,
    QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

#[allow(unused_imports)]
pub use im_cluster::{ImCluster, Piece, UpOptions, unix_now};

/// Where the test build put imlink-auth (and, in a workspace build, imlink-sandbox).
pub fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_imlink-auth"))
        .parent()
        .expect("a directory")
        .to_path_buf()
}

pub const WAIT: Duration = Duration::from_secs(20);

/// How a connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connack {
    /// CONNACK with this return code (0 accepted, 1 protocol, 5 not authorized, …).
    Code(u8),
    /// No CONNACK: the connection failed or closed first.
    Failed(String),
}

/// One MQTT 3.1.1 client: the event loop runs in a task that forwards every incoming packet
/// and stops at the first error (no automatic reconnect: a test sees each connection).
pub struct Mqtt {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    task: tokio::task::JoinHandle<()>,
    /// When the connection ended (error or close), once seen.
    pub ended: Option<(Instant, String)>,
}

pub struct Login<'a> {
    pub url_addr: (String, u16),
    pub ca: &'a Path,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub clean: bool,
    pub will: Option<(String, Vec<u8>)>,
}

fn code(c: ConnectReturnCode) -> u8 {
    match c {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

impl Mqtt {
    /// Connect and wait for the CONNACK: `Ok` on 0, else what happened.
    pub async fn connect(l: Login<'_>) -> Result<Mqtt, Connack> {
        let mut o = MqttOptions::new(l.client_id, l.url_addr.0, l.url_addr.1);
        o.set_credentials(l.username, l.password);
        o.set_clean_session(l.clean);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            imlink_auth::tls::client_config(l.ca).expect("the cluster's CA"),
        )));
        if let Some((topic, payload)) = l.will {
            o.set_last_will(LastWill::new(topic, payload, QoS::AtLeastOnce, true));
        }
        let (client, mut el) = AsyncClient::new(o, 64);
        let first = tokio::time::timeout(WAIT, el.poll()).await;
        match first {
            Err(_) => return Err(Connack::Failed("no CONNACK within the wait".into())),
            Ok(Err(ConnectionError::ConnectionRefused(c))) => return Err(Connack::Code(code(c))),
            Ok(Err(e)) => return Err(Connack::Failed(e.to_string())),
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) if a.code == ConnectReturnCode::Success => {
            }
            Ok(Ok(other)) => return Err(Connack::Failed(format!("{other:?}"))),
        }
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                }
            }
        });
        Ok(Mqtt {
            client,
            events,
            task,
            ended: None,
        })
    }

    /// The next incoming packet within `within` (`None`: nothing came, or the connection
    /// ended — then `ended` says when).
    pub async fn next(&mut self, within: Duration) -> Option<Packet> {
        if self.ended.is_some() {
            return None;
        }
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(Ok(p))) => Some(p),
            Ok(Some(Err(e))) => {
                self.ended = Some((Instant::now(), e));
                None
            }
            Ok(None) => {
                self.ended = Some((Instant::now(), "event loop gone".into()));
                None
            }
            Err(_) => None,
        }
    }

    /// Wait for a packet matching `pred`, skipping others (PINGRESPs…).
    pub async fn wait_for(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Packet) -> bool,
    ) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.next(left).await {
                Some(p) if pred(&p) => return Some(p),
                Some(_) => {}
                None => return None,
            }
        }
    }

    /// Subscribe at QoS 1 and return the SUBACK's code (0x01 granted, 0x80 refused).
    pub async fn subscribe(&mut self, topic: &str) -> u8 {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("subscribe queued");
        match self
            .wait_for(WAIT, |p| matches!(p, Packet::SubAck(_)))
            .await
        {
            Some(Packet::SubAck(s)) => match s.return_codes.first() {
                Some(SubscribeReasonCode::Success(q)) => *q as u8,
                Some(SubscribeReasonCode::Failure) => 0x80,
                None => panic!("an empty SUBACK"),
            },
            other => panic!("no SUBACK for {topic}: {other:?} {:?}", self.ended),
        }
    }

    /// Publish at QoS 1 and wait for its PUBACK (3.1.1 PUBACKs carry no code: "PUBACK 0").
    pub async fn publish(&mut self, topic: &str, payload: &[u8], retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
            .await
            .expect("publish queued");
        let got = self
            .wait_for(WAIT, |p| matches!(p, Packet::PubAck(_)))
            .await;
        assert!(got.is_some(), "no PUBACK for {topic}: {:?}", self.ended);
    }

    /// The next PUBLISH within `within`.
    pub async fn message(&mut self, within: Duration) -> Option<Publish> {
        match self
            .wait_for(within, |p| matches!(p, Packet::Publish(_)))
            .await
        {
            Some(Packet::Publish(p)) => Some(p),
            _ => None,
        }
    }

    /// Wait until the server ends the connection; returns when.
    pub async fn closed_by_server(&mut self, within: Duration) -> Option<Instant> {
        let deadline = tokio::time::Instant::now() + within;
        while self.ended.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self.next(left).await;
        }
        self.ended.as_ref().map(|(t, _)| *t)
    }

    /// DISCONNECT and stop.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.task).await;
    }

    /// Drop the TCP connection without DISCONNECT (the will is published).
    pub fn abort(self) {
        self.task.abort();
    }
}

/// A login to node `node` of `c` as `user` with `password` and the client id
/// `{app}:{user}:linux:{instance}`.
pub fn login<'a>(
    c: &'a ImCluster,
    node: usize,
    user: &str,
    password: &str,
    instance: &str,
) -> Login<'a> {
    Login {
        url_addr: c.mqtt_addr(node),
        ca: &c.e.ca_path,
        client_id: c.client_id(user, "linux", instance),
        username: user.to_string(),
        password: password.to_string(),
        clean: true,
        will: None,
    }
}

/// Connect and return the CONNACK code (0 or the refusal), closing the session at once.
pub async fn connack(l: Login<'_>) -> Connack {
    match Mqtt::connect(l).await {
        Ok(m) => {
            m.disconnect().await;
            Connack::Code(0)
        }
        Err(c) => c,
    }
}

/// No UserSig, app key, operator secret or NATS password in any imlink-auth log.
pub fn assert_no_secrets_in_auth_logs(c: &ImCluster, sigs: &[String]) {
    let logs = c.auth_logs();
    assert!(!logs.is_empty());
    let mut secrets: Vec<String> = sigs.to_vec();
    secrets.push(c.app_key());
    secrets.push(c.next_app_key());
    secrets.push(c.operator_password());
    secrets.push(
        std::fs::read_to_string(c.dir().join("auth/nats-password"))
            .unwrap()
            .trim()
            .to_string(),
    );
    secrets.push(
        std::fs::read_to_string(c.dir().join("auth/issuer.nk"))
            .unwrap()
            .trim()
            .to_string(),
    );
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a secret is in an imlink-auth log"
        );
        if s.len() >= 48 {
            let mid = &s[s.len() / 2 - 12..s.len() / 2 + 12];
            assert!(
                !logs.contains(mid),
                "a fragment of a secret is in an imlink-auth log"
            );
        }
    }
}
