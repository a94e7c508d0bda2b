//! The server-sent-event stream of an OpenAI chat completion, parsed into
//! [`Event`]s incrementally, whatever the byte boundaries.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use serde_json::Value;

use super::generation::{Ending, Event};
use super::protocol::{AttemptError, quote};

/// Parse a server-sent-event byte stream of `chat.completion.chunk`
/// objects into events.
pub(super) fn sse_events<S, B, E>(
    bytes: S,
) -> impl Stream<Item = Result<Event, AttemptError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    struct State<S> {
        bytes: Pin<Box<S>>,
        parser: SseParser,
        queue: std::collections::VecDeque<Result<Event, AttemptError>>,
        done: bool,
    }
    let state = State {
        bytes: Box::pin(bytes),
        parser: SseParser::default(),
        queue: Default::default(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.queue.pop_front() {
                if matches!(item, Ok(Event::End(_)) | Err(_)) {
                    state.done = true;
                    state.queue.clear();
                }
                return Some((item, state));
            }
            if state.done {
                return None;
            }
            match state.bytes.next().await {
                Some(Ok(chunk)) => state.queue.extend(state.parser.feed(chunk.as_ref())),
                Some(Err(e)) => {
                    state
                        .queue
                        .push_back(Err(AttemptError::Protocol(format!("stream broken: {e}"))));
                }
                None => {
                    let end = state.parser.finish();
                    state.queue.push_back(end);
                }
            }
        }
    })
}

/// Incremental parser of an OpenAI chat-completion SSE stream.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    finish_reason: Option<String>,
    usage: Option<(u32, u32)>,
    response_id: Option<String>,
    ended: bool,
}

/// Longest line accepted from an upstream (a guard against a server that
/// never sends a newline).
const MAX_SSE_LINE: usize = 4 * 1024 * 1024;

impl SseParser {
    /// Feed bytes; returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Event, AttemptError>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if self.ended {
                break;
            }
            if byte != b'\n' {
                self.line.push(byte);
                if self.line.len() > MAX_SSE_LINE {
                    self.ended = true;
                    out.push(Err(AttemptError::Protocol(
                        "an event line longer than 4 MiB".into(),
                    )));
                }
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(&line);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let data = std::mem::take(&mut self.data);
                    out.extend(self.event(&data));
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value.strip_prefix(' ').unwrap_or(value));
                if self.data.len() > MAX_SSE_LINE {
                    self.ended = true;
                    out.push(Err(AttemptError::Protocol(
                        "an event longer than 4 MiB".into(),
                    )));
                }
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry
            // nothing a chat completion needs.
        }
        out
    }

    /// The byte stream ended: an `End` if the generation had finished.
    pub fn finish(&mut self) -> Result<Event, AttemptError> {
        if !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            if let Some(event) = self.event(&data).into_iter().find(|e| e.is_err()) {
                return event;
            }
        }
        if self.ended || self.finish_reason.is_some() {
            Ok(Event::End(Ending {
                finish_reason: self.finish_reason.take(),
                usage: self.usage,
                response_id: self.response_id.take(),
            }))
        } else {
            Err(AttemptError::Protocol(
                "the stream ended before the generation finished".into(),
            ))
        }
    }

    fn event(&mut self, data: &str) -> Vec<Result<Event, AttemptError>> {
        if data.trim() == "[DONE]" {
            self.ended = true;
            return vec![Ok(Event::End(Ending {
                finish_reason: self.finish_reason.take(),
                usage: self.usage,
                response_id: self.response_id.take(),
            }))];
        }
        let value: Value = match serde_json::from_str(data) {
            Ok(value) => value,
            Err(e) => {
                self.ended = true;
                return vec![Err(AttemptError::Protocol(format!(
                    "an event is not JSON: {e}"
                )))];
            }
        };
        if let Some(error) = value.get("error") {
            self.ended = true;
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return vec![Err(AttemptError::Protocol(format!(
                "error in stream: {}",
                quote(&message)
            )))];
        }
        if self.response_id.is_none()
            && let Some(id) = value.get("id").and_then(Value::as_str)
        {
            self.response_id = Some(id.chars().take(128).collect());
        }
        if let Some(usage) = value.get("usage").filter(|u| !u.is_null()) {
            let field = |name| {
                usage
                    .get(name)
                    .and_then(Value::as_u64)
                    .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
            };
            self.usage = Some((field("prompt_tokens"), field("completion_tokens")));
        }
        let mut out = Vec::new();
        if let Some(choice) = value.get("choices").and_then(|c| c.get(0)) {
            if let Some(text) = choice
                .get("delta")
                .and_then(|d| d.get("content"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                out.push(Ok(Event::Delta(text.to_string())));
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(reason.to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_reads_deltas_usage_and_done_across_any_split() {
        let stream = concat!(
            ": comment\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo é\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for split in 1..stream.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&stream[..split]);
            events.extend(parser.feed(&stream[split..]));
            let events: Vec<Event> = events.into_iter().map(Result::unwrap).collect();
            assert_eq!(
                events,
                vec![
                    Event::Delta("Hel".into()),
                    Event::Delta("lo é".into()),
                    Event::End(Ending {
                        finish_reason: Some("length".into()),
                        usage: Some((7, 2)),
                        response_id: Some("chatcmpl-1".into()),
                    }),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn sse_parser_reports_errors_and_early_ends() {
        let mut parser = SseParser::default();
        let events = parser.feed(b"data: {\"error\":{\"message\":\"model overloaded\"}}\n\n");
        assert!(
            matches!(&events[..], [Err(AttemptError::Protocol(m))] if m.contains("model overloaded"))
        );
        let mut parser = SseParser::default();
        parser.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        assert!(parser.finish().is_err(), "no finish_reason and no [DONE]");
        let mut parser = SseParser::default();
        assert!(matches!(
            &parser.feed(b"data: not json\n\n")[..],
            [Err(AttemptError::Protocol(_))]
        ));
    }
}
