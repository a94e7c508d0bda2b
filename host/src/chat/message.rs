//! Messages, their content, and the tool calls an assistant message holds.

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Fields of a JSON object that a type does not model, kept as sent.
pub type Extra = Map<String, Value>;

/// One chat message. Deserialized field by field (unknown fields into
/// `extra`) rather than with serde's `flatten`, which buffers every field
/// of every message first.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its content (`None`: absent or `null`). Serialized as `null` when
    /// absent: OpenAI treats both alike.
    #[serde(default)]
    pub content: Option<Content>,
    /// The participant's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Every other field.
    #[serde(flatten)]
    pub extra: Extra,
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Message;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chat message object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Message, A::Error> {
                let mut message = Message::default();
                let mut role = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "role" => role = Some(map.next_value::<String>()?),
                        "content" => message.content = map.next_value()?,
                        "name" => message.name = map.next_value()?,
                        "tool_calls" => {
                            message.tool_calls = map
                                .next_value::<Option<Vec<ToolCall>>>()?
                                .unwrap_or_default();
                        }
                        "tool_call_id" => message.tool_call_id = map.next_value()?,
                        _ => {
                            let value = map.next_value()?;
                            message.extra.insert(key, value);
                        }
                    }
                }
                message.role = role.ok_or_else(|| A::Error::missing_field("role"))?;
                Ok(message)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl Message {
    /// A message of `role` with text `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: Some(Content::Text(content.into())),
            ..Message::default()
        }
    }

    /// Its text: the content string, or the text parts joined by
    /// newlines; empty without content.
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }
}

/// Tokens of the text of `messages` under the shared tokenizer, each
/// message counted on its own (what a backend that reports no usage is
/// charged for the prompt). Copies no text.
pub fn count_tokens(messages: &[Message]) -> u32 {
    let count = |text: &str| orchestrator_text::count_tokens(text);
    messages
        .iter()
        .map(|m| match &m.content {
            None => 0,
            Some(Content::Text(text)) => count(text),
            Some(content @ Content::Parts(_)) => count(&content.text()),
        })
        .sum::<usize>()
        .try_into()
        .unwrap_or(u32::MAX)
}

/// A message's content: a string, or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// `"content": "..."`.
    Text(String),
    /// `"content": [...]`.
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text: the string, or the text parts joined by newlines.
    pub fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => {
                let mut text = String::new();
                for part in parts.iter().filter_map(ContentPart::text) {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(part);
                }
                text
            }
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Content, E> {
                Ok(Content::Text(text.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Content, E> {
                Ok(Content::Text(text))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Content, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(part) = seq.next_element::<ContentPart>()? {
                    parts.push(part);
                }
                Ok(Content::Parts(parts))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One part of a multi-part content.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`.
    Text(String),
    /// `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`.
    ImageUrl {
        /// The image's URL (`https:` or `data:`).
        url: String,
        /// `auto`, `low` or `high`.
        detail: Option<String>,
    },
    /// Any other part, or a text or image part with fields beyond those,
    /// as its JSON object.
    Other(Extra),
}

impl ContentPart {
    /// The text of a text part (an `Other` part of type `text` included).
    pub fn text(&self) -> Option<&str> {
        match self {
            ContentPart::Text(text) => Some(text),
            ContentPart::Other(object) if object.get("type") == Some(&Value::from("text")) => {
                object.get("text").and_then(Value::as_str)
            }
            _ => None,
        }
    }

    /// The part a JSON object is: text and image parts that hold exactly
    /// their modelled fields become [`Text`](Self::Text) and
    /// [`ImageUrl`](Self::ImageUrl); anything else stays as it is.
    pub fn from_object(object: Extra) -> Result<ContentPart, String> {
        let only =
            |object: &Extra, keys: &[&str]| object.keys().all(|k| keys.contains(&k.as_str()));
        match object.get("type").and_then(Value::as_str) {
            None => return Err("a content part needs a string `type`".into()),
            Some("text") => match object.get("text") {
                Some(Value::String(text)) if only(&object, &["type", "text"]) => {
                    return Ok(ContentPart::Text(text.clone()));
                }
                Some(Value::String(_)) => {}
                _ => return Err("a `text` part needs a string `text`".into()),
            },
            Some("image_url") => match object.get("image_url") {
                Some(Value::Object(image)) => {
                    let url = match image.get("url") {
                        Some(Value::String(url)) => url,
                        _ => {
                            return Err("an `image_url` part needs a string `image_url.url`".into());
                        }
                    };
                    let detail = match image.get("detail") {
                        None => Some(None),
                        Some(Value::String(detail)) => Some(Some(detail.clone())),
                        Some(_) => None,
                    };
                    if let Some(detail) = detail
                        && only(&object, &["type", "image_url"])
                        && only(image, &["url", "detail"])
                    {
                        return Ok(ContentPart::ImageUrl {
                            url: url.clone(),
                            detail,
                        });
                    }
                }
                _ => return Err("an `image_url` part needs an object `image_url`".into()),
            },
            Some(_) => {}
        }
        Ok(ContentPart::Other(object))
    }
}

impl Serialize for ContentPart {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ContentPart::Text(text) => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("type", "text")?;
                map.serialize_entry("text", text)?;
                map.end()
            }
            ContentPart::ImageUrl { url, detail } => {
                #[derive(Serialize)]
                struct Image<'a> {
                    url: &'a str,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    detail: &'a Option<String>,
                }
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("type", "image_url")?;
                map.serialize_entry("image_url", &Image { url, detail })?;
                map.end()
            }
            ContentPart::Other(object) => object.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = Extra::deserialize(deserializer)?;
        ContentPart::from_object(object).map_err(D::Error::custom)
    }
}

/// Token accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// A call the model made to a tool.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCall {
    /// The call's id.
    pub id: String,
    /// The kind of tool: `function`.
    pub kind: String,
    /// The function's name.
    pub name: String,
    /// Its arguments: JSON text, as the model produced it.
    pub arguments: String,
}

/// The wire form of a [`ToolCall`], as read.
#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    id: String,
    #[serde(rename = "type", default = "function")]
    kind: String,
    function: WireFunctionCall<String>,
}

#[derive(Serialize, Deserialize)]
struct WireFunctionCall<S> {
    name: S,
    #[serde(default)]
    arguments: S,
}

fn function() -> String {
    "function".into()
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("type", &self.kind)?;
        map.serialize_entry(
            "function",
            &WireFunctionCall {
                name: self.name.as_str(),
                arguments: self.arguments.as_str(),
            },
        )?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for ToolCall {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireToolCall::deserialize(deserializer)?;
        Ok(ToolCall {
            id: wire.id,
            kind: wire.kind,
            name: wire.function.name,
            arguments: wire.function.arguments,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn malformed_parts_and_tools_are_refused_with_reasons() {
        for (part, reason) in [
            (json!({"text": "x"}), "string `type`"),
            (json!({"type": "text"}), "string `text`"),
            (
                json!({"type": "image_url", "image_url": {}}),
                "image_url.url",
            ),
        ] {
            let error = serde_json::from_value::<ContentPart>(part).unwrap_err();
            assert!(error.to_string().contains(reason), "{error}");
        }
    }
}
