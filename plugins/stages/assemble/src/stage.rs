//! The stage itself: [`assemble`](crate::assemble) behind the SDK's
//! [`Stage`] trait.

use orchestrator_plugin::{InitError, Request, Stage, StageError};
use serde::Deserialize;

use crate::{Position, Settings, assemble};

/// The `assemble` stage's configuration; absent keys keep the
/// [`Settings`] defaults.
#[derive(Debug, Deserialize)]
pub struct Config {
    /// A system prompt added at the start of a chat that has no `system`
    /// or `developer` message. Default: empty (none).
    pub system_prompt: Option<String>,
    /// Token budget for the text of all the messages, the context
    /// included (1024).
    pub max_prompt_tokens: Option<usize>,
    /// The longest question (last user message) taken, in tokens; a
    /// longer one is refused with `invalid_input` (HTTP 400). 32768.
    pub max_question_tokens: Option<usize>,
    /// The role of the context message: `system` (the default),
    /// `developer`, `user` or `assistant`.
    pub context_role: Option<String>,
    /// Where the context message goes: `after_system` (the default),
    /// `before_last_user` or `start`.
    pub context_position: Option<Position>,
    /// The context message's text; `{passages}` is replaced by the
    /// passages, one per line, as `[n] (source) text`. Default
    /// [`DEFAULT_TEMPLATE`](crate::DEFAULT_TEMPLATE).
    pub context_template: Option<String>,
}

/// The `assemble` stage. It sets the notes `assemble.passages_used`,
/// `assemble.passages_dropped`, `assemble.context_tokens`,
/// `assemble.prompt_tokens` (tokens in the text of all the messages) and
/// `assemble.over_budget`.
pub struct Assemble {
    settings: Settings,
}

impl Stage for Assemble {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        let defaults = Settings::default();
        let settings = Settings {
            system_prompt: config.system_prompt.unwrap_or(defaults.system_prompt),
            max_prompt_tokens: config
                .max_prompt_tokens
                .unwrap_or(defaults.max_prompt_tokens),
            max_question_tokens: config
                .max_question_tokens
                .unwrap_or(defaults.max_question_tokens),
            context_role: config.context_role.unwrap_or(defaults.context_role),
            context_position: config.context_position.unwrap_or(defaults.context_position),
            context_template: config.context_template.unwrap_or(defaults.context_template),
        };
        settings.validate()?;
        Ok(Assemble { settings })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let (passages, messages) = (request.passages(), request.messages());
        let passages: Vec<_> = passages
            .iter()
            .map(|p| (p.source.as_str(), p.text.as_str()))
            .collect();
        let out = assemble(&self.settings, &passages, &messages)
            .map_err(|e| StageError::InvalidInput(e.to_string()))?;
        request.set_notes(&[
            ("assemble.passages_used", &out.passages_used),
            ("assemble.passages_dropped", &out.passages_dropped),
            ("assemble.context_tokens", &out.context_tokens),
            ("assemble.prompt_tokens", &out.prompt_tokens),
            ("assemble.over_budget", &out.over_budget),
        ]);
        if let Some(messages) = out.messages {
            request.set_messages(&messages);
        }
        Ok(())
    }
}

orchestrator_plugin::export_stage!(Assemble);

#[cfg(test)]
mod tests {
    use orchestrator_plugin::config::from_pairs;
    use orchestrator_plugin::testing::TestRequest;
    use orchestrator_plugin::{Message, Passage};

    use super::*;

    fn stage(pairs: &[(&str, &str)]) -> Result<Assemble, String> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config: Config = from_pairs(pairs).map_err(|e| e.to_string())?;
        Assemble::init(config).map_err(|e| e.to_string())
    }

    fn passage(source: &str, text: &str) -> Passage {
        Passage {
            source: source.into(),
            text: text.into(),
            score: 1.0,
        }
    }

    #[test]
    fn process_inserts_the_context_and_notes_it() {
        let stage = stage(&[("context_position", "before_last_user")]).unwrap();
        let request = TestRequest::new()
            .with_system("Be brief.")
            .with_user("What is alpha?")
            .with_passages([passage("a.md", "alpha text")]);
        stage.process(&request).unwrap();
        let messages = request.messages();
        let roles: Vec<_> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user"]);
        assert!(messages[1].text().ends_with("\n\n[1] (a.md) alpha text"));
        assert_eq!(request.note("assemble.passages_used").as_deref(), Some("1"));
        assert_eq!(
            request.note("assemble.passages_dropped").as_deref(),
            Some("0")
        );
        assert_eq!(
            request.note("assemble.over_budget").as_deref(),
            Some("false")
        );
    }

    #[test]
    fn process_leaves_a_chat_without_passages_as_it_was() {
        let stage = stage(&[]).unwrap();
        let mut odd = Message::new("user", "q");
        odd.name = Some("ann".into());
        odd.extra = r#"{"x":1}"#.into();
        let request = TestRequest::new().with_messages([odd.clone()]);
        stage.process(&request).unwrap();
        assert_eq!(request.messages(), [odd]);
        assert_eq!(request.note("assemble.passages_used").as_deref(), Some("0"));
    }

    #[test]
    fn a_long_question_is_invalid_input() {
        let stage = stage(&[("max_question_tokens", "2")]).unwrap();
        let request = TestRequest::new().with_user("one two three");
        let err = stage.process(&request).unwrap_err();
        assert!(matches!(err, StageError::InvalidInput(_)), "{err:?}");
        assert!(request.metadata().is_empty());
    }

    #[test]
    fn bad_config_fails_init_naming_the_key() {
        let err = stage(&[("context_position", "end")]).err().unwrap();
        assert!(
            err.starts_with("config key `context_position`: unknown variant `end`"),
            "{err}"
        );
        let err = stage(&[("context_template", "nothing")]).err().unwrap();
        assert!(err.starts_with("config key `context_template`"), "{err}");
        let err = stage(&[("context_role", "tool")]).err().unwrap();
        assert!(err.starts_with("config key `context_role`"), "{err}");
        assert!(stage(&[("system_prompt", "You are terse.")]).is_ok());
    }
}
