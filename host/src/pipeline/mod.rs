//! The pipelines: bounded stage queues, worker threads, admission control,
//! token streaming, and the configurations they run ([`Generation`]).
//!
//! Owns the path of a request through the stages of its pipeline:
//! `admission`, the stages' queues and shared state (`stage`), the
//! `worker`s and their instance policy, `streaming`, and the switch from
//! one configuration to the next (`generation`). It must not parse HTTP or
//! know about plugin files: it is given a [`Plan`] (loaded plugins, the
//! pipelines' stage lists, the router) and envelopes, and answers with
//! envelopes, streams or [`RunError`]s.
//!
//! A request runs through one pipeline (a [`RouteRef`], chosen by its
//! model): any stages in any order. The diagram shows the default one; a
//! stage that several pipelines name is one stage (one queue, one set of
//! workers) shared by them.
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
//! slots) and `workers` OS threads. (An idle worker's receive spins, calls
//! `sched_yield` a few times, then parks: under load that shows as
//! `sched_yield` in profiles. Measured against it on 2 cores, interleaved: a
//! mutex-and-condvar queue that parks at once cost ~11 µs more CPU per
//! request, and one that spins without yielding before parking ~35 µs; the
//! yields let the producing thread run. So the channel stays.) Plugin calls are synchronous CPU work
//! with their own deadlines, so they run on dedicated threads rather than on
//! the async runtime that serves HTTP; a worker owns one plugin instance at
//! a time.
//!
//! # Admission control
//!
//! A request is admitted only if *every* stage of its pipeline has room for
//! it: admission reserves one slot in each of those stages' queues, and a
//! reservation is released
//! when the request leaves that stage. A request that cannot reserve a slot
//! is refused at once ([`RunError::Shed`], counted in
//! `orchestrator_requests_shed_total{stage}` under the first stage that was
//! full) — before any work is done on it. A request is also refused at once
//! ([`RunError::CircuitOpen`]) while a stage's breaker is open; while it is
//! half-open, the request may be admitted as a probe. Because every admitted request
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
//! `streaming-stage` components — as `Work::Chunk` items on their queues,
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
//! # Configuration reload
//!
//! [`Pipeline::install`] switches to a new configuration's [`Plan`]; see
//! `generation`'s docs for what carries over and when retired stages stop.
//!
//! # Hot swap
//!
//! Each stage's plugin is an `ArcSwap`: [`Pipeline::swap`] publishes a new
//! version atomically. A worker checks the current version when it takes a
//! request, so a call in progress finishes on the version it started on and
//! the next call uses the new one; the worker's instance of the old version
//! is dropped then, and the old version's memory with the last instance.

mod admission;
mod error;
mod generation;
mod norm;
mod stage;
mod streaming;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Notify, oneshot};

use crate::metrics::{BreakerState, Metrics, Outcome};
use crate::trace::Trace;
use crate::wasm::{Envelope, Plugin, PluginVersion};
pub use error::RunError;
pub use generation::{Plan, RouteRef};
pub use stage::Generation;
use stage::{BackendWait, Delivery, Shared, StageRuntime};
pub use streaming::{StreamItem, Streaming};
pub use worker::IDLE_RECHECK;

/// How long [`Pipeline::shutdown`] waits for the workers to stop once the
/// drain is over: idle workers stop at once; one still in a plugin call is
/// not waited for past this.
pub const WORKER_STOP: Duration = Duration::from_secs(1);

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

/// A request whose caller may stop waiting before it is answered: observed
/// as `cancelled` in the end-to-end histograms if it is dropped armed.
struct Unanswered<'a> {
    shared: &'a Shared,
    admitted: Instant,
    backend_wait: &'a BackendWait,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.requests.observe(
                Outcome::Cancelled,
                self.admitted.elapsed(),
                self.backend_wait.total(),
            );
        }
    }
}

/// The running pipelines: the current [`Generation`] and the state every
/// generation shares. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
    current: Arc<ArcSwap<Generation>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Serializes [`Pipeline::install`]s.
    installing: Arc<Mutex<()>>,
    started: Instant,
}

/// The pipeline's part of `/health`: is it taking requests?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Taking requests, every breaker closed.
    Ok,
    /// Taking requests, but a breaker is not closed: requests needing its
    /// stage (or backend) fail fast.
    Degraded,
    /// Shutting down: admitting nothing new.
    Draining,
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
    /// Circuit breaker.
    pub circuit: BreakerState,
    /// Live plugin instances.
    pub instances: i64,
}

/// The pipeline's `/health` report.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `ok`; `degraded` while a stage's breaker is not closed; `draining`
    /// during shutdown.
    pub status: HealthStatus,
    /// Host version.
    pub version: &'static str,
    /// Seconds since the pipeline started.
    pub uptime_seconds: u64,
    /// Requests admitted and not yet answered.
    pub in_flight: usize,
    /// Per stage in use, in order of first appearance in the pipelines
    /// (the default pipeline's first).
    pub stages: Vec<StageHealth>,
    /// Per pipeline, its stages.
    pub pipelines: Vec<PipelineHealth>,
    /// The digest of the configuration serving new requests.
    pub config_hash: String,
}

/// `/health`'s view of one pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineHealth {
    /// Its name.
    pub name: &'static str,
    /// Its stages, in order.
    pub stages: Vec<&'static str>,
}

impl Pipeline {
    /// Start the pipelines of `plan`: each stage's workers, then the
    /// generation that routes requests to them.
    pub fn start(plan: Plan, metrics: &Metrics) -> std::io::Result<Pipeline> {
        let shared = Arc::new(Shared {
            requests: metrics.requests_by_outcome(),
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let (generation, started) = Generation::build(plan, None, &shared, metrics);
        let mut workers = Vec::new();
        for stage in &started {
            workers.extend(worker::spawn(stage)?);
        }
        Ok(Pipeline {
            shared,
            current: Arc::new(ArcSwap::from_pointee(generation)),
            workers: Arc::new(Mutex::new(workers)),
            installing: Arc::new(Mutex::new(())),
            started: Instant::now(),
        })
    }

    /// Switch to the pipelines of `plan` (a configuration reload): stages
    /// whose settings are unchanged keep running (a new plugin version is
    /// swapped in), changed and new ones start, and the new generation is
    /// published for new requests. Requests in flight finish on the
    /// generation they were admitted under; its stages that the new one
    /// lacks stop when the last of those requests is done (see
    /// [`Generation`]). On failure (a worker thread cannot start) nothing
    /// changes.
    pub fn install(&self, plan: Plan, metrics: &Metrics) -> std::io::Result<()> {
        let _serial = self.installing.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.current.load_full();
        let (generation, started) = Generation::build(plan, Some(&previous), &self.shared, metrics);
        let mut spawned = Vec::new();
        for stage in &started {
            match worker::spawn(stage) {
                Ok(handles) => spawned.extend(handles),
                Err(error) => {
                    // `generation` is dropped: the stages it started stop.
                    return Err(error);
                }
            }
        }
        self.current.store(Arc::new(generation));
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.retain(|handle| !handle.is_finished());
        workers.extend(spawned);
        Ok(())
    }

    /// The configuration serving new requests: take it once per request,
    /// and pass it to [`run`](Self::run).
    pub fn generation(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Run one request through the stages of `route` (of `generation`),
    /// answering by `deadline`. A generation a stage streams is collected
    /// before the next stage runs. Each stage the request reaches gets a
    /// child span of `trace` ([`Trace::off`] for none).
    pub async fn run(
        &self,
        generation: &Arc<Generation>,
        route: &RouteRef,
        envelope: Envelope,
        deadline: Instant,
        trace: Trace,
    ) -> Result<Envelope, RunError> {
        let routed = (generation, route);
        match self
            .run_observed(routed, envelope, deadline, false, trace)
            .await?
        {
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
        generation: &Arc<Generation>,
        route: &RouteRef,
        envelope: Envelope,
        deadline: Instant,
        trace: Trace,
    ) -> Result<Answer, RunError> {
        self.run_observed((generation, route), envelope, deadline, true, trace)
            .await
    }

    /// Run a request and observe it in the end-to-end histogram (a
    /// streamed one is observed when its stream ends).
    async fn run_observed(
        &self,
        routed: (&Arc<Generation>, &RouteRef),
        envelope: Envelope,
        deadline: Instant,
        streaming: bool,
        trace: Trace,
    ) -> Result<Answer, RunError> {
        let admitted = Instant::now();
        let backend_wait = BackendWait::default();
        // Dropped with this future if the caller stops waiting (the client
        // went away): the request is then observed as `cancelled`.
        let mut unanswered = Unanswered {
            shared: &self.shared,
            admitted,
            backend_wait: &backend_wait,
            armed: true,
        };
        let result = self
            .admit_and_wait(
                routed,
                envelope,
                deadline,
                streaming,
                trace,
                backend_wait.clone(),
            )
            .await;
        unanswered.armed = false;
        let outcome = match &result {
            Ok(Answer::Streaming(_)) => return result,
            Ok(Answer::Done(_)) => Outcome::Ok,
            Err(error) => error.outcome(),
        };
        self.shared
            .requests
            .observe(outcome, admitted.elapsed(), backend_wait.total());
        result
    }

    async fn admit_and_wait(
        &self,
        (generation, route): (&Arc<Generation>, &RouteRef),
        envelope: Envelope,
        deadline: Instant,
        streaming: bool,
        trace: Trace,
        backend_wait: BackendWait,
    ) -> Result<Answer, RunError> {
        let (reply, answer) = oneshot::channel();
        let job = admission::admit(
            generation,
            &route.0,
            envelope,
            deadline,
            streaming,
            trace,
            backend_wait,
            reply,
        )?;
        route.0.stages[0].enqueue(job);
        let timeout = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(Ok(Delivery::Done(envelope)))) => Ok(Answer::Done(envelope)),
            Ok(Ok(Ok(Delivery::Stream(job, tokens)))) => {
                Ok(Answer::Streaming(Box::new(Streaming::new(*job, tokens))))
            }
            Ok(Ok(Err(error))) => Err(error),
            // The job was dropped without an answer: only possible when the
            // process is tearing down.
            Ok(Err(_)) => Err(RunError::ShuttingDown),
            Err(_) => Err(RunError::Timeout(timeout)),
        }
    }

    fn stage(&self, name: &str) -> Option<Arc<StageRuntime>> {
        self.current
            .load()
            .stages
            .iter()
            .find(|s| s.name() == name)
            .cloned()
    }

    /// Replace `stage`'s plugin (in the current configuration). Calls in
    /// progress finish on the old version; returns the previous version.
    pub fn swap(&self, stage: &str, plugin: Arc<Plugin>) -> Option<Arc<Plugin>> {
        Some(self.stage(stage)?.plugin.swap(plugin))
    }

    /// The plugin version `stage` runs.
    pub fn plugin(&self, stage: &str) -> Option<Arc<Plugin>> {
        Some(self.stage(stage)?.plugin.load_full())
    }

    /// The pipelines' `/health` report.
    pub fn health(&self) -> Health {
        let accepting = self.shared.accepting.load(Ordering::Acquire);
        let generation = self.current.load_full();
        let stages: Vec<StageHealth> = generation
            .stages
            .iter()
            .map(|stage| {
                let circuit = stage.breaker.state();
                StageHealth {
                    name: stage.name(),
                    ready: accepting && circuit != BreakerState::Open,
                    circuit,
                    instances: stage.metrics.instances.get(),
                    plugin: stage.plugin.load().describe(),
                    queue_depth: stage.metrics.queue_depth.get(),
                    queue_capacity: stage.settings.queue_capacity,
                    in_flight: stage.reserved.load(Ordering::Acquire),
                    workers: stage.settings.workers,
                    instance_mode: stage.settings.instance_mode.to_string(),
                }
            })
            .collect();
        let degraded = stages.iter().any(|s| s.circuit != BreakerState::Closed);
        Health {
            status: match (accepting, degraded) {
                (false, _) => HealthStatus::Draining,
                (true, true) => HealthStatus::Degraded,
                (true, false) => HealthStatus::Ok,
            },
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            in_flight: self.shared.in_flight.load(Ordering::Acquire),
            stages,
            pipelines: generation
                .routes()
                .map(|route| PipelineHealth {
                    name: route.name(),
                    stages: route.stage_names().collect(),
                })
                .collect(),
            config_hash: generation.hash().to_string(),
        }
    }

    /// Admit nothing new (answering [`RunError::ShuttingDown`]); `/health`
    /// says `draining`. Requests already admitted go on.
    pub fn stop_admitting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Stop admitting, wait until every admitted request has been answered
    /// (or `grace` has passed), then stop the workers, waiting at most
    /// [`WORKER_STOP`] for those still in a plugin call.
    pub async fn shutdown(&self, grace: Duration) {
        let shared = &self.shared;
        self.stop_admitting();
        let drained = async {
            loop {
                let notified = shared.drained.notified();
                if shared.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                in_flight = shared.in_flight.load(Ordering::Acquire),
                "shutdown grace period over with requests in flight"
            );
        }
        // Never blocks: a worker that misses its stop because the queue
        // is full is not waited for below. (Stages of older generations
        // stop as those are dropped, with their last requests.)
        for stage in &self.current.load().stages {
            stage.stop_workers();
        }
        let handles = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let joined = tokio::task::spawn_blocking(move || {
            for handle in handles {
                let _ = handle.join();
            }
        });
        if tokio::time::timeout(WORKER_STOP, joined).await.is_err() {
            tracing::warn!(
                "stage workers still busy at the end of the drain; not waiting for them"
            );
        }
    }
}
