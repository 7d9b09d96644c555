//! `imlink-auth`: the IM service's rules as a NATS auth-callout service.
//!
//! nats-server asks it, for every MQTT CONNECT, whether the client may log in; it answers
//! with a user JWT (who, until when, which subjects) or a refusal with an IM error code.
//!
//! * [`rules`] — the decision, sans I/O: UserSig, client id, permissions.
//! * [`callout`] — the authorization request and response (JWTs), sans I/O.
//! * [`jwt`], [`nkeys`] — NATS JWTs and Ed25519 nkeys (ring).
//! * [`proto`] — the NATS client protocol, sans I/O (a total decoder, encoders).

pub mod callout;
pub mod config;
pub mod jwt;
pub mod nkeys;
pub mod proto;
pub mod rules;
pub mod secret;
pub mod tls;
