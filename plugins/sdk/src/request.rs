//! The request a stage works on: the [`Request`] trait, implemented by the
//! host's handle in a plugin and by [`TestRequest`] in native tests.
//!
//! [`TestRequest`]: crate::testing::TestRequest

use std::fmt::Display;

use crate::bindings::streaming::orchestrator::pipeline::inference;
use crate::bindings::streaming::orchestrator::pipeline::request::Request as Handle;
use crate::{
    GenerationParams, InferenceError, Message, Passage, Refusal, Route, Tool, ToolCall, Usage,
};

/// The note the host sets to `true` when the client asked for a stream
/// (see [`Request::stream_requested`]). The host reads the same constant.
pub const STREAM_NOTE: &str = "request.stream";

/// The request travelling through the pipeline, field by field.
///
/// In a plugin this is the host's `request` handle (the WIT `request`
/// resource): each getter copies one field into the plugin, each setter
/// replaces one field in the host, so a stage pays only for the fields it
/// uses. If `process` returns an error, everything it set is discarded.
///
/// The request is the client's chat as it was sent ([`messages`], with
/// roles, text or multi-part content, tool calls and tool results), the
/// [`tools`] offered to the model and every generation parameter
/// ([`params`]), as changed by the stages so far; and, once generated, the
/// answer: [`completion`] (its text), [`tool_calls`], [`refusal`],
/// [`finish_reason`] and [`usage`].
///
/// [`messages`]: Request::messages
/// [`tools`]: Request::tools
/// [`params`]: Request::params
/// [`completion`]: Request::completion
/// [`tool_calls`]: Request::tool_calls
/// [`refusal`]: Request::refusal
/// [`finish_reason`]: Request::finish_reason
/// [`usage`]: Request::usage
pub trait Request {
    /// Unique id of the request, assigned by the host (`chatcmpl-...`).
    fn id(&self) -> String;
    /// The chat messages, in order: the client's, as changed by the stages
    /// so far.
    fn messages(&self) -> Vec<Message>;
    /// Replace the chat messages.
    fn set_messages(&self, messages: &[Message]);
    /// The generation parameters, as the client sent them (`None`: the
    /// client said nothing).
    fn params(&self) -> GenerationParams;
    /// Replace the generation parameters.
    fn set_params(&self, params: &GenerationParams);
    /// The tools offered to the model.
    fn tools(&self) -> Vec<Tool>;
    /// Replace the tools.
    fn set_tools(&self, tools: &[Tool]);
    /// Passages retrieved by `rag`, best first.
    fn passages(&self) -> Vec<Passage>;
    /// Replace the passages.
    fn set_passages(&self, passages: &[Passage]);
    /// The answer's text content: written by the generation, cleaned by
    /// `post`.
    fn completion(&self) -> String;
    /// Replace the answer's text content.
    fn set_completion(&self, completion: &str);
    /// The answer's tool calls.
    fn tool_calls(&self) -> Vec<ToolCall>;
    /// Replace the answer's tool calls.
    fn set_tool_calls(&self, calls: &[ToolCall]);
    /// The model's refusal, if it refused.
    fn refusal(&self) -> Option<String>;
    /// Replace the refusal.
    fn set_refusal(&self, refusal: Option<&str>);
    /// Why generation stopped: `stop`, `length`, `tool_calls` or
    /// `content_filter`.
    fn finish_reason(&self) -> String;
    /// Replace the finish reason.
    fn set_finish_reason(&self, reason: &str);
    /// The completion split into the pieces the API streams.
    fn chunks(&self) -> Vec<String>;
    /// Replace the chunks.
    fn set_chunks(&self, chunks: &[String]);
    /// Token usage of the generation.
    fn usage(&self) -> Usage;
    /// Replace the token usage.
    fn set_usage(&self, usage: Usage);
    /// All notes, in order (the response's `orchestrator.metadata`).
    fn metadata(&self) -> Vec<(String, String)>;
    /// The value of the note `key`, if there is one.
    fn note(&self, key: &str) -> Option<String>;
    /// Set the note `key` (replacing a note with the same key). Prefix keys
    /// with the stage's name: `profanity.masked`.
    fn set_note(&self, key: &str, value: &str);

    /// The request header `name` (case-insensitive), if the client sent it
    /// and the stage is granted it (`capabilities.headers`); repeated
    /// headers are joined with `, `.
    fn header(&self, name: &str) -> Option<String>;
    /// The client's address (`ip:port`), if the stage is granted it
    /// (`capabilities.client_address`).
    fn client_address(&self) -> Option<String>;
    /// Who is calling, as a stage (an auth stage) set it.
    fn principal(&self) -> Option<String>;
    /// Set who is calling (at most 256 bytes; a longer one is cut): every
    /// later stage and the
    /// finish calls see it, and the request's trace records it.
    fn set_principal(&self, principal: &str);
    /// Answer the request with what it holds now (set the completion,
    /// finish reason and usage first): the generating stage is skipped, the
    /// stages after it still run, and a streaming client gets the answer
    /// in chunks. For a stage before the generating one (a cache hit).
    fn answer(&self);
    /// Whether a stage answered the request early.
    fn answered(&self) -> bool;
    /// Refuse the request with 401, 403 or 429: the stages after this one
    /// do not run. Return `Ok(())` from `process` after it.
    fn refuse(&self, refusal: Refusal);
    /// Send the header `name: value` (name under `x-`, at most 64 bytes;
    /// value visible ASCII, at most 1 KiB) with the answer or the refusal.
    ///
    /// # Errors
    ///
    /// Why the host refused the header.
    fn set_response_header(&self, name: &str, value: &str) -> Result<(), String>;
    /// Where the request goes, as the host resolved its model: pipeline,
    /// backend, upstream model and the backend's `max_tokens` limit.
    fn route(&self) -> Route;
    /// A SHA-256 digest of what decides the request's generation as it
    /// stands: its [`route`](Self::route), parameters, messages and tools
    /// (not its id, principal, notes, passages or headers). Equal for
    /// requests equal in those, different otherwise; computed by the host,
    /// so the chat is not copied into the plugin for it. The encoding
    /// behind it may change with the host's version: a key stored for
    /// later should carry a version of its own. (The testing double,
    /// [`TestRequest`](crate::testing::TestRequest), returns other bytes
    /// with the same equality, not 32.)
    fn fingerprint(&self) -> Vec<u8>;
    /// The host's estimate of the prompt's tokens, without copying the
    /// chat into the plugin: for each message a quarter of the bytes of
    /// its text and of its tool calls' names and arguments, rounded up,
    /// plus 4; with tools, a quarter of the bytes of their definitions,
    /// rounded up. What a rate limit reserves before the generation.
    fn prompt_estimate(&self) -> u64;

    /// Generate the answer to the request as it stands (its messages,
    /// tools and parameters) with the host's inference backend, and record
    /// it in the request: completion, tool calls, refusal, finish reason
    /// and usage. Returns when the whole answer is there.
    ///
    /// Only for a stage whose [`Stage::INFERENCE`](crate::Stage::INFERENCE)
    /// is `true`, at a position the host grants `inference = true`.
    ///
    /// # Errors
    ///
    /// An [`InferenceError`]; `StageError::from` maps it for `process`.
    fn generate(&self) -> Result<(), InferenceError>;

    /// Start a streamed generation of the answer: returns once the backend
    /// has accepted the request, before the first token. The host then
    /// delivers the tokens itself, through the streaming stages that
    /// follow, to the client, and records the whole answer in the request
    /// when the stream ends. Same conditions as [`generate`](Self::generate).
    /// Unless [`stream_requested`](Self::stream_requested), the host asks
    /// the backend for one answer instead, after this call returns (at
    /// once, without an error): a backend error is then the stage's. Call
    /// [`generate`](Self::generate) to see it.
    ///
    /// # Errors
    ///
    /// An [`InferenceError`]; `StageError::from` maps it for `process`.
    fn generate_stream(&self) -> Result<(), InferenceError>;

    /// Set several notes at once, each value written with `Display`:
    /// `request.set_notes(&[("post.redacted", &3), ("post.stopped", &true)])`.
    fn set_notes(&self, notes: &[(&str, &dyn Display)]) {
        for (key, value) in notes {
            self.set_note(key, &value.to_string());
        }
    }

    /// Whether the client asked for a streamed answer (the note
    /// [`STREAM_NOTE`] is `true`). The inference stage then starts a stream
    /// rather than a whole generation.
    fn stream_requested(&self) -> bool {
        self.note(STREAM_NOTE).as_deref() == Some("true")
    }
}

/// The host's handle as a [`Request`], in a plugin whose stage says
/// `INFERENCE` (the export macros pass `Stage::INFERENCE`). With `false`,
/// [`generate`](Request::generate) and
/// [`generate_stream`](Request::generate_stream) never reach the import,
/// so the plugin does not import `orchestrator:pipeline/inference` at all.
#[doc(hidden)]
pub struct HostRequest<'a, const INFERENCE: bool>(pub &'a Handle);

/// What a stage without [`Stage::INFERENCE`](crate::Stage::INFERENCE) gets
/// from `generate`.
fn not_declared() -> InferenceError {
    InferenceError::Unavailable(
        "this plugin does not generate: its Stage impl must say `const INFERENCE: bool = true`"
            .into(),
    )
}

impl<const INFERENCE: bool> Request for HostRequest<'_, INFERENCE> {
    fn id(&self) -> String {
        self.0.id()
    }
    fn messages(&self) -> Vec<Message> {
        self.0.messages()
    }
    fn set_messages(&self, messages: &[Message]) {
        self.0.set_messages(messages)
    }
    fn params(&self) -> GenerationParams {
        self.0.params()
    }
    fn set_params(&self, params: &GenerationParams) {
        self.0.set_params(params)
    }
    fn tools(&self) -> Vec<Tool> {
        self.0.tools()
    }
    fn set_tools(&self, tools: &[Tool]) {
        self.0.set_tools(tools)
    }
    fn passages(&self) -> Vec<Passage> {
        self.0.passages()
    }
    fn set_passages(&self, passages: &[Passage]) {
        self.0.set_passages(passages)
    }
    fn completion(&self) -> String {
        self.0.completion()
    }
    fn set_completion(&self, completion: &str) {
        self.0.set_completion(completion)
    }
    fn tool_calls(&self) -> Vec<ToolCall> {
        self.0.tool_calls()
    }
    fn set_tool_calls(&self, calls: &[ToolCall]) {
        self.0.set_tool_calls(calls)
    }
    fn refusal(&self) -> Option<String> {
        self.0.refusal()
    }
    fn set_refusal(&self, refusal: Option<&str>) {
        self.0.set_refusal(refusal)
    }
    fn finish_reason(&self) -> String {
        self.0.finish_reason()
    }
    fn set_finish_reason(&self, reason: &str) {
        self.0.set_finish_reason(reason)
    }
    fn chunks(&self) -> Vec<String> {
        self.0.chunks()
    }
    fn set_chunks(&self, chunks: &[String]) {
        self.0.set_chunks(chunks)
    }
    fn usage(&self) -> Usage {
        self.0.usage()
    }
    fn set_usage(&self, usage: Usage) {
        self.0.set_usage(usage)
    }
    fn metadata(&self) -> Vec<(String, String)> {
        self.0.metadata()
    }
    fn note(&self, key: &str) -> Option<String> {
        self.0.note(key)
    }
    fn set_note(&self, key: &str, value: &str) {
        self.0.set_note(key, value)
    }
    fn header(&self, name: &str) -> Option<String> {
        self.0.header(name)
    }
    fn client_address(&self) -> Option<String> {
        self.0.client_address()
    }
    fn principal(&self) -> Option<String> {
        self.0.principal()
    }
    fn set_principal(&self, principal: &str) {
        self.0.set_principal(principal)
    }
    fn answer(&self) {
        self.0.answer()
    }
    fn answered(&self) -> bool {
        self.0.answered()
    }
    fn refuse(&self, refusal: Refusal) {
        self.0.refuse(&refusal)
    }
    fn set_response_header(&self, name: &str, value: &str) -> Result<(), String> {
        self.0.set_response_header(name, value)
    }
    fn route(&self) -> Route {
        self.0.route()
    }
    fn fingerprint(&self) -> Vec<u8> {
        self.0.fingerprint()
    }
    fn prompt_estimate(&self) -> u64 {
        self.0.prompt_estimate()
    }
    fn generate(&self) -> Result<(), InferenceError> {
        // A constant condition: for `false` the import is not even
        // compiled in.
        if !INFERENCE {
            return Err(not_declared());
        }
        inference::generate(self.0)
    }
    fn generate_stream(&self) -> Result<(), InferenceError> {
        if !INFERENCE {
            return Err(not_declared());
        }
        inference::generate_stream(self.0)
    }
}
