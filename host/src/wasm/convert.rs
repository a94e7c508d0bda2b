//! The chat ([`crate::chat`]) to and from the WIT records of the current
//! contract (`wit/`, 0.2.x): what a `request` getter hands a stage, and
//! what a setter takes back. JSON a stage sets (`extra`, `tool-choice`,
//! `response-format`, a tool's `parameters`, an `other` content part) is
//! checked here; a setter given invalid JSON fails the stage's call.

use serde_json::Value;

use super::bindings::v2::orchestrator::pipeline::types as wit;
use super::envelope::Passage;
use crate::chat::{
    Content, ContentPart, MESSAGE_FIELDS, MODELLED_FIELDS, Message, Params, TOOL_FIELDS, Tool,
    ToolCall, Usage, extra_from_text, extra_text,
};

/// A message as a stage sees it.
pub fn message_to_wit(message: &Message) -> wit::Message {
    wit::Message {
        role: message.role.clone(),
        content: message.content.as_ref().map(|content| match content {
            Content::Text(text) => wit::Content::Text(text.clone()),
            Content::Parts(parts) => wit::Content::Parts(parts.iter().map(part_to_wit).collect()),
        }),
        name: message.name.clone(),
        tool_calls: message.tool_calls.iter().map(tool_call_to_wit).collect(),
        tool_call_id: message.tool_call_id.clone(),
        extra: extra_text(&message.extra),
    }
}

fn part_to_wit(part: &ContentPart) -> wit::ContentPart {
    match part {
        ContentPart::Text(text) => wit::ContentPart::Text(text.clone()),
        ContentPart::ImageUrl { url, detail } => wit::ContentPart::ImageUrl(wit::ImageUrl {
            url: url.clone(),
            detail: detail.clone(),
        }),
        ContentPart::Other(object) => wit::ContentPart::Other(extra_text(object)),
    }
}

/// A message a stage set.
pub fn message_from_wit(message: wit::Message) -> Result<Message, String> {
    let content = match message.content {
        None => None,
        Some(wit::Content::Text(text)) => Some(Content::Text(text)),
        Some(wit::Content::Parts(parts)) => Some(Content::Parts(
            parts
                .into_iter()
                .map(part_from_wit)
                .collect::<Result<_, _>>()?,
        )),
    };
    Ok(Message {
        role: message.role,
        content,
        name: message.name,
        tool_calls: message
            .tool_calls
            .into_iter()
            .map(tool_call_from_wit)
            .collect(),
        tool_call_id: message.tool_call_id,
        extra: extra_from_text(&message.extra, &MESSAGE_FIELDS)
            .map_err(|e| format!("a message's {e}"))?,
    })
}

fn part_from_wit(part: wit::ContentPart) -> Result<ContentPart, String> {
    Ok(match part {
        wit::ContentPart::Text(text) => ContentPart::Text(text),
        wit::ContentPart::ImageUrl(image) => ContentPart::ImageUrl {
            url: image.url,
            detail: image.detail,
        },
        wit::ContentPart::Other(json) => {
            let object = serde_json::from_str(&json)
                .map_err(|e| format!("an `other` content part must be a JSON object: {e}"))?;
            ContentPart::from_object(object)?
        }
    })
}

/// A tool call as a stage sees it.
pub fn tool_call_to_wit(call: &ToolCall) -> wit::ToolCall {
    wit::ToolCall {
        id: call.id.clone(),
        kind: call.kind.clone(),
        name: call.name.clone(),
        arguments: call.arguments.clone(),
    }
}

/// A tool call a stage set.
pub fn tool_call_from_wit(call: wit::ToolCall) -> ToolCall {
    ToolCall {
        id: call.id,
        kind: call.kind,
        name: call.name,
        arguments: call.arguments,
    }
}

/// A tool as a stage sees it.
pub fn tool_to_wit(tool: &Tool) -> wit::Tool {
    wit::Tool {
        kind: tool.kind.clone(),
        name: tool.name.clone(),
        description: tool.description.clone(),
        parameters: tool.parameters.as_ref().map(Value::to_string),
        strict: tool.strict,
        extra: extra_text(&tool.extra),
    }
}

/// A tool a stage set.
pub fn tool_from_wit(tool: wit::Tool) -> Result<Tool, String> {
    Ok(Tool {
        kind: tool.kind,
        name: tool.name,
        description: tool.description,
        parameters: tool
            .parameters
            .map(|p| json(&p, "a tool's `parameters`"))
            .transpose()?,
        strict: tool.strict,
        extra: extra_from_text(&tool.extra, &TOOL_FIELDS).map_err(|e| format!("a tool's {e}"))?,
    })
}

/// The parameters as a stage sees them.
pub fn params_to_wit(params: &Params) -> wit::GenerationParams {
    wit::GenerationParams {
        model: params.model.clone(),
        max_tokens: params.max_tokens,
        max_completion_tokens: params.max_completion_tokens,
        temperature: params.temperature,
        top_p: params.top_p,
        stop: params.stop.clone(),
        seed: params.seed,
        presence_penalty: params.presence_penalty,
        frequency_penalty: params.frequency_penalty,
        n: params.n,
        logprobs: params.logprobs,
        top_logprobs: params.top_logprobs,
        user: params.user.clone(),
        parallel_tool_calls: params.parallel_tool_calls,
        tool_choice: params.tool_choice.as_ref().map(Value::to_string),
        response_format: params.response_format.as_ref().map(Value::to_string),
        extra: extra_text(&params.extra),
    }
}

/// Parameters a stage set.
pub fn params_from_wit(params: wit::GenerationParams) -> Result<Params, String> {
    Ok(Params {
        model: params.model,
        max_tokens: params.max_tokens,
        max_completion_tokens: params.max_completion_tokens,
        temperature: params.temperature,
        top_p: params.top_p,
        stop: params.stop,
        seed: params.seed,
        presence_penalty: params.presence_penalty,
        frequency_penalty: params.frequency_penalty,
        n: params.n,
        logprobs: params.logprobs,
        top_logprobs: params.top_logprobs,
        user: params.user,
        parallel_tool_calls: params.parallel_tool_calls,
        tool_choice: params
            .tool_choice
            .map(|c| json(&c, "`tool-choice`"))
            .transpose()?,
        response_format: params
            .response_format
            .map(|f| json(&f, "`response-format`"))
            .transpose()?,
        extra: extra_from_text(&params.extra, &MODELLED_FIELDS)
            .map_err(|e| format!("the parameters' {e}"))?,
    })
}

fn json(text: &str, what: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{what} must be JSON text: {e}"))
}

/// A passage as a stage sees it.
pub fn passage_to_wit(passage: &Passage) -> wit::Passage {
    wit::Passage {
        source: passage.source.clone(),
        text: passage.text.clone(),
        score: passage.score,
    }
}

/// A passage a stage set.
pub fn passage_from_wit(passage: wit::Passage) -> Passage {
    Passage {
        source: passage.source,
        text: passage.text,
        score: passage.score,
    }
}

/// Usage as a stage sees it.
pub fn usage_to_wit(usage: Usage) -> wit::Usage {
    wit::Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

/// Usage a stage set.
pub fn usage_from_wit(usage: wit::Usage) -> Usage {
    Usage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatRequest;

    #[test]
    fn the_chat_survives_a_trip_through_the_wit_records() {
        let request: ChatRequest = serde_json::from_str(
            r#"{"model":"m","seed":3,"tool_choice":"auto","logit_bias":{"1":2},
                "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"},"x":1}}],
                "messages":[{"role":"user","content":[{"type":"text","text":"a"},
                  {"type":"image_url","image_url":{"url":"u"}},{"type":"file","file":{"id":"f"}}]},
                  {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}],"refusal":null},
                  {"role":"tool","tool_call_id":"c","content":"r"}]}"#,
        )
        .unwrap();
        for message in &request.messages {
            assert_eq!(&message_from_wit(message_to_wit(message)).unwrap(), message);
        }
        for tool in request.tools.as_ref().unwrap() {
            assert_eq!(&tool_from_wit(tool_to_wit(tool)).unwrap(), tool);
        }
        assert_eq!(
            params_from_wit(params_to_wit(&request.params)).unwrap(),
            request.params
        );
    }

    #[test]
    fn invalid_json_from_a_stage_is_refused() {
        let mut params = params_to_wit(&Params::for_model("m"));
        params.tool_choice = Some("{not json".into());
        assert!(params_from_wit(params).unwrap_err().contains("tool-choice"));
        let mut params = params_to_wit(&Params::for_model("m"));
        params.extra = r#"{"stream":true}"#.into();
        assert!(params_from_wit(params).unwrap_err().contains("stream"));
    }

    use proptest::collection::{btree_map, vec as list};
    use proptest::option::of;
    use proptest::prelude::*;

    /// Any JSON whose numbers survive a trip through text (floats are
    /// binary fractions).
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = (
            0..6usize,
            any::<i64>(),
            any::<i32>(),
            ".{0,6}",
            "text|image_url|auto|file",
        )
            .prop_map(|(k, n, f, s, word)| {
                let float = f64::from(f) / 8.0;
                vec![
                    Value::Null,
                    (n > 0).into(),
                    n.into(),
                    float.into(),
                    s.into(),
                    word.into(),
                ]
                .swap_remove(k)
            });
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                list(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map(KEY, inner, 0..4).prop_map(Value::from_iter),
            ]
        })
    }

    /// Keys a stage's JSON may hold: modelled fields, a part's fields, others.
    const KEY: &str = "role|content|model|stream|messages|name|parameters|type|text|image_url|url|detail|[a-z_]{1,6}";

    /// JSON text a stage may set: none, an object, any JSON, or not JSON.
    fn json_text() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just(String::new()),
            3 => btree_map(KEY, any_json(), 0..4).prop_map(|m| Value::from_iter(m).to_string()),
            1 => any_json().prop_map(|v| v.to_string()),
            1 => ".{0,12}",
        ]
    }

    fn wit_message() -> impl Strategy<Value = wit::Message> {
        let part = prop_oneof![
            ".{0,6}".prop_map(wit::ContentPart::Text),
            (".{0,6}", of("auto|.{0,3}")).prop_map(|(url, detail)| wit::ContentPart::ImageUrl(
                wit::ImageUrl { url, detail }
            )),
            json_text().prop_map(wit::ContentPart::Other),
        ];
        let content = of(prop_oneof![
            ".{0,6}".prop_map(wit::Content::Text),
            list(part, 0..4).prop_map(wit::Content::Parts),
        ]);
        let call =
            (".{0,3}", ".{0,3}", ".{0,3}", ".{0,6}").prop_map(|(id, kind, name, arguments)| {
                wit::ToolCall {
                    id,
                    kind,
                    name,
                    arguments,
                }
            });
        (
            ".{0,6}",
            content,
            of(".{0,3}"),
            list(call, 0..3),
            of(".{0,3}"),
            json_text(),
        )
            .prop_map(|(role, content, name, tool_calls, tool_call_id, extra)| {
                wit::Message {
                    role,
                    content,
                    name,
                    tool_calls,
                    tool_call_id,
                    extra,
                }
            })
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_stage_messages_are_taken_or_refused(message in wit_message()) {
            if let Ok(taken) = message_from_wit(message) {
                crate::wasm::envelope::messages_bytes(std::slice::from_ref(&taken));
                prop_assert_eq!(message_from_wit(message_to_wit(&taken)), Ok(taken));
            }
        }

        #[test]
        fn arbitrary_stage_tools_and_parameters_are_taken_or_refused(
            (kind, name, description, strict) in (".{0,6}", ".{0,6}", of(".{0,6}"), of(any::<bool>())),
            (parameters, extra) in (of(json_text()), json_text()),
            (tool_choice, response_format, params_extra) in (of(json_text()), of(json_text()), json_text()),
        ) {
            let tool = wit::Tool { kind, name, description, parameters, strict, extra };
            if let Ok(taken) = tool_from_wit(tool) {
                prop_assert_eq!(tool_from_wit(tool_to_wit(&taken)), Ok(taken));
            }
            let params = wit::GenerationParams { tool_choice, response_format, extra: params_extra, ..params_to_wit(&Params::for_model("m")) };
            if let Ok(taken) = params_from_wit(params) {
                prop_assert_eq!(params_from_wit(params_to_wit(&taken)), Ok(taken));
            }
        }
    }
}
