//! The messaging methods of the local API: `send_message` (operator), and the reads, which
//! answer from the store with or without a login (`get_conversations`, `get_history`,
//! `read_inbox`), plus `mark_read` and `ack_inbox` (operator: they change the store).
//!
//! Whose messages: the account the session logs in as (`status.user_id`), whatever the
//! phase, so history is there while logged out, kicked, stopped or offline.

use serde_json::{Value, json};

use super::{RpcError, rpc};
use crate::engine::{Draft, Refusal};
use crate::identity::UserId;
use crate::message::{Kind, MAX_MESSAGE_BYTES};
use crate::status::{Command, SessionHandle};
use crate::store::{StoreError, StoreRequest};

/// Most messages one history or inbox page returns.
pub const MAX_PAGE: u32 = 100;

fn invalid(message: String) -> RpcError {
    RpcError::new(rpc::INVALID_PARAMS, message)
}

fn store_error(e: StoreError) -> RpcError {
    let code = match e {
        StoreError::Full { .. } => crate::courier::codes::STORE_FULL,
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

fn seq_param(params: &Value, key: &str) -> Result<Option<i64>, RpcError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| invalid(format!("{key} must be a whole number ≥ 0 (a seq)"))),
    }
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
        .map_err(|_| {
            RpcError::new(
                super::rpc::NOT_AVAILABLE,
                "the daemon is shutting down".into(),
            )
        })?;
    match rx.await {
        Ok(Ok(q)) => Ok(json!({ "id": q.id, "seq": q.seq, "to": q.to, "state": "queued" })),
        Ok(Err(e)) => Err(RpcError::new(e.code, e.message)),
        Err(_) => Err(RpcError::new(
            super::rpc::NOT_AVAILABLE,
            "the daemon is shutting down".into(),
        )),
    }
}

pub async fn get_conversations(session: &SessionHandle) -> Result<Value, RpcError> {
    let owner = owner(session);
    let list = session
        .store
        .ask(|reply| StoreRequest::Conversations { owner, reply })
        .await
        .map_err(store_error)?;
    Ok(json!({ "conversations": list }))
}

pub async fn get_history(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let peer = peer(params, "peer")?.to_string();
    let before = match params.get("before") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if crate::message::is_ulid(s) => Some(s.clone()),
        Some(_) => return Err(invalid("before must be a message id (a ULID)".into())),
    };
    let limit = limit(params, 20)?;
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
    Ok(json!({ "marked": n }))
}

pub async fn read_inbox(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let limit = limit(params, MAX_PAGE)?;
    let owner = owner(session);
    let after = match seq_param(params, "after")? {
        Some(a) => a,
        None => {
            let o = owner.clone();
            session
                .store
                .ask(|reply| StoreRequest::InboxCursor { owner: o, reply })
                .await
                .map_err(store_error)?
        }
    };
    let messages = session
        .store
        .ask(|reply| StoreRequest::ReadInbox {
            owner,
            after,
            limit,
            reply,
        })
        .await
        .map_err(store_error)?;
    let cursor = messages.last().map_or(after, |m| m.seq);
    Ok(json!({ "messages": messages, "cursor": cursor }))
}

pub async fn ack_inbox(session: &SessionHandle, params: &Value) -> Result<Value, RpcError> {
    let Some(cursor) = seq_param(params, "cursor")? else {
        return Err(invalid(
            "cursor is required (the cursor read_inbox returned)".into(),
        ));
    };
    let owner = owner(session);
    let acked = session
        .store
        .ask(|reply| StoreRequest::AckInbox {
            owner,
            cursor,
            reply,
        })
        .await
        .map_err(store_error)?;
    Ok(json!({ "cursor": acked }))
}
