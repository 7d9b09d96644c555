//! The fuzz targets' bodies (`fuzz/fuzz_targets/*.rs` call these), kept in the library so the
//! committed corpora and every crash ever found replay as ordinary tests on stable
//! (`tests/fuzz_corpus.rs`). Each one checks properties, not only the absence of a panic.
#![doc(hidden)]

use crate::identity::UserId;
use crate::session::{
    ConnEnd, Input, Machine, NetKind, Now, Policy, SigInfo, quote_external, summary,
};

fn user() -> UserId {
    UserId::parse("kiosk-1").unwrap_or_else(|_| unreachable!("a valid UserID"))
}

/// Bytes from `data` as read sizes: a reader that hands out a fuzzer-chosen amount each time.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    i: usize,
}

impl tokio::io::AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let size = match self.sizes.get(self.i % self.sizes.len().max(1)) {
            Some(s) => usize::from(*s).max(1),
            None => 4096,
        };
        self.i += 1;
        let n = size.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        std::task::Poll::Ready(Ok(()))
    }
}

fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let n = data.first().map_or(0, |b| usize::from(*b % 16));
    let sizes = data.get(1..1 + n).unwrap_or(&[]);
    (sizes, data.get(1 + n..).unwrap_or(&[]))
}

/// The whole provisioning client reading an answer: any bytes, any read sizes.
pub fn provision_response(data: &[u8]) {
    const MAX: usize = 4096;
    let (sizes, bytes) = split(data);
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        Err(_) => return,
    };
    let r = rt.block_on(crate::provision::read_response(
        Chunked {
            data: bytes,
            sizes,
            i: 0,
        },
        MAX,
    ));
    match r {
        Ok((_, headers, body)) => {
            assert!(body.len() <= MAX, "a body over the cap");
            assert!(headers.len() <= 64);
            if let Ok(f) =
                crate::provision::parse_answer(&user(), 1_400_000_000, &body, 1_800_000_000)
            {
                assert_eq!(f.user_id, user());
            }
        }
        Err(f) => assert!(!f.message.chars().any(|c| c == '\n')),
    }
}

/// The chunked decoder alone: one read or many, the same answer; never over the cap.
pub fn dechunk(data: &[u8]) {
    const MAX: usize = 2048;
    let (sizes, bytes) = split(data);
    let (whole, out) = crate::provision::dechunk(bytes, MAX);
    assert!(out.len() <= MAX);
    let mut d = crate::provision::Dechunker::new(MAX);
    let mut last = crate::provision::Dechunk::NeedMore;
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |s| usize::from(*s).max(1))
            .min(rest.len());
        last = d.feed(&rest[..n]);
        rest = &rest[n..];
        i += 1;
        if last != crate::provision::Dechunk::NeedMore {
            break;
        }
    }
    if !bytes.is_empty() {
        assert_eq!(last, whole, "split reads decide differently");
        if whole == crate::provision::Dechunk::Done {
            assert_eq!(d.out, out);
        }
    }
}

/// A provisioning body all the way into the session machine, at fuzzer-chosen times.
pub fn provision_to_machine(data: &[u8]) {
    if data.len() < 16 {
        return;
    }
    let now_wall = i64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
    let mono = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default()) >> 8;
    let body = &data[16..];
    let Ok(f) = crate::provision::parse_answer(&user(), 1_400_000_000, body, now_wall) else {
        return;
    };
    let now = Now {
        mono,
        wall: now_wall,
    };
    let mut m = Machine::new(Policy::default(), user(), now, 1);
    m.handle(now, Input::Start);
    m.handle(
        now,
        Input::SigFetched(SigInfo {
            fingerprint: "fp".into(),
            user_id: f.user_id,
            issued_at: f.issued_at,
            expires_at: f.expires_at,
            server_now: now_wall,
            received_at: mono,
            wall_anchored: false,
        }),
    );
    let later = Now {
        mono: mono.saturating_add(3_600_000),
        wall: now_wall.saturating_add(3600),
    };
    m.handle_timeout(later);
    let s = m.snapshot();
    let text = summary(&s, "mqtts://broker", later.mono);
    assert!(!text.chars().any(char::is_control));
    while m.poll_action().is_some() {}
}

/// The UserSig decoder and the daemon's inspection: typed errors that never echo the input.
pub fn usersig(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A sig has no spaces; 16 characters of one are too many to appear in an error. (Shorter
    // or spaced inputs can match the errors' own words: the fuzzer tries exactly that.)
    let sig_like = text.len() >= 16 && !text.contains(char::is_whitespace);
    match imlink_usersig::decode(text) {
        Ok(d) => {
            let _ = d.expires_at();
        }
        Err(e) => {
            if sig_like {
                assert!(!e.to_string().contains(text), "an error quotes the sig");
            }
        }
    }
    if let Err(e) = crate::usersig::inspect(text)
        && sig_like
    {
        assert!(!e.contains(text), "an error quotes the sig");
    }
}

/// The local API's framing and request parsing: any bytes, any read sizes.
pub fn api_lines(data: &[u8]) {
    let (sizes, bytes) = split(data);
    let mut r = crate::api::LineReader::new(512);
    let mut rest = bytes;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(rest.len(), |s| usize::from(*s).max(1))
            .min(rest.len());
        r.push(&rest[..n]);
        rest = &rest[n..];
        i += 1;
        loop {
            match r.next_line() {
                crate::api::LineOut::Line(l) => {
                    assert!(l.len() <= 512 && !l.contains(&b'\n'));
                    let reply = match crate::api::parse_request(l) {
                        Ok(req) => {
                            let _ = crate::api::timeout_param(&req.params);
                            if let Some(u) = req.params.get("user_id").and_then(|v| v.as_str()) {
                                let _ = UserId::parse(u);
                            }
                            continue;
                        }
                        Err((id, code, msg)) => crate::api::error_line(&id, code, &msg, None),
                    };
                    assert!(reply.ends_with('\n') && reply.matches('\n').count() == 1);
                }
                crate::api::LineOut::More { .. } => break,
                crate::api::LineOut::TooLong => return,
            }
        }
    }
}

/// Whatever a broker says, the state line, `STATUS=` and `last_error` stay one line, bounded.
pub fn status_text(data: &[u8]) {
    let Some((&code, rest)) = data.split_first() else {
        return;
    };
    let reason = String::from_utf8_lossy(rest).into_owned();
    let t0 = Now {
        mono: 1_000,
        wall: 1_800_000_000,
    };
    for end in [
        ConnEnd::ServerDisconnect {
            code,
            reason: Some(reason.clone()),
        },
        ConnEnd::Refused {
            code,
            reason: Some(reason.clone()),
        },
        ConnEnd::Network {
            kind: NetKind::Other,
            detail: quote_external(&reason, 160),
        },
    ] {
        let mut m = Machine::new(Policy::default(), user(), t0, 7);
        m.handle(t0, Input::Start);
        m.handle(
            t0,
            Input::SigFetched(SigInfo {
                fingerprint: "fp".into(),
                user_id: user(),
                issued_at: Some(t0.wall),
                expires_at: Some(t0.wall + 3600),
                server_now: t0.wall,
                received_at: t0.mono,
                wall_anchored: false,
            }),
        );
        m.handle(
            t0,
            Input::Connected {
                session_present: false,
            },
        );
        m.handle(t0, Input::ConnectionEnded(end));
        let s = m.snapshot();
        let text = summary(&s, "mqtts://broker", t0.mono);
        assert!(!text.chars().any(char::is_control), "{text:?}");
        let status = crate::systemd::StatusText::new(&text);
        assert!(!status.as_str().contains('\n'));
        if let Some(e) = &s.last_error {
            assert!(!e.message.chars().any(char::is_control));
            assert!(e.message.chars().count() < 1200, "an unbounded message");
        }
        while m.poll_action().is_some() {}
    }
}

/// The small parsers of the config and of the wire.
pub fn small_parsers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::url::parse_url(&text);
    let _ = crate::url::check_template(&text);
    let _ = crate::url::parse_broker_url(&text);
    let _ = crate::url::host_port(&text, 443, &text);
    let red = crate::url::redact(&text);
    assert!(!red.chars().any(char::is_control));
    let _ = crate::config::parse_duration(&text);
    let _ = crate::provision::parse_retry_after(&text);
    if let Ok(t) = crate::identity::Template::parse(&text, &[]) {
        let _ = t.render(
            &crate::identity::TemplateValues {
                sdk_app_id: 1,
                user_id: &user(),
                platform: "linux",
                instance: "0",
            },
            str::to_string,
        );
    }
    // The relay's framing: whatever the bytes, a normalized CONNACK/DISCONNECT decodes to the
    // same reason code.
    if let Ok(Some((h, len))) = crate::wire::frame(data, 1 << 16)
        && data.len() >= h + len
    {
        let first = data[0];
        let body = &data[h..h + len];
        if let (Ok(seen), Some(long)) = (
            crate::wire::inspect(first, body),
            crate::wire::normalize(first, body),
        ) && let Ok(Some((h2, len2))) = crate::wire::frame(&long, 1 << 16)
        {
            let again = crate::wire::inspect(long[0], &long[h2..h2 + len2]);
            match (seen, again) {
                (crate::wire::Seen::ConnAck(a), Ok(crate::wire::Seen::ConnAck(b))) => {
                    assert_eq!((a.code, a.session_present), (b.code, b.session_present))
                }
                (crate::wire::Seen::Disconnect(a), Ok(crate::wire::Seen::Disconnect(b))) => {
                    assert_eq!(a.code, b.code)
                }
                (a, b) => panic!("normalizing changed the packet: {a:?} → {b:?}"),
            }
        }
    }
}

/// A PUBLISH payload on the inbox, from whoever can reach the broker: decoding never panics,
/// and what it accepts is a message for us that encodes within the limit and round-trips.
pub fn received_message(data: &[u8]) {
    let me = match crate::identity::UserId::parse("bob") {
        Ok(u) => u,
        Err(_) => return,
    };
    let Ok(m) = crate::message::WireMessage::decode(data, &me) else {
        return;
    };
    assert_eq!(m.to, "bob");
    assert!(crate::message::is_ulid(&m.id));
    assert!(crate::identity::UserId::parse(&m.from).is_ok());
    let bytes = m
        .encode()
        .expect("an accepted message re-encodes within the limit");
    assert_eq!(
        crate::message::WireMessage::decode(&bytes, &me).ok(),
        Some(m)
    );
}

/// The relay's broker→client framing (`wire::Downstream`) on any bytes in any read sizes:
/// it never panics, never holds more than a packet head or one packet, passes on only whole
/// packets within the limit (an oversized PUBLISH as its stub), and says the same whatever
/// the read sizes (up to an error).
pub fn downstream(data: &[u8]) {
    use crate::wire::{Downstream, frame};
    let (sizes, bytes) = split(data);
    let v5 = data.first().is_some_and(|b| b & 0x80 != 0);
    let max = 1024;
    let run = |sizes: &[u8]| {
        let mut d = Downstream::new(max, v5);
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        let mut at = 0;
        let mut i = 0;
        let mut err = None;
        while at < bytes.len() {
            let n = sizes
                .get(i % sizes.len().max(1))
                .map_or(bytes.len(), |s| usize::from(*s).max(1))
                .min(bytes.len() - at);
            i += 1;
            if let Err(e) = d.feed(&bytes[at..at + n], &mut out, &mut notes) {
                err = Some(e);
                break;
            }
            at += n;
            assert!(
                d.buffered() <= max.max(crate::wire::MAX_HEAD) + 256,
                "holds {} bytes",
                d.buffered()
            );
        }
        (out, notes, err)
    };
    let (out, notes, err) = run(sizes);
    // Only whole packets, each within the limit.
    let mut rest = &out[..];
    while !rest.is_empty() {
        match frame(rest, max) {
            Ok(Some((h, len))) => {
                assert!(rest.len() >= h + len, "a partial packet passed on");
                rest = &rest[h + len..];
            }
            other => panic!("passed on something that is not a whole packet: {other:?}"),
        }
    }
    // The same in one read (when neither run stopped at an error).
    let (out1, notes1, err1) = run(&[]);
    if err.is_none() && err1.is_none() {
        assert_eq!(out, out1, "the read sizes changed what was passed on");
        assert_eq!(notes, notes1);
    }
}

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name (for the corpus replay).
pub const TARGETS: &[(&str, Target)] = &[
    ("provision_response", provision_response),
    ("dechunk", dechunk),
    ("provision_to_machine", provision_to_machine),
    ("usersig", usersig),
    ("api_lines", api_lines),
    ("status_text", status_text),
    ("small_parsers", small_parsers),
    ("received_message", received_message),
    ("downstream", downstream),
];
