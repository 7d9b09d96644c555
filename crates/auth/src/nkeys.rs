//! NATS nkeys: Ed25519 keys (ring) in their text encoding.
//!
//! A public key is `base32(prefix byte ‖ 32-byte key ‖ CRC16)`, RFC 4648 alphabet without
//! padding, the CRC-16/XMODEM of the bytes before it, little-endian. The prefix byte puts a
//! letter in front: `A` account, `U` user, `N` server, `O` operator, `C` cluster. A seed is the
//! 32-byte Ed25519 seed with a two-byte prefix, `S` and then the letter of the key's kind
//! (`SA…` is an account seed): byte 0 = `18 << 3 | kind >> 5`, byte 1 = `(kind & 31) << 3`.
//!
//! Decoding is total and strict: wrong alphabet, wrong length, non-zero trailing bits, a bad
//! checksum or an unexpected prefix are typed errors, never a panic. A [`KeyPair`] never prints
//! its seed; [`Seed`] text only comes out through [`KeyPair::seed_text`], for `keygen`.

use std::fmt;

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

/// What a key is for: the letter in front of its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Account,
    User,
    Server,
    Operator,
    Cluster,
}

impl Kind {
    fn prefix(self) -> u8 {
        match self {
            Kind::Account => 0,
            Kind::User => 20 << 3,
            Kind::Server => 13 << 3,
            Kind::Operator => 14 << 3,
            Kind::Cluster => 2 << 3,
        }
    }

    fn from_prefix(b: u8) -> Option<Kind> {
        [
            Kind::Account,
            Kind::User,
            Kind::Server,
            Kind::Operator,
            Kind::Cluster,
        ]
        .into_iter()
        .find(|k| k.prefix() == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Account => "account",
            Kind::User => "user",
            Kind::Server => "server",
            Kind::Operator => "operator",
            Kind::Cluster => "cluster",
        }
    }
}

const SEED_PREFIX: u8 = 18 << 3;
/// Text length of a public key (35 bytes) and of a seed (36 bytes), base32 without padding.
pub const PUBLIC_TEXT_LEN: usize = 56;
pub const SEED_TEXT_LEN: usize = 58;

/// Why a text is not the nkey expected. Messages never quote the text (a seed is a secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NkeyError {
    #[error("is {0} characters long, not the {PUBLIC_TEXT_LEN} of a public nkey")]
    PublicLength(usize),
    #[error("is {0} characters long, not the {SEED_TEXT_LEN} of an nkey seed")]
    SeedLength(usize),
    #[error("has a character outside base32 (A-Z, 2-7) at position {0}")]
    Alphabet(usize),
    #[error("has non-zero padding bits (not a canonical encoding)")]
    TrailingBits,
    #[error("fails its CRC-16 checksum (a typo, or a truncated copy)")]
    Checksum,
    #[error("has an unknown prefix byte")]
    Prefix,
    #[error("is a {found} key, not the {expected} key expected")]
    WrongKind {
        expected: &'static str,
        found: &'static str,
    },
    #[error("is not a seed (seeds start with S)")]
    NotASeed,
}

/// CRC-16/XMODEM: polynomial 0x1021, initial value 0, no reflection.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// RFC 4648 base32, no padding.
pub fn base32_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &b in data {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(B32[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(B32[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// RFC 4648 base32 without padding, strict: only canonical encodings decode.
pub fn base32_decode(text: &str) -> Result<Vec<u8>, NkeyError> {
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for (i, c) in text.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => return Err(NkeyError::Alphabet(i)),
        };
        acc = (acc << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // What is left must be fewer than 5 bits (else a whole character encodes nothing) and zero.
    if bits >= 5 || acc != 0 {
        return Err(NkeyError::TrailingBits);
    }
    Ok(out)
}

fn with_crc(mut raw: Vec<u8>) -> String {
    let crc = crc16(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    base32_encode(&raw)
}

fn strip_crc(text: &str) -> Result<Vec<u8>, NkeyError> {
    let mut raw = base32_decode(text)?;
    if raw.len() < 3 {
        return Err(NkeyError::Checksum);
    }
    let n = raw.len() - 2;
    let crc = u16::from_le_bytes([raw[n], raw[n + 1]]);
    raw.truncate(n);
    if crc16(&raw) != crc {
        return Err(NkeyError::Checksum);
    }
    Ok(raw)
}

/// A public nkey.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey {
    kind: Kind,
    key: [u8; 32],
}

impl PublicKey {
    pub fn from_raw(kind: Kind, key: [u8; 32]) -> PublicKey {
        PublicKey { kind, key }
    }

    /// Any public nkey.
    pub fn parse(text: &str) -> Result<PublicKey, NkeyError> {
        if text.len() != PUBLIC_TEXT_LEN {
            return Err(NkeyError::PublicLength(text.len()));
        }
        let raw = strip_crc(text)?;
        let kind = Kind::from_prefix(raw[0]).ok_or(NkeyError::Prefix)?;
        let key =
            <[u8; 32]>::try_from(&raw[1..]).map_err(|_| NkeyError::PublicLength(text.len()))?;
        Ok(PublicKey { kind, key })
    }

    /// A public nkey of the given kind.
    pub fn parse_kind(text: &str, kind: Kind) -> Result<PublicKey, NkeyError> {
        let k = PublicKey::parse(text)?;
        if k.kind != kind {
            return Err(NkeyError::WrongKind {
                expected: kind.name(),
                found: k.kind.name(),
            });
        }
        Ok(k)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn raw(&self) -> &[u8; 32] {
        &self.key
    }

    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(35);
        raw.push(self.kind.prefix());
        raw.extend_from_slice(&self.key);
        with_crc(raw)
    }

    /// Whether `sig` is this key's Ed25519 signature of `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.key)
            .verify(msg, sig)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.encode())
    }
}

/// An Ed25519 key pair with its kind. `Debug` shows the public key only.
pub struct KeyPair {
    kind: Kind,
    seed: [u8; 32],
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl KeyPair {
    /// From the 32 raw seed bytes.
    pub fn from_raw_seed(kind: Kind, seed: [u8; 32]) -> KeyPair {
        // from_seed_unchecked only fails for a seed of the wrong length, which the type rules out.
        let pair = match Ed25519KeyPair::from_seed_unchecked(&seed) {
            Ok(p) => p,
            Err(_) => unreachable!("a 32-byte Ed25519 seed is always accepted"),
        };
        let mut key = [0u8; 32];
        key.copy_from_slice(pair.public_key().as_ref());
        KeyPair {
            kind,
            seed,
            pair,
            public: PublicKey { kind, key },
        }
    }

    /// From seed text (`S` + kind letter + …).
    pub fn from_seed_text(text: &str) -> Result<KeyPair, NkeyError> {
        let text = text.trim();
        if text.len() != SEED_TEXT_LEN {
            return Err(NkeyError::SeedLength(text.len()));
        }
        let raw = strip_crc(text)?;
        if raw[0] & 0xf8 != SEED_PREFIX {
            return Err(NkeyError::NotASeed);
        }
        let kind_byte = ((raw[0] & 7) << 5) | ((raw[1] & 0xf8) >> 3);
        if raw[1] & 7 != 0 {
            return Err(NkeyError::Prefix);
        }
        let kind = Kind::from_prefix(kind_byte).ok_or(NkeyError::Prefix)?;
        let seed =
            <[u8; 32]>::try_from(&raw[2..]).map_err(|_| NkeyError::SeedLength(text.len()))?;
        Ok(KeyPair::from_raw_seed(kind, seed))
    }

    /// A seed of the given kind, or an error saying which kind it is.
    pub fn from_seed_text_kind(text: &str, kind: Kind) -> Result<KeyPair, NkeyError> {
        let kp = KeyPair::from_seed_text(text)?;
        if kp.kind != kind {
            return Err(NkeyError::WrongKind {
                expected: kind.name(),
                found: kp.kind.name(),
            });
        }
        Ok(kp)
    }

    /// A new random key pair (the system's CSPRNG).
    pub fn generate(kind: Kind) -> Result<KeyPair, ring::error::Unspecified> {
        use ring::rand::SecureRandom;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut seed)?;
        Ok(KeyPair::from_raw_seed(kind, seed))
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The seed in its text form. A secret: only `keygen` writes it, to a 0600 file.
    pub fn seed_text(&self) -> String {
        let p = self.kind.prefix();
        let mut raw = Vec::with_capacity(36);
        raw.push(SEED_PREFIX | (p >> 5));
        raw.push((p & 31) << 3);
        raw.extend_from_slice(&self.seed);
        with_crc(raw)
    }

    /// The Ed25519 signature of `msg` (deterministic).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public.encode())
            .field("seed", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_is_xmodem() {
        // The standard check value of CRC-16/XMODEM.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn base32_matches_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "MY"),
            ("fo", "MZXQ"),
            ("foo", "MZXW6"),
            ("foob", "MZXW6YQ"),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI"),
        ] {
            assert_eq!(base32_encode(plain.as_bytes()), enc);
            assert_eq!(base32_decode(enc).unwrap(), plain.as_bytes());
        }
        // Non-canonical: trailing bits set, or a character that encodes nothing.
        assert_eq!(base32_decode("MZ"), Err(NkeyError::TrailingBits));
        assert_eq!(base32_decode("M"), Err(NkeyError::TrailingBits));
        assert_eq!(base32_decode("MY="), Err(NkeyError::Alphabet(2)));
        assert_eq!(base32_decode("my"), Err(NkeyError::Alphabet(0)));
    }

    #[test]
    fn seeds_and_public_keys_carry_their_letters() {
        let seed = [7u8; 32];
        for (kind, pub_letter, seed_letters) in [
            (Kind::Account, 'A', "SA"),
            (Kind::User, 'U', "SU"),
            (Kind::Server, 'N', "SN"),
            (Kind::Operator, 'O', "SO"),
            (Kind::Cluster, 'C', "SC"),
        ] {
            let kp = KeyPair::from_raw_seed(kind, seed);
            let p = kp.public().encode();
            assert_eq!(p.len(), PUBLIC_TEXT_LEN);
            assert!(p.starts_with(pub_letter), "{kind:?}: {p}");
            let s = kp.seed_text();
            assert_eq!(s.len(), SEED_TEXT_LEN);
            assert!(
                s.starts_with(seed_letters),
                "{kind:?}: seed starts {}",
                &s[..2]
            );
            let back = KeyPair::from_seed_text(&s).unwrap();
            assert_eq!(back.kind(), kind);
            assert_eq!(back.public(), kp.public());
            assert_eq!(PublicKey::parse(&p).unwrap(), *kp.public());
            assert_eq!(PublicKey::parse_kind(&p, kind).unwrap(), *kp.public());
        }
    }

    /// A vector built here from RFC 8032's first Ed25519 test key (secret
    /// 9d61b19d…7f60, public d75a9801…511a). The account public key and seed texts were
    /// computed independently with Python's `base64.b32encode` and `binascii.crc_hqx` (which
    /// is CRC-16/XMODEM); nats-server itself accepts keys made this way (the cluster tests
    /// configure it with `keygen`'s issuer).
    #[test]
    fn known_vector_from_rfc8032_key_1() {
        let seed: [u8; 32] =
            hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let kp = KeyPair::from_raw_seed(Kind::Account, seed);
        assert_eq!(
            kp.public().raw().to_vec(),
            hex::<32>("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a").to_vec()
        );
        let mut raw = vec![0u8];
        raw.extend_from_slice(kp.public().raw());
        let crc = crc16(&raw);
        raw.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(kp.public().encode(), base32_encode(&raw));
        assert_eq!(
            kp.public().encode(),
            "ADLVVGABQKYQVN6VJP7NHSLEA45A5YLS6PNKMIZFV4BBU2HXA5IRVRTU"
        );
        assert_eq!(
            kp.seed_text(),
            "SAAJ2YNRTXX72WTAXKCEV5ES5QWMIRCJYVUXWMTJDFYDXLADDSXH6YHY3Q"
        );
        // RFC 8032's signature of the empty message.
        let sig = kp.sign(b"");
        assert_eq!(
            sig.to_vec(),
            hex::<64>(
                "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
            )
            .to_vec()
        );
        assert!(kp.public().verify(b"", &sig));
        assert!(!kp.public().verify(b"x", &sig));
    }

    #[test]
    fn malformed_keys_are_typed_errors() {
        let kp = KeyPair::from_raw_seed(Kind::Server, [1u8; 32]);
        let p = kp.public().encode();
        // One character changed: the checksum catches it.
        let mut bad = p.clone().into_bytes();
        bad[10] = if bad[10] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            PublicKey::parse(std::str::from_utf8(&bad).unwrap()),
            Err(NkeyError::Checksum)
        );
        assert_eq!(PublicKey::parse(&p[..55]), Err(NkeyError::PublicLength(55)));
        assert!(matches!(
            PublicKey::parse_kind(&p, Kind::User),
            Err(NkeyError::WrongKind {
                expected: "user",
                found: "server"
            })
        ));
        assert!(matches!(
            KeyPair::from_seed_text_kind(&kp.seed_text(), Kind::Account),
            Err(NkeyError::WrongKind { .. })
        ));
        // A public key is not a seed.
        assert!(KeyPair::from_seed_text(&p).is_err());
        let lower = p.to_lowercase();
        assert!(matches!(
            PublicKey::parse(&lower),
            Err(NkeyError::Alphabet(0))
        ));
    }

    #[test]
    fn no_bytes_panic_the_decoders() {
        // Every length around the real ones, every byte value at each position of a real key.
        let p = KeyPair::from_raw_seed(Kind::User, [9u8; 32])
            .public()
            .encode();
        for len in 0..80 {
            let s: String = p.chars().cycle().take(len).collect();
            let _ = PublicKey::parse(&s);
            let _ = KeyPair::from_seed_text(&s);
        }
        for pos in 0..p.len() {
            for b in 0u8..=255 {
                let mut v = p.clone().into_bytes();
                v[pos] = b;
                if let Ok(s) = std::str::from_utf8(&v) {
                    let _ = PublicKey::parse(s);
                    let _ = KeyPair::from_seed_text(s);
                }
            }
        }
    }

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
