//! The request the in-process benchmarks send (`pipeline`, `instructions`):
//! one short question, at most 64 tokens of answer, temperature 0.

use orchestrator::chat::{Message, Params};
use orchestrator::wasm::Envelope;

/// Request `n` for `model`.
pub fn envelope(n: u64, model: &str) -> Envelope {
    let mut params = Params::for_model(model);
    params.max_tokens = Some(64);
    params.temperature = Some(0.0);
    Envelope::new(
        format!("bench-{n}"),
        vec![Message::new(
            "user",
            "What is backpressure and how is load shed?",
        )],
        params,
        Vec::new(),
    )
}
