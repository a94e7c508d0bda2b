//! Tools for plugin authors: the library side of `orchestrator plugin new`,
//! `orchestrator plugin check` and `orchestrator plugin run`.
//!
//! - [`scaffold`] writes a new plugin crate: a Cargo.toml that builds a
//!   component both with `cargo build --target wasm32-wasip2` and with
//!   `cargo component build`, a working stage on the guest SDK
//!   (`orchestrator-plugin`), a native unit test and a README.
//! - [`check`] loads a plugin exactly as startup and hot swap do (the same
//!   [`Runtime::load`](crate::wasm::Runtime::load): world, imports against
//!   the stage's grants, compilation, one instance and its `init` with the
//!   stage's configuration) and reports what it found.
//! - [`run`] then calls it once, on an envelope given as JSON, or feeds a
//!   sequence of deltas through its chunk path, and reports the result,
//!   the time taken and the fuel used.
//!
//! None of this starts a server or a pipeline: a [`Session`] holds an
//! engine, the stage's settings and an inference router (for a stage
//! granted `inference`, so that `run` can generate with the configured
//! backend), and nothing else.

pub mod check;
mod error;
pub mod run;
pub mod scaffold;

pub use check::{CheckReport, Session};
pub use error::AuthoringError;
pub use run::{ChunkStep, RunReport, Warm};
pub use scaffold::{Scaffold, ScaffoldError, SdkSource};
