//! The control plane: changing what the running pipeline runs, without a
//! restart — a stage's plugin swapped in or rolled back ([`swap`]), through
//! the admin API or when its file changes on disk ([`watch`]).
//!
//! Owns the lifecycle of plugin versions after startup; it must not serve
//! HTTP (the admin API in [`crate::http`] calls it) or run plugins.

pub mod swap;
pub mod watch;

pub use swap::{HotSwap, StageVersions, SwapError, SwapReport, VersionInfo};
