//! The answers of `POST /v1/chat/completions`: a `chat.completion` object,
//! the events of a `chat.completion.chunk` stream (`ChunkEvents`, one
//! builder for buffered and live streams), and the HTTP form of a pipeline
//! failure ([`run_error`]).

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use serde_json::Value;

use crate::chat::{ToolCall, ToolCallDelta};
use crate::http::error::ApiError;
use crate::inference::{ExtraDelta, finish_reason};
use crate::metrics::ErrorType;
use crate::pipeline::{RouteRef, RunError};
use crate::wasm::{Envelope, Refusal};

/// The last event of every stream.
pub(super) const DONE: &[u8] = b"data: [DONE]\n\n";

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The `orchestrator` object every answer carries (ignored by SDKs): the
/// request id, the sources `rag` retrieved, the stages' notes and (in a
/// plain answer) the pipeline that ran.
///
/// This and the other answer types borrow from the envelope and serialize
/// straight into the body: building a `serde_json::Value` first copied
/// every string and built a map per object, on every request.
#[derive(Serialize)]
struct Extension<'a> {
    request_id: &'a str,
    sources: Vec<Source<'a>>,
    chunks: usize,
    /// Sorted by key; of repeated notes, the last.
    metadata: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pipeline: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stages: Option<Vec<&'static str>>,
}

#[derive(Serialize)]
struct Source<'a> {
    source: &'a str,
    score: f32,
}

fn orchestrator_extension<'a>(envelope: &'a Envelope, route: Option<&RouteRef>) -> Extension<'a> {
    Extension {
        request_id: &envelope.request_id,
        sources: envelope
            .passages
            .iter()
            .map(|p| Source {
                source: &p.source,
                score: p.score,
            })
            .collect(),
        chunks: envelope.chunks.len(),
        metadata: envelope
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        pipeline: route.map(|route| route.name()),
        stages: route.map(|route| route.stage_names().collect()),
    }
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u64,
}

fn usage(envelope: &Envelope) -> Usage {
    let u = &envelope.usage;
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        total_tokens: u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
    }
}

/// The `finish_reason` of an answer: `length` or `stop`.
fn finish(envelope: &Envelope) -> &'static str {
    finish_reason(Some(&envelope.finish_reason))
}

/// The body of a non-streamed answer (a `chat.completion` object).
#[derive(Serialize)]
pub(super) struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
    orchestrator: Extension<'a>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<&'a Value>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    /// `null` for an answer that is only tool calls or a refusal.
    content: Option<&'a str>,
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "<[ToolCall]>::is_empty")]
    tool_calls: &'a [ToolCall],
}

/// The body of a non-streamed answer.
pub(super) fn completion_body<'a>(
    id: &'a str,
    model: &'a str,
    envelope: &'a Envelope,
    route: &RouteRef,
) -> Completion<'a> {
    Completion {
        id,
        object: "chat.completion",
        created: unix_now(),
        model,
        choices: [CompletionChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: (!envelope.completion.is_empty()
                    || (envelope.tool_calls.is_empty() && envelope.refusal.is_none()))
                .then_some(envelope.completion.as_str()),
                refusal: envelope.refusal.as_deref(),
                tool_calls: &envelope.tool_calls,
            },
            logprobs: envelope.logprobs.as_ref(),
            finish_reason: finish(envelope),
        }],
        usage: usage(envelope),
        orchestrator: orchestrator_extension(envelope, Some(route)),
    }
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    /// `Some(None)` is `"usage": null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    orchestrator: Option<Extension<'a>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<&'a Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<ToolCallPieces<'a>>,
}

/// The tool calls of a chunk: pieces as the backend streamed them, or
/// whole calls (of an answer streamed after it was complete).
#[derive(Serialize)]
#[serde(untagged)]
enum ToolCallPieces<'a> {
    Pieces(&'a [ToolCallDelta]),
    Whole(Vec<WholeCall<'a>>),
}

#[derive(Serialize)]
struct WholeCall<'a> {
    index: usize,
    #[serde(flatten)]
    call: &'a ToolCall,
}

impl<'a> ChunkChoice<'a> {
    fn new(delta: Delta<'a>, finish_reason: Option<&'static str>) -> ChunkChoice<'a> {
        ChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }
    }
}

/// The events of one streamed answer, each a `data: {...}\n\n` line:
/// [`first`](Self::first), one [`delta`](Self::delta) per piece,
/// [`last`](Self::last) (or [`error`](Self::error)), then [`DONE`].
pub(super) struct ChunkEvents {
    /// Whether tool calls or a refusal went out as the backend streamed
    /// them (else the last chunk carries them whole).
    streamed_extras: std::cell::Cell<bool>,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// The pipeline that runs the request (named in the last chunk).
    route: Option<RouteRef>,
}

impl ChunkEvents {
    /// The events of answer `id` for `model`, run through `route`; with
    /// `include_usage`, every chunk has `"usage": null` and a usage chunk
    /// closes the stream.
    pub(super) fn new(
        id: String,
        model: String,
        include_usage: bool,
        route: Option<RouteRef>,
    ) -> ChunkEvents {
        ChunkEvents {
            streamed_extras: std::cell::Cell::new(false),
            id,
            model,
            created: unix_now(),
            include_usage,
            route,
        }
    }

    fn chunk<'a>(&'a self, choices: &'a [ChunkChoice<'a>]) -> Chunk<'a> {
        Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage: self.include_usage.then_some(None),
            orchestrator: None,
        }
    }

    /// The opening chunk: the assistant role, no content.
    pub(super) fn first(&self) -> Bytes {
        event_bytes(|out| self.push_first(out))
    }

    /// A piece of the completion.
    pub(super) fn delta(&self, piece: &str) -> Bytes {
        event_bytes(|out| self.push_delta(out, piece))
    }

    /// Output that is not text, as the backend streamed it.
    pub(super) fn extra(&self, extra: &ExtraDelta) -> Bytes {
        self.streamed_extras.set(true);
        event_bytes(|out| {
            let delta = Delta {
                refusal: extra.refusal.as_deref(),
                tool_calls: (!extra.tool_calls.is_empty())
                    .then_some(ToolCallPieces::Pieces(&extra.tool_calls)),
                ..Delta::default()
            };
            let mut choice = ChunkChoice::new(delta, None);
            choice.logprobs = extra.logprobs.as_ref();
            push_event(out, &self.chunk(&[choice]));
        })
    }

    /// The closing chunk (finish reason and the `orchestrator` object) and,
    /// if asked for, the usage chunk.
    pub(super) fn last(&self, envelope: &Envelope) -> Bytes {
        event_bytes(|out| self.push_last(out, envelope))
    }

    /// A failure after the stream started: an `error` event (which the
    /// OpenAI SDKs raise).
    pub(super) fn error(&self, error: RunError) -> Bytes {
        event_bytes(|out| push_event(out, &run_error(error).body()))
    }

    /// A whole stream at once, for an answer that was complete before its
    /// first byte was sent: one delta per chunk the stages made, all
    /// written into one buffer.
    pub(super) fn buffered(&self, envelope: &Envelope) -> Response {
        let mut body = Vec::with_capacity(256 * (envelope.chunks.len() + 3));
        self.push_first(&mut body);
        for piece in &envelope.chunks {
            self.push_delta(&mut body, piece);
        }
        self.push_last(&mut body, envelope);
        body.extend_from_slice(DONE);
        event_stream(Response::new(body.into()))
    }

    fn push_first(&self, out: &mut Vec<u8>) {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
            ..Delta::default()
        };
        push_event(out, &self.chunk(&[ChunkChoice::new(delta, None)]));
    }

    fn push_delta(&self, out: &mut Vec<u8>, piece: &str) {
        let delta = Delta {
            content: Some(piece),
            ..Delta::default()
        };
        push_event(out, &self.chunk(&[ChunkChoice::new(delta, None)]));
    }

    fn push_last(&self, out: &mut Vec<u8>, envelope: &Envelope) {
        let whole = !self.streamed_extras.get()
            && (!envelope.tool_calls.is_empty() || envelope.refusal.is_some());
        if whole {
            let delta = Delta {
                refusal: envelope.refusal.as_deref(),
                tool_calls: (!envelope.tool_calls.is_empty()).then(|| {
                    ToolCallPieces::Whole(
                        envelope
                            .tool_calls
                            .iter()
                            .enumerate()
                            .map(|(index, call)| WholeCall { index, call })
                            .collect(),
                    )
                }),
                ..Delta::default()
            };
            push_event(out, &self.chunk(&[ChunkChoice::new(delta, None)]));
        }
        let delta = Delta::default();
        let choices = [ChunkChoice::new(delta, Some(finish(envelope)))];
        let mut last = self.chunk(&choices);
        last.orchestrator = Some(orchestrator_extension(envelope, self.route.as_ref()));
        push_event(out, &last);
        if self.include_usage {
            let mut tail = self.chunk(&[]);
            tail.usage = Some(Some(usage(envelope)));
            push_event(out, &tail);
        }
    }
}

/// The events `push` writes, as one buffer.
fn event_bytes(push: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut out = Vec::with_capacity(256);
    push(&mut out);
    Bytes::from(out)
}

/// Append an SSE event line to `out`, serialized in place after its
/// `data: ` prefix.
fn push_event(out: &mut Vec<u8>, value: &impl Serialize) {
    const PREFIX: &[u8] = b"data: ";
    let start = out.len();
    out.extend_from_slice(PREFIX);
    // These types always serialize (string keys, no I/O); were one not to,
    // the event would be empty rather than cut short.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.truncate(start + PREFIX.len());
    }
    out.extend_from_slice(b"\n\n");
}

/// `response` with the headers of a server-sent-event stream.
pub(super) fn event_stream(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// The error answer of a stage's refusal: its status, and its message and
/// code in OpenAI's error shape (`Retry-After` for one that says when).
pub fn refusal_error(refusal: &Refusal) -> ApiError {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
    let kind = match refusal.status {
        429 => "rate_limit_error",
        _ => "invalid_request_error",
    };
    let mut error =
        ApiError::with_code(status, kind, refusal.code.clone(), refusal.message.clone());
    if let Some(ms) = refusal.retry_after_ms {
        error = error.retry_after(u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX));
    }
    error
}

/// The HTTP form of a pipeline failure.
pub fn run_error(error: RunError) -> ApiError {
    let message = error.to_string();
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match error {
        RunError::Refused(refusal) => refusal_error(&refusal),
        RunError::Shed { .. } => {
            ApiError::with_code(status, "rate_limit_error", "queue_full", message).retry_after(1)
        }
        RunError::CircuitOpen { retry_after, .. } => {
            ApiError::with_code(status, "server_error", "circuit_open", message)
                .retry_after(u32::try_from(retry_after.as_secs().max(1)).unwrap_or(u32::MAX))
        }
        RunError::ShuttingDown => {
            ApiError::with_code(status, "server_error", "shutting_down", message).retry_after(1)
        }
        RunError::Timeout(_) => {
            ApiError::with_code(status, "timeout_error", "request_timeout", message)
        }
        RunError::Stage { error, .. } => match error.error_type {
            ErrorType::InvalidInput => {
                ApiError::with_code(status, "invalid_request_error", "stage_rejected", message)
            }
            ErrorType::Upstream => {
                ApiError::with_code(status, "upstream_error", "upstream", message)
            }
            ErrorType::UpstreamUnavailable => {
                ApiError::with_code(status, "upstream_error", "upstream_unavailable", message)
                    .retry_after(1)
            }
            ErrorType::UpstreamTimeout => {
                ApiError::with_code(status, "timeout_error", "upstream_timeout", message)
            }
            other => ApiError::with_code(status, "server_error", other.label(), message),
        },
    }
}
