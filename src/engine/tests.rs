//! The engine on a fake clock.
