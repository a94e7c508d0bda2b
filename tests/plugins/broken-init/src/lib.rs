//! A stage whose `init` always fails: it must never be swapped in.

// The by-value `stage` world of 0.1.2 (`wit/v0.1`): an old plugin, which
// the host must keep loading.
wit_bindgen::generate!({ world: "stage", path: "../../../wit/v0.1" });

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Err("broken-init refuses every configuration".into())
    }

    fn process(request: Envelope) -> Result<Envelope, StageError> {
        Ok(request)
    }
}

export!(Component);
