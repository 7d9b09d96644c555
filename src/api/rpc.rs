//! JSON-RPC 2.0 as the API speaks it: parsing a request line (pure: the fuzzer drives it),
//! error and notification lines, the error codes, and the params every method shares.

use std::time::Duration;

use serde_json::{Value, json};

use crate::courier::MessageEvent;
use crate::session::Event;

/// JSON-RPC error codes (the IM codes are used for IM errors).
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const PERMISSION_DENIED: i64 = -32001;
pub const TOO_MANY_CLIENTS: i64 = -32002;
pub const LINE_TOO_LONG: i64 = -32003;
pub const NOT_AVAILABLE: i64 = -32004;
pub const TIMEOUT: i64 = -32005;

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
        (Value::Null, PARSE_ERROR, why)
    })?;
    let Some(obj) = v.as_object() else {
        let msg = if v.is_array() {
            "batch requests are not supported; send one object per line"
        } else {
            "a request is a JSON object"
        };
        return Err((Value::Null, INVALID_REQUEST, msg.into()));
    };
    let id = obj.get("id").cloned();
    let reply_id = id.clone().unwrap_or(Value::Null);
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err((
            reply_id,
            INVALID_REQUEST,
            "\"jsonrpc\": \"2.0\" is required".into(),
        ));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Err((
            reply_id,
            INVALID_REQUEST,
            "\"method\" must be a string".into(),
        ));
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    if !(params.is_null() || params.is_object()) {
        return Err((
            reply_id,
            INVALID_PARAMS,
            "\"params\" must be an object".into(),
        ));
    }
    Ok(Request {
        id,
        method: method.to_string(),
        params,
    })
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
                    INVALID_PARAMS,
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
    pub fn new(code: i64, message: String) -> RpcError {
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
