//! The registry ([`Metrics`]): every metric's definition, and the handles
//! of one stage, backend or outcome set, resolved once.

use std::sync::{Arc, Mutex};

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::Serialize;

use super::handles::{
    BackendMetrics, BreakerMetrics, CacheMetrics, ConnectionMetrics, RequestMetrics, StageMetrics,
};
use super::labels::{BreakerState, CacheRefusal, ErrorType, Outcome, UpstreamOutcome};
use super::policy::PolicyMetrics;
use super::store::{STORE_BUCKETS, StoreFamilies, StoreMetrics};

/// Buckets of `orchestrator_stage_duration_seconds`: from 50 µs, where warm
/// wasm calls live, to 10 s.
pub const STAGE_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Buckets of `orchestrator_overhead_seconds`: 10 µs to 1 s.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Buckets of `orchestrator_request_duration_seconds`: 100 µs to 30 s.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Buckets of the token-latency histograms: 1 ms to 60 s, for LLMs from a
/// local 270M model to a loaded hosted one.
pub const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// A registry holding every orchestrator metric.
pub struct Metrics {
    pub(super) registry: Registry,
    /// Stage names in the order their series were first resolved (pipeline
    /// order), for [`Metrics::summary`].
    pub(super) stage_order: Mutex<Vec<String>>,
    pub(super) requests: IntCounterVec,
    pub(super) shed: IntCounterVec,
    pub(super) errors: IntCounterVec,
    pub(super) tokens: IntCounterVec,
    pub(super) queue_depth: IntGaugeVec,
    pub(super) queue_capacity: IntGaugeVec,
    pub(super) stage_duration: HistogramVec,
    request_duration: HistogramVec,
    overhead: HistogramVec,
    pub(super) plugin_info: IntGaugeVec,
    pub(super) instances: IntGaugeVec,
    pub(super) circuit_state: IntGaugeVec,
    pub(super) circuit_transitions: IntCounterVec,
    pub(super) reloads: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_circuit_state: IntGaugeVec,
    upstream_circuit_transitions: IntCounterVec,
    artifact_cache_refused: IntCounterVec,
    admin_auth_failures: IntCounter,
    config_reloads: IntCounterVec,
    config_info: IntGaugeVec,
    trace_spans_dropped: IntCounterVec,
    connections: IntGaugeVec,
    connections_refused: IntCounterVec,
    stores: StoreFamilies,
    pub(super) policy: PolicyMetrics,
}

/// Totals, for logs and the `metrics_demo` example (the guide's
/// `get_metrics_summary`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MetricsSummary {
    /// Plugin calls per stage, in pipeline order.
    pub requests: Vec<(String, u64)>,
    /// Requests shed, all stages.
    pub shed: u64,
    /// Failed plugin calls, all stages and types.
    pub errors: u64,
    /// Tokens generated, all backends.
    pub tokens_generated: u64,
    /// Requests answered, by outcome (`ok`, `error`, `timeout`, `shed`, `cancelled`, `answered`, `refused`).
    pub outcomes: Vec<(String, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered, the `process_*`
    /// collector included. The series of a stage or backend are created
    /// (at 0) when it resolves its handles.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            let metric = HistogramVec::new(opts, labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        gauge(
            "orchestrator_build_info",
            "Build information; always 1.",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        let metrics = Metrics {
            requests: counter(
                "orchestrator_requests_total",
                "Plugin calls made by each stage (one per request reaching it).",
                &["stage"],
            ),
            shed: counter(
                "orchestrator_requests_shed_total",
                "Requests refused at ingress because the stage's queue was full.",
                &["stage"],
            ),
            errors: counter(
                "orchestrator_errors_total",
                "Failed plugin calls by stage and cause.",
                &["stage", "error_type"],
            ),
            tokens: counter(
                "orchestrator_tokens_generated_total",
                "Completion tokens generated by the inference backend.",
                &["worker_type"],
            ),
            queue_depth: gauge(
                "orchestrator_queue_depth",
                "Requests waiting in the stage's queue.",
                &["stage"],
            ),
            queue_capacity: gauge(
                "orchestrator_queue_capacity",
                "Bound of the stage's queue.",
                &["stage"],
            ),
            stage_duration: histogram(
                "orchestrator_stage_duration_seconds",
                "Duration of each plugin call.",
                &["stage"],
                STAGE_BUCKETS,
            ),
            request_duration: histogram(
                "orchestrator_request_duration_seconds",
                "End-to-end duration of each request, by outcome (ok, error, timeout, shed, cancelled).",
                &["outcome"],
                REQUEST_BUCKETS,
            ),
            overhead: histogram(
                "orchestrator_overhead_seconds",
                "Time each request spent in the host itself: its end-to-end duration minus the time it waited for the inference backend, by outcome.",
                &["outcome"],
                OVERHEAD_BUCKETS,
            ),
            plugin_info: gauge(
                "orchestrator_plugin_info",
                "1 for the plugin version (sha256 of the component) each stage runs.",
                &["stage", "sha256"],
            ),
            instances: gauge(
                "orchestrator_plugin_instances",
                "Live plugin instances of each stage.",
                &["stage"],
            ),
            circuit_state: gauge(
                "orchestrator_circuit_state",
                "State of the stage's circuit breaker: 0 closed, 1 half-open, 2 open.",
                &["stage"],
            ),
            circuit_transitions: counter(
                "orchestrator_circuit_transitions_total",
                "Circuit breaker transitions, by the state entered.",
                &["stage", "to"],
            ),
            reloads: counter(
                "orchestrator_plugin_reloads_total",
                "Plugin swaps and rollbacks, by result (success, error).",
                &["stage", "result"],
            ),
            ttft: histogram(
                "orchestrator_time_to_first_token_seconds",
                "Time from sending a generation to the backend to its first token.",
                &["worker_type"],
                TOKEN_BUCKETS,
            ),
            itl: histogram(
                "orchestrator_inter_token_latency_seconds",
                "Time between two streamed tokens (chunks) of a generation.",
                &["worker_type"],
                TOKEN_BUCKETS,
            ),
            upstream_requests: counter(
                "orchestrator_upstream_requests_total",
                "Attempts sent to an inference backend, by outcome.",
                &["worker_type", "outcome"],
            ),
            upstream_circuit_state: gauge(
                "orchestrator_upstream_circuit_state",
                "State of the backend's circuit breaker: 0 closed, 1 half-open, 2 open.",
                &["worker_type"],
            ),
            upstream_circuit_transitions: counter(
                "orchestrator_upstream_circuit_transitions_total",
                "Backend circuit breaker transitions, by the state entered.",
                &["worker_type", "to"],
            ),
            artifact_cache_refused: counter(
                "orchestrator_artifact_cache_refused_total",
                "Compiled-artifact cache entries (or the cache directory) refused, by reason; each entry refused is recompiled.",
                &["reason"],
            ),
            admin_auth_failures: {
                let metric = IntCounter::new(
                    "orchestrator_admin_auth_failures_total",
                    "Admin API requests refused for a missing or wrong token.",
                )
                .expect("valid metric definition");
                registry
                    .register(Box::new(metric.clone()))
                    .expect("unique metric");
                metric
            },
            config_reloads: counter(
                "orchestrator_config_reloads_total",
                "Configuration reloads: applied (ok), refused with the running configuration kept (error), or the same configuration again (unchanged).",
                &["result"],
            ),
            config_info: gauge(
                "orchestrator_config_info",
                "1 for the digest of the configuration serving new requests.",
                &["hash"],
            ),
            trace_spans_dropped: {
                let metric = counter(
                    "orchestrator_trace_spans_dropped_total",
                    "Trace spans not exported: the export queue was full (queue_full) or their export failed (export_failed).",
                    &["reason"],
                );
                // Exposed at 0 with tracing off too, so a dashboard or an
                // alert on it needs no special case.
                for reason in ["queue_full", "export_failed"] {
                    metric.with_label_values(&[reason]);
                }
                metric
            },
            connections: gauge(
                "orchestrator_http_connections",
                "Open HTTP connections, by listener (api, ops).",
                &["listener"],
            ),
            connections_refused: counter(
                "orchestrator_http_connections_refused_total",
                "HTTP connections closed at once because the listener was at its connection limit.",
                &["listener"],
            ),
            policy: PolicyMetrics::register(&registry),
            stores: StoreFamilies {
                operations: counter(
                    "orchestrator_store_operations_total",
                    "Key-value store operations by store, operation and outcome (ok, error, timeout, invalid).",
                    &["store", "op", "outcome"],
                ),
                duration: histogram(
                    "orchestrator_store_duration_seconds",
                    "Duration of each key-value store operation.",
                    &["store", "op"],
                    STORE_BUCKETS,
                ),
                evictions: counter(
                    "orchestrator_store_evictions_total",
                    "Keys a memory store evicted to stay within its max_keys and max_bytes.",
                    &["store"],
                ),
                keys: gauge(
                    "orchestrator_store_keys",
                    "Keys a memory store holds.",
                    &["store"],
                ),
            },
            registry: registry.clone(),
            stage_order: Mutex::new(Vec::new()),
        };
        let process = prometheus::process_collector::ProcessCollector::for_self();
        metrics
            .registry
            .register(Box::new(process))
            .expect("process collector registers once");
        metrics.requests_by_outcome();
        metrics.cache();
        metrics
    }

    /// Resolve (and create) the series of `stage`.
    pub fn stage(&self, stage: &str) -> StageMetrics {
        {
            let mut order = self.stage_order.lock().unwrap_or_else(|e| e.into_inner());
            if !order.iter().any(|s| s == stage) {
                order.push(stage.to_string());
            }
        }
        StageMetrics {
            requests: self.requests.with_label_values(&[stage]),
            shed: self.shed.with_label_values(&[stage]),
            queue_depth: self.queue_depth.with_label_values(&[stage]),
            queue_capacity: self.queue_capacity.with_label_values(&[stage]),
            duration: self.stage_duration.with_label_values(&[stage]),
            instances: self.instances.with_label_values(&[stage]),
            breaker: BreakerMetrics {
                state: self.circuit_state.with_label_values(&[stage]),
                transitions: Arc::new(BreakerState::ALL.map(|to| {
                    self.circuit_transitions
                        .with_label_values(&[stage, to.label()])
                })),
            },
            errors: Arc::new(
                ErrorType::ALL.map(|t| self.errors.with_label_values(&[stage, t.label()])),
            ),
        }
    }

    /// The `orchestrator_plugin_reloads_total{stage,result}` handles for
    /// `success` and `error`.
    pub fn reloads(&self, stage: &str) -> (IntCounter, IntCounter) {
        (
            self.reloads.with_label_values(&[stage, "success"]),
            self.reloads.with_label_values(&[stage, "error"]),
        )
    }

    /// `orchestrator_config_reloads_total{result}`: `ok`, `error` or
    /// `unchanged`.
    pub fn config_reload(&self, result: &str) -> IntCounter {
        self.config_reloads.with_label_values(&[result])
    }

    /// Set `orchestrator_config_info{hash}` to 1 for `hash` only.
    pub fn set_config_hash(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1);
    }

    /// `orchestrator_admin_auth_failures_total`.
    pub fn admin_auth_failures(&self) -> IntCounter {
        self.admin_auth_failures.clone()
    }

    /// `orchestrator_trace_spans_dropped_total{reason}` for `queue_full`
    /// and `export_failed`.
    pub fn trace_spans_dropped(&self) -> (IntCounter, IntCounter) {
        (
            self.trace_spans_dropped.with_label_values(&["queue_full"]),
            self.trace_spans_dropped
                .with_label_values(&["export_failed"]),
        )
    }

    /// The series of the gateway policies (refusals, cache, principals).
    pub fn policy(&self) -> PolicyMetrics {
        self.policy.clone()
    }

    /// Resolve (and create) the series of key-value store `name`.
    pub fn store(&self, name: &str) -> StoreMetrics {
        self.stores.store(name)
    }

    /// Resolve (and create) the connection series of `listener`.
    pub fn connections(&self, listener: &str) -> ConnectionMetrics {
        ConnectionMetrics {
            open: self.connections.with_label_values(&[listener]),
            refused: self.connections_refused.with_label_values(&[listener]),
        }
    }

    /// Resolve (and create) the artifact cache's series.
    pub fn cache(&self) -> CacheMetrics {
        CacheMetrics {
            refused: Arc::new(CacheRefusal::ALL.map(|reason| {
                self.artifact_cache_refused
                    .with_label_values(&[reason.label()])
            })),
        }
    }

    /// Resolve the end-to-end histogram's series.
    pub fn requests_by_outcome(&self) -> RequestMetrics {
        RequestMetrics {
            histograms: Arc::new(
                Outcome::ALL.map(|o| self.request_duration.with_label_values(&[o.label()])),
            ),
            overhead: Arc::new(Outcome::ALL.map(|o| self.overhead.with_label_values(&[o.label()]))),
        }
    }

    /// Resolve (and create) the series of backend `worker_type`.
    pub fn backend(&self, worker_type: &str) -> BackendMetrics {
        BackendMetrics {
            tokens: self.tokens.with_label_values(&[worker_type]),
            ttft: self.ttft.with_label_values(&[worker_type]),
            itl: self.itl.with_label_values(&[worker_type]),
            breaker: BreakerMetrics {
                state: self
                    .upstream_circuit_state
                    .with_label_values(&[worker_type]),
                transitions: Arc::new(BreakerState::ALL.map(|to| {
                    self.upstream_circuit_transitions
                        .with_label_values(&[worker_type, to.label()])
                })),
            },
            outcomes: Arc::new(UpstreamOutcome::ALL.map(|o| {
                self.upstream_requests
                    .with_label_values(&[worker_type, o.label()])
            })),
        }
    }

    /// Mark `sha256` as the plugin version `stage` runs (and no other).
    pub fn set_plugin_version(&self, stage: &str, sha256: &str) {
        for family in self.plugin_info.collect() {
            for metric in family.get_metric() {
                let labels = metric.get_label();
                let of_stage = labels
                    .iter()
                    .any(|l| l.name() == "stage" && l.value() == stage);
                if of_stage && let Some(old) = labels.iter().find(|l| l.name() == "sha256") {
                    let _ = self.plugin_info.remove_label_values(&[stage, old.value()]);
                }
            }
        }
        self.plugin_info.with_label_values(&[stage, sha256]).set(1);
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn gather(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding of valid metrics cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }

    /// `orchestrator_requests_total` of every stage that has the series:
    /// the stages resolved through [`Metrics::stage`] in that order, then
    /// any others (recorded through the guide's free functions) by name.
    fn requests_by_stage(&self) -> Vec<(String, u64)> {
        let order = self.stage_order.lock().unwrap_or_else(|e| e.into_inner());
        let mut requests: Vec<(String, u64)> = self
            .requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter_map(|metric| {
                let stage = metric.get_label().iter().find(|l| l.name() == "stage")?;
                Some((
                    stage.value().to_string(),
                    metric.get_counter().value() as u64,
                ))
            })
            .collect();
        requests.sort_by_key(|(stage, _)| {
            (
                order.iter().position(|s| s == stage).unwrap_or(usize::MAX),
                stage.clone(),
            )
        });
        requests
    }

    /// Totals over all series.
    pub fn summary(&self) -> MetricsSummary {
        let sum = |vec: &IntCounterVec| -> u64 {
            vec.collect()
                .iter()
                .flat_map(|f| f.get_metric())
                .map(|m| m.get_counter().value() as u64)
                .sum()
        };
        MetricsSummary {
            requests: self.requests_by_stage(),
            shed: sum(&self.shed),
            errors: sum(&self.errors),
            tokens_generated: sum(&self.tokens),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| {
                    let count = self
                        .request_duration
                        .with_label_values(&[o.label()])
                        .get_sample_count();
                    (o.label().to_string(), count)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::global::{
        gather_metrics, get_metrics_summary, record_throughput, record_tokens_generated,
    };

    #[test]
    fn series_exist_before_the_first_request() {
        let metrics = Metrics::new();
        let stages = ["rag", "assemble", "inference", "post", "stream"];
        for stage in stages {
            metrics.stage(stage);
        }
        let text = metrics.gather();
        for stage in stages {
            assert!(text.contains(&format!(
                "orchestrator_requests_total{{stage=\"{stage}\"}} 0"
            )));
            assert!(text.contains(&format!("orchestrator_queue_depth{{stage=\"{stage}\"}} 0")));
        }
        assert!(text.contains("orchestrator_build_info{version="));
        assert!(text.contains("orchestrator_request_duration_seconds_count{outcome=\"shed\"} 0"));
        assert!(text.contains("process_cpu_seconds_total"));
    }

    #[test]
    fn handles_and_free_functions_agree() {
        let metrics = Metrics::new();
        let post = metrics.stage("post");
        post.requests.inc();
        post.errors(ErrorType::Timeout).inc();
        post.duration.observe(0.000_07);
        let text = metrics.gather();
        assert!(text.contains("orchestrator_requests_total{stage=\"post\"} 1"));
        assert!(
            text.contains("orchestrator_errors_total{error_type=\"timeout\",stage=\"post\"} 1")
        );
        assert!(text.contains(
            "orchestrator_stage_duration_seconds_bucket{stage=\"post\",le=\"0.0001\"} 1"
        ));
        assert!(text.contains(
            "orchestrator_stage_duration_seconds_bucket{stage=\"post\",le=\"0.00005\"} 0"
        ));

        record_throughput("rag");
        record_tokens_generated("echo", 7);
        let summary = get_metrics_summary();
        assert!(summary.requests.contains(&("rag".to_string(), 1)));
        assert_eq!(summary.tokens_generated, 7);
        assert!(
            gather_metrics()
                .contains("orchestrator_tokens_generated_total{worker_type=\"echo\"} 7")
        );
    }

    #[test]
    fn plugin_info_keeps_one_version_per_stage() {
        let metrics = Metrics::new();
        metrics.set_plugin_version("post", "aaa");
        metrics.set_plugin_version("rag", "ccc");
        metrics.set_plugin_version("post", "bbb");
        let text = metrics.gather();
        assert!(!text.contains("sha256=\"aaa\""));
        assert!(text.contains("orchestrator_plugin_info{sha256=\"bbb\",stage=\"post\"} 1"));
        assert!(text.contains("orchestrator_plugin_info{sha256=\"ccc\",stage=\"rag\"} 1"));
    }
}
