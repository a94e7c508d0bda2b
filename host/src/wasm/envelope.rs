//! The [`Envelope`]: the request as it flows through the stages, kept by
//! the host (a stage sees it through the WIT `request` resource).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::{Content, ContentPart, Message, Params, Tool, ToolCall, Usage};
use crate::inference::{Completion, Target};

/// A passage retrieved from a corpus by a stage.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Passage {
    /// Where it comes from: a file name relative to the corpus root.
    pub source: String,
    /// Its text.
    pub text: String,
    /// Relevance score (higher is more relevant).
    pub score: f32,
}

/// The request as it travels through the pipeline: the client's chat as
/// the stages changed it, and the answer as it is built.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Envelope {
    /// Unique id of the request, assigned by the host (`chatcmpl-...`).
    pub request_id: String,
    /// The chat messages, in order.
    pub messages: Vec<Message>,
    /// The generation parameters.
    pub params: Params,
    /// The tools offered to the model.
    pub tools: Vec<Tool>,
    /// Passages retrieved by `rag`, best first.
    pub passages: Vec<Passage>,
    /// The prompt string of the 0.1.x contract: set and read only by
    /// stages built against it (a 0.1.x `assemble` and `inference`).
    pub prompt: String,
    /// The answer's text content.
    pub completion: String,
    /// The answer's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// The model's refusal, if it refused.
    pub refusal: Option<String>,
    /// The answer's log probabilities, as the backend gave them (not
    /// visible to stages).
    pub logprobs: Option<Value>,
    /// Why generation stopped: `stop`, `length`, `tool_calls`, ...
    pub finish_reason: String,
    /// The completion split into the pieces the API streams.
    pub chunks: Vec<String>,
    /// Token usage of the generation.
    pub usage: Usage,
    /// Key/value notes of the stages (the answer's `orchestrator.metadata`).
    pub metadata: Vec<(String, String)>,
    /// Where the request's model was resolved to when it was parsed: the
    /// backend a generation goes to (unless a stage changes the model).
    #[serde(skip)]
    pub target: Option<Target>,
    /// Who sent the request (headers, address), for the stages granted
    /// them; `None` outside an HTTP request.
    #[serde(skip)]
    pub caller: Option<Arc<Caller>>,
    /// Who is calling, as a stage (an auth stage) set it.
    #[serde(skip)]
    pub principal: Option<String>,
    /// A stage answered the request early: the generating stage is
    /// skipped.
    #[serde(skip)]
    pub answered: bool,
    /// The generating stage ran: a later `answer` changes nothing.
    #[serde(skip)]
    pub generated: bool,
    /// A stage refused the request: the stages after it do not run.
    #[serde(skip)]
    pub refused: Option<Refusal>,
    /// Headers the stages set for the response (names under `x-`).
    #[serde(skip)]
    pub response_headers: Vec<(String, String)>,
}

/// What the HTTP layer knows of who sent a request.
#[derive(Debug, Default, PartialEq)]
pub struct Caller {
    /// The request's headers.
    pub headers: warp::http::HeaderMap,
    /// The client's address.
    pub address: Option<std::net::SocketAddr>,
}

/// A stage's refusal of a request, with its HTTP meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401, 403 or 429.
    pub status: u16,
    /// The message for the client.
    pub message: String,
    /// The OpenAI error code (`invalid_api_key`, `rate_limit_exceeded`,
    /// ...).
    pub code: String,
    /// When to retry, in milliseconds (`Retry-After`).
    pub retry_after_ms: Option<u64>,
    /// Which of the stage's policies refused (a rate limit rule).
    pub policy: Option<String>,
}

impl Envelope {
    /// An envelope for `request_id` carrying the client's chat.
    pub fn new(
        request_id: String,
        messages: Vec<Message>,
        params: Params,
        tools: Vec<Tool>,
    ) -> Envelope {
        Envelope {
            request_id,
            messages,
            params,
            tools,
            ..Envelope::default()
        }
    }

    /// An envelope with nothing in it, allocating nothing.
    pub fn placeholder() -> Envelope {
        Envelope::default()
    }

    /// Record a generation's answer: text, tool calls, refusal, log
    /// probabilities, finish reason and usage.
    pub fn set_answer(&mut self, completion: Completion) {
        self.completion = completion.text;
        self.tool_calls = completion.tool_calls;
        self.refusal = completion.refusal;
        self.logprobs = completion.logprobs;
        self.finish_reason = completion.finish_reason.to_string();
        self.usage = Usage {
            prompt_tokens: completion.prompt_tokens,
            completion_tokens: completion.completion_tokens,
        };
    }

    /// How the request ended, for the end-to-end histograms, once the
    /// pipeline is done with it: refused, answered early, or generated.
    pub fn outcome(&self) -> crate::metrics::Outcome {
        use crate::metrics::Outcome;
        if self.refused.is_some() {
            Outcome::Refused
        } else if self.answered {
            Outcome::Answered
        } else {
            Outcome::Ok
        }
    }

    /// Tokens of the chat, for a backend that reports no usage.
    pub fn prompt_tokens(&self) -> u32 {
        crate::chat::count_tokens(&self.messages)
    }

    /// Where the request goes, as a stage sees it (`route` of the WIT
    /// `request`): the resolved target's, or outside a routed request
    /// (`plugin run`) the model as asked.
    pub fn route(&self) -> Route<'_> {
        match &self.target {
            Some(target) => Route {
                pipeline: target.pipeline(),
                backend: target.backend(),
                upstream_model: target.upstream_model(),
                max_tokens_limit: target.max_tokens_limit(),
            },
            None => Route {
                pipeline: "",
                backend: "",
                upstream_model: &self.params.model,
                max_tokens_limit: 0,
            },
        }
    }

    /// The SHA-256 of what decides the request's generation as it stands
    /// (`fingerprint` of the WIT `request`): its [`route`](Self::route),
    /// parameters, messages and tools, each behind a tag byte and written
    /// as the JSON the host serializes it to (for the parameters,
    /// messages and tools, what a backend would be sent). A JSON value
    /// ends where its syntax says, so the parts cannot shift into one
    /// another and different requests cannot encode alike. The encoding's
    /// version comes first (`FINGERPRINT_VERSION`), so a digest of one
    /// encoding never stands for a request under another.
    pub fn fingerprint(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        struct Hashing(Sha256);
        impl std::io::Write for Hashing {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.update(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        fn part<T: Serialize + ?Sized>(hash: &mut Hashing, tag: u8, value: &T) {
            hash.0.update([tag]);
            // Cannot fail: the writer never does, and these types hold no
            // map with keys that are not strings. (Were it to, the hash
            // would still be of what was written, the same every time.)
            let _ = serde_json::to_writer(&mut *hash, value);
        }
        let mut hash = Hashing(Sha256::new());
        hash.0.update(FINGERPRINT_VERSION);
        part(&mut hash, b'R', &self.route());
        part(&mut hash, b'P', &self.params);
        part(&mut hash, b'M', &self.messages);
        part(&mut hash, b'T', &self.tools);
        hash.0.finalize().into()
    }

    /// An estimate of the prompt's tokens without copying it
    /// (`prompt-estimate` of the WIT `request`): for each message, a
    /// quarter of the bytes of its text (text parts joined by `\n`) and of
    /// its tool calls' names and arguments, rounded up, plus 4; and with
    /// tools, a quarter of the bytes of their definitions (kind, name,
    /// description, the JSON text of the schema and of the other fields),
    /// rounded up.
    pub fn prompt_estimate(&self) -> u64 {
        let messages: u64 = self
            .messages
            .iter()
            .map(|message| {
                let text = match &message.content {
                    None => 0,
                    Some(Content::Text(text)) => text.len(),
                    Some(Content::Parts(parts)) => {
                        let (count, bytes) = parts
                            .iter()
                            .filter_map(|part| match part {
                                ContentPart::Text(text) => Some(text.len()),
                                _ => None,
                            })
                            .fold((0usize, 0usize), |(count, bytes), len| {
                                (count + 1, bytes + len)
                            });
                        bytes + count.saturating_sub(1)
                    }
                };
                let calls: usize = message
                    .tool_calls
                    .iter()
                    .map(|call| call.name.len() + call.arguments.len())
                    .sum();
                ((text + calls) as u64).div_ceil(4) + 4
            })
            .sum();
        let tools: usize = self
            .tools
            .iter()
            .map(|tool| {
                tool.kind.len()
                    + tool.name.len()
                    + tool.description.as_ref().map_or(0, String::len)
                    // The lengths of the JSON texts a stage gets
                    // (`tool_to_wit`), counted without writing them.
                    + tool.parameters.as_ref().map_or(0, json_bytes)
                    + if tool.extra.is_empty() {
                        0
                    } else {
                        json_bytes(&tool.extra)
                    }
            })
            .sum();
        messages + (tools as u64).div_ceil(4)
    }
}

/// The version of [`Envelope::fingerprint`]'s encoding, hashed first:
/// change it with the encoding (a field added to a type it serializes, a
/// new part), which the test that pins a digest notices.
const FINGERPRINT_VERSION: &[u8] = b"fingerprint-v1\0";

/// Where a request goes: what [`Envelope::route`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Route<'a> {
    /// The pipeline that serves it.
    pub pipeline: &'a str,
    /// The backend a generation goes to.
    pub backend: &'a str,
    /// The model the backend is asked for.
    pub upstream_model: &'a str,
    /// The backend's most completion tokens (0: none set).
    pub max_tokens_limit: u32,
}

/// Approximate bytes a value takes as JSON text: what a stage sets is
/// counted against its `max_output_bytes` with this.
pub fn json_bytes<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Bytes of messages, near enough: their strings, and their extra fields
/// as JSON (most messages have none). Cheaper than serializing them.
pub fn messages_bytes(messages: &[Message]) -> usize {
    messages.iter().map(message_bytes).sum()
}

/// Bytes of a message (see [`messages_bytes`]).
fn message_bytes(message: &Message) -> usize {
    let content = match &message.content {
        None => 0,
        Some(Content::Text(text)) => text.len(),
        Some(Content::Parts(parts)) => parts
            .iter()
            .map(|part| match part {
                ContentPart::Text(text) => text.len(),
                ContentPart::ImageUrl { url, detail } => {
                    url.len() + detail.as_ref().map_or(0, String::len)
                }
                ContentPart::Other(object) => json_bytes(object),
            })
            .sum(),
    };
    message.role.len()
        + content
        + message.name.as_ref().map_or(0, String::len)
        + message
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.kind.len() + c.name.len() + c.arguments.len())
            .sum::<usize>()
        + message.tool_call_id.as_ref().map_or(0, String::len)
        + if message.extra.is_empty() {
            0
        } else {
            json_bytes(&message.extra)
        }
}

/// Total bytes of an envelope's content, near enough: the size of a
/// stage's input, which the breaker's input norm tracks.
pub fn envelope_bytes(envelope: &Envelope) -> usize {
    envelope.request_id.len()
        + messages_bytes(&envelope.messages)
        + envelope.params.model.len()
        + envelope.params.stop.iter().map(String::len).sum::<usize>()
        + if envelope.tools.is_empty() {
            0
        } else {
            json_bytes(&envelope.tools)
        }
        + envelope
            .passages
            .iter()
            .map(|p| p.source.len() + p.text.len())
            .sum::<usize>()
        + envelope.prompt.len()
        + envelope.completion.len()
        + envelope
            .tool_calls
            .iter()
            .map(|c| c.id.len() + c.name.len() + c.arguments.len())
            .sum::<usize>()
        + envelope.refusal.as_ref().map_or(0, String::len)
        + envelope.finish_reason.len()
        + envelope.chunks.iter().map(String::len).sum::<usize>()
        + envelope
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolCall;

    /// A function call `call_1` of `name` with `arguments`.
    fn call_of(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    fn chat() -> Envelope {
        Envelope::new(
            "chatcmpl-1".into(),
            vec![
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            Params::for_model("m"),
            Vec::new(),
        )
    }

    #[test]
    fn the_fingerprint_covers_what_decides_the_generation() {
        let base = chat().fingerprint();
        // Not the id, notes, principal, passages, headers or the answer.
        let mut same = chat();
        same.request_id = "chatcmpl-2".into();
        same.metadata.push(("note".into(), "x".into()));
        same.principal = Some("alice".into());
        same.passages.push(Passage::default());
        same.response_headers.push(("x-a".into(), "1".into()));
        same.completion = "old".into();
        assert_eq!(same.fingerprint(), base);

        let mut variants: Vec<Envelope> = Vec::new();
        let mut change = |edit: &dyn Fn(&mut Envelope)| {
            let mut envelope = chat();
            edit(&mut envelope);
            variants.push(envelope);
        };
        change(&|e| e.params.model = "other".into());
        change(&|e| e.params.temperature = Some(0.7));
        change(&|e| e.params.seed = Some(1));
        change(&|e| e.params.max_tokens = Some(10));
        // Where one string ends and the next begins counts.
        change(&|e| e.params.stop = vec!["ab".into(), "c".into()]);
        change(&|e| e.params.stop = vec!["a".into(), "bc".into()]);
        change(&|e| {
            e.params
                .extra
                .insert("x".into(), serde_json::Value::from(1));
        });
        change(&|e| e.messages[1] = Message::new("user", "Hi!"));
        change(&|e| e.messages[0].role = "developer".into());
        change(&|e| e.messages.push(Message::new("user", "")));
        change(&|e| e.messages[1].name = Some("bob".into()));
        change(&|e| {
            e.messages[1].content = Some(Content::Parts(vec![ContentPart::Text("Hi".into())]));
        });
        change(&|e| {
            let mut call = Message::new("assistant", "");
            call.content = None;
            call.tool_calls = vec![call_of("search", "{}")];
            e.messages.push(call);
        });
        let result = |id: &str| {
            let mut result = Message::new("tool", "found");
            result.tool_call_id = Some(id.into());
            result
        };
        change(&|e| e.messages.push(result("call_1")));
        change(&|e| e.messages.push(result("call_2")));
        change(&|e| {
            e.messages[1].extra.insert("x".into(), 1.into());
        });
        let tool = |edit: &dyn Fn(&mut Tool)| {
            let mut tool = Tool {
                kind: "function".into(),
                name: "search".into(),
                description: None,
                parameters: None,
                strict: None,
                extra: Default::default(),
            };
            edit(&mut tool);
            tool
        };
        change(&|e| e.tools.push(tool(&|_| {})));
        change(&|e| e.tools.push(tool(&|t| t.description = Some("Find".into()))));
        change(&|e| {
            e.tools
                .push(tool(&|t| t.parameters = Some(serde_json::json!({}))))
        });
        change(&|e| e.tools.push(tool(&|t| t.strict = Some(true))));
        let prints: Vec<[u8; 32]> = variants.iter().map(Envelope::fingerprint).collect();
        for (at, print) in prints.iter().enumerate() {
            assert_ne!(*print, base, "variant {at} keeps the fingerprint");
            assert!(
                !prints[..at].contains(print),
                "variant {at} collides with an earlier one"
            );
        }
    }

    /// A change of this digest is a change of the fingerprint's encoding:
    /// bump [`FINGERPRINT_VERSION`] with it, then pin the new digest. It is
    /// the SHA-256 of `fingerprint-v1\0`, `R`
    /// `{"pipeline":"","backend":"","upstream_model":"m","max_tokens_limit":0}`,
    /// `P` `{"model":"m"}`, `M`
    /// `[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]`,
    /// `T` `[]` (checked with Python's `hashlib`).
    #[test]
    fn the_fingerprint_encoding_is_pinned() {
        let hex: String = chat()
            .fingerprint()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "026eb087a98f765bbf6b90d32f5da57b3d3974cf6d24466fee1d00b0e582f79b"
        );
    }

    #[test]
    fn the_prompt_estimate_counts_text_calls_and_tools() {
        let estimate = |messages: Vec<Message>, tools: Vec<Tool>| {
            Envelope::new(String::new(), messages, Params::for_model("m"), tools).prompt_estimate()
        };
        // 9 bytes: 3 tokens + 4.
        let user = Message::new("user", "what time");
        assert_eq!(estimate(vec![user.clone()], Vec::new()), 7);
        // An empty message still costs 4.
        assert_eq!(estimate(vec![Message::new("system", "")], Vec::new()), 4);
        // Parts: "ab" + "\n" + "cdef" = 7 bytes, 2 tokens; other parts are
        // left out.
        let mut parts = Message::new("user", "");
        let mut audio = crate::chat::Extra::new();
        audio.insert("type".into(), "input_audio".into());
        parts.content = Some(Content::Parts(vec![
            ContentPart::Text("ab".into()),
            ContentPart::Other(audio),
            ContentPart::Text("cdef".into()),
        ]));
        assert_eq!(estimate(vec![parts], Vec::new()), 6);
        // A call: "fn" + 10 bytes of arguments = 12 bytes, 3 tokens.
        let mut call = Message::new("assistant", "");
        call.content = None;
        call.tool_calls = vec![call_of("fn", "{\"a\":\"bc\"}")];
        assert_eq!(estimate(vec![call], Vec::new()), 7);
        // A tool: "function" + "weather" + 7 bytes of schema = 22, 6 tokens.
        let tool = Tool {
            kind: "function".into(),
            name: "weather".into(),
            description: None,
            parameters: Some(serde_json::json!({"a": 1})),
            strict: None,
            extra: Default::default(),
        };
        assert_eq!(estimate(vec![user], vec![tool]), 13);
    }
}
