//! Inference backends: what answers a plugin's `inference.generate` and
//! `inference.generate-stream` calls.
//!
//! # Lifecycle
//!
//! 1. **Configure.** `[backends.<name>]` tables name backends of a
//!    [`BackendKind`]; `[routing]` maps the request's `model` to one of them
//!    (`echo` → `echo` is predefined). [`Backends::new`] builds them once at
//!    startup: an HTTP client per `openai` backend, the API key read from the
//!    environment variable the config names, a circuit breaker, a
//!    concurrency limit, and the metric handles.
//! 2. **Route.** A plugin's call names the client's model
//!    (`generation-params.model`); the routing table picks the backend
//!    (unknown models are refused earlier, at the API, with 404).
//! 3. **Open.** The generation runs as a task on the host's main tokio
//!    runtime (plugin calls run on worker threads; network I/O must not
//!    depend on them). The task waits for a concurrency permit, asks the
//!    breaker, and sends the request — always as a *streaming* request
//!    upstream, so time to first token and inter-token latency are measured
//!    for every generation. An attempt that fails before the first token
//!    with a connect error, a 429 or a 5xx is retried up to `max_retries`
//!    times with exponential backoff and full jitter, honouring
//!    `Retry-After`, within the request's deadline. Timeouts are not
//!    retried (the upstream may still be working on the request), nor are
//!    answers that are not a chat-completion stream. If the backend still
//!    fails, or its breaker is open, its `failover` backend (if any) gets
//!    the request — unless the backend refused the request itself (a 4xx
//!    other than 429), which another backend would refuse too.
//! 4. **Stream.** Once the first token is in, tokens flow through a
//!    [`TokenStream`]: collected into one completion for `generate`, or
//!    handed to the pipeline, which passes them through the streaming
//!    stages to the client, for `generate-stream`. A stall longer than
//!    `request_timeout_ms` between two events ends the generation with a
//!    timeout. After the first token nothing is retried: the client has
//!    seen output.
//! 5. **Cancel.** Dropping the [`TokenStream`] (the client went away, a
//!    stage stopped the generation, the request's deadline passed) ends the
//!    task, which drops the HTTP response: the connection closes and the
//!    upstream server stops generating.
//!
//! # Failure modes
//!
//! A [`BackendError`] names the backend and never contains credentials. It
//! reaches the plugin as a string, and the host remembers its class so that
//! the stage's error is counted as `upstream_unavailable` (connect failure,
//! breaker open, at capacity: HTTP 503), `upstream_timeout` (HTTP 504) or
//! `upstream` (an error status or an unusable answer: HTTP 502) in
//! `orchestrator_errors_total{stage="inference"}`. A backend's breaker
//! counts requests that failed after their retries (timeouts included; a
//! 4xx refusing the request, a full concurrency limit and the request's own
//! deadline excluded), not attempts; a first token is a success, and a
//! cancellation decides nothing.
//!
//! # Metrics
//!
//! Labelled `worker_type` = backend name (bounded by the configuration):
//! `orchestrator_tokens_generated_total` (the upstream's reported usage, or
//! the number of streamed chunks when it reports none),
//! `orchestrator_time_to_first_token_seconds`,
//! `orchestrator_inter_token_latency_seconds`,
//! `orchestrator_upstream_requests_total{outcome}` (one per attempt) and the
//! backend's breaker series.
//!
//! # `echo`
//!
//! The built-in default is **not a language model**. It is a deterministic
//! stand-in that needs no network and no weights: it answers with the last
//! user turn of the prompt (the text after the last `User:` line), cut to
//! `max_tokens` tokens, streamed one word at a time. Token counts are real
//! counts of the prompt and the answer under the shared tokenizer
//! (`orchestrator-text`).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use orchestrator_text::{count_tokens, tokens, truncate_tokens};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::circuit::{Admission, CircuitBreaker};
use crate::config::{BackendConfig, BackendKind, Config};
use crate::metrics::{BackendMetrics, ErrorType, Metrics, UpstreamOutcome};

/// What a plugin asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, sent upstream as one user message.
    pub prompt: String,
    /// The model name the client asked for (the routing key).
    pub model: String,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// The generation must end by then.
    pub deadline: Instant,
}

/// One event of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Generated text.
    Delta(String),
    /// The generation ended.
    End(Ending),
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ending {
    /// The upstream's finish reason (`stop`, `length`, ...), if it gave one.
    pub finish_reason: Option<String>,
    /// `(prompt_tokens, completion_tokens)`, if the upstream reported them.
    pub usage: Option<(u32, u32)>,
}

/// A whole generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// A backend failure. Its message is shown to the plugin and may reach the
/// client, so it must never contain credentials.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// No backend serves the model.
    #[error("model `{0}` is not served by any configured backend")]
    UnknownModel(String),
    /// The backend could not be reached, is at capacity, or its breaker is open.
    #[error("inference backend `{backend}` is unavailable: {reason}")]
    Unavailable {
        /// The backend's name.
        backend: String,
        /// Why.
        reason: String,
    },
    /// The backend did not answer in time.
    #[error("inference backend `{backend}` timed out: {reason}")]
    Timeout {
        /// The backend's name.
        backend: String,
        /// What it did not do in time.
        reason: String,
    },
    /// The backend answered with an error or something unusable.
    #[error("inference backend `{backend}` failed: {reason}")]
    Failed {
        /// The backend's name.
        backend: String,
        /// What it said.
        reason: String,
    },
}

impl BackendError {
    /// The `error_type` the inference stage's failure is counted under.
    pub fn error_type(&self) -> ErrorType {
        match self {
            BackendError::UnknownModel(_) => ErrorType::InvalidInput,
            BackendError::Unavailable { .. } => ErrorType::UpstreamUnavailable,
            BackendError::Timeout { .. } => ErrorType::UpstreamTimeout,
            BackendError::Failed { .. } => ErrorType::Upstream,
        }
    }
}

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
    /// An answer that is not a chat-completion stream.
    Protocol(String),
}

impl AttemptError {
    fn outcome(&self) -> UpstreamOutcome {
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
    fn retryable(&self) -> bool {
        match self {
            AttemptError::Connect(_) => true,
            AttemptError::Status { status, .. } => *status == 429 || *status >= 500,
            AttemptError::Timeout(_) | AttemptError::Protocol(_) => false,
        }
    }

    fn into_backend_error(self, backend: &str) -> BackendError {
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

/// A future returned by [`Backend::send`].
pub type SendFuture = Pin<Box<dyn Future<Output = Result<EventStream, AttemptError>> + Send>>;

/// The request one attempt sends.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRequest {
    /// The model name sent upstream.
    pub model: String,
    /// The plugin's request.
    pub request: GenerateRequest,
}

/// A kind of inference service: one attempt at a generation. Retries,
/// timeouts between events, breakers, limits and metrics are the host's
/// ([`Backends`]), the same for every kind.
pub trait Backend: Send + Sync + 'static {
    /// Send the request. Resolves when the upstream has accepted it (for
    /// HTTP: the response headers are in), with its events.
    fn send(&self, request: &UpstreamRequest) -> SendFuture;
}

/// The deterministic built-in backend (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Echo;

impl Echo {
    /// The text `echo` answers `prompt` with, before the token limit.
    pub fn answer(prompt: &str) -> &str {
        let turn = prompt
            .rfind("User:")
            .map_or(prompt, |at| &prompt[at + "User:".len()..]);
        let turn = turn.rfind("\nAssistant:").map_or(turn, |end| &turn[..end]);
        turn.trim()
    }

    /// The whole generation for `request`, computed at once.
    pub fn generate(request: &GenerateRequest) -> Completion {
        let answer = Echo::answer(&request.prompt);
        let text = truncate_tokens(answer, request.max_tokens as usize);
        Completion {
            finish_reason: if text.len() < answer.len() {
                "length"
            } else {
                "stop"
            },
            text: text.to_string(),
            prompt_tokens: count_tokens(&request.prompt) as u32,
            completion_tokens: count_tokens(text) as u32,
        }
    }
}

impl Backend for Echo {
    fn send(&self, request: &UpstreamRequest) -> SendFuture {
        let completion = Echo::generate(&request.request);
        // One delta per token, each with the text up to the next token, so
        // that the deltas concatenate to exactly the completion.
        let text = completion.text;
        let mut starts: Vec<usize> = tokens(&text)
            .map(|t| t.as_ptr() as usize - text.as_ptr() as usize)
            .collect();
        if starts.first() != Some(&0) {
            starts.insert(0, 0);
        }
        starts.push(text.len());
        let mut events: Vec<Result<Event, AttemptError>> = starts
            .windows(2)
            .filter(|w| w[0] < w[1])
            .map(|w| Ok(Event::Delta(text[w[0]..w[1]].to_string())))
            .collect();
        events.push(Ok(Event::End(Ending {
            finish_reason: Some(completion.finish_reason.to_string()),
            usage: Some((completion.prompt_tokens, completion.completion_tokens)),
        })));
        Box::pin(async move { Ok(Box::pin(futures_util::stream::iter(events)) as EventStream) })
    }
}

/// An OpenAI-compatible `/chat/completions` service, spoken to with
/// `"stream": true` and `stream_options.include_usage`.
pub struct OpenAi {
    client: reqwest::Client,
    url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Most bytes of an error body quoted in a message.
const ERROR_BODY_QUOTE: usize = 300;

impl OpenAi {
    /// A client for `base_url` (`.../v1`).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        connect_timeout: Duration,
    ) -> Result<OpenAi, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(OpenAi {
            client,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            api_key,
        })
    }

    /// The JSON body of a request.
    pub fn body(request: &UpstreamRequest) -> Value {
        let r = &request.request;
        let mut body = json!({
            "model": request.model,
            "messages": [{"role": "user", "content": r.prompt}],
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !r.stop.is_empty() {
            body["stop"] = json!(r.stop);
        }
        body
    }
}

impl Backend for OpenAi {
    fn send(&self, request: &UpstreamRequest) -> SendFuture {
        let mut builder = self.client.post(&self.url).json(&OpenAi::body(request));
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        Box::pin(async move {
            let response = builder.send().await.map_err(|e| {
                // reqwest's messages carry the URL but never headers.
                AttemptError::Connect(without_url(&e))
            })?;
            let status = response.status();
            if !status.is_success() {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // Quote the start of the body; read no more than that.
                let mut body = Vec::new();
                let mut response = response;
                while body.len() < 4 * ERROR_BODY_QUOTE {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                let body = String::from_utf8_lossy(&body);
                return Err(AttemptError::Status {
                    status: status.as_u16(),
                    retry_after,
                    message: quote(&body),
                });
            }
            let bytes = response.bytes_stream();
            Ok(Box::pin(sse_events(bytes)) as EventStream)
        })
    }
}

/// The error without reqwest's `for url (...)` suffix: the source chain.
fn without_url(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut message = if error.is_connect() {
        "cannot connect".to_string()
    } else if error.is_timeout() {
        "connect timeout".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn quote(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(ERROR_BODY_QUOTE) {
        Some((at, _)) => format!("{}…", &body[..at]),
        None => body.to_string(),
    }
}

/// Parse a server-sent-event byte stream of `chat.completion.chunk`
/// objects into events.
fn sse_events<S, B, E>(bytes: S) -> impl Stream<Item = Result<Event, AttemptError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    struct State<S> {
        bytes: Pin<Box<S>>,
        parser: SseParser,
        queue: std::collections::VecDeque<Result<Event, AttemptError>>,
        done: bool,
    }
    let state = State {
        bytes: Box::pin(bytes),
        parser: SseParser::default(),
        queue: Default::default(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.queue.pop_front() {
                if matches!(item, Ok(Event::End(_)) | Err(_)) {
                    state.done = true;
                    state.queue.clear();
                }
                return Some((item, state));
            }
            if state.done {
                return None;
            }
            match state.bytes.next().await {
                Some(Ok(chunk)) => state.queue.extend(state.parser.feed(chunk.as_ref())),
                Some(Err(e)) => {
                    state
                        .queue
                        .push_back(Err(AttemptError::Protocol(format!("stream broken: {e}"))));
                }
                None => {
                    let end = state.parser.finish();
                    state.queue.push_back(end);
                }
            }
        }
    })
}

/// Incremental parser of an OpenAI chat-completion SSE stream.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    finish_reason: Option<String>,
    usage: Option<(u32, u32)>,
    ended: bool,
}

/// Longest line accepted from an upstream (a guard against a server that
/// never sends a newline).
const MAX_SSE_LINE: usize = 4 * 1024 * 1024;

impl SseParser {
    /// Feed bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Event, AttemptError>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if self.ended {
                break;
            }
            if byte != b'\n' {
                self.line.push(byte);
                if self.line.len() > MAX_SSE_LINE {
                    self.ended = true;
                    out.push(Err(AttemptError::Protocol(
                        "an event line longer than 4 MiB".into(),
                    )));
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(&line);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let data = std::mem::take(&mut self.data);
                    out.extend(self.event(&data));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
                if self.data.len() > MAX_SSE_LINE {
                    self.ended = true;
                    out.push(Err(AttemptError::Protocol(
                        "an event longer than 4 MiB".into(),
                    )));
                }
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry
            // nothing a chat completion needs.
        }
        out
    }

    /// The byte stream ended: an `End` if the generation had finished.
    pub fn finish(&mut self) -> Result<Event, AttemptError> {
        if !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            if let Some(event) = self.event(&data).into_iter().find(|e| e.is_err()) {
                return event;
            }
        }
        if self.ended || self.finish_reason.is_some() {
            Ok(Event::End(Ending {
                finish_reason: self.finish_reason.take(),
                usage: self.usage,
            }))
        } else {
            Err(AttemptError::Protocol(
                "the stream ended before the generation finished".into(),
            ))
        }
    }

    fn event(&mut self, data: &str) -> Vec<Result<Event, AttemptError>> {
        if data.trim() == "[DONE]" {
            self.ended = true;
            return vec![Ok(Event::End(Ending {
                finish_reason: self.finish_reason.take(),
                usage: self.usage,
            }))];
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(e) => {
                self.ended = true;
                return vec![Err(AttemptError::Protocol(format!(
                    "an event is not JSON: {e}"
                )))];
            }
        };
        if let Some(error) = value.get("error") {
            self.ended = true;
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return vec![Err(AttemptError::Protocol(format!(
                "error in stream: {}",
                quote(&message)
            )))];
        }
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            let field = |name| {
                usage
                    .get(name)
                    .and_then(Value::as_u64)
                    .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
            };
            self.usage = Some((field("prompt_tokens"), field("completion_tokens")));
        }
        let mut out = Vec::new();
        if let Some(choice) = value.get("choices").and_then(|c| c.get(0)) {
            if let Some(text) = choice
                .get("delta")
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                out.push(Ok(Event::Delta(text.to_string())));
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_string());
            }
        }
        out
    }
}

/// One configured backend with its policy, breaker, limit and metrics.
struct Upstream {
    name: String,
    kind: BackendKind,
    backend: Box<dyn Backend>,
    settings: BackendConfig,
    permits: Arc<Semaphore>,
    breaker: CircuitBreaker,
    metrics: BackendMetrics,
}

/// An error building the backends.
#[derive(Debug, thiserror::Error)]
#[error("backend `{backend}`: {message}")]
pub struct BackendSetupError {
    /// The backend's name.
    pub backend: String,
    /// What is wrong.
    pub message: String,
}

struct Inner {
    upstreams: BTreeMap<String, Arc<Upstream>>,
    models: BTreeMap<String, String>,
    default: Option<String>,
    /// The runtime generations run on; `None`: the caller's.
    runtime: Option<tokio::runtime::Handle>,
}

/// The configured backends and the routing table. Cheap to clone.
#[derive(Clone)]
pub struct Backends {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("backends", &self.inner.upstreams.keys().collect::<Vec<_>>())
            .field("models", &self.inner.models)
            .finish()
    }
}

impl Backends {
    /// Build the backends of `config`. Their generations run on the tokio
    /// runtime this is called on (the host's main runtime; plugin calls run
    /// on worker threads with runtimes of their own, which network I/O must
    /// not depend on), or, outside any runtime, on the caller's.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Backends, BackendSetupError> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let mut upstreams = BTreeMap::new();
        for (name, settings) in &config.backends {
            let fail = |message: String| BackendSetupError {
                backend: name.clone(),
                message,
            };
            let backend: Box<dyn Backend> = match settings.kind {
                BackendKind::Echo => Box::new(Echo),
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
                    Box::new(
                        OpenAi::new(
                            base_url,
                            api_key,
                            Duration::from_millis(settings.connect_timeout_ms),
                        )
                        .map_err(fail)?,
                    )
                }
            };
            let backend_metrics = metrics.backend(name);
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream {
                    name: name.clone(),
                    kind: settings.kind,
                    backend,
                    permits: Arc::new(Semaphore::new(settings.max_concurrent)),
                    breaker: CircuitBreaker::new(
                        format!("backend {name}"),
                        settings.breaker_failures,
                        Duration::from_millis(settings.breaker_cooldown_ms),
                        settings.breaker_probes,
                        backend_metrics.breaker.clone(),
                    ),
                    metrics: backend_metrics,
                    settings: settings.clone(),
                }),
            );
        }
        Ok(Backends {
            inner: Arc::new(Inner {
                upstreams,
                models: config.routing.models.clone(),
                default: config.routing.default.clone(),
                runtime,
            }),
        })
    }

    /// The models clients may ask for, with the backend serving each.
    pub fn models(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inner
            .models
            .iter()
            .map(|(model, backend)| (model.as_str(), backend.as_str()))
    }

    /// The backend serving `model`, if any.
    pub fn route(&self, model: &str) -> Option<&str> {
        self.inner
            .models
            .get(model)
            .or(self.inner.default.as_ref())
            .map(String::as_str)
    }

    /// `/health`'s view of the backends.
    pub fn health(&self) -> Vec<BackendHealth> {
        self.inner
            .upstreams
            .values()
            .map(|u| BackendHealth {
                name: u.name.clone(),
                kind: u.kind.to_string(),
                circuit: u.breaker.state(),
                in_flight: u.settings.max_concurrent - u.permits.available_permits(),
                max_concurrent: u.settings.max_concurrent,
            })
            .collect()
    }

    /// Start a generation: resolves once its first token is in (after
    /// retries and failover), or with the error that ended it.
    pub async fn stream(&self, request: GenerateRequest) -> Result<TokenStream, BackendError> {
        let primary = self
            .route(&request.model)
            .and_then(|name| self.inner.upstreams.get(name))
            .cloned()
            .ok_or_else(|| BackendError::UnknownModel(request.model.clone()))?;
        let failover = primary
            .settings
            .failover
            .as_ref()
            .and_then(|name| self.inner.upstreams.get(name))
            .cloned();
        let (opened_tx, opened_rx) = oneshot::channel();
        let (events_tx, events_rx) = mpsc::channel(64);
        let deadline = request.deadline;
        let task = generation(primary, failover, request, opened_tx, events_tx);
        // Detached: dropping this future (the plugin call's deadline) drops
        // the receiver, which the task notices.
        drop(match &self.inner.runtime {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        });
        match opened_rx.await {
            Ok(Ok(backend)) => Ok(TokenStream {
                backend,
                events: events_rx,
                deadline,
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BackendError::Failed {
                backend: "?".into(),
                reason: "the generation task ended unexpectedly".into(),
            }),
        }
    }

    /// Run a whole generation and collect it.
    pub async fn generate(&self, request: GenerateRequest) -> Result<Completion, BackendError> {
        if let Some(upstream) = self
            .route(&request.model)
            .and_then(|name| self.inner.upstreams.get(name))
            .filter(|u| u.kind == BackendKind::Echo)
        {
            // In process, no I/O, cannot fail: computed here rather than in
            // a generation task (which costs a task and a channel per
            // request). The same series are recorded, except inter-token
            // latency, which a one-piece answer does not have.
            let started = Instant::now();
            let completion = Echo::generate(&request);
            upstream
                .metrics
                .ttft
                .observe(started.elapsed().as_secs_f64());
            upstream.metrics.outcome(UpstreamOutcome::Ok).inc();
            upstream
                .metrics
                .tokens
                .inc_by(u64::from(completion.completion_tokens));
            return Ok(completion);
        }
        let prompt_tokens = count_tokens(&request.prompt) as u32;
        self.stream(request).await?.collect(prompt_tokens).await
    }
}

/// `/health`'s view of one backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendHealth {
    /// Its name (the `worker_type` label).
    pub name: String,
    /// `echo` or `openai`.
    pub kind: String,
    /// Its circuit breaker: `closed`, `half_open` or `open`.
    pub circuit: &'static str,
    /// Generations holding one of its concurrency permits.
    pub in_flight: usize,
    /// Its concurrency limit.
    pub max_concurrent: usize,
}

/// The tokens of a generation in progress. Dropping it cancels the
/// generation.
pub struct TokenStream {
    backend: String,
    events: mpsc::Receiver<Result<Event, BackendError>>,
    deadline: Instant,
}

impl std::fmt::Debug for TokenStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStream")
            .field("backend", &self.backend)
            .finish()
    }
}

impl TokenStream {
    /// The next event: deltas, then exactly one `End` or error, then `None`.
    pub async fn next(&mut self) -> Option<Result<Event, BackendError>> {
        self.events.recv().await
    }

    /// The next event if it has already arrived.
    pub fn try_next(&mut self) -> Option<Result<Event, BackendError>> {
        self.events.try_recv().ok()
    }

    /// Collect the rest of the generation into one completion.
    /// `prompt_tokens` is used when the backend reports no usage.
    pub async fn collect(mut self, prompt_tokens: u32) -> Result<Completion, BackendError> {
        let mut text = String::new();
        let mut chunks = 0u32;
        while let Some(event) = self.next().await {
            match event? {
                Event::Delta(delta) => {
                    text.push_str(&delta);
                    chunks += 1;
                }
                Event::End(ending) => {
                    let (prompt, completion) = ending.usage.unwrap_or((prompt_tokens, chunks));
                    return Ok(Completion {
                        text,
                        finish_reason: finish_reason(ending.finish_reason.as_deref()),
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                    });
                }
            }
        }
        Err(BackendError::Timeout {
            backend: self.backend.clone(),
            reason: format!(
                "the generation was cut at the request's deadline ({} ms late)",
                Instant::now()
                    .saturating_duration_since(self.deadline)
                    .as_millis()
            ),
        })
    }
}

/// `length` stays `length`; every other reason (`stop`, `eos`, absent) is
/// `stop`.
pub fn finish_reason(reason: Option<&str>) -> &'static str {
    if reason == Some("length") {
        "length"
    } else {
        "stop"
    }
}

/// The generation task: open (retries, failover), then pump events.
async fn generation(
    primary: Arc<Upstream>,
    failover: Option<Arc<Upstream>>,
    request: GenerateRequest,
    mut opened: oneshot::Sender<Result<String, BackendError>>,
    events: mpsc::Sender<Result<Event, BackendError>>,
) {
    let mut first_error: Option<BackendError> = None;
    for upstream in std::iter::once(primary).chain(failover) {
        // Dropping `open` (the caller gave up) settles nothing: a probe
        // admission is given back by its guard.
        let attempt = tokio::select! {
            biased;
            () = opened.closed() => return,
            attempt = upstream.open(&request) => attempt,
        };
        match attempt {
            Ok(open) => {
                if opened.send(Ok(upstream.name.clone())).is_err() {
                    upstream.metrics.outcome(UpstreamOutcome::Cancelled).inc();
                    return;
                }
                upstream.pump(open, &request, events).await;
                return;
            }
            Err(failure) => {
                let error = failure.error;
                if let Some(first) = &first_error {
                    tracing::warn!(backend = %upstream.name, %error, after = %first, "failover backend failed too");
                } else {
                    tracing::warn!(backend = %upstream.name, %error, "backend failed");
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
struct Open {
    events: EventStream,
    first: Event,
    last_event: Instant,
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

/// A breaker admission not yet settled. Dropped unsettled (the caller gave
/// up), a probe gives its slot back without deciding anything.
struct Admitted<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    settled: bool,
}

impl Admitted<'_> {
    fn record(&mut self, failed: bool) {
        self.breaker.record(failed, self.probe);
        self.settled = true;
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.settled && self.probe {
            self.breaker.release_probe();
        }
    }
}

impl Upstream {
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
    async fn open(&self, request: &GenerateRequest) -> Result<Open, OpenFailure> {
        let probe = match self.breaker.admit() {
            Admission::Pass => false,
            Admission::Probe => true,
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
        let mut admitted = Admitted {
            breaker: &self.breaker,
            probe,
            settled: false,
        };
        let result = self.attempts(request).await;
        match &result {
            Ok(_) => admitted.record(false),
            Err(failure) if failure.backend_at_fault => admitted.record(true),
            // Dropping `admitted` gives a probe slot back.
            Err(_) => {}
        }
        result
    }

    async fn attempts(&self, request: &GenerateRequest) -> Result<Open, OpenFailure> {
        let deadline = request.deadline;
        let not_at_fault = |error| OpenFailure {
            error,
            backend_at_fault: false,
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
        let upstream_request = UpstreamRequest {
            model: self
                .settings
                .model
                .clone()
                .unwrap_or_else(|| request.model.clone()),
            request: request.clone(),
        };
        let mut attempt = 0u32;
        loop {
            let Some(timeout) = self.request_timeout(deadline) else {
                return Err(not_at_fault(
                    self.timeout_error("no time left for an attempt"),
                ));
            };
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, async {
                let mut events = self.backend.send(&upstream_request).await?;
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
                    self.metrics.ttft.observe(started.elapsed().as_secs_f64());
                    return Ok(Open {
                        events,
                        first,
                        last_event: Instant::now(),
                        _permit: permit,
                    });
                }
                Err(error) => error,
            };
            self.metrics.outcome(error.outcome()).inc();
            let backoff = self.backoff(attempt, &error);
            let retry = error.retryable()
                && attempt < self.settings.max_retries
                && backoff.is_some_and(|b| Instant::now() + b < deadline);
            tracing::debug!(backend = %self.name, attempt, ?error, retry, "attempt failed");
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
        mut open: Open,
        request: &GenerateRequest,
        events: mpsc::Sender<Result<Event, BackendError>>,
    ) {
        let mut chunks = 0u64;
        let mut next = Some(Ok(open.first.clone()));
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => {
                    let Some(timeout) = self.request_timeout(request.deadline) else {
                        self.end(UpstreamOutcome::Timeout, chunks, None);
                        let _ = events
                            .send(Err(self.timeout_error("the request's deadline passed")))
                            .await;
                        return;
                    };
                    tokio::select! {
                        biased;
                        () = events.closed() => {
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
                Ok(Event::Delta(text)) => {
                    if chunks > 0 {
                        self.metrics
                            .itl
                            .observe(open.last_event.elapsed().as_secs_f64());
                    }
                    open.last_event = Instant::now();
                    chunks += 1;
                    if events.send(Ok(Event::Delta(text))).await.is_err() {
                        self.end(UpstreamOutcome::Cancelled, chunks, None);
                        return;
                    }
                }
                Ok(Event::End(ending)) => {
                    let tokens = ending.usage.map_or(chunks, |(_, c)| u64::from(c));
                    self.end(UpstreamOutcome::Ok, tokens, Some(false));
                    let _ = events.send(Ok(Event::End(ending))).await;
                    return;
                }
                Err(error) => {
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
    fn end(&self, outcome: UpstreamOutcome, tokens: u64, failed: Option<bool>) {
        self.metrics.outcome(outcome).inc();
        self.metrics.tokens.inc_by(tokens);
        if let Some(failed) = failed {
            self.breaker.record(failed, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            model: "echo".into(),
            max_tokens,
            temperature: 0.0,
            stop: Vec::new(),
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }

    #[test]
    fn echoes_the_last_user_turn() {
        let prompt =
            "System: s\n\nUser: first\nAssistant: a\nUser: What is backpressure?\nAssistant:";
        let out = Echo::generate(&request(prompt, 100));
        assert_eq!(out.text, "What is backpressure?");
        assert_eq!(out.finish_reason, "stop");
        assert_eq!(out.completion_tokens, 4);
        assert_eq!(out.prompt_tokens as usize, count_tokens(prompt));
    }

    #[test]
    fn max_tokens_cuts_with_length() {
        let out = Echo::generate(&request("User: one two three\nAssistant:", 2));
        assert_eq!(out.text, "one two");
        assert_eq!(out.finish_reason, "length");
        assert_eq!(out.completion_tokens, 2);
    }

    #[tokio::test]
    async fn echo_streams_deltas_that_concatenate_to_the_completion() {
        let r = request("User: Hello,   wide world! How are you?\nAssistant:", 100);
        let whole = Echo::generate(&r);
        let mut events = Echo
            .send(&UpstreamRequest {
                model: "echo".into(),
                request: r,
            })
            .await
            .unwrap();
        let mut text = String::new();
        let mut deltas = 0;
        while let Some(event) = events.next().await {
            match event.unwrap() {
                Event::Delta(d) => {
                    text.push_str(&d);
                    deltas += 1;
                }
                Event::End(end) => {
                    assert_eq!(
                        end.usage,
                        Some((whole.prompt_tokens, whole.completion_tokens))
                    );
                }
            }
        }
        assert_eq!(text, whole.text);
        assert!(deltas > 3, "{deltas}");
    }

    #[test]
    fn sse_parser_reads_deltas_usage_and_done_across_any_split() {
        let stream = concat!(
            ": comment\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo é\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for split in 1..stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&stream[..split]);
            events.extend(parser.feed(&stream[split..]));
            let events: Vec<Event> = events.into_iter().map(Result::unwrap).collect();
            assert_eq!(
                events,
                vec![
                    Event::Delta("Hel".into()),
                    Event::Delta("lo é".into()),
                    Event::End(Ending {
                        finish_reason: Some("length".into()),
                        usage: Some((7, 2)),
                    }),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn sse_parser_reports_errors_and_early_ends() {
        let mut parser = SseParser::default();
        let events = parser.feed(b"data: {\"error\":{\"message\":\"model overloaded\"}}\n\n");
        assert!(
            matches!(&events[..], [Err(AttemptError::Protocol(m))] if m.contains("model overloaded"))
        );
        let mut parser = SseParser::default();
        parser.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        assert!(parser.finish().is_err(), "no finish_reason and no [DONE]");
        let mut parser = SseParser::default();
        assert!(matches!(
            &parser.feed(b"data: not json\n\n")[..],
            [Err(AttemptError::Protocol(_))]
        ));
    }

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
    }

    #[test]
    fn the_upstream_body_names_model_stop_and_asks_for_usage() {
        let mut r = request("User: hi", 9);
        r.stop = vec!["END".into()];
        let body = OpenAi::body(&UpstreamRequest {
            model: "gemma".into(),
            request: r,
        });
        assert_eq!(body["model"], "gemma");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["max_tokens"], 9);
        assert_eq!(body["messages"][0]["content"], "User: hi");
    }
}
