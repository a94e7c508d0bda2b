//! Why a request got no completion ([`RunError`]).

use std::time::Duration;

use crate::metrics::{ErrorType, Outcome};
use crate::wasm::{CallError, Refusal};

/// Why a request got no completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// Refused at ingress: the stage's queue was full.
    #[error("stage `{stage}` is at capacity ({capacity} requests queued); retry later")]
    Shed {
        /// The stage whose queue was full.
        stage: &'static str,
        /// Its capacity.
        capacity: usize,
    },
    /// A stage's plugin failed.
    #[error("stage `{stage}` failed: {error}")]
    Stage {
        /// The stage.
        stage: &'static str,
        /// What happened.
        error: CallError,
    },
    /// A stage's circuit breaker is open: it failed repeatedly and is
    /// cooling down.
    #[error("stage `{stage}` is failing and its circuit breaker is open; retry in {} s", .retry_after.as_secs().max(1))]
    CircuitOpen {
        /// The stage.
        stage: &'static str,
        /// When to retry.
        retry_after: Duration,
    },
    /// The request's deadline passed.
    #[error("request deadline of {} ms exceeded", .0.as_millis())]
    Timeout(Duration),
    /// A stage refused the request after its stream had started (before,
    /// a refusal is the answer: see `Envelope::refused`): the stream ends
    /// with it as an error event.
    #[error("{}", .0.message)]
    Refused(Refusal),
    /// The host is shutting down and admits nothing new.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
}

impl RunError {
    /// The HTTP status the client gets for it.
    pub fn status(&self) -> u16 {
        match self {
            RunError::Shed { .. } => 429,
            RunError::CircuitOpen { .. } | RunError::ShuttingDown => 503,
            RunError::Timeout(_) => 504,
            RunError::Refused(refusal) => refusal.status,
            RunError::Stage { error, .. } => match error.error_type {
                ErrorType::InvalidInput => 400,
                ErrorType::Upstream => 502,
                ErrorType::UpstreamUnavailable => 503,
                ErrorType::UpstreamTimeout => 504,
                _ => 500,
            },
        }
    }

    /// The `outcome` label of a request that failed this way.
    pub fn outcome(&self) -> Outcome {
        match self {
            RunError::Shed { .. } | RunError::ShuttingDown => Outcome::Shed,
            RunError::Timeout(_) => Outcome::Timeout,
            RunError::Refused(_) => Outcome::Refused,
            RunError::Stage { .. } | RunError::CircuitOpen { .. } => Outcome::Error,
        }
    }
}
