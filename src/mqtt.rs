//! rumqttc glue: MQTT v5 options as the field notes prescribe, and the translation of
//! rumqttc's errors into the session machine's [`ConnEnd`].

use std::sync::Arc;
use std::time::Duration;

use rumqttc::Transport;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode};
use rumqttc::v5::{ConnectionError, MqttOptions, StateError};

use crate::config::Config;
use crate::identity::{TemplateValues, UserId};
use crate::session::{ConnEnd, NetKind, Target};
use crate::usersig::UserSig;

/// Largest packet the daemon accepts (rumqttc's default is only 10 KiB).
pub const MAX_PACKET: u32 = 256 * 1024;
/// In-flight limit: rumqttc preallocates for it (the default 65535 costs ~13.5 MiB).
pub const INFLIGHT: u16 = 32;
/// How many QoS 1 messages the broker may have out to us unacknowledged (the CONNECT's
/// receive maximum): the courier holds at most this many received messages in memory.
pub const RECEIVE_MAX: u16 = 32;

/// Everything needed to open a session, built once per config.
#[derive(Clone)]
pub struct MqttSettings {
    /// The configured nodes, in failover order.
    pub nodes: Vec<(String, u16)>,
    pub protocol: crate::session::ProtocolMode,
    pub sdk_app_id: u64,
    pub platform: String,
    pub instance: String,
    pub client_id: crate::identity::Template,
    pub keepalive: Duration,
    pub session_expiry: u32,
    pub connect_timeout: Duration,
    pub tls: Arc<rustls::ClientConfig>,
}

impl MqttSettings {
    pub fn from_config(c: &Config) -> Result<MqttSettings, String> {
        Ok(MqttSettings {
            nodes: c.broker.nodes.clone(),
            protocol: c.broker.protocol,
            sdk_app_id: c.sdk_app_id,
            platform: c.platform.clone(),
            instance: c.instance.clone(),
            client_id: c.broker.client_id.clone(),
            keepalive: c.broker.keepalive,
            session_expiry: c.broker.session_expiry_secs,
            connect_timeout: c.broker.connect_timeout,
            tls: crate::tls::client_config(&c.broker.ca, c.broker.client_auth.as_ref(), &[])?,
        })
    }

    /// Whether a reconnect is needed to apply `other` (anything but the TLS object itself).
    pub fn differs(&self, other: &MqttSettings) -> bool {
        (
            &self.nodes,
            self.protocol,
            self.sdk_app_id,
            &self.platform,
            &self.instance,
            &self.client_id,
            self.keepalive,
            self.session_expiry,
        ) != (
            &other.nodes,
            other.protocol,
            other.sdk_app_id,
            &other.platform,
            &other.instance,
            &other.client_id,
            other.keepalive,
            other.session_expiry,
        )
    }

    pub fn client_id(&self, user: &UserId) -> String {
        self.client_id.render(
            &TemplateValues {
                sdk_app_id: self.sdk_app_id,
                user_id: user,
                platform: &self.platform,
                instance: &self.instance,
            },
            str::to_string,
        )
    }

    /// Where `target` is: a configured node, or a redirect's Server Reference (`host`,
    /// `host:port` or `mqtts://host:port`; the first of several, separated by ASCII spaces;
    /// never plaintext). A reference is text from outside: anything but printable ASCII in it
    /// (NEL, U+2028/U+2029, bidi controls, …) makes it unusable, as no host name has those.
    pub fn endpoint(&self, target: &Target) -> Option<(String, u16)> {
        match target {
            Target::Node(i) => self.nodes.get(*i as usize).cloned(),
            Target::Redirect(r) => {
                let first = r.split_ascii_whitespace().next()?;
                if !first.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                let url = if first.contains("://") {
                    first.to_string()
                } else {
                    format!("mqtts://{first}")
                };
                crate::url::parse_broker_url(&url).ok()
            }
        }
    }

    /// `mqtts://host:port` of `target` (the first node when there is none yet), for status
    /// and logs.
    pub fn url_of(&self, target: Option<&Target>) -> String {
        if let Some(t @ Target::Redirect(r)) = target
            && self.endpoint(t).is_none()
        {
            // Never printed raw: it is the broker's text.
            return format!(
                "an unusable redirect {}",
                crate::session::quote_external(r, 80)
            );
        }
        let (host, port) = target
            .and_then(|t| self.endpoint(t))
            .or_else(|| self.nodes.first().cloned())
            .unwrap_or_default();
        if host.contains(':') {
            format!("mqtts://[{host}]:{port}")
        } else {
            format!("mqtts://{host}:{port}")
        }
    }

    /// Options for one connection: persistent session (clean start off, session expiry),
    /// username = UserID, password = UserSig. rumqttc speaks MQTT over `relay`, the private
    /// Unix socket of `crate::relay`, which carries it over TLS (ring) to the broker.
    pub fn options(&self, user: &UserId, sig: &UserSig, relay: &std::path::Path) -> MqttOptions {
        let mut o = MqttOptions::new(
            self.client_id(user),
            relay.to_string_lossy().into_owned(),
            0,
        );
        o.set_transport(Transport::Unix);
        o.set_credentials(user.as_str(), sig.expose());
        // Validated at config time: ≥ 5 s (rumqttc panics below that).
        o.set_keep_alive(self.keepalive);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(self.session_expiry));
        o.set_connection_timeout(self.connect_timeout.as_secs().max(1));
        o.set_outgoing_inflight_upper_limit(INFLIGHT);
        o.set_max_packet_size(Some(MAX_PACKET));
        // The courier's window (16 publishes) and the PUBACKs owed (at most RECEIVE_MAX)
        // always fit, so `try_publish`/`try_ack` are refused only when the link is going.
        o.set_request_channel_capacity(128);
        o.set_receive_maximum(Some(RECEIVE_MAX));
        // A received message is acknowledged only once it is committed to the store.
        o.set_manual_acks(true);
        o
    }
}

impl MqttSettings {
    /// The same session over MQTT 3.1.1 (`rumqttc::*`): a persistent session
    /// (`clean_session = false`; the broker decides how long it lives), manual acks, the same
    /// limits. 3.1.1 has no reason strings, no server DISCONNECT and no receive maximum.
    pub fn options_v311(
        &self,
        user: &UserId,
        sig: &UserSig,
        relay: &std::path::Path,
    ) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(
            self.client_id(user),
            relay.to_string_lossy().into_owned(),
            0,
        );
        o.set_transport(Transport::Unix);
        o.set_credentials(user.as_str(), sig.expose());
        o.set_keep_alive(self.keepalive);
        o.set_clean_session(false);
        o.set_inflight(INFLIGHT);
        o.set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize);
        o.set_request_channel_capacity(128);
        o.set_manual_acks(true);
        o
    }
}

/// A 3.1.1 CONNACK return code as the MQTT 5 reason code that means the same, so both
/// protocols are classified alike: 1 → 0x84 unsupported protocol version, 2 → 0x85 client id
/// not valid, 3 → 0x88 server unavailable, 4 → 0x86 bad user name or password, 5 → 0x87 not
/// authorized.
pub fn v311_code(rc: u8) -> u8 {
    match rc {
        0 => 0x00,
        1 => 0x84,
        2 => 0x85,
        3 => 0x88,
        4 => 0x86,
        5 => 0x87,
        _ => 0x80,
    }
}

// What both protocol versions' errors share (rumqttc has one TLS error type for both).

fn tls_end(t: &rumqttc::TlsError) -> ConnEnd {
    if crate::tls::is_not_yet_valid(t) {
        ConnEnd::CertNotYetValid {
            detail: t.to_string(),
        }
    } else {
        ConnEnd::Network {
            kind: NetKind::Tls,
            detail: format!("TLS: {t}"),
        }
    }
}

fn keepalive_lost() -> ConnEnd {
    ConnEnd::Network {
        kind: NetKind::Timeout,
        detail: "the server stopped answering keepalive pings".into(),
    }
}

fn no_connack() -> ConnEnd {
    ConnEnd::Network {
        kind: NetKind::Timeout,
        detail: "no CONNACK within the connect timeout".into(),
    }
}

/// Translate a rumqttc 3.1.1 error into what the session machine classifies (a 3.1.1 broker
/// never says why it closes: kicks and expiries look like closes).
pub fn classify_v311(e: &rumqttc::ConnectionError) -> ConnEnd {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E, StateError as S};
    let net = |kind: NetKind, detail: String| ConnEnd::Network { kind, detail };
    match e {
        E::ConnectionRefused(code) => ConnEnd::Refused {
            code: v311_code(match code {
                C::Success => 0,
                C::RefusedProtocolVersion => 1,
                C::BadClientId => 2,
                C::ServiceUnavailable => 3,
                C::BadUserNamePassword => 4,
                C::NotAuthorized => 5,
            }),
            reason: None,
            im_code: None,
        },
        E::MqttState(S::ConnectionAborted) => net(
            NetKind::Closed,
            "the server closed the connection (MQTT 3.1.1 says no more)".into(),
        ),
        E::MqttState(S::AwaitPingResp) => keepalive_lost(),
        E::MqttState(S::Io(io)) | E::Io(io) => io_end(io),
        E::NetworkTimeout => no_connack(),
        E::Tls(t) => tls_end(t),
        other => net(NetKind::Other, other.to_string()),
    }
}

/// The numeric reason code of a PUBACK.
pub fn puback_code(r: rumqttc::v5::mqttbytes::v5::PubAckReason) -> u8 {
    use rumqttc::v5::mqttbytes::v5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// The numeric MQTT v5 reason code of a CONNACK refusal.
pub fn connack_code(c: ConnectReturnCode) -> u8 {
    use ConnectReturnCode as C;
    match c {
        C::Success => 0x00,
        C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => 0x84,
        C::BadClientId | C::ClientIdentifierNotValid => 0x85,
        C::ServiceUnavailable | C::ServerUnavailable => 0x88,
        C::UnspecifiedError => 0x80,
        C::MalformedPacket => 0x81,
        C::ProtocolError => 0x82,
        C::ImplementationSpecificError => 0x83,
        C::BadUserNamePassword => 0x86,
        C::NotAuthorized => 0x87,
        C::ServerBusy => 0x89,
        C::Banned => 0x8A,
        C::BadAuthenticationMethod => 0x8C,
        C::TopicNameInvalid => 0x90,
        C::PacketTooLarge => 0x95,
        C::QuotaExceeded => 0x97,
        C::PayloadFormatInvalid => 0x99,
        C::RetainNotSupported => 0x9A,
        C::QoSNotSupported => 0x9B,
        C::UseAnotherServer => 0x9C,
        C::ServerMoved => 0x9D,
        C::ConnectionRateExceeded => 0x9F,
    }
}

/// Translate a rumqttc error into what the session machine classifies.
pub fn classify(e: &ConnectionError) -> ConnEnd {
    let net = |kind: NetKind, detail: String| ConnEnd::Network { kind, detail };
    match e {
        ConnectionError::ConnectionRefused(code) => ConnEnd::Refused {
            code: connack_code(*code),
            reason: None,
            im_code: None,
        },
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => ConnEnd::ServerDisconnect {
            code: disconnect_code(*reason_code),
            reason: reason_string.clone(),
            im_code: None,
        },
        ConnectionError::MqttState(StateError::ConnectionAborted) => net(
            NetKind::Closed,
            "the server closed the connection without a DISCONNECT".into(),
        ),
        ConnectionError::MqttState(StateError::AwaitPingResp) => keepalive_lost(),
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => io_end(io),
        ConnectionError::Timeout(_) => no_connack(),
        ConnectionError::Tls(t) => tls_end(t),
        other => net(NetKind::Other, other.to_string()),
    }
}

/// Classify an I/O error of the broker connection.
pub fn io_end(io: &std::io::Error) -> ConnEnd {
    use std::io::ErrorKind as K;
    if crate::tls::is_not_yet_valid(io) {
        return ConnEnd::CertNotYetValid {
            detail: io.to_string(),
        };
    }
    let kind = match io.kind() {
        K::ConnectionRefused => NetKind::Refused,
        K::TimedOut => NetKind::Timeout,
        K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe => {
            NetKind::Closed
        }
        _ if io.to_string().contains("lookup") => NetKind::Dns,
        _ => NetKind::Other,
    };
    ConnEnd::Network {
        kind,
        detail: io.to_string(),
    }
}

fn disconnect_code(c: DisconnectReasonCode) -> u8 {
    // The enum is `repr(u8)` with the wire values.
    c as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> MqttSettings {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        MqttSettings {
            nodes: vec![("node0.example".into(), 8883)],
            protocol: crate::session::ProtocolMode::V5,
            sdk_app_id: 1400000001,
            platform: "linux".into(),
            instance: "1".into(),
            client_id: crate::identity::Template::parse("{user_id}", &["user_id"])
                .expect("a valid template"),
            keepalive: Duration::from_secs(60),
            session_expiry: 3600,
            connect_timeout: Duration::from_secs(10),
            tls: Arc::new(tls),
        }
    }

    /// Unicode's line and paragraph separators, NEL, and the bidi controls that reorder what a
    /// log reader sees.
    const HOSTILE: &[char] = &[
        '\u{0085}', '\u{2028}', '\u{2029}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}',
        '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{200E}', '\u{200F}',
        '\u{061C}',
    ];

    #[test]
    fn a_redirect_host_with_line_separators_or_bidi_controls_never_reaches_a_log_line() {
        let m = settings();
        for c in HOSTILE {
            for reference in [
                format!("evil{c}host:8883"),
                format!("mqtts://evil{c}host:8883"),
                format!("evil.example{c}:8883"),
            ] {
                let target = Target::Redirect(reference.clone());
                // What the driver's "connecting" line and the status print.
                let url = m.url_of(Some(&target));
                assert!(
                    !url.contains(HOSTILE) && !url.chars().any(char::is_control),
                    "{reference:?} printed as {url:?}"
                );
                // Such a host is no host name: the connection is refused before any TLS.
                if let Some((host, _)) = m.endpoint(&target) {
                    assert!(host.is_ascii(), "{reference:?} → {host:?}");
                }
            }
        }
    }
}
