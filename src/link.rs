//! One MQTT connection, in either protocol: its task dials TCP + TLS, starts the relay
//! (`crate::relay`), and runs the rumqttc event loop (MQTT 5 `rumqttc::v5`, or MQTT 3.1.1
//! `rumqttc`), reporting what happens as protocol-neutral [`Ev`]s.
//!
//! The event loop is **never cancelled mid-poll**: `EventLoop::poll` is not cancel-safe
//! (dropping it during the connect abandons a connection the broker already accepted, and
//! the next poll silently opens another), so the driver's `select!` only ever waits on the
//! channel the task feeds. The task ends at the first error, so rumqttc can never reconnect
//! on its own; dropping the [`Connection`] aborts it, and the relay with it.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::courier::LinkId;
use crate::engine::{LinkEvent, Will};
use crate::identity::UserId;
use crate::mqtt::MqttSettings;
use crate::session::{ConnEnd, NetKind, Proto, Target};
use crate::usersig::UserSig;

/// The client half, in either protocol.
enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

pub struct Connection {
    client: Client,
    /// What happened on it, in order; the last is always [`LinkEvent::Ended`].
    pub events: mpsc::Receiver<LinkEvent>,
    task: JoinHandle<()>,
    /// The engine's name for this connection.
    pub link: LinkId,
}

/// Aborts a task when dropped (the relay lives exactly as long as its connection's task).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn map_v5(ev: rumqttc::v5::Event) -> Option<LinkEvent> {
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    Some(match ev {
        E::Incoming(P::ConnAck(a)) => LinkEvent::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(P::Publish(p)) if p.retain => LinkEvent::Retained {
            pkid: (p.qos != QoS::AtMostOnce).then_some(p.pkid),
            topic: p.topic.to_vec(),
        },
        E::Incoming(P::Publish(p)) => LinkEvent::Publish {
            pkid: (p.qos != QoS::AtMostOnce).then_some(p.pkid),
            topic: p.topic.to_vec(),
            payload: p.payload.to_vec(),
        },
        E::Incoming(P::PubAck(a)) => LinkEvent::PubAck {
            pkid: a.pkid,
            code: crate::mqtt::puback_code(a.reason),
        },
        E::Incoming(P::SubAck(a)) => LinkEvent::SubAck {
            granted: a.return_codes.iter().all(|c| {
                matches!(
                    c,
                    rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                )
            }),
        },
        E::Outgoing(rumqttc::Outgoing::Publish(pkid)) => LinkEvent::OutPublish(pkid),
        E::Outgoing(rumqttc::Outgoing::Disconnect) => LinkEvent::OutDisconnect,
        _ => return None,
    })
}

fn map_v311(ev: rumqttc::Event) -> Option<LinkEvent> {
    use rumqttc::{Event as E, Packet as P, QoS};
    Some(match ev {
        E::Incoming(P::ConnAck(a)) => LinkEvent::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(P::Publish(p)) if p.retain => LinkEvent::Retained {
            pkid: (p.qos != QoS::AtMostOnce).then_some(p.pkid),
            topic: p.topic.into_bytes(),
        },
        E::Incoming(P::Publish(p)) => LinkEvent::Publish {
            pkid: (p.qos != QoS::AtMostOnce).then_some(p.pkid),
            topic: p.topic.into_bytes(),
            payload: p.payload.to_vec(),
        },
        E::Incoming(P::PubAck(a)) => LinkEvent::PubAck {
            pkid: a.pkid,
            code: 0,
        },
        E::Incoming(P::SubAck(a)) => LinkEvent::SubAck {
            granted: a
                .return_codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
        },
        E::Outgoing(rumqttc::Outgoing::Publish(pkid)) => LinkEvent::OutPublish(pkid),
        E::Outgoing(rumqttc::Outgoing::Disconnect) => LinkEvent::OutDisconnect,
        _ => return None,
    })
}

/// An empty PUBLISH that stands for one the relay found over the size limit becomes
/// [`LinkEvent::Oversized`]; oversized QoS 0 PUBLISHes (never passed on) are reported too.
fn with_oversized(ev: LinkEvent, observed: &crate::relay::Shared) -> Vec<LinkEvent> {
    let mut o = observed.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::new();
    while let Some(&(None, bytes)) = o.oversized.front() {
        o.oversized.pop_front();
        out.push(LinkEvent::Oversized {
            topic: Vec::new(),
            pkid: None,
            bytes,
        });
    }
    match ev {
        LinkEvent::Publish {
            topic,
            pkid: Some(p),
            payload,
        } if payload.is_empty() && o.oversized.front().is_some_and(|x| x.0 == Some(p)) => {
            let bytes = o.oversized.pop_front().map_or(0, |x| x.1);
            out.push(LinkEvent::Oversized {
                topic,
                pkid: Some(p),
                bytes,
            });
        }
        // A retained stub: the oversized entry is its own (the event says enough).
        LinkEvent::Retained {
            topic,
            pkid: Some(p),
        } => {
            if o.oversized.front().is_some_and(|x| x.0 == Some(p)) {
                o.oversized.pop_front();
            }
            out.push(LinkEvent::Retained {
                topic,
                pkid: Some(p),
            });
        }
        ev => out.push(ev),
    }
    out
}

/// One connection to open: what the engine's `Connect` names, with the secret it names.
pub struct Dial<'a> {
    pub link: LinkId,
    pub user: &'a UserId,
    pub sig: &'a UserSig,
    pub target: Target,
    pub proto: Proto,
    pub will: Option<Will>,
}

impl Connection {
    pub fn open(
        mqtt: &MqttSettings,
        relay_dir: &std::path::Path,
        dial: Dial<'_>,
    ) -> Result<Connection, ConnEnd> {
        let Dial {
            link,
            user,
            sig,
            target,
            proto,
            will,
        } = dial;
        let Some((host, port)) = mqtt.endpoint(&target) else {
            return Err(ConnEnd::Network {
                kind: NetKind::Other,
                detail: "the broker's redirect names no usable server".into(),
            });
        };
        let (listener, path) = crate::relay::listen(relay_dir).map_err(|e| ConnEnd::Network {
            kind: NetKind::Other,
            detail: format!(
                "could not create the MQTT relay socket in {}: {e}",
                relay_dir.display()
            ),
        })?;
        let (tx, events) = mpsc::channel::<LinkEvent>(32);
        let (tls, within) = (mqtt.tls.clone(), mqtt.connect_timeout);
        let (client, mut loop_v5, mut loop_v311) = match proto {
            Proto::V5 => {
                let mut o = mqtt.options(user, sig, &path);
                if let Some(w) = will {
                    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        w.topic,
                        w.payload,
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        true,
                        None,
                    ));
                }
                let (c, l) = rumqttc::v5::AsyncClient::new(o, 128);
                (Client::V5(c), Some(l), None)
            }
            Proto::V311 => {
                let mut o = mqtt.options_v311(user, sig, &path);
                if let Some(w) = will {
                    o.set_last_will(rumqttc::LastWill::new(
                        w.topic,
                        w.payload,
                        rumqttc::QoS::AtLeastOnce,
                        true,
                    ));
                }
                let (c, l) = rumqttc::AsyncClient::new(o, 128);
                (Client::V311(c), None, Some(l))
            }
        };
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let stream = match crate::relay::dial(&host, port, tls, within).await {
                Ok(s) => s,
                Err(end) => {
                    let _ = std::fs::remove_file(&path);
                    let _ = tx.send(LinkEvent::Ended(end)).await;
                    return;
                }
            };
            // One connect timeout covers TCP, TLS and the CONNACK together.
            let left = within.saturating_sub(started.elapsed()).as_secs().max(1);
            let observed = crate::relay::Shared::default();
            let _relay = AbortOnDrop(tokio::spawn(crate::relay::relay(
                listener,
                path,
                stream,
                observed.clone(),
                crate::mqtt::MAX_PACKET as usize + 8,
                proto,
            )));
            let said = || {
                observed
                    .lock()
                    .map(|o| o.end())
                    .unwrap_or_else(|p| p.into_inner().end())
            };
            if let Some(el) = loop_v5.as_mut() {
                el.options.set_connection_timeout(left);
                loop {
                    match el.poll().await {
                        Ok(ev) => {
                            for ev in map_v5(ev)
                                .map(|e| with_oversized(e, &observed))
                                .unwrap_or_default()
                            {
                                if tx.send(ev).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let end = said().unwrap_or_else(|| crate::mqtt::classify(&e));
                            tracing::debug!(?end, "connection ended");
                            let _ = tx.send(LinkEvent::Ended(end)).await;
                            return;
                        }
                    }
                }
            }
            if let Some(el) = loop_v311.as_mut() {
                let mut n = el.network_options();
                n.set_connection_timeout(left);
                el.set_network_options(n);
                loop {
                    match el.poll().await {
                        Ok(ev) => {
                            for ev in map_v311(ev)
                                .map(|e| with_oversized(e, &observed))
                                .unwrap_or_default()
                            {
                                if tx.send(ev).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let end = said().unwrap_or_else(|| crate::mqtt::classify_v311(&e));
                            tracing::debug!(?end, "connection ended");
                            let _ = tx.send(LinkEvent::Ended(end)).await;
                            return;
                        }
                    }
                }
            }
        });
        Ok(Connection {
            client,
            events,
            task,
            link,
        })
    }

    /// Queue the inbox subscription (QoS 1).
    pub fn subscribe(&self, filter: String) -> Result<(), String> {
        match &self.client {
            Client::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queue a QoS 1 PUBLISH.
    pub fn publish(&self, topic: String, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        match &self.client {
            Client::V5(c) => c
                .try_publish(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    retain,
                    payload,
                )
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queue the PUBACK of a received QoS 1 message.
    pub fn ack(&self, pkid: u16) -> Result<(), String> {
        match &self.client {
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V311(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
        }
    }

    /// Queue our DISCONNECT.
    pub fn disconnect(&self) -> Result<(), String> {
        match &self.client {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}
