//! Live configuration reload ([`Reloader`]): on `SIGHUP`, on
//! `POST /admin/config/reload`, and with `--watch` when the file changes.
//!
//! # Lifecycle of a reload
//!
//! 1. **Read** — the configuration file is read again and the command
//!    line's overrides applied, as at startup ([`ConfigSource`]). A file
//!    that does not parse or validate is refused with the parser's
//!    message.
//! 2. **Check what cannot change live** — the listen addresses, the
//!    artifact cache, the admin token and listener, the HTTP server's
//!    limits, the trace exporter and `watch` are fixed when the host
//!    starts. A new configuration that changes one of them is refused,
//!    naming the key ("needs a restart"), rather than half applied.
//!    So is what the wasm engine was sized for: a configuration whose
//!    stages need more instance slots than the pool has (2 × their
//!    workers + 16; the pool has 32 more than the startup configuration
//!    needed, and at least 64), a larger `max_memory_bytes`,
//!    or fuel metering when the engine was started without it, is refused
//!    with what it needs.
//! 3. **Plan** — every stage in use is loaded as at startup (compiled,
//!    or taken from the artifact cache, and `init` run with its new
//!    settings), except a stage whose settings and plugin bytes are
//!    unchanged, which keeps running as it is; backends whose settings
//!    are unchanged are kept too. Any failure refuses the reload and
//!    nothing has changed.
//! 4. **Publish** — the pipeline switches to the new snapshot (see
//!    [`crate::pipeline::Snapshot`]): new requests use the new stages,
//!    pipelines, routes and backends; requests in flight finish on the
//!    ones they started with.
//!
//! Reloads are serialized with each other and with plugin swaps. Each
//! counts in `orchestrator_config_reloads_total{result}` (`ok`, `error`,
//! `unchanged`), and `orchestrator_config_info{hash}` and `/health`'s
//! `config_hash` name the configuration serving new requests.
//!
//! A hot swap (`PUT /admin/stages/<name>`) changes what runs without
//! changing the file: a reload makes the file's plugins authoritative
//! again, so a stage whose running version differs from its file is
//! swapped back to the file's version.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::plan::{PlanError, Running, plan};
use super::swap::HotSwap;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::wasm::{EngineSettings, Runtime};

/// How to read the configuration again: the file, and the command line's
/// overrides laid over it.
pub struct ConfigSource {
    /// The configuration file (watched under `--watch`).
    pub path: PathBuf,
    /// Read the file and apply the overrides.
    pub read: Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>,
}

/// Why a reload was refused. The running configuration keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The host was started without a configuration file.
    #[error("the host was started without --config: there is no file to reload")]
    NoFile,
    /// The file cannot be read, parsed or validated.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A setting that is fixed at startup changed.
    #[error("`{0}` changed, and it cannot change while the host runs: restart to apply it")]
    Fixed(&'static str),
    /// The new stages need more of the wasm engine than it was sized for
    /// at startup (instance slots, memory, fuel metering).
    #[error("{0}; restart to apply it")]
    Engine(String),
    /// A stage, a pipeline or a backend of the new configuration cannot run.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl ReloadError {
    /// The error and its sources, on one line.
    pub fn report(&self) -> String {
        match self {
            ReloadError::Plan(error) => error.report(),
            other => {
                let mut text = other.to_string();
                let mut source = std::error::Error::source(other);
                while let Some(error) = source {
                    text.push_str(": ");
                    text.push_str(&error.to_string());
                    source = error.source();
                }
                text
            }
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// `ok` (applied) or `unchanged` (the same configuration again).
    pub result: &'static str,
    /// The digest of the configuration now serving.
    pub hash: String,
    /// The digest of the one before.
    pub previous_hash: String,
    /// Stages whose plugin was loaded (new, changed, or a different file).
    pub loaded_stages: Vec<&'static str>,
    /// Time the reload took, in milliseconds.
    pub elapsed_ms: f64,
}

/// Reloads the configuration of a running host (see the module docs).
pub struct Reloader {
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    pipeline: Pipeline,
    hot_swap: Arc<HotSwap>,
    source: Option<ConfigSource>,
    /// The configuration serving now.
    current: tokio::sync::Mutex<Config>,
    /// Bumped by each reload that applied a configuration.
    applied: std::sync::atomic::AtomicU64,
}

impl Reloader {
    /// A reloader of the host running `config`, which it reads again from
    /// `source`.
    pub fn new(
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
        pipeline: Pipeline,
        hot_swap: Arc<HotSwap>,
        config: Config,
        source: Option<ConfigSource>,
    ) -> Reloader {
        for result in ["ok", "error", "unchanged"] {
            metrics.config_reload(result);
        }
        metrics.set_config_hash(&config.hash());
        Reloader {
            runtime,
            metrics,
            pipeline,
            hot_swap,
            source,
            current: tokio::sync::Mutex::new(config),
            applied: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many reloads have applied a configuration so far: a watcher
    /// compares it to notice reloads made by others.
    pub fn applied(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration file, if the host was started with one.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.source.as_ref().map(|s| s.path.as_path())
    }

    /// The configuration serving now.
    pub async fn config(&self) -> Config {
        self.current.lock().await.clone()
    }

    /// Read the configuration file again and switch to it; counted and
    /// logged either way.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, ReloadError> {
        let result = match &self.source {
            None => Err(ReloadError::NoFile),
            Some(source) => self.apply(source).await,
        };
        match &result {
            Ok(report) => {
                self.metrics.config_reload(report.result).inc();
                if report.result == "ok" {
                    tracing::info!(
                        trigger,
                        hash = %report.hash,
                        previous = %report.previous_hash,
                        loaded = ?report.loaded_stages,
                        elapsed_ms = report.elapsed_ms,
                        "configuration reloaded"
                    );
                } else {
                    tracing::info!(trigger, hash = %report.hash, "configuration reload: unchanged");
                }
            }
            Err(error) => {
                self.metrics.config_reload("error").inc();
                tracing::warn!(
                    trigger,
                    error = %error.report(),
                    "configuration reload refused; the running configuration keeps serving"
                );
            }
        }
        result
    }

    /// Read `source` and switch to it. The file is read under the lock,
    /// so reloads apply in the order they read the file: the last one
    /// applies what the file says last.
    async fn apply(&self, source: &ConfigSource) -> Result<ReloadReport, ReloadError> {
        let mut current = self.current.lock().await;
        let _serial = self.hot_swap.serial.lock().await;
        let result = self.apply_locked(source, &mut current).await;
        // Under the locks, so that no other reload's planned stage loses
        // its series: those of a refused plan's new stages, and of the
        // stages this reload retired, go.
        let snapshot = self.pipeline.snapshot();
        self.metrics.retain_stages(snapshot.stage_names());
        result
    }

    async fn apply_locked(
        &self,
        source: &ConfigSource,
        current: &mut Config,
    ) -> Result<ReloadReport, ReloadError> {
        let started = Instant::now();
        let config = (source.read)()?;
        fixed_settings_unchanged(current, &config)?;
        let mut needed = EngineSettings::for_config(&config);
        needed.max_instances = EngineSettings::needed_slots(&config);
        self.runtime.fits(&needed).map_err(ReloadError::Engine)?;
        let previous_hash = current.hash();
        let hash = config.hash();
        let planned = plan(
            &self.runtime,
            &config,
            &self.metrics,
            Some(Running {
                pipeline: &self.pipeline,
                hot_swap: &self.hot_swap,
            }),
        )
        .await?;
        let unchanged = hash == previous_hash && planned.loaded.is_empty();
        if unchanged {
            return Ok(ReloadReport {
                result: "unchanged",
                previous_hash,
                hash,
                loaded_stages: Vec::new(),
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            });
        }
        if let Some(dir) = crate::bundled::default_corpus_in_use(&config) {
            // Idempotent: present unless the operator removed it.
            let _ = crate::bundled::install_corpus(&dir);
        }
        self.pipeline.install(planned.plan, &self.metrics);
        self.hot_swap.sync(planned.services);
        self.metrics.set_config_hash(&hash);
        *current = config;
        self.applied
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(ReloadReport {
            result: "ok",
            hash,
            previous_hash,
            loaded_stages: planned.loaded,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Refuse a change of what is fixed at startup: the first field named
/// whose value differs.
fn fixed_settings_unchanged(running: &Config, next: &Config) -> Result<(), ReloadError> {
    macro_rules! fixed {
        ($($field:ident),+ $(,)?) => {
            $(
                if running.$field != next.$field {
                    return Err(ReloadError::Fixed(stringify!($field)));
                }
            )+
        };
    }
    fixed!(
        listen,
        metrics_listen,
        admin_listen,
        admin_token,
        cache_dir,
        max_connections,
        header_read_timeout_ms,
        max_header_bytes,
        max_body_bytes,
        max_plugin_bytes,
        request_timeout_ms,
        stream_stall_ms,
        shutdown_grace_ms,
        watch,
        tracing,
    );
    Ok(())
}
