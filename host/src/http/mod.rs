//! The host's HTTP surfaces: the OpenAI-compatible API ([`openai`]) with the
//! admin API beside it ([`admin`]) on one address, and `/metrics` and
//! `/health` ([`ops`]) on another; both served the same way ([`server`]),
//! answering errors in one shape ([`error`]).
//!
//! Owns the wire: routes, request parsing, response shapes and status
//! codes. It must not make decisions the pipeline or the control plane
//! make; it translates requests into their calls and their results into
//! answers.

pub mod admin;
pub mod error;
pub mod keys;
pub mod openai;
pub mod ops;
pub mod server;

pub use error::ApiError;
pub use server::{BindError, ServerHandle};
