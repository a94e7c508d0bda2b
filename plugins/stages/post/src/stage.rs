//! The stage itself: [`clean`](crate::clean) and
//! [`process_chunk`](crate::process_chunk) behind the SDK's traits.

use orchestrator_plugin::{
    Chunk, ChunkOutput, InitError, Request, Stage, StageError, StreamingStage,
};
use serde::Deserialize;

/// The `post` stage's configuration. The stop sequences come with each
/// request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Also redact e-mail addresses and keys inside the strings of each
    /// answer tool call's JSON `arguments` (stop sequences and trimming do
    /// not apply to them; the JSON stays valid). Default `false`: tool
    /// calls are left intact.
    pub redact_tool_arguments: bool,
}

/// The `post` stage. It sets the notes `post.redacted_emails`,
/// `post.redacted_keys`, `post.stop_applied` and `post.trimmed_chars` (the
/// text content), and, with `redact_tool_arguments`,
/// `post.redacted_tool_arguments` (addresses and keys redacted in tool
/// call arguments).
pub struct Post {
    redact_tool_arguments: bool,
}

impl Stage for Post {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        Ok(Post {
            redact_tool_arguments: config.redact_tool_arguments,
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let cleaned = crate::clean(&request.completion(), &request.params().stop);
        // An answer that calls tools keeps saying so.
        if cleaned.stopped && request.finish_reason() != "tool_calls" {
            request.set_finish_reason("stop");
        }
        request.set_notes(&[
            ("post.redacted_emails", &cleaned.emails),
            ("post.redacted_keys", &cleaned.keys),
            ("post.stop_applied", &cleaned.stopped),
            ("post.trimmed_chars", &cleaned.trimmed_chars),
        ]);
        request.set_completion(&cleaned.text);
        if self.redact_tool_arguments {
            let mut calls = request.tool_calls();
            let mut redacted = 0;
            for call in &mut calls {
                let out = crate::redact_json(&call.arguments);
                if out.emails + out.keys > 0 {
                    redacted += out.emails + out.keys;
                    call.arguments = out.text;
                }
            }
            if redacted > 0 {
                request.set_tool_calls(&calls);
            }
            request.set_notes(&[("post.redacted_tool_arguments", &redacted)]);
        }
        Ok(())
    }
}

impl StreamingStage for Post {
    fn process_chunk(&self, chunk: Chunk) -> Result<ChunkOutput, StageError> {
        let out =
            crate::process_chunk(&chunk.params().stop, &chunk.carry, &chunk.delta, chunk.last)
                .map_err(|bad| StageError::InvalidInput(bad.to_string()))?;
        let output = ChunkOutput::emit(out.emit).with_carry(out.carry);
        Ok(if out.stop { output.stopping() } else { output })
    }
}

orchestrator_plugin::export_streaming_stage!(Post);

#[cfg(test)]
mod tests {
    use orchestrator_plugin::ToolCall;
    use orchestrator_plugin::config::from_pairs;
    use orchestrator_plugin::testing::TestRequest;

    use super::*;
    use crate::{EMAIL_MARKER, KEY_MARKER};

    fn post(pairs: &[(&str, &str)]) -> Post {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Post::init(from_pairs(pairs).unwrap()).unwrap()
    }

    fn call() -> ToolCall {
        ToolCall::function(
            "call_1",
            "send_mail",
            r#"{"to":"ann@example.com","token":"sk-abcdefghijklmnop123456"}"#,
        )
    }

    #[test]
    fn the_text_is_cleaned_and_tool_calls_left_intact() {
        let request = TestRequest::new()
            .with_stop(&["END"])
            .with_completion("  mail ann@example.com END more")
            .with_tool_calls([call()]);
        request.set_finish_reason("tool_calls");
        post(&[]).process(&request).unwrap();
        assert_eq!(request.completion(), format!("mail {EMAIL_MARKER}"));
        assert_eq!(request.tool_calls(), [call()]);
        assert_eq!(request.finish_reason(), "tool_calls");
        assert_eq!(request.note("post.redacted_emails").as_deref(), Some("1"));
        assert_eq!(request.note("post.redacted_tool_arguments"), None);

        let request = TestRequest::new()
            .with_stop(&["END"])
            .with_completion("a END b");
        request.set_finish_reason("length");
        post(&[]).process(&request).unwrap();
        assert_eq!(request.finish_reason(), "stop");
    }

    #[test]
    fn tool_arguments_are_redacted_on_request() {
        let request = TestRequest::new()
            .with_completion("")
            .with_tool_calls([call(), ToolCall::function("call_2", "noop", "{}")]);
        post(&[("redact_tool_arguments", "true")])
            .process(&request)
            .unwrap();
        let calls = request.tool_calls();
        assert_eq!(
            calls[0].arguments,
            format!(r#"{{"to":"{EMAIL_MARKER}","token":"{KEY_MARKER}"}}"#)
        );
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("call_1", "send_mail")
        );
        assert_eq!(calls[1].arguments, "{}");
        assert_eq!(
            request.note("post.redacted_tool_arguments").as_deref(),
            Some("2")
        );
        assert_eq!(request.note("post.redacted_emails").as_deref(), Some("0"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let pairs = vec![("redact".to_string(), "true".to_string())];
        let err = from_pairs::<Config>(pairs).unwrap_err().to_string();
        assert!(err.starts_with("config key `redact`: unknown key"), "{err}");
    }
}
