//! The request a stage works on: the [`Request`] trait, implemented by the
//! host's handle in a plugin and by [`TestRequest`] in native tests.
//!
//! [`TestRequest`]: crate::testing::TestRequest

use std::fmt::Display;

use crate::bindings::streaming::orchestrator::pipeline::request::Request as Handle;
use crate::{GenerationParams, Message, Passage, Usage};

/// The note the host sets to `true` when the client asked for a stream
/// (see [`Request::stream_requested`]). The host reads the same constant.
pub const STREAM_NOTE: &str = "request.stream";

/// The request travelling through the pipeline, field by field.
///
/// In a plugin this is the host's `request` handle (the WIT `request`
/// resource): each getter copies one field into the plugin, each setter
/// replaces one field in the host, so a stage pays only for the fields it
/// uses. If `process` returns an error, everything it set is discarded.
pub trait Request {
    /// Unique id of the request, assigned by the host (`chatcmpl-...`).
    fn id(&self) -> String;
    /// The chat messages from the client, in order.
    fn messages(&self) -> Vec<Message>;
    /// Replace the chat messages.
    fn set_messages(&self, messages: &[Message]);
    /// Generation parameters from the client.
    fn params(&self) -> GenerationParams;
    /// Replace the generation parameters.
    fn set_params(&self, params: &GenerationParams);
    /// Passages retrieved by `rag`, best first.
    fn passages(&self) -> Vec<Passage>;
    /// Replace the passages.
    fn set_passages(&self, passages: &[Passage]);
    /// The model prompt built by `assemble`.
    fn prompt(&self) -> String;
    /// Replace the prompt.
    fn set_prompt(&self, prompt: &str);
    /// The model's completion: written by `inference`, cleaned by `post`.
    fn completion(&self) -> String;
    /// Replace the completion.
    fn set_completion(&self, completion: &str);
    /// Why generation stopped: `stop` or `length`.
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

impl Request for Handle {
    fn id(&self) -> String {
        Handle::id(self)
    }
    fn messages(&self) -> Vec<Message> {
        Handle::messages(self)
    }
    fn set_messages(&self, messages: &[Message]) {
        Handle::set_messages(self, messages)
    }
    fn params(&self) -> GenerationParams {
        Handle::params(self)
    }
    fn set_params(&self, params: &GenerationParams) {
        Handle::set_params(self, params)
    }
    fn passages(&self) -> Vec<Passage> {
        Handle::passages(self)
    }
    fn set_passages(&self, passages: &[Passage]) {
        Handle::set_passages(self, passages)
    }
    fn prompt(&self) -> String {
        Handle::prompt(self)
    }
    fn set_prompt(&self, prompt: &str) {
        Handle::set_prompt(self, prompt)
    }
    fn completion(&self) -> String {
        Handle::completion(self)
    }
    fn set_completion(&self, completion: &str) {
        Handle::set_completion(self, completion)
    }
    fn finish_reason(&self) -> String {
        Handle::finish_reason(self)
    }
    fn set_finish_reason(&self, reason: &str) {
        Handle::set_finish_reason(self, reason)
    }
    fn chunks(&self) -> Vec<String> {
        Handle::chunks(self)
    }
    fn set_chunks(&self, chunks: &[String]) {
        Handle::set_chunks(self, chunks)
    }
    fn usage(&self) -> Usage {
        Handle::usage(self)
    }
    fn set_usage(&self, usage: Usage) {
        Handle::set_usage(self, usage)
    }
    fn metadata(&self) -> Vec<(String, String)> {
        Handle::metadata(self)
    }
    fn note(&self, key: &str) -> Option<String> {
        Handle::note(self, key)
    }
    fn set_note(&self, key: &str, value: &str) {
        Handle::set_note(self, key, value)
    }
}
