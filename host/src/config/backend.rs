//! Inference backends (`[backends.<name>]`) and model routing (`[routing]`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::pipeline::ModelRoute;

/// What protocol a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// The built-in deterministic stand-in (see [`crate::inference`]).
    Echo,
    /// An OpenAI-compatible `/v1/chat/completions` service: OpenAI, vLLM,
    /// llama.cpp's `llama-server`, Ollama, ...
    Openai,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Echo => "echo",
            BackendKind::Openai => "openai",
        })
    }
}

/// One named inference backend (`[backends.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Its protocol.
    pub kind: BackendKind,
    /// Base URL of an `openai` backend, up to and including the version
    /// path: `https://api.openai.com/v1`, `http://127.0.0.1:8081/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// The *name* of the environment variable holding the API key (sent as
    /// `Authorization: Bearer`); never the key itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// The model name sent upstream; without it the client's `model` is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Longest wait for the first streamed event, and then between two
    /// (a stalled upstream fails with 504 after it); for a plain
    /// (unstreamed) upstream request, for the whole answer. Answers that
    /// take longer to generate than this need `always_stream`.
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Ask this backend for a stream for every request. By default a
    /// request is streamed upstream only when its client asked for a
    /// stream; a client that wants one JSON answer gets its answer from a
    /// plain upstream request (less work here and upstream). Set it to
    /// measure time to first token and inter-token latency on plain
    /// requests too, or to bound a long plain generation by the time
    /// between its tokens rather than by `request_timeout_ms` as a whole.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub always_stream: bool,
    /// Longest wait for the TCP (and TLS) connection.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Requests sent to it at once; more wait (within their deadline).
    #[serde(default = "defaults::max_concurrent")]
    pub max_concurrent: usize,
    /// Retries after a connect error, a 429 or a 5xx, before the first token.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// First retry backoff; doubled per retry, with full jitter.
    #[serde(default = "defaults::retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Consecutive failed requests that open its circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker refuses requests.
    #[serde(default = "defaults::breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// Probe requests let through at once while half-open.
    #[serde(default = "defaults::breaker_probes")]
    pub breaker_probes: u32,
    /// The largest `max_tokens` a request to this backend may ask for; a
    /// larger one is refused with 400. A generation's cost (and `echo`'s
    /// answer) grows with it, so it is bounded for every backend.
    #[serde(default = "defaults::max_tokens_limit")]
    pub max_tokens_limit: u32,
    /// Another backend to try when this one fails before the first token
    /// (after its retries) or its breaker is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<String>,
}

/// The defaults of the optional backend settings, named by the serde
/// attributes above.
mod defaults {
    pub fn request_timeout_ms() -> u64 {
        30_000
    }
    pub fn connect_timeout_ms() -> u64 {
        2_000
    }
    pub fn max_concurrent() -> usize {
        64
    }
    pub fn max_retries() -> u32 {
        2
    }
    pub fn retry_backoff_ms() -> u64 {
        100
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown_ms() -> u64 {
        10_000
    }
    pub fn breaker_probes() -> u32 {
        1
    }
    pub fn max_tokens_limit() -> u32 {
        32_768
    }
}

impl BackendConfig {
    /// A backend of `kind` with every optional setting at its default.
    pub fn of_kind(kind: BackendKind) -> BackendConfig {
        #[derive(Serialize)]
        struct Kind {
            kind: BackendKind,
        }
        toml::Table::try_from(Kind { kind })
            .ok()
            .and_then(|table| table.try_into().ok())
            .expect("a backend with only its kind set has defaults for the rest")
    }
}

/// Which backend and pipeline serve which model (`[routing]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Model name (as clients send it) → backend (and pipeline). Listed
    /// by `GET /v1/models`.
    #[serde(default)]
    pub models: BTreeMap<String, ModelRoute>,
    /// Backend for models not in `models`; without one they get 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Pipeline of the models not in `models` (with `default`); `None`:
    /// the pipeline named `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_pipeline: Option<String>,
}
