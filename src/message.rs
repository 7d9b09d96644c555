//! C2C messages on the wire: a JSON object `{id, from, to, kind, body, ts}` published with
//! QoS 1 to the peer's inbox `im/{sdk_app_id}/u/{peer}/in`, at most 12 KB.
//!
//! Ids are **ULIDs** (26 characters of Crockford base32: 48 bits of Unix milliseconds, then
//! 80 random bits, monotonic within one millisecond): unique without coordination, and
//! sortable by time, so history pages by `(ts, id)`. Deduplication is on the id, never on the
//! MQTT packet id or a sequence number: a message the broker delivers twice (after a
//! reconnect, with DUP) is stored once.

use serde::{Deserialize, Serialize};

use crate::identity::UserId;

/// The largest encoded message (the IM service's limit for a C2C message).
pub const MAX_MESSAGE_BYTES: usize = 12 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Text shown to a person.
    Text,
    /// An application's own payload (a string: often JSON of its own).
    Custom,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Custom => "custom",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "text" => Some(Kind::Text),
            "custom" => Some(Kind::Custom),
            _ => None,
        }
    }
}

/// A message as it travels.
/// Unknown fields are ignored (a newer sender may add some; refusing them would drop its
/// messages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    pub id: String,
    pub from: String,
    pub to: String,
    pub kind: Kind,
    pub body: String,
    /// Unix milliseconds at the sender.
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the message is {0} bytes encoded; at most {MAX_MESSAGE_BYTES} are allowed")]
    TooLarge(usize),
    #[error("not a message: {0}")]
    Invalid(&'static str),
    #[error("the message is addressed to another user")]
    NotForMe,
}

impl WireMessage {
    /// The bytes to publish; refused before anything is stored when over the limit.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        let bytes = serde_json::to_vec(self).map_err(|_| MessageError::Invalid("cannot encode"))?;
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Read a received payload addressed to `me`. Every field is checked: an id that is a
    /// ULID, a valid sender, the recipient, the size.
    pub fn decode(payload: &[u8], me: &UserId) -> Result<WireMessage, MessageError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(MessageError::TooLarge(payload.len()));
        }
        let v: serde_json::Value =
            serde_json::from_slice(payload).map_err(|_| MessageError::Invalid("not JSON"))?;
        if !v.is_object() {
            return Err(MessageError::Invalid("not a JSON object"));
        }
        let m: WireMessage = serde_json::from_value(v)
            .map_err(|_| MessageError::Invalid("fields missing or of the wrong type"))?;
        if !is_ulid(&m.id) {
            return Err(MessageError::Invalid("the id is not a ULID"));
        }
        if UserId::parse(&m.from).is_err() {
            return Err(MessageError::Invalid("the sender is not a valid UserID"));
        }
        if m.to != me.as_str() {
            return Err(MessageError::NotForMe);
        }
        Ok(m)
    }
}

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Whether `s` is a ULID: 26 Crockford base32 characters, the first at most '7'.
pub fn is_ulid(s: &str) -> bool {
    s.len() == 26 && s.bytes().all(|b| CROCKFORD.contains(&b)) && s.as_bytes()[0] <= b'7'
}

/// Encode a 128-bit ULID value as 26 Crockford base32 characters.
fn encode_ulid(v: u128) -> String {
    let mut out = [0u8; 26];
    for (i, c) in out.iter_mut().enumerate() {
        let shift = 125 - 5 * i as i32;
        let idx = if shift >= 0 {
            (v >> shift) & 0x1F
        } else {
            (v << (-shift)) & 0x1F
        };
        *c = CROCKFORD[idx as usize];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes ULIDs, monotonic within one millisecond (the random part is incremented).
pub struct IdGen {
    last_ms: u64,
    last_rand: u128,
    source: Source,
}

enum Source {
    System(ring::rand::SystemRandom),
    /// Deterministic, for the simulators (never for ids a daemon sends).
    Seeded(crate::session::Rng),
}

impl Default for IdGen {
    fn default() -> Self {
        IdGen::new()
    }
}

impl IdGen {
    pub fn new() -> IdGen {
        IdGen {
            last_ms: 0,
            last_rand: 0,
            source: Source::System(ring::rand::SystemRandom::new()),
        }
    }

    /// Ids from a seeded generator: the same seed gives the same ids (simulators only).
    pub fn with_seed(seed: u64) -> IdGen {
        IdGen {
            last_ms: 0,
            last_rand: 0,
            source: Source::Seeded(crate::session::Rng::new(seed)),
        }
    }

    fn random80(&mut self) -> u128 {
        let mut b = [0u8; 10];
        match &mut self.source {
            Source::System(r) => {
                use ring::rand::SecureRandom;
                // On failure the bytes stay zero: the id is still unique through the
                // monotonic increment within this millisecond.
                let _ = r.fill(&mut b);
            }
            Source::Seeded(r) => {
                for x in b.iter_mut() {
                    *x = r.next_u64() as u8;
                }
            }
        }
        // 79 bits: room to increment within the millisecond without overflowing 80.
        b.iter().fold(0u128, |a, x| (a << 8) | u128::from(*x)) >> 1
    }

    /// A new id at Unix milliseconds `now_ms` (clamped to 48 bits; never before the last).
    pub fn next(&mut self, now_ms: i64) -> String {
        let ms = (now_ms.max(0) as u64).min((1 << 48) - 1).max(self.last_ms);
        let rand = if ms == self.last_ms {
            (self.last_rand + 1) & ((1u128 << 80) - 1)
        } else {
            self.random80()
        };
        self.last_ms = ms;
        self.last_rand = rand;
        encode_ulid((u128::from(ms) << 80) | rand)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> UserId {
        UserId::parse("bob").unwrap()
    }

    #[test]
    fn ulids_are_sortable_unique_and_well_formed() {
        let mut g = IdGen::new();
        let mut ids: Vec<String> = (0..1000)
            .map(|i| g.next(1_800_000_000_000 + i / 10))
            .collect();
        assert!(ids.iter().all(|i| is_ulid(i)));
        let sorted = {
            let mut s = ids.clone();
            s.sort();
            s
        };
        assert_eq!(ids, sorted, "monotonic, also within one millisecond");
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        // The time is in front: a later millisecond sorts after.
        let later = g.next(1_800_000_000_100);
        assert!(g.next(0) > later, "a clock step back never goes back");
        assert_eq!(encode_ulid(0), "00000000000000000000000000");
        assert_eq!(encode_ulid(u128::MAX), "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
        assert!(
            !is_ulid("8ZZZZZZZZZZZZZZZZZZZZZZZZZ")
                && !is_ulid("0123")
                && !is_ulid("0000000000000000000000000I")
        );
    }

    #[test]
    fn messages_round_trip_and_every_field_is_checked() {
        let m = WireMessage {
            id: IdGen::new().next(1_800_000_000_000),
            from: "alice".into(),
            to: "bob".into(),
            kind: Kind::Text,
            body: "héllo".into(),
            ts: 1_800_000_000_000,
        };
        let bytes = m.encode().unwrap();
        assert_eq!(WireMessage::decode(&bytes, &me()).unwrap(), m);
        assert_eq!(
            WireMessage::decode(&bytes, &UserId::parse("carol").unwrap()),
            Err(MessageError::NotForMe)
        );
        let big = WireMessage {
            body: "x".repeat(MAX_MESSAGE_BYTES),
            ..m.clone()
        };
        assert!(matches!(big.encode(), Err(MessageError::TooLarge(_))));
        for bad in [
            &b"[]"[..],
            b"not json",
            br#"{"id":"x","from":"alice","to":"bob","kind":"text","body":"","ts":1}"#,
            br#"{"id":"01HZZZZZZZZZZZZZZZZZZZZZZZ","from":"a b","to":"bob","kind":"text","body":"","ts":1}"#,
            br#"{"id":"01HZZZZZZZZZZZZZZZZZZZZZZZ","from":"alice","to":"bob","kind":"image","body":"","ts":1}"#,
        ] {
            assert!(WireMessage::decode(bad, &me()).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // A newer sender's extra field is not a reason to drop its message.
        let newer = br#"{"id":"01HZZZZZZZZZZZZZZZZZZZZZZZ","from":"alice","to":"bob","kind":"text","body":"","ts":1,"x":2}"#;
        assert_eq!(WireMessage::decode(newer, &me()).unwrap().from, "alice");
    }
}
