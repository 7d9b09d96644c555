//! `imlinkctl`: the command-line client of the local API (and a UserSig decoder).
//!
//! Exit codes: 0 success; 1 the operation failed (login refused, wait timed out, bad UserSig);
//! 2 usage error; 3 the daemon cannot be reached; 4 permission denied.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub const DEFAULT_SOCKET: &str = "/run/imlinkd/api.sock";

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_DENIED: u8 = 4;

const USAGE: &str = "\
imlinkctl — talk to imlinkd over its local API

USAGE:
  imlinkctl [--socket PATH] status [--json]      the session's state
  imlinkctl [--socket PATH] watch [--json]       follow events, one line each (--json: NDJSON)
  imlinkctl [--socket PATH] login [USER] [--user-sig-file FILE|-] [--timeout 30s]
                                                 log in (USER: switch accounts; with the UserSig in
                                                 FILE, or on stdin with -, when the app brings it);
                                                 waits until online
  imlinkctl [--socket PATH] logout [--timeout 30s]
  imlinkctl [--socket PATH] wait --phase PHASE [--timeout 30s]
                                                 exit 0 when the phase is reached, 1 on timeout
  imlinkctl [--socket PATH] version
  imlinkctl [--socket PATH] send PEER TEXT|- [--custom]
                                                 send a message (- reads it from stdin); prints its id
  imlinkctl [--socket PATH] conversations [--before CURSOR] [--limit N] [--json]
                                                 newest first, a page at a time (20 by default)
  imlinkctl [--socket PATH] history PEER [--before ID] [--limit N] [--json]
                                                 a page (20 by default) ending with the newest,
                                                 newest last; works offline and logged out
  imlinkctl [--socket PATH] inbox [--follow] [--max N]
                                                 print the current account's received messages
                                                 as JSON lines (with the user_id whose inbox it
                                                 is), then acknowledge them (at least once: a
                                                 message is acknowledged only after it was
                                                 written out; an account switch meanwhile
                                                 acknowledges what was read, for its user);
                                                 --follow: keep waiting for more; --max N: stop
                                                 after N messages
  imlinkctl [--socket PATH] metrics             the daemon's metrics (Prometheus text format)
  imlinkctl sig decode [--file PATH]             decode a UserSig read from stdin (or a file);
                                                 never from the command line, where `ps` shows it
  imlinkctl fleet --broker URL --user NAME --password-file FILE --sdk-app-id N [--watch] …
                                                 every device's status, read from the broker's
                                                 retained status tree (`imlinkctl fleet --help`)

The socket defaults to $IMLINKD_SOCKET, else /run/imlinkd/api.sock.
Phases: idle waiting_for_clock fetching_sig connecting subscribing online backoff logging_out kicked
        stopped
Exit codes: 0 ok, 1 failed, 2 usage, 3 daemon unreachable, 4 permission denied.
";

struct Fail(u8, String);

impl Fail {
    fn usage(m: impl Into<String>) -> Fail {
        Fail(EXIT_USAGE, format!("{}\n\n{USAGE}", m.into()))
    }
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read the output went away (`imlinkctl fleet --watch | head`): nothing left
        // to do.
        Err(Fail(0, _)) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("imlinkctl: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run(mut args: Vec<String>) -> Result<(), Fail> {
    let mut socket = std::env::var_os("IMLINKD_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    if let Some(i) = args.iter().position(|a| a == "--socket") {
        if i + 1 >= args.len() {
            return Err(Fail::usage("--socket needs a path"));
        }
        socket = PathBuf::from(args.remove(i + 1));
        args.remove(i);
    }
    let flag = |args: &mut Vec<String>, name: &str| -> bool {
        match args.iter().position(|a| a == name) {
            Some(i) => {
                args.remove(i);
                true
            }
            None => false,
        }
    };
    let value = |args: &mut Vec<String>, name: &str| -> Result<Option<String>, Fail> {
        match args.iter().position(|a| a == name) {
            Some(i) if i + 1 < args.len() => {
                let v = args.remove(i + 1);
                args.remove(i);
                Ok(Some(v))
            }
            Some(_) => Err(Fail::usage(format!("{name} needs a value"))),
            None => Ok(None),
        }
    };
    let timeout = |args: &mut Vec<String>| -> Result<Duration, Fail> {
        match value(args, "--timeout")? {
            None => Ok(Duration::from_secs(30)),
            Some(t) => crate::config::parse_duration(&t)
                .ok_or_else(|| Fail::usage(format!("--timeout {t}: use e.g. 30s, 2m"))),
        }
    };
    if args.is_empty() {
        return Err(Fail::usage("no command given"));
    }
    let cmd = args.remove(0);
    match cmd.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        "status" => {
            let json_out = flag(&mut args, "--json");
            no_more(&args)?;
            let st = Client::connect(&socket)?.call("status", json!({}))?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
            } else {
                print!("{}", human_status(&st));
            }
            Ok(())
        }
        "watch" => {
            let json_out = flag(&mut args, "--json");
            no_more(&args)?;
            watch(&socket, json_out)
        }
        "login" => {
            let t = timeout(&mut args)?;
            let sig_file = value(&mut args, "--user-sig-file")?;
            let user = if args.is_empty() {
                None
            } else {
                Some(args.remove(0))
            };
            no_more(&args)?;
            let mut params = json!({ "timeout_ms": t.as_millis() as u64 });
            if let Some(u) = &user {
                params["user_id"] = json!(u);
            }
            if let Some(f) = sig_file {
                let source = if f == "-" {
                    SigSource::Stdin
                } else {
                    SigSource::File(PathBuf::from(f))
                };
                params["user_sig"] = json!(read_sig(source)?);
            }
            let started = Instant::now();
            let r = Client::connect(&socket)?.call_with_timeout(
                "login",
                params,
                t + Duration::from_secs(5),
            )?;
            let who = r.get("login_user").and_then(Value::as_str).unwrap_or("?");
            // Logged in at the CONNACK; online once the broker grants the inbox subscription
            // (phase `subscribing` until then): wait for that too, within the same timeout.
            let left = t.saturating_sub(started.elapsed());
            wait_quietly(&socket, "online", left).map_err(|e| {
                Fail(
                    e.0,
                    format!("logged in as {who}, but not online yet: {}", e.1),
                )
            })?;
            println!("logged in as {who}");
            Ok(())
        }
        "logout" => {
            let t = timeout(&mut args)?;
            no_more(&args)?;
            Client::connect(&socket)?.call_with_timeout(
                "logout",
                json!({ "timeout_ms": t.as_millis() as u64 }),
                t + Duration::from_secs(5),
            )?;
            println!("logged out");
            Ok(())
        }
        "wait" => {
            let t = timeout(&mut args)?;
            let phase = value(&mut args, "--phase")?
                .ok_or_else(|| Fail::usage("wait needs --phase PHASE"))?;
            if crate::session::Phase::parse(&phase).is_none() {
                return Err(Fail::usage(format!("{phase:?} is not a phase")));
            }
            no_more(&args)?;
            wait_for_phase(&socket, &phase, t)
        }
        "version" => {
            no_more(&args)?;
            let v = Client::connect(&socket)?.call("version", json!({}))?;
            println!(
                "imlinkctl {}; imlinkd {} (API {})",
                env!("CARGO_PKG_VERSION"),
                v.get("version").and_then(Value::as_str).unwrap_or("?"),
                v.get("api").cloned().unwrap_or(Value::Null)
            );
            Ok(())
        }
        "send" => {
            let custom = flag(&mut args, "--custom");
            if args.len() != 2 {
                return Err(Fail::usage(
                    "send needs PEER and TEXT (or - to read it from stdin)",
                ));
            }
            let peer = args.remove(0);
            let text = args.remove(0);
            let body = if text == "-" {
                let mut b = String::new();
                std::io::stdin().read_to_string(&mut b).map_err(|e| {
                    Fail(EXIT_FAILED, format!("reading the message from stdin: {e}"))
                })?;
                b
            } else {
                text
            };
            let kind = if custom { "custom" } else { "text" };
            let r = Client::connect(&socket)?.call(
                "send_message",
                json!({ "to": peer, "body": body, "kind": kind }),
            )?;
            println!("{}", r["id"].as_str().unwrap_or("?"));
            Ok(())
        }
        "conversations" => {
            let json_out = flag(&mut args, "--json");
            let before = value(&mut args, "--before")?;
            let limit = page_limit(value(&mut args, "--limit")?)?;
            no_more(&args)?;
            let r = Client::connect(&socket)?.call(
                "get_conversations",
                json!({ "before": before, "limit": limit }),
            )?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                return Ok(());
            }
            let list = r["conversations"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no conversations");
            }
            for c in list {
                println!(
                    "{:<32} {:>4} unread  {}",
                    c["peer"].as_str().unwrap_or("?"),
                    c["unread"],
                    c.get("last").map(one_line).unwrap_or_default()
                );
            }
            if let Some(next) = r["next_before"].as_str() {
                println!("(more: imlinkctl conversations --before {next})");
            }
            Ok(())
        }
        "history" => {
            let json_out = flag(&mut args, "--json");
            let before = value(&mut args, "--before")?;
            let limit = page_limit(value(&mut args, "--limit")?)?;
            if args.len() != 1 {
                return Err(Fail::usage("history needs PEER"));
            }
            let peer = args.remove(0);
            let r = Client::connect(&socket)?.call(
                "get_history",
                json!({ "peer": peer, "before": before, "limit": limit }),
            )?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                return Ok(());
            }
            for m in r["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .rev()
            {
                println!("{}", one_line(m));
            }
            if let Some(next) = r["next_before"].as_str() {
                println!("(older: imlinkctl history {peer} --before {next})");
            }
            Ok(())
        }
        "inbox" => {
            let follow = flag(&mut args, "--follow");
            let max = match value(&mut args, "--max")? {
                None => usize::MAX,
                Some(n) => n
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Fail::usage(format!("--max {n}: a number from 1")))?,
            };
            no_more(&args)?;
            inbox(&socket, follow, max)
        }
        "metrics" => {
            no_more(&args)?;
            let r = Client::connect(&socket)?.call("metrics", json!({}))?;
            let text = r.get("text").and_then(Value::as_str).ok_or_else(|| {
                Fail(
                    EXIT_FAILED,
                    "the daemon's metrics answer has no text".into(),
                )
            })?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|()| out.flush())
                .map_err(|_| Fail(0, String::new()))
        }
        "fleet" => fleet_command(&args),
        "sig" => {
            if args.first().map(String::as_str) != Some("decode") {
                return Err(Fail::usage(
                    "the sig command is `imlinkctl sig decode [--file PATH]` (the UserSig on stdin)",
                ));
            }
            args.remove(0);
            let source = match args.first().map(String::as_str) {
                None | Some("-") => SigSource::Stdin,
                Some("--file") => {
                    args.remove(0);
                    if args.is_empty() {
                        return Err(Fail::usage("--file needs a path"));
                    }
                    SigSource::File(PathBuf::from(args.remove(0)))
                }
                Some(_) => {
                    return Err(Fail::usage(
                        "a UserSig on the command line can be read by any local user (ps, \
                         /proc/PID/cmdline) and stays in the shell history: pass it on stdin \
                         (`imlinkctl sig decode < sig.txt`) or with --file PATH",
                    ));
                }
            };
            if matches!(source, SigSource::Stdin) && !args.is_empty() {
                args.remove(0);
            }
            no_more(&args)?;
            sig_decode(source)
        }
        other => Err(Fail::usage(format!("unknown command {other:?}"))),
    }
}

/// `--limit N`: 1 to 100, 20 when absent.
fn page_limit(arg: Option<String>) -> Result<u32, Fail> {
    match arg {
        None => Ok(20),
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| Fail::usage(format!("--limit {n}: a number from 1 to 100"))),
    }
}

/// Text from outside (a message body) for a terminal: control characters, Unicode's line and
/// paragraph separators and the bidirectional controls are written escaped (`\u{202e}`), so
/// a body can neither send the terminal a sequence, nor break the line, nor reorder what the
/// reader sees after it.
fn terminal_safe(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() || crate::session::is_separator_or_bidi(c) {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// One message as one human line: time, direction, peer, state, body (escaped: the body
/// comes from outside).
fn one_line(m: &Value) -> String {
    let ts = m["ts"].as_i64().unwrap_or(0) / 1000;
    let arrow = if m["direction"] == "out" {
        "→"
    } else {
        "←"
    };
    let state = match m["state"].as_str() {
        Some("queued") => " (queued)",
        Some("failed") => " (FAILED)",
        _ => "",
    };
    let body = terminal_safe(m["body"].as_str().unwrap_or(""));
    format!(
        "{} {arrow} {}{state}: {body}",
        clock(ts),
        m["peer"].as_str().unwrap_or("?")
    )
}

/// The at-least-once consumer: print each received message as a JSON line, flush, and only
/// then acknowledge it; with `follow`, wait for more (woken by `message_received` or any
/// other notification).
///
/// Account switches: each read is of the current account from its acknowledged position
/// (no cursor is passed), and the acknowledgement carries the cursor that read returned,
/// which names its user: a switch between the two acknowledges what was printed, for the
/// user it belongs to, and the next read is the new account's. Nothing is lost or
/// acknowledged for the wrong user.
fn inbox(socket: &PathBuf, follow: bool, max: usize) -> Result<(), Fail> {
    let mut watcher = if follow {
        let mut w = Client::connect(socket)?;
        w.call("watch", json!({}))?;
        Some(w)
    } else {
        None
    };
    let mut c = Client::connect(socket)?;
    let mut out = std::io::stdout().lock();
    let mut printed = 0usize;
    loop {
        loop {
            let left = max.saturating_sub(printed).min(100);
            if left == 0 {
                return Ok(());
            }
            let r = c.call("read_inbox", json!({ "limit": left }))?;
            let page = r["messages"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                break;
            }
            for m in &page {
                let mut m = m.clone();
                if let Some(o) = m.as_object_mut() {
                    o.insert("user_id".into(), r["user_id"].clone());
                }
                writeln!(out, "{m}")
                    .map_err(|e| Fail(EXIT_FAILED, format!("writing to stdout: {e}")))?;
            }
            out.flush()
                .map_err(|e| Fail(EXIT_FAILED, format!("writing to stdout: {e}")))?;
            c.call("ack_inbox", json!({ "cursor": r["cursor"] }))?;
            printed += page.len();
        }
        let Some(w) = watcher.as_mut() else {
            return Ok(());
        };
        // Wait for the next notification of any kind, then read again.
        match w.read(None)? {
            Some(v) if v["method"] == "lagged" => {
                // Missed notifications cost nothing (the inbox is the truth): watch again.
                let mut again = Client::connect(socket)?;
                again.call("watch", json!({}))?;
                *w = again;
            }
            Some(_) => {}
            None => {
                return Err(Fail(
                    EXIT_UNREACHABLE,
                    "the daemon closed the connection".into(),
                ));
            }
        }
    }
}

fn no_more(args: &[String]) -> Result<(), Fail> {
    match args.first() {
        None => Ok(()),
        Some(a) => Err(Fail::usage(format!("unexpected argument {a:?}"))),
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

enum SigSource {
    Stdin,
    File(PathBuf),
}

/// Read a UserSig from stdin or a file (never from the command line), trimmed.
fn read_sig(source: SigSource) -> Result<String, Fail> {
    let mut text = String::new();
    match &source {
        SigSource::Stdin => std::io::stdin()
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| Fail(EXIT_FAILED, format!("reading the UserSig from stdin: {e}")))?,
        SigSource::File(p) => std::fs::File::open(p)
            .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
            .map_err(|e| Fail(EXIT_FAILED, format!("reading {}: {e}", p.display())))?,
    };
    Ok(text.trim().to_string())
}

fn sig_decode(source: SigSource) -> Result<(), Fail> {
    let text = read_sig(source)?;
    let d = imlink_usersig::decode(&text).map_err(|e| {
        Fail(
            EXIT_FAILED,
            format!("not a valid TLS-sig-api v2 UserSig: {e}"),
        )
    })?;
    let mut v = d.public_json();
    let now = now_secs();
    let exp = d.expires_at() as i64;
    if let Some(m) = v.as_object_mut() {
        m.insert(
            "fingerprint".into(),
            json!(imlink_usersig::fingerprint(&text)),
        );
        m.insert("expired".into(), json!(d.is_expired_at(now.max(0) as u64)));
        m.insert("expires_in_secs".into(), json!(exp - now));
    }
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

// --- fleet: the operator's view, over MQTT --------------------------------------------------------

use crate::fleet::{FLEET_USAGE, FleetArgs, Protocol};

fn fleet_command(args: &[String]) -> Result<(), Fail> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{FLEET_USAGE}");
        return Ok(());
    }
    let a = crate::fleet::parse_args(args, |p| {
        std::fs::read_to_string(p).map_err(|e| format!("--config {}: {e}", p.display()))
    })
    .map_err(|m| Fail(EXIT_USAGE, format!("fleet: {m}\n\n{FLEET_USAGE}")))?;
    let password = read_password_file(&a.password_file)?;
    let ca =
        a.ca.clone()
            .map_or(crate::tls::CaSource::System, crate::tls::CaSource::File);
    let tls = crate::tls::client_config(&ca, None, &[])
        .map_err(|e| Fail(EXIT_USAGE, format!("fleet: --ca: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fail(EXIT_FAILED, format!("fleet: starting the runtime: {e}")))?;
    rt.block_on(fleet_run(&a, &password, tls))
}

/// The operator's password or token, from a file only its owner can read. Never printed.
fn read_password_file(p: &Path) -> Result<String, Fail> {
    use std::os::unix::fs::MetadataExt;
    let usage = |m: String| {
        Fail(
            EXIT_USAGE,
            format!("fleet: --password-file {}: {m}", p.display()),
        )
    };
    let meta = std::fs::metadata(p).map_err(|e| usage(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(usage(format!(
            "other users can read it (mode {:o}): chmod 600 {}",
            meta.mode() & 0o777,
            p.display()
        )));
    }
    let mut text = String::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(4096).read_to_string(&mut text))
        .map_err(|e| usage(e.to_string()))?;
    let pw = text.trim_end_matches(['\n', '\r']).to_string();
    if pw.is_empty() {
        return Err(usage("it is empty".into()));
    }
    Ok(pw)
}

/// One message of the status subscription.
struct StatusMsg {
    topic: String,
    payload: bytes::Bytes,
    retain: bool,
}

/// What the broker sent next.
enum Got {
    Msg(StatusMsg),
    /// The SUBACK: `Err` names the refusal.
    SubAck(Result<(), String>),
    Nothing,
}

/// Why a connection attempt failed.
enum ConnFail {
    /// The broker refused the identity: the same on every node, so stop.
    Refused(String),
    /// The node does not take this MQTT version (or closed before answering it).
    Version(String),
    /// Cannot reach it, TLS failed, or it is busy: try the next node.
    Unreachable(String),
}

/// One connection to the broker, in either MQTT version.
enum Link {
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
    V311(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
}

fn tls_hint(e: &str) -> &'static str {
    if e.contains("certificate") || e.contains("UnknownIssuer") {
        " (is --ca the CA that signed the broker's certificate?)"
    } else {
        ""
    }
}

impl Link {
    async fn open(
        a: &FleetArgs,
        node: &(String, u16, String),
        v5: bool,
        password: &str,
        tls: &std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<(Link, &'static str), ConnFail> {
        let id = a.client_id.clone().unwrap_or_else(|| {
            format!(
                "imlinkctl-fleet-{}-{}",
                std::process::id(),
                crate::clock::wall_ms()
            )
        });
        let transport =
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone()));
        let url = &node.2;
        let mut link = if v5 {
            let mut o = rumqttc::v5::MqttOptions::new(id, node.0.clone(), node.1);
            o.set_transport(transport);
            o.set_credentials(a.user.clone(), password);
            o.set_keep_alive(Duration::from_secs(30));
            o.set_clean_start(true);
            o.set_session_expiry_interval(None);
            o.set_connection_timeout(10);
            // The broker does not send a PUBLISH larger than this (MQTT 5 drops it for us).
            o.set_max_packet_size(Some(64 * 1024));
            o.set_request_channel_capacity(8);
            // It publishes nothing; rumqttc would otherwise keep a slot for each of 65,535
            // in-flight publishes (about 10 MB).
            o.set_outgoing_inflight_upper_limit(8);
            let (c, el) = rumqttc::v5::AsyncClient::new(o, 8);
            Link::V5(c, Box::new(el))
        } else {
            let mut o = rumqttc::MqttOptions::new(id, node.0.clone(), node.1);
            o.set_transport(transport);
            o.set_credentials(a.user.clone(), password);
            o.set_keep_alive(Duration::from_secs(30));
            o.set_clean_session(true);
            // MQTT 3.1.1 cannot tell the broker a limit: a larger packet ends the connection.
            o.set_max_packet_size(1 << 20, 64 * 1024);
            o.set_request_channel_capacity(8);
            o.set_inflight(8);
            let (c, el) = rumqttc::AsyncClient::new(o, 8);
            Link::V311(c, Box::new(el))
        };
        let proto = if v5 { "v5" } else { "v3.1.1" };
        let user = &a.user;
        let refused = |code: String| {
            ConnFail::Refused(format!(
                "{url} refused the operator identity {user:?} ({code}): check --user and \
                 --password-file"
            ))
        };
        let answer = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match &mut link {
                    Link::V5(_, el) => {
                        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C, Packet};
                        use rumqttc::v5::{ConnectionError as E, Event};
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                            Ok(_) => {}
                            Err(E::ConnectionRefused(
                                c @ (C::BadUserNamePassword
                                | C::NotAuthorized
                                | C::Banned
                                | C::BadAuthenticationMethod
                                | C::ClientIdentifierNotValid),
                            )) => return Err(refused(format!("{c:?}"))),
                            Err(E::ConnectionRefused(C::UnsupportedProtocolVersion)) => {
                                return Err(ConnFail::Version(format!(
                                    "{url} does not speak MQTT 5"
                                )));
                            }
                            Err(E::ConnectionRefused(c)) => {
                                return Err(ConnFail::Unreachable(format!(
                                    "{url} refused the connection ({c:?})"
                                )));
                            }
                            Err(E::Tls(e)) => {
                                let e = e.to_string();
                                return Err(ConnFail::Unreachable(format!(
                                    "TLS with {url}: {e}{}",
                                    tls_hint(&e)
                                )));
                            }
                            Err(E::Io(e)) if e.kind() != std::io::ErrorKind::UnexpectedEof => {
                                return Err(ConnFail::Unreachable(format!("{url}: {e}")));
                            }
                            Err(e) => {
                                return Err(ConnFail::Version(format!(
                                    "{url} ended the MQTT 5 CONNECT ({e})"
                                )));
                            }
                        }
                    }
                    Link::V311(_, el) => {
                        use rumqttc::{
                            ConnectReturnCode as C, ConnectionError as E, Event, Packet,
                        };
                        match el.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                            Ok(_) => {}
                            Err(E::ConnectionRefused(
                                c @ (C::BadUserNamePassword | C::NotAuthorized | C::BadClientId),
                            )) => return Err(refused(format!("{c:?}"))),
                            Err(E::ConnectionRefused(c)) => {
                                return Err(ConnFail::Unreachable(format!(
                                    "{url} refused the connection ({c:?})"
                                )));
                            }
                            Err(E::Tls(e)) => {
                                let e = e.to_string();
                                return Err(ConnFail::Unreachable(format!(
                                    "TLS with {url}: {e}{}",
                                    tls_hint(&e)
                                )));
                            }
                            Err(e) => {
                                return Err(ConnFail::Unreachable(format!("{url}: {e}")));
                            }
                        }
                    }
                }
            }
        })
        .await;
        match answer {
            Ok(Ok(())) => Ok((link, proto)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnFail::Unreachable(format!(
                "{url}: no CONNACK within 15 s"
            ))),
        }
    }

    async fn next(&mut self) -> Result<Got, String> {
        match self {
            Link::V5(_, el) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::Publish(p)) => Ok(Got::Msg(StatusMsg {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        retain: p.retain,
                    })),
                    Event::Incoming(Packet::SubAck(s)) => Ok(Got::SubAck(
                        match s
                            .return_codes
                            .iter()
                            .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                        {
                            None => Ok(()),
                            Some(c) => Err(format!("{c:?}")),
                        },
                    )),
                    _ => Ok(Got::Nothing),
                }
            }
            Link::V311(_, el) => {
                use rumqttc::{Event, Packet, SubscribeReasonCode};
                match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::Publish(p)) => Ok(Got::Msg(StatusMsg {
                        topic: p.topic,
                        payload: p.payload,
                        retain: p.retain,
                    })),
                    Event::Incoming(Packet::SubAck(s)) => Ok(Got::SubAck(
                        if s.return_codes.contains(&SubscribeReasonCode::Failure) {
                            Err("Failure".into())
                        } else {
                            Ok(())
                        },
                    )),
                    _ => Ok(Got::Nothing),
                }
            }
        }
    }

    /// SUBSCRIBE and wait for the SUBACK; messages that come first are returned.
    async fn subscribe(&mut self, filter: &str, url: &str) -> Result<Vec<StatusMsg>, Fail> {
        let sent = match self {
            Link::V5(c, _) => c
                .subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
            Link::V311(c, _) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        };
        sent.map_err(|e| Fail(EXIT_FAILED, format!("fleet: subscribing: {e}")))?;
        let mut early = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let got = tokio::time::timeout_at(deadline, self.next())
                .await
                .map_err(|_| {
                    Fail(
                        EXIT_UNREACHABLE,
                        format!("fleet: {url} did not answer the SUBSCRIBE within 15 s"),
                    )
                })?
                .map_err(|e| {
                    Fail(
                        EXIT_UNREACHABLE,
                        format!("fleet: the connection to {url} ended before the SUBACK: {e}"),
                    )
                })?;
            match got {
                Got::Msg(m) => early.push(m),
                Got::SubAck(Ok(())) => return Ok(early),
                Got::SubAck(Err(code)) => {
                    return Err(Fail(
                        EXIT_DENIED,
                        format!(
                            "fleet: {url} refused the subscription to {filter} ({code}): this \
                             identity may not read the status tree — the broker's ACL must let \
                             it read im/{{sdk_app_id}}/d/# (docs/brokers.md)"
                        ),
                    ));
                }
                Got::Nothing => {}
            }
        }
    }

    /// A clean DISCONNECT (best effort, bounded).
    async fn close(mut self) {
        let asked = match &self {
            Link::V5(c, _) => c.disconnect().await.is_ok(),
            Link::V311(c, _) => c.disconnect().await.is_ok(),
        };
        if asked {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.next().await.is_ok() {}
            })
            .await;
        }
    }
}

/// Connect to the first node that takes the identity (each in the configured MQTT version,
/// or 5 then 3.1.1 for `auto`). Returns the link, the node's URL and the version.
async fn connect_any(
    a: &FleetArgs,
    password: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<(Link, String, &'static str), Fail> {
    let versions: &[bool] = match a.protocol {
        Protocol::V5 => &[true],
        Protocol::V311 => &[false],
        Protocol::Auto => &[true, false],
    };
    let mut why = Vec::new();
    for node in &a.brokers {
        for &v5 in versions {
            match Link::open(a, node, v5, password, tls).await {
                Ok((link, proto)) => return Ok((link, node.2.clone(), proto)),
                Err(ConnFail::Refused(m)) => return Err(Fail(EXIT_DENIED, format!("fleet: {m}"))),
                Err(ConnFail::Version(m)) => {
                    why.push(if a.protocol == Protocol::V5 {
                        format!("{m} (for MQTT 3.1.1, e.g. NATS: --protocol v3.1.1 or auto)")
                    } else {
                        m
                    });
                }
                Err(ConnFail::Unreachable(m)) => {
                    why.push(m);
                    break;
                }
            }
        }
    }
    Err(Fail(
        EXIT_UNREACHABLE,
        format!(
            "fleet: cannot connect to any broker node: {}; check --broker and that the broker \
             is reachable",
            why.join("; ")
        ),
    ))
}

/// Lines to stdout, flushed one by one (a pipe reads them as they come). A closed stdout
/// ends the command quietly.
struct Out(std::io::Stdout);

impl Out {
    fn line(&mut self, text: &str) -> Result<(), Fail> {
        let mut o = self.0.lock();
        writeln!(o, "{text}")
            .and_then(|()| o.flush())
            .map_err(|_| Fail(0, String::new()))
    }
}

fn connection_line(as_json: bool, event: &str, url: &str, detail: &str) -> String {
    let now = now_secs();
    if as_json {
        json!({ "type": "connection", "at": now, "event": event, "broker": url, "detail": detail })
            .to_string()
    } else {
        format!(
            "{} connection {event}: {url} {detail}",
            &crate::fleet::utc(now)[11..19]
        )
    }
}

async fn fleet_run(
    a: &FleetArgs,
    password: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), Fail> {
    use crate::fleet::{Fleet, change_line, status_filter, write_ndjson, write_text};
    let mut out = Out(std::io::stdout());
    let filter = status_filter(a.sdk_app_id);
    let mut fleet = Fleet::new(a.sdk_app_id, a.offline_longer_than);
    let (mut link, mut url, _) = connect_any(a, password, &tls).await?;
    for m in link.subscribe(&filter, &url).await? {
        fleet.apply(&m.topic, &m.payload, m.retain, now_secs());
    }
    // The retained tree follows the SUBACK; it is all read once nothing new came for
    // `settle`. Live changes meanwhile are taken too.
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            got = link.next() => match got {
                Ok(Got::Msg(m)) => {
                    fleet.apply(&m.topic, &m.payload, m.retain, now_secs());
                    if m.retain {
                        last = tokio::time::Instant::now();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Fail(
                        EXIT_UNREACHABLE,
                        format!("fleet: the connection to {url} ended while reading the status tree: {e}"),
                    ));
                }
            },
            _ = tokio::time::sleep_until(last + a.settle) => break,
        }
    }
    let now = now_secs();
    {
        let mut w = std::io::BufWriter::new(std::io::stdout().lock());
        if a.json {
            write_ndjson(&fleet, now, &mut w)
        } else {
            write_text(&fleet, now, &mut w)
        }
        .and_then(|()| w.flush())
        .map_err(|_| Fail(0, String::new()))?;
    }
    if fleet.is_empty() {
        // Some brokers (mosquitto's acl_file) grant any SUBSCRIBE and then deliver only what
        // the identity may read: an empty tree can mean a missing ACL line.
        eprintln!(
            "imlinkctl: fleet: no status document under {filter} on {url}: either no device \
             of SDKAppID {} publishes one, or this identity may not read them (on mosquitto, \
             `user {}` + `topic read im/+/d/#` in the ACL: docs/brokers.md)",
            a.sdk_app_id, a.user
        );
    }
    if !a.watch {
        link.close().await;
        return Ok(());
    }
    // --watch: one line per change, forever; a lost connection is retried on every node.
    loop {
        // The next device seen going offline that passes the threshold, if any.
        let crossing = fleet.next_crossing().map(|t| {
            tokio::time::Instant::now() + Duration::from_secs((t - now_secs()).max(0) as u64)
        });
        let crossing = async {
            match crossing {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = link.next() => match got {
                Ok(Got::Msg(m)) => {
                    let now = now_secs();
                    if let Some(c) = fleet.apply(&m.topic, &m.payload, m.retain, now) {
                        out.line(&change_line(&fleet, &c, now, a.json))?;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    out.line(&connection_line(a.json, "lost", &url, &e))?;
                    let mut wait = Duration::from_secs(1);
                    loop {
                        tokio::time::sleep(wait).await;
                        let attempt = match connect_any(a, password, &tls).await {
                            Ok((mut l, u, proto)) => match l.subscribe(&filter, &u).await {
                                Ok(early) => Ok((l, u, proto, early)),
                                Err(f) => Err(f),
                            },
                            Err(f) => Err(f),
                        };
                        match attempt {
                            Ok((l, u, proto, early)) => {
                                out.line(&connection_line(a.json, "restored", &u, proto))?;
                                for m in early {
                                    let now = now_secs();
                                    if let Some(c) = fleet.apply(&m.topic, &m.payload, m.retain, now) {
                                        out.line(&change_line(&fleet, &c, now, a.json))?;
                                    }
                                }
                                (link, url) = (l, u);
                                break;
                            }
                            Err(Fail(EXIT_UNREACHABLE, m)) => {
                                out.line(&connection_line(a.json, "retrying", "", &m))?;
                                wait = (wait * 2).min(Duration::from_secs(30));
                            }
                            Err(f) => return Err(f),
                        }
                    }
                }
            },
            _ = crossing => {
                let now = now_secs();
                for c in fleet.crossed(now) {
                    out.line(&change_line(&fleet, &c, now, a.json))?;
                }
            }
        }
    }
}

// --- the client ---------------------------------------------------------------------------------

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: PathBuf,
    next_id: u64,
}

impl Client {
    fn connect(socket: &PathBuf) -> Result<Client, Fail> {
        let stream = UnixStream::connect(socket).map_err(|e| {
            use std::io::ErrorKind as K;
            let p = socket.display();
            match e.kind() {
                K::NotFound => Fail(
                    EXIT_UNREACHABLE,
                    format!("no API socket at {p}: is imlinkd running? (systemctl status imlinkd)"),
                ),
                K::ConnectionRefused => Fail(
                    EXIT_UNREACHABLE,
                    format!("nothing listens on {p}: imlinkd is not running (the socket is stale)"),
                ),
                K::PermissionDenied => Fail(
                    EXIT_DENIED,
                    format!(
                        "permission denied on {p}: add your user to the socket's group \
                         (`ls -l {p}`; the package uses imlinkd-clients) or run as root"
                    ),
                ),
                _ => Fail(EXIT_UNREACHABLE, format!("connecting to {p}: {e}")),
            }
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| Fail(EXIT_UNREACHABLE, e.to_string()))?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
            socket: socket.clone(),
            next_id: 1,
        })
    }

    fn send(&mut self, method: &str, params: Value) -> Result<u64, Fail> {
        let id = self.next_id;
        self.next_id += 1;
        let line = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params })
            .to_string()
            + "\n";
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            // The daemon may have refused the connection and closed it (too many clients):
            // its one line is still there to read, and says more than "broken pipe".
            if let Ok(Some(v)) = self.read(Some(Instant::now() + Duration::from_millis(500)))
                && let Some(err) = v.get("error")
            {
                return Err(rpc_fail(err));
            }
            return Err(Fail(
                EXIT_UNREACHABLE,
                format!("writing to {}: {e}", self.socket.display()),
            ));
        }
        Ok(id)
    }

    /// Read one line; `None` at EOF.
    fn read(&mut self, deadline: Option<Instant>) -> Result<Option<Value>, Fail> {
        let timeout = deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        let _ = self.reader.get_ref().set_read_timeout(timeout);
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line).map(Some).map_err(|e| {
                Fail(
                    EXIT_FAILED,
                    format!("the daemon sent something that is not JSON: {e}"),
                )
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(Fail(EXIT_FAILED, "timed out waiting for the daemon".into()))
            }
            Err(e) => Err(Fail(
                EXIT_UNREACHABLE,
                format!("reading from {}: {e}", self.socket.display()),
            )),
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Result<Value, Fail> {
        self.call_with_timeout(method, params, Duration::from_secs(10))
    }

    fn call_with_timeout(
        &mut self,
        method: &str,
        params: Value,
        t: Duration,
    ) -> Result<Value, Fail> {
        let id = self.send(method, params)?;
        let deadline = Instant::now() + t;
        loop {
            let Some(v) = self.read(Some(deadline))? else {
                return Err(Fail(
                    EXIT_UNREACHABLE,
                    "the daemon closed the connection".into(),
                ));
            };
            if v.get("id") != Some(&json!(id)) {
                if let Some(e) = v.get("error") {
                    return Err(rpc_fail(e));
                }
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(rpc_fail(e));
            }
            return Ok(v.get("result").cloned().unwrap_or(Value::Null));
        }
    }
}

fn rpc_fail(e: &Value) -> Fail {
    let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
    let msg = e.get("message").and_then(Value::as_str).unwrap_or("error");
    let exit = match code {
        crate::api::rpc::PERMISSION_DENIED => EXIT_DENIED,
        crate::api::rpc::TOO_MANY_CLIENTS => EXIT_UNREACHABLE,
        _ => EXIT_FAILED,
    };
    Fail(exit, format!("the daemon says: {msg} (code {code})"))
}

fn watch(socket: &PathBuf, json_out: bool) -> Result<(), Fail> {
    let mut c = Client::connect(socket)?;
    let snapshot = c.call("watch", json!({}))?;
    if json_out {
        println!("{}", json!({ "snapshot": snapshot }));
    } else {
        let st = &snapshot["status"];
        println!(
            "{} {}",
            clock(now_secs()),
            st["summary"].as_str().unwrap_or("")
        );
        if let Some(ev) = st.get("last_event").filter(|e| !e.is_null()) {
            println!("{} last event: {}", clock(now_secs()), ev);
        }
    }
    let _ = std::io::stdout().flush();
    loop {
        let Some(v) = c.read(None)? else {
            return Err(Fail(
                EXIT_UNREACHABLE,
                "the daemon closed the connection".into(),
            ));
        };
        if json_out {
            println!("{v}");
        } else {
            println!("{} {}", clock(now_secs()), watch_line(&v));
        }
        let _ = std::io::stdout().flush();
        if v["method"] == "lagged" {
            return Err(Fail(
                EXIT_FAILED,
                "disconnected after lagging behind".into(),
            ));
        }
    }
}

/// One notification as `watch` prints it for a person: the method and its details (a
/// message's body escaped like [`one_line`]'s: JSON leaves the separators and the
/// bidirectional controls as they are).
fn watch_line(v: &Value) -> String {
    let method = v["method"].as_str().unwrap_or("?");
    let params = &v["params"];
    let detail = match method {
        "state_changed" => format!(
            "phase={} login_status={} login_user={}{}",
            params["phase"].as_str().unwrap_or("?"),
            params["login_status"],
            params["login_user"].as_str().unwrap_or(""),
            params["last_error"]
                .get("message")
                .and_then(Value::as_str)
                .map(|m| format!(" error={m:?}"))
                .unwrap_or_default()
        ),
        "lagged" => "this watcher fell behind and was disconnected".into(),
        _ => terminal_safe(&params.to_string()),
    };
    format!("{method} {detail}")
}

fn wait_for_phase(socket: &PathBuf, phase: &str, t: Duration) -> Result<(), Fail> {
    wait_quietly(socket, phase, t)?;
    println!("{phase}");
    Ok(())
}

/// Wait (on `watch`) until the phase is `phase`.
fn wait_quietly(socket: &PathBuf, phase: &str, t: Duration) -> Result<(), Fail> {
    let deadline = Instant::now() + t;
    let mut c = Client::connect(socket)?;
    let snapshot = c.call("watch", json!({}))?;
    let mut current = snapshot["status"]["phase"]
        .as_str()
        .unwrap_or("")
        .to_string();
    while current != phase {
        if Instant::now() >= deadline {
            return Err(Fail(
                EXIT_FAILED,
                format!("timed out after {t:?}: the phase is {current}, not {phase}"),
            ));
        }
        match c.read(Some(deadline)) {
            Ok(Some(v)) if v["method"] == "state_changed" => {
                current = v["params"]["phase"].as_str().unwrap_or("").to_string();
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Fail(
                    EXIT_UNREACHABLE,
                    "the daemon closed the connection".into(),
                ));
            }
            Err(Fail(EXIT_FAILED, _)) => {
                return Err(Fail(
                    EXIT_FAILED,
                    format!("timed out after {t:?}: the phase is {current}, not {phase}"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `HH:MM:SS` UTC.
fn clock(t: i64) -> String {
    let s = t.rem_euclid(86400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn ago(t: i64) -> String {
    let d = t - now_secs();
    // The present is "0s ago": `status` right after a change said "online since … (0s from
    // now)".
    let (n, suffix) = if d > 0 { (d, "from now") } else { (-d, "ago") };
    format!("{} {suffix}", crate::status::short(n * 1000))
}

fn when(t: Option<i64>) -> String {
    match t {
        Some(t) => {
            let at = UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
            format!("{} ({})", httpdate::fmt_http_date(at), ago(t))
        }
        None => "—".into(),
    }
}

fn human_status(st: &Value) -> String {
    let s = |k: &str| st[k].as_str().unwrap_or("").to_string();
    let mut out = String::new();
    out.push_str(&format!("{}\n", s("summary")));
    out.push_str(&format!(
        "  phase:         {} since {}\n",
        s("phase"),
        when(st["since"].as_i64())
    ));
    let ls = st["login_status"].as_u64().unwrap_or(0);
    let ls_name = match ls {
        1 => "LOGINED",
        2 => "LOGINING",
        _ => "LOGOUT",
    };
    let login_user = s("login_user");
    out.push_str(&format!(
        "  login status:  {ls} {ls_name}{}\n",
        if login_user.is_empty() {
            String::new()
        } else {
            format!(" as {login_user}")
        }
    ));
    out.push_str(&format!(
        "  user id:       {} (SDKAppID {})\n",
        s("user_id"),
        st["sdk_app_id"]
    ));
    out.push_str(&format!("  broker:        {}\n", s("broker")));
    match st.get("sig").filter(|v| !v.is_null()) {
        Some(sig) => {
            out.push_str(&format!(
                "  UserSig:       {}{}\n",
                sig["fingerprint"].as_str().unwrap_or(""),
                if sig["refreshing"] == json!(true) {
                    " (refreshing)"
                } else {
                    ""
                }
            ));
            out.push_str(&format!(
                "    valid until: {}\n",
                when(sig["valid_until"].as_i64())
            ));
            out.push_str(&format!(
                "    refresh at:  {}\n",
                when(sig["refresh_at"].as_i64())
            ));
        }
        None => out.push_str("  UserSig:       none\n"),
    }
    if let Some(e) = st.get("last_error").filter(|v| !v.is_null()) {
        out.push_str(&format!(
            "  last error:    {} [{} {}]\n",
            e["message"].as_str().unwrap_or(""),
            e["class"].as_str().unwrap_or(""),
            e["code"]
        ));
    }
    if let Some(ms) = st["next_retry_at_ms"].as_i64() {
        out.push_str(&format!("  next attempt:  {}\n", when(Some(ms / 1000))));
    }
    if let Some(ev) = st.get("last_event").filter(|v| !v.is_null()) {
        out.push_str(&format!("  last event:    {ev}\n"));
    }
    let c = &st["counters"];
    out.push_str(&format!(
        "  counters:      {} connects, {} logins, {} sig fetches ({} failed), {} kicks, {} messages\n",
        c["connect_attempts"], c["logins"], c["sig_fetches"], c["sig_fetch_failures"], c["kicks"], c["messages_received"]
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_and_relative_times_format() {
        assert_eq!(clock(3661), "01:01:01");
        assert!(ago(now_secs() + 3 * 3600).ends_with("from now"));
        assert!(ago(now_secs() - 90).starts_with("90s"));
        assert!(ago(now_secs()).ends_with(" ago"), "{}", ago(now_secs()));
        assert_eq!(when(None), "—");
    }

    #[test]
    fn a_message_line_cannot_reorder_or_break_the_terminal() {
        // A peer chooses the body: escape sequences, a bell, Unicode's line separator and
        // the bidirectional controls (a right-to-left override would show the rest of the
        // line, and what the operator reads after it, reversed).
        let m = json!({
            "ts": 0, "direction": "in", "peer": "mallory", "state": "unread",
            "body": "a\u{1b}[2Jb\u{7}c\u{2028}d\u{2029}e\u{202e}f\u{2066}g\u{200f}h\u{61c}i",
        });
        let line = one_line(&m);
        for c in line.chars() {
            assert!(
                !c.is_control() && !crate::session::is_separator_or_bidi(c),
                "{c:?} reaches the terminal: {line:?}"
            );
        }
        assert!(
            line.ends_with(
                r"a\u{1b}[2Jb\u{7}c\u{2028}d\u{2029}e\u{202e}f\u{2066}g\u{200f}h\u{61c}i"
            )
        );
        // The human watch line too (`message_received` carries the body).
        let n = json!({"method": "message_received", "params": {"body": "x\u{202e}y\u{2028}z"}});
        let line = watch_line(&n);
        assert!(line.contains(r"x\u{202e}y\u{2028}z"), "{line}");
    }

    #[test]
    fn the_usage_names_every_phase_wait_accepts() {
        let listed: Vec<&str> = USAGE
            .split("Phases:")
            .nth(1)
            .and_then(|rest| rest.split("Exit codes:").next())
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let all: Vec<&str> = crate::session::Phase::ALL
            .iter()
            .map(|p| p.as_str())
            .collect();
        assert_eq!(listed, all);
    }

    #[test]
    fn usage_errors_exit_2() {
        assert!(matches!(run(vec![]), Err(Fail(EXIT_USAGE, _))));
        assert!(matches!(
            run(vec!["bogus".into()]),
            Err(Fail(EXIT_USAGE, _))
        ));
        assert!(matches!(run(vec!["wait".into()]), Err(Fail(EXIT_USAGE, _))));
        assert!(matches!(
            run(vec!["wait".into(), "--phase".into(), "nope".into()]),
            Err(Fail(EXIT_USAGE, _))
        ));
        assert!(matches!(
            run(vec!["status".into(), "extra".into()]),
            Err(Fail(EXIT_USAGE, _))
        ));
    }

    #[test]
    fn a_missing_socket_is_exit_3_with_advice() {
        let r = run(vec![
            "--socket".into(),
            "/nonexistent/x.sock".into(),
            "status".into(),
        ]);
        match r {
            Err(Fail(EXIT_UNREACHABLE, m)) => assert!(m.contains("is imlinkd running")),
            _ => panic!("expected exit 3"),
        }
    }
}
