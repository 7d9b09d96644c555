//! The MQTT v5 bytes the daemon reads itself, on the way from the broker to rumqttc.
//!
//! rumqttc 0.25 cannot decode every legal DISCONNECT (mosquitto ≥ 2.0.15 sends a takeover as
//! the short form `E0 01 8E`; rumqttc reads a property length anyway and the kick becomes a
//! generic error), and it drops CONNACK reason strings. So the connection's bytes pass
//! through a relay (`crate::relay`) that frames every broker→client packet with
//! [`frame`], decodes CONNACK and DISCONNECT exactly here ([`decode_connack`],
//! [`decode_disconnect`]) in every encoding the MQTT 5 specification allows, and hands
//! rumqttc the long form ([`normalize`]).
//!
//! Everything here is total: any input yields a packet, "need more bytes", or a typed error;
//! nothing panics, nothing allocates more than the packet size limit.

/// Why bytes are not a valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the remaining length is not a valid variable byte integer")]
    BadLength,
    #[error("the packet is larger than the limit")]
    TooLarge,
    #[error("the packet ends before its fields do")]
    Truncated,
    #[error("a property identifier that MQTT 5 does not define ({0:#04x})")]
    UnknownProperty(u8),
    #[error("a string that is not UTF-8")]
    BadUtf8,
    #[error("reserved flags are set")]
    BadFlags,
}

/// The fixed header at the start of `buf`: `Ok(Some((header_len, remaining_len)))` once it is
/// complete, `Ok(None)` while more bytes are needed.
pub fn frame(buf: &[u8], max_packet: usize) -> Result<Option<(usize, usize)>, WireError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if len.saturating_add(2 + i) > max_packet {
                return Err(WireError::TooLarge);
            }
            return Ok(Some((2 + i, len)));
        }
    }
    Err(WireError::BadLength)
}

/// The properties of a CONNACK or DISCONNECT the daemon cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props {
    pub reason_string: Option<String>,
    /// The user property `im-error-code` (the reference IM service's code).
    pub im_error_code: Option<u32>,
    /// Server Reference (0x1C): where to go instead (CONNACK/DISCONNECT 0x9C/0x9D).
    pub server_reference: Option<String>,
    pub session_expiry: Option<u32>,
}

/// A CONNACK as the broker sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: u8,
    pub props: Props,
}

/// A server DISCONNECT as the broker sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u8,
    pub props: Props,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, WireError> {
        let (&x, rest) = self.b.split_first().ok_or(WireError::Truncated)?;
        self.b = rest;
        Ok(x)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated);
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(x)
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let x = self.take(2)?;
        Ok(u16::from_be_bytes([x[0], x[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let x = self.take(4)?;
        Ok(u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    }

    fn varint(&mut self) -> Result<usize, WireError> {
        let mut v: usize = 0;
        for i in 0..4 {
            let b = self.u8()?;
            v |= usize::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::BadLength)
    }

    fn binary(&mut self) -> Result<&[u8], WireError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }

    fn string(&mut self) -> Result<String, WireError> {
        let b = self.binary()?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| WireError::BadUtf8)
    }
}

/// Decode a property block (MQTT 5 §2.2.2). Every property MQTT 5 defines is skipped
/// correctly by its type; user properties other than `im-error-code` are ignored.
fn properties(r: &mut Reader<'_>) -> Result<Props, WireError> {
    let len = r.varint()?;
    let mut p = Reader { b: r.take(len)? };
    let mut out = Props::default();
    while !p.b.is_empty() {
        let id = p.u8()?;
        match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                p.u8()?;
            }
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => {
                p.u16()?;
            }
            // Four-byte integer.
            0x02 | 0x18 | 0x27 => {
                p.u32()?;
            }
            0x11 => out.session_expiry = Some(p.u32()?),
            // Variable byte integer.
            0x0B => {
                p.varint()?;
            }
            // UTF-8 string.
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A => {
                p.string()?;
            }
            0x1C => out.server_reference = Some(p.string()?),
            0x1F => out.reason_string = Some(p.string()?),
            // Binary data.
            0x09 | 0x16 => {
                p.binary()?;
            }
            // User property: a string pair.
            0x26 => {
                let k = p.string()?;
                let v = p.string()?;
                if k == "im-error-code" {
                    out.im_error_code = v.trim().parse().ok();
                }
            }
            other => return Err(WireError::UnknownProperty(other)),
        }
    }
    Ok(out)
}

/// Decode a CONNACK's body (after the fixed header). The flags and the reason code are
/// enough: a missing property length (a v3.1.1-style CONNACK) means no properties, and a
/// property block that does not decode still yields the reason code.
pub fn decode_connack(body: &[u8]) -> Result<ConnAck, WireError> {
    let mut r = Reader { b: body };
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(WireError::BadFlags);
    }
    let code = r.u8()?;
    let props = if r.b.is_empty() {
        Props::default()
    } else {
        properties(&mut r).unwrap_or_default()
    };
    Ok(ConnAck {
        session_present: flags & 1 == 1,
        code,
        props,
    })
}

/// Decode a server DISCONNECT's body: remaining length 0 means 0x00 (normal disconnection)
/// and 1 means a reason code without properties (§3.14.2); a property block that does not
/// decode still yields the reason code.
pub fn decode_disconnect(body: &[u8]) -> Result<Disconnect, WireError> {
    let mut r = Reader { b: body };
    let Ok(code) = r.u8() else {
        return Ok(Disconnect {
            code: 0,
            props: Props::default(),
        });
    };
    let props = if r.b.is_empty() {
        Props::default()
    } else {
        properties(&mut r).unwrap_or_default()
    };
    Ok(Disconnect { code, props })
}

/// What the relay saw in one broker→client packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    ConnAck(ConnAck),
    Disconnect(Disconnect),
    Other,
}

/// Inspect one whole packet (`first` is its first byte, `body` what follows the fixed header).
pub fn inspect(first: u8, body: &[u8]) -> Result<Seen, WireError> {
    match first {
        0x20 => decode_connack(body).map(Seen::ConnAck),
        0xE0 => decode_disconnect(body).map(Seen::Disconnect),
        _ => Ok(Seen::Other),
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n & 0x7F) as u8;
        n >>= 7;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// The long form of a packet rumqttc cannot decode as sent, or `None` when it can: a short
/// DISCONNECT (`E0 00`, `E0 01 <code>`) gets an empty property block, and a CONNACK without a
/// property length gets one. Everything else passes unchanged.
pub fn normalize(first: u8, body: &[u8]) -> Option<Vec<u8>> {
    let long = match (first, body.len()) {
        (0xE0, 0) => vec![0x00, 0x00],
        (0xE0, 1) => vec![body[0], 0x00],
        (0x20, 2) => vec![body[0], body[1], 0x00],
        _ => return None,
    };
    let mut out = Vec::with_capacity(long.len() + 2);
    out.push(first);
    put_varint(&mut out, long.len());
    out.extend_from_slice(&long);
    Some(out)
}

/// The head of a PUBLISH too large to pass on: enough to acknowledge it in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishHead {
    /// Bytes of the variable header (topic, packet id, properties) in the body.
    pub len: usize,
    pub topic: Vec<u8>,
    /// `None` for QoS 0.
    pub pkid: Option<u16>,
}

/// Read a PUBLISH's variable header from the first bytes of its body (`first` is the fixed
/// header's first byte). `Ok(None)`: more bytes are needed.
pub fn publish_head(first: u8, body: &[u8], v5: bool) -> Result<Option<PublishHead>, WireError> {
    let qos = (first >> 1) & 0x03;
    if qos == 3 {
        return Err(WireError::BadFlags);
    }
    let mut r = Reader { b: body };
    let attempt = (|| {
        let topic = r.binary()?.to_vec();
        let pkid = if qos > 0 { Some(r.u16()?) } else { None };
        if v5 {
            let n = r.varint()?;
            r.take(n)?;
        }
        Ok((topic, pkid))
    })();
    match attempt {
        Ok((topic, pkid)) => Ok(Some(PublishHead {
            len: body.len() - r.b.len(),
            topic,
            pkid,
        })),
        Err(WireError::Truncated) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A PUBLISH with the same flags, topic and packet id as `head` and an empty payload (and no
/// properties): what rumqttc is given instead of a packet too large to carry, so that it
/// acknowledges it in its place in the order of arrival.
pub fn stub_publish(first: u8, head: &PublishHead, v5: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(head.topic.len() + 5);
    body.extend_from_slice(&(head.topic.len() as u16).to_be_bytes());
    body.extend_from_slice(&head.topic);
    if let Some(p) = head.pkid {
        body.extend_from_slice(&p.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// The most of an oversized PUBLISH's head the relay buffers to read its topic and packet id
/// (a topic is at most 65,535 bytes; properties beyond that are not worth reading).
pub const MAX_HEAD: usize = 70_000;

/// What [`Downstream`] noticed in the bytes it framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A CONNACK; `short`: its body had no property length (how a 3.1.1 broker answers).
    ConnAck {
        ack: ConnAck,
        short: bool,
    },
    Disconnect(Disconnect),
    /// A PUBLISH over the size limit: passed on as an empty stub, its payload skipped.
    Oversized {
        pkid: Option<u16>,
        bytes: usize,
    },
    /// A CONNACK or DISCONNECT that does not decode (rumqttc refuses it too).
    Undecodable(WireError),
}

/// broker → client framing, without I/O: fed the bytes as they arrive, it returns the bytes
/// to pass on (whole packets, CONNACK/DISCONNECT in their long form, an oversized PUBLISH as a
/// stub whose payload is skipped as it streams past, never buffered) and notes what it saw.
/// On an error, what precedes the bad packet has still been put in `out` — a CONNACK that
/// arrived in the same read as a broken packet is not lost.
#[derive(Debug)]
pub struct Downstream {
    buf: Vec<u8>,
    /// Bytes of an oversized PUBLISH still to skip.
    skip: usize,
    max_packet: usize,
    v5: bool,
}

impl Downstream {
    pub fn new(max_packet: usize, v5: bool) -> Downstream {
        Downstream {
            buf: Vec::with_capacity(4096),
            skip: 0,
            max_packet,
            v5,
        }
    }

    /// Bytes held waiting for the rest of a packet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut Vec<u8>,
        notes: &mut Vec<Note>,
    ) -> Result<(), WireError> {
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
        let mut at = 0;
        let result = loop {
            let (h, len) = match frame(&self.buf[at..], usize::MAX) {
                Ok(Some(x)) => x,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let first = self.buf[at];
            if h + len > self.max_packet {
                if first >> 4 != 3 {
                    break Err(WireError::TooLarge);
                }
                let have = &self.buf[at + h..];
                let head = match publish_head(first, &have[..have.len().min(len)], self.v5) {
                    Ok(Some(head)) => head,
                    Ok(None) if have.len() < MAX_HEAD => break Ok(()),
                    Ok(None) => break Err(WireError::TooLarge),
                    Err(e) => break Err(e),
                };
                if head.pkid.is_some() {
                    let stub = stub_publish(first, &head, self.v5);
                    if stub.len() > self.max_packet {
                        // Its topic alone is over the limit: nothing the client can take.
                        break Err(WireError::TooLarge);
                    }
                    out.extend_from_slice(&stub);
                }
                notes.push(Note::Oversized {
                    pkid: head.pkid,
                    bytes: h + len,
                });
                let buffered = self.buf.len() - at;
                if buffered >= h + len {
                    at += h + len;
                    continue;
                }
                self.skip = h + len - buffered;
                at = self.buf.len();
                break Ok(());
            }
            if self.buf.len() - at < h + len {
                break Ok(());
            }
            let body = &self.buf[at + h..at + h + len];
            match inspect(first, body) {
                Ok(Seen::ConnAck(ack)) => notes.push(Note::ConnAck {
                    ack,
                    short: body.len() == 2,
                }),
                Ok(Seen::Disconnect(d)) => notes.push(Note::Disconnect(d)),
                Ok(Seen::Other) => {}
                Err(e) => notes.push(Note::Undecodable(e)),
            }
            match normalize(first, body).filter(|_| self.v5) {
                Some(long) => out.extend_from_slice(&long),
                None => out.extend_from_slice(&self.buf[at..at + h + len]),
            }
            at += h + len;
        };
        self.buf.drain(..at);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every DISCONNECT reason code MQTT 5 defines (§3.14.2.1).
    const DISCONNECT_CODES: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
        0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    /// Every CONNACK reason code MQTT 5 defines (§3.2.2.2).
    const CONNACK_CODES: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
        0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ];

    fn s(out: &mut Vec<u8>, x: &str) {
        out.extend_from_slice(&(x.len() as u16).to_be_bytes());
        out.extend_from_slice(x.as_bytes());
    }

    /// Property blocks a broker may legally send with a CONNACK or DISCONNECT, with what
    /// each must decode to.
    fn prop_blocks() -> Vec<(Vec<u8>, Props)> {
        let mut v = Vec::new();
        // Empty.
        v.push((vec![], Props::default()));
        // A reason string.
        let mut p = vec![0x1F];
        s(&mut p, "6208 kicked offline by another login");
        v.push((
            p,
            Props {
                reason_string: Some("6208 kicked offline by another login".into()),
                ..Props::default()
            },
        ));
        // Unknown user properties, then ours, then a reason string and a server reference.
        let mut p = vec![0x26];
        s(&mut p, "x-broker-node");
        s(&mut p, "n2");
        p.push(0x26);
        s(&mut p, "im-error-code");
        s(&mut p, "70009");
        p.push(0x1F);
        s(&mut p, "70009 signature mismatch");
        p.push(0x1C);
        s(&mut p, "mqtts://other.example:8883");
        v.push((
            p,
            Props {
                reason_string: Some("70009 signature mismatch".into()),
                im_error_code: Some(70009),
                server_reference: Some("mqtts://other.example:8883".into()),
                session_expiry: None,
            },
        ));
        // Every other property type a CONNACK can carry (EMQX and HiveMQ send many).
        let mut p = vec![
            0x11, 0, 0, 0x0E, 0x10, // session expiry 3600
            0x21, 0x00, 0x20, // receive maximum
            0x24, 0x01, // maximum QoS
            0x25, 0x01, // retain available
            0x27, 0x00, 0x10, 0x00, 0x00, // maximum packet size
            0x22, 0x00, 0x0A, // topic alias maximum
            0x28, 0x01, 0x29, 0x01, 0x2A, 0x00, // wildcard, sub ids, shared subs
            0x13, 0x00, 0x3C, // server keep alive
        ];
        p.push(0x12);
        s(&mut p, "assigned-id");
        p.push(0x1A);
        s(&mut p, "response info");
        p.push(0x15);
        s(&mut p, "SCRAM-SHA-1");
        p.extend_from_slice(&[0x16, 0x00, 0x02, 0xAB, 0xCD]);
        v.push((
            p,
            Props {
                session_expiry: Some(3600),
                ..Props::default()
            },
        ));
        v
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        put_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    fn with_props(fixed: &[u8], props: &[u8]) -> Vec<u8> {
        let mut b = fixed.to_vec();
        put_varint(&mut b, props.len());
        b.extend_from_slice(props);
        b
    }

    /// Every legal encoding of every DISCONNECT: each decodes to its code and properties here,
    /// and its normalized form decodes to the same code in rumqttc.
    #[test]
    fn every_legal_disconnect_decodes_here_and_in_rumqttc_after_normalizing() {
        use rumqttc::v5::mqttbytes::v5::Packet;
        for &code in DISCONNECT_CODES {
            let mut encodings: Vec<(Vec<u8>, Props)> = Vec::new();
            if code == 0 {
                encodings.push((vec![], Props::default())); // E0 00
            }
            encodings.push((vec![code], Props::default())); // E0 01 cc: the short form
            for (props, want) in prop_blocks().into_iter().take(3) {
                encodings.push((with_props(&[code], &props), want));
            }
            for (body, want) in encodings {
                let bytes = packet(0xE0, &body);
                let (h, len) = frame(&bytes, 1 << 20).unwrap().expect("complete");
                assert_eq!(h + len, bytes.len());
                let d = decode_disconnect(&bytes[h..]).unwrap();
                assert_eq!(d.code, code, "{bytes:02X?}");
                assert_eq!(d.props, want, "{bytes:02X?}");
                let fixed = normalize(bytes[0], &bytes[h..]).unwrap_or_else(|| bytes.clone());
                let mut buf = bytes::BytesMut::from(&fixed[..]);
                match Packet::read(&mut buf, Some(1 << 20)) {
                    Ok(Packet::Disconnect(d)) => {
                        assert_eq!(d.reason_code as u8, code, "rumqttc, {fixed:02X?}")
                    }
                    other => {
                        panic!("rumqttc cannot read {fixed:02X?} (from {bytes:02X?}): {other:?}")
                    }
                }
            }
        }
    }

    /// Every legal encoding of every CONNACK.
    #[test]
    fn every_legal_connack_decodes_here_and_in_rumqttc_after_normalizing() {
        use rumqttc::v5::mqttbytes::v5::Packet;
        for &code in CONNACK_CODES {
            for present in [false, true] {
                if present && code != 0 {
                    continue; // session present is only set with success
                }
                let flags = u8::from(present);
                let mut encodings: Vec<(Vec<u8>, Props)> = Vec::new();
                // No property length at all (a v3.1.1-style CONNACK): tolerated.
                encodings.push((vec![flags, code], Props::default()));
                for (props, want) in prop_blocks() {
                    encodings.push((with_props(&[flags, code], &props), want));
                }
                for (body, want) in encodings {
                    let bytes = packet(0x20, &body);
                    let (h, _) = frame(&bytes, 1 << 20).unwrap().unwrap();
                    let a = decode_connack(&bytes[h..]).unwrap();
                    assert_eq!((a.code, a.session_present), (code, present), "{bytes:02X?}");
                    assert_eq!(a.props, want, "{bytes:02X?}");
                    let fixed = normalize(bytes[0], &bytes[h..]).unwrap_or_else(|| bytes.clone());
                    let mut buf = bytes::BytesMut::from(&fixed[..]);
                    match Packet::read(&mut buf, Some(1 << 20)) {
                        Ok(Packet::ConnAck(a)) => {
                            assert_eq!(a.session_present, present);
                            assert_eq!(
                                crate::mqtt::connack_code(a.code),
                                code,
                                "rumqttc, {fixed:02X?}"
                            );
                        }
                        other => {
                            panic!(
                                "rumqttc cannot read {fixed:02X?} (from {bytes:02X?}): {other:?}"
                            )
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn framing_waits_for_whole_headers_and_refuses_oversized_or_endless_lengths() {
        assert_eq!(frame(&[], 100), Ok(None));
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x80], 100), Ok(None));
        assert_eq!(frame(&[0x30, 0x05], 100), Ok(Some((2, 5))));
        assert_eq!(frame(&[0x30, 0xC1, 0x02], 1000), Ok(Some((3, 321))));
        assert_eq!(frame(&[0x30, 0xC1, 0x02], 100), Err(WireError::TooLarge));
        assert_eq!(
            frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], usize::MAX),
            Err(WireError::BadLength)
        );
        assert_eq!(
            frame(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F], usize::MAX),
            Ok(Some((5, 268_435_455)))
        );
    }

    #[test]
    fn broken_properties_still_yield_the_reason_code_and_nothing_panics() {
        // A property block that claims more than there is; an undefined property id; bad UTF-8.
        for body in [
            vec![0x8E, 0x05, 0x1F],
            vec![0x8E, 0x02, 0x7F, 0x00],
            vec![0x8E, 0x05, 0x1F, 0x00, 0x02, 0xFF, 0xFE],
        ] {
            let d = decode_disconnect(&body).unwrap();
            assert_eq!(d.code, 0x8E);
            assert_eq!(d.props, Props::default());
        }
        assert_eq!(decode_connack(&[0x02, 0x00]), Err(WireError::BadFlags));
        assert_eq!(decode_connack(&[0x00]), Err(WireError::Truncated));
        // Every short input of every packet type: a value or an error, never a panic.
        for first in 0..=255u8 {
            for len in 0..6 {
                let body: Vec<u8> = (0..len).map(|i| (i * 37 + first as usize) as u8).collect();
                let _ = inspect(first, &body);
                let _ = normalize(first, &body);
            }
        }
    }

    #[test]
    fn normalizing_leaves_long_forms_and_other_packets_alone() {
        assert_eq!(normalize(0xE0, &[0x8E, 0x00]), None);
        assert_eq!(normalize(0x20, &[0x00, 0x00, 0x00]), None);
        assert_eq!(normalize(0x30, &[0x00]), None);
        assert_eq!(normalize(0xE0, &[0x8E]), Some(vec![0xE0, 0x02, 0x8E, 0x00]));
        assert_eq!(normalize(0xE0, &[]), Some(vec![0xE0, 0x02, 0x00, 0x00]));
        assert_eq!(
            normalize(0x20, &[0x00, 0x87]),
            Some(vec![0x20, 0x03, 0x00, 0x87, 0x00])
        );
    }

    // --- Downstream: the relay's framing --------------------------------------------------

    fn publish(qos1: bool, topic: &str, pkid: u16, v5: bool, payload: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        s(&mut body, topic);
        if qos1 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if v5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        let mut out = vec![if qos1 { 0x32 } else { 0x30 }];
        put_varint(&mut out, body.len());
        out.extend_from_slice(&body);
        out
    }

    /// Feed `bytes` in chunks of `step`, collecting what is passed on and noted.
    fn run(
        d: &mut Downstream,
        bytes: &[u8],
        step: usize,
    ) -> (Vec<u8>, Vec<Note>, Result<(), WireError>) {
        let (mut out, mut notes) = (Vec::new(), Vec::new());
        for c in bytes.chunks(step) {
            let r = d.feed(c, &mut out, &mut notes);
            if r.is_err() {
                return (out, notes, r);
            }
        }
        (out, notes, Ok(()))
    }

    #[test]
    fn an_oversized_publish_becomes_an_empty_stub_in_its_place_whatever_the_chunking() {
        for v5 in [false, true] {
            let small1 = publish(true, "im/1/u/a/in/b", 1, v5, b"{}");
            let big = publish(true, "im/1/u/a/in/b", 2, v5, &vec![b'x'; 300_000]);
            let big_len = big.len();
            let small2 = publish(true, "im/1/u/a/in/b", 3, v5, b"{}");
            let bytes = [small1.clone(), big, small2.clone()].concat();
            let stub = publish(true, "im/1/u/a/in/b", 2, v5, b"");
            let want = [small1.clone(), stub, small2.clone()].concat();
            for step in [1, 7, 8192, bytes.len()] {
                let mut d = Downstream::new(256 * 1024, v5);
                let (out, notes, r) = run(&mut d, &bytes, step);
                assert_eq!(r, Ok(()), "v5 {v5} step {step}");
                assert_eq!(out, want, "v5 {v5} step {step}");
                assert_eq!(
                    notes,
                    [Note::Oversized {
                        pkid: Some(2),
                        bytes: big_len
                    }],
                    "v5 {v5} step {step}"
                );
                // The payload was skipped as it streamed, never held.
                assert_eq!(d.buffered(), 0);
            }
        }
    }

    #[test]
    fn an_oversized_qos0_publish_is_skipped_and_noted() {
        let big = publish(false, "t", 0, false, &vec![0u8; 400_000]);
        let after = publish(true, "t", 9, false, b"ok");
        let mut d = Downstream::new(256 * 1024, false);
        let (out, notes, r) = run(&mut d, &[big, after.clone()].concat(), 4096);
        assert_eq!(r, Ok(()));
        assert_eq!(out, after);
        assert!(matches!(notes[..], [Note::Oversized { pkid: None, .. }]));
    }

    #[test]
    fn packets_before_a_broken_one_are_passed_on_the_connack_included() {
        // A CONNACK and, in the same read, an oversized packet that is not a PUBLISH.
        let connack = [0x20, 0x03, 0x00, 0x00, 0x00];
        let mut bad = vec![0x90];
        put_varint(&mut bad, 300_000);
        let mut d = Downstream::new(256 * 1024, true);
        let (out, notes, r) = run(&mut d, &[&connack[..], &bad].concat(), 8192);
        assert_eq!(r, Err(WireError::TooLarge));
        assert_eq!(out, connack);
        assert!(matches!(notes[..], [Note::ConnAck { short: false, .. }]));
    }

    #[test]
    fn a_publish_head_larger_than_the_cap_is_refused_not_buffered_forever() {
        let mut p = vec![0x32];
        put_varint(&mut p, 2_000_000);
        // A topic length of 65,535 but the properties' length claims more than MAX_HEAD.
        p.extend_from_slice(&[0x00, 0x01, b't', 0x00, 0x01]);
        put_varint(&mut p, 1_000_000);
        p.extend(std::iter::repeat_n(0u8, MAX_HEAD + 10));
        let mut d = Downstream::new(256 * 1024, true);
        let (_, _, r) = run(&mut d, &p, 4096);
        assert_eq!(r, Err(WireError::TooLarge));
        assert!(d.buffered() <= MAX_HEAD + 8192);
    }
}
