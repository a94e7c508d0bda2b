//! Native test doubles: run a stage's `process` and chunk path in a plain
//! `cargo test`, without a host.
//!
//! ```
//! use orchestrator_plugin::{Request, testing::TestRequest};
//!
//! let request = TestRequest::new().with_user_message("hi").with_completion("Hello!");
//! request.set_note("demo.seen", "yes");
//! assert_eq!(request.note("demo.seen").as_deref(), Some("yes"));
//! assert_eq!(request.completion(), "Hello!");
//! ```

use std::cell::RefCell;

use crate::bindings::streaming::orchestrator::pipeline::types::Envelope;
use crate::{
    Chunk, ChunkContext, GenerationParams, Message, Passage, Request, StageError, StreamingStage,
    Usage,
};

/// An in-memory [`Request`], as the host would hand it to a stage.
#[derive(Debug, Clone)]
pub struct TestRequest {
    envelope: RefCell<Envelope>,
}

impl Default for TestRequest {
    fn default() -> Self {
        Self::new()
    }
}

/// The parameters of a test request: model `echo`, 256 tokens, no stop
/// sequences.
pub fn params() -> GenerationParams {
    GenerationParams {
        model: "echo".into(),
        max_tokens: 256,
        temperature: 1.0,
        stop: Vec::new(),
    }
}

impl TestRequest {
    /// An empty request with id `chatcmpl-test` and [`params`].
    pub fn new() -> Self {
        TestRequest {
            envelope: RefCell::new(Envelope {
                request_id: "chatcmpl-test".into(),
                messages: Vec::new(),
                params: params(),
                passages: Vec::new(),
                prompt: String::new(),
                completion: String::new(),
                finish_reason: String::new(),
                chunks: Vec::new(),
                usage: Usage {
                    prompt_tokens: 0,
                    completion_tokens: 0,
                },
                metadata: Vec::new(),
            }),
        }
    }

    /// The request with a user message appended.
    pub fn with_user_message(self, content: &str) -> Self {
        self.envelope.borrow_mut().messages.push(Message {
            role: "user".into(),
            content: content.into(),
        });
        self
    }

    /// The request with this completion and finish reason `stop`.
    pub fn with_completion(self, completion: &str) -> Self {
        {
            let mut envelope = self.envelope.borrow_mut();
            envelope.completion = completion.into();
            envelope.finish_reason = "stop".into();
        }
        self
    }

    /// The request with these stop sequences.
    pub fn with_stop(self, stop: &[&str]) -> Self {
        self.envelope.borrow_mut().params.stop = stop.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The whole envelope, as the next stage would see it.
    pub fn envelope(&self) -> Envelope {
        self.envelope.borrow().clone()
    }
}

impl Request for TestRequest {
    fn id(&self) -> String {
        self.envelope.borrow().request_id.clone()
    }
    fn messages(&self) -> Vec<Message> {
        self.envelope.borrow().messages.clone()
    }
    fn set_messages(&self, messages: &[Message]) {
        self.envelope.borrow_mut().messages = messages.to_vec();
    }
    fn params(&self) -> GenerationParams {
        self.envelope.borrow().params.clone()
    }
    fn set_params(&self, params: &GenerationParams) {
        self.envelope.borrow_mut().params = params.clone();
    }
    fn passages(&self) -> Vec<Passage> {
        self.envelope.borrow().passages.clone()
    }
    fn set_passages(&self, passages: &[Passage]) {
        self.envelope.borrow_mut().passages = passages.to_vec();
    }
    fn prompt(&self) -> String {
        self.envelope.borrow().prompt.clone()
    }
    fn set_prompt(&self, prompt: &str) {
        self.envelope.borrow_mut().prompt = prompt.into();
    }
    fn completion(&self) -> String {
        self.envelope.borrow().completion.clone()
    }
    fn set_completion(&self, completion: &str) {
        self.envelope.borrow_mut().completion = completion.into();
    }
    fn finish_reason(&self) -> String {
        self.envelope.borrow().finish_reason.clone()
    }
    fn set_finish_reason(&self, reason: &str) {
        self.envelope.borrow_mut().finish_reason = reason.into();
    }
    fn chunks(&self) -> Vec<String> {
        self.envelope.borrow().chunks.clone()
    }
    fn set_chunks(&self, chunks: &[String]) {
        self.envelope.borrow_mut().chunks = chunks.to_vec();
    }
    fn usage(&self) -> Usage {
        self.envelope.borrow().usage
    }
    fn set_usage(&self, usage: Usage) {
        self.envelope.borrow_mut().usage = usage;
    }
    fn metadata(&self) -> Vec<(String, String)> {
        self.envelope.borrow().metadata.clone()
    }
    fn note(&self, key: &str) -> Option<String> {
        let envelope = self.envelope.borrow();
        let found = envelope.metadata.iter().find(|(k, _)| k == key);
        found.map(|(_, v)| v.clone())
    }
    fn set_note(&self, key: &str, value: &str) {
        let mut envelope = self.envelope.borrow_mut();
        match envelope.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(note) => note.1 = value.into(),
            None => envelope.metadata.push((key.into(), value.into())),
        }
    }
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
