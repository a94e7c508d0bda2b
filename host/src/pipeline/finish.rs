//! Finish calls: once a request has ended, the `finish` export of every
//! stage of its pipeline that ran and exports it, in reverse order.
//!
//! They run on a task of their own, after the answer is complete (the
//! plain answer built, the stream's last event produced) or the request
//! failed, was refused, or its client went away — so they add nothing to
//! the client's latency. Each takes one of the stage's permits and an
//! instance as a `process` call does, within the stage's `timeout_ms`; a
//! finish that fails (traps, panics, times out) is logged and counted in
//! `orchestrator_errors_total{stage,error_type}` (not against the breaker)
//! and changes nothing. A request's finish calls count as in flight, so a
//! drain on shutdown waits for them within its deadline.
//!
//! What a finish call is told ([`Outcome`]): how the request ended
//! (answered, refused, failed, cancelled), the status the client got, the
//! final usage (for a stream cut short, the completion tokens delivered so
//! far), whether a stage answered it early, and whether it was streamed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::call;
use super::stage::{Job, Route, Shared};
use crate::inference::Router;
use crate::metrics::PolicyMetrics;
use crate::store::Stores;
use crate::trace::Trace;
use crate::wasm::bindings::v2::orchestrator::pipeline::types::Usage as WitUsage;
use crate::wasm::{Envelope, Instance, Outcome, OutcomeKind};

/// The status a cancelled request is reported with (nginx's "client
/// closed request"): the client went away before its answer was complete.
pub const CLIENT_CLOSED: u16 = 499;

impl Job {
    /// Record that stage `index` ran, for its finish call (only if its
    /// plugin exports `finish`).
    pub(super) fn ran(&mut self, index: usize, finishes: bool) {
        if finishes && !self.finishers.contains(&index) {
            self.finishers.push(index);
        }
    }

    /// The request ended with `envelope` as the client's answer (or
    /// refusal): start the finish calls with a copy of it.
    pub(super) fn finish(&mut self, envelope: &Envelope) {
        if !std::mem::replace(&mut self.accounted, true) {
            account(&self.snapshot.shared.policy, self.refused_by, envelope);
        }
        if self.finishers.is_empty() {
            return;
        }
        let (kind, status) = match &envelope.refused {
            Some(refusal) => (OutcomeKind::Refused, refusal.status),
            None => (OutcomeKind::Answered, 200),
        };
        let outcome = self.outcome(envelope, kind, status);
        self.spawn_finish(envelope.clone(), outcome);
    }

    /// The request failed with HTTP `status`: the finish calls (if any) get
    /// that when the job is dropped.
    pub(super) fn failed(&mut self, status: u16) {
        self.failure = Some(status);
    }

    /// Called when the job is dropped before [`Job::finish`]: the request
    /// failed, timed out, or its client went away.
    pub(super) fn finish_unanswered(&mut self) {
        // Cut short while a stage held the request: as the call left it.
        if self.envelope.request_id.is_empty()
            && let Some(lent) = self.lent.take()
        {
            self.envelope = lent;
        }
        if !std::mem::replace(&mut self.accounted, true) {
            account(
                &self.snapshot.shared.policy,
                self.refused_by,
                &self.envelope,
            );
        }
        if self.finishers.is_empty() {
            return;
        }
        let (kind, status) = match self.failure {
            Some(status) => (OutcomeKind::Failed, status),
            None if Instant::now() >= self.deadline => (OutcomeKind::Failed, 504),
            None => (OutcomeKind::Cancelled, CLIENT_CLOSED),
        };
        let envelope = self.take_envelope();
        let outcome = self.outcome(&envelope, kind, status);
        self.spawn_finish(envelope, outcome);
    }

    fn outcome(&self, envelope: &Envelope, kind: OutcomeKind, status: u16) -> Outcome {
        Outcome {
            kind,
            status,
            usage: WitUsage {
                prompt_tokens: envelope.usage.prompt_tokens,
                completion_tokens: envelope.usage.completion_tokens,
            },
            answered_early: envelope.answered,
            streamed: self.asked_stream,
        }
    }

    fn spawn_finish(&mut self, envelope: Envelope, outcome: Outcome) {
        let stages = std::mem::take(&mut self.finishers);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.snapshot.shared.clone();
        shared
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let finishing = Finishing {
            route: self.route.clone(),
            router: self.snapshot.router().clone(),
            stores: self.snapshot.stores().clone(),
            shared,
            stages,
        };
        runtime.spawn(finishing.run(envelope, outcome));
    }
}

/// The finish calls of one request.
struct Finishing {
    route: Arc<Route>,
    router: Router,
    stores: Arc<Stores>,
    shared: Arc<Shared>,
    /// Indices of the stages to call, in the order they ran.
    stages: Vec<usize>,
}

impl Finishing {
    async fn run(self, mut envelope: Envelope, outcome: Outcome) {
        for &index in self.stages.iter().rev() {
            let stage = &self.route.stages[index];
            let Ok(permit) = stage.permit().await else {
                continue;
            };
            let plugin = stage.plugin_owned();
            let timeout = Duration::from_millis(stage.settings.timeout_ms);
            let (envelope, stores, outcome) = (&mut envelope, &self.stores, &outcome);
            let router = &self.router;
            let result = call::on_instance(stage, &plugin, None, async |live: &mut Instance| {
                live.set_request(&envelope.request_id, Trace::off());
                live.set_router(router);
                live.set_stores(stores);
                live.finish(envelope, outcome, timeout).await
            })
            .await;
            drop(permit);
            if let Err(error) = result {
                stage.metrics.errors(error.error_type).inc();
                tracing::warn!(
                    stage = stage.name(),
                    request_id = %envelope.request_id,
                    principal = envelope.principal.as_deref().unwrap_or(""),
                    %error,
                    "a finish call failed; the answer is unchanged"
                );
            }
        }
        self.shared.left();
    }
}

/// Count a request's end in the policy series: its refusal (by the stage
/// `refused_by`), its cache header, and what its principal spent (a
/// request answered early spent no backend tokens).
fn account(policy: &PolicyMetrics, refused_by: Option<&str>, envelope: &Envelope) {
    if let (Some(refusal), Some(stage)) = (&envelope.refused, refused_by) {
        policy.refused(stage, refusal.status, refusal.policy.as_deref());
    }
    if let Some((_, result)) = envelope
        .response_headers
        .iter()
        .find(|(name, _)| name == "x-orchestrator-cache")
    {
        policy.cached(result);
    }
    if let Some(principal) = &envelope.principal {
        let (prompt, completion) = if envelope.answered {
            (0, 0)
        } else {
            (
                envelope.usage.prompt_tokens,
                envelope.usage.completion_tokens,
            )
        };
        policy.spent(principal, u64::from(prompt), u64::from(completion));
    }
}
