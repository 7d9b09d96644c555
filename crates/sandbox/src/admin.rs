//! The loopback admin endpoint (plain HTTP, `Authorization: Bearer <admin token>`): fault
//! injection and counters for tests, the demo and curious humans.
//!
//! | request | effect |
//! |---|---|
//! | `GET /counters` | all counters as JSON |
//! | `POST /kick?user_id=U` | DISCONNECT 0x98 to U's sessions |
//! | `POST /expire?user_id=U` | U's UserSigs count as expired; online sessions get 0xA0 |
//! | `POST /ban?user_id=U`, `POST /unban?user_id=U` | CONNACK 0x8A for U |
//! | `POST /drop-all` | close every MQTT socket without DISCONNECT |
//! | `POST /listener/stop`, `POST /listener/start` | take the MQTT listener away / back |
//! | `POST /refuse?code=0x87[&count=N][&user_id=U]` | refuse next CONNECTs with a code |
//! | `POST /refuse-subscribe[?count=N][&user_id=U]` | answer the next SUBSCRIBEs with SUBACK 0x80 (a cluster election) |
//! | `POST /on-login?action=disconnect&code=0xA0[&reason=TEXT]` or `action=close` `[&count=N][&user_id=U]` | act right after a login (with `reason`: exactly that reason string) |
//! | `POST /provisioning/fault` + JSON body `{"mode": …, "count": N, "user_id": U}` | provisioning failure modes |
//! | `POST /provisioning/clock-offset?seconds=S` | skew the provisioning clock |
//! | `POST /sig-lifetime?seconds=S` | lifetime of newly issued UserSigs |
//! | `POST /connack-delay?ms=N` | wait before each successful CONNACK (a slow link) |
//! | `POST /disconnect-form?form=short` or `form=long` | server DISCONNECTs as `E0 01 <code>` (mosquitto ≥ 2.0.15) or with properties |
//! | `POST /faults/clear` | disarm everything |
//! | `POST /publish?topic=T[&qos=1][&retain=1]` + body | publish as the service (retained: kept as the topic's retained message; an empty body deletes it) |
//! | `GET /retained[?filter=F][&limit=N]` | the retained messages matching F (default `#`, at most N = 1000), payloads as text |
//! | `POST /retained/clear[?filter=F]` | delete the retained messages matching F (default `#`) |
//! | `POST /operator?name=N` [+ body: the token] | add an operator identity (a random token when the body is empty); answers the token |
//! | `POST /operator/remove?name=N` | remove it; its connections get DISCONNECT 0x98 |
//! | `POST /issue-sig?user_id=U[&seconds=S]` | a UserSig for U (for broker-only tests) |

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::Control;
use crate::http::{Handler, Request, Response};
use crate::provision::valid_user_id;
use crate::state::{LoginFault, ProvisionFault};

pub fn handler(control: Arc<Control>) -> Handler {
    Arc::new(move |req| {
        let control = control.clone();
        Box::pin(async move { handle(&control, req).await })
    })
}

fn parse_code(s: &str) -> Option<u8> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn ok(v: serde_json::Value) -> Response {
    Response::json(200, &v)
}

#[derive(Deserialize)]
struct FaultBody {
    #[serde(flatten)]
    fault: ProvisionFault,
    #[serde(default)]
    count: Option<u32>,
    #[serde(default)]
    user_id: Option<String>,
}

async fn handle(c: &Control, req: Request) -> Response {
    if req.bearer() != Some(c.shared.settings.admin_token.as_str()) {
        return Response::error(401, "missing or wrong admin token")
            .with_header("WWW-Authenticate", "Bearer");
    }
    let user = req.query("user_id").map(str::to_string);
    let count = match req.query("count").map(str::parse::<u32>).transpose() {
        Ok(n) => n,
        Err(_) => return Response::error(400, "count must be a whole number"),
    };
    let need_user = || match &user {
        Some(u) if valid_user_id(u) => Ok(u.clone()),
        _ => Err(Response::error(
            400,
            "user_id is missing or not a valid UserID",
        )),
    };
    let get = req.method == "GET";
    let post = req.method == "POST";
    match (req.path.as_str(), get, post) {
        ("/counters", true, _) => match serde_json::to_value(c.counters()) {
            Ok(v) => ok(v),
            Err(e) => Response::error(500, &e.to_string()),
        },
        ("/kick", _, true) => match need_user() {
            Ok(u) => ok(serde_json::json!({ "kicked": c.kick(&u) })),
            Err(r) => r,
        },
        ("/expire", _, true) => match need_user() {
            Ok(u) => ok(serde_json::json!({ "disconnected": c.expire_sig(&u) })),
            Err(r) => r,
        },
        ("/ban", _, true) => match need_user() {
            Ok(u) => {
                c.ban(&u);
                ok(serde_json::json!({ "banned": u }))
            }
            Err(r) => r,
        },
        ("/unban", _, true) => match need_user() {
            Ok(u) => {
                c.unban(&u);
                ok(serde_json::json!({ "unbanned": u }))
            }
            Err(r) => r,
        },
        ("/drop-all", _, true) => ok(serde_json::json!({ "dropped": c.drop_all() })),
        ("/listener/stop", _, true) => match c.stop_listener().await {
            Ok(()) => ok(serde_json::json!({ "listener": "stopped" })),
            Err(e) => Response::error(500, &e.to_string()),
        },
        ("/listener/start", _, true) => match c.start_listener().await {
            Ok(()) => ok(serde_json::json!({ "listener": "started" })),
            Err(e) => Response::error(500, &e.to_string()),
        },
        ("/refuse", _, true) => match req.query("code").and_then(parse_code) {
            Some(code) => {
                c.refuse_next(code, count, user.as_deref());
                ok(serde_json::json!({ "refusing_with": format!("0x{code:02X}") }))
            }
            None => Response::error(400, "code is missing (e.g. code=0x87)"),
        },
        ("/refuse-subscribe", _, true) => {
            c.refuse_subscribe(count, user.as_deref());
            ok(serde_json::json!({ "refusing_subscribe": true }))
        }
        ("/on-login", _, true) => {
            let fault = match req.query("action") {
                Some("close") => LoginFault::Close,
                Some("disconnect") => match req.query("code").and_then(parse_code) {
                    Some(code) => match req.query("reason") {
                        Some(reason) => LoginFault::DisconnectWith {
                            code,
                            reason: reason.to_string(),
                        },
                        None => LoginFault::Disconnect { code },
                    },
                    None => return Response::error(400, "code is missing (e.g. code=0xA0)"),
                },
                _ => return Response::error(400, "action must be disconnect or close"),
            };
            c.on_login(fault.clone(), count, user.as_deref());
            ok(serde_json::json!({ "on_login": fault }))
        }
        ("/provisioning/fault", _, true) => match serde_json::from_slice::<FaultBody>(&req.body) {
            Ok(b) => {
                c.provision_fault(b.fault.clone(), b.count, b.user_id.as_deref());
                ok(serde_json::json!({ "provisioning_fault": b.fault }))
            }
            Err(e) => Response::error(400, &format!("bad fault description: {e}")),
        },
        ("/provisioning/clock-offset", _, true) => {
            match req.query("seconds").map(str::parse::<i64>) {
                Some(Ok(s)) => {
                    c.set_provision_clock_offset(s);
                    ok(serde_json::json!({ "clock_offset": s }))
                }
                _ => Response::error(400, "seconds must be a whole number"),
            }
        }
        ("/sig-lifetime", _, true) => match req.query("seconds").map(str::parse::<u64>) {
            Some(Ok(s)) => {
                c.set_sig_lifetime(Duration::from_secs(s));
                ok(serde_json::json!({ "sig_lifetime": s }))
            }
            _ => Response::error(400, "seconds must be a whole number"),
        },
        ("/connect-rate", _, true) => match req.query("per_s") {
            None | Some("none") => {
                c.set_connect_rate(None);
                ok(serde_json::json!({ "connect_rate": null }))
            }
            Some(v) => match v.parse::<u32>() {
                Ok(n) if n > 0 => {
                    c.set_connect_rate(Some(n));
                    ok(serde_json::json!({ "connect_rate": n }))
                }
                _ => Response::error(
                    400,
                    "per_s must be a whole number of CONNECTs per second (or none)",
                ),
            },
        },
        ("/connack-delay", _, true) => match req.query("ms").map(str::parse::<u64>) {
            Some(Ok(ms)) => {
                c.set_connack_delay(Duration::from_millis(ms));
                ok(serde_json::json!({ "connack_delay_ms": ms }))
            }
            _ => Response::error(400, "ms must be a whole number"),
        },
        ("/disconnect-form", _, true) => match req.query("form") {
            Some(f @ ("short" | "long")) => {
                c.set_short_disconnect(f == "short");
                ok(serde_json::json!({ "disconnect_form": f }))
            }
            _ => Response::error(400, "form must be short or long"),
        },
        ("/faults/clear", _, true) => {
            c.clear_faults();
            ok(serde_json::json!({ "faults": "cleared" }))
        }
        ("/publish", _, true) => {
            let Some(topic) = req.query("topic") else {
                return Response::error(400, "topic is missing");
            };
            if !crate::codec::valid_topic(topic) {
                return Response::error(400, "topic must be a topic name (no wildcards)");
            }
            let qos = req.query("qos").and_then(|q| q.parse().ok()).unwrap_or(1);
            let retain = matches!(req.query("retain"), Some("1" | "true"));
            match c.publish_with(topic, qos, retain, &req.body) {
                Ok(n) => ok(serde_json::json!({ "routed_to": n })),
                Err(full) => Response::error(
                    507,
                    &format!(
                        "the broker keeps at most {} retained messages ({} bytes)",
                        full.max_messages, full.max_bytes
                    ),
                ),
            }
        }
        ("/retained", true, _) => {
            let filter = req.query("filter").unwrap_or("#");
            if !crate::codec::valid_filter(filter) {
                return Response::error(400, "filter is not a topic filter");
            }
            let limit = match req.query("limit").map(str::parse::<usize>).transpose() {
                Ok(n) => n.unwrap_or(1000),
                Err(_) => return Response::error(400, "limit must be a whole number"),
            };
            let all = c.retained(filter);
            let messages: Vec<serde_json::Value> = all
                .iter()
                .take(limit)
                .map(|(topic, m)| {
                    serde_json::json!({
                        "topic": topic,
                        "qos": m.qos,
                        "payload": String::from_utf8_lossy(&m.payload),
                    })
                })
                .collect();
            ok(serde_json::json!({ "matching": all.len(), "messages": messages }))
        }
        ("/retained/clear", _, true) => {
            let filter = req.query("filter").unwrap_or("#");
            if !crate::codec::valid_filter(filter) {
                return Response::error(400, "filter is not a topic filter");
            }
            ok(serde_json::json!({ "cleared": c.clear_retained(filter) }))
        }
        ("/operator", _, true) => {
            let Some(name) = req.query("name").filter(|n| valid_user_id(n)) else {
                return Response::error(400, "name is missing or not a valid user name");
            };
            let token = match std::str::from_utf8(&req.body).map(str::trim) {
                Ok("") => Control::random_token(),
                Ok(t) => t.to_string(),
                Err(_) => return Response::error(400, "the token must be UTF-8 text"),
            };
            c.add_operator(name, &token);
            ok(serde_json::json!({ "name": name, "token": token }))
        }
        ("/operator/remove", _, true) => match req.query("name") {
            Some(name) => ok(serde_json::json!({ "disconnected": c.remove_operator(name) })),
            None => Response::error(400, "name is missing"),
        },
        ("/issue-sig", _, true) => match need_user() {
            Ok(u) => {
                let secs = req
                    .query("seconds")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(3600);
                ok(serde_json::json!({
                    "user_id": u,
                    "user_sig": c.issue_sig(&u, Duration::from_secs(secs)),
                }))
            }
            Err(r) => r,
        },
        (path, _, _) if !get && !post => Response::error(405, &format!("{path}: use GET or POST")),
        (path, _, _) => Response::error(404, &format!("{path}: no such admin endpoint")),
    }
}
