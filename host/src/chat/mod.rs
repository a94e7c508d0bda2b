//! The chat as the client sent it: messages, tools, generation parameters,
//! and the answer's tool calls, in the OpenAI Chat Completions wire form.
//!
//! One model for the whole path: the API parses a request into these types
//! ([`ChatRequest`]), the stages read and change them (the wasm runtime
//! converts them to and from the WIT records of `orchestrator:pipeline`),
//! and the `openai` backend serializes them upstream. Whatever a type does
//! not model is kept in its `extra` map and serialized back unchanged, so
//! that a parameter, a message field or a content part newer than this
//! host reaches the model as the client sent it. Serializing a parsed value
//! gives the same JSON, apart from key order and whitespace.

mod message;
mod request;
mod tools;

pub use message::{Content, ContentPart, Extra, Message, ToolCall, Usage, count_tokens};
pub use request::{
    ChatRequest, MESSAGE_FIELDS, MODELLED_FIELDS, Params, StreamOptions, TOOL_FIELDS,
    extra_from_text, extra_text,
};
pub use tools::{Tool, ToolCallDelta, ToolCalls};

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_request_round_trips_to_the_same_json() {
        let body = json!({
            "model": "m", "temperature": 0.7, "top_p": 0.9, "seed": 42, "max_completion_tokens": 9,
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "logit_bias": {"50256": -100}, "brand_new_parameter": [1, 2],
            "tools": [{"type": "function", "function": {"name": "weather", "description": "d",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": true}}],
            "messages": [
                {"role": "system", "content": "You are a pirate."},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "..", "format": "wav"}},
                    {"type": "text", "text": "cached", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "assistant", "content": "ok", "refusal": null, "audio": {"id": "a"}}
            ]
        });
        let request: ChatRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(request.params.extra.len(), 2, "{:?}", request.params.extra);
        let parts = match &request.messages[1].content {
            Some(Content::Parts(parts)) => parts,
            other => panic!("{other:?}"),
        };
        assert!(matches!(parts[1], ContentPart::ImageUrl { .. }));
        assert!(matches!(parts[2], ContentPart::Other(_)));
        assert!(matches!(parts[3], ContentPart::Other(_)));
        assert_eq!(request.messages[1].text(), "What is this?\ncached");
        // Back to JSON: the same document.
        let mut again = serde_json::to_value(&request.params).unwrap();
        again["messages"] = serde_json::to_value(&request.messages).unwrap();
        again["tools"] = serde_json::to_value(request.tools.as_ref().unwrap()).unwrap();
        assert_eq!(again, body);
    }
}
