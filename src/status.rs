//! What the rest of the daemon sees of the session: the [`Status`] the local API serves and
//! systemd's `STATUS=` summarises, the [`Command`]s the API and the signal handlers send, and
//! the [`SessionHandle`] that carries both. The projection from the engine's snapshot to the
//! status ([`project`]) is pure, so the simulator checks it after every step.
//!
//! This module is why the API, systemd and `imlinkctl` never import the driver.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::Config;
use crate::courier::MessageEvent;
use crate::engine::{Draft, EngineSnapshot, MessageCounters, Queued, Refusal};
use crate::identity::UserId;
use crate::message::IdGen;
use crate::session::{Counters, Event, LastError, Millis, Phase, Proto, RequestError};
use crate::store::StoreHandle;
use crate::usersig::AppSig;

pub use crate::clock::Clock;
pub use crate::session::{short, summary};

/// Requests to the session, from the local API and the signal handlers.
pub enum Command {
    Login {
        user: Option<UserId>,
        /// A UserSig the app brought, already decoded by the API (format, app, expiry);
        /// whether it is for the right user is the engine's decision.
        sig: Option<Box<AppSig>>,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    Logout {
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// `send_message`: the engine decides whose message it is and whether it may be sent,
    /// the store commits it, then it is answered.
    Send {
        draft: Result<Draft, Refusal>,
        reply: oneshot::Sender<Result<Queued, Refusal>>,
    },
    /// An app consumed messages (`ack_inbox`, `mark_read`): received messages that wait for
    /// room in the store may go in now.
    StoreRoom,
    /// A new, validated config (SIGHUP).
    Reload {
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Test hook (only honoured when `IMLINKD_TEST_HOOKS=1`): the driver loop stops making
    /// progress, as a wedged daemon would, so the watchdog can be seen to notice.
    Wedge,
    /// Test hook (same gate): the driver panics, as a bug would, so the exit status can be
    /// seen to say so.
    Panic,
}

/// What the API shows of the current UserSig (never the sig).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigView {
    pub fingerprint: String,
    /// Unix seconds on the issuer's clock.
    pub expires_at: Option<i64>,
    /// Local Unix seconds when the daemon considers it expired (from the monotonic deadline).
    pub valid_until: Option<i64>,
    /// Local Unix seconds of the next proactive refresh.
    pub refresh_at: Option<i64>,
    pub refreshing: bool,
}

/// The message side of the status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesView {
    #[serde(flatten)]
    pub counters: MessageCounters,
    /// Outgoing messages published and not yet acknowledged by the broker.
    pub in_flight: usize,
    /// The store is full: received messages wait at the broker, unacknowledged, until an
    /// app consumes some (`ack_inbox`, `mark_read`) or `store.max_bytes` grows.
    pub inbound_held: bool,
}

/// The status the local API serves and systemd's STATUS= summarises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    /// One human line, e.g. `online as kiosk-0042 (sig valid 41h)`.
    pub summary: String,
    pub login_status: u8,
    pub login_user: String,
    pub user_id: String,
    pub sdk_app_id: u64,
    /// The broker node in use (or the first configured one), `mqtts://host:port`.
    pub broker: String,
    /// The MQTT protocol of the current (or last) connection.
    pub protocol: Option<Proto>,
    /// Connected and the broker granted the inbox subscription: messages to this user
    /// reach the daemon. While it is refused the phase is `subscribing`.
    pub inbox_subscribed: bool,
    /// Unix milliseconds of the next SUBSCRIBE, after the broker refused one.
    #[serde(default)]
    pub next_subscribe_at_ms: Option<i64>,
    /// Unix seconds when the current phase began.
    pub since: i64,
    pub last_error: Option<LastError>,
    pub sig: Option<SigView>,
    /// Consecutive failed UserSig fetches (refreshes and login fetches) since the last one
    /// that brought a usable sig: what a "renewal keeps failing" alert watches.
    #[serde(default)]
    pub renewal_failures: u32,
    /// Unix milliseconds of the next attempt, when one is scheduled.
    pub next_retry_at_ms: Option<i64>,
    pub counters: Counters,
    #[serde(default)]
    pub messages: MessagesView,
    /// The last kick or UserSig-expiry event.
    pub last_event: Option<Event>,
}

/// "Now" for the projection: the boot-time instant and the wall clock (Unix ms) read
/// together, so boot-time instants can be shown as wall-clock times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub mono: Millis,
    pub wall_ms: i64,
}

impl Stamp {
    pub fn read(clock: &Clock) -> Stamp {
        Stamp {
            mono: clock.now().mono,
            wall_ms: crate::clock::wall_ms(),
        }
    }

    /// Unix milliseconds of a boot-time instant.
    pub fn wall_of(&self, mono: Millis) -> i64 {
        self.wall_ms - (self.mono as i64 - mono as i64)
    }
}

/// The status of an engine snapshot. `broker` is the URL of the node in use (the driver's
/// settings know the URLs).
pub fn project(s: &EngineSnapshot, sdk_app_id: u64, broker: String, at: Stamp) -> Status {
    let x = &s.session;
    let mut line = summary(x, &broker, at.mono);
    if s.inbound_held {
        line.push_str(
            "; incoming messages wait at the broker: the message store is full (consume the \
             inbox: ack_inbox or mark_read; or raise store.max_bytes)",
        );
    }
    Status {
        phase: x.phase,
        summary: line,
        login_status: x.login_status,
        login_user: x.login_user.clone(),
        user_id: x.user_id.clone(),
        sdk_app_id,
        broker,
        protocol: x.via.as_ref().map(|(_, p)| *p),
        inbox_subscribed: x.inbox_subscribed,
        next_subscribe_at_ms: x.next_subscribe_ms.map(|t| at.wall_of(t)),
        since: at.wall_of(x.since_ms).div_euclid(1000),
        last_error: x.last_error.clone(),
        sig: x.sig.as_ref().map(|g| SigView {
            fingerprint: g.fingerprint.clone(),
            expires_at: g.expires_at,
            valid_until: g.deadline_ms.map(|d| at.wall_of(d).div_euclid(1000)),
            refresh_at: g.refresh_at_ms.map(|d| at.wall_of(d).div_euclid(1000)),
            refreshing: g.refreshing,
        }),
        renewal_failures: x.renewal_failures,
        next_retry_at_ms: x.next_retry_ms.map(|t| at.wall_of(t)),
        counters: x.counters.clone(),
        messages: MessagesView {
            counters: s.messages.clone(),
            in_flight: s.in_flight,
            inbound_held: s.inbound_held,
        },
        last_event: x.last_event.clone(),
    }
}

/// The handle the rest of the daemon uses.
#[derive(Clone)]
pub struct SessionHandle {
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<Status>,
    pub events: broadcast::Sender<Event>,
    /// Message notifications (hints: the store is the truth).
    pub messages: broadcast::Sender<MessageEvent>,
    /// The message store (the API reads it directly; writes that the session decides go
    /// through the engine).
    pub store: StoreHandle,
    /// Message ids: one generator, so ids stay monotonic across API clients.
    pub ids: Arc<Mutex<IdGen>>,
    pub clock: Clock,
}
