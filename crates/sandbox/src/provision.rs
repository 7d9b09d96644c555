//! The HTTPS provisioning endpoint: `GET /v1/usersig?user_id=U` with
//! `Authorization: Bearer <device token>` answers `{"user_id","user_sig","sdk_app_id","expire_at"}`
//! with a real UserSig, unless a fault switch says otherwise.

use std::sync::Arc;
use std::time::Duration;

use crate::http::{Framing, Handler, Request, Response};
use crate::state::{Armed, ProvisionFault, Shared, unix_now};

/// The UserID rule: 1–32 bytes of `[A-Za-z0-9_-]`.
pub fn valid_user_id(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A UserSig as the sandbox issues it.
pub struct Issued {
    pub user_sig: String,
    pub time: u64,
    pub expire_at: u64,
}

impl Shared {
    /// Issue a UserSig for `user`, valid `lifetime` from the provisioning clock (real time plus
    /// the configured offset, plus `extra_offset`). Never re-issues a sig the sandbox was told
    /// to treat as expired.
    pub fn issue_sig(
        &self,
        user: &str,
        sdk_app_id: u64,
        lifetime: Duration,
        extra_offset: i64,
    ) -> Issued {
        let s = &self.settings;
        self.update(|st| {
            let base = unix_now() as i64 + st.provision_clock_offset + extra_offset;
            let mut time = base.max(0) as u64;
            loop {
                let sig = imlink_usersig::generate(&imlink_usersig::SigParams {
                    sdk_app_id,
                    secret_key: &s.secret_key,
                    identifier: user,
                    time,
                    expire: lifetime.as_secs(),
                    userbuf: None,
                });
                let hmac = imlink_usersig::decode(&sig)
                    .map(|d| d.hmac_base64())
                    .unwrap_or_default();
                if st.expired_sigs.contains(&hmac) {
                    time += 1;
                    continue;
                }
                st.issued.entry(user.to_string()).or_default().push(hmac);
                st.issued_texts.push(sig.clone());
                return Issued {
                    user_sig: sig,
                    time,
                    expire_at: time + lifetime.as_secs(),
                };
            }
        })
    }
}

pub fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |req| {
        let shared = shared.clone();
        Box::pin(async move { handle(&shared, req).await })
    })
}

async fn handle(shared: &Shared, req: Request) -> Response {
    if req.path != "/v1/usersig" {
        return Response::error(404, "no such endpoint; use GET /v1/usersig?user_id=U");
    }
    if req.method != "GET" {
        return Response::error(405, "use GET").with_header("Allow", "GET");
    }
    let user = req.query("user_id").unwrap_or_default().to_string();
    if valid_user_id(&user) {
        shared.update(|st| {
            st.counters
                .users
                .entry(user.clone())
                .or_default()
                .provision_requests += 1
        });
    }
    if req.bearer() != Some(shared.settings.device_token.as_str()) {
        return Response::error(401, "missing or wrong device token")
            .with_header("WWW-Authenticate", "Bearer");
    }
    if !valid_user_id(&user) {
        return Response::error(400, "user_id must be 1-32 bytes of [A-Za-z0-9_-]");
    }
    let (fault, lifetime, offset, pinned) = shared.update(|st| {
        (
            Armed::fire(&mut st.faults.provision, &user),
            st.sig_lifetime,
            st.provision_clock_offset,
            st.pinned.get(&user).cloned(),
        )
    });
    let app = shared.settings.sdk_app_id;
    let mut framing = Framing::ContentLength;
    let (sig_user, sig_app, extra_offset) = match &fault {
        Some(ProvisionFault::Status {
            status,
            retry_after,
        }) => {
            let mut r = Response::error(*status, "injected failure");
            if let Some(secs) = retry_after {
                r = r.with_header("Retry-After", secs.to_string());
            }
            return r;
        }
        Some(ProvisionFault::Delay { ms }) => {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
            (user.clone(), app, 0)
        }
        Some(ProvisionFault::Malformed) => {
            let mut r = Response::json(200, &serde_json::Value::Null);
            r.body = br#"{"user_id": "broken", "user_sig": "#.to_vec();
            return r;
        }
        Some(ProvisionFault::Oversized) => {
            let mut r = Response::json(200, &serde_json::Value::Null);
            r.body = format!("{{\"padding\":\"{}\"}}", "x".repeat(2 << 20)).into_bytes();
            return r;
        }
        Some(ProvisionFault::Truncated) => {
            framing = Framing::Truncated;
            (user.clone(), app, 0)
        }
        Some(ProvisionFault::Chunked) => {
            framing = Framing::Chunked;
            (user.clone(), app, 0)
        }
        Some(ProvisionFault::ExpiredSig) => (user.clone(), app, -(lifetime.as_secs() as i64) - 60),
        Some(ProvisionFault::WrongUser) => (format!("{user}x"), app, 0),
        Some(ProvisionFault::WrongApp) => (user.clone(), app + 1, 0),
        Some(ProvisionFault::WrongKey) => {
            let now = unix_now() as i64 + offset;
            let sig = imlink_usersig::generate(&imlink_usersig::SigParams {
                sdk_app_id: app,
                secret_key: "not-the-sandbox-key",
                identifier: &user,
                time: now.max(0) as u64,
                expire: lifetime.as_secs(),
                userbuf: None,
            });
            shared.update(|st| st.issued_texts.push(sig.clone()));
            let mut r = Response::json(
                200,
                &serde_json::json!({ "user_id": user, "user_sig": sig, "sdk_app_id": app }),
            );
            r.date_offset = offset;
            return r;
        }
        Some(ProvisionFault::GarbageSig) => {
            let mut r = Response::json(
                200,
                &serde_json::json!({
                    "user_id": user, "user_sig": "opaque-token-that-is-not-a-usersig", "sdk_app_id": app,
                }),
            );
            r.date_offset = offset;
            return r;
        }
        None => (user.clone(), app, 0),
    };
    let count_issued = || {
        shared.update(|st| {
            st.counters
                .users
                .entry(user.clone())
                .or_default()
                .sigs_issued += 1
        })
    };
    if let (Some(sig), None) = (&pinned, &fault) {
        count_issued();
        let mut r = Response::json(
            200,
            &serde_json::json!({ "user_id": user, "user_sig": sig, "sdk_app_id": app }),
        );
        r.date_offset = offset;
        return r;
    }
    let issued = shared.issue_sig(&sig_user, sig_app, lifetime, extra_offset);
    count_issued();
    let mut r = Response::json(
        200,
        &serde_json::json!({
            "user_id": user,
            "user_sig": issued.user_sig,
            "sdk_app_id": app,
            "expire_at": issued.expire_at,
        }),
    );
    r.framing = framing;
    r.date_offset = offset;
    r
}
