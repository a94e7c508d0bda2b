//! Native test doubles: run a stage's `process` and chunk path in a plain
//! `cargo test`, without a host.
//!
//! ```
//! use orchestrator_plugin::testing::{Answer, Generate, TestRequest};
//! use orchestrator_plugin::{Request, ToolCall};
//!
//! let request = TestRequest::new()
//!     .with_system("Be brief.")
//!     .with_user("What is the weather in Paris?")
//!     .with_answer(Answer::tool_calls(vec![ToolCall::function(
//!         "call_1",
//!         "weather",
//!         r#"{"city":"Paris"}"#,
//!     )]));
//! assert_eq!(request.messages()[1].text(), "What is the weather in Paris?");
//!
//! // What a generating stage does; the scripted answer is recorded.
//! request.generate().unwrap();
//! assert_eq!(request.generations(), [Generate::Whole]);
//! assert_eq!(request.finish_reason(), "tool_calls");
//! assert_eq!(request.tool_calls()[0].name, "weather");
//!
//! request.set_note("demo.seen", "yes");
//! assert_eq!(request.note("demo.seen").as_deref(), Some("yes"));
//! ```

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use crate::{
    Chunk, ChunkContext, Content, ContentPart, GenerationParams, InferenceError, Message, Passage,
    Refusal, Request, Route, STREAM_NOTE, StageError, StreamingStage, Tool, ToolCall, Usage,
};

/// Every field of a [`TestRequest`], as the next stage would see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    /// The request's id (`chatcmpl-test`).
    pub id: String,
    /// The chat messages.
    pub messages: Vec<Message>,
    /// The generation parameters.
    pub params: GenerationParams,
    /// The tools offered to the model.
    pub tools: Vec<Tool>,
    /// Retrieved passages.
    pub passages: Vec<Passage>,
    /// The answer's text content.
    pub completion: String,
    /// The answer's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// The model's refusal.
    pub refusal: Option<String>,
    /// Why generation stopped.
    pub finish_reason: String,
    /// The streamed pieces.
    pub chunks: Vec<String>,
    /// Token usage.
    pub usage: Usage,
    /// The notes, in order.
    pub metadata: Vec<(String, String)>,
    /// The request headers the stage sees (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The client's address the stage sees.
    pub client_address: Option<String>,
    /// Who is calling.
    pub principal: Option<String>,
    /// Whether a stage answered the request early.
    pub answered: bool,
    /// A stage's refusal.
    pub refused: Option<Refusal>,
    /// The response headers set.
    pub response_headers: Vec<(String, String)>,
    /// Where the request goes.
    pub route: Route,
}

/// Which generation a stage asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// [`Request::generate`].
    Whole,
    /// [`Request::generate_stream`].
    Stream,
}

/// A canned answer for [`TestRequest::with_answer`]: what the host writes
/// into the request when a generation ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The text content (the completion).
    pub text: String,
    /// The tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// A refusal.
    pub refusal: Option<String>,
    /// The finish reason.
    pub finish_reason: String,
    /// The token usage.
    pub usage: Usage,
}

impl Answer {
    /// A text answer, finish reason `stop`, usage zero.
    pub fn text(text: impl Into<String>) -> Answer {
        Answer {
            text: text.into(),
            tool_calls: Vec::new(),
            refusal: None,
            finish_reason: "stop".into(),
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
            },
        }
    }

    /// An answer that only calls tools: no text, finish reason
    /// `tool_calls`.
    pub fn tool_calls(calls: Vec<ToolCall>) -> Answer {
        Answer {
            tool_calls: calls,
            finish_reason: "tool_calls".into(),
            ..Answer::text("")
        }
    }

    /// The same answer with this finish reason.
    pub fn with_finish_reason(mut self, reason: impl Into<String>) -> Answer {
        self.finish_reason = reason.into();
        self
    }

    /// The same answer with this usage.
    pub fn with_usage(mut self, prompt_tokens: u32, completion_tokens: u32) -> Answer {
        self.usage = Usage {
            prompt_tokens,
            completion_tokens,
        };
        self
    }

    /// The same answer with a refusal.
    pub fn with_refusal(mut self, refusal: impl Into<String>) -> Answer {
        self.refusal = Some(refusal.into());
        self
    }
}

/// What a [`TestRequest`] does when a stage generates.
type Generator = Rc<dyn Fn(&TestRequest) -> Result<(), InferenceError>>;

/// An in-memory [`Request`], as the host would hand it to a stage.
///
/// [`generate`](Request::generate) and
/// [`generate_stream`](Request::generate_stream) run what the test scripted
/// ([`with_answer`](Self::with_answer),
/// [`with_generation`](Self::with_generation),
/// [`with_generation_error`](Self::with_generation_error)) and record the
/// call ([`generations`](Self::generations)). A streamed generation
/// records its answer at once, as the host does when the stream ends.
/// Without a script they return [`InferenceError::Unavailable`].
#[derive(Clone)]
pub struct TestRequest {
    fields: RefCell<Fields>,
    generator: Option<Generator>,
    generations: RefCell<Vec<Generate>>,
}

impl fmt::Debug for TestRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestRequest")
            .field("fields", &self.fields.borrow())
            .field("scripted", &self.generator.is_some())
            .field("generations", &self.generations.borrow())
            .finish()
    }
}

impl Default for TestRequest {
    fn default() -> Self {
        Self::new()
    }
}

/// The parameters of a test request: model `echo`, nothing else said
/// ([`GenerationParams::new`]).
pub fn params() -> GenerationParams {
    GenerationParams::new("echo")
}

impl TestRequest {
    /// An empty request with id `chatcmpl-test` and [`params`].
    pub fn new() -> Self {
        TestRequest {
            fields: RefCell::new(Fields {
                id: "chatcmpl-test".into(),
                messages: Vec::new(),
                params: params(),
                tools: Vec::new(),
                passages: Vec::new(),
                completion: String::new(),
                tool_calls: Vec::new(),
                refusal: None,
                finish_reason: String::new(),
                chunks: Vec::new(),
                usage: Usage {
                    prompt_tokens: 0,
                    completion_tokens: 0,
                },
                metadata: Vec::new(),
                headers: Vec::new(),
                client_address: None,
                principal: None,
                answered: false,
                refused: None,
                response_headers: Vec::new(),
                route: Route {
                    pipeline: "default".into(),
                    backend: "echo".into(),
                    upstream_model: "echo".into(),
                    max_tokens_limit: 4096,
                },
            }),
            generator: None,
            generations: RefCell::new(Vec::new()),
        }
    }

    fn with(self, change: impl FnOnce(&mut Fields)) -> Self {
        change(&mut self.fields.borrow_mut());
        self
    }

    /// The request with these messages appended.
    pub fn with_messages(self, messages: impl IntoIterator<Item = Message>) -> Self {
        self.with(|f| f.messages.extend(messages))
    }

    /// The request with a text message of `role` appended.
    pub fn with_message(self, role: &str, text: &str) -> Self {
        self.with(|f| f.messages.push(Message::new(role, text)))
    }

    /// The request with a `system` message appended.
    pub fn with_system(self, text: &str) -> Self {
        self.with_message("system", text)
    }

    /// The request with a `user` message appended.
    pub fn with_user(self, text: &str) -> Self {
        self.with_message("user", text)
    }

    /// The request with an `assistant` message appended.
    pub fn with_assistant(self, text: &str) -> Self {
        self.with_message("assistant", text)
    }

    /// The request with a `tool` message appended: the result `text` of
    /// the call `call_id`.
    pub fn with_tool_result(self, call_id: &str, text: &str) -> Self {
        let mut message = Message::new("tool", text);
        message.tool_call_id = Some(call_id.into());
        self.with(|f| f.messages.push(message))
    }

    /// The request with these tools offered.
    pub fn with_tools(self, tools: impl IntoIterator<Item = Tool>) -> Self {
        self.with(|f| f.tools.extend(tools))
    }

    /// The request with these generation parameters.
    pub fn with_params(self, params: GenerationParams) -> Self {
        self.with(|f| f.params = params)
    }

    /// The request with these stop sequences.
    pub fn with_stop(self, stop: &[&str]) -> Self {
        self.with(|f| f.params.stop = stop.iter().map(|s| s.to_string()).collect())
    }

    /// The request with these passages appended.
    pub fn with_passages(self, passages: impl IntoIterator<Item = Passage>) -> Self {
        self.with(|f| f.passages.extend(passages))
    }

    /// The request with this completion and finish reason `stop`.
    pub fn with_completion(self, completion: &str) -> Self {
        self.with(|f| {
            f.completion = completion.into();
            f.finish_reason = "stop".into();
        })
    }

    /// The request with these tool calls in its answer.
    pub fn with_tool_calls(self, calls: impl IntoIterator<Item = ToolCall>) -> Self {
        self.with(|f| f.tool_calls.extend(calls))
    }

    /// A request header the stage sees (as if granted).
    pub fn with_header(self, name: &str, value: &str) -> Self {
        let name = name.to_ascii_lowercase();
        self.with(|f| f.headers.push((name, value.into())))
    }

    /// Where the request goes (by default pipeline `default`, backend and
    /// upstream model `echo`, a `max_tokens` limit of 4096).
    pub fn with_route(self, route: Route) -> Self {
        self.with(|f| f.route = route)
    }

    /// The client's address the stage sees.
    pub fn with_client_address(self, address: &str) -> Self {
        self.with(|f| f.client_address = Some(address.into()))
    }

    /// A note, as an earlier stage would have set it.
    pub fn with_note(self, key: &str, value: &str) -> Self {
        self.set_note(key, value);
        self
    }

    /// The request as from a client that asked for a stream (the note
    /// [`STREAM_NOTE`] is `true`).
    pub fn streaming(self) -> Self {
        self.with_note(STREAM_NOTE, "true")
    }

    /// The request whose generations run `generate`, which reads and
    /// writes the request as the host would (it may also fail).
    pub fn with_generation(
        mut self,
        generate: impl Fn(&TestRequest) -> Result<(), InferenceError> + 'static,
    ) -> Self {
        self.generator = Some(Rc::new(generate));
        self
    }

    /// The request whose generations record `answer`: completion, tool
    /// calls, refusal, finish reason and usage.
    pub fn with_answer(self, answer: Answer) -> Self {
        self.with_generation(move |request| {
            request.set_completion(&answer.text);
            request.set_tool_calls(&answer.tool_calls);
            request.set_refusal(answer.refusal.as_deref());
            request.set_finish_reason(&answer.finish_reason);
            request.set_usage(answer.usage);
            Ok(())
        })
    }

    /// The request whose generations fail with `error`, recording nothing.
    pub fn with_generation_error(self, error: InferenceError) -> Self {
        self.with_generation(move |_| Err(error.clone()))
    }

    /// The generations the stage asked for, in order.
    pub fn generations(&self) -> Vec<Generate> {
        self.generations.borrow().clone()
    }

    /// Every field, as the next stage would see it.
    pub fn fields(&self) -> Fields {
        self.fields.borrow().clone()
    }

    fn run_generation(&self, kind: Generate) -> Result<(), InferenceError> {
        self.generations.borrow_mut().push(kind);
        match &self.generator {
            Some(generate) => generate(self),
            None => Err(InferenceError::Unavailable(
                "TestRequest: no generation scripted (with_answer, with_generation)".into(),
            )),
        }
    }
}

impl Request for TestRequest {
    fn id(&self) -> String {
        self.fields.borrow().id.clone()
    }
    fn messages(&self) -> Vec<Message> {
        self.fields.borrow().messages.clone()
    }
    fn set_messages(&self, messages: &[Message]) {
        self.fields.borrow_mut().messages = messages.to_vec();
    }
    fn params(&self) -> GenerationParams {
        self.fields.borrow().params.clone()
    }
    fn set_params(&self, params: &GenerationParams) {
        self.fields.borrow_mut().params = params.clone();
    }
    fn tools(&self) -> Vec<Tool> {
        self.fields.borrow().tools.clone()
    }
    fn set_tools(&self, tools: &[Tool]) {
        self.fields.borrow_mut().tools = tools.to_vec();
    }
    fn passages(&self) -> Vec<Passage> {
        self.fields.borrow().passages.clone()
    }
    fn set_passages(&self, passages: &[Passage]) {
        self.fields.borrow_mut().passages = passages.to_vec();
    }
    fn completion(&self) -> String {
        self.fields.borrow().completion.clone()
    }
    fn set_completion(&self, completion: &str) {
        self.fields.borrow_mut().completion = completion.into();
    }
    fn tool_calls(&self) -> Vec<ToolCall> {
        self.fields.borrow().tool_calls.clone()
    }
    fn set_tool_calls(&self, calls: &[ToolCall]) {
        self.fields.borrow_mut().tool_calls = calls.to_vec();
    }
    fn refusal(&self) -> Option<String> {
        self.fields.borrow().refusal.clone()
    }
    fn set_refusal(&self, refusal: Option<&str>) {
        self.fields.borrow_mut().refusal = refusal.map(str::to_string);
    }
    fn finish_reason(&self) -> String {
        self.fields.borrow().finish_reason.clone()
    }
    fn set_finish_reason(&self, reason: &str) {
        self.fields.borrow_mut().finish_reason = reason.into();
    }
    fn chunks(&self) -> Vec<String> {
        self.fields.borrow().chunks.clone()
    }
    fn set_chunks(&self, chunks: &[String]) {
        self.fields.borrow_mut().chunks = chunks.to_vec();
    }
    fn usage(&self) -> Usage {
        self.fields.borrow().usage
    }
    fn set_usage(&self, usage: Usage) {
        self.fields.borrow_mut().usage = usage;
    }
    fn metadata(&self) -> Vec<(String, String)> {
        self.fields.borrow().metadata.clone()
    }
    fn note(&self, key: &str) -> Option<String> {
        let fields = self.fields.borrow();
        let found = fields.metadata.iter().find(|(k, _)| k == key);
        found.map(|(_, v)| v.clone())
    }
    fn set_note(&self, key: &str, value: &str) {
        let mut fields = self.fields.borrow_mut();
        match fields.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(note) => note.1 = value.into(),
            None => fields.metadata.push((key.into(), value.into())),
        }
    }
    fn header(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let fields = self.fields.borrow();
        let values: Vec<&str> = fields
            .headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
    fn client_address(&self) -> Option<String> {
        self.fields.borrow().client_address.clone()
    }
    fn principal(&self) -> Option<String> {
        self.fields.borrow().principal.clone()
    }
    fn set_principal(&self, principal: &str) {
        // Cut at 256 bytes, as the host does.
        let mut end = principal.len().min(256);
        while !principal.is_char_boundary(end) {
            end -= 1;
        }
        self.fields.borrow_mut().principal = Some(principal[..end].into());
    }
    fn answer(&self) {
        self.fields.borrow_mut().answered = true;
    }
    fn answered(&self) -> bool {
        self.fields.borrow().answered
    }
    fn refuse(&self, refusal: Refusal) {
        self.fields.borrow_mut().refused = Some(refusal);
    }
    fn set_response_header(&self, name: &str, value: &str) -> Result<(), String> {
        let name = name.to_ascii_lowercase();
        if !name.starts_with("x-") || name.len() > 64 || value.len() > 1024 {
            return Err(
                "a response header's name starts with `x-` (at most 64 bytes; value at most 1 KiB)"
                    .into(),
            );
        }
        let mut fields = self.fields.borrow_mut();
        match fields.response_headers.iter_mut().find(|(n, _)| *n == name) {
            Some(header) => header.1 = value.into(),
            None => fields.response_headers.push((name, value.into())),
        }
        Ok(())
    }
    fn route(&self) -> Route {
        self.fields.borrow().route.clone()
    }
    /// Not a digest, in this double, and not 32 bytes: the `Debug` text of
    /// the route, parameters, messages and tools, which is equal exactly
    /// when they are (what a test of a stage keying on it needs).
    fn fingerprint(&self) -> Vec<u8> {
        let fields = self.fields.borrow();
        format!(
            "{:?}",
            (
                &fields.route,
                &fields.params,
                &fields.messages,
                &fields.tools
            )
        )
        .into_bytes()
    }
    fn prompt_estimate(&self) -> u64 {
        let fields = self.fields.borrow();
        prompt_estimate(&fields.messages, &fields.tools)
    }
    fn generate(&self) -> Result<(), InferenceError> {
        self.run_generation(Generate::Whole)
    }
    fn generate_stream(&self) -> Result<(), InferenceError> {
        self.run_generation(Generate::Stream)
    }
}

/// The bytes of a message's text: its string content, or its text parts
/// and the `\n` that `Content::text` joins them with.
fn text_bytes(content: Option<&Content>) -> u64 {
    match content {
        None => 0,
        Some(Content::Text(text)) => text.len() as u64,
        Some(Content::Parts(parts)) => {
            let (count, bytes) = parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text(text) => Some(text.len() as u64),
                    _ => None,
                })
                .fold((0u64, 0u64), |(count, bytes), len| (count + 1, bytes + len));
            bytes + count.saturating_sub(1)
        }
    }
}

/// What the host's [`Request::prompt_estimate`] answers, computed here
/// from the WIT types (the host computes it from its own): for each
/// message, a quarter of the bytes of its text and of its tool calls'
/// names and arguments (rounded up), plus 4; and with tools, a quarter of
/// the bytes of their definitions (kind, name, description, schema and
/// other fields), rounded up.
fn prompt_estimate(messages: &[Message], tools: &[Tool]) -> u64 {
    let messages: u64 = messages
        .iter()
        .map(|message| {
            let calls: u64 = message
                .tool_calls
                .iter()
                .map(|call| (call.name.len() + call.arguments.len()) as u64)
                .sum();
            (text_bytes(message.content.as_ref()) + calls).div_ceil(4) + 4
        })
        .sum();
    let tools: u64 = tools
        .iter()
        .map(|tool| {
            (tool.kind.len()
                + tool.name.len()
                + tool.description.as_ref().map_or(0, String::len)
                + tool.parameters.as_deref().map_or(0, json_len)
                + json_len(&tool.extra)) as u64
        })
        .sum();
    messages + tools.div_ceil(4)
}

/// The length of JSON text as the host writes it back (compact, keys
/// sorted; empty stays empty): the host holds a tool's schema and other
/// fields as values, not as the text a test wrote. Text that is not JSON
/// (the host would refuse it) counts as it is.
fn json_len(text: &str) -> usize {
    if text.trim().is_empty() {
        return 0;
    }
    serde_json::from_str::<serde_json::Value>(text)
        .map_or(text.len(), |value| value.to_string().len())
}

/// A [`Chunk`] of a request with [`params`].
pub fn chunk(carry: &str, delta: &str, last: bool) -> Chunk {
    Chunk {
        context: ChunkContext {
            request_id: "chatcmpl-test".into(),
            params: params(),
        },
        carry: carry.into(),
        delta: delta.into(),
        last,
    }
}

/// What a stream of chunks came to: the pieces emitted, and whether the
/// stage stopped it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Streamed {
    /// Every piece the stage emitted, in order.
    pub pieces: Vec<String>,
    /// The stage ended the completion (`stop`).
    pub stopped: bool,
}

impl Streamed {
    /// The emitted pieces joined: the text the client would see.
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// Drive `stage`'s chunk path as the host does: each delta with the carry
/// of the previous call, then the final call with an empty delta (unless
/// the stage stopped first).
///
/// # Errors
///
/// The first error the stage returns.
pub fn stream<S: StreamingStage>(
    stage: &S,
    params: &GenerationParams,
    deltas: &[&str],
) -> Result<Streamed, StageError> {
    let context = ChunkContext {
        request_id: "chatcmpl-test".into(),
        params: params.clone(),
    };
    let mut streamed = Streamed::default();
    let mut carry = String::new();
    let finals = std::iter::once(("", true));
    for (delta, last) in deltas.iter().map(|d| (*d, false)).chain(finals) {
        let out = stage.process_chunk(Chunk {
            context: context.clone(),
            carry: std::mem::take(&mut carry),
            delta: delta.into(),
            last,
        })?;
        streamed
            .pieces
            .extend(out.emit.into_iter().filter(|p| !p.is_empty()));
        carry = out.carry;
        if out.stop {
            streamed.stopped = true;
            break;
        }
    }
    Ok(streamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_identity_answer_and_refusal_are_recorded() {
        use crate::{RefusalKind, Stage};

        /// A limiter as a stage author writes it: by principal, in a store.
        struct Limit;
        impl Stage for Limit {
            type Config = ();
            fn init((): ()) -> Result<Self, crate::InitError> {
                Ok(Limit)
            }
            fn process(&self, request: &dyn Request) -> Result<(), StageError> {
                let who = request.header("Authorization").unwrap_or_default();
                request.set_principal(&who);
                let store = crate::store::Store::open("limits")
                    .map_err(|e| StageError::Config(e.to_string()))?;
                let window = store
                    .window(&who, 1, std::time::Duration::from_secs(60), Some(1))
                    .map_err(|e| StageError::PluginError(e.to_string()))?;
                request
                    .set_response_header("x-left", &(1 - window.value).to_string())
                    .map_err(StageError::PluginError)?;
                if !window.applied {
                    request.refuse(Refusal {
                        kind: RefusalKind::RateLimited,
                        message: "one per minute".into(),
                        code: None,
                        retry_after_ms: Some(window.reset_ms),
                        policy: None,
                    });
                }
                Ok(())
            }
        }

        crate::store::reset();
        let stage = Limit;
        let request = || TestRequest::new().with_header("authorization", "alice");
        let first = request();
        stage.process(&first).unwrap();
        let fields = first.fields();
        assert_eq!(fields.principal.as_deref(), Some("alice"));
        assert_eq!(fields.refused, None);
        assert_eq!(
            fields.response_headers,
            [("x-left".to_string(), "0".to_string())]
        );
        let second = request();
        stage.process(&second).unwrap();
        let refused = second.fields().refused.expect("refused");
        assert_eq!(refused.kind, RefusalKind::RateLimited);
        assert!(refused.retry_after_ms.is_some_and(|ms| ms <= 60_000));
        assert!(second.set_response_header("content-type", "x").is_err());
        assert_eq!(second.client_address(), None);
        second.answer();
        assert!(second.answered());
    }

    #[test]
    fn builders_fill_the_fields() {
        let request = TestRequest::new()
            .with_system("s")
            .with_user("u")
            .with_assistant("a")
            .with_tool_result("call_1", "42")
            .with_tools([Tool::function("calc")])
            .with_stop(&["END"])
            .with_completion("done")
            .with_tool_calls([ToolCall::function("call_2", "calc", "{}")])
            .streaming();
        let fields = request.fields();
        let roles: Vec<_> = fields.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(fields.messages[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(fields.tools[0].name, "calc");
        assert_eq!(fields.params.stop, ["END"]);
        assert_eq!(
            (fields.completion.as_str(), fields.finish_reason.as_str()),
            ("done", "stop")
        );
        assert_eq!(fields.tool_calls.len(), 1);
        assert!(request.stream_requested());
        assert!(!TestRequest::new().stream_requested());
    }

    #[test]
    fn generations_run_the_script_and_are_recorded() {
        let request = TestRequest::new().with_answer(
            Answer::text("hello")
                .with_finish_reason("length")
                .with_usage(3, 1)
                .with_refusal("no"),
        );
        request.generate_stream().unwrap();
        assert_eq!(request.generations(), [Generate::Stream]);
        let fields = request.fields();
        assert_eq!(fields.completion, "hello");
        assert_eq!(fields.finish_reason, "length");
        assert_eq!(fields.usage.completion_tokens, 1);
        assert_eq!(fields.refusal.as_deref(), Some("no"));

        let echo = TestRequest::new().with_user("ping").with_generation(|r| {
            r.set_completion(&r.messages()[0].text());
            Ok(())
        });
        echo.generate().unwrap();
        assert_eq!(echo.completion(), "ping");

        let failing =
            TestRequest::new().with_generation_error(InferenceError::Timeout("slow".into()));
        assert_eq!(
            failing.generate(),
            Err(InferenceError::Timeout("slow".into()))
        );
        assert_eq!(failing.generations(), [Generate::Whole]);

        let unscripted = TestRequest::new();
        assert!(matches!(
            unscripted.generate(),
            Err(InferenceError::Unavailable(_))
        ));
    }

    #[test]
    fn the_prompt_estimate_counts_text_calls_and_tools() {
        // 9 bytes: 3 tokens + 4.
        let user = Message::new("user", "what time");
        assert_eq!(prompt_estimate(std::slice::from_ref(&user), &[]), 7);
        // An empty message still costs 4.
        assert_eq!(prompt_estimate(&[Message::new("system", "")], &[]), 4);
        // Parts: "ab" + "\n" + "cdef" = 7 bytes, 2 tokens; the image is
        // left out.
        let mut parts = Message::new("user", "");
        parts.content = Some(Content::Parts(vec![
            ContentPart::Text("ab".into()),
            ContentPart::Other("{\"type\":\"input_audio\"}".into()),
            ContentPart::Text("cdef".into()),
        ]));
        assert_eq!(prompt_estimate(&[parts], &[]), 6);
        // A call: "fn" + 10 bytes of arguments = 12 bytes, 3 tokens.
        let mut call = Message::new("assistant", "");
        call.content = None;
        call.tool_calls = vec![ToolCall::function("c1", "fn", "{\"a\":\"bc\"}")];
        assert_eq!(prompt_estimate(&[call], &[]), 7);
        // A tool: "function" + "weather" + 5 bytes of schema = 20, 5 tokens.
        let mut tool = Tool::function("weather");
        tool.parameters = Some("{\"a\"}".into());
        assert_eq!(prompt_estimate(&[user], &[tool]), 12);
    }
}
