//! Faithful by default: the client's chat reaches the model as it was sent
//! (roles, the system prompt, content parts, tools and tool calls, the
//! response format, every parameter, fields the host does not know),
//! through the default pipeline, plain and streamed; the model's tool
//! calls reach the client, whole and in pieces; what a backend cannot do
//! is refused with 400; and stages built against the 0.1 contract still
//! see and change the text they always saw.
//!
//! The upstream is the scripted one (`common::upstream`), which records
//! every request body it receives.

use serde_json::{Value, json};

use crate::common::upstream::{Script, Upstream};
use crate::common::{Host, sse, test_plugin};

/// A host routing `gpt-test` to `upstream` through the default pipeline.
async fn host(upstream: &Upstream, extra: &str) -> Host {
    Host::in_process(&format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n{extra}\n\
         [routing.models]\ngpt-test = \"up\"\n",
        upstream.base_url
    ))
    .await
}

/// A request an agent framework sends: a system prompt, a multi-turn chat
/// with an earlier tool call and its result, an image, tools, a tool
/// choice, JSON mode, sampling parameters and a field no host knows yet.
fn agent_request(stream: bool) -> Value {
    json!({
        "model": "gpt-test",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are a pirate. Answer in JSON."},
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"sky\":\"clear\"}"},
            {"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "And what is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "strict": true}}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "response_format": {"type": "json_object"},
        "top_p": 0.9,
        "seed": 1234,
        "presence_penalty": 0.5,
        "logit_bias": {"50256": -100},
        "user": "user-42",
        "x_vendor_extension": {"keep": ["me", 1]}
    })
}

/// What the upstream must have received for `sent`: the same document,
/// with the host's `stream` and `stream_options` in place of the client's
/// (a stream with its usage for a streaming client, neither for one that
/// wants one answer).
fn assert_received_as_sent(received: &Value, sent: &Value) {
    let mut expected = sent.clone();
    let expected = expected.as_object_mut().unwrap();
    let streams = expected.remove("stream") == Some(json!(true));
    expected.remove("stream_options");
    let mut received = received.clone();
    let received_map = received.as_object_mut().unwrap();
    if streams {
        assert_eq!(received_map.remove("stream"), Some(json!(true)));
        assert_eq!(
            received_map.remove("stream_options"),
            Some(json!({"include_usage": true}))
        );
    }
    assert_eq!(&received, &Value::Object(expected.clone()));
    // Nothing the client did not set: no max_tokens, no temperature.
    assert!(received.get("max_tokens").is_none(), "{received}");
    assert!(received.get("temperature").is_none(), "{received}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_receives_the_chat_exactly_as_the_client_sent_it() {
    let upstream = Upstream::start(Script::Agent).await;
    let host = host(&upstream, "").await;
    for stream in [false, true] {
        let sent = agent_request(stream);
        let (status, text) = host.chat(&sent).await;
        assert_eq!(status, 200, "{text}");
        let bodies = upstream.bodies.lock().unwrap().clone();
        let received = bodies.last().expect("a request upstream");
        assert_received_as_sent(received, &sent);
        // The default pipeline's `rag` retrieves from the demo corpus only
        // for `echo`: nothing was added to the chat.
        assert_eq!(received["messages"].as_array().unwrap().len(), 5);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_schema_and_max_completion_tokens_pass_through() {
    let upstream = Upstream::start(Script::Agent).await;
    let host = host(&upstream, "").await;
    let sent = json!({
        "model": "gpt-test",
        "messages": [{"role": "developer", "content": "Reply as the schema says."},
                     {"role": "tool", "tool_call_id": "x", "content": "42"}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "strict": true,
            "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}},
        "max_completion_tokens": 77,
        "temperature": 0.25,
        "stop": ["END"],
    });
    let (status, text) = host.chat(&sent).await;
    assert_eq!(status, 200, "{text}");
    let received = upstream.bodies.lock().unwrap().last().cloned().unwrap();
    // A plain request: the upstream is asked for one answer too.
    assert_eq!(received, sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_reach_the_client_whole_and_in_pieces() {
    let upstream = Upstream::start(Script::Agent).await;
    let host = host(&upstream, "").await;
    let ask = |stream: bool| {
        json!({"model": "gpt-test", "stream": stream,
               "messages": [{"role": "user", "content": "Weather in Paris?"}],
               "tools": agent_request(false)["tools"].clone()})
    };
    let (status, text) = host.chat(&ask(false)).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{text}");
    assert_eq!(choice["message"]["content"], Value::Null, "{text}");
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{"id": "call_abc123", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
    );
    assert_eq!(answer["usage"]["completion_tokens"], 9);

    let (status, text) = host.chat(&ask(true)).await;
    assert_eq!(status, 200, "{text}");
    let events = sse::chunks(&text);
    let pieces: Vec<&Value> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(
        pieces.len(),
        3,
        "streamed as the upstream sent them: {text}"
    );
    let arguments: String = pieces
        .iter()
        .filter_map(|p| p["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"city\":\"Paris\"}");
    assert_eq!(pieces[0]["id"], "call_abc123");
    let finish: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["tool_calls"], "{text}");
}

/// A plain stage after the generating one collects the stream before it
/// runs: the answer's tool calls then reach a streaming client whole, in one
/// chunk before the last, and the 0.1 stage that saw the flattened answer
/// left its finish reason and its calls as they were.
#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_collected_before_a_plain_stage_are_streamed_whole() {
    let upstream = Upstream::start(Script::Agent).await;
    let plain = test_plugin("shout");
    let host = host(
        &upstream,
        &format!(
            "[stages.shout]\nplugin = \"{}\"\n\
             [pipelines.default]\nstages = [\"inference\", \"shout\"]\n",
            plain.display()
        ),
    )
    .await;
    let (status, text) = host
        .chat(&json!({"model": "gpt-test", "stream": true,
                      "messages": [{"role": "user", "content": "Weather in Paris?"}],
                      "tools": agent_request(false)["tools"].clone()}))
        .await;
    assert_eq!(status, 200, "{text}");
    let chunks = sse::chunks(&text);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    assert_eq!(
        calls,
        [&json!({"index": 0, "id": "call_abc123", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}})],
        "{text}"
    );
    assert_eq!(sse::finish_reason(&chunks).as_deref(), Some("tool_calls"));
}

#[tokio::test(flavor = "multi_thread")]
async fn what_echo_cannot_do_is_refused_naming_the_field() {
    let host = Host::start(&[]);
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        ("tool_choice", json!("required")),
        ("response_format", json!({"type": "json_object"})),
    ] {
        let mut body = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
        body[field] = value;
        let (status, text) = host.chat(&body).await;
        assert_eq!(status, 400, "{field}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["param"], field, "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_refusal_of_a_parameter_is_a_400_with_its_reason() {
    let upstream = Upstream::start(Script::FailThen {
        status: 400,
        retry_after: None,
        times: 1,
        then: vec!["never"],
    })
    .await;
    let host = host(&upstream, "").await;
    let (status, text) = host
        .chat(
            &json!({"model": "gpt-test", "messages": [{"role": "user", "content": "x"}],
                      "reasoning_effort": "extreme"}),
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("scripted 400"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_0_1_stage_sees_text_and_its_changes_keep_the_rest_of_the_chat() {
    let upstream = Upstream::start(Script::Agent).await;
    // `legacy-handle` is built against the 0.1.2 contract: it upper-cases
    // the text of the last user message through `set-messages`.
    let plugin = test_plugin("legacy-handle");
    let host = host(
        &upstream,
        &format!(
            "[stages.shout]\nplugin = \"{}\"\n\
             [pipelines.default]\nstages = [\"shout\", \"rag\", \"assemble\", \"inference\", \"post\", \"stream\"]\n",
            plugin.display()
        ),
    )
    .await;
    let sent = agent_request(false);
    let (status, text) = host.chat(&sent).await;
    assert_eq!(status, 200, "{text}");
    let received = upstream.bodies.lock().unwrap().last().cloned().unwrap();
    let messages = received["messages"].as_array().unwrap();
    // The messages it left as they were keep their form (the tool call,
    // the tool result's id); the one it changed became text.
    for at in 0..4 {
        assert_eq!(messages[at], sent["messages"][at], "message {at}");
    }
    assert_eq!(
        messages[4],
        json!({"role": "user", "content": "AND WHAT IS IN THIS PICTURE?"})
    );
    assert_eq!(received["tools"], sent["tools"]);
    assert_eq!(received["seed"], sent["seed"]);
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["orchestrator"]["metadata"]["shout.messages"], "5");
}
