//! Stage calls: a request runs its stages one after the other on the task
//! that serves it (run to completion), taking for each call one of the
//! stage's permits and an instance by the stage's instance policy, and
//! recording the stage's metrics and breaker results.
//!
//! A plugin call is an async wasmtime call made on the tokio runtime that
//! serves HTTP. It cannot hold a runtime thread for long: guest code yields
//! back to the runtime at every epoch tick ([`crate::wasm::EPOCH_TICK`])
//! and traps once its deadline has passed, and a call waiting on the host
//! (an inference request, a WASI sleep) is an ordinary pending future. So
//! no request crosses a thread on its way through the stages.
//!
//! Owns the instance policy ([`on_instance`]) and the per-call metrics; it
//! must not admit requests or talk to clients.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::error::RunError;
use super::stage::{Delivery, Job, StageRuntime};
use crate::config::InstanceMode;
use crate::inference::{Completion, TokenStream, finish_reason};
use crate::metrics::ErrorType;
use crate::store::Holds;
use crate::trace::{Attribute, Trace};
use crate::wasm::{CallError, Envelope, Instance, Plugin, envelope_bytes};

/// Run `job` through the stages of its pipeline from its current one on:
/// the final envelope, or — when the client asked for a stream and a stage
/// started a streaming generation — the job and the generation's tokens.
/// A generation the client does not stream is collected before the next
/// stage runs.
pub(super) async fn run_stages(mut job: Job) -> Result<Delivery, RunError> {
    while let Some(stage) = job.route.stages.get(job.stage).cloned() {
        if job.holds.as_ref().is_some_and(Holds::abandoned) {
            // Cut while a stage call held it (see `cut`): that call has
            // returned with its store's answer; the next stage does not
            // start. The wind-down drops this future here, and the job
            // ends as cut.
            std::future::pending::<()>().await;
        }
        if job.envelope.answered && !job.envelope.generated && stage.settings.capabilities.inference
        {
            // A stage before this one answered (a cache hit): the
            // generating stage (the first one granted inference) is
            // skipped, and a streaming client gets the answer through the
            // streaming stages as if it were generated. Later stages
            // granted inference (a judge) run as usual.
            job.envelope.generated = true;
            job.leave_stage();
            if job.streaming {
                let tokens = TokenStream::replay(answer_of(&job.envelope), job.deadline);
                return Ok(Delivery::Stream(Box::new(job), tokens));
            }
            continue;
        }
        let tokens = match process(&stage, &mut job).await {
            Ok(tokens) => tokens,
            Err(error) => {
                job.failed(error.status());
                return Err(error);
            }
        };
        if stage.settings.capabilities.inference {
            job.envelope.generated = true;
        }
        if job.envelope.refused.is_some() {
            // The stages after a refusal do not run (their reservations
            // are released with the job).
            drop(tokens);
            job.refused_by = Some(stage.name());
            job.leave_stage();
            let envelope = job.take_envelope();
            job.finish(&envelope);
            return Ok(Delivery::Done(envelope));
        }
        let Some(tokens) = tokens else {
            job.leave_stage();
            continue;
        };
        if job.streaming {
            job.leave_stage();
            return Ok(Delivery::Stream(Box::new(job), tokens));
        }
        // The job keeps its reservation here until the generation is in,
        // so `queue_capacity` still bounds the generations collected at
        // once; the stage's permit is already free for its next call.
        let collecting = Instant::now();
        let collected = collect_generation(&mut job.envelope, tokens).await;
        job.backend_wait.add(collecting.elapsed());
        if let Err(error) = collected {
            let error = fail(&stage, &job, error);
            job.failed(error.status());
            return Err(error);
        }
        job.leave_stage();
    }
    let envelope = job.take_envelope();
    job.finish(&envelope);
    Ok(Delivery::Done(envelope))
}

/// The answer a stage set in `envelope` before answering it early.
fn answer_of(envelope: &Envelope) -> Completion {
    Completion {
        text: envelope.completion.clone(),
        tool_calls: envelope.tool_calls.clone(),
        refusal: envelope.refusal.clone(),
        finish_reason: finish_reason(Some(&envelope.finish_reason)),
        prompt_tokens: envelope.usage.prompt_tokens,
        completion_tokens: envelope.usage.completion_tokens,
        ..Completion::default()
    }
}

/// The span of `job`'s call to `stage`: from when it reached the stage,
/// with its wait for a permit (the call starts at `started`).
fn stage_span(stage: &StageRuntime, job: &Job, started: Instant) -> Trace {
    if !job.trace.is_recording() {
        return Trace::off();
    }
    let waited = started.saturating_duration_since(job.waiting_since);
    let queued_at = SystemTime::now() - job.waiting_since.elapsed();
    stage.open_span(
        &job.trace,
        &stage.plugin(),
        &job.envelope.request_id,
        Some(queued_at),
        Attribute::new("orchestrator.queue_wait_ms", waited.as_secs_f64() * 1000.0),
    )
}

/// Run `process` of `stage` for `job`: the generation the call started,
/// if any, or the stage's error (counted).
async fn process(
    stage: &Arc<StageRuntime>,
    job: &mut Job,
) -> Result<Option<TokenStream>, RunError> {
    // The job's position in its pipeline (for its breaker probes).
    let index = job.stage;
    job.waiting_since = Instant::now();
    let permit = stage.permit().await?;
    let remaining = job.deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(RunError::Timeout(
            job.deadline.saturating_duration_since(job.admitted),
        ));
    }
    stage.metrics.requests.inc();
    let input_bytes = envelope_bytes(&job.envelope);
    let started = Instant::now();
    let timeout = Duration::from_millis(stage.settings.timeout_ms).min(remaining);
    let span = stage_span(stage, job, started);
    let mut unfinished = Unfinished {
        stage,
        started,
        deadline: job.deadline,
        span: &span,
        armed: true,
    };
    let result = {
        let current = stage.plugin_owned();
        // Recorded before the call: a call cut short (the client left, the
        // deadline passed) still gets its finish call.
        job.ran(index, current.finishes());
        let rescue = Some(&mut job.lent);
        let envelope = &mut job.envelope;
        let backend_wait = &job.backend_wait;
        let router = job.snapshot.router();
        let stores = job.snapshot.stores();
        let span = &span;
        let streams = job.streaming;
        let holds = job.holds.as_ref();
        on_instance(stage, &current, rescue, async |live: &mut Instance| {
            live.set_request_deadline(Instant::now() + remaining);
            live.set_client_streams(streams);
            live.set_request(&envelope.request_id, span.clone());
            live.set_router(router);
            live.set_stores(stores);
            live.set_holds(holds);
            let result = live.process(envelope, timeout).await;
            live.set_holds(None);
            backend_wait.add(live.take_backend_wait());
            // Taken whatever the result: a generation started by a call
            // that then failed is dropped (cancelled) with it here, not
            // left running in the instance until its next call.
            let stream = live.take_stream();
            result.map(|()| stream)
        })
        .await
    };
    unfinished.armed = false;
    drop(permit);
    stage
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    // A call cut short by the *request's* remaining time, not by the
    // stage's own deadline, says nothing about the plugin: it neither
    // counts against the breaker nor settles a probe.
    let cut_by_request = remaining < Duration::from_millis(stage.settings.timeout_ms)
        && result
            .as_ref()
            .is_err_and(|e| e.error_type == ErrorType::Timeout);
    // A resource-limit failure on an input far above the stage's norm is
    // the request's (see `norm`): it does not count either.
    let excused = match &result {
        Ok(_) => {
            stage.inputs.record(input_bytes);
            None
        }
        Err(e) => stage.inputs.excuses(e.error_type, input_bytes),
    };
    if let Some(norm) = excused {
        tracing::warn!(
            stage = stage.name(),
            request_id = %job.envelope.request_id,
            trace_id = %job.trace,
            input_bytes,
            norm_bytes = norm,
            "a call failed on an input far above this stage's recent inputs; the breaker does not count it"
        );
    }
    if !cut_by_request && excused.is_none() {
        let failed = result
            .as_ref()
            .is_err_and(|e| e.error_type.counts_against_stage());
        job.settle(index, failed);
    }
    match &result {
        Ok(_) => span.set([Attribute::new("orchestrator.outcome", "ok")]),
        Err(error) => {
            span.set([Attribute::new("orchestrator.outcome", "error")]);
            span.fail(error.error_type.label(), error.to_string());
        }
    }
    span.end();
    result.map_err(|error| fail(stage, job, error))
}

/// A stage call whose future may be dropped before it returns: when the
/// request's deadline passes (the pipeline's outer timeout wins the race
/// with the call's own, which would trap at the next epoch tick) or the
/// client goes away. Dropped while armed, it records what the call would
/// have: its duration, a `timeout` error if the deadline had passed (the
/// stage that made the request late shows in `orchestrator_errors_total`),
/// and the span's outcome. A cancelled call counts no error.
struct Unfinished<'a> {
    stage: &'a StageRuntime,
    started: Instant,
    deadline: Instant,
    span: &'a Trace,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let metrics = &self.stage.metrics;
        metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
        if Instant::now() >= self.deadline {
            metrics.errors(ErrorType::Timeout).inc();
            self.span
                .set([Attribute::new("orchestrator.outcome", "error")]);
            self.span.fail(
                ErrorType::Timeout.label(),
                "the request's deadline passed during the call",
            );
        } else {
            self.span
                .set([Attribute::new("orchestrator.outcome", "cancelled")]);
        }
        self.span.end();
    }
}

/// Count `error` against `stage`: the request's answer.
fn fail(stage: &StageRuntime, job: &Job, error: CallError) -> RunError {
    stage.metrics.errors(error.error_type).inc();
    let principal = job.envelope.principal.as_deref().unwrap_or("");
    tracing::debug!(stage = stage.name(), request_id = %job.envelope.request_id, principal, trace_id = %job.trace, %error, "stage failed");
    RunError::Stage {
        stage: stage.name(),
        error,
    }
}

/// The instance policy: run `call` on an idle instance of `version` from
/// the stage's pool, or on a new one if there is none or the stage makes
/// one per request; afterwards keep the instance for a later call unless
/// the stage makes one per request, it has served `recycle_after` calls,
/// the call poisoned it (see [`CallError::poisons_instance`]) or its
/// version is no longer the one serving. A call whose future is dropped
/// (the request's deadline passed, the client went away) drops its
/// instance with it: an interrupted store is never reused. The caller
/// holds one of the stage's permits, which bounds the instances.
pub(super) async fn on_instance<T>(
    stage: &StageRuntime,
    version: &Arc<Plugin>,
    rescue: Option<&mut Option<Envelope>>,
    call: impl AsyncFnOnce(&mut Instance) -> Result<T, CallError>,
) -> Result<T, CallError> {
    let settings = &stage.settings;
    let reuse = settings.instance_mode == InstanceMode::Reuse;
    let idle = if reuse {
        stage.take_idle(version)
    } else {
        None
    };
    let live = match idle {
        Some(instance) => instance,
        None => Instance::new(version).await?,
    };
    let mut holding = Holding {
        live: Some(live),
        rescue,
    };
    let Some(live) = holding.live.as_mut() else {
        unreachable!("the instance was just put there");
    };
    let result = call(live).await;
    let Some(live) = holding.live.take() else {
        unreachable!("only the drop takes the instance");
    };
    if reuse
        && live.calls() < settings.recycle_after
        && !result.as_ref().is_err_and(CallError::poisons_instance)
    {
        stage.put_idle(live);
    }
    result
}

/// An instance in use by [`on_instance`]. Dropped while it still holds it
/// (the call's future dropped: the client went away, the request's time
/// ran out), it takes the request lent to the call back into `rescue`, so
/// the request's finish calls get it as the call left it; the instance is
/// then dropped, never reused.
struct Holding<'a> {
    live: Option<Instance>,
    rescue: Option<&'a mut Option<Envelope>>,
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        if let (Some(live), Some(rescue)) = (self.live.as_mut(), self.rescue.as_mut())
            && let Some(envelope) = live.take_lent()
        {
            **rescue = Some(envelope);
        }
    }
}

/// Collect a whole generation into `envelope`.
pub(super) async fn collect_generation(
    envelope: &mut Envelope,
    tokens: TokenStream,
) -> Result<(), CallError> {
    let prompt_tokens = || envelope.prompt_tokens();
    let completion = tokens
        .collect(prompt_tokens)
        .await
        .map_err(|e| CallError::new(e.error_type(), e.to_string()))?;
    envelope.set_answer(completion);
    Ok(())
}
