//! A stage that returns its input unchanged: the cost of a call with no
//! guest work, for the benchmarks (bare call and argument copy). It is also
//! the test suite's plugin built against the previous contract (0.1.0).

// Built against a frozen copy of the 0.1.0 contract, not the current
// `wit/`: this guest stands for the plugins compiled before 0.1.1, and the
// host must keep loading them (its later interfaces are a semver-compatible
// superset). Do not update `../wit-0.1.0`; it is a snapshot.
wit_bindgen::generate!({ world: "stage", path: "../wit-0.1.0" });

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
