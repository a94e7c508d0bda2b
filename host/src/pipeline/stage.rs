//! The pipeline's shared state: each stage's runtime ([`StageRuntime`]: its
//! plugin version, bounded queue, reservations, breaker and metric
//! handles) and the work items on its queue ([`Job`], [`ChunkJob`]).
//!
//! Owns the invariants that tie them together: a [`Job`] holds one
//! reservation in each stage it has not yet left, released when it moves
//! on or is dropped, and settles (or gives back) its breaker probes on
//! drop. It must not run anything: workers ([`super::worker`]) and the
//! streaming path ([`super::streaming`]) do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{Notify, oneshot};

use super::error::RunError;
use super::norm::InputNorm;
use crate::circuit::{CircuitBreaker, Probe};
use crate::config::StageConfig;
use crate::inference::{Router, TokenStream};
use crate::metrics::{Metrics, RequestMetrics, StageMetrics};
use crate::trace::{Attribute, Kind, Trace};
use crate::wasm::{CallError, ChunkContext, ChunkOutput, Envelope, Plugin};

/// State shared by every generation: what admission and the drain need.
pub(super) struct Shared {
    /// `orchestrator_request_duration_seconds{outcome}`.
    pub(super) requests: RequestMetrics,
    /// Cleared at shutdown: nothing new is admitted.
    pub(super) accepting: AtomicBool,
    /// Requests admitted and not yet answered, under any generation.
    pub(super) in_flight: AtomicUsize,
    /// Notified when `in_flight` drops to 0.
    pub(super) drained: Notify,
}

impl Shared {
    /// A request was answered (or dropped).
    pub(super) fn left(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }
}

/// One pipeline of a generation: the stages its requests pass through.
pub(super) struct Route {
    /// The pipeline's name.
    pub(super) name: &'static str,
    /// Its stages, in order.
    pub(super) stages: Vec<Arc<StageRuntime>>,
    /// Their names, comma-separated (the `x-orchestrator-stages` header).
    pub(super) stage_list: &'static str,
}

/// One configuration at run time (see the module docs). Cheap to hold:
/// the HTTP layer takes the current one per request.
pub struct Generation {
    /// Every stage in use, in `/health` order.
    pub(super) stages: Vec<Arc<StageRuntime>>,
    /// The pipelines by name.
    pub(super) routes: BTreeMap<&'static str, Arc<Route>>,
    pub(super) router: Router,
    pub(super) hash: String,
    pub(super) shared: Arc<Shared>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        for stage in &self.stages {
            if stage.generations.fetch_sub(1, Ordering::AcqRel) == 1 {
                tracing::info!(
                    stage = stage.name(),
                    "stage no longer configured; its workers stop"
                );
                stage.stop_workers();
            }
        }
    }
}

/// One stage at run time: its plugin, queue, breaker and metric handles.
pub(super) struct StageRuntime {
    pub(super) settings: StageConfig,
    /// The version serving now; swapped atomically.
    pub(super) plugin: ArcSwap<Plugin>,
    pub(super) sender: Sender<Work>,
    pub(super) receiver: Receiver<Work>,
    /// Reservations held (admitted requests that have not left the stage,
    /// plus chunk items queued): bounded by `queue_capacity`.
    pub(super) reserved: AtomicUsize,
    pub(super) breaker: Arc<CircuitBreaker>,
    /// Recent successful input sizes: what the breaker excuses.
    pub(super) inputs: InputNorm,
    pub(super) metrics: StageMetrics,
    /// The generations (configurations) that include this stage; its
    /// workers stop when the last of them is dropped.
    pub(super) generations: AtomicUsize,
    /// Set when the workers are told to stop.
    pub(super) stopping: AtomicBool,
}

impl StageRuntime {
    /// The runtime of stage `settings`, serving `plugin`, with its series
    /// resolved (and created at 0) in `metrics`.
    pub(super) fn new(settings: StageConfig, plugin: Arc<Plugin>, metrics: &Metrics) -> Self {
        let (sender, receiver) = crossbeam_channel::bounded(settings.queue_capacity);
        let stage_metrics = metrics.stage(settings.name());
        stage_metrics
            .queue_capacity
            .set(settings.queue_capacity as i64);
        // `queue_depth` is not reset: a reload may start this runtime while
        // the one it replaces still has requests queued on the same series.
        metrics.set_plugin_version(settings.name(), plugin.sha256());
        StageRuntime {
            plugin: ArcSwap::new(plugin),
            sender,
            receiver,
            reserved: AtomicUsize::new(0),
            breaker: CircuitBreaker::new(
                format!("stage {}", settings.name()),
                settings.breaker_failures,
                Duration::from_millis(settings.breaker_cooldown_ms),
                settings.breaker_probes,
                stage_metrics.breaker.clone(),
            ),
            inputs: InputNorm::default(),
            metrics: stage_metrics,
            settings,
            generations: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    /// Tell the stage's workers to stop (once): idle ones stop at once,
    /// busy ones after their call. Called when no configuration includes
    /// the stage any more, so no request can reach its queue.
    pub(super) fn stop_workers(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        for _ in 0..self.settings.workers {
            // Best effort: a worker that misses its `Stop` because the
            // queue is full of abandoned chunk items sees `stopping` at
            // its next idle check.
            let _ = self.sender.try_send(Work::Stop);
        }
    }

    /// The stage's name.
    pub(super) fn name(&self) -> &'static str {
        self.settings.name()
    }

    /// Open this stage's span for request `request_id` under `parent`
    /// (started at `start`, or now), running `plugin`, with one attribute
    /// of the caller's besides the common ones; off when `parent` does not
    /// record.
    pub(super) fn open_span(
        &self,
        parent: &Trace,
        plugin: &Plugin,
        request_id: &str,
        start: Option<std::time::SystemTime>,
        extra: Attribute,
    ) -> Trace {
        if !parent.is_recording() {
            return Trace::off();
        }
        parent.child(
            format!("stage {}", self.name()),
            Kind::Internal,
            start,
            vec![
                Attribute::new("orchestrator.stage", self.name()),
                Attribute::new("orchestrator.plugin.sha256", plugin.sha256().to_string()),
                Attribute::new(
                    "orchestrator.instance_mode",
                    self.settings.instance_mode.to_string(),
                ),
                Attribute::new("orchestrator.request_id", request_id.to_string()),
                extra,
            ],
        )
    }

    /// Take one reservation, if the queue has room.
    pub(super) fn try_reserve(&self) -> bool {
        let capacity = self.settings.queue_capacity;
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r < capacity).then_some(r + 1)
            })
            .is_ok()
    }

    /// Give one reservation back.
    pub(super) fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }

    /// The error of a request refused because this stage is full.
    pub(super) fn shed(&self) -> RunError {
        RunError::Shed {
            stage: self.name(),
            capacity: self.settings.queue_capacity,
        }
    }

    /// Put `job` on this stage's queue. It holds a reservation here, so
    /// the queue has room.
    pub(super) fn enqueue(&self, mut job: Job) {
        job.queued = Instant::now();
        self.metrics.queue_depth.inc();
        if let Err(err) = self.sender.try_send(Work::Job(job)) {
            // Unreachable while reservations bound the queues; answer rather
            // than lose the request if that invariant is ever broken.
            self.metrics.queue_depth.dec();
            if let Work::Job(job) = err.into_inner() {
                tracing::error!(stage = self.name(), "queue full despite a reservation");
                job.answer(Err(self.shed()));
            }
        }
    }
}

/// How a job leaves the stages that run it.
pub(super) enum Delivery {
    /// Every stage ran: the final envelope.
    Done(Envelope),
    /// A stage started a streaming generation and the client asked for a
    /// stream: the job (still holding its reservations in the later stages)
    /// and the generation's tokens.
    Stream(Box<Job>, TokenStream),
}

/// The time a request has spent waiting for the inference backend, added
/// to by each call and stream that serves it: what
/// `orchestrator_overhead_seconds` subtracts from its duration.
#[derive(Clone, Debug, Default)]
pub(super) struct BackendWait(Arc<AtomicU64>);

impl BackendWait {
    pub(super) fn add(&self, waited: Duration) {
        let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(super) fn total(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// Where a job's caller waits for it.
pub(super) type Reply = oneshot::Sender<Result<Delivery, RunError>>;

/// One request in flight.
pub(super) struct Job {
    pub(super) envelope: Envelope,
    /// Index of the stage the job is in (or queued for). Reservations of
    /// stages `stage..` are still held.
    pub(super) stage: usize,
    pub(super) deadline: Instant,
    pub(super) reply: Option<Reply>,
    /// The unsettled breaker probes of the job, by stage index (empty
    /// unless a breaker is half-open). Dropped with the job, a probe gives
    /// its slot back.
    pub(super) probes: Vec<(usize, Probe)>,
    /// The client asked for a stream.
    pub(super) streaming: bool,
    pub(super) admitted: Instant,
    /// When the job was queued for its current stage.
    pub(super) queued: Instant,
    /// The request's trace (its server span), parent of its stage spans.
    pub(super) trace: Trace,
    /// Its time waiting for the backend so far.
    pub(super) backend_wait: BackendWait,
    /// Its pipeline: the stages it passes through.
    pub(super) route: Arc<Route>,
    /// The configuration it was admitted under (its backends; holding it
    /// keeps that configuration's stages running until the job is done).
    pub(super) generation: Arc<Generation>,
}

impl Job {
    /// Answer the caller (once; later answers are dropped).
    pub(super) fn answer(mut self, result: Result<Delivery, RunError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }

    /// Whether the caller has stopped waiting.
    pub(super) fn caller_gone(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// Tell stage `index`'s breaker how the call went: through the job's
    /// probe of it, if it holds one.
    pub(super) fn settle(&mut self, index: usize, failed: bool) {
        match self.probes.iter().position(|(i, _)| *i == index) {
            Some(at) => self.probes.swap_remove(at).1.settle(failed),
            None => self.route.stages[index].breaker.record(failed),
        }
    }

    /// Leave the current stage: give its reservation back.
    pub(super) fn leave_stage(&mut self) {
        self.route.stages[self.stage].release();
        self.stage += 1;
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for stage in &self.route.stages[self.stage..] {
            stage.release();
        }
        self.generation.shared.left();
    }
}

/// An item of a stage's queue.
#[expect(
    clippy::large_enum_variant,
    reason = "jobs are the common item; boxing one would cost an allocation per request"
)]
pub(super) enum Work {
    /// Run `process` for a request.
    Job(Job),
    /// One `process-chunk` call of a streaming request.
    Chunk(ChunkJob),
    /// Stop the worker that takes it.
    Stop,
}

/// One `process-chunk` call, run by a worker of the stage.
pub(super) struct ChunkJob {
    /// The version the stream started on.
    pub(super) plugin: Arc<Plugin>,
    pub(super) context: ChunkContext,
    pub(super) carry: String,
    pub(super) delta: String,
    pub(super) last: bool,
    pub(super) deadline: Instant,
    /// The stage's span for this stream (its log records' events).
    pub(super) trace: Trace,
    /// The result and the time spent in the call.
    pub(super) reply: oneshot::Sender<(Result<ChunkOutput, CallError>, Duration)>,
    /// The item's own hold on the stage's queue: a chunk left in the queue
    /// by a request that went away still counts against its capacity until
    /// a worker takes it.
    pub(super) _hold: QueueHold,
}

/// One more reservation of a stage's queue, released on drop. Taken on top
/// of the request's own reservation, without a capacity check.
pub(super) struct QueueHold(Arc<StageRuntime>);

impl QueueHold {
    pub(super) fn new(stage: &Arc<StageRuntime>) -> QueueHold {
        stage.reserved.fetch_add(1, Ordering::AcqRel);
        QueueHold(stage.clone())
    }
}

impl Drop for QueueHold {
    fn drop(&mut self) {
        self.0.release();
    }
}
