//! The session's methods: `version`, `status`, `get_login_user`, `get_login_status`,
//! `watch`, `login`, `logout`, `metrics` — one handler each. Reads answer from the status the driver
//! keeps; `login` and `logout` go to the engine and wait for its answer.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::api::API_VERSION;
use crate::api::connection::ClientConn;
use crate::api::rpc::{self, RpcError, timeout_param};
use crate::identity::UserId;
use crate::session::{codes, login_status};
use crate::status::{Command, SessionHandle};

pub fn version() -> Value {
    json!({
        "name": "imlinkd",
        "version": env!("CARGO_PKG_VERSION"),
        "api": API_VERSION,
    })
}

pub fn status(session: &SessionHandle) -> Value {
    serde_json::to_value(&*session.status.borrow()).unwrap_or(Value::Null)
}

pub fn get_login_user(session: &SessionHandle) -> Value {
    json!(session.status.borrow().login_user)
}

pub fn get_login_status(session: &SessionHandle) -> Value {
    json!(session.status.borrow().login_status)
}

/// The metrics in the Prometheus text format: the status as it is now, and the store's
/// figures when it answers (a busy or broken store leaves them out rather than failing the
/// scrape).
pub async fn metrics(session: &SessionHandle) -> Value {
    json!({ "text": crate::metrics::current(session).await })
}

/// A snapshot, then every notification on this connection (a watcher slot is taken).
pub fn watch(conn: &mut ClientConn<'_>) -> Result<Value, RpcError> {
    conn.server.admit_watcher(&mut conn.slot)?;
    let session = &conn.server.session;
    // Subscribe before taking the snapshot so nothing falls between them.
    conn.watch = Some(session.events.subscribe());
    conn.watch_messages = Some(session.messages.subscribe());
    Ok(json!({ "status": status(session) }))
}

pub async fn login(conn: &mut ClientConn<'_>, params: &Value) -> Result<Value, RpcError> {
    let user = match params.get("user_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(UserId::parse(s).map_err(|e| {
            RpcError::new(
                i64::from(crate::identity::InvalidUserId::CODE),
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
        Some(Value::String(text)) => Some(Box::new(check_sig(conn, text, user.as_ref())?)),
        Some(_) => {
            return Err(RpcError::new(
                i64::from(codes::INVALID_PARAMETERS),
                "user_sig must be a string".into(),
            ));
        }
    };
    let timeout = timeout_param(params)?;
    let (tx, rx) = oneshot::channel();
    send(
        conn,
        Command::Login {
            user,
            sig,
            reply: tx,
        },
    )
    .await?;
    wait(conn, rx, timeout, "login").await?;
    let st = conn.server.session.status.borrow().clone();
    Ok(json!({ "login_user": st.login_user, "login_status": st.login_status }))
}

pub async fn logout(conn: &mut ClientConn<'_>, params: &Value) -> Result<Value, RpcError> {
    let timeout = timeout_param(params)?;
    let (tx, rx) = oneshot::channel();
    send(conn, Command::Logout { reply: tx }).await?;
    wait(conn, rx, timeout, "logout").await?;
    Ok(json!({ "login_status": login_status::LOGOUT }))
}

/// Check a UserSig an app brought (format, app, expiry; for `user` when the app named one —
/// otherwise the engine checks it against whom the session logs in as).
fn check_sig(
    conn: &ClientConn<'_>,
    text: &str,
    user: Option<&UserId>,
) -> Result<crate::usersig::AppSig, RpcError> {
    let app = conn.server.session.status.borrow().sdk_app_id;
    let now = crate::clock::wall_ms() / 1000;
    let plausible = now >= crate::config::BUILD_UNIX;
    crate::usersig::check_app_sig(text, user, app, now, plausible)
        .map_err(|(code, message)| RpcError::new(i64::from(code), message))
}

pub(super) async fn send(conn: &ClientConn<'_>, cmd: Command) -> Result<(), RpcError> {
    conn.server
        .session
        .commands
        .send(cmd)
        .await
        .map_err(|_| RpcError::new(rpc::NOT_AVAILABLE, "the daemon is shutting down".into()))
}

/// Wait for the engine's answer to a `login`/`logout` (at most `timeout`: then the request
/// goes on in the background, and the error says where things stand).
async fn wait(
    conn: &ClientConn<'_>,
    rx: oneshot::Receiver<Result<(), crate::session::RequestError>>,
    timeout: Duration,
    what: &str,
) -> Result<(), RpcError> {
    let session = &conn.server.session;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => {
            let class = session
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
            let st = session.status.borrow().clone();
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
