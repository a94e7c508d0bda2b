//! The host functions a plugin may import, with the per-store state they
//! work on ([`HostState`]): WASI p2 (through [`WasiView`]), the `request`
//! resource ([`request`], and the previous contract's, [`legacy_request`]),
//! `log` ([`log`]) and `inference` ([`inference`]), each for both contracts.
//!
//! Owns what a guest can do to the host through its imports, and the
//! limits on it (the output budget of a `request`, the log rate, the
//! backend deadline). It must not call into the guest: calls are
//! [`super::instance`]'s.

mod caller;
mod inference;
mod keyvalue;
mod legacy_request;
mod log;
mod request;
mod state;

pub use state::{HostState, Limits};
pub(in crate::wasm) use state::{LogBudget, RequestBudget};
