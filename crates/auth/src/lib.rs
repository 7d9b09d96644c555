//! `imlink-auth`: the IM service's rules as a NATS auth-callout service.
//!
//! nats-server asks it, for every MQTT CONNECT, whether the client may log in; it answers
//! with a user JWT (who, until when, which subjects) or a refusal with an IM error code.
//! Stateless: several instances share the load in a queue group.
//!
//! Sans I/O (tested on fixed clocks):
//! * [`rules`] — the decision: UserSig, client id, operators, permissions.
//! * [`callout`] — the authorization request and response (JWTs).
//! * [`service`] — one request in, one reply out; the decision log's rate limit, the
//!   latency statistics, the reconnect backoff.
//! * [`jwt`], [`nkeys`] — NATS JWTs and Ed25519 nkeys (ring).
//! * [`proto`] — the NATS client protocol (a total decoder, encoders).
//!
//! I/O:
//! * [`client`] — the tokio driver: one NATS connection at a time, any node, TLS.
//! * [`config`], [`secret`], [`tls`] — the TOML config, secret files, rustls (ring).
//! * [`keygen`], [`cli`] — the command line.

pub mod callout;
pub mod cli;
pub mod client;
pub mod config;
pub mod fuzzing;
pub mod jwt;
pub mod keygen;
pub mod nkeys;
pub mod proto;
pub mod rules;
pub mod secret;
pub mod service;
pub mod tls;
