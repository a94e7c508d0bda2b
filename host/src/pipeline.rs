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
//! # Hot swap
//!
//! Each stage's plugin is an [`ArcSwap`]: [`Pipeline::swap`] publishes a new
//! version atomically. A worker checks the current version when it takes a
//! request, so a call in progress finishes on the version it started on and
//! the next call uses the new one; the worker's instance of the old version
//! is dropped then, and the old version's memory with the last instance.

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
use crate::metrics::{ErrorType, Metrics, Outcome, RequestMetrics, StageMetrics};
use crate::plugin::{CallError, Envelope, Instance, Plugin, PluginVersion};

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

type Reply = oneshot::Sender<Result<Envelope, RunError>>;

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
    inner: Arc<Inner>,
}

impl Job {
    fn answer(mut self, result: Result<Envelope, RunError>) {
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

#[expect(
    clippy::large_enum_variant,
    reason = "`Stop` is sent once per worker at shutdown; boxing `Job` would cost an allocation per stage hop"
)]
enum Work {
    Job(Job),
    Stop,
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
                        settings.name,
                        settings.breaker_failures,
                        Duration::from_millis(settings.breaker_cooldown_ms),
                        settings.breaker_probes,
                        stage_metrics.clone(),
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

    /// Run one request through every stage, answering by `deadline`.
    pub async fn run(&self, envelope: Envelope, deadline: Instant) -> Result<Envelope, RunError> {
        let admitted = Instant::now();
        let result = self.run_inner(envelope, deadline).await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(RunError::Shed { .. } | RunError::ShuttingDown) => Outcome::Shed,
            Err(RunError::Timeout(_)) => Outcome::Timeout,
            Err(RunError::Stage { .. } | RunError::CircuitOpen { .. }) => Outcome::Error,
        };
        self.inner.requests.observe(outcome, admitted.elapsed());
        result
    }

    async fn run_inner(&self, envelope: Envelope, deadline: Instant) -> Result<Envelope, RunError> {
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
        let result = runtime.block_on(call(slot, &mut instance, &job.envelope, remaining));
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
            slot.breaker
                .record(result.as_ref().map(|_| ()).map_err(|e| e.error_type), probe);
        }
        match result {
            Ok(envelope) => {
                job.envelope = envelope;
                slot.release();
                job.stage += 1;
                match inner.stages.get(job.stage) {
                    Some(next) => enqueue(next, job),
                    None => {
                        let envelope =
                            std::mem::replace(&mut job.envelope, Envelope::placeholder());
                        job.answer(Ok(envelope));
                    }
                }
            }
            Err(error) => {
                slot.metrics.errors(error.error_type).inc();
                tracing::debug!(stage = name, request_id = %job.envelope.request_id, %error, "stage failed");
                job.answer(Err(RunError::Stage { stage: name, error }));
            }
        }
    }
}

/// One plugin call on this worker's instance, creating or replacing the
/// instance as the stage's policy and current plugin version require.
async fn call(
    slot: &Slot,
    instance: &mut Option<Instance>,
    envelope: &Envelope,
    remaining: Duration,
) -> Result<Envelope, CallError> {
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
        *instance = Some(current.instantiate().await?);
    }
    let live = instance.as_mut().expect("instance set above");
    let timeout = Duration::from_millis(settings.timeout_ms).min(remaining);
    let result = live.process(envelope, timeout).await;
    let discard = settings.instance_mode == InstanceMode::PerRequest
        || result.as_ref().is_err_and(CallError::poisons_instance);
    if discard {
        *instance = None;
    }
    result
}
