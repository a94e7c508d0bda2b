//! The one wasmtime [`Engine`] of the process ([`Runtime`]): the component
//! model, the pooling instance allocator, fuel if any stage meters it, and
//! epoch interruption advanced by a ticker thread every [`EPOCH_TICK`].
//!
//! Owns the engine's configuration and the ticker's life (it stops when the
//! runtime is dropped). Loading plugins into the runtime is
//! [`super::load`]'s.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::ArtifactCache;
use crate::config::Config;
use crate::metrics::Metrics;

/// How often the epoch ticker advances the engine's epoch: the resolution
/// of plugin-call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

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
    /// Settings sized for `config`: twice the workers (so a hot-swapped
    /// version's instances can coexist with the old ones) plus headroom for
    /// validation instances.
    pub fn for_config(config: &Config) -> EngineSettings {
        let workers: usize = config.stages.iter().map(|s| s.workers).sum();
        EngineSettings {
            max_instances: u32::try_from(workers * 2 + 16).unwrap_or(u32::MAX),
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
}

/// The wasmtime engine, its epoch ticker and the artifact cache.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) cache: Arc<ArtifactCache>,
    ticker_stop: Arc<AtomicBool>,
    pub(super) fuel: bool,
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
            // the first 4 MiB are reset, and they stay resident (see the
            // README's Performance section for what that saved). Memory
            // beyond 4 MiB (a memory bomb, say)
            // is still decommitted, so idle RSS stays bounded by what
            // guests actually touch below 4 MiB.
            .linear_memory_keep_resident(4 << 20)
            .pagemap_scan(wasmtime::Enabled::Auto)
            .table_keep_resident(64 << 10);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .concurrency_support(false)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            // `ORCHESTRATOR_PERF_MAP=1` writes /tmp/perf-<pid>.map, so that
            // `perf report` names the guests' functions (see README,
            // Performance).
            .profiler(if std::env::var_os("ORCHESTRATOR_PERF_MAP").is_some() {
                wasmtime::ProfilingStrategy::PerfMap
            } else {
                wasmtime::ProfilingStrategy::None
            })
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| EngineError::Engine(e.into()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(EngineError::Ticker)?;
        let cache = ArtifactCache::new(settings.cache_dir.clone(), &engine, metrics.cache());
        Ok(Runtime {
            engine,
            cache: Arc::new(cache),
            ticker_stop,
            fuel: settings.fuel,
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.cache)
            .finish()
    }
}
