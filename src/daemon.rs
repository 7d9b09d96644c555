//! `imlinkd` itself: load the config, start the session driver and the local API, tell
//! systemd, handle signals (SIGTERM/SIGINT: log out cleanly and exit; SIGHUP: reload).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use crate::config::{self, Config};
use crate::driver::Driver;
use crate::status::{Command, SessionHandle};
use crate::{api, logging, systemd};

/// sysexits.h EX_CONFIG: the unit file's `RestartPreventExitStatus=78` stops restart loops on
/// a bad config.
pub const EX_CONFIG: u8 = 78;
/// sysexits.h EX_SOFTWARE: an internal error (the session driver panicked). Non-zero, so
/// `Restart=on-failure` restarts too, not only the unit's `Restart=always`.
pub const EX_SOFTWARE: u8 = 70;
/// How long a clean logout may take on SIGTERM before the daemon exits anyway.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const USAGE: &str = "\
imlinkd — keeps one IM login session alive over MQTT v5/TLS

USAGE:
  imlinkd [--config PATH]          run the daemon (default config /etc/imlinkd/imlinkd.toml)
  imlinkd --check-config [--config PATH]
                                   validate the config and exit (0 valid, 78 invalid)
  imlinkd --version | --help

Environment: IMLINKD__SECTION__KEY overrides a config key (e.g. IMLINKD__BROKER__URL).
Signals: SIGTERM/SIGINT log out cleanly and exit; SIGHUP reloads the config.
The local API listens on api.socket (default /run/imlinkd/api.sock); use `imlinkctl`.
";

enum Mode {
    Run(PathBuf),
    Check(PathBuf),
    Help,
    Version,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let mut path = PathBuf::from(config::DEFAULT_PATH);
    let mut check = false;
    let mut args = args.skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--config" => {
                path = PathBuf::from(args.next().ok_or("--config needs a path")?);
            }
            s if s.starts_with("--config=") => path = PathBuf::from(&s["--config=".len()..]),
            "--check-config" => check = true,
            "-h" | "--help" => return Ok(Mode::Help),
            "-V" | "--version" => return Ok(Mode::Version),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(if check {
        Mode::Check(path)
    } else {
        Mode::Run(path)
    })
}

pub fn main() -> ExitCode {
    let mode = match parse_args(std::env::args()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("imlinkd: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Mode::Version => {
            println!("imlinkd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Mode::Check(path) => match Config::load(&path) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("imlinkd: warning: {w}");
                }
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("imlinkd: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Mode::Run(path) => run(&path),
    }
}

fn config_failure(message: &str) -> ExitCode {
    eprintln!("imlinkd: {message}");
    systemd::failed(
        &format!("configuration error: {message}"),
        u32::from(EX_CONFIG),
    );
    ExitCode::from(EX_CONFIG)
}

/// No core dumps of this process: one (a watchdog SIGABRT, a crash) would put the UserSig,
/// the device token and TLS private keys on disk. (The unit also sets `LimitCORE=0`.)
fn refuse_core_dumps() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if r != 0 {
        eprintln!(
            "imlinkd: warning: could not disable core dumps ({}); secrets could end up in one",
            std::io::Error::last_os_error()
        );
    }
}

/// One malloc arena for the whole process (glibc). glibc gives each new thread its own arena
/// (64 MiB reserved, its touched pages private): the store thread's alone held ~70 KiB of a
/// daemon whose private memory is under 700 KiB. The daemon has two busy threads and little
/// allocation traffic, so one arena costs no measurable contention (benches/messaging.rs).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn run(path: &Path) -> ExitCode {
    one_malloc_arena();
    refuse_core_dumps();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return config_failure(&e.to_string()),
    };
    logging::init(config.log_level);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // At most 4 blocking helpers (DNS lookups, cache writes): the unit's TasksMax=16 holds.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imlinkd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(serve(path, config))
}

/// The state directory holds the UserSig cache (a secret) and the MQTT relay's socket: it
/// must be a real directory (not a symlink), owned by the daemon's user, and closed to
/// everyone else (0700, made so if it is not).
pub fn prepare_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let what = |e: &dyn std::fmt::Display| format!("state_dir {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| what(&e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| what(&e))?;
    if !meta.file_type().is_dir() {
        return Err(what(
            &"is not a directory (a symlink?): point state_dir at a directory of the daemon's own",
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(what(&format!(
            "is owned by uid {}, not by the daemon's uid {me}: it holds the UserSig cache; \
             chown it, or point state_dir elsewhere",
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            what(&format!(
                "is open to other users and could not be made 0700 ({e}): it holds the UserSig cache"
            ))
        })?;
    }
    Ok(())
}

async fn serve(path: &Path, config: Config) -> ExitCode {
    if let Err(e) = prepare_state_dir(&config.state_dir) {
        return config_failure(&format!("{}: {e}", config.path.display()));
    }
    let (driver, session) = match Driver::new(config.clone(), config.api.watcher_queue) {
        Ok(d) => d,
        Err(e) => return config_failure(&format!("{}: {e}", config.path.display())),
    };
    let bound = match api::bind(&config.api) {
        Ok(b) => b,
        Err(e @ api::BindError::NoSuchGroup(_)) => {
            return config_failure(&format!("{}: {e}", config.path.display()));
        }
        Err(e) => {
            eprintln!("imlinkd: local API: {e}");
            systemd::failed(&format!("local API: {e}"), 1);
            return ExitCode::FAILURE;
        }
    };
    let api_server = api::Server::new(config.api.clone(), session.clone());
    let api_task = tokio::spawn(api_server.serve(bound.listener));
    let watchdog = systemd::watchdog_interval();
    let mut driver = driver;
    driver.set_watchdog(watchdog);
    // SIGTERM reaches the driver as its shutdown future (mini-redis's `run(listener,
    // shutdown)`): it logs out cleanly, then ends.
    let (stop, stopped) = oneshot::channel::<()>();
    let mut driver_task = tokio::spawn(driver.run(async {
        let _ = stopped.await;
    }));
    // READY: the config is valid and the API serves (being online is not required).
    systemd::ready(&session.status.borrow().summary.clone());
    let mirror = tokio::spawn(systemd::mirror_status(session.status.clone()));
    let textfile = config
        .metrics_textfile
        .clone()
        .map(|p| tokio::spawn(crate::metrics::textfile(session.clone(), p)));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %config.api.socket.display(),
        watchdog = ?watchdog,
        "imlinkd started"
    );

    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    let (mut term, mut int, mut hup) = match signals {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        _ => {
            tracing::error!("could not install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let mut exited = false;
    let mut code = ExitCode::SUCCESS;
    let started = config.clone();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(path, &session, &started).await,
            ended = &mut driver_task => {
                exited = true;
                if let Err(e) = ended {
                    // A bug, not a policy: exit non-zero so the service manager restarts us.
                    tracing::error!("the session driver failed: {}", driver_failure(&e));
                    systemd::failed("the session driver failed (a bug); restarting", u32::from(EX_SOFTWARE));
                    code = ExitCode::from(EX_SOFTWARE);
                }
                break;
            }
        }
    }
    if !exited {
        systemd::stopping();
        tracing::info!("stopping: logging out");
        let _ = stop.send(());
        if tokio::time::timeout(STOP_TIMEOUT, &mut driver_task)
            .await
            .is_err()
        {
            tracing::warn!("the logout did not finish within {STOP_TIMEOUT:?}; exiting anyway");
        }
    }
    api_task.abort();
    mirror.abort();
    if let Some(t) = textfile {
        t.abort();
    }
    api::cleanup(bound.owned_path.as_deref());
    tracing::info!("imlinkd stopped");
    systemd::flush(Duration::from_secs(1));
    code
}

/// What a failed driver task says, without its payload (a panic message could quote
/// anything; it is not echoed).
fn driver_failure(e: &tokio::task::JoinError) -> &'static str {
    if e.is_panic() {
        "it panicked"
    } else {
        "it was cancelled"
    }
}

/// SIGHUP: load and validate the file again; a bad new config keeps the running one, and
/// STATUS= says so.
/// `started`: the config the process started with (what `[api]`, `log_level` and
/// `state_dir` still are: a reload does not apply them).
async fn reload(path: &Path, session: &SessionHandle, started: &Config) {
    systemd::reloading();
    let problem = match Config::load(path) {
        Ok(config) => {
            for w in &config.warnings {
                tracing::warn!("{w}");
            }
            // What a reload cannot apply: say so, instead of silently keeping the old values.
            if config.api != started.api {
                tracing::warn!(
                    "{}: [api] changed; the local API keeps its running settings until imlinkd \
                     restarts (systemctl restart imlinkd)",
                    config.path.display()
                );
            }
            if config.log_level != started.log_level {
                tracing::warn!(
                    "{}: log_level changed; it takes effect when imlinkd restarts",
                    config.path.display()
                );
            }
            if config.state_dir != started.state_dir {
                tracing::warn!(
                    "{}: state_dir changed; it takes effect when imlinkd restarts",
                    config.path.display()
                );
            }
            let (tx, rx) = oneshot::channel();
            let sent = session
                .commands
                .send(Command::Reload {
                    config: Box::new(config),
                    reply: tx,
                })
                .await;
            match (sent, rx.await) {
                (Ok(()), Ok(Ok(()))) => {
                    tracing::info!("configuration reloaded");
                    None
                }
                (_, Ok(Err(e))) => Some(format!("could not apply the new configuration ({e})")),
                _ => Some("the session driver is gone".to_string()),
            }
        }
        Err(e) => Some(format!("the new configuration is invalid: {e}")),
    };
    let summary = session.status.borrow().summary.clone();
    match problem {
        None => systemd::ready(&summary),
        Some(p) => {
            tracing::error!("{p}; keeping the running one");
            systemd::ready(&format!(
                "{summary} (reload failed, running configuration kept: {p})"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> impl Iterator<Item = String> {
        std::iter::once("imlinkd".to_string()).chain(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_state_dir_must_be_a_private_directory_of_the_daemons_own() {
        use std::os::unix::fs::MetadataExt;
        let base = std::env::temp_dir().join(format!("imlinkd-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        // Created 0700; an open one is closed.
        let dir = base.join("s");
        prepare_state_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        prepare_state_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // A symlink to a directory is not one.
        let link = base.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(prepare_state_dir(&link).unwrap_err().contains("symlink"));
        // Someone else's directory (needs root to arrange): refused, naming the fix.
        if nix::unistd::geteuid().is_root() {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(54_321)), None).unwrap();
            let e = prepare_state_dir(&theirs).unwrap_err();
            assert!(
                e.contains("owned by uid 54321") && e.contains("chown"),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn arguments_parse() {
        assert!(
            matches!(parse_args(args(&[])), Ok(Mode::Run(p)) if p == Path::new(config::DEFAULT_PATH))
        );
        assert!(
            matches!(parse_args(args(&["--config", "x.toml"])), Ok(Mode::Run(p)) if p == Path::new("x.toml"))
        );
        assert!(
            matches!(parse_args(args(&["--config=y", "--check-config"])), Ok(Mode::Check(p)) if p == Path::new("y"))
        );
        assert!(matches!(parse_args(args(&["-V"])), Ok(Mode::Version)));
        assert!(parse_args(args(&["--config"])).is_err());
        assert!(parse_args(args(&["--bogus"])).is_err());
    }
}
