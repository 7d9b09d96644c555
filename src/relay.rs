//! The connection to the broker, owned by the daemon: TCP + TLS (rustls with ring) dialled
//! here, and rumqttc given a private Unix socket to speak MQTT over instead.
//!
//! Why: rumqttc 0.25 cannot decode a short-form DISCONNECT (`E0 01 8E`, how mosquitto
//! ≥ 2.0.15 sends a takeover), and it drops CONNACK reason strings. Between the TLS stream
//! and rumqttc sits [`relay`], which frames every broker→client packet, records each CONNACK
//! and DISCONNECT exactly as the broker sent it ([`Observed`], via `crate::wire`), and passes
//! rumqttc the long form. The client→broker direction is copied as is. See ARCHITECTURE.md,
//! "Why a relay".
//!
//! The Unix socket lives in the state directory (0700, the daemon's alone), has a name no
//! other connection uses, accepts one peer — this process, checked by `SO_PEERCRED` — and is
//! unlinked as soon as rumqttc is connected.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};
use tokio_rustls::client::TlsStream;

use crate::session::{ConnEnd, NetKind, Proto};
use crate::wire;

/// What the broker said on one connection, as it said it.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub connack: Option<wire::ConnAck>,
    pub disconnect: Option<wire::Disconnect>,
    /// Why the relay itself ended the connection (the broker's side failed or sent bytes
    /// that are not MQTT), when it did.
    pub broken: Option<ConnEnd>,
    /// PUBLISHes over the size limit, in arrival order: (packet id, bytes). Those with a
    /// packet id reached rumqttc as an empty stub to acknowledge in order.
    pub oversized: std::collections::VecDeque<(Option<u16>, usize)>,
}

pub type Shared = Arc<Mutex<Observed>>;

fn lock(o: &Shared) -> std::sync::MutexGuard<'_, Observed> {
    o.lock().unwrap_or_else(|e| e.into_inner())
}

impl Observed {
    /// What ended the connection, if the broker said so: a DISCONNECT, or a CONNACK refusal,
    /// with the reason string as the broker sent it and its `im-error-code`, typed.
    pub fn end(&self) -> Option<ConnEnd> {
        let redirect = |code: u8, p: &wire::Props| match (&p.server_reference, code) {
            (Some(r), 0x9C | 0x9D) => Some(ConnEnd::Redirect {
                code,
                reference: r.clone(),
                reason: p.reason_string.clone(),
                im_code: p.im_error_code,
            }),
            _ => None,
        };
        if let Some(d) = &self.disconnect {
            return Some(
                redirect(d.code, &d.props).unwrap_or(ConnEnd::ServerDisconnect {
                    code: d.code,
                    reason: d.props.reason_string.clone(),
                    im_code: d.props.im_error_code,
                }),
            );
        }
        if let Some(a) = self.connack.as_ref().filter(|a| a.code >= 0x80) {
            return Some(redirect(a.code, &a.props).unwrap_or(ConnEnd::Refused {
                code: a.code,
                reason: a.props.reason_string.clone(),
                im_code: a.props.im_error_code,
            }));
        }
        self.broken.clone()
    }
}

/// TCP + TLS to the broker. Failures come out already classified.
pub async fn dial(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    within: Duration,
) -> Result<TlsStream<TcpStream>, ConnEnd> {
    let name =
        rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|_| ConnEnd::Network {
            kind: NetKind::Other,
            detail: format!("{host:?} is not a valid TLS server name"),
        })?;
    let connect = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| crate::mqtt::io_end(&e))?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| match crate::mqtt::io_end(&e) {
                ConnEnd::Network { kind, detail } if kind != NetKind::Closed => ConnEnd::Network {
                    kind: NetKind::Tls,
                    detail: format!("TLS: {detail}"),
                },
                other => other,
            })
    };
    match tokio::time::timeout(within, connect).await {
        Ok(r) => r,
        Err(_) => Err(ConnEnd::Network {
            kind: NetKind::Timeout,
            detail: format!("TCP and TLS to the broker did not complete within {within:?}"),
        }),
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A private Unix socket for rumqttc, in `dir` (which must be the daemon's alone).
pub fn listen(dir: &Path) -> std::io::Result<(UnixListener, PathBuf)> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!(".mqtt-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    Ok((listener, path))
}

/// Accept rumqttc (this process, nobody else), unlink the socket, and pump bytes both ways
/// until either side ends. What the broker says is recorded in `observed`.
pub async fn relay(
    listener: UnixListener,
    path: PathBuf,
    tls: TlsStream<TcpStream>,
    observed: Shared,
    max_packet: usize,
    proto: Proto,
) {
    let unix = loop {
        match listener.accept().await {
            Ok((s, _)) => {
                let mine = s
                    .peer_cred()
                    .ok()
                    .and_then(|c| c.pid())
                    .is_some_and(|pid| pid as u32 == std::process::id());
                if mine {
                    break s;
                }
                tracing::warn!(
                    "refused a connection to the MQTT relay socket from another process"
                );
            }
            Err(e) => {
                lock(&observed).broken = Some(ConnEnd::Network {
                    kind: NetKind::Other,
                    detail: format!("the MQTT relay socket failed: {e}"),
                });
                let _ = std::fs::remove_file(&path);
                return;
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    drop(listener);
    let (broker_rd, broker_wr) = tokio::io::split(tls);
    let (client_rd, client_wr) = unix.into_split();
    let up = pump_up(client_rd, broker_wr);
    let down = pump_down(broker_rd, client_wr, observed, max_packet, proto);
    // Either direction may end first; the other is finished by the half-close it causes.
    tokio::join!(up, down);
}

/// rumqttc → broker: bytes as they are; rumqttc closing its side closes the TLS session.
async fn pump_up(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::io::WriteHalf<TlsStream<TcpStream>>,
) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

/// broker → rumqttc: packet by packet ([`wire::Downstream`]): CONNACK and DISCONNECT
/// recorded and normalized, an oversized PUBLISH passed on as an empty stub (recorded in
/// `oversized`, so the connection's task can tell the engine) instead of ending the
/// connection — one large message from any peer must not keep a device offline.
async fn pump_down(
    mut from: tokio::io::ReadHalf<TlsStream<TcpStream>>,
    mut to: tokio::net::unix::OwnedWriteHalf,
    observed: Shared,
    max_packet: usize,
    proto: Proto,
) {
    let mut framer = wire::Downstream::new(max_packet, proto == Proto::V5);
    let mut chunk = vec![0u8; 8192];
    let mut notes = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let mut o = lock(&observed);
                if o.disconnect.is_none() {
                    o.broken = Some(crate::mqtt::io_end(&e));
                }
                break;
            }
        };
        out.clear();
        notes.clear();
        let framed = framer.feed(&chunk[..n], &mut out, &mut notes);
        {
            let mut o = lock(&observed);
            for note in notes.drain(..) {
                match note {
                    wire::Note::ConnAck { mut ack, short } => {
                        // A 3.1.1 return code is recorded as the MQTT 5 code that means the
                        // same; a 3.1.1 broker answers an MQTT 5 CONNECT with its own refusal
                        // (`20 02 00 01`: unacceptable protocol version).
                        if proto == Proto::V311 || (short && (1..=5).contains(&ack.code)) {
                            ack.code = crate::mqtt::v311_code(ack.code);
                        }
                        o.connack = Some(ack);
                    }
                    wire::Note::Disconnect(d) if proto == Proto::V5 => o.disconnect = Some(d),
                    wire::Note::Disconnect(_) => {}
                    wire::Note::Oversized { pkid, bytes } => {
                        tracing::debug!(
                            bytes,
                            qos1 = pkid.is_some(),
                            "an oversized PUBLISH skipped"
                        );
                        if o.oversized.len() < MAX_OVERSIZED_NOTES {
                            o.oversized.push_back((pkid, bytes));
                        }
                    }
                    wire::Note::Undecodable(e) => {
                        // rumqttc will refuse it too; say what it was.
                        tracing::debug!("an undecodable CONNACK/DISCONNECT from the broker: {e}");
                    }
                }
            }
        }
        // What came before a bad packet goes on first (a CONNACK in the same read included).
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            break;
        }
        if let Err(e) = framed {
            lock(&observed).broken = Some(ConnEnd::Network {
                kind: NetKind::Other,
                detail: format!("the broker sent bytes that are not MQTT ({e})"),
            });
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Oversized PUBLISHes remembered until the connection's task reports them.
const MAX_OVERSIZED_NOTES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn props(reason: Option<&str>, im: Option<u32>) -> wire::Props {
        wire::Props {
            reason_string: reason.map(str::to_string),
            im_error_code: im,
            ..wire::Props::default()
        }
    }

    #[test]
    fn the_im_code_travels_typed_beside_the_reason_string_as_the_broker_sent_it() {
        let o = Observed {
            connack: Some(wire::ConnAck {
                session_present: false,
                code: 0x87,
                props: props(Some("UserSig expired"), Some(70001)),
            }),
            ..Observed::default()
        };
        assert_eq!(
            o.end(),
            Some(ConnEnd::Refused {
                code: 0x87,
                reason: Some("UserSig expired".into()),
                im_code: Some(70001),
            })
        );
        let o = Observed {
            disconnect: Some(wire::Disconnect {
                code: 0x9C,
                props: wire::Props {
                    server_reference: Some("other:8883".into()),
                    ..props(None, Some(70050))
                },
            }),
            ..Observed::default()
        };
        assert_eq!(
            o.end(),
            Some(ConnEnd::Redirect {
                code: 0x9C,
                reference: "other:8883".into(),
                reason: None,
                im_code: Some(70050),
            })
        );
        let o = Observed {
            disconnect: Some(wire::Disconnect {
                code: 0xA0,
                props: props(None, None),
            }),
            ..Observed::default()
        };
        assert_eq!(
            o.end(),
            Some(ConnEnd::ServerDisconnect {
                code: 0xA0,
                reason: None,
                im_code: None,
            })
        );
    }
}
