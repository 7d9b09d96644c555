//! The fault schedule: everything the world does to the engine on its own initiative, drawn
//! from the world seed as an explicit list (so a failing run can be shrunk by deleting
//! entries and running again).

use super::super::{Millis, Rng};

/// Broker flavours: what the server says (and what it leaves out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// The reference IM service: reason strings, 0x8E on takeover, 0xA0 at sig expiry.
    Reference,
    /// mosquitto 2.0.11: 0x87 without a reason for any bad password, a silent close on
    /// takeover, never a DISCONNECT at sig expiry.
    Mosquitto,
    /// nats-server ≥ 2.10 with an auth callout (`imlink-auth`), as observed in the trial
    /// (`/work/shared/design/nats-callout`): MQTT 3.1.1 only (an MQTT 5 CONNECT gets a 3.1.1
    /// CONNACK 1), CONNACK 5 (0x87 here) for a refused or expired sig and whenever the auth
    /// service does not answer within its 2 s timeout (an auth outage), the socket closed
    /// without a packet 0–1 s after the user JWT's `exp` (the sig's expiry, on the broker's
    /// clock), node deaths and leader elections. (A forbidden publish is PUBACKed 0 and
    /// dropped, a forbidden subscribe gets SUBACK 0x80: messaging, for the Engine's
    /// simulator.)
    NatsCallout,
}

/// How the broker answers a CONNECT (and treats the session after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerMode {
    Healthy,
    /// TCP refused / DNS failure / TLS failure: fast network errors.
    Down,
    /// Nothing answers: the connect hangs until a timeout.
    Blackhole,
    /// CONNACK only after this long (maybe beyond the connect timeout).
    SlowConnack(Millis),
    /// CONNACK with this failure code.
    Refuse(u8),
    /// CONNACK, then DISCONNECT with this code after the delay.
    DisconnectAfter(u8, Millis),
    /// CONNACK, then the socket closes without a DISCONNECT after the delay (a crash-looping
    /// broker or load balancer; a takeover looks the same on mosquitto).
    CloseAfter(Millis),
    /// Sessions drop at random (mean time up).
    Flaky(Millis),
}

/// How the provisioning server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvMode {
    Healthy,
    /// Answers after this long (maybe beyond the fetch timeout).
    Slow(Millis),
    /// Never answers.
    Hang,
    /// HTTP status (with a Retry-After in ms, sometimes).
    Status(u16, Option<Millis>),
    /// A body that is not a provisioning response.
    Malformed,
    /// The sig the engine holds, again.
    SameSig,
    /// A sig that expired before it was issued.
    Expired,
    /// A sig for another user (the client catches most: a fatal 70013).
    WrongUser,
    /// For another SDKAppID (fatal 70014).
    WrongApp,
    /// The device token file is missing or empty (a rotation in progress).
    TokenMissing,
    /// Sigs without a readable expiry (opaque).
    Opaque,
    /// Sigs signed with the wrong key: the broker refuses them (0x86 70009).
    BadKey,
    /// A network error reaching it.
    Unreachable,
    /// TLS says its certificate is not valid yet (the device clock is behind).
    ClockBehind,
}

/// A local request or a signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    Login,
    /// Account switch (`login {user_id}`).
    LoginAs(&'static str),
    Logout,
    /// SIGHUP. `user`: the configured user_id changes; `reconnect`: broker settings change.
    Reload {
        user: Option<&'static str>,
        reconnect: bool,
    },
    /// The daemon is restarted (SIGTERM, then started again by systemd).
    Restart,
    /// Killed (SIGKILL, a crash): no clean logout, started again.
    Crash,
}

/// One entry of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ext {
    Broker(BrokerMode),
    Prov(ProvMode),
    /// Another device with the same identity is active: every session of ours is taken
    /// over within seconds of its CONNACK.
    Twin(bool),
    /// Lifetime of the sigs issued from now on, in seconds.
    SigLifetime(i64),
    /// The provisioning server's and the broker's clocks, relative to true time (s).
    ServerSkew {
        prov: i64,
        broker: i64,
    },
    /// The device's wall clock jumps by this many seconds.
    WallJump(i64),
    /// The wall clock is set right (NTP).
    TimeSync,
    /// The device sleeps this long (boot time keeps counting; nothing runs).
    Suspend(Millis),
    /// The device reboots (a new boot: boot time restarts; maybe no RTC: wall clock at 1970).
    Reboot {
        rtc: bool,
    },
    /// The broker drops our connection (no DISCONNECT).
    Drop,
    /// The server sends DISCONNECT with this code now (0x8E, 0x98, 0xA0 "70001", 0x8B, …).
    ServerDisconnect(u8),
    /// The server calls the current sig expired from now on (premature expiry).
    RevokeExpiry,
    /// The auth service behind the broker (NATS's callout, `imlink-auth`) is down for this
    /// long: every CONNECT is refused (CONNACK 5) after the callout timeout; sessions that are
    /// up stay up.
    AuthOutage(Millis),
    /// Broker node `i` (of the configured list, modulo its length) dies: its sessions drop,
    /// and the other nodes close CONNECTs without a CONNACK for a few seconds (a leader
    /// election); or comes back.
    NodeDown(u32),
    NodeUp(u32),
    /// The next CONNECT is answered with 0x9C "use another server" naming node `i`.
    RedirectNext(u32),
    Local(Local),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub at: Millis,
    pub ext: Ext,
}

fn exp(rng: &mut Rng, mean: Millis) -> Millis {
    // Exponential-ish: uniform in a log-spread of [mean/8, 4·mean].
    let u = (rng.next_u64() % 10_000) as f64 / 10_000.0;
    ((mean as f64 / 8.0) * (32f64).powf(u)) as Millis
}

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[(rng.next_u64() % xs.len() as u64) as usize]
}

/// How wild a seed's world is: each seed leans on a few kinds of fault.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub broker: u64,
    pub prov: u64,
    pub clock: u64,
    pub local: u64,
    pub twin: u64,
    pub kicks: u64,
}

impl Mix {
    pub fn draw(rng: &mut Rng) -> Mix {
        let mut w = || pick(rng, &[0u64, 1, 2, 4, 8]);
        Mix {
            broker: w(),
            prov: w(),
            clock: w(),
            local: w(),
            twin: w() / 2,
            kicks: w() / 2,
        }
    }
}

/// Draw the chaos schedule over `[0, len)`. Modes last a while and then turn healthy again.
pub fn draw(rng: &mut Rng, len: Millis, mix: Mix) -> Vec<Scheduled> {
    let mut out = Vec::new();
    let mut lane = |rng: &mut Rng,
                    weight: u64,
                    mean_gap: Millis,
                    make: &mut dyn FnMut(&mut Rng, Millis) -> Vec<Scheduled>| {
        if weight == 0 {
            return;
        }
        let mut t = exp(rng, mean_gap / weight);
        while t < len {
            out.extend(make(rng, t));
            t += exp(rng, mean_gap / weight).max(1);
        }
    };
    // Broker modes, each lasting a while.
    lane(rng, mix.broker, 1_800_000, &mut |rng, t| {
        let mode = match rng.next_u64() % 14 {
            0 | 1 => BrokerMode::Down,
            2 => BrokerMode::Blackhole,
            3 => BrokerMode::SlowConnack(pick(rng, &[2_000, 8_000, 11_500, 14_000, 40_000])),
            4 => BrokerMode::Refuse(pick(
                rng,
                &[
                    0x86, 0x87, 0x88, 0x89, 0x8A, 0x85, 0x9F, 0x80, 0x81, 0x95, 0x9C, 0x84,
                ],
            )),
            5 | 6 => BrokerMode::DisconnectAfter(
                pick(
                    rng,
                    &[
                        0x87, 0x86, 0x8E, 0x98, 0xA0, 0x8B, 0x89, 0x81, 0x82, 0x95, 0x90, 0x80,
                        0x9C, 0x97, 0x00,
                    ],
                ),
                pick(rng, &[0, 200, 3_000, 9_000, 30_000, 400_000]),
            ),
            7 | 8 => BrokerMode::CloseAfter(pick(rng, &[0, 500, 2_000, 8_000, 15_000, 120_000])),
            _ => BrokerMode::Flaky(pick(rng, &[5_000, 30_000, 120_000, 900_000])),
        };
        let dur = exp(rng, 600_000);
        vec![
            Scheduled {
                at: t,
                ext: Ext::Broker(mode),
            },
            Scheduled {
                at: t + dur,
                ext: Ext::Broker(BrokerMode::Healthy),
            },
        ]
    });
    // Provisioning modes.
    lane(rng, mix.prov, 1_800_000, &mut |rng, t| {
        let mode = match rng.next_u64() % 17 {
            0 => ProvMode::Slow(pick(rng, &[3_000, 10_000, 16_000, 30_000])),
            1 => ProvMode::Hang,
            2..=4 => ProvMode::Status(
                pick(
                    rng,
                    &[500, 502, 503, 503, 429, 408, 421, 425, 400, 401, 403, 404],
                ),
                if rng.one_in(2) {
                    Some(pick(rng, &[1_000, 5_000, 30_000, 120_000]))
                } else {
                    None
                },
            ),
            5 => ProvMode::Malformed,
            6 | 7 => ProvMode::SameSig,
            8 => ProvMode::Expired,
            9 => ProvMode::WrongUser,
            10 => ProvMode::WrongApp,
            11 => ProvMode::TokenMissing,
            12 => ProvMode::Opaque,
            13 => ProvMode::BadKey,
            14 | 15 => ProvMode::Unreachable,
            _ => ProvMode::ClockBehind,
        };
        let dur = exp(rng, 400_000);
        vec![
            Scheduled {
                at: t,
                ext: Ext::Prov(mode),
            },
            Scheduled {
                at: t + dur,
                ext: Ext::Prov(ProvMode::Healthy),
            },
        ]
    });
    // Sig lifetimes and server clocks.
    lane(rng, mix.prov.max(1), 3_600_000, &mut |rng, t| {
        let mut v = vec![Scheduled {
            at: t,
            ext: Ext::SigLifetime(pick(
                rng,
                &[1, 2, 8, 20, 20, 45, 120, 600, 3_600, 86_400, 15_552_000],
            )),
        }];
        if rng.one_in(3) {
            v.push(Scheduled {
                at: t,
                ext: Ext::ServerSkew {
                    prov: pick(rng, &[-7_200, -30, 0, 0, 5, 3_600]),
                    broker: pick(rng, &[-30, 0, 0, 0, 10, 600]),
                },
            });
        }
        v
    });
    // Device clocks.
    lane(rng, mix.clock, 3_600_000, &mut |rng, t| {
        let ext = match rng.next_u64() % 7 {
            0 => Ext::WallJump(pick(rng, &[-86_400, -3_600, -60, 60, 3_600, 86_400 * 365])),
            1 => Ext::TimeSync,
            2 | 3 => Ext::Suspend(pick(rng, &[5_000, 60_000, 900_000, 8 * 3_600_000])),
            4 => Ext::Reboot { rtc: rng.one_in(2) },
            _ => Ext::Suspend(pick(rng, &[30_000, 3_600_000])),
        };
        let mut v = vec![Scheduled { at: t, ext }];
        if matches!(v[0].ext, Ext::Reboot { rtc: false } | Ext::WallJump(_)) {
            v.push(Scheduled {
                at: t + exp(rng, 300_000),
                ext: Ext::TimeSync,
            });
        }
        v
    });
    // Another device with our identity.
    lane(rng, mix.twin, 7_200_000, &mut |rng, t| {
        vec![
            Scheduled {
                at: t,
                ext: Ext::Twin(true),
            },
            Scheduled {
                at: t + exp(rng, 1_800_000),
                ext: Ext::Twin(false),
            },
        ]
    });
    // One-off server actions.
    lane(rng, mix.kicks.max(1), 1_800_000, &mut |rng, t| {
        let ext = match rng.next_u64() % 6 {
            0 | 1 => Ext::Drop,
            2 => Ext::ServerDisconnect(pick(rng, &[0x8E, 0x98, 0xA0, 0x8B, 0x89, 0x81, 0x00])),
            3 => Ext::RevokeExpiry,
            _ => Ext::Drop,
        };
        vec![Scheduled { at: t, ext }]
    });
    // Local apps and operators.
    lane(rng, mix.local, 2_400_000, &mut |rng, t| {
        let local = match rng.next_u64() % 12 {
            0..=3 => Local::Login,
            4 => Local::LoginAs(pick(rng, &["alice", "bob"])),
            5 => Local::Logout,
            6 | 7 => Local::Reload {
                user: if rng.one_in(3) {
                    Some(pick(rng, &["alice", "bob"]))
                } else {
                    None
                },
                reconnect: rng.one_in(2),
            },
            8 => Local::Restart,
            9 => Local::Crash,
            _ => Local::Login,
        };
        let mut v = vec![Scheduled {
            at: t,
            ext: Ext::Local(local.clone()),
        }];
        if local == Local::Logout {
            // Someone logs in again later (or not).
            if !rng.one_in(4) {
                v.push(Scheduled {
                    at: t + exp(rng, 120_000),
                    ext: Ext::Local(Local::Login),
                });
            }
        }
        v
    });
    // Broker nodes dying and coming back, and redirects (last, so the lanes above draw what
    // they always drew for a seed).
    let nodes = pick(rng, &[0u64, 0, 1, 2]);
    lane(rng, nodes, 2_400_000, &mut |rng, t| {
        let i = (rng.next_u64() % 3) as u32;
        if rng.one_in(4) {
            return vec![Scheduled {
                at: t,
                ext: Ext::RedirectNext(i),
            }];
        }
        vec![
            Scheduled {
                at: t,
                ext: Ext::NodeDown(i),
            },
            Scheduled {
                at: t + exp(rng, 300_000),
                ext: Ext::NodeUp(i),
            },
        ]
    });
    out.sort_by_key(|s| s.at);
    out
}

/// Auth outages, for a broker that has an auth service of its own (NATS's callout). Drawn from
/// their own stream and merged into the schedule, so every other seed's schedule is what it
/// always was.
pub fn draw_auth_outages(rng: &mut Rng, len: Millis) -> Vec<Scheduled> {
    let mut out = Vec::new();
    let mut t = exp(rng, 5_400_000);
    while t < len {
        let d = pick(
            rng,
            &[
                20_000,
                90_000,
                600_000,
                1_800_000,
                2 * 3_600_000,
                5 * 3_600_000,
            ],
        );
        out.push(Scheduled {
            at: t,
            ext: Ext::AuthOutage(d),
        });
        t += d + exp(rng, 5_400_000).max(1);
    }
    out
}
