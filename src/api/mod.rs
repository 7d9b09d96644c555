//! The local API: JSON-RPC 2.0, one object per line, over a Unix stream socket.
//!
//! Security: the socket is 0660 with a configurable client group; SO_PEERCRED decides the
//! role: anyone who can connect may read; `login`/`logout` need root, the daemon's uid, or a
//! configured operator uid/gid. Everything is bounded (clients in all and per uid, line length,
//! idle time, each watcher's backlog): a client can never crash or stall the daemon: a slow
//! watcher is told it lagged and is dropped. See `docs/api.md`.

use std::collections::HashMap;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, oneshot};

mod messages;

use crate::config::ApiConfig;
use crate::courier::MessageEvent;
use crate::identity::UserId;
use crate::session::{Event, codes, login_status};
use crate::status::{Command, SessionHandle};
use crate::store::StoreRequest;

/// JSON-RPC error codes (the IM codes are used for IM errors).
pub mod rpc {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const PERMISSION_DENIED: i64 = -32001;
    pub const TOO_MANY_CLIENTS: i64 = -32002;
    pub const LINE_TOO_LONG: i64 = -32003;
    pub const NOT_AVAILABLE: i64 = -32004;
    pub const TIMEOUT: i64 = -32005;
}

/// The API version reported by `version`.
pub const API_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("another process is already serving {0} (is imlinkd running twice?)")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("api.group {0:?}: no such group")]
    NoSuchGroup(String),
    #[error("socket activation: {0}")]
    Activation(String),
}

/// The listening socket, and the path to remove on exit (none when systemd owns it).
pub struct Bound {
    pub listener: UnixListener,
    pub owned_path: Option<PathBuf>,
}

/// Take the socket systemd passed (socket activation), or bind the configured path: a stale
/// socket file is replaced, a live one means another daemon and is an error. The socket is
/// made 0660 and given the client group.
pub fn bind(cfg: &ApiConfig) -> Result<Bound, BindError> {
    if let Some(listener) = activated_socket()? {
        return Ok(Bound {
            listener,
            owned_path: None,
        });
    }
    let path = &cfg.socket;
    let io = |source| BindError::Io {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.clone()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Err(BindError::NotASocket(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
    if let Some(group) = &cfg.group {
        // A group name, or a numeric gid.
        let gid = match group.parse::<u32>() {
            Ok(n) => nix::unistd::Gid::from_raw(n),
            Err(_) => {
                nix::unistd::Group::from_name(group)
                    .ok()
                    .flatten()
                    .ok_or_else(|| BindError::NoSuchGroup(group.clone()))?
                    .gid
            }
        };
        // Under the packaged unit the daemon's primary group already is the clients' group, and
        // the system call filter forbids chown: only change what needs changing.
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata(path).map_err(io)?.gid() != gid.as_raw() {
            nix::unistd::chown(path, None, Some(gid))
                .map_err(|e| io(std::io::Error::from_raw_os_error(e as i32)))?;
        }
    }
    Ok(Bound {
        listener,
        owned_path: Some(path.clone()),
    })
}

fn activated_socket() -> Result<Option<UnixListener>, BindError> {
    let fds = sd_notify::listen_fds().map_err(|e| BindError::Activation(e.to_string()))?;
    let Some(fd) = fds.into_iter().next() else {
        return Ok(None);
    };
    check_activated_fd(fd).map_err(BindError::Activation)?;
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID matched) and nothing else in
    // the process owns it; we take ownership exactly once.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| BindError::Activation(e.to_string()))?;
    UnixListener::from_std(std_listener)
        .map(Some)
        .map_err(|e| BindError::Activation(e.to_string()))
}

/// The descriptor systemd passed must be what the API needs: a listening Unix stream socket
/// (a datagram socket, a TCP port or a file would fail later, or serve the wrong thing).
fn check_activated_fd(fd: std::os::fd::RawFd) -> Result<(), String> {
    let int_opt = |opt: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(format!(
                "the passed descriptor {fd} is not a socket ({})",
                std::io::Error::last_os_error()
            ))
        }
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err(format!(
            "the passed socket (fd {fd}) is not a Unix socket: use ListenStream=/path in imlinkd.socket"
        ));
    }
    if int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(format!(
            "the passed socket (fd {fd}) is not a stream socket: use ListenStream="
        ));
    }
    if int_opt(libc::SO_ACCEPTCONN)? != 1 {
        return Err(format!("the passed socket (fd {fd}) is not listening"));
    }
    Ok(())
}

/// Who is on the other end.
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    operator: bool,
}

/// The peer's supplementary groups, as the kernel recorded them at connect time
/// (`SO_PEERGROUPS`, Linux 4.13+): no /proc lookup, so no race with pid reuse, and it works
/// under `ProtectProc=invisible`.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    use std::os::fd::AsRawFd;
    let mut groups = vec![0u32; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`, which is that large.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<u32>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` now says how much room is needed.
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "SO_PEERGROUPS is not available ({err}): api.operator_gids match only a \
                 client's primary group"
            );
        }
        break;
    }
    Vec::new()
}

struct Limits {
    total: usize,
    per_uid: HashMap<u32, usize>,
    watchers_per_uid: HashMap<u32, usize>,
}

/// Slots only operators may take: however many connections readers hold, root and the
/// operators can still reach the daemon.
pub fn operator_reserve(max_clients: usize) -> usize {
    (max_clients / 8).clamp(1, 16).min(max_clients)
}

/// Releases a client's slot (and its watcher slot) when its connection ends.
struct Slot {
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
        if self.watching {
            dec(&mut l.watchers_per_uid, self.uid);
        }
    }
}

pub struct Server {
    cfg: ApiConfig,
    session: SessionHandle,
    daemon_uid: u32,
    limits: Arc<Mutex<Limits>>,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    test_hooks: bool,
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
            })),
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
    fn admit_watcher(&self, slot: &mut Slot) -> Result<(), RpcError> {
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
        };
        loop {
            match conn.next_line(&mut rd).await {
                Next::Line(line) => {
                    if let Some(reply) = conn.request(&line).await
                        && write_line(&mut wr, &reply).await.is_err()
                    {
                        return;
                    }
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

/// A well-formed JSON-RPC 2.0 request. `id: None` is a notification (not answered).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub method: String,
    pub params: Value,
}

/// Parse one request line, or say what to answer instead (the id to answer with, the code,
/// the message). Pure, so the fuzzer drives it; nothing a client sends can panic it.
pub fn parse_request(line: &[u8]) -> Result<Request, (Value, i64, String)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        let why = if std::str::from_utf8(line).is_err() {
            "the request is not UTF-8".to_string()
        } else {
            format!("the request is not JSON ({e})")
        };
        (Value::Null, rpc::PARSE_ERROR, why)
    })?;
    let Some(obj) = v.as_object() else {
        let msg = if v.is_array() {
            "batch requests are not supported; send one object per line"
        } else {
            "a request is a JSON object"
        };
        return Err((Value::Null, rpc::INVALID_REQUEST, msg.into()));
    };
    let id = obj.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((
            reply_id,
            rpc::INVALID_REQUEST,
            "\"jsonrpc\": \"2.0\" is required".into(),
        ));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Err((
            reply_id,
            rpc::INVALID_REQUEST,
            "\"method\" must be a string".into(),
        ));
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    if !(params.is_null() || params.is_object()) {
        return Err((
            reply_id,
            rpc::INVALID_PARAMS,
            "\"params\" must be an object".into(),
        ));
    }
    Ok(Request {
        id,
        method: method.to_string(),
        params,
    })
}

/// How long a write to one client may take before that client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn write_line(wr: &mut tokio::net::unix::OwnedWriteHalf, line: &str) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(line.as_bytes())).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

enum Next {
    Line(Vec<u8>),
    Notification(String),
    Close(Option<String>),
}

/// Splits a byte stream into lines: each byte is searched once (a scan offset), the buffer
/// is compacted once per read, and a line longer than the limit is refused. (The landed
/// reader searched from the start and drained per line: a stream of `\n` cost quadratic
/// memory moves.) Pure, so the fuzzer drives it.
pub struct LineReader {
    buf: Vec<u8>,
    /// Start of the unprocessed bytes.
    start: usize,
    /// Bytes before this were searched for `\n` already.
    scanned: usize,
    max: usize,
}

/// What [`LineReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum LineOut<'a> {
    Line(&'a [u8]),
    /// No complete line yet; `partial` says whether a line has started.
    More {
        partial: bool,
    },
    TooLong,
}

impl LineReader {
    pub fn new(max: usize) -> LineReader {
        LineReader {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            max,
        }
    }

    /// Add bytes read from the client (compacting what was consumed, once).
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete, non-blank line (without `\r\n`).
    pub fn next_line(&mut self) -> LineOut<'_> {
        loop {
            match self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                Some(rel) => {
                    let end = self.scanned + rel;
                    let (from, to) = (self.start, end);
                    self.start = end + 1;
                    self.scanned = self.start;
                    let mut line = &self.buf[from..to];
                    if line.last() == Some(&b'\r') {
                        line = &line[..line.len() - 1];
                    }
                    if to - from > self.max {
                        return LineOut::TooLong;
                    }
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    return LineOut::Line(&self.buf[from..from + line.len()]);
                }
                None => {
                    self.scanned = self.buf.len();
                    if self.buf.len() - self.start > self.max {
                        return LineOut::TooLong;
                    }
                    return LineOut::More {
                        partial: self.buf.len() > self.start,
                    };
                }
            }
        }
    }
}

struct ClientConn<'a> {
    server: &'a Arc<Server>,
    peer: Peer,
    slot: Slot,
    lines: LineReader,
    watch: Option<broadcast::Receiver<Event>>,
    /// Message notifications, for a watcher.
    watch_messages: Option<broadcast::Receiver<MessageEvent>>,
}

impl ClientConn<'_> {
    /// The next complete request line, or a notification to forward, or the end.
    ///
    /// Time limits count whole lines, not reads (one byte every few minutes held a slot
    /// forever): a client that is not watching must complete a request within
    /// `idle_timeout` of the previous one; a watcher may stay silent, but a line it starts
    /// must be complete within `idle_timeout`.
    async fn next_line(&mut self, rd: &mut tokio::net::unix::OwnedReadHalf) -> Next {
        let max = self.server.cfg.max_line_bytes;
        let idle = self.server.cfg.idle_timeout;
        let mut deadline = (self.watch.is_none()).then(|| tokio::time::Instant::now() + idle);
        loop {
            match self.lines.next_line() {
                LineOut::Line(l) => return Next::Line(l.to_vec()),
                LineOut::TooLong => {
                    return Next::Close(Some(error_line(
                        &Value::Null,
                        rpc::LINE_TOO_LONG,
                        &format!("request line longer than {max} bytes; closing"),
                        None,
                    )));
                }
                LineOut::More { partial } => {
                    if partial && deadline.is_none() {
                        deadline = Some(tokio::time::Instant::now() + idle);
                    }
                }
            }
            let mut chunk = [0u8; 4096];
            let read = async {
                match deadline {
                    None => rd.read(&mut chunk).await,
                    Some(at) => match tokio::time::timeout_at(at, rd.read(&mut chunk)).await {
                        Ok(r) => r,
                        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle")),
                    },
                }
            };
            let event = async {
                match self.watch.as_mut() {
                    Some(rx) => rx.recv().await.map(|e| notification(&e)),
                    None => std::future::pending().await,
                }
            };
            let message = async {
                match self.watch_messages.as_mut() {
                    Some(rx) => rx.recv().await.map(|e| message_notification(&e)),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = read => match r {
                    Ok(0) => return Next::Close(None),
                    Ok(n) => self.lines.push(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        return Next::Close(Some(error_line(&Value::Null, rpc::TIMEOUT, "no complete request within the idle timeout; closing", None)));
                    }
                    Err(_) => return Next::Close(None),
                },
                ev = async { tokio::select! { e = event => e, m = message => m } } => match ev {
                    Ok(line) => return Next::Notification(line),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Next::Close(Some(json!({
                            "jsonrpc": "2.0",
                            "method": "lagged",
                            "params": { "missed": n, "message": "this watcher fell behind and is disconnected; reconnect and watch again" }
                        }).to_string() + "\n"));
                    }
                    Err(broadcast::error::RecvError::Closed) => return Next::Close(None),
                },
            }
        }
    }

    /// Handle one request line; `None` for JSON-RPC notifications (no id).
    async fn request(&mut self, line: &[u8]) -> Option<String> {
        let req = match parse_request(line) {
            Ok(r) => r,
            Err((id, code, msg)) => return Some(error_line(&id, code, &msg, None)),
        };
        let result = self.dispatch(&req.method, &req.params).await;
        let id = req.id?;
        Some(match result {
            Ok(r) => json!({ "jsonrpc": "2.0", "id": id, "result": r }).to_string() + "\n",
            Err(e) => error_line(&id, e.code, &e.message, e.data),
        })
    }

    fn require_operator(&self, method: &str) -> Result<(), RpcError> {
        if self.peer.operator {
            return Ok(());
        }
        Err(RpcError::new(
            rpc::PERMISSION_DENIED,
            format!(
                "{method} needs an operator: root, the daemon's user, or a uid/gid listed in \
                 api.operator_uids / api.operator_gids (you are uid {})",
                self.peer.uid
            ),
        ))
    }

    async fn dispatch(&mut self, method: &str, params: &Value) -> Result<Value, RpcError> {
        let session = &self.server.session;
        match method {
            "version" => Ok(json!({
                "name": "imlinkd",
                "version": env!("CARGO_PKG_VERSION"),
                "api": API_VERSION,
            })),
            "status" => Ok(serde_json::to_value(&*session.status.borrow()).unwrap_or(Value::Null)),
            "get_login_user" => Ok(json!(session.status.borrow().login_user)),
            "get_login_status" => Ok(json!(session.status.borrow().login_status)),
            "watch" => {
                self.server.admit_watcher(&mut self.slot)?;
                // Subscribe before taking the snapshot so nothing falls between them.
                self.watch = Some(session.events.subscribe());
                self.watch_messages = Some(session.messages.subscribe());
                let status = serde_json::to_value(&*session.status.borrow()).unwrap_or(Value::Null);
                Ok(json!({ "status": status }))
            }
            "login" => {
                self.require_operator(method)?;
                let user = match params.get("user_id") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(UserId::parse(s).map_err(|e| {
                        RpcError::new(
                            i64::from(codes_invalid_identifier()),
                            format!("user_id {s:?}: {e}"),
                        )
                    })?),
                    Some(_) => {
                        return Err(RpcError::new(
                            i64::from(codes::INVALID_PARAMETERS),
                            "user_id must be a string".into(),
                        ));
                    }
                };
                let sig = match params.get("user_sig") {
                    None | Some(Value::Null) => None,
                    // Never quoted back: the text is a secret.
                    Some(Value::String(text)) => {
                        Some(Box::new(self.check_sig(text, user.as_ref())?))
                    }
                    Some(_) => {
                        return Err(RpcError::new(
                            i64::from(codes::INVALID_PARAMETERS),
                            "user_sig must be a string".into(),
                        ));
                    }
                };
                let timeout = timeout_param(params)?;
                let (tx, rx) = oneshot::channel();
                self.send(Command::Login {
                    user,
                    sig,
                    reply: tx,
                })
                .await?;
                self.wait(rx, timeout, "login").await?;
                let st = session.status.borrow().clone();
                Ok(json!({ "login_user": st.login_user, "login_status": st.login_status }))
            }
            "logout" => {
                self.require_operator(method)?;
                let timeout = timeout_param(params)?;
                let (tx, rx) = oneshot::channel();
                self.send(Command::Logout { reply: tx }).await?;
                self.wait(rx, timeout, "logout").await?;
                Ok(json!({ "login_status": login_status::LOGOUT }))
            }
            "send_message" => {
                self.require_operator(method)?;
                messages::send_message(session, params).await
            }
            "metrics" => {
                // The status as it is now, and the store's figures when it answers (a busy
                // or broken store leaves them out rather than failing the scrape).
                let st = session.status.borrow().clone();
                let store = session
                    .store
                    .ask(|reply| StoreRequest::Stats { reply })
                    .await
                    .ok()
                    .map(|(messages, bytes)| crate::metrics::StoreFigures { messages, bytes });
                Ok(json!({ "text": crate::metrics::render(&st, store) }))
            }
            "get_conversations" => messages::get_conversations(session).await,
            "get_history" => messages::get_history(session, params).await,
            "read_inbox" => messages::read_inbox(session, params).await,
            "mark_read" => {
                self.require_operator(method)?;
                messages::mark_read(session, params).await
            }
            "ack_inbox" => {
                self.require_operator(method)?;
                messages::ack_inbox(session, params).await
            }
            #[cfg(feature = "test-hooks")]
            "debug_wedge" if self.server.test_hooks => {
                self.require_operator(method)?;
                self.send(Command::Wedge).await?;
                Ok(json!({ "wedged": true }))
            }
            #[cfg(feature = "test-hooks")]
            "debug_panic" if self.server.test_hooks => {
                self.require_operator(method)?;
                self.send(Command::Panic).await?;
                Ok(json!({ "panicking": true }))
            }
            other => Err(RpcError::new(
                rpc::METHOD_NOT_FOUND,
                format!(
                    "no method {other:?}; methods: status, get_login_user, get_login_status, \
                     login, logout, watch, version, metrics, send_message, get_conversations, \
                     get_history, mark_read, read_inbox, ack_inbox"
                ),
            )),
        }
    }

    /// Check a UserSig an app brought (format, app, expiry; for `user` when the app named
    /// one — otherwise the engine checks it against whom the session logs in as).
    fn check_sig(
        &self,
        text: &str,
        user: Option<&UserId>,
    ) -> Result<crate::usersig::AppSig, RpcError> {
        let app = self.server.session.status.borrow().sdk_app_id;
        let now = crate::clock::wall_ms() / 1000;
        let plausible = now >= crate::config::BUILD_UNIX;
        crate::usersig::check_app_sig(text, user, app, now, plausible)
            .map_err(|(code, message)| RpcError::new(i64::from(code), message))
    }

    async fn send(&self, cmd: Command) -> Result<(), RpcError> {
        self.server
            .session
            .commands
            .send(cmd)
            .await
            .map_err(|_| RpcError::new(rpc::NOT_AVAILABLE, "the daemon is shutting down".into()))
    }

    async fn wait(
        &self,
        rx: oneshot::Receiver<Result<(), crate::session::RequestError>>,
        timeout: Duration,
        what: &str,
    ) -> Result<(), RpcError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => {
                let class = self
                    .server
                    .session
                    .status
                    .borrow()
                    .last_error
                    .as_ref()
                    .filter(|l| l.code == e.code)
                    .map(|l| l.class.as_str());
                Err(RpcError {
                    code: i64::from(e.code),
                    message: e.message,
                    data: class.map(|c| json!({ "class": c })),
                })
            }
            Ok(Err(_)) => Err(RpcError::new(
                rpc::NOT_AVAILABLE,
                "the daemon is shutting down".into(),
            )),
            Err(_) => {
                let st = self.server.session.status.borrow().clone();
                Err(RpcError {
                    code: i64::from(codes::NET_CONN_TIMEOUT),
                    message: format!(
                        "{what} still in progress after {timeout:?} ({}); it goes on in the background: `imlinkctl watch` to follow it",
                        st.summary
                    ),
                    data: Some(json!({ "phase": st.phase })),
                })
            }
        }
    }
}

fn codes_invalid_identifier() -> u32 {
    crate::identity::InvalidUserId::CODE
}

pub fn timeout_param(params: &Value) -> Result<Duration, RpcError> {
    match params.get("timeout_ms") {
        None | Some(Value::Null) => Ok(Duration::from_secs(30)),
        Some(v) => v
            .as_u64()
            .filter(|ms| (1..=3_600_000).contains(ms))
            .map(Duration::from_millis)
            .ok_or_else(|| {
                RpcError::new(
                    rpc::INVALID_PARAMS,
                    "timeout_ms must be a whole number of milliseconds, 1 to 3600000".into(),
                )
            }),
    }
}

#[derive(Debug)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub(crate) fn new(code: i64, message: String) -> RpcError {
        RpcError {
            code,
            message,
            data: None,
        }
    }
}

pub fn error_line(id: &Value, code: i64, message: &str, data: Option<Value>) -> String {
    let mut err = json!({ "code": code, "message": message });
    if let (Some(d), Some(map)) = (data, err.as_object_mut()) {
        map.insert("data".into(), d);
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": err }).to_string() + "\n"
}

/// An event as a JSON-RPC notification: the method is the event name, the params its fields.
pub fn notification(e: &Event) -> String {
    let mut params = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Some(map) = params.as_object_mut() {
        map.remove("event");
    }
    json!({ "jsonrpc": "2.0", "method": e.name(), "params": params }).to_string() + "\n"
}

/// A message event as a JSON-RPC notification.
pub fn message_notification(e: &MessageEvent) -> String {
    let mut params = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Some(map) = params.as_object_mut() {
        map.remove("event");
    }
    json!({ "jsonrpc": "2.0", "method": e.name(), "params": params }).to_string() + "\n"
}

/// Remove the socket file on exit (when we created it).
pub fn cleanup(path: Option<&Path>) {
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
