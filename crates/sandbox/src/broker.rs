//! The MQTT v5 over TLS listener and one task per connection.
//!
//! A connection task owns its socket: it reads and decodes packets, writes everything the
//! client receives, and ends on a client DISCONNECT, a lost socket, a keepalive timeout, the
//! UserSig's expiry (DISCONNECT 0xA0) or a [`Kill`] from the shared state (takeover, admin
//! kick, dropped listener).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;

use crate::acl::{self, Identity};
use crate::codec::{self, Incoming, Props, SubOptions, reason};
use crate::state::{Admission, Ending, Kill, LoginFault, Shared, Sub, im_error_for, unix_now};

// The topic rules moved to `acl`; kept here for callers that know them by these paths.
pub use crate::acl::{MAX_C2C_BYTES, check_c2c, publish_allowed};

/// Time a client has to finish the TLS handshake and send CONNECT.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a write may take before the client is considered gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands for the accept loop.
pub enum ListenerCmd {
    Stop(oneshot::Sender<()>),
    Start(oneshot::Sender<std::io::Result<()>>),
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Bind the MQTT listener now (so the port is known), then serve it until the command
/// channel closes. `Stop` drops the listener and every connection; `Start` binds again.
pub fn start(
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    mut cmds: tokio::sync::mpsc::Receiver<ListenerCmd>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let first = bind(addr)?;
    let bound = first.local_addr()?;
    let task = tokio::spawn(async move {
        let mut listener = Some(first);
        loop {
            let cmd = match &listener {
                Some(l) => tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((tcp, peer)) = accepted {
                            let _ = tcp.set_nodelay(true);
                            tokio::spawn(serve(shared.clone(), tcp, peer, acceptor.clone()));
                        }
                        continue;
                    }
                    cmd = cmds.recv() => cmd,
                },
                None => cmds.recv().await,
            };
            match cmd {
                None => return,
                Some(ListenerCmd::Stop(done)) => {
                    listener = None;
                    shared.kill_all(Kill::Drop);
                    let _ = done.send(());
                }
                Some(ListenerCmd::Start(done)) => {
                    if listener.is_none() {
                        match bind(bound) {
                            Ok(l) => {
                                listener = Some(l);
                                let _ = done.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = done.send(Err(e));
                            }
                        }
                    } else {
                        let _ = done.send(Ok(()));
                    }
                }
            }
        }
    });
    Ok((bound, task))
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, acceptor: TlsAcceptor) {
    let tls = match timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "MQTT TLS handshake failed");
            shared.update(|st| st.counters.tls_handshake_failures += 1);
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "MQTT TLS handshake timed out");
            shared.update(|st| st.counters.tls_handshake_failures += 1);
            return;
        }
    };
    let has_client_cert = tls.get_ref().1.peer_certificates().is_some();
    let mut conn = Conn {
        stream: tls,
        buf: Vec::with_capacity(1024),
        max_packet: shared.settings.max_packet_size,
        shared: shared.clone(),
    };
    let connect = match timeout(HANDSHAKE_TIMEOUT, conn.read_packet()).await {
        Ok(Ok(Some(Incoming::Connect(c)))) => c,
        Ok(Err(e)) if e.what == codec::UNSUPPORTED_VERSION => {
            let _ = conn.write(&codec::connack_v3_unsupported_version()).await;
            shared.update(|st| st.counters.protocol_errors += 1);
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "bad CONNECT");
            let _ = conn
                .write(&codec::connack(false, e.reason, &Props::default()))
                .await;
            shared.update(|st| st.counters.protocol_errors += 1);
            return;
        }
        Ok(Ok(Some(_))) => {
            shared.update(|st| st.counters.protocol_errors += 1);
            return;
        }
        Ok(Ok(None)) | Err(_) => return,
    };

    match shared.admit(&connect, has_client_cert, unix_now()) {
        Admission::Refused { code, props } => {
            tracing::info!(%peer, user = ?connect.username, code = format!("0x{code:02X}"), "login refused");
            let _ = conn.write(&codec::connack(false, code, &props)).await;
            let _ = conn.stream.shutdown().await;
        }
        Admission::Accepted {
            conn_id,
            session_present,
            assigned_client_id,
            sig_expires_at,
            flush,
            kill,
            after_login,
            identity,
        } => {
            let client_id = assigned_client_id
                .clone()
                .unwrap_or_else(|| connect.client_id.clone());
            let user = connect.username.clone().unwrap_or_default();
            tracing::info!(%peer, %user, %client_id, session_present, "login accepted");
            let props = Props {
                receive_maximum: Some(64),
                maximum_qos: Some(1),
                retain_available: Some(shared.settings.retain_available),
                maximum_packet_size: Some(shared.settings.max_packet_size as u32),
                assigned_client_id,
                wildcard_available: Some(true),
                subscription_ids_available: Some(false),
                shared_available: Some(false),
                ..Props::default()
            };
            let mut session_expiry = connect.session_expiry;
            let delay = shared.lock().connack_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let ending = if conn
                .write(&codec::connack(session_present, reason::SUCCESS, &props))
                .await
                .is_err()
            {
                Ending::Lost
            } else {
                let run = Run {
                    shared: &shared,
                    client_id: &client_id,
                    user: &user,
                    conn_id,
                    keep_alive: connect.keep_alive,
                    sig_expires_at,
                    flush,
                    kill,
                    after_login,
                    identity,
                };
                run.run(&mut conn, &mut session_expiry).await
            };
            if let Ending::Server(code) = ending {
                tracing::info!(%user, %client_id, code = format!("0x{code:02X}"), "session ended by the server");
            }
            let _ = timeout(Duration::from_secs(2), conn.stream.shutdown()).await;
            shared.conn_ended(&client_id, conn_id, &user, ending, session_expiry);
        }
    }
}

struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    max_packet: usize,
    shared: Arc<Shared>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Read until one whole packet is buffered. `Ok(None)`: the peer closed the socket.
    async fn read_packet(&mut self) -> Result<Option<Incoming>, codec::CodecError> {
        loop {
            if let Some(p) = self.try_decode()? {
                return Ok(Some(p));
            }
            if !self.fill().await {
                return Ok(None);
            }
        }
    }

    fn try_decode(&mut self) -> Result<Option<Incoming>, codec::CodecError> {
        match codec::decode(&self.buf, self.max_packet)? {
            Some((p, used)) => {
                self.buf.drain(..used);
                Ok(Some(p))
            }
            None => Ok(None),
        }
    }

    /// Read more bytes; false on EOF or error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        timeout(WRITE_TIMEOUT, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
    }

    async fn disconnect(&mut self, code: u8, props: &Props) {
        let bytes = if self.shared.lock().short_disconnect {
            codec::disconnect_short(code)
        } else {
            codec::disconnect(code, props)
        };
        let _ = self.write(&bytes).await;
    }
}

struct Run<'a> {
    shared: &'a Arc<Shared>,
    client_id: &'a str,
    user: &'a str,
    conn_id: u64,
    keep_alive: u16,
    sig_expires_at: u64,
    flush: Arc<tokio::sync::Notify>,
    kill: tokio::sync::mpsc::UnboundedReceiver<Kill>,
    after_login: Option<LoginFault>,
    identity: Identity,
}

/// The instant (on tokio's clock) after which a sig valid through `expires_at` is expired.
fn sig_deadline(expires_at: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let expiry = Duration::from_secs(expires_at.saturating_add(1));
    Instant::now() + expiry.saturating_sub(now)
}

impl Run<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        conn: &mut Conn<S>,
        session_expiry: &mut u32,
    ) -> Ending {
        match self.after_login {
            Some(LoginFault::DisconnectWith { code, reason }) => {
                let props = Props {
                    reason_string: Some(reason),
                    ..Props::default()
                };
                conn.disconnect(code, &props).await;
                return Ending::Server(code);
            }
            Some(LoginFault::Disconnect { code }) => {
                let (im, text) = im_error_for(code);
                conn.disconnect(code, &crate::state::im_props(im, text))
                    .await;
                return Ending::Server(code);
            }
            Some(LoginFault::Close) => return Ending::Lost,
            None => {}
        }
        let keep_alive =
            (self.keep_alive > 0).then(|| Duration::from_millis(self.keep_alive as u64 * 1500));
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        let mut idle_deadline = keep_alive.map_or(far, |k| Instant::now() + k);
        // An operator has no UserSig, so no expiry.
        let sig_deadline = if self.sig_expires_at == 0 {
            far
        } else {
            sig_deadline(self.sig_expires_at)
        };
        loop {
            // Send whatever is queued for this session (within its receive maximum).
            let batch = self
                .shared
                .update(|st| st.take_outgoing(self.client_id, self.conn_id));
            for packet in batch {
                if conn.write(&packet).await.is_err() {
                    return Ending::Lost;
                }
            }
            // Handle every packet already buffered before waiting again.
            loop {
                match conn.try_decode() {
                    Ok(Some(p)) => {
                        idle_deadline = keep_alive.map_or(far, |k| Instant::now() + k);
                        if let Some(end) = self.handle(conn, p, session_expiry).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(user = self.user, error = %e, "protocol error");
                        self.shared.update(|st| st.counters.protocol_errors += 1);
                        conn.disconnect(e.reason, &Props::default()).await;
                        return Ending::Server(e.reason);
                    }
                }
            }
            tokio::select! {
                more = conn.fill() => if !more { return Ending::Lost },
                _ = self.flush.notified() => {}
                k = self.kill.recv() => match k {
                    Some(Kill::Disconnect { code, text }) => {
                        let props = Props {
                            reason_string: Some(text.clone()),
                            user: text.split_once(' ').map(|(c, _)| vec![("im-error-code".to_string(), c.to_string())]).unwrap_or_default(),
                            ..Props::default()
                        };
                        conn.disconnect(code, &props).await;
                        return Ending::Server(code);
                    }
                    Some(Kill::Drop) | None => return Ending::Lost,
                },
                _ = sleep_until(idle_deadline) => {
                    conn.disconnect(reason::KEEP_ALIVE_TIMEOUT, &Props::default()).await;
                    return Ending::Server(reason::KEEP_ALIVE_TIMEOUT);
                }
                _ = sleep_until(sig_deadline) => {
                    let (im, text) = im_error_for(reason::MAXIMUM_CONNECT_TIME);
                    conn.disconnect(reason::MAXIMUM_CONNECT_TIME, &crate::state::im_props(im, text)).await;
                    return Ending::Server(reason::MAXIMUM_CONNECT_TIME);
                }
            }
        }
    }

    /// Handle one packet; `Some(ending)` ends the connection.
    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        p: Incoming,
        session_expiry: &mut u32,
    ) -> Option<Ending> {
        let protocol_error = |what: &str| {
            tracing::debug!(user = self.user, what, "protocol error");
        };
        match p {
            Incoming::PingReq => {
                if conn.write(&codec::pingresp()).await.is_err() {
                    return Some(Ending::Lost);
                }
            }
            Incoming::Publish(publish) => {
                if publish.qos > 1 {
                    conn.disconnect(reason::QOS_NOT_SUPPORTED, &Props::default())
                        .await;
                    return Some(Ending::Server(reason::QOS_NOT_SUPPORTED));
                }
                if publish.retain && !self.shared.settings.retain_available {
                    conn.disconnect(reason::RETAIN_NOT_SUPPORTED, &Props::default())
                        .await;
                    return Some(Ending::Server(reason::RETAIN_NOT_SUPPORTED));
                }
                if !codec::valid_topic(&publish.topic) {
                    conn.disconnect(reason::TOPIC_NAME_INVALID, &Props::default())
                        .await;
                    return Some(Ending::Server(reason::TOPIC_NAME_INVALID));
                }
                let settings = &self.shared.settings;
                let verdict = acl::may_publish(settings.sdk_app_id, &self.identity, &publish);
                let verdict = verdict.and_then(|()| {
                    self.shared.update(|st| {
                        if publish.retain {
                            st.retain(settings, &publish).map_err(|full| {
                                (
                                    reason::QUOTA_EXCEEDED,
                                    90001,
                                    format!(
                                        "the broker keeps at most {} retained messages ({} bytes)",
                                        full.max_messages, full.max_bytes
                                    ),
                                )
                            })?;
                        }
                        st.try_route(&publish, Some(self.client_id), settings.offline_limit)
                            .map_err(|e| match e {
                                crate::state::RouteError::QueueFull { user, limit } => (
                                    reason::QUOTA_EXCEEDED,
                                    90001,
                                    format!("{user}'s offline messages are at the limit ({limit}); try later"),
                                ),
                            })
                    })
                });
                self.shared.update(|st| {
                    let uc = st.counters.users.entry(self.user.to_string()).or_default();
                    match &verdict {
                        // A device's status is not a message.
                        Ok(_) if publish.retain => uc.retained_published += 1,
                        Ok(_) => uc.messages_published += 1,
                        Err((code, _, _)) => {
                            *uc.messages_refused
                                .entry(crate::state::code_key(*code))
                                .or_default() += 1
                        }
                    }
                });
                if publish.qos == 1 {
                    let packet = match &verdict {
                        Ok(_) => codec::puback(publish.pkid, 0),
                        Err((code, im, text)) => codec::puback_with(
                            publish.pkid,
                            *code,
                            &crate::state::im_props(*im, text),
                        ),
                    };
                    if conn.write(&packet).await.is_err() {
                        return Some(Ending::Lost);
                    }
                }
            }
            Incoming::PubAck { pkid, .. } => {
                self.shared.update(|st| st.acked(self.client_id, pkid));
            }
            Incoming::Subscribe(sub) => {
                if sub.has_subscription_id {
                    conn.disconnect(reason::SUBSCRIPTION_IDS_NOT_SUPPORTED, &Props::default())
                        .await;
                    return Some(Ending::Server(reason::SUBSCRIPTION_IDS_NOT_SUPPORTED));
                }
                let app = self.shared.settings.sdk_app_id;
                let codes: Vec<u8> = self.shared.update(|st| {
                    let refused =
                        crate::state::Armed::fire(&mut st.faults.refuse_subscribe, self.user)
                            .is_some();
                    let uc = st.counters.users.entry(self.user.to_string()).or_default();
                    uc.subscribes += 1;
                    if refused {
                        uc.subscribes_refused += 1;
                        return vec![reason::UNSPECIFIED; sub.filters.len()];
                    }
                    let Some(sess) = st.sessions.get_mut(self.client_id) else {
                        return vec![reason::UNSPECIFIED; sub.filters.len()];
                    };
                    // Per granted filter: whether its retained messages go out now.
                    let mut send_retained = Vec::new();
                    let codes = sub
                        .filters
                        .iter()
                        .map(|(filter, options)| {
                            if filter.starts_with("$share/") {
                                return reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED;
                            }
                            if !codec::valid_filter(filter) {
                                return reason::TOPIC_FILTER_INVALID;
                            }
                            if !acl::may_subscribe(app, &self.identity, filter) {
                                return reason::NOT_AUTHORIZED;
                            }
                            let o = SubOptions::from_byte(*options);
                            let qos = o.qos.min(1);
                            let existed = sess.subs.iter().any(|s| s.filter == *filter);
                            sess.subs.retain(|s| s.filter != *filter);
                            sess.subs.push(Sub {
                                filter: filter.clone(),
                                qos,
                                no_local: o.no_local,
                                retain_as_published: o.retain_as_published,
                            });
                            if o.retain_handling == 0 || (o.retain_handling == 1 && !existed) {
                                send_retained.push((filter.clone(), qos));
                            }
                            qos
                        })
                        .collect::<Vec<u8>>();
                    // What was kept for this user while nobody listened goes out now, then
                    // the retained messages the new subscriptions match.
                    for ((filter, _), code) in sub.filters.iter().zip(&codes) {
                        if *code < 0x80 {
                            st.hand_over_offline(self.client_id, filter);
                        }
                    }
                    for (filter, qos) in send_retained {
                        st.send_retained(self.client_id, &filter, qos);
                    }
                    if codes.iter().any(|c| *c >= 0x80) {
                        let uc = st.counters.users.entry(self.user.to_string()).or_default();
                        uc.subscribes_refused += 1;
                    }
                    codes
                });
                if conn.write(&codec::suback(sub.pkid, &codes)).await.is_err() {
                    return Some(Ending::Lost);
                }
            }
            Incoming::Unsubscribe { pkid, filters } => {
                let codes: Vec<u8> = self.shared.update(|st| {
                    let sess = st.sessions.get_mut(self.client_id);
                    let Some(sess) = sess else {
                        return vec![reason::NO_SUBSCRIPTION_EXISTED; filters.len()];
                    };
                    filters
                        .iter()
                        .map(|filter| {
                            let before = sess.subs.len();
                            sess.subs.retain(|s| s.filter != *filter);
                            if sess.subs.len() < before {
                                reason::SUCCESS
                            } else {
                                reason::NO_SUBSCRIPTION_EXISTED
                            }
                        })
                        .collect()
                });
                if conn.write(&codec::unsuback(pkid, &codes)).await.is_err() {
                    return Some(Ending::Lost);
                }
            }
            Incoming::Disconnect(d) => {
                if let Some(n) = d.session_expiry {
                    *session_expiry = n;
                }
                // Only DISCONNECT 0x00 discards the will (MQTT 5 §3.1.2.5).
                return Some(if d.reason == reason::SUCCESS {
                    self.shared.discard_will(self.client_id, self.conn_id);
                    Ending::Normal
                } else {
                    Ending::WithWill
                });
            }
            Incoming::Connect(_) | Incoming::Qos2Flow | Incoming::Auth => {
                protocol_error("unexpected packet after CONNECT");
                self.shared.update(|st| st.counters.protocol_errors += 1);
                conn.disconnect(reason::PROTOCOL_ERROR, &Props::default())
                    .await;
                return Some(Ending::Server(reason::PROTOCOL_ERROR));
            }
        }
        None
    }
}
