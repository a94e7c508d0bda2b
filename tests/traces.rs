//! Request traces: the real host exports OTLP/HTTP to a receiver here that
//! decodes it with the official protobuf definitions (`opentelemetry-proto`;
//! no OpenTelemetry Collector is packaged for this machine).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use tokio::sync::Notify;

use crate::common::upstream::{Script, Upstream};
use crate::common::{Host, ask, client, test_plugin};

/// One span as received, flattened.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    kind: SpanKind,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
    events: Vec<String>,
    error: bool,
    service: String,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

fn text(value: Option<&Any>) -> String {
    match value {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(n)) => n.to_string(),
        Some(Any::DoubleValue(d)) => d.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(Any::ArrayValue(a)) => a
            .values
            .iter()
            .map(|v| text(v.value.as_ref()))
            .collect::<Vec<_>>()
            .join(","),
        _ => String::new(),
    }
}

/// An OTLP/HTTP trace receiver on loopback.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
    /// The `x-test-auth` header of each export.
    auth: Arc<Mutex<Vec<String>>>,
    grew: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let auth = Arc::new(Mutex::new(Vec::new()));
        let grew = Arc::new(Notify::new());
        let (sink, headers, notify) = (spans.clone(), auth.clone(), grew.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (sink, headers, notify) = (sink.clone(), headers.clone(), notify.clone());
                let service = service_fn(move |request: hyper::Request<Incoming>| {
                    let (sink, headers, notify) = (sink.clone(), headers.clone(), notify.clone());
                    async move {
                        if let Some(value) = request.headers().get("x-test-auth") {
                            headers
                                .lock()
                                .unwrap()
                                .push(value.to_str().unwrap_or("").to_string());
                        }
                        let body = request.into_body().collect().await?.to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        let mut received = Vec::new();
                        for resource in &export.resource_spans {
                            let service = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "service.name")
                                .map(|a| text(a.value.as_ref().and_then(|v| v.value.as_ref())))
                                .unwrap_or_default();
                            for scope in &resource.scope_spans {
                                for span in &scope.spans {
                                    received.push(Span {
                                        name: span.name.clone(),
                                        kind: SpanKind::try_from(span.kind)
                                            .unwrap_or(SpanKind::Unspecified),
                                        trace_id: hex::encode(&span.trace_id),
                                        span_id: hex::encode(&span.span_id),
                                        parent: hex::encode(&span.parent_span_id),
                                        attributes: span
                                            .attributes
                                            .iter()
                                            .map(|a| {
                                                (
                                                    a.key.clone(),
                                                    text(
                                                        a.value
                                                            .as_ref()
                                                            .and_then(|v| v.value.as_ref()),
                                                    ),
                                                )
                                            })
                                            .collect(),
                                        events: span
                                            .events
                                            .iter()
                                            .map(|e| e.name.clone())
                                            .collect(),
                                        error: span.status.as_ref().is_some_and(|s| s.code == 2),
                                        service: service.clone(),
                                    });
                                }
                            }
                        }
                        sink.lock().unwrap().extend(received);
                        notify.notify_waiters();
                        let reply = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(reply),
                        )))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Receiver {
            endpoint,
            spans,
            auth,
            grew,
            task,
        }
    }

    /// Wait (woken by each export, up to 30 s) until the spans of trace
    /// `trace_id` satisfy `done`; returns them.
    async fn trace(&self, trace_id: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let grew = self.grew.notified();
            let spans: Vec<Span> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect();
            if done(&spans) {
                return spans;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "trace {trace_id} incomplete: {spans:#?}");
            let _ = tokio::time::timeout(left, grew).await;
        }
    }
}

/// Ask `host` for `body`: the (200) response and its trace id.
async fn traced_answer(host: &Host, body: &serde_json::Value) -> (reqwest::Response, String) {
    let response = host.post(body).await;
    assert_eq!(response.status(), 200);
    let trace_id = response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    (response, trace_id)
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one `{name}` span: {spans:#?}");
    found[0]
}

const STAGES: [&str; 5] = ["rag", "assemble", "inference", "post", "stream"];

fn traced_host(receiver_endpoint: &str, upstream: &Upstream, extra: &str) -> Host {
    Host::try_with_config_env(
        &format!(
            "[tracing]\nenabled = true\nendpoint = {receiver_endpoint:?}\nheaders = {{ \"x-test-auth\" = \"ORCH_TEST_OTLP_TOKEN\" }}\n{extra}\n\
             [backends.up]\nkind = \"openai\"\nbase_url = {:?}\nmax_retries = 2\nretry_backoff_ms = 1\n\
             [routing]\nmodels = {{ up = \"up\" }}\n",
            upstream.base_url
        ),
        &[("ORCH_TEST_OTLP_TOKEN", "s3cret")],
    )
    .unwrap_or_else(|stderr| panic!("orchestrator failed to start:\n{stderr}"))
}

/// A plain request continuing a caller's trace, and a streamed one: each
/// is one trace of a server span, a span per stage and a span per upstream
/// attempt (a retried attempt shows two), and the upstream received the
/// trace's `traceparent`.
#[tokio::test(flavor = "multi_thread")]
async fn each_request_is_one_trace_with_stage_and_attempt_spans() {
    let receiver = Receiver::start().await;
    // The first upstream request fails (503), the retry succeeds.
    let upstream = Upstream::start(Script::FailThen {
        status: 503,
        retry_after: None,
        times: 1,
        then: vec!["Hello", " there"],
    })
    .await;
    let host = traced_host(&receiver.endpoint, &upstream, "");

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&json!({"model": "up", "max_tokens": 48, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-trace-id"], caller_trace);
    let spans = receiver
        .trace(caller_trace, |s| {
            named(s, "POST /v1/chat/completions").len() == 1
                && named(s, "chat up").len() == 2
                && STAGES
                    .iter()
                    .all(|st| !named(s, &format!("stage {st}")).is_empty())
        })
        .await;
    let server = one(&spans, "POST /v1/chat/completions");
    assert_eq!(server.kind, SpanKind::Server);
    assert_eq!(server.parent, caller_span, "the caller's trace continues");
    assert_eq!(server.service, "orchestrator");
    assert_eq!(server.attr("http.response.status_code"), "200");
    assert_eq!(server.attr("gen_ai.request.model"), "up");
    for stage in STAGES {
        let span = one(&spans, &format!("stage {stage}"));
        assert_eq!(span.kind, SpanKind::Internal);
        assert_eq!(span.parent, server.span_id, "{stage}");
        assert_eq!(span.attr("orchestrator.stage"), stage);
        assert_eq!(
            span.attr("orchestrator.plugin.sha256").len(),
            64,
            "{span:?}"
        );
        assert_eq!(span.attr("orchestrator.instance_mode"), "reuse");
        assert_eq!(span.attr("orchestrator.outcome"), "ok");
        assert!(span.attributes.contains_key("orchestrator.queue_wait_ms"));
    }
    let inference = one(&spans, "stage inference");
    let attempts = named(&spans, "chat up");
    for attempt in &attempts {
        assert_eq!(attempt.kind, SpanKind::Client);
        assert_eq!(attempt.parent, inference.span_id);
        assert_eq!(attempt.attr("gen_ai.operation.name"), "chat");
        assert_eq!(attempt.attr("gen_ai.provider.name"), "openai");
        assert_eq!(attempt.attr("gen_ai.request.model"), "up");
        assert_eq!(attempt.attr("gen_ai.request.max_tokens"), "48");
        assert_eq!(attempt.attr("orchestrator.backend"), "up");
        assert_eq!(attempt.attr("orchestrator.breaker.state"), "closed");
    }
    let (failed, retried): (Vec<&Span>, Vec<&Span>) = attempts.iter().partition(|a| a.error);
    assert_eq!((failed.len(), retried.len()), (1, 1), "{attempts:#?}");
    assert_eq!(retried[0].attr("http.request.resend_count"), "1");
    assert_eq!(retried[0].attr("gen_ai.response.finish_reasons"), "stop");
    assert_eq!(retried[0].attr("gen_ai.response.id"), "up");
    assert_eq!(retried[0].attr("gen_ai.usage.input_tokens"), "11");
    assert_eq!(retried[0].attr("gen_ai.usage.output_tokens"), "2");
    assert!(
        retried[0]
            .events
            .contains(&"gen_ai.first_token".to_string())
    );
    assert!(
        spans
            .iter()
            .all(|s| !s.attributes.contains_key("gen_ai.prompt")),
        "no prompt recorded without record_content"
    );
    // Each attempt sent its own span as the parent, in the same trace.
    let sent = upstream.traceparents.lock().unwrap().clone();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for (header, attempt) in sent.iter().zip([failed[0], retried[0]]) {
        assert_eq!(header, &format!("00-{caller_trace}-{}-01", attempt.span_id));
    }
    assert!(receiver.auth.lock().unwrap().iter().all(|a| a == "s3cret"));

    // Streamed, no traceparent: a new trace, streaming stages summarised.
    let (response, trace_id) = traced_answer(
        &host,
        &json!({"model": "up", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(trace_id.len(), 32);
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let spans = receiver
        .trace(&trace_id, |s| {
            named(s, "POST /v1/chat/completions").len() == 1
                && named(s, "chat up").len() == 1
                && STAGES
                    .iter()
                    .all(|st| !named(s, &format!("stage {st}")).is_empty())
        })
        .await;
    let server = one(&spans, "POST /v1/chat/completions");
    assert_eq!(server.parent, "", "a root span");
    assert_eq!(server.attr("orchestrator.stream"), "true");
    for stage in ["post", "stream"] {
        let span = one(&spans, &format!("stage {stage}"));
        assert_eq!(span.parent, server.span_id);
        assert_eq!(span.attr("orchestrator.streaming"), "true");
        let chunks: u64 = span.attr("orchestrator.chunks").parse().unwrap();
        assert!(chunks >= 2, "{span:?}");
        assert!(span.attributes.contains_key("orchestrator.chunk_bytes_out"));
    }
    let attempt = one(&spans, "chat up");
    assert_eq!(attempt.parent, one(&spans, "stage inference").span_id);
    assert!(attempt.events.contains(&"gen_ai.first_token".to_string()));
    assert_eq!(attempt.attr("gen_ai.usage.output_tokens"), "2");
}

/// With no collector listening, or one that never answers, requests are
/// served as usual and the lost spans are counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_stalled_collector_costs_requests_nothing() {
    let upstream = Upstream::start(Script::Deltas(vec!["ok"])).await;
    // Nothing listens there (a port just freed).
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1/traces", listener.local_addr().unwrap())
    };
    let host = traced_host(&dead, &upstream, "");
    for _ in 0..3 {
        let (status, text) = host
            .chat(&json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]}))
            .await;
        assert_eq!(status, 200, "{text}");
    }
    let lost = "orchestrator_trace_spans_dropped_total{reason=\"export_failed\"}";
    wait_for_metric(&host, lost).await;

    // A collector that accepts and never answers: once the export thread
    // is waiting on it, the queue (8 spans) fills and new spans are dropped.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/v1/traces", stalled.local_addr().unwrap());
    let exporting = Arc::new(Notify::new());
    let accepted = exporting.clone();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = stalled.accept().await {
            held.push(socket);
            accepted.notify_one();
        }
    });
    let host = traced_host(
        &endpoint,
        &upstream,
        "max_queued_spans = 8\nexport_timeout_ms = 60000",
    );
    let (status, text) = host.chat(&ask("hi")).await;
    assert_eq!(status, 200, "{text}");
    exporting.notified().await;
    for _ in 0..5 {
        let (status, text) = host.chat(&ask("hi")).await;
        assert_eq!(status, 200, "{text}");
    }
    wait_for_metric(
        &host,
        "orchestrator_trace_spans_dropped_total{reason=\"queue_full\"}",
    )
    .await;
    hold.abort();
}

/// A `tracestate` of 95,000 members (under the header limit) is cut to
/// the W3C limits before it is parsed: the trace goes on, the upstream gets
/// at most 32 members in at most 512 bytes. A head past `max_header_bytes`
/// is answered 431.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_trace_headers_are_bounded() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start(Script::Deltas(vec!["ok"])).await;
    let host = Host::with_config(&format!(
        "max_header_bytes = 1048576\n[tracing]\nenabled = true\nendpoint = {:?}\n\
         [backends.up]\nkind = \"openai\"\nbase_url = {:?}\n[routing]\nmodels = {{ up = \"up\" }}\n",
        receiver.endpoint, upstream.base_url
    ));
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let members = (0..95_000).map(|i| format!("k{i}=v")).collect::<Vec<_>>();
    let response = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .header("tracestate", members.join(","))
        .json(&json!({"model": "up", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-trace-id"], caller_trace);
    let heads = upstream.heads.lock().unwrap().clone();
    let sent = heads[0]
        .lines()
        .find_map(|l| l.strip_prefix("tracestate:"))
        .expect("tracestate forwarded")
        .trim()
        .to_string();
    assert!(sent.len() <= 512, "{} bytes forwarded", sent.len());
    assert!(sent.split(',').count() <= 32, "{sent}");
    assert!(sent.starts_with("k0=v,k1=v"), "{sent}");

    let small = Host::with_config("max_header_bytes = 8192\n");
    let response = client()
        .post(format!("{}/v1/chat/completions", small.api))
        .header("x-padding", "p".repeat(10_000))
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
}

/// Wait (polling /metrics: no signal is exposed) until `series` is above 0.
async fn wait_for_metric(host: &Host, series: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.metric(series).await == 0.0 {
        assert!(Instant::now() < deadline, "{series} stayed 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plugin's log records are events of its stage's span; with
/// `record_content`, the prompt and completion are on the attempt span.
#[tokio::test(flavor = "multi_thread")]
async fn plugin_logs_are_span_events_and_content_is_opt_in() {
    let receiver = Receiver::start().await;
    let upstream = Upstream::start(Script::Deltas(vec!["fine"])).await;
    let host = traced_host(
        &receiver.endpoint,
        &upstream,
        &format!(
            "record_content = true\n[stages.post]\nplugin = {:?}\n[stages.post.config]\nmode = \"log-flood\"\n",
            test_plugin("rogue").display().to_string()
        ),
    );
    let (_, trace_id) = traced_answer(
        &host,
        &json!({"model": "up", "messages": [{"role": "user", "content": "flood the log, rogue"}]}),
    )
    .await;
    let spans = receiver
        .trace(&trace_id, |s| {
            !named(s, "stage post").is_empty() && !named(s, "chat up").is_empty()
        })
        .await;
    let post = one(&spans, "stage post");
    let logged = post
        .events
        .iter()
        .filter(|e| *e == "rogue log flood")
        .count();
    // The log rate limit applies to events too (10,000 records a call).
    assert!((50..=400).contains(&logged), "{logged} events");
    // The log lines carry the request id and the trace id.
    let log = host.wait_for_log(&format!("trace_id={trace_id}"), 1).await;
    assert!(
        log.lines().any(|l| l.contains("rogue log flood")
            && l.contains("request_id=\"chatcmpl-")
            && l.contains(&format!("trace_id={trace_id}"))),
        "{log}"
    );
    let attempt = one(&spans, "chat up");
    assert!(
        attempt.attr("gen_ai.prompt").contains("flood the log"),
        "{attempt:?}"
    );
    assert_eq!(attempt.attr("gen_ai.completion"), "fine");
}

/// `--trace-endpoint URL` (or `ORCHESTRATOR_TRACE_ENDPOINT`) turns tracing
/// on without a config file: what the compose file uses.
#[tokio::test(flavor = "multi_thread")]
async fn the_trace_endpoint_flag_turns_tracing_on() {
    let receiver = Receiver::start().await;
    let host = Host::start(&["--trace-endpoint", &receiver.endpoint]);
    let (_, trace_id) = traced_answer(&host, &ask("hi")).await;
    let spans = receiver
        .trace(&trace_id, |s| named(s, "chat echo").len() == 1)
        .await;
    assert_eq!(
        one(&spans, "chat echo").attr("gen_ai.provider.name"),
        "orchestrator.echo"
    );
    // Without tracing, no trace id header.
    let plain = Host::start(&[]);
    let response = plain.post(&ask("hi")).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-trace-id").is_none());
}

/// The principal a stage set (an auth stage) is recorded in the request's
/// server span as `enduser.id`.
#[tokio::test(flavor = "multi_thread")]
async fn the_principal_is_the_spans_enduser() {
    let receiver = Receiver::start().await;
    let host = Host::with_config(&format!(
        "[tracing]\nenabled = true\nendpoint = {:?}\n\
         [stages.auth]\nplugin = \"{}\"\n\
         config = {{ mode = \"auth\", token = \"k\", principal = \"alice\" }}\n\
         capabilities = {{ headers = [\"authorization\"] }}\n\
         [pipelines.default]\nstages = [\"auth\", \"inference\"]\n",
        receiver.endpoint,
        test_plugin("gate").display()
    ));
    let response = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .bearer_auth("k")
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace_id = response.headers()["x-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let spans = receiver
        .trace(&trace_id, |s| {
            !named(s, "POST /v1/chat/completions").is_empty()
        })
        .await;
    let server = one(&spans, "POST /v1/chat/completions");
    assert_eq!(server.attr("enduser.id"), "alice");
}
