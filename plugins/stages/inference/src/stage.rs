//! The stage itself: [`run`](crate::run) behind the SDK's [`Stage`] trait.

use orchestrator_plugin::{InitError, Request, Stage, StageError};

/// The `inference` stage. It takes no configuration: the backend is the
/// host's choice.
pub struct Inference;

impl Stage for Inference {
    type Config = ();

    /// It generates: the plugin imports `inference`.
    const INFERENCE: bool = true;

    fn init((): ()) -> Result<Self, InitError> {
        Ok(Inference)
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        // Always a stream (see the crate docs); the host writes the answer
        // when it ends: nothing to record here.
        crate::run(request, crate::Mode::Stream)
    }
}

orchestrator_plugin::export_stage!(Inference);
