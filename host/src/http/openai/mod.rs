//! The OpenAI-compatible API (`POST /v1/chat/completions`,
//! `GET /v1/models`): routes and handlers here, the request's wire types
//! and validation in [`request`], the answers in [`response`].
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

pub mod request;
pub mod response;

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::http::error::{ApiError, json_response};
use crate::http::server::ClientAddr;
use crate::inference::Router;
use crate::pipeline::{Answer, Pipeline, RouteRef, RunError, StreamItem, Streaming};
use crate::trace::{Attribute, Trace, TraceHeaders, Traces};
use crate::wasm::{Caller, Envelope, Refusal};
use request::parse;
use response::{
    ChunkEvents, DONE, completion_body, event_stream, refusal_error, run_error, unix_now,
};

/// What the API needs.
#[derive(Clone)]
pub struct ApiState {
    /// The pipelines requests run through (and, in their current
    /// configuration, the routing of model names).
    pub pipeline: Pipeline,
    /// End-to-end deadline of each request.
    pub request_timeout: Duration,
    /// How long a stream waits for a client that does not read.
    pub stream_stall: Duration,
    /// Largest accepted body.
    pub max_body_bytes: u64,
    /// Becomes `true` when the host's drain deadline nears: open streams
    /// end with an `error` event (`shutting_down`) and `[DONE]`.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The tracer, when `[tracing]` is enabled.
    pub traces: Option<Traces>,
}

/// The API's routes, with the admin routes (see [`crate::http::admin`])
/// mounted beside them.
pub fn routes(
    state: ApiState,
    admin: BoxedFilter<(Response,)>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let limit = state.max_body_bytes;
    let state = warp::any().map(move || state.clone());
    let completions =
        warp::path!("v1" / "chat" / "completions")
            .and(warp::post())
            .and(warp::body::content_length_limit(limit))
            .and(warp::body::bytes())
            // The headers (for the trace context, and for the stages granted
            // them) and the client's address, taken once.
            .and(warp::header::headers_cloned())
            .and(warp::ext::optional::<ClientAddr>())
            .and(state.clone())
            .then(
                |body: Bytes, headers: HeaderMap, address: Option<ClientAddr>, state: ApiState| async move {
                    let text = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let trace_headers = TraceHeaders::new(text("traceparent"), text("tracestate"));
                    let caller = Arc::new(Caller {
                        headers,
                        address: address.map(|a| a.0),
                    });
                    traced(&state, &trace_headers, caller, &body).await
                },
            );
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

/// A new completion id: unique within the process, and across restarts
/// (it starts from the start time).
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

/// The name of the response header that carries the request's trace id.
pub const TRACE_ID_HEADER: &str = "x-trace-id";

/// A completion request in its server span (when tracing is on): the
/// span continues the caller's `traceparent`, the answer carries the trace
/// id, and the span ends with the answer (a stream's, when it ends).
async fn traced(
    state: &ApiState,
    headers: &TraceHeaders,
    caller: Arc<Caller>,
    body: &[u8],
) -> Response {
    let trace = state.traces.as_ref().map_or_else(Trace::off, |traces| {
        traces.server_span(
            headers,
            "POST /v1/chat/completions",
            vec![
                Attribute::new("http.request.method", "POST"),
                Attribute::new("http.route", "/v1/chat/completions"),
                Attribute::new("url.path", "/v1/chat/completions"),
            ],
        )
    });
    let (mut response, streaming) = chat_completions(state, body, caller, &trace).await;
    if let Some(id) = trace
        .trace_id()
        .and_then(|id| HeaderValue::from_str(&id).ok())
    {
        response.headers_mut().insert(TRACE_ID_HEADER, id);
    }
    let status = response.status();
    trace.set([Attribute::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    )]);
    if status.is_server_error() {
        trace.fail(status.as_str(), format!("answered {status}"));
    }
    if !streaming {
        trace.end();
    }
    response
}

/// Answer a completion request; `true` with the response of a live stream
/// (whose task ends `trace`).
async fn chat_completions(
    state: &ApiState,
    body: &[u8],
    caller: Arc<Caller>,
    trace: &Trace,
) -> (Response, bool) {
    // One configuration for the whole request, even if a reload lands
    // meanwhile.
    let snapshot = state.pipeline.snapshot();
    let parsed = match parse(body, snapshot.router()) {
        Ok(parsed) => parsed,
        Err(error) => return (error.into_response(), false),
    };
    // `parse` refused a model that routes nowhere.
    let Some(route) = snapshot.pipeline_for(&parsed.target) else {
        return (
            ApiError::with_code(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("model {:?} routes to no pipeline", parsed.params.model),
            )
            .into_response(),
            false,
        );
    };
    let id = request_id();
    if trace.is_recording() {
        trace.set([
            Attribute::new("gen_ai.request.model", parsed.params.model.clone()),
            Attribute::new("orchestrator.request_id", id.clone()),
            Attribute::new("orchestrator.stream", parsed.stream),
        ]);
    }
    let mut envelope = Envelope::new(id.clone(), parsed.messages, parsed.params, parsed.tools);
    envelope.target = Some(parsed.target);
    envelope.caller = Some(caller);
    let deadline = Instant::now() + state.request_timeout;
    if !parsed.stream {
        let run = state
            .pipeline
            .run(&snapshot, &route, envelope, deadline, trace.clone());
        let response = match run.await {
            Ok(envelope) => {
                traced_principal(trace, &envelope);
                let answer = match &envelope.refused {
                    Some(refusal) => refused(refusal),
                    None => json_response(
                        StatusCode::OK,
                        &completion_body(
                            &id,
                            &served_model(snapshot.router(), &envelope),
                            &envelope,
                            &route,
                        ),
                    ),
                };
                with_headers(answer, &envelope.response_headers)
            }
            Err(error) => run_error(error).into_response(),
        };
        return (with_route(response, &route), false);
    }
    envelope.metadata.push((
        orchestrator_plugin::STREAM_NOTE.to_string(),
        "true".to_string(),
    ));
    let include_usage = parsed.include_usage;
    // Made once the stages named the model the answer is served from.
    let events = |envelope: Option<&Envelope>| {
        let model = envelope.map_or_else(String::new, |e| {
            served_model(snapshot.router(), e).into_owned()
        });
        ChunkEvents::new(id, model, include_usage, Some(route.clone()))
    };
    let run = state
        .pipeline
        .run_streaming(&snapshot, &route, envelope, deadline, trace.clone());
    let (response, live) = match run.await {
        Ok(Answer::Done(envelope)) => {
            traced_principal(trace, &envelope);
            let response = match &envelope.refused {
                Some(refusal) => refused(refusal),
                None => events(Some(&envelope)).buffered(&envelope),
            };
            (with_headers(response, &envelope.response_headers), false)
        }
        Ok(Answer::Streaming(streaming)) => {
            let headers = streaming.response_headers().to_vec();
            let events = events(streaming.envelope());
            let response = live_stream(
                events,
                streaming,
                state.shutdown.clone(),
                state.stream_stall,
                trace.clone(),
            );
            (with_headers(response, &headers), true)
        }
        Err(error) => (run_error(error).into_response(), false),
    };
    (with_route(response, &route), live)
}

/// The model an answer names ([`Target::served_model`]): that of the
/// target the request was resolved to when parsed, or, if a stage changed
/// the model since, of the one that model resolves to (the original if it
/// resolves nowhere).
///
/// [`Target::served_model`]: crate::inference::Target::served_model
fn served_model<'e>(router: &Router, envelope: &'e Envelope) -> Cow<'e, str> {
    let parsed = envelope.target.as_ref();
    if let Some(target) = parsed
        && target.model() == envelope.params.model
    {
        return Cow::Borrowed(target.served_model());
    }
    match router.resolve(&envelope.params.model) {
        Some(changed) => Cow::Owned(changed.served_model().to_string()),
        None => Cow::Borrowed(parsed.map_or(&envelope.params.model, |t| t.served_model())),
    }
}

/// Record who called (the principal a stage set) in the request's span,
/// as `enduser.id`.
fn traced_principal(trace: &Trace, envelope: &Envelope) {
    if let Some(principal) = &envelope.principal
        && trace.is_recording()
    {
        trace.set([Attribute::new("enduser.id", principal.clone())]);
    }
}

/// The answer to a request a stage refused.
fn refused(refusal: &Refusal) -> Response {
    refusal_error(refusal).into_response()
}

/// Add the headers the stages set (validated when set: `x-` names, bounded,
/// visible ASCII).
fn with_headers(mut response: Response, headers: &[(String, String)]) -> Response {
    let map = response.headers_mut();
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            warp::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.insert(name, value);
        }
    }
    response
}

/// Name the pipeline that served (or refused) the request in the
/// `x-orchestrator-pipeline` and `x-orchestrator-stages` headers.
fn with_route(mut response: Response, route: &RouteRef) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        "x-orchestrator-pipeline",
        HeaderValue::from_static(route.name()),
    );
    headers.insert("x-orchestrator-stages", route.stage_list().clone());
    response
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

/// Events buffered per streamed answer beyond what the connection's
/// socket holds: what a client that stops reading can pin.
const STREAM_BUFFER: usize = 16;

/// Stream `streaming` to the client as its pieces come.
fn live_stream(
    events: ChunkEvents,
    mut streaming: Box<Streaming>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    stall: Duration,
    trace: Trace,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_BUFFER);
    let span = trace.clone();
    let task = async move {
        // A client that stops reading must not hold the request (its
        // reservations, a backend permit): after `stall` without taking an
        // event (or at its deadline, if sooner) the stream is cut, which
        // drops the request and cancels its generation.
        let deadline = streaming.deadline();
        let request_id = streaming.request_id().to_string();
        let send = |bytes: Bytes| {
            let tx = tx.clone();
            let (request_id, trace) = (&request_id, &trace);
            async move {
                let until = deadline.min(Instant::now() + stall);
                let sent = matches!(
                    tokio::time::timeout_at(until.into(), tx.send(bytes)).await,
                    Ok(Ok(()))
                );
                // (A closed channel is a client that left: nothing to say.)
                if !sent && !tx.is_closed() {
                    if Instant::now() >= deadline {
                        tracing::warn!(
                            %request_id,
                            trace_id = %trace,
                            "a stream reached its request deadline; it is cut"
                        );
                    } else {
                        tracing::warn!(
                            %request_id,
                            trace_id = %trace,
                            stall_ms = stall.as_millis() as u64,
                            "a streaming client stopped reading; its stream is cut"
                        );
                    }
                }
                sent
            }
        };
        if !send(events.first()).await {
            return;
        }
        loop {
            let item = tokio::select! {
                biased;
                () = tx.closed() => return,
                _ = shutdown.wait_for(|cut| *cut) => Some(Err(RunError::ShuttingDown)),
                item = streaming.next() => item,
            };
            let (event, end) = match item {
                None => break,
                Some(Ok(StreamItem::Delta(piece))) => (events.delta(&piece), false),
                Some(Ok(StreamItem::Extra(extra))) => (events.extra(&extra), false),
                Some(Ok(StreamItem::Done(envelope))) => {
                    traced_principal(&trace, &envelope);
                    (events.last(&envelope), false)
                }
                Some(Err(error)) => {
                    trace.fail(error.outcome().label(), error.to_string());
                    (events.error(error), true)
                }
            };
            if !send(event).await {
                return;
            }
            if end {
                break;
            }
        }
        send(Bytes::from_static(DONE)).await;
    };
    // Its span ends with it (also when the client leaves: the task
    // returns).
    tokio::spawn(async move {
        task.await;
        span.end();
    });
    event_stream(warp::reply::stream(ChannelBody(rx)).into_response())
}

fn list_models(state: &ApiState) -> Response {
    let created = unix_now();
    let snapshot = state.pipeline.snapshot();
    let data: Vec<Value> = snapshot
        .router()
        .models()
        .map(|(model, backend, pipeline)| json!({"id": model, "object": "model", "created": created, "owned_by": backend, "pipeline": pipeline}))
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
