//! The stage itself: [`run_request`](crate::run_request) against the
//! host's `inference` import.

use orchestrator_plugin::inference::{generate, generate_stream};
use orchestrator_plugin::{InitError, Request, Stage, StageError, Usage};

use crate::{Completion, Failure, Outcome, run_request};

/// The `inference` stage. It takes no configuration: the backend is the
/// host's choice.
pub struct Inference;

impl Stage for Inference {
    type Config = ();

    fn init((): ()) -> Result<Self, InitError> {
        Ok(Inference)
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let params = request.params();
        // Always a streamed generation, also for a client that wants one
        // answer: the host then collects it off this stage's worker, so a
        // slow backend holds no worker thread for a whole generation (a
        // `generate` call would hold it until the last token).
        let outcome = run_request(
            &request.prompt(),
            true,
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
        // When streaming, the host fills in the completion, finish reason
        // and usage as the stream ends.
        if let Outcome::Completed(completion) = outcome {
            request.set_completion(&completion.text);
            request.set_finish_reason(&completion.finish_reason);
            request.set_usage(Usage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
            });
        }
        Ok(())
    }
}

orchestrator_plugin::export_stage!(Inference);
