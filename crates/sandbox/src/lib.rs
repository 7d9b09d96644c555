//! `imlink-sandbox`: the reference IM service for development, the demo and every
//! integration test. **Never a production component.**
//!
//! One process (or one [`Sandbox::start`] call in a test) runs:
//! * an HTTPS provisioning endpoint issuing real TLS-sig-api-v2 UserSigs
//!   ([`provision`]),
//! * an MQTT v5 over TLS broker that verifies them and speaks the wire contract of brief §2
//!   exactly: refusal codes with `"<code> <text>"` reason strings and an `im-error-code` user
//!   property, takeover DISCONNECT 0x8E, expiry DISCONNECT 0xA0, admin kick 0x98, persistent
//!   sessions, QoS 0/1 routing between users ([`broker`], [`codec`], [`state`]), and the
//!   device status contract: retained messages, last wills, the status-topic ACL and
//!   operator identities that may read the status tree ([`acl`]),
//! * a loopback admin HTTP endpoint for fault injection and counters ([`admin`]).
//!
//! It generates its own CA and server certificate at start ([`pki`]).

pub mod acl;
pub mod admin;
pub mod broker;
pub mod codec;
pub mod http;
pub mod pki;
pub mod provision;
pub mod state;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use state::{Armed, Kill, Settings, Shared};
pub use state::{
    Counters, LoginFault, MultiLogin, ProvisionFault, RetainFull, RetainedMsg, UserCounters,
};

/// How to start a sandbox. `Default` is what tests want: loopback, ephemeral ports.
#[derive(Clone)]
pub struct SandboxOptions {
    pub listen: IpAddr,
    /// 0: an ephemeral port.
    pub mqtt_port: u16,
    pub provisioning_port: u16,
    pub admin_port: u16,
    pub sdk_app_id: u64,
    /// The app SecretKey that signs UserSigs; random when `None`.
    pub secret_key: Option<String>,
    /// Lifetime of the UserSigs the provisioning endpoint issues.
    pub sig_lifetime: Duration,
    /// Where to write `endpoints.json` (and `endpoints.env` for shells), `ca.pem`,
    /// `client.pem`, `client.key`, `server.pem`, `server.key`, `device-token`.
    pub state_dir: Option<PathBuf>,
    /// Require a client certificate (signed by the sandbox CA) on MQTT and provisioning.
    pub require_client_cert: bool,
    /// Serve a server certificate that is valid only from 2099 (to test clock handling).
    pub server_cert_not_yet_valid: bool,
    pub max_packet_size: usize,
    /// Failed logins per user within `failed_login_window` before CONNACK 0x9F.
    pub failed_login_limit: u32,
    pub failed_login_window: Duration,
    /// Which platforms may be online at once (the seed's multi-terminal policies).
    pub multi_login: MultiLogin,
    /// Instances of one platform online at once (0: no limit); beyond it the earliest is
    /// kicked with DISCONNECT 0x8E / 6208.
    pub max_instances_per_platform: usize,
    /// C2C messages kept per offline user (or session); beyond it PUBACK 0x97.
    pub offline_limit: usize,
    /// Retained messages supported (CONNACK Retain Available). `false` emulates a broker
    /// without them: a retained PUBLISH gets DISCONNECT 0x9A, a retained will CONNACK 0x9A.
    pub retain_available: bool,
    /// Retained messages kept at most, and their bytes (topic + payload); a retained PUBLISH
    /// beyond either gets PUBACK 0x97.
    pub max_retained: usize,
    pub max_retained_bytes: usize,
    /// Operator identities (name, token): they log in with user name = name and password =
    /// token, any client id; they may subscribe within `im/{app}/d/#` and publish nothing.
    pub operators: Vec<(String, String)>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mqtt_port: 0,
            provisioning_port: 0,
            admin_port: 0,
            sdk_app_id: 1_400_000_000,
            secret_key: None,
            sig_lifetime: Duration::from_secs(24 * 3600),
            state_dir: None,
            require_client_cert: false,
            server_cert_not_yet_valid: false,
            max_packet_size: 256 * 1024,
            failed_login_limit: 30,
            failed_login_window: Duration::from_secs(60),
            multi_login: MultiLogin::Multi,
            max_instances_per_platform: 0,
            offline_limit: state::MAX_PENDING,
            retain_available: true,
            max_retained: state::MAX_RETAINED,
            max_retained_bytes: state::MAX_RETAINED_BYTES,
            operators: Vec::new(),
        }
    }
}

/// Where everything is, as printed at start and written to `endpoints.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    /// `mqtts://127.0.0.1:PORT`
    pub mqtt_url: String,
    pub mqtt_addr: SocketAddr,
    /// `https://127.0.0.1:PORT/v1/usersig?user_id={user_id}`
    pub provisioning_url_template: String,
    pub provisioning_addr: SocketAddr,
    /// `http://127.0.0.1:PORT`
    pub admin_url: String,
    pub sdk_app_id: u64,
    /// The CA that signed the server certificates (PEM).
    pub ca_pem: String,
    /// Paths of the files written to the state directory, when there is one.
    pub ca_path: Option<PathBuf>,
    pub client_cert_path: Option<PathBuf>,
    pub client_key_path: Option<PathBuf>,
    /// Bearer token the provisioning endpoint expects from devices.
    pub device_token: String,
    /// Bearer token of the admin endpoint.
    pub admin_token: String,
    /// The operator identities given at start: name → token (each also written to
    /// `operator-NAME.token`, 0600, in the state directory).
    #[serde(default)]
    pub operators: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the MQTT listener task is gone")]
    ListenerGone,
}

/// The control surface shared by the library handle and the admin endpoint.
pub struct Control {
    shared: Arc<Shared>,
    listener: mpsc::Sender<broker::ListenerCmd>,
    mqtt_addr: SocketAddr,
    pki: pki::Pki,
}

/// A running sandbox. Dropping it stops every listener.
pub struct Sandbox {
    control: Arc<Control>,
    endpoints: Endpoints,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A wait for counters that did not come true in time. Carries the last counters seen, so
/// a failing test can say what it saw.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {waited:?} waiting for {what}; counters were {last:?}")]
pub struct WaitTimeout {
    pub what: String,
    pub waited: Duration,
    pub last: Counters,
}

fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    // SystemRandom only fails when the OS has no entropy source at all.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SandboxError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let err = |source| SandboxError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Bind an HTTP listener; returns it with the address it really got (the port may be 0).
async fn bind_http(
    addr: SocketAddr,
    what: &'static str,
) -> Result<(tokio::net::TcpListener, SocketAddr), SandboxError> {
    let err = |source| SandboxError::Bind { what, addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    Ok((listener, bound))
}

impl Sandbox {
    /// Generate certificates, bind every listener and start serving on the current tokio
    /// runtime.
    pub async fn start(opts: SandboxOptions) -> Result<Sandbox, SandboxError> {
        let pki = pki::Pki::generate(opts.server_cert_not_yet_valid)?;
        let settings = Settings {
            sdk_app_id: opts.sdk_app_id,
            secret_key: opts.secret_key.clone().unwrap_or_else(|| random_hex(32)),
            device_token: random_hex(16),
            admin_token: random_hex(16),
            max_packet_size: opts.max_packet_size,
            failed_login_limit: opts.failed_login_limit,
            failed_login_window: opts.failed_login_window,
            multi_login: opts.multi_login,
            max_instances_per_platform: opts.max_instances_per_platform,
            offline_limit: opts.offline_limit.max(1),
            retain_available: opts.retain_available,
            max_retained: opts.max_retained,
            max_retained_bytes: opts.max_retained_bytes,
        };
        let shared = Shared::new(settings, opts.sig_lifetime);
        for (name, token) in &opts.operators {
            shared.add_operator(name, token);
        }

        let mqtt_tls = TlsAcceptor::from(pki.server_config(opts.require_client_cert, &[])?);
        let http_tls =
            TlsAcceptor::from(pki.server_config(opts.require_client_cert, &[b"http/1.1"])?);

        let (listener_tx, listener_rx) = mpsc::channel(4);
        let mqtt_addr = SocketAddr::new(opts.listen, opts.mqtt_port);
        let (mqtt_addr, mqtt_task) =
            broker::start(shared.clone(), mqtt_addr, mqtt_tls, listener_rx).map_err(|source| {
                SandboxError::Bind {
                    what: "the MQTT listener",
                    addr: mqtt_addr,
                    source,
                }
            })?;

        let (prov_listener, prov_addr) = bind_http(
            SocketAddr::new(opts.listen, opts.provisioning_port),
            "the provisioning listener",
        )
        .await?;
        let (admin_listener, admin_addr) = bind_http(
            SocketAddr::new(opts.listen, opts.admin_port),
            "the admin listener",
        )
        .await?;

        let host = |a: SocketAddr| match a.ip() {
            IpAddr::V6(ip) => format!("[{ip}]:{}", a.port()),
            IpAddr::V4(ip) => format!("{ip}:{}", a.port()),
        };
        let mut endpoints = Endpoints {
            mqtt_url: format!("mqtts://{}", host(mqtt_addr)),
            mqtt_addr,
            provisioning_url_template: format!(
                "https://{}/v1/usersig?user_id={{user_id}}",
                host(prov_addr)
            ),
            provisioning_addr: prov_addr,
            admin_url: format!("http://{}", host(admin_addr)),
            sdk_app_id: opts.sdk_app_id,
            ca_pem: pki.ca_pem.clone(),
            ca_path: None,
            client_cert_path: None,
            client_key_path: None,
            device_token: shared.settings.device_token.clone(),
            admin_token: shared.settings.admin_token.clone(),
            operators: opts.operators.iter().cloned().collect(),
        };
        if let Some(dir) = &opts.state_dir {
            std::fs::create_dir_all(dir).map_err(|source| SandboxError::Write {
                path: dir.clone(),
                source,
            })?;
            let ca = dir.join("ca.pem");
            let cert = dir.join("client.pem");
            let key = dir.join("client.key");
            write_file(&ca, pki.ca_pem.as_bytes(), 0o644)?;
            write_file(&cert, pki.client_cert_pem.as_bytes(), 0o644)?;
            write_file(&key, pki.client_key_pem.as_bytes(), 0o600)?;
            // The server certificate and key too, for running another broker under the same
            // CA in scripts (scripts/check-rabbitmq).
            write_file(
                &dir.join("server.pem"),
                pki.server_cert_pem.as_bytes(),
                0o644,
            )?;
            write_file(
                &dir.join("server.key"),
                pki.server_key_pem.as_bytes(),
                0o600,
            )?;
            write_file(
                &dir.join("device-token"),
                format!("{}\n", endpoints.device_token).as_bytes(),
                0o600,
            )?;
            for (name, token) in &opts.operators {
                write_file(
                    &dir.join(format!("operator-{name}.token")),
                    format!("{token}\n").as_bytes(),
                    0o600,
                )?;
            }
            endpoints.ca_path = Some(ca);
            endpoints.client_cert_path = Some(cert);
            endpoints.client_key_path = Some(key);
            let json = serde_json::to_vec_pretty(&endpoints).unwrap_or_default();
            write_file(&dir.join("endpoints.json"), &json, 0o600)?;
            // The same, for shell scripts: `. endpoints.env`.
            let env = format!(
                "MQTT_URL='{}'\nPROVISIONING_URL_TEMPLATE='{}'\nADMIN_URL='{}'\nADMIN_TOKEN='{}'\nDEVICE_TOKEN='{}'\nSDK_APP_ID='{}'\nCA_PATH='{}'\n",
                endpoints.mqtt_url,
                endpoints.provisioning_url_template,
                endpoints.admin_url,
                endpoints.admin_token,
                endpoints.device_token,
                endpoints.sdk_app_id,
                dir.join("ca.pem").display(),
            );
            write_file(&dir.join("endpoints.env"), env.as_bytes(), 0o600)?;
        }

        let control = Arc::new(Control {
            shared: shared.clone(),
            listener: listener_tx,
            mqtt_addr,
            pki,
        });
        let prov_task = http::serve(
            shared.clone(),
            prov_listener,
            Some(http_tls),
            provision::handler(shared.clone()),
        );
        let admin_task = http::serve(
            shared.clone(),
            admin_listener,
            None,
            admin::handler(control.clone()),
        );
        tracing::info!(mqtt = %endpoints.mqtt_url, provisioning = %endpoints.provisioning_url_template, admin = %endpoints.admin_url, "imlink-sandbox serving");
        Ok(Sandbox {
            control,
            endpoints,
            tasks: vec![mqtt_task, prov_task, admin_task],
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The control surface (also what the admin endpoint drives).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// A shared handle on the control surface, for helpers that outlive a borrow.
    pub fn control_handle(&self) -> Arc<Control> {
        self.control.clone()
    }
}

impl std::ops::Deref for Sandbox {
    type Target = Control;
    fn deref(&self) -> &Control {
        &self.control
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.control.shared.kill_all(Kill::Drop);
    }
}

impl Control {
    pub fn sdk_app_id(&self) -> u64 {
        self.shared.settings.sdk_app_id
    }

    /// The app SecretKey that signs this sandbox's UserSigs.
    pub fn secret_key(&self) -> &str {
        &self.shared.settings.secret_key
    }

    pub fn client_cert_pem(&self) -> &str {
        &self.pki.client_cert_pem
    }

    pub fn client_key_pem(&self) -> &str {
        &self.pki.client_key_pem
    }

    pub fn server_cert_pem(&self) -> &str {
        &self.pki.server_cert_pem
    }

    pub fn server_key_pem(&self) -> &str {
        &self.pki.server_key_pem
    }

    /// Make the provisioning endpoint answer `user` with exactly `user_sig` (until cleared
    /// with `None`): for brokers that hold a fixed password, like mosquitto in tests.
    pub fn pin_sig(&self, user: &str, user_sig: Option<&str>) {
        self.shared.update(|st| match user_sig {
            Some(s) => {
                st.pinned.insert(user.to_string(), s.to_string());
            }
            None => {
                st.pinned.remove(user);
            }
        });
    }

    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    pub fn user(&self, user: &str) -> UserCounters {
        self.shared.counters().user(user)
    }

    /// Wait until `pred` holds for the counters (checked on every change, no polling).
    pub async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&Counters) -> bool,
    ) -> Result<Counters, WaitTimeout> {
        let mut changes = self.shared.subscribe_changes();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let c = self.shared.counters();
            if pred(&c) {
                return Ok(c);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(WaitTimeout {
                        what: what.to_string(),
                        waited: within,
                        last: self.shared.counters(),
                    });
                }
            }
        }
    }

    /// Every UserSig text this sandbox has issued (to check that none leaks anywhere).
    pub fn issued_sigs(&self) -> Vec<String> {
        self.shared.lock().issued_texts.clone()
    }

    /// Issue a UserSig for `user` signed with this sandbox's key.
    pub fn issue_sig(&self, user: &str, lifetime: Duration) -> String {
        self.shared
            .issue_sig(user, self.sdk_app_id(), lifetime, 0)
            .user_sig
    }

    /// Admin kick: DISCONNECT 0x98 to every session of `user`.
    pub fn kick(&self, user: &str) -> usize {
        let (im, text) = state::im_error_for(codec::reason::ADMINISTRATIVE_ACTION);
        self.shared.kill_user(
            user,
            Kill::Disconnect {
                code: codec::reason::ADMINISTRATIVE_ACTION,
                text: format!("{im} {text}"),
            },
        )
    }

    /// Treat every UserSig of `user` issued so far as expired; online sessions get
    /// DISCONNECT 0xA0 / 70001.
    pub fn expire_sig(&self, user: &str) -> usize {
        self.shared.expire_user_sigs(user)
    }

    pub fn ban(&self, user: &str) {
        self.shared.update(|st| st.banned.insert(user.to_string()));
    }

    pub fn unban(&self, user: &str) {
        self.shared.update(|st| st.banned.remove(user));
    }

    /// Close every MQTT connection without a DISCONNECT.
    pub fn drop_all(&self) -> usize {
        self.shared.kill_all(Kill::Drop)
    }

    /// Stop the MQTT listener (as if the broker went away): no new connections, every
    /// current one dropped.
    pub async fn stop_listener(&self) -> Result<(), SandboxError> {
        let (tx, rx) = oneshot::channel();
        self.listener
            .send(broker::ListenerCmd::Stop(tx))
            .await
            .map_err(|_| SandboxError::ListenerGone)?;
        rx.await.map_err(|_| SandboxError::ListenerGone)
    }

    /// Bind the MQTT listener again on the same address.
    pub async fn start_listener(&self) -> Result<(), SandboxError> {
        let (tx, rx) = oneshot::channel();
        self.listener
            .send(broker::ListenerCmd::Start(tx))
            .await
            .map_err(|_| SandboxError::ListenerGone)?;
        rx.await
            .map_err(|_| SandboxError::ListenerGone)?
            .map_err(|source| SandboxError::Bind {
                what: "the MQTT listener",
                addr: self.mqtt_addr,
                source,
            })
    }

    /// Refuse the next `count` CONNECTs (of `user`, or anyone) with CONNACK `code`.
    /// `count: None` refuses until [`Control::clear_faults`].
    pub fn refuse_next(&self, code: u8, count: Option<u32>, user: Option<&str>) {
        self.shared.update(|st| {
            st.faults.refuse = Some(Armed {
                fault: code,
                remaining: count,
                user: user.map(str::to_string),
            })
        });
    }

    /// Answer the next `count` SUBSCRIBEs (of `user`, or anyone) with SUBACK 0x80, as a
    /// cluster electing a leader does. `count: None` refuses until [`Control::clear_faults`].
    pub fn refuse_subscribe(&self, count: Option<u32>, user: Option<&str>) {
        self.shared.update(|st| {
            st.faults.refuse_subscribe = Some(Armed {
                fault: (),
                remaining: count,
                user: user.map(str::to_string),
            })
        });
    }

    /// Right after the next `count` accepted logins (of `user`, or anyone), do `fault`.
    pub fn on_login(&self, fault: LoginFault, count: Option<u32>, user: Option<&str>) {
        self.shared.update(|st| {
            st.faults.on_login = Some(Armed {
                fault,
                remaining: count,
                user: user.map(str::to_string),
            })
        });
    }

    /// Make the next `count` provisioning requests (of `user`, or anyone) fail as `fault`.
    pub fn provision_fault(&self, fault: ProvisionFault, count: Option<u32>, user: Option<&str>) {
        self.shared.update(|st| {
            st.faults.provision = Some(Armed {
                fault,
                remaining: count,
                user: user.map(str::to_string),
            })
        });
    }

    /// Skew the provisioning server's clock (UserSig `time` and the `Date` header).
    pub fn set_provision_clock_offset(&self, seconds: i64) {
        self.shared.update(|st| st.provision_clock_offset = seconds);
    }

    /// Accept at most `per_s` CONNECTs per second (counted in whole seconds, refused or not);
    /// beyond, CONNACK 0x9F (connection rate exceeded), as EMQX's `max_conn_rate` or AWS IoT's
    /// limits do. `None`: no limit.
    pub fn set_connect_rate(&self, per_s: Option<u32>) {
        self.shared.update(|st| {
            st.connect_rate = per_s;
            st.rate_window = None;
        });
    }

    /// Wait this long before each successful CONNACK (a slow link or a busy broker).
    pub fn set_connack_delay(&self, delay: Duration) {
        self.shared.update(|st| st.connack_delay = delay);
    }

    /// Send every server DISCONNECT (kick, expiry, `/on-login`, …) in its short form
    /// `E0 01 <code>` (mosquitto ≥ 2.0.15), or in the long form with properties.
    pub fn set_short_disconnect(&self, short: bool) {
        self.shared.update(|st| st.short_disconnect = short);
    }

    pub fn set_sig_lifetime(&self, lifetime: Duration) {
        self.shared.update(|st| st.sig_lifetime = lifetime);
    }

    /// Disarm every fault switch, unban everyone, reset the provisioning clock.
    pub fn clear_faults(&self) {
        self.shared.update(|st| {
            st.faults = state::Faults::default();
            st.banned.clear();
            st.provision_clock_offset = 0;
            st.connack_delay = Duration::ZERO;
            st.short_disconnect = false;
        });
    }

    /// Publish a message as the service (e.g. to a user's topic). Returns how many sessions
    /// it was routed to.
    pub fn publish(&self, topic: &str, qos: u8, payload: &[u8]) -> usize {
        self.publish_with(topic, qos, false, payload).unwrap_or(0)
    }

    /// Publish as the service, retained or not (no topic rules apply to the service; the
    /// bounds on retained messages do). Returns how many sessions it was routed to.
    pub fn publish_with(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
    ) -> Result<usize, RetainFull> {
        self.shared.publish(
            &codec::Publish {
                dup: false,
                qos: qos.min(1),
                retain,
                topic: topic.to_string(),
                pkid: 0,
                properties: Vec::new(),
                payload: payload.to_vec(),
            },
            None,
        )
    }

    /// The retained messages whose topics match `filter` (`#` for all), in topic order.
    pub fn retained(&self, filter: &str) -> Vec<(String, RetainedMsg)> {
        self.shared.retained(filter)
    }

    /// Delete the retained messages whose topics match `filter`; returns how many.
    pub fn clear_retained(&self, filter: &str) -> usize {
        self.shared.update(|st| st.clear_retained(filter))
    }

    /// Add (or replace) an operator identity: user name `name`, password `token`, any client
    /// id; it may subscribe within `im/{app}/d/#` and publish nothing.
    pub fn add_operator(&self, name: &str, token: &str) {
        self.shared.add_operator(name, token);
    }

    /// Remove an operator identity; its connections get DISCONNECT 0x98. Returns how many.
    pub fn remove_operator(&self, name: &str) -> usize {
        self.shared.remove_operator(name)
    }

    /// A fresh random token (for an operator identity).
    pub fn random_token() -> String {
        random_hex(16)
    }
}
