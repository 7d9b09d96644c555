//! The store on a thread of its own (the pattern of the sd_notify thread: SQLite blocks,
//! fsync blocks, and neither may stall the session). Requests queue on a bounded channel;
//! the thread takes whatever is queued — up to a batch — runs it in **one transaction**, and
//! answers only after the COMMIT: many messages, one fsync, and no answer before the data is
//! on disk. Every request runs in a savepoint of its own (a request that fails leaves nothing
//! half done in the batch). A read that comes after a write in its batch is answered after
//! the COMMIT too: it may have seen that write, so if the COMMIT fails, the read fails with
//! it. A read before any write of its batch saw only committed data and is answered at once
//! (the courier's outbox pages do not wait for an fsync).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{Conversation, InboxPage, Received, StoreError, Stored};
use crate::message::WireMessage;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One request to the store.
pub enum StoreRequest {
    /// Queue an outgoing message; answers its seq once committed.
    Enqueue {
        owner: String,
        msg: WireMessage,
        reply: Reply<i64>,
    },
    /// Store a received message (once); answers once committed.
    Receive {
        owner: String,
        msg: WireMessage,
        /// (link, its place in the arrival order there): while one is refused for room, the
        /// later ones of that link are refused too, so messages are committed in the order
        /// they arrived. `None`: no order to keep (QoS 0).
        order: Option<(u64, u64)>,
        reply: Reply<Received>,
    },
    /// The broker's answer to an outgoing message.
    Settle {
        owner: String,
        id: String,
        failed: Option<u32>,
        reply: Reply<bool>,
    },
    /// A page of the outbox (see [`super::outbox_page`]).
    Outbox {
        owner: String,
        after: i64,
        limit: u32,
        skip: Vec<String>,
        reply: Reply<(Vec<(i64, WireMessage)>, bool)>,
    },
    Get {
        owner: String,
        id: String,
        reply: Reply<Option<Stored>>,
    },
    /// A page of conversations (see [`super::conversations`]).
    Conversations {
        owner: String,
        before: Option<(i64, String)>,
        limit: u32,
        reply: Reply<(Vec<Conversation>, bool)>,
    },
    History {
        owner: String,
        peer: String,
        before: Option<String>,
        limit: u32,
        reply: Reply<Vec<Stored>>,
    },
    MarkRead {
        owner: String,
        peer: String,
        reply: Reply<u64>,
    },
    /// A page of `owner`'s inbox after `after` (`None`: the acknowledged position); see
    /// [`super::read_inbox`].
    ReadInbox {
        owner: String,
        after: Option<i64>,
        limit: u32,
        reply: Reply<InboxPage>,
    },
    /// Acknowledge `owner`'s inbox up to `cursor` (see [`super::ack_inbox`]); answers the
    /// acknowledged position.
    AckInbox {
        owner: String,
        cursor: i64,
        session_user: String,
        reply: Reply<i64>,
    },
    /// (messages, bytes in use).
    Stats { reply: Reply<(u64, u64)> },
    /// What `owner` has waiting (see [`super::Counts`]).
    Counts {
        owner: String,
        reply: Reply<super::Counts>,
    },
}

impl StoreRequest {
    /// Whether it only reads (it changes nothing in the store).
    fn is_read(&self) -> bool {
        match self {
            StoreRequest::Outbox { .. }
            | StoreRequest::Get { .. }
            | StoreRequest::Conversations { .. }
            | StoreRequest::History { .. }
            | StoreRequest::ReadInbox { .. }
            | StoreRequest::Stats { .. }
            | StoreRequest::Counts { .. } => true,
            StoreRequest::Enqueue { .. }
            | StoreRequest::Receive { .. }
            | StoreRequest::Settle { .. }
            | StoreRequest::MarkRead { .. }
            | StoreRequest::AckInbox { .. } => false,
        }
    }
}

/// How many requests share one transaction at most.
const BATCH: usize = 512;
/// Requests queued before senders are told the store is busy.
const QUEUE: usize = 4096;

/// A handle on the store thread; cheap to clone.
///
/// The queue is bounded by a count, not by a preallocated ring: `sync_channel(4096)` would
/// allocate and touch 4096 slots up front (640 KiB: more than all the rest of an idle daemon's
/// private memory); this one grows only while requests wait.
#[derive(Clone)]
pub struct StoreHandle {
    tx: Sender<StoreRequest>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The store thread's end of the queue: every request taken out is counted off.
struct Requests {
    rx: Receiver<StoreRequest>,
    queued: Arc<AtomicUsize>,
}

impl Requests {
    fn recv(&self) -> Option<StoreRequest> {
        let r = self.rx.recv().ok()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(r)
    }

    fn try_recv(&self) -> Option<StoreRequest> {
        let r = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(r)
    }
}

impl StoreHandle {
    /// Open the store at `path` on a new thread. When it cannot be opened (a newer schema,
    /// an I/O error), the thread still runs and answers every request with the reason.
    pub fn open(path: PathBuf, cap_bytes: u64) -> (StoreHandle, Result<(), StoreError>) {
        Self::open_bounded(path, cap_bytes, QUEUE)
    }

    /// [`StoreHandle::open`] with at most `limit` requests waiting.
    pub(crate) fn open_bounded(
        path: PathBuf,
        cap_bytes: u64,
        limit: usize,
    ) -> (StoreHandle, Result<(), StoreError>) {
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let requests = Requests {
            rx,
            queued: queued.clone(),
        };
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("imlinkd-store".into())
            .spawn(move || {
                let conn = super::open(&path);
                let _ = opened_tx.send(conn.as_ref().map(|_| ()).map_err(Clone::clone));
                serve(conn, requests, cap_bytes);
            });
        let opened = match spawned {
            Ok(_) => opened_rx
                .recv()
                .unwrap_or_else(|_| Err(StoreError::Unavailable("the store thread died".into()))),
            Err(e) => Err(StoreError::Unavailable(format!(
                "could not start the store thread: {e}"
            ))),
        };
        (StoreHandle { tx, queued, limit }, opened)
    }

    /// Queue a request. Never blocks the caller: a full queue is an error (the store is
    /// seconds behind; the caller says so).
    pub fn send(&self, req: StoreRequest) -> Result<(), StoreError> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::Unavailable(
                "the message store is busy; try again".into(),
            ));
        }
        self.tx.send(req).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            StoreError::Unavailable("the store thread is gone".into())
        })
    }

    /// Requests sent and not yet taken by the store thread.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Ask and wait for the answer.
    pub async fn ask<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> StoreRequest,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("the store thread is gone".into())))
    }
}

/// A reply to send once the transaction is over: the request's result if the COMMIT
/// succeeded, the COMMIT's error otherwise (reads after a write too: they may have seen it,
/// and a failed COMMIT undoes it).
type Pending = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;

fn after_commit<T: Send + 'static>(tx: Reply<T>, r: Result<T, StoreError>) -> Pending {
    Box::new(move |commit| {
        let _ = tx.send(match commit {
            Ok(()) => r,
            Err(e) => Err(StoreError::Sql(format!(
                "could not commit ({e}); nothing of this request was kept"
            ))),
        });
    })
}

fn serve(conn: Result<Connection, StoreError>, rx: Requests, cap: u64) {
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            // Answer everything with the reason, for as long as the daemon runs.
            while let Some(req) = rx.recv() {
                refuse(req, &e);
            }
            return;
        }
    };
    // The first received message refused for room (link, arrival position), if one waits.
    let mut held: Option<(u64, u64)> = None;
    while let Some(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Some(r) => batch.push(r),
                None => break,
            }
        }
        let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(t) => t,
            Err(e) => {
                let e = StoreError::from(e);
                for req in batch {
                    refuse(req, &e);
                }
                continue;
            }
        };
        let mut pending = Vec::with_capacity(batch.len());
        let unchanged = tx.total_changes();
        let first_receive = batch.iter().find_map(|r| match r {
            StoreRequest::Receive { order, .. } => *order,
            _ => None,
        });
        for req in batch {
            // Nothing written yet in this transaction: a read sees only committed data.
            let at_once = req.is_read() && tx.total_changes() == unchanged;
            let reply = run(&tx, req, cap, &mut held);
            if at_once {
                reply(&Ok(()));
            } else {
                pending.push(reply);
            }
        }
        let commit = tx.commit().map_err(StoreError::from);
        if let Err(e) = &commit {
            tracing::error!("the message store could not commit: {e}");
            // Every receive of the batch failed with it: none after its first may go in
            // before that one does.
            if let Some(first) = first_receive {
                held = Some(first);
            }
        }
        for p in pending {
            p(&commit);
        }
    }
}

/// Run `f` in a savepoint of its own: a request that fails is undone entirely, and the rest
/// of the batch goes on. One exception: a refusal for space ([`StoreError::Full`]) keeps the
/// eviction it did — that space is free for the next request, and the error says so.
fn guarded<T>(c: &Connection, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    c.execute_batch("SAVEPOINT req")?;
    let r = f();
    let end = match &r {
        Ok(_) | Err(StoreError::Full { .. }) => c.execute_batch("RELEASE req"),
        Err(_) => c.execute_batch("ROLLBACK TO req; RELEASE req"),
    };
    match end {
        Ok(()) => r,
        Err(e) => Err(r.err().unwrap_or_else(|| e.into())),
    }
}

fn run(c: &Connection, req: StoreRequest, cap: u64, held: &mut Option<(u64, u64)>) -> Pending {
    match req {
        StoreRequest::Enqueue { owner, msg, reply } => {
            after_commit(reply, guarded(c, || super::enqueue(c, &owner, &msg, cap)))
        }
        StoreRequest::Receive {
            owner,
            msg,
            order,
            reply,
        } => {
            let r = match (order, *held) {
                // A later message of a link whose earlier one waits for room: refused
                // without trying (it must not be committed first).
                (Some((link, n)), Some((hl, hn))) if link == hl && n > hn => {
                    Err(StoreError::Full {
                        used: 0,
                        cap,
                        evicted: 0,
                        incoming: true,
                    })
                }
                _ => guarded(c, || super::receive(c, &owner, &msg, cap)),
            };
            match (order, &r) {
                (Some(o), Err(StoreError::Full { .. }))
                    if held.is_none_or(|h| h.0 != o.0 || o.1 < h.1) =>
                {
                    *held = Some(o);
                }
                (Some(o), Ok(_)) if *held == Some(o) || held.is_some_and(|h| h.0 != o.0) => {
                    *held = None;
                }
                _ => {}
            }
            after_commit(reply, r)
        }
        StoreRequest::Settle {
            owner,
            id,
            failed,
            reply,
        } => after_commit(reply, guarded(c, || super::settle(c, &owner, &id, failed))),
        StoreRequest::Outbox {
            owner,
            after,
            limit,
            skip,
            reply,
        } => after_commit(
            reply,
            guarded(c, || super::outbox_page(c, &owner, after, limit, &skip)),
        ),
        StoreRequest::Get { owner, id, reply } => {
            after_commit(reply, guarded(c, || super::get(c, &owner, &id)))
        }
        StoreRequest::Conversations {
            owner,
            before,
            limit,
            reply,
        } => after_commit(
            reply,
            guarded(c, || {
                super::conversations(
                    c,
                    &owner,
                    before.as_ref().map(|(s, p)| (*s, p.as_str())),
                    limit,
                )
            }),
        ),
        StoreRequest::History {
            owner,
            peer,
            before,
            limit,
            reply,
        } => after_commit(
            reply,
            guarded(c, || {
                super::history(c, &owner, &peer, before.as_deref(), limit)
            }),
        ),
        StoreRequest::MarkRead { owner, peer, reply } => {
            after_commit(reply, guarded(c, || super::mark_read(c, &owner, &peer)))
        }
        StoreRequest::ReadInbox {
            owner,
            after,
            limit,
            reply,
        } => after_commit(
            reply,
            guarded(c, || super::read_inbox(c, &owner, after, limit)),
        ),
        StoreRequest::AckInbox {
            owner,
            cursor,
            session_user,
            reply,
        } => after_commit(
            reply,
            guarded(c, || super::ack_inbox(c, &owner, cursor, &session_user)),
        ),
        StoreRequest::Stats { reply } => after_commit(
            reply,
            super::count(c).and_then(|n| super::used_bytes(c).map(|b| (n, b))),
        ),
        StoreRequest::Counts { owner, reply } => after_commit(reply, super::counts(c, &owner)),
    }
}

fn refuse(req: StoreRequest, e: &StoreError) {
    let e = e.clone();
    match req {
        StoreRequest::Enqueue { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Receive { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Settle { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Outbox { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Get { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Conversations { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::History { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::MarkRead { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::ReadInbox { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::AckInbox { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Stats { reply, .. } => drop(reply.send(Err(e))),
        StoreRequest::Counts { reply, .. } => drop(reply.send(Err(e))),
    }
}
