//! Circuit breakers: of each stage, and of each inference backend.
//!
//! Owns the breaker state machine and the [`Probe`] guard that settles a
//! half-open admission. It knows nothing of stages or backends: the
//! pipeline and the inference router decide what counts as a failure and
//! tell the breaker.
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
//!   reaches its stage or backend (it failed earlier, or timed out) gives its
//!   slot back without deciding anything: that is what dropping an unsettled
//!   [`Probe`] does, so no caller has to remember it.
//!
//! The closed-state fast path is one atomic load at admission and one on
//! each result; transitions take a mutex. State and transitions are exported
//! through the [`BreakerMetrics`] handles the owner passes in:
//! `orchestrator_circuit_state{stage}` and
//! `orchestrator_circuit_transitions_total{stage,to}` for stages, and
//! `orchestrator_upstream_circuit_state{worker_type}` and
//! `orchestrator_upstream_circuit_transitions_total{worker_type,to}` for
//! backends.

use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{BreakerMetrics, BreakerState};

/// What a breaker says about one request.
#[derive(Debug)]
pub enum Admission {
    /// The breaker is closed.
    Pass,
    /// The breaker is half-open and this request is one of its probes.
    Probe(Probe),
    /// The breaker is open: retry after this long.
    Refuse(Duration),
}

/// A probe admission of a half-open breaker, not yet settled. Settle it
/// with [`settle`](Self::settle) once the call it admitted has a result;
/// dropped unsettled (the request never got there, or its caller gave up),
/// it gives its slot back without deciding anything.
#[derive(Debug)]
pub struct Probe {
    breaker: Arc<CircuitBreaker>,
    settled: bool,
}

impl Probe {
    /// Record the probe's result: success closes the breaker, a failure
    /// reopens it.
    pub fn settle(mut self, failed: bool) {
        self.settled = true;
        self.breaker.record_probe(failed);
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.settled {
            let _guard = self.breaker.lock();
            self.breaker.probes.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A breaker: of a stage, or of an inference backend.
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

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("subject", &self.subject)
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreaker {
    /// A closed breaker of `subject` (`stage post`, `backend llama`: for
    /// logs) that opens after `threshold` consecutive failures, for
    /// `cooldown`, then lets `max_probes` probes through at a time.
    pub fn new(
        subject: impl Into<String>,
        threshold: u32,
        cooldown: Duration,
        max_probes: u32,
        metrics: BreakerMetrics,
    ) -> Arc<CircuitBreaker> {
        metrics.state.set(BreakerState::Closed as i64);
        Arc::new(CircuitBreaker {
            subject: subject.into(),
            state: AtomicU8::new(BreakerState::Closed as u8),
            failures: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            open_until: Mutex::new(Instant::now()),
            threshold,
            cooldown,
            max_probes,
            metrics,
        })
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        BreakerState::ALL[usize::from(self.state.load(Ordering::Acquire)).min(2)]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.open_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn transition(&self, to: BreakerState) {
        self.state.store(to as u8, Ordering::Release);
        self.metrics.state.set(to as i64);
        self.metrics.transitions[to as usize].inc();
        tracing::warn!(breaker = %self.subject, to = to.label(), "circuit breaker transition");
    }

    /// Decide whether a request needing this breaker's subject may go on.
    pub fn admit(self: &Arc<Self>) -> Admission {
        if self.state() == BreakerState::Closed {
            return Admission::Pass;
        }
        let mut open_until = self.lock();
        let now = Instant::now();
        match self.state() {
            BreakerState::Closed => return Admission::Pass,
            BreakerState::Open if now < *open_until => {
                return Admission::Refuse(*open_until - now);
            }
            BreakerState::Open => self.transition(BreakerState::HalfOpen),
            BreakerState::HalfOpen => {}
        }
        if self.probes.load(Ordering::Acquire) < self.max_probes {
            self.probes.fetch_add(1, Ordering::AcqRel);
            Admission::Probe(Probe {
                breaker: self.clone(),
                settled: false,
            })
        } else {
            // Probes are out; come back in a moment.
            *open_until = (*open_until).max(now);
            Admission::Refuse(Duration::from_secs(1))
        }
    }

    /// Record the result of a call admitted with [`Admission::Pass`]:
    /// `failed` if it failed in a way that counts against the breaker.
    pub fn record(&self, failed: bool) {
        if self.state() == BreakerState::Closed {
            if !failed {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                return;
            }
            if self.failures.fetch_add(1, Ordering::AcqRel) + 1 < self.threshold {
                return;
            }
            let mut open_until = self.lock();
            if self.state() == BreakerState::Closed
                && self.failures.load(Ordering::Acquire) >= self.threshold
            {
                *open_until = Instant::now() + self.cooldown;
                self.transition(BreakerState::Open);
            }
        }
        // A call admitted while closed that ends while half-open or open
        // decides nothing: only probes do.
    }

    fn record_probe(&self, failed: bool) {
        let mut open_until = self.lock();
        self.probes.fetch_sub(1, Ordering::AcqRel);
        if self.state() != BreakerState::HalfOpen {
            return;
        }
        if failed {
            *open_until = Instant::now() + self.cooldown;
            self.transition(BreakerState::Open);
        } else {
            self.failures.store(0, Ordering::Release);
            self.transition(BreakerState::Closed);
        }
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

    fn breaker(cooldown_ms: u64) -> (Arc<CircuitBreaker>, Metrics) {
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

    fn probe(admission: Admission) -> Probe {
        match admission {
            Admission::Probe(probe) => probe,
            other => panic!("expected a probe, got {other:?}"),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let (b, _m) = breaker(60_000);
        b.record(failed(Err(ErrorType::Trap)));
        b.record(failed(Err(ErrorType::Timeout)));
        b.record(failed(Ok(())));
        b.record(failed(Err(ErrorType::Trap)));
        // A refused request shows a working plugin: it resets the streak.
        b.record(failed(Err(ErrorType::InvalidInput)));
        b.record(failed(Err(ErrorType::Trap)));
        b.record(failed(Err(ErrorType::Trap)));
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(failed(Err(ErrorType::Trap)));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admission::Refuse(_)));
    }

    #[test]
    fn half_open_probes_close_or_reopen() {
        let (b, metrics) = breaker(0);
        for _ in 0..3 {
            b.record(failed(Err(ErrorType::Trap)));
        }
        assert_eq!(b.state(), BreakerState::Open);
        let first = probe(b.admit());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(
            matches!(b.admit(), Admission::Refuse(_)),
            "one probe at a time"
        );
        first.settle(failed(Err(ErrorType::Timeout)));
        assert_eq!(b.state(), BreakerState::Open);
        // Dropped unsettled: the slot comes back, nothing is decided.
        drop(probe(b.admit()));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        probe(b.admit()).settle(failed(Ok(())));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(matches!(b.admit(), Admission::Pass));
        let text = metrics.gather();
        assert!(
            text.contains("orchestrator_circuit_transitions_total{stage=\"post\",to=\"open\"} 2"),
            "{text}"
        );
        assert!(text.contains("orchestrator_circuit_state{stage=\"post\"} 0"));
    }
}
