//! Circuit breakers: of each stage, and of each inference backend.
//!
//! A stage whose plugin keeps failing should fail fast instead of burning
//! a worker and a deadline on every request; so should a request whose
//! backend is down. Each stage and each backend has a breaker:
//!
//! - **closed** (normal): calls go through; a failure that counts (for a
//!   stage: one that is the plugin's fault, see
//!   [`ErrorType::counts_against_stage`](crate::metrics::ErrorType::counts_against_stage);
//!   for a backend: a request that failed after its retries, timeouts
//!   included) increments a count of consecutive failures; a success resets
//!   it. At the threshold (`breaker_failures`) the breaker opens.
//! - **open**: admission refuses requests needing the stage at once (503
//!   with `Retry-After`), for `breaker_cooldown_ms`.
//! - **half-open**: after the cool-down, up to `breaker_probes` requests at a
//!   time are admitted as probes. A probe that succeeds closes the breaker;
//!   one that fails reopens it for another cool-down. A probe that never
//!   reaches the stage (it failed earlier, or timed out) gives its slot back
//!   without deciding anything.
//!
//! The closed-state fast path is one atomic load at admission and one on
//! each result; transitions take a mutex. State and transitions are exported
//! as `orchestrator_circuit_state{stage}` and
//! `orchestrator_circuit_transitions_total{stage,to}` for stages, and as
//! `orchestrator_upstream_circuit_state{worker_type}` and
//! `orchestrator_upstream_circuit_transitions_total{worker_type,to}` for
//! backends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::BreakerMetrics;

const CLOSED: u8 = 0;
const HALF_OPEN: u8 = 1;
const OPEN: u8 = 2;

/// What admission may do with a request, as far as one stage is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The breaker is closed.
    Pass,
    /// The breaker is half-open and this request is one of its probes.
    Probe,
    /// The breaker is open: retry after this long.
    Refuse(Duration),
}

/// A breaker: of a stage, or of an inference backend (see
/// [`crate::inference`]), which uses it the same way.
pub struct CircuitBreaker {
    subject: String,
    state: AtomicU8,
    failures: AtomicU32,
    probes: AtomicU32,
    open_until: Mutex<Instant>,
    threshold: u32,
    cooldown: Duration,
    max_probes: u32,
    metrics: BreakerMetrics,
}

impl CircuitBreaker {
    /// A closed breaker of `subject` (`stage post`, `backend llama`: for logs).
    pub fn new(
        subject: impl Into<String>,
        threshold: u32,
        cooldown: Duration,
        max_probes: u32,
        metrics: BreakerMetrics,
    ) -> CircuitBreaker {
        metrics.state.set(i64::from(CLOSED));
        CircuitBreaker {
            subject: subject.into(),
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            open_until: Mutex::new(Instant::now()),
            threshold,
            cooldown,
            max_probes,
            metrics,
        }
    }

    /// `closed`, `half_open` or `open`.
    pub fn state(&self) -> &'static str {
        match self.state.load(Ordering::Acquire) {
            CLOSED => "closed",
            HALF_OPEN => "half_open",
            _ => "open",
        }
    }

    fn transition(&self, to: u8) {
        self.state.store(to, Ordering::Release);
        self.metrics.state.set(i64::from(to));
        self.metrics.transitions[usize::from(to)].inc();
        tracing::warn!(
            breaker = %self.subject,
            to = ["closed", "half_open", "open"][usize::from(to)],
            "circuit breaker transition"
        );
    }

    /// Decide whether a request needing this stage may be admitted. A
    /// `Probe` must later be settled with [`record`](Self::record) or
    /// [`release_probe`](Self::release_probe).
    pub fn admit(&self) -> Admission {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Admission::Pass,
            _ => {
                let mut open_until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let state = self.state.load(Ordering::Acquire);
                if state == OPEN {
                    if now < *open_until {
                        return Admission::Refuse(*open_until - now);
                    }
                    self.transition(HALF_OPEN);
                } else if state == CLOSED {
                    return Admission::Pass;
                }
                if self.probes.load(Ordering::Acquire) < self.max_probes {
                    self.probes.fetch_add(1, Ordering::AcqRel);
                    Admission::Probe
                } else {
                    // Probes are out; come back in a moment.
                    *open_until = (*open_until).max(now);
                    Admission::Refuse(Duration::from_secs(1))
                }
            }
        }
    }

    /// Record the result of a call: `failed` if it failed in a way that
    /// counts against the breaker. `probe` says whether the request was
    /// admitted as a probe of this breaker.
    pub fn record(&self, failed: bool, probe: bool) {
        let counts = failed;
        if !probe && self.state.load(Ordering::Acquire) == CLOSED {
            if !counts {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                return;
            }
            if self.failures.fetch_add(1, Ordering::AcqRel) + 1 < self.threshold {
                return;
            }
        }
        let mut open_until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        if probe {
            self.probes.fetch_sub(1, Ordering::AcqRel);
        }
        let state = self.state.load(Ordering::Acquire);
        match (state, counts) {
            (CLOSED, true) if self.failures.load(Ordering::Acquire) >= self.threshold => {
                *open_until = Instant::now() + self.cooldown;
                self.transition(OPEN);
            }
            (HALF_OPEN, true) if probe => {
                *open_until = Instant::now() + self.cooldown;
                self.transition(OPEN);
            }
            (HALF_OPEN, false) if probe => {
                self.failures.store(0, Ordering::Release);
                self.transition(CLOSED);
            }
            _ => {}
        }
    }

    /// Give back a probe slot whose request never reached the stage.
    pub fn release_probe(&self) {
        let _guard = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        self.probes.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ErrorType, Metrics};

    /// What the pipeline passes for a stage call's result.
    fn failed(result: Result<(), ErrorType>) -> bool {
        result.is_err_and(ErrorType::counts_against_stage)
    }

    fn breaker(cooldown_ms: u64) -> (CircuitBreaker, Metrics) {
        let metrics = Metrics::new();
        let b = CircuitBreaker::new(
            "post",
            3,
            Duration::from_millis(cooldown_ms),
            1,
            metrics.stage("post").breaker,
        );
        (b, metrics)
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let (b, _m) = breaker(60_000);
        b.record(failed(Err(ErrorType::Trap)), false);
        b.record(failed(Err(ErrorType::Timeout)), false);
        b.record(failed(Ok(())), false);
        b.record(failed(Err(ErrorType::Trap)), false);
        // A refused request shows a working plugin: it resets the streak.
        b.record(failed(Err(ErrorType::InvalidInput)), false);
        b.record(failed(Err(ErrorType::Trap)), false);
        b.record(failed(Err(ErrorType::Trap)), false);
        assert_eq!(b.state(), "closed");
        b.record(failed(Err(ErrorType::Trap)), false);
        assert_eq!(b.state(), "open");
        assert!(matches!(b.admit(), Admission::Refuse(_)));
    }

    #[test]
    fn half_open_probes_close_or_reopen() {
        let (b, metrics) = breaker(0);
        for _ in 0..3 {
            b.record(failed(Err(ErrorType::Trap)), false);
        }
        assert_eq!(b.state(), "open");
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(b.state(), "half_open");
        assert!(
            matches!(b.admit(), Admission::Refuse(_)),
            "one probe at a time"
        );
        b.record(failed(Err(ErrorType::Timeout)), true);
        assert_eq!(b.state(), "open");
        assert_eq!(b.admit(), Admission::Probe);
        b.release_probe();
        assert_eq!(b.admit(), Admission::Probe);
        b.record(failed(Ok(())), true);
        assert_eq!(b.state(), "closed");
        assert_eq!(b.admit(), Admission::Pass);
        let text = metrics.gather();
        assert!(
            text.contains("orchestrator_circuit_transitions_total{stage=\"post\",to=\"open\"} 2"),
            "{text}"
        );
        assert!(text.contains("orchestrator_circuit_state{stage=\"post\"} 0"));
    }
}
