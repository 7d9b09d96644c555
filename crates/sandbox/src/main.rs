//! `imlink-sandbox`: run the reference IM service, or issue one UserSig.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use imlink_sandbox::{Sandbox, SandboxOptions};

const USAGE: &str = "\
imlink-sandbox — the reference IM service for imlinkd (development and tests only)

USAGE:
  imlink-sandbox [--listen ADDR] [--mqtt-port N] [--provisioning-port N] [--admin-port N]
                 [--state-dir DIR] [--sig-lifetime DURATION] [--sdk-app-id N] [--key KEY]
                 [--require-client-cert] [--multi-login single|dual|triple|multi]
                 [--max-instances-per-platform N] [--offline-limit N]
                 [--operator NAME]... [--max-retained N] [--max-retained-bytes N] [--no-retain]
  imlink-sandbox --issue-sig --user U --sdk-app-id N --key KEY --expire SECONDS [--time UNIX]

Serving prints the endpoints as JSON (MQTT URL, provisioning URL template, admin URL, CA
path, device token, admin token) and writes them to DIR/endpoints.json. Ports default to
ephemeral ones; DURATION is seconds or a number with s, m, h or d (default 24h).

--multi-login: which platforms (the {platform} of the client id) may be online at once:
single (one), dual (a mobile or desktop one, plus web), triple (mobile, desktop and web),
multi (all; the default). --max-instances-per-platform N: a login beyond N instances of one
platform kicks the earliest (DISCONNECT 0x8E, 6208; 0 = no limit, the default).
--offline-limit N: C2C messages kept per offline user before PUBACK 0x97 (default 1000).

Device status (docs/brokers.md): a device may publish, retained, only to
im/{app}/d/{user}/{platform}/{instance}/status of its client id; wills are published when a
connection ends without a normal DISCONNECT. --operator NAME adds an operator identity (user
name NAME, a random token as password, written to DIR/operator-NAME.token and endpoints.json)
that may read im/{app}/d/# and publish nothing. --max-retained N / --max-retained-bytes N
bound the retained messages (default 100000 and 64 MiB; beyond: PUBACK 0x97); --no-retain
emulates a broker without retained messages (Retain Available 0).

--issue-sig prints one TLS-sig-api-v2 UserSig and exits (time defaults to now).
";

fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(mult).map(Duration::from_secs)
}

struct Args {
    opts: SandboxOptions,
    issue: bool,
    user: Option<String>,
    expire: Option<u64>,
    time: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        opts: SandboxOptions::default(),
        issue: false,
        user: None,
        expire: None,
        time: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--listen" => {
                let v = value("--listen")?;
                a.opts.listen = v
                    .parse()
                    .map_err(|_| format!("--listen {v}: not an IP address"))?
            }
            "--mqtt-port" | "--provisioning-port" | "--admin-port" => {
                let v = value(&flag)?;
                let port: u16 = v.parse().map_err(|_| format!("{flag} {v}: not a port"))?;
                match flag.as_str() {
                    "--mqtt-port" => a.opts.mqtt_port = port,
                    "--provisioning-port" => a.opts.provisioning_port = port,
                    _ => a.opts.admin_port = port,
                }
            }
            "--state-dir" => a.opts.state_dir = Some(PathBuf::from(value("--state-dir")?)),
            "--sig-lifetime" => {
                let v = value("--sig-lifetime")?;
                a.opts.sig_lifetime = parse_duration(&v)
                    .ok_or_else(|| format!("--sig-lifetime {v}: use e.g. 90, 30s, 15m, 24h"))?
            }
            "--sdk-app-id" => {
                let v = value("--sdk-app-id")?;
                a.opts.sdk_app_id = v
                    .parse()
                    .map_err(|_| format!("--sdk-app-id {v}: not a number"))?
            }
            "--key" => a.opts.secret_key = Some(value("--key")?),
            "--require-client-cert" => a.opts.require_client_cert = true,
            "--multi-login" => {
                let v = value("--multi-login")?;
                a.opts.multi_login =
                    imlink_sandbox::state::MultiLogin::parse(&v).ok_or_else(|| {
                        format!("--multi-login {v}: use single, dual, triple or multi")
                    })?
            }
            "--max-instances-per-platform" | "--offline-limit" => {
                let v = value(flag.as_str())?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("{flag} {v}: not a whole number"))?;
                if flag == "--offline-limit" {
                    a.opts.offline_limit = n;
                } else {
                    a.opts.max_instances_per_platform = n;
                }
            }
            "--operator" => {
                let name = value("--operator")?;
                if !imlink_sandbox::provision::valid_user_id(&name) {
                    return Err(format!("--operator {name}: not a valid user name"));
                }
                a.opts
                    .operators
                    .push((name, imlink_sandbox::Control::random_token()));
            }
            "--max-retained" | "--max-retained-bytes" => {
                let v = value(flag.as_str())?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("{flag} {v}: not a whole number"))?;
                if flag == "--max-retained" {
                    a.opts.max_retained = n;
                } else {
                    a.opts.max_retained_bytes = n;
                }
            }
            "--no-retain" => a.opts.retain_available = false,
            "--issue-sig" => a.issue = true,
            "--user" => a.user = Some(value("--user")?),
            "--expire" => {
                let v = value("--expire")?;
                a.expire = Some(
                    v.parse()
                        .map_err(|_| format!("--expire {v}: not seconds"))?,
                )
            }
            "--time" => {
                let v = value("--time")?;
                a.time = Some(
                    v.parse()
                        .map_err(|_| format!("--time {v}: not Unix seconds"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("imlink-sandbox: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.issue {
        let (Some(user), Some(key), Some(expire)) = (
            args.user.as_deref(),
            args.opts.secret_key.as_deref(),
            args.expire,
        ) else {
            eprintln!("imlink-sandbox: --issue-sig needs --user, --key and --expire");
            return ExitCode::from(2);
        };
        let time = args.time.unwrap_or_else(imlink_sandbox::state::unix_now);
        println!(
            "{}",
            imlink_usersig::generate(&imlink_usersig::SigParams {
                sdk_app_id: args.opts.sdk_app_id,
                secret_key: key,
                identifier: user,
                time,
                expire,
                userbuf: None,
            })
        );
        return ExitCode::SUCCESS;
    }

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imlink-sandbox: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        // Handlers first: whoever reads the endpoints may send SIGTERM right away.
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("imlink-sandbox: installing the SIGTERM handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let mut int =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("imlink-sandbox: installing the SIGINT handler: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let sandbox = match Sandbox::start(args.opts).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("imlink-sandbox: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut shown = serde_json::to_value(sandbox.endpoints()).unwrap_or_default();
        if let Some(m) = shown.as_object_mut() {
            m.remove("ca_pem");
        }
        println!("{}", serde_json::to_string_pretty(&shown).unwrap_or_default());
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("imlink-sandbox stopping");
        drop(sandbox);
        ExitCode::SUCCESS
    })
}
