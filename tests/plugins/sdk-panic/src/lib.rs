//! A stage written with the SDK that panics where its config says
//! (`mode = "init-panics"` or `"process-panics"`): the SDK's panic hook must get
//! the message to the host's error.

use orchestrator_plugin::{InitError, Request, Stage, StageError};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    mode: Option<String>,
}

struct Panicky {
    in_process: bool,
}

impl Stage for Panicky {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        if config.mode.as_deref() == Some("init-panics") {
            panic!("deliberate panic: in init");
        }
        Ok(Panicky {
            in_process: config.mode.as_deref() == Some("process-panics"),
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        if self.in_process {
            panic!("deliberate panic: in process of {}", request.id());
        }
        Ok(())
    }
}

orchestrator_plugin::export_stage!(Panicky);
