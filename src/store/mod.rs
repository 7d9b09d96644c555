//! The message store: SQLite (bundled), one file in the state directory, WAL with
//! `synchronous=FULL` (a committed transaction survives power loss: NORMAL may roll back the
//! last commits).
//!
//! What it holds, per local user (the *owner*: an account switch keeps each user's messages
//! apart): every message sent and received, in one table, in the order the store saw them
//! (`seq`); the outbox is the outgoing messages still `queued`; the conversations (last
//! message, unread count) are kept in step in the same transaction; the inbox cursor is how
//! far a local app has read with `read_inbox`/`ack_inbox`.
//!
//! Guarantees: an outgoing message is committed before `send_message` answers; a received
//! one is committed (deduplicated by id) before its PUBACK; nothing unsent and nothing an app
//! has not consumed is ever evicted. The schema is versioned (`PRAGMA user_version`) and
//! migrated forward; a store written by a newer imlinkd is refused, untouched.
//!
//! `thread.rs` runs it on a dedicated thread and commits whatever is queued in one
//! transaction (group commit: one fsync for many messages).

mod thread;

pub use thread::{StoreHandle, StoreRequest};

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::message::{Kind, WireMessage};

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the message store {path} was written by a newer imlinkd (schema {found}, this one knows {SCHEMA_VERSION}); it is left untouched: run the newer imlinkd, or move the file aside"
    )]
    Newer { path: String, found: i64 },
    #[error(
        "the message store is full ({used} of {cap} bytes) and nothing can be evicted (unsent messages and messages no app has read stay): read, mark read or ack_inbox, or raise store.max_bytes"
    )]
    Full { used: u64, cap: u64 },
    #[error("the message store failed: {0}")]
    Sql(String),
    #[error("the message store is not available: {0}")]
    Unavailable(String),
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
    /// The store's order (and the inbox cursor for incoming messages).
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
}

/// What receiving a message did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New: stored with this seq.
    New(i64),
    /// Already there (a redelivery): nothing changed.
    Duplicate,
}

/// Open (or create) the store at `path` and bring its schema up to date.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
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

/// Bring the schema from its version to [`SCHEMA_VERSION`], one step at a time, each in a
/// transaction. A newer schema is refused and left alone.
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

fn migrate(c: &Connection, path: &Path) -> Result<(), StoreError> {
    let found = refuse_newer(c, path)?;
    if found < 1 {
        c.execute_batch(
            "BEGIN IMMEDIATE;
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
             PRAGMA user_version = 1;
             COMMIT;",
        )?;
    }
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

const COLUMNS: &str = "seq, id, peer, dir, kind, body, ts, state, code";

/// Bytes the store uses (pages in use, not free ones).
pub fn used_bytes(c: &Connection) -> Result<u64, StoreError> {
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Make room: delete the oldest messages no one needs any more — outgoing ones that were
/// sent or failed, incoming ones that were read or acknowledged through the inbox cursor —
/// until the store is under 90 % of `cap`. Never a queued message, never an incoming one an
/// app has not consumed. Returns how many were evicted.
pub fn evict(c: &Connection, cap: u64) -> Result<u64, StoreError> {
    let mut evicted = 0;
    while used_bytes(c)? > cap / 10 * 9 {
        let n = c.execute(
            "DELETE FROM messages WHERE seq IN (
                 SELECT m.seq FROM messages m
                 LEFT JOIN inbox_cursor k ON k.owner = m.owner
                 WHERE (m.dir = 1 AND m.state IN (1, 2))
                    OR (m.dir = 0 AND (m.state = 4 OR m.seq <= COALESCE(k.acked, 0)))
                 ORDER BY m.seq LIMIT 200)",
            [],
        )? as u64;
        if n == 0 {
            break;
        }
        evicted += n;
        // Conversations whose last message went: point them at what is left.
        c.execute(
            "UPDATE conversations SET last_seq = COALESCE(
                 (SELECT MAX(seq) FROM messages m
                  WHERE m.owner = conversations.owner AND m.peer = conversations.peer), 0)
             WHERE last_seq NOT IN (SELECT seq FROM messages)",
            [],
        )?;
    }
    if evicted > 0 {
        c.execute_batch("PRAGMA incremental_vacuum")?;
    }
    Ok(evicted)
}

fn touch_conversation(
    c: &Connection,
    owner: &str,
    peer: &str,
    seq: i64,
    unread: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO conversations (owner, peer, last_seq, unread) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (owner, peer) DO UPDATE SET
             last_seq = MAX(last_seq, excluded.last_seq),
             unread = unread + excluded.unread",
        params![owner, peer, seq, unread],
    )?;
    Ok(())
}

/// Queue an outgoing message (committed before the caller answers). Refused when the store is
/// full and nothing can be evicted.
pub fn enqueue(c: &Connection, owner: &str, m: &WireMessage, cap: u64) -> Result<i64, StoreError> {
    if used_bytes(c)? >= cap {
        evict(c, cap)?;
        let used = used_bytes(c)?;
        if used >= cap {
            return Err(StoreError::Full { used, cap });
        }
    }
    insert(c, owner, m, &m.to, 1, 0, 0)
}

/// Store a received message, once (by id). Over the cap, old consumed messages make room;
/// a received message is never refused for space (its PUBACK would wait forever otherwise).
pub fn receive(
    c: &Connection,
    owner: &str,
    m: &WireMessage,
    cap: u64,
) -> Result<Received, StoreError> {
    let exists: Option<i64> = c
        .query_row(
            "SELECT seq FROM messages WHERE owner = ?1 AND id = ?2",
            params![owner, m.id],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_some() {
        return Ok(Received::Duplicate);
    }
    if used_bytes(c)? >= cap {
        evict(c, cap)?;
    }
    Ok(Received::New(insert(c, owner, m, &m.from, 0, 3, 1)?))
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
    c.execute(
        "INSERT INTO messages (owner, id, peer, dir, kind, body, ts, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![owner, m.id, peer, dir, m.kind.as_str(), m.body, m.ts, state],
    )?;
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

/// One message by id (to publish it, or to tell an app what happened to it).
pub fn get(c: &Connection, owner: &str, id: &str) -> Result<Option<Stored>, StoreError> {
    Ok(c.query_row(
        &format!("SELECT {COLUMNS} FROM messages WHERE owner = ?1 AND id = ?2"),
        params![owner, id],
        row_to_stored,
    )
    .optional()?)
}

/// Conversations, newest first.
pub fn conversations(c: &Connection, owner: &str) -> Result<Vec<Conversation>, StoreError> {
    let mut st = c.prepare_cached(
        "SELECT peer, unread, last_seq FROM conversations WHERE owner = ?1 ORDER BY last_seq DESC",
    )?;
    let rows: Vec<(String, i64, i64)> = st
        .query_map(params![owner], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (peer, unread, last_seq) in rows {
        let last = c
            .query_row(
                &format!("SELECT {COLUMNS} FROM messages WHERE seq = ?1"),
                params![last_seq],
                row_to_stored,
            )
            .optional()?;
        out.push(Conversation {
            peer,
            unread: unread.max(0) as u64,
            last,
        });
    }
    Ok(out)
}

/// A page of history with `peer`, newest first, strictly before `before` (a message id)
/// when given: pages backwards by `(ts, id)`.
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
                .query_row(
                    "SELECT ts, id FROM messages WHERE owner = ?1 AND id = ?2",
                    params![owner, id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
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

/// Mark every message from `peer` read; returns how many were unread.
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

/// Received messages after `after` (a seq), oldest first: what an app that must not miss
/// anything reads, then acknowledges with [`ack_inbox`].
pub fn read_inbox(
    c: &Connection,
    owner: &str,
    after: i64,
    limit: u32,
) -> Result<Vec<Stored>, StoreError> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM messages WHERE owner = ?1 AND dir = 0 AND seq > ?2 ORDER BY seq LIMIT ?3"
    ))?;
    let rows = st.query_map(params![owner, after, i64::from(limit)], row_to_stored)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// An app has consumed the inbox up to `cursor`: those messages may be evicted when room is
/// needed. The cursor only moves forward.
pub fn ack_inbox(c: &Connection, owner: &str, cursor: i64) -> Result<i64, StoreError> {
    c.execute(
        "INSERT INTO inbox_cursor (owner, acked) VALUES (?1, ?2)
         ON CONFLICT (owner) DO UPDATE SET acked = MAX(acked, excluded.acked)",
        params![owner, cursor],
    )?;
    Ok(c.query_row(
        "SELECT acked FROM inbox_cursor WHERE owner = ?1",
        params![owner],
        |r| r.get(0),
    )?)
}

/// The acknowledged inbox cursor (0 when none).
pub fn inbox_cursor(c: &Connection, owner: &str) -> Result<i64, StoreError> {
    Ok(c.query_row(
        "SELECT acked FROM inbox_cursor WHERE owner = ?1",
        params![owner],
        |r| r.get(0),
    )
    .optional()?
    .unwrap_or(0))
}

/// How many messages the store holds, in all.
pub fn count(c: &Connection) -> Result<u64, StoreError> {
    Ok(c.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get::<_, i64>(0))? as u64)
}

#[cfg(test)]
mod tests;
