//! The pipelines: admission control, stage calls run to completion on the
//! request's own task, token streaming, and the configurations they run
//! ([`Snapshot`]).
//!
//! Owns the path of a request through the stages of its pipeline:
//! `admission`, the stages' shared state (`stage`), the `call`s and their
//! instance policy, `streaming`, and the switch from one configuration to
//! the next (`snapshot`). It must not parse HTTP or know about plugin
//! files: it is given a [`Plan`] (loaded plugins, the pipelines' stage
//! lists, the router) and envelopes, and answers with envelopes, streams
//! or [`RunError`]s.
//!
//! A request runs through one pipeline (a [`RouteRef`], chosen by its
//! model): any stages in any order. The diagram shows the default one; a
//! stage that several pipelines name is one stage (one set of permits, one
//! pool of instances) shared by them.
//!
//! ```text
//!          admit (reserve a slot in every stage, or shed)
//!  request ─────┐
//!               ▼   the request's task, start to end:
//!      rag ──────→ assemble ──→ inference ──→ post ──→ stream ──→ reply
//!      permit      permit       permit        …        …
//!      + instance  + instance   + instance
//! ```
//!
//! # Run to completion
//!
//! A request runs its stages one after the other on the tokio task that
//! serves it. For each stage it waits for one of the stage's `workers`
//! permits (FIFO; a request waiting counts in `orchestrator_queue_depth`),
//! takes an idle instance from the stage's pool (or makes one), calls it,
//! and gives both back. Plugin calls are async wasmtime calls that yield to
//! the runtime at every epoch tick, so a long call cannot hold a runtime
//! thread, and one waiting on the host is an ordinary pending future (see
//! `call`). Nothing hands a request from thread to thread.
//!
//! # Admission control
//!
//! A request is admitted only if *every* stage of its pipeline has room for
//! it: admission reserves one of the `queue_capacity` slots of each of
//! those stages, and a reservation is released when the request leaves
//! that stage. A request that cannot reserve a slot
//! is refused at once ([`RunError::Shed`], counted in
//! `orchestrator_requests_shed_total{stage}` under the first stage that was
//! full) — before any work is done on it. A request is also refused at once
//! ([`RunError::CircuitOpen`]) while a stage's breaker is open; while it is
//! half-open, the request may be admitted as a probe. Because every admitted request
//! holds a slot downstream, moving on to the next stage never fails:
//! nothing is shed after work was done on it.
//!
//! # Answers and deadlines
//!
//! [`Pipeline::run`] resolves exactly once per admitted request: with the
//! final envelope, with the error of the stage that failed, or with
//! [`RunError::Timeout`] when the request's deadline passes (each plugin
//! call's deadline is also capped by the time the request has left). A
//! caller that stops waiting (the client went away) drops the request's
//! future: its call in progress is abandoned with its instance, and its
//! reservations are released. A call waiting for a store operation, or
//! one that has changed a store, is the exception: it runs on, in a task
//! of its own, until it has returned, and no later stage starts (see
//! `cut`), so a store never keeps an effect the stage that caused it
//! never saw.
//!
//! # Token streaming
//!
//! When the client asked for a stream ([`Pipeline::run_streaming`]) and a
//! stage's plugin starts a generation with `inference.generate-stream`, the
//! request is handed back to the caller as a [`Streaming`] right after that
//! stage, with its reservations in the later stages still held. The caller
//! pulls from it ([`Streaming::next`]): each token from the backend is
//! passed through `process-chunk` of the following stages that are
//! `streaming-stage` components — each chunk call taking one of the stage's
//! permits and an instance of the version the stream started on — and
//! what the last of them emits is yielded at once. The first
//! following stage that is a plain `stage` component ends the streaming
//! part: the text is collected and it and the stages after it run as usual
//! once the generation ends. A stage that returns `stop` ends the
//! generation (the backend request is cancelled). Dropping the `Streaming`
//! (the client went away) cancels the backend request and releases the
//! request's reservations at once.
//!
//! A streamed
//! request counts once in `orchestrator_requests_total` of each streaming
//! stage; its `orchestrator_stage_duration_seconds` observation there is
//! the time spent in that stage's chunk calls, all chunks together. A
//! request that streams is observed in `orchestrator_request_duration_seconds`
//! when its stream ends (`cancelled` if the client went away first).
//!
//! # Configuration reload
//!
//! [`Pipeline::install`] switches to a new configuration's [`Plan`]; see
//! `snapshot`'s docs for what carries over and when retired stages stop.
//!
//! # Hot swap
//!
//! Each stage's plugin is an `ArcSwap`: [`Pipeline::swap`] publishes a new
//! version atomically. A call takes the current version when it starts, so
//! a call in progress finishes on the version it started on and the next
//! call uses the new one. The stage's idle instances of the old version are
//! dropped at the swap, those in a call when it ends, and the old version's
//! memory with the last of them.

mod admission;
mod call;
mod cut;
mod error;
mod finish;
mod norm;
mod snapshot;
mod stage;
mod streaming;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::metrics::{BreakerState, Metrics, Outcome};
use crate::trace::Trace;
use crate::wasm::{Envelope, Instance, Plugin, PluginVersion};
use cut::CutWhenIdle;
pub use error::RunError;
pub use snapshot::{Plan, RouteRef};
pub use stage::Snapshot;
use stage::{BackendWait, Delivery, Shared, StageRuntime};
pub use streaming::{StreamItem, Streaming};

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

/// The running pipelines: the current [`Snapshot`] and the state every
/// snapshot shares. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
    current: Arc<ArcSwap<Snapshot>>,
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
    /// Requests waiting for one of its permits.
    pub queue_depth: i64,
    /// Most admitted requests that may hold a slot in it at once.
    pub queue_capacity: usize,
    /// Admitted requests that have not yet left this stage.
    pub in_flight: usize,
    /// Most calls it runs at once (its permits).
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
    /// Each key-value store's kind and state (`up`, `down`, `unknown`
    /// before its first operation); a store that is down makes the
    /// status `degraded`.
    pub stores: std::collections::BTreeMap<String, crate::store::StoreHealth>,
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
    /// Start the pipelines of `plan`.
    pub fn start(plan: Plan, metrics: &Metrics) -> Pipeline {
        let shared = Arc::new(Shared {
            requests: metrics.requests_by_outcome(),
            policy: metrics.policy(),
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let snapshot = Snapshot::build(plan, None, &shared, metrics);
        Pipeline {
            shared,
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            installing: Arc::new(Mutex::new(())),
            started: Instant::now(),
        }
    }

    /// Switch to the pipelines of `plan` (a configuration reload): stages
    /// whose settings are unchanged keep their state (a new plugin version
    /// is swapped in), changed and new ones start afresh, and the new
    /// snapshot is published for new requests. Requests in flight finish
    /// on the snapshot they were admitted under; its stages that the new
    /// one lacks are freed with the last of those requests (see
    /// [`Snapshot`]).
    pub fn install(&self, plan: Plan, metrics: &Metrics) {
        let _serial = self.installing.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.current.load_full();
        let snapshot = Snapshot::build(plan, Some(&previous), &self.shared, metrics);
        self.current.store(Arc::new(snapshot));
    }

    /// The configuration serving new requests: take it once per request,
    /// and pass it to [`run`](Self::run).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Run one request through the stages of `route` (of `snapshot`),
    /// answering by `deadline`. A generation a stage streams is collected
    /// before the next stage runs. Each stage the request reaches gets a
    /// child span of `trace` ([`Trace::off`] for none).
    pub async fn run(
        &self,
        snapshot: &Arc<Snapshot>,
        route: &RouteRef,
        envelope: Envelope,
        deadline: Instant,
        trace: Trace,
    ) -> Result<Envelope, RunError> {
        let routed = (snapshot, route);
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
        snapshot: &Arc<Snapshot>,
        route: &RouteRef,
        envelope: Envelope,
        deadline: Instant,
        trace: Trace,
    ) -> Result<Answer, RunError> {
        self.run_observed((snapshot, route), envelope, deadline, true, trace)
            .await
    }

    /// Run a request and observe it in the end-to-end histogram (a
    /// streamed one is observed when its stream ends).
    async fn run_observed(
        &self,
        routed: (&Arc<Snapshot>, &RouteRef),
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
            Ok(Answer::Done(envelope)) => envelope.outcome(),
            Err(error) => error.outcome(),
        };
        self.shared
            .requests
            .observe(outcome, admitted.elapsed(), backend_wait.total());
        result
    }

    async fn admit_and_wait(
        &self,
        (snapshot, route): (&Arc<Snapshot>, &RouteRef),
        envelope: Envelope,
        deadline: Instant,
        streaming: bool,
        trace: Trace,
        backend_wait: BackendWait,
    ) -> Result<Answer, RunError> {
        let job = admission::admit(
            snapshot,
            &route.0,
            envelope,
            deadline,
            streaming,
            trace,
            backend_wait,
        )?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let ran = match job.holds.clone() {
            // A route with stores: cut only where nothing holds it.
            Some(holds) => {
                let stages = CutWhenIdle::new(|| call::run_stages(job), holds);
                tokio::time::timeout_at(deadline.into(), stages).await
            }
            None => tokio::time::timeout_at(deadline.into(), call::run_stages(job)).await,
        };
        match ran {
            Ok(Ok(Delivery::Done(envelope))) => Ok(Answer::Done(envelope)),
            Ok(Ok(Delivery::Stream(job, tokens))) => {
                Ok(Answer::Streaming(Box::new(Streaming::new(*job, tokens))))
            }
            Ok(Err(error)) => Err(error),
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
    /// `warm`, an instance of `plugin` with its `init` done (the one that
    /// validated it), serves the stage's next call.
    pub fn swap(
        &self,
        stage: &str,
        plugin: Arc<Plugin>,
        warm: Option<Instance>,
    ) -> Option<Arc<Plugin>> {
        let stage = self.stage(stage)?;
        let previous = stage.publish(plugin);
        if let Some(instance) = warm {
            stage.keep_warm(instance);
        }
        Some(previous)
    }

    /// The plugin version `stage` runs.
    pub fn plugin(&self, stage: &str) -> Option<Arc<Plugin>> {
        Some(self.stage(stage)?.plugin_owned())
    }

    /// The pipelines' `/health` report.
    pub fn health(&self) -> Health {
        let accepting = self.shared.accepting.load(Ordering::Acquire);
        let snapshot = self.current.load_full();
        let stages: Vec<StageHealth> = snapshot
            .stages
            .iter()
            .map(|stage| {
                let circuit = stage.breaker.state();
                StageHealth {
                    name: stage.name(),
                    ready: accepting && circuit != BreakerState::Open,
                    circuit,
                    instances: stage.metrics.instances.get(),
                    plugin: stage.plugin().describe(),
                    queue_depth: stage.metrics.queue_depth.get(),
                    queue_capacity: stage.settings.queue_capacity,
                    in_flight: stage.reserved.load(Ordering::Acquire),
                    workers: stage.settings.workers,
                    instance_mode: stage.settings.instance_mode.to_string(),
                }
            })
            .collect();
        let stores = snapshot.stores().health();
        let degraded = stages.iter().any(|s| s.circuit != BreakerState::Closed)
            || stores.values().any(|s| s.state == "down");
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
            pipelines: snapshot
                .routes()
                .map(|route| PipelineHealth {
                    name: route.name(),
                    stages: route.stage_names().collect(),
                })
                .collect(),
            config_hash: snapshot.hash().to_string(),
            stores,
        }
    }

    /// Admit nothing new (answering [`RunError::ShuttingDown`]); `/health`
    /// says `draining`. Requests already admitted go on.
    pub fn stop_admitting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Stop admitting and wait until every admitted request has been
    /// answered (or `grace` has passed). Requests still running then are
    /// dropped with the runtime.
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
    }
}
