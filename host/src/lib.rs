//! A WebAssembly-plugin orchestration host for LLM request pipelines.
//!
//! A request enters over HTTP ([`api`]), flows through the pipeline
//! `rag → assemble → inference → post → stream` ([`pipeline`]), where every
//! stage is a sandboxed WebAssembly component of the
//! `orchestrator:pipeline/stage` world ([`plugin`]), and leaves as an
//! OpenAI-compatible chat completion. Every plugin call is timed and counted
//! in Prometheus metrics ([`metrics`]), served with `/health` on a separate
//! address ([`metrics_server`]).
//!
//! [`Orchestrator::start`] wires it all together from a [`Config`]; the
//! `orchestrator` binary is a thin command line over it.

pub mod admin;
pub mod api;
pub mod bundled;
pub mod circuit;
pub mod config;
pub mod inference;
pub mod metrics;
pub mod metrics_server;
pub mod pipeline;
pub mod plugin;
pub mod server;
pub mod versions;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;
pub use metrics::Metrics;
pub use pipeline::Pipeline;

use crate::inference::Backends;
use crate::plugin::{EngineSettings, HostServices, LoadError, Runtime};
use crate::server::{BindError, ServerHandle};
use crate::versions::Versions;

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The wasm engine could not be created.
    #[error("{0}")]
    Engine(String),
    /// A stage's plugin could not be loaded.
    #[error("stage `{stage}`: plugin {source_name}: {error}")]
    Plugin {
        /// The stage.
        stage: &'static str,
        /// Where the plugin came from.
        source_name: String,
        /// What is wrong with it.
        error: LoadError,
    },
    /// An address could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// An inference backend could not be set up.
    #[error(transparent)]
    Backend(#[from] inference::BackendSetupError),
    /// Worker threads could not be started.
    #[error("cannot start worker threads: {0}")]
    Threads(#[from] std::io::Error),
}

/// A running host: the pipeline and its two HTTP servers.
pub struct Orchestrator {
    pipeline: Pipeline,
    versions: Arc<Versions>,
    api: ServerHandle,
    metrics_server: ServerHandle,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Orchestrator {
    /// Load every stage's plugin, start the pipeline, and bind the API and
    /// metrics addresses. Must be called within a multi-threaded tokio
    /// runtime.
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Orchestrator, StartError> {
        // Bind first: an address in use fails at once, before any compiling.
        let api_listener = server::bind(config.listen).await?;
        let metrics_listener = server::bind(config.metrics_listen).await?;
        let runtime = Arc::new(
            Runtime::new(&EngineSettings::for_config(&config))
                .map_err(|e| StartError::Engine(format!("{e:#}")))?,
        );
        let backends = Backends::new(&config, &metrics)?;
        let (stages, services) = load_stages(&runtime, &config, &metrics, &backends).await?;
        let pipeline = Pipeline::start(stages, &metrics)?;
        let versions = Arc::new(Versions::new(
            runtime,
            pipeline.clone(),
            metrics.clone(),
            services,
        ));
        if let Some(dir) = &config.plugins_dir {
            warn_unknown_plugins(dir);
        }
        let api = server::spawn(
            api_listener,
            api::routes(
                api::ApiState {
                    pipeline: pipeline.clone(),
                    backends: backends.clone(),
                    request_timeout: Duration::from_millis(config.request_timeout_ms),
                    max_body_bytes: config.max_body_bytes,
                },
                admin::routes(
                    versions.clone(),
                    config.admin_token.clone(),
                    config.max_plugin_bytes,
                ),
            ),
        )?;
        let metrics_server = server::spawn(
            metrics_listener,
            metrics_server::routes(metrics, Some(pipeline.clone()), Some(backends)),
        )?;
        let watcher = config
            .watch
            .then(|| watch::spawn(&config, versions.clone()));
        Ok(Orchestrator {
            pipeline,
            versions,
            api,
            metrics_server,
            watcher,
        })
    }

    /// The API's address (with the real port when 0 was asked for).
    pub fn api_addr(&self) -> SocketAddr {
        self.api.addr()
    }

    /// The metrics/health address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_server.addr()
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The stages' plugin versions (hot swap and rollback).
    pub fn versions(&self) -> &Arc<Versions> {
        &self.versions
    }

    /// Graceful shutdown: stop accepting API connections and let the
    /// requests in progress finish (up to `grace`), stop the pipeline, then
    /// the metrics server.
    pub async fn shutdown(self, grace: Duration) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
        let _ = tokio::time::timeout(grace, self.api.shutdown()).await;
        self.pipeline.shutdown(grace).await;
        self.metrics_server.shutdown().await;
    }
}

/// A loaded stage and the services its plugins get.
type LoadedStages = (
    Vec<(config::StageConfig, Arc<plugin::Plugin>)>,
    Vec<(config::StageConfig, HostServices)>,
);

async fn load_stages(
    runtime: &Runtime,
    config: &Config,
    metrics: &Metrics,
    backends: &Backends,
) -> Result<LoadedStages, StartError> {
    let mut stages = Vec::new();
    let mut services_of = Vec::new();
    for stage in &config.stages {
        let source = stage.source(config.plugins_dir.as_deref());
        let fail = |error| StartError::Plugin {
            stage: stage.name,
            source_name: source.to_string(),
            error,
        };
        let bytes = Runtime::read_source(&source, stage.name).map_err(fail)?;
        let granted = stage.capabilities.inference;
        let services = HostServices {
            backends: granted.then(|| backends.clone()),
            instances: metrics.stage(stage.name).instances,
            ledger: Arc::default(),
        };
        let (plugin, _) = runtime
            .load(stage, source.clone(), bytes, &services)
            .await
            .map_err(fail)?;
        stages.push((stage.clone(), plugin));
        services_of.push((stage.clone(), services));
    }
    Ok((stages, services_of))
}

/// Warn about `.wasm` files in the plugins directory that match no stage
/// (a typo such as `Post.wasm` would otherwise silently leave the bundled
/// plugin in place).
fn warn_unknown_plugins(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        tracing::warn!(dir = %dir.display(), "plugins directory cannot be read; using bundled plugins");
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        if path.extension().is_some_and(|e| e == "wasm") && !config::STAGES.contains(&stem) {
            tracing::warn!(file = %path.display(), "ignoring a .wasm file that names no stage");
        }
    }
}
