//! The stage itself: [`assemble`](crate::assemble) behind the SDK's
//! [`Stage`] trait.

use orchestrator_plugin::{InitError, Request, Stage, StageError};
use serde::Deserialize;

use crate::{Settings, assemble};

/// The `assemble` stage's configuration; absent keys keep the
/// [`Settings`] defaults.
#[derive(Debug, Deserialize)]
pub struct Config {
    /// The system prompt placed first.
    pub system_prompt: Option<String>,
    /// Token budget for the whole prompt.
    pub max_prompt_tokens: Option<usize>,
    /// The longest question taken, in tokens; a longer one is refused
    /// with `invalid_input` (HTTP 400).
    pub max_question_tokens: Option<usize>,
}

/// The `assemble` stage.
pub struct Assemble {
    settings: Settings,
}

impl Stage for Assemble {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        let defaults = Settings::default();
        Ok(Assemble {
            settings: Settings {
                system_prompt: config.system_prompt.unwrap_or(defaults.system_prompt),
                max_prompt_tokens: config
                    .max_prompt_tokens
                    .unwrap_or(defaults.max_prompt_tokens),
                max_question_tokens: config
                    .max_question_tokens
                    .unwrap_or(defaults.max_question_tokens),
            },
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let (passages, messages) = (request.passages(), request.messages());
        let passages: Vec<_> = passages
            .iter()
            .map(|p| (p.source.as_str(), p.text.as_str()))
            .collect();
        let messages: Vec<_> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        let out = assemble(&self.settings, &passages, &messages)
            .map_err(|e| StageError::InvalidInput(e.to_string()))?;
        request.set_notes(&[
            ("assemble.prompt_tokens", &out.prompt_tokens),
            ("assemble.passages_used", &out.passages_used),
            ("assemble.passages_dropped", &out.passages_dropped),
            ("assemble.history_dropped", &out.history_dropped),
            ("assemble.over_budget", &out.over_budget),
        ]);
        request.set_prompt(&out.prompt);
        Ok(())
    }
}

orchestrator_plugin::export_stage!(Assemble);
