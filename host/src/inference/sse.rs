//! The server-sent-event stream of an OpenAI chat completion, parsed into
//! [`Event`]s incrementally, whatever the byte boundaries; and a plain
//! (unstreamed) chat completion, parsed into the same events
//! ([`whole_answer_events`]).

use std::borrow::Cow;
use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use serde_json::Value;

use super::generation::{Ending, Event, ExtraDelta};
use super::protocol::{AttemptError, quote};
use crate::chat::ToolCallDelta;

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
                Some(Ok(chunk)) => state.parser.feed(chunk.as_ref(), &mut state.queue),
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

/// The events of a plain `chat.completion` body (the answer to an
/// unstreamed request): its text as one delta, its tool calls, refusal and
/// log probabilities as one extra, then its end — at most three events, the
/// same a stream of it would have made, joined.
pub(super) fn whole_answer_events(body: &[u8]) -> Vec<Result<Event, AttemptError>> {
    let mut parser = SseParser {
        whole: true,
        ..SseParser::default()
    };
    let mut events = Vec::with_capacity(3);
    match std::str::from_utf8(body) {
        Ok(body) => parser.event(body, &mut events),
        Err(_) => parser.event(&String::from_utf8_lossy(body), &mut events),
    }
    if !parser.ended {
        events.push(match parser.choice_seen {
            true => Ok(Event::End(parser.ending())),
            false => Err(AttemptError::Protocol(
                "the answer is not a chat completion (no choices)".into(),
            )),
        });
    }
    events
}

/// Incremental parser of an OpenAI chat-completion SSE stream.
///
/// Lines are cut from the bytes as they come (a partial line is kept in a
/// buffer that keeps its capacity), and each event's JSON is read into
/// borrowed typed fields: only `id`, `choices[0].delta.content`,
/// `choices[0].finish_reason`, `usage` and `error` are looked at, and a
/// delta's text is copied once, into the [`Event`].
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    data: String,
    finish_reason: Option<String>,
    usage: Option<(u32, u32)>,
    response_id: Option<String>,
    ended: bool,
    /// Parsing a plain answer (a `message`, its tool calls without
    /// `index`) rather than a stream's chunks.
    whole: bool,
    /// A choice was read.
    choice_seen: bool,
}

/// Longest line accepted from an upstream (a guard against a server that
/// never sends a newline).
const MAX_SSE_LINE: usize = 4 * 1024 * 1024;

/// The fields of a `chat.completion.chunk` the host reads.
#[derive(serde::Deserialize)]
struct ChunkFields<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<ChoiceFields<'a>>>,
    #[serde(default)]
    usage: Option<UsageFields>,
    /// Rare, and its shape varies (an object with a message, a string).
    #[serde(default)]
    error: Option<Value>,
}

#[derive(serde::Deserialize)]
struct ChoiceFields<'a> {
    /// A chunk's `delta`, or a plain answer's `message` (the same fields).
    #[serde(borrow, default, alias = "message")]
    delta: Option<DeltaFields<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    logprobs: Option<Value>,
}

#[derive(serde::Deserialize)]
struct DeltaFields<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallFields>>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(serde::Deserialize)]
struct ToolCallFields {
    /// A streamed piece's call; a plain answer's calls have none (their
    /// position is their index).
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    function: Option<FunctionFields>,
}

#[derive(serde::Deserialize)]
struct FunctionFields {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// An event's `usage`, read leniently: a count that is not a whole number
/// a `u32` holds (`1e30`, `-1`, `"7"`) makes the usage unknown rather than
/// the event unreadable.
#[derive(serde::Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: Option<serde_json::Value>,
    #[serde(default)]
    completion_tokens: Option<serde_json::Value>,
}

type Item = Result<Event, AttemptError>;

impl SseParser {
    /// Feed bytes; the events they complete are added to `out`.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut impl Extend<Item>) {
        while !self.ended && !bytes.is_empty() {
            let Some(at) = bytes.iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(bytes);
                if self.line.len() > MAX_SSE_LINE {
                    self.fail(out, "an event line longer than 4 MiB");
                }
                return;
            };
            let (head, rest) = bytes.split_at(at);
            bytes = &rest[1..];
            if self.line.is_empty() {
                self.line_done(head, out);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.line_done(&line, out);
                line.clear();
                self.line = line;
            }
        }
    }

    /// One complete line (without its `\n`).
    fn line_done(&mut self, line: &[u8], out: &mut impl Extend<Item>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if !self.data.is_empty() {
                let data = std::mem::take(&mut self.data);
                self.event(&data, out);
                self.data = data;
                self.data.clear();
            }
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            match std::str::from_utf8(value) {
                Ok(text) => self.data.push_str(text),
                Err(_) => self.data.push_str(&String::from_utf8_lossy(value)),
            }
            if self.data.len() > MAX_SSE_LINE {
                self.fail(out, "an event longer than 4 MiB");
            }
        }
        // Comments (`:`), `event:`, `id:` and `retry:` lines carry
        // nothing a chat completion needs.
    }

    fn fail(&mut self, out: &mut impl Extend<Item>, message: &str) {
        self.ended = true;
        out.extend([Err(AttemptError::Protocol(message.into()))]);
    }

    /// The byte stream ended: an `End` if the generation had finished.
    pub fn finish(&mut self) -> Result<Event, AttemptError> {
        if !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            let mut last = Vec::new();
            self.event(&data, &mut last);
            if let Some(error) = last.into_iter().find(|e| e.is_err()) {
                return error;
            }
        }
        if self.ended || self.finish_reason.is_some() {
            Ok(Event::End(self.ending()))
        } else {
            Err(AttemptError::Protocol(
                "the stream ended before the generation finished".into(),
            ))
        }
    }

    fn ending(&mut self) -> Ending {
        Ending {
            finish_reason: self.finish_reason.take(),
            usage: self.usage,
            response_id: self.response_id.take(),
        }
    }

    fn event(&mut self, data: &str, out: &mut impl Extend<Item>) {
        if data.trim() == "[DONE]" {
            self.ended = true;
            let end = self.ending();
            out.extend([Ok(Event::End(end))]);
            return;
        }
        let chunk: ChunkFields<'_> = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                return self.fail(out, &format!("an event is not a completion chunk: {e}"));
            }
        };
        if let Some(error) = chunk.error {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return self.fail(out, &format!("error in stream: {}", quote(&message)));
        }
        if self.response_id.is_none()
            && let Some(id) = chunk.id
        {
            self.response_id = Some(id.chars().take(128).collect());
        }
        if let Some(usage) = chunk.usage {
            let count = |n: Option<serde_json::Value>| match n {
                None => Some(0),
                Some(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
            };
            self.usage = count(usage.prompt_tokens).zip(count(usage.completion_tokens));
        }
        if let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) {
            self.choice_seen = true;
            let whole = self.whole;
            let mut extra = ExtraDelta {
                logprobs: choice.logprobs.filter(|l| !l.is_null()),
                ..ExtraDelta::default()
            };
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.extend([Ok(Event::Delta(text.into_owned()))]);
                }
                extra.refusal = delta.refusal.filter(|r| !r.is_empty());
                extra.tool_calls = delta
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .enumerate()
                    .map(|(position, call)| {
                        let index = match whole {
                            true => position as u32,
                            false => call.index.unwrap_or(0),
                        };
                        let function = call.function.unwrap_or(FunctionFields {
                            name: None,
                            arguments: None,
                        });
                        ToolCallDelta {
                            index,
                            id: call.id,
                            kind: call.kind,
                            name: function.name,
                            arguments: function.arguments.unwrap_or_default(),
                        }
                    })
                    .collect();
            }
            if extra != ExtraDelta::default() {
                out.extend([Ok(Event::Extra(extra))]);
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason.into_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_no_u32_holds_is_unknown_not_an_error() {
        for usage in [
            r#"{"prompt_tokens":1e30,"completion_tokens":2}"#,
            r#"{"prompt_tokens":7,"completion_tokens":4294967296}"#,
            r#"{"prompt_tokens":-1,"completion_tokens":"2"}"#,
        ] {
            let stream = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"ok\"}},\"finish_reason\":\"stop\"}}],\"usage\":{usage}}}\n\ndata: [DONE]\n\n"
            );
            let mut parser = SseParser::default();
            let mut events = Vec::new();
            parser.feed(stream.as_bytes(), &mut events);
            let events: Vec<Event> = events.into_iter().map(Result::unwrap).collect();
            assert_eq!(events[0], Event::Delta("ok".into()), "{usage}");
            assert!(
                matches!(&events[1], Event::End(Ending { usage: None, .. })),
                "{usage}: {events:?}"
            );
        }
    }

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
            let mut events = Vec::new();
            parser.feed(&stream[..split], &mut events);
            parser.feed(&stream[split..], &mut events);
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
    fn sse_parser_reads_tool_call_pieces_refusals_and_logprobs() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"refusal\":\"no\"},\"logprobs\":{\"content\":[]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        parser.feed(stream.as_bytes(), &mut events);
        let events: Vec<Event> = events.into_iter().map(Result::unwrap).collect();
        let Event::Extra(first) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(first.tool_calls[0].id.as_deref(), Some("c1"));
        assert_eq!(first.tool_calls[0].name.as_deref(), Some("f"));
        let Event::Extra(second) = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(second.tool_calls[0].arguments, "{}");
        let Event::Extra(third) = &events[2] else {
            panic!("{events:?}")
        };
        assert_eq!(third.refusal.as_deref(), Some("no"));
        assert!(third.logprobs.is_some());
        let Event::End(end) = &events[3] else {
            panic!("{events:?}")
        };
        assert_eq!(end.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn sse_parser_reports_errors_and_early_ends() {
        let feed = |bytes: &[u8]| {
            let mut parser = SseParser::default();
            let mut events = Vec::new();
            parser.feed(bytes, &mut events);
            (parser, events)
        };
        let (_, events) = feed(b"data: {\"error\":{\"message\":\"model overloaded\"}}\n\n");
        assert!(
            matches!(&events[..], [Err(AttemptError::Protocol(m))] if m.contains("model overloaded"))
        );
        let (_, events) = feed(b"data: {\"error\":\"plain text\"}\n\n");
        assert!(
            matches!(&events[..], [Err(AttemptError::Protocol(m))] if m.contains("plain text"))
        );
        let (mut parser, _) = feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n");
        assert!(parser.finish().is_err(), "no finish_reason and no [DONE]");
        for bad in [&b"data: not json\n\n"[..], b"data: {\"choices\":7}\n\n"] {
            let (_, events) = feed(bad);
            assert!(matches!(&events[..], [Err(AttemptError::Protocol(_))]));
        }
        // An escaped delta is unescaped; extra fields are ignored.
        let (_, events) = feed(
            b"data: {\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"logprobs\":null,\"delta\":{\"content\":\"a\\n\\\"b\\u00e9\"}}],\"usage\":null}\n\n",
        );
        assert_eq!(
            events.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            [Event::Delta("a\n\"b\u{e9}".into())]
        );
    }

    #[test]
    fn a_plain_answer_is_the_events_its_stream_would_have_made() {
        let body = br#"{"id":"chatcmpl-9","object":"chat.completion","choices":[{"index":0,
            "message":{"role":"assistant","content":"Let me look.","refusal":null,
            "tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}},
                          {"id":"c2","type":"function","function":{"name":"g","arguments":"[1]"}}]},
            "logprobs":null,"finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        let events: Vec<Event> = whole_answer_events(body)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0], Event::Delta("Let me look.".into()));
        let Event::Extra(extra) = &events[1] else {
            panic!("{events:?}")
        };
        // A plain answer's calls have no index: their position is.
        let calls: Vec<(u32, Option<&str>, &str)> = extra
            .tool_calls
            .iter()
            .map(|c| (c.index, c.name.as_deref(), c.arguments.as_str()))
            .collect();
        assert_eq!(calls, [(0, Some("f"), "{}"), (1, Some("g"), "[1]")]);
        assert_eq!(
            events[2],
            Event::End(Ending {
                finish_reason: Some("tool_calls".into()),
                usage: Some((12, 7)),
                response_id: Some("chatcmpl-9".into()),
            })
        );
    }

    #[test]
    fn a_plain_answer_that_is_no_chat_completion_is_an_error() {
        for body in [
            &b"{\"object\":\"list\",\"data\":[]}"[..],
            b"data: {\"choices\":[]}\n\n",
            b"{\"error\":{\"message\":\"overloaded\"}}",
            b"\xff\xfe",
        ] {
            let events = whole_answer_events(body);
            assert!(
                matches!(events.as_slice(), [Err(AttemptError::Protocol(_))]),
                "{}: {events:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    use proptest::collection::{btree_map, vec as list};
    use proptest::prelude::*;

    /// The events of `stream` fed in pieces cut at `cuts`, then its end.
    fn fed(stream: &[u8], cuts: &[usize]) -> Vec<Item> {
        let (mut parser, mut events, mut rest) = (SseParser::default(), Vec::new(), stream);
        for cut in cuts {
            let (piece, tail) = rest.split_at(cut % (rest.len() + 1));
            parser.feed(piece, &mut events);
            rest = tail;
        }
        parser.feed(rest, &mut events);
        events.push(parser.finish());
        events
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = (0..5usize, any::<i32>(), any::<f64>(), ".{0,8}").prop_map(|(k, n, f, s)| {
            vec![Value::Null, (n > 0).into(), n.into(), f.into(), s.into()].swap_remove(k)
        });
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                list(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map("[a-z_]{1,8}", inner, 0..4).prop_map(Value::from_iter),
            ]
        })
    }

    /// SSE-looking bytes: field names, line ends, JSON pieces and noise.
    const SSE: &str = r#"(?s-u)(data: ?|\r?\n|\r|: c\n|\[DONE\]|\xc3\xa9|\{"error":|\{"choices":\[\{"delta":\{"content":"|"\}\}\]\}|,"finish_reason":"stop"|"usage":\{"prompt_tokens":|.{0,6}){0,40}"#;

    proptest::proptest! {
        #[test]
        fn arbitrary_sse_bytes_never_panic_whatever_the_split(bytes in proptest::string::bytes_regex(SSE).unwrap(), cuts in list(any::<usize>(), 0..6)) {
            prop_assert_eq!(fed(&bytes, &cuts), fed(&bytes, &[]));
        }

        #[test]
        fn arbitrary_valid_streams_read_the_same_whatever_the_split(
            // Deltas, with comments, tool call pieces and either line end.
            chunks in list((".{0,8}", "(: keep-alive\n)?", "(,\"tool_calls\":\\[\\{\"index\":0\\}\\])?", "\r?\n"), 0..8),
            done in "(data: \\[DONE\\]\n\n)?", cuts in list(any::<usize>(), 0..6),
        ) {
            let (mut stream, mut text) = (String::new(), String::new());
            for (delta, comment, call, nl) in chunks {
                text += &delta;
                let delta = serde_json::to_string(&delta).unwrap();
                stream += &format!("{comment}data: {{\"choices\":[{{\"delta\":{{\"content\":{delta}{call}}}}}]}}{nl}{nl}");
            }
            stream = stream + "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n" + &done;
            let events = fed(stream.as_bytes(), &cuts);
            prop_assert_eq!(&events, &fed(stream.as_bytes(), &[]));
            let end = events.iter().position(|e| matches!(e, Ok(Event::End(_)))).unwrap();
            prop_assert!(matches!(&events[end], Ok(Event::End(e)) if e.finish_reason.as_deref() == Some("stop")));
            let deltas: String = events[..end].iter().filter_map(|e| match e { Ok(Event::Delta(d)) => Some(d.as_str()), _ => None }).collect();
            prop_assert_eq!(deltas, text);
        }

        #[test]
        fn arbitrary_answers_are_at_most_three_events_ending_in_an_end_or_error(
            bytes in proptest::string::bytes_regex(SSE).unwrap(), value in any_json(), // and where in an answer it goes:
            at in "(/id|/error|/usage(/prompt_tokens)?|/choices(/0(/finish_reason|/logprobs|/message(/content|/refusal|/tool_calls(/0(/function)?)?)?)?)?)?",
        ) {
            let mut answer = serde_json::json!({"id": "x", "error": null, "usage": {"prompt_tokens": 1}, "choices": [{"finish_reason": "stop",
                "logprobs": null, "message": {"content": "a", "refusal": null, "tool_calls": [{"index": 0, "function": {"name": "f"}}]}}]});
            *answer.pointer_mut(&at).unwrap() = value;
            fed(format!("data: {answer}\n\n").as_bytes(), &[]);
            for body in [bytes, answer.to_string().into_bytes()] {
                let events = whole_answer_events(&body);
                let (last, rest) = events.split_last().unwrap();
                prop_assert!(events.len() <= 3 && matches!(last, Ok(Event::End(_)) | Err(_)), "{:?}", events);
                prop_assert!(rest.iter().all(|e| matches!(e, Ok(Event::Delta(_) | Event::Extra(_)))), "{:?}", events);
            }
        }
    }
}
