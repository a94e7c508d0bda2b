//! Constructors and measures of the [`Envelope`], the request as it flows
//! through the stages.

use super::bindings::{Envelope, GenerationParams, Message, Usage};

impl Envelope {
    /// An empty envelope for `request_id` carrying `messages` and `params`.
    pub fn new(request_id: String, messages: Vec<Message>, params: GenerationParams) -> Envelope {
        Envelope {
            request_id,
            messages,
            params,
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
        }
    }

    /// An envelope with nothing in it, allocating nothing.
    pub fn placeholder() -> Envelope {
        Envelope::new(
            String::new(),
            Vec::new(),
            GenerationParams {
                model: String::new(),
                max_tokens: 0,
                temperature: 0.0,
                stop: Vec::new(),
            },
        )
    }
}

/// Total bytes of the strings in an envelope: what a stage returns.
pub fn envelope_bytes(envelope: &Envelope) -> usize {
    envelope.request_id.len()
        + envelope
            .messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
        + envelope.params.model.len()
        + envelope.params.stop.iter().map(String::len).sum::<usize>()
        + envelope
            .passages
            .iter()
            .map(|p| p.source.len() + p.text.len())
            .sum::<usize>()
        + envelope.prompt.len()
        + envelope.completion.len()
        + envelope.finish_reason.len()
        + envelope.chunks.iter().map(String::len).sum::<usize>()
        + envelope
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}
