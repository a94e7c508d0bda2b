//! A generation as the rest of the host sees it: what a plugin asks for
//! ([`GenerateRequest`]), its events ([`Event`]) as a [`TokenStream`], the
//! whole of it ([`Completion`]), and how it fails ([`BackendError`]).

use std::time::Instant;

use serde_json::Value;

use crate::chat::{Message, Params, Tool, ToolCall, ToolCallDelta, ToolCalls};
use crate::trace::Trace;

use tokio::sync::mpsc;

use crate::metrics::ErrorType;

/// What a plugin asked for: a chat to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The chat, sent upstream as it is.
    pub messages: Vec<Message>,
    /// The tools offered to the model.
    pub tools: Vec<Tool>,
    /// The generation parameters; `params.model` is the routing key.
    pub params: Params,
    /// Whether the answer is wanted as it is generated: the upstream is
    /// asked for a stream (its time to first token and inter-token latency
    /// measured). Otherwise it is asked for one JSON answer, unless its
    /// backend is set to `always_stream`; the events are the same either
    /// way.
    pub stream: bool,
    /// The generation must end by then.
    pub deadline: Instant,
    /// The request it serves (for log lines; may be empty).
    pub request_id: String,
    /// The span of the stage that asked: each upstream attempt is a child
    /// of it.
    pub trace: Trace,
}

impl GenerateRequest {
    /// The model the client asked for (the routing key).
    pub fn model(&self) -> &str {
        &self.params.model
    }

    /// Tokens of the chat's text, for a backend that reports no usage.
    pub fn prompt_tokens(&self) -> u32 {
        crate::chat::count_tokens(&self.messages)
    }
}

#[cfg(test)]
impl GenerateRequest {
    /// A one-message request for model `echo` with a 5 s deadline, for
    /// unit tests.
    pub(crate) fn for_test(prompt: &str, max_tokens: u32) -> GenerateRequest {
        let mut params = Params::for_model("echo");
        params.max_tokens = Some(max_tokens);
        GenerateRequest {
            messages: vec![Message::new("user", prompt)],
            tools: Vec::new(),
            params,
            stream: true,
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
    /// Generated output that is not text: pieces of tool calls, of a
    /// refusal, log probabilities. It reaches the client as it comes,
    /// past the text-streaming stages.
    Extra(ExtraDelta),
    /// The generation ended.
    End(Ending),
}

/// What a streamed event carries besides text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExtraDelta {
    /// Pieces of tool calls.
    pub tool_calls: Vec<ToolCallDelta>,
    /// A piece of a refusal.
    pub refusal: Option<String>,
    /// The event's log probabilities (`choices[0].logprobs`), as sent.
    pub logprobs: Option<Value>,
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ending {
    /// The upstream's finish reason (`stop`, `length`, `tool_calls`, ...),
    /// if it gave one.
    pub finish_reason: Option<String>,
    /// `(prompt_tokens, completion_tokens)`, if the upstream reported them.
    pub usage: Option<(u32, u32)>,
    /// The upstream's id of its answer (`chatcmpl-...`), if it gave one.
    pub response_id: Option<String>,
}

/// A whole generation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// The tool calls the model made.
    pub tool_calls: Vec<ToolCall>,
    /// Its refusal, if it refused.
    pub refusal: Option<String>,
    /// Log probabilities, as the backend gave them (the `content` and
    /// `refusal` lists of a streamed answer's events, joined).
    pub logprobs: Option<Value>,
    /// `stop`, `length`, `tool_calls` or `content_filter` (see
    /// [`finish_reason`]).
    pub finish_reason: &'static str,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// Builds a [`Completion`] from a generation's events.
#[derive(Debug, Default)]
pub struct Collector {
    text: String,
    tool_calls: ToolCalls,
    refusal: Option<String>,
    logprobs: Option<Value>,
    /// Events with text or tool-call pieces (the token count when the
    /// backend reports none).
    pieces: u32,
}

impl Collector {
    /// Add a text delta.
    pub fn text(&mut self, delta: &str) {
        self.text.push_str(delta);
        self.pieces += 1;
    }

    /// Add what an event carries besides text.
    pub fn extra(&mut self, extra: &ExtraDelta) {
        for call in &extra.tool_calls {
            self.tool_calls.add(call);
        }
        if !extra.tool_calls.is_empty() {
            self.pieces += 1;
        }
        if let Some(refusal) = &extra.refusal {
            self.refusal.get_or_insert_default().push_str(refusal);
        }
        if let Some(logprobs) = &extra.logprobs {
            join_logprobs(&mut self.logprobs, logprobs);
        }
    }

    /// What was collected besides text: the tool calls, the refusal and the
    /// log probabilities (for a stream whose text went elsewhere).
    pub fn take_extras(&mut self) -> (Vec<ToolCall>, Option<String>, Option<Value>) {
        (
            std::mem::take(&mut self.tool_calls).finish(),
            self.refusal.take(),
            self.logprobs.take(),
        )
    }

    /// The whole generation, ended by `ending`; `prompt_tokens` is used
    /// when the backend reports no usage.
    pub fn finish(self, ending: &Ending, prompt_tokens: impl FnOnce() -> u32) -> Completion {
        let (prompt, completion) = ending
            .usage
            .unwrap_or_else(|| (prompt_tokens(), self.pieces));
        Completion {
            text: self.text,
            tool_calls: self.tool_calls.finish(),
            refusal: self.refusal,
            logprobs: self.logprobs,
            finish_reason: finish_reason(ending.finish_reason.as_deref()),
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }
}

/// Join a streamed event's `logprobs` object into `into`: its `content`
/// and `refusal` lists are appended.
fn join_logprobs(into: &mut Option<Value>, more: &Value) {
    let Some(into) = into else {
        *into = Some(more.clone());
        return;
    };
    let (Value::Object(into), Value::Object(more)) = (into, more) else {
        return;
    };
    for (key, value) in more {
        match (into.get_mut(key), value) {
            (Some(Value::Array(list)), Value::Array(items)) => list.extend(items.iter().cloned()),
            (None, _) | (Some(Value::Null), _) => {
                into.insert(key.clone(), value.clone());
            }
            _ => {}
        }
    }
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
    /// The backend refused the request as invalid (HTTP 400, 413 or 422):
    /// a parameter or content it does not take. The client's request is
    /// at fault, and is answered with 400.
    #[error("inference backend `{backend}` refused the request: {reason}")]
    Refused {
        /// The backend's name.
        backend: String,
        /// What it said.
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
            BackendError::Refused { .. } => ErrorType::InvalidInput,
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

/// A plain generation on its way: its backend's name and its events,
/// once its whole answer is in.
pub(super) type WholeAnswer = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    (String, mpsc::Receiver<Result<Event, BackendError>>),
                    BackendError,
                >,
            > + Send,
    >,
>;

/// Where a [`TokenStream`]'s events come from.
pub(super) enum Events {
    /// A plain generation not yet read (see [`WholeAnswer`]): awaited on
    /// the first [`TokenStream::next`].
    Whole(WholeAnswer),
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
        if let Events::Whole(answer) = &mut self.events {
            match answer.as_mut().await {
                Ok((backend, events)) => {
                    self.backend = backend;
                    self.events = Events::Task(events);
                }
                Err(error) => {
                    self.events = Events::Ready(Box::new(std::iter::empty()));
                    return Some(Err(error));
                }
            }
        }
        match &mut self.events {
            Events::Task(events) => events.recv().await,
            Events::Ready(events) => events.next(),
            Events::Whole(_) => None,
        }
    }

    /// The next event if it has already arrived.
    pub fn try_next(&mut self) -> Option<Result<Event, BackendError>> {
        match &mut self.events {
            Events::Task(events) => events.try_recv().ok(),
            Events::Ready(events) => events.next(),
            Events::Whole(_) => None,
        }
    }

    /// The events of an answer a stage gave itself (answering early): its
    /// text in pieces, its tool calls and refusal whole, then its end. No
    /// backend is involved, so nothing counts as generated.
    pub fn replay(completion: Completion, deadline: Instant) -> TokenStream {
        let extra =
            (!completion.tool_calls.is_empty() || completion.refusal.is_some()).then(|| {
                ExtraDelta {
                    tool_calls: completion
                        .tool_calls
                        .iter()
                        .enumerate()
                        .map(|(index, call)| ToolCallDelta {
                            index: index as u32,
                            id: Some(call.id.clone()),
                            kind: Some(call.kind.clone()),
                            name: Some(call.name.clone()),
                            arguments: call.arguments.clone(),
                        })
                        .collect(),
                    refusal: completion.refusal.clone(),
                    logprobs: None,
                }
            });
        let mut extra = extra;
        let events = super::Echo::events(completion).flat_map(move |event| {
            let before = match &event {
                Ok(Event::End(_)) => extra.take().map(|e| Ok(Event::Extra(e))),
                _ => None,
            };
            before.into_iter().chain(std::iter::once(event))
        });
        TokenStream {
            backend: String::new(),
            events: Events::Ready(Box::new(events)),
            deadline,
        }
    }

    /// Collect the rest of the generation into one completion.
    /// `prompt_tokens` is used when the backend reports no usage.
    pub async fn collect(
        mut self,
        prompt_tokens: impl FnOnce() -> u32,
    ) -> Result<Completion, BackendError> {
        let mut collector = Collector::default();
        while let Some(event) = self.next().await {
            match event? {
                Event::Delta(delta) => collector.text(&delta),
                Event::Extra(extra) => collector.extra(&extra),
                Event::End(ending) => return Ok(collector.finish(&ending, prompt_tokens)),
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

/// The finish reason of an answer: OpenAI's `length`, `tool_calls`,
/// `content_filter` and `function_call` stay as they are; every other
/// reason (`stop`, a server's own such as `eos`, none) is `stop`.
pub fn finish_reason(reason: Option<&str>) -> &'static str {
    match reason {
        Some("length") => "length",
        Some("tool_calls") => "tool_calls",
        Some("content_filter") => "content_filter",
        Some("function_call") => "function_call",
        _ => "stop",
    }
}
