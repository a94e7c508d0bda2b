//! The `log` import: a plugin's structured records, written to the host's
//! log under the `plugin` target with the stage's name, at a bounded rate.

use super::state::HostState;
use crate::wasm::bindings::orchestrator::pipeline::log;

impl log::Host for HostState {
    fn emit(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        let Some(dropped) = self.log_budget.take() else {
            return;
        };
        let stage = self.stage;
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "plugin", stage, dropped, %fields, "{message}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::LogBudget;

    #[test]
    fn log_budget_bounds_bursts() {
        let mut budget = LogBudget::new();
        let written = (0..1000).filter(|_| budget.take().is_some()).count();
        assert!((100..=110).contains(&written), "{written}");
    }
}
