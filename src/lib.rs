//! imlinkd: keeps one IM login session alive over MQTT v5/TLS on a Linux device.
//!
//! See `ARCHITECTURE.md` for the code map and the invariants.

pub mod identity;
pub mod session;
