//! The `log` import: a plugin's structured records, written to the host's
//! log under the `plugin` target with the stage's name, at a bounded rate.

use orchestrator_plugin::log::PANIC_FIELD;

use super::caller::cut;
use super::state::HostState;
use wasmtime::component::Resource;

use crate::trace::Attribute;
use crate::wasm::bindings::v1::orchestrator::pipeline::log as log_v1;
use crate::wasm::bindings::v2::orchestrator::pipeline::log;
use crate::wasm::envelope::Envelope;

/// The longest panic message kept for the error report, in bytes.
const PANIC_MESSAGE_CAP: usize = 2048;

impl log_v1::Host for HostState {
    fn emit(&mut self, level: log_v1::Level, message: String, fields: Vec<(String, String)>) {
        let level = match level {
            log_v1::Level::Trace => log::Level::Trace,
            log_v1::Level::Debug => log::Level::Debug,
            log_v1::Level::Info => log::Level::Info,
            log_v1::Level::Warn => log::Level::Warn,
            log_v1::Level::Error => log::Level::Error,
        };
        log::Host::emit(self, level, message, fields);
    }
}

impl log::Host for HostState {
    fn emit(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        // A panic's record is kept whatever the log rate: the trap that
        // follows it is reported with its message.
        if fields.iter().any(|(key, _)| key == PANIC_FIELD) {
            let mut text = message.clone();
            if cut(&mut text, PANIC_MESSAGE_CAP) {
                text.push_str("...");
            }
            self.panic = Some(text);
        }
        let Some(dropped) = self.log_budget.take() else {
            return;
        };
        if self.trace.is_recording() {
            let mut attributes = vec![
                Attribute::new("log.severity", format!("{level:?}").to_lowercase()),
                Attribute::new("orchestrator.log.dropped", dropped as i64),
            ];
            attributes.extend(
                fields
                    .iter()
                    .map(|(k, v)| Attribute::new(format!("plugin.{k}"), v.clone())),
            );
            self.trace.event(message.clone(), attributes);
        }
        let (stage, request_id, trace) = (self.stage, self.request_id.as_str(), &self.trace);
        // Who is calling, if a stage said (never a metric label).
        let principal = self
            .lent
            .and_then(|rep| self.table.get(&Resource::<Envelope>::new_borrow(rep)).ok())
            .and_then(|envelope| envelope.principal.as_deref())
            .unwrap_or("");
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "plugin", stage, request_id, principal, trace_id = %trace, dropped, %fields, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "plugin", stage, request_id, principal, trace_id = %trace, dropped, %fields, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "plugin", stage, request_id, principal, trace_id = %trace, dropped, %fields, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "plugin", stage, request_id, principal, trace_id = %trace, dropped, %fields, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "plugin", stage, request_id, principal, trace_id = %trace, dropped, %fields, "{message}")
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
