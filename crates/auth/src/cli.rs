//! The command line: serve, `--check-config`, `keygen`. Exit codes: 0; 1 a runtime failure;
//! 2 a usage error; 78 (EX_CONFIG) a bad configuration — the unit's
//! `RestartPreventExitStatus=78` keeps systemd from restarting into the same error.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::client::Driver;
use crate::config::{Config, DEFAULT_PATH};
use crate::keygen::{KeygenOptions, keygen};
use crate::service::Service;

pub const EX_CONFIG: u8 = 78;

const USAGE: &str = "\
imlink-auth — the IM service's rules as a NATS auth-callout service

USAGE:
  imlink-auth [--config PATH]            serve (default config /etc/imlink-auth/imlink-auth.toml)
  imlink-auth --check-config [--config PATH]
                                         validate the config and its secret files; exit 0 or 78
  imlink-auth keygen --out DIR [--account APP] [--auth-user auth] [--timeout SECONDS] [--force]
                                         write DIR/issuer.nk, DIR/nats-password and
                                         DIR/nats-auth.conf (0600) and print the nats-server
                                         blocks to put in every node's config
  imlink-auth --version | --help

Every key of the config is documented in /usr/share/doc/imlink-auth/imlink-auth.toml (the
example config); the production guide is docs/deploy.md.
";

enum Mode {
    Serve(PathBuf),
    Check(PathBuf),
    Keygen(KeygenOptions),
    Help,
    Version,
}

fn parse_args(args: &[String]) -> Result<Mode, String> {
    if args.first().map(String::as_str) == Some("keygen") {
        let mut o = KeygenOptions {
            out: PathBuf::new(),
            account: "APP".into(),
            auth_user: "auth".into(),
            timeout_s: 2,
            force: false,
        };
        let mut out = None;
        let mut it = args[1..].iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--out" => out = Some(PathBuf::from(value("--out")?)),
                "--account" => o.account = value("--account")?,
                "--auth-user" => o.auth_user = value("--auth-user")?,
                "--timeout" => {
                    let v = value("--timeout")?;
                    o.timeout_s = v
                        .parse()
                        .map_err(|_| format!("--timeout {v:?}: whole seconds, 1-60"))?;
                }
                "--force" => o.force = true,
                "-h" | "--help" => return Ok(Mode::Help),
                other => return Err(format!("keygen: unknown argument {other:?}")),
            }
        }
        o.out = out.ok_or("keygen needs --out DIR")?;
        return Ok(Mode::Keygen(o));
    }
    let mut config = PathBuf::from(DEFAULT_PATH);
    let mut check = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => config = PathBuf::from(it.next().ok_or("--config needs a path")?),
            s if s.starts_with("--config=") => config = PathBuf::from(&s["--config=".len()..]),
            "--check-config" => check = true,
            "-h" | "--help" => return Ok(Mode::Help),
            "-V" | "--version" => return Ok(Mode::Version),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(if check {
        Mode::Check(config)
    } else {
        Mode::Serve(config)
    })
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse_args(&args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("imlink-auth: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Mode::Version => {
            println!("imlink-auth {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Mode::Keygen(o) => match keygen(&o) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(crate::keygen::KeygenError::Usage(e)) => {
                eprintln!("imlink-auth keygen: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("imlink-auth keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Mode::Check(path) => match Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: valid ({} node(s), issuer {}, account {})",
                    path.display(),
                    c.nats.urls.len(),
                    c.issuer.public(),
                    c.account
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("imlink-auth: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Mode::Serve(path) => serve(path),
    }
}

fn serve(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imlink-auth: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Under systemd the journal stamps each line: no second timestamp.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(config.log.level);
    if journal {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imlink-auth: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                eprintln!("imlink-auth: cannot install the signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let Config {
            nats,
            issuer,
            account,
            clock_skew,
            rules,
            log,
            ..
        } = config;
        tracing::info!(
            issuer = %issuer.public(),
            account = %account,
            nodes = nats.urls.len(),
            queue_group = %nats.queue_group,
            "imlink-auth {} starting",
            env!("CARGO_PKG_VERSION")
        );
        let service = Service::new(rules, issuer, account, clock_skew);
        let notify = |state: &str| {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(state)]);
        };
        // Ready once the configuration and every key are loaded: connecting to a node is the
        // service's ongoing job (a cluster that is down does not make the unit fail to start).
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let mut driver = Driver::new(&nats, &service, &log, Box::new(notify));
        driver
            .run(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            })
            .await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("imlink-auth stopped");
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        assert!(
            matches!(parse_args(&a(&[])), Ok(Mode::Serve(p)) if p == std::path::Path::new(DEFAULT_PATH))
        );
        assert!(
            matches!(parse_args(&a(&["--config", "x", "--check-config"])), Ok(Mode::Check(p)) if p == std::path::Path::new("x"))
        );
        assert!(
            matches!(parse_args(&a(&["--config=y"])), Ok(Mode::Serve(p)) if p == std::path::Path::new("y"))
        );
        assert!(
            matches!(parse_args(&a(&["keygen", "--out", "d", "--force"])), Ok(Mode::Keygen(o)) if o.force && o.out == std::path::Path::new("d"))
        );
        assert!(parse_args(&a(&["keygen"])).is_err());
        assert!(parse_args(&a(&["--bogus"])).is_err());
        assert!(parse_args(&a(&["keygen", "--out", "d", "--timeout", "x"])).is_err());
    }
}
