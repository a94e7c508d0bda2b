//! Hot-swapping a stage under load: validated, atomic, loss-free, with
//! rollback, `--watch`, and an admin API that is off without a token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{
    Host, ask, bundled_wasm, client, metric_value, sha_of, sse, target_dir, test_plugin,
};

const TOKEN: &str = "test-admin-token-0123456789";

fn admin_host(args: &[&str]) -> Host {
    Host::start_with(
        args,
        &[("ORCHESTRATOR_ADMIN_TOKEN", TOKEN)],
        &target_dir().join("test-cache"),
    )
}

async fn put(host: &Host, stage: &str, bytes: Vec<u8>) -> (u16, Value) {
    let response = client()
        .put(format!("{}/admin/stages/{stage}", host.api))
        .bearer_auth(TOKEN)
        .body(bytes)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn stages(host: &Host) -> Value {
    let response = list_stages(&host.api, TOKEN).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// `GET {base}/admin/stages` with `token`.
async fn list_stages(base: &str, token: &str) -> reqwest::Response {
    client()
        .get(format!("{base}/admin/stages"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// `GET /admin/stages`' entry for `stage`.
async fn stage_versions(host: &Host, stage: &str) -> Value {
    let all = stages(host).await;
    all["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == stage)
        .unwrap()
        .clone()
}

async fn active_sha(host: &Host, stage: &str) -> String {
    stage_versions(host, stage).await["active"]["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Which post version produced a response: `Some(true)` for shout,
/// `Some(false)` for the bundled post, `None` for a mixture. A streamed
/// response through the bundled post (a streaming stage) carries no notes
/// of post's, since notes come only from `process`.
fn version_of(content: &str, metadata: &Value, question: &str, stream: bool) -> Option<bool> {
    let shout = metadata.get("shout.version").is_some() && content == question.to_uppercase();
    let bundled = (metadata.get("post.redacted_emails").is_some()
        || (stream && metadata.get("shout.version").is_none()))
        && content == question;
    match (shout, bundled) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        _ => None,
    }
}

/// One request, plain or streaming; returns whether shout produced it.
async fn request(host: &Host, n: usize) -> Result<bool, String> {
    let question = format!("client request number {n} about queues");
    let stream = n.is_multiple_of(2);
    let mut body = ask(&question);
    body["stream"] = json!(stream);
    let response = host.post(&body).await;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("status {status}: {text}"));
    }
    let (content, metadata) = if stream {
        let chunks = sse::try_chunks(&text)?;
        let metadata = chunks
            .iter()
            .rev()
            .find_map(|c| c.get("orchestrator"))
            .map_or(Value::Null, |m| m["metadata"].clone());
        (sse::content(&chunks), metadata)
    } else {
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        (
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            v["orchestrator"]["metadata"].clone(),
        )
    };
    version_of(&content, &metadata, &question, stream)
        .ok_or_else(|| format!("mixed response: {content:?} {metadata}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_swaps_under_load_lose_nothing() {
    let host = Arc::new(admin_host(&[]));
    let bundled = std::fs::read(bundled_wasm("post")).unwrap();
    let shout = std::fs::read(test_plugin("shout")).unwrap();
    let before_rss = host.metric("process_resident_memory_bytes").await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client_id in 0..16 {
        let (host, stop) = (host.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut n = client_id;
            while !stop.load(Ordering::Relaxed) {
                results.push(request(&host, n).await);
                n += 16;
            }
            results
        }));
    }

    let broken: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not wasm",
            b"definitely not a component".to_vec(),
            "not_wasm",
        ),
        (
            "wrong world",
            std::fs::read(test_plugin("wrong-world")).unwrap(),
            "wrong_world",
        ),
        (
            "failing init",
            std::fs::read(test_plugin("broken-init")).unwrap(),
            "init_failed",
        ),
        (
            "import no host provides",
            std::fs::read(test_plugin("foreign-import")).unwrap(),
            "not_granted",
        ),
    ];
    for swap in 0..50 {
        let (bytes, expected) = if swap % 2 == 0 {
            (&shout, sha_of(&shout))
        } else {
            (&bundled, sha_of(&bundled))
        };
        let (status, report) = put(&host, "post", bytes.clone()).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["sha256"], expected);
        if swap == 25 {
            for (what, bytes, code) in &broken {
                let active = active_sha(&host, "post").await;
                let (status, error) = put(&host, "post", bytes.clone()).await;
                assert_eq!(status, 422, "{what}: {error}");
                assert_eq!(error["error"]["code"], *code, "{what}: {error}");
                assert!(
                    error["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("refused"),
                    "{what}"
                );
                assert_eq!(
                    active_sha(&host, "post").await,
                    active,
                    "{what}: the old version stays active"
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut by_shout = 0u64;
    let mut by_bundled = 0u64;
    for client in clients {
        for result in client.await.unwrap() {
            match result {
                Ok(true) => by_shout += 1,
                Ok(false) => by_bundled += 1,
                Err(e) => panic!("a request failed during swaps: {e}"),
            }
        }
    }
    assert!(
        by_shout > 0 && by_bundled > 0,
        "both versions served ({by_shout}, {by_bundled})"
    );

    // The registry's per-version call counts add up to what clients saw.
    let post = stage_versions(&host, "post").await;
    let count = |sha: &str| -> u64 {
        [&post["active"], &post["previous"]]
            .iter()
            .filter(|v| v["sha256"] == sha)
            .map(|v| v["calls"].as_u64().unwrap())
            .next()
            .unwrap_or(0)
    };
    assert_eq!(count(&sha_of(&shout)), by_shout);
    assert_eq!(count(&sha_of(&bundled)), by_bundled);

    let text = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_plugin_reloads_total{result=\"success\",stage=\"post\"}"
        ),
        50.0
    );
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_plugin_reloads_total{result=\"error\",stage=\"post\"}"
        ),
        4.0
    );
    assert_eq!(
        metric_value(&text, "orchestrator_requests_total{stage=\"post\"}"),
        (by_shout + by_bundled) as f64
    );
    let info_lines: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("orchestrator_plugin_info{") && l.contains("stage=\"post\""))
        .collect();
    assert_eq!(info_lines.len(), 1, "{info_lines:?}");
    assert!(
        info_lines[0].contains(&sha_of(&bundled)),
        "the last swap installed the bundled post"
    );
    let after_rss = host.metric("process_resident_memory_bytes").await;
    eprintln!(
        "50 swaps under load: {} requests ({by_shout} shout, {by_bundled} bundled); RSS {:.1} -> {:.1} MiB",
        by_shout + by_bundled,
        before_rss / 1048576.0,
        after_rss / 1048576.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_and_the_artifact_cache() {
    // A cache of its own, so the first upload of `shout` compiles.
    let cache = tempfile::tempdir().unwrap();
    let host = Host::start_with(&[], &[("ORCHESTRATOR_ADMIN_TOKEN", TOKEN)], cache.path());
    let bundled_sha = active_sha(&host, "post").await;
    let shout = std::fs::read(test_plugin("shout")).unwrap();

    let (status, first) = put(&host, "post", shout.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["cached"], false);
    assert_eq!(first["previous_sha256"], bundled_sha.as_str());

    let response = client()
        .post(format!("{}/admin/stages/post/rollback", host.api))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rolled: Value = response.json().await.unwrap();
    assert_eq!(rolled["sha256"], bundled_sha.as_str());
    assert_eq!(active_sha(&host, "post").await, bundled_sha);
    let (status, text) = host.chat(&ask("after the rollback")).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("\"content\":\"after the rollback\""),
        "{text}"
    );

    // Swapping to `shout` again finds it in the cache.
    let (status, again) = put(&host, "post", shout.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again["cached"], true);
    assert_eq!(again["unchanged"], false);

    // Uploading the active bytes again changes nothing: the rollback target
    // stays the bundled version.
    let (status, same) = put(&host, "post", shout.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(same["unchanged"], true);
    let post = stage_versions(&host, "post").await;
    assert_eq!(post["previous"]["sha256"], bundled_sha.as_str());
    eprintln!(
        "swap to a new version: {:.1} ms (compiled); swap back to it: {:.1} ms (artifact cache); rollback: {:.3} ms",
        first["elapsed_ms"].as_f64().unwrap(),
        again["elapsed_ms"].as_f64().unwrap(),
        rolled["elapsed_ms"].as_f64().unwrap()
    );
    let (status, text) = host.chat(&ask("shouting now")).await;
    assert_eq!(status, 200);
    assert!(text.contains("SHOUTING NOW"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_is_off_without_a_token_and_locked_with_one() {
    // The server refuses these before reading the body (it never buffers an
    // unauthenticated upload), so a client still sending a large body can
    // see the connection close before the answer; a small body avoids that
    // race in the test. What is sent does not matter: nothing is read.
    let probe = b"\0asm\x0d\0\x01\0".to_vec();
    let host = Host::start(&[]);
    for (method, path) in [
        ("PUT", "/admin/stages/post"),
        ("GET", "/admin/stages"),
        ("POST", "/admin/stages/post/rollback"),
    ] {
        let response = client()
            .request(method.parse().unwrap(), format!("{}{path}", host.api))
            .bearer_auth(TOKEN)
            .body(probe.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            404,
            "{method} {path} without a configured token"
        );
    }

    let host = admin_host(&[]);
    let before = active_sha(&host, "post").await;
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some("Basic dGVzdA=="),
        Some(TOKEN),
    ] {
        let mut request = client()
            .put(format!("{}/admin/stages/post", host.api))
            .body(probe.clone());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{auth:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    assert_eq!(active_sha(&host, "post").await, before, "nothing changed");
    // Each refusal is counted and logged (with the peer, not the value).
    assert_eq!(
        host.metric("orchestrator_admin_auth_failures_total").await,
        4.0
    );
    // (The line is written before the answer, but read from the pipe
    // after it may arrive: wait for it rather than sample.)
    let log = host.wait_for_log("admin authentication failed", 4).await;
    assert_eq!(
        log.matches("admin authentication failed").count(),
        4,
        "{log}"
    );
    // The scheme is case-insensitive (RFC 9110): authenticated, then the
    // probe bytes are refused as a plugin.
    let response = client()
        .put(format!("{}/admin/stages/post", host.api))
        .header("authorization", format!("bearer {TOKEN}"))
        .body(probe.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert!(!host.stderr().contains(TOKEN), "the token is never logged");
    let health = reqwest::get(format!("{}/health", host.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!health.contains(TOKEN));

    // Guessing is limited: after 10 failures within a minute (4 above, 6
    // more here) the address gets 429, even with the right token, until
    // the minute ends.
    for _ in 0..6 {
        assert_eq!(list_stages(&host.api, "guess").await.status(), 401);
    }
    let response = list_stages(&host.api, TOKEN).await;
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_failed_attempts", "{body}");
    // A lockout is not another failure: the counter stays at 10.
    assert_eq!(
        host.metric("orchestrator_admin_auth_failures_total").await,
        10.0
    );
}

/// An upload over `max_plugin_bytes` gets 413 naming that setting (not the
/// API's `max_body_bytes`), before the body is read.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_upload_names_max_plugin_bytes() {
    let host = Host::try_with_config_env(
        "max_plugin_bytes = 1000\n",
        &[("ORCHESTRATOR_ADMIN_TOKEN", TOKEN)],
    )
    .unwrap();
    let (status, body) = put(&host, "post", vec![0; 1001]).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "body_too_large");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_plugin_bytes"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_swaps_a_replaced_file_and_ignores_a_half_written_one() {
    let dir = tempfile::tempdir().unwrap();
    let bundled = std::fs::read(bundled_wasm("post")).unwrap();
    let shout = std::fs::read(test_plugin("shout")).unwrap();
    std::fs::write(dir.path().join("post.wasm"), &bundled).unwrap();
    let host = admin_host(&["--plugins", dir.path().to_str().unwrap(), "--watch"]);
    assert_eq!(active_sha(&host, "post").await, sha_of(&bundled));

    // A half-written file is refused, and the running version stays.
    std::fs::write(dir.path().join("post.wasm"), &shout[..shout.len() / 2]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while host
        .metric("orchestrator_plugin_reloads_total{result=\"error\",stage=\"post\"}")
        .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the half-written file was never examined"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(active_sha(&host, "post").await, sha_of(&bundled));

    // A file renamed into place is swapped in.
    let staging = dir.path().join(".post.wasm.tmp");
    std::fs::write(&staging, &shout).unwrap();
    let replaced = Instant::now();
    std::fs::rename(&staging, dir.path().join("post.wasm")).unwrap();
    while active_sha(&host, "post").await != sha_of(&shout) {
        assert!(
            Instant::now() < replaced + Duration::from_secs(30),
            "the replaced file was never swapped in"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "--watch: replaced file active after {:.0} ms",
        replaced.elapsed().as_secs_f64() * 1e3
    );
    let (status, text) = host.chat(&ask("watched")).await;
    assert_eq!(status, 200);
    assert!(text.contains("WATCHED"), "{text}");

    // What is not swapped is logged: a file that names no stage, a removed
    // watched file (the running version stays).
    std::fs::write(dir.path().join("Post.wasm"), &shout).unwrap();
    let log = host
        .wait_for_log("ignoring a .wasm file that names no stage", 1)
        .await;
    assert!(log.contains("Post.wasm"), "{log}");
    std::fs::remove_file(dir.path().join("post.wasm")).unwrap();
    host.wait_for_log("watched plugin file removed", 1).await;
    assert_eq!(active_sha(&host, "post").await, sha_of(&shout));
}

/// In process, through the library: a version that is neither active nor
/// previous is freed (its compiled code, `InstancePre` and instances)
/// once its last instance is retired.
#[tokio::test(flavor = "multi_thread")]
async fn retired_versions_are_freed() {
    use orchestrator::Metrics;
    use orchestrator::config::PluginSource;

    let host = in_process_host(Arc::new(Metrics::new())).await;
    let url = format!("http://{}/v1/chat/completions", host.api_addr());
    for _ in 0..4 {
        assert_eq!(status_of(&url, "warm every worker").await, 200);
    }
    let original = Arc::downgrade(&host.pipeline().plugin("post").unwrap());

    let shout = std::fs::read(test_plugin("shout")).unwrap();
    let bundled = std::fs::read(bundled_wasm("post")).unwrap();
    host.hot_swap()
        .install("post", PluginSource::Upload, shout)
        .await
        .unwrap();
    host.hot_swap()
        .install("post", PluginSource::Upload, bundled)
        .await
        .unwrap();
    // No call is running: the stage's idle instances of the retired
    // version were dropped at the swap, and with them the version.
    assert_eq!(
        original.strong_count(),
        0,
        "the retired version is still referenced"
    );
    assert_eq!(status_of(&url, "still serving").await, 200);
    host.shutdown(Duration::from_secs(5)).await;
}

/// With `--admin-listen`, the admin API is served there only: the public
/// API's `/admin/...` paths answer 404, as without a token.
#[tokio::test]
async fn the_admin_api_can_have_a_listener_of_its_own() {
    let host = admin_host(&["--admin-listen", "127.0.0.1:0"]);
    let admin = host.admin.clone().expect("the admin address is printed");
    assert_ne!(admin, host.api);
    assert_eq!(list_stages(&host.api, TOKEN).await.status(), 404);
    let on_admin = list_stages(&admin, TOKEN).await;
    assert_eq!(on_admin.status(), 200);
    let body: Value = on_admin.json().await.unwrap();
    assert!(body["stages"].is_array(), "{body}");
    // Still authenticated there, and nothing else is served.
    let anonymous = client()
        .get(format!("{admin}/admin/stages"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let chat = client()
        .get(format!("{admin}/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 404);
    // The public API still answers.
    let (status, _) = host.chat(&ask("hello")).await;
    assert_eq!(status, 200);
}

/// A plugin's `init` runs when it is loaded, never inside a request: the
/// instance that validated each plugin is kept as its stage's idle
/// instance, at start and at a swap, and the next request runs on it.
/// (With a slow `init` — a long deny list — the first request on a new
/// version would otherwise spend its deadline there.)
#[tokio::test]
async fn init_runs_at_load_not_in_the_first_request() {
    use orchestrator::Metrics;
    use orchestrator::config::PluginSource;

    let metrics = Arc::new(Metrics::new());
    let host = in_process_host(metrics.clone()).await;
    let instances = |stage: &str| {
        metric_value(
            &metrics.gather(),
            &format!("orchestrator_plugin_instances{{stage=\"{stage}\"}}"),
        )
    };
    let stages = ["rag", "assemble", "inference", "post", "stream"];
    for stage in stages {
        assert_eq!(
            instances(stage),
            1.0,
            "{stage}: one instance, before any request"
        );
    }
    let url = format!("http://{}/v1/chat/completions", host.api_addr());
    for n in 0..3 {
        assert_eq!(status_of(&url, &format!("question {n}")).await, 200);
    }
    for stage in stages {
        // One request at a time: the warm instance served each of them.
        assert_eq!(
            instances(stage),
            1.0,
            "{stage}: no instance made for a request"
        );
    }
    let shout = std::fs::read(test_plugin("shout")).unwrap();
    host.hot_swap()
        .install("post", PluginSource::Upload, shout)
        .await
        .unwrap();
    // The old version's idle instance went with it; the new one's is warm.
    assert_eq!(instances("post"), 1.0);
    assert_eq!(status_of(&url, "after the swap").await, 200);
    assert_eq!(instances("post"), 1.0);
    // So does a rollback's: the version it restores comes with an
    // instance whose `init` ran (it used to come with none).
    host.hot_swap().rollback("post").await.unwrap();
    assert_eq!(instances("post"), 1.0);
    assert_eq!(status_of(&url, "after the rollback").await, 200);
    assert_eq!(instances("post"), 1.0);
    host.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn swaps_leave_no_warm_pool_slots_behind() {
    use orchestrator::Metrics;
    use orchestrator::config::PluginSource;

    // Each swap brings a new module: its instances took never-used pool
    // slots while the old version's slots stayed warm and resident, up to
    // wasmtime's default of 100 (RSS grew with every reload and swap).
    let metrics = Arc::new(Metrics::new());
    let host = in_process_host(metrics.clone()).await;
    let url = format!("http://{}/v1/chat/completions", host.api_addr());
    let warm = || {
        metric_value(
            &metrics.gather(),
            "orchestrator_instance_pool_unused_warm_slots",
        )
    };
    let builds = [
        std::fs::read(test_plugin("shout")).unwrap(),
        std::fs::read(test_plugin("noop")).unwrap(),
    ];
    for n in 0..12 {
        host.hot_swap()
            .install("post", PluginSource::Upload, builds[n % 2].clone())
            .await
            .unwrap();
        assert_eq!(status_of(&url, &format!("after swap {n}")).await, 200);
    }
    // The old versions' slots went to the new versions' instances. wasmtime
    // picks slots within the calling thread's shard (one per core, at most
    // 16), so each shard may hold a free slot or two until reused there.
    let shards = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
    let bound = 2 * shards as u32;
    assert!(
        warm() <= f64::from(bound),
        "{} warm slots kept (at most {bound})",
        warm()
    );
    host.shutdown(Duration::from_secs(5)).await;
}

/// The host in this process on free ports, with the tests' artifact cache
/// and the default configuration.
async fn in_process_host(metrics: Arc<orchestrator::Metrics>) -> orchestrator::Orchestrator {
    let config = orchestrator::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        cache_dir: Some(target_dir().join("test-cache")),
        ..orchestrator::Config::default()
    };
    orchestrator::Orchestrator::start(config, metrics)
        .await
        .unwrap()
}

/// The status of a plain chat completion asking `question` at `url`.
async fn status_of(url: &str, question: &str) -> u16 {
    client()
        .post(url)
        .json(&ask(question))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}
