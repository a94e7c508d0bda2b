//! `echo`: the built-in deterministic stand-in for a language model (see
//! the [module docs](super)). It needs no network and no weights.

use orchestrator_text::{count_tokens, tokens, truncate_tokens};

use super::generation::{Completion, Ending, Event, GenerateRequest};
use super::protocol::{EventStream, Protocol, SendFuture, UpstreamRequest};

/// The cap on `echo`'s answer when the client gives no `max_tokens`.
pub const ECHO_MAX_TOKENS: u32 = 512;

/// The deterministic built-in backend (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Echo;

impl Echo {
    /// The text `echo` answers `prompt` with, before the token limit.
    pub fn answer(prompt: &str) -> &str {
        let turn = prompt
            .rfind("User:")
            .map_or(prompt, |at| &prompt[at + "User:".len()..]);
        let turn = turn.rfind("\nAssistant:").map_or(turn, |end| &turn[..end]);
        turn.trim()
    }

    /// The whole generation for `request`, computed at once: the last
    /// user message's text (of a flattened prompt in one message, its
    /// last `User:` turn), cut to `max_tokens` ([`ECHO_MAX_TOKENS`] when
    /// the client gave none).
    pub fn generate(request: &GenerateRequest) -> Completion {
        let last_user = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.text())
            .unwrap_or_default();
        let answer = Echo::answer(&last_user);
        let max_tokens = request.params.max_tokens().unwrap_or(ECHO_MAX_TOKENS);
        let text = truncate_tokens(answer, max_tokens as usize);
        Completion {
            finish_reason: if text.len() < answer.len() {
                "length"
            } else {
                "stop"
            },
            text: text.to_string(),
            prompt_tokens: request.prompt_tokens(),
            completion_tokens: count_tokens(text) as u32,
            ..Completion::default()
        }
    }
}

impl Echo {
    /// The events of `completion`: a delta per token, then the end.
    pub(super) fn events<E: Send + 'static>(
        completion: Completion,
    ) -> impl Iterator<Item = Result<Event, E>> + Send + 'static {
        let ending = Ending {
            finish_reason: Some(completion.finish_reason.to_string()),
            usage: Some((completion.prompt_tokens, completion.completion_tokens)),
            response_id: None,
        };
        // The deltas are cut from the text as they are pulled, not built up
        // front: what a generation holds is its text (at most the prompt's
        // size) whatever `max_tokens` says.
        let deltas = Deltas {
            text: completion.text,
            at: 0,
        }
        .map(|delta| Ok(Event::Delta(delta)));
        deltas.chain(std::iter::once(Ok(Event::End(ending))))
    }
}

impl Protocol for Echo {
    fn send(&self, request: &UpstreamRequest<'_>) -> SendFuture {
        let events = Echo::events(Echo::generate(request.request));
        Box::pin(async move { Ok(Box::pin(futures_util::stream::iter(events)) as EventStream) })
    }
}

/// The deltas of `echo`'s answer: one per token, each with the text up to
/// the next token, so that they concatenate to exactly the text.
struct Deltas {
    text: String,
    /// Where the next delta starts.
    at: usize,
}

impl Iterator for Deltas {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        let rest = self.text.get(self.at..).filter(|rest| !rest.is_empty())?;
        // The next delta ends where the token after the first one of `rest`
        // starts; whitespace before the first token of the text is a delta
        // of its own.
        let mut starts = tokens(rest).map(|t| t.as_ptr() as usize - rest.as_ptr() as usize);
        let first = starts.next().unwrap_or(rest.len());
        let end = if first > 0 {
            first
        } else {
            starts.next().unwrap_or(rest.len())
        };
        let delta = rest[..end].to_string();
        self.at += end;
        Some(delta)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn request(prompt: &str, max_tokens: u32) -> GenerateRequest {
        GenerateRequest::for_test(prompt, max_tokens)
    }

    #[test]
    fn echoes_the_last_user_turn() {
        let prompt =
            "System: s\n\nUser: first\nAssistant: a\nUser: What is backpressure?\nAssistant:";
        let out = Echo::generate(&request(prompt, 100));
        assert_eq!(out.text, "What is backpressure?");
        assert_eq!(out.finish_reason, "stop");
        assert_eq!(out.completion_tokens, 4);
        assert_eq!(out.prompt_tokens as usize, count_tokens(prompt));
        let mut chat = request("ignored", 100);
        chat.messages = vec![
            crate::chat::Message::new("system", "s"),
            crate::chat::Message::new("user", "first"),
            crate::chat::Message::new("assistant", "a"),
            crate::chat::Message::new("user", "the last one"),
        ];
        assert_eq!(Echo::generate(&chat).text, "the last one");
    }

    #[test]
    fn max_tokens_cuts_with_length() {
        let out = Echo::generate(&request("User: one two three\nAssistant:", 2));
        assert_eq!(out.text, "one two");
        assert_eq!(out.finish_reason, "length");
        assert_eq!(out.completion_tokens, 2);
    }

    #[tokio::test]
    async fn echo_streams_deltas_that_concatenate_to_the_completion() {
        let r = request("User: Hello,   wide world! How are you?\nAssistant:", 100);
        let whole = Echo::generate(&r);
        let mut events = Echo
            .send(&UpstreamRequest {
                trace_headers: Vec::new(),
                model: "echo",
                request: &r,
            })
            .await
            .unwrap();
        let mut text = String::new();
        let mut deltas = 0;
        while let Some(event) = events.next().await {
            match event.unwrap() {
                Event::Delta(d) => {
                    text.push_str(&d);
                    deltas += 1;
                }
                Event::Extra(extra) => panic!("echo makes no {extra:?}"),
                Event::End(end) => {
                    assert_eq!(
                        end.usage,
                        Some((whole.prompt_tokens, whole.completion_tokens))
                    );
                }
            }
        }
        assert_eq!(text, whole.text);
        assert!(deltas > 3, "{deltas}");
    }

    #[test]
    fn deltas_are_cut_lazily_one_token_each() {
        for text in ["", "   ", "  lead", "a b  c\n", "Grüße, jörg! — ok.", "x"] {
            let deltas: Vec<String> = Deltas {
                text: text.to_string(),
                at: 0,
            }
            .collect();
            assert_eq!(deltas.concat(), text, "{text:?}");
            assert!(deltas.iter().all(|d| !d.is_empty()), "{deltas:?}");
            // One per token, plus leading whitespace as a delta of its own.
            let expected = match tokens(text).count() {
                0 => usize::from(!text.is_empty()),
                n => n + usize::from(text.starts_with(char::is_whitespace)),
            };
            assert_eq!(deltas.len(), expected, "{text:?}: {deltas:?}");
        }
    }
}
