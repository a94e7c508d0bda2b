//! The OpenAI-compatible API: every stage visibly ran, streaming is
//! well-formed SSE, bad requests get OpenAI-shaped 4xx errors.

use serde_json::{Value, json};

use crate::common::{Host, ask, client, get_json, sse};

fn metadata<'a>(body: &'a Value, key: &str) -> &'a str {
    body["orchestrator"]["metadata"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no metadata {key} in {body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completion_shows_every_stage_ran() {
    let host = Host::start(&[]);
    let question =
        "What is backpressure? Write to ops@example.com with key sk-abcdefghijklmnop123456.";
    let (status, text) = host.chat(&ask(question)).await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "echo");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));

    // rag: retrieved passages from the bundled corpus, best first.
    let sources = body["orchestrator"]["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 3, "{body}");
    assert_eq!(sources[0]["source"], "backpressure.md");
    assert_eq!(metadata(&body, "rag.passages"), "3");

    // assemble: the prompt holds the system prompt and context, so it is
    // far longer than the question.
    assert_eq!(metadata(&body, "assemble.passages_used"), "3");
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        metadata(&body, "assemble.prompt_tokens"),
        prompt_tokens.to_string()
    );
    assert!(prompt_tokens > 100, "{prompt_tokens}");

    // inference (echo) + post: the question comes back, redacted.
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        content,
        "What is backpressure? Write to [redacted email] with key [redacted key]."
    );
    assert_eq!(metadata(&body, "post.redacted_emails"), "1");
    assert_eq!(metadata(&body, "post.redacted_keys"), "1");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // stream: the completion was split into chunks.
    assert!(
        body["orchestrator"]["chunks"].as_u64().unwrap() >= 3,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_is_well_formed_sse_matching_the_plain_answer() {
    let host = Host::start(&[]);
    let question =
        "Explain admission control, the bounded queues and the shed counter in detail please";
    let (_, plain) = host.chat(&ask(question)).await;
    let plain: Value = serde_json::from_str(&plain).unwrap();

    let mut request = ask(question);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = host.post(&request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let chunks = sse::chunks(&response.text().await.unwrap());
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let id = &chunks[0]["id"];
    assert!(chunks.iter().all(|c| &c["id"] == id), "one id per stream");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");

    assert_eq!(
        sse::content(&chunks),
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let content_chunks = sse::pieces(&chunks).len();
    assert!(content_chunks >= 3, "{content_chunks} chunks");

    // The finish chunk, then the usage chunk (include_usage).
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], plain["usage"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_shaped_errors() {
    let host = Host::with_config("max_body_bytes = 2048\n");
    let url = format!("{}/v1/chat/completions", host.api);
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "malformed JSON",
            "{\"model\": \"echo\", \"messages\": [".into(),
            400,
        ),
        ("not an object", "[1,2]".into(), 400),
        ("missing messages", r#"{"model":"echo"}"#.into(), 400),
        (
            "empty messages",
            r#"{"model":"echo","messages":[]}"#.into(),
            400,
        ),
        (
            "messages of the wrong type",
            r#"{"model":"echo","messages":"hello"}"#.into(),
            400,
        ),
        (
            "content of the wrong type",
            r#"{"model":"echo","messages":[{"role":"user","content":5}]}"#.into(),
            400,
        ),
        (
            "model of the wrong type",
            r#"{"model":7,"messages":[{"role":"user","content":"x"}]}"#.into(),
            400,
        ),
        (
            "unknown role",
            r#"{"model":"echo","messages":[{"role":"wizard","content":"x"}]}"#.into(),
            400,
        ),
        (
            "unknown model",
            r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
        ),
        (
            "oversized body",
            format!(
                r#"{{"model":"echo","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(4096)
            ),
            413,
        ),
    ];
    for (what, body, expected) in cases {
        let response = client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{what}");
        let error: Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{what}: not JSON: {e}"));
        let message = error["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {error}"));
        assert!(!message.is_empty(), "{what}");
        assert!(error["error"]["type"].is_string(), "{what}: {error}");
        assert!(
            error["error"].get("param").is_some() && error["error"].get("code").is_some(),
            "{what}: {error}"
        );
    }

    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let response = client()
        .get(format!("{}/v1/nothing", host.api))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "not_found");

    // The host is unharmed.
    let (status, _) = host.chat(&ask("still there?")).await;
    assert_eq!(status, 200);
    let models = get_json(&format!("{}/v1/models", host.api)).await;
    assert_eq!(models["data"][0]["id"], "echo");
}

/// `max_tokens` is bounded per backend (`max_tokens_limit`, 32768 by
/// default): a request above it is refused with 400 naming the limit,
/// before any work, rather than costing memory and CPU in proportion.
#[tokio::test]
async fn max_tokens_above_the_backends_limit_is_refused() {
    let host = Host::with_config("[backends.echo]\nkind = \"echo\"\nmax_tokens_limit = 100\n");
    let mut body = ask("hello");
    body["max_tokens"] = serde_json::json!(4_294_967_295u64);
    let (status, text) = host.chat(&body).await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("above the limit of 100 for model `echo`")
            && text.contains("max_tokens_limit"),
        "{text}"
    );
    body["max_tokens"] = serde_json::json!(100);
    let (status, text) = host.chat(&body).await;
    assert_eq!(status, 200, "{text}");
}
