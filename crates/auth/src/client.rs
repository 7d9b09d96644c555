//! The tokio driver: one NATS connection at a time, to any configured node, serving the
//! callout subscription until it ends, then the next node.
//!
//! Connect: TCP (+ TLS after the server's INFO when the URL is `tls://` or the server requires
//! it), `CONNECT` with the service's user and password, `PING`, and the server's `PONG` (or
//! its `-ERR`, e.g. an authorization violation). Then `SUB $SYS.REQ.USER.AUTH <queue> 1` and a
//! second `PING`/`PONG`, so a permission error on the subscription is seen before the
//! connection counts as serving. Serve: each request is decided inline (about a tenth of a
//! millisecond of CPU) and its reply published to the request's reply subject; `PING` every
//! `ping_interval`, and two unanswered mean the node is gone. Lame-duck mode (an INFO with
//! `ldm`) moves to another node. After a connection that served ends, the next node is tried
//! at once; consecutive failures wait [`Backoff`] delays. Shutdown: `UNSUB`, flush, close.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::callout::SUBJECT;
use crate::config::{NatsSettings, NatsUrl};
use crate::proto::{self, Decoder, Info, ServerOp};
use crate::service::{Backoff, DecisionLog, Ledger, Service, Stats, Verdict, quote};

const SID: u64 = 1;

/// Plain TCP or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why a connection attempt or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(std::io::Error),
    #[error("the node closed the connection")]
    Closed,
    #[error("protocol error: {0}")]
    Proto(#[from] proto::ProtoError),
    #[error("the node said -ERR {}", quote(.0))]
    Server(String),
    #[error("the node's first line was not INFO")]
    NoInfo,
    #[error("the node requires TLS: list it as tls://… (and set nats.ca_file)")]
    TlsRequired,
    #[error("tls:// is configured but the node offers no TLS")]
    TlsUnavailable,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no PONG to two PINGs: the node is gone")]
    Stale,
    #[error("the node entered lame-duck mode")]
    LameDuck,
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        // A TLS peer that just goes away is a close, not a TLS error worth a paragraph.
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ConnError::Closed
        } else {
            ConnError::Io(e)
        }
    }
}

/// A connection that has logged in and subscribed.
struct Conn {
    stream: Stream,
    decoder: Decoder,
    info: Info,
}

async fn read_op(
    stream: &mut Stream,
    decoder: &mut Decoder,
    buf: &mut [u8],
) -> Result<ServerOp, ConnError> {
    loop {
        if let Some(op) = decoder.decode()? {
            return Ok(op);
        }
        let n = stream.read(buf).await?;
        if n == 0 {
            return Err(ConnError::Closed);
        }
        decoder.push(&buf[..n]);
    }
}

/// Wait for the PONG answering our PING; INFO updates and +OK are skipped, -ERR fails.
async fn await_pong(
    stream: &mut Stream,
    decoder: &mut Decoder,
    buf: &mut [u8],
) -> Result<(), ConnError> {
    loop {
        match read_op(stream, decoder, buf).await? {
            ServerOp::Pong => return Ok(()),
            ServerOp::Ping => stream.write_all(proto::PONG).await?,
            ServerOp::Err(e) => return Err(ConnError::Server(e)),
            ServerOp::Info(_) | ServerOp::Ok => {}
            ServerOp::Msg(_) | ServerOp::Oversized { .. } => {}
        }
    }
}

async fn connect(url: &NatsUrl, s: &NatsSettings) -> Result<Conn, ConnError> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
    let _ = tcp.set_nodelay(true);
    let mut stream = Stream::Plain(tcp);
    let mut decoder = Decoder::default();
    let mut buf = vec![0u8; 16 * 1024];
    let info = match read_op(&mut stream, &mut decoder, &mut buf).await? {
        ServerOp::Info(j) => Info::parse(&j).unwrap_or_default(),
        _ => return Err(ConnError::NoInfo),
    };
    let use_tls = url.tls || info.tls_required;
    if use_tls {
        let Some(cfg) = s.tls.clone() else {
            return Err(ConnError::TlsRequired);
        };
        if !info.tls_required && !info.tls_available {
            return Err(ConnError::TlsUnavailable);
        }
        let Stream::Plain(tcp) = stream else {
            return Err(ConnError::Tls("already TLS".into()));
        };
        let name =
            ServerName::try_from(url.host.clone()).map_err(|e| ConnError::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| ConnError::Tls(e.to_string()))?;
        stream = Stream::Tls(Box::new(tls));
    }
    let mut hello = proto::connect(&s.user, s.password.expose(), &s.name, use_tls);
    hello.extend_from_slice(proto::PING);
    stream.write_all(&hello).await?;
    await_pong(&mut stream, &mut decoder, &mut buf).await?;
    let mut sub = proto::sub(SUBJECT, Some(&s.queue_group), SID);
    sub.extend_from_slice(proto::PING);
    stream.write_all(&sub).await?;
    await_pong(&mut stream, &mut decoder, &mut buf).await?;
    Ok(Conn {
        stream,
        decoder,
        info,
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the driver keeps between connections.
pub struct Driver<'a> {
    settings: &'a NatsSettings,
    service: &'a Service,
    ledger: Ledger,
    stats_interval: Duration,
    epoch: Instant,
    last_stats: Instant,
    status: Box<dyn FnMut(&str) + 'a>,
}

/// How one served connection ended.
enum End {
    Shutdown,
    Lost(ConnError),
}

impl<'a> Driver<'a> {
    pub fn new(
        settings: &'a NatsSettings,
        service: &'a Service,
        log: &crate::config::LogSettings,
        status: Box<dyn FnMut(&str) + 'a>,
    ) -> Driver<'a> {
        let epoch = Instant::now();
        Driver {
            settings,
            service,
            ledger: Ledger::new(DecisionLog::new(
                log.decisions_per_second,
                log.decisions_burst,
                log.summary_interval,
                0,
            )),
            stats_interval: log.stats_interval,
            epoch,
            last_stats: epoch,
            status,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn stats(&self) -> &Stats {
        &self.ledger.stats
    }

    /// Run until `shutdown` resolves.
    pub async fn run(&mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let seed = u64::from(std::process::id())
            ^ (unix_now() << 20)
            ^ self.epoch.elapsed().as_nanos() as u64;
        let mut backoff = Backoff::new(
            self.settings.reconnect_delay_min,
            self.settings.reconnect_delay_max,
            seed,
        );
        let urls = &self.settings.urls;
        let mut next = backoff.pick(urls.len());
        loop {
            let url = &urls[next % urls.len()];
            next = (next + 1) % urls.len();
            let attempt = tokio::select! {
                _ = &mut shutdown => break,
                r = tokio::time::timeout(self.settings.connect_timeout, connect(url, self.settings)) => r,
            };
            let conn = match attempt {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::warn!(url = %url, error = %e, "cannot use this NATS node");
                    self.wait(&mut backoff, &mut shutdown).await;
                    continue;
                }
                Err(_) => {
                    tracing::warn!(url = %url, error = %ConnError::Timeout(self.settings.connect_timeout), "cannot use this NATS node");
                    self.wait(&mut backoff, &mut shutdown).await;
                    continue;
                }
            };
            backoff.reset();
            let node = quote(&conn.info.server_name);
            tracing::info!(url = %url, node = %node, version = %quote(&conn.info.version), queue_group = %self.settings.queue_group, "connected to NATS node {node}; serving {SUBJECT}");
            (self.status)(&format!("serving on NATS node {node} ({url})"));
            match self.serve(conn, &mut shutdown).await {
                End::Shutdown => break,
                End::Lost(e) => {
                    tracing::warn!(url = %url, node = %node, error = %e, "lost NATS node {node}; trying the next one");
                    (self.status)(&format!("reconnecting (lost {node}: {e})"));
                }
            }
        }
        self.flush_summary(true);
        tracing::info!("stats: {}", self.ledger.stats.line());
    }

    async fn wait(
        &mut self,
        backoff: &mut Backoff,
        shutdown: &mut Pin<&mut impl std::future::Future<Output = ()>>,
    ) {
        let d = backoff.next_delay();
        (self.status)(&format!(
            "no NATS node reachable; next try in {} ms",
            d.as_millis()
        ));
        tokio::select! {
            _ = shutdown.as_mut() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    async fn serve(
        &mut self,
        mut conn: Conn,
        shutdown: &mut Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> End {
        let mut buf = vec![0u8; 32 * 1024];
        let mut out: Vec<u8> = Vec::with_capacity(8 * 1024);
        let mut ping = tokio::time::interval(self.settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await; // the first tick is immediate
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pings_out = 0u32;
        loop {
            // Everything already buffered first (a read may bring several requests).
            loop {
                match conn.decoder.decode() {
                    Ok(Some(op)) => match op {
                        ServerOp::Msg(m) => {
                            if m.sid == SID {
                                self.request(m, &mut out);
                            }
                        }
                        ServerOp::Oversized { len, .. } => self.oversized(len),
                        ServerOp::Ping => out.extend_from_slice(proto::PONG),
                        ServerOp::Pong => pings_out = 0,
                        ServerOp::Ok => {}
                        ServerOp::Err(e) => {
                            // Permission errors leave the connection open; others precede a close.
                            tracing::warn!(error = %quote(&e), "the NATS node said -ERR");
                        }
                        ServerOp::Info(j) => {
                            if Info::parse(&j).is_some_and(|i| i.ldm) {
                                let _ = self.unsubscribe(&mut conn).await;
                                return End::Lost(ConnError::LameDuck);
                            }
                        }
                    },
                    Ok(None) => break,
                    Err(e) => return End::Lost(e.into()),
                }
            }
            if !out.is_empty() {
                if let Err(e) = conn.stream.write_all(&out).await {
                    return End::Lost(e.into());
                }
                out.clear();
            }
            tokio::select! {
                _ = shutdown.as_mut() => {
                    let _ = self.unsubscribe(&mut conn).await;
                    return End::Shutdown;
                }
                r = conn.stream.read(&mut buf) => match r {
                    Ok(0) => return End::Lost(ConnError::Closed),
                    Ok(n) => conn.decoder.push(&buf[..n]),
                    Err(e) => return End::Lost(e.into()),
                },
                _ = ping.tick() => {
                    if pings_out >= 2 {
                        return End::Lost(ConnError::Stale);
                    }
                    pings_out += 1;
                    out.extend_from_slice(proto::PING);
                }
                _ = housekeeping.tick() => self.housekeeping(),
            }
        }
    }

    async fn unsubscribe(&mut self, conn: &mut Conn) -> std::io::Result<()> {
        conn.stream
            .write_all(format!("UNSUB {SID}\r\n").as_bytes())
            .await?;
        conn.stream.flush().await?;
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.stream.shutdown()).await;
        Ok(())
    }

    fn request(&mut self, m: proto::Msg, out: &mut Vec<u8>) {
        let started = Instant::now();
        let (reply, d) = self.service.handle(unix_now(), &m.payload);
        match (&reply, m.reply.as_deref()) {
            (Some(r), Some(to)) if proto::is_plain_subject(to) => {
                proto::publish(out, to, r.as_bytes())
            }
            (Some(_), _) => {
                tracing::warn!(
                    "an authorization request had no usable reply subject; not answered"
                );
            }
            (None, _) => {}
        }
        let took = started.elapsed();
        let now_ms = self.now_ms();
        if self.ledger.record(now_ms, &d.verdict, took) {
            let fp = d.sig_fingerprint.as_deref().unwrap_or("-");
            let us = took.as_micros();
            match &d.verdict {
                Verdict::Accepted {
                    expires_at,
                    key_slot,
                } => tracing::info!(
                    user = %quote(&d.username), client_id = %quote(&d.client_id), node = %quote(&d.node),
                    result = "accepted", exp = expires_at, key = ?key_slot, sig = fp, latency_us = us,
                    "decision"
                ),
                Verdict::Refused(r) => tracing::info!(
                    user = %quote(&d.username), client_id = %quote(&d.client_id), node = %quote(&d.node),
                    result = "refused", code = r.code, reason = r.reason, sig = fp, latency_us = us,
                    "decision"
                ),
                Verdict::Dropped(e) => tracing::info!(
                    result = "dropped", error = %e, latency_us = us,
                    "decision: the request did not verify; not answered"
                ),
            }
        }
    }

    /// A request over the size cap, skipped unread: dropped, counted and logged like a
    /// decided one (a storm of them is summarised too).
    fn oversized(&mut self, len: usize) {
        let now_ms = self.now_ms();
        if self
            .ledger
            .record(now_ms, &Verdict::oversized(len), Duration::ZERO)
        {
            tracing::warn!(
                bytes = len,
                "an authorization request over the size cap was dropped"
            );
        }
    }

    fn flush_summary(&mut self, force: bool) {
        let now = if force { u64::MAX } else { self.now_ms() };
        if let Some(s) = self.ledger.log.summary(now) {
            let parts: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let total: u64 = s.values().sum();
            tracing::info!(
                "{total} decisions not logged one by one (rate limit): {}",
                parts.join(" ")
            );
        }
    }

    fn housekeeping(&mut self) {
        self.flush_summary(false);
        if self.last_stats.elapsed() >= self.stats_interval {
            self.last_stats = Instant::now();
            tracing::info!("stats: {}", self.ledger.stats.line());
        }
    }
}
