//! The request's parameters and body, and the `extra` maps that carry
//! what the host does not model.

use serde::de::{Error as _, MapAccess};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::message::{Extra, Message};
use super::tools::Tool;

/// The request's generation parameters: every field of the body but the
/// messages, the tools and the host's own `stream` and `stream_options`.
/// `None` where the client said nothing. Deserialized field by field
/// (`Params::read_field`), unknown fields into `extra`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Params {
    /// The model the client asked for.
    pub model: String,
    /// `max_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// `max_completion_tokens`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// `temperature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// `top_p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// `stop`: one string or a list, kept as a list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// `presence_penalty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// `frequency_penalty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// `n`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// `logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// `top_logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// `user`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `parallel_tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// `tool_choice`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// `response_format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    /// Every other field.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The names [`Params`] models: an `extra` map must not repeat them (nor
/// the body's other fields).
pub const MODELLED_FIELDS: [&str; 20] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "logprobs",
    "top_logprobs",
    "user",
    "parallel_tool_calls",
    "tool_choice",
    "response_format",
    "messages",
    "tools",
    "stream",
    "stream_options",
];

impl Params {
    /// Parameters for `model`, nothing else set.
    pub fn for_model(model: &str) -> Params {
        Params {
            model: model.to_string(),
            ..Params::default()
        }
    }

    /// The cap on generated tokens the client asked for:
    /// `max_completion_tokens`, else `max_tokens`.
    pub fn max_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

/// `stop`: a string, a list of strings, or `null`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Params {
    /// Read the value of field `key` of a request body from `map` into
    /// these parameters (a field they do not model into `extra`).
    fn read_field<'de, A: MapAccess<'de>>(
        &mut self,
        key: String,
        map: &mut A,
    ) -> Result<(), A::Error> {
        match key.as_str() {
            "model" => self.model = map.next_value()?,
            "max_tokens" => self.max_tokens = map.next_value()?,
            "max_completion_tokens" => self.max_completion_tokens = map.next_value()?,
            "temperature" => self.temperature = map.next_value()?,
            "top_p" => self.top_p = map.next_value()?,
            "stop" => {
                self.stop = match map.next_value::<Option<Stop>>()? {
                    None => Vec::new(),
                    Some(Stop::One(stop)) => vec![stop],
                    Some(Stop::Many(stops)) => stops,
                };
            }
            "seed" => self.seed = map.next_value()?,
            "presence_penalty" => self.presence_penalty = map.next_value()?,
            "frequency_penalty" => self.frequency_penalty = map.next_value()?,
            "n" => self.n = map.next_value()?,
            "logprobs" => self.logprobs = map.next_value()?,
            "top_logprobs" => self.top_logprobs = map.next_value()?,
            "user" => self.user = map.next_value()?,
            "parallel_tool_calls" => self.parallel_tool_calls = map.next_value()?,
            "tool_choice" => self.tool_choice = map.next_value()?,
            "response_format" => self.response_format = map.next_value()?,
            _ => {
                let value = map.next_value()?;
                self.extra.insert(key, value);
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Params;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("generation parameters")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut params = Params::default();
                let mut model = false;
                while let Some(key) = map.next_key::<String>()? {
                    model |= key == "model";
                    params.read_field(key, &mut map)?;
                }
                if !model {
                    return Err(A::Error::missing_field("model"));
                }
                Ok(params)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// The body of `POST /v1/chat/completions`, read in one pass.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The chat.
    pub messages: Vec<Message>,
    /// The tools offered.
    pub tools: Option<Vec<Tool>>,
    /// `"stream": true`.
    pub stream: Option<bool>,
    /// `stream_options`.
    pub stream_options: Option<StreamOptions>,
    /// Every other field.
    pub params: Params,
}

impl<'de> Deserialize<'de> for ChatRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ChatRequest;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chat completion request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatRequest, A::Error> {
                let mut messages = None;
                let mut request = ChatRequest {
                    messages: Vec::new(),
                    tools: None,
                    stream: None,
                    stream_options: None,
                    params: Params::default(),
                };
                let mut model = false;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "messages" => messages = Some(map.next_value()?),
                        "tools" => request.tools = map.next_value()?,
                        "stream" => request.stream = map.next_value()?,
                        "stream_options" => request.stream_options = map.next_value()?,
                        _ => {
                            model |= key == "model";
                            request.params.read_field(key, &mut map)?;
                        }
                    }
                }
                request.messages = messages.ok_or_else(|| A::Error::missing_field("messages"))?;
                if !model {
                    return Err(A::Error::missing_field("model"));
                }
                Ok(request)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The text of a JSON object map for a WIT `extra` field: empty for none.
pub fn extra_text(extra: &Extra) -> String {
    if extra.is_empty() {
        String::new()
    } else {
        serde_json::to_string(extra).unwrap_or_default()
    }
}

/// A WIT `extra` field's text as a map: empty text is none; anything but
/// a JSON object, or an object naming one of `reserved`, is refused.
pub fn extra_from_text(text: &str, reserved: &[&str]) -> Result<Extra, String> {
    if text.trim().is_empty() {
        return Ok(Extra::new());
    }
    let extra: Extra = serde_json::from_str(text)
        .map_err(|e| format!("`extra` must be a JSON object's text: {e}"))?;
    if let Some(key) = extra.keys().find(|k| reserved.contains(&k.as_str())) {
        return Err(format!("`extra` must not hold the modelled field `{key}`"));
    }
    Ok(extra)
}

/// The fields a message models (reserved in its `extra`).
pub const MESSAGE_FIELDS: [&str; 5] = ["role", "content", "name", "tool_calls", "tool_call_id"];

/// The fields a tool's inner object models (reserved in its `extra`).
pub const TOOL_FIELDS: [&str; 4] = ["name", "description", "parameters", "strict"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_text_must_be_an_object_without_modelled_fields() {
        assert!(extra_from_text("", &MODELLED_FIELDS).unwrap().is_empty());
        assert!(extra_from_text("[1]", &MODELLED_FIELDS).is_err());
        assert!(extra_from_text("{\"model\":1}", &MODELLED_FIELDS).is_err());
        let extra = extra_from_text("{\"logit_bias\":{}}", &MODELLED_FIELDS).unwrap();
        assert_eq!(extra_text(&extra), "{\"logit_bias\":{}}");
    }
}
