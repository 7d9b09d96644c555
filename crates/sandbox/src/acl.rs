//! Who may publish and subscribe where: the IM topic rules of brief §2 and the device status
//! contract (`docs/brokers.md`, "Device status").
//!
//! | identity | publish | subscribe |
//! |---|---|---|
//! | device user U, client id `{app}:U:{platform}:{instance}` | C2C messages `im/{app}/u/{peer}/in/U`; its own status `im/{app}/d/U/{platform}/{instance}/status` (`.` written `_`), retained or not; nothing else retained | `im/{app}/u/U/…` |
//! | operator (name + token) | nothing, not even a will | within `im/{app}/d/#` |

use crate::codec::{self, reason};

/// A refusal: the MQTT reason code, the IM error code and the text of the reason string.
pub type Refusal = (u8, u32, String);

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A device user. `status_topic` is the one status topic its client id allows (`None`
    /// when the client id does not name a platform and an instance a topic can hold).
    Device {
        user: String,
        status_topic: Option<String>,
    },
    /// An operator identity: reads the status tree, publishes nothing.
    Operator,
}

/// One level of a status topic: `.` is written `_` (NATS uses `.` as its subject separator).
/// `None` when the value cannot be one topic level.
fn topic_level(value: &str) -> Option<String> {
    (!value.is_empty() && !value.contains(['/', '+', '#'])).then(|| value.replace('.', "_"))
}

/// The status topic a client id `{app}:{user}:{platform}:{instance}` may publish to:
/// `im/{app}/d/{user}/{platform}/{instance}/status`.
pub fn status_topic(app: u64, client_id: &str, user: &str) -> Option<String> {
    let rest = client_id.strip_prefix(&format!("{app}:{user}:"))?;
    let (platform, instance) = rest.split_once(':')?;
    let user = topic_level(user)?;
    Some(format!(
        "im/{app}/d/{user}/{}/{}/status",
        topic_level(platform)?,
        topic_level(instance)?
    ))
}

/// Whether `filter` lies within the status tree `im/{app}/d/#` (what an operator may read).
pub fn within_status_tree(app: u64, filter: &str) -> bool {
    let root = format!("im/{app}/d");
    filter == root || filter.starts_with(&format!("{root}/"))
}

/// Whether `who` may subscribe to `filter` (a valid filter).
pub fn may_subscribe(app: u64, who: &Identity, filter: &str) -> bool {
    match who {
        Identity::Device { user, .. } => filter.starts_with(&format!("im/{app}/u/{user}/")),
        Identity::Operator => within_status_tree(app, filter),
    }
}

/// Whether `who` may publish `p` (or set it as their will): `Ok`, or the refusal.
pub fn may_publish(app: u64, who: &Identity, p: &codec::Publish) -> Result<(), Refusal> {
    let (user, own_status) = match who {
        Identity::Operator => {
            return Err((
                reason::NOT_AUTHORIZED,
                20003,
                "an operator identity reads the status tree and publishes nothing".into(),
            ));
        }
        Identity::Device { user, status_topic } => (user, status_topic),
    };
    if p.topic.starts_with(&format!("im/{app}/d/")) {
        return match own_status {
            Some(own) if *own == p.topic => Ok(()),
            Some(own) => Err((
                reason::NOT_AUTHORIZED,
                20003,
                format!("a device publishes its status only to {own}"),
            )),
            None => Err((
                reason::NOT_AUTHORIZED,
                20003,
                format!("a status topic needs a client id {app}:{user}:{{platform}}:{{instance}}"),
            )),
        };
    }
    if p.retain {
        return Err((
            reason::NOT_AUTHORIZED,
            20003,
            format!("retained messages are kept only on status topics (im/{app}/d/…/status)"),
        ));
    }
    if !publish_allowed(app, &p.topic) {
        return Err((
            reason::NOT_AUTHORIZED,
            20003,
            "this topic is not yours to publish on".to_string(),
        ));
    }
    check_c2c(p, user)
}

/// The most a C2C message may be (the IM service's limit: 12 KB).
pub const MAX_C2C_BYTES: usize = 12 * 1024;

/// What the IM service checks in a C2C message to an inbox
/// (`im/{app}/u/{peer}/in/{sender}`): that the topic's sender is the user who logged in (what
/// any broker's ACL can pin too), its size, that it is one, and that its `from` is the user who
/// logged in as well. Other topics pass.
pub fn check_c2c(p: &codec::Publish, user: &str) -> Result<(), Refusal> {
    let Some(rest) = p.topic.strip_prefix("im/") else {
        return Ok(());
    };
    let levels: Vec<&str> = rest.split('/').collect();
    if levels.get(3) != Some(&"in") {
        return Ok(());
    }
    match levels.get(4) {
        Some(sender) if levels.len() == 5 && !sender.is_empty() => {
            if *sender != user {
                return Err((
                    reason::NOT_AUTHORIZED,
                    20003,
                    format!("the topic's sender must be your UserID ({user})"),
                ));
            }
        }
        _ => {
            return Err((
                reason::TOPIC_NAME_INVALID,
                20001,
                "a C2C message goes to im/{sdk_app_id}/u/{peer}/in/{sender}".to_string(),
            ));
        }
    }
    if p.payload.len() > MAX_C2C_BYTES {
        return Err((
            reason::PAYLOAD_FORMAT_INVALID,
            80002,
            format!(
                "message too long: {} bytes, at most {MAX_C2C_BYTES}",
                p.payload.len()
            ),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&p.payload).map_err(|_| {
        (
            reason::PAYLOAD_FORMAT_INVALID,
            20001,
            "not a C2C message (JSON {id, from, to, kind, body, ts})".to_string(),
        )
    })?;
    let from = v.get("from").and_then(|f| f.as_str());
    let id = v.get("id").and_then(|f| f.as_str());
    let to = v.get("to").and_then(|f| f.as_str());
    if id.is_none_or(str::is_empty) || to.is_none() {
        return Err((
            reason::PAYLOAD_FORMAT_INVALID,
            20001,
            "not a C2C message (JSON {id, from, to, kind, body, ts})".to_string(),
        ));
    }
    if from != Some(user) {
        return Err((
            reason::NOT_AUTHORIZED,
            20003,
            format!("from must be the sender's UserID ({user})"),
        ));
    }
    Ok(())
}

/// Users publish to each other under `im/{sdk_app_id}/u/{user}/…`; the `ctl` subtree is the
/// service's own.
pub fn publish_allowed(sdk_app_id: u64, topic: &str) -> bool {
    let prefix = format!("im/{sdk_app_id}/u/");
    let Some(rest) = topic.strip_prefix(&prefix) else {
        return false;
    };
    let mut levels = rest.split('/');
    let user = levels.next().unwrap_or_default();
    !user.is_empty() && levels.next().is_some_and(|l| l != "ctl" && !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, retain: bool) -> codec::Publish {
        codec::Publish {
            dup: false,
            qos: 1,
            retain,
            topic: topic.into(),
            pkid: 1,
            properties: Vec::new(),
            payload: b"{}".to_vec(),
        }
    }

    #[test]
    fn the_status_topic_comes_from_the_client_id_with_dots_as_underscores() {
        assert_eq!(
            status_topic(7, "7:kiosk-1:linux:0", "kiosk-1").as_deref(),
            Some("im/7/d/kiosk-1/linux/0/status")
        );
        assert_eq!(
            status_topic(7, "7:kiosk-1:web.v2:a.b", "kiosk-1").as_deref(),
            Some("im/7/d/kiosk-1/web_v2/a_b/status")
        );
        // The instance keeps any further colons; a missing or empty level names no topic.
        assert_eq!(
            status_topic(7, "7:u:linux:a:b", "u").as_deref(),
            Some("im/7/d/u/linux/a:b/status")
        );
        assert_eq!(status_topic(7, "7:u:linux", "u"), None);
        assert_eq!(status_topic(7, "7:u::0", "u"), None);
        assert_eq!(status_topic(7, "7:u:lin/ux:0", "u"), None);
        assert_eq!(status_topic(7, "7:u:linux:#", "u"), None);
        assert_eq!(status_topic(7, "8:u:linux:0", "u"), None);
        assert_eq!(status_topic(7, "7:v:linux:0", "u"), None);
    }

    #[test]
    fn a_device_publishes_only_its_own_status_and_retains_nothing_else() {
        let me = Identity::Device {
            user: "u".into(),
            status_topic: status_topic(7, "7:u:linux:0", "u"),
        };
        assert!(may_publish(7, &me, &publish("im/7/d/u/linux/0/status", true)).is_ok());
        assert!(may_publish(7, &me, &publish("im/7/d/u/linux/0/status", false)).is_ok());
        for other in [
            "im/7/d/u/linux/1/status",
            "im/7/d/v/linux/0/status",
            "im/7/d/u/linux/0/status/x",
            "im/7/d/u",
        ] {
            let (code, im, _) = may_publish(7, &me, &publish(other, true)).unwrap_err();
            assert_eq!((code, im), (reason::NOT_AUTHORIZED, 20003), "{other}");
        }
        // Retained elsewhere: refused; the same topic not retained: the C2C rules.
        assert!(may_publish(7, &me, &publish("im/7/u/v/presence", true)).is_err());
        assert!(may_publish(7, &me, &publish("im/7/u/v/presence", false)).is_ok());
        let nobody = Identity::Device {
            user: "u".into(),
            status_topic: None,
        };
        assert!(may_publish(7, &nobody, &publish("im/7/d/u/linux/0/status", true)).is_err());
    }

    #[test]
    fn an_operator_reads_the_status_tree_and_publishes_nothing() {
        let op = Identity::Operator;
        assert!(may_subscribe(7, &op, "im/7/d/#"));
        assert!(may_subscribe(7, &op, "im/7/d/+/+/+/status"));
        assert!(may_subscribe(7, &op, "im/7/d/kiosk-1/#"));
        assert!(may_subscribe(7, &op, "im/7/d"));
        for f in ["#", "im/#", "im/+/d/#", "im/8/d/#", "im/7/u/#", "im/7/dx/#"] {
            assert!(!may_subscribe(7, &op, f), "{f}");
        }
        assert!(may_publish(7, &op, &publish("im/7/d/op/linux/0/status", true)).is_err());
        assert!(may_publish(7, &op, &publish("im/7/u/v/in/op", false)).is_err());
        let dev = Identity::Device {
            user: "u".into(),
            status_topic: None,
        };
        assert!(!may_subscribe(7, &dev, "im/7/d/#"));
        assert!(may_subscribe(7, &dev, "im/7/u/u/#"));
    }
}
