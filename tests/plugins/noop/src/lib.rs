//! A stage that returns its input unchanged: the cost of a call with no
//! guest work, for the benchmarks (bare call and argument copy).

wit_bindgen::generate!({ world: "stage", path: "../../../wit" });

struct Component;

impl Guest for Component {
    fn init(_config: Vec<(String, String)>) -> Result<(), String> {
        Ok(())
    }

    fn process(request: Envelope) -> Result<Envelope, StageError> {
        Ok(request)
    }
}

export!(Component);
