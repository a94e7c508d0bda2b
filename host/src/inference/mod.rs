//! Inference backends: what answers a plugin's `inference.generate` and
//! `inference.generate-stream` calls.
//!
//! Owns the configured backends (`backend`), their protocols (`echo`,
//! `openai` with its `sse` parser) and the [`Router`] that picks one by
//! model name. It must not know about stages, plugins or HTTP clients of
//! the host: the wasm runtime calls [`Router::generate`] and
//! [`Router::stream`] on a plugin's behalf, and the pipeline consumes the
//! [`TokenStream`].
//!
//! # Lifecycle
//!
//! 1. **Configure.** `[backends.<name>]` tables name backends of a
//!    [`BackendKind`](crate::config::BackendKind); `[routing]` maps the
//!    request's `model` to one of them (`echo` → `echo` is predefined).
//!    [`Router::new`] builds them once at
//!    startup: an HTTP client per `openai` backend, the API key read from the
//!    environment variable the config names, a circuit breaker, a
//!    concurrency limit, and the metric handles.
//! 2. **Route.** A plugin's call names the client's model
//!    (`generation-params.model`); the routing table picks the backend
//!    (unknown models are refused earlier, at the API, with 404).
//! 3. **Open.** A streamed generation runs as a task on the host's tokio
//!    runtime (a task of its own, so it goes on while the stage call that
//!    started it returns); a plain one — the client wants one answer
//!    ([`GenerateRequest::stream`]) — is sent when the pipeline collects
//!    it, after that call, and read whole on the request's task; `echo`
//!    answers in process. The generation waits for a concurrency permit,
//!    asks the breaker, and sends the request: a *streaming* request
//!    upstream when the client streams (or the backend is set to
//!    `always_stream`), else a plain one. An attempt that fails before the first token
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
//! reaches the plugin as a typed `inference-error`, which the stage returns
//! as the matching `stage-error` (a 0.1 stage gets a string, and the host
//! remembers the class for it), so that the stage's error is counted as
//! `invalid_input` (the backend refused the request: HTTP 400),
//! `upstream_unavailable` (connect failure, breaker open, at capacity:
//! HTTP 503), `upstream_timeout` (HTTP 504) or `upstream` (an error status
//! or an unusable answer: HTTP 502) in
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

mod backend;
mod delivery;
mod echo;
mod generation;
mod limits;
mod openai;
mod protocol;
mod router;
mod sse;

pub use backend::BackendSetupError;
pub use echo::{ECHO_MAX_TOKENS, Echo};
pub use generation::{
    BackendError, Collector, Completion, Ending, Event, ExtraDelta, GenerateRequest, TokenStream,
    finish_reason,
};
pub use router::{BackendHealth, Router, Target};
