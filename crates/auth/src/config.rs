//! The configuration: one TOML file (`--config`, default `/etc/imlink-auth/imlink-auth.toml`,
//! documented key by key in `config/imlink-auth.toml`). Everything is validated here, once,
//! and every secret is read here from its own file (0600 or 0400, owned by the service's user
//! or root): the rest of the service only sees a [`Config`] that is known good.
//!
//! Unknown keys are errors. Every error names the file, the key and the fix; the binary exits
//! 78 (EX_CONFIG) on one, as imlinkd does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::nkeys::{KeyPair, Kind};
use crate::rules::{App, Operator, Rules, is_id};
use crate::secret::{Secret, read_secret_file};

pub const DEFAULT_PATH: &str = "/etc/imlink-auth/imlink-auth.toml";

/// A loading or validation failure: `FILE: KEY: what is wrong (fix)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A duration: `"250ms"`, `"30s"`, `"15m"`, `"2h"`, `"1d"`, or a whole number of seconds.
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

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDur {
    Text(String),
    Secs(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    nats: RawNats,
    callout: RawCallout,
    #[serde(default)]
    apps: BTreeMap<String, RawApp>,
    #[serde(default)]
    operators: BTreeMap<String, RawOperator>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNats {
    urls: Vec<String>,
    user: String,
    password_file: PathBuf,
    ca_file: Option<PathBuf>,
    queue_group: Option<String>,
    name: Option<String>,
    connect_timeout: Option<RawDur>,
    ping_interval: Option<RawDur>,
    reconnect_delay_min: Option<RawDur>,
    reconnect_delay_max: Option<RawDur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallout {
    issuer_seed_file: PathBuf,
    account: Option<String>,
    clock_skew: Option<RawDur>,
    operator_session: Option<RawDur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    key_files: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperator {
    sdk_app_id: u64,
    secret_file: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    decisions_per_second: Option<u32>,
    decisions_burst: Option<u32>,
    summary_interval: Option<RawDur>,
    stats_interval: Option<RawDur>,
}

/// One NATS node to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NatsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "tls" } else { "nats" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Parse `nats://host:port` or `tls://host:port` (`[v6]` hosts; port 4222 by default).
/// Plain `nats://` only to a literal loopback address: the password crosses it in clear.
pub fn parse_nats_url(s: &str) -> Result<NatsUrl, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("tls://") {
        (true, r)
    } else if let Some(r) = s.strip_prefix("nats://") {
        (false, r)
    } else {
        return Err("use nats://HOST:PORT (loopback only) or tls://HOST:PORT".into());
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err("a NATS URL has no path, query or credentials: use tls://HOST:PORT".into());
    }
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let Some((h, after)) = r.split_once(']') else {
            return Err("an IPv6 host needs its closing ]".into());
        };
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("expected :PORT after the IPv6 host".into()),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    let port = match port {
        None => 4222,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {p:?} is not 1-65535"))?,
    };
    if !tls {
        let loopback = host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
        if !loopback {
            return Err(format!(
                "plain nats:// is only allowed to a literal loopback address (the password \
                 would cross the network in clear); use tls://{host}:{port}"
            ));
        }
    }
    Ok(NatsUrl { tls, host, port })
}

/// How to reach NATS.
pub struct NatsSettings {
    pub urls: Vec<NatsUrl>,
    pub user: String,
    pub password: Secret,
    /// The TLS client configuration, when any URL is `tls://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub queue_group: String,
    /// The connection name shown by the server's monitoring (`connz`).
    pub name: String,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub reconnect_delay_min: Duration,
    pub reconnect_delay_max: Duration,
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("urls", &self.urls)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("tls", &self.tls.is_some())
            .field("queue_group", &self.queue_group)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: tracing::Level,
    /// Decision lines per second logged one by one; beyond, they are counted and summarised.
    pub decisions_per_second: u32,
    pub decisions_burst: u32,
    pub summary_interval: Duration,
    /// How often the request statistics (count, latency percentiles) are logged.
    pub stats_interval: Duration,
}

/// A validated configuration with its secrets read.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub nats: NatsSettings,
    pub issuer: KeyPair,
    /// The account users land in: the user JWT's `aud`.
    pub account: String,
    pub clock_skew: Duration,
    pub rules: Rules,
    pub log: LogSettings,
}

struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }

    fn dur(
        &self,
        key: &str,
        v: Option<RawDur>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(RawDur::Secs(s)) => Ok(Duration::from_secs(s)),
            Some(RawDur::Text(t)) => parse_duration(&t).ok_or_else(|| {
                self.err(
                    key,
                    format!(
                        "{t:?} is not a duration (use e.g. \"250ms\", \"30s\", \"15m\", \"2h\")"
                    ),
                )
            }),
        }
    }

    fn secret(&self, key: &str, path: &Path) -> Result<Secret, ConfigError> {
        let path = self.resolve(path);
        read_secret_file(&path).map_err(|e| self.err(key, format!("{}: {e}", path.display())))
    }

    /// Relative paths are relative to the config file's directory.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

fn toml_error(file: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let mut message = e.message().trim().to_string();
    if message.contains("unknown field") {
        message.push_str(" (fix: remove it or correct its spelling; config/imlink-auth.toml documents every key)");
    } else if message.contains("missing field") {
        message.push_str(" (fix: add it; config/imlink-auth.toml documents every key)");
    }
    ConfigError {
        file: file.to_path_buf(),
        key: line.map(|l| format!("line {l}")),
        message,
    }
}

impl Config {
    /// Load, validate and read every secret.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            key: None,
            message: format!("cannot read the config file: {e} (fix: --config PATH)"),
        })?;
        Config::from_text(file, &text)
    }

    pub fn from_text(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        let c = Ctx { file };

        // [nats]
        let n = raw.nats;
        if n.urls.is_empty() {
            return Err(c.err(
                "nats.urls",
                "is empty (fix: list every node, e.g. [\"tls://nats-1:4222\"])",
            ));
        }
        let mut urls = Vec::new();
        for (i, u) in n.urls.iter().enumerate() {
            urls.push(
                parse_nats_url(u)
                    .map_err(|e| c.err(&format!("nats.urls[{i}]"), format!("{u:?}: {e}")))?,
            );
        }
        if n.user.is_empty() || n.user.contains(char::is_whitespace) {
            return Err(c.err(
                "nats.user",
                "must be the service's NATS user name (non-empty, no spaces)",
            ));
        }
        let password = c.secret("nats.password_file", &n.password_file)?;
        let tls = if urls.iter().any(|u| u.tls) {
            let Some(ca) = &n.ca_file else {
                return Err(c.err(
                    "nats.ca_file",
                    "is required with tls:// URLs (fix: the PEM file of the CA that signed the nodes' certificates)",
                ));
            };
            let ca = c.resolve(ca);
            Some(
                crate::tls::client_config(&ca)
                    .map_err(|e| c.err("nats.ca_file", format!("{}: {e}", ca.display())))?,
            )
        } else {
            None
        };
        let queue_group = n.queue_group.unwrap_or_else(|| "imlink-auth".to_string());
        if !is_id(&queue_group) {
            return Err(c.err(
                "nats.queue_group",
                "must be 1-32 of A-Za-z0-9_- (every instance uses the same)",
            ));
        }
        let name = n.name.unwrap_or_else(|| "imlink-auth".to_string());
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(c.err("nats.name", "must be 1-64 printable characters"));
        }
        let connect_timeout = c.dur(
            "nats.connect_timeout",
            n.connect_timeout,
            Duration::from_secs(2),
        )?;
        let ping_interval = c.dur(
            "nats.ping_interval",
            n.ping_interval,
            Duration::from_secs(10),
        )?;
        let reconnect_delay_min = c.dur(
            "nats.reconnect_delay_min",
            n.reconnect_delay_min,
            Duration::from_millis(100),
        )?;
        let reconnect_delay_max = c.dur(
            "nats.reconnect_delay_max",
            n.reconnect_delay_max,
            Duration::from_secs(5),
        )?;
        if connect_timeout < Duration::from_millis(100) || connect_timeout > Duration::from_secs(60)
        {
            return Err(c.err("nats.connect_timeout", "must be between 100ms and 60s"));
        }
        if ping_interval < Duration::from_secs(1) || ping_interval > Duration::from_secs(600) {
            return Err(c.err("nats.ping_interval", "must be between 1s and 10m"));
        }
        if reconnect_delay_min < Duration::from_millis(10)
            || reconnect_delay_min > reconnect_delay_max
        {
            return Err(c.err(
                "nats.reconnect_delay_min",
                "must be at least 10ms and at most nats.reconnect_delay_max",
            ));
        }
        if reconnect_delay_max > Duration::from_secs(300) {
            return Err(c.err("nats.reconnect_delay_max", "must be at most 5m"));
        }

        // [callout]
        let co = raw.callout;
        let seed = c.secret("callout.issuer_seed_file", &co.issuer_seed_file)?;
        let issuer = KeyPair::from_seed_text_kind(seed.expose(), Kind::Account).map_err(|e| {
            c.err(
                "callout.issuer_seed_file",
                format!(
                    "{}: not an account seed (SA…): it {e} (fix: imlink-auth keygen --out DIR writes one)",
                    c.resolve(&co.issuer_seed_file).display()
                ),
            )
        })?;
        let account = co.account.unwrap_or_else(|| "APP".to_string());
        if account.is_empty()
            || account.len() > 64
            || !account
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(c.err(
                "callout.account",
                "must be 1-64 of A-Za-z0-9_- (the account MQTT users land in)",
            ));
        }
        let clock_skew = c.dur("callout.clock_skew", co.clock_skew, Duration::from_secs(30))?;
        if clock_skew > Duration::from_secs(600) {
            return Err(c.err(
                "callout.clock_skew",
                "must be at most 10m (a larger skew is a clock to fix)",
            ));
        }
        let operator_session = c.dur(
            "callout.operator_session",
            co.operator_session,
            Duration::from_secs(12 * 3600),
        )?;
        if operator_session < Duration::from_secs(60)
            || operator_session > Duration::from_secs(7 * 86400)
        {
            return Err(c.err("callout.operator_session", "must be between 1m and 7d"));
        }

        // [apps.N]
        if raw.apps.is_empty() {
            return Err(c.err(
                "apps",
                "no app is configured (fix: add [apps.<SDKAppID>] with key_files = [\"/etc/imlink-auth/app.key\"])",
            ));
        }
        let mut apps = Vec::new();
        for (id, a) in &raw.apps {
            let key = format!("apps.{id}");
            let sdk_app_id: u64 = id
                .parse()
                .ok()
                .filter(|n: &u64| n.to_string() == *id)
                .ok_or_else(|| {
                    c.err(
                        &key,
                        "the table name must be the SDKAppID in decimal, e.g. [apps.1400000000]",
                    )
                })?;
            if a.key_files.is_empty() || a.key_files.len() > 2 {
                return Err(c.err(
                    &format!("{key}.key_files"),
                    "must list one key file, or two during a key rotation",
                ));
            }
            let mut keys = Vec::new();
            for (i, f) in a.key_files.iter().enumerate() {
                keys.push(c.secret(&format!("{key}.key_files[{i}]"), f)?);
            }
            if keys.len() == 2 && keys[0] == keys[1] {
                return Err(c.err(&format!("{key}.key_files"), "both files hold the same key"));
            }
            apps.push(App { sdk_app_id, keys });
        }

        // [operators.NAME]
        let operator_key = Rules::new_operator_key()
            .map_err(|_| c.err("operators", "the system has no random source"))?;
        let mut operators = BTreeMap::new();
        for (name, o) in &raw.operators {
            let key = format!("operators.{name}");
            if !is_id(name) {
                return Err(c.err(
                    &key,
                    "an operator name is 1-32 of A-Za-z0-9_- (it logs in as @NAME)",
                ));
            }
            if !raw.apps.contains_key(&o.sdk_app_id.to_string()) {
                return Err(c.err(
                    &format!("{key}.sdk_app_id"),
                    format!("{} is not one of the [apps] configured", o.sdk_app_id),
                ));
            }
            let secret = c.secret(&format!("{key}.secret_file"), &o.secret_file)?;
            if secret.expose().len() < 16 {
                return Err(c.err(
                    &format!("{key}.secret_file"),
                    "the secret is shorter than 16 characters",
                ));
            }
            operators.insert(
                name.clone(),
                Operator::new(o.sdk_app_id, &secret, &operator_key),
            );
        }

        // [log]
        let l = raw.log;
        let level = match l.level.as_deref().unwrap_or("info") {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            other => {
                return Err(c.err(
                    "log.level",
                    format!("{other:?}: use error, warn, info, debug or trace"),
                ));
            }
        };
        let decisions_per_second = l.decisions_per_second.unwrap_or(20);
        let decisions_burst = l.decisions_burst.unwrap_or(100);
        if decisions_burst < decisions_per_second {
            return Err(c.err(
                "log.decisions_burst",
                "must be at least log.decisions_per_second",
            ));
        }
        let summary_interval = c.dur(
            "log.summary_interval",
            l.summary_interval,
            Duration::from_secs(10),
        )?;
        let stats_interval = c.dur(
            "log.stats_interval",
            l.stats_interval,
            Duration::from_secs(300),
        )?;
        if summary_interval < Duration::from_secs(1) {
            return Err(c.err("log.summary_interval", "must be at least 1s"));
        }
        if stats_interval < Duration::from_secs(1) {
            return Err(c.err("log.stats_interval", "must be at least 1s"));
        }

        let rules = Rules::new(
            apps,
            operators,
            operator_key,
            clock_skew.as_secs(),
            operator_session.as_secs(),
        );
        Ok(Config {
            file: file.to_path_buf(),
            nats: NatsSettings {
                urls,
                user: n.user,
                password,
                tls,
                queue_group,
                name,
                connect_timeout,
                ping_interval,
                reconnect_delay_min,
                reconnect_delay_max,
            },
            issuer,
            account,
            clock_skew,
            rules,
            log: LogSettings {
                level,
                decisions_per_second,
                decisions_burst,
                summary_interval,
                stats_interval,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::write_secret_file;

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "imlink-auth-config-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn setup() -> (PathBuf, String) {
        let d = dir();
        write_secret_file(&d.join("pw"), "nats-pass\n", true).unwrap();
        let seed = KeyPair::generate(Kind::Account).unwrap().seed_text();
        write_secret_file(&d.join("issuer.nk"), &seed, true).unwrap();
        write_secret_file(&d.join("app.key"), "k1", true).unwrap();
        write_secret_file(&d.join("app.next.key"), "k2", true).unwrap();
        write_secret_file(&d.join("op"), "0123456789abcdef0123", true).unwrap();
        let text = r#"
[nats]
urls = ["nats://127.0.0.1:4222", "nats://[::1]:4223"]
user = "auth"
password_file = "pw"

[callout]
issuer_seed_file = "issuer.nk"

[apps.1400000000]
key_files = ["app.key", "app.next.key"]

[operators.monitor]
sdk_app_id = 1400000000
secret_file = "op"
"#
        .to_string();
        (d, text)
    }

    fn load(d: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::from_text(&d.join("imlink-auth.toml"), text)
    }

    #[test]
    fn the_minimal_config_loads_with_its_defaults() {
        let (d, text) = setup();
        let c = load(&d, &text).unwrap();
        assert_eq!(c.nats.urls.len(), 2);
        assert_eq!(c.nats.urls[1].to_string(), "nats://[::1]:4223");
        assert_eq!(c.nats.password.expose(), "nats-pass");
        assert_eq!(c.nats.queue_group, "imlink-auth");
        assert_eq!(c.account, "APP");
        assert_eq!(c.clock_skew, Duration::from_secs(30));
        assert_eq!(c.log.decisions_per_second, 20);
        assert!(c.nats.tls.is_none());
        // No secret in Debug.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("nats-pass") && !dbg.contains(&c.issuer.seed_text()));
    }

    #[test]
    fn the_documented_example_config_parses() {
        // config/imlink-auth.toml, with its paths pointed at files made here.
        let (d, _) = setup();
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/imlink-auth.toml"),
        )
        .unwrap();
        let ca = d.join("ca.pem");
        std::fs::write(&ca, test_ca()).unwrap();
        let text = example
            .replace("/etc/imlink-auth/nats-ca.pem", &ca.display().to_string())
            .replace(
                "/etc/imlink-auth/nats-password",
                &d.join("pw").display().to_string(),
            )
            .replace(
                "/etc/imlink-auth/issuer.nk",
                &d.join("issuer.nk").display().to_string(),
            )
            .replace(
                "/etc/imlink-auth/app-1400000000.key",
                &d.join("app.key").display().to_string(),
            )
            .replace(
                "/etc/imlink-auth/operator-monitor.secret",
                &d.join("op").display().to_string(),
            );
        let c = load(&d, &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.nats.tls.is_some());
    }

    fn err(d: &Path, text: &str) -> String {
        load(d, text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_fix() {
        let (d, text) = setup();
        let file = d.join("imlink-auth.toml").display().to_string();
        let e = err(
            &d,
            &text.replace("user = \"auth\"", "user = \"auth\"\nuser_name = \"x\""),
        );
        assert!(
            e.starts_with(&file) && e.contains("line 5") && e.contains("user_name"),
            "{e}"
        );
        let e = err(
            &d,
            &text.replace("nats://127.0.0.1:4222", "nats://10.0.0.1:4222"),
        );
        assert!(
            e.contains("nats.urls[0]") && e.contains("tls://10.0.0.1:4222"),
            "{e}"
        );
        let e = err(
            &d,
            &text.replace("nats://127.0.0.1:4222", "tls://10.0.0.1:4222"),
        );
        assert!(e.contains("nats.ca_file") && e.contains("required"), "{e}");
        let e = err(&d, &text.replace("[apps.1400000000]", "[apps.x14]"));
        assert!(e.contains("apps.x14"), "{e}");
        let e = err(&d, &text.replace("\"app.key\", \"app.next.key\"", ""));
        assert!(
            e.contains("apps.1400000000.key_files") && e.contains("rotation"),
            "{e}"
        );
        let e = err(
            &d,
            &text.replace("sdk_app_id = 1400000000", "sdk_app_id = 7"),
        );
        assert!(e.contains("operators.monitor.sdk_app_id"), "{e}");
        let e = err(&d, &format!("{text}\n[log]\nlevel = \"loud\"\n"));
        assert!(e.contains("log.level") && e.contains("\"loud\""), "{e}");
        let e = err(&d, &format!("{text}\n[log]\nsummary_interval = \"soon\"\n"));
        assert!(
            e.contains("log.summary_interval") && e.contains("250ms"),
            "{e}"
        );
        let e = err(
            &d,
            &text.replace("[callout]", "[callout]\naccount = \"A.B\""),
        );
        assert!(e.contains("callout.account"), "{e}");
    }

    #[test]
    fn secret_files_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let (d, text) = setup();
        std::fs::set_permissions(d.join("app.key"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = err(&d, &text);
        assert!(
            e.contains("apps.1400000000.key_files[0]")
                && e.contains("0644")
                && e.contains("chmod 600"),
            "{e}"
        );
        let (d, text) = setup();
        write_secret_file(
            &d.join("issuer.nk"),
            &KeyPair::generate(Kind::User).unwrap().seed_text(),
            true,
        )
        .unwrap();
        let e = err(&d, &text);
        assert!(
            e.contains("callout.issuer_seed_file") && e.contains("keygen"),
            "{e}"
        );
        // Never the seed in the error.
        let seed = std::fs::read_to_string(d.join("issuer.nk")).unwrap();
        assert!(!e.contains(seed.trim()));
        let (d, text) = setup();
        write_secret_file(&d.join("app.next.key"), "k1", true).unwrap();
        assert!(err(&d, &text).contains("same key"));
        let (d, text) = setup();
        write_secret_file(&d.join("op"), "short", true).unwrap();
        assert!(err(&d, &text).contains("operators.monitor.secret_file"));
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_nats_url("tls://nats-1.example:4443").unwrap(),
            NatsUrl {
                tls: true,
                host: "nats-1.example".into(),
                port: 4443
            }
        );
        assert_eq!(parse_nats_url("tls://n").unwrap().port, 4222);
        assert_eq!(parse_nats_url("tls://[fe80::1]:5").unwrap().host, "fe80::1");
        assert!(parse_nats_url("nats://127.0.0.2:4222").is_ok());
        for bad in [
            "http://x:1",
            "nats://localhost:4222",
            "tls://:1",
            "tls://x:0",
            "tls://x:70000",
            "tls://u:p@x:1",
            "tls://x:1/path",
            "tls://[::1",
        ] {
            assert!(parse_nats_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5 weeks"), None);
    }

    /// A throwaway CA certificate, made for the test.
    fn test_ca() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    }
}
