//! The message store: SQLite (bundled), one file in the state directory, WAL with
//! `synchronous=FULL` (a committed transaction survives power loss: NORMAL may roll back the
//! last commits).
//!
//! What it holds, per local user (the *owner*: an account switch keeps each user's messages
//! apart): every message sent and received, in one table, in the order the store saw them
//! (`seq`, never reused, even for an evicted message); the outbox is the outgoing messages
//! still `queued`; the conversations (last message, unread count) are kept in step in the same
//! transaction; each owner's inbox record says how far the inbox consumer (an app using
//! `read_inbox`/`ack_inbox`) has acknowledged, and the newest seq ever received.
//!
//! Guarantees: an outgoing message is committed before `send_message` answers; a received
//! one is committed (deduplicated within its conversation: see [`receive`]) before its PUBACK;
//! within one conversation (owner, peer) a message id is unique, whichever direction, so a
//! page of history that ends at an id ends at one message; nothing unsent and
//! nothing unconsumed is ever evicted (see [`evict`] for what "consumed" means). The cap
//! bounds both directions: received messages may fill [`RECEIVE_SHARE`] of it, sends all of
//! it, so a peer's flood cannot block local sends; a received message that does not fit is
//! refused ([`StoreError::Full`]) and stays with the broker. The schema is versioned
//! (`PRAGMA user_version`) and migrated forward; a store written by a newer imlinkd is
//! refused, untouched.
//!
//! `thread.rs` runs it on a dedicated thread and commits whatever is queued in one
//! transaction (group commit: one fsync for many messages).

mod thread;

pub use thread::{StoreHandle, StoreRequest};

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::message::{Kind, WireMessage};

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 3;

/// The share of `store.max_bytes` received messages may fill, in percent: the rest is kept
/// for local sends, which may fill all of it (a flood from peers cannot block them).
pub const RECEIVE_SHARE: u64 = 90;
/// Once eviction runs, it goes down to this share of the cap (in percent), so that it does
/// not run again for every message.
pub const EVICT_TO: u64 = 80;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the message store {path} was written by a newer imlinkd (schema {found}, this one knows {SCHEMA_VERSION}); it is left untouched: run the newer imlinkd, or move the file aside"
    )]
    Newer { path: String, found: i64 },
    /// No room: for a send, the cap is reached; for a received message, its share of the cap
    /// ([`RECEIVE_SHARE`]). `evicted` messages were evicted trying (that stays done).
    #[error("{}", full_message(*.used, *.cap, *.evicted, *.incoming))]
    Full {
        used: u64,
        cap: u64,
        evicted: u64,
        incoming: bool,
    },
    /// An outgoing message whose id a received message of the same conversation already has
    /// (a peer that predicted one of our ids): nothing was stored; sending again gives a new id.
    #[error(
        "message id {id} is already used in the conversation with {peer} (by a received \
         message): the message was not stored or sent; send it again (it gets a new id)"
    )]
    IdTaken { id: String, peer: String },
    /// An inbox cursor the store cannot take (unknown owner, beyond the newest message):
    /// the message says what to do.
    #[error("{0}")]
    Cursor(String),
    #[error("the message store failed: {0}")]
    Sql(String),
    #[error("the message store is not available: {0}")]
    Unavailable(String),
}

/// What "full" means and what to do about it, in the words of the direction refused.
fn full_message(used: u64, cap: u64, evicted: u64, incoming: bool) -> String {
    let what = "what it holds is unsent messages and received messages not yet consumed \
                (acknowledged with ack_inbox by the inbox consumer, or marked read when the \
                user has no inbox consumer)";
    let tried = if evicted == 0 {
        "nothing can be evicted".to_string()
    } else {
        format!("evicting {evicted} consumed messages did not free enough")
    };
    if incoming {
        format!(
            "the message store cannot take a received message: received messages may fill \
             {RECEIVE_SHARE}% of store.max_bytes ({used} of {cap} bytes used) and {tried}; \
             {what}. The broker keeps it (and the ones after it) until an app consumes the \
             inbox (ack_inbox, or mark_read) or store.max_bytes is raised"
        )
    } else {
        format!(
            "the message store is full ({used} of {cap} bytes) and {tried}; {what}: consume \
             them (ack_inbox, mark_read), or raise store.max_bytes"
        )
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sql(e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Outgoing, not yet acknowledged by the broker.
    Queued,
    /// Outgoing, PUBACK 0x00.
    Sent,
    /// Outgoing, refused for a reason that cannot change (`code`).
    Failed,
    /// Incoming, not marked read.
    Unread,
    /// Incoming, marked read.
    Read,
}

impl State {
    fn from_code(c: i64) -> State {
        match c {
            0 => State::Queued,
            1 => State::Sent,
            2 => State::Failed,
            3 => State::Unread,
            _ => State::Read,
        }
    }
}

/// A message as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The store's order (and the inbox cursor's position for incoming messages).
    pub seq: i64,
    pub id: String,
    pub peer: String,
    pub direction: Direction,
    pub kind: Kind,
    pub body: String,
    /// Unix milliseconds at the sender.
    pub ts: i64,
    pub state: State,
    /// For a failed outgoing message: the IM code of the refusal.
    pub code: Option<u32>,
}

/// One conversation, as `get_conversations` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub peer: String,
    pub unread: u64,
    pub last: Option<Stored>,
    /// The seq of its last message (0 when every message was evicted): the list's order,
    /// and with `peer` the position a page ends at.
    #[serde(skip)]
    pub last_seq: i64,
}

/// What receiving a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New: stored with this seq.
    New(i64),
    /// Already there (a redelivery): nothing changed.
    Duplicate,
}

/// One owner's inbox: how far its consumer acknowledged, and the newest message received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Inbox {
    /// The consumer's acknowledged position; `None`: this user never had an inbox consumer
    /// (then marking a message read is what consumes it).
    pub acked: Option<i64>,
    /// The newest seq ever received for this owner (0: none); a cursor beyond it is refused.
    pub newest: i64,
    /// The owner has an inbox record (received a message, or was acknowledged).
    pub known: bool,
}

/// A page of the inbox: the messages, and the position after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxPage {
    pub messages: Vec<Stored>,
    /// The last seq returned, or the position read from when there was nothing.
    pub cursor: i64,
}

/// Open (or create) the store at `path` and bring its schema up to date.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    make_private(path)?;
    let c = Connection::open(path)?;
    // The version is read before anything is written: a store from a newer imlinkd is left
    // byte for byte as it was (no journal mode change, no vacuum setting).
    refuse_newer(&c, path)?;
    // Before any table exists: pages freed by eviction can be given back to the file system.
    c.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let mode: String = c.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Sql(format!(
            "journal_mode stayed {mode}, not WAL"
        )));
    }
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    // SQLite's default page cache is 2 MiB per connection; on a kiosk the kernel's page cache
    // holds the file anyway, so 512 KiB keeps a 100,000-message store within the memory
    // budget (benches/messaging.rs measures it).
    c.pragma_update(None, "cache_size", -512)?;
    c.busy_timeout(std::time::Duration::from_secs(5))?;
    migrate(&c, path)?;
    Ok(c)
}

/// Messages are private: the file is 0600 before SQLite opens it, so the -wal and -shm files
/// SQLite creates beside it (with the database's mode) are 0600 too, whatever the umask. A
/// file an older imlinkd left open to others is made 0600 (its bytes are not touched).
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let fail = |e: std::io::Error| {
        StoreError::Unavailable(format!(
            "{}: cannot make it private (0600): {e}",
            path.display()
        ))
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    if f.metadata().map_err(fail)?.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(fail)?;
    }
    Ok(())
}

/// Refuse a schema newer than [`SCHEMA_VERSION`] (left alone); otherwise its version.
fn refuse_newer(c: &Connection, path: &Path) -> Result<i64, StoreError> {
    let found: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::Newer {
            path: path.display().to_string(),
            found,
        });
    }
    Ok(found)
}

/// Run `f` in one IMMEDIATE transaction: committed if it succeeds, rolled back otherwise.
fn in_transaction(
    c: &Connection,
    f: impl FnOnce(&Connection) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    match f(c).and_then(|()| Ok(c.execute_batch("COMMIT")?)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Bring the schema from its version to [`SCHEMA_VERSION`], one step at a time, each in a
/// transaction (a step that fails leaves the file at the version before it).
fn migrate(c: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = refuse_newer(c, path)?;
    if found < 1 {
        in_transaction(c, |c| Ok(c.execute_batch(SCHEMA_V1)?))?;
    }
    if found < 2 {
        in_transaction(c, v1_to_v2)?;
        if found == 1 {
            // The old table's pages: back to the file system.
            give_back_free_pages(c)?;
        }
    }
    if found < 3 {
        in_transaction(c, v2_to_v3)?;
    }
    Ok(())
}

/// Version 1, as imlinkd 0.1 wrote it (the first step for a new file).
const SCHEMA_V1: &str = "
    CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        owner TEXT NOT NULL,
        id TEXT NOT NULL,
        peer TEXT NOT NULL,
        dir INTEGER NOT NULL,
        kind TEXT NOT NULL,
        body TEXT NOT NULL,
        ts INTEGER NOT NULL,
        state INTEGER NOT NULL,
        code INTEGER,
        UNIQUE (owner, id)
    );
    CREATE INDEX IF NOT EXISTS messages_by_peer ON messages (owner, peer, ts, id);
    CREATE INDEX IF NOT EXISTS messages_outbox ON messages (owner, state, seq);
    CREATE TABLE IF NOT EXISTS conversations (
        owner TEXT NOT NULL,
        peer TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        unread INTEGER NOT NULL,
        PRIMARY KEY (owner, peer)
    );
    CREATE TABLE IF NOT EXISTS inbox_cursor (
        owner TEXT PRIMARY KEY,
        acked INTEGER NOT NULL
    );
    PRAGMA user_version = 1;";

/// Version 2:
/// - received messages are deduplicated by sender and id (`UNIQUE (owner, dir, peer, id)`;
///   v1's `UNIQUE (owner, id)` let a peer that sent a predictable id first pre-empt another
///   peer's message), which needs the table rebuilt; the body goes last, so reading a row's
///   other columns (eviction, counts) never reads a 12 KB body's overflow pages;
/// - `inboxes` replaces `inbox_cursor`: the acknowledged position (NULL: no consumer) and the
///   newest seq received, so a cursor from the future can be refused; a v1 cursor beyond
///   every seq ever given (v1 accepted any) is brought back to the last one;
/// - unread counts are recounted (v1's eviction left evicted messages counted);
/// - indexes for the inbox and for paging conversations.
fn v1_to_v2(c: &Connection) -> Result<(), StoreError> {
    // Every seq ever given stays given: the sequence must not go back to the highest seq
    // still stored when the newest messages were evicted.
    let given: i64 = c
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    c.execute_batch(
        "CREATE TABLE messages_v2 (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             owner TEXT NOT NULL,
             id TEXT NOT NULL,
             peer TEXT NOT NULL,
             dir INTEGER NOT NULL,
             kind TEXT NOT NULL,
             ts INTEGER NOT NULL,
             state INTEGER NOT NULL,
             code INTEGER,
             body TEXT NOT NULL,
             UNIQUE (owner, dir, peer, id)
         );
         INSERT INTO messages_v2 (seq, owner, id, peer, dir, kind, ts, state, code, body)
             SELECT seq, owner, id, peer, dir, kind, ts, state, code, body
             FROM messages ORDER BY seq;
         DROP TABLE messages;
         ALTER TABLE messages_v2 RENAME TO messages;
         CREATE INDEX messages_by_peer ON messages (owner, peer, ts, id);
         CREATE INDEX messages_outbox ON messages (owner, state, seq);
         CREATE INDEX messages_inbox ON messages (owner, dir, seq);
         CREATE INDEX conversations_by_last ON conversations (owner, last_seq, peer);
         CREATE TABLE inboxes (
             owner TEXT PRIMARY KEY,
             acked INTEGER,
             newest INTEGER NOT NULL DEFAULT 0
         );",
    )?;
    c.execute(
        "INSERT INTO sqlite_sequence (name, seq)
             SELECT 'messages', 0 WHERE NOT EXISTS
                 (SELECT 1 FROM sqlite_sequence WHERE name = 'messages')",
        [],
    )?;
    c.execute(
        "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'messages'",
        params![given],
    )?;
    c.execute(
        "INSERT INTO inboxes (owner, acked, newest)
             SELECT owner, MAX(acked), MAX(newest) FROM (
                 SELECT owner, NULL AS acked, MAX(seq) AS newest
                     FROM messages WHERE dir = 0 GROUP BY owner
                 UNION ALL
                 SELECT owner, MIN(acked, ?1), MIN(acked, ?1) FROM inbox_cursor)
             GROUP BY owner",
        params![given],
    )?;
    c.execute_batch(
        "DROP TABLE inbox_cursor;
         UPDATE conversations SET unread = (
             SELECT COUNT(*) FROM messages m
             WHERE m.owner = conversations.owner AND m.peer = conversations.peer
               AND m.dir = 0 AND m.state = 3);
         PRAGMA user_version = 2;",
    )?;
    Ok(())
}

/// Version 3: within one conversation (owner, peer) a message id is unique, whichever
/// direction.
/// - `get_history` pages by `(ts, id)` and ends a page at a message id. v2 deduplicated
///   received messages per direction, so a peer could store a message with one of our own
///   ids in its conversation with us; a page's anchor then matched two rows, and with a `ts`
///   of its choosing the peer could hide every message between them from paging. A received
///   message that reused an id of its conversation is deleted here — receiving it now is a
///   duplicate (acknowledged, dropped) — never our own message (it may be queued); the
///   conversation's unread count and last message follow.
/// - The unique index `messages_by_id (owner, id, peer)` keeps that rule and finds a page's
///   anchor, a message to settle and a message by id without scanning. v2's
///   `UNIQUE (owner, dir, peer, id)` stays (implied by the new one): dropping it would
///   rebuild the table, copying every body, and need the store's size again in free disk.
fn v2_to_v3(c: &Connection) -> Result<(), StoreError> {
    const REUSED: &str = "m.dir = 0 AND EXISTS (SELECT 1 FROM messages o
         WHERE o.owner = m.owner AND o.dir = 1 AND o.peer = m.peer AND o.id = m.id)";
    let touched: Vec<(String, String)> = c
        .prepare(&format!(
            "SELECT DISTINCT m.owner, m.peer FROM messages m WHERE {REUSED}"
        ))?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    c.execute(
        &format!("DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages m WHERE {REUSED})"),
        [],
    )?;
    let mut fix = c.prepare(
        "UPDATE conversations SET
             unread = (SELECT COUNT(*) FROM messages m WHERE m.owner = ?1 AND m.peer = ?2
                 AND m.dir = 0 AND m.state = 3),
             last_seq = COALESCE((SELECT MAX(seq) FROM messages m
                 WHERE m.owner = ?1 AND m.peer = ?2), 0)
         WHERE owner = ?1 AND peer = ?2",
    )?;
    for (owner, peer) in &touched {
        fix.execute(params![owner, peer])?;
    }
    c.execute_batch(
        "CREATE UNIQUE INDEX messages_by_id ON messages (owner, id, peer);
         PRAGMA user_version = 3;",
    )?;
    Ok(())
}

fn row_to_stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    let dir: i64 = r.get("dir")?;
    let kind: String = r.get("kind")?;
    let code: Option<i64> = r.get("code")?;
    Ok(Stored {
        seq: r.get("seq")?,
        id: r.get("id")?,
        peer: r.get("peer")?,
        direction: if dir == 0 {
            Direction::In
        } else {
            Direction::Out
        },
        kind: Kind::parse(&kind).unwrap_or(Kind::Custom),
        body: r.get("body")?,
        ts: r.get("ts")?,
        state: State::from_code(r.get("state")?),
        code: code.and_then(|c| u32::try_from(c).ok()),
    })
}

const COLUMNS: &str = "seq, id, peer, dir, kind, ts, state, code, body";

/// Give the free pages back to the file system. (`PRAGMA incremental_vacuum` frees one page
/// per step: it must be stepped to the end, which `execute_batch` does not do.)
fn give_back_free_pages(c: &Connection) -> Result<(), StoreError> {
    let mut st = c.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut rows = st.query([])?;
    while rows.next()?.is_some() {}
    Ok(())
}

/// Bytes the store uses (pages in use, not free ones).
pub fn used_bytes(c: &Connection) -> Result<u64, StoreError> {
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Which messages are *consumed*, so eviction may take them (oldest first):
/// - outgoing: sent or failed — never a queued one;
/// - incoming, for an owner with an inbox consumer (an acknowledged position exists): those
///   at or before that position, read or not — never one after it, even marked read;
/// - incoming, for an owner that never had a consumer: those marked read.
const EVICTABLE: &str = "
    SELECT m.seq, m.owner, m.peer, m.state FROM messages m
    LEFT JOIN inboxes i ON i.owner = m.owner
    WHERE (m.dir = 1 AND m.state IN (1, 2))
       OR (m.dir = 0 AND i.acked IS NULL AND m.state = 4)
       OR (m.dir = 0 AND m.seq <= i.acked)
    ORDER BY m.seq LIMIT 200";

/// Make room: delete the oldest consumed messages (see [`EVICTABLE`]) until the store is
/// under `target` bytes, or nothing consumed is left. Unread counts and each conversation's
/// last message follow. Returns how many were evicted.
pub fn evict(c: &Connection, target: u64) -> Result<u64, StoreError> {
    let mut evicted = 0;
    while used_bytes(c)? > target {
        let batch: Vec<(i64, String, String, i64)> = c
            .prepare_cached(EVICTABLE)?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        if batch.is_empty() {
            break;
        }
        // Per conversation: how many unread messages go (they stop counting as unread).
        let mut touched: HashMap<(String, String), i64> = HashMap::new();
        for (_, owner, peer, state) in &batch {
            *touched.entry((owner.clone(), peer.clone())).or_default() += i64::from(*state == 3);
        }
        let marks = vec!["?"; batch.len()].join(", ");
        let n = c.execute(
            &format!("DELETE FROM messages WHERE seq IN ({marks})"),
            rusqlite::params_from_iter(batch.iter().map(|b| b.0)),
        )? as u64;
        evicted += n;
        // The conversations they belonged to: fewer unread, and the last message may have
        // gone (then the newest one left, or 0 when none is).
        let mut fix = c.prepare_cached(
            "UPDATE conversations SET
                 unread = MAX(unread - ?3, 0),
                 last_seq = COALESCE((SELECT MAX(seq) FROM messages m
                     WHERE m.owner = ?1 AND m.peer = ?2), 0)
             WHERE owner = ?1 AND peer = ?2",
        )?;
        for ((owner, peer), unread) in &touched {
            fix.execute(params![owner, peer, unread])?;
        }
        if n == 0 {
            break;
        }
    }
    if evicted > 0 {
        give_back_free_pages(c)?;
    }
    Ok(evicted)
}

/// Room for one more message in a direction: outgoing may fill the whole `cap`, incoming
/// [`RECEIVE_SHARE`] of it. At the limit, consumed messages are evicted down to
/// [`EVICT_TO`]; if that is not enough, [`StoreError::Full`] says how many were evicted
/// (they stay evicted: the caller commits that even though it refuses the message).
pub fn make_room(c: &Connection, cap: u64, incoming: bool) -> Result<(), StoreError> {
    let limit = if incoming {
        cap / 100 * RECEIVE_SHARE
    } else {
        cap
    };
    if used_bytes(c)? < limit {
        return Ok(());
    }
    let evicted = evict(c, cap / 100 * EVICT_TO)?;
    let used = used_bytes(c)?;
    if used >= limit {
        return Err(StoreError::Full {
            used,
            cap,
            evicted,
            incoming,
        });
    }
    Ok(())
}

fn touch_conversation(
    c: &Connection,
    owner: &str,
    peer: &str,
    seq: i64,
    unread: i64,
) -> Result<(), StoreError> {
    c.prepare_cached(
        "INSERT INTO conversations (owner, peer, last_seq, unread) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (owner, peer) DO UPDATE SET
             last_seq = MAX(last_seq, excluded.last_seq),
             unread = unread + excluded.unread",
    )?
    .execute(params![owner, peer, seq, unread])?;
    Ok(())
}

/// Queue an outgoing message (committed before the caller answers). Refused when the store is
/// full and eviction cannot make room ([`make_room`]), and when a received message of the
/// conversation already has its id ([`StoreError::IdTaken`]: ids are unique per
/// conversation).
pub fn enqueue(c: &Connection, owner: &str, m: &WireMessage, cap: u64) -> Result<i64, StoreError> {
    if in_conversation(c, owner, &m.to, &m.id)?.is_some() {
        return Err(StoreError::IdTaken {
            id: m.id.clone(),
            peer: m.to.clone(),
        });
    }
    make_room(c, cap, false)?;
    insert(c, owner, m, &m.to, 1, 0, 0)
}

/// The seq of the message of `owner`'s conversation with `peer` that has `id`, either
/// direction (there is at most one: `messages_by_id`).
fn in_conversation(
    c: &Connection,
    owner: &str,
    peer: &str,
    id: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(
        c.prepare_cached("SELECT seq FROM messages WHERE owner = ?1 AND id = ?2 AND peer = ?3")?
            .query_row(params![owner, id, peer], |r| r.get(0))
            .optional()?,
    )
}

/// Store a received message once. A duplicate changes nothing: a message of the same
/// conversation (the sender) with that id, either direction — a redelivery, or a peer
/// reusing one of our ids to it (ids are unique per conversation, which `get_history`'s
/// paging needs). Another peer's message with that id is not one: a predictable id cannot
/// pre-empt someone else's message. Received messages may fill [`RECEIVE_SHARE`] of the
/// cap; beyond it, after eviction, [`StoreError::Full`]: the courier does not acknowledge
/// it, so the broker keeps it.
pub fn receive(
    c: &Connection,
    owner: &str,
    m: &WireMessage,
    cap: u64,
) -> Result<Received, StoreError> {
    if in_conversation(c, owner, &m.from, &m.id)?.is_some() {
        return Ok(Received::Duplicate);
    }
    make_room(c, cap, true)?;
    let seq = insert(c, owner, m, &m.from, 0, 3, 1)?;
    c.prepare_cached(
        "INSERT INTO inboxes (owner, newest) VALUES (?1, ?2)
         ON CONFLICT (owner) DO UPDATE SET newest = MAX(newest, excluded.newest)",
    )?
    .execute(params![owner, seq])?;
    Ok(Received::New(seq))
}

/// Insert `m` as `owner`'s message with `peer`, in direction `dir` (1 out, 0 in) and `state`,
/// and bring the conversation up to date (`unread` more unread messages); returns its seq.
fn insert(
    c: &Connection,
    owner: &str,
    m: &WireMessage,
    peer: &str,
    dir: i64,
    state: i64,
    unread: i64,
) -> Result<i64, StoreError> {
    c.prepare_cached(
        "INSERT INTO messages (owner, id, peer, dir, kind, body, ts, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        owner,
        m.id,
        peer,
        dir,
        m.kind.as_str(),
        m.body,
        m.ts,
        state
    ])?;
    let seq = c.last_insert_rowid();
    touch_conversation(c, owner, peer, seq, unread)?;
    Ok(seq)
}

/// The broker's answer to an outgoing message: sent, or failed with an IM code.
pub fn settle(
    c: &Connection,
    owner: &str,
    id: &str,
    failed: Option<u32>,
) -> Result<bool, StoreError> {
    let n = match failed {
        None => c.execute(
            "UPDATE messages SET state = 1 WHERE owner = ?1 AND id = ?2 AND dir = 1 AND state = 0",
            params![owner, id],
        )?,
        Some(code) => c.execute(
            "UPDATE messages SET state = 2, code = ?3 WHERE owner = ?1 AND id = ?2 AND dir = 1 AND state = 0",
            params![owner, id, i64::from(code)],
        )?,
    };
    Ok(n > 0)
}

/// The outbox: `owner`'s queued messages, oldest first (seq and id).
pub fn outbox(c: &Connection, owner: &str) -> Result<Vec<(i64, String)>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT seq, id FROM messages WHERE owner = ?1 AND state = 0 ORDER BY seq",
    )?;
    let rows = st.query_map(params![owner], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A page of `owner`'s outbox for the courier: up to `limit` queued messages with seq >
/// `after`, oldest first, leaving out messages to the `skip` peers; and whether that was
/// all of them.
pub fn outbox_page(
    c: &Connection,
    owner: &str,
    after: i64,
    limit: u32,
    skip: &[String],
) -> Result<(Vec<(i64, WireMessage)>, bool), StoreError> {
    let marks = vec!["?"; skip.len()].join(", ");
    let sql = format!(
        "SELECT seq, id, peer, kind, body, ts FROM messages
         WHERE owner = ? AND state = 0 AND dir = 1 AND seq > ? AND peer NOT IN ({marks})
         ORDER BY seq LIMIT ?"
    );
    let mut st = c.prepare_cached(&sql)?;
    let mut args: Vec<rusqlite::types::Value> = vec![owner.to_string().into(), after.into()];
    args.extend(skip.iter().map(|p| rusqlite::types::Value::from(p.clone())));
    args.push((i64::from(limit) + 1).into());
    let rows = st.query_map(rusqlite::params_from_iter(args), |r| {
        let kind: String = r.get(3)?;
        Ok((
            r.get::<_, i64>(0)?,
            WireMessage {
                id: r.get(1)?,
                from: owner.to_string(),
                to: r.get(2)?,
                kind: Kind::parse(&kind).unwrap_or(Kind::Custom),
                body: r.get(4)?,
                ts: r.get(5)?,
            },
        ))
    })?;
    let mut page: Vec<(i64, WireMessage)> = rows.collect::<Result<_, _>>()?;
    let complete = page.len() <= limit as usize;
    page.truncate(limit as usize);
    Ok((page, complete))
}

/// One message by id (to publish it, or to tell an app what happened to it): the
/// outgoing one with that id, else the oldest received one.
pub fn get(c: &Connection, owner: &str, id: &str) -> Result<Option<Stored>, StoreError> {
    Ok(c.query_row(
        &format!(
            "SELECT {COLUMNS} FROM messages WHERE owner = ?1 AND id = ?2
             ORDER BY dir DESC, seq LIMIT 1"
        ),
        params![owner, id],
        row_to_stored,
    )
    .optional()?)
}

/// A page of conversations, newest first (by their last message; those whose messages were
/// all evicted last), starting after `before` — the `(last_seq, peer)` a previous page ended
/// at — and whether more follow.
pub fn conversations(
    c: &Connection,
    owner: &str,
    before: Option<(i64, &str)>,
    limit: u32,
) -> Result<(Vec<Conversation>, bool), StoreError> {
    let (seq, peer) = before.unwrap_or((i64::MAX, ""));
    let rows: Vec<(String, i64, i64)> = c
        .prepare_cached(
            "SELECT peer, unread, last_seq FROM conversations
             WHERE owner = ?1 AND (last_seq < ?2 OR (last_seq = ?2 AND peer < ?3) OR ?4)
             ORDER BY last_seq DESC, peer DESC LIMIT ?5",
        )?
        .query_map(
            params![owner, seq, peer, before.is_none(), i64::from(limit) + 1],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?
        .collect::<Result<_, _>>()?;
    let more = rows.len() > limit as usize;
    let mut last = c.prepare_cached(&format!("SELECT {COLUMNS} FROM messages WHERE seq = ?1"))?;
    let mut out = Vec::with_capacity(rows.len().min(limit as usize));
    for (peer, unread, last_seq) in rows.into_iter().take(limit as usize) {
        out.push(Conversation {
            peer,
            unread: unread.max(0) as u64,
            last: last
                .query_row(params![last_seq], row_to_stored)
                .optional()?,
            last_seq,
        });
    }
    Ok((out, more))
}

/// A page of history with `peer`, newest first, strictly before `before` (a message id)
/// when given: pages backwards by `(ts, id)`, a total order within a conversation (ids are
/// unique in it), so pages never skip or repeat a message whatever ids and ts peers chose.
pub fn history(
    c: &Connection,
    owner: &str,
    peer: &str,
    before: Option<&str>,
    limit: u32,
) -> Result<Vec<Stored>, StoreError> {
    let anchor: Option<(i64, String)> = match before {
        None => None,
        Some(id) => {
            let found = c
                .prepare_cached(
                    "SELECT ts, id FROM messages WHERE owner = ?1 AND id = ?2 AND peer = ?3",
                )?
                .query_row(params![owner, id, peer], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match found {
                Some(a) => Some(a),
                None => return Ok(Vec::new()),
            }
        }
    };
    let (ts, id) = anchor.unwrap_or((i64::MAX, String::new()));
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM messages
         WHERE owner = ?1 AND peer = ?2 AND (ts < ?3 OR (ts = ?3 AND id < ?4) OR ?5)
         ORDER BY ts DESC, id DESC LIMIT ?6"
    ))?;
    let rows = st.query_map(
        params![owner, peer, ts, id, before.is_none(), i64::from(limit)],
        row_to_stored,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Mark every message from `peer` read; returns how many were unread. (For an owner without
/// an inbox consumer, this is what makes them evictable.)
pub fn mark_read(c: &Connection, owner: &str, peer: &str) -> Result<u64, StoreError> {
    let n = c.execute(
        "UPDATE messages SET state = 4 WHERE owner = ?1 AND peer = ?2 AND dir = 0 AND state = 3",
        params![owner, peer],
    )?;
    c.execute(
        "UPDATE conversations SET unread = 0 WHERE owner = ?1 AND peer = ?2",
        params![owner, peer],
    )?;
    Ok(n as u64)
}

/// `owner`'s inbox record (all zero and unknown when it has none).
pub fn inbox(c: &Connection, owner: &str) -> Result<Inbox, StoreError> {
    Ok(
        c.prepare_cached("SELECT acked, newest FROM inboxes WHERE owner = ?1")?
            .query_row(params![owner], |r| {
                Ok(Inbox {
                    acked: r.get(0)?,
                    newest: r.get(1)?,
                    known: true,
                })
            })
            .optional()?
            .unwrap_or_default(),
    )
}

/// Refuse a position beyond the newest message `owner` ever received.
fn check_position(owner: &str, at: i64, inbox: &Inbox) -> Result<(), StoreError> {
    if at > inbox.newest {
        return Err(StoreError::Cursor(format!(
            "cursor {owner}:{at} is beyond {owner}'s newest received message (position {}): \
             use the cursor read_inbox returned, or call read_inbox without one to start from \
             the acknowledged position",
            inbox.newest
        )));
    }
    Ok(())
}

/// Received messages of `owner` after position `after` (`None`: the acknowledged position,
/// 0 without a consumer), oldest first: what an app that must not miss anything reads, then
/// acknowledges with [`ack_inbox`]. A position beyond the newest message is refused.
pub fn read_inbox(
    c: &Connection,
    owner: &str,
    after: Option<i64>,
    limit: u32,
) -> Result<InboxPage, StoreError> {
    let state = inbox(c, owner)?;
    let after = match after {
        Some(at) => {
            check_position(owner, at, &state)?;
            at
        }
        None => state.acked.unwrap_or(0),
    };
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM messages WHERE owner = ?1 AND dir = 0 AND seq > ?2 ORDER BY seq LIMIT ?3"
    ))?;
    let messages: Vec<Stored> = st
        .query_map(params![owner, after, i64::from(limit)], row_to_stored)?
        .collect::<Result<_, _>>()?;
    let cursor = messages.last().map_or(after, |m| m.seq);
    Ok(InboxPage { messages, cursor })
}

/// `owner`'s inbox consumer has handled everything up to `cursor`: from now on `owner` has a
/// consumer, and only messages up to its acknowledged position are evictable. The position
/// only moves forward; returns it. Refused: a position beyond `owner`'s newest received
/// message, and an owner the store has never seen — unless it is `session_user` (the
/// account the session is for: acknowledging its empty inbox declares a consumer).
pub fn ack_inbox(
    c: &Connection,
    owner: &str,
    cursor: i64,
    session_user: &str,
) -> Result<i64, StoreError> {
    let state = inbox(c, owner)?;
    if !state.known && owner != session_user {
        return Err(StoreError::Cursor(format!(
            "cursor {owner}:{cursor}: this device has no inbox for {owner} (no message was \
             ever received for that user): use a cursor read_inbox returned"
        )));
    }
    check_position(owner, cursor, &state)?;
    c.prepare_cached(
        "INSERT INTO inboxes (owner, acked) VALUES (?1, ?2)
         ON CONFLICT (owner) DO UPDATE SET acked = MAX(COALESCE(acked, 0), excluded.acked)",
    )?
    .execute(params![owner, cursor])?;
    Ok(inbox(c, owner)?.acked.unwrap_or(cursor))
}

/// What one owner has waiting: queued outgoing messages, and received messages the inbox
/// consumer has not acknowledged (for an owner that never had a consumer: the unread ones).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub outbox_pending: u64,
    pub inbox_unacked: u64,
}

pub fn counts(c: &Connection, owner: &str) -> Result<Counts, StoreError> {
    let outbox: i64 = c.query_row(
        "SELECT COUNT(*) FROM messages WHERE owner = ?1 AND dir = 1 AND state = 0",
        params![owner],
        |r| r.get(0),
    )?;
    let acked: Option<i64> = c
        .query_row(
            "SELECT acked FROM inboxes WHERE owner = ?1",
            params![owner],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let unacked: i64 = match acked {
        Some(at) => c.query_row(
            "SELECT COUNT(*) FROM messages WHERE owner = ?1 AND dir = 0 AND seq > ?2",
            params![owner, at],
            |r| r.get(0),
        )?,
        None => c.query_row(
            "SELECT COUNT(*) FROM messages WHERE owner = ?1 AND dir = 0 AND state = 3",
            params![owner],
            |r| r.get(0),
        )?,
    };
    Ok(Counts {
        outbox_pending: outbox.max(0) as u64,
        inbox_unacked: unacked.max(0) as u64,
    })
}

/// How many messages the store holds, in all.
pub fn count(c: &Connection) -> Result<u64, StoreError> {
    Ok(c.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get::<_, i64>(0))? as u64)
}

#[cfg(test)]
mod tests;
