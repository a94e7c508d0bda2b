//! A stage of the `request-stage` world that does as little as its config
//! says, for the benchmarks: with no config it does nothing (the bare cost
//! of a call through a `request` handle); with `fields = completion` it
//! reads the completion and sets it back (the cost of one field each way).

use std::sync::atomic::{AtomicBool, Ordering};

wit_bindgen::generate!({ world: "request-stage", path: "../../../wit" });

/// Whether `process` reads and writes the completion.
static TOUCH_COMPLETION: AtomicBool = AtomicBool::new(false);

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in config {
            match (key.as_str(), value.as_str()) {
                ("fields", "completion") => TOUCH_COMPLETION.store(true, Ordering::Relaxed),
                ("fields", "") => {}
                _ => return Err(format!("unknown config {key} = {value:?}")),
            }
        }
        Ok(())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        if TOUCH_COMPLETION.load(Ordering::Relaxed) {
            request.set_completion(&request.completion());
        }
        Ok(())
    }
}

export!(Component);
