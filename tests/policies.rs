//! The bundled gateway policies — `auth`, `ratelimit`, `cache` — on a real
//! `redis-server` shared by two host processes, and on memory stores.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::common::redis::{Holding, Redis};
use crate::common::upstream::{Script, Upstream};
use crate::common::{Host, client, metric_value, sse};

const ADMIN: &str = "policy-admin-token";

/// A configuration with the stores `keys`, `limits` and `cache` on
/// `redis` (memory without), the admin token, `extra` and the default
/// pipeline `stages`.
fn config(redis: Option<&Redis>, extra: &str, stages: &[&str]) -> String {
    store_config(redis, 2000, extra, stages)
}

/// [`config`] with the Redis stores' `timeout_ms`.
fn store_config(redis: Option<&Redis>, timeout_ms: u64, extra: &str, stages: &[&str]) -> String {
    config_at(redis.map(Redis::url).as_deref(), timeout_ms, extra, stages)
}

/// [`store_config`] with the stores on the Redis at `url`.
fn config_at(url: Option<&str>, timeout_ms: u64, extra: &str, stages: &[&str]) -> String {
    let stores = match url {
        Some(url) => ["keys", "limits", "cache"]
            .map(|store| {
                format!(
                    "[stores.{store}]\nkind = \"redis\"\nurl = {url:?}\ntimeout_ms = {timeout_ms}\n"
                )
            })
            .concat(),
        None => String::new(),
    };
    let stages: Vec<String> = stages.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "admin_token = {ADMIN:?}\n{stores}{extra}\n[pipelines.default]\nstages = [{}]\n",
        stages.join(", ")
    )
}

/// A `ratelimit` stage with these rules (TOML inline tables).
fn ratelimit(rules: &[&str]) -> String {
    let rules: Vec<String> = rules.iter().map(|r| format!("{{ {r} }}")).collect();
    format!(
        "[stages.ratelimit.config]\nrules = [{}]\n",
        rules.join(", ")
    )
}

fn chat(model: &str, question: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": question}]})
}

async fn post(host: &Host, body: &Value, key: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .json(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

/// Create a key through `host`'s admin API; returns (key, id).
async fn create_key(host: &Host, body: Value) -> (String, String) {
    crate::common::create_key(host, ADMIN, &body).await
}

async fn admin_get(host: &Host, path: &str) -> Value {
    client()
        .get(format!("{}{path}", host.api))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Wait, if the current fixed window of `period_ms` ends within `margin`,
/// until the next one starts: a test that counts within one window must
/// not straddle two.
async fn clear_of_window_end(period_ms: u64, margin: Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left = period_ms - now % period_ms;
    if left < margin.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 5)).await;
    }
}

/// Await `condition` on `host`'s metrics (finish calls run after the
/// answer): polls the exposition until it holds, up to 20 s.
async fn await_metric(host: &Host, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = metric_value(&host.metrics_text().await, series);
        if now == value {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {now}, not {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the one Redis counter whose key contains `part`, once
/// `settled` accepts it (finish calls settle after the answers); up to
/// 20 s.
async fn await_counter(redis: &Redis, part: &str, settled: impl Fn(i64) -> bool) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let keys = redis.command(&["KEYS", &format!("*{part}*")]);
        let value = keys
            .as_deref()
            .and_then(|k| k.lines().next())
            .and_then(|key| redis.command(&["GET", key.trim()]))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if settled(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "counter *{part}* stayed at {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until a Redis key matching `pattern` exists (up to 20 s).
async fn await_key(redis: &Redis, pattern: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis
        .command(&["KEYS", pattern])
        .is_none_or(|keys| keys.is_empty())
    {
        assert!(Instant::now() < deadline, "no key {pattern}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Keys made on one host work on the other at once, disabled or revoked
/// ones stop at once; the key's principal, model list and usage figures hold; the
/// admin API never shows a secret or a hash.
#[tokio::test(flavor = "multi_thread")]
async fn keys_are_shared_by_two_hosts_and_revoked_at_once() {
    let Some(redis) = Redis::start() else { return };
    let toml = config(Some(&redis), "", &["auth", "inference"]);
    let (a, b) = (Host::with_config(&toml), Host::with_config(&toml));
    let (key, id) = create_key(&a, json!({"principal": "alice", "models": ["echo"]})).await;
    assert!(key.starts_with("sk-orch-"), "{key}");
    // The usage read below is of the current hour's window.
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;

    let answered = post(&b, &chat("echo", "hello"), Some(&key)).await;
    assert_eq!(answered.status(), 200);
    let missing = post(&b, &chat("echo", "hello"), None).await;
    assert_eq!(missing.status(), 401);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
    let mut wrong = key.clone();
    wrong.pop();
    wrong.push(if key.ends_with('0') { '1' } else { '0' });
    assert_eq!(
        post(&b, &chat("echo", "hello"), Some(&wrong))
            .await
            .status(),
        401
    );
    let (other_model, _) = create_key(&a, json!({"principal": "bob", "models": ["gpt-x"]})).await;
    let forbidden = post(&b, &chat("echo", "hello"), Some(&other_model)).await;
    assert_eq!(forbidden.status(), 403);

    // Listed without secrets; its usage counted by the finish calls.
    let listed = admin_get(&b, "/admin/keys").await;
    let text = listed.to_string();
    assert!(
        !text.contains(&key[20..]) && !text.contains("hash"),
        "{text}"
    );
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2, "{listed}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let shown = admin_get(&a, &format!("/admin/keys/{id}")).await;
        if shown["usage"]["requests"]["hour"] == 1 {
            assert_eq!(shown["record"]["principal"], "alice", "{shown}");
            assert!(
                shown["usage"]["tokens"]["day"].as_i64().unwrap() > 0,
                "{shown}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "usage never counted: {shown}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    await_metric(
        &b,
        "orchestrator_principal_requests_total{principal=\"alice\"}",
        1.0,
    )
    .await;
    let metrics = b.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_refusals_total{policy=\"\",stage=\"auth\",status=\"401\"}"
        ),
        2.0
    );

    // Disabled on one host: refused by the other; enabled again: served.
    let patch = |host: &Host, disabled: bool| {
        client()
            .patch(format!("{}/admin/keys/{id}", host.api))
            .bearer_auth(ADMIN)
            .json(&json!({ "disabled": disabled }))
            .send()
    };
    let disabled: Value = patch(&a, true).await.unwrap().json().await.unwrap();
    assert_eq!(disabled["record"]["disabled"], true, "{disabled}");
    assert_eq!(
        post(&b, &chat("echo", "hello"), Some(&key)).await.status(),
        401
    );
    assert_eq!(patch(&b, false).await.unwrap().status(), 200);
    assert_eq!(
        post(&a, &chat("echo", "hello"), Some(&key)).await.status(),
        200
    );

    // Revoked on one host: the other refuses it on its next request.
    let revoked = client()
        .delete(format!("{}/admin/keys/{id}", b.api))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    assert_eq!(
        post(&a, &chat("echo", "hello"), Some(&key)).await.status(),
        401
    );
}

/// `orchestrator keys` manages the keys of the configuration's Redis store:
/// a key it creates is served by a host on that configuration, one it
/// disables or revokes is refused at once; with a memory store it says to
/// use the admin API.
#[tokio::test(flavor = "multi_thread")]
async fn the_keys_command_manages_a_redis_store() {
    let Some(redis) = Redis::start() else { return };
    let toml = config(Some(&redis), "", &["auth", "inference"]);
    let (_dir, file) = crate::common::config_file(&toml);
    let host = Host::with_config(&toml);
    let keys = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .arg("keys")
            .args(args)
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), stdout, stderr)
    };
    let (ok, key, stderr) = keys(&[
        "create",
        "--principal",
        "cli",
        "--limit",
        "requests_per_hour=100",
    ]);
    assert!(ok, "{stderr}");
    assert!(key.starts_with("sk-orch-"), "{key}");
    let id = key["sk-orch-".len().."sk-orch-".len() + 12].to_string();
    let (ok, listed, _) = keys(&["list"]);
    assert!(
        ok && listed.contains(&id) && listed.contains("cli"),
        "{listed}"
    );
    assert!(
        !listed.contains(&key[21..]),
        "a secret in the list: {listed}"
    );
    assert_eq!(
        post(&host, &chat("echo", "hi"), Some(&key)).await.status(),
        200
    );
    let (ok, shown, _) = keys(&["show", &id]);
    assert!(ok && shown.contains("requests_per_hour"), "{shown}");

    assert!(keys(&["disable", &id]).0);
    assert_eq!(
        post(&host, &chat("echo", "hi"), Some(&key)).await.status(),
        401
    );
    assert!(keys(&["enable", &id]).0);
    assert_eq!(
        post(&host, &chat("echo", "hi"), Some(&key)).await.status(),
        200
    );
    assert!(keys(&["revoke", &id]).0);
    assert_eq!(
        post(&host, &chat("echo", "hi"), Some(&key)).await.status(),
        401
    );
    let (ok, _, stderr) = keys(&["revoke", &id]);
    assert!(!ok && stderr.contains("no key"), "{stderr}");

    // A memory store is each host's own: the command refuses it.
    let (_dir, memory) = crate::common::config_file(&config(None, "", &["auth", "inference"]));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["keys", "list", "--config"])
        .arg(&memory)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("admin API"));
}

/// N requests per hour for one key, 3N at once spread over two hosts:
/// exactly N answered, the rest 429 with `Retry-After` and no requests
/// remaining.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_limit_holds_exactly_across_two_hosts() {
    let Some(redis) = Redis::start() else { return };
    const N: usize = 10;
    let toml = config(
        Some(&redis),
        &ratelimit(&["name = \"per_key\", requests_per_hour = 10"]),
        &["auth", "ratelimit", "inference"],
    );
    let (a, b) = (Host::with_config(&toml), Host::with_config(&toml));
    let (key, _) = create_key(&a, json!({"principal": "carol"})).await;
    clear_of_window_end(3_600_000, Duration::from_secs(20)).await;
    let body = chat("echo", "count me");
    let sends = (0..3 * N).map(|n| {
        let host = if n % 2 == 0 { &a } else { &b };
        post(host, &body, Some(&key))
    });
    let responses = futures_util::future::join_all(sends).await;
    let ok = responses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, N);
    for refused in responses.iter().filter(|r| r.status() != 200) {
        assert_eq!(refused.status(), 429);
        assert_eq!(header(refused, "x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(header(refused, "x-ratelimit-limit-requests"), Some("10"));
        let retry: u64 = header(refused, "retry-after").unwrap().parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
    }
    let metrics = format!("{}{}", a.metrics_text().await, b.metrics_text().await);
    let refused: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("orchestrator_refusals_total{policy=\"per_key\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, (2 * N) as f64);
}

/// Requests whose reservations (prompt + `max_tokens`) sum past a token
/// limit, held in flight at once on two hosts: the excess is refused;
/// once the answers settle, the count is the tokens really used, and the
/// next answer's remaining tokens say so.
#[tokio::test(flavor = "multi_thread")]
async fn token_reservations_refuse_the_excess_and_settle_to_real_use() {
    let Some(redis) = Redis::start() else { return };
    const LIMIT: i64 = 1000;
    // The upstream holds every answer until a fourth request arrives: the
    // three admitted generations stay in flight, holding their
    // reservations, while the others are tried.
    let upstream = Upstream::start(Script::Gate {
        open_at: 4,
        first: "held ",
        then: "answer",
    })
    .await;
    let extra = format!(
        "{}[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [pipelines.free]\nstages = [\"inference\"]\n\
         [routing.models]\nup = \"up\"\nfree = {{ backend = \"up\", pipeline = \"free\" }}\n",
        ratelimit(&["name = \"tpm\", by = \"global\", tokens_per_hour = 1000"]),
        upstream.base_url
    );
    let toml = config(Some(&redis), &extra, &["ratelimit", "inference"]);
    let (a, b) = (Host::with_config(&toml), Host::with_config(&toml));
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    let mut body = chat("up", "a short question");
    body["max_tokens"] = json!(300);
    // Each reservation is over 300 tokens: three fit in 1000.
    let admitted: Vec<_> = (0..3)
        .map(|n| {
            let host = if n % 2 == 0 {
                a.api.clone()
            } else {
                b.api.clone()
            };
            let body = body.clone();
            tokio::spawn(async move {
                client()
                    .post(format!("{host}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while upstream.requests.load(Ordering::SeqCst) < 3 {
        assert!(
            Instant::now() < deadline,
            "the admitted requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sends = (0..6).map(|n| post(if n % 2 == 0 { &a } else { &b }, &body, None));
    for refused in futures_util::future::join_all(sends).await {
        assert_eq!(refused.status(), 429);
        assert_eq!(header(&refused, "x-ratelimit-limit-tokens"), Some("1000"));
        assert!(header(&refused, "retry-after").is_some());
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 3);
    // A request outside the limit opens the gate.
    assert_eq!(post(&a, &chat("free", "open"), None).await.status(), 200);
    let mut used = 0;
    for response in admitted {
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        used += answer["usage"]["total_tokens"].as_i64().unwrap();
    }
    assert!(used > 0 && used < 900, "{used}");
    let settled = await_counter(&redis, "tpm:global:*:tokens:hour", |v| v == used).await;
    assert_eq!(settled, used);
    // The next reservation is counted on top of the real use.
    let next = post(&b, &chat("free", "a short question"), None).await;
    assert_eq!(next.status(), 200);
    let mut body = chat("up", "a short question");
    body["max_tokens"] = json!(10);
    let next = post(&a, &body, None).await;
    assert_eq!(next.status(), 200);
    let remaining: i64 = header(&next, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        remaining < LIMIT - used && remaining > LIMIT - used - 100,
        "{remaining}"
    );
}

/// A stream the client cuts is charged what it was sent, not its
/// reservation; a cache hit is charged nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_stream_pays_what_it_got_and_a_cache_hit_nothing() {
    let Some(redis) = Redis::start() else { return };
    let upstream = Upstream::start(Script::Endless).await;
    let extra = format!(
        "{}[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n[routing.models]\nup = \"up\"\necho = \"echo\"\n",
        ratelimit(&["name = \"tokens\", by = \"model\", tokens_per_hour = 1000000"]),
        upstream.base_url
    );
    let host = Host::with_config(&config(
        Some(&redis),
        &extra,
        &["ratelimit", "cache", "inference", "stream"],
    ));
    clear_of_window_end(3_600_000, Duration::from_secs(20)).await;

    let mut body = chat("up", "talk forever");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(5000);
    let mut response = post(&host, &body, None).await;
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while seen.matches("word").count() < 3 {
        let chunk = response.chunk().await.unwrap().expect("more events");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    // Settled below the 5000-token reservation, to what the host counted.
    let charged = await_counter(&redis, "tokens:model:up:tokens", |v| v > 0 && v < 5000).await;
    assert!(charged >= 3, "{charged}");

    let first = post(&host, &chat("echo", "cache me"), None).await;
    assert_eq!(header(&first, "x-orchestrator-cache"), Some("miss"));
    let answer: Value = first.json().await.unwrap();
    let used = answer["usage"]["total_tokens"].as_i64().unwrap();
    await_counter(&redis, "tokens:model:echo:tokens", |v| v == used).await;
    // Once the miss's finish call stored the answer: a hit, settled to
    // nothing, so the count comes back to what the miss used.
    await_key(&redis, "*cache:entry:*").await;
    let again = post(&host, &chat("echo", "cache me"), None).await;
    assert_eq!(header(&again, "x-orchestrator-cache"), Some("hit"));
    await_metric(
        &host,
        "orchestrator_response_cache_total{result=\"hit\"}",
        1.0,
    )
    .await;
    await_metric(
        &host,
        "orchestrator_request_duration_seconds_count{outcome=\"answered\"}",
        1.0,
    )
    .await;
    await_counter(&redis, "tokens:model:echo:tokens", |v| v == used).await;
}

/// A request cut while a later stage holds it (here: waiting in the
/// cache for an identical request's answer) still settles its
/// reservation: its finish calls get the request as that stage held it,
/// notes included.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_cut_inside_a_stage_still_settles() {
    let Some(redis) = Redis::start() else { return };
    let upstream = Upstream::start(Script::Endless).await;
    let extra = format!(
        "{}[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n[routing.models]\nup = \"up\"\n",
        ratelimit(&["name = \"all\", by = \"global\", tokens_per_hour = 1000000"]),
        upstream.base_url
    );
    let host = Host::with_config(&config(
        Some(&redis),
        &extra,
        &["ratelimit", "cache", "inference", "stream"],
    ));
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    let mut body = chat("up", "talk forever");
    body["max_tokens"] = json!(1000);
    body["stream"] = json!(true);
    // The first generates (and streams forever), holding the cache's lock.
    let mut first = post(&host, &body, None).await;
    assert_eq!(header(&first, "x-orchestrator-cache"), Some("miss"));
    let _ = first.chunk().await.unwrap();
    let one = await_counter(&redis, "all:global:*:tokens:hour", |v| v > 1000).await;
    // The second reserves as much, then waits in the cache for the first.
    let api = host.api.clone();
    let second = tokio::spawn(async move {
        client()
            .post(format!("{api}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
    });
    await_counter(&redis, "all:global:*:tokens:hour", |v| v == 2 * one).await;
    // Its client goes away while the cache stage holds it: refunded.
    second.abort();
    await_counter(&redis, "all:global:*:tokens:hour", |v| v == one).await;
    drop(first);
    await_counter(&redis, "all:global:*:tokens:hour", |v| v < one).await;
}

/// A request cut while its reservation is on its way to Redis (the
/// command held at a proxy) does not leak it: the `ratelimit` stage still
/// gets the store's answer and notes it, and its finish call gives the
/// tokens back.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_cut_during_its_reservation_still_settles() {
    let Some(redis) = Redis::start() else { return };
    let holding = Holding::start(&redis, b"EVALSHA").await;
    let rule =
        "name = \"all\", by = \"global\", requests_per_hour = 1000, tokens_per_hour = 1000000";
    let host = Host::with_config(&config_at(
        Some(&holding.url),
        5000,
        &ratelimit(&[rule]),
        &["ratelimit", "inference"],
    ));
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    // One request first, reserved and settled: Redis then knows the
    // script, so the held reservation is the one that lands.
    assert_eq!(post(&host, &chat("echo", "hi"), None).await.status(), 200);
    let used = await_counter(&redis, "all:global:*:tokens:hour", |v| v > 0 && v < 1000).await;
    // The next reservation is held at the proxy.
    holding.arm();
    let api = host.api.clone();
    let request = tokio::spawn(async move {
        client()
            .post(format!("{api}/v1/chat/completions"))
            .json(&chat("echo", "hi"))
            .send()
            .await
    });
    tokio::time::timeout(Duration::from_secs(20), holding.arrived.notified())
        .await
        .expect("the reservation reached the proxy");
    // The client goes away while the reservation is held; the host sees it.
    request.abort();
    await_metric(
        &host,
        "orchestrator_request_duration_seconds_count{outcome=\"cancelled\"}",
        1.0,
    )
    .await;
    holding.release();
    // The reservation lands (a request counted: requests are not given
    // back), then the settle gives all its tokens back.
    await_counter(&redis, "all:global:*:requests:hour", |v| v == 2).await;
    await_counter(&redis, "all:global:*:tokens:hour", |v| v == used).await;
    assert_eq!(
        metric_value(
            &host.metrics_text().await,
            "orchestrator_errors_total{error_type=\"timeout\",stage=\"ratelimit\"}"
        ),
        0.0
    );
}

/// With Redis stopped, an `allow` rule serves and counts the store error,
/// the cache steps aside, a `deny` rule answers 503; with Redis back, the limits hold again
/// without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_outage_fails_open_or_closed_per_rule() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let extra = format!(
        "{}[stages.strict]\nbundled = \"ratelimit\"\nconfig = {{ rules = [{{ name = \"strict\", by = \"global\", requests_per_hour = 2, on_store_error = \"deny\" }}] }}\n\
         [pipelines.strict]\nstages = [\"strict\", \"inference\"]\n\
         [routing.models]\necho = \"echo\"\nstrict = {{ backend = \"echo\", pipeline = \"strict\" }}\n",
        ratelimit(&["name = \"open\", by = \"global\", requests_per_hour = 2"]),
    );
    // Short store timeouts: Redis is stopped and started under the host.
    let host = Host::with_config(&store_config(
        Some(&redis),
        300,
        &extra,
        &["ratelimit", "cache", "inference"],
    ));
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    redis.stop();
    for _ in 0..3 {
        let served = post(&host, &chat("echo", "hi"), None).await;
        assert_eq!(served.status(), 200);
        // The cache, its store down, steps aside.
        assert_eq!(header(&served, "x-orchestrator-cache"), Some("bypass"));
    }
    let denied = post(&host, &chat("strict", "hi"), None).await;
    assert_eq!(denied.status(), 503);
    let metrics = host.metrics_text().await;
    let failed: f64 = ["error", "timeout"]
        .iter()
        .map(|outcome| {
            metric_value(
                &metrics,
                &format!(
                    "orchestrator_store_operations_total{{op=\"window\",outcome=\"{outcome}\",store=\"limits\"}}"
                ),
            )
        })
        .sum();
    assert!(failed >= 4.0, "{failed}");

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut statuses = Vec::new();
    while statuses.len() < 3 {
        let status = post(&host, &chat("strict", "hi"), None).await.status();
        // Until the connection is back, the strict rule denies.
        if status == 503 {
            assert!(Instant::now() < deadline, "Redis never came back");
            continue;
        }
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
}

/// The second identical request reaches no backend, plain after streamed
/// and streamed after plain; a different model, parameter or principal
/// misses; 20 identical misses at once make one backend call.
#[tokio::test(flavor = "multi_thread")]
async fn the_cache_serves_plain_and_streamed_alike_and_flies_once() {
    let upstream = Upstream::start(Script::Deltas(vec!["cached ", "answer"])).await;
    let extra = format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n[backends.up2]\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [routing.models]\nup = \"up\"\nup2 = \"up2\"\n",
        upstream.base_url, upstream.base_url
    );
    let host = Host::with_config(&config(
        None,
        &extra,
        &["auth", "cache", "inference", "post", "stream"],
    ));
    let (alice, _) = create_key(&host, json!({"principal": "alice"})).await;
    let (bob, _) = create_key(&host, json!({"principal": "bob"})).await;
    let calls = || upstream.requests.load(Ordering::SeqCst);
    let mut streamed = chat("up", "what is cached?");
    streamed["stream"] = json!(true);

    let first = post(&host, &streamed, Some(&alice)).await;
    assert_eq!(header(&first, "x-orchestrator-cache"), Some("miss"));
    let text = first.text().await.unwrap();
    assert_eq!(sse::content(&sse::chunks(&text)), "cached answer");
    assert_eq!(calls(), 1);
    await_metric(&host, "orchestrator_store_keys{store=\"cache\"}", 1.0).await;

    let plain = post(&host, &chat("up", "what is cached?"), Some(&alice)).await;
    assert_eq!(header(&plain, "x-orchestrator-cache"), Some("hit"));
    let answer: Value = plain.json().await.unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "cached answer");
    let again = post(&host, &streamed, Some(&alice)).await;
    assert_eq!(header(&again, "x-orchestrator-cache"), Some("hit"));
    let text = again.text().await.unwrap();
    assert_eq!(sse::content(&sse::chunks(&text)), "cached answer");
    assert_eq!(calls(), 1, "hits reach no backend");

    // Different model, parameter, principal: misses.
    let mut other_model = chat("up2", "what is cached?");
    other_model["stream"] = json!(false);
    let mut other_param = chat("up", "what is cached?");
    other_param["temperature"] = json!(0.5);
    for (body, key) in [
        (&other_model, &alice),
        (&other_param, &alice),
        (&chat("up", "what is cached?"), &bob),
    ] {
        let response = post(&host, body, Some(key)).await;
        assert_eq!(header(&response, "x-orchestrator-cache"), Some("miss"));
    }
    assert_eq!(calls(), 4);
    // `no-store`: a bypass, to the backend.
    let bypass = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .bearer_auth(&alice)
        .header("cache-control", "no-store")
        .json(&chat("up", "what is cached?"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&bypass, "x-orchestrator-cache"), Some("bypass"));
    assert_eq!(calls(), 5);

    // Twenty identical misses at once: one backend call.
    let body = chat("up", "single flight");
    let sends = (0..20).map(|_| post(&host, &body, Some(&alice)));
    for response in futures_util::future::join_all(sends).await {
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "cached answer");
    }
    assert_eq!(calls(), 6);
}

/// A reservation over several counters is all or none on Redis too: a
/// counter that holds something else than an integer fails the whole
/// operation before anything is written (the rule then lets the request
/// through, as `allow` says).
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_counter_fails_the_reservation_before_any_write() {
    let Some(redis) = Redis::start() else { return };
    let host = Host::with_config(&config(
        Some(&redis),
        &ratelimit(&[
            "name = \"both\", by = \"global\", requests_per_hour = 100, tokens_per_hour = 100000",
        ]),
        &["ratelimit", "inference"],
    ));
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    let hour = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        / 3_600_000;
    let tokens = format!("orchestrator:limits:both:global:*:tokens:hour:{hour}");
    let requests = format!("orchestrator:limits:both:global:*:requests:hour:{hour}");
    redis.command(&["SET", &tokens, "1.0"]);
    let response = post(&host, &chat("echo", "hi"), None).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["orchestrator"]["metadata"]["ratelimit.store_error"], "allowed",
        "{answer}"
    );
    assert_eq!(redis.command(&["EXISTS", &requests]).as_deref(), Some("0"));
    assert_eq!(redis.command(&["GET", &tokens]).as_deref(), Some("1.0"));
}

/// Identical misses on two hosts sharing a Redis cache store make one
/// backend call between them: the claim is in the store.
#[tokio::test(flavor = "multi_thread")]
async fn single_flight_holds_across_two_hosts() {
    let Some(redis) = Redis::start() else { return };
    let upstream = Upstream::start(Script::Deltas(vec!["shared ", "answer"])).await;
    let extra = format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n[routing.models]\nup = \"up\"\n",
        upstream.base_url
    );
    let toml = config(Some(&redis), &extra, &["cache", "inference"]);
    let (a, b) = (Host::with_config(&toml), Host::with_config(&toml));
    let body = chat("up", "one answer for both");
    let sends = (0..10).map(|n| post(if n % 2 == 0 { &a } else { &b }, &body, None));
    for response in futures_util::future::join_all(sends).await {
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "shared answer");
    }
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}

/// The official OpenAI Python SDK, given a key as `api_key`, gets
/// answers; without one, `AuthenticationError`; past the limit,
/// `RateLimitError`, and its own retry, honouring `Retry-After`, gets
/// through once the window turns.
#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_sees_keys_and_limits_as_openai_errors() {
    if crate::common::tool_missing("python3") {
        return;
    }
    let host = Host::with_config(&config(
        None,
        &ratelimit(&["name = \"hourly\", by = \"principal\", requests_per_hour = 2"]),
        &["auth", "ratelimit", "inference"],
    ));
    let (limited, _) = create_key(&host, json!({"principal": "sdk"})).await;
    let (fast, _) = create_key(
        &host,
        json!({"principal": "sdk-fast", "limits": {"requests_per_second": 1}}),
    )
    .await;
    clear_of_window_end(3_600_000, Duration::from_secs(30)).await;
    let api = host.api.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/openai_sdk_keys.py"
            ))
            .args([&api, &limited, &fast])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains("No module named 'openai'") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs the openai package"
        );
        return;
    }
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
}
