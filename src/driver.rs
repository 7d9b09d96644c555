//! The tokio driver: the only place where the session meets the world.
//!
//! It owns the rumqttc connection, the provisioning fetch, the timers, the UserSig secrets and
//! their cache, and feeds everything that happens to the [`Machine`] as [`Input`]s; then it
//! carries out the machine's [`Action`]s. It holds no policy of its own: every decision is the
//! machine's. Invariants:
//! * rumqttc's event loop is polled only while the machine wants a connection; a failed
//!   connection is dropped at once, so rumqttc can never reconnect on its own (its `poll()`
//!   reconnects immediately) and no stale DISCONNECT is ever replayed;
//! * the UserSig leaves this module only as the MQTT password and the 0600 cache file;
//! * every state change goes out once, from [`Driver::emit`], to the log, the local API
//!   watchers and (through [`Status`]) systemd.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::{BootTimer, wall_ms};
use crate::config::Config;
use crate::courier::{self, Courier, LinkId, MessageEvent, Seq};
use crate::identity::UserId;
use crate::message::{IdGen, WireMessage};
use crate::mqtt::MqttSettings;
use crate::provision::{Fetched, Provisioner};
use crate::session::{
    Action, ConnEnd, Counters, ErrorClass, Event, FetchFailure, Input, LastError, Machine, Millis,
    Phase, RequestError, RequestId, SigInfo, Snapshot,
};
use crate::store::{Received, StoreHandle, StoreRequest};
use crate::usersig::{AppSig, SigCache, UserSig};

/// Requests to the session, from the local API and the signal handlers.
pub enum Command {
    Login {
        user: Option<UserId>,
        /// A UserSig the app brought, already checked by the API (user, app, expiry).
        sig: Option<Box<AppSig>>,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// `send_message` committed a message to the store: the courier may send it.
    Enqueued {
        owner: String,
        seq: Seq,
        msg: WireMessage,
    },
    Logout {
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    /// A new, validated config (SIGHUP).
    Reload {
        config: Box<Config>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Shutdown,
    /// Test hook (only honoured when `IMLINKD_TEST_HOOKS=1`): the driver loop stops making
    /// progress, as a wedged daemon would, so the watchdog can be seen to notice.
    Wedge,
    /// Test hook (same gate): the driver panics, as a bug would, so the exit status can be
    /// seen to say so.
    Panic,
}

pub use crate::clock::Clock;

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
    pub protocol: Option<crate::session::Proto>,
    /// Online and the broker acknowledged the inbox subscription: messages to this user
    /// reach the daemon (a fresh session on a plain broker drops what comes before).
    pub inbox_subscribed: bool,
    /// Unix seconds when the current phase began.
    pub since: i64,
    pub last_error: Option<LastError>,
    pub sig: Option<SigView>,
    /// Unix milliseconds of the next attempt, when one is scheduled.
    pub next_retry_at_ms: Option<i64>,
    pub counters: Counters,
    /// The last kick or UserSig-expiry event.
    pub last_event: Option<Event>,
}

pub use crate::session::{short, summary};

/// The handle the rest of the daemon uses.
#[derive(Clone)]
pub struct SessionHandle {
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<Status>,
    pub events: broadcast::Sender<Event>,
    /// Message notifications (hints: the store is the truth).
    pub messages: broadcast::Sender<MessageEvent>,
    /// The message store (the API reads it and commits sends directly).
    pub store: StoreHandle,
    /// Message ids: one generator, so ids stay monotonic across API clients.
    pub ids: Arc<Mutex<IdGen>>,
    pub clock: Clock,
}

use crate::link::{ConnEvent, ConnState, Connection, Ev};

/// A sig the driver holds, with what is needed to cache it.
struct HeldSig {
    sig: UserSig,
    user: UserId,
    server_offset: i64,
    issued_at: Option<i64>,
    expires_at: Option<i64>,
    /// The issuer's time at `received`, when this boot received it (not for a sig cached in
    /// an earlier boot).
    anchor: Option<(i64, Millis)>,
}

/// A store answer on its way to the courier (answers are delivered in request order).
type StoreAnswer = Pin<Box<dyn Future<Output = courier::Input> + Send>>;

enum Wake {
    Store(Option<courier::Input>),
    Command(Option<Command>),
    Conn(ConnEvent),
    Fetch(Result<Result<Fetched, FetchFailure>, tokio::task::JoinError>),
    Timer,
}

pub struct Driver {
    machine: Machine,
    courier: Courier,
    clock: Clock,
    config: Config,
    mqtt: MqttSettings,
    provisioner: Option<Provisioner>,
    store: StoreHandle,
    /// Store answers, in request order (see [`Driver::run`]).
    answers_tx: mpsc::UnboundedSender<StoreAnswer>,
    answers_rx: Option<mpsc::UnboundedReceiver<StoreAnswer>>,
    store_done: mpsc::UnboundedReceiver<courier::Input>,
    store_done_tx: mpsc::UnboundedSender<courier::Input>,
    messages: broadcast::Sender<MessageEvent>,
    next_link: LinkId,
    cache: SigCache,
    sigs: HashMap<String, HeldSig>,
    conn: Option<Connection>,
    timer: BootTimer,
    boot_id: Option<String>,
    fetch: Option<JoinHandle<Result<Fetched, FetchFailure>>>,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    events: broadcast::Sender<Event>,
    replies: HashMap<RequestId, oneshot::Sender<Result<(), RequestError>>>,
    next_request: RequestId,
    /// systemd's watchdog interval, when it asked for one: the loop itself pings at half of
    /// it (so a wedged loop stops the pings), and otherwise sleeps until something is due.
    watchdog: Option<Duration>,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    test_hooks: bool,
    exit: bool,
}

fn seed() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return wall_ms() as u64 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// The broker and provisioning clients a config describes (their TLS set up).
fn endpoints(config: &Config) -> Result<(MqttSettings, Option<Provisioner>), String> {
    let mqtt = MqttSettings::from_config(config).map_err(|e| format!("broker: {e}"))?;
    let provisioner = match &config.provisioning {
        None => None,
        Some(p) => Some(
            Provisioner::new(p, config.sdk_app_id, &config.platform, &config.instance)
                .map_err(|e| format!("provisioning: {e}"))?,
        ),
    };
    Ok((mqtt, provisioner))
}

impl Driver {
    /// Build the driver for `config`. A valid cached UserSig (if any) is loaded here.
    pub fn new(config: Config, watcher_queue: usize) -> Result<(Driver, SessionHandle), String> {
        let clock = Clock::new();
        let now = clock.now();
        let (mqtt, provisioner) = endpoints(&config)?;
        let cache = SigCache::new(&config.state_dir);
        let mut machine = Machine::new(config.policy.clone(), config.user_id.clone(), now, seed());
        let mut sigs = HashMap::new();
        let boot_id = crate::clock::boot_id();
        match cache.load(&config.user_id, config.sdk_app_id) {
            Ok(Some(c)) => {
                let fingerprint = c.sig.fingerprint();
                // Within the boot that cached it, the anchor is exact; after a reboot only the
                // wall clock (corrected by the issuer's offset) can place the deadline.
                let same_boot = c.anchor.as_ref().filter(|a| {
                    Some(&a.boot_id) == boot_id.as_ref() && a.received_boot_ms <= now.mono
                });
                let (server_now, received_at, wall_anchored, anchor) = match same_boot {
                    Some(a) => (
                        a.server_now,
                        a.received_boot_ms,
                        false,
                        Some((a.server_now, a.received_boot_ms)),
                    ),
                    None => (
                        now.wall.saturating_add(c.server_offset),
                        now.mono,
                        true,
                        None,
                    ),
                };
                tracing::info!(
                    fingerprint = %fingerprint,
                    same_boot = same_boot.is_some(),
                    "found a cached UserSig"
                );
                machine.handle(
                    now,
                    Input::CachedSig(SigInfo {
                        fingerprint: fingerprint.clone(),
                        user_id: config.user_id.clone(),
                        issued_at: c.issued_at,
                        expires_at: c.expires_at,
                        server_now,
                        received_at,
                        wall_anchored,
                    }),
                );
                sigs.insert(
                    fingerprint,
                    HeldSig {
                        sig: c.sig,
                        user: config.user_id.clone(),
                        server_offset: c.server_offset,
                        issued_at: c.issued_at,
                        expires_at: c.expires_at,
                        anchor,
                    },
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("ignoring the UserSig cache: {e}; a new UserSig will be fetched");
                let _ = cache.forget();
            }
        }
        let (store, opened) = StoreHandle::open(config.store.path.clone(), config.store.max_bytes);
        match opened {
            Ok(()) => {
                // Messages are private: the state directory is 0700, the file 0600 as well
                // (SQLite gives its -wal and -shm files the same mode).
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(
                    &config.store.path,
                    std::fs::Permissions::from_mode(0o600),
                );
            }
            // The session works without it; every messaging call answers with this reason.
            Err(e) => tracing::error!("messaging is unavailable: {e}"),
        }
        let timer =
            BootTimer::new().map_err(|e| format!("creating a CLOCK_BOOTTIME timer: {e}"))?;
        let (commands_tx, commands) = mpsc::channel(64);
        let (events, _) = broadcast::channel(watcher_queue.max(1));
        let (messages, _) = broadcast::channel(watcher_queue.max(1));
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let (store_done_tx, store_done) = mpsc::unbounded_channel();
        let snapshot = machine.snapshot();
        let status0 = Self::status_of(&snapshot, &config, &mqtt, &clock);
        let (status, status_rx) = watch::channel(status0);
        let handle = SessionHandle {
            commands: commands_tx,
            status: status_rx,
            events: events.clone(),
            messages: messages.clone(),
            store: store.clone(),
            ids: Arc::new(Mutex::new(IdGen::new())),
            clock,
        };
        let test_hooks = cfg!(feature = "test-hooks")
            && std::env::var("IMLINKD_TEST_HOOKS").is_ok_and(|v| v == "1");
        Ok((
            Driver {
                machine,
                courier: Courier::new(now.mono, seed()),
                clock,
                config,
                mqtt,
                provisioner,
                store,
                answers_tx,
                answers_rx: Some(answers_rx),
                store_done,
                store_done_tx,
                messages,
                next_link: 1,
                cache,
                sigs,
                conn: None,
                timer,
                boot_id,
                fetch: None,
                commands,
                status,
                events,
                replies: HashMap::new(),
                next_request: 1,
                watchdog: None,
                test_hooks,
                exit: false,
            },
            handle,
        ))
    }

    fn status_of(s: &Snapshot, config: &Config, mqtt: &MqttSettings, clock: &Clock) -> Status {
        let now = clock.now();
        let broker = mqtt.url_of(s.via.as_ref().map(|(t, _)| t));
        Status {
            phase: s.phase,
            summary: summary(s, &broker, now.mono),
            login_status: s.login_status,
            login_user: s.login_user.clone(),
            user_id: s.user_id.clone(),
            sdk_app_id: config.sdk_app_id,
            broker,
            protocol: s.via.as_ref().map(|(_, p)| *p),
            inbox_subscribed: false,
            since: clock.wall_ms(s.since_ms) / 1000,
            last_error: s.last_error.clone(),
            sig: s.sig.as_ref().map(|g| SigView {
                fingerprint: g.fingerprint.clone(),
                expires_at: g.expires_at,
                valid_until: g.deadline_ms.map(|d| clock.wall_ms(d) / 1000),
                refresh_at: g.refresh_at_ms.map(|d| clock.wall_ms(d) / 1000),
                refreshing: g.refreshing,
            }),
            next_retry_at_ms: s.next_retry_ms.map(|t| clock.wall_ms(t)),
            counters: s.counters.clone(),
            last_event: s.last_event.clone(),
        }
    }

    fn publish_status(&mut self) {
        let mut s = Self::status_of(
            &self.machine.snapshot(),
            &self.config,
            &self.mqtt,
            &self.clock,
        );
        s.inbox_subscribed = s.phase == Phase::Online
            && self
                .conn
                .as_ref()
                .is_some_and(|c| c.state == ConnState::Online && c.subscribed);
        self.status.send_if_modified(|cur| {
            if *cur != s {
                *cur = s;
                true
            } else {
                false
            }
        });
    }

    fn feed(&mut self, input: Input) {
        let now = self.clock.now();
        self.machine.handle(now, input);
    }

    /// Ping systemd's watchdog from the loop, at half of `interval` (call before `run`).
    pub fn set_watchdog(&mut self, interval: Option<Duration>) {
        self.watchdog = interval;
    }

    /// Run until the machine says `Exit`.
    pub async fn run(mut self) {
        // Store answers reach the courier in the order the requests went out (the store
        // thread answers in that order; this task keeps it across the await points).
        if let Some(mut answers) = self.answers_rx.take() {
            let done = self.store_done_tx.clone();
            tokio::spawn(async move {
                while let Some(a) = answers.recv().await {
                    if done.send(a.await).is_err() {
                        break;
                    }
                }
            });
        }
        self.feed(Input::Start);
        let ping_every = self
            .watchdog
            .map(|w| (w / 2).max(Duration::from_millis(50)));
        let mut next_ping = ping_every.map(|_| self.clock.now().mono);
        loop {
            self.run_actions().await;
            self.sync_account();
            self.run_courier();
            self.publish_status();
            if self.exit {
                break;
            }
            // The watchdog ping comes from this loop, after a full iteration: a loop that
            // stops making progress stops the pings, and systemd restarts the service.
            let now = self.clock.now().mono;
            if let (Some(every), Some(at)) = (ping_every, next_ping)
                && at <= now
            {
                crate::systemd::ping_watchdog();
                next_ping = Some(now + every.as_millis() as Millis);
            }
            // Sleep until something is due (a timer of either machine, the next ping), or
            // something happens: nothing wakes this loop for nothing.
            let due = [
                self.machine.poll_timeout(),
                self.courier.poll_timeout(),
                next_ping,
            ]
            .into_iter()
            .flatten()
            .min();
            let backstop = match self.timer.arm(due) {
                Ok(()) => None,
                Err(e) => {
                    // Cannot happen with a valid timerfd; fall back to polling every second.
                    tracing::error!("arming the session timer: {e}");
                    Some(Duration::from_secs(1))
                }
            };
            let wake = tokio::select! {
                done = self.store_done.recv() => Wake::Store(done),
                cmd = self.commands.recv() => Wake::Command(cmd),
                ev = next_conn_event(&mut self.conn), if self.conn.is_some() => Wake::Conn(ev),
                res = next_fetch(&mut self.fetch), if self.fetch.is_some() => Wake::Fetch(res),
                _ = self.timer.fired() => Wake::Timer,
                _ = backstop_sleep(backstop) => Wake::Timer,
            };
            match wake {
                Wake::Store(Some(input)) => self.feed_courier(input),
                Wake::Store(None) => {}
                Wake::Command(None) => self.feed(Input::Shutdown),
                Wake::Command(Some(cmd)) => self.on_command(cmd).await,
                Wake::Conn(ev) => self.on_conn_event(ev),
                Wake::Fetch(res) => self.on_fetch_done(res),
                Wake::Timer => {
                    let now = self.clock.now();
                    self.machine.handle_timeout(now);
                    self.courier.handle_timeout(now.mono);
                }
            }
        }
        tracing::info!("session driver stopped");
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Login { user, sig, reply } => {
                let id = self.next_request;
                self.next_request += 1;
                self.replies.insert(id, reply);
                let sig = sig.map(|app| self.hold_app_sig(*app, user.as_ref()));
                self.feed(Input::Login { id, user, sig });
            }
            Command::Enqueued { owner, seq, msg } => {
                self.feed_courier(courier::Input::Enqueued { owner, seq, msg });
            }
            Command::Logout { reply } => {
                let id = self.next_request;
                self.next_request += 1;
                self.replies.insert(id, reply);
                self.feed(Input::Logout { id });
            }
            Command::Reload { config, reply } => {
                let result = self.reload(*config);
                let _ = reply.send(result);
            }
            Command::Shutdown => self.feed(Input::Shutdown),
            #[cfg(feature = "test-hooks")]
            Command::Wedge if self.test_hooks => {
                tracing::warn!("test hook: wedging the session driver");
                std::future::pending::<()>().await;
            }
            #[cfg(feature = "test-hooks")]
            Command::Panic if self.test_hooks => {
                tracing::warn!("test hook: the session driver panics");
                panic!("test hook: the session driver panics");
            }
            Command::Wedge | Command::Panic => {}
        }
    }

    fn reload(&mut self, config: Config) -> Result<(), String> {
        let (mqtt, provisioner) = endpoints(&config)?;
        let reconnect = self.mqtt.differs(&mqtt) || self.config.broker != config.broker;
        self.mqtt = mqtt;
        self.provisioner = provisioner;
        self.cache = SigCache::new(&config.state_dir);
        let policy = config.policy.clone();
        let user = config.user_id.clone();
        self.config = config;
        self.feed(Input::Reconfigured {
            policy,
            user,
            reconnect,
        });
        Ok(())
    }

    fn on_conn_event(&mut self, ev: ConnEvent) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let ev = match ev {
            ConnEvent::Mqtt(ev) => ev,
            ConnEvent::Ended(end) => {
                let state = conn.state;
                let link = conn.link;
                // The task already stopped polling; drop the connection (and the task) now.
                self.conn = None;
                self.feed_courier(courier::Input::LinkDown(link));
                if state == ConnState::Closing {
                    self.feed(Input::Disconnected);
                } else {
                    self.feed(Input::ConnectionEnded(end));
                }
                return;
            }
        };
        match ev {
            Ev::ConnAck { session_present } if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Online;
                self.feed(Input::Connected { session_present });
            }
            Ev::ConnAck { .. } => {}
            Ev::Publish {
                topic,
                pkid,
                payload,
            } => {
                let link = conn.link;
                let inbox = self.mqtt.inbox_topic(&conn.user);
                let msg = if topic.as_ref() != inbox.as_bytes() {
                    Err(format!(
                        "a PUBLISH on {:?}, not the inbox",
                        String::from_utf8_lossy(&topic)
                    ))
                } else {
                    WireMessage::decode(&payload, &conn.user).map_err(|e| e.to_string())
                };
                tracing::debug!(
                    // Debug-quoted: the topic comes from outside.
                    topic = ?String::from_utf8_lossy(&topic),
                    bytes = payload.len(),
                    qos1 = pkid.is_some(),
                    "PUBLISH received"
                );
                let owner = conn.user.to_string();
                self.feed(Input::MessageReceived);
                self.feed_courier(courier::Input::Received {
                    link,
                    pkid,
                    owner,
                    msg,
                });
            }
            Ev::OutPublish(pkid) => {
                if let Some(seq) = conn.unnumbered.pop_front() {
                    conn.pkids.insert(pkid, seq);
                }
            }
            Ev::PubAck { pkid, code } => {
                if let Some(seq) = conn.pkids.remove(&pkid) {
                    let link = conn.link;
                    self.feed_courier(courier::Input::PubAck { link, seq, code });
                }
            }
            Ev::SubAck { granted } => {
                conn.subscribed = granted;
                if !granted {
                    tracing::warn!(
                        "the broker refused the inbox subscription: messages to this user will \
                         not arrive (check the broker's ACL: docs/brokers.md)"
                    );
                }
            }
            Ev::OutDisconnect => {
                // DISCONNECT is on the wire. Keep reading until the broker closes its side (it
                // must, after a DISCONNECT): dropping the socket now, with anything unread in
                // flight, would send a TCP reset that can destroy the DISCONNECT on the broker's
                // side and turn a clean logout into a lost connection (and a published will).
                // The machine's close timeout bounds the wait.
                tracing::debug!("DISCONNECT sent; waiting for the broker to close");
            }
        }
    }

    fn on_fetch_done(
        &mut self,
        res: Result<Result<Fetched, FetchFailure>, tokio::task::JoinError>,
    ) {
        self.fetch = None;
        let now = self.clock.now();
        match res {
            Ok(Ok(f)) => {
                let fingerprint = f.sig.fingerprint();
                let server_now = f.server_date.unwrap_or(now.wall);
                tracing::info!(
                    fingerprint = %fingerprint,
                    expires_at = ?f.expires_at,
                    "UserSig fetched"
                );
                self.sigs.insert(
                    fingerprint.clone(),
                    HeldSig {
                        sig: f.sig,
                        user: f.user_id.clone(),
                        server_offset: server_now.saturating_sub(now.wall),
                        issued_at: f.issued_at,
                        expires_at: f.expires_at,
                        anchor: Some((server_now, now.mono)),
                    },
                );
                self.feed(Input::SigFetched(SigInfo {
                    fingerprint,
                    user_id: f.user_id,
                    issued_at: f.issued_at,
                    expires_at: f.expires_at,
                    server_now,
                    received_at: now.mono,
                    wall_anchored: false,
                }));
            }
            Ok(Err(failure)) => {
                if failure.code == crate::session::codes::INVALID_PARAMETERS
                    || failure.code == crate::session::codes::SVR_SIG_CHECK_FAILED
                {
                    tracing::error!(
                        code = failure.code,
                        class = failure.class.as_str(),
                        "UserSig fetch failed: {}",
                        failure.message
                    );
                } else {
                    tracing::warn!(
                        code = failure.code,
                        class = failure.class.as_str(),
                        "UserSig fetch failed: {}",
                        failure.message
                    );
                }
                self.feed(Input::SigFetchFailed(failure));
            }
            Err(join) => {
                if join.is_cancelled() {
                    return;
                }
                self.feed(Input::SigFetchFailed(FetchFailure::new(
                    ErrorClass::Busy,
                    crate::session::codes::NET_DISCONNECT,
                    "the provisioning request failed unexpectedly",
                )));
            }
        }
    }

    async fn run_actions(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::FetchSig { user } => {
                    if let Some(old) = self.fetch.take() {
                        old.abort();
                    }
                    let Some(p) = self.provisioner.clone() else {
                        // Cannot happen: without provisioning the machine never fetches.
                        self.feed(Input::SigFetchFailed(FetchFailure::new(
                            ErrorClass::Fatal,
                            crate::session::codes::INVALID_PARAMETERS,
                            "no [provisioning] URL is configured",
                        )));
                        continue;
                    };
                    tracing::info!(url = %p.shown_url_for(&user), "fetching a UserSig");
                    self.fetch = Some(tokio::spawn(async move { p.fetch(&user).await }));
                }
                Action::CancelFetch => {
                    if let Some(f) = self.fetch.take() {
                        f.abort();
                    }
                }
                Action::Connect {
                    user,
                    fingerprint,
                    target,
                    proto,
                } => self.connect(user, &fingerprint, target, proto),
                Action::Subscribe { user } => {
                    if let Some(c) = self.conn.as_ref() {
                        let filter = self.mqtt.inbox_filter(&user);
                        if let Err(e) = c.subscribe(filter) {
                            tracing::warn!("could not queue the inbox subscription: {e}");
                        }
                        // The session is up: the courier may publish on it.
                        let link = c.link;
                        self.feed_courier(courier::Input::LinkUp(link));
                    }
                }
                Action::Disconnect => {
                    if let Some(link) = self.conn.as_ref().map(|c| c.link) {
                        self.feed_courier(courier::Input::LinkDown(link));
                    }
                    self.disconnect();
                }
                Action::Abandon => {
                    if let Some(c) = self.conn.take() {
                        self.feed_courier(courier::Input::LinkDown(c.link));
                        tracing::debug!("connection dropped without waiting");
                    }
                }
                Action::PersistSig { fingerprint } => self.persist(&fingerprint).await,
                Action::ForgetSig => {
                    if let Err(e) = self.cache.forget() {
                        tracing::warn!(
                            "could not delete the UserSig cache {}: {e}",
                            self.cache.path().display()
                        );
                    }
                }
                Action::ReleaseSig { fingerprint } => {
                    self.sigs.remove(&fingerprint);
                }
                Action::Emit(event) => self.emit(event),
                Action::Reply { id, result } => {
                    if let Some(tx) = self.replies.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                Action::Exit => self.exit = true,
            }
        }
    }

    /// Keep a sig a local app brought (checked by the API) and describe it to the machine.
    fn hold_app_sig(&mut self, app: AppSig, user: Option<&UserId>) -> SigInfo {
        let now = self.clock.now();
        let user = user.cloned().unwrap_or_else(|| self.machine.user().clone());
        let fingerprint = app.sig.fingerprint();
        tracing::info!(fingerprint = %fingerprint, user_id = %user, "a local app brought a UserSig");
        self.sigs.insert(
            fingerprint.clone(),
            HeldSig {
                sig: app.sig,
                user: user.clone(),
                // No issuer's clock to compare with: our wall clock is the reference.
                server_offset: 0,
                issued_at: app.issued_at,
                expires_at: app.expires_at,
                anchor: Some((now.wall, now.mono)),
            },
        );
        SigInfo {
            fingerprint,
            user_id: user,
            issued_at: app.issued_at,
            expires_at: app.expires_at,
            server_now: now.wall,
            received_at: now.mono,
            wall_anchored: true,
        }
    }

    /// The courier sends the outbox of whom the session logs in as.
    fn sync_account(&mut self) {
        let user = self.machine.user().as_str();
        if self.courier.owner() != Some(user) {
            let owner = Some(user.to_string());
            self.feed_courier(courier::Input::Account(owner));
        }
    }

    fn feed_courier(&mut self, input: courier::Input) {
        let now = self.clock.now().mono;
        self.courier.handle(now, input);
    }

    /// Carry out the courier's actions (none of them waits).
    fn run_courier(&mut self) {
        while let Some(action) = self.courier.poll_action() {
            match action {
                courier::Action::Publish { link, seq, msg } => self.publish(link, seq, &msg),
                courier::Action::Ack { link, pkid } => {
                    if let Some(c) = self.conn.as_ref().filter(|c| c.link == link)
                        && let Err(e) = c.ack(pkid)
                    {
                        // The connection is going: the broker sends it again on the next.
                        tracing::debug!("could not queue a PUBACK: {e}");
                    }
                }
                courier::Action::Notify(e) => {
                    match &e {
                        MessageEvent::MessageReceived { id, from, .. } => {
                            tracing::debug!(id = %id, from = %from, "message received")
                        }
                        MessageEvent::MessageSent { id, to } => {
                            tracing::debug!(id = %id, to = %to, "message sent")
                        }
                        MessageEvent::MessageFailed {
                            id,
                            to,
                            code,
                            reason,
                        } => tracing::warn!(
                            id = %id,
                            to = %to,
                            code,
                            reason = format!("0x{reason:02X}"),
                            "message refused by the broker; it will not be sent again"
                        ),
                    }
                    let _ = self.messages.send(e);
                }
                courier::Action::LoadOutbox {
                    token,
                    owner,
                    after,
                    limit,
                    skip,
                } => {
                    let (tx, rx) = oneshot::channel();
                    let sent = self.store.send(StoreRequest::Outbox {
                        owner,
                        after,
                        limit,
                        skip,
                        reply: tx,
                    });
                    self.answer(
                        sent,
                        async move {
                            match rx.await {
                                Ok(Ok((page, complete))) => courier::Input::OutboxPage {
                                    token,
                                    page,
                                    complete,
                                },
                                Ok(Err(e)) => {
                                    tracing::warn!("reading the outbox: {e}");
                                    courier::Input::OutboxFailed { token }
                                }
                                Err(_) => courier::Input::OutboxFailed { token },
                            }
                        },
                        courier::Input::OutboxFailed { token },
                    );
                }
                courier::Action::Settle {
                    owner,
                    seq,
                    id,
                    outcome,
                } => {
                    let failed = match outcome {
                        courier::Outcome::Sent => None,
                        courier::Outcome::Failed { code, .. } => Some(code),
                    };
                    let (tx, rx) = oneshot::channel();
                    let sent = self.store.send(StoreRequest::Settle {
                        owner,
                        id,
                        failed,
                        reply: tx,
                    });
                    self.answer(
                        sent,
                        async move {
                            let committed = matches!(rx.await, Ok(Ok(_)));
                            courier::Input::Settled { seq, committed }
                        },
                        courier::Input::Settled {
                            seq,
                            committed: false,
                        },
                    );
                }
                courier::Action::Store {
                    link,
                    pkid,
                    owner,
                    msg,
                } => {
                    let (tx, rx) = oneshot::channel();
                    let sent = self.store.send(StoreRequest::Receive {
                        owner,
                        msg: msg.clone(),
                        reply: tx,
                    });
                    let failed = courier::Input::Stored {
                        link,
                        pkid,
                        msg: msg.clone(),
                        result: Err(()),
                    };
                    self.answer(
                        sent,
                        async move {
                            let result = match rx.await {
                                Ok(Ok(Received::New(seq))) => Ok(Some(seq)),
                                Ok(Ok(Received::Duplicate)) => Ok(None),
                                Ok(Err(e)) => {
                                    tracing::warn!("storing a received message: {e}");
                                    Err(())
                                }
                                Err(_) => Err(()),
                            };
                            courier::Input::Stored {
                                link,
                                pkid,
                                msg,
                                result,
                            }
                        },
                        failed,
                    );
                }
            }
        }
    }

    /// Queue the answer to a store request in request order; a request the store would not
    /// take is answered at once with `refused`.
    fn answer(
        &mut self,
        sent: Result<(), crate::store::StoreError>,
        answer: impl Future<Output = courier::Input> + Send + 'static,
        refused: courier::Input,
    ) {
        let fut: StoreAnswer = match sent {
            Ok(()) => Box::pin(answer),
            Err(e) => {
                tracing::warn!("{e}");
                Box::pin(async move { refused })
            }
        };
        if self.answers_tx.send(fut).is_err() {
            tracing::error!("the store answer pipeline is gone");
        }
    }

    /// Publish one message of the outbox on the current connection.
    fn publish(&mut self, link: LinkId, seq: Seq, msg: &WireMessage) {
        let topic = self.mqtt.inbox_topic_of(&msg.to);
        let refused = courier::Input::PublishRefused { link, seq };
        let Some(c) = self.conn.as_mut().filter(|c| c.link == link) else {
            return self.feed_courier(refused);
        };
        let payload = match msg.encode() {
            Ok(p) => p,
            Err(e) => {
                // Checked when it was sent; a stored message cannot grow. Fail it for good.
                tracing::error!(id = %msg.id, "cannot send a stored message: {e}");
                return self.feed_courier(courier::Input::PubAck {
                    link,
                    seq,
                    code: 0x99,
                });
            }
        };
        match c.publish(topic, payload) {
            Ok(()) => c.unnumbered.push_back(seq),
            Err(e) => {
                tracing::debug!("the MQTT client would not take a publish now: {e}");
                self.feed_courier(refused);
            }
        }
    }

    fn connect(
        &mut self,
        user: UserId,
        fingerprint: &str,
        target: crate::session::Target,
        proto: crate::session::Proto,
    ) {
        if let Some(old) = self.conn.take() {
            // Cannot happen (the machine connects only with no connection); fail safe.
            self.feed_courier(courier::Input::LinkDown(old.link));
        }
        let Some(held) = self.sigs.get(fingerprint) else {
            // Cannot happen (the machine only names sigs it has not released); fail safe.
            self.feed(Input::ConnectionEnded(crate::session::ConnEnd::Network {
                kind: crate::session::NetKind::Other,
                detail: "internal: the UserSig to connect with is gone".into(),
            }));
            return;
        };
        tracing::info!(
            broker = %self.mqtt.url_of(Some(&target)),
            protocol = proto.as_str(),
            client_id = %self.mqtt.client_id(&user),
            user_id = %user,
            fingerprint,
            "connecting"
        );
        let link = self.next_link;
        self.next_link += 1;
        match Connection::open(
            &self.mqtt,
            &user,
            &held.sig,
            &self.config.state_dir,
            link,
            target,
            proto,
        ) {
            Ok(c) => self.conn = Some(c),
            Err(end) => self.feed(Input::ConnectionEnded(end)),
        }
    }

    /// Send DISCONNECT and keep reading until the broker closes (the machine bounds the wait
    /// and says `Abandon` when it is over).
    fn disconnect(&mut self) {
        match self.conn.as_mut() {
            None => self.feed(Input::Disconnected),
            Some(c) if c.state == ConnState::Closing => {}
            Some(c) if c.state == ConnState::Connecting => {
                self.conn = None;
                self.feed(Input::Disconnected);
            }
            Some(c) => {
                c.state = ConnState::Closing;
                if c.disconnect().is_err() {
                    self.conn = None;
                    self.feed(Input::Disconnected);
                }
            }
        }
    }

    async fn persist(&mut self, fingerprint: &str) {
        let Some(h) = self.sigs.get(fingerprint) else {
            return;
        };
        if let Err(e) = std::fs::create_dir_all(&self.config.state_dir) {
            tracing::warn!(
                "could not create the state directory {}: {e}; the UserSig is not cached",
                self.config.state_dir.display()
            );
            return;
        }
        let cache = self.cache.clone();
        let (user, app, sig) = (h.user.clone(), self.config.sdk_app_id, h.sig.clone());
        let (offset, issued, expires) = (h.server_offset, h.issued_at, h.expires_at);
        let anchor = match (&self.boot_id, h.anchor) {
            (Some(id), Some((server_now, received))) => Some(crate::usersig::BootAnchor {
                boot_id: id.clone(),
                received_boot_ms: received,
                server_now,
            }),
            _ => None,
        };
        let r = tokio::task::spawn_blocking(move || {
            cache.store(&crate::usersig::CacheEntry {
                user: &user,
                app,
                sig: &sig,
                server_offset: offset,
                issued_at: issued,
                expires_at: expires,
                anchor,
            })
        })
        .await;
        match r {
            Ok(Ok(())) => tracing::debug!(fingerprint, "UserSig cached"),
            Ok(Err(e)) => tracing::warn!(
                "could not write the UserSig cache {}: {e}",
                self.cache.path().display()
            ),
            Err(e) => tracing::warn!("could not write the UserSig cache: {e}"),
        }
    }

    /// The one emitter: a log line, the API watchers, and (via the status) systemd.
    fn emit(&mut self, event: Event) {
        match &event {
            Event::StateChanged {
                phase,
                login_status,
                login_user,
                last_error,
            } => {
                let snapshot = self.machine.snapshot();
                // The summary describes the current state; an older queued event gets its phase.
                let text = if snapshot.phase == *phase {
                    summary(
                        &snapshot,
                        &self.mqtt.url_of(snapshot.via.as_ref().map(|(t, _)| t)),
                        self.clock.now().mono,
                    )
                } else {
                    phase.as_str().to_string()
                };
                match last_error {
                    Some(e) => tracing::info!(
                        phase = phase.as_str(),
                        login_status,
                        login_user = %login_user,
                        user_id = %snapshot.user_id,
                        code = e.code,
                        class = e.class.as_str(),
                        "state: {text}"
                    ),
                    None => tracing::info!(
                        phase = phase.as_str(),
                        login_status,
                        login_user = %login_user,
                        user_id = %snapshot.user_id,
                        "state: {text}"
                    ),
                }
            }
            Event::ConnectFailed {
                code,
                class,
                message,
            } => {
                tracing::warn!(code, class = class.as_str(), "connect failed: {message}");
            }
            Event::KickedOffline {
                reason,
                code,
                message,
            } => {
                tracing::warn!(code, class = "kicked", reason = ?reason, "kicked offline: {message}");
            }
            Event::UserSigExpired { code } => {
                tracing::warn!(code, class = "sig_expired", "UserSig expired");
            }
            Event::UserSigRefreshed {
                fingerprint,
                expires_at,
            } => {
                tracing::info!(fingerprint = %fingerprint, expires_at = ?expires_at, "UserSig refreshed");
            }
            Event::Connecting { .. } => {}
            Event::ConnectSuccess {
                user_id,
                session_present,
            } => {
                tracing::info!(user_id = %user_id, session_present, "connected");
            }
        }
        // Status first: a watcher that reacts to the event by asking for the status must
        // see the state the event announced.
        self.publish_status();
        let _ = self.events.send(event);
    }
}

async fn backstop_sleep(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// The next event of the current connection (cancel-safe: a channel receive).
async fn next_conn_event(conn: &mut Option<Connection>) -> ConnEvent {
    match conn {
        Some(c) => c.events.recv().await.unwrap_or_else(|| {
            ConnEvent::Ended(ConnEnd::Network {
                kind: crate::session::NetKind::Other,
                detail: "the connection task ended".into(),
            })
        }),
        None => std::future::pending().await,
    }
}

async fn next_fetch(
    fetch: &mut Option<JoinHandle<Result<Fetched, FetchFailure>>>,
) -> Result<Result<Fetched, FetchFailure>, tokio::task::JoinError> {
    match fetch {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
