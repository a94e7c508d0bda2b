//! What a backend's protocol implements: one attempt at a generation
//! ([`Protocol::send`]), and how an attempt fails ([`AttemptError`]).
//!
//! A protocol speaks to one service and nothing else: no retries, no
//! breaker, no metrics (those are [`super::backend`]'s, the same for every
//! protocol).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

use super::generation::{BackendError, Event, GenerateRequest};
use crate::metrics::UpstreamOutcome;

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptError {
    /// No connection (refused, DNS, TLS, connect timeout).
    Connect(String),
    /// An HTTP error status.
    Status {
        /// The status code.
        status: u16,
        /// The `Retry-After` the upstream asked for.
        retry_after: Option<Duration>,
        /// The start of the body, for the message.
        message: String,
    },
    /// No answer, or no next event, in time.
    Timeout(String),
    /// An answer that is not a chat completion (or a stream of one).
    Protocol(String),
}

impl AttemptError {
    pub(super) fn outcome(&self) -> UpstreamOutcome {
        match self {
            AttemptError::Connect(_) => UpstreamOutcome::ConnectError,
            AttemptError::Status { status: 429, .. } => UpstreamOutcome::RateLimited,
            AttemptError::Status { status, .. } if *status >= 500 => UpstreamOutcome::ServerError,
            AttemptError::Status { .. } => UpstreamOutcome::ClientError,
            AttemptError::Timeout(_) => UpstreamOutcome::Timeout,
            AttemptError::Protocol(_) => UpstreamOutcome::ProtocolError,
        }
    }

    /// Whether sending the request again is safe and may help.
    pub(super) fn retryable(&self) -> bool {
        match self {
            AttemptError::Connect(_) => true,
            AttemptError::Status { status, .. } => *status == 429 || *status >= 500,
            AttemptError::Timeout(_) | AttemptError::Protocol(_) => false,
        }
    }

    pub(super) fn into_backend_error(self, backend: &str) -> BackendError {
        let backend = backend.to_string();
        match self {
            AttemptError::Connect(reason) => BackendError::Unavailable { backend, reason },
            AttemptError::Status {
                status, message, ..
            } if status == 429 || status == 503 => BackendError::Unavailable {
                backend,
                reason: format!("HTTP {status}: {message}"),
            },
            AttemptError::Status {
                status, message, ..
            } if matches!(status, 400 | 413 | 422) => BackendError::Refused {
                backend,
                reason: format!("HTTP {status}: {message}"),
            },
            AttemptError::Status {
                status, message, ..
            } => BackendError::Failed {
                backend,
                reason: format!("HTTP {status}: {message}"),
            },
            AttemptError::Timeout(reason) => BackendError::Timeout { backend, reason },
            AttemptError::Protocol(reason) => BackendError::Failed { backend, reason },
        }
    }
}

/// The events of one attempt, as the backend reads them.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, AttemptError>> + Send>>;

/// A future returned by [`Protocol::send`].
pub type SendFuture = Pin<Box<dyn Future<Output = Result<EventStream, AttemptError>> + Send>>;

/// The request one attempt sends (borrowing the plugin's request: an
/// attempt copies nothing of the prompt).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRequest<'a> {
    /// The model name sent upstream.
    pub model: &'a str,
    /// The plugin's request.
    pub request: &'a GenerateRequest,
    /// Ask for a stream of events (else for one JSON answer).
    pub stream: bool,
    /// The most bytes of text the answer may hold (what the request's
    /// `max_tokens` allow): a plain answer's body is bounded by it.
    pub answer_limit: usize,
    /// Trace context headers (`traceparent`, `tracestate`) of the attempt,
    /// sent upstream so a traced backend joins the request's trace.
    pub trace_headers: Vec<(String, String)>,
}

/// The protocol of a kind of backend: one attempt at a generation.
/// Retries, timeouts between events, breakers, limits and metrics are the
/// host's ([`super::backend`]), the same for every kind.
pub trait Protocol: Send + Sync + 'static {
    /// Send the request. Resolves when the upstream has accepted it (for
    /// HTTP: the response headers are in), with its events.
    fn send(&self, request: &UpstreamRequest<'_>) -> SendFuture;
}

/// Most bytes of an error body quoted in a message.
pub(super) const ERROR_BODY_QUOTE: usize = 300;

/// The start of `body`, for a message.
pub(super) fn quote(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(ERROR_BODY_QUOTE) {
        Some((at, _)) => format!("{}…", &body[..at]),
        None => body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ErrorType;

    #[test]
    fn only_safe_failures_are_retried() {
        let status = |status| AttemptError::Status {
            status,
            retry_after: None,
            message: String::new(),
        };
        assert!(AttemptError::Connect("refused".into()).retryable());
        assert!(status(429).retryable());
        assert!(status(503).retryable());
        assert!(!status(400).retryable());
        assert!(!status(401).retryable());
        assert!(!AttemptError::Timeout("slow".into()).retryable());
        assert_eq!(
            status(429).into_backend_error("b").error_type(),
            ErrorType::UpstreamUnavailable
        );
        assert_eq!(
            status(500).into_backend_error("b").error_type(),
            ErrorType::Upstream
        );
        // The request refused as invalid: the client's 400, not a 502.
        for refused in [400, 413, 422] {
            assert_eq!(
                status(refused).into_backend_error("b").error_type(),
                ErrorType::InvalidInput,
                "{refused}"
            );
        }
        // The host's own credentials or routing at fault: a 502.
        for ours in [401, 403, 404] {
            assert_eq!(
                status(ours).into_backend_error("b").error_type(),
                ErrorType::Upstream,
                "{ours}"
            );
        }
    }
}
