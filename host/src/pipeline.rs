//! The pipeline: bounded stage queues, worker threads, admission control.
//!
//! ```text
//!            admit (reserve a slot in every stage queue, or shed)
//!  request ──────────────┐
//!                        ▼
//!      ┌─ rag queue ─┐   ┌─ assemble ─┐   ┌─ inference ─┐   ┌─ post ─┐   ┌─ stream ─┐
//!      │ W workers   │ → │ W workers  │ → │ W workers   │ → │   …    │ → │    …     │ → reply
//!      └─────────────┘   └────────────┘   └─────────────┘   └────────┘   └──────────┘
//! ```
//!
//! Each stage has a bounded queue (a crossbeam channel of `queue_capacity`
//! slots) and `workers` OS threads. Plugin calls are synchronous CPU work
//! with their own deadlines, so they run on dedicated threads rather than on
//! the async runtime that serves HTTP; a worker owns one plugin instance at
//! a time.
//!
//! # Admission control
//!
//! A request is admitted only if *every* stage has room for it: admission
//! reserves one slot in each stage's queue, and a reservation is released
//! when the request leaves that stage. A request that cannot reserve a slot
//! is refused at once ([`RunError::Shed`], counted in
//! `orchestrator_requests_shed_total{stage}` under the first stage that was
//! full) — before any work is done on it. Because every admitted request
//! holds a slot downstream, handing it to the next stage never blocks and
//! never fails: nothing is shed after work was done on it.
//!
//! # Answers and deadlines
//!
//! [`Pipeline::run`] resolves exactly once per admitted request: with the
//! final envelope, with the error of the stage that failed, or with
//! [`RunError::Timeout`] when the request's deadline passes (each plugin
//! call's deadline is also capped by the time the request has left). A
//! worker that picks up a request whose caller has gone skips it.
//!
//! # Token streaming
//!
//! When the client asked for a stream ([`Pipeline::run_streaming`]) and a
//! stage's plugin starts a generation with `inference.generate-stream`, the
//! request is handed back to the caller as a [`Streaming`] right after that
//! stage, with its reservations in the later stages still held. The caller
//! pulls from it ([`Streaming::next`]): each token from the backend is
//! passed through `process-chunk` of the following stages that are
//! `streaming-stage` components — as [`Work::Chunk`] items on their queues,
//! run by their workers on an instance of the version the stream started
//! on — and what the last of them emits is yielded at once. The first
//! following stage that is a plain `stage` component ends the streaming
//! part: the text is collected and it and the stages after it run as usual
//! once the generation ends. A stage that returns `stop` ends the
//! generation (the backend request is cancelled). Dropping the `Streaming`
//! (the client went away) cancels the backend request and releases the
//! request's reservations at once.
//!
//! Each request holds one reservation per stage and has at most one chunk
//! in flight per stage, so chunk items never overflow a queue. A streamed
//! request counts once in `orchestrator_requests_total` of each streaming
//! stage; its `orchestrator_stage_duration_seconds` observation there is
//! the time spent in that stage's chunk calls, all chunks together. A
//! request that streams is observed in `orchestrator_request_duration_seconds`
//! when its stream ends (`cancelled` if the client went away first).
//!
//! # Hot swap
//!
//! Each stage's plugin is an [`ArcSwap`]: [`Pipeline::swap`] publishes a new
//! version atomically. A worker checks the current version when it takes a
//! request, so a call in progress finishes on the version it started on and
//! the next call uses the new one; the worker's instance of the old version
//! is dropped then, and the old version's memory with the last instance.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use crate::circuit::{Admission, CircuitBreaker};
use crate::config::{InstanceMode, StageConfig};
use crate::inference::{Ending, Event, TokenStream, finish_reason};
use crate::metrics::{ErrorType, Metrics, Outcome, RequestMetrics, StageMetrics};
use crate::plugin::{
    CallError, ChunkContext, ChunkOutput, Envelope, Instance, Plugin, PluginVersion, Usage,
};

/// Why a request got no completion.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// Refused at ingress: the stage's queue was full.
    #[error("stage `{stage}` is at capacity ({capacity} requests queued); retry later")]
    Shed {
        /// The stage whose queue was full.
        stage: &'static str,
        /// Its capacity.
        capacity: usize,
    },
    /// A stage's plugin failed.
    #[error("stage `{stage}` failed: {error}")]
    Stage {
        /// The stage.
        stage: &'static str,
        /// What happened.
        error: CallError,
    },
    /// A stage's circuit breaker is open: it failed repeatedly and is
    /// cooling down.
    #[error("stage `{stage}` is failing and its circuit breaker is open; retry in {} s", .retry_after.as_secs().max(1))]
    CircuitOpen {
        /// The stage.
        stage: &'static str,
        /// When to retry.
        retry_after: Duration,
    },
    /// The request's deadline passed.
    #[error("request deadline of {} ms exceeded", .0.as_millis())]
    Timeout(Duration),
    /// The host is shutting down and admits nothing new.
    #[error("the orchestrator is shutting down")]
    ShuttingDown,
}

type Reply = oneshot::Sender<Result<Answer, RunError>>;

/// What an admitted request turns into.
#[expect(
    clippy::large_enum_variant,
    reason = "`Done` is the common case; boxing its envelope would cost an allocation per request"
)]
pub enum Answer {
    /// Every stage ran: the final envelope.
    Done(Envelope),
    /// A generation is streaming (see the module docs).
    Streaming(Box<Streaming>),
}

/// How often an idle worker checks whether its instance belongs to a
/// version that has been swapped out (and drops it, freeing the old
/// version's memory once no one else uses it).
pub const IDLE_RECHECK: Duration = Duration::from_millis(250);

/// One request in flight.
struct Job {
    envelope: Envelope,
    /// Index of the stage the job is in (or queued for). Reservations of
    /// stages `stage..` are still held.
    stage: usize,
    deadline: Instant,
    reply: Option<Reply>,
    /// Bit `i` set: the job is a probe of stage `i`'s half-open breaker,
    /// not yet settled.
    probes: u8,
    /// The client asked for a stream.
    streaming: bool,
    admitted: Instant,
    inner: Arc<Inner>,
}

impl Job {
    fn answer(mut self, result: Result<Answer, RunError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }

    fn caller_gone(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for slot in &self.inner.stages[self.stage..] {
            slot.release();
        }
        for (index, slot) in self.inner.stages.iter().enumerate() {
            if self.probes & (1 << index) != 0 {
                slot.breaker.release_probe();
            }
        }
        if self.inner.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.drained.notify_waiters();
        }
    }
}

enum Work {
    Job(Job),
    /// One `process-chunk` call of a streaming request.
    Chunk(ChunkJob),
    Stop,
}

/// One `process-chunk` call, run by a worker of the stage.
struct ChunkJob {
    /// The version the stream started on.
    plugin: Arc<Plugin>,
    context: ChunkContext,
    carry: String,
    delta: String,
    last: bool,
    deadline: Instant,
    reply: oneshot::Sender<(Result<ChunkOutput, CallError>, Duration)>,
    /// The item's own hold on the stage's queue: a chunk left in the queue
    /// by a request that went away still counts against its capacity until
    /// a worker takes it.
    _hold: QueueHold,
}

/// One more reservation of a stage's queue, released on drop. Taken on top
/// of the request's own reservation, without a capacity check.
struct QueueHold {
    inner: Arc<Inner>,
    index: usize,
}

impl QueueHold {
    fn new(inner: &Arc<Inner>, index: usize) -> QueueHold {
        inner.stages[index].reserved.fetch_add(1, Ordering::AcqRel);
        QueueHold {
            inner: inner.clone(),
            index,
        }
    }
}

impl Drop for QueueHold {
    fn drop(&mut self) {
        self.inner.stages[self.index].release();
    }
}

/// One stage: its plugin, queue and metrics.
struct Slot {
    settings: StageConfig,
    plugin: ArcSwap<Plugin>,
    sender: Sender<Work>,
    receiver: Receiver<Work>,
    reserved: AtomicUsize,
    breaker: CircuitBreaker,
    metrics: StageMetrics,
}

impl Slot {
    fn try_reserve(&self) -> bool {
        let capacity = self.settings.queue_capacity;
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < capacity).then_some(r + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    stages: Vec<Slot>,
    requests: RequestMetrics,
    accepting: AtomicBool,
    in_flight: AtomicUsize,
    drained: Notify,
}

/// The running pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    inner: Arc<Inner>,
    workers: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    started: Instant,
}

/// `/health`'s view of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageHealth {
    /// Stage name.
    pub name: &'static str,
    /// Whether the stage can take requests.
    pub ready: bool,
    /// The plugin version it runs.
    pub plugin: PluginVersion,
    /// Requests waiting in its queue.
    pub queue_depth: i64,
    /// Its queue bound.
    pub queue_capacity: usize,
    /// Admitted requests that have not yet left this stage.
    pub in_flight: usize,
    /// Worker threads.
    pub workers: usize,
    /// Instance policy.
    pub instance_mode: String,
    /// Circuit breaker: `closed`, `half_open` or `open`.
    pub circuit: &'static str,
    /// Live plugin instances.
    pub instances: i64,
}

/// The body of `/health`.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `ok`; `degraded` while a stage's breaker is not closed (requests
    /// needing it fail fast); `draining` during shutdown.
    pub status: &'static str,
    /// Host version.
    pub version: &'static str,
    /// Seconds since the pipeline started.
    pub uptime_seconds: u64,
    /// Requests admitted and not yet answered.
    pub in_flight: usize,
    /// Per stage, in pipeline order.
    pub stages: Vec<StageHealth>,
    /// The inference backends (filled in by the metrics server when it
    /// knows them); a backend whose breaker is not closed makes the status
    /// `degraded`.
    pub backends: Vec<crate::inference::BackendHealth>,
}

impl Pipeline {
    /// Start the workers of each stage. `stages` pairs each stage's settings
    /// with its loaded plugin, in pipeline order.
    pub fn start(
        stages: Vec<(StageConfig, Arc<Plugin>)>,
        metrics: &Metrics,
    ) -> std::io::Result<Pipeline> {
        let slots = stages
            .into_iter()
            .map(|(settings, plugin)| {
                let (sender, receiver) = crossbeam_channel::bounded(settings.queue_capacity);
                let stage_metrics = metrics.stage(settings.name);
                stage_metrics
                    .queue_capacity
                    .set(settings.queue_capacity as i64);
                stage_metrics.queue_depth.set(0);
                metrics.set_plugin_version(settings.name, plugin.sha256());
                Slot {
                    plugin: ArcSwap::new(plugin),
                    sender,
                    receiver,
                    reserved: AtomicUsize::new(0),
                    breaker: CircuitBreaker::new(
                        format!("stage {}", settings.name),
                        settings.breaker_failures,
                        Duration::from_millis(settings.breaker_cooldown_ms),
                        settings.breaker_probes,
                        stage_metrics.breaker.clone(),
                    ),
                    metrics: stage_metrics,
                    settings,
                }
            })
            .collect();
        let inner = Arc::new(Inner {
            stages: slots,
            requests: metrics.requests_by_outcome(),
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let mut workers = Vec::new();
        for (index, slot) in inner.stages.iter().enumerate() {
            for n in 0..slot.settings.workers {
                let inner = inner.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("{}-{n}", slot.settings.name))
                    .spawn(move || worker(&inner, index))?;
                workers.push(handle);
            }
        }
        Ok(Pipeline {
            inner,
            workers: Arc::new(std::sync::Mutex::new(workers)),
            started: Instant::now(),
        })
    }

    /// Run one request through every stage, answering by `deadline`. A
    /// generation a stage streams is collected before the next stage runs.
    pub async fn run(&self, envelope: Envelope, deadline: Instant) -> Result<Envelope, RunError> {
        match self.run_streaming_inner(envelope, deadline, false).await? {
            Answer::Done(envelope) => Ok(envelope),
            // Not handed off when the client did not ask for a stream.
            Answer::Streaming(streaming) => streaming.collect().await,
        }
    }

    /// Run one request for a client that asked for a stream: the final
    /// envelope, or a [`Streaming`] once a stage started a streaming
    /// generation.
    pub async fn run_streaming(
        &self,
        envelope: Envelope,
        deadline: Instant,
    ) -> Result<Answer, RunError> {
        self.run_streaming_inner(envelope, deadline, true).await
    }

    async fn run_streaming_inner(
        &self,
        envelope: Envelope,
        deadline: Instant,
        streaming: bool,
    ) -> Result<Answer, RunError> {
        let admitted = Instant::now();
        let result = self.run_inner(envelope, deadline, streaming).await;
        let outcome = match &result {
            // Observed when the stream ends.
            Ok(Answer::Streaming(_)) => return result,
            Ok(Answer::Done(_)) => Outcome::Ok,
            Err(error) => outcome_of(error),
        };
        self.inner.requests.observe(outcome, admitted.elapsed());
        result
    }

    async fn run_inner(
        &self,
        envelope: Envelope,
        deadline: Instant,
        streaming: bool,
    ) -> Result<Answer, RunError> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(RunError::ShuttingDown);
        }
        let mut probes = 0u8;
        for (index, slot) in inner.stages.iter().enumerate() {
            match slot.breaker.admit() {
                Admission::Pass => {}
                Admission::Probe => probes |= 1 << index,
                Admission::Refuse(retry_after) => {
                    for (i, earlier) in inner.stages[..index].iter().enumerate() {
                        if probes & (1 << i) != 0 {
                            earlier.breaker.release_probe();
                        }
                    }
                    return Err(RunError::CircuitOpen {
                        stage: slot.settings.name,
                        retry_after,
                    });
                }
            }
        }
        for (index, slot) in inner.stages.iter().enumerate() {
            if !slot.try_reserve() {
                inner.stages[..index].iter().for_each(Slot::release);
                for (i, probed) in inner.stages.iter().enumerate() {
                    if probes & (1 << i) != 0 {
                        probed.breaker.release_probe();
                    }
                }
                slot.metrics.shed.inc();
                return Err(RunError::Shed {
                    stage: slot.settings.name,
                    capacity: slot.settings.queue_capacity,
                });
            }
        }
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            envelope,
            stage: 0,
            deadline,
            reply: Some(reply),
            probes,
            streaming,
            admitted: Instant::now(),
            inner: inner.clone(),
        };
        enqueue(&inner.stages[0], job);
        let timeout = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(result)) => result,
            // The job was dropped without an answer: only possible when the
            // process is tearing down.
            Ok(Err(_)) => Err(RunError::ShuttingDown),
            Err(_) => Err(RunError::Timeout(timeout)),
        }
    }

    /// Replace `stage`'s plugin. Calls in progress finish on the old
    /// version; returns the previous version.
    pub fn swap(&self, stage: &str, plugin: Arc<Plugin>) -> Option<Arc<Plugin>> {
        let slot = self
            .inner
            .stages
            .iter()
            .find(|s| s.settings.name == stage)?;
        Some(slot.plugin.swap(plugin))
    }

    /// The plugin version `stage` runs.
    pub fn plugin(&self, stage: &str) -> Option<Arc<Plugin>> {
        let slot = self
            .inner
            .stages
            .iter()
            .find(|s| s.settings.name == stage)?;
        Some(slot.plugin.load_full())
    }

    /// The `/health` report.
    pub fn health(&self) -> Health {
        let accepting = self.inner.accepting.load(Ordering::Acquire);
        let degraded = self
            .inner
            .stages
            .iter()
            .any(|s| s.breaker.state() != "closed");
        Health {
            status: match (accepting, degraded) {
                (false, _) => "draining",
                (true, true) => "degraded",
                (true, false) => "ok",
            },
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            in_flight: self.inner.in_flight.load(Ordering::Acquire),
            stages: self
                .inner
                .stages
                .iter()
                .map(|slot| {
                    let plugin = slot.plugin.load();
                    let circuit = slot.breaker.state();
                    StageHealth {
                        name: slot.settings.name,
                        ready: accepting && circuit != "open",
                        circuit,
                        instances: slot.metrics.instances.get(),
                        plugin: plugin.describe(),
                        queue_depth: slot.metrics.queue_depth.get(),
                        queue_capacity: slot.settings.queue_capacity,
                        in_flight: slot.reserved.load(Ordering::Acquire),
                        workers: slot.settings.workers,
                        instance_mode: slot.settings.instance_mode.to_string(),
                    }
                })
                .collect(),
            backends: Vec::new(),
        }
    }

    /// Stop admitting, wait until every admitted request has been answered
    /// (or `grace` has passed), then stop the workers.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::Release);
        let drained = async {
            loop {
                let notified = inner.drained.notified();
                if inner.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                in_flight = inner.in_flight.load(Ordering::Acquire),
                "shutdown grace period over with requests in flight"
            );
        }
        for slot in &inner.stages {
            for _ in 0..slot.settings.workers {
                let _ = slot.sender.send(Work::Stop);
            }
        }
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || {
            for handle in handles {
                let _ = handle.join();
            }
        })
        .await;
    }
}

/// The `outcome` label of a failed request.
fn outcome_of(error: &RunError) -> Outcome {
    match error {
        RunError::Shed { .. } | RunError::ShuttingDown => Outcome::Shed,
        RunError::Timeout(_) => Outcome::Timeout,
        RunError::Stage { .. } | RunError::CircuitOpen { .. } => Outcome::Error,
    }
}

/// Put `job` on `slot`'s queue. It holds a reservation there, so the queue
/// has room.
fn enqueue(slot: &Slot, job: Job) {
    slot.metrics.queue_depth.inc();
    if let Err(err) = slot.sender.try_send(Work::Job(job)) {
        // Unreachable while reservations bound the queues; answer rather
        // than lose the request if that invariant is ever broken.
        slot.metrics.queue_depth.dec();
        if let Work::Job(job) = err.into_inner() {
            tracing::error!(
                stage = slot.settings.name,
                "queue full despite a reservation"
            );
            job.answer(Err(RunError::Shed {
                stage: slot.settings.name,
                capacity: slot.settings.queue_capacity,
            }));
        }
    }
}

/// A stage worker: takes jobs from its stage's queue until told to stop.
///
/// Plugin calls are async (see [`crate::plugin`] on deadlines), driven by a
/// current-thread runtime owned by the worker: the worker thread blocks on
/// one call at a time, like a synchronous call, while timers and WASI's
/// async host functions work.
fn worker(inner: &Inner, index: usize) {
    let slot = &inner.stages[index];
    let name = slot.settings.name;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(stage = name, %error, "cannot start a worker runtime");
            return;
        }
    };
    let mut instance: Option<Instance> = None;
    loop {
        let mut job = match slot.receiver.recv_timeout(IDLE_RECHECK) {
            Ok(Work::Job(job)) => job,
            Ok(Work::Chunk(chunk)) => {
                slot.metrics.queue_depth.dec();
                run_chunk(slot, &runtime, &mut instance, chunk);
                continue;
            }
            Ok(Work::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: retire an instance of a version that was swapped out.
                if instance
                    .as_ref()
                    .is_some_and(|i| !Arc::ptr_eq(i.plugin(), &slot.plugin.load()))
                {
                    instance = None;
                }
                continue;
            }
        };
        slot.metrics.queue_depth.dec();
        if job.caller_gone() {
            continue;
        }
        let remaining = job.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            job.answer(Err(RunError::Timeout(Duration::ZERO)));
            continue;
        }
        slot.metrics.requests.inc();
        let started = Instant::now();
        let (result, stream) =
            runtime.block_on(call(slot, &mut instance, &mut job.envelope, remaining));
        slot.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        // A call cut short by the *request's* remaining time, not by the
        // stage's own deadline, says nothing about the plugin: it neither
        // counts against the breaker nor settles a probe.
        let cut_by_request = remaining < Duration::from_millis(slot.settings.timeout_ms)
            && result
                .as_ref()
                .is_err_and(|e| e.error_type == ErrorType::Timeout);
        if !cut_by_request {
            let probe = job.probes & (1 << index) != 0;
            job.probes &= !(1 << index);
            let failed = result
                .as_ref()
                .is_err_and(|e| e.error_type.counts_against_stage());
            slot.breaker.record(failed, probe);
        }
        if let Err(error) = result {
            slot.metrics.errors(error.error_type).inc();
            tracing::debug!(stage = name, request_id = %job.envelope.request_id, %error, "stage failed");
            job.answer(Err(RunError::Stage { stage: name, error }));
            continue;
        }
        if let Some(tokens) = stream {
            if job.streaming {
                slot.release();
                job.stage += 1;
                if job.caller_gone() {
                    // Dropping the tokens cancels the generation; the caller
                    // has already been answered (timed out).
                    continue;
                }
                if let Some(reply) = job.reply.take() {
                    let streaming = Box::new(Streaming::new(job, tokens));
                    if let Err(Ok(Answer::Streaming(mut unsent))) =
                        reply.send(Ok(Answer::Streaming(streaming)))
                    {
                        // The caller went away in between and was answered
                        // (and observed) already.
                        unsent.finished = true;
                    }
                }
                continue;
            }
            // The client wants one answer: collect the generation here.
            if let Err(error) = runtime.block_on(complete(&mut job.envelope, tokens)) {
                slot.metrics.errors(error.error_type).inc();
                job.answer(Err(RunError::Stage { stage: name, error }));
                continue;
            }
        }
        slot.release();
        job.stage += 1;
        match inner.stages.get(job.stage) {
            Some(next) => enqueue(next, job),
            None => {
                let envelope = std::mem::replace(&mut job.envelope, Envelope::placeholder());
                job.answer(Ok(Answer::Done(envelope)));
            }
        }
    }
}

/// Collect a whole generation into `envelope`.
async fn complete(envelope: &mut Envelope, tokens: TokenStream) -> Result<(), CallError> {
    let prompt_tokens = orchestrator_text::count_tokens(&envelope.prompt) as u32;
    let completion = tokens
        .collect(prompt_tokens)
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

/// One plugin call on this worker's instance, creating or replacing the
/// instance as the stage's policy and current plugin version require.
/// Returns the call's result and the generation it started, if any; on
/// success `envelope` holds the stage's output.
async fn call(
    slot: &Slot,
    instance: &mut Option<Instance>,
    envelope: &mut Envelope,
    remaining: Duration,
) -> (Result<(), CallError>, Option<TokenStream>) {
    let settings = &slot.settings;
    // A borrowed guard, not a clone: the common case (a warm instance of the
    // current version) touches no reference count.
    let reusable = instance.as_ref().is_some_and(|i| {
        settings.instance_mode == InstanceMode::Reuse
            && Arc::ptr_eq(i.plugin(), &slot.plugin.load())
            && i.calls() < settings.recycle_after
    });
    if !reusable {
        // Drop the old instance first so its pool slot is free again.
        *instance = None;
        let current = slot.plugin.load_full();
        match current.instantiate().await {
            Ok(fresh) => *instance = Some(fresh),
            Err(error) => return (Err(error), None),
        }
    }
    let Some(live) = instance.as_mut() else {
        return (
            Err(CallError::new(ErrorType::Instantiate, "no instance")),
            None,
        );
    };
    let timeout = Duration::from_millis(settings.timeout_ms).min(remaining);
    live.set_request_deadline(Instant::now() + remaining);
    let result = live.process(envelope, timeout).await;
    // A generation started by a call that then failed is dropped
    // (cancelled) with it.
    let stream = live.take_stream().filter(|_| result.is_ok());
    let discard = settings.instance_mode == InstanceMode::PerRequest
        || result.as_ref().is_err_and(CallError::poisons_instance);
    if discard {
        *instance = None;
    }
    (result, stream)
}

/// Run one `process-chunk` call and send its result back.
fn run_chunk(
    slot: &Slot,
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
        runtime.block_on(call_chunk(slot, instance, &chunk, remaining))
    };
    if let Err(error) = &result {
        slot.metrics.errors(error.error_type).inc();
        tracing::debug!(stage = slot.settings.name, request_id = %chunk.context.request_id, %error, "chunk failed");
    }
    let _ = chunk.reply.send((result, started.elapsed()));
}

/// One `process-chunk` call on an instance of the version the stream
/// started on (this worker's instance if it is one).
async fn call_chunk(
    slot: &Slot,
    instance: &mut Option<Instance>,
    chunk: &ChunkJob,
    remaining: Duration,
) -> Result<ChunkOutput, CallError> {
    let settings = &slot.settings;
    let reusable = instance.as_ref().is_some_and(|i| {
        settings.instance_mode == InstanceMode::Reuse
            && Arc::ptr_eq(i.plugin(), &chunk.plugin)
            && i.calls() < settings.recycle_after
    });
    if !reusable {
        *instance = None;
        *instance = Some(chunk.plugin.instantiate().await?);
    }
    let Some(live) = instance.as_mut() else {
        return Err(CallError::new(ErrorType::Instantiate, "no instance"));
    };
    let timeout = Duration::from_millis(settings.timeout_ms).min(remaining);
    let result = live
        .process_chunk(
            &chunk.context,
            &chunk.carry,
            &chunk.delta,
            chunk.last,
            timeout,
        )
        .await;
    let discard = settings.instance_mode == InstanceMode::PerRequest
        || result.as_ref().is_err_and(CallError::poisons_instance);
    if discard {
        *instance = None;
    }
    result
}

/// Most bytes of deltas passed through the streaming stages as one.
const MAX_COALESCED_BYTES: usize = 16 * 1024;

/// One streaming stage of a [`Streaming`] request.
struct ChunkStage {
    index: usize,
    plugin: Arc<Plugin>,
    carry: String,
    /// Time spent in its chunk calls.
    spent: Duration,
}

/// An item of a [`Streaming`] request.
#[derive(Debug)]
pub enum StreamItem {
    /// Text for the client.
    Delta(String),
    /// The request is complete: the final envelope (its `completion` is
    /// everything sent as deltas, unless a plain stage changed it).
    Done(Box<Envelope>),
}

/// A request whose generation is streaming (see the module docs). Pull
/// with [`next`](Self::next); drop to cancel.
pub struct Streaming {
    /// `None` once the plain stages after the streaming ones took it.
    job: Option<Job>,
    tokens: Option<TokenStream>,
    /// An event taken from `tokens` ahead of time (while coalescing deltas).
    lookahead: Option<Result<Event, crate::inference::BackendError>>,
    /// Index of the stage that started the generation.
    source: usize,
    chunk_stages: Vec<ChunkStage>,
    /// Index of the first stage that does not stream (or the stage count).
    rest_from: usize,
    context: ChunkContext,
    deadline: Instant,
    admitted: Instant,
    pending: std::collections::VecDeque<StreamItem>,
    /// What the streaming stages emitted: the completion so far.
    text: String,
    /// The pieces sent to the client.
    pieces: Vec<String>,
    ending: Ending,
    stopped: bool,
    finished: bool,
    inner: Arc<Inner>,
}

impl fmt::Debug for Streaming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streaming")
            .field("request_id", &self.context.request_id)
            .field("finished", &self.finished)
            .finish()
    }
}

impl Streaming {
    fn new(job: Job, tokens: TokenStream) -> Streaming {
        let inner = job.inner.clone();
        let mut chunk_stages = Vec::new();
        let mut rest_from = inner.stages.len();
        for index in job.stage..inner.stages.len() {
            let slot = &inner.stages[index];
            let plugin = slot.plugin.load_full();
            if !plugin.streams() {
                rest_from = index;
                break;
            }
            slot.metrics.requests.inc();
            plugin.count_streamed_request();
            chunk_stages.push(ChunkStage {
                index,
                plugin,
                carry: String::new(),
                spent: Duration::ZERO,
            });
        }
        Streaming {
            context: ChunkContext {
                request_id: job.envelope.request_id.clone(),
                params: job.envelope.params.clone(),
            },
            deadline: job.deadline,
            admitted: job.admitted,
            tokens: Some(tokens),
            lookahead: None,
            source: job.stage.saturating_sub(1),
            chunk_stages,
            rest_from,
            pending: Default::default(),
            text: String::new(),
            pieces: Vec::new(),
            ending: Ending::default(),
            stopped: false,
            finished: false,
            job: Some(job),
            inner,
        }
    }

    /// When the request must be answered.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next piece of text for the client, then the final envelope,
    /// then `None`; or the error that ended the request.
    pub async fn next(&mut self) -> Option<Result<StreamItem, RunError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.finished {
                return None;
            }
            let next = match (self.lookahead.take(), self.tokens.as_mut()) {
                (Some(event), _) => Some(Ok(Some(event))),
                (None, Some(tokens)) => {
                    Some(tokio::time::timeout_at(self.deadline.into(), tokens.next()).await)
                }
                (None, None) => None,
            };
            let step = match next {
                Some(next) => match next {
                    Err(_) | Ok(None) => Err(self.timeout()),
                    Ok(Some(Err(error))) => {
                        let slot = &self.inner.stages[self.source];
                        slot.metrics.errors(error.error_type()).inc();
                        Err(RunError::Stage {
                            stage: slot.settings.name,
                            error: CallError::new(error.error_type(), error.to_string()),
                        })
                    }
                    Ok(Some(Ok(Event::Delta(mut delta)))) => {
                        // Deltas that have already arrived go through the
                        // stages together: fewer chunk calls when the
                        // backend is faster than the stages.
                        if let Some(tokens) = self.tokens.as_mut() {
                            while delta.len() < MAX_COALESCED_BYTES {
                                match tokens.try_next() {
                                    Some(Ok(Event::Delta(more))) => delta.push_str(&more),
                                    Some(other) => {
                                        self.lookahead = Some(other);
                                        break;
                                    }
                                    None => break,
                                }
                            }
                        }
                        self.push_through(0, vec![delta]).await
                    }
                    Ok(Some(Ok(Event::End(ending)))) => {
                        self.ending = ending;
                        self.tokens = None;
                        Ok(())
                    }
                },
                None => self.finish().await,
            };
            if let Err(error) = step {
                self.end(outcome_of(&error));
                return Some(Err(error));
            }
        }
    }

    fn timeout(&self) -> RunError {
        RunError::Timeout(self.deadline.saturating_duration_since(self.admitted))
    }

    /// Pass `pieces` through the streaming stages from `from` on.
    async fn push_through(&mut self, from: usize, mut pieces: Vec<String>) -> Result<(), RunError> {
        for k in from..self.chunk_stages.len() {
            let mut out = Vec::new();
            for piece in pieces {
                let output = self.chunk_call(k, piece, false).await?;
                out.extend(output.emit);
                if output.stop {
                    // Cancel the generation; the stages after `k` still get
                    // what `k` emitted, and every stage is flushed.
                    self.tokens = None;
                    self.stopped = true;
                    break;
                }
            }
            pieces = out;
        }
        for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
            self.text.push_str(&piece);
            if self.rest_from == self.inner.stages.len() {
                self.pieces.push(piece.clone());
                self.pending.push_back(StreamItem::Delta(piece));
            }
        }
        Ok(())
    }

    /// One `process-chunk` call of streaming stage `k`.
    async fn chunk_call(
        &mut self,
        k: usize,
        delta: String,
        last: bool,
    ) -> Result<ChunkOutput, RunError> {
        let stage = &mut self.chunk_stages[k];
        let slot = &self.inner.stages[stage.index];
        let name = slot.settings.name;
        let (reply, answer) = oneshot::channel();
        let work = Work::Chunk(ChunkJob {
            plugin: stage.plugin.clone(),
            context: self.context.clone(),
            carry: std::mem::take(&mut stage.carry),
            delta,
            last,
            deadline: self.deadline,
            reply,
            _hold: QueueHold::new(&self.inner, stage.index),
        });
        slot.metrics.queue_depth.inc();
        if slot.sender.try_send(work).is_err() {
            slot.metrics.queue_depth.dec();
            return Err(RunError::Shed {
                stage: name,
                capacity: slot.settings.queue_capacity,
            });
        }
        let (result, spent) = match tokio::time::timeout_at(self.deadline.into(), answer).await {
            Err(_) => return Err(self.timeout()),
            Ok(Err(_)) => return Err(RunError::ShuttingDown),
            Ok(Ok(answer)) => answer,
        };
        let stage = &mut self.chunk_stages[k];
        stage.spent += spent;
        let index = stage.index;
        let output = match result {
            Ok(output) => output,
            Err(error) => {
                if error.error_type.counts_against_stage() {
                    self.settle_breaker(index, true);
                }
                return Err(RunError::Stage { stage: name, error });
            }
        };
        self.chunk_stages[k].carry.clone_from(&output.carry);
        Ok(output)
    }

    /// Tell stage `index`'s breaker how the stream went there (once).
    fn settle_breaker(&mut self, index: usize, failed: bool) {
        let Some(job) = self.job.as_mut() else {
            return;
        };
        let bit = 1u8 << index;
        let probe = job.probes & bit != 0;
        job.probes &= !bit;
        self.inner.stages[index].breaker.record(failed, probe);
    }

    /// The generation ended: flush the streaming stages, run the plain
    /// stages after them, and queue the final envelope.
    async fn finish(&mut self) -> Result<(), RunError> {
        for k in 0..self.chunk_stages.len() {
            let output = self.chunk_call(k, String::new(), true).await?;
            self.push_through(k + 1, output.emit).await?;
        }
        let indices: Vec<usize> = self.chunk_stages.iter().map(|s| s.index).collect();
        for (stage, index) in self.chunk_stages.iter().zip(&indices) {
            self.inner.stages[*index]
                .metrics
                .duration
                .observe(stage.spent.as_secs_f64());
        }
        for index in indices {
            self.settle_breaker(index, false);
        }
        let Some(mut job) = self.job.take() else {
            return Err(RunError::ShuttingDown);
        };
        let envelope = &mut job.envelope;
        envelope.completion = std::mem::take(&mut self.text);
        envelope.finish_reason = if self.stopped {
            "stop".to_string()
        } else {
            finish_reason(self.ending.finish_reason.as_deref()).to_string()
        };
        let (prompt_tokens, completion_tokens) = self.ending.usage.unwrap_or_else(|| {
            (
                orchestrator_text::count_tokens(&envelope.prompt) as u32,
                self.pieces.len() as u32,
            )
        });
        envelope.usage = Usage {
            prompt_tokens,
            completion_tokens,
        };
        // Leave the streaming stages.
        for index in job.stage..self.rest_from {
            self.inner.stages[index].release();
        }
        job.stage = self.rest_from;
        let envelope = if self.rest_from < self.inner.stages.len() {
            // Plain stages follow: run them as usual, then stream their result.
            let (reply, answer) = oneshot::channel();
            job.reply = Some(reply);
            job.streaming = false;
            enqueue(&self.inner.stages[self.rest_from], job);
            let envelope = match tokio::time::timeout_at(self.deadline.into(), answer).await {
                Err(_) => return Err(self.timeout()),
                Ok(Err(_)) => return Err(RunError::ShuttingDown),
                Ok(Ok(Err(error))) => return Err(error),
                Ok(Ok(Ok(Answer::Done(envelope)))) => envelope,
                // Not handed off: the job no longer asks for a stream.
                Ok(Ok(Ok(Answer::Streaming(streaming)))) => Box::pin(streaming.collect()).await?,
            };
            let pieces = if envelope.chunks.is_empty() {
                vec![envelope.completion.clone()]
            } else {
                envelope.chunks.clone()
            };
            self.pending.extend(
                pieces
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(StreamItem::Delta),
            );
            envelope
        } else {
            let mut envelope = std::mem::replace(&mut job.envelope, Envelope::placeholder());
            envelope.chunks = std::mem::take(&mut self.pieces);
            envelope
        };
        self.pending.push_back(StreamItem::Done(Box::new(envelope)));
        self.end(Outcome::Ok);
        Ok(())
    }

    fn end(&mut self, outcome: Outcome) {
        if !self.finished {
            self.finished = true;
            self.tokens = None;
            self.job = None;
            self.inner
                .requests
                .observe(outcome, self.admitted.elapsed());
        }
    }

    /// Collect the whole request (for a caller that wants one answer).
    pub async fn collect(mut self) -> Result<Envelope, RunError> {
        while let Some(item) = self.next().await {
            if let StreamItem::Done(envelope) = item? {
                return Ok(*envelope);
            }
        }
        Err(RunError::ShuttingDown)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        // The client went away before the end: the generation is cancelled
        // with `tokens`, the reservations released with `job`.
        self.end(Outcome::Cancelled);
    }
}
