//! The `assemble` stage: system prompt + retrieved passages + chat history
//! → one model prompt, under a token budget.
//!
//! Budget rule: the system prompt and the last user message are always
//! included whole — the user's question is never truncated, even when it
//! alone exceeds the budget (the stage then reports `over_budget`). What
//! remains of the budget goes first to passages (best first, whole
//! passages only), then to earlier chat turns (newest first).
//!
//! Cost cap: a question longer than `max_question_tokens` is refused
//! ([`AssembleError::QuestionTooLong`], HTTP 400), so what one request can
//! make this stage and the model behind it do is bounded. The work is
//! linear in the conversation and the passages.

mod stage;

pub use stage::Assemble;

use orchestrator_text::count_tokens;

/// Stage configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The system prompt placed first.
    pub system_prompt: String,
    /// Token budget for the whole prompt.
    pub max_prompt_tokens: usize,
    /// The longest question (last user message) taken, in tokens.
    pub max_question_tokens: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            system_prompt: "You are a helpful assistant. Answer the user's question using the context when it is relevant, and cite the sources in brackets.".into(),
            max_prompt_tokens: 1024,
            max_question_tokens: 32_768,
        }
    }
}

/// What [`assemble`] built.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// The model prompt.
    pub prompt: String,
    /// Its size in tokens.
    pub prompt_tokens: usize,
    /// Passages that fit the budget.
    pub passages_used: usize,
    /// Passages left out for lack of budget.
    pub passages_dropped: usize,
    /// Earlier chat messages left out for lack of budget.
    pub history_dropped: usize,
    /// The mandatory part alone exceeds the budget.
    pub over_budget: bool,
}

/// Why [`assemble`] built no prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssembleError {
    /// The conversation has no user message.
    NoUserMessage,
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
            AssembleError::NoUserMessage => write!(f, "no user message in the conversation"),
            AssembleError::QuestionTooLong { limit } => write!(
                f,
                "the question has more than {limit} tokens, the most the assemble stage takes (config key `max_question_tokens`)"
            ),
        }
    }
}

impl std::error::Error for AssembleError {}

/// Build the prompt. `passages` are `(source, text)` best first; `messages`
/// are `(role, content)` in order.
///
/// # Errors
///
/// [`AssembleError`] when there is no user message, or the question is
/// over `max_question_tokens`.
pub fn assemble(
    settings: &Settings,
    passages: &[(&str, &str)],
    messages: &[(&str, &str)],
) -> Result<Assembled, AssembleError> {
    let last_user = messages
        .iter()
        .rposition(|(role, _)| *role == "user")
        .ok_or(AssembleError::NoUserMessage)?;
    let limit = settings.max_question_tokens;
    let tokens = orchestrator_text::tokens(messages[last_user].1)
        .take(limit.saturating_add(1))
        .count();
    if tokens > limit {
        return Err(AssembleError::QuestionTooLong { limit });
    }
    let system = format!("System: {}\n", settings.system_prompt);
    let question = format!("User: {}\nAssistant:", messages[last_user].1);
    let mut used = count_tokens(&system) + count_tokens(&question);
    let over_budget = used > settings.max_prompt_tokens;

    let mut context = Vec::new();
    for (n, (source, text)) in passages.iter().enumerate() {
        let block = format!("[{}] ({source}) {text}\n", n + 1);
        let cost = count_tokens(&block);
        if used + cost > settings.max_prompt_tokens {
            break;
        }
        used += cost;
        context.push(block);
    }
    let passages_used = context.len();

    // Earlier turns (everything except the last user message and system
    // messages, which the system prompt replaces), newest first.
    let mut history = Vec::new();
    let earlier: Vec<_> = messages[..last_user]
        .iter()
        .chain(&messages[last_user + 1..])
        .filter(|(role, _)| *role != "system")
        .collect();
    for (role, content) in earlier.iter().rev() {
        let line = format!("{}: {content}\n", capitalise(role));
        let cost = count_tokens(&line);
        if used + cost > settings.max_prompt_tokens {
            break;
        }
        used += cost;
        history.push(line);
    }
    let history_dropped = earlier.len() - history.len();
    history.reverse();

    // Every piece ends in a newline, so no token spans two pieces and the
    // prompt's tokens are the pieces' (counted above) plus the heading's:
    // no second pass over the whole prompt.
    const CONTEXT_HEADING: &str = "\nContext:\n";
    let mut prompt = system;
    let mut prompt_tokens = used;
    if !context.is_empty() {
        prompt.push_str(CONTEXT_HEADING);
        prompt_tokens += count_tokens(CONTEXT_HEADING);
        context.iter().for_each(|block| prompt.push_str(block));
    }
    prompt.push('\n');
    history.iter().for_each(|line| prompt.push_str(line));
    prompt.push_str(&question);
    Ok(Assembled {
        prompt_tokens,
        prompt,
        passages_used,
        passages_dropped: passages.len() - passages_used,
        history_dropped,
        over_budget,
    })
}

fn capitalise(role: &str) -> String {
    let mut chars = role.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(budget: usize) -> Settings {
        Settings {
            system_prompt: "Be brief.".into(),
            max_prompt_tokens: budget,
            max_question_tokens: 1000,
        }
    }

    #[test]
    fn builds_context_history_and_question() {
        let out = assemble(
            &settings(1000),
            &[("a.md", "alpha text"), ("b.md", "beta text")],
            &[
                ("user", "hi"),
                ("assistant", "hello"),
                ("user", "What is alpha?"),
            ],
        )
        .unwrap();
        assert_eq!(
            out.prompt,
            "System: Be brief.\n\nContext:\n[1] (a.md) alpha text\n[2] (b.md) beta text\n\nUser: hi\nAssistant: hello\nUser: What is alpha?\nAssistant:"
        );
        assert_eq!(out.passages_used, 2);
        assert_eq!(out.prompt_tokens, count_tokens(&out.prompt));
        assert!(!out.over_budget);
    }

    #[test]
    fn budget_drops_context_before_the_question() {
        let long = "word ".repeat(50);
        let out = assemble(
            &settings(30),
            &[("a.md", &long)],
            &[("user", "old"), ("user", "The question?")],
        )
        .unwrap();
        assert!(out.prompt.ends_with("User: The question?\nAssistant:"));
        assert_eq!(out.prompt_tokens, count_tokens(&out.prompt));
        assert_eq!(out.passages_used, 0);
        assert_eq!(out.passages_dropped, 1);
        assert!(out.prompt_tokens <= 30);
    }

    #[test]
    fn the_question_is_never_truncated() {
        let question = "why ".repeat(100);
        let out = assemble(&settings(10), &[], &[("user", &question)]).unwrap();
        assert!(out.prompt.contains(&question));
        assert_eq!(out.prompt_tokens, count_tokens(&out.prompt));
        assert!(out.over_budget);
    }

    /// The count summed over the pieces is the whole prompt's, whatever the
    /// text (runs past the 64-byte token cap, text without a final
    /// newline, a system prompt ending mid-word).
    #[test]
    fn the_prompt_token_count_is_exact() {
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
                system_prompt: text(6),
                max_prompt_tokens: 5 + text(1).len() * 7,
                max_question_tokens: 1000,
            };
            let passages: Vec<(String, String)> = (0..3).map(|_| (text(2), text(8))).collect();
            let messages: Vec<(&str, String)> = ["user", "assistant", "user"]
                .into_iter()
                .map(|role| (role, text(5)))
                .collect();
            let passages: Vec<_> = passages
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let messages: Vec<_> = messages.iter().map(|(r, c)| (*r, c.as_str())).collect();
            let out = assemble(&settings, &passages, &messages).unwrap();
            assert_eq!(
                out.prompt_tokens,
                count_tokens(&out.prompt),
                "{:?}",
                out.prompt
            );
        }
    }

    #[test]
    fn no_user_message_is_an_error() {
        assert_eq!(
            assemble(&settings(10), &[], &[("system", "x")]),
            Err(AssembleError::NoUserMessage)
        );
    }

    #[test]
    fn a_question_over_the_cap_is_refused() {
        let at_cap = "why ".repeat(1000);
        assert!(assemble(&settings(10), &[], &[("user", &at_cap)]).is_ok());
        let over = "why ".repeat(5000);
        let err = assemble(&settings(10), &[], &[("user", &over)]).unwrap_err();
        assert_eq!(err, AssembleError::QuestionTooLong { limit: 1000 });
        assert!(err.to_string().contains("max_question_tokens"), "{err}");
    }
}
