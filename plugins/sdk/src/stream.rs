//! The chunk path of streaming stages: what a stage receives for one piece
//! of a streamed completion ([`Chunk`]), what it returns ([`ChunkOutput`]),
//! and the usual way to hold text back between chunks
//! ([`Chunk::complete_words`]).
//!
//! The host keeps no per-request state in the plugin: any instance may get
//! any chunk of any request. What a stage must remember until the next
//! chunk (typically the text it holds back) goes into the output's
//! `carry`, and comes back as the next chunk's [`Chunk::carry`]. The host
//! caps the carry at the stage's `max_output_bytes`.

use crate::{ChunkContext, ChunkOutput, GenerationParams};

/// One call of a streaming stage's chunk path.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The request the chunk belongs to: its id and generation parameters.
    pub context: ChunkContext,
    /// What this stage returned as `carry` for the previous chunk of the
    /// request (empty for the first).
    pub carry: String,
    /// The new text.
    pub delta: String,
    /// The final call of the request: its `delta` is empty, and the stage
    /// must emit everything it still holds.
    pub last: bool,
}

impl Chunk {
    /// The request's generation parameters (stop sequences, model, ...).
    pub fn params(&self) -> &GenerationParams {
        &self.context.params
    }

    /// The carry followed by the delta: the text this stage has received
    /// and not yet passed on.
    pub fn pending(&self) -> String {
        let mut text = String::with_capacity(self.carry.len() + self.delta.len());
        text.push_str(&self.carry);
        text.push_str(&self.delta);
        text
    }

    /// Split [`pending`](Self::pending) text into what is ready (every
    /// complete word, up to and including the last whitespace) and what to
    /// hold back (a trailing word that may continue in the next chunk).
    /// On the last chunk everything is ready.
    ///
    /// A stage that works word by word transforms the first part, emits it,
    /// and returns the second as its carry:
    ///
    /// ```
    /// # use orchestrator_plugin::{Chunk, ChunkOutput, testing::chunk};
    /// let chunk: Chunk = chunk("hel", "lo wor", false);
    /// let (ready, held) = chunk.complete_words();
    /// assert_eq!((ready.as_str(), held.as_str()), ("hello ", "wor"));
    /// let out = ChunkOutput::emit(ready.to_uppercase()).with_carry(held);
    /// assert_eq!(out.emit, ["HELLO "]);
    /// ```
    pub fn complete_words(&self) -> (String, String) {
        let mut text = self.pending();
        if self.last {
            return (text, String::new());
        }
        let cut = text
            .char_indices()
            .rev()
            .find(|(_, c)| c.is_whitespace())
            .map_or(0, |(at, c)| at + c.len_utf8());
        let held = text.split_off(cut);
        (text, held)
    }
}

impl ChunkOutput {
    /// Pass `text` on (nothing if it is empty), hold nothing back.
    pub fn emit(text: impl Into<String>) -> Self {
        let text = text.into();
        ChunkOutput {
            emit: if text.is_empty() {
                Vec::new()
            } else {
                vec![text]
            },
            carry: String::new(),
            stop: false,
        }
    }

    /// Pass nothing on yet; keep `carry` for the next chunk.
    pub fn hold(carry: impl Into<String>) -> Self {
        ChunkOutput {
            emit: Vec::new(),
            carry: carry.into(),
            stop: false,
        }
    }

    /// The same output, keeping `carry` for the next chunk.
    pub fn with_carry(mut self, carry: impl Into<String>) -> Self {
        self.carry = carry.into();
        self
    }

    /// The same output, ending the completion here: the host cancels the
    /// generation and finishes the stream with `finish_reason` `stop`.
    pub fn stopping(mut self) -> Self {
        self.stop = true;
        self
    }
}
