//! A stage whose `init` always fails: it must never be swapped in.

wit_bindgen::generate!({ world: "stage", path: "../../../wit" });

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
