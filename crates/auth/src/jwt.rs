//! NATS JWTs (v2): `base64url(header) . base64url(claims) . base64url(signature)`, no padding.
//!
//! The header is always `{"typ":"JWT","alg":"ed25519-nkey"}`; the signature is the issuer's
//! Ed25519 signature over the first two parts as they stand, and the issuer is the `iss` claim
//! (a public nkey). `jti` is the base32 (no padding) of SHA-512/256 over the registered claims
//! serialised with `jti` empty, in the order nats-io/jwt writes them (`aud exp jti iat iss
//! name nbf sub`, empty ones left out). nats-server does not check `jti`; it is computed the
//! same way anyway so that a token made here reads like one made by the NATS tools.
//!
//! What nats-server checks on the tokens we send it (nats-io/jwt `Decode` and the callout's
//! `processReply`): header type and algorithm, the signature against `iss`, the kind of `iss`
//! (an account key for both the response and the user JWT), `exp`/`nbf` against its clock,
//! the response's `sub` (the user nkey it generated for this CONNECT) and `aud` (its server
//! id), and that the user JWT's `iss` is the configured callout issuer.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::nkeys::{KeyPair, NkeyError, PublicKey};

/// The only header this crate writes or accepts.
pub const HEADER_JSON: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;
/// Largest token decoded (nats-io/jwt allows 1 MiB; a callout request is a few KiB, more with
/// a client certificate chain).
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The registered claims, in nats-io/jwt's field order (which `jti` depends on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Registered {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub aud: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub exp: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jti: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub iat: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub iss: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub nbf: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sub: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A whole token's claims: the registered ones and the NATS-specific object `nats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Token<N> {
    #[serde(flatten)]
    pub claims: Registered,
    pub nats: N,
}

/// Why a token does not decode or verify. Messages never quote the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is {0} bytes, more than the {MAX_TOKEN_LEN} accepted")]
    TooLong(usize),
    #[error("the token is not three base64url parts separated by dots")]
    Shape,
    #[error("the token's {0} is not base64url without padding")]
    Base64(&'static str),
    #[error("the token's header is not {{\"typ\":\"JWT\",\"alg\":\"ed25519-nkey\"}}")]
    Header,
    #[error("the token's claims are not the JSON expected ({0})")]
    Claims(String),
    #[error("the token's issuer (iss) {0}")]
    Issuer(NkeyError),
    #[error("the token's signature is not 64 bytes")]
    SignatureLength,
    #[error("the token's signature does not verify against its issuer")]
    Signature,
}

/// SHA-512/256 of the registered claims with `jti` empty, in base32 without padding.
pub fn jti(claims: &Registered) -> String {
    let mut c = claims.clone();
    c.jti.clear();
    let json = go_json(&c);
    let digest = ring::digest::digest(&ring::digest::SHA512_256, json.as_bytes());
    crate::nkeys::base32_encode(digest.as_ref())
}

/// JSON as Go's `encoding/json` writes it: serde_json's compact form, with `<`, `>`, `&`,
/// U+2028 and U+2029 escaped (they can only occur inside strings, so a plain replace is exact).
fn go_json<T: Serialize>(v: &T) -> String {
    // Serialising plain structs of strings and integers cannot fail.
    let s = serde_json::to_string(v).unwrap_or_default();
    if !s.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return s;
    }
    s.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// Sign `nats` with `claims` as `signer`: sets `iss` to the signer, `iat` to `now` and `jti`.
pub fn encode<N: Serialize>(
    mut claims: Registered,
    nats: &N,
    signer: &KeyPair,
    now: i64,
) -> String {
    claims.iss = signer.public().encode();
    claims.iat = now;
    claims.jti = String::new();
    claims.jti = jti(&claims);
    let token = Token { claims, nats };
    let header = URL_SAFE_NO_PAD.encode(HEADER_JSON);
    let payload = URL_SAFE_NO_PAD.encode(go_json(&token));
    let signed = format!("{header}.{payload}");
    let sig = signer.sign(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

#[derive(Deserialize)]
struct Header {
    typ: String,
    alg: String,
}

/// A token whose signature verified against its `iss`.
#[derive(Debug, Clone)]
pub struct Verified<N> {
    pub claims: Registered,
    pub nats: N,
    pub issuer: PublicKey,
}

/// Decode `token` and verify its signature against the key named in its `iss`. Whether that
/// issuer is one to trust is the caller's question.
pub fn decode<N: DeserializeOwned>(token: &str) -> Result<Verified<N>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Shape);
    };
    let header = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| JwtError::Base64("header"))?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| JwtError::Header)?;
    // nats-io/jwt compares the type case-insensitively; "ed25519" alone is the v1 algorithm,
    // which this crate does not speak.
    if !header.typ.eq_ignore_ascii_case("JWT") || !header.alg.eq_ignore_ascii_case("ed25519-nkey") {
        return Err(JwtError::Header);
    }
    let payload = URL_SAFE_NO_PAD
        .decode(p)
        .map_err(|_| JwtError::Base64("claims"))?;
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JwtError::Base64("signature"))?;
    if sig.len() != 64 {
        return Err(JwtError::SignatureLength);
    }
    // Parse before verifying: the issuer key is in the claims. Nothing parsed is used unless
    // the signature verifies.
    let token_claims: Token<N> =
        serde_json::from_slice(&payload).map_err(|e| JwtError::Claims(short(&e)))?;
    let issuer = PublicKey::parse(&token_claims.claims.iss).map_err(JwtError::Issuer)?;
    let signed_len = h.len() + 1 + p.len();
    if !issuer.verify(&token.as_bytes()[..signed_len], &sig) {
        return Err(JwtError::Signature);
    }
    Ok(Verified {
        claims: token_claims.claims,
        nats: token_claims.nats,
        issuer,
    })
}

/// serde_json's message names a line and column and the kind of mismatch, never the content;
/// still capped, as everything that ends up in a log.
/// serde_json's message, at most 120 bytes: it quotes values from the claims, so the cut
/// goes back to a character boundary (`String::truncate` panics inside a character).
fn short(e: &serde_json::Error) -> String {
    let mut s = e.to_string();
    let mut end = s.len().min(120);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nkeys::Kind;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Nats {
        #[serde(rename = "type")]
        kind: String,
        version: i64,
    }

    fn account() -> KeyPair {
        KeyPair::from_raw_seed(Kind::Account, [3u8; 32])
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let kp = account();
        let claims = Registered {
            aud: "APP".into(),
            exp: 1_900_000_000,
            name: "alice".into(),
            sub: KeyPair::from_raw_seed(Kind::User, [4u8; 32])
                .public()
                .encode(),
            ..Default::default()
        };
        let nats = Nats {
            kind: "user".into(),
            version: 2,
        };
        let t = encode(claims.clone(), &nats, &kp, 1_800_000_000);
        let v: Verified<Nats> = decode(&t).unwrap();
        assert_eq!(v.nats, nats);
        assert_eq!(v.issuer, *kp.public());
        assert_eq!(v.claims.aud, "APP");
        assert_eq!(v.claims.iat, 1_800_000_000);
        assert_eq!(v.claims.iss, kp.public().encode());
        assert_eq!(v.claims.jti, jti(&v.claims));
        // Deterministic: Ed25519 and the fixed clock.
        assert_eq!(t, encode(claims, &nats, &kp, 1_800_000_000));
    }

    #[test]
    fn jti_hashes_the_registered_claims_in_go_order() {
        let c = Registered {
            aud: "APP".into(),
            exp: 2,
            iat: 1,
            iss: "AISS".into(),
            name: "n<&>".into(),
            sub: "USUB".into(),
            ..Default::default()
        };
        let json = r#"{"aud":"APP","exp":2,"iat":1,"iss":"AISS","name":"n\u003c\u0026\u003e","sub":"USUB"}"#;
        assert_eq!(go_json(&c), json);
        let d = ring::digest::digest(&ring::digest::SHA512_256, json.as_bytes());
        assert_eq!(jti(&c), crate::nkeys::base32_encode(d.as_ref()));
        assert_eq!(jti(&c).len(), 52);
    }

    #[test]
    fn tampering_is_caught() {
        let kp = account();
        let t = encode(
            Registered {
                sub: "x".into(),
                ..Default::default()
            },
            &Nats {
                kind: "user".into(),
                version: 2,
            },
            &kp,
            1,
        );
        let parts: Vec<&str> = t.split('.').collect();
        // Claims swapped for others signed by nobody.
        let other = URL_SAFE_NO_PAD.encode(format!(
            r#"{{"iss":"{}","sub":"y","nats":{{"type":"user","version":2}}}}"#,
            kp.public().encode()
        ));
        let forged = format!("{}.{}.{}", parts[0], other, parts[2]);
        assert_eq!(decode::<Nats>(&forged).unwrap_err(), JwtError::Signature);
        // Another header.
        let h = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"HS256"}"#);
        let forged = format!("{h}.{}.{}", parts[1], parts[2]);
        assert_eq!(decode::<Nats>(&forged).unwrap_err(), JwtError::Header);
        assert_eq!(decode::<Nats>("a.b").unwrap_err(), JwtError::Shape);
        assert_eq!(decode::<Nats>("a.b.c.d").unwrap_err(), JwtError::Shape);
        let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
        assert_eq!(
            decode::<Nats>(&padded).unwrap_err(),
            JwtError::Base64("header")
        );
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            decode::<Nats>(&long).unwrap_err(),
            JwtError::TooLong(MAX_TOKEN_LEN + 1)
        );
    }

    #[test]
    fn claims_of_the_wrong_type_are_an_error_whatever_characters_they_quote() {
        // serde_json's message quotes the value ("invalid type: string \"…\", expected
        // i64"): cut at a fixed byte count it must not split a character (that panicked).
        let parts: Vec<String> = encode(
            Registered::default(),
            &Nats {
                kind: "user".into(),
                version: 2,
            },
            &account(),
            1,
        )
        .split('.')
        .map(String::from)
        .collect();
        for pad in ["", "a", "ab"] {
            let claims = URL_SAFE_NO_PAD.encode(format!(
                r#"{{"iss":"x","nats":{{"type":"user","version":"{pad}{}"}}}}"#,
                "\u{e9}\u{20ac}".repeat(60)
            ));
            let token = format!("{}.{claims}.{}", parts[0], parts[2]);
            match decode::<Nats>(&token).unwrap_err() {
                JwtError::Claims(m) => assert!(m.len() <= 120, "{m}"),
                e => panic!("{e:?}"),
            }
        }
    }
}
