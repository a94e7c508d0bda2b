//! The pipeline's shared state: each stage's runtime ([`StageRuntime`]: its
//! plugin version, reservations, call permits, idle instances, breaker and
//! metric handles) and the requests in flight ([`Job`]).
//!
//! Owns the invariants that tie them together: a [`Job`] holds one
//! reservation in each stage it has not yet left, released when it moves
//! on or is dropped, and settles (or gives back) its breaker probes on
//! drop; an idle instance is of the version the stage serves. It must not
//! run anything: the calls ([`super::call`]) and the streaming path
//! ([`super::streaming`]) do.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use super::error::RunError;
use super::norm::InputNorm;
use crate::circuit::{CircuitBreaker, Probe};
use crate::config::{InstanceMode, StageConfig};
use crate::inference::{Router, TokenStream};
use crate::metrics::{Metrics, PolicyMetrics, RequestMetrics, StageMetrics};
use crate::store::Holds;
use crate::trace::{Attribute, Kind, Trace};
use crate::wasm::{Envelope, Instance, KEEP_RESIDENT_BYTES, Plugin};

/// State shared by every snapshot: what admission and the drain need.
pub(super) struct Shared {
    /// `orchestrator_request_duration_seconds{outcome}`.
    pub(super) requests: RequestMetrics,
    /// Refusals, cache answers and spending by principal.
    pub(super) policy: PolicyMetrics,
    /// Cleared at shutdown: nothing new is admitted.
    pub(super) accepting: AtomicBool,
    /// Requests admitted and not yet answered, under any snapshot.
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

/// One pipeline of a snapshot: the stages its requests pass through.
pub(super) struct Route {
    /// The pipeline's name.
    pub(super) name: &'static str,
    /// Its stages, in order.
    pub(super) stages: Vec<Arc<StageRuntime>>,
    /// Their names, comma-separated: the `x-orchestrator-stages` header's
    /// value, made once (not interned: each composition a reload brings
    /// would otherwise stay for the process's life).
    pub(super) stage_list: warp::http::HeaderValue,
    /// A stage of it is granted a store: its requests are cut only where
    /// nothing holds them (see `cut`).
    pub(super) stores: bool,
}

/// One configuration at run time (see the module docs). Cheap to hold:
/// the HTTP layer takes the current one per request.
pub struct Snapshot {
    /// Every stage in use, in `/health` order.
    pub(super) stages: Vec<Arc<StageRuntime>>,
    /// The pipelines by name.
    pub(super) routes: BTreeMap<&'static str, Arc<Route>>,
    pub(super) router: Router,
    pub(super) stores: Arc<crate::store::Stores>,
    pub(super) hash: String,
    pub(super) shared: Arc<Shared>,
}

/// One stage at run time: its plugin, reservations, call permits, idle
/// instances, breaker and metric handles.
pub(super) struct StageRuntime {
    pub(super) settings: StageConfig,
    /// The version serving now; swapped atomically ([`Self::publish`]).
    plugin: ArcSwap<Plugin>,
    /// Reservations held (admitted requests that have not left the stage):
    /// bounded by `queue_capacity`.
    pub(super) reserved: AtomicUsize,
    /// One permit per call the stage may run at once (`workers`).
    permits: Semaphore,
    /// Instances between calls, most recently used last: at most one per
    /// permit, all of the version serving now (an instance of an older
    /// version is dropped when its call ends).
    idle: Mutex<Vec<Instance>>,
    pub(super) breaker: Arc<CircuitBreaker>,
    /// Recent successful input sizes: what the breaker excuses.
    pub(super) inputs: InputNorm,
    pub(super) metrics: StageMetrics,
}

impl StageRuntime {
    /// The runtime of stage `settings`, serving `plugin`, with its series
    /// resolved (and created at 0) in `metrics`.
    pub(super) fn new(settings: StageConfig, plugin: Arc<Plugin>, metrics: &Metrics) -> Self {
        let stage_metrics = metrics.stage(settings.name());
        stage_metrics
            .queue_capacity
            .set(settings.queue_capacity as i64);
        // `queue_depth` is not reset: a reload may start this runtime while
        // the one it replaces still has requests queued on the same series.
        metrics.set_plugin_version(settings.name(), plugin.sha256());
        StageRuntime {
            plugin: ArcSwap::new(plugin),
            reserved: AtomicUsize::new(0),
            permits: Semaphore::new(settings.workers),
            idle: Mutex::new(Vec::with_capacity(settings.workers)),
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
        }
    }

    /// The version serving now (a borrowed guard: no reference count is
    /// touched).
    pub(super) fn plugin(&self) -> arc_swap::Guard<Arc<Plugin>> {
        self.plugin.load()
    }

    /// The version serving now, owned.
    pub(super) fn plugin_owned(&self) -> Arc<Plugin> {
        self.plugin.load_full()
    }

    /// Serve `plugin` from the next call on (a hot swap, or a reload that
    /// keeps the stage): calls in progress finish on the version they
    /// started on, and the idle instances of the old version are dropped
    /// at once, freeing its memory as soon as no call uses it. Returns the
    /// previous version.
    pub(super) fn publish(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        // Under the pool's lock, so that no call can return an instance of
        // the old version to the pool after it was emptied.
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.plugin.swap(plugin);
        let retired = std::mem::take(&mut *idle);
        drop(idle);
        drop(retired);
        previous
    }

    /// Wait for one of the stage's call permits (FIFO). While it waits,
    /// the request counts in `orchestrator_queue_depth`.
    pub(super) async fn permit(&self) -> Result<SemaphorePermit<'_>, RunError> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(permit);
        }
        let _waiting = Waiting::start(&self.metrics);
        self.permits
            .acquire()
            .await
            .map_err(|_| RunError::ShuttingDown)
    }

    /// An idle instance of `version`, if there is one.
    pub(super) fn take_idle(&self, version: &Arc<Plugin>) -> Option<Instance> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let at = idle
            .iter()
            .rposition(|i| Arc::ptr_eq(i.plugin(), version))?;
        Some(idle.remove(at))
    }

    /// Keep `instance` for a later call, if it is of the version serving
    /// now and its memory has not grown past twice what it held after
    /// `init` (nor past [`KEEP_RESIDENT_BYTES`], whichever is larger);
    /// drop it otherwise. Linear memory never shrinks, so without that
    /// bound a burst of large requests would leave up to `workers` idle
    /// instances each holding its high-water mark (64 permits × a 64 MiB
    /// cap for inference) until they are recycled.
    pub(super) fn put_idle(&self, instance: Instance) {
        let bloated =
            instance.memory_bytes() > (2 * instance.memory_at_start()).max(KEEP_RESIDENT_BYTES);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !bloated
            && idle.len() < self.settings.workers
            && Arc::ptr_eq(instance.plugin(), &self.plugin.load())
        {
            idle.push(instance);
            return;
        }
        // Dropped after the lock is released.
        drop(idle);
        drop(instance);
    }

    /// Keep `instance` (of the version serving, its `init` done) for the
    /// stage's next call, unless the stage makes an instance per request.
    pub(super) fn keep_warm(&self, instance: Instance) {
        if self.settings.instance_mode == InstanceMode::Reuse {
            self.put_idle(instance);
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
}

/// How a job leaves the stages that run it.
#[expect(
    clippy::large_enum_variant,
    reason = "`Done` is the common case; boxing its envelope would cost an allocation per request"
)]
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

/// One request in flight.
pub(super) struct Job {
    pub(super) envelope: Envelope,
    /// Index of the stage the job is in (or queued for). Reservations of
    /// stages `stage..` are still held.
    pub(super) stage: usize,
    pub(super) deadline: Instant,
    /// The unsettled breaker probes of the job, by stage index (empty
    /// unless a breaker is half-open). Dropped with the job, a probe gives
    /// its slot back.
    pub(super) probes: Vec<(usize, Probe)>,
    /// The client asked for a stream.
    pub(super) streaming: bool,
    pub(super) admitted: Instant,
    /// When the job reached its current stage (its wait for a permit
    /// there starts).
    pub(super) waiting_since: Instant,
    /// The request's trace (its server span), parent of its stage spans.
    pub(super) trace: Trace,
    /// Its time waiting for the backend so far.
    pub(super) backend_wait: BackendWait,
    /// Its pipeline: the stages it passes through.
    pub(super) route: Arc<Route>,
    /// The configuration it was admitted under (its backends; holding it
    /// keeps that configuration's stages running until the job is done).
    pub(super) snapshot: Arc<Snapshot>,
    /// The client asked for a stream (`streaming` may be cleared on the
    /// way; this is not).
    pub(super) asked_stream: bool,
    /// The stages that ran and export `finish`, in order (see `finish`).
    pub(super) finishers: Vec<usize>,
    /// The stage that refused the request, if one did.
    pub(super) refused_by: Option<&'static str>,
    /// The request's end is counted in the policy series.
    pub(super) accounted: bool,
    /// The request taken back from a call cut short while a stage held
    /// it: what the finish calls and the policy accounting get if the
    /// request ends in the middle of a call.
    pub(super) lent: Option<Envelope>,
    /// The HTTP status of the failure that ended the request, if one did.
    pub(super) failure: Option<u16>,
    /// What its stage calls hold against a cut, and whether its caller
    /// stopped waiting (see `cut`): for a route with stores only.
    pub(super) holds: Option<Holds>,
}

impl Job {
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

    /// Take the envelope out (the job is done with it).
    pub(super) fn take_envelope(&mut self) -> Envelope {
        std::mem::replace(&mut self.envelope, Envelope::placeholder())
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.finish_unanswered();
        for stage in &self.route.stages[self.stage..] {
            stage.release();
        }
        self.snapshot.shared.left();
    }
}

/// A request waiting for a stage's permit: counted in the stage's
/// `orchestrator_queue_depth` until dropped, however the wait ends.
struct Waiting<'a>(&'a StageMetrics);

impl<'a> Waiting<'a> {
    fn start(metrics: &'a StageMetrics) -> Waiting<'a> {
        metrics.queue_depth.inc();
        Waiting(metrics)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.queue_depth.dec();
    }
}
