//! `echo`: the built-in deterministic stand-in for a language model (see
//! the [module docs](super)). It needs no network and no weights.
//!
//! Its answers are computed in process, not by a protocol behind a
//! generation task: there is no I/O and nothing can fail, so a task, a
//! channel and a wake-up per event would be all cost. A whole answer is
//! [`complete`], a streamed one an [`EchoStream`] whose events are cut as
//! they are pulled. Both record what a generation task records, through the
//! backend's own bookkeeping ([`Backend::attempt_span`], [`Backend::end`],
//! [`trace_ending`]): time to first token, the outcome, the tokens, the
//! attempt's span. Inter-token latency and the backend's concurrency
//! permits are not used by a computed answer.

use std::sync::Arc;
use std::time::Instant;

use orchestrator_text::{count_tokens, tokens, truncate_tokens};

use super::backend::Backend;
use super::delivery::trace_ending;
use super::generation::{BackendError, Completion, Ending, Event, GenerateRequest};
use crate::metrics::UpstreamOutcome;
use crate::trace::{Attribute, Trace};

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

/// A streamed `echo` generation of `backend` for `request`.
pub(super) fn stream(backend: Arc<Backend>, request: &GenerateRequest) -> EchoStream {
    let (completion, span) = first_token(&backend, request, true);
    EchoStream {
        events: Box::new(Echo::events(completion)),
        text: span.records_content().then(String::new),
        span,
        backend,
        deltas: 0,
        ended: false,
    }
}

/// A whole `echo` generation of `backend` for `request`.
pub(super) fn complete(backend: &Backend, request: &GenerateRequest) -> Completion {
    let (completion, span) = first_token(backend, request, false);
    let tokens = u64::from(completion.completion_tokens);
    if span.is_recording() {
        let ending = Ending {
            finish_reason: Some(completion.finish_reason.to_string()),
            usage: Some((completion.prompt_tokens, completion.completion_tokens)),
            response_id: None,
        };
        let text = span.records_content().then(|| completion.text.clone());
        trace_ending(&span, &ending, tokens, text);
    }
    backend.end(UpstreamOutcome::Ok, tokens, None);
    completion
}

/// Compute an answer under its attempt span, recording its time to first
/// token (the whole answer is there at once) in the metric and the span.
fn first_token(backend: &Backend, request: &GenerateRequest, stream: bool) -> (Completion, Trace) {
    let started = Instant::now();
    let span = backend.attempt_span(request, request.model(), 0, stream);
    let completion = Echo::generate(request);
    let ttft = started.elapsed().as_secs_f64();
    backend.metrics.ttft.observe(ttft);
    if span.is_recording() {
        span.event(
            "gen_ai.first_token",
            vec![Attribute::new("gen_ai.server.time_to_first_token", ttft)],
        );
    }
    (completion, span)
}

/// A streamed `echo` generation. It records its ending when the stream
/// ends: `ok` and the answer's tokens once its `End` has been pulled, or,
/// dropped before that (the client went away, the request's deadline
/// passed), `cancelled` and the deltas pulled so far.
pub(super) struct EchoStream {
    events: Box<dyn Iterator<Item = Result<Event, BackendError>> + Send>,
    backend: Arc<Backend>,
    span: Trace,
    /// Only when the span records content: the text pulled so far.
    text: Option<String>,
    deltas: u64,
    ended: bool,
}

impl Iterator for EchoStream {
    type Item = Result<Event, BackendError>;

    fn next(&mut self) -> Option<Self::Item> {
        let event = self.events.next()?;
        match &event {
            Ok(Event::Delta(delta)) => {
                self.deltas += 1;
                if let Some(text) = &mut self.text {
                    text.push_str(delta);
                }
            }
            Ok(Event::Extra(_)) => self.deltas += 1,
            Ok(Event::End(ending)) => {
                self.ended = true;
                let tokens = ending.usage.map_or(self.deltas, |(_, c)| u64::from(c));
                trace_ending(&self.span, ending, tokens, self.text.take());
                self.backend.end(UpstreamOutcome::Ok, tokens, None);
            }
            Err(_) => {}
        }
        Some(event)
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.span
            .set([Attribute::new("orchestrator.outcome", "cancelled")]);
        self.span.end();
        self.backend
            .end(UpstreamOutcome::Cancelled, self.deltas, None);
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

    #[test]
    fn echo_streams_deltas_that_concatenate_to_the_completion() {
        let r = request("User: Hello,   wide world! How are you?\nAssistant:", 100);
        let whole = Echo::generate(&r);
        let events = Echo::events::<BackendError>(Echo::generate(&r));
        let mut text = String::new();
        let mut deltas = 0;
        for event in events {
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
