//! Tools and tool calls: what the client offers the model, what the model
//! calls, and the pieces of a call in a streamed answer.

use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::message::{Extra, ToolCall};

/// A piece of a tool call in a streamed answer: the call at `index`,
/// whose id, kind and name come with its first piece and whose arguments
/// arrive in pieces.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ToolCallDelta {
    /// Which call of the answer this piece belongs to.
    pub index: u32,
    /// The call's id (first piece).
    pub id: Option<String>,
    /// Its kind (first piece).
    pub kind: Option<String>,
    /// The function's name (first piece).
    pub name: Option<String>,
    /// The next piece of its arguments.
    pub arguments: String,
}

impl Serialize for ToolCallDelta {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Function<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            name: &'a Option<String>,
            arguments: &'a str,
        }
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("index", &self.index)?;
        if let Some(id) = &self.id {
            map.serialize_entry("id", id)?;
        }
        if let Some(kind) = &self.kind {
            map.serialize_entry("type", kind)?;
        }
        map.serialize_entry(
            "function",
            &Function {
                name: &self.name,
                arguments: &self.arguments,
            },
        )?;
        map.end()
    }
}

/// Builds the whole tool calls of an answer from its streamed pieces.
#[derive(Debug, Clone, Default)]
pub struct ToolCalls {
    calls: Vec<(u32, ToolCall)>,
}

impl ToolCalls {
    /// Add a piece.
    pub fn add(&mut self, delta: &ToolCallDelta) {
        let at = match self.calls.iter().position(|(i, _)| *i == delta.index) {
            Some(at) => at,
            None => {
                self.calls.push((
                    delta.index,
                    ToolCall {
                        kind: "function".into(),
                        ..ToolCall::default()
                    },
                ));
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[at].1;
        if let Some(id) = &delta.id {
            call.id.clone_from(id);
        }
        if let Some(kind) = &delta.kind {
            call.kind.clone_from(kind);
        }
        if let Some(name) = &delta.name {
            call.name.push_str(name);
        }
        call.arguments.push_str(&delta.arguments);
    }

    /// The calls, by index.
    pub fn finish(mut self) -> Vec<ToolCall> {
        self.calls.sort_by_key(|(index, _)| *index);
        self.calls.into_iter().map(|(_, call)| call).collect()
    }
}

/// A tool the model may call: `{"type": kind, kind: {"name", ...}}`
/// (`function` tools, and any other kind shaped alike).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tool {
    /// The kind of tool: `function`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: Option<String>,
    /// Its parameters' JSON Schema.
    pub parameters: Option<Value>,
    /// Whether the model must follow the schema exactly.
    pub strict: Option<bool>,
    /// Every other field of the inner object (and of the tool object,
    /// under their own names, apart from `type` and the inner object).
    pub extra: Extra,
}

impl Serialize for Tool {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// The inner object, borrowed (a tool is serialized upstream on
        /// every request that offers it: nothing is copied).
        #[derive(Serialize)]
        struct Inner<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            description: &'a Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            parameters: &'a Option<Value>,
            #[serde(skip_serializing_if = "Option::is_none")]
            strict: Option<bool>,
            #[serde(flatten)]
            extra: &'a Extra,
        }
        let inner = Inner {
            name: &self.name,
            description: &self.description,
            parameters: &self.parameters,
            strict: self.strict,
            extra: &self.extra,
        };
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("type", &self.kind)?;
        map.serialize_entry(&self.kind, &inner)?;
        map.end()
    }
}

impl<'de> Deserialize<'de> for Tool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut object = Extra::deserialize(deserializer)?;
        let kind = match object.remove("type") {
            Some(Value::String(kind)) => kind,
            _ => return Err(D::Error::custom("a tool needs a string `type`")),
        };
        let mut inner = match object.remove(&kind) {
            Some(Value::Object(inner)) => inner,
            _ => {
                return Err(D::Error::custom(format!(
                    "a tool of type `{kind}` needs an object `{kind}`"
                )));
            }
        };
        if !object.is_empty() {
            return Err(D::Error::custom(format!(
                "a tool has `type` and `{kind}` only; it also has {}",
                object
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let name = match inner.remove("name") {
            Some(Value::String(name)) => name,
            _ => {
                return Err(D::Error::custom(format!(
                    "a tool needs a string `{kind}.name`"
                )));
            }
        };
        let description = match inner.remove("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d),
            Some(_) => return Err(D::Error::custom("a tool's `description` must be a string")),
        };
        let parameters = inner.remove("parameters");
        let strict = match inner.remove("strict") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(strict)) => Some(strict),
            Some(_) => return Err(D::Error::custom("a tool's `strict` must be a boolean")),
        };
        Ok(Tool {
            kind,
            name,
            description,
            parameters,
            strict,
            extra: inner,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tool_call_pieces_reassemble_by_index() {
        let mut calls = ToolCalls::default();
        let piece = |index, id: Option<&str>, name: Option<&str>, arguments: &str| ToolCallDelta {
            index,
            id: id.map(String::from),
            kind: id.map(|_| "function".to_string()),
            name: name.map(String::from),
            arguments: arguments.into(),
        };
        calls.add(&piece(1, Some("b"), Some("two"), ""));
        calls.add(&piece(0, Some("a"), Some("one"), "{\"x\""));
        calls.add(&piece(0, None, None, ":1}"));
        calls.add(&piece(1, None, None, "{}"));
        let calls = calls.finish();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].arguments.as_str()),
            ("a", "{\"x\":1}")
        );
        assert_eq!(
            (calls[1].name.as_str(), calls[1].arguments.as_str()),
            ("two", "{}")
        );
    }

    #[test]
    fn a_tool_without_its_object_is_refused() {
        let error = serde_json::from_value::<Tool>(json!({"type": "function"})).unwrap_err();
        assert!(error.to_string().contains("object `function`"), "{error}");
    }
}
