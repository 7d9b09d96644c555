//! imlinkd: keeps one IM login session alive over MQTT v5/TLS on a Linux device.
//!
//! See `ARCHITECTURE.md` for the code map and the invariants.

pub mod api;
pub mod clock;
pub mod config;
pub mod courier;
pub mod ctl;
pub mod daemon;
pub mod driver;
pub mod engine;
pub mod fleet;
pub mod fuzzing;
pub mod identity;
pub mod link;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod mqtt;
pub mod provision;
pub mod relay;
pub mod session;
pub mod status;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod url;
pub mod usersig;
pub mod wire;
