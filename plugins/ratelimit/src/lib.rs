//! The `ratelimit` stage (being written).

use orchestrator_plugin::{Outcome, Request, Stage, StageError};

/// The `ratelimit` stage.
#[derive(Debug, Clone)]
pub struct Ratelimit;

impl Stage for Ratelimit {
    type Config = ();

    fn init(_config: ()) -> Result<Self, orchestrator_plugin::InitError> {
        Ok(Ratelimit)
    }

    fn process(&self, _request: &dyn Request) -> Result<(), StageError> {
        Ok(())
    }

    fn finish(&self, _request: &dyn Request, _outcome: &Outcome) {}
}

orchestrator_plugin::export_stage!(Ratelimit, finish);
