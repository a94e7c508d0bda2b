//! Hot swap: loading, swapping in and rolling back a stage's plugin while
//! traffic flows ([`HotSwap`]).
//!
//! Owns which version each stage runs after startup, and the previous one
//! kept for rollback; it must not validate plugins itself (that is the
//! wasm runtime's load path) nor speak HTTP (see [`crate::http`]).
//!
//! # Lifecycle of a swap
//!
//! 1. **Validate** — the new bytes go through the whole load path of
//!    [`Runtime::load`]: they must be a component of a stage world, its
//!    imports must be satisfiable by the stage's grants, and one
//!    instance must come up and pass `init` with the stage's config.
//!    Compilation uses the artifact cache, so a version seen before costs a
//!    deserialization, not a compilation. A version that fails is refused
//!    with the reason, the old one keeps serving, and
//!    `orchestrator_plugin_reloads_total{stage,result="error"}` moves.
//! 2. **Publish** — the stage's [`Pipeline::swap`] replaces the active
//!    version atomically. Calls already running finish on the version they
//!    started on; every call after the swap uses the new version. Nothing
//!    pauses, and other stages are not touched.
//! 3. **Retire** — the previous version is kept for
//!    [`rollback`](HotSwap::rollback); the one before it is released. Its
//!    compiled code and pool slots are freed when its last instance is
//!    dropped: the stage's idle instances of it at the swap, those in a
//!    call when the call ends.
//!
//! Swaps, rollbacks and configuration reloads ([`super::reload`]) are
//! serialized: a swap never publishes a version loaded for settings a
//! reload has just replaced. Installing the bytes of the version already active is a
//! no-op (`unchanged: true`): nothing is reloaded and the rollback target is
//! kept.
//!
//! # Call accounting
//!
//! Each stage keeps a [`CallLedger`]: a call counter per component sha256,
//! shared by every loaded copy of that version, so `GET /admin/stages` can
//! report exactly how many calls each version served, across any number of
//! swaps.

use std::sync::Arc;
use std::time::Instant;

use prometheus::IntCounter;
use serde::Serialize;

use crate::config::{PluginSource, StageConfig};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::wasm::{
    CallLedger, HostServices, Instance, LoadError, Loaded, Plugin, PluginBytes, PluginVersion,
    Runtime,
};

/// Why a swap or rollback was refused.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// No such stage.
    #[error("no stage named `{0}`")]
    UnknownStage(String),
    /// The new version (or, for a rollback, the previous one) failed
    /// validation; the active one still serves.
    #[error("the version of stage `{stage}` to install was refused")]
    Invalid {
        /// The stage.
        stage: &'static str,
        /// What is wrong with the new version.
        #[source]
        error: LoadError,
    },
    /// There is no previous version to roll back to.
    #[error("stage `{0}` has no previous version to roll back to")]
    NoPrevious(&'static str),
}

/// One version, as reported by `GET /admin/stages`.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// Which version.
    #[serde(flatten)]
    pub version: PluginVersion,
    /// Calls served by this version (all loads of it) so far.
    pub calls: u64,
}

/// A stage's versions.
#[derive(Debug, Clone, Serialize)]
pub struct StageVersions {
    /// Stage name.
    pub stage: &'static str,
    /// The version serving now.
    pub active: VersionInfo,
    /// The version a rollback would restore.
    pub previous: Option<VersionInfo>,
}

/// The outcome of a swap or rollback.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    /// Stage name.
    pub stage: &'static str,
    /// sha256 of the version now active.
    pub sha256: String,
    /// sha256 of the version it replaced.
    pub previous_sha256: String,
    /// Whether the compiled artifact came from the cache (or, for a
    /// rollback, from memory).
    pub cached: bool,
    /// Time from receiving the bytes to the swap, in milliseconds.
    pub elapsed_ms: f64,
    /// The bytes were those of the active version: nothing was swapped,
    /// and the previous version (for rollback) is unchanged.
    pub unchanged: bool,
}

pub(super) struct Entry {
    settings: StageConfig,
    services: HostServices,
    /// Serializes swaps of this stage; holds the previous version.
    previous: tokio::sync::Mutex<Option<Arc<Plugin>>>,
    reload_ok: IntCounter,
    reload_error: IntCounter,
}

/// The version registry of every stage: swaps, rollbacks, status.
pub struct HotSwap {
    runtime: Arc<Runtime>,
    pipeline: Pipeline,
    metrics: Arc<Metrics>,
    /// One entry per stage in use; replaced by a reload.
    entries: std::sync::RwLock<Vec<Arc<Entry>>>,
    /// Held by each swap, rollback and reload.
    pub(super) serial: tokio::sync::Mutex<()>,
}

fn info(plugin: &Plugin, ledger: &CallLedger) -> VersionInfo {
    VersionInfo {
        version: plugin.describe(),
        calls: ledger.calls(plugin.sha256()),
    }
}

impl HotSwap {
    /// A registry over a running pipeline. `stages` pairs each stage's
    /// settings with the services its plugins were loaded with.
    pub fn new(
        runtime: Arc<Runtime>,
        pipeline: Pipeline,
        metrics: Arc<Metrics>,
        stages: Vec<(StageConfig, HostServices)>,
    ) -> HotSwap {
        let swap = HotSwap {
            runtime,
            pipeline,
            metrics,
            entries: std::sync::RwLock::new(Vec::new()),
            serial: tokio::sync::Mutex::new(()),
        };
        swap.sync(stages);
        swap
    }

    /// Take the stages of a new configuration: a stage whose settings are
    /// unchanged keeps its entry (its previous version for rollback, its
    /// call ledger); the others get new ones. Called by a reload, holding
    /// `serial`.
    pub(super) fn sync(&self, stages: Vec<(StageConfig, HostServices)>) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let next = stages
            .into_iter()
            .map(|(settings, services)| {
                if let Some(kept) = entries.iter().find(|e| e.settings == settings) {
                    return kept.clone();
                }
                let (ok, error) = self.metrics.reloads(settings.name());
                Arc::new(Entry {
                    settings,
                    services,
                    previous: tokio::sync::Mutex::new(None),
                    reload_ok: ok,
                    reload_error: error,
                })
            })
            .collect();
        *entries = next;
    }

    /// The services stage `name`'s plugins are loaded with, if it is in
    /// use with exactly `settings` (a reload loads with them, so the call
    /// ledger carries on).
    pub(super) fn services(&self, settings: &StageConfig) -> Option<HostServices> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|e| e.settings == *settings)
            .map(|e| e.services.clone())
    }

    fn entry(&self, stage: &str) -> Result<Arc<Entry>, SwapError> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .iter()
            .find(|e| e.settings.name() == stage)
            .cloned()
            .ok_or_else(|| SwapError::UnknownStage(stage.to_string()))
    }

    /// Validate `bytes` as the new version of `stage` and swap it in.
    pub async fn install(
        &self,
        stage: &str,
        source: PluginSource,
        bytes: Vec<u8>,
    ) -> Result<SwapReport, SwapError> {
        let started = Instant::now();
        let _serial = self.serial.lock().await;
        let entry = self.entry(stage)?;
        let name = entry.settings.name();
        let mut previous = entry.previous.lock().await;
        let active = self.active(name)?;
        let bytes = PluginBytes::new(bytes);
        if bytes.sha256() == active.sha256() {
            return Ok(SwapReport {
                stage: name,
                previous_sha256: bytes.sha256().to_string(),
                sha256: bytes.sha256().to_string(),
                cached: true,
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                unchanged: true,
            });
        }
        let loaded = self
            .runtime
            .load(&entry.settings, source, bytes, &entry.services)
            .await;
        let Loaded {
            plugin,
            cached,
            instance,
        } = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                entry.reload_error.inc();
                tracing::warn!(stage = name, error = %error.report(), "plugin swap refused; the old version keeps serving");
                return Err(SwapError::Invalid { stage: name, error });
            }
        };
        let old = self.publish(name, plugin.clone(), Some(instance))?;
        entry.reload_ok.inc();
        let report = SwapReport {
            stage: name,
            sha256: plugin.sha256().to_string(),
            previous_sha256: old.sha256().to_string(),
            cached,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            unchanged: false,
        };
        *previous = Some(old);
        tracing::info!(stage = name, sha256 = %report.sha256, previous = %report.previous_sha256, cached, elapsed_ms = report.elapsed_ms, "plugin swapped");
        Ok(report)
    }

    /// Swap `stage` back to its previous version (kept in memory: no
    /// compilation, no validation needed).
    pub async fn rollback(&self, stage: &str) -> Result<SwapReport, SwapError> {
        let started = Instant::now();
        let _serial = self.serial.lock().await;
        let entry = self.entry(stage)?;
        let name = entry.settings.name();
        let mut previous = entry.previous.lock().await;
        let target = previous
            .as_ref()
            .ok_or(SwapError::NoPrevious(name))?
            .clone();
        // As a swap does: an instance with its `init` done serves the next
        // call, so no request pays for `init`; a version that can no
        // longer start is refused and the active one keeps serving.
        let warm = match Instance::new(&target).await {
            Ok(instance) => instance,
            Err(error) => {
                entry.reload_error.inc();
                let error = LoadError::Instantiate(error);
                tracing::warn!(stage = name, error = %error.report(), "plugin rollback refused; the active version keeps serving");
                return Err(SwapError::Invalid { stage: name, error });
            }
        };
        let old = self.publish(name, target.clone(), Some(warm))?;
        entry.reload_ok.inc();
        *previous = Some(old.clone());
        tracing::info!(stage = name, sha256 = %target.sha256(), "plugin rolled back");
        Ok(SwapReport {
            stage: name,
            sha256: target.sha256().to_string(),
            previous_sha256: old.sha256().to_string(),
            cached: true,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            unchanged: false,
        })
    }

    fn active(&self, stage: &str) -> Result<Arc<Plugin>, SwapError> {
        self.pipeline
            .plugin(stage)
            .ok_or_else(|| SwapError::UnknownStage(stage.to_string()))
    }

    fn publish(
        &self,
        stage: &'static str,
        plugin: Arc<Plugin>,
        warm: Option<Instance>,
    ) -> Result<Arc<Plugin>, SwapError> {
        let sha256 = plugin.sha256().to_string();
        let old = self
            .pipeline
            .swap(stage, plugin, warm)
            .ok_or_else(|| SwapError::UnknownStage(stage.to_string()))?;
        self.metrics.set_plugin_version(stage, &sha256);
        Ok(old)
    }

    /// Every stage's active and previous versions.
    pub async fn status(&self) -> Vec<StageVersions> {
        let entries = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Vec::with_capacity(entries.len());
        for entry in &entries {
            let ledger = &entry.services.ledger;
            let Ok(active) = self.active(entry.settings.name()) else {
                continue;
            };
            let previous = entry.previous.lock().await;
            out.push(StageVersions {
                stage: entry.settings.name(),
                active: info(&active, ledger),
                previous: previous.as_ref().map(|p| info(p, ledger)),
            });
        }
        out
    }
}

impl SwapError {
    /// The error and its sources, on one line, for logs and API answers.
    pub fn report(&self) -> String {
        match self {
            SwapError::Invalid { error, .. } => format!("{self}: {}", error.report()),
            other => other.to_string(),
        }
    }
}
