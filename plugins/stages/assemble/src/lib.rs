//! The `assemble` stage: puts the retrieved passages into the chat, as one
//! context message, under a token budget, keeping the client's messages
//! (its system prompt included) as they are.
//!
//! - **Context.** If the request has passages, the stage inserts one
//!   message of role `context_role` (default `system`) whose text is
//!   `context_template` with `{passages}` replaced by the passages, one per
//!   line, as `[n] (source) text` (n from 1, best first). Where it goes is
//!   `context_position`: `after_system` (right after the leading `system` /
//!   `developer` messages; the default), `before_last_user` (immediately
//!   before the last `user` message; with none, as `after_system`), or
//!   `start`.
//! - **Budget.** The text of every message counts against
//!   `max_prompt_tokens`; passages are added best first while the total
//!   stays within it, and the rest are dropped (noted). The client's
//!   messages are never cut; if they alone exceed the budget the stage
//!   notes `over_budget` and adds no passage.
//! - **System prompt.** A non-empty `system_prompt` is added as a `system`
//!   message at the start, only if the chat has no `system` or `developer`
//!   message.
//! - **Cost cap.** A last `user` message of more than
//!   `max_question_tokens` tokens is refused
//!   ([`AssembleError::QuestionTooLong`], HTTP 400), so what one request
//!   can make this stage and the model behind it do is bounded. The work
//!   is linear in the conversation and the passages.
//!
//! With no passage that fits and no system prompt to add, the messages are
//! left exactly as they were.

mod stage;

pub use stage::Assemble;

use orchestrator_plugin::Message;
use orchestrator_text::count_tokens;
use serde::Deserialize;

/// The default `context_template`.
pub const DEFAULT_TEMPLATE: &str = "Use the following context to answer when it is relevant, and cite the sources in brackets.\n\n{passages}";

/// The placeholder of `context_template` that the passages replace.
pub const PLACEHOLDER: &str = "{passages}";

/// Roles a context message may take.
pub const CONTEXT_ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// Where the context message goes (config key `context_position`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// Right after the leading `system` and `developer` messages (at the
    /// start if there are none).
    #[default]
    AfterSystem,
    /// Immediately before the last `user` message (as `after_system` if
    /// there is none).
    BeforeLastUser,
    /// Before every message.
    Start,
}

/// Stage configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A system prompt added at the start of a chat that has none; empty
    /// for none.
    pub system_prompt: String,
    /// Token budget for the text of all the messages, context included.
    pub max_prompt_tokens: usize,
    /// The longest question (last user message) taken, in tokens.
    pub max_question_tokens: usize,
    /// The role of the context message.
    pub context_role: String,
    /// Where the context message goes.
    pub context_position: Position,
    /// The context message's text, with [`PLACEHOLDER`] where the passages
    /// go.
    pub context_template: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            system_prompt: String::new(),
            max_prompt_tokens: 1024,
            max_question_tokens: 32_768,
            context_role: "system".into(),
            context_position: Position::AfterSystem,
            context_template: DEFAULT_TEMPLATE.into(),
        }
    }
}

impl Settings {
    /// Check the values `init` cannot leave to chance.
    ///
    /// # Errors
    ///
    /// A message naming the config key.
    pub fn validate(&self) -> Result<(), String> {
        if !CONTEXT_ROLES.contains(&self.context_role.as_str()) {
            return Err(format!(
                "config key `context_role`: {:?} is not one of {}",
                self.context_role,
                CONTEXT_ROLES.join(", ")
            ));
        }
        if !self.context_template.contains(PLACEHOLDER) {
            return Err(format!(
                "config key `context_template`: it has no `{PLACEHOLDER}`, where the passages go"
            ));
        }
        Ok(())
    }
}

/// What [`assemble`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// The new messages, or `None`: leave them as they are.
    pub messages: Option<Vec<Message>>,
    /// Tokens in the text of all the messages, after assembly.
    pub prompt_tokens: usize,
    /// Tokens in the context message (0 without one).
    pub context_tokens: usize,
    /// Passages that fit the budget.
    pub passages_used: usize,
    /// Passages left out for lack of budget.
    pub passages_dropped: usize,
    /// The client's messages alone exceed the budget.
    pub over_budget: bool,
}

/// Why [`assemble`] refused the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssembleError {
    /// The question has more than `limit` (`max_question_tokens`)
    /// tokens. (Counting stops there.)
    QuestionTooLong {
        /// The limit.
        limit: usize,
    },
}

impl std::fmt::Display for AssembleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AssembleError::QuestionTooLong { limit } => write!(
                f,
                "the question has more than {limit} tokens, the most the assemble stage takes (config key `max_question_tokens`)"
            ),
        }
    }
}

impl std::error::Error for AssembleError {}

fn is_system(message: &Message) -> bool {
    message.is("system") || message.is("developer")
}

/// Put the context into `messages`. `passages` are `(source, text)` best
/// first.
///
/// # Errors
///
/// [`AssembleError`] when the last user message is over
/// `max_question_tokens`.
pub fn assemble(
    settings: &Settings,
    passages: &[(&str, &str)],
    messages: &[Message],
) -> Result<Assembled, AssembleError> {
    let last_user = messages.iter().rposition(|m| m.is("user"));
    if let Some(at) = last_user {
        let limit = settings.max_question_tokens;
        let tokens = orchestrator_text::tokens(&messages[at].text())
            .take(limit.saturating_add(1))
            .count();
        if tokens > limit {
            return Err(AssembleError::QuestionTooLong { limit });
        }
    }

    let add_system = !settings.system_prompt.is_empty() && !messages.iter().any(is_system);
    let mut used: usize = messages.iter().map(|m| count_tokens(&m.text())).sum();
    if add_system {
        used += count_tokens(&settings.system_prompt);
    }
    let over_budget = used > settings.max_prompt_tokens;

    // The context's cost is bounded by the sum of its pieces' (joining
    // pieces never makes more tokens), so the budget holds; its exact
    // count is taken once it is built.
    let (before, after) = settings
        .context_template
        .split_once(PLACEHOLDER)
        .unwrap_or((&settings.context_template, ""));
    let frame = count_tokens(before) + count_tokens(after);
    let mut lines = Vec::new();
    let mut cost = frame;
    for (n, (source, text)) in passages.iter().enumerate() {
        let line = format!("[{}] ({source}) {text}", n + 1);
        let line_cost = count_tokens(&line);
        if used + cost + line_cost > settings.max_prompt_tokens {
            break;
        }
        cost += line_cost;
        lines.push(line);
    }
    let passages_used = lines.len();
    let passages_dropped = passages.len() - passages_used;

    if passages_used == 0 && !add_system {
        return Ok(Assembled {
            messages: None,
            prompt_tokens: used,
            context_tokens: 0,
            passages_used,
            passages_dropped,
            over_budget,
        });
    }

    let mut out = Vec::with_capacity(messages.len() + 2);
    if add_system {
        out.push(Message::new("system", settings.system_prompt.as_str()));
    }
    out.extend_from_slice(messages);
    let mut context_tokens = 0;
    if passages_used > 0 {
        let text = format!("{before}{}{after}", lines.join("\n"));
        context_tokens = count_tokens(&text);
        used += context_tokens;
        let leading = out.iter().take_while(|m| is_system(m)).count();
        let at = match settings.context_position {
            Position::Start => 0,
            Position::AfterSystem => leading,
            Position::BeforeLastUser => out.iter().rposition(|m| m.is("user")).unwrap_or(leading),
        };
        out.insert(at, Message::new(settings.context_role.as_str(), text));
    }
    Ok(Assembled {
        messages: Some(out),
        prompt_tokens: used,
        context_tokens,
        passages_used,
        passages_dropped,
        over_budget,
    })
}

#[cfg(test)]
mod tests {
    use orchestrator_plugin::{Content, ContentPart, ToolCall};

    use super::*;

    fn settings(budget: usize) -> Settings {
        Settings {
            max_prompt_tokens: budget,
            max_question_tokens: 1000,
            ..Settings::default()
        }
    }

    fn chat() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
            Message::new("user", "What is alpha?"),
        ]
    }

    fn roles(messages: &[Message]) -> Vec<&str> {
        messages.iter().map(|m| m.role.as_str()).collect()
    }

    const PASSAGES: [(&str, &str); 2] = [("a.md", "alpha text"), ("b.md", "beta text")];

    #[test]
    fn inserts_one_context_message_after_the_system_prompt() {
        let out = assemble(&settings(1000), &PASSAGES, &chat()).unwrap();
        let messages = out.messages.unwrap();
        assert_eq!(
            roles(&messages),
            ["system", "system", "user", "assistant", "user"]
        );
        assert_eq!(messages[0], Message::new("system", "Be brief."));
        assert_eq!(
            messages[1].text(),
            "Use the following context to answer when it is relevant, and cite the sources in brackets.\n\n[1] (a.md) alpha text\n[2] (b.md) beta text"
        );
        assert_eq!(&messages[2..], &chat()[1..], "the chat is kept");
        assert_eq!(out.passages_used, 2);
        assert_eq!(out.context_tokens, count_tokens(&messages[1].text()));
        let total: usize = messages.iter().map(|m| count_tokens(&m.text())).sum();
        assert_eq!(out.prompt_tokens, total);
        assert!(!out.over_budget);
    }

    #[test]
    fn positions_role_and_template_are_configurable() {
        let mut s = settings(1000);
        s.context_role = "user".into();
        s.context_template = "Context:\n{passages}\nEnd.".into();
        s.context_position = Position::BeforeLastUser;
        let messages = assemble(&s, &PASSAGES[..1], &chat())
            .unwrap()
            .messages
            .unwrap();
        assert_eq!(
            roles(&messages),
            ["system", "user", "assistant", "user", "user"]
        );
        assert_eq!(messages[3].text(), "Context:\n[1] (a.md) alpha text\nEnd.");

        s.context_position = Position::Start;
        let messages = assemble(&s, &PASSAGES[..1], &chat())
            .unwrap()
            .messages
            .unwrap();
        assert_eq!(messages[0].text(), "Context:\n[1] (a.md) alpha text\nEnd.");

        // No user message: `before_last_user` falls back to after the
        // leading system and developer messages.
        s.context_position = Position::BeforeLastUser;
        let only_system = [Message::new("system", "a"), Message::new("developer", "b")];
        let messages = assemble(&s, &PASSAGES[..1], &only_system)
            .unwrap()
            .messages
            .unwrap();
        assert_eq!(roles(&messages), ["system", "developer", "user"]);

        s.context_position = Position::AfterSystem;
        let no_system = [Message::new("user", "q")];
        let messages = assemble(&s, &PASSAGES[..1], &no_system)
            .unwrap()
            .messages
            .unwrap();
        assert_eq!(roles(&messages), ["user", "user"]);
        assert_eq!(messages[1].text(), "q");
    }

    #[test]
    fn without_passages_or_system_prompt_nothing_changes() {
        let out = assemble(&settings(1000), &[], &chat()).unwrap();
        assert_eq!(out.messages, None);
        assert_eq!(out.passages_used, 0);
        let total: usize = chat().iter().map(|m| count_tokens(&m.text())).sum();
        assert_eq!(out.prompt_tokens, total);
    }

    #[test]
    fn the_system_prompt_is_added_only_to_a_chat_without_one() {
        let mut s = settings(1000);
        s.system_prompt = "You are terse.".into();
        let out = assemble(&s, &[], &chat()).unwrap();
        assert_eq!(out.messages, None, "the client's system prompt wins");
        let developer = [Message::new("developer", "d"), Message::new("user", "q")];
        assert_eq!(assemble(&s, &[], &developer).unwrap().messages, None);

        let bare = [Message::new("user", "q")];
        let messages = assemble(&s, &PASSAGES[..1], &bare)
            .unwrap()
            .messages
            .unwrap();
        assert_eq!(roles(&messages), ["system", "system", "user"]);
        assert_eq!(messages[0].text(), "You are terse.");
        assert!(messages[1].text().contains("[1] (a.md) alpha text"));
    }

    #[test]
    fn the_budget_drops_passages_never_messages() {
        let long = "word ".repeat(50);
        let passages = [("a.md", "short"), ("b.md", long.as_str()), ("c.md", "tiny")];
        let used = count_tokens(DEFAULT_TEMPLATE.replace(PLACEHOLDER, "").as_str());
        let budget = 20 + used + count_tokens("[1] (a.md) short");
        let out = assemble(&settings(budget), &passages, &chat()).unwrap();
        assert_eq!((out.passages_used, out.passages_dropped), (1, 2));
        assert!(out.prompt_tokens <= budget, "{out:?}");
        assert_eq!(out.messages.unwrap().len(), chat().len() + 1);

        let out = assemble(&settings(3), &passages, &chat()).unwrap();
        assert!(out.over_budget);
        assert_eq!((out.passages_used, out.passages_dropped), (0, 3));
        assert_eq!(out.messages, None, "the chat is never cut");
    }

    /// The budget holds whatever the text (runs past the 64-byte token
    /// cap, a template with the placeholder mid-word).
    #[test]
    fn the_budget_always_holds() {
        let words = [
            "a",
            "bb",
            ",",
            " ",
            "\n",
            "é",
            "x".repeat(70).leak(),
            "12",
            "?!",
        ];
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut text = |n: usize| -> String { (0..n).map(|_| words[next(words.len())]).collect() };
        for _ in 0..2_000 {
            let settings = Settings {
                max_prompt_tokens: 20 + text(1).len() * 7,
                context_template: format!("{}{PLACEHOLDER}{}", text(3), text(2)),
                ..Settings::default()
            };
            let passages: Vec<(String, String)> = (0..3).map(|_| (text(2), text(8))).collect();
            let passages: Vec<_> = passages
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let messages: Vec<Message> = ["user", "assistant", "user"]
                .into_iter()
                .map(|role| Message::new(role, text(3)))
                .collect();
            let out = assemble(&settings, &passages, &messages).unwrap();
            let total: usize = out
                .messages
                .as_deref()
                .unwrap_or(&messages)
                .iter()
                .map(|m| count_tokens(&m.text()))
                .sum();
            assert_eq!(out.prompt_tokens, total);
            if !out.over_budget {
                assert!(total <= settings.max_prompt_tokens, "{out:?}");
            }
        }
    }

    #[test]
    fn structured_messages_are_kept_and_counted() {
        let mut call = Message::new("assistant", "");
        call.content = None;
        call.tool_calls = vec![ToolCall::function("c1", "search", "{}")];
        let mut result = Message::new("tool", "42");
        result.tool_call_id = Some("c1".into());
        let mut parts = Message::new("user", "");
        parts.content = Some(Content::Parts(vec![
            ContentPart::Text("what".into()),
            ContentPart::Text("now".into()),
        ]));
        let chat = vec![parts, call, result];
        let out = assemble(&settings(1000), &PASSAGES, &chat).unwrap();
        let messages = out.messages.unwrap();
        assert_eq!(&messages[1..], &chat[..]);
        assert_eq!(
            out.prompt_tokens,
            count_tokens("what\nnow") + count_tokens("42") + out.context_tokens
        );
    }

    #[test]
    fn a_question_over_the_cap_is_refused() {
        let at_cap = "why ".repeat(1000);
        assert!(assemble(&settings(10), &[], &[Message::new("user", &at_cap)]).is_ok());
        let over = "why ".repeat(5000);
        let err = assemble(&settings(10), &[], &[Message::new("user", &over)]).unwrap_err();
        assert_eq!(err, AssembleError::QuestionTooLong { limit: 1000 });
        assert!(err.to_string().contains("max_question_tokens"), "{err}");
        // Only the last user message is the question.
        let earlier = [Message::new("user", &over), Message::new("user", "ok?")];
        assert!(assemble(&settings(10), &[], &earlier).is_ok());
    }

    #[test]
    fn settings_are_validated() {
        assert!(Settings::default().validate().is_ok());
        let bad_role = Settings {
            context_role: "tool".into(),
            ..Settings::default()
        };
        let err = bad_role.validate().unwrap_err();
        assert!(err.starts_with("config key `context_role`"), "{err}");
        let bad_template = Settings {
            context_template: "no placeholder".into(),
            ..Settings::default()
        };
        let err = bad_template.validate().unwrap_err();
        assert!(err.starts_with("config key `context_template`"), "{err}");
    }
}
