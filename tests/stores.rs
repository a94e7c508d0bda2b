//! Stateful stages: key-value stores (memory and a real `redis-server`),
//! grants, the caller's headers and address, the principal, refusals with
//! their HTTP meaning and headers, and answering early.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::redis::Redis;
use crate::common::upstream::{Script, Upstream};
use crate::common::{Host, client, metric_value, sse, test_plugin};

/// `[stages.<name>]` running the test guest `plugin` with `extra` keys.
fn stage(name: &str, plugin: &str, extra: &str) -> String {
    format!(
        "[stages.{name}]\nplugin = \"{}\"\n{extra}\n",
        test_plugin(plugin).display()
    )
}

/// The default pipeline made of `stages`.
fn pipeline(stages: &[&str]) -> String {
    let stages: Vec<String> = stages.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[pipelines.default]\nstages = [{}]\n", stages.join(", "))
}

fn chat(question: &str) -> Value {
    json!({"model": "echo", "messages": [{"role": "user", "content": question}]})
}

async fn post(host: &Host, body: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn notes(host: &Host, body: &Value, headers: &[(&str, &str)]) -> Value {
    let response = post(host, body, headers).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["orchestrator"]["metadata"].clone()
}

/// A plugin that uses only the standard `wasi:keyvalue` imports (as a
/// Spin component does) counts in a memory store it is granted; a store it
/// is not granted is `access-denied`. A 0.2.0 component loads unchanged
/// next to them.
#[tokio::test(flavor = "multi_thread")]
async fn a_standard_keyvalue_plugin_counts_in_a_granted_store() {
    let host = Host::with_config(&format!(
        "{}{}{}{}",
        stage(
            "kv",
            "kv-counter",
            "capabilities = { stores = [\"counters\"] }"
        ),
        stage(
            "sneak",
            "kv-counter",
            "config = { store = \"secret\", key = \"x\" }"
        ),
        stage("old", "v020-handle", ""),
        pipeline(&["old", "kv", "sneak", "inference"]),
    ));
    for n in 1..=3 {
        let notes = notes(&host, &chat("hi"), &[]).await;
        assert_eq!(notes["kv.count"], n.to_string(), "{notes}");
        assert_eq!(notes["kv.error"], "access-denied", "{notes}");
        assert_eq!(notes["v020.messages"], "1", "{notes}");
    }
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_store_operations_total{op=\"increment\",outcome=\"ok\",store=\"counters\"}"
        ),
        3.0
    );
    let health = host.health().await;
    assert_eq!(health["stores"]["counters"]["kind"], "memory", "{health}");
    assert_eq!(health["stores"]["counters"]["state"], "up", "{health}");
}

/// A stage sees exactly the headers, address and stores it is granted:
/// `authorization` only when named.
#[tokio::test(flavor = "multi_thread")]
async fn a_stage_sees_only_what_it_is_granted() {
    let config = format!(
        "{}{}{}",
        stage(
            "narrow",
            "gate",
            "config = { mode = \"probe\", store = \"limits\" }\ncapabilities = { headers = [\"x-team\"] }"
        ),
        stage(
            "wide",
            "gate",
            "config = { mode = \"probe\", store = \"limits\" }\ncapabilities = { headers = [\"Authorization\", \"x-team\"], client_address = true, stores = [\"limits\"] }"
        ),
        pipeline(&["narrow", "inference"]),
    );
    let host = Host::with_config(
        &(config
            + "[pipelines.wide]\nstages = [\"wide\", \"inference\"]\n\
           [routing]\nmodels = { wide = { backend = \"echo\", pipeline = \"wide\" } }\n"),
    );
    let sent = [("authorization", "Bearer k1"), ("x-team", "blue")];
    let narrow = notes(&host, &chat("hi"), &sent).await;
    assert_eq!(narrow["probe.team"], "blue", "{narrow}");
    assert_eq!(narrow["probe.authorization"], "-", "{narrow}");
    assert_eq!(narrow["probe.address"], "-", "{narrow}");
    assert_eq!(narrow["probe.store"], "access-denied", "{narrow}");
    let mut body = chat("hi");
    body["model"] = json!("wide");
    let wide = notes(&host, &body, &sent).await;
    assert_eq!(wide["probe.authorization"], "Bearer k1", "{wide}");
    assert!(
        wide["probe.address"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{wide}"
    );
    assert_eq!(wide["probe.store"], "ok", "{wide}");
}

/// An auth stage refuses with 401 and names the principal; a limiter
/// refuses with 429 and `Retry-After`; both in OpenAI's error shape, with
/// the stages' headers, plain and streamed; the refusals are counted under
/// their own outcome and the backend never sees them.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_carry_their_status_body_and_headers() {
    let upstream = Upstream::start(Script::Deltas(vec!["fine"])).await;
    let host = Host::with_config(&format!(
        "{}{}{}[backends.up]\nkind = \"openai\"\nbase_url = {:?}\n[routing]\nmodels = {{ up = \"up\" }}\n",
        stage(
            "auth",
            "gate",
            "config = { mode = \"auth\", token = \"s3cret\", principal = \"alice\" }\ncapabilities = { headers = [\"authorization\"] }"
        ),
        stage(
            "limit",
            "gate",
            "config = { mode = \"limit\", limit = \"2\", window_ms = \"600000\" }\ncapabilities = { stores = [\"limits\"] }"
        ),
        pipeline(&["auth", "limit", "inference", "stream"]),
        upstream.base_url,
    ));
    let mut body = chat("hi");
    body["model"] = json!("up");
    let key = [("authorization", "Bearer s3cret")];

    let response = post(&host, &body, &[("authorization", "Bearer wrong")]).await;
    assert_eq!(response.status(), 401);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
    assert_eq!(error["error"]["message"], "missing or wrong API key");

    for remaining in ["1", "0"] {
        let response = post(&host, &body, &key).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["x-ratelimit-remaining-requests"],
            remaining
        );
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    for request in [&body, &streamed] {
        let response = post(&host, request, &key).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
        let retry: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=600).contains(&retry), "{retry}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "rate_limit_exceeded", "{error}");
        assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 2);
    let metrics = host.metrics_text().await;
    let refused = "orchestrator_request_duration_seconds_count{outcome=\"refused\"}";
    assert_eq!(metric_value(&metrics, refused), 3.0);
}

/// A stage after the generation refuses: a plain answer becomes the
/// refusal (403 with the stage's code); a stream that has started ends with
/// it as an error event.
#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_after_the_generation() {
    let host = Host::with_config(&format!(
        "{}{}",
        stage("late", "gate", "config = { mode = \"forbid\" }"),
        pipeline(&["inference", "stream", "late"]),
    ));
    let response = post(&host, &chat("hi"), &[]).await;
    assert_eq!(response.status(), 403);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_allowed", "{error}");
    let mut streamed = chat("hi");
    streamed["stream"] = json!(true);
    let response = post(&host, &streamed, &[]).await;
    assert_eq!(response.status(), 200);
    let chunks = sse::chunks(&response.text().await.unwrap());
    let error = sse::error(&chunks).expect("an error event");
    assert_eq!(error["code"], "model_not_allowed", "{error}");
}

/// A cache stage answers a repeated question early: the backend is not
/// called, the stages after the generating one still run, a streaming
/// client gets the answer in chunks through the streaming stage, and no
/// tokens count as generated.
#[tokio::test(flavor = "multi_thread")]
async fn answering_early_skips_the_generation_plain_and_streamed() {
    let words = [
        "The", " answer", " is", " 42,", " as", " the", " book", " says;", " it", " took", " a",
        " long", " time", " to", " compute", " and", " nobody", " liked", " it.",
    ];
    let expected: String = words.concat();
    let upstream = Upstream::start(Script::Deltas(words.to_vec())).await;
    let host = Host::with_config(&format!(
        "{}{}{}[backends.up]\nkind = \"openai\"\nbase_url = {:?}\n[routing]\nmodels = {{ up = \"up\" }}\n",
        stage(
            "cache",
            "gate",
            "config = { mode = \"cache\" }\ncapabilities = { stores = [\"cache\"] }"
        ),
        stage(
            "remember",
            "gate",
            "config = { mode = \"remember\" }\ncapabilities = { stores = [\"cache\"] }"
        ),
        pipeline(&["cache", "inference", "remember", "stream"]),
        upstream.base_url,
    ));
    let mut body = chat("what is the answer?");
    body["model"] = json!("up");
    let first = post(&host, &body, &[]).await;
    assert_eq!(first.headers()["x-cache"], "miss");
    let first: Value = first.json().await.unwrap();
    let answer = first["choices"][0]["message"]["content"].clone();
    assert_eq!(answer, expected.as_str());
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
    let generated = |text: &str| {
        metric_value(
            text,
            "orchestrator_tokens_generated_total{worker_type=\"up\"}",
        )
    };
    let before = generated(&host.metrics_text().await);

    let hit = post(&host, &body, &[]).await;
    assert_eq!(hit.status(), 200);
    assert_eq!(hit.headers()["x-cache"], "hit");
    let hit: Value = hit.json().await.unwrap();
    assert_eq!(hit["choices"][0]["message"]["content"], answer, "{hit}");
    assert_eq!(hit["choices"][0]["finish_reason"], "stop");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = post(&host, &streamed, &[]).await;
    assert_eq!(response.headers()["x-cache"], "hit");
    let chunks = sse::chunks(&response.text().await.unwrap());
    assert_eq!(sse::content(&chunks), expected);
    assert!(
        sse::pieces(&chunks).len() > 1,
        "streamed in pieces: {chunks:?}"
    );
    assert_eq!(sse::finish_reason(&chunks).as_deref(), Some("stop"));

    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        1,
        "no backend call"
    );
    let metrics = host.metrics_text().await;
    assert_eq!(generated(&metrics), before, "nothing generated");
    let answered = "orchestrator_request_duration_seconds_count{outcome=\"answered\"}";
    assert_eq!(metric_value(&metrics, answered), 2.0);
}

/// A memory store holds at most `max_keys`: writing more evicts (and
/// counts) the excess.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_store_stays_within_its_bounds() {
    let host = Host::with_config(&format!(
        "[stores.cache]\nmax_keys = 50\n{}{}",
        stage(
            "remember",
            "gate",
            "config = { mode = \"remember\" }\ncapabilities = { stores = [\"cache\"] }"
        ),
        pipeline(&["inference", "remember"]),
    ));
    for n in 0..300 {
        let notes = notes(&host, &chat(&format!("question {n}")), &[]).await;
        assert!(notes["gate.store_error"].is_null(), "{notes}");
    }
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "orchestrator_store_keys{store=\"cache\"}"),
        50.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_store_evictions_total{store=\"cache\"}"
        ),
        250.0
    );
}

/// A memory store bounded to 1 MiB, written 16 MiB of answers: the host's
/// resident memory stays flat while the store evicts (what an unbounded
/// store would hold shows as growth of well over 10 MiB).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_memory_store_keeps_the_process_flat() {
    let host = Host::with_config(&format!(
        "[stores.cache]\nmax_bytes = 1048576\n{}{}",
        stage(
            "remember",
            "gate",
            "config = { mode = \"remember\" }\ncapabilities = { stores = [\"cache\"] }"
        ),
        pipeline(&["inference", "remember"]),
    ));
    let word = "x".repeat(64);
    let answer = |n: usize| {
        let text = format!("{n} {}", vec![word.as_str(); 500].join(" "));
        json!({"model": "echo", "max_tokens": 512, "messages": [{"role": "user", "content": text}]})
    };
    let rss = async || {
        metric_value(&host.metrics_text().await, "process_resident_memory_bytes") / (1 << 20) as f64
    };
    for n in 0..100 {
        notes(&host, &answer(n), &[]).await;
    }
    let warm = rss().await;
    for n in 100..600 {
        let notes = notes(&host, &answer(n), &[]).await;
        assert!(notes["gate.store_error"].is_null(), "{notes}");
    }
    let after = rss().await;
    let metrics = host.metrics_text().await;
    assert!(
        metric_value(
            &metrics,
            "orchestrator_store_evictions_total{store=\"cache\"}"
        ) > 500.0,
        "the store evicted"
    );
    assert!(
        after - warm < 8.0,
        "RSS grew from {warm:.1} MiB to {after:.1} MiB while 16 MiB went into a 1 MiB store"
    );
}

/// A reload keeps a store whose settings did not change (a memory store
/// keeps its keys) and starts anew one whose settings changed.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_an_unchanged_store() {
    let counter = stage(
        "kv",
        "kv-counter",
        "capabilities = { stores = [\"counters\"] }",
    );
    let (_dir, path) = crate::common::config_file(&format!(
        "[stores.counters]\nmax_keys = 1000\n{counter}{}",
        pipeline(&["kv", "inference"])
    ));
    let host = Host::start(&["--config", path.to_str().unwrap()]);
    let count = async || notes(&host, &chat("hi"), &[]).await["kv.count"].clone();
    assert_eq!(count().await, "1");
    assert_eq!(count().await, "2");
    // Another pipeline, the same store: the count goes on.
    std::fs::write(
        &path,
        format!(
            "[stores.counters]\nmax_keys = 1000\n{counter}{}",
            pipeline(&["kv", "inference", "stream"])
        ),
    )
    .unwrap();
    host.send_sighup();
    host.wait_for_log("configuration reloaded", 1).await;
    assert_eq!(count().await, "3");
    // The store's settings change: a new store.
    std::fs::write(
        &path,
        format!(
            "[stores.counters]\nmax_keys = 2000\n{counter}{}",
            pipeline(&["kv", "inference", "stream"])
        ),
    )
    .unwrap();
    host.send_sighup();
    host.wait_for_log("configuration reloaded", 2).await;
    assert_eq!(count().await, "1");
}

/// A config with the `kv` counter on a Redis store at `url`.
fn redis_counter(url: &str) -> String {
    format!(
        "[stores.counters]\nkind = \"redis\"\nurl = {url:?}\ntimeout_ms = 200\n{}{}",
        stage(
            "kv",
            "kv-counter",
            "capabilities = { stores = [\"counters\"] }"
        ),
        pipeline(&["kv", "inference"]),
    )
}

/// Two hosts sharing one Redis, 8 clients each, 1,600 increments through
/// a stage: exactly 1,600.
#[tokio::test(flavor = "multi_thread")]
async fn two_hosts_sharing_redis_count_exactly() {
    let Some(redis) = Redis::start() else { return };
    let config = redis_counter(&redis.url());
    let hosts = [Host::with_config(&config), Host::with_config(&config)];
    let mut clients = Vec::new();
    for host in &hosts {
        for _ in 0..8 {
            let api = host.api.clone();
            clients.push(tokio::spawn(async move {
                let client = client();
                for _ in 0..100 {
                    let response = client
                        .post(format!("{api}/v1/chat/completions"))
                        .json(&chat("count"))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 200);
                    let body: Value = response.json().await.unwrap();
                    let notes = &body["orchestrator"]["metadata"];
                    assert!(notes["kv.error"].is_null(), "{notes}");
                }
            }));
        }
    }
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(
        redis
            .command(&["GET", "orchestrator:counters:hits"])
            .as_deref(),
        Some("1600")
    );
}

/// A windowed counter on Redis refuses past its limit and starts again
/// when its window ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_redis_window_resets_on_time() {
    let Some(redis) = Redis::start() else { return };
    let host = Host::with_config(&format!(
        "[stores.limits]\nkind = \"redis\"\nurl = {:?}\n{}{}",
        redis.url(),
        stage(
            "limit",
            "gate",
            "config = { mode = \"limit\", limit = \"2\", window_ms = \"400\" }\ncapabilities = { stores = [\"limits\"] }"
        ),
        pipeline(&["limit", "inference"]),
    ));
    // A window that ended between two requests would make the count below
    // start over; try again until three requests fall in one window.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "never three requests in one window"
        );
        redis.command(&["DEL", "orchestrator:limits:anon"]);
        let statuses = [
            post(&host, &chat("a"), &[]).await.status(),
            post(&host, &chat("b"), &[]).await.status(),
            post(&host, &chat("c"), &[]).await.status(),
        ];
        let ttl: i64 = redis
            .command(&["PTTL", "orchestrator:limits:anon"])
            .unwrap()
            .parse()
            .unwrap();
        if statuses == [200, 200, 429] && ttl > 0 {
            assert!(ttl <= 400, "the window was not extended: {ttl}");
            break;
        }
    }
    // The key expires with its window (Redis says when); then requests
    // pass again.
    while redis
        .command(&["EXISTS", "orchestrator:limits:anon"])
        .as_deref()
        == Some("1")
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&host, &chat("d"), &[]).await.status(), 200);
}

/// Redis stopped mid-run: each store call fails within `timeout_ms` and the
/// requests are answered as the plugin decides (it lets them through);
/// `/health` says the store is down. Redis back: the same host counts
/// again, without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_goes_down_fails_fast_and_comes_back() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let host = Host::with_config(&redis_counter(&redis.url()));
    assert_eq!(notes(&host, &chat("hi"), &[]).await["kv.count"], "1");
    redis.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let notes = notes(&host, &chat("hi"), &[]).await;
        let error = notes["kv.error"].as_str().unwrap_or_default();
        assert!(error.starts_with("other: store `counters`"), "{notes}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "it did not hang"
        );
    }
    let health = host.health().await;
    assert_eq!(health["stores"]["counters"]["state"], "down", "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    let metrics = host.metrics_text().await;
    let failed = metric_value(
        &metrics,
        "orchestrator_store_operations_total{op=\"increment\",outcome=\"error\",store=\"counters\"}",
    ) + metric_value(
        &metrics,
        "orchestrator_store_operations_total{op=\"increment\",outcome=\"timeout\",store=\"counters\"}",
    );
    assert_eq!(failed, 3.0);

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let notes = notes(&host, &chat("hi"), &[]).await;
        if notes["kv.count"] == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "never reconnected: {notes}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(host.health().await["stores"]["counters"]["state"], "up");
}
