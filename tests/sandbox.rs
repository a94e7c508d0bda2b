//! The rogues' gallery (`tests/plugins/rogue`): each misbehaving plugin
//! hurts only its own request. For each: the expected error naming the
//! stage and cause, the right metric moved, the host serves a normal
//! request right afterwards, and no instance is left behind.

use serde_json::Value;

use crate::common::{Host, ask, bundled_wasm, metric_value, test_plugin};

/// A host whose `post` stage is the rogue in `mode`: one worker, a 400 ms
/// call deadline, and the `key = value` lines of `stage_extra` on top.
fn rogue_host(mode: &str, stage_extra: &str) -> Host {
    guest_host("rogue", mode, stage_extra)
}

/// A host whose `post` stage is the test guest `guest` in `mode`, set up as
/// for [`rogue_host`].
fn guest_host(guest: &str, mode: &str, stage_extra: &str) -> Host {
    let mut keys = vec![
        (
            "plugin".to_string(),
            format!("{:?}", test_plugin(guest).display().to_string()),
        ),
        ("workers".to_string(), "1".to_string()),
        ("timeout_ms".to_string(), "400".to_string()),
    ];
    for line in stage_extra.lines() {
        let (key, value) = line.split_once(" = ").expect("key = value");
        keys.retain(|(k, _)| k != key);
        keys.push((key.to_string(), value.to_string()));
    }
    let mut text = String::from("[stages.post]\n");
    for (key, value) in keys {
        text.push_str(&format!("{key} = {value}\n"));
    }
    text.push_str(&format!("[stages.post.config]\nmode = {mode:?}\n"));
    Host::with_config(&text)
}

/// Send the triggering request and check the failure, then a normal one.
async fn misdeed(host: &Host, status: u16, error_type: &str) -> Value {
    let series = format!("orchestrator_errors_total{{error_type=\"{error_type}\",stage=\"post\"}}");
    let before = host.metric(&series).await;
    let (got, text) = host.chat(&ask("hello rogue")).await;
    assert_eq!(got, status, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("stage `post` failed"), "{message}");
    assert_eq!(body["error"]["code"], error_type, "{body}");
    assert_eq!(host.metric(&series).await, before + 1.0);

    let (got, text) = host.chat(&ask("a normal question")).await;
    assert_eq!(got, 200, "the host must serve normally right after: {text}");
    // One worker, reuse mode: exactly its one live instance remains.
    assert_eq!(
        host.metric("orchestrator_plugin_instances{stage=\"post\"}")
            .await,
        1.0
    );
    body
}

async fn rss(host: &Host) -> f64 {
    host.metric("process_resident_memory_bytes").await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_loop_times_out() {
    let host = rogue_host("loop", "");
    let body = misdeed(&host, 500, "timeout").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline of 400 ms"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleep_inside_a_host_call_times_out() {
    let host = rogue_host("sleep", "");
    misdeed(&host, 500, "timeout").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_hits_the_cap_and_the_memory_is_returned() {
    let host = rogue_host("membomb", "max_memory_bytes = 33554432");
    let (status, _) = host.chat(&ask("warm up")).await;
    assert_eq!(status, 200);
    let baseline = rss(&host).await;
    misdeed(&host, 500, "memory").await;
    let after = rss(&host).await;
    assert!(
        after < baseline + 16.0 * 1048576.0,
        "RSS grew from {baseline} to {after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trap_is_reported_as_a_trap() {
    let host = rogue_host("trap", "");
    let body = misdeed(&host, 500, "trap").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rust_panic_is_reported_as_a_trap() {
    let host = rogue_host("panic", "");
    misdeed(&host, 500, "trap").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_output_is_refused_not_passed_on() {
    // 100 MiB fits in this stage's 256 MiB memory, so the guest builds it;
    // the host refuses it by its 1 MiB output cap.
    let host = rogue_host(
        "big-output",
        "max_memory_bytes = 268435456\nmax_output_bytes = 1048576\ntimeout_ms = 20000",
    );
    let (status, _) = host.chat(&ask("warm up")).await;
    assert_eq!(status, 200);
    let baseline = rss(&host).await;
    let body = misdeed(&host, 500, "output_too_large").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_output_bytes is 1048576"),
        "{body}"
    );
    let after = rss(&host).await;
    assert!(
        after < baseline + 64.0 * 1048576.0,
        "RSS grew from {baseline} to {after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_note_flood_through_a_request_handle_stops_at_the_output_cap() {
    // A `request-stage` guest sets 64 KiB notes under new keys, forever:
    // only what it sets crosses into the host, and the setter that would
    // pass the 1 MiB cap ends the call.
    let host = guest_host(
        "touch",
        "flood",
        "max_output_bytes = 1048576\ntimeout_ms = 20000",
    );
    let baseline = rss(&host).await;
    let body = misdeed(&host, 500, "output_too_large").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_output_bytes is 1048576"), "{message}");
    let after = rss(&host).await;
    assert!(
        after < baseline + 64.0 * 1048576.0,
        "RSS grew from {baseline} to {after}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_whose_memory_grew_is_dropped_not_kept_idle() {
    // Linear memory never shrinks: an instance that touched 16 MiB for one
    // request would hold it while idle. The host keeps an instance only
    // while its memory is under max(2 × its size after `init`, 4 MiB).
    let host = rogue_host("grow", "");
    let instances = "orchestrator_plugin_instances{stage=\"post\"}";
    let (status, text) = host.chat(&ask("a normal question")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        host.metric(instances).await,
        1.0,
        "a small instance is kept"
    );
    let (status, text) = host.chat(&ask("hello rogue")).await;
    assert_eq!(status, 200, "growing is no error: {text}");
    assert_eq!(
        host.metric(instances).await,
        0.0,
        "the grown one is dropped"
    );
    let (status, text) = host.chat(&ask("a normal question")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(host.metric(instances).await, 1.0, "a fresh one serves next");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_cap_stops_a_huge_output_earlier() {
    let host = rogue_host("big-output", "");
    misdeed(&host, 500, "memory").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_outside_the_grants_are_invisible() {
    let host = rogue_host("escape", "");
    let body = misdeed(&host, 500, "plugin_error").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("escape failed"), "{message}");
    assert!(!message.contains("root:"), "{message}");
}

#[test]
fn only_granted_environment_variables_are_visible() {
    let host = Host::try_with_config_env(
        &format!(
            "[stages.post]\nplugin = {:?}\ncapabilities = {{ env = [\"ORCH_TEST_GRANTED\", \"ORCH_TEST_UNSET\"] }}\nconfig = {{ mode = \"env\" }}\n",
            test_plugin("rogue").display().to_string()
        ),
        &[("ORCH_TEST_GRANTED", "yes"), ("ORCH_TEST_SECRET", "no")],
    )
    .unwrap_or_else(|stderr| panic!("{stderr}"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, text) = runtime.block_on(host.chat(&ask("rogue, show me the environment")));
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["orchestrator"]["metadata"]["rogue.env"],
        "ORCH_TEST_GRANTED"
    );
}

/// Calls run on the runtime that serves HTTP, so guest code must yield to
/// it while it computes: eight endless loops in calls at once (more than
/// the runtime has threads on any machine this runs on) do not hold up a
/// normal request, and clients that hang up take their calls, and the
/// calls' instances, down with them.
#[tokio::test(flavor = "multi_thread")]
async fn endless_loops_do_not_hold_up_other_requests() {
    let host = rogue_host("loop", "workers = 9\ntimeout_ms = 60000");
    let url = format!("{}/v1/chat/completions", host.api);
    let loops: Vec<_> = (0..8)
        .map(|_| {
            let request = crate::common::client()
                .post(&url)
                .json(&ask("spin forever, rogue"));
            tokio::spawn(request.send())
        })
        .collect();
    let calls = "orchestrator_requests_total{stage=\"post\"}";
    poll_until(&host, "all eight loops in their calls", async |h| {
        h.metric(calls).await >= 8.0
    })
    .await;

    let (status, text) = host.chat(&ask("a normal question")).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        loops.iter().all(|l| !l.is_finished()),
        "the loops must still be running"
    );

    for spinning in &loops {
        spinning.abort();
    }
    let cancelled = "orchestrator_request_duration_seconds_count{outcome=\"cancelled\"}";
    let instances = "orchestrator_plugin_instances{stage=\"post\"}";
    poll_until(&host, "the eight calls cancelled", async |h| {
        h.metric(cancelled).await == 8.0 && h.metric(instances).await == 1.0
    })
    .await;
    let (status, text) = host.chat(&ask("another normal question")).await;
    assert_eq!(status, 200, "{text}");
}

/// Poll `host` until `done` says so; panics naming `what` after 30 s.
async fn poll_until(host: &Host, what: &str, done: impl AsyncFn(&Host) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done(host).await {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30 s for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fuel_bounds_instructions_per_call() {
    let host = rogue_host("loop", "fuel = 50000000\ntimeout_ms = 60000");
    misdeed(&host, 500, "fuel").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_flood_is_rate_limited() {
    let host = rogue_host("log-flood", "");
    let (status, _) = host.chat(&ask("flood the log, rogue")).await;
    assert_eq!(status, 200);
    let log = host.wait_for_log("rogue log flood", 50).await;
    let logged = log.matches("rogue log flood").count();
    assert!(logged <= 400, "{logged} of 10000 records logged");
    assert!(
        log.contains("stage=\"post\""),
        "log records carry the stage"
    );
}

/// A plugin may import `wasi:sockets` (Python and JavaScript toolchains
/// always do), but every socket call is denied: it loads, and its connect
/// fails inside the sandbox.
#[tokio::test]
async fn a_plugin_that_imports_sockets_loads_but_gets_no_network() {
    // Something listens, so a permitted connect would succeed.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let host = Host::with_config(&format!(
        "[stages.post]\nplugin = {:?}\nconfig = {{ addr = \"{addr}\" }}\n",
        test_plugin("sockets").display().to_string()
    ));
    let (status, text) = host.chat(&ask("hello")).await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let completion = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(completion.starts_with("no network:"), "{completion}");
    drop(listener);
}

/// A stage not granted `inference` may import it (componentize-js imports
/// every interface of the world) but cannot generate: the call fails.
#[tokio::test]
async fn an_ungranted_inference_import_loads_but_cannot_generate() {
    let host = Host::with_config(&format!(
        "[stages.post]\nplugin = {:?}\n",
        bundled_wasm("inference").display().to_string()
    ));
    let (status, text) = host.chat(&ask("hello")).await;
    assert_eq!(status, 502, "{text}");
    assert!(text.contains("inference is not granted"), "{text}");
    host.wait_for_log("not granted", 1).await;
}

#[test]
fn a_plugin_whose_init_fails_is_refused_at_load() {
    let stderr = Host::try_with_config(&format!(
        "[stages.post]\nplugin = {:?}\nconfig = {{ mode = \"init-fails\" }}\n",
        test_plugin("rogue").display().to_string()
    ))
    .err()
    .expect("refused");
    assert!(
        stderr.contains("stage `post`") && stderr.contains("init failed: rogue refuses to start"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_opens_fails_fast_probes_and_closes() {
    let host = rogue_host("fail", "breaker_failures = 3\nbreaker_cooldown_ms = 300");
    for _ in 0..3 {
        let (status, _) = host.chat(&ask("rogue, fail")).await;
        assert_eq!(status, 500);
    }
    assert_eq!(
        host.metric("orchestrator_circuit_state{stage=\"post\"}")
            .await,
        2.0
    );
    let response = host.post(&ask("a normal question")).await;
    assert_eq!(response.status(), 503, "open: fail fast");
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "circuit_open");
    let health = host.health().await;
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["stages"][3]["circuit"], "open");
    assert_eq!(health["stages"][3]["ready"], false);
    let calls = host
        .metric("orchestrator_requests_total{stage=\"post\"}")
        .await;
    assert_eq!(calls, 3.0, "the refused request made no call");

    // After the cool-down one probe goes through; a failing probe reopens.
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    let (status, _) = host.chat(&ask("rogue, fail again")).await;
    assert_eq!(status, 500);
    assert_eq!(
        host.metric("orchestrator_circuit_state{stage=\"post\"}")
            .await,
        2.0
    );
    // A succeeding probe closes it.
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    let (status, _) = host.chat(&ask("a normal question")).await;
    assert_eq!(status, 200);
    assert_eq!(
        host.metric("orchestrator_circuit_state{stage=\"post\"}")
            .await,
        0.0
    );
    let text = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_circuit_transitions_total{stage=\"post\",to=\"open\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_circuit_transitions_total{stage=\"post\",to=\"half_open\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_circuit_transitions_total{stage=\"post\",to=\"closed\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_plugin_under_load_hurts_only_its_own_requests() {
    let host = rogue_host("flaky", "breaker_failures = 1000");
    const REQUESTS: usize = 200;
    let mut statuses = Vec::new();
    for batch in 0..(REQUESTS / 20) {
        let requests: Vec<Value> = (0..20)
            .map(|n| ask(&format!("question {batch}-{n}")))
            .collect();
        let sends = requests.iter().map(|r| host.chat(r));
        statuses.extend(
            futures_util::future::join_all(sends)
                .await
                .into_iter()
                .map(|(s, _)| s),
        );
    }
    assert_eq!(statuses.len(), REQUESTS, "every request answered");
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let failed = statuses.iter().filter(|s| **s == 500).count();
    assert_eq!(ok + failed, REQUESTS, "{statuses:?}");
    assert!(
        (20..=100).contains(&failed),
        "{failed} of {REQUESTS} failed; expected about 30%"
    );
    let text = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_errors_total{error_type=\"plugin_error\",stage=\"post\"}"
        ),
        failed as f64
    );
    for stage in ["rag", "assemble", "inference", "stream"] {
        assert_eq!(
            metric_value(
                &text,
                &format!("orchestrator_requests_total{{stage=\"{stage}\"}}")
            ),
            if stage == "stream" {
                ok as f64
            } else {
                REQUESTS as f64
            }
        );
    }
    let other_errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("orchestrator_errors_total{") && !l.contains("stage=\"post\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(other_errors, 0.0, "other stages unaffected");
}

/// A panic in a call reaches the client's error and the host's log with
/// its message (through the SDK's panic hook), not just as a wasm trap.
#[tokio::test]
async fn a_panic_in_process_is_reported_with_its_message() {
    let host = guest_host("sdk-panic", "process-panics", "");
    let (status, text) = host.chat(&ask("hello")).await;
    assert_eq!(status, 500, "{text}");
    assert!(text.contains("deliberate panic: in process"), "{text}");
    assert!(text.contains("\"code\":\"trap\""), "{text}");
    let (status, text) = host.chat(&ask("again")).await;
    assert_eq!(status, 500, "a fresh instance panics again: {text}");
}
