//! The NATS client protocol, sans I/O: a total decoder for what a server sends and encoders
//! for what this service sends.
//!
//! Server → client: `INFO {json}`, `MSG <subject> <sid> [reply] <#bytes>` + payload,
//! `HMSG <subject> <sid> [reply] <#header bytes> <#total bytes>` + headers and payload,
//! `PING`, `PONG`, `+OK`, `-ERR <text>`. Operation names are case-insensitive; arguments are
//! separated by spaces or tabs; lines end with CRLF (a bare LF is tolerated).
//!
//! [`Decoder::decode`] gives one operation, `Ok(None)` when it needs more bytes, or a
//! [`ProtoError`] after which the connection must be dropped. It never panics and never holds
//! more than `max_control_line + max_payload + 2` bytes: a control line longer than the cap is
//! an error; a message whose payload is over the cap is skipped as it streams past (the
//! caller hears [`ServerOp::Oversized`]), so a hostile or confused peer cannot make it buffer
//! without bound.

/// A control line is at most this long (nats-server's default `max_control_line` is 4 KiB).
pub const MAX_CONTROL_LINE: usize = 4096;
/// Payloads above this are skipped (an authorization request is a few KiB; with a client
/// certificate chain it can be more).
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// The INFO JSON, undecoded.
    Info(Vec<u8>),
    Msg(Msg),
    /// A message over the payload cap, skipped: what it was addressed to, and its size.
    Oversized {
        subject: String,
        reply: Option<String>,
        len: usize,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR` and its text (quoted by the server; kept as sent, capped).
    Err(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub subject: String,
    pub sid: u64,
    pub reply: Option<String>,
    /// The header block of an HMSG (`NATS/1.0\r\n…\r\n\r\n`), empty for a MSG.
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("a control line longer than {MAX_CONTROL_LINE} bytes")]
    ControlLineTooLong,
    #[error("an unknown protocol operation")]
    UnknownOp,
    #[error("a malformed {0} line")]
    BadArgs(&'static str),
    #[error("a message payload not followed by CRLF")]
    MissingCrlf,
    #[error("a control line that is not UTF-8")]
    NotUtf8,
}

/// What is being read.
#[derive(Debug)]
enum State {
    Line,
    /// A payload of `total` bytes (headers + body) and its CRLF.
    Payload {
        subject: String,
        sid: u64,
        reply: Option<String>,
        header_len: usize,
        total: usize,
    },
    /// An oversized payload: `remaining` bytes (including its CRLF) still to drop.
    Skip {
        remaining: usize,
    },
}

#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed (compacted away lazily).
    pos: usize,
    state: State,
    max_payload: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(MAX_PAYLOAD)
    }
}

impl Decoder {
    pub fn new(max_payload: usize) -> Decoder {
        Decoder {
            buf: Vec::with_capacity(8192),
            pos: 0,
            state: State::Line,
            max_payload,
        }
    }

    /// Append bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next operation, `Ok(None)` if more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<ServerOp>, ProtoError> {
        loop {
            match std::mem::replace(&mut self.state, State::Line) {
                State::Skip { remaining } => {
                    let n = remaining.min(self.buffered());
                    self.pos += n;
                    if n < remaining {
                        self.state = State::Skip {
                            remaining: remaining - n,
                        };
                        return Ok(None);
                    }
                    // Skipped, CRLF included (not checked: the payload was never looked at).
                }
                State::Payload {
                    subject,
                    sid,
                    reply,
                    header_len,
                    total,
                } => {
                    if self.buffered() < total + 2 {
                        self.state = State::Payload {
                            subject,
                            sid,
                            reply,
                            header_len,
                            total,
                        };
                        return Ok(None);
                    }
                    let start = self.pos;
                    if &self.buf[start + total..start + total + 2] != b"\r\n" {
                        return Err(ProtoError::MissingCrlf);
                    }
                    let headers = self.buf[start..start + header_len].to_vec();
                    let payload = self.buf[start + header_len..start + total].to_vec();
                    self.pos += total + 2;
                    return Ok(Some(ServerOp::Msg(Msg {
                        subject,
                        sid,
                        reply,
                        headers,
                        payload,
                    })));
                }
                State::Line => {
                    let avail = &self.buf[self.pos..];
                    let Some(nl) = avail.iter().position(|&b| b == b'\n') else {
                        if avail.len() > MAX_CONTROL_LINE {
                            return Err(ProtoError::ControlLineTooLong);
                        }
                        return Ok(None);
                    };
                    if nl > MAX_CONTROL_LINE {
                        return Err(ProtoError::ControlLineTooLong);
                    }
                    let mut line = &avail[..nl];
                    if line.last() == Some(&b'\r') {
                        line = &line[..line.len() - 1];
                    }
                    let line = std::str::from_utf8(line)
                        .map_err(|_| ProtoError::NotUtf8)?
                        .to_string();
                    self.pos += nl + 1;
                    if let Some(op) = self.control(&line)? {
                        return Ok(Some(op));
                    }
                }
            }
        }
    }

    /// Decode one control line. `Ok(None)` when it started a payload (the loop reads on).
    fn control(&mut self, line: &str) -> Result<Option<ServerOp>, ProtoError> {
        let (op, rest) = match line.find([' ', '\t']) {
            Some(i) => (&line[..i], line[i + 1..].trim_start_matches([' ', '\t'])),
            None => (line, ""),
        };
        let op = op.to_ascii_uppercase();
        match op.as_str() {
            "PING" => Ok(Some(ServerOp::Ping)),
            "PONG" => Ok(Some(ServerOp::Pong)),
            "+OK" => Ok(Some(ServerOp::Ok)),
            "-ERR" => {
                let mut text: String = rest
                    .trim()
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect();
                if text.len() >= 2 && text.starts_with('\'') && text.ends_with('\'') {
                    text = text[1..text.len() - 1].to_string();
                }
                Ok(Some(ServerOp::Err(text)))
            }
            "INFO" => Ok(Some(ServerOp::Info(rest.as_bytes().to_vec()))),
            "MSG" | "HMSG" => {
                let hmsg = op == "HMSG";
                let what = if hmsg { "HMSG" } else { "MSG" };
                let args: Vec<&str> = rest.split([' ', '\t']).filter(|s| !s.is_empty()).collect();
                let (subject, sid, reply, header_len, total) = match (hmsg, args.as_slice()) {
                    (false, [s, i, n]) => (*s, *i, None, "0", *n),
                    (false, [s, i, r, n]) => (*s, *i, Some(*r), "0", *n),
                    (true, [s, i, h, n]) => (*s, *i, None, *h, *n),
                    (true, [s, i, r, h, n]) => (*s, *i, Some(*r), *h, *n),
                    _ => return Err(ProtoError::BadArgs(what)),
                };
                let sid: u64 = sid.parse().map_err(|_| ProtoError::BadArgs(what))?;
                let header_len: usize =
                    header_len.parse().map_err(|_| ProtoError::BadArgs(what))?;
                let total: usize = total.parse().map_err(|_| ProtoError::BadArgs(what))?;
                if header_len > total {
                    return Err(ProtoError::BadArgs(what));
                }
                let subject = subject.to_string();
                let reply = reply.map(str::to_string);
                if total > self.max_payload {
                    self.state = State::Skip {
                        remaining: total.saturating_add(2),
                    };
                    return Ok(Some(ServerOp::Oversized {
                        subject,
                        reply,
                        len: total,
                    }));
                }
                self.state = State::Payload {
                    subject,
                    sid,
                    reply,
                    header_len,
                    total,
                };
                Ok(None)
            }
            _ => Err(ProtoError::UnknownOp),
        }
    }
}

/// Whether `s` can stand as a subject in a line we write: non-empty, at most 512 bytes, no
/// whitespace or control characters. A reply subject comes from the peer: it is checked
/// before it is echoed into a `PUB` line.
pub fn is_plain_subject(s: &str) -> bool {
    !s.is_empty() && s.len() <= 512 && s.bytes().all(|b| b > b' ' && b != 0x7f)
}

/// The CONNECT line (JSON built with serde_json: the password is escaped, never spliced).
pub fn connect(user: &str, pass: &str, name: &str, tls_required: bool) -> Vec<u8> {
    let v = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": tls_required,
        "user": user,
        "pass": pass,
        "name": name,
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "echo": false,
        "headers": false,
        "no_responders": false,
    });
    let mut out = b"CONNECT ".to_vec();
    // A json! value of strings and booleans always serialises.
    out.extend_from_slice(&serde_json::to_vec(&v).unwrap_or_default());
    out.extend_from_slice(b"\r\n");
    out
}

pub fn sub(subject: &str, queue: Option<&str>, sid: u64) -> Vec<u8> {
    match queue {
        Some(q) => format!("SUB {subject} {q} {sid}\r\n").into_bytes(),
        None => format!("SUB {subject} {sid}\r\n").into_bytes(),
    }
}

/// `PUB subject #bytes` + payload. The caller checks `subject` with [`is_plain_subject`].
pub fn publish(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// The INFO fields this client reads.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(default)]
pub struct Info {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub tls_required: bool,
    pub tls_available: bool,
    pub max_payload: i64,
    /// Lame-duck mode: the server is shutting down and asks clients to move.
    pub ldm: bool,
}

impl Info {
    pub fn parse(json: &[u8]) -> Option<Info> {
        serde_json::from_slice(json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(d: &mut Decoder) -> Result<Vec<ServerOp>, ProtoError> {
        let mut v = Vec::new();
        while let Some(op) = d.decode()? {
            v.push(op);
        }
        Ok(v)
    }

    #[test]
    fn decodes_every_server_operation() {
        let mut d = Decoder::default();
        d.push(b"INFO {\"server_id\":\"N1\",\"tls_required\":true}\r\nPING\r\npong\r\n+OK\r\n-ERR 'Authorization Violation'\r\n");
        d.push(b"MSG a.b 7 5\r\nhello\r\nMSG $SYS.REQ.USER.AUTH 1 _INBOX.x 3\r\nabc\r\n");
        d.push(b"HMSG s 2 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n");
        let ops = all(&mut d).unwrap();
        assert_eq!(ops.len(), 8);
        match &ops[0] {
            ServerOp::Info(j) => {
                let i = Info::parse(j).unwrap();
                assert_eq!(i.server_id, "N1");
                assert!(i.tls_required);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(ops[1], ServerOp::Ping);
        assert_eq!(ops[2], ServerOp::Pong);
        assert_eq!(ops[3], ServerOp::Ok);
        assert_eq!(ops[4], ServerOp::Err("Authorization Violation".into()));
        assert_eq!(
            ops[5],
            ServerOp::Msg(Msg {
                subject: "a.b".into(),
                sid: 7,
                reply: None,
                headers: vec![],
                payload: b"hello".to_vec()
            })
        );
        match &ops[6] {
            ServerOp::Msg(m) => {
                assert_eq!(m.reply.as_deref(), Some("_INBOX.x"));
                assert_eq!(m.payload, b"abc");
            }
            o => panic!("{o:?}"),
        }
        match &ops[7] {
            ServerOp::Msg(m) => {
                assert_eq!(m.headers, b"NATS/1.0\r\n\r\n");
                assert_eq!(m.payload, b"hi");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn byte_by_byte_gives_the_same_operations() {
        let wire = b"PING\r\nMSG x 1 r 4\r\n\r\n\r\n\r\nINFO {}\r\n";
        let mut whole = Decoder::default();
        whole.push(wire);
        let expected = all(&mut whole).unwrap();
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in wire {
            d.push(&[*b]);
            got.extend(all(&mut d).unwrap());
        }
        assert_eq!(got, expected);
        // The payload itself was CRLF CRLF: lengths, not delimiters, frame it.
        assert!(matches!(&got[1], ServerOp::Msg(m) if m.payload == b"\r\n\r\n"));
    }

    #[test]
    fn oversized_payloads_are_skipped_without_buffering_them() {
        let mut d = Decoder::new(8);
        d.push(b"MSG big 1 reply 20\r\n0123456789");
        assert_eq!(
            d.decode().unwrap(),
            Some(ServerOp::Oversized {
                subject: "big".into(),
                reply: Some("reply".into()),
                len: 20
            })
        );
        assert_eq!(d.decode().unwrap(), None);
        assert_eq!(d.buffered(), 0);
        d.push(b"0123456789\r\nPING\r\n");
        assert_eq!(d.decode().unwrap(), Some(ServerOp::Ping));
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let cases: &[(&[u8], ProtoError)] = &[
            (b"HELLO\r\n", ProtoError::UnknownOp),
            (b"MSG a\r\n", ProtoError::BadArgs("MSG")),
            (b"MSG a b 3\r\n", ProtoError::BadArgs("MSG")),
            (b"MSG a 1 -3\r\n", ProtoError::BadArgs("MSG")),
            (
                b"MSG a 1 99999999999999999999999\r\n",
                ProtoError::BadArgs("MSG"),
            ),
            (b"HMSG a 1 5 3\r\n", ProtoError::BadArgs("HMSG")),
            (b"HMSG a 1 3\r\n", ProtoError::BadArgs("HMSG")),
            (b"MSG a 1 3\r\nabcXY", ProtoError::MissingCrlf),
            (b"PING\xff\r\n", ProtoError::NotUtf8),
        ];
        for (wire, err) in cases {
            let mut d = Decoder::default();
            d.push(wire);
            assert_eq!(
                all(&mut d).unwrap_err(),
                *err,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let mut d = Decoder::default();
        d.push(&vec![b'A'; MAX_CONTROL_LINE + 1]);
        assert_eq!(d.decode().unwrap_err(), ProtoError::ControlLineTooLong);
    }

    /// No byte sequence panics the decoder or makes it hold more than its caps: random bytes,
    /// random protocol-like fragments, in random chunkings (a fixed-seed xorshift).
    #[test]
    fn hostile_bytes_never_panic() {
        let fragments: &[&[u8]] = &[
            b"MSG ",
            b"HMSG ",
            b"INFO ",
            b"PING",
            b"-ERR ",
            b"\r\n",
            b"\n",
            b" ",
            b"\t",
            b"a.b",
            b"1",
            b"0",
            b"65536",
            b"18446744073709551616",
            b"_INBOX.x",
            b"\xff",
            b"{",
            b"}",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let mut d = Decoder::new(1024);
            let mut wire = Vec::new();
            for _ in 0..(rnd() % 40) {
                if rnd() % 3 == 0 {
                    wire.push(rnd() as u8);
                } else {
                    wire.extend_from_slice(fragments[(rnd() as usize) % fragments.len()]);
                }
            }
            let mut i = 0;
            'feed: while i < wire.len() {
                let n = 1 + (rnd() as usize) % 16;
                let end = (i + n).min(wire.len());
                d.push(&wire[i..end]);
                i = end;
                loop {
                    match d.decode() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                assert!(d.buffered() <= MAX_CONTROL_LINE + 1024 + 2 + 16);
            }
        }
    }

    #[test]
    fn encoders_write_the_protocol() {
        let c = connect("auth", "p\"w\r\nPUB x 1", "imlink-auth", false);
        assert!(c.starts_with(b"CONNECT {"));
        assert!(c.ends_with(b"}\r\n"));
        // The password cannot break out of the JSON or the line.
        assert_eq!(c.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&c[8..c.len() - 2]).unwrap();
        assert_eq!(v["pass"], "p\"w\r\nPUB x 1");
        assert_eq!(
            sub("$SYS.REQ.USER.AUTH", Some("q"), 1),
            b"SUB $SYS.REQ.USER.AUTH q 1\r\n"
        );
        let mut out = Vec::new();
        publish(&mut out, "_INBOX.a", b"xyz");
        assert_eq!(out, b"PUB _INBOX.a 3\r\nxyz\r\n");
        assert!(is_plain_subject("$SYS._INBOX.abc.def"));
        for bad in ["", "a b", "a\r\nPUB", "a\tb", &"x".repeat(513)] {
            assert!(!is_plain_subject(bad), "{bad:?}");
        }
    }
}
