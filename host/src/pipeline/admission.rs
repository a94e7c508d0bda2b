//! Admission control: a request is admitted only if no breaker of its
//! pipeline's stages is open and *every* stage of its pipeline has room
//! for it.
//!
//! Owns the decision to admit or refuse, made before any work is done on a
//! request; it must not run anything.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::error::RunError;
use super::stage::{BackendWait, Job};
use super::stage::{Route, Snapshot};
use crate::circuit::Admission;
use crate::store::Holds;
use crate::trace::Trace;
use crate::wasm::Envelope;

/// Admit a request: ask every stage's breaker (taking a probe where one is
/// half-open), then reserve one of the `queue_capacity` slots of every stage. A refusal
/// gives back everything taken so far: reservations explicitly, probes by
/// being dropped. A request refused for a full queue is counted in that
/// stage's `orchestrator_requests_shed_total`.
pub(super) fn admit(
    snapshot: &Arc<Snapshot>,
    route: &Arc<Route>,
    envelope: Envelope,
    deadline: Instant,
    streaming: bool,
    trace: Trace,
    backend_wait: BackendWait,
) -> Result<Job, RunError> {
    let shared = &snapshot.shared;
    if !shared.accepting.load(Ordering::Acquire) {
        return Err(RunError::ShuttingDown);
    }
    let mut probes = Vec::new();
    for (index, stage) in route.stages.iter().enumerate() {
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
    for (index, stage) in route.stages.iter().enumerate() {
        if !stage.try_reserve() {
            route.stages[..index].iter().for_each(|s| s.release());
            stage.metrics.shed.inc();
            return Err(stage.shed());
        }
    }
    shared.in_flight.fetch_add(1, Ordering::AcqRel);
    Ok(Job {
        envelope,
        stage: 0,
        deadline,
        probes,
        streaming,
        admitted: Instant::now(),
        waiting_since: Instant::now(),
        trace,
        backend_wait,
        route: route.clone(),
        snapshot: snapshot.clone(),
        asked_stream: streaming,
        finishers: Vec::new(),
        refused_by: None,
        accounted: false,
        lent: None,
        failure: None,
        holds: route.stores.then(Holds::default),
    })
}
