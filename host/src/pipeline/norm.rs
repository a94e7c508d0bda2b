//! What a stage's circuit breaker counts when the input was pathological.
//!
//! A breaker exists to stop sending work to a plugin that keeps failing.
//! But some failures say more about the request than the plugin: a call
//! that runs out of time, fuel or memory on an input many times larger
//! than anything the stage has recently handled is that request's
//! failure. Counting it would let one client open the breaker for every
//! other client, by sending a few such inputs (the `rag` stage once took
//! 5 s over 80,000 distinct words, and six of those opened its breaker).
//!
//! The rule, per stage: a failure of a resource-limit type (`timeout`,
//! `fuel`, `memory`) on an input (the envelope's text, in bytes) larger
//! than both [`OUTLIER_FLOOR`] and [`OUTLIER_FACTOR`] times the largest
//! input among the stage's last [`WINDOW`] successful calls is charged to
//! the request: it is answered and counted in
//! `orchestrator_errors_total` as usual, and logged, but it neither counts
//! against the breaker nor settles a half-open probe. Every other failure
//! counts as before (a trap, a plugin error, and any failure of a stage
//! that has not succeeded yet: there is no norm to compare with then).
//!
//! Trade-offs: a client can still open a breaker with inputs the plugin
//! genuinely cannot handle at a size close to what it handles, which is a
//! plugin bug the breaker should surface; and a client that first gets a
//! large input through raises the norm for the next [`WINDOW`] calls. The
//! first line of defence is elsewhere: bundled stages are linear in their
//! input and refuse oversized input with 400 (`invalid_input` never counts
//! against a breaker). Only whole-request calls (`process`) are judged this
//! way; a streamed chunk's failure always counts.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::metrics::ErrorType;

/// How many recent successful inputs the norm remembers.
pub const WINDOW: usize = 32;
/// How many times the norm an input must exceed to be an outlier.
pub const OUTLIER_FACTOR: usize = 4;
/// Below this many bytes, no input is an outlier: a stage that fails on a
/// small input has a problem of its own.
pub const OUTLIER_FLOOR: usize = 64 * 1024;

/// The sizes of a stage's recent successful inputs. Lock-free: calls of
/// the stage record into it concurrently.
#[derive(Debug, Default)]
pub(super) struct InputNorm {
    sizes: [AtomicUsize; WINDOW],
    recorded: AtomicUsize,
}

impl InputNorm {
    /// A successful call had an input of `bytes`.
    pub(super) fn record(&self, bytes: usize) {
        let slot = self.recorded.fetch_add(1, Ordering::Relaxed) % WINDOW;
        self.sizes[slot].store(bytes, Ordering::Relaxed);
    }

    /// Whether a call that failed with `error` on an input of `bytes` is
    /// the request's failure rather than the plugin's (see the module
    /// docs); `Some(norm)` when it is.
    pub(super) fn excuses(&self, error: ErrorType, bytes: usize) -> Option<usize> {
        let limit = matches!(
            error,
            ErrorType::Timeout | ErrorType::Fuel | ErrorType::Memory
        );
        if !limit || bytes <= OUTLIER_FLOOR || self.recorded.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let norm = self
            .sizes
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (bytes > norm.saturating_mul(OUTLIER_FACTOR)).then_some(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_resource_limits_far_above_the_norm_are_excused() {
        let norm = InputNorm::default();
        let big = 10 * OUTLIER_FLOOR;
        // No success yet: no norm, everything counts.
        assert_eq!(norm.excuses(ErrorType::Timeout, big), None);
        norm.record(2_000);
        assert_eq!(norm.excuses(ErrorType::Timeout, big), Some(2_000));
        assert_eq!(norm.excuses(ErrorType::Fuel, big), Some(2_000));
        assert_eq!(norm.excuses(ErrorType::Memory, big), Some(2_000));
        // Other failures are the plugin's whatever the input.
        assert_eq!(norm.excuses(ErrorType::Trap, big), None);
        assert_eq!(norm.excuses(ErrorType::PluginError, big), None);
        // Small inputs are never outliers.
        assert_eq!(norm.excuses(ErrorType::Timeout, OUTLIER_FLOOR), None);
        // Within the factor of a recent success: the plugin's.
        norm.record(big / OUTLIER_FACTOR);
        assert_eq!(norm.excuses(ErrorType::Timeout, big), None);
        // ... until that success leaves the window.
        for _ in 0..WINDOW {
            norm.record(2_000);
        }
        assert_eq!(norm.excuses(ErrorType::Timeout, big), Some(2_000));
    }
}
