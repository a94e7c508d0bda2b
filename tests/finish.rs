//! The finish call: after each request, `finish` of every stage that ran
//! and exports it, in reverse order, with the final usage (a cut stream:
//! what was delivered); a panicking `finish` changes nothing. The test
//! stage logs its finish calls into a Redis store, which the test reads.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::redis::Redis;
use crate::common::upstream::{Script, Upstream};
use crate::common::{Host, client, metric_value, test_plugin};

/// A `gate` stage named `name` that logs its finish calls.
fn logging(name: &str, extra: &str) -> String {
    format!(
        "[stages.{name}]\nplugin = \"{}\"\nconfig = {{ mode = \"noop\", name = \"{name}\"{extra} }}\n\
         capabilities = {{ stores = [\"finish\"] }}\n",
        test_plugin("gate").display()
    )
}

/// Wait until the finish log holds `count` entries; return them in order.
async fn log_entries(redis: &Redis, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seq: usize = redis
            .command(&["GET", "orchestrator:finish:seq"])
            .map_or(0, |s| s.parse().unwrap());
        // An entry is written just after its number is taken.
        let entries: Option<Vec<String>> = (1..=seq)
            .map(|n| redis.command(&["GET", &format!("orchestrator:finish:entry:{n}")]))
            .collect();
        if let Some(entries) = entries.filter(|e| e.len() >= count) {
            return entries;
        }
        assert!(Instant::now() < deadline, "{seq} of {count} finish calls");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_runs_after_each_request_in_reverse_order() {
    let Some(redis) = Redis::start() else { return };
    let upstream = Upstream::start(Script::Endless).await;
    let host = Host::in_process(&format!(
        "[stores.finish]\nkind = \"redis\"\nurl = {:?}\n{}{}{}\
         [pipelines.default]\nstages = [\"first\", \"panicky\", \"inference\", \"last\", \"stream\"]\n\
         [pipelines.streamed]\nstages = [\"first\", \"inference\", \"stream\"]\n\
         [backends.up]\nkind = \"openai\"\nbase_url = {:?}\n\
         [routing]\nmodels = {{ up = {{ backend = \"up\", pipeline = \"streamed\" }} }}\n",
        redis.url(),
        logging("first", ""),
        logging("panicky", ", finish_panic = true"),
        logging("last", ""),
        upstream.base_url,
    ))
    .await;
    // A plain answer: `last`, then `first` (`panicky` panics in between,
    // which changes nothing).
    let response = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens > 0);
    let entries = log_entries(&redis, 2).await;
    assert_eq!(
        entries,
        [
            format!("last:answered:200:{tokens}:"),
            format!("first:answered:200:{tokens}:")
        ]
    );
    let metrics = host.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            "orchestrator_errors_total{error_type=\"trap\",stage=\"panicky\"}"
        ),
        1.0
    );

    // A stream the client cuts after a few words (a pipeline whose stages
    // after the generation all stream): `cancelled`, 499, with the tokens
    // delivered so far.
    let mut response = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .json(&json!({"model": "up", "stream": true,
            "messages": [{"role": "user", "content": "talk forever"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    while seen.matches("word").count() < 3 {
        let chunk = response.chunk().await.unwrap().expect("more events");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(response);
    let entries = log_entries(&redis, 3).await;
    let fields: Vec<&str> = entries[2].split(':').collect();
    assert_eq!(&fields[..3], ["first", "cancelled", "499"], "{entries:?}");
    let delivered: u64 = fields[3].parse().unwrap();
    assert!(delivered >= 3, "{entries:?}");
}
