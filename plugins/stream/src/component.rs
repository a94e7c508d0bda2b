//! WebAssembly glue: the `streaming-request-stage` world's exports for the `stream`
//! stage (`process` for whole completions, `process-chunk` for streamed
//! ones).

// The generated export shim of `process-chunk` takes the context record's
// fields flattened into core-wasm parameters (13 of them).
#![allow(clippy::too_many_arguments)]

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{DEFAULT_CHUNK_TOKENS, chunks};

wit_bindgen::generate!({ world: "streaming-request-stage", path: "../../wit" });

/// `chunk_tokens` from the configuration. Every instance gets the same
/// `init`, so any instance may serve any chunk of a stream.
static CHUNK_TOKENS: AtomicUsize = AtomicUsize::new(DEFAULT_CHUNK_TOKENS);

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in config {
            match key.as_str() {
                "chunk_tokens" => {
                    let n: usize = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        format!("chunk_tokens must be a positive whole number, got {value:?}")
                    })?;
                    CHUNK_TOKENS.store(n, Ordering::Relaxed);
                }
                other => {
                    return Err(format!(
                        "unknown config key {other:?} (expected chunk_tokens)"
                    ));
                }
            }
        }
        Ok(())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let chunks = chunks(&request.completion(), CHUNK_TOKENS.load(Ordering::Relaxed));
        request.set_note("stream.chunks", &chunks.len().to_string());
        request.set_chunks(&chunks);
        Ok(())
    }

    fn process_chunk(
        _context: ChunkContext,
        carry: String,
        delta: String,
        last: bool,
    ) -> Result<ChunkOutput, StageError> {
        let out = crate::process_chunk(CHUNK_TOKENS.load(Ordering::Relaxed), &carry, &delta, last);
        Ok(ChunkOutput {
            emit: out.emit,
            carry: out.carry,
            stop: false,
        })
    }
}

export!(Component);
