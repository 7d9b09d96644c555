//! The local API: JSON-RPC 2.0, one object per line, over a Unix stream socket.
//!
//! Security: the socket is 0660 with a configurable client group; SO_PEERCRED decides the
//! role: anyone who can connect may read; `login`/`logout` need root, the daemon's uid, or a
//! configured operator uid/gid. Everything is bounded (clients in all and per uid, line length,
//! idle time, each watcher's backlog, the answers being written): a client can never crash or
//! stall the daemon: a slow watcher is told it lagged and is dropped, and answers that are
//! pages of messages share one byte budget ([`ANSWER_BUDGET`]). See `docs/api.md`.

//! The pieces, one concept each (mini-redis's layout): `socket` (binding, activation, peer
//! groups), `connection` (one client: line framing, time limits, notifications, the answer
//! budget), `rpc` (JSON-RPC 2.0 parsing and error lines), and `cmd` (one handler per method:
//! `cmd/session.rs`, `cmd/messages.rs`, and the table of methods and roles in `cmd/mod.rs`).
//! This file admits clients (roles, limits) and runs each connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

mod cmd;
mod connection;
pub mod rpc;
mod socket;

pub use connection::{LineOut, LineReader};
pub use rpc::{
    Request, RpcError, error_line, message_notification, notification, parse_request, timeout_param,
};
pub use socket::{BindError, Bound, bind, cleanup};

use crate::config::ApiConfig;
use crate::status::SessionHandle;
use connection::{ClientConn, Next, write_line};
use socket::peer_groups;

/// The API version reported by `version`.
pub const API_VERSION: u32 = 1;

/// The most bytes of paged answers (history, conversations, inbox: up to 100 messages of up
/// to 12 KB each) the daemon holds at once, across all connections. A connection reserves
/// its answer's bound before the store is asked and keeps what the answer takes until it is
/// written; a client that does not read holds its share until the write timeout drops it.
/// So however many readers ask and never read, their answers take at most this much; the
/// others wait their turn (in order) for at most [`ANSWER_WAIT`]. One uid may hold at most
/// [`ANSWER_SHARE`] of it, so the connections of one reader cannot make everyone else wait.
pub const ANSWER_BUDGET: usize = 4 << 20;
/// The part of [`ANSWER_BUDGET`] one uid may hold: a little more than one largest page.
pub const ANSWER_SHARE: usize = ANSWER_BUDGET / 2;
/// How long a paged request waits for its share of [`ANSWER_BUDGET`] before it is refused
/// (-32004, try again): two write timeouts.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Who is on the other end.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) uid: u32,
    pub(super) operator: bool,
}

pub(super) struct Limits {
    total: usize,
    per_uid: HashMap<u32, usize>,
    watchers_per_uid: HashMap<u32, usize>,
    /// Each connected uid's [`ANSWER_SHARE`] (dropped with its last connection).
    pub(super) answer_share: HashMap<u32, Arc<Semaphore>>,
}

/// Slots only operators may take: however many connections readers hold, root and the
/// operators can still reach the daemon.
pub fn operator_reserve(max_clients: usize) -> usize {
    (max_clients / 8).clamp(1, 16).min(max_clients)
}

/// Releases a client's slot (and its watcher slot) when its connection ends.
pub(super) struct Slot {
    limits: Arc<Mutex<Limits>>,
    uid: u32,
    watching: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        l.total = l.total.saturating_sub(1);
        let dec = |m: &mut HashMap<u32, usize>, uid: u32| {
            if let Some(n) = m.get_mut(&uid) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&uid);
                }
            }
        };
        dec(&mut l.per_uid, self.uid);
        if !l.per_uid.contains_key(&self.uid) {
            l.answer_share.remove(&self.uid);
        }
        if self.watching {
            dec(&mut l.watchers_per_uid, self.uid);
        }
    }
}

pub struct Server {
    pub(super) cfg: ApiConfig,
    pub(super) session: SessionHandle,
    daemon_uid: u32,
    pub(super) limits: Arc<Mutex<Limits>>,
    /// [`ANSWER_BUDGET`], in bytes.
    pub(super) answers: Arc<Semaphore>,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    pub(super) test_hooks: bool,
}

impl Server {
    pub fn new(cfg: ApiConfig, session: SessionHandle) -> Arc<Server> {
        Arc::new(Server {
            cfg,
            session,
            daemon_uid: nix::unistd::geteuid().as_raw(),
            limits: Arc::new(Mutex::new(Limits {
                total: 0,
                per_uid: HashMap::new(),
                watchers_per_uid: HashMap::new(),
                answer_share: HashMap::new(),
            })),
            answers: Arc::new(Semaphore::new(ANSWER_BUDGET)),
            test_hooks: cfg!(feature = "test-hooks")
                && std::env::var("IMLINKD_TEST_HOOKS").is_ok_and(|v| v == "1"),
        })
    }

    /// Accept clients until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.client(stream).await });
                }
                Err(e) => {
                    // EMFILE and friends: say so, and give the system a moment instead of
                    // spinning on the same error.
                    tracing::warn!("API accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Take a slot for a client whose role is known. Readers cannot take the operators'
    /// reserve; each uid has its own cap (operators too, generously).
    fn admit(&self, peer: Peer) -> Result<Slot, &'static str> {
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let cap = if peer.operator {
            self.cfg.max_clients
        } else {
            self.cfg.max_clients - operator_reserve(self.cfg.max_clients)
        };
        if l.total >= cap {
            return Err(if peer.operator {
                "too many API clients; try again later"
            } else {
                "too many API clients (the remaining slots are kept for operators); try again later"
            });
        }
        let mine = l.per_uid.get(&peer.uid).copied().unwrap_or(0);
        if mine >= self.cfg.max_clients_per_uid {
            return Err("too many API clients for this user; close some");
        }
        l.total += 1;
        *l.per_uid.entry(peer.uid).or_default() += 1;
        Ok(Slot {
            limits: self.limits.clone(),
            uid: peer.uid,
            watching: false,
        })
    }

    /// Turn a client's slot into a watcher's: at most `max_watchers_per_uid` per uid.
    pub(super) fn admit_watcher(&self, slot: &mut Slot) -> Result<(), RpcError> {
        if slot.watching {
            return Ok(());
        }
        let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let n = l.watchers_per_uid.get(&slot.uid).copied().unwrap_or(0);
        if n >= self.cfg.max_watchers_per_uid {
            return Err(RpcError::new(
                rpc::TOO_MANY_CLIENTS,
                format!(
                    "too many watchers for this user (at most {}); close one",
                    self.cfg.max_watchers_per_uid
                ),
            ));
        }
        *l.watchers_per_uid.entry(slot.uid).or_default() += 1;
        slot.watching = true;
        Ok(())
    }

    fn role(&self, stream: &UnixStream, uid: u32, gid: u32) -> Peer {
        let operator = uid == 0
            || uid == self.daemon_uid
            || self.cfg.operator_uids.contains(&uid)
            || self.cfg.operator_gids.contains(&gid)
            || (!self.cfg.operator_gids.is_empty()
                && peer_groups(stream)
                    .iter()
                    .any(|g| self.cfg.operator_gids.contains(g)));
        Peer { uid, operator }
    }

    async fn client(self: Arc<Self>, mut stream: UnixStream) {
        let Ok(cred) = stream.peer_cred() else {
            return;
        };
        // The role first: the limits depend on it.
        let peer = self.role(&stream, cred.uid(), cred.gid());
        let slot = match self.admit(peer) {
            Ok(s) => s,
            Err(msg) => {
                let line = error_line(&Value::Null, rpc::TOO_MANY_CLIENTS, msg, None);
                let _ = tokio::time::timeout(
                    Duration::from_millis(200),
                    stream.write_all(line.as_bytes()),
                )
                .await;
                // Let the refusal be read before the close (a client that is still writing
                // its request would otherwise see a reset instead).
                let _ = stream.shutdown().await;
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_millis(200), async {
                    while let Ok(n) = stream.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
                return;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let mut conn = ClientConn {
            server: &self,
            peer,
            slot,
            lines: LineReader::new(self.cfg.max_line_bytes),
            watch: None,
            watch_messages: None,
            answer: None,
        };
        loop {
            match conn.next_line(&mut rd).await {
                Next::Line(line) => {
                    if let Some(reply) = conn.request(&line).await
                        && write_line(&mut wr, &reply).await.is_err()
                    {
                        return;
                    }
                    // Written: its share of the answer budget goes back.
                    conn.answer = None;
                    // One request at a time per client, and others get their turn.
                    tokio::task::yield_now().await;
                }
                Next::Notification(line) => {
                    if write_line(&mut wr, &line).await.is_err() {
                        return;
                    }
                }
                Next::Close(last) => {
                    if let Some(line) = last {
                        let _ = write_line(&mut wr, &line).await;
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Event;
    use socket::check_activated_fd;
    use tokio::sync::broadcast;

    fn lines_of(r: &mut LineReader) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let LineOut::Line(l) = r.next_line() {
            out.push(l.to_vec());
        }
        out
    }

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken_from_systemd() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("imlinkd-act-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.join("ok.sock")).unwrap();
        assert_eq!(check_activated_fd(l.as_raw_fd()), Ok(()));
        let d = std::os::unix::net::UnixDatagram::bind(dir.join("dg.sock")).unwrap();
        assert!(
            check_activated_fd(d.as_raw_fd())
                .unwrap_err()
                .contains("stream")
        );
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(
            check_activated_fd(t.as_raw_fd())
                .unwrap_err()
                .contains("Unix")
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(
            check_activated_fd(a.as_raw_fd())
                .unwrap_err()
                .contains("listening")
        );
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(
            check_activated_fd(f.as_raw_fd())
                .unwrap_err()
                .contains("not a socket")
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn lines_split_the_same_whatever_the_reads_and_blank_lines_are_skipped() {
        let input = b"{\"a\":1}\r\n\n\n  \n{\"b\":2}\n{\"c\":3}";
        let mut whole = LineReader::new(100);
        whole.push(input);
        let want = lines_of(&mut whole);
        assert_eq!(want, vec![b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
        assert_eq!(whole.next_line(), LineOut::More { partial: true });
        for step in 1..input.len() {
            let mut r = LineReader::new(100);
            let mut got = Vec::new();
            for part in input.chunks(step) {
                r.push(part);
                got.extend(lines_of(&mut r));
            }
            assert_eq!(got, want, "reads of {step}");
        }
    }

    #[test]
    fn a_flood_of_newlines_is_read_in_one_pass_and_long_lines_are_refused() {
        let mut r = LineReader::new(64);
        // A megabyte of newlines, fed in 4 KiB reads: each byte is looked at once.
        for _ in 0..256 {
            r.push(&[b'\n'; 4096]);
            assert_eq!(r.next_line(), LineOut::More { partial: false });
        }
        r.push(b"{}\n");
        assert_eq!(r.next_line(), LineOut::Line(b"{}"));
        r.push(&[b'x'; 65]);
        assert_eq!(r.next_line(), LineOut::TooLong);
        let mut r = LineReader::new(4);
        r.push(b"toolong\n");
        assert_eq!(r.next_line(), LineOut::TooLong);
    }
    use crate::session::{Counters, ErrorClass, LastError, Phase};
    use crate::status::{Clock, Status};
    use tokio::io::AsyncBufReadExt;

    fn status() -> Status {
        Status {
            phase: Phase::Online,
            summary: "online".into(),
            login_status: 1,
            login_user: "alice".into(),
            user_id: "alice".into(),
            sdk_app_id: 1,
            broker: "mqtts://x:1".into(),
            protocol: None,
            inbox_subscribed: false,
            next_subscribe_at_ms: None,
            since: 0,
            last_error: None,
            sig: None,
            renewal_failures: 0,
            next_retry_at_ms: None,
            counters: Counters::default(),
            messages: Default::default(),
            last_event: None,
        }
    }

    /// A watcher that stops reading while events pour in is told it lagged, then dropped;
    /// the sender (the session) never waits for it.
    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_told_it_lagged_and_dropped() {
        let dir = std::env::temp_dir().join(format!("imlinkd-lag-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let (commands, _keep) = tokio::sync::mpsc::channel(4);
        let (_status_tx, status_rx) = tokio::sync::watch::channel(status());
        let (events, _) = broadcast::channel(8);
        let session = SessionHandle {
            commands,
            status: status_rx,
            events: events.clone(),
            messages: broadcast::channel(8).0,
            store: crate::store::StoreHandle::open(dir.join("messages.db"), 1 << 20).0,
            ids: Arc::new(Mutex::new(crate::message::IdGen::new())),
            clock: Clock::new(),
        };
        let cfg = ApiConfig {
            socket: socket.clone(),
            group: None,
            operator_uids: vec![],
            operator_gids: vec![],
            max_clients: 4,
            max_clients_per_uid: 4,
            max_watchers_per_uid: 4,
            max_line_bytes: 4096,
            watcher_queue: 8,
            idle_timeout: Duration::from_secs(60),
        };
        let bound = bind(&cfg).unwrap();
        tokio::spawn(Server::new(cfg, session).serve(bound.listener));
        let mut s = UnixStream::connect(&socket).await.unwrap();
        s.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"watch\"}\n")
            .await
            .unwrap();
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.contains("\"result\""), "{line}");
        // 400 events of ~4 KiB: far more than the socket buffer and the 8-event queue hold.
        let big = LastError::new(1, ErrorClass::Network, "x".repeat(4000));
        let started = std::time::Instant::now();
        for _ in 0..400 {
            let _ = events.send(Event::StateChanged {
                phase: Phase::Backoff,
                login_status: 1,
                login_user: "alice".into(),
                last_error: Some(big.clone()),
            });
            tokio::task::yield_now().await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "sending never waits for a watcher"
        );
        // Now read everything: some events, then the `lagged` notice, then EOF.
        let mut all = String::new();
        tokio::time::timeout(Duration::from_secs(10), r.read_to_string(&mut all))
            .await
            .unwrap()
            .unwrap();
        let last = all.lines().last().unwrap();
        assert!(
            last.contains("\"method\":\"lagged\""),
            "{}",
            &last[..last.len().min(200)]
        );
        assert!(all.lines().count() < 400, "the backlog was bounded");
        let _ = std::fs::remove_dir_all(dir);
    }
}
