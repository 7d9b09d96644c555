//! One client's connection: splitting its bytes into request lines (pure: the fuzzer drives
//! it), the time limits on whole lines, forwarding a watcher's notifications, reserving a
//! paged answer's share of the answer budget, and writing answers with a timeout.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use super::rpc::{
    self, Request, RpcError, error_line, message_notification, notification, parse_request,
};
use super::{ANSWER_BUDGET, ANSWER_SHARE, ANSWER_WAIT, Peer, Server, Slot, cmd};
use crate::courier::MessageEvent;
use crate::session::Event;

/// How long a write to one client may take before that client is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn write_line(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    line: &str,
) -> Result<(), ()> {
    match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(line.as_bytes())).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

pub(super) enum Next {
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

pub(super) struct ClientConn<'a> {
    pub(super) server: &'a Arc<Server>,
    pub(super) peer: Peer,
    pub(super) slot: Slot,
    pub(super) lines: LineReader,
    pub(super) watch: Option<broadcast::Receiver<Event>>,
    /// Message notifications, for a watcher.
    pub(super) watch_messages: Option<broadcast::Receiver<MessageEvent>>,
    /// What the answer being made or written holds of [`ANSWER_BUDGET`] and of its uid's
    /// [`ANSWER_SHARE`].
    pub(super) answer: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl ClientConn<'_> {
    /// The next complete request line, or a notification to forward, or the end.
    ///
    /// Time limits count whole lines, not reads (one byte every few minutes held a slot
    /// forever): a client that is not watching must complete a request within
    /// `idle_timeout` of the previous one; a watcher may stay silent, but a line it starts
    /// must be complete within `idle_timeout`.
    pub(super) async fn next_line(&mut self, rd: &mut tokio::net::unix::OwnedReadHalf) -> Next {
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
    pub(super) async fn request(&mut self, line: &[u8]) -> Option<String> {
        let req = match parse_request(line) {
            Ok(r) => r,
            Err((id, code, msg)) => return Some(error_line(&id, code, &msg, None)),
        };
        let result = match self.reserve_answer(&req).await {
            Ok(()) => cmd::dispatch(self, &req.method, &req.params).await,
            Err(e) => Err(e),
        };
        let id = req.id?;
        let line = match result {
            Ok(r) => json!({ "jsonrpc": "2.0", "id": id, "result": r }).to_string() + "\n",
            Err(e) => error_line(&id, e.code, &e.message, e.data),
        };
        // Keep only what the answer takes (the rest of the bound goes back at once).
        if let Some((all, mine)) = self.answer.as_mut() {
            let excess = all.num_permits().saturating_sub(line.len());
            drop((all.split(excess), mine.split(excess)));
        }
        Some(line)
    }

    /// For a request whose answer is a page of messages, wait (in turn, at most
    /// [`ANSWER_WAIT`]) until its bound fits in its uid's [`ANSWER_SHARE`] and in
    /// [`ANSWER_BUDGET`], and hold both.
    async fn reserve_answer(&mut self, req: &Request) -> Result<(), RpcError> {
        let Some(bound) = cmd::answer_bound(&req.method, &req.params) else {
            return Ok(());
        };
        let want = u32::try_from(bound.min(ANSWER_SHARE)).unwrap_or(u32::MAX);
        let share = {
            let mut l = self.server.limits.lock().unwrap_or_else(|p| p.into_inner());
            l.answer_share
                .entry(self.peer.uid)
                .or_insert_with(|| Arc::new(Semaphore::new(ANSWER_SHARE)))
                .clone()
        };
        let budget = self.server.answers.clone();
        let both = async {
            let mine = share.acquire_many_owned(want).await?;
            let all = budget.acquire_many_owned(want).await?;
            Ok::<_, tokio::sync::AcquireError>((all, mine))
        };
        match tokio::time::timeout(ANSWER_WAIT, both).await {
            Ok(Ok(permits)) => {
                self.answer = Some(permits);
                Ok(())
            }
            _ => Err(RpcError::new(
                rpc::NOT_AVAILABLE,
                format!(
                    "busy: answers to other clients fill the answer budget ({} MiB being \
                     written); try again",
                    ANSWER_BUDGET >> 20
                ),
            )),
        }
    }
}
