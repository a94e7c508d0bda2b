//! The control plane: changing what the running pipeline runs, without a
//! restart — a stage's plugin swapped in or rolled back ([`swap`]), the
//! whole configuration reloaded ([`reload`], from a [`mod@plan`] built as at
//! startup), through the admin API, `SIGHUP`, or when a file changes on
//! disk ([`watch`]).
//!
//! Owns the lifecycle of plugin versions after startup; it must not serve
//! HTTP (the admin API in [`crate::http`] calls it) or run plugins.

pub mod plan;
pub mod reload;
pub mod swap;
pub mod watch;

pub use plan::{PlanError, Planned, Running, plan};
pub use reload::{ConfigSource, ReloadError, ReloadReport, Reloader};
pub use swap::{HotSwap, StageVersions, SwapError, SwapReport, VersionInfo};
