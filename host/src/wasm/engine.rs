//! The one wasmtime [`Engine`] of the process ([`Runtime`]): the component
//! model, the pooling instance allocator, fuel if any stage meters it, and
//! epoch interruption advanced by a ticker thread every [`EPOCH_TICK`].
//!
//! Owns the engine's configuration and the ticker's life (it stops when the
//! runtime is dropped). The ticker runs only while plugin code may run: a
//! call holds an [`EpochTicker::busy`] guard, and after
//! [`TICKER_IDLE_PARK`] without any, the ticker parks until the next call
//! (an idle host wakes no thread 200 times a second). Deadlines are
//! counted in ticks from the call's start, and the ticker is running from
//! then on, so parking never lengthens one. Loading plugins into the
//! runtime is [`super::load`]'s.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::ArtifactCache;
use crate::config::Config;
use crate::metrics::{Metrics, PoolUsage};

/// How often the epoch ticker advances the engine's epoch: the resolution
/// of plugin-call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Bytes at the bottom of a pooled memory slot that stay resident between
/// instances (reset in place); memory above it is decommitted when a slot
/// is reused, so an instance that grew past it is cheaper to replace than
/// to keep idle.
pub const KEEP_RESIDENT_BYTES: usize = 4 << 20;

/// How long the ticker keeps ticking with no call in progress before it
/// parks.
pub const TICKER_IDLE_PARK: Duration = Duration::from_millis(100);

/// The epoch ticker's shared state: calls in progress, and whether it is
/// parked (see the module docs).
#[derive(Debug)]
pub struct EpochTicker {
    active: AtomicUsize,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: std::sync::OnceLock<Thread>,
}

/// Held for the length of a plugin call: the ticker runs while any is.
#[derive(Debug)]
pub struct Ticking(Arc<EpochTicker>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpochTicker {
    /// A plugin call starts: wake the ticker if it is parked.
    pub fn busy(self: &Arc<Self>) -> Ticking {
        // SeqCst with the ticker's `parked` store then `active` load: either
        // this sees it parked (and unparks it; an unpark before its park is
        // not lost) or it sees this call and does not park.
        self.active.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
        Ticking(self.clone())
    }

    /// The ticker thread's loop.
    fn run(&self, engine: &Engine) {
        let idle_limit = TICKER_IDLE_PARK.as_nanos() / EPOCH_TICK.as_nanos();
        let mut idle_ticks = 0u128;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
            if self.active.load(Ordering::SeqCst) > 0 {
                idle_ticks = 0;
                continue;
            }
            idle_ticks += 1;
            if idle_ticks < idle_limit {
                continue;
            }
            self.parked.store(true, Ordering::SeqCst);
            while self.active.load(Ordering::SeqCst) == 0 && !self.stop.load(Ordering::Relaxed) {
                std::thread::park();
            }
            self.parked.store(false, Ordering::SeqCst);
            idle_ticks = 0;
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// Why the engine could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused the configuration (for example, the pool does not
    /// fit in the address space).
    #[error("cannot create the wasm engine")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The epoch ticker thread could not be started.
    #[error("cannot start the epoch ticker thread")]
    Ticker(#[source] std::io::Error),
}

/// The fewest pool slots the engine is made with (address space only
/// until used).
pub const MIN_INSTANCE_SLOTS: u32 = 64;

/// Pool slots the engine has beyond what the startup configuration needs:
/// room for a reload to add stages (at two workers each, eight of them).
pub const RELOAD_HEADROOM_SLOTS: u32 = 32;

/// Settings of the shared engine.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Pool slots for component instances (and memories, tables).
    pub max_instances: u32,
    /// Largest linear memory any plugin may have (per-stage caps are lower).
    pub max_memory_bytes: usize,
    /// Compiled-artifact cache directory, if any.
    pub cache_dir: Option<PathBuf>,
    /// Whether any stage sets a fuel budget (fuel metering is engine-wide).
    pub fuel: bool,
}

impl EngineSettings {
    /// Settings sized for `config`: twice the workers of its stages (so a
    /// hot-swapped version's instances can coexist with the old ones) plus
    /// headroom for validation instances, plus `RELOAD_HEADROOM_SLOTS` so
    /// that a configuration reload can add stages (it cannot resize the
    /// pool; see [`Runtime::fits`]), and never fewer than
    /// `MIN_INSTANCE_SLOTS`.
    pub fn for_config(config: &Config) -> EngineSettings {
        let slots = Self::needed_slots(config).saturating_add(RELOAD_HEADROOM_SLOTS);
        EngineSettings {
            max_instances: slots.max(MIN_INSTANCE_SLOTS),
            max_memory_bytes: config
                .stages
                .iter()
                .map(|s| s.max_memory_bytes)
                .max()
                .unwrap_or(64 << 20),
            cache_dir: config.cache_dir.clone(),
            fuel: config.stages.iter().any(|s| s.fuel.is_some()),
        }
    }

    /// The pool slots `config`'s stages need: twice their workers, plus 16.
    pub fn needed_slots(config: &Config) -> u32 {
        let workers: usize = config.stages.iter().map(|s| s.workers).sum();
        u32::try_from(workers * 2 + 16).unwrap_or(u32::MAX)
    }
}

/// The wasmtime engine, its epoch ticker and the artifact cache.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) cache: Arc<ArtifactCache>,
    pub(super) ticker: Arc<EpochTicker>,
    pub(super) fuel: bool,
    /// What the engine was sized for ([`Runtime::fits`]).
    sized_for: EngineSettings,
}

impl Runtime {
    /// Create the engine (see the module docs for its configuration).
    pub fn new(settings: &EngineSettings, metrics: &Metrics) -> Result<Runtime, EngineError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(settings.max_instances)
            .total_core_instances(settings.max_instances * 4)
            .total_memories(settings.max_instances)
            .total_tables(settings.max_instances * 2)
            .max_memory_size(settings.max_memory_bytes)
            // Resetting a memory slot for its next instance: Rust guests
            // put their 1 MiB shadow stack at the bottom of linear memory
            // and touch only its top, so a blind memset of the first N
            // bytes clears pages never touched (29% of instance cost at
            // 1 MiB), and decommitting everything (`madvise`) costs page
            // faults and TLB shootdowns on every reuse. With Linux's
            // PAGEMAP_SCAN (kernel 6.7+; `Auto` falls back to the memset
            // elsewhere) only the pages the previous instance dirtied in
            // the first 4 MiB are reset, and they stay resident (what that
            // saves: benches/README.md). Memory
            // beyond 4 MiB (a memory bomb, say)
            // is still decommitted, so idle RSS stays bounded by what
            // guests actually touch below 4 MiB.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .pagemap_scan(wasmtime::Enabled::Auto)
            .table_keep_resident(64 << 10);
        // A free slot that served an instance keeps what that instance
        // touched below `KEEP_RESIDENT_BYTES` resident. wasmtime keeps up
        // to 100 such slots by default, taking never-used slots first to
        // keep each warm slot's affinity to its module; a reload or a swap
        // brings new modules, so every one took a fresh slot and left the
        // old warm: RSS grew ~1 MiB a reload for 100 reloads
        // (benches/soak.sh). With none kept, a new instance takes its
        // module's own free slot if it has one, else any warm one, and a
        // never-used slot only when no warm slot is free. wasmtime splits a
        // pool of 128 slots or more into one shard per core (at most 16)
        // and picks within the calling thread's shard, so up to one set of
        // free warm slots per shard can wait for reuse: bounded, not zero.
        pool.max_unused_warm_slots(0);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            // Calls run on fibers (`call_async`): a call future dropped in
            // the middle is run to its end as a trap, and the store is
            // free again, which the pipeline relies on to take the request
            // back from a call cut short (`Instance::take_lent`).
            .concurrency_support(false)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            // `ORCHESTRATOR_PERF_MAP=1` writes /tmp/perf-<pid>.map, so that
            // `perf report` names the guests' functions (see
            // benches/README.md).
            .profiler(if std::env::var_os("ORCHESTRATOR_PERF_MAP").is_some() {
                wasmtime::ProfilingStrategy::PerfMap
            } else {
                wasmtime::ProfilingStrategy::None
            })
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if std::env::var("ORCHESTRATOR_INSTANCE_ALLOCATION").as_deref() == Ok("on-demand") {
            // For tools that cannot host the pool's address-space
            // reservation (valgrind: benches/instructions.sh): instances
            // allocated one by one, memories reserved as they grow. Slower,
            // and not what a deployment runs.
            tracing::warn!(
                "ORCHESTRATOR_INSTANCE_ALLOCATION=on-demand: plugin instances are allocated \
                 one by one, without guard pages (for profilers such as valgrind, not for serving)"
            );
            config
                .allocation_strategy(InstanceAllocationStrategy::OnDemand)
                .memory_reservation(0)
                .memory_guard_size(0)
                .memory_reservation_for_growth(1 << 20);
        }
        let engine = Engine::new(&config).map_err(|e| EngineError::Engine(e.into()))?;

        let ticker = Arc::new(EpochTicker {
            active: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let (ticker_engine, state) = (engine.clone(), ticker.clone());
        let thread = std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || state.run(&ticker_engine))
            .map_err(EngineError::Ticker)?;
        let _ = ticker.thread.set(thread.thread().clone());
        let pool_engine = engine.clone();
        metrics.watch_instance_pool(Box::new(move || {
            pool_engine
                .pooling_allocator_metrics()
                .map(|pool| PoolUsage {
                    unused_warm_slots: u64::from(pool.unused_warm_memories()),
                })
                .unwrap_or_default()
        }));
        let cache = ArtifactCache::new(settings.cache_dir.clone(), &engine, metrics.cache());
        Ok(Runtime {
            engine,
            cache: Arc::new(cache),
            ticker,
            fuel: settings.fuel,
            sized_for: settings.clone(),
        })
    }

    /// Whether stages that need `needed` fit the engine as it was sized
    /// at startup (a configuration reload cannot resize it); if not, what
    /// they lack.
    pub fn fits(&self, needed: &EngineSettings) -> Result<(), String> {
        let sized = &self.sized_for;
        if needed.max_instances > sized.max_instances {
            return Err(format!(
                "the stages need {} plugin instance slots (twice their workers, plus 16), \
                 and the engine has {} since startup",
                needed.max_instances, sized.max_instances
            ));
        }
        if needed.max_memory_bytes > sized.max_memory_bytes {
            return Err(format!(
                "a stage's `max_memory_bytes` ({}) is above the largest at startup ({})",
                needed.max_memory_bytes, sized.max_memory_bytes
            ));
        }
        if needed.fuel && !sized.fuel {
            return Err(
                "a stage sets `fuel`, and fuel metering was off at startup (no stage set it)"
                    .into(),
            );
        }
        Ok(())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.cache)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wait (polling: the ticker exposes no signal) until it is `parked`.
    fn until_parked(ticker: &EpochTicker, parked: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ticker.parked.load(Ordering::SeqCst) != parked {
            assert!(
                std::time::Instant::now() < deadline,
                "parked stayed {}",
                !parked
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn the_ticker_parks_when_idle_and_runs_during_calls() {
        let settings = EngineSettings {
            max_instances: 4,
            max_memory_bytes: 1 << 20,
            cache_dir: None,
            fuel: false,
        };
        let runtime = Runtime::new(&settings, &Metrics::new()).expect("engine");
        let ticker = runtime.ticker.clone();
        until_parked(&ticker, true);
        let call = ticker.busy();
        until_parked(&ticker, false);
        // A second call and the end of the first keep it running.
        let other = ticker.busy();
        drop(call);
        std::thread::sleep(TICKER_IDLE_PARK * 2);
        assert!(
            !ticker.parked.load(Ordering::SeqCst),
            "parked during a call"
        );
        drop(other);
        until_parked(&ticker, true);
    }
}
