//! A generation as the rest of the host sees it: what a plugin asks for
//! ([`GenerateRequest`]), its events ([`Event`]) as a [`TokenStream`], the
//! whole of it ([`Completion`]), and how it fails ([`BackendError`]).

use crate::trace::Trace;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::metrics::ErrorType;

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
    /// The request it serves (for log lines; may be empty).
    pub request_id: String,
    /// The span of the stage that asked: each upstream attempt is a child
    /// of it.
    pub trace: Trace,
}

#[cfg(test)]
impl GenerateRequest {
    /// A request for model `echo` with a 5 s deadline, for unit tests.
    pub(crate) fn for_test(prompt: &str, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            model: "echo".into(),
            max_tokens,
            temperature: 0.0,
            stop: Vec::new(),
            deadline: Instant::now() + std::time::Duration::from_secs(5),
            request_id: String::new(),
            trace: Trace::off(),
        }
    }
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
    /// The upstream's id of its answer (`chatcmpl-...`), if it gave one.
    pub response_id: Option<String>,
}

/// A whole generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// `stop` or `length` (see [`finish_reason`]).
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
        /// What made it unavailable.
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

/// The tokens of a generation in progress. Dropping it cancels the
/// generation.
pub struct TokenStream {
    pub(super) backend: String,
    pub(super) events: Events,
    pub(super) deadline: Instant,
}

/// Where a [`TokenStream`]'s events come from.
pub(super) enum Events {
    /// A generation task (an upstream call), through a bounded channel.
    Task(mpsc::Receiver<Result<Event, BackendError>>),
    /// Computed in process (`echo`), cut as they are pulled: no task, no
    /// channel and no wake-up per event.
    Ready(Box<dyn Iterator<Item = Result<Event, BackendError>> + Send>),
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
        match &mut self.events {
            Events::Task(events) => events.recv().await,
            Events::Ready(events) => events.next(),
        }
    }

    /// The next event if it has already arrived.
    pub fn try_next(&mut self) -> Option<Result<Event, BackendError>> {
        match &mut self.events {
            Events::Task(events) => events.try_recv().ok(),
            Events::Ready(events) => events.next(),
        }
    }

    /// Collect the rest of the generation into one completion.
    /// `prompt_tokens` is used when the backend reports no usage.
    pub async fn collect(
        mut self,
        prompt_tokens: impl FnOnce() -> u32,
    ) -> Result<Completion, BackendError> {
        let mut text = String::new();
        let mut chunks = 0u32;
        while let Some(event) = self.next().await {
            match event? {
                Event::Delta(delta) => {
                    text.push_str(&delta);
                    chunks += 1;
                }
                Event::End(ending) => {
                    // Counted only when the backend reports no usage.
                    let (prompt, completion) =
                        ending.usage.unwrap_or_else(|| (prompt_tokens(), chunks));
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
