//! `[tracing]`: OpenTelemetry trace export, off by default.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How request traces are exported (see the `trace` module of the host for
/// what a trace holds). Every field has a default; with `enabled = false`
/// (the default) nothing is traced and nothing else here is used.
///
/// The standard OpenTelemetry environment variables apply where this table
/// is silent: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, with `/v1/traces` appended),
/// `OTEL_EXPORTER_OTLP_HEADERS` (merged with `headers`; on a clash the
/// variable wins, as the OTLP exporter does), `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG`, and `OTEL_SERVICE_NAME`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Export traces.
    pub enabled: bool,
    /// The OTLP/HTTP (protobuf) traces URL, used as given (for a collector:
    /// `http://collector:4318/v1/traces`). Default: from the environment,
    /// else `http://localhost:4318/v1/traces`.
    pub endpoint: Option<String>,
    /// Headers sent with each export, by header name: the value is the
    /// *name of an environment variable* holding the header's value (so no
    /// secret sits in the file). A variable that is not set is a startup
    /// error.
    pub headers: BTreeMap<String, String>,
    /// The share of new traces sampled, 0 to 1; a request that arrives with
    /// a `traceparent` follows its caller's decision. Default: from
    /// `OTEL_TRACES_SAMPLER`(`_ARG`), else 1.
    pub sampling_ratio: Option<f64>,
    /// The `service.name` of the spans. Default: `OTEL_SERVICE_NAME`, else
    /// `orchestrator`.
    pub service_name: Option<String>,
    /// Record prompts and completions on the spans (`gen_ai.prompt`,
    /// `gen_ai.completion`). Off: they may hold personal data.
    pub record_content: bool,
    /// Spans buffered for export; beyond it, new spans are dropped and
    /// counted in `orchestrator_trace_spans_dropped_total{reason="queue_full"}`.
    pub max_queued_spans: usize,
    /// How long one export may take before it is abandoned (its spans are
    /// counted as dropped, `reason="export_failed"`).
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            enabled: false,
            endpoint: None,
            headers: BTreeMap::new(),
            sampling_ratio: None,
            service_name: None,
            record_content: false,
            max_queued_spans: 2048,
            export_timeout_ms: 5000,
        }
    }
}
