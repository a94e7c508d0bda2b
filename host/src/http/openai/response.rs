//! The answers of `POST /v1/chat/completions`: a `chat.completion` object,
//! the events of a `chat.completion.chunk` stream (`ChunkEvents`, one
//! builder for buffered and live streams), and the HTTP form of a pipeline
//! failure ([`run_error`]).

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use warp::http::{StatusCode, header};
use warp::reply::Response;

use crate::http::error::ApiError;
use crate::inference::finish_reason;
use crate::metrics::ErrorType;
use crate::pipeline::{RouteRef, RunError};
use crate::wasm::Envelope;

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
fn orchestrator_extension(envelope: &Envelope, route: Option<&RouteRef>) -> Value {
    let metadata: BTreeMap<&str, &str> = envelope
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut extension = json!({
        "request_id": envelope.request_id,
        "sources": envelope.passages.iter().map(|p| json!({"source": p.source, "score": p.score})).collect::<Vec<_>>(),
        "chunks": envelope.chunks.len(),
        "metadata": metadata,
    });
    if let Some(route) = route {
        extension["pipeline"] = json!(route.name());
        extension["stages"] = json!(route.stage_names().collect::<Vec<_>>());
    }
    extension
}

fn usage(envelope: &Envelope) -> Value {
    let u = &envelope.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
    })
}

/// The `finish_reason` of an answer: `length` or `stop`.
fn finish(envelope: &Envelope) -> &'static str {
    finish_reason(Some(&envelope.finish_reason))
}

/// The body of a non-streamed answer.
pub(super) fn completion_body(
    id: &str,
    model: &str,
    envelope: &Envelope,
    route: &RouteRef,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": envelope.completion, "refusal": null},
            "logprobs": null,
            "finish_reason": finish(envelope),
        }],
        "usage": usage(envelope),
        "orchestrator": orchestrator_extension(envelope, Some(route)),
    })
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    orchestrator: Option<Value>,
}

/// The events of one streamed answer, each a `data: {...}\n\n` line:
/// [`first`](Self::first), one [`delta`](Self::delta) per piece,
/// [`last`](Self::last) (or [`error`](Self::error)), then [`DONE`].
pub(super) struct ChunkEvents {
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
            id,
            model,
            created: unix_now(),
            include_usage,
            route,
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Chunk<'_> {
        Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices,
            usage: self.include_usage.then_some(Value::Null),
            orchestrator: None,
        }
    }

    /// The opening chunk: the assistant role, no content.
    pub(super) fn first(&self) -> Bytes {
        sse_event(&self.chunk(vec![
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        ]))
    }

    /// A piece of the completion.
    pub(super) fn delta(&self, piece: &str) -> Bytes {
        sse_event(&self.chunk(vec![
            json!({"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}),
        ]))
    }

    /// The closing chunk (finish reason and the `orchestrator` object) and,
    /// if asked for, the usage chunk.
    pub(super) fn last(&self, envelope: &Envelope) -> Bytes {
        let mut last = self.chunk(vec![
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish(envelope)}),
        ]);
        last.orchestrator = Some(orchestrator_extension(envelope, self.route.as_ref()));
        let mut events = sse_event(&last).to_vec();
        if self.include_usage {
            let mut tail = self.chunk(Vec::new());
            tail.usage = Some(usage(envelope));
            events.extend_from_slice(&sse_event(&tail));
        }
        Bytes::from(events)
    }

    /// A failure after the stream started: an `error` event (which the
    /// OpenAI SDKs raise).
    pub(super) fn error(&self, error: RunError) -> Bytes {
        sse_event(&run_error(error).body())
    }

    /// A whole stream at once, for an answer that was complete before its
    /// first byte was sent: one delta per chunk the stages made.
    pub(super) fn buffered(&self, envelope: &Envelope) -> Response {
        let mut body = self.first().to_vec();
        for piece in &envelope.chunks {
            body.extend_from_slice(&self.delta(piece));
        }
        body.extend_from_slice(&self.last(envelope));
        body.extend_from_slice(DONE);
        event_stream(Response::new(body.into()))
    }
}

/// An SSE event line.
fn sse_event(value: &impl Serialize) -> Bytes {
    let mut line = String::from("data: ");
    line.push_str(&serde_json::to_string(value).unwrap_or_default());
    line.push_str("\n\n");
    Bytes::from(line)
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

/// The HTTP form of a pipeline failure.
pub fn run_error(error: RunError) -> ApiError {
    let message = error.to_string();
    match error {
        RunError::Shed { .. } => ApiError::with_code(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "queue_full",
            message,
        )
        .retry_after(1),
        RunError::CircuitOpen { retry_after, .. } => ApiError::with_code(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "circuit_open",
            message,
        )
        .retry_after(u32::try_from(retry_after.as_secs().max(1)).unwrap_or(u32::MAX)),
        RunError::ShuttingDown => ApiError::with_code(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            message,
        )
        .retry_after(1),
        RunError::Timeout(_) => ApiError::with_code(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            "request_timeout",
            message,
        ),
        RunError::Stage { error, .. } => match error.error_type {
            ErrorType::InvalidInput => ApiError::with_code(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "stage_rejected",
                message,
            ),
            ErrorType::Upstream => ApiError::with_code(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "upstream",
                message,
            ),
            ErrorType::UpstreamUnavailable => ApiError::with_code(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                "upstream_unavailable",
                message,
            )
            .retry_after(1),
            ErrorType::UpstreamTimeout => ApiError::with_code(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout_error",
                "upstream_timeout",
                message,
            ),
            other => ApiError::with_code(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                other.label(),
                message,
            ),
        },
    }
}
