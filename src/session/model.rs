//! The session's observable state and events: what the local API, systemd's STATUS= and the
//! log show. Wire names here are stable (they are part of the API).

use serde::{Deserialize, Serialize};

/// Milliseconds on the monotonic clock the driver feeds the machine.
pub type Millis = u64;

/// The one phase enum. Wire names are `snake_case`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Logged out and not trying (initial with `login_on_start = false`, or after `logout`).
    Idle,
    /// The wall clock is implausible (before this build) or TLS says a certificate is not yet
    /// valid: waiting for time sync, retrying slowly.
    WaitingForClock,
    /// Fetching a UserSig from the provisioning URL.
    FetchingSig,
    /// TLS + CONNECT sent, waiting for CONNACK.
    Connecting,
    /// CONNACK success, but the broker has not (yet) granted the inbox subscription: logged
    /// in and able to send, not yet able to receive. A refused SUBSCRIBE is retried with
    /// backoff on the same connection.
    Subscribing,
    /// CONNACK success and the inbox subscribed: the session is up.
    Online,
    /// Waiting before the next attempt (exponential backoff with jitter).
    Backoff,
    /// Sending DISCONNECT (logout, account switch, shutdown).
    LoggingOut,
    /// Kicked offline (another login took the session, an administrator, or a suspected
    /// takeover). No reconnect unless policy or a local app says so.
    Kicked,
    /// Stopped on an error a new attempt cannot fix (see `last_error`). No retry until a
    /// local app logs in, the config is reloaded, or the daemon restarts.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::WaitingForClock => "waiting_for_clock",
            Phase::FetchingSig => "fetching_sig",
            Phase::Connecting => "connecting",
            Phase::Subscribing => "subscribing",
            Phase::Online => "online",
            Phase::Backoff => "backoff",
            Phase::LoggingOut => "logging_out",
            Phase::Kicked => "kicked",
            Phase::Stopped => "stopped",
        }
    }

    /// Every phase, in the order the metrics and `imlinkctl`'s usage list them.
    pub const ALL: [Phase; 10] = [
        Phase::Idle,
        Phase::WaitingForClock,
        Phase::FetchingSig,
        Phase::Connecting,
        Phase::Subscribing,
        Phase::Online,
        Phase::Backoff,
        Phase::LoggingOut,
        Phase::Kicked,
        Phase::Stopped,
    ];

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// The SDK's `getLoginStatus` values.
pub mod login_status {
    pub const LOGINED: u8 = 1;
    pub const LOGINING: u8 = 2;
    pub const LOGOUT: u8 = 3;
}

/// Error classes (brief §3.2): how the engine reacted to an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    Network,
    Busy,
    SigExpired,
    SigRejected,
    /// A DISCONNECT or CONNACK code a reconnect cannot fix (malformed packet, protocol error,
    /// topic invalid, packet too large, …): a few tries with backoff, then stop.
    Protocol,
    Kicked,
    Fatal,
    Clock,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Network => "network",
            ErrorClass::Busy => "busy",
            ErrorClass::SigExpired => "sig_expired",
            ErrorClass::SigRejected => "sig_rejected",
            ErrorClass::Protocol => "protocol",
            ErrorClass::Kicked => "kicked",
            ErrorClass::Fatal => "fatal",
            ErrorClass::Clock => "clock",
        }
    }
}

/// An error with its IM code (see `docs/errors.md`), class and a message a human can act on.
/// Messages never contain a UserSig or a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub code: u32,
    pub class: ErrorClass,
    pub message: String,
}

impl LastError {
    pub fn new(code: u32, class: ErrorClass, message: impl Into<String>) -> LastError {
        LastError {
            code,
            class,
            message: message.into(),
        }
    }
}

/// Text that came from outside (a broker's reason string, an HTTP body, API input), made safe
/// to put in a log line, `STATUS=`, an error or the API: control characters (newlines
/// included: each one would start a new sd_notify assignment; NEL, U+0085, is one), Unicode's
/// line and paragraph separators (U+2028, U+2029) and the bidirectional controls that reorder
/// what a reader sees (U+061C, U+200E/F, U+202A–E, U+2066–9) become spaces, at most
/// `max_chars` characters are kept, and the result is quoted so it reads as the server's words.
pub fn quote_external(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars) + 2);
    out.push('"');
    for (n, c) in text.chars().enumerate() {
        if n == max_chars {
            out.push('…');
            break;
        }
        let c = match c {
            '"' => '\'',
            '\\' => '/',
            c if c.is_control() || is_separator_or_bidi(c) => ' ',
            c => c,
        };
        out.push(c);
    }
    out.push('"');
    out
}

/// Characters that break or reorder a line without being control characters.
pub fn is_separator_or_bidi(c: char) -> bool {
    matches!(
        c,
        '\u{2028}'
            | '\u{2029}'
            | '\u{061C}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// How much of a server's reason string is kept.
pub const MAX_REASON_CHARS: usize = 160;

/// Why the session was kicked offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KickReason {
    /// DISCONNECT 0x8E: another login with this identity took the session.
    LoggedInElsewhere,
    /// DISCONNECT 0x98: an administrator.
    KickedByAdmin,
    /// The server kept closing the socket right after login: two devices share an identity.
    SuspectedTakeover,
}

/// Notifications, mirroring the SDK's listeners. Serialised with `"event": "<name>"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Connecting {
        user_id: String,
    },
    ConnectSuccess {
        user_id: String,
        session_present: bool,
    },
    ConnectFailed {
        code: u32,
        class: ErrorClass,
        message: String,
    },
    KickedOffline {
        reason: KickReason,
        code: u32,
        message: String,
    },
    UserSigExpired {
        code: u32,
    },
    UserSigRefreshed {
        fingerprint: String,
        expires_at: Option<i64>,
    },
    StateChanged {
        phase: Phase,
        login_status: u8,
        login_user: String,
        last_error: Option<LastError>,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::Connecting { .. } => "connecting",
            Event::ConnectSuccess { .. } => "connect_success",
            Event::ConnectFailed { .. } => "connect_failed",
            Event::KickedOffline { .. } => "kicked_offline",
            Event::UserSigExpired { .. } => "user_sig_expired",
            Event::UserSigRefreshed { .. } => "user_sig_refreshed",
            Event::StateChanged { .. } => "state_changed",
        }
    }
}

/// What the session knows of its current UserSig (never the sig itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigStatus {
    pub fingerprint: String,
    /// Unix seconds (the issuer's clock), when known.
    pub expires_at: Option<i64>,
    /// Monotonic deadline derived from `expires_at` and the provisioning server's `Date`.
    pub deadline_ms: Option<Millis>,
    /// When the proactive refresh is due (monotonic).
    pub refresh_at_ms: Option<Millis>,
    pub refreshing: bool,
}

/// Counters of what the engine did, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub connect_attempts: u64,
    pub logins: u64,
    pub sig_fetches: u64,
    pub sig_fetch_failures: u64,
    pub sig_refreshes: u64,
    pub kicks: u64,
    pub messages_received: u64,
    /// SUBSCRIBEs the broker refused (or left unanswered for the connect timeout).
    pub subscribe_refusals: u64,
}

/// The whole observable state. Times are on the machine's monotonic clock; the driver turns
/// them into wall-clock times for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub phase: Phase,
    pub login_status: u8,
    /// The logged-in UserID; empty unless logged in (SDK `getLoginUser`).
    pub login_user: String,
    /// The UserID the daemon logs in as (configured or last requested).
    pub user_id: String,
    pub since_ms: Millis,
    pub last_error: Option<LastError>,
    pub sig: Option<SigStatus>,
    pub next_retry_ms: Option<Millis>,
    pub counters: Counters,
    /// The last kick or UserSig-expiry event, for late watchers.
    pub last_event: Option<Event>,
    /// Where the current (or last) connection went, and in which protocol.
    pub via: Option<(Target, Proto)>,
    /// Consecutive failed UserSig fetches (refreshes and login fetches) since the last one
    /// that brought a usable sig: what a "renewal keeps failing" alert watches.
    #[serde(default)]
    pub renewal_failures: u32,
    /// Connected and the broker granted the inbox subscription.
    pub inbox_subscribed: bool,
    /// When the next SUBSCRIBE goes out, after a refused one.
    pub next_subscribe_ms: Option<Millis>,
}

/// A duration, coarsely: `45s`, `3m`, `41h`, `3d` (negative counts as zero).
pub fn short(d_ms: i64) -> String {
    let s = d_ms.max(0) / 1000;
    if s >= 2 * 86400 {
        format!("{}d", s / 86400)
    } else if s >= 2 * 3600 {
        format!("{}h", s / 3600)
    } else if s >= 120 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The one-line summary of a snapshot: systemd's `STATUS=`, `imlinkctl status`, the state
/// log line. Pure, so the simulator checks it after every step.
pub fn summary(s: &Snapshot, broker: &str, now_mono: Millis) -> String {
    let err = s
        .last_error
        .as_ref()
        .map(|e| format!("{} (code {})", e.message, e.code))
        .unwrap_or_default();
    let until = |t: Millis| short(t as i64 - now_mono as i64);
    match s.phase {
        Phase::Online => match s.sig.as_ref().and_then(|g| g.deadline_ms) {
            Some(d) if d > now_mono => {
                format!("online as {} (sig valid {})", s.login_user, until(d))
            }
            Some(_) => format!("online as {} (sig past its expiry, renewing)", s.login_user),
            None => format!("online as {}", s.login_user),
        },
        Phase::Subscribing => match s.next_subscribe_ms {
            Some(t) => format!(
                "connected as {}, but the broker refused the inbox subscription: messages to \
                 it do not arrive yet (subscribing again in {})",
                s.login_user,
                until(t)
            ),
            None => format!("connected as {}, subscribing to the inbox", s.login_user),
        },
        Phase::Idle => "logged out — run `imlinkctl login` to log in".into(),
        Phase::WaitingForClock => format!("waiting for clock sync: {err}"),
        Phase::FetchingSig => format!("fetching a UserSig for {}", s.user_id),
        Phase::Connecting => format!("connecting to {broker} as {}", s.user_id),
        Phase::Backoff => match s.next_retry_ms {
            Some(t) => format!("retrying in {}: {err}", until(t)),
            None => format!("retrying: {err}"),
        },
        Phase::LoggingOut => "logging out".into(),
        Phase::Kicked => {
            let why = match &s.last_event {
                Some(Event::KickedOffline { reason, .. }) => match reason {
                    KickReason::LoggedInElsewhere => "logged in elsewhere",
                    KickReason::KickedByAdmin => "kicked by an administrator",
                    KickReason::SuspectedTakeover => "another device uses this identity",
                },
                _ => "kicked offline",
            };
            match s.next_retry_ms {
                Some(t) => format!("kicked: {why} — logging in again in {}", until(t)),
                None => format!("kicked: {why} — run `imlinkctl login`"),
            }
        }
        Phase::Stopped => match s.next_retry_ms {
            Some(t) => format!("stopped: {err} — next try in {}", until(t)),
            None => format!("stopped: {err} — run `imlinkctl login`"),
        },
    }
}

/// The MQTT protocol of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Proto {
    #[serde(rename = "v5")]
    V5,
    #[serde(rename = "v3.1.1")]
    V311,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::V5 => "v5",
            Proto::V311 => "v3.1.1",
        }
    }
}

/// Where a connection goes: a configured node, or a server a broker redirected us to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Node(u32),
    Redirect(String),
}
