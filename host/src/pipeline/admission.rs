//! Admission control: a request is admitted only if no stage's breaker is
//! open and *every* stage has room for it.
//!
//! Owns the decision to admit or refuse, made before any work is done on a
//! request; it must not queue or run anything.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::error::RunError;
use super::stage::{BackendWait, Inner, Job, Reply};
use crate::circuit::Admission;
use crate::trace::Trace;
use crate::wasm::Envelope;

/// Admit a request: ask every stage's breaker (taking a probe where one is
/// half-open), then reserve one slot in every stage's queue. A refusal
/// gives back everything taken so far: reservations explicitly, probes by
/// being dropped. A request refused for a full queue is counted in that
/// stage's `orchestrator_requests_shed_total`.
pub(super) fn admit(
    inner: &Arc<Inner>,
    envelope: Envelope,
    deadline: Instant,
    streaming: bool,
    trace: Trace,
    backend_wait: BackendWait,
    reply: Reply,
) -> Result<Job, RunError> {
    if !inner.accepting.load(Ordering::Acquire) {
        return Err(RunError::ShuttingDown);
    }
    let mut probes = Vec::new();
    for (index, stage) in inner.stages.iter().enumerate() {
        match stage.breaker.admit() {
            Admission::Pass => {}
            Admission::Probe(probe) => probes.push((index, probe)),
            Admission::Refuse(retry_after) => {
                return Err(RunError::CircuitOpen {
                    stage: stage.name(),
                    retry_after,
                });
            }
        }
    }
    for (index, stage) in inner.stages.iter().enumerate() {
        if !stage.try_reserve() {
            inner.stages[..index].iter().for_each(|s| s.release());
            stage.metrics.shed.inc();
            return Err(stage.shed());
        }
    }
    inner.in_flight.fetch_add(1, Ordering::AcqRel);
    Ok(Job {
        envelope,
        stage: 0,
        deadline,
        reply: Some(reply),
        probes,
        streaming,
        admitted: Instant::now(),
        queued: Instant::now(),
        trace,
        backend_wait,
        inner: inner.clone(),
    })
}
