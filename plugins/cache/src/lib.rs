//! The `cache` stage (being written).

use orchestrator_plugin::{Outcome, Request, Stage, StageError};

/// The `cache` stage.
#[derive(Debug, Clone)]
pub struct Cache;

impl Stage for Cache {
    type Config = ();

    fn init(_config: ()) -> Result<Self, orchestrator_plugin::InitError> {
        Ok(Cache)
    }

    fn process(&self, _request: &dyn Request) -> Result<(), StageError> {
        Ok(())
    }

    fn finish(&self, _request: &dyn Request, _outcome: &Outcome) {}
}

orchestrator_plugin::export_stage!(Cache, finish);
