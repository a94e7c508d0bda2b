//! WebAssembly glue: the `request-stage` world's exports for the
//! `assemble` stage.

use std::sync::OnceLock;

use crate::{Settings, assemble};

wit_bindgen::generate!({ world: "request-stage", path: "../../wit" });

static SETTINGS: OnceLock<Settings> = OnceLock::new();

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let mut settings = Settings::default();
        for (key, value) in config {
            match key.as_str() {
                "system_prompt" => settings.system_prompt = value,
                "max_prompt_tokens" => {
                    settings.max_prompt_tokens = value.parse().map_err(|_| {
                        format!("max_prompt_tokens must be a whole number, got {value:?}")
                    })?
                }
                other => {
                    return Err(format!(
                        "unknown config key {other:?} (expected system_prompt, max_prompt_tokens)"
                    ));
                }
            }
        }
        SETTINGS
            .set(settings)
            .map_err(|_| "init called twice".to_string())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let settings = SETTINGS
            .get()
            .ok_or_else(|| StageError::Config("process called before init".into()))?;
        let (passages, messages) = (request.passages(), request.messages());
        let passages: Vec<_> = passages
            .iter()
            .map(|p| (p.source.as_str(), p.text.as_str()))
            .collect();
        let messages: Vec<_> = messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        let out = assemble(settings, &passages, &messages).ok_or_else(|| {
            StageError::InvalidInput("no user message in the conversation".into())
        })?;
        let notes = [
            ("assemble.prompt_tokens", out.prompt_tokens.to_string()),
            ("assemble.passages_used", out.passages_used.to_string()),
            (
                "assemble.passages_dropped",
                out.passages_dropped.to_string(),
            ),
            ("assemble.history_dropped", out.history_dropped.to_string()),
            ("assemble.over_budget", out.over_budget.to_string()),
        ];
        for (key, value) in notes {
            request.set_note(key, &value);
        }
        request.set_prompt(&out.prompt);
        Ok(())
    }
}

export!(Component);
