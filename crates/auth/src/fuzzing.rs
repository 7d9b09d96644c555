//! The fuzz targets' bodies for imlink-auth's decoders (`fuzz/fuzz_targets/auth_*.rs` call
//! these), kept in the library so the committed corpora replay as ordinary tests on stable
//! (`tests/fuzz_corpus.rs`). Each one checks properties, not only the absence of a panic.
#![doc(hidden)]

use crate::proto::{Decoder, ServerOp};

/// The NATS protocol decoder on any bytes in any read sizes: never a panic, never more held
/// than a control line and one capped payload, and the same operations whatever the read
/// sizes (up to an error).
pub fn nats_proto(data: &[u8]) {
    let n = data.first().map_or(0, |b| usize::from(*b % 16));
    let sizes = data.get(1..1 + n).unwrap_or(&[]);
    let bytes = data.get(1 + n..).unwrap_or(&[]);
    let max_payload = 512;
    let run = |sizes: &[u8]| {
        let mut d = Decoder::new(max_payload);
        let mut ops: Vec<ServerOp> = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < bytes.len() {
            let step = sizes
                .get(i % sizes.len().max(1))
                .map_or(bytes.len(), |s| usize::from(*s).max(1))
                .min(bytes.len() - at);
            i += 1;
            d.push(&bytes[at..at + step]);
            at += step;
            loop {
                match d.decode() {
                    Ok(Some(op)) => {
                        if let ServerOp::Msg(m) = &op {
                            assert!(m.headers.len() + m.payload.len() <= max_payload);
                        }
                        ops.push(op);
                    }
                    Ok(None) => break,
                    Err(_) => return (ops, true),
                }
            }
            assert!(
                d.buffered() <= crate::proto::MAX_CONTROL_LINE + max_payload + 2 + 256,
                "holds {} bytes",
                d.buffered()
            );
        }
        (ops, false)
    };
    let (ops, failed) = run(sizes);
    let (ops1, failed1) = run(&[]);
    if !failed && !failed1 {
        assert_eq!(ops, ops1, "the read sizes changed what was decoded");
    }
}

/// The authorization request decoder on any payload: never a panic; what it accepts names a
/// server key and a user key of the right kinds.
pub fn callout_request(data: &[u8]) {
    if let Ok(r) = crate::callout::decode_request(data, 1_800_000_000, 5) {
        assert_eq!(r.server.kind(), crate::nkeys::Kind::Server);
    }
    // And the JWT decoder alone, on any text.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::jwt::decode::<serde_json::Value>(text);
    }
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name (for the corpus replay).
pub const TARGETS: &[(&str, Target)] = &[
    ("auth_nats_proto", nats_proto),
    ("auth_callout_request", callout_request),
];
