//! Logging into the host's log (the WIT `log` import), and the panic hook
//! that sends a panic's message there.
//!
//! The host writes each record under the `plugin` target with the stage's
//! name and rate-limits them per stage (a burst of about a hundred, then
//! ten a second), so log what an operator needs, not every chunk. Outside
//! a plugin (native unit tests) records go to standard error.

use std::fmt::Display;

pub use crate::bindings::streaming::orchestrator::pipeline::log::Level;

/// The field that marks the record of a panic. The host remembers the
/// message of such a record and reports it as the error of the call that
/// trapped (`init_failed: panicked at ...`).
pub const PANIC_FIELD: &str = "panic";

/// Write one record: a message and key/value fields (values written with
/// `Display`).
pub fn log(level: Level, message: &str, fields: &[(&str, &dyn Display)]) {
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    emit(level, message, &fields);
}

/// [`log`] at [`Level::Debug`].
pub fn debug(message: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Debug, message, fields);
}

/// [`log`] at [`Level::Info`].
pub fn info(message: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Info, message, fields);
}

/// [`log`] at [`Level::Warn`].
pub fn warn(message: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Warn, message, fields);
}

/// [`log`] at [`Level::Error`].
pub fn error(message: &str, fields: &[(&str, &dyn Display)]) {
    log(Level::Error, message, fields);
}

#[cfg(target_arch = "wasm32")]
fn emit(level: Level, message: &str, fields: &[(String, String)]) {
    crate::bindings::streaming::orchestrator::pipeline::log::emit(level, message, fields);
}

#[cfg(not(target_arch = "wasm32"))]
fn emit(level: Level, message: &str, fields: &[(String, String)]) {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    eprintln!("[{level:?}] {message} {}", fields.join(" "));
}

/// Route panics to the host's log: the message and where it happened, at
/// error level with the field [`PANIC_FIELD`]. Without it, a panic in a
/// plugin reaches the host only as a trap (`unreachable`), its message
/// lost. The export macros install it before `init`.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a panic without a message)");
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        error(
            &format!("panicked at {location}: {message}"),
            &[(PANIC_FIELD, &true), ("location", &location)],
        );
    }));
}
