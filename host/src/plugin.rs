//! Stage plugins: compiling, checking, instantiating and calling WebAssembly
//! components of the `orchestrator:pipeline/stage` world.
//!
//! # Lifecycle
//!
//! 1. **Engine** ([`Runtime::new`]): one wasmtime [`Engine`] for the
//!    process, with the component model, the pooling instance allocator
//!    (slots sized from the configuration), epoch interruption driven by a
//!    ticker thread, and component-model concurrency off (it triples the cost
//!    of small calls and no plugin uses async).
//! 2. **Prepare** ([`Runtime::load`]): the component bytes are hashed
//!    (sha256), compiled — or deserialized from the on-disk artifact cache,
//!    keyed by that hash and the engine's configuration — and their imports
//!    are checked against the stage's grants, so that a plugin importing
//!    something it was not granted fails *here*, with a message naming the
//!    grant, rather than trapping at its first call.
//! 3. **Link**: a per-stage [`Linker`] holds WASI p2 (whose context grants
//!    nothing but clocks and randomness unless configured), the `log` import
//!    and, only for stages granted it, the `inference` import. The linker is
//!    resolved against the component once, into a pre-instantiated component
//!    of the `streaming-stage` world if it exports `process-chunk`, else of
//!    the plain `stage` world (a component of neither is refused).
//! 4. **Validate**: one instance is created and its `init` run with the
//!    stage's configuration. A plugin whose `init` fails is refused.
//! 5. **Instantiate** ([`Plugin::instantiate`]): each worker makes a [`Store`]
//!    with its own WASI context and memory limits and instantiates from the
//!    pre-instantiated component (a pooled slot: a few microseconds), then
//!    runs `init`.
//! 6. **Call** ([`Instance::process`]): the epoch deadline and the fuel
//!    budget are armed, then, by the component's world: *by value*
//!    (`stage`, `streaming-stage`) the envelope is copied in, the result
//!    copied out and its size checked against the stage's output cap; *by
//!    handle* (`request-stage`, `streaming-request-stage`) the envelope is
//!    moved into the store's resource table and lent to the guest as a
//!    `request`, whose getters and setters copy single fields (each setter
//!    checked against the output cap), and moved back when the call ends.
//!    The world is detected at load, from the component's exports.
//!
//! # Deadlines
//!
//! A call has two clocks, because neither covers every case alone. Epoch
//! interruption traps a guest that computes past its deadline (an endless
//! loop), but cannot stop a guest blocked *inside a host call* — a WASI
//! sleep, say. So calls are made with wasmtime's async API and bounded by a
//! host-side deadline as well ([`within`]): when it passes, the call's
//! future is dropped, which abandons the blocked host call. Either way the
//! call fails with `timeout` and the instance is discarded. The host-side
//! timer is armed only if the call actually waits on the host (its future
//! returns `Pending`): a call that runs straight through — every call of
//! a stage without inference — never touches tokio's timer wheel, which
//! saved ~0.3–0.7 µs per call in `benches/stages.rs`.
//!
//! # Resource caps
//!
//! Linear memory is capped per instance (`max_memory_bytes`, enforced by a
//! `StoreLimits` that traps on a refused `memory.grow`, so the failure is
//! reported as `memory` rather than as whatever the guest's allocator does
//! on out-of-memory); tables, instances and memories per store are capped
//! too. The result of a call is lifted out of guest memory, so the host's
//! allocation for it is bounded by that cap; results larger than the
//! stage's `max_output_bytes` are then refused as `output_too_large`.
//! Optional fuel (`fuel`) bounds the instructions one call may execute,
//! independent of wall time.
//!
//! # Failure modes
//!
//! Loading fails with a [`LoadError`] that says what is wrong with the bytes
//! (not wasm, a core module instead of a component, wrong world, missing
//! grant, failing `init`). A call fails with a [`CallError`] whose
//! [`ErrorType`] is the `error_type` metric label; after a host-side failure
//! (trap, timeout, memory cap) the instance is poisoned and must be dropped.

use std::fmt;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntGauge;
use sha2::{Digest, Sha256};
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::config::{Config, PluginSource, StageConfig};
use crate::inference::{BackendError, Backends, GenerateRequest, TokenStream};
use crate::metrics::ErrorType;
use crate::versions::CallLedger;

/// Host bindings generated from `wit/pipeline.wit`: the `streaming-stage`
/// world here, and the plain `stage` world in [`bindings::plain`], sharing
/// the interfaces' types.
pub mod bindings {
    wasmtime::component::bindgen!({
        world: "streaming-stage",
        path: "../wit",
        // Calls into the guest are async so that a call blocked in a host
        // function (a WASI sleep, a slow backend) can be abandoned at its
        // deadline. The inference functions are async on the host: they
        // wait for the network.
        exports: { default: async },
        imports: { "orchestrator:pipeline/inference": async },
    });

    /// The `streaming-request-stage` world (the request by handle, since
    /// 0.1.2), and the `request-stage` world in [`handle::plain`].
    pub mod handle {
        wasmtime::component::bindgen!({
            world: "streaming-request-stage",
            path: "../wit",
            exports: { default: async },
            // A request method called with a handle that is not the one
            // the call was given traps instead of answering.
            imports: { "orchestrator:pipeline/request": trappable },
            with: {
                "orchestrator:pipeline/types": super::orchestrator::pipeline::types,
                "orchestrator:pipeline/log": super::orchestrator::pipeline::log,
                "orchestrator:pipeline/inference": super::orchestrator::pipeline::inference,
                "orchestrator:pipeline/streaming": super::orchestrator::pipeline::streaming,
                // The host keeps the request as the envelope itself, in the
                // store's resource table for the duration of a call.
                "orchestrator:pipeline/request.request": super::orchestrator::pipeline::types::Envelope,
            },
        });

        /// The `request-stage` world.
        pub mod plain {
            wasmtime::component::bindgen!({
                world: "request-stage",
                path: "../wit",
                exports: { default: async },
                with: {
                    "orchestrator:pipeline/types": super::super::orchestrator::pipeline::types,
                    "orchestrator:pipeline/log": super::super::orchestrator::pipeline::log,
                    "orchestrator:pipeline/inference": super::super::orchestrator::pipeline::inference,
                    "orchestrator:pipeline/request": super::orchestrator::pipeline::request,
                },
            });
        }
    }

    /// The plain `stage` world.
    pub mod plain {
        wasmtime::component::bindgen!({
            world: "stage",
            path: "../wit",
            exports: { default: async },
            with: {
                "orchestrator:pipeline/types": super::orchestrator::pipeline::types,
                "orchestrator:pipeline/log": super::orchestrator::pipeline::log,
                "orchestrator:pipeline/inference": super::orchestrator::pipeline::inference,
            },
        });
    }
}

use bindings::handle::orchestrator::pipeline::request;
use bindings::handle::plain::{RequestStage, RequestStagePre};
use bindings::handle::{StreamingRequestStage, StreamingRequestStagePre};
pub use bindings::orchestrator::pipeline::streaming::{ChunkContext, ChunkOutput};
pub use bindings::orchestrator::pipeline::types::{
    Envelope, GenerationParams, Message, Passage, StageError, Usage,
};
use bindings::orchestrator::pipeline::{inference, log, streaming, types};
use bindings::plain::{Stage, StagePre};
use bindings::{StreamingStage, StreamingStagePre};

/// How often the epoch ticker advances the engine's epoch: the resolution
/// of plugin-call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Interface name prefix of this package's imports.
const PACKAGE: &str = "orchestrator:pipeline/";

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The plugin file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bytes are not WebAssembly.
    #[error("not a WebAssembly file (it starts with {0:02x?}, not \\0asm)")]
    NotWasm(Vec<u8>),
    /// A core module was given where a component is needed.
    #[error(
        "a core WebAssembly module, not a component: build the plugin with `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// wasmtime refused to compile the component.
    #[error("invalid component: {0}")]
    Compile(String),
    /// The component imports something its stage is not granted.
    #[error("the plugin imports `{import}`, which this stage is not granted: {remedy}")]
    NotGranted {
        /// The import's name.
        import: String,
        /// What would grant it, if anything can.
        remedy: String,
    },
    /// The component does not implement the `stage` world.
    #[error("the component does not implement the orchestrator:pipeline/stage world: {0}")]
    WrongWorld(String),
    /// The validation instance could not be created.
    #[error("cannot instantiate: {0}")]
    Instantiate(String),
    /// The plugin's `init` refused the configuration or failed.
    #[error("init failed: {0}")]
    Init(String),
}

/// Why a plugin call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", error_type.label())]
pub struct CallError {
    /// The cause, as the metrics label.
    pub error_type: ErrorType,
    /// A human-readable description.
    pub message: String,
}

impl CallError {
    pub(crate) fn new(error_type: ErrorType, message: impl Into<String>) -> CallError {
        CallError {
            error_type,
            message: message.into(),
        }
    }

    /// Whether the instance that produced this error must be discarded:
    /// after a trap its state is undefined, and an instance that built an
    /// oversized result holds that memory until it is dropped.
    pub fn poisons_instance(&self) -> bool {
        matches!(
            self.error_type,
            ErrorType::Trap
                | ErrorType::Timeout
                | ErrorType::Memory
                | ErrorType::Fuel
                | ErrorType::OutputTooLarge
                | ErrorType::Instantiate
        )
    }
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
    engine: Engine,
    cache: Arc<ArtifactCache>,
    ticker_stop: Arc<AtomicBool>,
    fuel: bool,
}

impl Runtime {
    /// Create the engine (see the module docs for its configuration).
    pub fn new(settings: &EngineSettings) -> anyhow::Result<Runtime> {
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
            // the first 4 MiB are reset, and they stay resident: a fresh
            // noop instance + call went from ~47 µs to ~29 µs in
            // benches/stages.rs. Memory beyond 4 MiB (a memory bomb, say)
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
        let engine = Engine::new(&config)
            .map_err(|e| anyhow::anyhow!("cannot create the wasm engine: {e}"))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.clone(), ticker_stop.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })?;
        let cache = ArtifactCache::new(settings.cache_dir.clone(), &engine);
        Ok(Runtime {
            engine,
            cache: Arc::new(cache),
            ticker_stop,
            fuel: settings.fuel,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Read a plugin's bytes from its source.
    pub fn read_source(source: &PluginSource, stage: &str) -> Result<Vec<u8>, LoadError> {
        match source {
            PluginSource::Bundled => Ok(crate::bundled::plugin(stage).unwrap_or_default().to_vec()),
            PluginSource::File(path) => std::fs::read(path).map_err(|source| LoadError::Read {
                path: path.clone(),
                source,
            }),
            PluginSource::Upload => Err(LoadError::NotWasm(Vec::new())),
        }
    }

    /// Prepare, link and validate a plugin for `stage` (lifecycle steps
    /// 2–4). Compilation runs on the blocking thread pool. Returns the
    /// plugin and whether its compiled artifact came from the cache.
    pub async fn load(
        &self,
        stage: &StageConfig,
        source: PluginSource,
        bytes: Vec<u8>,
        services: &HostServices,
    ) -> Result<(Arc<Plugin>, bool), LoadError> {
        let started = Instant::now();
        let sha256 = hex::encode(Sha256::digest(&bytes));
        check_header(&bytes)?;
        let (engine, cache, key) = (self.engine.clone(), self.cache.clone(), sha256.clone());
        let (component, cached) =
            tokio::task::spawn_blocking(move || cache.component(&engine, &bytes, &key))
                .await
                .map_err(|e| LoadError::Compile(format!("compilation panicked: {e}")))??;
        check_imports(&component, &self.engine, stage)?;

        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| LoadError::Instantiate(e.to_string()))?;
        log::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| LoadError::Instantiate(e.to_string()))?;
        request::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| LoadError::Instantiate(e.to_string()))?;
        if stage.capabilities.inference {
            inference::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
                .map_err(|e| LoadError::Instantiate(e.to_string()))?;
        }
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        // The world is told by the exports' types: `process` taking a
        // `request` handle or an envelope, with or without `process-chunk`.
        let pre = if let Ok(pre) = StreamingRequestStagePre::new(instance_pre.clone()) {
            Pre::StreamingRequest(pre)
        } else if let Ok(pre) = RequestStagePre::new(instance_pre.clone()) {
            Pre::Request(pre)
        } else if let Ok(pre) = StreamingStagePre::new(instance_pre.clone()) {
            Pre::Streaming(pre)
        } else {
            Pre::Plain(
                StagePre::new(instance_pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?,
            )
        };

        let calls = services.ledger.counter(&sha256);
        let plugin = Arc::new(Plugin {
            stage: stage.name,
            sha256,
            source,
            loaded_at: SystemTime::now(),
            pre,
            settings: stage.clone(),
            init_config: stage
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: services.clone(),
            fuel: self.fuel,
            calls,
        });
        // Validation: one instance must come up and accept its config.
        plugin.instantiate().await.map_err(|e| match e.error_type {
            ErrorType::Config => LoadError::Init(e.message),
            _ => LoadError::Instantiate(e.to_string()),
        })?;
        tracing::info!(
            stage = stage.name,
            source = %plugin.source,
            sha256 = %plugin.sha256,
            cached,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin loaded"
        );
        Ok((plugin, cached))
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
            .field("cache", &self.cache.dir)
            .finish()
    }
}

/// What the host provides to a stage's instances: the backends behind the
/// `inference` import (for stages granted it) and the metric handles the
/// instances update.
#[derive(Clone)]
pub struct HostServices {
    /// The inference backends, for stages granted `inference`.
    pub backends: Option<Backends>,
    /// `orchestrator_plugin_instances{stage}`: live instances of the stage.
    pub instances: IntGauge,
    /// Calls served, per version of the stage.
    pub ledger: Arc<CallLedger>,
}

fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm(bytes.iter().take(4).copied().collect()));
    }
    // Bytes 4..8: version and layer; layer 0 is a core module.
    if bytes.get(6..8) == Some(&[0, 0]) {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

/// Refuse imports the stage's grants cannot satisfy, naming the grant.
fn check_imports(
    component: &Component,
    engine: &Engine,
    stage: &StageConfig,
) -> Result<(), LoadError> {
    for (name, item) in component.component_type().imports(engine) {
        // A type (the `request` resource that a `request-stage` world's
        // export names) grants nothing.
        if matches!(item.ty, ComponentItem::Type(_) | ComponentItem::Resource(_)) {
            continue;
        }
        let interface = name.split('@').next().unwrap_or(name);
        let refusal = if interface == format!("{PACKAGE}inference") && !stage.capabilities.inference
        {
            Some(format!(
                "set `capabilities = {{ inference = true }}` under [stages.{}] to grant it",
                stage.name
            ))
        } else if interface.starts_with("wasi:sockets/") && interface != "wasi:sockets/network" {
            Some("plugins get no network access".to_string())
        } else if interface.starts_with("wasi:http/") {
            Some("plugins get no HTTP access".to_string())
        } else if !interface.starts_with("wasi:") && !interface.starts_with(PACKAGE) {
            Some(
                "the host provides only WASI 0.2 and the orchestrator:pipeline interfaces"
                    .to_string(),
            )
        } else {
            None
        };
        if let Some(remedy) = refusal {
            return Err(LoadError::NotGranted {
                import: name.to_string(),
                remedy,
            });
        }
    }
    Ok(())
}

/// The identity of a plugin version, as reported by `/health` and the
/// admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginVersion {
    /// sha256 of the component.
    pub sha256: String,
    /// `bundled`, a file path, or `upload`.
    pub source: String,
    /// Unix time of loading, in seconds.
    pub loaded_at: u64,
}

/// A component linked for a stage, by world.
enum Pre {
    Plain(StagePre<HostState>),
    Streaming(StreamingStagePre<HostState>),
    Request(RequestStagePre<HostState>),
    StreamingRequest(StreamingRequestStagePre<HostState>),
}

/// A live instance's exports, by world.
enum Exports {
    Plain(Stage),
    Streaming(StreamingStage),
    Request(RequestStage),
    StreamingRequest(StreamingRequestStage),
}

/// A loaded, validated plugin version: the unit a stage runs and swaps.
pub struct Plugin {
    stage: &'static str,
    sha256: String,
    source: PluginSource,
    loaded_at: SystemTime,
    pre: Pre,
    settings: StageConfig,
    init_config: Vec<(String, String)>,
    services: HostServices,
    fuel: bool,
    calls: Arc<AtomicU64>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("stage", &self.stage)
            .field("sha256", &self.sha256)
            .field("source", &self.source)
            .finish()
    }
}

impl Plugin {
    /// The stage it serves.
    pub fn stage(&self) -> &'static str {
        self.stage
    }

    /// Count one request served by this version through its chunk path
    /// (the per-version call count of the admin API counts requests).
    pub(crate) fn count_streamed_request(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether it is a streaming component (`streaming-stage` or
    /// `streaming-request-stage`: it exports `process-chunk`).
    pub fn streams(&self) -> bool {
        matches!(self.pre, Pre::Streaming(_) | Pre::StreamingRequest(_))
    }

    /// Hex sha256 of the component bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Where it was loaded from.
    pub fn source(&self) -> &PluginSource {
        &self.source
    }

    /// When it was loaded.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }

    /// Its identity, for `/health` and the admin API.
    pub fn describe(&self) -> PluginVersion {
        PluginVersion {
            sha256: self.sha256.clone(),
            source: self.source.to_string(),
            loaded_at: self
                .loaded_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn wasi_ctx(&self) -> Result<WasiCtx, CallError> {
        let caps = &self.settings.capabilities;
        let mut builder = WasiCtxBuilder::new();
        builder
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for name in &caps.env {
            if let Ok(value) = std::env::var(name) {
                builder.env(name, value);
            }
        }
        for dir in &caps.dirs {
            let perms = if dir.writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            builder
                .preopened_dir(&dir.host, &dir.guest, perms)
                .map_err(|e| {
                    CallError::new(
                        ErrorType::Config,
                        format!("cannot open granted directory {}: {e}", dir.host.display()),
                    )
                })?;
        }
        Ok(builder.build())
    }

    /// The stage settings it was loaded with.
    pub fn settings(&self) -> &StageConfig {
        &self.settings
    }

    /// Create an instance and run its `init` (lifecycle step 5).
    pub async fn instantiate(self: &Arc<Self>) -> Result<Instance, CallError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.settings.max_memory_bytes)
            .trap_on_grow_failure(true)
            .instances(32)
            .tables(32)
            .memories(4)
            .table_elements(100_000)
            .build();
        let state = HostState {
            wasi: self.wasi_ctx()?,
            table: ResourceTable::new(),
            limits,
            stage: self.stage,
            services: self.services.clone(),
            log_budget: LogBudget::new(),
            deadline: Instant::now(),
            request_deadline: None,
            stream: None,
            backend_error: None,
            request: None,
        };
        let engine = match &self.pre {
            Pre::Plain(pre) => pre.engine(),
            Pre::Streaming(pre) => pre.engine(),
            Pre::Request(pre) => pre.engine(),
            Pre::StreamingRequest(pre) => pre.engine(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limits);
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        self.arm(&mut store, timeout)?;
        let deadline = store.data().deadline + HOST_CALL_GRACE;
        let setup = async {
            let instantiate = |e| classify(e, ErrorType::Instantiate, timeout);
            let (bindings, init) = match &self.pre {
                Pre::Plain(pre) => {
                    let b = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(instantiate)?;
                    let init = b.call_init(&mut store, &self.init_config).await;
                    (Exports::Plain(b), init)
                }
                Pre::Streaming(pre) => {
                    let b = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(instantiate)?;
                    let init = b.call_init(&mut store, &self.init_config).await;
                    (Exports::Streaming(b), init)
                }
                Pre::Request(pre) => {
                    let b = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(instantiate)?;
                    let init = b.call_init(&mut store, &self.init_config).await;
                    (Exports::Request(b), init)
                }
                Pre::StreamingRequest(pre) => {
                    let b = pre
                        .instantiate_async(&mut store)
                        .await
                        .map_err(instantiate)?;
                    let init = b.call_init(&mut store, &self.init_config).await;
                    (Exports::StreamingRequest(b), init)
                }
            };
            init.map_err(instantiate)?
                .map_err(|message| CallError::new(ErrorType::Config, message))?;
            Ok::<_, CallError>(bindings)
        };
        let bindings = within(deadline, std::pin::pin!(setup))
            .await
            .ok_or_else(|| timed_out(timeout))??;
        self.services.instances.inc();
        Ok(Instance {
            store,
            bindings,
            plugin: self.clone(),
            calls: 0,
        })
    }

    /// Arm the epoch deadline and the fuel budget for one call.
    fn arm(&self, store: &mut Store<HostState>, timeout: Duration) -> Result<(), CallError> {
        let ticks = timeout.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64;
        // One extra tick: the ticker may advance right after arming.
        store.set_epoch_deadline(ticks + 1);
        store.epoch_deadline_trap();
        store.data_mut().deadline = Instant::now() + timeout;
        if self.fuel {
            store
                .set_fuel(self.settings.fuel.unwrap_or(u64::MAX))
                .map_err(|e| CallError::new(ErrorType::Instantiate, e.to_string()))?;
        }
        Ok(())
    }
}

/// Run `future` until it finishes or `deadline` passes (then `None`).
///
/// Like `tokio::time::timeout_at`, except that the timer is created only
/// when `future` first returns `Pending`: a future that completes on its
/// first poll costs no timer registration and no allocation. `future` is
/// taken pinned (`std::pin::pin!` at the caller) so that it is not moved
/// again: a component call's future is large enough for the copies to show.
async fn within<F: Future + Unpin>(deadline: Instant, mut future: F) -> Option<F::Output> {
    let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(output) = std::pin::Pin::new(&mut future).poll(cx) {
            return std::task::Poll::Ready(Some(output));
        }
        timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())))
            .as_mut()
            .poll(cx)
            .map(|()| None)
    })
    .await
}

/// How long past a call's deadline its host-side deadline fires: the epoch
/// deadline should win for guest code (it reports a precise trap), the
/// timeout only catches calls stuck in the host.
const HOST_CALL_GRACE: Duration = Duration::from_millis(20);

fn timed_out(timeout: Duration) -> CallError {
    CallError::new(
        ErrorType::Timeout,
        format!("deadline of {} ms exceeded", timeout.as_millis()),
    )
}

/// Total bytes of the strings in an envelope: what a stage returns.
pub fn envelope_bytes(envelope: &Envelope) -> usize {
    envelope.request_id.len()
        + envelope
            .messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum::<usize>()
        + envelope.params.model.len()
        + envelope.params.stop.iter().map(String::len).sum::<usize>()
        + envelope
            .passages
            .iter()
            .map(|p| p.source.len() + p.text.len())
            .sum::<usize>()
        + envelope.prompt.len()
        + envelope.completion.len()
        + envelope.finish_reason.len()
        + envelope.chunks.iter().map(String::len).sum::<usize>()
        + envelope
            .metadata
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// Map a wasmtime error from a call into a [`CallError`].
fn classify(error: wasmtime::Error, default: ErrorType, timeout: Duration) -> CallError {
    let message = format!("{error:#}");
    let error_type = match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return timed_out(timeout),
        Some(Trap::OutOfFuel) => return CallError::new(ErrorType::Fuel, "fuel budget exhausted"),
        Some(_) => ErrorType::Trap,
        None if message.contains("forcing trap when growing memory")
            || message.contains("forcing a memory growth failure") =>
        {
            ErrorType::Memory
        }
        None => default,
    };
    CallError::new(error_type, message)
}

/// A live plugin instance with its store.
pub struct Instance {
    store: Store<HostState>,
    bindings: Exports,
    plugin: Arc<Plugin>,
    calls: u64,
}

impl Instance {
    /// The plugin version it runs.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Calls served so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// Call `process` with a deadline of `timeout`.
    ///
    /// On success `envelope` holds what the stage made of it. On failure
    /// its content is unspecified (a stage working through a `request`
    /// handle may have set some fields before it failed), apart from the
    /// request id, which no stage can change through a handle.
    pub async fn process(
        &mut self,
        envelope: &mut Envelope,
        timeout: Duration,
    ) -> Result<(), CallError> {
        self.calls += 1;
        self.plugin.calls.fetch_add(1, Ordering::Relaxed);
        self.plugin.arm(&mut self.store, timeout)?;
        let by_handle = matches!(
            self.bindings,
            Exports::Request(_) | Exports::StreamingRequest(_)
        );
        let cap = self.plugin.settings.max_output_bytes;
        let state = self.store.data_mut();
        state.stream = None;
        state.backend_error = None;
        let deadline = state.deadline + HOST_CALL_GRACE;
        // By handle: the envelope moves into the store's resource table for
        // the call (no copy) and is taken back after it, however it ended.
        let handle = if by_handle {
            let envelope = std::mem::replace(envelope, Envelope::placeholder());
            state.request = Some(RequestBudget::new(&envelope, cap));
            let handle = state.table.push(envelope).map_err(|e| {
                CallError::new(
                    ErrorType::Trap,
                    format!("cannot hand over the request: {e}"),
                )
            })?;
            Some(handle)
        } else {
            None
        };
        let borrowed = handle.as_ref().map(|h| Resource::new_borrow(h.rep()));
        let (store, bindings) = (&mut self.store, &self.bindings);
        let input: &Envelope = envelope;
        let call = async move {
            match (bindings, borrowed) {
                (Exports::Plain(b), _) => b.call_process(store, input).await.map(|r| r.map(Some)),
                (Exports::Streaming(b), _) => {
                    b.call_process(store, input).await.map(|r| r.map(Some))
                }
                (Exports::Request(b), Some(request)) => b
                    .call_process(store, request)
                    .await
                    .map(|r| r.map(|()| None)),
                (Exports::StreamingRequest(b), Some(request)) => b
                    .call_process(store, request)
                    .await
                    .map(|r| r.map(|()| None)),
                (Exports::Request(_) | Exports::StreamingRequest(_), None) => {
                    unreachable!("a handle is made for every by-handle call")
                }
            }
        };
        let result = { within(deadline, std::pin::pin!(call)).await };
        let mut over_cap = None;
        if let Some(handle) = handle {
            let state = self.store.data_mut();
            over_cap = state.request.take().and_then(|budget| budget.exceeded);
            *envelope = state.table.delete(handle).map_err(|e| {
                CallError::new(
                    ErrorType::Trap,
                    format!("cannot take back the request: {e}"),
                )
            })?;
        }
        if let Some(size) = over_cap {
            return Err(CallError::new(
                ErrorType::OutputTooLarge,
                format!("the stage set {size} bytes; its max_output_bytes is {cap}"),
            ));
        }
        match result {
            None => return Err(timed_out(timeout)),
            Some(Err(error)) => return Err(classify(error, ErrorType::Trap, timeout)),
            Some(Ok(Err(error))) => return Err(self.stage_error(error)),
            Some(Ok(Ok(Some(output)))) => *envelope = output,
            // Checked as it was set.
            Some(Ok(Ok(None))) => return Ok(()),
        }
        let size = envelope_bytes(envelope);
        if size > cap {
            return Err(CallError::new(
                ErrorType::OutputTooLarge,
                format!("the stage returned {size} bytes; its max_output_bytes is {cap}"),
            ));
        }
        Ok(())
    }
}

impl Instance {
    /// The [`CallError`] of a stage's typed error. An `upstream` error
    /// takes the class of the backend failure behind it, if there was one.
    fn stage_error(&mut self, error: StageError) -> CallError {
        match error {
            StageError::InvalidInput(m) => CallError::new(ErrorType::InvalidInput, m),
            StageError::Config(m) => CallError::new(ErrorType::Config, m),
            StageError::Upstream(m) => {
                let class = self.store.data_mut().backend_error.take();
                CallError::new(class.unwrap_or(ErrorType::Upstream), m)
            }
            StageError::PluginError(m) => CallError::new(ErrorType::PluginError, m),
        }
    }

    /// Tell the instance when the request being processed must be
    /// answered: a generation started with `generate-stream` may run until
    /// then (by default, until the call's own deadline).
    pub fn set_request_deadline(&mut self, deadline: Instant) {
        self.store.data_mut().request_deadline = Some(deadline);
    }

    /// The generation the last `process` call started with
    /// `inference.generate-stream`, if any.
    pub fn take_stream(&mut self) -> Option<TokenStream> {
        self.store.data_mut().stream.take()
    }

    /// Call `process-chunk` with a deadline of `timeout`. The emitted text
    /// and the carry count against the stage's `max_output_bytes`.
    pub async fn process_chunk(
        &mut self,
        context: &ChunkContext,
        carry: &str,
        delta: &str,
        last: bool,
        timeout: Duration,
    ) -> Result<ChunkOutput, CallError> {
        if !matches!(
            self.bindings,
            Exports::Streaming(_) | Exports::StreamingRequest(_)
        ) {
            return Err(CallError::new(
                ErrorType::PluginError,
                "the stage's plugin does not export process-chunk",
            ));
        }
        self.calls += 1;
        self.plugin.arm(&mut self.store, timeout)?;
        let state = self.store.data_mut();
        state.backend_error = None;
        let deadline = state.deadline + HOST_CALL_GRACE;
        let (store, bindings) = (&mut self.store, &self.bindings);
        let call = async move {
            match bindings {
                Exports::Streaming(b) => {
                    b.call_process_chunk(store, context, carry, delta, last)
                        .await
                }
                Exports::StreamingRequest(b) => {
                    b.call_process_chunk(store, context, carry, delta, last)
                        .await
                }
                Exports::Plain(_) | Exports::Request(_) => {
                    unreachable!("checked above: the plugin streams")
                }
            }
        };
        let result = { within(deadline, std::pin::pin!(call)).await };
        let output = match result {
            None => return Err(timed_out(timeout)),
            Some(Err(error)) => return Err(classify(error, ErrorType::Trap, timeout)),
            Some(Ok(Err(error))) => return Err(self.stage_error(error)),
            Some(Ok(Ok(output))) => output,
        };
        // Generations start only in `process`; one started here is cancelled.
        self.store.data_mut().stream = None;
        let size = output.carry.len() + output.emit.iter().map(String::len).sum::<usize>();
        let cap = self.plugin.settings.max_output_bytes;
        if size > cap {
            return Err(CallError::new(
                ErrorType::OutputTooLarge,
                format!(
                    "the stage returned {size} bytes for one chunk; its max_output_bytes is {cap}"
                ),
            ));
        }
        Ok(output)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.plugin.services.instances.dec();
    }
}

/// The data of each plugin store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    stage: &'static str,
    services: HostServices,
    log_budget: LogBudget,
    deadline: Instant,
    /// When the request as a whole must be answered, if the caller said:
    /// a streamed generation outlives the call that started it.
    request_deadline: Option<Instant>,
    /// A generation started by `generate-stream` in the current call.
    stream: Option<TokenStream>,
    /// The class of the backend failure the current call saw, if any.
    backend_error: Option<ErrorType>,
    /// The output budget of the request handed over by handle, during a
    /// `process` call of a `request-stage` plugin.
    request: Option<RequestBudget>,
}

/// What a stage working through a `request` handle has set, against its
/// `max_output_bytes`. A by-value stage's cap bounds the envelope it
/// returns, because all of it is copied out of the guest; through a handle
/// only what is set is copied out, so the cap bounds the bytes of the
/// fields set (each counted at its last value) plus all the notes. It is
/// checked at every setter, so a hostile guest cannot make the host hold
/// more than the cap (plus the one value being refused).
struct RequestBudget {
    cap: usize,
    /// Bytes of each field's last value set, by [`Field`].
    set: [usize; Field::COUNT],
    /// Bytes of all the notes (keys and values), kept up to date by
    /// `set-note`.
    note_bytes: usize,
    /// The total of the first setter that went over the cap.
    exceeded: Option<usize>,
}

/// The envelope fields a `request` handle can set (notes apart).
#[derive(Clone, Copy)]
enum Field {
    Messages,
    Params,
    Passages,
    Prompt,
    Completion,
    FinishReason,
    Chunks,
}

impl Field {
    const COUNT: usize = 7;
}

impl RequestBudget {
    fn new(envelope: &Envelope, cap: usize) -> RequestBudget {
        RequestBudget {
            cap,
            set: [0; Field::COUNT],
            note_bytes: envelope
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum(),
            exceeded: None,
        }
    }

    /// The bytes counted against the cap if `field` held `size` bytes and
    /// the notes `note_bytes`.
    fn total_with(&self, field: Option<(Field, usize)>, note_bytes: usize) -> usize {
        let mut set = self.set;
        if let Some((field, size)) = field {
            set[field as usize] = size;
        }
        set.iter().sum::<usize>() + note_bytes
    }

    /// Admit `field` at `size` bytes, or record the excess and return the
    /// error that ends the call.
    fn admit(&mut self, field: Field, size: usize) -> wasmtime::Result<()> {
        let total = self.total_with(Some((field, size)), self.note_bytes);
        if total > self.cap {
            return Err(self.exceed(total));
        }
        self.set[field as usize] = size;
        Ok(())
    }

    /// Record `size` as over the cap; the error that ends the call.
    fn exceed(&mut self, size: usize) -> wasmtime::Error {
        self.exceeded.get_or_insert(size);
        wasmtime::Error::msg(format!(
            "the stage set {size} bytes; its max_output_bytes is {}",
            self.cap
        ))
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl streaming::Host for HostState {}

impl request::Host for HostState {}

/// The `request` resource: the envelope in the store's resource table.
/// Getters copy one field out; setters check the field against the output
/// budget and replace it. A setter over budget records the size and traps,
/// which ends the call with `output_too_large`.
impl request::HostRequest for HostState {
    fn id(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.request_id.clone())
    }

    fn messages(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Message>> {
        Ok(self.table.get(&request)?.messages.clone())
    }

    fn set_messages(
        &mut self,
        request: Resource<Envelope>,
        messages: Vec<Message>,
    ) -> wasmtime::Result<()> {
        let size = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .sum();
        self.spend(Field::Messages, size)?;
        self.table.get_mut(&request)?.messages = messages;
        Ok(())
    }

    fn params(&mut self, request: Resource<Envelope>) -> wasmtime::Result<GenerationParams> {
        Ok(self.table.get(&request)?.params.clone())
    }

    fn set_params(
        &mut self,
        request: Resource<Envelope>,
        params: GenerationParams,
    ) -> wasmtime::Result<()> {
        let size = params.model.len() + params.stop.iter().map(String::len).sum::<usize>();
        self.spend(Field::Params, size)?;
        self.table.get_mut(&request)?.params = params;
        Ok(())
    }

    fn passages(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<Passage>> {
        Ok(self.table.get(&request)?.passages.clone())
    }

    fn set_passages(
        &mut self,
        request: Resource<Envelope>,
        passages: Vec<Passage>,
    ) -> wasmtime::Result<()> {
        self.spend(
            Field::Passages,
            passages.iter().map(|p| p.source.len() + p.text.len()).sum(),
        )?;
        self.table.get_mut(&request)?.passages = passages;
        Ok(())
    }

    fn prompt(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.prompt.clone())
    }

    fn set_prompt(&mut self, request: Resource<Envelope>, prompt: String) -> wasmtime::Result<()> {
        self.spend(Field::Prompt, prompt.len())?;
        self.table.get_mut(&request)?.prompt = prompt;
        Ok(())
    }

    fn completion(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.completion.clone())
    }

    fn set_completion(
        &mut self,
        request: Resource<Envelope>,
        completion: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Completion, completion.len())?;
        self.table.get_mut(&request)?.completion = completion;
        Ok(())
    }

    fn finish_reason(&mut self, request: Resource<Envelope>) -> wasmtime::Result<String> {
        Ok(self.table.get(&request)?.finish_reason.clone())
    }

    fn set_finish_reason(
        &mut self,
        request: Resource<Envelope>,
        reason: String,
    ) -> wasmtime::Result<()> {
        self.spend(Field::FinishReason, reason.len())?;
        self.table.get_mut(&request)?.finish_reason = reason;
        Ok(())
    }

    fn chunks(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<String>> {
        Ok(self.table.get(&request)?.chunks.clone())
    }

    fn set_chunks(
        &mut self,
        request: Resource<Envelope>,
        chunks: Vec<String>,
    ) -> wasmtime::Result<()> {
        self.spend(Field::Chunks, chunks.iter().map(String::len).sum())?;
        self.table.get_mut(&request)?.chunks = chunks;
        Ok(())
    }

    fn usage(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Usage> {
        Ok(self.table.get(&request)?.usage)
    }

    fn set_usage(&mut self, request: Resource<Envelope>, usage: Usage) -> wasmtime::Result<()> {
        self.table.get_mut(&request)?.usage = usage;
        Ok(())
    }

    fn metadata(&mut self, request: Resource<Envelope>) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.table.get(&request)?.metadata.clone())
    }

    fn note(
        &mut self,
        request: Resource<Envelope>,
        key: String,
    ) -> wasmtime::Result<Option<String>> {
        let envelope = self.table.get(&request)?;
        Ok(envelope
            .metadata
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone()))
    }

    fn set_note(
        &mut self,
        request: Resource<Envelope>,
        key: String,
        value: String,
    ) -> wasmtime::Result<()> {
        let metadata = &self.table.get(&request)?.metadata;
        let old = metadata
            .iter()
            .position(|(k, _)| *k == key)
            .map(|at| (at, key.len() + metadata[at].1.len()));
        let budget = self.budget()?;
        let notes = budget.note_bytes - old.map_or(0, |(_, size)| size) + key.len() + value.len();
        let total = budget.total_with(None, notes);
        if total > budget.cap {
            return Err(budget.exceed(total));
        }
        budget.note_bytes = notes;
        let metadata = &mut self.table.get_mut(&request)?.metadata;
        match old {
            Some((at, _)) => metadata[at].1 = value,
            None => metadata.push((key, value)),
        }
        Ok(())
    }

    fn drop(&mut self, _request: Resource<Envelope>) -> wasmtime::Result<()> {
        // The host lends the request and never gives it away, so a guest
        // never owns a handle to drop; the host takes the envelope back
        // from the table itself when the call ends.
        Ok(())
    }
}

impl HostState {
    /// The current call's request budget.
    fn budget(&mut self) -> wasmtime::Result<&mut RequestBudget> {
        self.request
            .as_mut()
            .ok_or_else(|| wasmtime::Error::msg("no request is being processed"))
    }

    /// Count `field` at `size` bytes against the budget.
    fn spend(&mut self, field: Field, size: usize) -> wasmtime::Result<()> {
        self.budget()?.admit(field, size)
    }
}

/// A token bucket bounding how fast one instance may log: a chatty plugin
/// loses its excess records (and the host says how many) instead of
/// flooding the host's log.
struct LogBudget {
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogBudget {
    const BURST: f64 = 100.0;
    const PER_SECOND: f64 = 50.0;

    fn new() -> LogBudget {
        LogBudget {
            tokens: Self::BURST,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Whether a record may be written now; `Some(n)` carries the count of
    /// records dropped since the last one written.
    fn take(&mut self) -> Option<u64> {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * Self::PER_SECOND;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            None
        }
    }
}

impl log::Host for HostState {
    fn emit(&mut self, level: log::Level, message: String, fields: Vec<(String, String)>) {
        let Some(dropped) = self.log_budget.take() else {
            return;
        };
        let stage = self.stage;
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(" ");
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "plugin", stage, dropped, %fields, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "plugin", stage, dropped, %fields, "{message}")
            }
        }
    }
}

impl HostState {
    /// When a backend call made by the current plugin call must give up:
    /// a little before the call's own deadline, so that the plugin gets the
    /// backend's error (`upstream_timeout`) before the epoch deadline traps
    /// it (`timeout`).
    fn backend_deadline(&self) -> Instant {
        self.deadline
            .checked_sub(2 * EPOCH_TICK + Duration::from_millis(5))
            .unwrap_or(self.deadline)
    }

    /// The backend request for a plugin's call, or why there is none.
    fn generation_request(
        &self,
        prompt: String,
        params: GenerationParams,
        deadline: Instant,
    ) -> Result<(Backends, GenerateRequest), String> {
        let backends = self
            .services
            .backends
            .clone()
            .ok_or_else(|| "inference is not granted to this stage".to_string())?;
        Ok((
            backends,
            GenerateRequest {
                prompt,
                model: params.model,
                max_tokens: params.max_tokens,
                temperature: params.temperature,
                stop: params.stop,
                deadline,
            },
        ))
    }
}

impl inference::Host for HostState {
    async fn generate(
        &mut self,
        prompt: String,
        params: GenerationParams,
    ) -> Result<inference::Generation, String> {
        let (backends, request) =
            self.generation_request(prompt, params, self.backend_deadline())?;
        let completion = backends.generate(request).await.map_err(|e| {
            self.backend_error = Some(e.error_type());
            e.to_string()
        })?;
        Ok(inference::Generation {
            text: completion.text,
            finish_reason: completion.finish_reason.to_string(),
            usage: Usage {
                prompt_tokens: completion.prompt_tokens,
                completion_tokens: completion.completion_tokens,
            },
        })
    }

    async fn generate_stream(
        &mut self,
        prompt: String,
        params: GenerationParams,
    ) -> Result<(), String> {
        if self.stream.is_some() {
            return Err("a generation was already started in this call".into());
        }
        // The call must return by its deadline (the first token must be in
        // by then); the generation may go on until the request's.
        let deadline = self.request_deadline.unwrap_or(self.deadline);
        let (backends, request) = self.generation_request(prompt, params, deadline)?;
        let backend = backends.route(&request.model).unwrap_or("?").to_string();
        let started =
            tokio::time::timeout_at(self.backend_deadline().into(), backends.stream(request))
                .await
                .unwrap_or_else(|_| {
                    Err(BackendError::Timeout {
                        backend,
                        reason: "no first token within the inference stage's deadline".into(),
                    })
                });
        let stream = started.map_err(|e| {
            self.backend_error = Some(e.error_type());
            e.to_string()
        })?;
        self.stream = Some(stream);
        Ok(())
    }
}

/// On-disk cache of compiled components.
///
/// Entries are named `<component sha256>-<engine hash>.cwasm`, where the
/// engine hash covers wasmtime's version and every compilation-relevant
/// setting, so a different engine never picks up a foreign artifact. Each
/// file starts with the sha256 of the artifact that follows; an entry whose
/// checksum does not match (truncated, corrupted) or that wasmtime refuses
/// to deserialize is recompiled and rewritten, never trusted. Writes go to a
/// temporary file renamed into place, so concurrent hosts sharing a cache
/// never see a half-written entry.
struct ArtifactCache {
    dir: Option<PathBuf>,
    engine_hash: String,
    write_lock: Mutex<()>,
}

/// Feeds `Hash` output into sha256, for a hash that is stable across runs.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ArtifactCache {
    fn new(dir: Option<PathBuf>, engine: &Engine) -> ArtifactCache {
        let mut hasher = Sha256Hasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        ArtifactCache {
            dir,
            engine_hash: hex::encode(&hasher.0.finalize()[..8]),
            write_lock: Mutex::new(()),
        }
    }

    fn path(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{}.cwasm", self.engine_hash)))
    }

    /// The compiled component, and whether it came from the cache.
    fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, bool), LoadError> {
        if let Some(path) = self.path(sha256)
            && let Some(component) = Self::read(engine, &path)
        {
            return Ok((component, true));
        }
        let artifact = engine
            .precompile_component(bytes)
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        // SAFETY: the artifact was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact) }
            .map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        if let Some(path) = self.path(sha256) {
            let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = Self::write(&path, &artifact) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the artifact cache");
            }
        }
        Ok((component, false))
    }

    fn read(engine: &Engine, path: &Path) -> Option<Component> {
        let data = std::fs::read(path).ok()?;
        let (checksum, artifact) = data.split_at_checked(32)?;
        if Sha256::digest(artifact).as_slice() != checksum {
            tracing::warn!(path = %path.display(), "corrupt artifact cache entry; recompiling");
            return None;
        }
        // SAFETY: the artifact was written by `write` below from the output
        // of `Engine::precompile_component` of an engine with the same
        // compatibility hash, and its checksum matches. wasmtime still
        // checks its version and settings and refuses a mismatch.
        match unsafe { Component::deserialize(engine, artifact) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "stale artifact cache entry; recompiling");
                None
            }
        }
    }

    fn write(path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("artifact"),
            std::process::id()
        ));
        let mut data = Vec::with_capacity(32 + artifact.len());
        data.extend_from_slice(&Sha256::digest(artifact));
        data.extend_from_slice(artifact);
        std::fs::write(&tmp, &data)?;
        std::fs::rename(&tmp, path)
    }
}

/// Envelope helpers.
impl Envelope {
    /// An empty envelope for `request_id` carrying `messages` and `params`.
    pub fn new(request_id: String, messages: Vec<Message>, params: GenerationParams) -> Envelope {
        Envelope {
            request_id,
            messages,
            params,
            passages: Vec::new(),
            prompt: String::new(),
            completion: String::new(),
            finish_reason: String::new(),
            chunks: Vec::new(),
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
            },
            metadata: Vec::new(),
        }
    }
}

impl Envelope {
    /// An envelope with nothing in it, allocating nothing.
    pub fn placeholder() -> Envelope {
        Envelope::new(
            String::new(),
            Vec::new(),
            GenerationParams {
                model: String::new(),
                max_tokens: 0,
                temperature: 0.0,
                stop: Vec::new(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadError::NotWasm(_))
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn log_budget_bounds_bursts() {
        let mut budget = LogBudget::new();
        let written = (0..1000).filter(|_| budget.take().is_some()).count();
        assert!((100..=110).contains(&written), "{written}");
    }
}
