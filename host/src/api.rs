//! The OpenAI-compatible HTTP API (`POST /v1/chat/completions`,
//! `GET /v1/models`).
//!
//! Requests and responses follow the OpenAI Chat Completions API closely
//! enough for the official SDKs to work unchanged: the same request fields
//! (unknown ones are ignored, as OpenAI does), the same response objects,
//! `"stream": true` answered as server-sent events of
//! `chat.completion.chunk` objects ending with `data: [DONE]`, and errors
//! in OpenAI's `{"error": {"message", "type", "param", "code"}}` shape.
//!
//! Each response also carries an `orchestrator` object (ignored by SDKs)
//! with the request id, the sources the `rag` stage retrieved and the
//! stages' metadata notes.
//!
//! Status codes: 400 malformed or invalid request; 404 unknown model or
//! path; 405 wrong method; 411/413 missing or oversized `Content-Length`;
//! 429 (with `Retry-After`) a stage queue is full; 500 a stage failed;
//! 502 the inference backend answered with an error; 503 shutting down, a
//! circuit breaker is open, or the backend is unreachable; 504 the request
//! deadline passed or the backend timed out. Backend errors name the
//! backend.
//!
//! # Streaming
//!
//! With `"stream": true` the answer is sent as the tokens come: the
//! response (status 200, `text/event-stream`) starts when the generation's
//! first token has passed the streaming stages, and each piece the last
//! stage emits is one `chat.completion.chunk`. A failure after that point
//! can no longer change the status: it is sent as a final
//! `data: {"error": {...}}` event (which the OpenAI SDKs raise as an
//! error), followed by `data: [DONE]`. A client that disconnects cancels
//! the generation (see [`crate::pipeline`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::{StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::inference::Backends;
use crate::metrics::ErrorType;
use crate::pipeline::{Answer, Pipeline, RunError, StreamItem, Streaming};
use crate::plugin::{Envelope, GenerationParams, Message};

/// Default `max_tokens` when the client gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// What the API needs.
#[derive(Clone)]
pub struct ApiState {
    /// The pipeline requests run through.
    pub pipeline: Pipeline,
    /// The backends, for model names.
    pub backends: Backends,
    /// End-to-end deadline of each request.
    pub request_timeout: Duration,
    /// Largest accepted body.
    pub max_body_bytes: u64,
}

/// The API's routes, with the admin routes (see [`crate::admin`]) mounted
/// beside them.
pub fn routes(
    state: ApiState,
    admin: BoxedFilter<(Response,)>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let limit = state.max_body_bytes;
    let state = warp::any().map(move || state.clone());
    let completions = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(warp::body::content_length_limit(limit))
        .and(warp::body::bytes())
        .and(state.clone())
        .then(|body: Bytes, state: ApiState| async move { chat_completions(&state, &body).await });
    let models = warp::path!("v1" / "models")
        .and(warp::get())
        .and(state)
        .map(|state: ApiState| list_models(&state));
    completions
        .or(models)
        .unify()
        .or(admin)
        .unify()
        .recover(rejection)
        .unify()
}

// ----- request ---------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// An API error, rendered in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u32>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
            retry_after: None,
        }
    }

    /// An error with a status, OpenAI error `type` and `code`.
    pub fn with_code(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = json_response(self.status, &body);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = Response::new(body.to_string().into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A validated request.
struct Parsed {
    model: String,
    messages: Vec<Message>,
    params: GenerationParams,
    stream: bool,
    include_usage: bool,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn parse(body: &[u8], backends: &Backends) -> Result<Parsed, ApiError> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body is not a valid chat completion request"
        };
        ApiError::invalid(format!("{what}: {e}"), None)
    })?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (n, message) in request.messages.into_iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return Err(ApiError::invalid(
                format!(
                    "messages[{n}].role is {:?}; expected one of {}",
                    message.role,
                    ROLES.join(", ")
                ),
                Some("messages"),
            ));
        }
        let content = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(&t);
                        }
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                    "messages[{n}].content: only text parts are supported, got {kind:?}"
                                ),
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(Message {
            role: if message.role == "developer" {
                "system".into()
            } else {
                message.role
            },
            content,
        });
    }
    if !messages
        .iter()
        .any(|m| m.role == "user" && !m.content.trim().is_empty())
    {
        return Err(ApiError::invalid(
            "`messages` must contain a user message with content",
            Some("messages"),
        ));
    }
    if backends.route(&request.model).is_none() {
        let models: Vec<&str> = backends.models().map(|(model, _)| model).collect();
        let mut error = ApiError::with_code(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model `{}` does not exist; this orchestrator serves: {}",
                request.model,
                models.join(", ")
            ),
        );
        error.param = Some("model");
        return Err(error);
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            "`max_tokens` must be at least 1",
            Some("max_tokens"),
        ));
    }
    let temperature = request.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "`temperature` must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let stop = match request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) if v.len() <= 4 => v,
        Some(Stop::Many(_)) => {
            return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
        }
    };
    Ok(Parsed {
        params: GenerationParams {
            model: request.model.clone(),
            max_tokens,
            temperature,
            stop,
        },
        model: request.model,
        messages,
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

// ----- handling --------------------------------------------------------

fn request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    format!(
        "chatcmpl-{start:x}{:08x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat_completions(state: &ApiState, body: &[u8]) -> Response {
    let parsed = match parse(body, &state.backends) {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let id = request_id();
    let mut envelope = Envelope::new(id.clone(), parsed.messages, parsed.params);
    let deadline = Instant::now() + state.request_timeout;
    if !parsed.stream {
        return match state.pipeline.run(envelope, deadline).await {
            Ok(envelope) => json_response(
                StatusCode::OK,
                &completion_body(&id, &parsed.model, &envelope),
            ),
            Err(error) => run_error(error).into_response(),
        };
    }
    envelope
        .metadata
        .push(("request.stream".to_string(), "true".to_string()));
    match state.pipeline.run_streaming(envelope, deadline).await {
        Ok(Answer::Done(envelope)) => {
            sse_response(&id, &parsed.model, &envelope, parsed.include_usage)
        }
        Ok(Answer::Streaming(streaming)) => {
            live_sse_response(id, parsed.model, streaming, parsed.include_usage)
        }
        Err(error) => run_error(error).into_response(),
    }
}

/// The HTTP form of a pipeline failure.
pub fn run_error(error: RunError) -> ApiError {
    let message = error.to_string();
    match error {
        RunError::Shed { .. } => {
            let mut e = ApiError::with_code(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                message,
            );
            e.retry_after = Some(1);
            e
        }
        RunError::CircuitOpen { retry_after, .. } => {
            let mut e = ApiError::with_code(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "circuit_open",
                message,
            );
            e.retry_after = Some(u32::try_from(retry_after.as_secs().max(1)).unwrap_or(u32::MAX));
            e
        }
        RunError::ShuttingDown => {
            let mut e = ApiError::with_code(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                message,
            );
            e.retry_after = Some(1);
            e
        }
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
            ErrorType::UpstreamUnavailable => {
                let mut e = ApiError::with_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_error",
                    "upstream_unavailable",
                    message,
                );
                e.retry_after = Some(1);
                e
            }
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

fn orchestrator_extension(envelope: &Envelope) -> Value {
    let metadata: BTreeMap<&str, &str> = envelope
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    json!({
        "request_id": envelope.request_id,
        "sources": envelope.passages.iter().map(|p| json!({"source": p.source, "score": p.score})).collect::<Vec<_>>(),
        "chunks": envelope.chunks.len(),
        "metadata": metadata,
    })
}

fn usage(envelope: &Envelope) -> Value {
    let u = &envelope.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
    })
}

fn finish_reason(envelope: &Envelope) -> &str {
    if envelope.finish_reason == "length" {
        "length"
    } else {
        "stop"
    }
}

fn completion_body(id: &str, model: &str, envelope: &Envelope) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": envelope.completion, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_reason(envelope),
        }],
        "usage": usage(envelope),
        "orchestrator": orchestrator_extension(envelope),
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

fn sse_response(id: &str, model: &str, envelope: &Envelope, include_usage: bool) -> Response {
    let created = unix_now();
    let chunk = |choices: Vec<Value>| Chunk {
        id,
        object: "chat.completion.chunk",
        created,
        model,
        choices,
        usage: include_usage.then_some(Value::Null),
        orchestrator: None,
    };
    let mut events = Vec::with_capacity(envelope.chunks.len() + 4);
    events.push(chunk(vec![
        json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
    ]));
    for piece in &envelope.chunks {
        events.push(chunk(vec![
            json!({"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}),
        ]));
    }
    let mut last = chunk(vec![
        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(envelope)}),
    ]);
    last.orchestrator = Some(orchestrator_extension(envelope));
    events.push(last);
    if include_usage {
        let mut tail = chunk(Vec::new());
        tail.usage = Some(usage(envelope));
        events.push(tail);
    }
    let mut body = Vec::new();
    for event in &events {
        body.extend_from_slice(&sse_event(event));
    }
    body.extend_from_slice(b"data: [DONE]\n\n");
    event_stream(Response::new(body.into()))
}

/// `response` with the headers of a server-sent-event stream.
fn event_stream(mut response: Response) -> Response {
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

/// An SSE event line.
fn sse_event(value: &impl Serialize) -> Bytes {
    let mut line = String::from("data: ");
    line.push_str(&serde_json::to_string(value).unwrap_or_default());
    line.push_str("\n\n");
    Bytes::from(line)
}

/// The body of a streaming answer: a channel fed by a task that pulls the
/// [`Streaming`] request. When the client goes away the body, and with it
/// the receiver, is dropped; the task sees that and drops the request,
/// which cancels the generation.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl futures_util::Stream for ChannelBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|item| item.map(Ok))
    }
}

fn live_sse_response(
    id: String,
    model: String,
    mut streaming: Box<Streaming>,
    include_usage: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let created = unix_now();
        let chunk = |choices: Vec<Value>| Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created,
            model: &model,
            choices,
            usage: include_usage.then_some(Value::Null),
            orchestrator: None,
        };
        let first = chunk(vec![
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        ]);
        // A client that stops reading must not hold the request (its
        // reservations, a backend permit) past its deadline.
        let deadline = streaming.deadline();
        let send = |bytes: Bytes| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout_at(deadline.into(), tx.send(bytes)).await,
                    Ok(Ok(()))
                )
            }
        };
        if !send(sse_event(&first)).await {
            return;
        }
        loop {
            let item = tokio::select! {
                biased;
                () = tx.closed() => return,
                item = streaming.next() => item,
            };
            let event = match item {
                None => break,
                Some(Ok(StreamItem::Delta(piece))) => sse_event(&chunk(vec![
                    json!({"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}),
                ])),
                Some(Ok(StreamItem::Done(envelope))) => {
                    let mut last = chunk(vec![
                        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&envelope)}),
                    ]);
                    last.orchestrator = Some(orchestrator_extension(&envelope));
                    let mut events = sse_event(&last).to_vec();
                    if include_usage {
                        let mut tail = chunk(Vec::new());
                        tail.usage = Some(usage(&envelope));
                        events.extend_from_slice(&sse_event(&tail));
                    }
                    Bytes::from(events)
                }
                Some(Err(error)) => {
                    let error = run_error(error);
                    sse_event(&json!({"error": {
                        "message": error.message,
                        "type": error.kind,
                        "param": null,
                        "code": error.code,
                    }}))
                }
            };
            if !send(event).await {
                return;
            }
        }
        send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    event_stream(warp::reply::stream(ChannelBody(rx)).into_response())
}

fn list_models(state: &ApiState) -> Response {
    let created = unix_now();
    let data: Vec<Value> = state
        .backends
        .models()
        .map(|(model, backend)| json!({"id": model, "object": "model", "created": created, "owned_by": backend}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// Turn warp's rejections into OpenAI-shaped errors.
async fn rejection(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let error = if rejection.is_not_found() {
        ApiError::with_code(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            "no such endpoint",
        )
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::with_code(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            "the request body is larger than the configured max_body_bytes",
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::with_code(
            StatusCode::LENGTH_REQUIRED,
            "invalid_request_error",
            "length_required",
            "a Content-Length header is required",
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::with_code(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed on this endpoint",
        )
    } else {
        tracing::debug!(?rejection, "unhandled rejection");
        ApiError::invalid("bad request", None)
    };
    Ok(error.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn backends() -> Backends {
        Backends::new(&Config::default(), &Metrics::new()).expect("default backends")
    }

    fn parse_str(body: &str) -> Result<Parsed, ApiError> {
        parse(body.as_bytes(), &backends())
    }

    #[test]
    fn accepts_a_minimal_request() {
        let p =
            parse_str(r#"{"model":"echo","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(p.messages[0].content, "hi");
        assert_eq!(p.params.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(!p.stream);
    }

    #[test]
    fn flattens_text_parts_and_ignores_unknown_fields() {
        let p = parse_str(
            r#"{"model":"echo","user":"x","seed":1,"stop":"END","stream":true,"stream_options":{"include_usage":true},
                "messages":[{"role":"developer","content":"be nice"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(p.messages[0].role, "system");
        assert_eq!(p.messages[1].content, "a\nb");
        assert_eq!(p.params.stop, ["END"]);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn rejects_bad_requests_with_reasons() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "not a valid chat completion request"),
            (r#"{"model":"echo"}"#, "missing field `messages`"),
            (r#"{"model":"echo","messages":[]}"#, "must not be empty"),
            (r#"{"model":"echo","messages":"hi"}"#, "invalid type"),
            (
                r#"{"model":"echo","messages":[{"role":"wizard","content":"x"}]}"#,
                "role",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"system","content":"x"}]}"#,
                "user message",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"n":2}"#,
                "n = 1",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "text parts",
            ),
        ];
        for (body, expected) in cases {
            let error = parse_str(body)
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                error.message.contains(expected),
                "{body}: {}",
                error.message
            );
        }
        let error = parse_str(r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#)
            .err()
            .unwrap();
        assert_eq!(error.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for open in ["[", "{\"a\":"] {
            let body = format!(
                r#"{{"model":"echo","messages":[{{"role":"user","content":{}}}]}}"#,
                open.repeat(100_000)
            );
            let error = parse_str(&body).err().unwrap();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
        }
    }

    /// A valid request, as JSON, to mutate.
    fn valid() -> Value {
        json!({"model": "echo", "stream": false, "max_tokens": 5, "stop": ["x"],
               "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse(&body, &backends());
        }

        #[test]
        fn arbitrary_json_never_panics(value in any_json()) {
            let _ = parse(value.to_string().as_bytes(), &backends());
        }

        #[test]
        fn any_field_of_a_valid_request_may_be_replaced(
            field in proptest::sample::select(vec!["model", "messages", "stream", "max_tokens", "stop", "temperature", "n", "stream_options"]),
            value in any_json(),
        ) {
            let mut request = valid();
            request[field] = value.clone();
            match parse(request.to_string().as_bytes(), &backends()) {
                Ok(parsed) => proptest::prop_assert!(!parsed.messages.is_empty()),
                Err(error) => proptest::prop_assert!(error.status.is_client_error(), "{} = {}: {:?}", field, value, error),
            }
        }
    }
}
