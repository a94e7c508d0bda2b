//! Small conveniences on the WIT types: building a text message, reading a
//! message's text whatever the shape of its content, parameters and tools
//! with nothing set, and the mapping of an [`InferenceError`] to the
//! [`StageError`] a stage returns.

use crate::{
    Content, ContentPart, GenerationParams, InferenceError, Message, StageError, Tool, ToolCall,
};

impl Content {
    /// The text of the content: the string itself, or the text parts
    /// joined with `"\n"` (image and other parts are left out).
    pub fn text(&self) -> String {
        match self {
            Content::Text(text) => text.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text(text) => Some(text.as_str()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

impl Message {
    /// A message of `role` (`system`, `developer`, `user`, `assistant`,
    /// `tool`) whose content is the string `text`, with nothing else set.
    pub fn new(role: impl Into<String>, text: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: Some(Content::Text(text.into())),
            name: None,
            tool_calls: Vec::new(),
            tool_call_id: None,
            extra: String::new(),
        }
    }

    /// The message's text (see [`Content::text`]); empty when it has no
    /// content (an assistant message that only calls tools).
    pub fn text(&self) -> String {
        self.content.as_ref().map(Content::text).unwrap_or_default()
    }

    /// Replace the whole content with the string `text` (any parts, images
    /// included, go).
    pub fn set_text(&mut self, text: impl Into<String>) {
        self.content = Some(Content::Text(text.into()));
    }

    /// Whether the message's role is `role`.
    pub fn is(&self, role: &str) -> bool {
        self.role == role
    }
}

impl GenerationParams {
    /// Parameters for `model` with nothing else said: every option `None`,
    /// no stop sequences, no extra fields.
    pub fn new(model: impl Into<String>) -> GenerationParams {
        GenerationParams {
            model: model.into(),
            max_tokens: None,
            max_completion_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            seed: None,
            presence_penalty: None,
            frequency_penalty: None,
            n: None,
            logprobs: None,
            top_logprobs: None,
            user: None,
            parallel_tool_calls: None,
            tool_choice: None,
            response_format: None,
            extra: String::new(),
        }
    }
}

impl Tool {
    /// A `function` tool named `name`, with no description or schema.
    pub fn function(name: impl Into<String>) -> Tool {
        Tool {
            kind: "function".into(),
            name: name.into(),
            description: None,
            parameters: None,
            strict: None,
            extra: String::new(),
        }
    }
}

impl ToolCall {
    /// A call `id` of the function `name` with `arguments` (JSON text).
    pub fn function(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> ToolCall {
        ToolCall {
            id: id.into(),
            kind: "function".into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }
}

impl InferenceError {
    /// The error's message, whatever its case.
    pub fn message(&self) -> &str {
        match self {
            InferenceError::InvalidRequest(m)
            | InferenceError::Unavailable(m)
            | InferenceError::Timeout(m)
            | InferenceError::Failed(m) => m,
        }
    }
}

/// A failed generation as a stage's error: the backend's refusal of the
/// request (`invalid-request`) is the client's fault, [`StageError::InvalidInput`]
/// (HTTP 400); anything else (`unavailable`, `timeout`, `failed`) is
/// [`StageError::Upstream`]. The message is kept.
impl From<InferenceError> for StageError {
    fn from(error: InferenceError) -> StageError {
        match error {
            InferenceError::InvalidRequest(message) => StageError::InvalidInput(message),
            InferenceError::Unavailable(message) => StageError::UpstreamUnavailable(message),
            InferenceError::Timeout(message) => StageError::UpstreamTimeout(message),
            InferenceError::Failed(message) => StageError::Upstream(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageUrl;

    #[test]
    fn a_message_text_reads_any_content() {
        let mut message = Message::new("user", "hi");
        assert_eq!(message.content, Some(Content::Text("hi".into())));
        assert!(message.is("user") && !message.is("system"));
        assert_eq!(message.text(), "hi");

        message.content = Some(Content::Parts(vec![
            ContentPart::Text("look".into()),
            ContentPart::ImageUrl(ImageUrl {
                url: "https://example.com/a.png".into(),
                detail: None,
            }),
            ContentPart::Other(r#"{"type":"input_audio"}"#.into()),
            ContentPart::Text("at this".into()),
        ]));
        assert_eq!(message.text(), "look\nat this");

        message.content = None;
        assert_eq!(message.text(), "");
        message.set_text("new");
        assert_eq!(message, Message::new("user", "new"));
        assert_eq!(Content::Parts(Vec::new()).text(), "");
    }

    #[test]
    fn inference_errors_map_to_stage_errors() {
        let cases = [
            (
                InferenceError::InvalidRequest("bad".into()),
                StageError::InvalidInput("bad".into()),
            ),
            (
                InferenceError::Unavailable("down".into()),
                StageError::UpstreamUnavailable("down".into()),
            ),
            (
                InferenceError::Timeout("slow".into()),
                StageError::UpstreamTimeout("slow".into()),
            ),
            (
                InferenceError::Failed("broken".into()),
                StageError::Upstream("broken".into()),
            ),
        ];
        for (error, expected) in cases {
            assert!(!error.message().is_empty());
            assert_eq!(StageError::from(error), expected);
        }
    }

    #[test]
    fn constructors_set_nothing_else() {
        let params = GenerationParams::new("echo");
        assert_eq!(params.model, "echo");
        assert_eq!((params.max_tokens, params.temperature), (None, None));
        assert!(params.stop.is_empty() && params.extra.is_empty());
        let tool = Tool::function("search");
        assert_eq!(
            (tool.kind.as_str(), tool.name.as_str()),
            ("function", "search")
        );
        let call = ToolCall::function("call_1", "search", "{}");
        assert_eq!(call.kind, "function");
        assert_eq!(call.arguments, "{}");
    }
}
