//! A stage of the `request-stage` world of 0.2.0 (the request by handle),
//! in the mode its config names:
//! - no `mode`: does nothing (the benchmarks' bare call through a handle);
//! - `mode = "completion"`: reads the completion and sets it back (the
//!   benchmarks' cost of one field each way);
//! - `mode = "flood"`: for a request whose last message mentions `rogue`,
//!   (its text, or its text parts) sets 64 KiB notes under new keys until the host stops it (the output
//!   cap test); other requests pass through.

use std::sync::OnceLock;

wit_bindgen::generate!({ world: "request-stage", path: "../../../wit", generate_all });

use orchestrator::pipeline::types::{Content, ContentPart};

static MODE: OnceLock<String> = OnceLock::new();

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let mut mode = String::new();
        for (key, value) in config {
            match (key.as_str(), value.as_str()) {
                ("mode", "" | "completion" | "flood") => mode = value,
                _ => return Err(format!("unknown config {key} = {value:?}")),
            }
        }
        MODE.set(mode).map_err(|_| "init called twice".to_string())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        match MODE.get().map(String::as_str) {
            Some("completion") => request.set_completion(&request.completion()),
            Some("flood") => {
                let rogue = request.messages().last().is_some_and(|m| match &m.content {
                    Some(Content::Text(text)) => text.contains("rogue"),
                    Some(Content::Parts(parts)) => parts
                        .iter()
                        .any(|p| matches!(p, ContentPart::Text(t) if t.contains("rogue"))),
                    None => false,
                });
                if rogue {
                    let value = "x".repeat(64 << 10);
                    for n in 0u64.. {
                        request.set_note(&format!("touch.flood.{n}"), &value);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

export!(Component);
