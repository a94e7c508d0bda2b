//! WebAssembly glue: the `stage` world's exports for the `post` stage.

use crate::clean;

wit_bindgen::generate!({ world: "stage", path: "../../wit" });

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
}

export!(Component);
