//! TLS-sig-api v2 UserSig codec.
//!
//! A UserSig is `zlib(JSON)` in a base64 variant (`+`→`*`, `/`→`-`, `=`→`_`). The JSON holds
//! the identifier (UserID), the SDKAppID, the issue time, the lifetime and an HMAC-SHA256 over
//! those fields keyed with the app's SecretKey.
//!
//! * [`decode`] is what a device needs: it has no key, it only wants to know whom the sig is
//!   for and when it expires. It accepts every layout the public generators produce (key
//!   order, whitespace, trailing newline, `\/` escapes, zlib levels 0–9, missing padding) and
//!   turns every malformed input into a typed [`DecodeError`] — never a panic.
//! * [`generate`] and [`verify`] are for the reference IM service (`imlink-sandbox`).
//!
//! The HMAC is the secret half of a UserSig: [`DecodedSig`]'s `Debug` never prints it, and no
//! error message quotes the input.

use std::fmt;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use serde::Deserialize;

/// Largest UserSig string accepted (a real one is ~200–400 characters; userbuf can add some).
pub const MAX_SIG_LEN: usize = 16 * 1024;
/// Largest inflated JSON document accepted: a cap against zip bombs.
pub const MAX_INFLATED_LEN: usize = 64 * 1024;

/// The fields a UserSig carries, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct DecodedSig {
    /// `TLS.identifier`: the UserID the sig was issued for.
    pub identifier: String,
    /// `TLS.sdkappid`.
    pub sdk_app_id: u64,
    /// `TLS.time`: Unix seconds at issue.
    pub time: u64,
    /// `TLS.expire`: lifetime in seconds, relative to `time`.
    pub expire: u64,
    /// `TLS.userbuf`, decoded, when present.
    pub userbuf: Option<Vec<u8>>,
    /// The `TLS.userbuf` text as it stood in the document (the HMAC covers this text).
    userbuf_text: Option<String>,
    /// `TLS.sig`: the 32-byte HMAC. Secret: never printed.
    hmac: [u8; 32],
}

impl DecodedSig {
    /// `time + expire`: the last Unix second at which the sig is still valid.
    pub fn expires_at(&self) -> u64 {
        // Checked at decode time: the sum cannot overflow.
        self.time + self.expire
    }

    /// Whether the sig is expired at Unix time `now` (valid while `now <= expires_at`).
    pub fn is_expired_at(&self, now: u64) -> bool {
        now > self.expires_at()
    }

    /// The HMAC in standard base64, as `TLS.sig` holds it. This *is* the secret part of the
    /// UserSig: only for test vectors and verification tooling, never for logs or output.
    pub fn hmac_base64(&self) -> String {
        STANDARD.encode(self.hmac)
    }

    /// The decoded fields as a JSON object, without the HMAC: what `imlinkctl sig decode`
    /// prints.
    pub fn public_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "version": "2.0",
            "identifier": self.identifier,
            "sdk_app_id": self.sdk_app_id,
            "time": self.time,
            "expire": self.expire,
            "expires_at": self.expires_at(),
        });
        if let (Some(text), Some(map)) = (&self.userbuf_text, v.as_object_mut()) {
            map.insert("userbuf".into(), serde_json::Value::String(text.clone()));
        }
        v
    }
}

impl fmt::Debug for DecodedSig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedSig")
            .field("identifier", &self.identifier)
            .field("sdk_app_id", &self.sdk_app_id)
            .field("time", &self.time)
            .field("expire", &self.expire)
            .field("userbuf_len", &self.userbuf.as_ref().map(Vec::len))
            .field("hmac", &"<redacted>")
            .finish()
    }
}

/// Why a string is not a decodable UserSig. Messages never quote the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the UserSig is empty")]
    Empty,
    #[error("the UserSig is {len} bytes long, more than the {MAX_SIG_LEN} accepted")]
    TooLong { len: usize },
    #[error(
        "the UserSig has a character outside its alphabet at byte {position} \
         (allowed: A-Z a-z 0-9 * - _)"
    )]
    Alphabet { position: usize },
    #[error("the UserSig is not valid base64 after un-escaping ({0})")]
    Base64(String),
    #[error("the UserSig does not inflate as a zlib stream ({0})")]
    Zlib(String),
    #[error("the UserSig inflates to more than {MAX_INFLATED_LEN} bytes (zip bomb?)")]
    TooLarge,
    #[error("the UserSig's document is not valid JSON ({0})")]
    Json(String),
    #[error("the UserSig's document is not a JSON object")]
    NotAnObject,
    #[error("the UserSig's document lacks the field {0}")]
    MissingField(&'static str),
    #[error("the UserSig's field {field} {problem}")]
    BadField {
        field: &'static str,
        problem: &'static str,
    },
    #[error("the UserSig is version {found:?}; only TLS-sig-api version \"2.0\" is supported")]
    Version { found: String },
}

/// The JSON document inside a UserSig. Values are kept loose here and checked one by one in
/// [`decode`] so each problem gets a precise error.
#[derive(Deserialize)]
struct RawDoc {
    #[serde(rename = "TLS.ver")]
    ver: Option<serde_json::Value>,
    #[serde(rename = "TLS.identifier")]
    identifier: Option<serde_json::Value>,
    #[serde(rename = "TLS.sdkappid")]
    sdkappid: Option<serde_json::Value>,
    #[serde(rename = "TLS.time")]
    time: Option<serde_json::Value>,
    #[serde(rename = "TLS.expire")]
    expire: Option<serde_json::Value>,
    #[serde(rename = "TLS.userbuf")]
    userbuf: Option<serde_json::Value>,
    #[serde(rename = "TLS.sig")]
    sig: Option<serde_json::Value>,
}

/// Standard alphabet, padding optional: UserSigs in the wild come with and without it.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decode a UserSig string. Leading/trailing ASCII whitespace (a newline from a file) is ignored.
pub fn decode(sig: &str) -> Result<DecodedSig, DecodeError> {
    let sig = sig.trim_matches(|c: char| c.is_ascii_whitespace());
    if sig.is_empty() {
        return Err(DecodeError::Empty);
    }
    if sig.len() > MAX_SIG_LEN {
        return Err(DecodeError::TooLong { len: sig.len() });
    }
    let mut b64 = Vec::with_capacity(sig.len());
    for (position, byte) in sig.bytes().enumerate() {
        b64.push(match byte {
            b'*' => b'+',
            b'-' => b'/',
            b'_' => b'=',
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => byte,
            _ => return Err(DecodeError::Alphabet { position }),
        });
    }
    let compressed = LENIENT
        .decode(&b64)
        .map_err(|e| DecodeError::Base64(e.to_string()))?;
    let json = inflate_capped(&compressed)?;
    parse_document(&json)
}

/// Inflates with miniz_oxide's one-shot decoder, whose state (about 11 KB) is the only large
/// value: flate2's streaming reader builds its 43 KB `InflateState` (the decoder plus a 32 KB
/// window) on the stack before boxing it, and a daemon decodes its cached UserSig at start-up
/// deep in the main thread's stack, whose touched pages stay resident for the process's life
/// (README, "Footprint").
fn inflate_capped(compressed: &[u8]) -> Result<Vec<u8>, DecodeError> {
    use miniz_oxide::inflate::{TINFLStatus, decompress_to_vec_zlib_with_limit};
    decompress_to_vec_zlib_with_limit(compressed, MAX_INFLATED_LEN).map_err(|e| match e.status {
        TINFLStatus::HasMoreOutput => DecodeError::TooLarge,
        _ => DecodeError::Zlib(e.to_string()),
    })
}

fn parse_document(json: &[u8]) -> Result<DecodedSig, DecodeError> {
    // An object, not fields by position: serde would read a JSON array into the struct too,
    // and no issuer writes one.
    let value: serde_json::Value = serde_json::from_slice(json).map_err(|e| {
        // serde_json's messages name a line/column, never the content.
        DecodeError::Json(e.to_string())
    })?;
    if !value.is_object() {
        return Err(DecodeError::NotAnObject);
    }
    let raw: RawDoc =
        serde_json::from_value(value).map_err(|e| DecodeError::Json(e.to_string()))?;

    let ver = raw.ver.ok_or(DecodeError::MissingField("TLS.ver"))?;
    match ver {
        serde_json::Value::String(s) if s == "2.0" => {}
        serde_json::Value::String(found) => return Err(DecodeError::Version { found }),
        _ => {
            return Err(DecodeError::BadField {
                field: "TLS.ver",
                problem: "is not a string",
            });
        }
    }
    let identifier = match raw.identifier {
        None => return Err(DecodeError::MissingField("TLS.identifier")),
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(serde_json::Value::String(_)) => {
            return Err(DecodeError::BadField {
                field: "TLS.identifier",
                problem: "is empty",
            });
        }
        Some(_) => {
            return Err(DecodeError::BadField {
                field: "TLS.identifier",
                problem: "is not a string",
            });
        }
    };
    let sdk_app_id = unsigned(raw.sdkappid, "TLS.sdkappid")?;
    let time = unsigned(raw.time, "TLS.time")?;
    let expire = unsigned(raw.expire, "TLS.expire")?;
    if time.checked_add(expire).is_none_or(|t| t > i64::MAX as u64) {
        return Err(DecodeError::BadField {
            field: "TLS.expire",
            problem: "overflows when added to TLS.time",
        });
    }
    let (userbuf, userbuf_text) = match raw.userbuf {
        None | Some(serde_json::Value::Null) => (None, None),
        Some(serde_json::Value::String(s)) => {
            let bytes = STANDARD
                .decode(s.as_bytes())
                .map_err(|_| DecodeError::BadField {
                    field: "TLS.userbuf",
                    problem: "is not standard base64",
                })?;
            (Some(bytes), Some(s))
        }
        Some(_) => {
            return Err(DecodeError::BadField {
                field: "TLS.userbuf",
                problem: "is not a string",
            });
        }
    };
    let hmac = match raw.sig {
        None => return Err(DecodeError::MissingField("TLS.sig")),
        Some(serde_json::Value::String(s)) => {
            let bytes = LENIENT
                .decode(s.as_bytes())
                .map_err(|_| DecodeError::BadField {
                    field: "TLS.sig",
                    problem: "is not base64",
                })?;
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| DecodeError::BadField {
                field: "TLS.sig",
                problem: "is not a 32-byte HMAC-SHA256",
            })?
        }
        Some(_) => {
            return Err(DecodeError::BadField {
                field: "TLS.sig",
                problem: "is not a string",
            });
        }
    };
    Ok(DecodedSig {
        identifier,
        sdk_app_id,
        time,
        expire,
        userbuf,
        userbuf_text,
        hmac,
    })
}

fn unsigned(v: Option<serde_json::Value>, field: &'static str) -> Result<u64, DecodeError> {
    match v {
        None => Err(DecodeError::MissingField(field)),
        Some(serde_json::Value::Number(n)) => n.as_u64().ok_or(DecodeError::BadField {
            field,
            problem: "is not a non-negative integer",
        }),
        Some(_) => Err(DecodeError::BadField {
            field,
            problem: "is not a number",
        }),
    }
}

/// What to sign: each line ends with `\n`, the last one too.
fn text_to_sign(
    identifier: &str,
    sdk_app_id: u64,
    time: u64,
    expire: u64,
    userbuf_b64: Option<&str>,
) -> String {
    let mut text = format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdk_app_id}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    if let Some(ub) = userbuf_b64 {
        text.push_str("TLS.userbuf:");
        text.push_str(ub);
        text.push('\n');
    }
    text
}

fn hmac_key(secret_key: &str) -> ring::hmac::Key {
    // The key is the UTF-8 bytes of the SecretKey as written, not hex-decoded.
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret_key.as_bytes())
}

/// Inputs to [`generate`].
#[derive(Clone)]
pub struct SigParams<'a> {
    pub sdk_app_id: u64,
    /// The app's SecretKey (its UTF-8 bytes are the HMAC key).
    pub secret_key: &'a str,
    pub identifier: &'a str,
    /// Unix seconds at issue.
    pub time: u64,
    /// Lifetime in seconds.
    pub expire: u64,
    pub userbuf: Option<&'a [u8]>,
}

impl fmt::Debug for SigParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigParams")
            .field("sdk_app_id", &self.sdk_app_id)
            .field("secret_key", &"<redacted>")
            .field("identifier", &self.identifier)
            .field("time", &self.time)
            .field("expire", &self.expire)
            .finish_non_exhaustive()
    }
}

/// Generate a UserSig the way the public libraries do (compact JSON, zlib level 6).
pub fn generate(p: &SigParams<'_>) -> String {
    let userbuf_b64 = p.userbuf.map(|b| STANDARD.encode(b));
    let text = text_to_sign(
        p.identifier,
        p.sdk_app_id,
        p.time,
        p.expire,
        userbuf_b64.as_deref(),
    );
    let tag = ring::hmac::sign(&hmac_key(p.secret_key), text.as_bytes());
    let mut doc = serde_json::Map::new();
    doc.insert("TLS.ver".into(), "2.0".into());
    doc.insert("TLS.identifier".into(), p.identifier.into());
    doc.insert("TLS.sdkappid".into(), p.sdk_app_id.into());
    doc.insert("TLS.expire".into(), p.expire.into());
    doc.insert("TLS.time".into(), p.time.into());
    if let Some(ub) = userbuf_b64 {
        doc.insert("TLS.userbuf".into(), ub.into());
    }
    doc.insert("TLS.sig".into(), STANDARD.encode(tag.as_ref()).into());
    // Serialising a map of strings and integers cannot fail.
    let json = serde_json::to_vec(&serde_json::Value::Object(doc)).unwrap_or_default();
    pack(&json, 6)
}

/// Wrap a JSON document in the UserSig envelope: zlib at `level` (0–9), base64, then the
/// `*`/`-`/`_` substitutions. Exposed so tools and tests can build every layout the public
/// generators emit.
pub fn pack(json: &[u8], level: u32) -> String {
    use std::io::Write as _;
    let mut enc =
        flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level.min(9)));
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(json);
    armor(&enc.finish().unwrap_or_default())
}

/// The envelope's outer layer alone: base64, then the `*`/`-`/`_` substitutions, around bytes
/// that are meant to be a zlib stream ([`pack`] compresses first; tools and tests can wrap a
/// stream they built or damaged themselves).
pub fn armor(compressed: &[u8]) -> String {
    STANDARD
        .encode(compressed)
        .chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect()
}

/// Why the reference IM service refuses a UserSig, with the IM error code it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("70002 UserSig is empty")]
    Empty,
    #[error("70003 UserSig is malformed")]
    Malformed,
    #[error("70014 UserSig was issued for another SDKAppID")]
    AppMismatch,
    #[error("70013 UserSig was issued for another UserID")]
    IdentifierMismatch,
    #[error("70001 UserSig expired")]
    Expired,
    #[error("70009 UserSig signature does not verify")]
    BadSignature,
}

impl VerifyError {
    /// The IM error code (`error-codes.md`).
    pub fn code(self) -> u32 {
        match self {
            VerifyError::Empty => 70002,
            VerifyError::Malformed => 70003,
            VerifyError::AppMismatch => 70014,
            VerifyError::IdentifierMismatch => 70013,
            VerifyError::Expired => 70001,
            VerifyError::BadSignature => 70009,
        }
    }
}

/// Verify a UserSig as an IM service does, in the order the reference services check:
/// decodes, SDKAppID, identifier, expiry, then the HMAC (constant-time comparison).
pub fn verify(
    sig: &str,
    secret_key: &str,
    sdk_app_id: u64,
    identifier: &str,
    now: u64,
) -> Result<DecodedSig, VerifyError> {
    if sig.trim().is_empty() {
        return Err(VerifyError::Empty);
    }
    let d = decode(sig).map_err(|_| VerifyError::Malformed)?;
    if d.sdk_app_id != sdk_app_id {
        return Err(VerifyError::AppMismatch);
    }
    if d.identifier != identifier {
        return Err(VerifyError::IdentifierMismatch);
    }
    if d.is_expired_at(now) {
        return Err(VerifyError::Expired);
    }
    verify_hmac(&d, secret_key)?;
    Ok(d)
}

/// Recompute the HMAC from the decoded fields and compare it in constant time.
pub fn verify_hmac(d: &DecodedSig, secret_key: &str) -> Result<(), VerifyError> {
    let text = text_to_sign(
        &d.identifier,
        d.sdk_app_id,
        d.time,
        d.expire,
        d.userbuf_text.as_deref(),
    );
    ring::hmac::verify(&hmac_key(secret_key), text.as_bytes(), &d.hmac)
        .map_err(|_| VerifyError::BadSignature)
}

/// A short, stable, non-reversible name for a UserSig (or any secret) that logs and status
/// output can show instead of the secret: `sha256:` and the first 8 bytes of the digest in hex.
pub fn fingerprint(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.trim().as_bytes());
    let mut out = String::from("sha256:");
    for b in &digest.as_ref()[..8] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}
