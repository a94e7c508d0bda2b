//! Prometheus metrics: the seed guide's names and labels, plus the host's own.
//!
//! Owns the registry, the metric definitions and the handles the rest of
//! the host records through. It must not decide *what* happened (the
//! pipeline, the wasm runtime and the inference router do that and record
//! it here), and it knows no stage or backend names: series are created
//! when their owner resolves its handles, at startup, so they exist (at 0)
//! before the first request.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `orchestrator_requests_total` | counter | `stage` | plugin calls made by the stage (one per request that reached it) |
//! | `orchestrator_requests_shed_total` | counter | `stage` | requests refused at ingress because that stage's queue was full |
//! | `orchestrator_errors_total` | counter | `stage`, `error_type` | failed plugin calls, by cause |
//! | `orchestrator_tokens_generated_total` | counter | `worker_type` | completion tokens produced by the inference backend (`worker_type` = backend name) |
//! | `orchestrator_time_to_first_token_seconds` | histogram | `worker_type` | from sending a generation to its first token |
//! | `orchestrator_inter_token_latency_seconds` | histogram | `worker_type` | between two streamed tokens (chunks) of a generation |
//! | `orchestrator_upstream_requests_total` | counter | `worker_type`, `outcome` | attempts sent to a backend, by outcome (`ok`, `connect_error`, `rate_limited`, `server_error`, `client_error`, `timeout`, `protocol_error`, `cancelled`, `circuit_open`) |
//! | `orchestrator_upstream_circuit_state` | gauge | `worker_type` | the backend's circuit breaker: 0 closed, 1 half-open, 2 open |
//! | `orchestrator_upstream_circuit_transitions_total` | counter | `worker_type`, `to` | backend breaker transitions, by state entered |
//! | `orchestrator_queue_depth` | gauge | `stage` | requests waiting in the stage's queue |
//! | `orchestrator_queue_capacity` | gauge | `stage` | the stage's queue bound |
//! | `orchestrator_stage_duration_seconds` | histogram | `stage` | duration of each plugin call |
//! | `orchestrator_request_duration_seconds` | histogram | `outcome` | end-to-end duration of each admitted or shed request |
//! | `orchestrator_overhead_seconds` | histogram | `outcome` | that duration minus the time the request waited for the inference backend |
//! | `orchestrator_plugin_info` | gauge | `stage`, `sha256` | 1 for the plugin version each stage runs |
//! | `orchestrator_plugin_instances` | gauge | `stage` | live plugin instances |
//! | `orchestrator_instance_pool_unused_warm_slots` | gauge | | free memory slots of the instance pool that served an instance before |
//! | `orchestrator_circuit_state` | gauge | `stage` | circuit breaker: 0 closed, 1 half-open, 2 open |
//! | `orchestrator_circuit_transitions_total` | counter | `stage`, `to` | breaker transitions, by state entered |
//! | `orchestrator_plugin_reloads_total` | counter | `stage`, `result` | plugin swaps and rollbacks, `success` or `error` |
//! | `orchestrator_artifact_cache_refused_total` | counter | `reason` | compiled-artifact cache entries refused (`unsafe_directory`, `unsafe_file`, `bad_mac`, `incompatible`) and recompiled |
//! | `orchestrator_admin_auth_failures_total` | counter | | admin API requests refused for a missing or wrong token |
//! | `orchestrator_trace_spans_dropped_total` | counter | `reason` | trace spans not exported (`queue_full`, `export_failed`); 0 with tracing off |
//! | `orchestrator_store_operations_total` | counter | `store`, `op`, `outcome` | key-value store operations (`outcome`: `ok`, `error`, `timeout`, `invalid`) |
//! | `orchestrator_store_duration_seconds` | histogram | `store`, `op` | duration of each store operation |
//! | `orchestrator_store_evictions_total` | counter | `store` | keys a memory store evicted to stay within its bounds |
//! | `orchestrator_store_keys` | gauge | `store` | keys a memory store holds |
//! | `orchestrator_refusals_total` | counter | `stage`, `status`, `policy` | requests a stage refused (401, 403, 429), by the policy it named (a rate limit rule; at most 32 per stage, then `other`) |
//! | `orchestrator_response_cache_total` | counter | `result` | answers by what the response cache did (`hit`, `miss`, `bypass`: the `x-orchestrator-cache` header) |
//! | `orchestrator_principal_requests_total` | counter | `principal` | requests that ended, by principal (the first 100 principals, the rest `other`) |
//! | `orchestrator_principal_tokens_total` | counter | `principal`, `kind` | backend tokens spent, by principal and `kind` (`prompt`, `completion`) |
//! | `orchestrator_build_info` | gauge | `version` | always 1 |
//! | `process_*` | | | CPU, memory, file descriptors of the host process |
//!
//! `orchestrator_requests_total{stage}` counts per stage, so summing it over
//! stages counts each request once per stage. Ratios over *requests* use the
//! ingress figure instead: `orchestrator_request_duration_seconds_count`,
//! whose `outcome` label (`ok`, `error`, `timeout`, `shed`, `cancelled`, `answered`, `refused`) partitions every
//! request the API accepted for processing.
//!
//! # Handles
//!
//! Looking a series up by label values hashes them on every call, so the
//! pipeline resolves its handles once per stage ([`Metrics::stage`]) and
//! records through them. The free functions ([`record_throughput`], ...)
//! are the guide's convenience API over the process-wide [`global`]
//! registry; they look labels up on every call and are meant for code
//! outside the hot path.

mod global;
mod handles;
mod labels;
mod policy;
mod pool;
mod registry;
mod retire;
mod store;

pub use global::{
    gather_metrics, get_metrics_summary, global, record_error, record_queue_depth,
    record_stage_latency, record_throughput, record_tokens_generated,
};
pub use handles::{
    BackendMetrics, BreakerMetrics, CacheMetrics, ConnectionMetrics, RequestMetrics, StageMetrics,
};
pub use labels::{BreakerState, CacheRefusal, ErrorType, Outcome, UpstreamOutcome};
pub use policy::{CACHE_RESULTS, MAX_POLICIES, MAX_PRINCIPALS, PolicyMetrics};
pub use pool::PoolUsage;
pub use registry::{Metrics, MetricsSummary, REQUEST_BUCKETS, STAGE_BUCKETS, TOKEN_BUCKETS};
pub use store::{STORE_BUCKETS, StoreMetrics, StoreOp, StoreOutcome};
