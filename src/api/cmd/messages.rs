//! The messaging methods of the local API: `send_message` (operator), and the reads, which
//! answer from the store with or without a login (`get_conversations`, `get_history`,
//! `read_inbox`), plus `mark_read` and `ack_inbox` (operator: they change the store).
//!
//! Whose messages: the account the session logs in as (`status.user_id`), whatever the
//! phase, so history is there while logged out, kicked, stopped or offline. The exception is
//! `ack_inbox`: an inbox cursor names its owner (`"alice:120"`), and acknowledging applies to
//! that owner whoever is logged in, so a consumer whose account switched between its
//! `read_inbox` and its `ack_inbox` acknowledges what it read, not another user's messages.
//!
//! Every list a reader can ask for is paged (at most [`MAX_PAGE`] items), and
//! [`answer_bound`] says how large its answer can be, which the connection reserves from the
//! answer budget before asking the store (see `api::ANSWER_BUDGET`).

use serde_json::{Value, json};

use crate::api::rpc::{self, RpcError};
use crate::engine::{Draft, Refusal};
use crate::identity::UserId;
use crate::message::{Kind, MAX_MESSAGE_BYTES};
use crate::session::codes;
use crate::status::{Command, SessionHandle};
use crate::store::{StoreError, StoreRequest};

/// Most items (messages, conversations) one page returns.
pub const MAX_PAGE: u32 = 100;
/// The most one item of a page takes in an answer: a message is at most 12 KB encoded on
/// the wire, and the store's fields (seq, peer, direction, state, code; a conversation's
/// peer and unread count) add less than this margin.
pub const MAX_ITEM_BYTES: usize = MAX_MESSAGE_BYTES + 512;
/// Default page sizes.
const HISTORY_PAGE: u32 = 20;
const CONVERSATIONS_PAGE: u32 = 20;
const INBOX_PAGE: u32 = MAX_PAGE;

fn invalid(message: String) -> RpcError {
    RpcError::new(rpc::INVALID_PARAMS, message)
}

fn store_error(e: StoreError) -> RpcError {
    let code = match e {
        StoreError::Full { .. } => crate::courier::codes::STORE_FULL,
        StoreError::Cursor(_) => codes::INVALID_PARAMETERS,
        _ => crate::courier::codes::STORE_FAILED,
    };
    RpcError::new(i64::from(code), e.to_string())
}

/// A string parameter, required.
fn string<'a>(params: &'a Value, key: &str) -> Result<&'a str, RpcError> {
    match params.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(invalid(format!("{key} is required"))),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

/// A peer UserID parameter.
fn peer(params: &Value, key: &str) -> Result<UserId, RpcError> {
    let s = string(params, key)?;
    UserId::parse(s).map_err(|e| {
        RpcError::new(
            i64::from(crate::identity::InvalidUserId::CODE),
            format!("{key}: {e}"),
        )
    })
}

/// `limit`: 1..=MAX_PAGE, `default` when absent.
fn limit(params: &Value, default: u32) -> Result<u32, RpcError> {
    match params.get("limit") {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u64::from(MAX_PAGE)).contains(n))
            .map(|n| n as u32)
            .ok_or_else(|| invalid(format!("limit must be a whole number from 1 to {MAX_PAGE}"))),
    }
}

/// The most bytes the answer to `method` with `params` can take, for the methods whose
/// answers are pages of messages (`None` for the others: their answers are small).
pub fn answer_bound(method: &str, params: &Value) -> Option<usize> {
    let default = match method {
        "get_history" => HISTORY_PAGE,
        "get_conversations" => CONVERSATIONS_PAGE,
        "read_inbox" => INBOX_PAGE,
        _ => return None,
    };
    // A bad limit is refused before the store is asked; until then, reserve the most.
    let items = limit(params, default).unwrap_or(MAX_PAGE) as usize;
    Some(items * MAX_ITEM_BYTES + 1024)
}

fn cursor_error(message: String) -> RpcError {
    RpcError::new(i64::from(codes::INVALID_PARAMETERS), message)
}

/// An inbox cursor: `"OWNER:POSITION"`, as `read_inbox` returns it.
pub fn inbox_cursor(owner: &str, at: i64) -> String {
    format!("{owner}:{at}")
}

/// Read an inbox cursor parameter (`None` when absent). Integers (the old cursors, which
/// named no owner) and anything else that is not `"OWNER:POSITION"` are refused (6017).
fn cursor_param(params: &Value, key: &str) -> Result<Option<(UserId, i64)>, RpcError> {
    let text = match params.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => {
            return Err(cursor_error(format!(
                "{key} {n}: inbox cursors are strings naming their user (\"alice:120\", as \
                 read_inbox returns them) since integer cursors, which named no user, could \
                 acknowledge another account's messages; read_inbox without a cursor starts \
                 from the acknowledged position"
            )));
        }
        Some(_) => {
            return Err(cursor_error(format!(
                "{key} must be a cursor string (\"alice:120\", as read_inbox returns it)"
            )));
        }
    };
    let bad = || {
        cursor_error(format!(
            "{key} {} is not an inbox cursor: cursors are \"USER:POSITION\" strings as \
             read_inbox returns them (e.g. \"alice:120\")",
            crate::session::quote_external(text, 80)
        ))
    };
    let (owner, at) = text.split_once(':').ok_or_else(bad)?;
    let owner = UserId::parse(owner).map_err(|_| bad())?;
    if at.is_empty() || !at.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let at = at.parse::<i64>().map_err(|_| bad())?;
    Ok(Some((owner, at)))
}

/// A conversations cursor: `"LAST_SEQ/PEER"`, opaque to apps (`next_before`); read back
/// as strictly as an inbox cursor (digits only: no sign, no space).
fn conversations_cursor(c: &crate::store::Conversation) -> String {
    format!("{}/{}", c.last_seq, c.peer)
}

fn before_conversation(params: &Value) -> Result<Option<(i64, String)>, RpcError> {
    let text = match params.get("before") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(invalid(
                "before must be the next_before string of the previous page".into(),
            ));
        }
    };
    let bad = || {
        invalid(format!(
            "before {} is not a next_before of get_conversations: cursors are \"POSITION/PEER\" \
             strings (e.g. \"120/alice\"): pass the previous page's next_before as it was \
             returned",
            crate::session::quote_external(text, 80)
        ))
    };
    let (seq, peer) = text.split_once('/').ok_or_else(bad)?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let seq = seq.parse::<i64>().map_err(|_| bad())?;
    let peer = UserId::parse(peer).map_err(|_| bad())?;
    Ok(Some((seq, peer.to_string())))
}

fn owner(session: &SessionHandle) -> String {
    session.status.borrow().user_id.clone()
}

/// What `send_message` asks for, or why it cannot be read.
fn draft(session: &SessionHandle, params: &Value) -> Result<Draft, RpcError> {
    let to = peer(params, "to")?;
    let body = string(params, "body")?.to_string();
    let kind = match params.get("kind") {
        None | Some(Value::Null) => Kind::Text,
        Some(Value::String(k)) => Kind::parse(k)
            .ok_or_else(|| invalid(format!("kind {k:?}: use \"text\" or \"custom\"")))?,
        Some(_) => return Err(invalid("kind must be a string".into())),
    };
    if body.len() > MAX_MESSAGE_BYTES {
        // Refused before it costs the daemon anything more (the engine checks the encoding).
        return Err(RpcError::new(
            i64::from(crate::courier::codes::MSG_TOO_LARGE),
            format!(
                "the message body is {} bytes; at most {MAX_MESSAGE_BYTES} (12 KB) are allowed \
                 encoded: it was not stored or sent",
                body.len()
            ),
        ));
    }
    let now = crate::clock::wall_ms();
    let id = match session.ids.lock() {
        Ok(mut g) => g.next(now),
        Err(p) => p.into_inner().next(now),
    };
    Ok(Draft {
        id,
        to,
        kind,
        body,
        ts: now,
    })
}

pub async fn send_message(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    // Whether it may be sent (the send gate comes first: logged out is 6014 whatever the
    // params), whose message it is, and the commit: the engine's. It knows whom the session
    // logs in as at this instant; a status copy could trail it.
    let draft = draft(session, params).map_err(|e| Refusal {
        code: e.code,
        message: e.message,
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    session
        .commands
        .send(Command::Send { draft, reply: tx })
        .await
        .map_err(|_| RpcError::new(rpc::NOT_AVAILABLE, "the daemon is shutting down".into()))?;
    match rx.await {
        Ok(Ok(q)) => Ok(json!({ "id": q.id, "seq": q.seq, "to": q.to, "state": "queued" })),
        Ok(Err(e)) => Err(RpcError::new(e.code, e.message)),
        Err(_) => Err(RpcError::new(
            rpc::NOT_AVAILABLE,
            "the daemon is shutting down".into(),
        )),
    }
}

pub async fn get_conversations(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let limit = limit(params, CONVERSATIONS_PAGE)?;
    let before = before_conversation(params)?;
    let owner = owner(session);
    let (list, more) = session
        .store
        .ask(|reply| StoreRequest::Conversations {
            owner,
            before,
            limit,
            reply,
        })
        .await
        .map_err(store_error)?;
    let next = if more {
        list.last().map(conversations_cursor)
    } else {
        None
    };
    Ok(json!({ "conversations": list, "next_before": next }))
}

pub async fn get_history(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let peer = peer(params, "peer")?.to_string();
    let before = match params.get("before") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if crate::message::is_ulid(s) => Some(s.clone()),
        Some(_) => return Err(invalid("before must be a message id (a ULID)".into())),
    };
    let limit = limit(params, HISTORY_PAGE)?;
    let owner = owner(session);
    let messages = session
        .store
        .ask(|reply| StoreRequest::History {
            owner,
            peer,
            before,
            limit,
            reply,
        })
        .await
        .map_err(store_error)?;
    // The next page: before the oldest one here.
    let next = (messages.len() == limit as usize)
        .then(|| messages.last().map(|m| m.id.clone()))
        .flatten();
    Ok(json!({ "messages": messages, "next_before": next }))
}

pub async fn mark_read(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let peer = peer(params, "peer")?.to_string();
    let owner = owner(session);
    let n = session
        .store
        .ask(|reply| StoreRequest::MarkRead { owner, peer, reply })
        .await
        .map_err(store_error)?;
    // Room may have been made for received messages that wait for it.
    let _ = session.commands.try_send(Command::StoreRoom);
    Ok(json!({ "marked": n }))
}

/// `read_inbox {cursor?, limit?}` → `{user_id, messages, cursor}`: the current account's
/// received messages after the cursor (none: after its acknowledged position), oldest first.
/// A cursor of another account is refused: readers read the current account.
pub async fn read_inbox(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    if params.get("after").is_some_and(|v| !v.is_null()) {
        return Err(cursor_error(
            "read_inbox takes no \"after\" any more: pass \"cursor\", the string read_inbox \
             returned (\"alice:120\"), or nothing to start from the acknowledged position"
                .into(),
        ));
    }
    let limit = limit(params, INBOX_PAGE)?;
    let owner = owner(session);
    let after = match cursor_param(params, "cursor")? {
        None => None,
        Some((of, at)) if of.as_str() == owner => Some(at),
        Some((of, at)) => {
            return Err(cursor_error(format!(
                "cursor {of}:{at} is {of}'s inbox, but the session is {owner}'s: read_inbox \
                 reads the current account's inbox; call it without a cursor to start from \
                 {owner}'s acknowledged position (ack_inbox still takes {of}'s cursor)"
            )));
        }
    };
    let o = owner.clone();
    let page = session
        .store
        .ask(|reply| StoreRequest::ReadInbox {
            owner: o,
            after,
            limit,
            reply,
        })
        .await
        .map_err(store_error)?;
    Ok(json!({
        "user_id": owner,
        "messages": page.messages,
        "cursor": inbox_cursor(&owner, page.cursor),
    }))
}

/// `ack_inbox {cursor}` → `{user_id, cursor}`: the cursor's owner has consumed its inbox up
/// to there, whoever is logged in now (the position only moves forward).
pub async fn ack_inbox(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let Some((of, at)) = cursor_param(params, "cursor")? else {
        return Err(cursor_error(
            "cursor is required: the cursor string read_inbox returned (\"alice:120\")".into(),
        ));
    };
    let of = of.to_string();
    let session_user = owner(session);
    let o = of.clone();
    let acked = session
        .store
        .ask(|reply| StoreRequest::AckInbox {
            owner: o,
            cursor: at,
            session_user,
            reply,
        })
        .await
        .map_err(store_error)?;
    // Room may have been made for received messages that wait for it.
    let _ = session.commands.try_send(Command::StoreRoom);
    Ok(json!({ "user_id": of, "cursor": inbox_cursor(&of, acked) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::WireMessage;

    #[test]
    fn inbox_cursors_name_their_user_and_anything_else_is_refused() {
        let ok = cursor_param(&json!({ "cursor": "alice:120" }), "cursor").unwrap();
        assert_eq!(
            ok.map(|(u, at)| (u.to_string(), at)),
            Some(("alice".into(), 120))
        );
        assert_eq!(inbox_cursor("alice", 120), "alice:120");
        assert!(cursor_param(&json!({}), "cursor").unwrap().is_none());
        for (bad, says) in [
            (json!(12), "strings naming their user"),
            (json!(true), "must be a cursor string"),
            (json!("alice"), "is not an inbox cursor"),
            (json!("alice:"), "is not an inbox cursor"),
            (json!(":12"), "is not an inbox cursor"),
            (json!("alice:+1"), "is not an inbox cursor"),
            (json!("alice:1:2"), "is not an inbox cursor"),
            (
                json!("alice:99999999999999999999"),
                "is not an inbox cursor",
            ),
            (json!("al ice:1"), "is not an inbox cursor"),
            (json!("alice:1\nforged log line"), "is not an inbox cursor"),
        ] {
            let e = cursor_param(&json!({ "cursor": bad }), "cursor").unwrap_err();
            assert_eq!(e.code, 6017, "{bad}");
            assert!(e.message.contains(says), "{bad}: {}", e.message);
            assert!(!e.message.contains('\n'), "quoted: {}", e.message);
        }
    }

    /// A conversations cursor is read as strictly as an inbox cursor: digits, `/`, a
    /// UserID; a sign, a space or anything else is refused naming the param and the form.
    #[test]
    fn conversation_cursors_are_as_strict_as_inbox_cursors() {
        let ok = |c: &str| before_conversation(&json!({ "before": c })).unwrap();
        assert_eq!(ok("5/kiosk-0043"), Some((5, "kiosk-0043".to_string())));
        assert_eq!(ok("0/a"), Some((0, "a".to_string())));
        assert_eq!(before_conversation(&json!({})).unwrap(), None);
        assert_eq!(
            before_conversation(&json!({ "before": null })).unwrap(),
            None
        );
        for bad in [
            "+5/kiosk-0043",
            "-0/kiosk-0043",
            "-5/kiosk-0043",
            " 5/kiosk-0043",
            "5 /kiosk-0043",
            "5/",
            "/kiosk-0043",
            "5",
            "0x5/kiosk-0043",
            "99999999999999999999/kiosk-0043",
            "5/kiosk-0043/x",
            "5/kiosk-0043\nforged log line",
        ] {
            let e = before_conversation(&json!({ "before": bad })).unwrap_err();
            assert_eq!(e.code, rpc::INVALID_PARAMS, "{bad}");
            assert!(
                e.message.starts_with("before ") && e.message.contains("\"POSITION/PEER\""),
                "{bad}: {}",
                e.message
            );
            assert!(!e.message.contains('\n'), "quoted: {}", e.message);
        }
        let e = before_conversation(&json!({ "before": 5 })).unwrap_err();
        assert_eq!(e.code, rpc::INVALID_PARAMS);
    }

    #[test]
    fn paged_answers_have_a_bound_and_other_answers_none() {
        let item = MAX_ITEM_BYTES;
        assert_eq!(
            answer_bound("get_history", &json!({})),
            Some(20 * item + 1024)
        );
        assert_eq!(
            answer_bound("get_conversations", &json!({ "limit": 5 })),
            Some(5 * item + 1024)
        );
        assert_eq!(
            answer_bound("read_inbox", &json!(null)),
            Some(100 * item + 1024)
        );
        // A bad limit is refused later; until then the largest page is reserved.
        assert_eq!(
            answer_bound("get_history", &json!({ "limit": 1000 })),
            Some(100 * item + 1024)
        );
        assert_eq!(answer_bound("status", &json!({})), None);
        assert!(100 * item + 1024 <= crate::api::ANSWER_SHARE);
        // A stored message's JSON fits the margin: the largest body a 12 KB wire message
        // can carry, with the longest peer, a failure code and every field.
        let mut wire = WireMessage {
            id: "01JZZZZZZZZZZZZZZZZZZZZZZZ".into(),
            from: "a".into(),
            to: "b".into(),
            kind: Kind::Text,
            body: String::new(),
            ts: 0,
        };
        let empty = wire.encode().unwrap().len();
        wire.body = "x".repeat(MAX_MESSAGE_BYTES - empty);
        assert!(wire.encode().is_ok());
        let body = wire.body;
        let stored = crate::store::Stored {
            seq: i64::MAX,
            id: "01JZZZZZZZZZZZZZZZZZZZZZZZ".into(),
            peer: "p".repeat(32),
            direction: crate::store::Direction::Out,
            kind: Kind::Custom,
            body,
            ts: i64::MAX,
            state: crate::store::State::Failed,
            code: Some(u32::MAX),
        };
        let conv = crate::store::Conversation {
            peer: "p".repeat(32),
            unread: u64::MAX,
            last: Some(stored),
            last_seq: 0,
        };
        assert!(serde_json::to_string(&conv).unwrap().len() < item);
    }
}
