//! Composing pipelines in the configuration: stages of any name (a bundled
//! plugin or a file), pipelines of them, models routed to a backend and a
//! pipeline; and reloading that configuration (the admin API, SIGHUP,
//! `--watch`, a Kubernetes ConfigMap swap) under load, refusing what is
//! invalid or needs a restart while the running configuration serves on.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    Host, client, config_file, get_json, metric_value, sse, target_dir, test_plugin,
};

const TOKEN: &str = "composition-admin-token-0123456789";

/// The default pipeline's stages.
const DEFAULT_STAGES: [&str; 5] = ["rag", "assemble", "inference", "post", "stream"];
/// The default pipeline with `profanity` after the bundled `post`.
const WITH_PROFANITY: [&str; 6] = [
    "rag",
    "assemble",
    "inference",
    "post",
    "profanity",
    "stream",
];
/// A pipeline without retrieval or post-processing.
const BARE: [&str; 3] = ["assemble", "inference", "stream"];

/// `[stages.profanity]`: the test guest, masking "darn".
fn profanity_stage() -> String {
    format!(
        "[stages.profanity]\nplugin = \"{}\"\nconfig = {{ words = \"darn\" }}\n",
        test_plugin("profanity").display()
    )
}

/// `[pipelines.<name>]` with `stages`.
fn pipeline(name: &str, stages: &[&str]) -> String {
    let stages: Vec<String> = stages.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[pipelines.{name}]\nstages = [{}]\n", stages.join(", "))
}

/// A chat request for `model` asking `question`.
fn chat_request(model: &str, question: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": question}],
    })
}

/// What an answer showed, plain or streamed.
#[derive(Debug)]
struct Answer {
    /// `x-orchestrator-pipeline`.
    pipeline: String,
    /// `x-orchestrator-stages`, split.
    stages: Vec<String>,
    /// The message content, or the streamed deltas concatenated.
    content: String,
    finish_reason: Option<String>,
    /// The plain answer's body (`Null` for a streamed one).
    body: Value,
}

/// Send `request`; `Err` unless it is answered 200 with both composition
/// headers and (plain) a body whose `orchestrator.pipeline` and `.stages`
/// agree with them, or (streamed) well-formed SSE ending with `[DONE]`
/// and no error event.
async fn send(host: &Host, request: &Value) -> Result<Answer, String> {
    let response = client()
        .post(format!("{}/v1/chat/completions", host.api))
        .json(request)
        .send()
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let pipeline = header("x-orchestrator-pipeline");
    let stages = header("x-orchestrator-stages");
    let text = response
        .text()
        .await
        .map_err(|e| format!("status {status}, body cut: {e}"))?;
    if status != 200 {
        return Err(format!("status {status}: {text}"));
    }
    let pipeline = pipeline.ok_or_else(|| format!("no x-orchestrator-pipeline: {text}"))?;
    let stages: Vec<String> = stages
        .ok_or_else(|| format!("no x-orchestrator-stages: {text}"))?
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    if request["stream"] == true {
        let (content, finish_reason) = parse_sse(&text)?;
        return Ok(Answer {
            pipeline,
            stages,
            content,
            finish_reason,
            body: Value::Null,
        });
    }
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))?;
    if body["orchestrator"]["pipeline"] != pipeline.as_str() {
        return Err(format!("header says pipeline {pipeline}, body: {body}"));
    }
    if body["orchestrator"]["stages"] != json!(stages) {
        return Err(format!("header says stages {stages:?}, body: {body}"));
    }
    Ok(Answer {
        pipeline,
        stages,
        content: body["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| format!("no content: {body}"))?
            .to_string(),
        finish_reason: body["choices"][0]["finish_reason"]
            .as_str()
            .map(str::to_string),
        body,
    })
}

/// The content and finish reason of an SSE answer; `Err` unless every
/// event is `data: ...`, none is an error and the last is `[DONE]`.
fn parse_sse(text: &str) -> Result<(String, Option<String>), String> {
    let chunks = sse::try_chunks(text)?;
    if let Some(error) = sse::error(&chunks) {
        return Err(format!("error event: {error}"));
    }
    Ok((sse::content(&chunks), sse::finish_reason(&chunks)))
}

/// What the echo model answers `question` with through `stages`: `post`
/// redacts the address, `profanity` masks "darn".
fn expected(question: &str, stages: &[String]) -> String {
    let mut text = question.to_string();
    if stages.iter().any(|s| s == "post") {
        text = text.replace("ops@example.com", "[redacted email]");
    }
    if stages.iter().any(|s| s == "profanity") {
        text = text.replace("darn", "****");
    }
    text
}

/// `/health`'s `config_hash`.
async fn config_hash(host: &Host) -> String {
    let health = host.health().await;
    health["config_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no config_hash in {health}"))
        .to_string()
}

/// The status of a plain request for `model`.
async fn status_of(host: &Host, model: &str) -> u16 {
    host.chat(&chat_request(model, "are you there", false))
        .await
        .0
}

/// `orchestrator_config_reloads_total{result}`.
fn reloads(metrics: &str, result: &str) -> f64 {
    metric_value(
        metrics,
        &format!("orchestrator_config_reloads_total{{result=\"{result}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_inserted_after_the_bundled_post_masks_what_post_passed_on() {
    let host = Host::with_config(&format!(
        "{}{}",
        profanity_stage(),
        pipeline("default", &WITH_PROFANITY)
    ));
    // 22 tokens; `max_tokens` cuts echo's answer after "it," (so echo
    // itself ends with `length`), and post cuts it earlier, at the stop
    // sequence: the answer ends with `stop`.
    let question =
        "Tell ops@example.com the darn queue is full. Halt here, darn it, and say nothing more";
    let answer = "Tell [redacted email] the **** queue is full.";
    let mut request = chat_request("echo", question, false);
    request["stop"] = json!(["Halt"]);
    request["max_tokens"] = json!(18);

    let plain = send(&host, &request).await.unwrap();
    assert_eq!(plain.content, answer, "{}", plain.body);
    assert_eq!(
        plain.finish_reason.as_deref(),
        Some("stop"),
        "{}",
        plain.body
    );
    assert_eq!(plain.pipeline, "default");
    assert_eq!(plain.stages, WITH_PROFANITY);
    let metadata = &plain.body["orchestrator"]["metadata"];
    assert_eq!(metadata["post.redacted_emails"], "1", "{metadata}");
    assert_eq!(metadata["post.stop_applied"], "true", "{metadata}");
    assert_eq!(metadata["profanity.masked"], "1", "{metadata}");

    request["stream"] = json!(true);
    let streamed = send(&host, &request).await.unwrap();
    assert_eq!(streamed.content, answer);
    assert_eq!(streamed.finish_reason.as_deref(), Some("stop"));
    assert_eq!(streamed.pipeline, "default");
    assert_eq!(streamed.stages, WITH_PROFANITY);

    // Without the stop sequence the text after it comes back, masked too.
    request["stop"] = json!([]);
    request["max_tokens"] = json!(100);
    let streamed = send(&host, &request).await.unwrap();
    assert_eq!(
        streamed.content,
        "Tell [redacted email] the **** queue is full. Halt here, **** it, and say nothing more"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn models_routed_to_different_pipelines_share_one_host() {
    let host = Host::with_config(&format!(
        "{}[stages.scrub]\nbundled = \"post\"\n{}{}{}\
         [routing]\nmodels = {{ a = {{ backend = \"echo\", pipeline = \"chat\" }}, \
         b = {{ backend = \"echo\", pipeline = \"plain\" }}, \
         c = {{ backend = \"echo\", pipeline = \"scrubbed\" }} }}\n",
        profanity_stage(),
        pipeline("chat", &WITH_PROFANITY),
        pipeline("plain", &BARE),
        pipeline("scrubbed", &["assemble", "inference", "scrub", "stream"]),
    ));
    let question = "Mail ops@example.com about the darn queue";
    let cases: [(&str, &str, &[&str], &str); 4] = [
        (
            "a",
            "chat",
            &WITH_PROFANITY,
            "Mail [redacted email] about the **** queue",
        ),
        (
            "b",
            "plain",
            &BARE,
            "Mail ops@example.com about the darn queue",
        ),
        (
            "c",
            "scrubbed",
            &["assemble", "inference", "scrub", "stream"],
            "Mail [redacted email] about the darn queue",
        ),
        (
            "echo",
            "default",
            &DEFAULT_STAGES,
            "Mail [redacted email] about the darn queue",
        ),
    ];
    for (model, pipeline, stages, content) in cases {
        for stream in [false, true] {
            let what = format!("model {model}, stream {stream}");
            let answer = send(&host, &chat_request(model, question, stream))
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(answer.pipeline, pipeline, "{what}");
            assert_eq!(answer.stages, stages, "{what}");
            assert_eq!(answer.content, content, "{what}");
        }
    }

    let models = get_json(&format!("{}/v1/models", host.api)).await;
    let data = models["data"].as_array().unwrap();
    for (model, pipeline, _, _) in cases {
        let entry = data
            .iter()
            .find(|m| m["id"] == model)
            .unwrap_or_else(|| panic!("no model {model} in {models}"));
        assert_eq!(entry["pipeline"], pipeline, "{entry}");
        assert_eq!(entry["owned_by"], "echo", "{entry}");
    }

    let health = host.health().await;
    let pipelines = health["pipelines"].as_array().unwrap();
    for (_, pipeline, stages, _) in cases {
        let entry = pipelines
            .iter()
            .find(|p| p["name"] == pipeline)
            .unwrap_or_else(|| panic!("no pipeline {pipeline} in {health}"));
        assert_eq!(entry["stages"], json!(stages), "{entry}");
    }
    let in_use: Vec<&str> = health["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for stage in WITH_PROFANITY.iter().chain(&["scrub"]) {
        assert!(in_use.contains(stage), "{stage} not in {in_use:?}");
    }
}

#[tokio::test]
async fn a_pipeline_that_cannot_run_is_refused_at_startup() {
    let stderr = Host::try_with_config(&pipeline(
        "chat",
        &["assemble", "inference", "nosuchstage", "stream"],
    ))
    .err()
    .expect("a pipeline naming an undeclared stage is refused");
    assert!(
        stderr.contains("pipelines.chat") && stderr.contains("nosuchstage"),
        "{stderr}"
    );

    let stderr = Host::try_with_config(&format!(
        "[stages.second]\nbundled = \"inference\"\n{}",
        pipeline("chat", &["assemble", "inference", "second", "stream"])
    ))
    .err()
    .expect("two stages granted inference in one pipeline are refused");
    assert!(
        stderr.contains("pipelines.chat") && stderr.contains("inference"),
        "{stderr}"
    );

    let stderr = Host::try_with_config(
        "[routing]\nmodels = { a = { backend = \"echo\", pipeline = \"nowhere\" } }\n",
    )
    .err()
    .expect("a model routed to an unknown pipeline is refused");
    assert!(
        stderr.contains("routing.models.a") && stderr.contains("nowhere"),
        "{stderr}"
    );
}

/// A reload that must be refused: the file's text, and what the refusal's
/// message must mention.
struct Bad {
    what: &'static str,
    toml: String,
    reason: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_reloads_under_load_lose_nothing() {
    // A: m1 and m2 on the default pipeline, m3 on `other`. B adds the
    // profanity stage to the default pipeline and moves m2 to `other`.
    let head = format!("admin_token = \"{TOKEN}\"\n");
    let other = pipeline("other", &BARE);
    let config_a = format!(
        "{head}{other}[routing]\nmodels = {{ m1 = \"echo\", m2 = \"echo\", \
         m3 = {{ backend = \"echo\", pipeline = \"other\" }} }}\n"
    );
    let config_b = format!(
        "{head}{}{}{other}[routing]\nmodels = {{ m1 = \"echo\", \
         m2 = {{ backend = \"echo\", pipeline = \"other\" }}, \
         m3 = {{ backend = \"echo\", pipeline = \"other\" }} }}\n",
        profanity_stage(),
        pipeline("default", &WITH_PROFANITY),
    );
    let (dir, path) = config_file(&config_a);
    let missing = dir.path().join("missing-profanity.wasm");
    let bad = [
        Bad {
            what: "TOML syntax error",
            toml: format!("{config_a}[pipelines.broken\n"),
            reason: "TOML".into(),
        },
        Bad {
            what: "unknown stage",
            toml: format!(
                "{config_a}{}",
                pipeline(
                    "default",
                    &[
                        "rag",
                        "assemble",
                        "inference",
                        "post",
                        "nosuchstage",
                        "stream"
                    ]
                )
            ),
            reason: "nosuchstage".into(),
        },
        Bad {
            what: "missing plugin file",
            toml: format!(
                "{config_a}[stages.profanity]\nplugin = \"{}\"\n{}",
                missing.display(),
                pipeline("default", &WITH_PROFANITY)
            ),
            reason: "missing-profanity.wasm".into(),
        },
        Bad {
            what: "plugin that fails init",
            toml: format!(
                "{config_a}[stages.gate]\nplugin = \"{}\"\n{}",
                test_plugin("broken-init").display(),
                pipeline(
                    "default",
                    &["rag", "gate", "assemble", "inference", "post", "stream"]
                )
            ),
            reason: "broken-init refuses every configuration".into(),
        },
    ];

    let host = Arc::new(Host::start(&["--config", path.to_str().unwrap()]));
    let hash_a = config_hash(&host).await;

    // 8 clients (4 streaming) ask m1 and m2 in turn until told to stop;
    // each answer must be whole and of one configuration: its content is
    // what the stages its headers name make of the question.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, mut answered) = tokio::sync::watch::channel(0usize);
    let done = Arc::new(done);
    let mut clients = Vec::new();
    for c in 0..8 {
        let (host, stop, done) = (host.clone(), stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let stream = c % 2 == 0;
            let mut results = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let model = if n.is_multiple_of(2) { "m1" } else { "m2" };
                let question =
                    format!("client {c} request {n} mailed ops@example.com about the darn queue");
                let result = send(&host, &chat_request(model, &question, stream))
                    .await
                    .and_then(|answer| {
                        let want = expected(&question, &answer.stages);
                        let stages_ok = match answer.pipeline.as_str() {
                            "default" => {
                                answer.stages == DEFAULT_STAGES || answer.stages == WITH_PROFANITY
                            }
                            "other" => model == "m2" && answer.stages == BARE,
                            _ => false,
                        };
                        if !stages_ok || answer.content != want {
                            return Err(format!(
                                "{model} (stream {stream}): pipeline {} stages {:?}, \
                                 content {:?}, expected {want:?}",
                                answer.pipeline, answer.stages, answer.content
                            ));
                        }
                        Ok((
                            model,
                            answer.pipeline,
                            answer.stages.iter().any(|s| s == "profanity"),
                        ))
                    });
                results.push(result);
                done.send_modify(|k| *k += 1);
                n += 1;
            }
            results
        }));
    }

    let mut previous = hash_a.clone();
    let mut hash_b: Option<String> = None;
    for i in 0..20 {
        let to_b = i % 2 == 0;
        std::fs::write(&path, if to_b { &config_b } else { &config_a }).unwrap();
        let (status, report) = host.reload(TOKEN).await;
        assert_eq!(status, 200, "reload {i}: {report}");
        assert_eq!(report["result"], "ok", "reload {i}: {report}");
        assert_eq!(report["previous_hash"], previous.as_str(), "reload {i}");
        let hash = report["hash"].as_str().unwrap().to_string();
        if to_b {
            assert_ne!(hash, hash_a, "B hashes differently from A");
            assert_eq!(*hash_b.get_or_insert(hash.clone()), hash, "reload {i}");
        } else {
            assert_eq!(hash, hash_a, "reload {i}: A again hashes as A");
        }
        previous = hash;

        // Once the reload has answered, new requests get the new config.
        let probe = send(&host, &chat_request("m2", "which way", false))
            .await
            .unwrap();
        assert_eq!(
            probe.pipeline,
            if to_b { "other" } else { "default" },
            "reload {i}"
        );
        let probe = send(&host, &chat_request("m1", "which way", false))
            .await
            .unwrap();
        let want: &[&str] = if to_b {
            &WITH_PROFANITY
        } else {
            &DEFAULT_STAGES
        };
        assert_eq!(probe.stages, want, "reload {i}");

        // Let the clients run under it: 16 answers after this point, so at
        // least 8 were sent after the reload answered (8 are in flight).
        let mark = *answered.borrow() + 16;
        tokio::time::timeout(Duration::from_secs(60), answered.wait_for(|k| *k >= mark))
            .await
            .expect("the clients keep being answered")
            .unwrap();

        if i < 19 {
            let bad = &bad[i % bad.len()];
            std::fs::write(&path, &bad.toml).unwrap();
            let (status, error) = host.reload(TOKEN).await;
            assert_eq!(status, 422, "{}: {error}", bad.what);
            let message = error["error"]["message"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: {error}", bad.what));
            assert!(
                message.contains(&bad.reason),
                "{}: {message:?} does not mention {:?}",
                bad.what,
                bad.reason
            );
            assert_eq!(
                config_hash(&host).await,
                previous,
                "{}: the running config stays",
                bad.what
            );
        }
    }
    // The file holds A, as the host does.
    let (status, report) = host.reload(TOKEN).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "unchanged", "{report}");
    assert_eq!(report["hash"], hash_a.as_str(), "{report}");

    stop.store(true, Ordering::Relaxed);
    let mut answers = 0usize;
    let mut failures = Vec::new();
    let mut m1_masked = [0usize; 2];
    let mut m2_other = [0usize; 2];
    for client in clients {
        for result in client.await.unwrap() {
            answers += 1;
            match result {
                Ok(("m1", _, masked)) => m1_masked[usize::from(masked)] += 1,
                Ok((_, pipeline, _)) => m2_other[usize::from(pipeline == "other")] += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {answers} requests failed during reloads; the first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        m1_masked.iter().chain(&m2_other).all(|&n| n > 0),
        "both configurations served: m1 unmasked/masked {m1_masked:?}, \
         m2 default/other {m2_other:?}"
    );

    let metrics = host.metrics_text().await;
    assert_eq!(reloads(&metrics, "ok"), 20.0);
    assert_eq!(reloads(&metrics, "error"), 19.0);
    assert_eq!(reloads(&metrics, "unchanged"), 1.0);
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("orchestrator_config_info{"))
        .collect();
    assert_eq!(
        info,
        [format!("orchestrator_config_info{{hash=\"{hash_a}\"}} 1")],
        "only the active config"
    );
    assert_eq!(config_hash(&host).await, previous);
    eprintln!("20 reloads (and 19 refused) under load: {answers} requests, none failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config_file() {
    let (_dir, path) = config_file("");
    let host = Host::start(&["--config", path.to_str().unwrap()]);
    let before = config_hash(&host).await;
    assert_eq!(status_of(&host, "fresh").await, 404);

    std::fs::write(
        &path,
        format!(
            "{}[routing]\nmodels = {{ fresh = {{ backend = \"echo\", pipeline = \"plain\" }} }}\n",
            pipeline("plain", &BARE)
        ),
    )
    .unwrap();
    host.send_sighup();
    host.wait_for_log("configuration reloaded", 1).await;

    let question = "Mail ops@example.com about the darn queue";
    let answer = send(&host, &chat_request("fresh", question, false))
        .await
        .unwrap();
    assert_eq!(answer.pipeline, "plain");
    assert_eq!(answer.stages, BARE);
    assert_eq!(answer.content, question, "no post stage, no redaction");
    // The models of before still route as before.
    let answer = send(&host, &chat_request("echo", question, true))
        .await
        .unwrap();
    assert_eq!(answer.pipeline, "default");
    assert_eq!(answer.stages, DEFAULT_STAGES);
    assert_ne!(config_hash(&host).await, before);
    assert_eq!(reloads(&host.metrics_text().await, "ok"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_follows_a_configmap_symlink_swap() {
    // What the kubelet does: the file is `orchestrator.toml ->
    // ..data/orchestrator.toml`, and an update writes a new timestamped
    // directory, points a temporary symlink at it, renames that over
    // `..data` and removes the old directory.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_a")).unwrap();
    std::fs::write(root.join("..2026_a/orchestrator.toml"), "").unwrap();
    symlink("..2026_a", root.join("..data")).unwrap();
    symlink("..data/orchestrator.toml", root.join("orchestrator.toml")).unwrap();
    let plugins = tempfile::tempdir().unwrap();
    let config = root.join("orchestrator.toml");
    let host = Host::start(&[
        "--config",
        config.to_str().unwrap(),
        "--watch",
        "--plugins",
        plugins.path().to_str().unwrap(),
    ]);
    let before = config_hash(&host).await;
    assert_eq!(status_of(&host, "fresh").await, 404);

    std::fs::create_dir(root.join("..2026_b")).unwrap();
    std::fs::write(
        root.join("..2026_b/orchestrator.toml"),
        format!(
            "{}[routing]\nmodels = {{ fresh = {{ backend = \"echo\", pipeline = \"plain\" }} }}\n",
            pipeline("plain", &BARE)
        ),
    )
    .unwrap();
    symlink("..2026_b", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_a")).unwrap();

    host.wait_for_log("configuration reloaded", 1).await;
    let answer = send(&host, &chat_request("fresh", "through the swap", true))
        .await
        .unwrap();
    assert_eq!(answer.pipeline, "plain");
    assert_eq!(answer.stages, BARE);
    assert_eq!(answer.content, "through the swap");
    assert_ne!(config_hash(&host).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_reload_by_sighup_keeps_the_running_config() {
    let good = "[routing]\nmodels = { kept = \"echo\" }\n";
    let (_dir, path) = config_file(good);
    let host = Host::start(&["--config", path.to_str().unwrap()]);
    let before = config_hash(&host).await;

    // A plugin whose init fails, then a TOML syntax error.
    std::fs::write(
        &path,
        format!(
            "{good}[stages.gate]\nplugin = \"{}\"\n{}",
            test_plugin("broken-init").display(),
            pipeline(
                "default",
                &["rag", "gate", "assemble", "inference", "post", "stream"]
            )
        ),
    )
    .unwrap();
    host.send_sighup();
    let log = host.wait_for_log("configuration reload refused", 1).await;
    assert!(
        log.contains("broken-init refuses every configuration"),
        "the reason is logged:\n{log}"
    );
    std::fs::write(&path, format!("{good}[pipelines.default\n")).unwrap();
    host.send_sighup();
    host.wait_for_log("configuration reload refused", 2).await;

    for stream in [false, true] {
        let answer = send(
            &host,
            &chat_request("kept", "still serving ops@example.com", stream),
        )
        .await
        .unwrap();
        assert_eq!(answer.pipeline, "default");
        assert_eq!(answer.stages, DEFAULT_STAGES);
        assert_eq!(answer.content, "still serving [redacted email]");
    }
    assert_eq!(config_hash(&host).await, before);
    let metrics = host.metrics_text().await;
    assert_eq!(reloads(&metrics, "error"), 2.0);
    assert_eq!(reloads(&metrics, "ok"), 0.0);
    assert!(
        metrics.contains(&format!("orchestrator_config_info{{hash=\"{before}\"}} 1")),
        "{metrics}"
    );
    // The refused configuration's new stage left no series behind.
    assert!(!metrics.contains("stage=\"gate\""), "{metrics}");

    // Once the file is fixed, the next SIGHUP applies it.
    std::fs::write(
        &path,
        format!(
            "{good}{}{}",
            profanity_stage(),
            pipeline("default", &WITH_PROFANITY)
        ),
    )
    .unwrap();
    host.send_sighup();
    host.wait_for_log("configuration reloaded", 1).await;
    let answer = send(&host, &chat_request("kept", "darn it", false))
        .await
        .unwrap();
    assert_eq!(answer.stages, WITH_PROFANITY);
    assert_eq!(answer.content, "**** it");
    assert!(host.metrics_text().await.contains("stage=\"profanity\""));

    // A reload that retires the stage retires its series.
    std::fs::write(&path, good).unwrap();
    host.send_sighup();
    host.wait_for_log("configuration reloaded", 2).await;
    let metrics = host.metrics_text().await;
    assert!(!metrics.contains("stage=\"profanity\""), "{metrics}");
    assert!(metrics.contains("orchestrator_requests_total{stage=\"post\"}"));
}

/// Start the binary with only `--config <config>`, from `dir`: without the
/// harness's `--listen`, `--metrics-listen` and `--cache-dir` flags (which
/// would override the file's keys, and hide a change of them), which a
/// wrapper script drops.
fn host_configured_by_file_only(dir: &Path, config: &Path) -> Host {
    let script = dir.join("orchestrator.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec '{}' --config '{}'\n",
            env!("CARGO_BIN_EXE_orchestrator"),
            config.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    Host::start_program(&script, dir, &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_that_needs_a_restart_is_refused() {
    let cache = target_dir().join("test-cache");
    let other_cache = tempfile::tempdir().unwrap();
    let config = |listen: &str, metrics: &str, cache: &Path, fresh: bool| {
        let mut text = format!(
            "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\ncache_dir = \"{}\"\n\
             admin_token = \"{TOKEN}\"\n",
            cache.display()
        );
        if fresh {
            text.push_str("[routing]\nmodels = { fresh = \"echo\" }\n");
        }
        text
    };
    let any = "127.0.0.1:0";
    let (dir, path) = config_file(&config(any, any, &cache, false));
    let host = host_configured_by_file_only(dir.path(), &path);
    let before = config_hash(&host).await;

    // Each alongside a change that could be applied (a new model): the
    // whole reload is refused.
    for (key, toml) in [
        ("listen", config("127.0.0.1:1", any, &cache, true)),
        ("metrics_listen", config(any, "127.0.0.1:1", &cache, true)),
        ("cache_dir", config(any, any, other_cache.path(), true)),
    ] {
        std::fs::write(&path, toml).unwrap();
        let (status, error) = host.reload(TOKEN).await;
        assert_eq!(status, 422, "{key}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(key) && message.contains("restart"),
            "{key}: {message:?}"
        );
        assert_eq!(status_of(&host, "fresh").await, 404, "{key}");
        assert_eq!(config_hash(&host).await, before, "{key}");
    }
    host.wait_for_log("configuration reload refused", 3).await;
    assert_eq!(reloads(&host.metrics_text().await, "error"), 3.0);
    assert_eq!(status_of(&host, "echo").await, 200);

    // Without the restart-only change, the same file is applied.
    std::fs::write(&path, config(any, any, &cache, true)).unwrap();
    let (status, report) = host.reload(TOKEN).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["previous_hash"], before.as_str(), "{report}");
    assert_eq!(status_of(&host, "fresh").await, 200);
}

/// Any stage takes part in everything the five defaults do: a pipeline of
/// ten stages (six of them copies of the bundled `post`) answers plain and
/// streamed; a declared stage's series exist under its configured name; it
/// can be hot-swapped by name through the admin API and its plugin file
/// taken from the plugins directory (`--plugins DIR` with `<name>.wasm`).
#[tokio::test(flavor = "multi_thread")]
async fn any_stage_counts_swaps_and_loads_like_the_five() {
    let plugins = tempfile::tempdir().unwrap();
    std::fs::copy(
        test_plugin("profanity"),
        plugins.path().join("profanity.wasm"),
    )
    .unwrap();
    let mut long = vec!["rag", "assemble", "inference"];
    let copies: Vec<String> = (1..=6).map(|n| format!("post-{n}")).collect();
    long.extend(copies.iter().map(String::as_str));
    long.push("stream");
    let mut toml = format!(
        "admin_token = \"{TOKEN}\"\nplugins_dir = \"{}\"\n",
        plugins.path().display()
    );
    for copy in &copies {
        toml.push_str(&format!("[stages.{copy}]\nbundled = \"post\"\n"));
    }
    toml.push_str("[stages.profanity]\nconfig = { words = \"darn\" }\n");
    toml.push_str(&pipeline("long", &long));
    toml.push_str(&pipeline("default", &WITH_PROFANITY));
    toml.push_str("[routing]\nmodels = { long = { backend = \"echo\", pipeline = \"long\" } }\n");
    let host = Host::with_config(&toml);

    for stream in [false, true] {
        let answer = send(&host, &chat_request("long", "ten stages ran", stream))
            .await
            .unwrap();
        assert_eq!(answer.stages, long, "{answer:?}");
        assert!(answer.content.contains("ten stages ran"), "{answer:?}");
    }
    let metrics = host.metrics_text().await;
    for copy in &copies {
        let series = format!("orchestrator_requests_total{{stage=\"{copy}\"}}");
        assert_eq!(metric_value(&metrics, &series), 2.0, "{series}");
    }

    // `profanity` came from the plugins directory; swap it by name for
    // `shout` (a plain stage) and back.
    let masked = send(&host, &chat_request("echo", "darn it", false))
        .await
        .unwrap();
    assert!(masked.content.contains("**** it"), "{masked:?}");
    let put = |bytes: Vec<u8>| {
        let host = &host;
        async move {
            client()
                .put(format!("{}/admin/stages/profanity", host.api))
                .bearer_auth(TOKEN)
                .body(bytes)
                .send()
                .await
                .unwrap()
        }
    };
    let swapped = put(std::fs::read(test_plugin("shout")).unwrap()).await;
    assert_eq!(swapped.status(), 200, "{}", swapped.text().await.unwrap());
    let shouted = send(&host, &chat_request("echo", "darn it", false))
        .await
        .unwrap();
    assert!(shouted.content.contains("DARN IT"), "{shouted:?}");
    let health = host.health().await;
    let stage = health["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "profanity")
        .cloned()
        .unwrap();
    assert_eq!(stage["plugin"]["source"], "upload", "{stage}");
    let back = client()
        .post(format!("{}/admin/stages/profanity/rollback", host.api))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), 200);
    let masked = send(&host, &chat_request("echo", "darn it", false))
        .await
        .unwrap();
    assert!(masked.content.contains("**** it"), "{masked:?}");
}

/// A reload cannot resize the wasm engine: a configuration that needs fuel
/// metering (off at startup), more instance slots than the pool has, or a
/// larger memory cap is refused with what it needs, and a mistyped key in
/// a model's route is refused, not ignored; the running configuration
/// keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_the_engine_cannot_take_is_refused_with_what_it_needs() {
    let head = format!("admin_token = \"{TOKEN}\"\n");
    let (_dir, path) = config_file(&head);
    let host = Host::start(&["--config", path.to_str().unwrap()]);
    let before = config_hash(&host).await;
    let cases = [
        ("[stages.post]\nfuel = 1000000\n", "fuel metering was off"),
        ("[stages.rag]\nworkers = 200\n", "instance slots"),
        (
            "[stages.post]\nmax_memory_bytes = 2147483648\n",
            "max_memory_bytes",
        ),
        (
            "[routing]\nmodels = { m = { backend = \"echo\", pipelne = \"default\" } }\n",
            "no other keys",
        ),
    ];
    for (change, reason) in cases {
        std::fs::write(&path, format!("{head}{change}")).unwrap();
        let (status, body) = host.reload(TOKEN).await;
        assert_eq!(status, 422, "{change}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{change}: {message}");
        assert_eq!(status_of(&host, "echo").await, 200);
    }
    assert_eq!(config_hash(&host).await, before);
    let metrics = host.metrics_text().await;
    assert_eq!(reloads(&metrics, "error"), 4.0);
}
