//! The metrics' label values, as enums: what can be counted, spelled once.
//!
//! Each enum lists every value of its label (`ALL`), so that the registry
//! can create every series at zero before the first event, and says its
//! label text (`label`). Nothing here records anything.

use serde::Serialize;

/// Why a plugin call failed: the `error_type` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The plugin refused the envelope (`stage-error::invalid-input`).
    InvalidInput,
    /// The plugin reported a configuration problem (`stage-error::config`).
    Config,
    /// A dependency of the plugin failed (`stage-error::upstream`); for the
    /// inference backend: it answered with an error or something unusable.
    Upstream,
    /// The inference backend did not answer in time (HTTP 504).
    UpstreamTimeout,
    /// The inference backend could not be reached, is at capacity, or its
    /// circuit breaker is open (HTTP 503).
    UpstreamUnavailable,
    /// The plugin reported another failure (`stage-error::plugin-error`).
    PluginError,
    /// The plugin trapped (including Rust panics).
    Trap,
    /// The call exceeded its deadline.
    Timeout,
    /// The call used up its fuel (instruction) budget.
    Fuel,
    /// The plugin hit its memory cap.
    Memory,
    /// The plugin's result exceeded the output cap.
    OutputTooLarge,
    /// A fresh instance could not be created or initialised.
    Instantiate,
}

impl ErrorType {
    /// Every error type, in label order.
    pub const ALL: [ErrorType; 12] = [
        ErrorType::InvalidInput,
        ErrorType::Config,
        ErrorType::Upstream,
        ErrorType::UpstreamTimeout,
        ErrorType::UpstreamUnavailable,
        ErrorType::PluginError,
        ErrorType::Trap,
        ErrorType::Timeout,
        ErrorType::Fuel,
        ErrorType::Memory,
        ErrorType::OutputTooLarge,
        ErrorType::Instantiate,
    ];

    /// Whether a failure of this type counts against the *stage's* circuit
    /// breaker. `invalid_input` blames the request, and the upstream types
    /// blame the inference backend, which has a breaker of its own: in both
    /// cases the plugin worked.
    pub fn counts_against_stage(self) -> bool {
        !matches!(
            self,
            ErrorType::InvalidInput
                | ErrorType::Upstream
                | ErrorType::UpstreamTimeout
                | ErrorType::UpstreamUnavailable
        )
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorType::InvalidInput => "invalid_input",
            ErrorType::Config => "config",
            ErrorType::Upstream => "upstream",
            ErrorType::UpstreamTimeout => "upstream_timeout",
            ErrorType::UpstreamUnavailable => "upstream_unavailable",
            ErrorType::PluginError => "plugin_error",
            ErrorType::Trap => "trap",
            ErrorType::Timeout => "timeout",
            ErrorType::Fuel => "fuel",
            ErrorType::Memory => "memory",
            ErrorType::OutputTooLarge => "output_too_large",
            ErrorType::Instantiate => "instantiate",
        }
    }
}

/// How an admitted request ended: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with a completion.
    Ok,
    /// A stage failed.
    Error,
    /// The request deadline expired.
    Timeout,
    /// Refused at ingress: a queue was full.
    Shed,
    /// The client went away while its answer was streaming.
    Cancelled,
    /// A stage answered it early (a cache hit): no generation.
    Answered,
    /// A stage refused it (401, 403, 429).
    Refused,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Shed,
        Outcome::Cancelled,
        Outcome::Answered,
        Outcome::Refused,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Shed => "shed",
            Outcome::Cancelled => "cancelled",
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
        }
    }
}

/// Outcome of one attempt sent to a backend: the `outcome` label of
/// `orchestrator_upstream_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The generation completed.
    Ok,
    /// No connection could be made.
    ConnectError,
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx.
    ServerError,
    /// Another HTTP error status.
    ClientError,
    /// No answer (or no next event) in time.
    Timeout,
    /// The answer could not be understood.
    ProtocolError,
    /// The client went away or a stage stopped the generation.
    Cancelled,
    /// Refused by the backend's open circuit breaker (nothing was sent).
    CircuitOpen,
}

impl UpstreamOutcome {
    /// Every outcome, in label order.
    pub const ALL: [UpstreamOutcome; 9] = [
        UpstreamOutcome::Ok,
        UpstreamOutcome::ConnectError,
        UpstreamOutcome::RateLimited,
        UpstreamOutcome::ServerError,
        UpstreamOutcome::ClientError,
        UpstreamOutcome::Timeout,
        UpstreamOutcome::ProtocolError,
        UpstreamOutcome::Cancelled,
        UpstreamOutcome::CircuitOpen,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            UpstreamOutcome::Ok => "ok",
            UpstreamOutcome::ConnectError => "connect_error",
            UpstreamOutcome::RateLimited => "rate_limited",
            UpstreamOutcome::ServerError => "server_error",
            UpstreamOutcome::ClientError => "client_error",
            UpstreamOutcome::Timeout => "timeout",
            UpstreamOutcome::ProtocolError => "protocol_error",
            UpstreamOutcome::Cancelled => "cancelled",
            UpstreamOutcome::CircuitOpen => "circuit_open",
        }
    }
}

/// The state of a circuit breaker (see [`crate::circuit`]). Its
/// discriminant is the value of the state gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Normal: calls go through.
    Closed = 0,
    /// After the cool-down: a few probes are let through.
    HalfOpen = 1,
    /// Refusing calls until the cool-down ends.
    Open = 2,
}

impl BreakerState {
    /// Every state, in gauge order (the index is the gauge value).
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::HalfOpen,
        BreakerState::Open,
    ];

    /// The label value: `closed`, `half_open` or `open`.
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

/// Why an artifact cache entry (or the cache directory) was not used: the
/// `reason` label of `orchestrator_artifact_cache_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRefusal {
    /// The cache directory is not a directory owned by the host's user, or
    /// others may write to it: the host runs without a cache.
    UnsafeDirectory,
    /// The entry is a link, a FIFO or device, not the host's, writable by
    /// others, or too large.
    UnsafeFile,
    /// The entry's MAC does not prove it is this host's compilation of this
    /// component (planted, swapped, patched or truncated).
    BadMac,
    /// wasmtime refused to deserialize it (another version or setting).
    Incompatible,
}

impl CacheRefusal {
    /// Every reason, in label order.
    pub const ALL: [CacheRefusal; 4] = [
        CacheRefusal::UnsafeDirectory,
        CacheRefusal::UnsafeFile,
        CacheRefusal::BadMac,
        CacheRefusal::Incompatible,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CacheRefusal::UnsafeDirectory => "unsafe_directory",
            CacheRefusal::UnsafeFile => "unsafe_file",
            CacheRefusal::BadMac => "bad_mac",
            CacheRefusal::Incompatible => "incompatible",
        }
    }
}
