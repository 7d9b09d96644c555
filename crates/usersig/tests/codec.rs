//! The UserSig codec against the public reference vectors, every layout the public
//! generators produce, and every class of malformed input.

use imlink_usersig::{
    DecodeError, MAX_INFLATED_LEN, SigParams, VerifyError, armor, decode, fingerprint, generate,
    pack, verify,
};
use serde_json::Value;

const KEY: &str = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e";
const APP: u64 = 1_400_000_000;
const TIME: u64 = 1_569_910_200;
const EXPIRE: u64 = 15_552_000;

fn vectors() -> Value {
    serde_json::from_str(include_str!("data/usersig-v2.json")).expect("vector file is JSON")
}

#[test]
fn reference_vectors_decode_to_their_fields_and_hmac() {
    let v = vectors();
    assert_eq!(v["key"], KEY);
    for case in v["cases"].as_array().expect("cases") {
        let sig = case["usersig"].as_str().expect("usersig");
        let d = decode(sig).unwrap_or_else(|e| panic!("{}: {e}", case["layout"]));
        assert_eq!(d.identifier, case["identifier"].as_str().unwrap());
        assert_eq!(d.sdk_app_id, APP);
        assert_eq!(d.time, TIME);
        assert_eq!(d.expire, EXPIRE);
        assert_eq!(d.expires_at(), TIME + EXPIRE);
        assert_eq!(d.hmac_base64(), case["sig_hmac_b64"].as_str().unwrap());
        let userbuf = case["userbuf"].as_str().map(|s| s.as_bytes().to_vec());
        assert_eq!(d.userbuf, userbuf, "{}", case["layout"]);
        // And the reference service accepts them with the vectors' key, at issue time.
        verify(sig, KEY, APP, &d.identifier, TIME).expect("vector verifies");
    }
}

#[test]
fn generated_sigs_match_the_reference_hmacs() {
    for case in vectors()["cases"].as_array().unwrap() {
        let userbuf = case["userbuf"].as_str().map(str::as_bytes);
        let sig = generate(&SigParams {
            sdk_app_id: APP,
            secret_key: KEY,
            identifier: case["identifier"].as_str().unwrap(),
            time: TIME,
            expire: EXPIRE,
            userbuf,
        });
        let d = decode(&sig).unwrap();
        assert_eq!(d.hmac_base64(), case["sig_hmac_b64"].as_str().unwrap());
        assert_eq!(d.userbuf.as_deref(), userbuf);
    }
}

/// The HMAC of identifier "0" in the vectors, used to build documents by hand.
const HMAC_0: &str = "CpjuBdQs9ZwnuGAJR8onoOeI9fweX2vIMMY94iOJWJY=";

fn assert_is_vector_zero(sig: &str, layout: &str) {
    let d = decode(sig).unwrap_or_else(|e| panic!("{layout}: {e}"));
    assert_eq!(
        (d.identifier.as_str(), d.sdk_app_id, d.time, d.expire),
        ("0", APP, TIME, EXPIRE),
        "{layout}"
    );
    assert_eq!(d.hmac_base64(), HMAC_0, "{layout}");
    verify(sig, KEY, APP, "0", TIME).unwrap_or_else(|e| panic!("{layout}: {e}"));
}

#[test]
fn every_public_layout_decodes() {
    let docs = [
        (
            "python compact",
            format!(
                r#"{{"TLS.ver":"2.0","TLS.identifier":"0","TLS.sdkappid":{APP},"TLS.expire":{EXPIRE},"TLS.time":{TIME},"TLS.sig":"{HMAC_0}"}}"#
            ),
        ),
        (
            "other key order (Go/Java)",
            format!(
                r#"{{"TLS.sig":"{HMAC_0}","TLS.time":{TIME},"TLS.expire":{EXPIRE},"TLS.sdkappid":{APP},"TLS.identifier":"0","TLS.ver":"2.0"}}"#
            ),
        ),
        (
            "Go trailing newline",
            format!(
                "{{\"TLS.ver\":\"2.0\",\"TLS.identifier\":\"0\",\"TLS.sdkappid\":{APP},\"TLS.expire\":{EXPIRE},\"TLS.time\":{TIME},\"TLS.sig\":\"{HMAC_0}\"}}\n"
            ),
        ),
        (
            "pretty-printed with spaces and newlines",
            format!(
                "{{\n  \"TLS.ver\": \"2.0\",\n  \"TLS.identifier\": \"0\",\n  \"TLS.sdkappid\": {APP},\n  \"TLS.expire\": {EXPIRE},\n  \"TLS.time\": {TIME},\n  \"TLS.sig\": \"{HMAC_0}\"\n}}"
            ),
        ),
    ];
    for (layout, json) in &docs {
        for level in 0..=9 {
            let sig = pack(json.as_bytes(), level);
            assert_is_vector_zero(&sig, &format!("{layout}, zlib level {level}"));
            // Missing padding: strip the `_` the encoder added.
            let unpadded = sig.trim_end_matches('_');
            assert_is_vector_zero(unpadded, &format!("{layout}, level {level}, no padding"));
            // A trailing newline, as when the sig is read from a file.
            assert_is_vector_zero(&format!("{sig}\n"), &format!("{layout}, trailing newline"));
        }
    }
}

#[test]
fn php_escaped_slashes_decode() {
    // Vector "xiaojun" has a `/` in its HMAC; PHP's json_encode writes it as `\/`.
    const HMAC_X: &str = "gOoeW13s19Fgyn8RwlEt/rLkw3wzLq9M+SqBbXTIfnQ=";
    let json = format!(
        r#"{{"TLS.ver":"2.0","TLS.identifier":"xiaojun","TLS.sdkappid":{APP},"TLS.expire":{EXPIRE},"TLS.time":{TIME},"TLS.sig":"{}"}}"#,
        HMAC_X.replace('/', "\\/")
    );
    assert!(json.contains("\\/"));
    for level in [0, 1, 6, 9] {
        let sig = pack(json.as_bytes(), level);
        let d = decode(&sig).unwrap();
        assert_eq!(d.hmac_base64(), HMAC_X);
        verify(&sig, KEY, APP, "xiaojun", TIME).unwrap();
    }
}

fn doc_with(field: &str, value: Option<Value>) -> String {
    let mut doc: serde_json::Map<String, Value> = serde_json::from_str(&format!(
        r#"{{"TLS.ver":"2.0","TLS.identifier":"0","TLS.sdkappid":{APP},"TLS.expire":{EXPIRE},"TLS.time":{TIME},"TLS.sig":"{HMAC_0}"}}"#
    ))
    .unwrap();
    match value {
        Some(v) => doc.insert(field.to_string(), v),
        None => doc.remove(field),
    };
    pack(serde_json::to_string(&doc).unwrap().as_bytes(), 6)
}

#[test]
fn malformed_envelopes_get_typed_errors() {
    let good = pack(b"{}", 6);
    assert_eq!(decode(""), Err(DecodeError::Empty));
    assert_eq!(decode(" \n"), Err(DecodeError::Empty));
    assert!(matches!(
        decode(&"A".repeat(20_000)),
        Err(DecodeError::TooLong { .. })
    ));
    // Standard base64 characters are not in the UserSig alphabet.
    for bad in ["eJ+r", "eJ/r", "eJr=", "eJ r", "eJé", "eJ\0r"] {
        assert!(
            matches!(decode(bad), Err(DecodeError::Alphabet { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(decode("ab*d-"), Err(DecodeError::Base64(_))));
    assert!(matches!(decode("A_B_"), Err(DecodeError::Base64(_))));
    // Valid base64, not zlib.
    assert!(matches!(decode("AAAAAAAA"), Err(DecodeError::Zlib(_))));
    // A truncated zlib stream.
    let truncated = &good[..good.len() - 6];
    assert!(matches!(
        decode(truncated),
        Err(DecodeError::Zlib(_) | DecodeError::Base64(_))
    ));
    // A zip bomb: 1 MiB of spaces compresses to about a kilobyte.
    let bomb = pack(&vec![b' '; 1 << 20], 9);
    assert!(bomb.len() < 8 * 1024);
    assert_eq!(decode(&bomb), Err(DecodeError::TooLarge));
    // Exactly at the cap is fine as far as inflating goes (then it is not JSON); a byte more
    // is too large.
    assert!(matches!(
        decode(&pack(&vec![b'x'; MAX_INFLATED_LEN], 9)),
        Err(DecodeError::Json(_))
    ));
    assert_eq!(
        decode(&pack(&vec![b'x'; MAX_INFLATED_LEN + 1], 9)),
        Err(DecodeError::TooLarge)
    );
    // A stream whose Adler-32 checksum (its last 4 bytes) does not match what it inflates to.
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    std::io::Write::write_all(&mut z, br#"{"a":1}"#).unwrap();
    let mut raw = z.finish().unwrap();
    *raw.last_mut().unwrap() ^= 0x01;
    assert!(matches!(decode(&armor(&raw)), Err(DecodeError::Zlib(_))));
    assert!(matches!(
        decode(&pack(b"not json", 6)),
        Err(DecodeError::Json(_))
    ));
    assert_eq!(decode(&pack(b"[1,2]", 6)), Err(DecodeError::NotAnObject));
    // The fields of a real sig, by position in an array: serde would accept it into a
    // struct; no issuer writes it, so it is refused.
    let by_position = format!(r#"["2.0","0",{APP},{EXPIRE},{TIME},"{HMAC_0}"]"#);
    assert_eq!(
        decode(&pack(by_position.as_bytes(), 6)),
        Err(DecodeError::NotAnObject)
    );
    assert!(matches!(
        decode(&pack(&[0xff, 0xfe], 6)),
        Err(DecodeError::Json(_))
    ));
}

#[test]
fn missing_and_mistyped_fields_get_typed_errors() {
    for field in [
        "TLS.ver",
        "TLS.identifier",
        "TLS.sdkappid",
        "TLS.time",
        "TLS.expire",
        "TLS.sig",
    ] {
        assert_eq!(
            decode(&doc_with(field, None)),
            Err(DecodeError::MissingField(match field {
                "TLS.ver" => "TLS.ver",
                "TLS.identifier" => "TLS.identifier",
                "TLS.sdkappid" => "TLS.sdkappid",
                "TLS.time" => "TLS.time",
                "TLS.expire" => "TLS.expire",
                _ => "TLS.sig",
            })),
            "{field}"
        );
    }
    let bad = |field: &str, v: Value| decode(&doc_with(field, Some(v)));
    use serde_json::json;
    assert_eq!(
        bad("TLS.ver", json!("1.0")),
        Err(DecodeError::Version {
            found: "1.0".into()
        })
    );
    assert!(matches!(
        bad("TLS.ver", json!(2.0)),
        Err(DecodeError::BadField {
            field: "TLS.ver",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.identifier", json!(7)),
        Err(DecodeError::BadField {
            field: "TLS.identifier",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.identifier", json!("")),
        Err(DecodeError::BadField {
            field: "TLS.identifier",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.sdkappid", json!("1400000000")),
        Err(DecodeError::BadField {
            field: "TLS.sdkappid",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.time", json!(-1)),
        Err(DecodeError::BadField {
            field: "TLS.time",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.expire", json!(1.5)),
        Err(DecodeError::BadField {
            field: "TLS.expire",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.expire", json!(u64::MAX)),
        Err(DecodeError::BadField {
            field: "TLS.expire",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.sig", json!("AAAA")),
        Err(DecodeError::BadField {
            field: "TLS.sig",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.sig", json!("!!!")),
        Err(DecodeError::BadField {
            field: "TLS.sig",
            ..
        })
    ));
    // JSON null reads as absent.
    assert_eq!(
        bad("TLS.sig", json!(null)),
        Err(DecodeError::MissingField("TLS.sig"))
    );
    assert!(matches!(
        bad("TLS.userbuf", json!("%%%")),
        Err(DecodeError::BadField {
            field: "TLS.userbuf",
            ..
        })
    ));
    assert!(matches!(
        bad("TLS.userbuf", json!(5)),
        Err(DecodeError::BadField {
            field: "TLS.userbuf",
            ..
        })
    ));
    // A v1 (ECDSA, string fields) document is refused by its version, not half-parsed.
    let v1 = pack(
        br#"{"TLS.ver":"1.0","TLS.identifier":"0","TLS.sdkappid":"1400000000","TLS.sig":"MEUCIQ"}"#,
        6,
    );
    assert_eq!(
        decode(&v1),
        Err(DecodeError::Version {
            found: "1.0".into()
        })
    );
}

#[test]
fn errors_and_debug_never_show_the_secret_parts() {
    let v = vectors();
    let sig = v["cases"][0]["usersig"].as_str().unwrap();
    let d = decode(sig).unwrap();
    let dbg = format!("{d:?}");
    assert!(
        !dbg.contains(HMAC_0) && !dbg.contains(&HMAC_0[..20]),
        "{dbg}"
    );
    assert!(!d.public_json().to_string().contains(&HMAC_0[..20]));
    // An error for a nearly-valid sig does not echo it.
    let broken = format!("{}+", &sig[..sig.len() - 1]);
    let msg = decode(&broken).unwrap_err().to_string();
    assert!(!msg.contains(&sig[..20]), "{msg}");
    let params = SigParams {
        sdk_app_id: APP,
        secret_key: KEY,
        identifier: "0",
        time: TIME,
        expire: EXPIRE,
        userbuf: None,
    };
    assert!(!format!("{params:?}").contains(KEY));
}

#[test]
fn verify_checks_in_the_reference_order() {
    let sig = generate(&SigParams {
        sdk_app_id: APP,
        secret_key: KEY,
        identifier: "alice",
        time: 1000,
        expire: 100,
        userbuf: None,
    });
    assert!(verify(&sig, KEY, APP, "alice", 1000).is_ok());
    // Valid through the last second, expired after it.
    assert!(verify(&sig, KEY, APP, "alice", 1100).is_ok());
    assert_eq!(
        verify(&sig, KEY, APP, "alice", 1101).unwrap_err(),
        VerifyError::Expired
    );
    assert_eq!(
        verify("", KEY, APP, "alice", 1000).unwrap_err(),
        VerifyError::Empty
    );
    assert_eq!(
        verify("garbage!", KEY, APP, "alice", 1000).unwrap_err(),
        VerifyError::Malformed
    );
    // App is checked before identifier, identifier before expiry, expiry before the HMAC.
    assert_eq!(
        verify(&sig, "wrong", 1, "bob", 5000).unwrap_err(),
        VerifyError::AppMismatch
    );
    assert_eq!(
        verify(&sig, "wrong", APP, "bob", 5000).unwrap_err(),
        VerifyError::IdentifierMismatch
    );
    assert_eq!(
        verify(&sig, "wrong", APP, "alice", 5000).unwrap_err(),
        VerifyError::Expired
    );
    assert_eq!(
        verify(&sig, "wrong", APP, "alice", 1000).unwrap_err(),
        VerifyError::BadSignature
    );
    let codes: Vec<u32> = [
        VerifyError::Empty,
        VerifyError::Malformed,
        VerifyError::AppMismatch,
        VerifyError::IdentifierMismatch,
        VerifyError::Expired,
        VerifyError::BadSignature,
    ]
    .iter()
    .map(|e| e.code())
    .collect();
    assert_eq!(codes, [70002, 70003, 70014, 70013, 70001, 70009]);
    // A forged document with the right fields but a made-up HMAC is refused.
    let forged = pack(format!(r#"{{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":{APP},"TLS.expire":100,"TLS.time":1000,"TLS.sig":"{HMAC_0}"}}"#).as_bytes(), 6);
    assert_eq!(
        verify(&forged, KEY, APP, "alice", 1000).unwrap_err(),
        VerifyError::BadSignature
    );
}

#[test]
fn fingerprint_is_stable_short_and_not_the_secret() {
    let f = fingerprint("abc");
    assert_eq!(f, fingerprint("abc\n"));
    assert_ne!(f, fingerprint("abd"));
    assert_eq!(f.len(), "sha256:".len() + 16);
    assert_eq!(f, "sha256:ba7816bf8f01cfea");
}
