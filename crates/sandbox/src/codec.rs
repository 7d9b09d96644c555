//! MQTT v5 packet codec, server side: decodes what clients send, encodes what a broker sends.
//!
//! Written for the sandbox so that every byte a refusal, a kick or a fault puts on the wire
//! is under the test's control. Decoding is total: every input either yields a packet, asks
//! for more bytes, or returns a [`CodecError`] naming the MQTT reason code to disconnect with.

use std::fmt;

/// MQTT v5 reason codes the sandbox uses (CONNACK, DISCONNECT, SUBACK, PUBACK).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const GRANTED_QOS_1: u8 = 0x01;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const BANNED: u8 = 0x8A;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const BAD_AUTH_METHOD: u8 = 0x8C;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
    pub const SUBSCRIPTION_IDS_NOT_SUPPORTED: u8 = 0xA1;
}

/// A decoding failure, with the reason code the broker disconnects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    pub reason: u8,
    pub what: &'static str,
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (reason 0x{:02X})", self.what, self.reason)
    }
}

fn malformed(what: &'static str) -> CodecError {
    CodecError {
        reason: reason::MALFORMED_PACKET,
        what,
    }
}

fn protocol(what: &'static str) -> CodecError {
    CodecError {
        reason: reason::PROTOCOL_ERROR,
        what,
    }
}

/// The last will carried by a CONNECT. Its properties are checked (only those MQTT 5 allows
/// in a will) and then ignored, the Will Delay Interval included: the sandbox publishes a will
/// as soon as the connection ends without a normal DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// Seconds (property 0x18), parsed and not honoured.
    pub delay: u32,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub session_expiry: u32,
    pub receive_maximum: u16,
    pub maximum_packet_size: Option<u32>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will: Option<Will>,
    pub auth_method: Option<String>,
}

impl fmt::Debug for Connect {
    // The password is a UserSig: never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connect")
            .field("client_id", &self.client_id)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("session_expiry", &self.session_expiry)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub pkid: u16,
    /// Raw property bytes (without the length prefix), forwarded as they came.
    pub properties: Vec<u8>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    pub has_subscription_id: bool,
    /// Each filter with its subscription options byte (see [`SubOptions`]).
    pub filters: Vec<(String, u8)>,
}

/// The subscription options byte of MQTT 5 §3.8.3.1, taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    /// Retain As Published: forward a live message's RETAIN flag as it came (otherwise 0).
    pub retain_as_published: bool,
    /// Retain Handling: 0 send the retained messages at subscribe, 1 only if the subscription
    /// is new, 2 never.
    pub retain_handling: u8,
}

impl SubOptions {
    pub fn from_byte(b: u8) -> SubOptions {
        SubOptions {
            qos: b & 0x03,
            no_local: b & 0x04 != 0,
            retain_as_published: b & 0x08 != 0,
            retain_handling: (b >> 4) & 0x03,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: u8,
    pub session_expiry: Option<u32>,
    pub reason_string: Option<String>,
}

/// A packet a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Connect(Box<Connect>),
    Publish(Publish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    /// PUBREC/PUBREL/PUBCOMP: QoS 2 flow, which the sandbox does not grant.
    Qos2Flow,
    Subscribe(Subscribe),
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect(Disconnect),
    Auth,
}

/// What a CONNECT with a protocol level other than 5 looks like: the broker answers it with a
/// v3-format CONNACK.
pub const UNSUPPORTED_VERSION: &str = "unsupported protocol version";

/// Try to split one packet off the front of `buf`. `Ok(None)`: need more bytes.
/// On success returns the packet and how many bytes it used.
pub fn decode(buf: &[u8], max_packet: usize) -> Result<Option<(Incoming, usize)>, CodecError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let header = buf[0];
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        if i >= buf.len() {
            return Ok(None);
        }
        if i > 4 {
            return Err(malformed("remaining length longer than 4 bytes"));
        }
        let b = buf[i];
        remaining |= ((b & 0x7F) as usize) << shift;
        shift += 7;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = i + remaining;
    if total > max_packet {
        return Err(CodecError {
            reason: reason::PACKET_TOO_LARGE,
            what: "packet larger than the maximum packet size",
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let packet = decode_body(header, body)?;
    Ok(Some((packet, total)))
}

fn decode_body(header: u8, body: &[u8]) -> Result<Incoming, CodecError> {
    let kind = header >> 4;
    let flags = header & 0x0F;
    let mut r = Reader::new(body);
    let packet = match kind {
        1 => {
            if flags != 0 {
                return Err(malformed("CONNECT flags must be zero"));
            }
            Incoming::Connect(Box::new(decode_connect(&mut r)?))
        }
        3 => Incoming::Publish(decode_publish(flags, &mut r)?),
        4 => {
            if flags != 0 {
                return Err(malformed("PUBACK flags must be zero"));
            }
            let pkid = r.u16()?;
            let reason = if r.is_empty() { 0 } else { r.u8()? };
            if !r.is_empty() {
                r.properties(|_, _| Ok(()))?;
            }
            Incoming::PubAck { pkid, reason }
        }
        5..=7 => Incoming::Qos2Flow,
        8 => {
            if flags != 0b0010 {
                return Err(malformed("SUBSCRIBE flags must be 0010"));
            }
            let pkid = r.u16()?;
            let mut has_subscription_id = false;
            r.properties(|id, _| {
                if id == 0x0B {
                    has_subscription_id = true;
                }
                Ok(())
            })?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                let filter = r.string()?;
                let options = r.u8()?;
                if options & 0xC0 != 0 {
                    return Err(malformed("SUBSCRIBE options reserved bits set"));
                }
                if options & 0x03 == 3 {
                    return Err(malformed("SUBSCRIBE QoS 3"));
                }
                if (options >> 4) & 0x03 == 3 {
                    return Err(protocol("SUBSCRIBE retain handling 3"));
                }
                filters.push((filter, options));
            }
            if filters.is_empty() {
                return Err(protocol("SUBSCRIBE without topic filters"));
            }
            Incoming::Subscribe(Subscribe {
                pkid,
                has_subscription_id,
                filters,
            })
        }
        10 => {
            if flags != 0b0010 {
                return Err(malformed("UNSUBSCRIBE flags must be 0010"));
            }
            let pkid = r.u16()?;
            r.properties(|_, _| Ok(()))?;
            let mut filters = Vec::new();
            while !r.is_empty() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(protocol("UNSUBSCRIBE without topic filters"));
            }
            Incoming::Unsubscribe { pkid, filters }
        }
        12 => {
            if flags != 0 || !body.is_empty() {
                return Err(malformed("PINGREQ must be empty"));
            }
            Incoming::PingReq
        }
        14 => {
            if flags != 0 {
                return Err(malformed("DISCONNECT flags must be zero"));
            }
            let mut d = Disconnect {
                reason: 0,
                session_expiry: None,
                reason_string: None,
            };
            if !r.is_empty() {
                d.reason = r.u8()?;
            }
            if !r.is_empty() {
                let mut session_expiry = None;
                let mut reason_string = None;
                r.properties(|id, v| {
                    match (id, v) {
                        (0x11, PropValue::U32(n)) => session_expiry = Some(n),
                        (0x1F, PropValue::Str(s)) => reason_string = Some(s),
                        _ => {}
                    }
                    Ok(())
                })?;
                d.session_expiry = session_expiry;
                d.reason_string = reason_string;
            }
            Incoming::Disconnect(d)
        }
        15 => Incoming::Auth,
        _ => return Err(malformed("packet type a client may not send")),
    };
    if !r.is_empty() {
        return Err(malformed("trailing bytes after packet"));
    }
    Ok(packet)
}

fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, CodecError> {
    let name = r.string()?;
    let level = r.u8()?;
    if name != "MQTT" && name != "MQIsdp" {
        return Err(protocol("protocol name is not MQTT"));
    }
    if level != 5 {
        return Err(CodecError {
            reason: reason::UNSUPPORTED_PROTOCOL_VERSION,
            what: UNSUPPORTED_VERSION,
        });
    }
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(malformed("will QoS/retain without a will"));
    }
    if will_qos == 3 {
        return Err(malformed("will QoS 3"));
    }
    let keep_alive = r.u16()?;
    let mut session_expiry = 0;
    let mut receive_maximum = u16::MAX;
    let mut maximum_packet_size = None;
    let mut auth_method = None;
    r.properties(|id, v| {
        match (id, v) {
            (0x11, PropValue::U32(n)) => session_expiry = n,
            (0x21, PropValue::U16(0)) => return Err(protocol("receive maximum 0")),
            (0x21, PropValue::U16(n)) => receive_maximum = n,
            (0x27, PropValue::U32(0)) => return Err(protocol("maximum packet size 0")),
            (0x27, PropValue::U32(n)) => maximum_packet_size = Some(n),
            (0x15, PropValue::Str(s)) => auth_method = Some(s),
            (0x22 | 0x19 | 0x17 | 0x26 | 0x16, _) => {}
            _ => return Err(protocol("property not allowed in CONNECT")),
        }
        Ok(())
    })?;
    let client_id = r.string()?;
    let will = if will_flag {
        let mut delay = 0;
        r.properties(|id, v| {
            match (id, v) {
                (0x18, PropValue::U32(n)) => delay = n,
                (0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x26, _) => {}
                _ => return Err(protocol("property not allowed in will properties")),
            }
            Ok(())
        })?;
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        client_id,
        clean_start,
        keep_alive,
        session_expiry,
        receive_maximum,
        maximum_packet_size,
        username,
        password,
        will,
        auth_method,
    })
}

fn decode_publish(flags: u8, r: &mut Reader<'_>) -> Result<Publish, CodecError> {
    let dup = flags & 0x08 != 0;
    let qos = (flags >> 1) & 0x03;
    let retain = flags & 0x01 != 0;
    if qos == 3 {
        return Err(malformed("PUBLISH QoS 3"));
    }
    if qos == 0 && dup {
        return Err(malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.string()?;
    let pkid = if qos > 0 {
        let id = r.u16()?;
        if id == 0 {
            return Err(protocol("packet identifier 0"));
        }
        id
    } else {
        0
    };
    let props_start = r.pos;
    let mut has_alias = false;
    r.properties(|id, _| {
        match id {
            0x23 => has_alias = true,
            0x01 | 0x02 | 0x03 | 0x08 | 0x09 | 0x26 => {}
            _ => return Err(protocol("property not allowed in PUBLISH")),
        }
        Ok(())
    })?;
    if has_alias {
        return Err(CodecError {
            reason: 0x94,
            what: "topic alias used, but the broker allows none",
        });
    }
    // Keep the property bytes without their length prefix.
    let raw = &r.buf[props_start..r.pos];
    let (_, len_bytes) = read_varint(raw).ok_or_else(|| malformed("property length"))?;
    let properties = raw[len_bytes..].to_vec();
    let payload = r.rest().to_vec();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        pkid,
        properties,
        payload,
    })
}

fn read_varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in buf.iter().enumerate().take(4) {
        value |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// A property value, typed by its identifier.
pub enum PropValue {
    U8(u8),
    U16(u16),
    U32(u32),
    Var(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| malformed("packet shorter than its fields"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }
    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self) -> Result<u32, CodecError> {
        let (v, n) =
            read_varint(&self.buf[self.pos..]).ok_or_else(|| malformed("bad variable integer"))?;
        self.pos += n;
        Ok(v as u32)
    }
    fn binary(&mut self) -> Result<Vec<u8>, CodecError> {
        let len = self.u16()? as usize;
        Ok(self.take(len)?.to_vec())
    }
    fn string(&mut self) -> Result<String, CodecError> {
        let len = self.u16()? as usize;
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| malformed("string is not UTF-8"))?;
        if s.contains('\0') {
            return Err(malformed("string contains U+0000"));
        }
        Ok(s.to_owned())
    }
    /// Read a property block, calling `f` for each property.
    fn properties(
        &mut self,
        mut f: impl FnMut(u8, PropValue) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let len = self.varint()? as usize;
        let block = self.take(len)?;
        let mut r = Reader::new(block);
        while !r.is_empty() {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| malformed("unknown property"))?;
            let v = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => PropValue::U8(r.u8()?),
                0x13 | 0x21 | 0x22 | 0x23 => PropValue::U16(r.u16()?),
                0x02 | 0x11 | 0x18 | 0x27 => PropValue::U32(r.u32()?),
                0x0B => PropValue::Var(r.varint()?),
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => PropValue::Str(r.string()?),
                0x09 | 0x16 => PropValue::Bin(r.binary()?),
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    PropValue::Pair(k, v)
                }
                _ => return Err(malformed("unknown property")),
            };
            f(id, v)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding (broker → client)

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
}

fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

fn with_props(body: &mut Vec<u8>, props: &[u8]) {
    put_varint(body, props.len());
    body.extend_from_slice(props);
}

/// Properties a broker puts in CONNACK/DISCONNECT: reason string and user properties.
#[derive(Debug, Default, Clone)]
pub struct Props {
    pub reason_string: Option<String>,
    pub user: Vec<(String, String)>,
    pub session_expiry: Option<u32>,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub wildcard_available: Option<bool>,
    pub subscription_ids_available: Option<bool>,
    pub shared_available: Option<bool>,
}

impl Props {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        if let Some(n) = self.session_expiry {
            p.push(0x11);
            p.extend_from_slice(&n.to_be_bytes());
        }
        if let Some(n) = self.receive_maximum {
            p.push(0x21);
            p.extend_from_slice(&n.to_be_bytes());
        }
        if let Some(n) = self.maximum_qos {
            p.extend_from_slice(&[0x24, n]);
        }
        if let Some(b) = self.retain_available {
            p.extend_from_slice(&[0x25, b as u8]);
        }
        if let Some(n) = self.maximum_packet_size {
            p.push(0x27);
            p.extend_from_slice(&n.to_be_bytes());
        }
        if let Some(s) = &self.assigned_client_id {
            p.push(0x12);
            put_str(&mut p, s);
        }
        if let Some(b) = self.wildcard_available {
            p.extend_from_slice(&[0x28, b as u8]);
        }
        if let Some(b) = self.subscription_ids_available {
            p.extend_from_slice(&[0x29, b as u8]);
        }
        if let Some(b) = self.shared_available {
            p.extend_from_slice(&[0x2A, b as u8]);
        }
        if let Some(s) = &self.reason_string {
            p.push(0x1F);
            put_str(&mut p, s);
        }
        for (k, v) in &self.user {
            p.push(0x26);
            put_str(&mut p, k);
            put_str(&mut p, v);
        }
        p
    }
}

pub fn connack(session_present: bool, reason: u8, props: &Props) -> Vec<u8> {
    let mut body = vec![session_present as u8, reason];
    with_props(&mut body, &props.encode());
    frame(0x20, &body)
}

/// The CONNACK an MQTT 3.1/3.1.1 client understands: "unacceptable protocol version".
pub fn connack_v3_unsupported_version() -> Vec<u8> {
    vec![0x20, 0x02, 0x00, 0x01]
}

/// The short form of a DISCONNECT, as mosquitto ≥ 2.0.15 sends it: the reason code and no
/// property length (`E0 01 8E`); code 0 (normal disconnection) is just `E0 00`. MQTT 5
/// §3.14.2.2.1: "If the Remaining Length is less than 2, a value of 0 is used".
pub fn disconnect_short(reason: u8) -> Vec<u8> {
    if reason == 0 {
        vec![0xE0, 0x00]
    } else {
        vec![0xE0, 0x01, reason]
    }
}

pub fn disconnect(reason: u8, props: &Props) -> Vec<u8> {
    let mut body = vec![reason];
    with_props(&mut body, &props.encode());
    frame(0xE0, &body)
}

pub fn publish(p: &Publish) -> Vec<u8> {
    let mut body = Vec::with_capacity(p.topic.len() + p.payload.len() + 8);
    put_str(&mut body, &p.topic);
    if p.qos > 0 {
        body.extend_from_slice(&p.pkid.to_be_bytes());
    }
    with_props(&mut body, &p.properties);
    body.extend_from_slice(&p.payload);
    let header = 0x30 | ((p.dup as u8) << 3) | (p.qos << 1) | p.retain as u8;
    frame(header, &body)
}

pub fn puback(pkid: u16, reason: u8) -> Vec<u8> {
    let id = pkid.to_be_bytes();
    if reason == 0 {
        frame(0x40, &id)
    } else {
        frame(0x40, &[id[0], id[1], reason, 0])
    }
}

/// A PUBACK with a reason code and properties (the IM service's reason string).
pub fn puback_with(pkid: u16, reason: u8, props: &Props) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(reason);
    with_props(&mut body, &props.encode());
    frame(0x40, &body)
}

pub fn suback(pkid: u16, reasons: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(reasons);
    frame(0x90, &body)
}

pub fn unsuback(pkid: u16, reasons: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(reasons);
    frame(0xB0, &body)
}

pub fn pingresp() -> Vec<u8> {
    vec![0xD0, 0x00]
}

// ---------------------------------------------------------------------------------------------
// Topics

/// A topic filter a client may subscribe with: non-empty, `#` only as the whole last level,
/// `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, l)| {
        if l.contains('#') {
            *l == "#" && i == last
        } else if l.contains('+') {
            *l == "+"
        } else {
            true
        }
    })
}

/// A topic name a client may publish to: non-empty, no wildcards.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

/// Whether `topic` matches `filter` (MQTT rules, `$` topics not matched by a leading wildcard).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching_follows_mqtt_rules() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn filters_and_topics_are_validated() {
        assert!(valid_filter("a/#"));
        assert!(valid_filter("+/b/+"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b#"));
        assert!(!valid_filter("a+/b"));
        assert!(!valid_filter(""));
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic(""));
    }

    #[test]
    fn truncated_and_oversized_frames_are_handled() {
        assert_eq!(decode(&[0x10], 1024), Ok(None));
        assert_eq!(decode(&[0x10, 0x80], 1024), Ok(None));
        assert_eq!(
            decode(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], 1 << 30)
                .unwrap_err()
                .reason,
            reason::MALFORMED_PACKET
        );
        assert_eq!(
            decode(&[0x30, 0xFF, 0x7F], 1024).unwrap_err().reason,
            reason::PACKET_TOO_LARGE
        );
        // A PINGREQ with a body, a CONNECT with flags, a type clients never send.
        assert!(decode(&[0xC0, 0x01, 0x00], 1024).is_err());
        assert!(decode(&[0x11, 0x00], 1024).is_err());
        assert!(decode(&[0x20, 0x02, 0x00, 0x00], 1024).is_err());
        assert_eq!(
            decode(&[0xC0, 0x00], 1024),
            Ok(Some((Incoming::PingReq, 2)))
        );
    }

    #[test]
    fn publish_round_trips_through_encode_and_decode() {
        let p = Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: "im/1/u/alice/x".into(),
            pkid: 7,
            properties: vec![0x01, 0x01],
            payload: b"hello".to_vec(),
        };
        let bytes = publish(&p);
        let (decoded, used) = decode(&bytes, 1024).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded, Incoming::Publish(p));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix of many pseudo-random buffers.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push((x & 0xFF) as u8);
            }
            // Make the type nibble land on every packet type.
            if let Some(b) = buf.first_mut() {
                *b = (*b & 0x0F) | (((x >> 8) as u8 & 0x0F) << 4);
            }
            let _ = decode(&buf, 4096);
        }
    }
}
