//! The configuration: a TOML file (`--config`, default `/etc/imlinkd/imlinkd.toml`) with
//! environment overrides `IMLINKD__SECTION__KEY`. Everything is validated here, once: the
//! rest of the daemon only sees a [`Config`] that is known good.
//!
//! Every error names the file, the key and what is wrong (and the environment overrides in
//! effect, since a key can come from there). Unknown keys are errors, not silently ignored.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::identity::{Template, UserId};
use crate::session::{BackoffPolicy, OnKick, Policy};

pub const DEFAULT_PATH: &str = "/etc/imlinkd/imlinkd.toml";
pub const ENV_PREFIX: &str = "IMLINKD";

/// Unix time of this build (`SOURCE_DATE_EPOCH` when set): a wall clock before it is wrong.
pub const BUILD_UNIX: i64 = match i64::from_str_radix(env!("IMLINKD_BUILD_UNIX"), 10) {
    Ok(t) => t,
    Err(_) => 0,
};

/// A validation or loading failure. Displays as `FILE: KEY: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)?;
        let overrides = env_overrides();
        if !overrides.is_empty() {
            write!(
                f,
                " (environment overrides in effect: {})",
                overrides.join(", ")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

fn env_overrides() -> Vec<String> {
    let prefix = format!("{ENV_PREFIX}__");
    let mut v: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.to_ascii_uppercase().starts_with(&prefix))
        .collect();
    v.sort();
    v
}

/// A duration in the config: `"250ms"`, `"30s"`, `"15m"`, `"2h"`, `"1d"`, or a number of
/// seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.checked_mul(1_000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Dur(Duration::from_secs(n))),
            Raw::Text(s) => parse_duration(&s).map(Dur).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration (use e.g. \"500ms\", \"30s\", \"15m\", \"2h\", \"1d\")"
                ))
            }),
        }
    }
}

// --- the file's shape -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    user_id: String,
    sdk_app_id: u64,
    #[serde(default = "default_platform")]
    platform: String,
    #[serde(default = "default_instance")]
    instance: String,
    #[serde(default = "yes")]
    login_on_start: bool,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_log_level")]
    log_level: String,
    broker: RawBroker,
    /// Optional: without it, UserSigs come only from local apps (`login {user_id, user_sig}`).
    provisioning: Option<RawProvisioning>,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    /// node_exporter's textfile collector: write the metrics there, atomically, on change.
    textfile: Option<PathBuf>,
}

fn default_platform() -> String {
    "linux".into()
}
fn default_instance() -> String {
    "0".into()
}
fn yes() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/imlinkd")
}
fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    /// One broker (shorthand for a one-entry `urls`).
    url: Option<String>,
    /// A failover list: network and busy failures move to the next node.
    urls: Option<Vec<String>>,
    /// "v5" (default), "v3.1.1", or "auto".
    #[serde(default = "default_protocol")]
    protocol: String,
    #[serde(default = "default_client_id")]
    client_id: String,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default = "default_keepalive")]
    keepalive: Dur,
    #[serde(default = "default_session_expiry")]
    session_expiry: Dur,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: Dur,
    /// Publish the device's status, retained, with a last will (docs/api.md).
    #[serde(default = "yes")]
    publish_status: bool,
}

fn default_protocol() -> String {
    "v5".into()
}

fn default_client_id() -> String {
    "{sdk_app_id}:{user_id}:{platform}:{instance}".into()
}
fn default_keepalive() -> Dur {
    Dur(Duration::from_secs(60))
}
/// The IM service keeps offline messages 7 days; a broker session that lives as long keeps
/// them queued for a device that is off that long (at the cost of broker memory).
fn default_session_expiry() -> Dur {
    Dur(Duration::from_secs(7 * 86_400))
}
fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    url: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    #[serde(default = "default_prov_timeout")]
    timeout: Dur,
    #[serde(default = "default_max_response")]
    max_response_bytes: usize,
}

fn default_prov_timeout() -> Dur {
    Dur(Duration::from_secs(15))
}
fn default_max_response() -> usize {
    64 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawOnKick {
    Word(String),
    Relogin { relogin_after: Dur },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSession {
    refresh_at: f64,
    on_kick: RawOnKick,
    backoff_base: Dur,
    backoff_cap: Dur,
    backoff_reset_after: Dur,
    sig_expired_budget: u32,
    sig_expired_window: Dur,
    takeover_closes: u32,
    takeover_window: Dur,
    takeover_cooldown: Dur,
    takeover_cooldown_max: Dur,
    protocol_budget: u32,
    rejected_cooldown: Dur,
    rejected_cooldown_max: Dur,
    clock_retry: Dur,
}

impl Default for RawSession {
    fn default() -> Self {
        let p = Policy::default();
        let ms = |m| Dur(Duration::from_millis(m));
        RawSession {
            refresh_at: p.refresh_fraction,
            on_kick: RawOnKick::Word("stay_offline".into()),
            backoff_base: ms(p.backoff.base),
            backoff_cap: ms(p.backoff.cap),
            backoff_reset_after: ms(p.backoff.reset_after),
            sig_expired_budget: p.sig_expired_budget,
            sig_expired_window: ms(p.sig_expired_window),
            takeover_closes: p.takeover_closes,
            takeover_window: ms(p.takeover_window),
            takeover_cooldown: ms(p.takeover_cooldown),
            takeover_cooldown_max: ms(p.takeover_cooldown_max),
            protocol_budget: p.protocol_budget,
            rejected_cooldown: ms(p.rejected_cooldown),
            rejected_cooldown_max: ms(p.rejected_cooldown_max),
            clock_retry: ms(p.clock_retry),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    max_bytes: RawSize,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            max_bytes: RawSize::Bytes(DEFAULT_STORE_BYTES),
        }
    }
}

/// The message store's default size cap.
pub const DEFAULT_STORE_BYTES: u64 = 128 << 20;

/// A size: a number of bytes, or a string like "64MiB", "500MB", "1GiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

fn parse_size(v: &RawSize) -> Result<u64, String> {
    let s = match v {
        RawSize::Bytes(b) => return Ok(*b),
        RawSize::Text(s) => s.trim(),
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a size is a number of bytes or e.g. \"64MiB\", \"1GiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use B, KB, KiB, MB, MiB, GB or GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    socket: PathBuf,
    group: Option<String>,
    operator_uids: Vec<u32>,
    operator_gids: Vec<u32>,
    max_clients: usize,
    max_clients_per_uid: usize,
    max_watchers_per_uid: usize,
    max_line_bytes: usize,
    watcher_queue: usize,
    idle_timeout: Dur,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            socket: PathBuf::from("/run/imlinkd/api.sock"),
            group: None,
            operator_uids: Vec::new(),
            operator_gids: Vec::new(),
            max_clients: 64,
            max_clients_per_uid: 16,
            max_watchers_per_uid: 8,
            max_line_bytes: 64 * 1024,
            watcher_queue: 256,
            idle_timeout: Dur(Duration::from_secs(300)),
        }
    }
}

// --- the validated config ---------------------------------------------------------------------

pub use crate::tls::{CaSource, ClientAuth};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// The nodes, in failover order (at least one).
    pub nodes: Vec<(String, u16)>,
    pub protocol: crate::session::ProtocolMode,
    pub client_id: Template,
    pub ca: CaSource,
    pub client_auth: Option<ClientAuth>,
    pub keepalive: Duration,
    pub session_expiry_secs: u32,
    pub connect_timeout: Duration,
    /// Publish the retained device status and set the last will.
    pub publish_status: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningConfig {
    pub url: Template,
    pub token_file: Option<PathBuf>,
    pub ca: CaSource,
    pub client_auth: Option<ClientAuth>,
    pub timeout: Duration,
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The message store's file (`messages.db` in the state directory).
    pub path: PathBuf,
    /// Size cap: beyond it, old read and sent messages are evicted; a send that cannot make
    /// room is refused.
    pub max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub socket: PathBuf,
    pub group: Option<String>,
    pub operator_uids: Vec<u32>,
    pub operator_gids: Vec<u32>,
    pub max_clients: usize,
    pub max_clients_per_uid: usize,
    pub max_watchers_per_uid: usize,
    pub max_line_bytes: usize,
    pub watcher_queue: usize,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub user_id: UserId,
    pub sdk_app_id: u64,
    pub platform: String,
    pub instance: String,
    pub state_dir: PathBuf,
    pub log_level: tracing::Level,
    pub broker: BrokerConfig,
    /// `None`: UserSigs come only from local apps.
    pub provisioning: Option<ProvisioningConfig>,
    pub store: StoreConfig,
    pub policy: Policy,
    pub api: ApiConfig,
    /// `metrics.textfile`: where to write the metrics for node_exporter's textfile collector.
    pub metrics_textfile: Option<PathBuf>,
    /// Things that work but deserve attention (e.g. a secret file readable by others).
    pub warnings: Vec<String>,
}

impl Config {
    /// Load `path` plus the environment overrides, and validate everything.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let err = |key: Option<&str>, message: String| ConfigError {
            file: path.to_path_buf(),
            key: key.map(str::to_string),
            message,
        };
        if !path.exists() {
            return Err(err(
                None,
                "no such file (pass --config PATH, or install the example from \
                 config/imlinkd.toml)"
                    .into(),
            ));
        }
        let raw: RawConfig = config::Config::builder()
            .add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            )
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| err(None, config_message(e, path)))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        validate(raw, path, dir)
    }
}

/// The `config` crate's message, without its own (relative) file name: ours is in front.
fn config_message(e: config::ConfigError, path: &Path) -> String {
    let s = e.to_string();
    let name = path.display().to_string();
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let s = s
        .replace(&format!(" in {name}"), "")
        .replace(&format!(" in {base}"), "");
    if s.starts_with("unknown field") && !s.contains("for key") {
        format!("{s} (at the top level)")
    } else {
        s
    }
}

fn validate(raw: RawConfig, path: &Path, dir: &Path) -> Result<Config, ConfigError> {
    let err = |key: &str, message: String| ConfigError {
        file: path.to_path_buf(),
        key: Some(key.to_string()),
        message,
    };
    let mut warnings = Vec::new();
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };

    let user_id = UserId::parse(&raw.user_id).map_err(|e| {
        err(
            "user_id",
            format!(
                "{:?}: {e} (IM error 7003); nothing is sent to the server",
                raw.user_id
            ),
        )
    })?;
    if raw.sdk_app_id == 0 {
        return Err(err(
            "sdk_app_id",
            "must be the app's SDKAppID, not 0".into(),
        ));
    }
    for (key, v) in [("platform", &raw.platform), ("instance", &raw.instance)] {
        if v.is_empty()
            || v.len() > 32
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(err(
                key,
                format!(
                    "{v:?}: use 1-32 characters of A-Z a-z 0-9 _ - . (it goes in the client id)"
                ),
            ));
        }
        if v.contains('.') {
            warnings.push(format!(
                "{key} {v:?} contains '.': NATS refuses such a client id (CONNACK 2), and the \
                 device status topic writes it as '_'; prefer A-Z a-z 0-9 _ -"
            ));
        }
    }
    let log_level = match raw.log_level.to_ascii_lowercase().as_str() {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" => tracing::Level::WARN,
        "error" => tracing::Level::ERROR,
        other => {
            return Err(err(
                "log_level",
                format!("{other:?}: use one of trace, debug, info, warn, error"),
            ));
        }
    };

    // [broker]
    let b = raw.broker;
    let nodes = match (&b.url, &b.urls) {
        (Some(_), Some(_)) => {
            return Err(err(
                "broker.urls",
                "set either broker.url (one broker) or broker.urls (a failover list), not both"
                    .into(),
            ));
        }
        (None, None) => {
            return Err(err(
                "broker.url",
                "missing: set broker.url = \"mqtts://host:8883\" (or broker.urls = [...])".into(),
            ));
        }
        (Some(u), None) => vec![parse_broker_url(u).map_err(|m| err("broker.url", m))?],
        (None, Some(list)) => {
            if list.is_empty() || list.len() > 16 {
                return Err(err(
                    "broker.urls",
                    format!("{} entries: give 1 to 16 broker URLs", list.len()),
                ));
            }
            let mut nodes = Vec::new();
            for (i, u) in list.iter().enumerate() {
                let n = parse_broker_url(u).map_err(|m| err(&format!("broker.urls[{i}]"), m))?;
                if nodes.contains(&n) {
                    return Err(err(
                        &format!("broker.urls[{i}]"),
                        format!("{u:?} is listed twice"),
                    ));
                }
                nodes.push(n);
            }
            nodes
        }
    };
    let protocol = match b.protocol.as_str() {
        "v5" | "5" => crate::session::ProtocolMode::V5,
        "v3.1.1" | "3.1.1" => crate::session::ProtocolMode::V311,
        "auto" => crate::session::ProtocolMode::Auto,
        other => {
            return Err(err(
                "broker.protocol",
                format!("{other:?}: use \"v5\", \"v3.1.1\" or \"auto\""),
            ));
        }
    };
    let client_id = Template::parse(&b.client_id, &["user_id"])
        .map_err(|e| err("broker.client_id", format!("{:?}: {e}", b.client_id)))?;
    let broker_ca = ca_source(b.ca_file.as_deref().map(resolve), "broker.ca_file", &err)?;
    let broker_auth = client_auth(
        b.client_cert.as_deref().map(resolve),
        b.client_key.as_deref().map(resolve),
        "broker",
        &err,
        &mut warnings,
    )?;
    let keepalive = b.keepalive.0;
    if keepalive < Duration::from_secs(5) || keepalive > Duration::from_secs(65_535) {
        return Err(err(
            "broker.keepalive",
            format!("{keepalive:?}: must be between 5s and 65535s"),
        ));
    }
    let session_expiry_secs = u32::try_from(b.session_expiry.0.as_secs()).map_err(|_| {
        err(
            "broker.session_expiry",
            "must fit in 32 bits of seconds (about 136 years)".into(),
        )
    })?;
    if b.connect_timeout.0 < Duration::from_secs(1) {
        return Err(err("broker.connect_timeout", "must be at least 1s".into()));
    }

    // [provisioning]
    let provisioning = match raw.provisioning {
        Some(p) => Some(validate_provisioning(p, &resolve, &err, &mut warnings)?),
        None => {
            warnings.push(
                "no [provisioning] section: UserSigs come only from local apps (login with \
                 user_sig); when one expires, the daemon logs out and waits for the next"
                    .into(),
            );
            None
        }
    };

    // [store]
    let max_bytes = parse_size(&raw.store.max_bytes).map_err(|m| err("store.max_bytes", m))?;
    if max_bytes < 1 << 20 {
        return Err(err(
            "store.max_bytes",
            format!("{max_bytes} bytes: the message store needs at least 1MiB"),
        ));
    }
    let store = StoreConfig {
        path: resolve(&raw.state_dir).join("messages.db"),
        max_bytes,
    };

    // [metrics]
    let metrics_textfile = match raw.metrics.textfile {
        None => None,
        Some(p) => {
            let p = resolve(&p);
            let ok = p.extension().is_some_and(|e| e == "prom")
                && p.parent().is_some_and(|d| d.is_dir());
            if !ok {
                return Err(err(
                    "metrics.textfile",
                    format!(
                        "{}: the textfile collector reads *.prom files from an existing \
                         directory (e.g. /var/lib/prometheus/node-exporter/imlinkd.prom)",
                        p.display()
                    ),
                ));
            }
            Some(p)
        }
    };

    // [session]
    let s = raw.session;
    if !(0.1..=0.95).contains(&s.refresh_at) {
        return Err(err(
            "session.refresh_at",
            format!(
                "{}: the refresh point is a fraction of the UserSig lifetime between 0.1 and 0.95",
                s.refresh_at
            ),
        ));
    }
    let on_kick = match s.on_kick {
        RawOnKick::Word(w) if w == "stay_offline" => OnKick::StayOffline,
        RawOnKick::Word(w) => {
            return Err(err(
                "session.on_kick",
                format!("{w:?}: use \"stay_offline\" or {{ relogin_after = \"15m\" }}"),
            ));
        }
        RawOnKick::Relogin { relogin_after } => {
            if ms(relogin_after) < crate::session::RELOGIN_FLOOR {
                return Err(err(
                    "session.on_kick.relogin_after",
                    format!(
                        "{:?} is too short: at least \"1m\" (two devices sharing an identity \
                         would take the session from each other every cool-down)",
                        relogin_after.0
                    ),
                ));
            }
            OnKick::ReloginAfter(ms(relogin_after))
        }
    };
    let backoff = BackoffPolicy {
        base: ms(s.backoff_base),
        cap: ms(s.backoff_cap),
        reset_after: ms(s.backoff_reset_after),
    };
    if backoff.base < 100 {
        return Err(err("session.backoff_base", "must be at least 100ms".into()));
    }
    if backoff.cap < backoff.base {
        return Err(err(
            "session.backoff_cap",
            "must be at least session.backoff_base".into(),
        ));
    }
    for (key, v) in [
        ("session.sig_expired_budget", s.sig_expired_budget),
        ("session.takeover_closes", s.takeover_closes),
        ("session.protocol_budget", s.protocol_budget),
    ] {
        if v == 0 {
            return Err(err(key, "must be at least 1".into()));
        }
    }
    if ms(s.takeover_cooldown) < 60_000 {
        return Err(err(
            "session.takeover_cooldown",
            "must be at least \"1m\" (two devices sharing an identity must never fight)".into(),
        ));
    }
    if s.takeover_cooldown_max.0 < s.takeover_cooldown.0 {
        return Err(err(
            "session.takeover_cooldown_max",
            "must be at least session.takeover_cooldown".into(),
        ));
    }
    let rejected_cooldown = ms(s.rejected_cooldown);
    if rejected_cooldown != 0 && rejected_cooldown < crate::session::REJECTED_COOLDOWN_MIN {
        return Err(err(
            "session.rejected_cooldown",
            "must be \"0s\" (stay stopped after refusals) or at least \"1m\" (each try \
             after it fetches a UserSig and logs in)"
                .into(),
        ));
    }
    let rejected_cooldown_max = ms(s.rejected_cooldown_max);
    if rejected_cooldown_max < rejected_cooldown.max(crate::session::REJECTED_COOLDOWN_MAX_FLOOR) {
        return Err(err(
            "session.rejected_cooldown_max",
            "must be at least \"30m\" and at least session.rejected_cooldown (the cool-downs \
             after refusals double up to it: a few tries a day, never a loop)"
                .into(),
        ));
    }
    let policy = Policy {
        login_on_start: raw.login_on_start,
        backoff,
        refresh_fraction: s.refresh_at,
        refresh_jitter: 0.05,
        on_kick,
        sig_expired_budget: s.sig_expired_budget,
        sig_expired_window: ms(s.sig_expired_window),
        protocol_budget: s.protocol_budget,
        takeover_closes: s.takeover_closes,
        takeover_window: ms(s.takeover_window),
        takeover_cooldown: ms(s.takeover_cooldown),
        takeover_cooldown_max: ms(s.takeover_cooldown_max),
        rejected_cooldown,
        rejected_cooldown_max,
        min_wall_clock: BUILD_UNIX,
        clock_retry: ms(s.clock_retry).max(1_000),
        fetch_timeout: provisioning
            .as_ref()
            .map_or(Policy::default().fetch_timeout, |p| {
                p.timeout.as_millis() as u64
            }),
        connect_timeout: b.connect_timeout.0.as_millis() as u64,
        close_timeout: Policy::default().close_timeout,
        provisioning: provisioning.is_some(),
        brokers: nodes.len() as u32,
        protocol,
        outage_retry_floor: Policy::default().outage_retry_floor,
    };

    // [api]
    let a = raw.api;
    for (key, v) in [
        ("api.max_clients", a.max_clients),
        ("api.max_clients_per_uid", a.max_clients_per_uid),
        ("api.max_watchers_per_uid", a.max_watchers_per_uid),
        ("api.watcher_queue", a.watcher_queue),
    ] {
        if v == 0 {
            return Err(err(key, "must be at least 1".into()));
        }
    }
    if a.max_line_bytes < 1024 {
        return Err(err("api.max_line_bytes", "must be at least 1024".into()));
    }
    let api = ApiConfig {
        socket: resolve(&a.socket),
        group: a.group,
        operator_uids: a.operator_uids,
        operator_gids: a.operator_gids,
        max_clients: a.max_clients,
        max_clients_per_uid: a.max_clients_per_uid,
        max_watchers_per_uid: a.max_watchers_per_uid,
        max_line_bytes: a.max_line_bytes,
        watcher_queue: a.watcher_queue,
        idle_timeout: a.idle_timeout.0,
    };

    Ok(Config {
        path: path.to_path_buf(),
        user_id,
        sdk_app_id: raw.sdk_app_id,
        platform: raw.platform,
        instance: raw.instance,
        state_dir: resolve(&raw.state_dir),
        log_level,
        broker: BrokerConfig {
            nodes,
            protocol,
            client_id,
            ca: broker_ca,
            client_auth: broker_auth,
            keepalive,
            session_expiry_secs,
            connect_timeout: b.connect_timeout.0,
            publish_status: b.publish_status,
        },
        provisioning,
        store,
        policy,
        api,
        metrics_textfile,
        warnings,
    })
}

fn validate_provisioning(
    p: RawProvisioning,
    resolve: &dyn Fn(&Path) -> PathBuf,
    err: &dyn Fn(&str, String) -> ConfigError,
    warnings: &mut Vec<String>,
) -> Result<ProvisioningConfig, ConfigError> {
    let url = Template::parse(&p.url, &["user_id"])
        .map_err(|e| err("provisioning.url", format!("{:?}: {e}", p.url)))?;
    crate::url::check_template(url.as_str()).map_err(|m| err("provisioning.url", m))?;
    let token_file = p.token_file.as_deref().map(resolve);
    if let Some(t) = &token_file {
        check_secret_file(t, "provisioning.token_file", err, warnings)?;
    }
    let ca = ca_source(
        p.ca_file.as_deref().map(resolve),
        "provisioning.ca_file",
        err,
    )?;
    let client_auth = client_auth(
        p.client_cert.as_deref().map(resolve),
        p.client_key.as_deref().map(resolve),
        "provisioning",
        err,
        warnings,
    )?;
    if token_file.is_none() && client_auth.is_none() {
        warnings.push(
            "provisioning: neither token_file nor client_cert is set; the provisioning server \
             gets no device credentials"
                .into(),
        );
    }
    if p.timeout.0 < Duration::from_secs(1) {
        return Err(err("provisioning.timeout", "must be at least 1s".into()));
    }
    if !(1024..=16 * 1024 * 1024).contains(&p.max_response_bytes) {
        return Err(err(
            "provisioning.max_response_bytes",
            "must be between 1024 and 16777216".into(),
        ));
    }
    Ok(ProvisioningConfig {
        url,
        token_file,
        ca,
        client_auth,
        timeout: p.timeout.0,
        max_response_bytes: p.max_response_bytes,
    })
}

fn ms(d: Dur) -> u64 {
    u64::try_from(d.0.as_millis()).unwrap_or(u64::MAX)
}

pub use crate::url::parse_broker_url;

fn ca_source(
    file: Option<PathBuf>,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<CaSource, ConfigError> {
    match file {
        None => Ok(CaSource::System),
        Some(f) => {
            let certs = crate::tls::read_certs(&f).map_err(|e| err(key, e))?;
            if certs.is_empty() {
                return Err(err(
                    key,
                    format!("{}: holds no PEM certificate", f.display()),
                ));
            }
            Ok(CaSource::File(f))
        }
    }
}

fn client_auth(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    section: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
    warnings: &mut Vec<String>,
) -> Result<Option<ClientAuth>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) | (None, Some(_)) => Err(err(
            &format!("{section}.client_cert"),
            "client_cert and client_key go together: set both or neither".into(),
        )),
        (Some(cert), Some(key)) => {
            let certs = crate::tls::read_certs(&cert)
                .map_err(|e| err(&format!("{section}.client_cert"), e))?;
            if certs.is_empty() {
                return Err(err(
                    &format!("{section}.client_cert"),
                    format!("{}: holds no PEM certificate", cert.display()),
                ));
            }
            check_secret_file(&key, &format!("{section}.client_key"), err, warnings)?;
            crate::tls::read_key(&key).map_err(|e| err(&format!("{section}.client_key"), e))?;
            Ok(Some(ClientAuth { cert, key }))
        }
    }
}

/// A file holding a secret must exist; readable by group or others earns a warning.
fn check_secret_file(
    path: &Path,
    key: &str,
    err: &dyn Fn(&str, String) -> ConfigError,
    warnings: &mut Vec<String>,
) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| err(key, format!("{}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(err(key, format!("{}: not a regular file", path.display())));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warnings.push(format!(
            "{key}: {} is readable by group or others (mode {mode:04o}); it holds a secret: \
             chmod 600 it",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
    }

    #[test]
    fn broker_urls_must_be_mqtts() {
        assert_eq!(
            parse_broker_url("mqtts://im.example.com"),
            Ok(("im.example.com".into(), 8883))
        );
        assert_eq!(
            parse_broker_url("mqtts://127.0.0.1:18883"),
            Ok(("127.0.0.1".into(), 18883))
        );
        assert_eq!(parse_broker_url("mqtts://[::1]:1"), Ok(("::1".into(), 1)));
        assert!(
            parse_broker_url("mqtt://h:1883")
                .unwrap_err()
                .contains("in the clear")
        );
        assert!(parse_broker_url("https://h").is_err());
        assert!(parse_broker_url("mqtts://h:x").is_err());
        assert!(parse_broker_url("mqtts://h:0").is_err());
        assert!(parse_broker_url("mqtts://").is_err());
        assert!(parse_broker_url("mqtts://u@h").is_err());
    }
}
