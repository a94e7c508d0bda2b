//! The `inference` stage: hands the request to the host's inference
//! backend (the `inference` import, granted to this stage by the host
//! configuration).
//!
//! The stage itself holds no model and builds no prompt: the host sends
//! the request's chat as it stands (messages, tools, parameters, after the
//! stages before this one) to the backend of the request's model (the
//! built-in deterministic `echo`, or an upstream service), and writes the
//! answer into the request: completion, tool calls, refusal, finish reason
//! and usage. The stage leaves all of these as the host wrote them (a
//! `tool_calls` finish reason included).
//!
//! The stage always starts the generation with `generate-stream`. For a
//! client that asked for a stream ([`Request::stream_requested`]) it
//! returns at the first token, and the host feeds the tokens through the
//! streaming stages that follow; for one that wants one answer it returns
//! at once, and the host asks the backend for one answer and collects it
//! after the call. Either way the stage's permit is not held for the
//! generation. A stage that must see the answer
//! calls `generate` instead ([`Mode::Whole`]), which returns with it and
//! holds the stage's permit until then.

mod stage;

pub use stage::Inference;

use orchestrator_plugin::{Request, StageError};

/// How [`run`] generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The whole answer, with `generate`: it is in the request when the
    /// call returns.
    Whole,
    /// A stream, with `generate-stream`: the host records the answer when
    /// the stream ends (what the bundled stage does).
    Stream,
}

/// Generate the answer to `request` as `mode` says: exactly one generation
/// is started. The stage reads nothing of the request itself (the host
/// sends its chat, and refuses one without messages), so it copies none of
/// it into the plugin.
///
/// # Errors
///
/// [`StageError::InvalidInput`] for a request without messages or one the
/// backend refused as invalid; [`StageError::UpstreamUnavailable`],
/// [`StageError::UpstreamTimeout`] or [`StageError::Upstream`] when the
/// backend is unavailable, timed out or failed (see `StageError::from`).
pub fn run(request: &dyn Request, mode: Mode) -> Result<(), StageError> {
    match mode {
        Mode::Stream => request.generate_stream()?,
        Mode::Whole => request.generate()?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use orchestrator_plugin::testing::{Answer, Generate, TestRequest};
    use orchestrator_plugin::{InferenceError, ToolCall};

    use super::*;

    #[test]
    fn a_plain_request_generates_the_whole_answer() {
        let request = TestRequest::new()
            .with_user("hi")
            .with_answer(Answer::text("hello").with_usage(3, 1));
        assert_eq!(run(&request, Mode::Whole), Ok(()));
        assert_eq!(request.generations(), [Generate::Whole]);
        assert_eq!(request.completion(), "hello");
        assert_eq!(request.finish_reason(), "stop");
        assert_eq!(request.usage().prompt_tokens, 3);
    }

    #[test]
    fn a_stream_request_starts_a_stream() {
        let request = TestRequest::new()
            .with_user("hi")
            .streaming()
            .with_answer(Answer::text("hello"));
        assert_eq!(run(&request, Mode::Stream), Ok(()));
        assert_eq!(request.generations(), [Generate::Stream]);
    }

    #[test]
    fn the_finish_reason_is_left_as_the_host_wrote_it() {
        let call = ToolCall::function("call_1", "weather", r#"{"city":"Paris"}"#);
        let request = TestRequest::new()
            .with_user("weather in Paris?")
            .with_answer(Answer::tool_calls(vec![call.clone()]));
        run(&request, Mode::Stream).unwrap();
        assert_eq!(request.finish_reason(), "tool_calls");
        assert_eq!(request.tool_calls(), [call]);

        let request = TestRequest::new()
            .with_user("hi")
            .with_answer(Answer::text("x").with_finish_reason("content_filter"));
        run(&request, Mode::Stream).unwrap();
        assert_eq!(request.finish_reason(), "content_filter");
    }

    #[test]
    fn backend_errors_are_mapped() {
        for (error, streaming, expected) in [
            (
                InferenceError::InvalidRequest("bad tool schema".into()),
                false,
                StageError::InvalidInput("bad tool schema".into()),
            ),
            (
                InferenceError::Unavailable("busy".into()),
                true,
                StageError::UpstreamUnavailable("busy".into()),
            ),
            (
                InferenceError::Timeout("slow".into()),
                false,
                StageError::UpstreamTimeout("slow".into()),
            ),
        ] {
            let mut request = TestRequest::new()
                .with_user("hi")
                .with_generation_error(error);
            if streaming {
                request = request.streaming();
            }
            let mode = if streaming { Mode::Stream } else { Mode::Whole };
            assert_eq!(run(&request, mode), Err(expected));
            assert_eq!(request.generations().len(), 1);
        }
    }
}
