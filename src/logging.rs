//! Logging: natively to journald (with structured fields) when stderr is connected to the
//! journal, otherwise plain lines on stderr (colour only on a terminal).
//!
//! Journal fields: every field of an imlinkd log event becomes `IMLINKD_<NAME>`; the ones to
//! query by are `IMLINKD_PHASE`, `IMLINKD_CODE`, `IMLINKD_CLASS`, `IMLINKD_USER_ID` (see
//! `docs/operations.md`). Dependencies' `log` records (rumqttc, rustls) are not bridged: they
//! could carry packet dumps.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Journald,
    Stderr,
}

/// Whether `JOURNAL_STREAM` (`device:inode`) names our stderr: then systemd connected stderr to
/// the journal and native journald logging keeps the structured fields.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        // The casts are no-ops on x86_64 but not on every target (32-bit ARM's ino_t).
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Install the global subscriber. Returns where logs go.
pub fn init(level: Level) -> Target {
    let filter = Targets::new()
        .with_target("imlinkd", level)
        .with_default(LevelFilter::WARN);
    if stderr_is_journal()
        && let Ok(layer) = tracing_journald::layer()
    {
        let layer = layer
            .with_field_prefix(Some("IMLINKD".into()))
            .with_syslog_identifier("imlinkd".into());
        let subscriber = tracing_subscriber::registry().with(layer.with_filter(filter));
        if tracing::subscriber::set_global_default(subscriber).is_ok() {
            return Target::Journald;
        }
        return Target::Stderr;
    }
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let subscriber = tracing_subscriber::registry().with(layer.with_filter(filter));
    let _ = tracing::subscriber::set_global_default(subscriber);
    Target::Stderr
}
