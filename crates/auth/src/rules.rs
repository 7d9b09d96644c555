//! The IM service's rules for one CONNECT, sans I/O: who may log in, until when, and with
//! which permissions. [`Rules::decide`] is a pure function of its inputs and the clock it is
//! given; the callout driver turns its answer into JWTs.
//!
//! ## The order of the checks (each refusal carries an IM error code)
//! 1. The client is an MQTT client (`client_info.type = "mqtt"`): else 6017.
//! 2. The client id is `{sdk_app_id}:{identity}:{platform}:{instance}`: four parts separated by
//!    `:`, the app id in decimal as written by `u64::to_string`, platform and instance 1–32
//!    characters of `A-Za-z0-9_-`. **A `.` is refused** (6017) although the daemon's config
//!    allows it today: `.` separates NATS subject tokens, so a platform `a.b` would turn the
//!    status topic `im/{app}/d/{user}/a.b/{instance}/status` into a subject of another shape.
//!    (nats-server 2.15 does not even ask: it refuses a client id containing whitespace, `.`,
//!    `*` or `>` itself, with CONNACK 2, identifier rejected.)
//! 3. The identity part is the MQTT username: else 6017 (the client id belongs to another user).
//! 4. The app is one this service serves: else 70014.
//! 5. A username starting with `@` is an **operator** (`@name`, configured with its own
//!    secret). Its secret is compared in constant time (70009 when it does not match or no
//!    such operator exists: the answer does not tell which names exist); its app must be the
//!    client id's (70014). It gets `operator_session` of validity.
//! 6. Otherwise the username is a UserID: 1–32 characters of `A-Za-z0-9_-` (6017 if not —
//!    it goes into subjects, where `*`, `>` or `.` would widen the grant). The password is a
//!    UserSig, checked as the reference services do (`imlink_usersig::verify`): empty 70002,
//!    malformed 70003, another app 70014, another user 70013, expired 70001 (the codec's
//!    rule: `now > TLS.time + TLS.expire`, no grace), then the HMAC with each of the app's
//!    keys (one, or two during a rotation; 70009 when none verifies). A verified sig in its
//!    last second (`now == TLS.time + TLS.expire`) is refused as expired too, 70001: the user
//!    JWT's `exp` is the sig's expiry, and nats-server, which counts whole seconds, would end
//!    the session in the second it opens it — before its CONNACK, as observed. A verified sig
//!    issued more than `clock_skew` in the future (`TLS.time > now + skew`: the issuer's clock
//!    is ahead) is refused as malformed, 70003.
//!
//! ## What is granted (NATS subjects: the MQTT topic with `/` as `.`; `a/#` needs `a` and `a.>`)
//! A device of user U (app A, platform P, instance I):
//! - publish `im.A.u.*.in.U` — a C2C message to any peer, with U pinned as the sender (the
//!   last level), and `im.A.d.U.P.I.status` — its own retained status and last will;
//! - subscribe `im.A.u.U` and `im.A.u.U.>` — its own subtree (`im/A/u/U/#`: inbox and `ctl`).
//!
//! An operator of app A: subscribe `im.A.d` and `im.A.d.>` (the status tree `im/A/d/#`), publish
//! nothing (`deny >`).
//!
//! MQTT's own subjects need no grant: nats-server 2.15 lets an MQTT client subscribe to the
//! JetStream delivery subjects it creates for QoS 1 (`$MQTT.sub.…`) whatever its allow list,
//! and stores retained messages and wills through the account's internal client (found by
//! experiment on the cluster; `docs/deploy.md`).

use std::collections::BTreeMap;

use crate::secret::Secret;

/// One app served: its SDKAppID and the keys its UserSigs may be signed with.
#[derive(Debug, Clone)]
pub struct App {
    pub sdk_app_id: u64,
    /// One key, or two during a rotation (both verify; the first is tried first).
    pub keys: Vec<Secret>,
}

/// An operator identity: subscribes to an app's device status tree.
#[derive(Debug)]
pub struct Operator {
    pub sdk_app_id: u64,
    /// HMAC tag of the secret under a per-process random key: the comparison is
    /// `ring::hmac::verify`, constant-time.
    tag: ring::hmac::Tag,
}

impl Operator {
    pub fn new(sdk_app_id: u64, secret: &Secret, key: &ring::hmac::Key) -> Operator {
        Operator {
            sdk_app_id,
            tag: ring::hmac::sign(key, secret.expose().as_bytes()),
        }
    }
}

#[derive(Debug)]
pub struct Rules {
    apps: BTreeMap<u64, App>,
    operators: BTreeMap<String, Operator>,
    operator_key: ring::hmac::Key,
    /// How far in the future a UserSig's `TLS.time` may be, in seconds.
    skew: u64,
    /// How long an operator's login lasts, in seconds.
    operator_session: u64,
}

/// Whom a grant is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Device {
        user: String,
        platform: String,
        instance: String,
    },
    Operator {
        name: String,
    },
}

/// NATS permissions of one login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub pub_allow: Vec<String>,
    pub pub_deny: Vec<String>,
    pub sub_allow: Vec<String>,
}

/// A login accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sdk_app_id: u64,
    pub who: Who,
    /// The user JWT's `name` (the username).
    pub name: String,
    /// Unix seconds: the user JWT's `exp` (the UserSig's expiry).
    pub expires_at: u64,
    pub permissions: Permissions,
    /// Which app key verified the UserSig: 0 the first, 1 the second (rotation).
    pub key_slot: Option<usize>,
}

/// A login refused: the IM error code and a short reason (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u32,
    pub reason: &'static str,
}

impl Refusal {
    fn new(code: u32, reason: &'static str) -> Refusal {
        Refusal { code, reason }
    }

    /// The `error` of the authorization response: `"<code> <reason>"`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.reason)
    }
}

/// What the server tells about one CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Login<'a> {
    pub client_type: &'a str,
    pub username: &'a str,
    pub password: &'a Secret,
    pub client_id: &'a str,
}

/// The parts of a client id `{app}:{identity}:{platform}:{instance}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId<'a> {
    pub sdk_app_id: u64,
    pub identity: &'a str,
    pub platform: &'a str,
    pub instance: &'a str,
}

/// 1–32 characters of `A-Za-z0-9_-`: a UserID (the daemon's 7003 rule), a platform, an
/// instance, an operator name.
pub fn is_id(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parse a client id. `None` when it is not of the documented shape.
pub fn parse_client_id(id: &str) -> Option<ClientId<'_>> {
    let mut parts = id.split(':');
    let (Some(app), Some(identity), Some(platform), Some(instance), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let sdk_app_id: u64 = app.parse().ok()?;
    if sdk_app_id.to_string() != app {
        return None;
    }
    if identity.is_empty() || !is_id(platform) || !is_id(instance) {
        return None;
    }
    Some(ClientId {
        sdk_app_id,
        identity,
        platform,
        instance,
    })
}

/// The permissions of a device (see the module documentation).
pub fn device_permissions(app: u64, user: &str, platform: &str, instance: &str) -> Permissions {
    Permissions {
        pub_allow: vec![
            format!("im.{app}.u.*.in.{user}"),
            format!("im.{app}.d.{user}.{platform}.{instance}.status"),
        ],
        pub_deny: Vec::new(),
        sub_allow: vec![format!("im.{app}.u.{user}"), format!("im.{app}.u.{user}.>")],
    }
}

/// The permissions of an operator (see the module documentation).
pub fn operator_permissions(app: u64) -> Permissions {
    Permissions {
        pub_allow: Vec::new(),
        pub_deny: vec![">".to_string()],
        sub_allow: vec![format!("im.{app}.d"), format!("im.{app}.d.>")],
    }
}

impl Rules {
    /// `operators`: name (without `@`) → operator. `skew` and `operator_session` in seconds.
    pub fn new(
        apps: Vec<App>,
        operators: BTreeMap<String, Operator>,
        operator_key: ring::hmac::Key,
        skew: u64,
        operator_session: u64,
    ) -> Rules {
        Rules {
            apps: apps.into_iter().map(|a| (a.sdk_app_id, a)).collect(),
            operators,
            operator_key,
            skew,
            operator_session,
        }
    }

    /// A random key for operator secret tags (one per process).
    pub fn new_operator_key() -> Result<ring::hmac::Key, ring::error::Unspecified> {
        ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
    }

    pub fn operator_key(&self) -> &ring::hmac::Key {
        &self.operator_key
    }

    /// Decide one login at Unix time `now`.
    pub fn decide(&self, now: u64, login: &Login<'_>) -> Result<Grant, Refusal> {
        if login.client_type != "mqtt" {
            return Err(Refusal::new(6017, "only MQTT clients are served"));
        }
        let Some(cid) = parse_client_id(login.client_id) else {
            return Err(Refusal::new(
                6017,
                "client id is not {sdk_app_id}:{user}:{platform}:{instance} (1-32 of A-Za-z0-9_- each)",
            ));
        };
        if cid.identity != login.username {
            return Err(Refusal::new(6017, "client id belongs to another user"));
        }
        let Some(app) = self.apps.get(&cid.sdk_app_id) else {
            return Err(Refusal::new(
                70014,
                "this service does not serve that SDKAppID",
            ));
        };
        if let Some(name) = login.username.strip_prefix('@') {
            return self.decide_operator(now, name, app.sdk_app_id, login.password);
        }
        if !is_id(login.username) {
            return Err(Refusal::new(6017, "user id is not 1-32 of A-Za-z0-9_-"));
        }
        let (decoded, key_slot) = self.verify_sig(now, app, login)?;
        if decoded.expires_at() <= now {
            // Its last second: nats-server would end the session in the second it opens it,
            // before or right after the CONNACK. A refusal is the clearer answer.
            return Err(Refusal::new(70001, "UserSig expires within this second"));
        }
        if decoded.time > now.saturating_add(self.skew) {
            return Err(Refusal::new(
                70003,
                "UserSig issued in the future (beyond clock_skew)",
            ));
        }
        Ok(Grant {
            sdk_app_id: app.sdk_app_id,
            who: Who::Device {
                user: login.username.to_string(),
                platform: cid.platform.to_string(),
                instance: cid.instance.to_string(),
            },
            name: login.username.to_string(),
            expires_at: decoded.expires_at(),
            permissions: device_permissions(
                app.sdk_app_id,
                login.username,
                cid.platform,
                cid.instance,
            ),
            key_slot: Some(key_slot),
        })
    }

    fn verify_sig(
        &self,
        now: u64,
        app: &App,
        login: &Login<'_>,
    ) -> Result<(imlink_usersig::DecodedSig, usize), Refusal> {
        use imlink_usersig::VerifyError as V;
        let mut last = V::BadSignature;
        for (slot, key) in app.keys.iter().enumerate() {
            match imlink_usersig::verify(
                login.password.expose(),
                key.expose(),
                app.sdk_app_id,
                login.username,
                now,
            ) {
                Ok(d) => return Ok((d, slot)),
                // Only the HMAC depends on the key: try the next one.
                Err(V::BadSignature) => last = V::BadSignature,
                Err(e) => {
                    last = e;
                    break;
                }
            }
        }
        Err(match last {
            V::Empty => Refusal::new(70002, "UserSig is empty"),
            V::Malformed => Refusal::new(70003, "UserSig is malformed"),
            V::AppMismatch => Refusal::new(70014, "UserSig was issued for another SDKAppID"),
            V::IdentifierMismatch => Refusal::new(70013, "UserSig was issued for another UserID"),
            V::Expired => Refusal::new(70001, "UserSig expired"),
            V::BadSignature => Refusal::new(70009, "UserSig signature does not verify"),
        })
    }

    fn decide_operator(
        &self,
        now: u64,
        name: &str,
        app: u64,
        secret: &Secret,
    ) -> Result<Grant, Refusal> {
        let bad = Refusal::new(70009, "operator secret does not verify");
        let op = self.operators.get(name).ok_or(bad.clone())?;
        ring::hmac::verify(
            &self.operator_key,
            secret.expose().as_bytes(),
            op.tag.as_ref(),
        )
        .map_err(|_| bad)?;
        if op.sdk_app_id != app {
            return Err(Refusal::new(70014, "operator is not one of that SDKAppID"));
        }
        Ok(Grant {
            sdk_app_id: app,
            who: Who::Operator {
                name: name.to_string(),
            },
            name: format!("@{name}"),
            expires_at: now.saturating_add(self.operator_session),
            permissions: operator_permissions(app),
            key_slot: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: u64 = 1_400_000_000;
    const NOW: u64 = 1_800_000_000;
    const KEY: &str = "key-one";
    const NEXT: &str = "key-two";

    fn rules(keys: &[&str]) -> Rules {
        let k = Rules::new_operator_key().unwrap();
        let mut ops = BTreeMap::new();
        ops.insert(
            "monitor".to_string(),
            Operator::new(APP, &Secret::new("op-secret".into()), &k),
        );
        ops.insert(
            "other".to_string(),
            Operator::new(APP + 1, &Secret::new("other-secret".into()), &k),
        );
        Rules::new(
            vec![
                App {
                    sdk_app_id: APP,
                    keys: keys.iter().map(|k| Secret::new(k.to_string())).collect(),
                },
                App {
                    sdk_app_id: APP + 1,
                    keys: vec![Secret::new("app2".into())],
                },
            ],
            ops,
            k,
            30,
            3600,
        )
    }

    fn sig(key: &str, app: u64, user: &str, time: u64, expire: u64) -> Secret {
        Secret::new(imlink_usersig::generate(&imlink_usersig::SigParams {
            sdk_app_id: app,
            secret_key: key,
            identifier: user,
            time,
            expire,
            userbuf: None,
        }))
    }

    fn login<'a>(user: &'a str, password: &'a Secret, client_id: &'a str) -> Login<'a> {
        Login {
            client_type: "mqtt",
            username: user,
            password,
            client_id,
        }
    }

    fn code(r: Result<Grant, Refusal>) -> u32 {
        match r {
            Ok(g) => panic!("granted: {g:?}"),
            Err(r) => r.code,
        }
    }

    #[test]
    fn a_good_sig_is_granted_until_its_expiry_with_the_pinned_permissions() {
        let r = rules(&[KEY]);
        let s = sig(KEY, APP, "alice", NOW - 10, 300);
        let g = r
            .decide(NOW, &login("alice", &s, "1400000000:alice:linux:0"))
            .unwrap();
        assert_eq!(g.expires_at, NOW - 10 + 300);
        assert_eq!(g.name, "alice");
        assert_eq!(g.key_slot, Some(0));
        assert_eq!(
            g.permissions,
            Permissions {
                pub_allow: vec![
                    "im.1400000000.u.*.in.alice".into(),
                    "im.1400000000.d.alice.linux.0.status".into()
                ],
                pub_deny: vec![],
                sub_allow: vec![
                    "im.1400000000.u.alice".into(),
                    "im.1400000000.u.alice.>".into()
                ],
            }
        );
    }

    #[test]
    fn each_refusal_has_its_code() {
        let r = rules(&[KEY]);
        let cid = "1400000000:alice:linux:0";
        // 70001: expired (valid through the expiry second, not after).
        let s = sig(KEY, APP, "alice", NOW - 100, 101);
        assert!(r.decide(NOW, &login("alice", &s, cid)).is_ok());
        // Its last second: refused too (the session would end before its CONNACK).
        assert_eq!(code(r.decide(NOW + 1, &login("alice", &s, cid))), 70001);
        assert_eq!(code(r.decide(NOW + 2, &login("alice", &s, cid))), 70001);
        // 70002, 70003.
        assert_eq!(
            code(r.decide(NOW, &login("alice", &Secret::new(String::new()), cid))),
            70002
        );
        assert_eq!(
            code(r.decide(NOW, &login("alice", &Secret::new("not a sig".into()), cid))),
            70003
        );
        // 70009: another key.
        let s = sig("wrong", APP, "alice", NOW, 100);
        assert_eq!(code(r.decide(NOW, &login("alice", &s, cid))), 70009);
        // 70013: issued for bob.
        let s = sig(KEY, APP, "bob", NOW, 100);
        assert_eq!(code(r.decide(NOW, &login("alice", &s, cid))), 70013);
        // 70014: issued for another app; or an app not served.
        let s = sig(KEY, APP + 1, "alice", NOW, 100);
        assert_eq!(code(r.decide(NOW, &login("alice", &s, cid))), 70014);
        let s = sig(KEY, 42, "alice", NOW, 100);
        assert_eq!(
            code(r.decide(NOW, &login("alice", &s, "42:alice:linux:0"))),
            70014
        );
        // 6017: the client id.
        let s = sig(KEY, APP, "alice", NOW, 100);
        for bad in [
            "",
            "alice",
            "1400000000:alice:linux",
            "1400000000:alice:linux:0:x",
            "1400000000:bob:linux:0",
            "01400000000:alice:linux:0",
            "+1400000000:alice:linux:0",
            "1400000000:alice:lin.ux:0",
            "1400000000:alice:linux:0.1",
            "1400000000:alice::0",
            "1400000000:alice:linux:",
            "1400000000:alice:linux:*",
            "1400000000:alice:linux:>",
            "1400000000:alice:linux:0123456789012345678901234567890123",
            "x:alice:linux:0",
        ] {
            assert_eq!(
                code(r.decide(NOW, &login("alice", &s, bad))),
                6017,
                "{bad:?}"
            );
        }
        // 6017: not MQTT.
        let mut l = login("alice", &s, cid);
        l.client_type = "nats";
        assert_eq!(code(r.decide(NOW, &l)), 6017);
    }

    #[test]
    fn user_ids_that_would_widen_a_subject_are_refused() {
        let r = rules(&[KEY]);
        for user in ["*", ">", "a.b", "a b", "", &"x".repeat(33)] {
            let s = sig(KEY, APP, user, NOW, 100);
            let cid = format!("1400000000:{user}:linux:0");
            let got = r.decide(NOW, &login(user, &s, &cid));
            assert_eq!(code(got), 6017, "{user:?}");
        }
    }

    #[test]
    fn both_keys_verify_during_a_rotation() {
        let r = rules(&[KEY, NEXT]);
        let cid = "1400000000:alice:linux:0";
        let g = r
            .decide(NOW, &login("alice", &sig(KEY, APP, "alice", NOW, 60), cid))
            .unwrap();
        assert_eq!(g.key_slot, Some(0));
        let g = r
            .decide(NOW, &login("alice", &sig(NEXT, APP, "alice", NOW, 60), cid))
            .unwrap();
        assert_eq!(g.key_slot, Some(1));
        assert_eq!(
            code(r.decide(
                NOW,
                &login("alice", &sig("third", APP, "alice", NOW, 60), cid)
            )),
            70009
        );
        // After the rotation, the old key is gone.
        let r = rules(&[NEXT]);
        assert_eq!(
            code(r.decide(NOW, &login("alice", &sig(KEY, APP, "alice", NOW, 60), cid))),
            70009
        );
    }

    #[test]
    fn a_sig_from_the_future_is_accepted_within_the_skew_only() {
        let r = rules(&[KEY]);
        let cid = "1400000000:alice:linux:0";
        let s = sig(KEY, APP, "alice", NOW + 30, 60);
        assert!(r.decide(NOW, &login("alice", &s, cid)).is_ok());
        let s = sig(KEY, APP, "alice", NOW + 31, 60);
        assert_eq!(code(r.decide(NOW, &login("alice", &s, cid))), 70003);
        // A forged one from the future is a bad signature first.
        let s = sig("wrong", APP, "alice", NOW + 31, 60);
        assert_eq!(code(r.decide(NOW, &login("alice", &s, cid))), 70009);
    }

    #[test]
    fn operators_get_the_status_tree_and_nothing_else() {
        let r = rules(&[KEY]);
        let good = Secret::new("op-secret".into());
        let g = r
            .decide(
                NOW,
                &login("@monitor", &good, "1400000000:@monitor:console:1"),
            )
            .unwrap();
        assert_eq!(g.expires_at, NOW + 3600);
        assert_eq!(g.name, "@monitor");
        assert_eq!(
            g.permissions,
            Permissions {
                pub_allow: vec![],
                pub_deny: vec![">".into()],
                sub_allow: vec!["im.1400000000.d".into(), "im.1400000000.d.>".into()],
            }
        );
        // Wrong secret, unknown operator: the same answer.
        let bad = Secret::new("nope".into());
        assert_eq!(
            code(r.decide(
                NOW,
                &login("@monitor", &bad, "1400000000:@monitor:console:1")
            )),
            70009
        );
        assert_eq!(
            code(r.decide(NOW, &login("@ghost", &good, "1400000000:@ghost:console:1"))),
            70009
        );
        // An operator of another app.
        let other = Secret::new("other-secret".into());
        assert_eq!(
            code(r.decide(NOW, &login("@other", &other, "1400000000:@other:console:1"))),
            70014
        );
        // An operator cannot use a device's client id (it would take the device's session
        // over), nor a device an operator's.
        assert_eq!(
            code(r.decide(NOW, &login("@monitor", &good, "1400000000:alice:linux:0"))),
            6017
        );
        let s = sig(KEY, APP, "alice", NOW, 60);
        assert_eq!(
            code(r.decide(NOW, &login("alice", &s, "1400000000:@monitor:console:1"))),
            6017
        );
    }

    #[test]
    fn refusal_text_is_code_then_reason() {
        assert_eq!(
            Refusal::new(70001, "UserSig expired").text(),
            "70001 UserSig expired"
        );
    }
}
