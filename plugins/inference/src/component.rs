//! WebAssembly glue: the `request-stage` world's exports for the
//! `inference` stage.

use crate::{Completion, Failure, Outcome, STREAM_KEY, run_request, stream_requested};

wit_bindgen::generate!({ world: "request-stage", path: "../../wit" });

use orchestrator::pipeline::inference::{generate, generate_stream};
use orchestrator::pipeline::types::Usage;

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        match config.first() {
            Some((key, _)) => Err(format!(
                "unknown config key {key:?} (this stage takes none)"
            )),
            None => Ok(()),
        }
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let params = request.params();
        let stream = stream_requested(request.note(STREAM_KEY).as_deref());
        let outcome = run_request(
            &request.prompt(),
            stream,
            |prompt| {
                generate(prompt, &params).map(|g| Completion {
                    text: g.text,
                    finish_reason: g.finish_reason,
                    prompt_tokens: g.usage.prompt_tokens,
                    completion_tokens: g.usage.completion_tokens,
                })
            },
            |prompt| generate_stream(prompt, &params),
        )
        .map_err(|failure| match failure {
            Failure::EmptyPrompt => {
                StageError::InvalidInput("empty prompt: did the assemble stage run?".into())
            }
            Failure::Backend(message) => StageError::Upstream(message),
        })?;
        match outcome {
            // The host fills in the completion, finish reason and usage
            // when the stream ends.
            Outcome::Streaming => {}
            Outcome::Completed(completion) => {
                request.set_completion(&completion.text);
                request.set_finish_reason(&completion.finish_reason);
                request.set_usage(Usage {
                    prompt_tokens: completion.prompt_tokens,
                    completion_tokens: completion.completion_tokens,
                });
            }
        }
        Ok(())
    }
}

export!(Component);
