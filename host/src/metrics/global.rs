//! The seed guide's convenience API: free functions over one process-wide
//! registry ([`global`]). They look labels up on every call, so they are
//! for code outside the hot path; the pipeline records through
//! handles resolved once (see [`Metrics::stage`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::registry::{Metrics, MetricsSummary};

/// The process-wide registry used by the `orchestrator` binary and by the
/// free functions below.
pub fn global() -> &'static Arc<Metrics> {
    static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();
    GLOBAL.get_or_init(|| Arc::new(Metrics::new()))
}

/// Count one call made by `stage` (`orchestrator_requests_total`).
pub fn record_throughput(stage: &str) {
    global().requests.with_label_values(&[stage]).inc();
}

/// Observe one call's duration (`orchestrator_stage_duration_seconds`).
pub fn record_stage_latency(stage: &str, elapsed: Duration) {
    global()
        .stage_duration
        .with_label_values(&[stage])
        .observe(elapsed.as_secs_f64());
}

/// Set the depth of `stage`'s queue (`orchestrator_queue_depth`).
pub fn record_queue_depth(stage: &str, depth: i64) {
    global().queue_depth.with_label_values(&[stage]).set(depth);
}

/// Count one failure (`orchestrator_errors_total`).
pub fn record_error(stage: &str, error_type: &str) {
    global()
        .errors
        .with_label_values(&[stage, error_type])
        .inc();
}

/// Count generated tokens (`orchestrator_tokens_generated_total`).
pub fn record_tokens_generated(worker_type: &str, tokens: u64) {
    global()
        .tokens
        .with_label_values(&[worker_type])
        .inc_by(tokens);
}

/// The global registry in the text exposition format.
pub fn gather_metrics() -> String {
    global().gather()
}

/// Totals of the global registry.
pub fn get_metrics_summary() -> MetricsSummary {
    global().summary()
}
