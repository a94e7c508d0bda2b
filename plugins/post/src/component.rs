//! WebAssembly glue: the `streaming-request-stage` world's exports for the `post`
//! stage (`process` for whole completions, `process-chunk` for streamed
//! ones).

// The generated export shim of `process-chunk` takes the context record's
// fields flattened into core-wasm parameters (13 of them).
#![allow(clippy::too_many_arguments)]

use crate::clean;

wit_bindgen::generate!({ world: "streaming-request-stage", path: "../../wit" });

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        match config.first() {
            Some((key, _)) => Err(format!(
                "unknown config key {key:?} (this stage takes none)"
            )),
            None => Ok(()),
        }
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let cleaned = clean(&request.completion(), &request.params().stop);
        if cleaned.stopped {
            request.set_finish_reason("stop");
        }
        let notes = [
            ("post.redacted_emails", cleaned.emails.to_string()),
            ("post.redacted_keys", cleaned.keys.to_string()),
            ("post.stop_applied", cleaned.stopped.to_string()),
            ("post.trimmed_chars", cleaned.trimmed_chars.to_string()),
        ];
        for (key, value) in notes {
            request.set_note(key, &value);
        }
        request.set_completion(&cleaned.text);
        Ok(())
    }

    fn process_chunk(
        context: ChunkContext,
        carry: String,
        delta: String,
        last: bool,
    ) -> Result<ChunkOutput, StageError> {
        let out = crate::process_chunk(&context.params.stop, &carry, &delta, last)
            .map_err(|bad| StageError::InvalidInput(bad.to_string()))?;
        Ok(ChunkOutput {
            // Never pass on an empty piece.
            emit: if out.emit.is_empty() {
                Vec::new()
            } else {
                vec![out.emit]
            },
            carry: out.carry,
            stop: out.stop,
        })
    }
}

export!(Component);
