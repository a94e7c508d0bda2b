//! A loaded plugin version ([`Plugin`]): the component linked for its
//! stage, with the settings its instances get, and what the host gives
//! them ([`HostServices`]).
//!
//! Owns a version's identity and the making of its instances' sandbox (the
//! WASI context of its grants, the store limits). Creating and calling
//! instances is [`super::instance`]'s; loading is [`super::load`]'s.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntGauge;
use wasmtime::component::{InstancePre, ResourceTable};
use wasmtime::{Store, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::bindings::{ExportIndices, World};
use super::engine::EpochTicker;
use super::error::CallError;
use super::host::{HostState, Limits, LogBudget};
use super::inspect::Inspection;
use crate::config::{PluginSource, StageConfig};
use crate::inference::Router;
use crate::metrics::ErrorType;
use crate::trace::Trace;

/// What the host provides to a stage's instances: the backends behind the
/// `inference` import (for stages granted it), the metric its instances
/// update, and the stage's per-version call counts.
#[derive(Clone)]
pub struct HostServices {
    /// The inference router, for stages granted `inference`.
    pub router: Option<Router>,
    /// `orchestrator_plugin_instances{stage}`: live instances of the stage.
    pub instances: IntGauge,
    /// Calls served, per version of the stage.
    pub ledger: Arc<CallLedger>,
}

/// One stage's call counters, one per version (component sha256) it has
/// run, shared by every loaded copy of that version: the admin API reports
/// how many calls each version served, across any number of swaps.
#[derive(Debug, Default)]
pub struct CallLedger {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl CallLedger {
    /// The counter of version `sha256` (created at 0).
    pub fn counter(&self, sha256: &str) -> Arc<AtomicU64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sha256.to_string())
            .or_default()
            .clone()
    }

    /// Calls served by version `sha256` so far.
    pub fn calls(&self, sha256: &str) -> u64 {
        self.counter(sha256).load(Ordering::Relaxed)
    }
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

/// A loaded, validated plugin version: the unit a stage runs and swaps.
pub struct Plugin {
    pub(super) stage: &'static str,
    pub(super) sha256: String,
    pub(super) source: PluginSource,
    pub(super) loaded_at: SystemTime,
    pub(super) pre: InstancePre<HostState>,
    pub(super) exports: ExportIndices,
    pub(super) settings: StageConfig,
    pub(super) init_config: Vec<(String, String)>,
    pub(super) services: HostServices,
    pub(super) fuel: bool,
    /// The engine's epoch ticker, kept running during this plugin's calls.
    pub(super) ticker: Arc<EpochTicker>,
    pub(super) calls: Arc<AtomicU64>,
    /// What one instance needs of the store's limits.
    pub(super) shape: StoreShape,
    /// The stores and headers the stage is granted, shared by its
    /// instances (made once, not per instance).
    pub(super) grants: Grants,
}

/// A stage's grants of stores and request headers, as its instances'
/// host functions check them.
pub(super) struct Grants {
    pub(super) stores: Arc<[String]>,
    /// Lower case.
    pub(super) headers: Arc<[String]>,
}

impl Grants {
    pub(super) fn of(settings: &StageConfig) -> Grants {
        let capabilities = &settings.capabilities;
        Grants {
            stores: capabilities.stores.iter().cloned().collect(),
            headers: capabilities
                .headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }
}

/// The store limits on core instances, tables and memories, derived from
/// the component ([`Inspection`]): exactly what one instantiation
/// creates, and never less than the limits every plugin had before they
/// were derived (32 instances, 32 tables, 4 memories). They bound what a
/// component can make at run time, not what it declares: a component is
/// compiled and checked by the host before any instance exists, so its
/// declared shape is the host's to allow. An 18 MB componentize-py
/// component needs more than 32 core instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct StoreShape {
    pub(super) core_instances: usize,
    pub(super) tables: usize,
    pub(super) memories: usize,
}

impl StoreShape {
    pub(super) fn of(inspection: &Inspection) -> StoreShape {
        let count = |n: u32, floor: usize| usize::try_from(n).unwrap_or(usize::MAX).max(floor);
        StoreShape {
            core_instances: count(inspection.core_instances, 32),
            tables: count(inspection.core_tables, 32),
            memories: count(inspection.core_memories, 4),
        }
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("stage", &self.stage)
            .field("sha256", &self.sha256)
            .field("source", &self.source)
            .field("world", &self.exports.world())
            .finish()
    }
}

impl Plugin {
    /// The stage it serves.
    pub fn stage(&self) -> &'static str {
        self.stage
    }

    /// The stage settings its instances get.
    pub fn settings(&self) -> &StageConfig {
        &self.settings
    }

    /// The world its component implements.
    pub fn world(&self) -> World {
        self.exports.world()
    }

    /// Whether it is a streaming component (it exports `process-chunk`).
    pub fn streams(&self) -> bool {
        self.world().streams()
    }

    /// Whether the plugin exports `finish` (a `finishing-*` world).
    pub fn finishes(&self) -> bool {
        self.world().finishes()
    }

    /// Hex sha256 of the component bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Count one request served by this version through its chunk path
    /// (the per-version call count of the admin API counts requests).
    pub fn count_streamed_request(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
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

    /// A store for one instance: a WASI context with exactly the stage's
    /// grants, and memory, table and instance limits.
    pub(super) fn store(&self) -> Result<Store<HostState>, CallError> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.settings.max_memory_bytes)
            .trap_on_grow_failure(true)
            .instances(self.shape.core_instances)
            .tables(self.shape.tables)
            .memories(self.shape.memories)
            .table_elements(100_000)
            .build();
        let state = HostState {
            wasi: self.wasi_ctx()?,
            table: ResourceTable::new(),
            limits: Limits::new(limits),
            stage: self.stage,
            router: self.services.router.clone(),
            stores: Arc::default(),
            holds: None,
            changed_store: None,
            store_handles: 0,
            granted_stores: self.grants.stores.clone(),
            granted_headers: self.grants.headers.clone(),
            granted_client_address: self.settings.capabilities.client_address,
            log_budget: LogBudget::new(),
            deadline: Instant::now(),
            request_deadline: None,
            client_streams: true,
            request_id: String::new(),
            trace: Trace::off(),
            backend_wait: Duration::ZERO,
            stream: None,
            backend_error: None,
            request: None,
            lent: None,
            panic: None,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| &mut state.limits);
        // Guest code reaches its epoch deadline at every tick of the ticker
        // while it runs: it then yields to the async runtime (calls run on
        // the runtime's threads, which other requests share) or, once the
        // call's deadline has passed, traps with `Trap::Interrupt`.
        store.epoch_deadline_callback(|store| {
            Ok(if Instant::now() >= store.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        Ok(store)
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
}
