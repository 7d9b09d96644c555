//! One handler per method (mini-redis's `cmd/*.rs`): the session's methods in `session.rs`,
//! the messages' in `messages.rs`. This file is the table: which methods exist, which role
//! each needs, and which answers are pages that take a share of the answer budget.

mod messages;
mod session;

use serde_json::Value;

use super::connection::ClientConn;
use super::rpc::{self, RpcError};

pub use messages::answer_bound;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Anyone who can connect to the socket.
    Reader,
    /// Root, the daemon's uid, or a configured operator uid/gid.
    Operator,
}

/// Every method the API serves, with the role it needs (docs/api.md lists the same; the
/// clients' tests check it).
const METHODS: &[(&str, Role)] = &[
    ("version", Role::Reader),
    ("status", Role::Reader),
    ("get_login_user", Role::Reader),
    ("get_login_status", Role::Reader),
    ("watch", Role::Reader),
    ("login", Role::Operator),
    ("logout", Role::Operator),
    ("send_message", Role::Operator),
    ("get_conversations", Role::Reader),
    ("get_history", Role::Reader),
    ("mark_read", Role::Operator),
    ("read_inbox", Role::Reader),
    ("ack_inbox", Role::Operator),
    ("metrics", Role::Reader),
];

/// The names of the methods, for an unknown method's error.
pub fn method_names() -> Vec<&'static str> {
    METHODS.iter().map(|(m, _)| *m).collect()
}

fn require_operator(conn: &ClientConn<'_>, method: &str) -> Result<(), RpcError> {
    if conn.peer.operator {
        return Ok(());
    }
    Err(RpcError::new(
        rpc::PERMISSION_DENIED,
        format!(
            "{method} needs an operator: root, the daemon's user, or a uid/gid listed in \
             api.operator_uids / api.operator_gids (you are uid {})",
            conn.peer.uid
        ),
    ))
}

/// Run one method for `conn`'s client.
pub(super) async fn dispatch(
    conn: &mut ClientConn<'_>,
    method: &str,
    params: &Value,
) -> Result<Value, RpcError> {
    match METHODS.iter().find(|(m, _)| *m == method).map(|(_, r)| *r) {
        Some(Role::Operator) => require_operator(conn, method)?,
        Some(Role::Reader) => {}
        None => return test_hook(conn, method).await,
    }
    let session = &conn.server.session;
    match method {
        "version" => Ok(session::version()),
        "status" => Ok(session::status(session)),
        "get_login_user" => Ok(session::get_login_user(session)),
        "get_login_status" => Ok(session::get_login_status(session)),
        "watch" => session::watch(conn),
        "login" => session::login(conn, params).await,
        "logout" => session::logout(conn, params).await,
        "send_message" => messages::send_message(session, params).await,
        "get_conversations" => messages::get_conversations(session, params).await,
        "get_history" => messages::get_history(session, params).await,
        "mark_read" => messages::mark_read(session, params).await,
        "read_inbox" => messages::read_inbox(session, params).await,
        "ack_inbox" => messages::ack_inbox(session, params).await,
        "metrics" => Ok(session::metrics(session).await),
        other => Err(unknown(other)),
    }
}

fn unknown(method: &str) -> RpcError {
    RpcError::new(
        rpc::METHOD_NOT_FOUND,
        format!(
            "no method {method:?}; methods: {}",
            method_names().join(", ")
        ),
    )
}

/// The test hooks (`debug_wedge`, `debug_panic`): only with the `test-hooks` feature and
/// `IMLINKD_TEST_HOOKS=1`, operators only; otherwise an unknown method.
async fn test_hook(conn: &mut ClientConn<'_>, method: &str) -> Result<Value, RpcError> {
    #[cfg(feature = "test-hooks")]
    if conn.server.test_hooks {
        use crate::status::Command;
        let (cmd, answer) = match method {
            "debug_wedge" => (Command::Wedge, serde_json::json!({ "wedged": true })),
            "debug_panic" => (Command::Panic, serde_json::json!({ "panicking": true })),
            _ => return Err(unknown(method)),
        };
        require_operator(conn, method)?;
        session::send(conn, cmd).await?;
        return Ok(answer);
    }
    let _ = conn;
    Err(unknown(method))
}
