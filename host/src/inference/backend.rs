//! One configured backend: its concurrency permits, circuit breaker,
//! retries and failover around its [`Protocol`], and the generation task
//! that opens a stream (trying the failover backend if the first fails)
//! and pumps its events to the pipeline.
//!
//! Lifecycle steps 3–5 of the [module docs](super) happen here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::generation::{BackendError, Ending, Event, GenerateRequest};
use super::openai::OpenAi;
use super::protocol::{AttemptError, EventStream, Protocol, UpstreamRequest};
use crate::circuit::{Admission, CircuitBreaker};
use crate::config::{BackendConfig, BackendKind};
use crate::metrics::{BackendMetrics, Metrics, UpstreamOutcome};
use crate::trace::{Attribute, Kind, Trace};

/// An error building the backends.
#[derive(Debug, thiserror::Error)]
#[error("backend `{backend}`: {message}")]
pub struct BackendSetupError {
    /// The backend's name.
    pub backend: String,
    /// What is wrong.
    pub message: String,
}

/// One configured backend (`[backends.<name>]`): its protocol, and the
/// policy, breaker, concurrency limit and metrics the host wraps around it.
pub(super) struct Backend {
    pub(super) name: String,
    pub(super) kind: BackendKind,
    /// The service it speaks to; `None` for `echo`, whose answers the
    /// router computes in process ([`super::echo`]).
    protocol: Option<Box<dyn Protocol>>,
    pub(super) settings: BackendConfig,
    pub(super) permits: Arc<Semaphore>,
    pub(super) breaker: Arc<CircuitBreaker>,
    pub(super) metrics: BackendMetrics,
}

impl Backend {
    /// Build backend `name` from its settings, with its metric handles.
    pub(super) fn new(
        name: &str,
        settings: &BackendConfig,
        metrics: &Metrics,
    ) -> Result<Backend, BackendSetupError> {
        let fail = |message: String| BackendSetupError {
            backend: name.to_string(),
            message,
        };
        let protocol: Option<Box<dyn Protocol>> = match settings.kind {
            BackendKind::Echo => None,
            BackendKind::Openai => {
                let api_key = match &settings.api_key_env {
                    None => None,
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        fail(format!(
                            "api_key_env names the environment variable {var}, which is not set"
                        ))
                    })?),
                };
                let base_url = settings.base_url.as_deref().unwrap_or_default();
                Some(Box::new(
                    OpenAi::new(
                        base_url,
                        api_key,
                        Duration::from_millis(settings.connect_timeout_ms),
                    )
                    .map_err(fail)?,
                ))
            }
        };
        let metrics = metrics.backend(name);
        Ok(Backend {
            name: name.to_string(),
            kind: settings.kind,
            protocol,
            permits: Arc::new(Semaphore::new(settings.max_concurrent)),
            breaker: CircuitBreaker::new(
                format!("backend {name}"),
                settings.breaker_failures,
                Duration::from_millis(settings.breaker_cooldown_ms),
                settings.breaker_probes,
                metrics.breaker.clone(),
            ),
            metrics,
            settings: settings.clone(),
        })
    }
}

/// The generation task: open (retries, failover), then pump events.
pub(super) async fn upstream_task(
    primary: Arc<Backend>,
    failover: Option<Arc<Backend>>,
    request: GenerateRequest,
    mut opened: oneshot::Sender<Result<String, BackendError>>,
    events: mpsc::Sender<Result<Event, BackendError>>,
) {
    let mut first_error: Option<BackendError> = None;
    for backend in std::iter::once(primary).chain(failover) {
        // Dropping `open` (the caller gave up) settles nothing: a probe
        // admission is given back by its guard.
        let attempt = tokio::select! {
            biased;
            () = opened.closed() => return,
            attempt = backend.open(&request) => attempt,
        };
        match attempt {
            Ok(open) => {
                if opened.send(Ok(backend.name.clone())).is_err() {
                    backend.metrics.outcome(UpstreamOutcome::Cancelled).inc();
                    return;
                }
                backend.pump(open, &request, events).await;
                return;
            }
            Err(failure) => {
                let error = failure.error;
                if let Some(first) = &first_error {
                    tracing::warn!(backend = %backend.name, request_id = %request.request_id, trace_id = %request.trace, %error, after = %first, "failover backend failed too");
                } else {
                    tracing::warn!(backend = %backend.name, request_id = %request.request_id, trace_id = %request.trace, %error, "backend failed");
                }
                first_error.get_or_insert(error);
                if !failure.backend_at_fault {
                    // The request itself was refused (a 4xx): another
                    // backend would refuse it too.
                    break;
                }
            }
        }
    }
    let error = first_error.unwrap_or_else(|| BackendError::Failed {
        backend: "?".into(),
        reason: "no backend tried".into(),
    });
    let _ = opened.send(Err(error));
}

/// An attempt that produced its first event.
struct StartedStream {
    events: EventStream,
    first: Event,
    last_event: Instant,
    /// The attempt's span, ended with the generation.
    trace: Trace,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Why a backend gave no first token.
struct OpenFailure {
    error: BackendError,
    /// The failure says something about the backend (it counts against its
    /// breaker, and the failover backend may do better); a refusal of the
    /// request itself (a 4xx other than 429) or a deadline too short for
    /// any attempt does not.
    backend_at_fault: bool,
}

impl Backend {
    fn request_timeout(&self, deadline: Instant) -> Option<Duration> {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| left.min(Duration::from_millis(self.settings.request_timeout_ms)))
    }

    fn timeout_error(&self, what: &str) -> BackendError {
        BackendError::Timeout {
            backend: self.name.clone(),
            reason: format!(
                "{what} (request_timeout_ms = {}, or the request's deadline)",
                self.settings.request_timeout_ms
            ),
        }
    }

    /// Pass the breaker, get a permit, and send the request until an
    /// attempt yields its first event. The breaker learns the result: a
    /// first token is a success (a probe that got one closes the breaker,
    /// whatever happens to the rest of the stream).
    async fn open(&self, request: &GenerateRequest) -> Result<StartedStream, OpenFailure> {
        let probe = match self.breaker.admit() {
            Admission::Pass => None,
            Admission::Probe(probe) => Some(probe),
            Admission::Refuse(retry_after) => {
                self.metrics.outcome(UpstreamOutcome::CircuitOpen).inc();
                return Err(OpenFailure {
                    error: BackendError::Unavailable {
                        backend: self.name.clone(),
                        reason: format!(
                            "its circuit breaker is open after repeated failures; retry in {} s",
                            retry_after.as_secs().max(1)
                        ),
                    },
                    backend_at_fault: true,
                });
            }
        };
        let result = self.attempts(request).await;
        let failed = match &result {
            Ok(_) => false,
            Err(failure) if failure.backend_at_fault => true,
            // Decides nothing: dropping an unsettled probe gives its slot back.
            Err(_) => return result,
        };
        match probe {
            Some(probe) => probe.settle(failed),
            None => self.breaker.record(failed),
        }
        result
    }

    async fn attempts(&self, request: &GenerateRequest) -> Result<StartedStream, OpenFailure> {
        let deadline = request.deadline;
        let not_at_fault = |error| OpenFailure {
            error,
            backend_at_fault: false,
        };
        let Some(protocol) = &self.protocol else {
            return Err(not_at_fault(BackendError::Failed {
                backend: self.name.clone(),
                reason: "an `echo` backend is answered in process, not by a generation task".into(),
            }));
        };
        let permit = tokio::time::timeout_at(deadline.into(), self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                not_at_fault(BackendError::Unavailable {
                    backend: self.name.clone(),
                    reason: format!(
                        "at capacity ({} requests in flight) until the request's deadline",
                        self.settings.max_concurrent
                    ),
                })
            })?
            .map_err(|_| {
                not_at_fault(BackendError::Unavailable {
                    backend: self.name.clone(),
                    reason: "shutting down".into(),
                })
            })?;
        let mut upstream_request = UpstreamRequest {
            model: self.settings.model.as_deref().unwrap_or(request.model()),
            request,
            trace_headers: Vec::new(),
        };
        let mut attempt = 0u32;
        loop {
            let Some(timeout) = self.request_timeout(deadline) else {
                return Err(not_at_fault(
                    self.timeout_error("no time left for an attempt"),
                ));
            };
            // Upstream requests are always streamed (SSE).
            let span = self.attempt_span(request, upstream_request.model, attempt, true);
            upstream_request.trace_headers = span.headers();
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, async {
                let mut events = protocol.send(&upstream_request).await?;
                match events.next().await {
                    Some(Ok(first)) => Ok((events, first)),
                    Some(Err(error)) => Err(error),
                    None => Err(AttemptError::Protocol("an empty stream".into())),
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err(AttemptError::Timeout(format!(
                    "no first token within {} ms",
                    timeout.as_millis()
                )))
            });
            let error = match result {
                Ok((events, first)) => {
                    let ttft = started.elapsed().as_secs_f64();
                    self.metrics.ttft.observe(ttft);
                    span.event(
                        "gen_ai.first_token",
                        vec![Attribute::new("gen_ai.server.time_to_first_token", ttft)],
                    );
                    return Ok(StartedStream {
                        events,
                        first,
                        last_event: Instant::now(),
                        trace: span,
                        _permit: permit,
                    });
                }
                Err(error) => error,
            };
            span.fail(error.outcome().label(), format!("{error:?}"));
            span.end();
            self.metrics.outcome(error.outcome()).inc();
            let backoff = self.backoff(attempt, &error);
            let retry = error.retryable()
                && attempt < self.settings.max_retries
                && backoff.is_some_and(|b| Instant::now() + b < deadline);
            tracing::debug!(backend = %self.name, request_id = %request.request_id, trace_id = %request.trace, attempt, ?error, retry, "attempt failed");
            if !retry {
                // A 4xx other than 429 refuses the request, not the backend.
                let backend_at_fault = !matches!(
                    error,
                    AttemptError::Status { status, .. } if status < 500 && status != 429
                );
                return Err(OpenFailure {
                    error: error.into_backend_error(&self.name),
                    backend_at_fault,
                });
            }
            if let Some(backoff) = backoff {
                tokio::time::sleep(backoff).await;
            }
            attempt += 1;
        }
    }

    /// The span of attempt `attempt` (0 for the first) at `request`, sent
    /// upstream for `model` (as a stream of events, or not), in the
    /// OpenTelemetry GenAI conventions.
    pub(super) fn attempt_span(
        &self,
        request: &GenerateRequest,
        model: &str,
        attempt: u32,
        stream: bool,
    ) -> Trace {
        let trace = &request.trace;
        if !trace.is_recording() {
            return Trace::off();
        }
        let provider = match self.settings.kind {
            BackendKind::Echo => "orchestrator.echo",
            BackendKind::Openai => "openai",
        };
        let params = &request.params;
        let mut attributes = vec![
            Attribute::new("gen_ai.operation.name", "chat"),
            Attribute::new("gen_ai.provider.name", provider),
            Attribute::new("gen_ai.request.model", model.to_string()),
            Attribute::new("gen_ai.request.stream", stream),
            Attribute::new("orchestrator.backend", self.name.clone()),
            Attribute::new("orchestrator.breaker.state", self.breaker.state().label()),
        ];
        if let Some(max_tokens) = params.max_tokens() {
            attributes.push(Attribute::new(
                "gen_ai.request.max_tokens",
                i64::from(max_tokens),
            ));
        }
        if let Some(temperature) = params.temperature {
            attributes.push(Attribute::new("gen_ai.request.temperature", temperature));
        }
        if let Some(top_p) = params.top_p {
            attributes.push(Attribute::new("gen_ai.request.top_p", top_p));
        }
        if let Some(seed) = params.seed {
            attributes.push(Attribute::new("gen_ai.request.seed", seed));
        }
        if attempt > 0 {
            attributes.push(Attribute::new(
                "http.request.resend_count",
                i64::from(attempt),
            ));
        }
        if trace.records_content() {
            let chat = serde_json::to_string(&request.messages).unwrap_or_default();
            attributes.push(Attribute::new("gen_ai.prompt", chat));
        }
        trace.child(format!("chat {model}"), Kind::Client, None, attributes)
    }

    /// Exponential backoff with full jitter, or what `Retry-After` asked
    /// for (`None` if that is more than a minute).
    fn backoff(&self, attempt: u32, error: &AttemptError) -> Option<Duration> {
        if let AttemptError::Status {
            retry_after: Some(after),
            ..
        } = error
        {
            return (*after <= Duration::from_secs(60)).then_some(*after);
        }
        let cap = self
            .settings
            .retry_backoff_ms
            .saturating_mul(1 << attempt.min(16));
        Some(Duration::from_millis(fastrand::u64(0..=cap)))
    }

    /// Forward events until the end, an error, a stall, or the receiver
    /// going away.
    async fn pump(
        &self,
        mut open: StartedStream,
        request: &GenerateRequest,
        events: mpsc::Sender<Result<Event, BackendError>>,
    ) {
        let mut chunks = 0u64;
        // What the answer may hold: an upstream that ignores `max_tokens`
        // is cut there, not buffered without limit.
        let max_bytes = self.max_answer_bytes(request);
        let mut bytes = 0usize;
        let trace = open.trace.clone();
        // Only with `record_content`: the completion, for the span.
        let mut completion = trace.records_content().then(String::new);
        let mut next = Some(Ok(open.first.clone()));
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => {
                    let Some(timeout) = self.request_timeout(request.deadline) else {
                        trace.fail("timeout", "the request's deadline passed");
                        trace.end();
                        self.end(UpstreamOutcome::Timeout, chunks, None);
                        let _ = events
                            .send(Err(self.timeout_error("the request's deadline passed")))
                            .await;
                        return;
                    };
                    tokio::select! {
                        biased;
                        () = events.closed() => {
                            trace.set([Attribute::new("orchestrator.outcome", "cancelled")]);
                            trace.end();
                            self.end(UpstreamOutcome::Cancelled, chunks, None);
                            return;
                        }
                        item = tokio::time::timeout(timeout, open.events.next()) => match item {
                            Err(_) => Err(AttemptError::Timeout(format!(
                                "no token for {} ms", timeout.as_millis()
                            ))),
                            Ok(None) => Err(AttemptError::Protocol("the stream ended early".into())),
                            Ok(Some(item)) => item,
                        },
                    }
                }
            };
            match item {
                Ok(event @ (Event::Delta(_) | Event::Extra(_))) => {
                    if chunks > 0 {
                        self.metrics
                            .itl
                            .observe(open.last_event.elapsed().as_secs_f64());
                    }
                    open.last_event = Instant::now();
                    chunks += 1;
                    if let (Some(completion), Event::Delta(text)) = (&mut completion, &event) {
                        completion.push_str(text);
                    }
                    bytes += match &event {
                        Event::Delta(text) => text.len(),
                        Event::Extra(extra) => {
                            extra
                                .tool_calls
                                .iter()
                                .map(|c| {
                                    // Every piece counts, a new call's
                                    // entry too.
                                    16 + c.arguments.len()
                                        + c.name.as_ref().map_or(0, String::len)
                                        + c.id.as_ref().map_or(0, String::len)
                                })
                                .sum::<usize>()
                                + extra.refusal.as_ref().map_or(0, String::len)
                                + extra.logprobs.as_ref().map_or(0, |l| l.to_string().len())
                        }
                        Event::End(_) => 0,
                    };
                    if bytes > max_bytes {
                        // Cut as a `length` answer; the upstream request is
                        // dropped (cancelled) on return.
                        tracing::warn!(
                            backend = %self.name,
                            bytes,
                            max_bytes,
                            "the upstream sent more than the request's max_tokens allow; the answer is cut"
                        );
                        let ending = Ending {
                            finish_reason: Some("length".into()),
                            usage: None,
                            response_id: None,
                        };
                        trace_ending(&trace, &ending, chunks, completion.take());
                        self.end(UpstreamOutcome::Ok, chunks, Some(false));
                        let _ = events.send(Ok(Event::End(ending))).await;
                        return;
                    }
                    if events.send(Ok(event)).await.is_err() {
                        trace.set([Attribute::new("orchestrator.outcome", "cancelled")]);
                        trace.end();
                        self.end(UpstreamOutcome::Cancelled, chunks, None);
                        return;
                    }
                }
                Ok(Event::End(mut ending)) => {
                    ending.usage = self.sane_usage(ending.usage, request);
                    let tokens = ending.usage.map_or(chunks, |(_, c)| u64::from(c));
                    trace_ending(&trace, &ending, tokens, completion.take());
                    self.end(UpstreamOutcome::Ok, tokens, Some(false));
                    let _ = events.send(Ok(Event::End(ending))).await;
                    return;
                }
                Err(error) => {
                    trace.fail(error.outcome().label(), format!("{error:?}"));
                    trace.end();
                    self.end(error.outcome(), chunks, Some(true));
                    let _ = events.send(Err(error.into_backend_error(&self.name))).await;
                    return;
                }
            }
        }
    }

    /// Record how a generation that had its first token ended: `failed`
    /// for the breaker, `None` when nothing was learnt about the backend
    /// (cancelled).
    pub(super) fn end(&self, outcome: UpstreamOutcome, tokens: u64, failed: Option<bool>) {
        self.metrics.outcome(outcome).inc();
        self.metrics.tokens.inc_by(tokens);
        if let Some(failed) = failed {
            self.breaker.record(failed);
        }
    }
}

/// Finish an attempt's span with what the upstream said at the end.
pub(super) fn trace_ending(
    trace: &Trace,
    ending: &Ending,
    tokens: u64,
    completion: Option<String>,
) {
    if !trace.is_recording() {
        return;
    }
    let mut attributes = vec![
        Attribute::new("orchestrator.outcome", "ok"),
        Attribute::new("gen_ai.usage.output_tokens", tokens as i64),
    ];
    if let Some(reason) = &ending.finish_reason {
        attributes.push(Attribute::new(
            "gen_ai.response.finish_reasons",
            opentelemetry::Value::Array(
                vec![opentelemetry::StringValue::from(reason.clone())].into(),
            ),
        ));
    }
    if let Some((input, _)) = ending.usage {
        attributes.push(Attribute::new(
            "gen_ai.usage.input_tokens",
            i64::from(input),
        ));
    }
    if let Some(id) = &ending.response_id {
        attributes.push(Attribute::new("gen_ai.response.id", id.clone()));
    }
    if let Some(completion) = completion {
        attributes.push(Attribute::new("gen_ai.completion", completion));
    }
    trace.set(attributes);
    trace.end();
}
