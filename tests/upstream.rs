//! Real inference: OpenAI-compatible backends, routing, retries, breakers,
//! and token streaming end to end.
//!
//! The `llama_*` tests run against a real llama.cpp `llama-server` (Gemma 3
//! 270M, started by `tests/upstream/llama-server.sh`), whose URL they read
//! from `ORCHESTRATOR_TEST_LLAMA_URL`; without it they are skipped with a
//! message, except in CI, where they fail. The model is a base model: the
//! tests check the schema, the streaming shape, finish reasons and usage,
//! never the text. The other tests use a scripted upstream on loopback
//! (`common::upstream`) for what a real server cannot be made to do on
//! demand: a given token split, a stall, an endless stream.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::upstream::{Script, Upstream};
use crate::common::{Host, client, get_json, metric_value, sse, test_plugin};

/// The URL of the real llama.cpp server, or `None` (skip) outside CI.
fn llama_url() -> Option<String> {
    match std::env::var("ORCHESTRATOR_TEST_LLAMA_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_string()),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "ORCHESTRATOR_TEST_LLAMA_URL must be set in CI (.ci/run starts llama-server)"
            );
            eprintln!(
                "SKIPPED: ORCHESTRATOR_TEST_LLAMA_URL is not set; start a server with \
                 `tests/upstream/llama-server.sh start` and export its URL to run this test"
            );
            None
        }
    }
}

/// A host routing `gemma` to the llama.cpp server. The deadlines are
/// generous: the test binary runs other tests on the same two cores, and a
/// CPU-bound model slows down with them.
fn llama_host(url: &str) -> Host {
    Host::with_config(&format!(
        "request_timeout_ms = 180000\n\
         [backends.llama]\nkind = \"openai\"\nbase_url = \"{url}/v1\"\nmodel = \"gemma-3-270m\"\n\
         request_timeout_ms = 180000\n\
         [routing.models]\ngemma = \"llama\"\n\
         [stages.inference]\ntimeout_ms = 180000\n"
    ))
}

fn gemma(question: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "gemma",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": stream},
    })
}

fn content_of(chunks: &[Value]) -> (String, usize) {
    let pieces = sse::pieces(chunks);
    (pieces.concat(), pieces.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn llama_answers_through_the_whole_pipeline() {
    let Some(url) = llama_url() else { return };
    let host = llama_host(&url);
    let (status, text) = host
        .chat(&gemma("What is backpressure in a queue?", 12, false))
        .await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["object"], "chat.completion");
    // The backend's own `model` setting: the model that served it.
    assert_eq!(body["model"], "gemma-3-270m");
    assert!(body["choices"][0]["message"]["content"].is_string());
    let reason = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{usage}");
    if reason == "length" {
        assert_eq!(completion, 12);
    }
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(
        (1..40).contains(&prompt),
        "the question alone in the model's chat template, no passages: {usage}"
    );
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_tokens_generated_total{worker_type=\"llama\"}"
        ),
        completion as f64,
        "the token counter uses the usage the server reported"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"ok\",worker_type=\"llama\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_time_to_first_token_seconds_count{worker_type=\"llama\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_tokens_generated_total{worker_type=\"echo\"}"
        ),
        0.0
    );
}

/// The client's system prompt and `response_format` reach the real server,
/// which applies its own chat template and constrains its output to JSON
/// (a grammar built from `json_object`): the answer is a JSON object.
#[tokio::test(flavor = "multi_thread")]
async fn llama_follows_the_clients_response_format() {
    let Some(url) = llama_url() else { return };
    let host = llama_host(&url);
    let body = json!({
        "model": "gemma",
        "messages": [
            {"role": "system", "content": "You answer in JSON."},
            {"role": "user", "content": "Name a colour."}
        ],
        "response_format": {"type": "json_object"},
        "max_tokens": 24,
        "temperature": 0,
        "seed": 7,
    });
    let (status, text) = host.chat(&body).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.trim_start().starts_with('{'),
        "constrained to a JSON object: {content:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn llama_streams_tokens_as_they_come() {
    let Some(url) = llama_url() else { return };
    let host = llama_host(&url);
    let (status, text) = host
        .chat(&gemma(
            "Write a long story about a lighthouse keeper.",
            24,
            true,
        ))
        .await;
    assert_eq!(status, 200, "{text}");
    let events = sse::chunks(&text);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    let (_, pieces) = content_of(&events);
    assert!(pieces >= 2, "several chunks, not one replay: {text}");
    let last_choice = events
        .iter()
        .rev()
        .find(|e| !e["choices"].as_array().unwrap().is_empty())
        .unwrap();
    let reason = last_choice["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    let usage = &events.last().unwrap()["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion), "{usage}");
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_tokens_generated_total{worker_type=\"llama\"}"
        ),
        completion as f64
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_time_to_first_token_seconds_count{worker_type=\"llama\"}"
        ),
        1.0
    );
    assert!(
        metric_value(
            &metrics,
            "orchestrator_inter_token_latency_seconds_count{worker_type=\"llama\"}"
        ) >= 1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_request_duration_seconds_count{outcome=\"ok\"}"
        ),
        1.0
    );
}

/// Wait until `series` reaches `value` (polling `/metrics`), or panic.
async fn await_metric(host: &Host, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = host.metric(series).await;
        if now == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {now}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a client went away mid-stream: nothing left in flight or queued.
async fn assert_idle(host: &Host) {
    await_metric(
        host,
        "orchestrator_request_duration_seconds_count{outcome=\"cancelled\"}",
        1.0,
    )
    .await;
    let health = host.health().await;
    assert_eq!(health["in_flight"], 0, "{health}");
    for stage in health["stages"].as_array().unwrap() {
        assert_eq!(stage["queue_depth"], 0, "{stage}");
        assert_eq!(stage["in_flight"], 0, "{stage}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn llama_client_disconnect_cancels_the_generation() {
    let Some(url) = llama_url() else { return };
    let host = llama_host(&url);
    let mut response = host
        .post(&gemma(
            "Count from one to one thousand, in words.",
            1500,
            true,
        ))
        .await;
    assert_eq!(response.status(), 200);
    // Read until some content arrived, then hang up.
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 4 {
        let chunk = response.chunk().await.unwrap().expect("more events");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    await_metric(
        &host,
        "orchestrator_upstream_requests_total{outcome=\"cancelled\",worker_type=\"llama\"}",
        1.0,
    )
    .await;
    assert_idle(&host).await;
    // The server stopped generating: the slot goes idle long before 1500
    // tokens (about 40 s at this machine's speed) could have been made.
    let slots = client().get(format!("{url}/slots")).send().await.unwrap();
    if slots.status().is_success() {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let slots: Value = slots_now(&url).await;
            // Only this test's generation (the only one asking for 1500
            // tokens): the server is shared with the other llama tests,
            // which may be generating at the same time.
            let busy = slots
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["is_processing"] == true && s["params"]["max_tokens"] == 1500);
            if !busy {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "llama-server still generating: {slots}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn slots_now(url: &str) -> Value {
    client()
        .get(format!("{url}/slots"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn upstream_host(base_url: &str, extra: &str) -> Host {
    Host::in_process(&format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{base_url}\"\n{extra}\n[routing.models]\nup = \"up\"\n"
    ))
    .await
}

/// Ask the `Endless` upstream for a stream and read until three of its
/// words arrived: the response (still open) and what was read.
async fn endless_stream_started(host: &Host) -> (reqwest::Response, String) {
    let mut response = host.post(&up("talk forever", true)).await;
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while seen.matches("word").count() < 3 {
        let chunk = response.chunk().await.unwrap().expect("more events");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    (response, seen)
}

fn up(question: &str, stream: bool) -> Value {
    json!({"model": "up", "messages": [{"role": "user", "content": question}], "stream": stream})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_email_address_is_redacted_while_streaming() {
    let upstream = Upstream::start(Script::Deltas(vec![
        "Sure: write to jo",
        "hn.doe@exam",
        "ple.com now",
        ", and use the key sk-abcdefghij",
        "klmnopqrstuvwxyz123456 for it.",
    ]))
    .await;
    let host = upstream_host(&upstream.base_url, "").await;
    let (status, text) = host.chat(&up("how do I reach John?", true)).await;
    assert_eq!(status, 200, "{text}");
    let events = sse::chunks(&text);
    let (content, pieces) = content_of(&events);
    assert!(
        content.contains("write to [redacted email] now"),
        "{content}"
    );
    assert!(content.contains("[redacted key]"), "{content}");
    for leak in ["john", "doe@", "example", "sk-abc", "klmnop"] {
        assert!(!content.contains(leak), "{leak} leaked: {text}");
    }
    assert!(pieces >= 3, "streamed in pieces: {text}");
    // The same words, not streamed, give the same answer.
    let (status, text) = host.chat(&up("how do I reach John?", false)).await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], content);
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_cancels_the_upstream_request() {
    let upstream = Upstream::start(Script::Endless).await;
    let host = upstream_host(&upstream.base_url, "").await;
    let (response, _) = endless_stream_started(&host).await;
    drop(response);
    tokio::time::timeout(Duration::from_secs(10), upstream.cancelled.notified())
        .await
        .expect("the upstream connection was closed");
    await_metric(
        &host,
        "orchestrator_upstream_requests_total{outcome=\"cancelled\",worker_type=\"up\"}",
        1.0,
    )
    .await;
    assert_idle(&host).await;
    // The host serves the next request normally.
    let (status, text) = host.chat(&crate::common::ask("still there?")).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_is_down_gets_503_and_opens_its_breaker() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let host = upstream_host(
        &format!("http://127.0.0.1:{port}/v1"),
        "max_retries = 1\nretry_backoff_ms = 1\nbreaker_failures = 2\nbreaker_cooldown_ms = 60000",
    )
    .await;
    for _ in 0..2 {
        let (status, text) = host.chat(&up("hello?", false)).await;
        assert_eq!(status, 503, "{text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["code"], "upstream_unavailable", "{text}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("backend `up`"),
            "names the backend: {message}"
        );
    }
    let (status, text) = host.chat(&up("hello?", true)).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("circuit breaker is open"), "{text}");
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"connect_error\",worker_type=\"up\"}"
        ),
        4.0,
        "two requests, one retry each"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"circuit_open\",worker_type=\"up\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_circuit_state{worker_type=\"up\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_errors_total{error_type=\"upstream_unavailable\",stage=\"inference\"}"
        ),
        3.0
    );
    // The stage's own breaker blames the backend, not the plugin.
    assert_eq!(
        metric_value(&metrics, "orchestrator_circuit_state{stage=\"inference\"}"),
        0.0
    );
    let health = host.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    let backend = health["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "up")
        .unwrap();
    assert_eq!(backend["circuit"], "open", "{health}");
    assert_eq!(backend["kind"], "openai");
    // Other models are unaffected.
    let (status, _) = host.chat(&crate::common::ask("echo still works")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upstream_gets_504_at_its_timeout() {
    let upstream = Upstream::start(Script::Stall).await;
    let host = upstream_host(&upstream.base_url, "request_timeout_ms = 400").await;
    let started = Instant::now();
    let (status, text) = host.chat(&up("anyone?", false)).await;
    assert_eq!(status, 504, "{text}");
    assert!(text.contains("upstream_timeout"), "{text}");
    assert!(text.contains("backend `up`"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered at the backend's timeout, not the request's (30 s)"
    );
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "timeouts are not retried"
    );
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"timeout\",worker_type=\"up\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_errors_total{error_type=\"upstream_timeout\",stage=\"inference\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_backend_fails_over() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let upstream = Upstream::start(Script::Deltas(vec!["from ", "the spare"])).await;
    let host = Host::with_config(&format!(
        "[backends.main]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmax_retries = 0\nfailover = \"spare\"\n\
         [backends.spare]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [routing]\ndefault = \"main\"\n",
        upstream.base_url
    ));
    let (status, text) = host
        .chat(&json!({"model": "any-model-name", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "from the spare");
    // The answer names the primary's model (here its name: no `model`
    // setting, default route), as docs/chat.md says.
    assert_eq!(body["model"], "main");
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"connect_error\",worker_type=\"main\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_tokens_generated_total{worker_type=\"spare\"}"
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_name_the_served_model_not_the_clients_string() {
    // `[routing] default` takes any model name: the answer names the
    // backend, not the client's string (which used to be echoed into every
    // chunk); a routed model is named as routed, or as its backend's own
    // `model` setting.
    let upstream = Upstream::start(Script::Deltas(vec!["one ", "two ", "three"])).await;
    let host = Host::with_config(&format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{0}\"\n\
         [backends.pinned]\nkind = \"openai\"\nbase_url = \"{0}\"\nmodel = \"snapshot-2026\"\n\
         [routing]\ndefault = \"up\"\n[routing.models]\nalias = \"pinned\"\nup = \"up\"\n",
        upstream.base_url
    ));
    let long_name = "m".repeat(250);
    for (asked, named) in [
        (long_name.as_str(), "up"),
        ("up", "up"),
        ("alias", "snapshot-2026"),
    ] {
        let question = |stream: bool| json!({"model": asked, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
        let (status, text) = host.chat(&question(false)).await;
        assert_eq!(status, 200, "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["model"], named, "{asked}");
        let (status, text) = host.chat(&question(true)).await;
        assert_eq!(status, 200, "{text}");
        let chunks = sse::chunks(&text);
        assert!(chunks.len() >= 3, "{text}");
        assert!(
            chunks.iter().all(|c| c["model"] == named),
            "{asked}: {text}"
        );
        assert!(!text.contains(&long_name));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_lists_models_and_refuses_unknown_ones() {
    let upstream = Upstream::start(Script::Deltas(vec!["x"])).await;
    let host = upstream_host(&upstream.base_url, "").await;
    let models = get_json(&format!("{}/v1/models", host.api)).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["echo", "up"]);
    let (status, text) = host
        .chat(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("model_not_found"), "{text}");
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_built_against_wit_0_1_0_still_loads_and_streams_buffered() {
    // `noop` is built against the frozen 0.1.0 WIT (tests/plugins/wit-0.1.0):
    // a plain `stage` component. As the post stage it ends the streaming
    // part: the text is collected, then it and `stream` run as usual.
    let noop = test_plugin("noop");
    let host = Host::with_config(&format!("[stages.post]\nplugin = \"{}\"\n", noop.display()));
    let health = host.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    let (status, text) = host
        .chat(&json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": "one two three four five six"}]}))
        .await;
    assert_eq!(status, 200, "{text}");
    let (content, _) = content_of(&sse::chunks(&text));
    assert_eq!(content, "one two three four five six");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_breaks_mid_stream_ends_the_stream_with_an_error_event() {
    let upstream = Upstream::start(Script::Broken(vec![
        "The answer to the question you asked ",
        "is one that everyone knows: it is ",
        "forty",
    ]))
    .await;
    let host = upstream_host(&upstream.base_url, "").await;
    let (status, text) = host.chat(&up("the answer?", true)).await;
    assert_eq!(status, 200, "the stream had started: {text}");
    let events = sse::chunks(&text);
    let error = &events.last().unwrap()["error"];
    assert_eq!(error["code"], "upstream", "{text}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("backend `up`") && message.contains("ended before"),
        "{message}"
    );
    let (content, _) = content_of(&events);
    assert!(
        content.starts_with("The answer"),
        "what came before was sent: {text}"
    );
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"protocol_error\",worker_type=\"up\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_errors_total{error_type=\"upstream\",stage=\"inference\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_request_duration_seconds_count{outcome=\"error\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_with_retry_after_is_retried_after_the_pause_it_asks_for() {
    let upstream = Upstream::start(Script::FailThen {
        status: 429,
        retry_after: Some(1),
        times: 1,
        then: vec!["patience ", "pays"],
    })
    .await;
    let host = upstream_host(&upstream.base_url, "max_retries = 1\nretry_backoff_ms = 1").await;
    let started = Instant::now();
    let (status, text) = host.chat(&up("again?", false)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the second the upstream asked for"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "patience pays");
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let metrics = host.metrics_text().await;
    for (outcome, n) in [("rate_limited", 1.0), ("ok", 1.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!(
                    "orchestrator_upstream_requests_total{{outcome=\"{outcome}\",worker_type=\"up\"}}"
                )
            ),
            n,
            "{outcome}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_upstream_refuses_is_not_retried_failed_over_or_held_against_it() {
    let upstream = Upstream::start(Script::FailThen {
        status: 400,
        retry_after: None,
        times: usize::MAX,
        then: Vec::new(),
    })
    .await;
    let spare = Upstream::start(Script::Deltas(vec!["spare"])).await;
    let host = Host::with_config(&format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\nbreaker_failures = 2\nfailover = \"spare\"\n\
         [backends.spare]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [routing.models]\nup = \"up\"\n",
        upstream.base_url, spare.base_url
    ));
    for _ in 0..3 {
        let (status, text) = host.chat(&up("too long a prompt", false)).await;
        // The client's request is at fault: 400, with the upstream's reason.
        assert_eq!(status, 400, "{text}");
        assert!(
            text.contains("HTTP 400") && text.contains("scripted 400"),
            "{text}"
        );
    }
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "no retries"
    );
    assert_eq!(
        spare.requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no failover"
    );
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_circuit_state{worker_type=\"up\"}"
        ),
        0.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_upstream_requests_total{outcome=\"client_error\",worker_type=\"up\"}"
        ),
        3.0
    );
}

/// Shutdown has one deadline (`shutdown_grace_ms`): a stream still open
/// near it ends with an `error` event and `[DONE]` rather than just
/// stopping, and a client that never finishes a request on the metrics
/// port does not keep the process alive.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_ends_open_streams_with_an_error_event_and_exits() {
    use tokio::io::AsyncWriteExt;

    let upstream = Upstream::start(Script::Endless).await;
    let mut host = Host::with_config(&format!(
        "shutdown_grace_ms = 2000\n[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n[routing.models]\nup = \"up\"\n",
        upstream.base_url
    ));
    let (mut response, mut seen) = endless_stream_started(&host).await;
    // Half a request on the metrics port, never finished.
    let metrics_addr = host.metrics.trim_start_matches("http://").to_string();
    let mut partial = tokio::net::TcpStream::connect(&metrics_addr).await.unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    host.send_sigterm();
    // The stream goes on during the drain, then ends with an error event
    // and [DONE].
    while let Some(chunk) = response.chunk().await.expect("the stream ends cleanly") {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("\"code\":\"shutting_down\""), "{seen}");
    assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
    // And the process exits, despite the half request (its drain deadline
    // is 2 s; a minute is only a bound for a test that would otherwise hang).
    let exited = tokio::task::spawn_blocking(move || {
        let exited = host.wait_for_exit(Duration::from_secs(60));
        (exited, host)
    })
    .await
    .unwrap();
    assert_eq!(exited.0, Some(true), "{}", exited.1.stderr());
    drop(partial);
}

/// `orchestrator_overhead_seconds` is the request's duration minus its wait
/// for the backend: the upstream paces its five deltas 10 ms apart (at
/// least 50 ms per answer, by its own sleeps), and that time is in the
/// end-to-end histogram but not in the overhead. The plain answer's 50 ms
/// are all a wait (it comes in one piece after them); a stream's wait is
/// shorter by the time the host spends on each delta while the next one is
/// on its way, which on a busy machine may be most of it.
#[tokio::test(flavor = "multi_thread")]
async fn the_overhead_histogram_leaves_out_the_wait_for_the_backend() {
    let upstream = Upstream::start(Script::Deltas(vec!["a ", "b ", "c ", "d ", "e"])).await;
    let host = upstream_host(&upstream.base_url, "").await;
    for stream in [false, true] {
        let response = host.post(&up("hi", stream)).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains('e'), "{text}");
    }
    let series = |name: &str| format!("{name}{{outcome=\"ok\"}}");
    let requests = host
        .metric(&series("orchestrator_overhead_seconds_count"))
        .await;
    assert_eq!(requests, 2.0);
    let total = host
        .metric(&series("orchestrator_request_duration_seconds_sum"))
        .await;
    let overhead = host
        .metric(&series("orchestrator_overhead_seconds_sum"))
        .await;
    assert!(overhead > 0.0, "{overhead}");
    assert!(
        total - overhead >= 0.05,
        "backend wait {} s of {total} s",
        total - overhead
    );
}

/// A plain request (one answer, no stream) holds the inference stage's
/// worker only until its generation's first token: the host collects the
/// rest off the worker. With one inference worker, four plain requests
/// still reach the backend at once; the scripted upstream finishes none of
/// them until all four are in flight, so holding the worker for a whole
/// generation would leave them waiting until their deadline (504).
#[tokio::test(flavor = "multi_thread")]
async fn plain_requests_do_not_hold_the_inference_worker_for_the_whole_generation() {
    let upstream = Upstream::start(Script::Gate {
        open_at: 4,
        first: "all",
        then: " together",
    })
    .await;
    let host = upstream_host(
        &upstream.base_url,
        "[stages.inference]\nworkers = 1\n[stages.stream]\nworkers = 1\n",
    )
    .await;
    let asks = (0..4).map(|n| {
        let host = &host;
        async move { host.chat(&up(&format!("question {n}"), false)).await }
    });
    for (status, body) in futures_util::future::join_all(asks).await {
        assert_eq!(status, 200, "{body}");
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            answer["choices"][0]["message"]["content"], "all together",
            "{body}"
        );
    }
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        4
    );
}

/// A client that hangs up while its one-piece (not streamed) answer is
/// being generated cancels the generation too: the upstream connection is
/// closed and the request's admission slots are freed.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_on_a_plain_request_cancels_the_generation() {
    let upstream = Upstream::start(Script::Endless).await;
    let host = upstream_host(&upstream.base_url, "").await;
    let url = format!("{}/v1/chat/completions", host.api);
    let body = up("talk forever", false);
    // The answer never comes (the upstream never finishes): give up once
    // the upstream has the request.
    let waiting = tokio::spawn(async move { client().post(url).json(&body).send().await });
    while upstream.requests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    waiting.abort();
    tokio::time::timeout(Duration::from_secs(10), upstream.cancelled.notified())
        .await
        .expect("the upstream connection was closed");
    assert_idle(&host).await;
    // The attempt, sent and never answered, counts once, as cancelled.
    await_metric(
        &host,
        "orchestrator_upstream_requests_total{outcome=\"cancelled\",worker_type=\"up\"}",
        1.0,
    )
    .await;
}

/// An upstream that ignores `max_tokens` (it generates forever) is cut
/// once the answer holds more than the tokens allow (64 bytes each): a
/// streamed answer ends as `length`; a plain one, whose body cannot be cut
/// into valid JSON, fails with 502 once the body passes its bound. Either
/// way the upstream request is cancelled and nothing is buffered without
/// limit.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_ignores_max_tokens_is_cut() {
    let upstream = Upstream::start(Script::Endless).await;
    let host = upstream_host(&upstream.base_url, "").await;
    let mut body = up("talk forever", false);
    body["max_tokens"] = json!(4);
    let (status, text) = host.chat(&body).await;
    assert_eq!(status, 502, "{text}");
    assert!(
        text.contains("longer than the request's max_tokens allow"),
        "{text}"
    );
    tokio::time::timeout(Duration::from_secs(30), upstream.cancelled.notified())
        .await
        .expect("the plain upstream request was cancelled");

    body["stream"] = json!(true);
    let (status, text) = host.chat(&body).await;
    assert_eq!(status, 200, "{text}");
    let chunks = crate::common::sse::chunks(&text);
    let content = crate::common::sse::content(&chunks);
    assert!(content.len() <= 4 * 64 + 5, "{} bytes kept", content.len());
    assert_eq!(
        crate::common::sse::finish_reason(&chunks).as_deref(),
        Some("length"),
        "{text}"
    );
    tokio::time::timeout(Duration::from_secs(30), upstream.cancelled.notified())
        .await
        .expect("the streamed upstream request was cancelled");
}

/// The upstream is asked for what the client needs: a plain client's
/// answer comes from a plain upstream request (one `chat.completion`, no
/// inter-token latency to observe), a streaming client's from a streamed
/// one; `always_stream` streams for every client.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_is_asked_for_a_stream_only_when_the_client_streams() {
    let upstream = Upstream::start(Script::Deltas(vec!["one ", "two ", "three"])).await;
    let asked = |n: usize| upstream.bodies.lock().unwrap()[n].clone();
    let itl = "orchestrator_inter_token_latency_seconds_count{worker_type=\"up\"}";
    let ttft = "orchestrator_time_to_first_token_seconds_count{worker_type=\"up\"}";
    let tokens = "orchestrator_tokens_generated_total{worker_type=\"up\"}";

    let host = upstream_host(&upstream.base_url, "").await;
    let (status, text) = host.chat(&up("count", false)).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "one two three");
    assert_eq!(answer["usage"]["completion_tokens"], 3, "{answer}");
    assert!(asked(0).get("stream").is_none(), "{}", asked(0));
    assert!(asked(0).get("stream_options").is_none(), "{}", asked(0));
    assert_eq!(host.metric(ttft).await, 1.0);
    assert_eq!(host.metric(itl).await, 0.0, "a plain answer has no gaps");
    assert_eq!(host.metric(tokens).await, 3.0);

    let (status, text) = host.chat(&up("count", true)).await;
    assert_eq!(status, 200, "{text}");
    let chunks = crate::common::sse::chunks(&text);
    assert_eq!(crate::common::sse::content(&chunks), "one two three");
    assert_eq!(asked(1)["stream"], true);
    assert_eq!(asked(1)["stream_options"]["include_usage"], true);
    assert_eq!(host.metric(ttft).await, 2.0);
    assert_eq!(host.metric(itl).await, 2.0, "three deltas, two gaps");

    let always = upstream_host(&upstream.base_url, "always_stream = true").await;
    let (status, text) = always.chat(&up("count", false)).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "one two three");
    assert_eq!(asked(2)["stream"], true);
    assert_eq!(always.metric(itl).await, 2.0);
}
