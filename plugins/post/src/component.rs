//! WebAssembly glue: the `streaming-stage` world's exports for the `post`
//! stage (`process` for whole completions, `process-chunk` for streamed
//! ones).

// The generated export shim of `process-chunk` takes the context record's
// fields flattened into core-wasm parameters (13 of them).
#![allow(clippy::too_many_arguments)]

use crate::clean;

wit_bindgen::generate!({ world: "streaming-stage", path: "../../wit" });

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

    fn process(mut request: Envelope) -> Result<Envelope, StageError> {
        let cleaned = clean(&request.completion, &request.params.stop);
        if cleaned.stopped {
            request.finish_reason = "stop".into();
        }
        let notes = [
            ("post.redacted_emails", cleaned.emails.to_string()),
            ("post.redacted_keys", cleaned.keys.to_string()),
            ("post.stop_applied", cleaned.stopped.to_string()),
            ("post.trimmed_chars", cleaned.trimmed_chars.to_string()),
        ];
        request
            .metadata
            .extend(notes.into_iter().map(|(k, v)| (k.to_string(), v)));
        request.completion = cleaned.text;
        Ok(request)
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
