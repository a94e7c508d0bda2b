//! A second version of the `post` stage that behaves visibly differently:
//! it upper-cases the completion and marks the envelope `shout.version = 2`.
//! The hot-swap tests alternate it with the bundled `post`.

// The by-value `stage` world of 0.1.2 (`wit/v0.1`): an old plugin, which
// the host must keep loading.
wit_bindgen::generate!({ world: "stage", path: "../../../wit/v0.1" });

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(mut request: Envelope) -> Result<Envelope, StageError> {
        request.completion = request.completion.trim().to_uppercase();
        request.metadata.push(("shout.version".into(), "2".into()));
        Ok(request)
    }
}

export!(Component);
