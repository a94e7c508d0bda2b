//! Metrics: exact counts after N requests, every series live, and an
//! exposition that `promtool check metrics` accepts.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::common::{Host, ask, metric_value, sse, tool_missing};

const STAGES: [&str; 5] = ["rag", "assemble", "inference", "post", "stream"];

#[tokio::test(flavor = "multi_thread")]
async fn counters_histograms_and_tokens_match_the_requests_sent() {
    let host = Host::start(&[]);
    const N: usize = 12;
    let mut completion_tokens = 0;
    for n in 0..N {
        let mut request = ask(&format!(
            "Question number {n}: how do plugins get their corpus?"
        ));
        if n % 3 == 0 {
            request["stream"] = json!(true);
            request["stream_options"] = json!({"include_usage": true});
        }
        let response = host.post(&request).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        let usage: Value = if n % 3 == 0 {
            sse::chunks(&text).last().unwrap()["usage"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
        };
        completion_tokens += usage["completion_tokens"].as_u64().unwrap();
    }

    let text = host.metrics_text().await;
    let n = N as f64;
    for stage in STAGES {
        let label = format!("{{stage=\"{stage}\"}}");
        assert_eq!(
            metric_value(&text, &format!("orchestrator_requests_total{label}")),
            n,
            "{stage}"
        );
        assert_eq!(
            metric_value(
                &text,
                &format!("orchestrator_stage_duration_seconds_count{label}")
            ),
            n,
            "{stage}"
        );
        assert_eq!(
            metric_value(&text, &format!("orchestrator_queue_depth{label}")),
            0.0,
            "{stage}"
        );
        assert_eq!(
            metric_value(&text, &format!("orchestrator_queue_capacity{label}")),
            1024.0
        );
        assert_eq!(
            metric_value(&text, &format!("orchestrator_requests_shed_total{label}")),
            0.0
        );
        // Warm wasm calls take microseconds to milliseconds: they must not
        // all land in one bucket at the top or bottom of the scale.
        let le_10s = metric_value(
            &text,
            &format!("orchestrator_stage_duration_seconds_bucket{{stage=\"{stage}\",le=\"10\"}}"),
        );
        assert_eq!(le_10s, n);
    }
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_request_duration_seconds_count{outcome=\"ok\"}"
        ),
        n
    );
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_request_duration_seconds_count{outcome=\"error\"}"
        ),
        0.0
    );
    assert_eq!(
        metric_value(
            &text,
            "orchestrator_tokens_generated_total{worker_type=\"echo\"}"
        ),
        completion_tokens as f64
    );
    assert!(completion_tokens > 0);
    assert_eq!(
        metric_value(&text, "orchestrator_build_info{version=\"0.1.0\"}"),
        1.0
    );
    assert!(metric_value(&text, "process_resident_memory_bytes") > 0.0);
    for stage in STAGES {
        assert!(
            text.lines()
                .any(|l| l.starts_with("orchestrator_plugin_info{sha256=\"")
                    && l.contains(&format!("stage=\"{stage}\""))
                    && l.ends_with(" 1")),
            "plugin_info for {stage}"
        );
    }

    // /health agrees.
    let health = host.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["stages"].as_array().unwrap().len(), 5);
    for stage in health["stages"].as_array().unwrap() {
        assert_eq!(stage["queue_depth"], 0);
        assert_eq!(stage["in_flight"], 0);
        assert_eq!(stage["plugin"]["source"], "bundled");
        assert_eq!(stage["plugin"]["sha256"].as_str().unwrap().len(), 64);
    }

    if !tool_missing("promtool") {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn per_request_instances_are_dropped_after_each_request() {
    let host = Host::with_config(
        "[stages.post]\ninstance_mode = \"per-request\"\n[stages.stream]\nrecycle_after = 2\nworkers = 1\n",
    );
    for n in 0..5 {
        let (status, text) = host
            .chat(&ask(&format!("request {n} to ops@example.com")))
            .await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("[redacted email]"), "{text}");
    }
    let text = host.metrics_text().await;
    assert_eq!(
        metric_value(&text, "orchestrator_plugin_instances{stage=\"post\"}"),
        0.0
    );
    assert_eq!(
        metric_value(&text, "orchestrator_requests_total{stage=\"post\"}"),
        5.0
    );
    // Reuse with recycle_after = 2: one live instance, replaced every 2 calls.
    assert_eq!(
        metric_value(&text, "orchestrator_plugin_instances{stage=\"stream\"}"),
        1.0
    );
}
