//! WebAssembly glue: the `stage` world's exports for the `inference` stage.

use crate::{Completion, Failure, Outcome, run_request};

wit_bindgen::generate!({ world: "stage", path: "../../wit" });

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

    fn process(mut request: Envelope) -> Result<Envelope, StageError> {
        let params = &request.params;
        let outcome = run_request(
            &request.prompt,
            &request.metadata,
            |prompt| {
                generate(prompt, params).map(|g| Completion {
                    text: g.text,
                    finish_reason: g.finish_reason,
                    prompt_tokens: g.usage.prompt_tokens,
                    completion_tokens: g.usage.completion_tokens,
                })
            },
            |prompt| generate_stream(prompt, params),
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
                request.completion = completion.text;
                request.finish_reason = completion.finish_reason;
                request.usage = Usage {
                    prompt_tokens: completion.prompt_tokens,
                    completion_tokens: completion.completion_tokens,
                };
            }
        }
        Ok(request)
    }
}

export!(Component);
