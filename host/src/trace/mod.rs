//! Request traces: every request as an OpenTelemetry trace, exported over
//! OTLP/HTTP.
//!
//! Lifecycle: [`Traces::start`] (once, at startup, when `[tracing]` is
//! enabled) builds the OTLP exporter, the bounded export queue
//! ([`export`]) and the tracer; the API opens a request's server span with
//! [`Traces::server_span`], continuing the caller's W3C `traceparent`; the
//! [`Trace`] it returns travels with the request (through the pipeline's
//! job, into each plugin call, into the inference backend) and opens child
//! spans there; [`Traces::shutdown`] exports what is queued when the host
//! stops. With tracing off there is no `Traces`, every [`Trace`] is
//! [`Trace::off`], and each tracing call is a branch on a `None`.
//!
//! What a trace holds (docs/observability.md has the full list of
//! attributes):
//!
//! - the server span `POST /v1/chat/completions` (kind server), from the
//!   request's arrival to the last byte of its answer;
//! - one span per stage the request reached, `stage {name}` (internal),
//!   from the moment it was queued for the stage to the end of the
//!   plugin's call (the queue wait is an attribute), with the plugin's
//!   sha256, the instance mode and the outcome; a streaming stage's chunk
//!   calls are summarised on its span (chunks, bytes, time in calls)
//!   rather than given a span each; the plugin's log records are events of
//!   its stage's span;
//! - under the inference stage, one span per upstream attempt, `chat
//!   {model}` (kind client), in the OpenTelemetry GenAI semantic
//!   conventions, with the first token as an event; the attempt's
//!   `traceparent` is sent upstream, so a traced backend joins the trace.
//!
//! Prompts and completions are recorded only with `record_content = true`.
//!
//! Failure modes: export never blocks or fails a request. A slow or dead
//! collector fills the bounded queue; spans beyond it are dropped and
//! counted in `orchestrator_trace_spans_dropped_total`. A span that is
//! never ended explicitly (a request abandoned halfway) ends when its last
//! handle is dropped.

pub mod export;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

pub use opentelemetry::KeyValue as Attribute;
pub use opentelemetry::trace::SpanKind as Kind;

use crate::config::TracingConfig;
use crate::metrics::Metrics;

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A header's value names an environment variable that is not set.
    #[error(
        "config: `tracing.headers.{header}` names the environment variable `{variable}`, which is not set"
    )]
    MissingHeaderVariable {
        /// The header.
        header: String,
        /// The variable it names.
        variable: String,
    },
    /// `OTEL_TRACES_SAMPLER` or its argument is not understood.
    #[error("OTEL_TRACES_SAMPLER{suffix}: {message}")]
    Sampler {
        /// `""` or `"_ARG"`.
        suffix: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The OTLP exporter could not be built.
    #[error("the OTLP trace exporter: {0}")]
    Exporter(String),
    /// The export thread could not start.
    #[error("the trace export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The host's tracer: started once, shared by the API (cheap to clone).
#[derive(Clone, Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    record_content: bool,
}

impl Traces {
    /// Start exporting as `config` says (the environment fills in what it
    /// leaves out); `Ok(None)` when tracing is off.
    ///
    /// # Errors
    ///
    /// [`TraceError`] for a header variable that is not set, a sampler
    /// variable that is not understood, or an exporter or thread that
    /// cannot start.
    pub fn start(config: &TracingConfig, metrics: &Metrics) -> Result<Option<Traces>, TraceError> {
        if !config.enabled {
            return Ok(None);
        }
        let mut headers = HashMap::new();
        for (header, variable) in &config.headers {
            let value = std::env::var(variable).map_err(|_| TraceError::MissingHeaderVariable {
                header: header.clone(),
                variable: variable.clone(),
            })?;
            headers.insert(header.clone(), value);
        }
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_headers(headers)
            .with_timeout(Duration::from_millis(config.export_timeout_ms));
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let exporter = builder
            .build()
            .map_err(|e| TraceError::Exporter(e.to_string()))?;
        let (queue_full, export_failed) = metrics.trace_spans_dropped();
        let processor = export::QueueProcessor::start(
            exporter,
            config.max_queued_spans,
            queue_full,
            export_failed,
        )?;
        let service = config
            .service_name
            .clone()
            .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
            .unwrap_or_else(|| "orchestrator".into());
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(config.sampling_ratio)?)
            .with_resource(
                Resource::builder()
                    .with_service_name(service)
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("orchestrator");
        Ok(Some(Traces {
            provider,
            tracer,
            record_content: config.record_content,
        }))
    }

    /// Open the server span of a request, continuing the trace of the
    /// caller's `traceparent` (and `tracestate`) when it sent one.
    pub fn server_span(
        &self,
        caller: &TraceHeaders,
        name: &'static str,
        attributes: Vec<KeyValue>,
    ) -> Trace {
        let parent = TraceContextPropagator::new().extract(caller);
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent);
        Trace(Some(Arc::new(Active {
            tracer: self.tracer.clone(),
            cx: parent.with_span(span),
            record_content: self.record_content,
        })))
    }

    /// Export what is queued and stop, waiting at most `timeout`. Blocks:
    /// call it off the async runtime.
    pub fn shutdown(&self, timeout: Duration) {
        if let Err(error) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(%error, "trace export did not finish at shutdown");
        }
    }
}

/// A request's current span, or nothing when tracing is off (the default).
/// Cheap to clone; children are opened with [`Trace::child`].
#[derive(Clone, Debug, Default)]
pub struct Trace(Option<Arc<Active>>);

#[derive(Clone, Debug)]
struct Active {
    tracer: SdkTracer,
    cx: Context,
    record_content: bool,
}

/// The trace id (32 hex digits), or nothing when tracing is off: for log
/// fields (`trace_id = %trace`).
impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.trace_id() {
            Some(id) => f.write_str(&id),
            None => Ok(()),
        }
    }
}

/// Two traces are equal when they are the same span (or both off).
impl PartialEq for Trace {
    fn eq(&self, other: &Trace) -> bool {
        let context = |t: &Trace| t.0.as_ref().map(|a| a.cx.span().span_context().clone());
        context(self) == context(other)
    }
}

impl Trace {
    /// No trace: every call on it does nothing.
    pub fn off() -> Trace {
        Trace(None)
    }

    /// Whether this is a real (recording) span.
    pub fn is_recording(&self) -> bool {
        self.0.as_ref().is_some_and(|a| a.cx.span().is_recording())
    }

    /// Whether this span's trace is sampled: its children are recorded
    /// (also once this span has ended — a plain generation's attempts
    /// start after the stage that asked for it).
    pub fn is_sampled(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|a| a.cx.span().span_context().is_sampled())
    }

    /// Whether prompts and completions may be recorded.
    pub fn records_content(&self) -> bool {
        self.0.as_ref().is_some_and(|a| a.record_content)
    }

    /// The trace id, as 32 hex digits (also for a span that is not
    /// sampled: it still correlates logs and the caller's trace).
    pub fn trace_id(&self) -> Option<String> {
        let active = self.0.as_ref()?;
        let span = active.cx.span();
        let context = span.span_context();
        context.is_valid().then(|| context.trace_id().to_string())
    }

    /// Open a child span `name` of kind `kind`, started at `start` (now if
    /// `None`).
    pub fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        start: Option<SystemTime>,
        attributes: Vec<KeyValue>,
    ) -> Trace {
        let Some(active) = &self.0 else {
            return Trace(None);
        };
        if !self.is_sampled() {
            // An unsampled trace: its children are not sampled either, and
            // need no span of their own.
            return self.clone();
        }
        let mut builder = active
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes);
        if let Some(start) = start {
            builder = builder.with_start_time(start);
        }
        let span = builder.start_with_context(&active.tracer, &active.cx);
        Trace(Some(Arc::new(Active {
            tracer: active.tracer.clone(),
            cx: active.cx.with_span(span),
            record_content: active.record_content,
        })))
    }

    /// Set attributes on the span.
    pub fn set(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        if let Some(active) = self.recording() {
            active.cx.span().set_attributes(attributes);
        }
    }

    /// Add an event to the span.
    pub fn event(&self, name: impl Into<Cow<'static, str>>, attributes: Vec<KeyValue>) {
        if let Some(active) = self.recording() {
            active.cx.span().add_event(name, attributes);
        }
    }

    /// Mark the span failed, with `error_type` (`error.type`) and a
    /// message.
    pub fn fail(&self, error_type: &str, message: impl Into<Cow<'static, str>>) {
        if let Some(active) = self.recording() {
            let span = active.cx.span();
            span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
            span.set_status(Status::error(message));
        }
    }

    /// End the span now. (Later calls on it do nothing.)
    pub fn end(&self) {
        if let Some(active) = self.recording() {
            active.cx.span().end();
        }
    }

    /// The W3C `traceparent` (and `tracestate`, if any) of this span, to
    /// send with an outgoing request.
    pub fn headers(&self) -> Vec<(String, String)> {
        let Some(active) = &self.0 else {
            return Vec::new();
        };
        let mut headers = HeaderInjector(Vec::new());
        TraceContextPropagator::new().inject_context(&active.cx, &mut headers);
        headers.0
    }

    fn recording(&self) -> Option<&Active> {
        self.0.as_deref().filter(|a| a.cx.span().is_recording())
    }
}

/// The sampler: a ratio of new traces, the caller's decision for traces
/// that arrive with a `traceparent`.
fn sampler(ratio: Option<f64>) -> Result<Sampler, TraceError> {
    if let Some(ratio) = ratio {
        return Ok(parent_based(Sampler::TraceIdRatioBased(ratio)));
    }
    let name = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
    let arg = || -> Result<f64, TraceError> {
        let text = std::env::var("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|_| "1".into());
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .ok_or_else(|| TraceError::Sampler {
                suffix: "_ARG",
                message: format!("`{text}` is not a ratio between 0 and 1"),
            })
    };
    Ok(match name.trim() {
        "" | "parentbased_always_on" => parent_based(Sampler::AlwaysOn),
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "parentbased_always_off" => parent_based(Sampler::AlwaysOff),
        "traceidratio" => Sampler::TraceIdRatioBased(arg()?),
        "parentbased_traceidratio" => parent_based(Sampler::TraceIdRatioBased(arg()?)),
        other => {
            return Err(TraceError::Sampler {
                suffix: "",
                message: format!(
                    "`{other}` is not one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio"
                ),
            });
        }
    })
}

fn parent_based(root: Sampler) -> Sampler {
    Sampler::ParentBased(Box::new(root))
}

/// The W3C trace context headers a request came with.
#[derive(Debug, Default, Clone)]
pub struct TraceHeaders {
    /// `traceparent`, if sent.
    pub traceparent: Option<String>,
    /// `tracestate`, if sent, within the W3C limits (see [`TraceHeaders::new`]).
    pub tracestate: Option<String>,
}

/// Most `tracestate` list members kept (the W3C limit).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// Most bytes of `tracestate` kept: what W3C asks every tracer to
/// propagate at least. Longer values are cut as the specification says.
pub const MAX_TRACESTATE_BYTES: usize = 512;

impl TraceHeaders {
    /// The headers a request came with, its `tracestate` kept within
    /// [`MAX_TRACESTATE_MEMBERS`] and [`MAX_TRACESTATE_BYTES`] before
    /// anything parses it: a caller's header is parsed, copied into every
    /// span and forwarded upstream, so its size must not be the caller's
    /// choice.
    pub fn new(traceparent: Option<String>, tracestate: Option<String>) -> TraceHeaders {
        TraceHeaders {
            traceparent,
            tracestate: tracestate.and_then(|value| bounded_tracestate(&value)),
        }
    }
}

/// `value` cut to the W3C limits, or `None` if nothing is left. As the
/// specification asks, members longer than 128 bytes go first when the
/// value is too long, then members from the end. Only the first
/// [`MAX_TRACESTATE_MEMBERS`] non-empty members are looked at, so a
/// header of a hundred thousand members costs no more than one of 32.
fn bounded_tracestate(value: &str) -> Option<String> {
    let mut kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .take(MAX_TRACESTATE_MEMBERS)
        .collect();
    // Joined with commas: each member and its separator.
    let length = |kept: &[&str]| {
        kept.iter()
            .map(|m| m.len() + 1)
            .sum::<usize>()
            .saturating_sub(1)
    };
    if !kept.is_empty() && length(&kept) > MAX_TRACESTATE_BYTES {
        kept.retain(|m| m.len() <= 128);
        while !kept.is_empty() && length(&kept) > MAX_TRACESTATE_BYTES {
            kept.pop();
        }
    }
    (!kept.is_empty()).then(|| kept.join(","))
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent.as_deref(),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        let mut keys = Vec::new();
        if self.traceparent.is_some() {
            keys.push("traceparent");
        }
        if self.tracestate.is_some() {
            keys.push("tracestate");
        }
        keys
    }
}

/// Collects the headers to send (an empty `tracestate` is left out).
struct HeaderInjector(Vec<(String, String)>);

impl Injector for HeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.0.push((key.to_string(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy as _;

    use super::*;

    #[test]
    fn tracestate_is_kept_within_the_w3c_limits() {
        let keep = |v: &str| bounded_tracestate(v);
        assert_eq!(keep("a=1, b=2").as_deref(), Some("a=1,b=2"));
        assert_eq!(keep(" , ,"), None);
        let many = vec!["k=v"; 95_000].join(",");
        let kept = keep(&many).unwrap();
        assert_eq!(kept.split(',').count(), MAX_TRACESTATE_MEMBERS);
        // Too long: the long member goes first, then members from the end.
        let long = format!("big={}", "x".repeat(200));
        let value = format!("a=1,{long},{}", vec!["m=0123456789"; 30].join(","));
        let kept = keep(&value).unwrap();
        assert!(kept.len() <= MAX_TRACESTATE_BYTES, "{}", kept.len());
        assert!(!kept.contains("big="));
        assert!(kept.starts_with("a=1,m="));
        let huge = format!("a={}", "y".repeat(600));
        assert_eq!(keep(&huge), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tracestate_is_kept_within_the_w3c_limits(
            value in "([ ,]{0,2}([a-z0-9@*/_-]{1,12}=[ -~]{0,150}|.{0,8})){0,60}",
        ) {
            let members: Vec<&str> = value.split(',').map(str::trim).filter(|m| !m.is_empty()).take(MAX_TRACESTATE_MEMBERS).collect();
            let kept = bounded_tracestate(&value);
            let kept: Vec<&str> = kept.as_deref().map_or(Vec::new(), |k| k.split(',').collect());
            let length = kept.join(",").len();
            proptest::prop_assert!(length <= MAX_TRACESTATE_BYTES && kept.len() <= MAX_TRACESTATE_MEMBERS);
            if members.join(",").len() <= MAX_TRACESTATE_BYTES {
                proptest::prop_assert_eq!(kept, members);
            } else {
                // Members over 128 bytes go first, then members from the end.
                let short: Vec<&str> = members.into_iter().filter(|m| m.len() <= 128).collect();
                proptest::prop_assert!(kept[..] == short[..kept.len().min(short.len())]);
                let next = short.get(kept.len());
                proptest::prop_assert!(next.is_none_or(|next| length + 1 + next.len() > MAX_TRACESTATE_BYTES));
            }
        }

        #[test]
        fn arbitrary_trace_headers_never_panic_and_forward_what_was_parsed(
            traceparent in proptest::option::weighted(0.9, proptest::prop_oneof![2 => "00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]", 1 => ".{0,60}",
                1 => "(00|ff|[0-9a-f]{1,3}|.{0,3})-([0-9a-f]{32}|[0-9a-fA-F]{30,33}|.{0,8})-([0-9a-f]{16}|.{0,18})-([0-9a-f]{2}|.{0,3})(-.{0,6})?"]),
            tracestate in proptest::option::weighted(0.9, proptest::prop_oneof![
                3 => proptest::collection::vec("[a-z][a-z0-9_*/-]{0,8}(@[a-z][a-z0-9_*/-]{0,4})?=[!-+--<>-~]{1,30}", 0..40).prop_map(|m| m.join(",")),
                1 => "(([a-z0-9@*/_-]{1,12}=[ -~]{0,20}|.{0,12}), ?){0,40}"]),
        ) {
            let propagator = TraceContextPropagator::new();
            let parsed = propagator.extract(&TraceHeaders::new(traceparent, tracestate));
            let mut sent = HeaderInjector(Vec::new());
            propagator.inject_context(&parsed, &mut sent);
            let header = |name: &str| sent.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
            let again = TraceHeaders { traceparent: header("traceparent"), tracestate: header("tracestate") };
            proptest::prop_assert!(again.tracestate.as_ref().is_none_or(|s| s.len() <= MAX_TRACESTATE_BYTES && s.split(',').count() <= MAX_TRACESTATE_MEMBERS));
            let reparsed = propagator.extract(&again);
            proptest::prop_assert_eq!(reparsed.span().span_context().clone(), parsed.span().span_context().clone());
        }
    }
}
