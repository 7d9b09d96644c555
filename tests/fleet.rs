//! `imlinkctl fleet` against real brokers — the sandbox and Debian's mosquitto 2.0.11 — with
//! devices simulated by raw MQTT clients (rumqttc over rustls) that publish retained status
//! documents and carry a retained last will, as the status contract says a daemon does
//! (`docs/brokers.md`). Killing a device's socket makes the broker publish its will: the
//! device shows offline. The tool runs as the real binary; its NDJSON is parsed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

const OPS_TOKEN: &str = "fleet-operator-token-0123456789";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A status document as the contract (v1) describes it.
fn status(user: &str, state: &str, phase: Option<&str>, extra: Value) -> String {
    let mut v = json!({
        "v": 1, "state": state,
        "reason": match state {
            "offline" => json!("connection lost"), "logged_out" => json!("logged out"),
            "stopped" => json!("service stopped"), _ => Value::Null },
        "phase": phase, "login_status": if state == "online" { 1 } else { 3 },
        "user_id": user, "platform": "linux", "instance": "0", "version": "0.1.0",
        "since": now() - 120, "at": now(), "last_error": null,
        "user_sig": {"expires_at": now() + 86_400, "renewal": "ok", "failures": 0},
        "broker": "mqtts://127.0.0.1", "protocol": "v5", "outbox_pending": 0, "inbox_unacked": 0
    });
    if let (Some(m), Some(x)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in x {
            m.insert(k.clone(), val.clone());
        }
    }
    v.to_string()
}

fn will_doc(user: &str) -> String {
    status(user, "offline", None, json!({"login_status": 1}))
}

/// A simulated device: a raw MQTT 5 client with the contract's will, that publishes its
/// status retained.
struct Device {
    client: AsyncClient,
    topic: String,
    acks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn connect(url: &str, ca: &Path, app: u64, user: &str, password: &str) -> Device {
        let (host, port) = imlinkd::config::parse_broker_url(url).unwrap();
        let topic = format!("im/{app}/d/{user}/linux/0/status");
        let mut o = MqttOptions::new(format!("{app}:{user}:linux:0"), host, port);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(
                imlinkd::tls::client_config(
                    &imlinkd::config::CaSource::File(ca.to_path_buf()),
                    None,
                    &[],
                )
                .unwrap(),
            ),
        ));
        o.set_credentials(user, password);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_last_will(LastWill::new(
            &topic,
            will_doc(user),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        let (client, mut el) = AsyncClient::new(o, 16);
        loop {
            match tokio::time::timeout(WAIT, el.poll())
                .await
                .expect("CONNACK in time")
            {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("{user} could not connect to {url}: {e}"),
            }
        }
        let (tx, acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        Device {
            client,
            topic,
            acks,
            task,
        }
    }

    /// Publish the status retained, QoS 1, and wait for the broker's PUBACK.
    async fn publish(&mut self, doc: String) {
        self.client
            .publish(&self.topic, QoS::AtLeastOnce, true, doc)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("PUBACK in time")
            .expect("the connection lives");
    }

    /// The socket goes away without a DISCONNECT (power or network loss): the broker
    /// publishes the will.
    fn kill(self) {
        self.task.abort();
    }

    /// A clean stop: the last status, then DISCONNECT 0x00 (no will).
    async fn stop(mut self, last: String) {
        self.publish(last).await;
        self.client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// Where the operator's password lives (0600).
fn password_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("ops.pw");
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    p
}

struct Ctl {
    url: String,
    ca: PathBuf,
    password: PathBuf,
    app: u64,
}

impl Ctl {
    fn command(&self, user: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(CTL);
        c.arg("fleet")
            .args(["--broker", &self.url])
            .arg("--ca")
            .arg(&self.ca)
            .args(["--user", user])
            .arg("--password-file")
            .arg(&self.password)
            .args(["--sdk-app-id", &self.app.to_string(), "--settle", "300ms"])
            .args(extra)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Run once; returns (exit code, stdout, stderr). Neither output holds the password.
    async fn run(&self, user: &str, extra: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(WAIT, self.command(user, extra).output())
            .await
            .expect("imlinkctl fleet finishes")
            .unwrap();
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        let pw = std::fs::read_to_string(&self.password).unwrap();
        assert!(
            !so.contains(pw.trim()) && !se.contains(pw.trim()),
            "the password was printed"
        );
        (out.status.code().unwrap_or(-1), so, se)
    }

    /// `--json`: the device objects by user, and the summary.
    async fn report(&self, extra: &[&str]) -> (std::collections::BTreeMap<String, Value>, Value) {
        let mut args = vec!["--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = self.run("ops", &args).await;
        assert_eq!(code, 0, "{err}");
        let lines: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let (summary, devices) = lines.split_last().expect("a summary line");
        assert_eq!(summary["type"], "summary");
        let by_user = devices
            .iter()
            .map(|d| {
                assert_eq!(d["type"], "device");
                (d["user_id"].as_str().unwrap().to_string(), d.clone())
            })
            .collect();
        (by_user, summary.clone())
    }
}

/// The fleet the tests build on a broker: one device in each condition an operator asks
/// about, plus a healthy one. Returns the ones still connected (to keep them so).
async fn populate(connect: impl AsyncFn(&str) -> Device) -> Vec<Device> {
    let mut keep = Vec::new();
    let mut healthy = connect("healthy").await;
    healthy
        .publish(status("healthy", "online", Some("online"), json!({})))
        .await;
    keep.push(healthy);
    let mut failing = connect("failing").await;
    failing
        .publish(status(
            "failing",
            "online",
            Some("online"),
            json!({"user_sig": {"expires_at": now() + 600, "renewal": "failing", "failures": 3},
                   "last_error": {"class": "network", "code": 9508}}),
        ))
        .await;
    keep.push(failing);
    let mut kicked = connect("kicked").await;
    kicked
        .publish(status(
            "kicked",
            "online",
            Some("online"),
            json!({"last_error": {"class": "kicked", "code": 6208}}),
        ))
        .await;
    keep.push(kicked);
    // Power loss: the socket dies, the broker publishes the will.
    let mut lost = connect("lost").await;
    lost.publish(status(
        "lost",
        "online",
        Some("online"),
        json!({"since": now() - 7200}),
    ))
    .await;
    lost.kill();
    // A service stop and a logout: their last status, then a normal DISCONNECT (no will).
    let stopped = connect("stopped").await;
    stopped
        .stop(status("stopped", "stopped", Some("logging_out"), json!({})))
        .await;
    let out = connect("out").await;
    out.stop(status("out", "logged_out", Some("idle"), json!({})))
        .await;
    keep
}

fn attention(d: &Value) -> Vec<String> {
    d["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect()
}

/// What `populate` built, as the report must show it.
fn check_report(devices: &std::collections::BTreeMap<String, Value>, summary: &Value) {
    assert_eq!(devices.len(), 6, "{devices:?}");
    assert_eq!(devices["healthy"]["state"], "online");
    assert!(attention(&devices["healthy"]).is_empty());
    assert_eq!(attention(&devices["failing"]), ["renewal_failing"]);
    assert_eq!(devices["failing"]["user_sig"]["failures"], 3);
    assert_eq!(attention(&devices["kicked"]), ["kicked"]);
    // The will: offline, no phase; the reader did not see it happen, so only an upper bound.
    let lost = &devices["lost"];
    assert_eq!(lost["state"], "offline");
    assert_eq!(lost["reason"], "connection lost");
    assert_eq!(lost["phase"], Value::Null);
    assert_eq!(lost["offline_for"], Value::Null);
    assert!(lost["offline_for_at_most"].as_i64().unwrap() >= 100);
    assert_eq!(devices["stopped"]["state"], "stopped");
    assert_eq!(attention(&devices["stopped"]), ["stopped"]);
    assert_eq!(attention(&devices["out"]), ["logged_out"]);
    assert_eq!(
        summary["by_state"],
        json!({"online": 3, "offline": 1, "logged_out": 1, "stopped": 1})
    );
    assert_eq!(summary["devices"], 6);
    assert_eq!(summary["attention"], 4, "lost is offline < 10 min at most");
    assert!(
        summary["by_error"]
            .as_array()
            .unwrap()
            .contains(&json!({"class": "kicked", "code": 6208, "devices": 1}))
    );
}

async fn sandbox_with_ops() -> imlink_sandbox::Sandbox {
    sandbox_with(imlink_sandbox::SandboxOptions {
        operators: vec![("ops".into(), OPS_TOKEN.into())],
        ..Default::default()
    })
    .await
}

fn sandbox_ctl(sb: &imlink_sandbox::Sandbox, dir: &Path) -> Ctl {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &sb.endpoints().ca_pem).unwrap();
    Ctl {
        url: sb.endpoints().mqtt_url.clone(),
        ca,
        password: password_file(dir, OPS_TOKEN),
        app: sb.sdk_app_id(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_reports_the_status_tree_of_the_sandbox() {
    let sb = sandbox_with_ops().await;
    let dir = temp_dir("fleet-sb");
    let ctl = sandbox_ctl(&sb, &dir);
    let (url, app) = (ctl.url.clone(), ctl.app);
    let ca = ctl.ca.clone();
    let sbr = &sb;
    let _keep = populate(async |user: &str| {
        let sig = sbr.issue_sig(user, Duration::from_secs(3600));
        Device::connect(&url, &ca, app, user, &sig).await
    })
    .await;
    sb.wait_for("the will of the lost one", WAIT, |c| {
        c.user("lost").wills_published == 1
    })
    .await
    .unwrap();
    let (devices, summary) = ctl.report(&[]).await;
    check_report(&devices, &summary);

    // The text report: counts, then who needs attention, most severe first.
    let (code, text, _) = ctl.run("ops", &["--offline-longer-than", "1m"]).await;
    assert_eq!(code, 0);
    assert!(text.contains("6 devices"), "{text}");
    assert!(
        text.contains("by state:      online 3, offline 1, logged_out 1, stopped 1"),
        "{text}"
    );
    let listed: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("needs attention: 5"))
        .skip(1)
        .map(|l| l.split('"').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        listed,
        [
            "stopped/linux/0",
            "kicked/linux/0",
            "failing/linux/0",
            "lost/linux/0",
            "out/linux/0"
        ],
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_watch_sees_a_will_and_a_renewal_failing_as_they_happen() {
    let sb = sandbox_with_ops().await;
    let dir = temp_dir("fleet-watch");
    let ctl = sandbox_ctl(&sb, &dir);
    let sig = sb.issue_sig("kiosk-1", Duration::from_secs(3600));
    let mut dev = Device::connect(&ctl.url, &ctl.ca, ctl.app, "kiosk-1", &sig).await;
    dev.publish(status("kiosk-1", "online", Some("online"), json!({})))
        .await;

    let mut child = ctl
        .command("ops", &["--json", "--watch", "--offline-longer-than", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("imlinkctl still running");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    };
    assert_eq!(next().await["user_id"], "kiosk-1");
    assert_eq!(next().await["type"], "summary");

    // Renewal starts failing: one line, with the concern.
    dev.publish(status(
        "kiosk-1",
        "online",
        Some("online"),
        json!({"user_sig": {"expires_at": now() + 60, "renewal": "failing", "failures": 1}}),
    ))
    .await;
    let c = next().await;
    assert_eq!(c["type"], "change");
    assert_eq!(c["device"]["attention"], json!(["renewal_failing"]));
    // Only `at` changes: no line. Then the socket dies: the will, seen as it happens.
    dev.publish(status(
        "kiosk-1",
        "online",
        Some("online"),
        json!({"at": now() + 1,
               "user_sig": {"expires_at": now() + 60, "renewal": "failing", "failures": 1}}),
    ))
    .await;
    dev.kill();
    let c = next().await;
    assert_eq!(c["type"], "change", "{c}");
    assert_eq!(c["was"], json!({"state": "online", "phase": "online"}));
    assert_eq!(c["device"]["state"], "offline");
    assert_eq!(c["device"]["offline_for"], 0, "it saw it happen");
    // And once it has been offline longer than 2 s, one more line says so.
    let c = next().await;
    assert_eq!(c["type"], "attention", "{c}");
    assert_eq!(c["device"]["attention"], json!(["offline"]));
    assert!(c["device"]["offline_for"].as_i64().unwrap() >= 2);
    // The broker drops every connection: the watcher says so, reconnects, reads the tree
    // again, and nothing changed meanwhile, so no device line follows.
    sb.drop_all();
    let c = next().await;
    assert_eq!(
        (c["type"].as_str(), c["event"].as_str()),
        (Some("connection"), Some("lost")),
        "{c}"
    );
    let c = next().await;
    assert_eq!(c["event"], "restored", "{c}");
    assert_eq!(c["broker"], ctl.url.as_str());
    sb.wait_for("the second subscription", WAIT, |c| {
        c.user("ops").subscribes == 2
    })
    .await
    .unwrap();
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_errors_say_what_failed_and_exit_as_imlinkctl_does() {
    let sb = sandbox_with_ops().await;
    let dir = temp_dir("fleet-err");
    let ctl = sandbox_ctl(&sb, &dir);

    // Refused credentials: exit 4.
    let wrong = Ctl {
        password: {
            let d = dir.join("wrong");
            std::fs::create_dir_all(&d).unwrap();
            password_file(&d, "not-the-token")
        },
        ..sandbox_ctl(&sb, &dir)
    };
    let (code, _, err) = wrong.run("ops", &[]).await;
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("refused the operator identity \"ops\""),
        "{err}"
    );

    // A device identity logs in but may not read the status tree: SUBACK refused, exit 4.
    let sig = sb.issue_sig("kiosk-9", Duration::from_secs(600));
    let device = Ctl {
        password: {
            let d = dir.join("dev");
            std::fs::create_dir_all(&d).unwrap();
            password_file(&d, &sig)
        },
        ..sandbox_ctl(&sb, &dir)
    };
    let client_id = format!("{}:kiosk-9:linux:0", sb.sdk_app_id());
    let (code, _, err) = device.run("kiosk-9", &["--client-id", &client_id]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("may not read the status tree"), "{err}");
    assert_eq!(sb.user("kiosk-9").subscribes_refused, 1);

    // Nothing listening: exit 3, naming the node.
    let gone = Ctl {
        url: format!("mqtts://127.0.0.1:{}", free_port()),
        ..sandbox_ctl(&sb, &dir)
    };
    let (code, _, err) = gone.run("ops", &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&gone.url) && err.contains("cannot connect"),
        "{err}"
    );

    // The wrong CA: exit 3, and the hint.
    let other_ca = dir.join("other-ca.pem");
    std::fs::write(
        &other_ca,
        imlink_sandbox::pki::Pki::generate(false).unwrap().ca_pem,
    )
    .unwrap();
    let bad_ca = Ctl {
        ca: other_ca,
        ..sandbox_ctl(&sb, &dir)
    };
    let (code, _, err) = bad_ca.run("ops", &[]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("--ca"), "{err}");

    // A password file others can read: refused before anything is sent, exit 2.
    std::fs::set_permissions(
        &ctl.password,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let (code, _, err) = ctl.run("ops", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert_eq!(
        sb.user("ops").connect_attempts,
        1,
        "a refused identity is not retried; the others never reached a CONNECT"
    );
}

// --- mosquitto ------------------------------------------------------------------------------------

/// The status ACL for mosquitto (docs/brokers.md): every user writes only under its own
/// status subtree; the operator reads the status tree. Plus the IM ACL.
const STATUS_ACL: &str = "pattern read im/+/u/%u/#\n\
                          pattern write im/+/u/+/in/%u\n\
                          pattern write im/+/d/%u/#\n\
                          \n\
                          user ops\n\
                          topic read im/+/d/#\n";

/// mosquitto 2.0.11 with TLS (the sandbox's server certificate), these users and the status
/// ACL (the suite's one launcher: `common::mosquitto`); the broker and its URL.
async fn mosquitto(
    sb: &imlink_sandbox::Sandbox,
    dir: &Path,
    users: &[(&str, &str)],
) -> (Logged, String) {
    // The sandbox's CA where the fleet tests look for it.
    std::fs::write(dir.join("ca.pem"), &sb.endpoints().ca_pem).unwrap();
    let m = common::mosquitto::Mosquitto::start_with(sb, dir, users, Some(STATUS_ACL)).await;
    (m.log, m.url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_reports_and_watches_on_mosquitto_in_both_mqtt_versions() {
    let sb = sandbox().await;
    let dir = temp_dir("fleet-mq");
    let app = sb.sdk_app_id();
    let names = [
        "healthy", "failing", "kicked", "lost", "stopped", "out", "watched",
    ];
    let mut users: Vec<(&str, String)> = names.iter().map(|u| (*u, format!("pw-{u}"))).collect();
    users.push(("ops", OPS_TOKEN.to_string()));
    let pairs: Vec<(&str, &str)> = users.iter().map(|(u, p)| (*u, p.as_str())).collect();
    let (mut mq, url) = mosquitto(&sb, &dir, &pairs).await;
    let ca = dir.join("ca.pem");
    let ctl = Ctl {
        url: url.clone(),
        ca: ca.clone(),
        password: password_file(&dir, OPS_TOKEN),
        app,
    };
    let _keep = populate(async |user: &str| {
        Device::connect(&url, &ca, app, user, &format!("pw-{user}")).await
    })
    .await;
    // mosquitto publishes a will as it handles the closed socket, which it logs.
    mq.wait_count("lost:linux:0 closed its connection", 1, WAIT)
        .await;
    let (devices, summary) = ctl.report(&[]).await;
    check_report(&devices, &summary);
    // MQTT 3.1.1 (what NATS speaks) reads the same tree.
    let (devices, summary) = ctl.report(&["--protocol", "v3.1.1"]).await;
    check_report(&devices, &summary);

    // --watch on mosquitto: a device that loses its socket shows offline.
    let mut watched = Device::connect(&url, &ca, app, "watched", "pw-watched").await;
    watched
        .publish(status("watched", "online", Some("online"), json!({})))
        .await;
    let mut child = ctl
        .command("ops", &["--watch", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("the report in time")
            .unwrap()
            .unwrap();
        if l.contains("\"summary\"") {
            break;
        }
    }
    watched.kill();
    let l = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the change in time")
        .unwrap()
        .unwrap();
    let c: Value = serde_json::from_str(&l).unwrap();
    assert_eq!(c["device"]["user_id"], "watched", "{c}");
    assert_eq!(c["device"]["state"], "offline");
    assert_eq!(c["was"]["state"], "online");
    let _ = child.kill().await;

    // The ACL: a device may not read the status tree — mosquitto grants the SUBSCRIBE and
    // delivers nothing, which the tool says — nor write another's status.
    let device = Ctl {
        password: {
            let d = dir.join("dev");
            std::fs::create_dir_all(&d).unwrap();
            password_file(&d, "pw-healthy")
        },
        ..Ctl {
            url: url.clone(),
            ca: ca.clone(),
            password: PathBuf::new(),
            app,
        }
    };
    let (code, out, err) = device.run("healthy", &["--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "only the summary: {out}");
    assert!(
        err.contains("may not read them") && err.contains("topic read im/+/d/#"),
        "{err}"
    );
    let mut forger = Device::connect(&url, &ca, app, "out", "pw-out").await;
    forger.topic = format!("im/{app}/d/healthy/linux/0/status");
    forger
        .publish(status("healthy", "stopped", None, json!({})))
        .await;
    mq.wait_count("Denied PUBLISH", 1, WAIT).await;
    let (devices, _) = ctl.report(&[]).await;
    assert_eq!(
        devices["healthy"]["state"], "online",
        "the forgery was denied"
    );
}

// --- NATS (MQTT 3.1.1 only) ----------------------------------------------------------------------

/// A device on MQTT 3.1.1: retained status, the will; `kill` loses the socket.
async fn device_v311(
    port: u16,
    ca: &Path,
    app: u64,
    user: &str,
    password: &str,
    doc: String,
) -> tokio::task::JoinHandle<()> {
    let topic = format!("im/{app}/d/{user}/linux/0/status");
    let mut o = rumqttc::MqttOptions::new(format!("{app}:{user}:linux:0"), "127.0.0.1", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            imlinkd::tls::client_config(
                &imlinkd::config::CaSource::File(ca.to_path_buf()),
                None,
                &[],
            )
            .unwrap(),
        ),
    ));
    o.set_credentials(user, password);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_last_will(rumqttc::LastWill::new(
        &topic,
        will_doc(user),
        rumqttc::QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = rumqttc::AsyncClient::new(o, 8);
    client
        .publish(&topic, rumqttc::QoS::AtLeastOnce, true, doc)
        .await
        .unwrap();
    // Until the broker acknowledged the status.
    loop {
        match tokio::time::timeout(WAIT, el.poll())
            .await
            .expect("PUBACK in time")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("{user} on NATS: {e}"),
        }
    }
    tokio::spawn(async move {
        let _client = client;
        while el.poll().await.is_ok() {}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_on_nats_speaks_3_1_1_with_auto_and_reads_statuses_and_wills() {
    let sb = sandbox().await;
    let dir = temp_dir("fleet-nats");
    let app = sb.sdk_app_id();
    std::fs::write(dir.join("nats-cert.pem"), sb.server_cert_pem()).unwrap();
    std::fs::write(dir.join("nats-key.pem"), sb.server_key_pem()).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &sb.endpoints().ca_pem).unwrap();
    let port = free_port();
    // Devices write their own status subtree; the operator reads the status tree (QoS 1
    // arrives through a JetStream consumer on $MQTT.sub.…).
    let device = |u: &str| {
        format!(
            "{{user: \"{u}\", password: \"pw-{u}\", permissions: {{ publish: {{ allow: [\"im.*.d.{u}.>\"] }}, subscribe: {{ allow: [\"im.*.u.{u}.>\", \"$MQTT.sub.>\"] }} }} }}"
        )
    };
    let conf = format!(
        "server_name: fleet1\nlisten: 127.0.0.1:{client}\njetstream {{ store_dir: \"{d}/js\" }}\n\
         mqtt {{ listen: 127.0.0.1:{port}\n  tls {{ cert_file: \"{d}/nats-cert.pem\", key_file: \"{d}/nats-key.pem\" }}\n}}\n\
         authorization {{ users: [\n{a}\n{b}\n{{user: \"ops\", password: \"{OPS_TOKEN}\", permissions: {{ publish: {{ deny: [\">\"] }}, subscribe: {{ allow: [\"im.*.d.>\", \"$MQTT.sub.>\"] }} }} }}\n] }}\n",
        client = free_port(),
        d = dir.display(),
        a = device("dev-a"),
        b = device("dev-b"),
    );
    std::fs::write(dir.join("nats.conf"), conf).unwrap();
    let mut cmd = Command::new("nats-server");
    cmd.arg("-c").arg(dir.join("nats.conf"));
    let mut nats = Logged::spawn("nats", cmd);
    nats.wait_count("Listening for MQTT clients", 1, WAIT).await;

    let _a = device_v311(
        port,
        &ca,
        app,
        "dev-a",
        "pw-dev-a",
        status(
            "dev-a",
            "online",
            Some("online"),
            json!({"protocol": "v3.1.1"}),
        ),
    )
    .await;
    let b = device_v311(
        port,
        &ca,
        app,
        "dev-b",
        "pw-dev-b",
        status(
            "dev-b",
            "online",
            Some("online"),
            json!({"protocol": "v3.1.1"}),
        ),
    )
    .await;
    b.abort();

    let ctl = Ctl {
        url: format!("mqtts://127.0.0.1:{port}"),
        ca: ca.clone(),
        password: password_file(&dir, OPS_TOKEN),
        app,
    };
    // MQTT 5 alone: NATS does not take it, and the tool says what to do.
    let (code, _, err) = ctl.run("ops", &["--protocol", "v5"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("--protocol v3.1.1 or auto"), "{err}");
    // auto: 5, then 3.1.1 on the same node. The will of dev-b's lost socket shows offline;
    // NATS publishes it as it notices the socket gone, so read until it is there.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (devices, summary) = ctl.report(&["--protocol", "auto"]).await;
        assert_eq!(devices["dev-a"]["state"], "online", "{devices:?}");
        assert_eq!(summary["devices"], 2);
        if devices["dev-b"]["state"] == "offline" {
            assert_eq!(devices["dev-b"]["reason"], "connection lost");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no will: {devices:?}"
        );
        // Polling the broker's state: NATS logs nothing when it sends a will.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The real daemon on the sandbox, watched by `imlinkctl fleet --watch`: its UserSig's renewal
/// failing and an administrator's kick each reach the retained status (as the operator reads
/// it) within a second of the daemon (or the broker) seeing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemons_renewal_failing_and_a_kick_reach_the_operator_within_a_second() {
    let sb = sandbox_with_ops().await;
    sb.set_sig_lifetime(Duration::from_secs(20));
    let dir = temp_dir("fleet-daemon");
    let ctl = sandbox_ctl(&sb, &dir);
    let d = Daemon::start(&sb, Opts::user("kiosk-9")).await;
    d.wait_phase("online").await;

    let mut child = ctl
        .command("ops", &["--json", "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let l = tokio::time::timeout(Duration::from_secs(40), lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("imlinkctl still running");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    };
    let first = next().await;
    assert_eq!(first["user_id"], "kiosk-9", "{first}");
    assert_eq!(first["state"], "online", "{first}");
    assert_eq!(next().await["type"], "summary");

    // Provisioning fails: the refresh at 80 % of the 20 s lifetime fails, the session goes on.
    sb.provision_fault(
        imlink_sandbox::ProvisionFault::Status {
            status: 503,
            retry_after: None,
        },
        None,
        None,
    );
    let failing_at = loop {
        let st = d.status().await;
        if st["renewal_failures"].as_u64().unwrap_or(0) >= 1 {
            break std::time::Instant::now();
        }
        assert!(
            st["phase"] == "online",
            "the session goes on while the sig is valid: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let c = loop {
        let c = next().await;
        if c["device"]["attention"] == json!(["renewal_failing"]) {
            break c;
        }
    };
    assert!(
        failing_at.elapsed() < Duration::from_secs(1),
        "renewal failing reached the operator {:?} after the daemon saw it: {c}",
        failing_at.elapsed()
    );
    assert_eq!(c["device"]["user_sig"]["renewal"], "failing", "{c}");
    sb.clear_faults();

    // An administrator's kick: the broker ends the session, the will says offline.
    let kicked_at = std::time::Instant::now();
    assert_eq!(sb.kick("kiosk-9"), 1);
    let c = loop {
        let c = next().await;
        if c["device"]["state"] == "offline" {
            break c;
        }
    };
    assert!(
        kicked_at.elapsed() < Duration::from_secs(1),
        "the kick reached the operator {:?} after it: {c}",
        kicked_at.elapsed()
    );
    d.wait_phase("kicked").await;
    let _ = child.kill().await;
    d.finish().await;
}
