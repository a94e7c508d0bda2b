//! Stage workers: the threads that take work from a stage's queue, keep a
//! plugin instance by the stage's instance policy, call it, record the
//! stage's metrics and breaker results, and pass each request on.
//!
//! Plugin calls are synchronous CPU work with their own deadlines, so they
//! run on dedicated OS threads rather than on the async runtime that serves
//! HTTP. The calls themselves are async (see [`crate::wasm`] on deadlines),
//! driven by a current-thread runtime owned by the worker: the worker
//! thread blocks on one call at a time, like a synchronous call, while
//! timers and WASI's async host functions work.
//!
//! Owns the instance policy ([`on_instance`]) and the per-call metrics; it
//! must not admit requests or talk to clients.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::RecvTimeoutError;

use super::error::RunError;
use super::stage::{ChunkJob, Delivery, Job, StageRuntime, Work};
use crate::config::{InstanceMode, StageConfig};
use crate::inference::TokenStream;
use crate::metrics::ErrorType;
use crate::trace::{Attribute, Trace};
use crate::wasm::{CallError, Envelope, Instance, Plugin, Usage, envelope_bytes};

/// How often an idle worker checks whether its instance belongs to a
/// version that has been swapped out (and drops it, freeing the old
/// version's memory once no one else uses it). Each check wakes the
/// worker (and its channel's receive spins and yields before parking
/// again), so it is not more often than it needs to be.
pub const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// Start the workers of `stage`. If one cannot be started, those started
/// are told to stop.
pub(super) fn spawn(stage: &Arc<StageRuntime>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::new();
    for n in 0..stage.settings.workers {
        let runtime = stage.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{n}", stage.name()))
            .spawn(move || work(&runtime));
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(error) => {
                stage.stop_workers();
                return Err(error);
            }
        }
    }
    Ok(workers)
}

/// A worker of `stage`: takes work from its queue until told to stop.
fn work(stage: &StageRuntime) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(stage = stage.name(), %error, "cannot start a worker runtime");
            return;
        }
    };
    let mut instance: Option<Instance> = None;
    loop {
        match stage.receiver.recv_timeout(IDLE_RECHECK) {
            Ok(Work::Job(job)) => {
                stage.metrics.queue_depth.dec();
                run_job(stage, &runtime, &mut instance, job);
            }
            Ok(Work::Chunk(chunk)) => {
                stage.metrics.queue_depth.dec();
                run_chunk(stage, &runtime, &mut instance, chunk);
            }
            Ok(Work::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if stage.stopping.load(Ordering::Acquire) => break,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: retire an instance of a version that was swapped out.
                if instance
                    .as_ref()
                    .is_some_and(|i| !Arc::ptr_eq(i.plugin(), &stage.plugin.load()))
                {
                    instance = None;
                }
            }
        }
    }
}

/// The span of `job`'s call to `stage`: from when it was queued there,
/// with the queue wait (the call starts at `started`).
fn stage_span(stage: &StageRuntime, job: &Job, started: Instant) -> Trace {
    if !job.trace.is_recording() {
        return Trace::off();
    }
    let waited = started.saturating_duration_since(job.queued);
    let queued_at = SystemTime::now() - job.queued.elapsed();
    stage.open_span(
        &job.trace,
        &stage.plugin.load(),
        &job.envelope.request_id,
        Some(queued_at),
        Attribute::new("orchestrator.queue_wait_ms", waited.as_secs_f64() * 1000.0),
    )
}

/// Run `process` of `stage` for `job`, then pass the job on: to the
/// next stage of its pipeline, to its caller (done, or handed off to
/// stream), or answer with the stage's error.
fn run_job(
    stage: &StageRuntime,
    runtime: &tokio::runtime::Runtime,
    instance: &mut Option<Instance>,
    mut job: Job,
) {
    // The job's position in its pipeline (for its breaker probes).
    let index = job.stage;
    if job.caller_gone() {
        return;
    }
    let remaining = job.deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        job.answer(Err(RunError::Timeout(Duration::ZERO)));
        return;
    }
    stage.metrics.requests.inc();
    let input_bytes = envelope_bytes(&job.envelope);
    let started = Instant::now();
    let timeout = Duration::from_millis(stage.settings.timeout_ms).min(remaining);
    let span = stage_span(stage, &job, started);
    let result = {
        // A borrowed guard, not a clone: the common case (a warm instance
        // of the current version) touches no reference count.
        let current = stage.plugin.load();
        let envelope = &mut job.envelope;
        let backend_wait = &job.backend_wait;
        let router = job.generation.router();
        let span = &span;
        runtime.block_on(on_instance(
            &stage.settings,
            instance,
            &current,
            async |live: &mut Instance| {
                live.set_request_deadline(Instant::now() + remaining);
                live.set_request(&envelope.request_id, span.clone());
                live.set_router(router);
                let result = live.process(envelope, timeout).await;
                backend_wait.add(live.take_backend_wait());
                // Taken whatever the result: a generation started by a call
                // that then failed is dropped (cancelled) with it here, not
                // left running in the instance until its next call.
                let stream = live.take_stream();
                result.map(|()| stream)
            },
        ))
    };
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
    let stream = match result {
        Ok(stream) => stream,
        Err(error) => return fail(stage, job, error),
    };
    if let Some(tokens) = stream {
        if job.streaming {
            job.leave_stage();
            // A caller that went away has been answered (timed out);
            // dropping the tokens cancels the generation.
            if let Some(reply) = job.reply.take().filter(|r| !r.is_closed()) {
                let _ = reply.send(Ok(Delivery::Stream(Box::new(job), tokens)));
            }
            return;
        }
        // The client wants one answer: collect the generation on the
        // runtime generations run on, not on this worker, which takes its
        // next request meanwhile (the job keeps its reservation here until
        // the generation is in, so `queue_capacity` still bounds them).
        match job.generation.router().runtime().cloned() {
            Some(handle) => {
                let stage = job.route.stages[job.stage].clone();
                drop(handle.spawn(collect_then_forward(stage, job, tokens)));
            }
            None => {
                let collected = runtime.block_on(collect_timed(&mut job, tokens));
                match collected {
                    Ok(()) => forward(job),
                    Err(error) => fail(stage, job, error),
                }
            }
        }
        return;
    }
    forward(job);
}

/// Pass `job` on from its current stage: to the next stage of its
/// pipeline, or to its caller when that was the last.
fn forward(mut job: Job) {
    job.leave_stage();
    match job.route.stages.get(job.stage).cloned() {
        Some(next) => next.enqueue(job),
        None => {
            let envelope = std::mem::replace(&mut job.envelope, Envelope::placeholder());
            job.answer(Ok(Delivery::Done(envelope)));
        }
    }
}

/// Collect the generation `tokens` that `stage` started for `job`, then
/// pass the job on (or answer with the failure). A caller that goes away
/// meanwhile cancels the generation: the job (its reservations, the
/// backend's permit) is dropped at once, as a stream's would be.
async fn collect_then_forward(stage: Arc<StageRuntime>, mut job: Job, tokens: TokenStream) {
    let collecting = Instant::now();
    let collected = {
        let Job {
            envelope, reply, ..
        } = &mut job;
        let collect = collect_generation(envelope, tokens);
        match reply.as_mut() {
            Some(reply) => tokio::select! {
                collected = collect => Some(collected),
                () = reply.closed() => None,
            },
            None => None,
        }
    };
    job.backend_wait.add(collecting.elapsed());
    match collected {
        Some(Ok(())) => forward(job),
        Some(Err(error)) => fail(&stage, job, error),
        None => tracing::debug!(
            stage = stage.name(),
            request_id = %job.envelope.request_id,
            "the caller went away; its generation is cancelled"
        ),
    }
}

/// Collect a whole generation into `job`'s envelope, counting the wait as
/// the backend's.
async fn collect_timed(job: &mut Job, tokens: TokenStream) -> Result<(), CallError> {
    let collecting = Instant::now();
    let collected = collect_generation(&mut job.envelope, tokens).await;
    job.backend_wait.add(collecting.elapsed());
    collected
}

/// Count `error` against `stage` and answer `job` with it.
fn fail(stage: &StageRuntime, job: Job, error: CallError) {
    stage.metrics.errors(error.error_type).inc();
    tracing::debug!(stage = stage.name(), request_id = %job.envelope.request_id, trace_id = %job.trace, %error, "stage failed");
    job.answer(Err(RunError::Stage {
        stage: stage.name(),
        error,
    }));
}

/// Run one `process-chunk` call and send its result back.
fn run_chunk(
    stage: &StageRuntime,
    runtime: &tokio::runtime::Runtime,
    instance: &mut Option<Instance>,
    chunk: ChunkJob,
) {
    if chunk.reply.is_closed() {
        return;
    }
    let remaining = chunk.deadline.saturating_duration_since(Instant::now());
    let started = Instant::now();
    let result = if remaining.is_zero() {
        Err(CallError::new(
            ErrorType::Timeout,
            "the request's deadline passed",
        ))
    } else {
        let timeout = Duration::from_millis(stage.settings.timeout_ms).min(remaining);
        runtime.block_on(on_instance(
            &stage.settings,
            instance,
            &chunk.plugin,
            async |live: &mut Instance| {
                live.set_request(&chunk.context.request_id, chunk.trace.clone());
                live.process_chunk(
                    &chunk.context,
                    &chunk.carry,
                    &chunk.delta,
                    chunk.last,
                    timeout,
                )
                .await
            },
        ))
    };
    if let Err(error) = &result {
        stage.metrics.errors(error.error_type).inc();
        tracing::debug!(stage = stage.name(), request_id = %chunk.context.request_id, trace_id = %chunk.trace, %error, "chunk failed");
    }
    let _ = chunk.reply.send((result, started.elapsed()));
}

/// The instance policy: run `call` on the worker's instance of `version`,
/// making one first if there is none, it is of another version, the stage
/// makes one per request, or it has served `recycle_after` calls; and drop
/// it afterwards if the stage makes one per request or the call poisoned
/// it (see [`CallError::poisons_instance`]).
async fn on_instance<T>(
    settings: &StageConfig,
    slot: &mut Option<Instance>,
    version: &Arc<Plugin>,
    call: impl AsyncFnOnce(&mut Instance) -> Result<T, CallError>,
) -> Result<T, CallError> {
    let reusable = slot.as_ref().is_some_and(|i| {
        settings.instance_mode == InstanceMode::Reuse
            && Arc::ptr_eq(i.plugin(), version)
            && i.calls() < settings.recycle_after
    });
    if !reusable {
        // Drop the old instance first so its pool slot is free again.
        *slot = None;
        *slot = Some(Instance::new(version).await?);
    }
    let Some(live) = slot.as_mut() else {
        return Err(CallError::new(ErrorType::Instantiate, "no instance"));
    };
    let result = call(live).await;
    if settings.instance_mode == InstanceMode::PerRequest
        || result.as_ref().is_err_and(CallError::poisons_instance)
    {
        *slot = None;
    }
    result
}

/// Collect a whole generation into `envelope`.
async fn collect_generation(envelope: &mut Envelope, tokens: TokenStream) -> Result<(), CallError> {
    let prompt = &envelope.prompt;
    let completion = tokens
        .collect(|| orchestrator_text::count_tokens(prompt) as u32)
        .await
        .map_err(|e| CallError::new(e.error_type(), e.to_string()))?;
    envelope.completion = completion.text;
    envelope.finish_reason = completion.finish_reason.to_string();
    envelope.usage = Usage {
        prompt_tokens: completion.prompt_tokens,
        completion_tokens: completion.completion_tokens,
    };
    Ok(())
}
