//! The tokio driver: the only place where the engine meets the world. It decides nothing.
//!
//! It owns what does I/O — the MQTT connection (`crate::link`), the provisioning fetch, the
//! boot-time timer, the UserSig secrets and their cache, the store thread's answers — and
//! carries out the [`Engine`]'s [`Action`]s, feeding back what happened as [`Input`]s stamped
//! with the time. Everything it does, item by item (ARCHITECTURE.md lists the same):
//! * open, feed and drop connections, and report every event of one as it happened;
//! * run the provisioning fetch and report its answer;
//! * keep the UserSig secrets the engine names (by fingerprint), write and delete the cache;
//! * send store requests and deliver their answers **in request order** (one forwarding task);
//! * sleep until the engine's next timer (a `CLOCK_BOOTTIME` timerfd) and ping systemd's
//!   watchdog from its own loop;
//! * turn the API's commands into inputs and route the engine's replies back;
//! * emit: the log line, the API watchers and (through [`Status`]) systemd.
//!
//! Invariants: rumqttc's event loop is polled only while the engine has its link open (the
//! connection's task ends at the first error, so rumqttc can never reconnect on its own); the
//! UserSig leaves this module only as the MQTT password and the 0600 cache file.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::{BootTimer, Clock, wall_ms};
use crate::config::Config;
use crate::courier::{self, Courier, LinkId, MessageEvent};
use crate::engine::{
    Action, BroughtSig, Device, Engine, Input, LinkEvent, Out, Queued, Refusal, StoreAnswer,
    StoreFailure, StoreOp, Topics, Will,
};
use crate::link::Connection;
use crate::message::IdGen;
use crate::mqtt::MqttSettings;
use crate::provision::{Fetched, Provisioner};
use crate::session::{
    ConnEnd, ErrorClass, Event, FetchFailure, Machine, Millis, NetKind, RequestError, RequestId,
    SigInfo, quote_external,
};
use crate::status::{Command, SessionHandle, Stamp, Status, project, summary};
use crate::store::{Received, StoreError, StoreHandle, StoreRequest};
use crate::usersig::{AppSig, SigCache, UserSig};

/// A sig the driver holds, with what is needed to cache it.
struct HeldSig {
    sig: UserSig,
    server_offset: i64,
    issued_at: Option<i64>,
    expires_at: Option<i64>,
    /// The issuer's time at `received`, when this boot received it (not for a sig cached in
    /// an earlier boot).
    anchor: Option<(i64, Millis)>,
}

/// A store answer on its way to the engine (answers are delivered in request order).
type Answer = Pin<Box<dyn Future<Output = StoreAnswer> + Send>>;

enum Wake {
    Store(Option<StoreAnswer>),
    Command(Option<Command>),
    Link(LinkId, LinkEvent),
    Fetch(Result<Result<Fetched, FetchFailure>, tokio::task::JoinError>),
    Timer,
    Shutdown,
}

pub struct Driver {
    engine: Engine,
    clock: Clock,
    config: Config,
    mqtt: MqttSettings,
    provisioner: Option<Provisioner>,
    store: StoreHandle,
    /// Store answers, in request order (see [`Driver::run`]).
    answers_tx: mpsc::UnboundedSender<Answer>,
    answers_rx: Option<mpsc::UnboundedReceiver<Answer>>,
    store_done: mpsc::UnboundedReceiver<StoreAnswer>,
    store_done_tx: mpsc::UnboundedSender<StoreAnswer>,
    messages: broadcast::Sender<MessageEvent>,
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
    sends: HashMap<RequestId, oneshot::Sender<Result<Queued, Refusal>>>,
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

/// This device as its status on the broker describes it.
fn device_of(config: &Config, mqtt: &MqttSettings) -> Device {
    Device {
        platform: config.platform.clone(),
        instance: config.instance.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        nodes: (0..config.broker.nodes.len() as u32)
            .map(|i| mqtt.url_of(Some(&crate::session::Target::Node(i))))
            .collect(),
        publish_status: config.broker.publish_status,
    }
}

fn store_failure(e: StoreError) -> StoreFailure {
    StoreFailure {
        full: matches!(e, StoreError::Full { .. }),
        message: e.to_string(),
    }
}

impl Driver {
    /// Build the driver for `config`. A valid cached UserSig (if any) is loaded here.
    pub fn new(config: Config, watcher_queue: usize) -> Result<(Driver, SessionHandle), String> {
        let clock = Clock::new();
        let now = clock.now();
        let (mqtt, provisioner) = endpoints(&config)?;
        let cache = SigCache::new(&config.state_dir);
        let machine = Machine::new(config.policy.clone(), config.user_id.clone(), now, seed());
        let topics = Topics {
            sdk_app_id: config.sdk_app_id,
        };
        let device = device_of(&config, &mqtt);
        let mut engine = Engine::new(machine, Courier::new(now.mono, seed()), topics, device, now);
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
                engine.handle(
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
        // Messages are private: the state directory is 0700, and `store::open` makes the
        // file 0600 before SQLite opens it (its -wal and -shm files take that mode).
        if let Err(e) = opened {
            // The session works without it; every messaging call answers with this reason.
            tracing::error!("messaging is unavailable: {e}");
        }
        let timer =
            BootTimer::new().map_err(|e| format!("creating a CLOCK_BOOTTIME timer: {e}"))?;
        let (commands_tx, commands) = mpsc::channel(64);
        let (events, _) = broadcast::channel(watcher_queue.max(1));
        let (messages, _) = broadcast::channel(watcher_queue.max(1));
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let (store_done_tx, store_done) = mpsc::unbounded_channel();
        let status0 = Self::status_of(&engine, &config, &mqtt, &clock);
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
                engine,
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
                sends: HashMap::new(),
                next_request: 1,
                watchdog: None,
                test_hooks,
                exit: false,
            },
            handle,
        ))
    }

    fn status_of(engine: &Engine, config: &Config, mqtt: &MqttSettings, clock: &Clock) -> Status {
        let s = engine.snapshot();
        let broker = mqtt.url_of(s.session.via.as_ref().map(|(t, _)| t));
        project(&s, config.sdk_app_id, broker, Stamp::read(clock))
    }

    fn publish_status(&mut self) {
        let s = Self::status_of(&self.engine, &self.config, &self.mqtt, &self.clock);
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
        self.engine.handle(now, input);
    }

    fn request_id(&mut self) -> RequestId {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    /// Ping systemd's watchdog from the loop, at half of `interval` (call before `run`).
    pub fn set_watchdog(&mut self, interval: Option<Duration>) {
        self.watchdog = interval;
    }

    /// Run until the engine says `Exit`. When `shutdown` completes (SIGTERM), the session is
    /// logged out cleanly first.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        // Store answers reach the engine in the order the requests went out (the store
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
        let mut shutdown = std::pin::pin!(shutdown);
        let mut shutting_down = false;
        self.feed(Input::Start);
        let ping_every = self
            .watchdog
            .map(|w| (w / 2).max(Duration::from_millis(50)));
        let mut next_ping = ping_every.map(|_| self.clock.now().mono);
        loop {
            self.run_actions().await;
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
            // Sleep until something is due (the engine's next timer, the next ping), or
            // something happens: nothing wakes this loop for nothing.
            let due = [self.engine.poll_timeout(), next_ping]
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
                (link, ev) = next_link_event(&mut self.conn), if self.conn.is_some() => Wake::Link(link, ev),
                res = next_fetch(&mut self.fetch), if self.fetch.is_some() => Wake::Fetch(res),
                _ = &mut shutdown, if !shutting_down => Wake::Shutdown,
                _ = self.timer.fired() => Wake::Timer,
                _ = backstop_sleep(backstop) => Wake::Timer,
            };
            match wake {
                Wake::Store(Some(answer)) => self.feed(Input::Store(answer)),
                Wake::Store(None) => {}
                Wake::Command(None) | Wake::Shutdown => {
                    shutting_down = true;
                    self.feed(Input::Shutdown);
                }
                Wake::Command(Some(cmd)) => self.on_command(cmd).await,
                Wake::Link(link, ev) => {
                    if matches!(ev, LinkEvent::Ended(_)) {
                        // The task already stopped polling; drop the connection (and the task).
                        self.conn = None;
                    }
                    self.feed(Input::Link { link, event: ev });
                }
                Wake::Fetch(res) => self.on_fetch_done(res),
                Wake::Timer => {
                    let now = self.clock.now();
                    self.engine.handle_timeout(now);
                }
            }
        }
        tracing::info!("session driver stopped");
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Login { user, sig, reply } => {
                let id = self.request_id();
                self.replies.insert(id, reply);
                let sig = sig.map(|app| self.hold_app_sig(*app));
                self.feed(Input::Login { id, user, sig });
            }
            Command::Logout { reply } => {
                let id = self.request_id();
                self.replies.insert(id, reply);
                self.feed(Input::Logout { id });
            }
            Command::Send { draft, reply } => {
                let id = self.request_id();
                self.sends.insert(id, reply);
                self.feed(Input::Send { id, draft });
            }
            Command::StoreRoom => self.feed(Input::StoreRoom),
            Command::Reload { config, reply } => {
                let result = self.reload(*config);
                let _ = reply.send(result);
            }
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
        let topics = Topics {
            sdk_app_id: config.sdk_app_id,
        };
        let device = device_of(&config, &self.mqtt);
        self.config = config;
        self.feed(Input::Reconfigured {
            policy,
            user,
            reconnect,
            topics,
            device,
        });
        Ok(())
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

    /// Carry out the engine's actions (feeding back what happens at once, e.g. a publish the
    /// client would not take) until it has none left.
    async fn run_actions(&mut self) {
        while let Some(action) = self.engine.poll_action() {
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
                    link,
                    user,
                    fingerprint,
                    target,
                    proto,
                    will,
                } => self.connect(link, user, &fingerprint, target, proto, will),
                Action::Subscribe { link, filter } => {
                    if let Some(c) = self.conn.as_ref().filter(|c| c.link == link)
                        && let Err(e) = c.subscribe(filter)
                    {
                        // No SUBACK will come: the engine's subscribe timeout covers it.
                        tracing::debug!("could not queue the inbox subscription: {e}");
                    }
                }
                Action::Publish {
                    link,
                    what,
                    topic,
                    payload,
                    retain,
                } => {
                    let taken = match self.conn.as_ref().filter(|c| c.link == link) {
                        Some(c) => c.publish(topic, payload, retain).map_err(|e| {
                            tracing::debug!("the MQTT client would not take a publish now: {e}")
                        }),
                        None => Err(()),
                    };
                    if taken.is_err() {
                        self.not_taken(link, what);
                    }
                }
                Action::Ack { link, pkid } => {
                    if let Some(c) = self.conn.as_ref().filter(|c| c.link == link)
                        && let Err(e) = c.ack(pkid)
                    {
                        // The connection is going: the broker sends it again on the next.
                        tracing::debug!("could not queue a PUBACK: {e}");
                    }
                }
                Action::Disconnect { link } => {
                    let sent = match self.conn.as_ref().filter(|c| c.link == link) {
                        Some(c) => c.disconnect().map_err(|e| e.to_string()),
                        None => Err("the connection is already gone".into()),
                    };
                    if let Err(detail) = sent {
                        // It is over already: say so, as its end.
                        self.conn = None;
                        self.feed(Input::Link {
                            link,
                            event: LinkEvent::Ended(ConnEnd::Network {
                                kind: NetKind::Closed,
                                detail,
                            }),
                        });
                    }
                }
                Action::Abandon { link } => {
                    if self.conn.as_ref().is_some_and(|c| c.link == link) {
                        self.conn = None;
                        tracing::debug!("connection dropped without waiting");
                    }
                }
                Action::PersistSig { fingerprint, user } => self.persist(&fingerprint, &user).await,
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
                Action::SendReply { id, result } => {
                    if let Some(tx) = self.sends.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                Action::Store(op) => self.store_op(op),
                Action::Notify(e) => {
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
                Action::Exit => self.exit = true,
            }
        }
    }

    /// Send a store request; its answer joins the ordered pipeline (a request the store would
    /// not take is answered at once, in its place, with the reason).
    fn store_op(&mut self, op: StoreOp) {
        macro_rules! ask {
            ($make:expr, $answer:expr, $refused:expr) => {{
                let (tx, rx) = oneshot::channel();
                let sent = self.store.send($make(tx));
                let fut: Answer = match sent {
                    Ok(()) => Box::pin($answer(rx)),
                    Err(e) => {
                        tracing::warn!("{e}");
                        let refused: StoreAnswer = $refused(e);
                        Box::pin(async move { refused })
                    }
                };
                if self.answers_tx.send(fut).is_err() {
                    tracing::error!("the store answer pipeline is gone");
                }
            }};
        }
        let gone = || StoreError::Unavailable("the store thread is gone".into());
        match op {
            StoreOp::Counts { owner } => {
                let o2 = owner.clone();
                let o3 = owner.clone();
                ask!(
                    |reply| StoreRequest::Counts { owner, reply },
                    |rx: oneshot::Receiver<Result<crate::store::Counts, StoreError>>| async move {
                        StoreAnswer::Counts {
                            owner: o2,
                            counts: rx.await.ok().and_then(Result::ok),
                        }
                    },
                    |_| StoreAnswer::Counts {
                        owner: o3,
                        counts: None,
                    }
                )
            }
            StoreOp::Enqueue { req, owner, msg } => {
                let (o2, m2) = (owner.clone(), msg.clone());
                let (o3, m3) = (owner.clone(), msg.clone());
                ask!(
                    |reply| StoreRequest::Enqueue { owner, msg, reply },
                    |rx: oneshot::Receiver<Result<i64, StoreError>>| async move {
                        let result = rx.await.unwrap_or_else(|_| Err(gone()));
                        StoreAnswer::Enqueued {
                            req,
                            owner: o2,
                            msg: m2,
                            result: result.map_err(store_failure),
                        }
                    },
                    |e: StoreError| StoreAnswer::Enqueued {
                        req,
                        owner: o3,
                        msg: m3,
                        result: Err(store_failure(e)),
                    }
                )
            }
            StoreOp::Receive {
                link,
                pkid,
                owner,
                msg,
                order,
            } => {
                let (m2, m3) = (msg.clone(), msg.clone());
                let order = order.map(|n| (link, n));
                ask!(
                    |reply| StoreRequest::Receive {
                        owner,
                        msg,
                        order,
                        reply
                    },
                    |rx: oneshot::Receiver<Result<Received, StoreError>>| async move {
                        let result = match rx.await.unwrap_or_else(|_| Err(gone())) {
                            Ok(Received::New(seq)) => Ok(Some(seq)),
                            Ok(Received::Duplicate) => Ok(None),
                            Err(e) => {
                                tracing::warn!("storing a received message: {e}");
                                Err(store_failure(e))
                            }
                        };
                        StoreAnswer::Received {
                            link,
                            pkid,
                            msg: m2,
                            result,
                        }
                    },
                    |e: StoreError| StoreAnswer::Received {
                        link,
                        pkid,
                        msg: m3,
                        result: Err(store_failure(e)),
                    }
                )
            }
            StoreOp::LoadOutbox {
                token,
                owner,
                after,
                limit,
                skip,
            } => ask!(
                |reply| StoreRequest::Outbox {
                    owner,
                    after,
                    limit,
                    skip,
                    reply,
                },
                |rx: oneshot::Receiver<_>| async move {
                    match rx.await {
                        Ok(Ok((page, complete))) => StoreAnswer::OutboxPage {
                            token,
                            page,
                            complete,
                        },
                        Ok(Err(e)) => {
                            tracing::warn!("reading the outbox: {e}");
                            StoreAnswer::OutboxFailed { token }
                        }
                        Err(_) => StoreAnswer::OutboxFailed { token },
                    }
                },
                |_| StoreAnswer::OutboxFailed { token }
            ),
            StoreOp::Settle {
                owner,
                seq,
                id,
                outcome,
            } => {
                let failed = match outcome {
                    courier::Outcome::Sent => None,
                    courier::Outcome::Failed { code, .. } => Some(code),
                };
                ask!(
                    |reply| StoreRequest::Settle {
                        owner,
                        id,
                        failed,
                        reply,
                    },
                    |rx: oneshot::Receiver<Result<bool, StoreError>>| async move {
                        let committed = matches!(rx.await, Ok(Ok(_)));
                        StoreAnswer::Settled { seq, committed }
                    },
                    |_| StoreAnswer::Settled {
                        seq,
                        committed: false,
                    }
                )
            }
        }
    }

    fn not_taken(&mut self, link: LinkId, what: Out) {
        self.feed(Input::Link {
            link,
            event: LinkEvent::NotTaken(what),
        });
    }

    fn connect(
        &mut self,
        link: LinkId,
        user: crate::identity::UserId,
        fingerprint: &str,
        target: crate::session::Target,
        proto: crate::session::Proto,
        will: Option<Will>,
    ) {
        // The engine connects only with no link open; an old one is gone with this.
        self.conn = None;
        let Some(held) = self.sigs.get(fingerprint) else {
            // Cannot happen (the engine only names sigs it has not released); fail safe.
            self.feed(Input::Link {
                link,
                event: LinkEvent::Ended(ConnEnd::Network {
                    kind: NetKind::Other,
                    detail: "internal: the UserSig to connect with is gone".into(),
                }),
            });
            return;
        };
        tracing::info!(
            // Quoted: a redirect's host comes from the broker.
            broker = %quote_external(&self.mqtt.url_of(Some(&target)), 200),
            protocol = proto.as_str(),
            client_id = %self.mqtt.client_id(&user),
            user_id = %user,
            fingerprint,
            "connecting"
        );
        let dial = crate::link::Dial {
            link,
            user: &user,
            sig: &held.sig,
            target,
            proto,
            will,
        };
        match Connection::open(&self.mqtt, &self.config.state_dir, dial) {
            Ok(c) => self.conn = Some(c),
            Err(end) => self.feed(Input::Link {
                link,
                event: LinkEvent::Ended(end),
            }),
        }
    }

    async fn persist(&mut self, fingerprint: &str, user: &crate::identity::UserId) {
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
        let (user, app, sig) = (user.clone(), self.config.sdk_app_id, h.sig.clone());
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

    /// Keep the secret of a sig a local app brought (checked by the API) and describe it to
    /// the engine (which decides whether it is for the right user).
    fn hold_app_sig(&mut self, app: AppSig) -> BroughtSig {
        let now = self.clock.now();
        let fingerprint = app.sig.fingerprint();
        tracing::info!(fingerprint = %fingerprint, "a local app brought a UserSig");
        self.sigs.insert(
            fingerprint.clone(),
            HeldSig {
                sig: app.sig,
                // No issuer's clock to compare with: our wall clock is the reference.
                server_offset: 0,
                issued_at: app.issued_at,
                expires_at: app.expires_at,
                anchor: Some((now.wall, now.mono)),
            },
        );
        BroughtSig {
            fingerprint,
            user: app.user,
            issued_at: app.issued_at,
            expires_at: app.expires_at,
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
                let snapshot = self.engine.machine().snapshot();
                // The summary describes the current state; an older queued event gets its phase.
                let text = if snapshot.phase == *phase {
                    summary(
                        &snapshot,
                        &quote_external(
                            &self.mqtt.url_of(snapshot.via.as_ref().map(|(t, _)| t)),
                            200,
                        ),
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
async fn next_link_event(conn: &mut Option<Connection>) -> (LinkId, LinkEvent) {
    match conn {
        Some(c) => {
            let ev = c.events.recv().await.unwrap_or_else(|| {
                LinkEvent::Ended(ConnEnd::Network {
                    kind: NetKind::Other,
                    detail: "the connection task ended".into(),
                })
            });
            (c.link, ev)
        }
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
