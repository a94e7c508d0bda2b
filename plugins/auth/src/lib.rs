//! The `auth` stage (being written).

use orchestrator_plugin::{Outcome, Request, Stage, StageError};

/// The `auth` stage.
#[derive(Debug, Clone)]
pub struct Auth;

impl Stage for Auth {
    type Config = ();

    fn init(_config: ()) -> Result<Self, orchestrator_plugin::InitError> {
        Ok(Auth)
    }

    fn process(&self, _request: &dyn Request) -> Result<(), StageError> {
        Ok(())
    }

    fn finish(&self, _request: &dyn Request, _outcome: &Outcome) {}
}

orchestrator_plugin::export_stage!(Auth, finish);
