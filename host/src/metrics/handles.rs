//! The handles the host records through: one stage's, backend's,
//! listener's or outcome set's series, resolved once by
//! [`Metrics`](super::registry::Metrics) so that recording costs no label
//! lookup.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};

use super::labels::{CacheRefusal, ErrorType, Outcome, UpstreamOutcome};

/// One listener's connection series (see [`crate::http::server`]).
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// `orchestrator_http_connections{listener}`: open now.
    pub open: IntGauge,
    /// `orchestrator_http_connections_refused_total{listener}`: closed at
    /// once because the listener was at its connection limit.
    pub refused: IntCounter,
}

/// A circuit breaker's series (see [`crate::circuit`]).
#[derive(Clone)]
pub struct BreakerMetrics {
    /// The state gauge: 0 closed, 1 half-open, 2 open.
    pub state: IntGauge,
    /// Transitions into each state, indexed by
    /// [`BreakerState`](super::labels::BreakerState).
    pub transitions: Arc<[IntCounter; 3]>,
}

/// Handles of one backend's series, resolved when the backend is built.
#[derive(Clone)]
pub struct BackendMetrics {
    /// `orchestrator_tokens_generated_total{worker_type}`.
    pub tokens: IntCounter,
    /// `orchestrator_time_to_first_token_seconds{worker_type}`.
    pub ttft: Histogram,
    /// `orchestrator_inter_token_latency_seconds{worker_type}`.
    pub itl: Histogram,
    /// The backend's breaker series.
    pub breaker: BreakerMetrics,
    pub(super) outcomes: Arc<[IntCounter; 9]>,
}

impl BackendMetrics {
    /// The `orchestrator_upstream_requests_total{worker_type,outcome}` handle.
    pub fn outcome(&self, outcome: UpstreamOutcome) -> &IntCounter {
        let index = UpstreamOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        &self.outcomes[index]
    }
}

/// Handles of one stage's series, resolved once.
#[derive(Clone)]
pub struct StageMetrics {
    /// `orchestrator_requests_total{stage}`.
    pub requests: IntCounter,
    /// `orchestrator_requests_shed_total{stage}`.
    pub shed: IntCounter,
    /// `orchestrator_queue_depth{stage}`.
    pub queue_depth: IntGauge,
    /// `orchestrator_queue_capacity{stage}`.
    pub queue_capacity: IntGauge,
    /// `orchestrator_stage_duration_seconds{stage}`.
    pub duration: Histogram,
    /// `orchestrator_plugin_instances{stage}`.
    pub instances: IntGauge,
    /// `orchestrator_circuit_state{stage}` and
    /// `orchestrator_circuit_transitions_total{stage,to}`.
    pub breaker: BreakerMetrics,
    pub(super) errors: Arc<[IntCounter; 12]>,
}

impl StageMetrics {
    /// The `orchestrator_errors_total{stage, error_type}` handle.
    pub fn errors(&self, error_type: ErrorType) -> &IntCounter {
        let index = ErrorType::ALL
            .iter()
            .position(|t| *t == error_type)
            .unwrap_or_default();
        &self.errors[index]
    }
}

/// Handles of `orchestrator_artifact_cache_refused_total{reason}`.
#[derive(Clone)]
pub struct CacheMetrics {
    pub(super) refused: Arc<[IntCounter; 4]>,
}

impl CacheMetrics {
    /// The counter of entries refused for `reason`.
    pub fn refused(&self, reason: CacheRefusal) -> &IntCounter {
        &self.refused[reason as usize]
    }
}

/// Handles of `orchestrator_request_duration_seconds{outcome}` and
/// `orchestrator_overhead_seconds{outcome}`.
#[derive(Clone)]
pub struct RequestMetrics {
    pub(super) histograms: Arc<[Histogram; 7]>,
    pub(super) overhead: Arc<[Histogram; 7]>,
}

impl RequestMetrics {
    /// Record one request's end: it took `elapsed`, of which it waited
    /// `backend` for the inference backend.
    pub fn observe(&self, outcome: Outcome, elapsed: Duration, backend: Duration) {
        let index = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or_default();
        self.histograms[index].observe(elapsed.as_secs_f64());
        self.overhead[index].observe(elapsed.saturating_sub(backend).as_secs_f64());
    }
}
