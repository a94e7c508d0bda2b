//! One configured backend: its concurrency permits, circuit breaker and
//! retries around its [`Protocol`], up to an attempt's first event
//! ([`StartedStream`]); what happens next is `delivery`'s.
//!
//! Lifecycle step 3 of the [module docs](super) happens here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::Semaphore;

use super::generation::{BackendError, Event, GenerateRequest};
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

/// An attempt that produced its first event.
pub(super) struct StartedStream {
    pub(super) events: EventStream,
    pub(super) first: Event,
    /// The attempt asked for a stream (else its events are the answer,
    /// read whole).
    pub(super) streamed: bool,
    pub(super) last_event: Instant,
    /// The attempt's span, ended with the generation.
    pub(super) trace: Trace,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// An attempt sent and not yet answered: if the caller gives up on it
/// (drops the future), it is counted as `cancelled` and its span ended so,
/// as every attempt is counted once.
struct InFlight<'a> {
    backend: &'a Backend,
    span: &'a Trace,
    armed: bool,
}

impl InFlight<'_> {
    /// The attempt has an answer (or an error): counted by the caller.
    fn settled(mut self) {
        self.armed = false;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.span
                .set([Attribute::new("orchestrator.outcome", "cancelled")]);
            self.span.end();
            self.backend
                .metrics
                .outcome(UpstreamOutcome::Cancelled)
                .inc();
        }
    }
}

/// Why a backend gave no first token.
pub(super) struct OpenFailure {
    pub(super) error: BackendError,
    /// The failure says something about the backend (it counts against its
    /// breaker, and the failover backend may do better); a refusal of the
    /// request itself (a 4xx other than 429) or a deadline too short for
    /// any attempt does not.
    pub(super) backend_at_fault: bool,
}

impl Backend {
    /// Whether `request`'s attempts at this backend ask for a stream.
    pub(super) fn streams(&self, request: &GenerateRequest) -> bool {
        request.stream || self.settings.always_stream
    }

    pub(super) fn request_timeout(&self, deadline: Instant) -> Option<Duration> {
        let left = deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then(|| left.min(Duration::from_millis(self.settings.request_timeout_ms)))
    }

    pub(super) fn timeout_error(&self, what: &str) -> BackendError {
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
    pub(super) async fn open(
        &self,
        request: &GenerateRequest,
    ) -> Result<StartedStream, OpenFailure> {
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
        let stream = self.streams(request);
        let mut upstream_request = UpstreamRequest {
            model: self.settings.model.as_deref().unwrap_or(request.model()),
            request,
            stream,
            answer_limit: self.max_answer_bytes(request),
            trace_headers: Vec::new(),
        };
        let mut attempt = 0u32;
        loop {
            // A streamed attempt must bring its first event within
            // `request_timeout_ms`, a plain one its whole answer.
            let Some(timeout) = self.request_timeout(deadline) else {
                return Err(not_at_fault(
                    self.timeout_error("no time left for an attempt"),
                ));
            };
            let span = self.attempt_span(request, upstream_request.model, attempt, stream);
            upstream_request.trace_headers = span.headers();
            let started = Instant::now();
            let in_flight = InFlight {
                backend: self,
                span: &span,
                armed: true,
            };
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
                    "no {} within {} ms",
                    if stream { "first token" } else { "answer" },
                    timeout.as_millis()
                )))
            });
            in_flight.settled();
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
                        streamed: stream,
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
                // A 4xx other than 429 refuses the request, not the backend;
                // a timeout the request's own deadline set (it was nearer
                // than `request_timeout_ms`: a long plain answer, say)
                // says nothing about the backend either.
                let deadline_bound =
                    timeout < Duration::from_millis(self.settings.request_timeout_ms);
                let backend_at_fault = match error {
                    AttemptError::Status { status, .. } => status >= 500 || status == 429,
                    AttemptError::Timeout(_) => !deadline_bound,
                    AttemptError::Connect(_) | AttemptError::Protocol(_) => true,
                };
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
        if !trace.is_sampled() {
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
}
