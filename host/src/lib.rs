//! A WebAssembly-plugin orchestration host for LLM request pipelines.
//!
//! A request enters over HTTP ([`http`]), flows through the pipeline its
//! model routes to — by default `rag → assemble → inference → post →
//! stream`, or any configured stages in any order ([`pipeline`]) — where every
//! stage is a sandboxed WebAssembly component ([`wasm`]) whose generations
//! go to an inference backend ([`inference`]), and leaves as an
//! OpenAI-compatible chat completion. Every plugin call is timed and counted
//! in Prometheus metrics ([`metrics`]), served with `/health` on a separate
//! address. A stage's plugin can be swapped, and the whole configuration
//! reloaded, while traffic flows ([`control`]), and each request can be
//! exported as an OpenTelemetry trace ([`trace`]).
//!
//! Modules depend on each other one way, from the leaves up:
//!
//! ```text
//! config, metrics, bundled, files, chat → trace, circuit → inference → wasm → pipeline → control → http
//! ```
//!
//! (`tests/layout.rs` fails on any cycle.) [`Orchestrator::start`] wires
//! them together from a [`Config`]; the `orchestrator` binary is a thin
//! command line over it.

#![warn(missing_docs)]

pub mod allocator;
pub mod authoring;
pub mod bundled;
pub mod chat;
pub mod circuit;
pub mod config;
pub mod control;
pub mod files;
pub mod http;
pub mod inference;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod store;
pub mod trace;
pub mod wasm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use config::Config;
pub use metrics::Metrics;
pub use pipeline::Pipeline;

use crate::control::{ConfigSource, HotSwap, Reloader};
use crate::http::server::{self, BindError, ServerHandle};
use crate::wasm::{EngineError, EngineSettings, Runtime};

/// Why the host could not start. The lower-level error, if any, is its
/// [`source`](std::error::Error::source).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The wasm engine could not be created.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A stage's plugin could not be loaded, or a pipeline cannot run.
    #[error(transparent)]
    Plan(#[from] control::PlanError),
    /// The bundled `rag` corpus could not be written where the default
    /// grant expects it.
    #[error(
        "cannot write the bundled rag corpus to {}; grant `rag` a corpus directory of your own \
         (`[stages.rag] capabilities = {{ dirs = [{{ host = \"...\", guest = \"/corpus\" }}] }}`)",
        .dir.display()
    )]
    Corpus {
        /// Where it was to be written.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An address could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// Trace export could not start.
    #[error(transparent)]
    Tracing(#[from] trace::TraceError),
}

/// A running host: the pipeline and its two HTTP servers.
pub struct Orchestrator {
    pipeline: Pipeline,
    /// Set at shutdown to end the streams still open.
    cut_streams: tokio::sync::watch::Sender<bool>,
    hot_swap: Arc<HotSwap>,
    api: ServerHandle,
    ops: ServerHandle,
    /// The admin API's own listener, when `admin_listen` is set.
    admin: Option<ServerHandle>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    reloader: Arc<Reloader>,
    /// The tracer, when `[tracing]` is enabled: flushed at shutdown.
    traces: Option<trace::Traces>,
}

impl Orchestrator {
    /// Load every stage's plugin, start the pipeline, and bind the API and
    /// metrics addresses. Must be called within a multi-threaded tokio
    /// runtime. Without a configuration file: see [`start_with`](Self::start_with).
    pub async fn start(config: Config, metrics: Arc<Metrics>) -> Result<Orchestrator, StartError> {
        Orchestrator::start_with(config, metrics, None).await
    }

    /// [`start`](Self::start), with where the configuration came from: a
    /// host with a `source` can reload it ([`Reloader`]).
    pub async fn start_with(
        config: Config,
        metrics: Arc<Metrics>,
        source: Option<ConfigSource>,
    ) -> Result<Orchestrator, StartError> {
        // Bind first: an address in use fails at once, before any compiling.
        let api_listener = server::bind(config.listen).await?;
        let ops_listener = server::bind(config.metrics_listen).await?;
        let admin_listener = match config.admin_listen {
            Some(addr) => Some(server::bind(addr).await?),
            None => None,
        };
        let runtime = Arc::new(Runtime::new(
            &EngineSettings::for_config(&config),
            &metrics,
        )?);
        let traces = trace::Traces::start(&config.tracing, &metrics)?;
        install_default_corpus(&config)?;
        let planned = control::plan(&runtime, &config, &metrics, None).await?;
        let pipeline = Pipeline::start(planned.plan, &metrics);
        let hot_swap = Arc::new(HotSwap::new(
            runtime.clone(),
            pipeline.clone(),
            metrics.clone(),
            planned.services,
        ));
        let reloader = Arc::new(Reloader::new(
            runtime,
            metrics.clone(),
            pipeline.clone(),
            hot_swap.clone(),
            config.clone(),
            source,
        ));
        if let Some(dir) = &config.plugins_dir {
            match control::watch::unknown_plugins(dir, &config) {
                Some(files) => control::watch::warn_unknown(&files, &config),
                None => tracing::warn!(
                    dir = %dir.display(),
                    "plugins directory cannot be read; using bundled plugins"
                ),
            }
        }
        let (cut_streams, streams_cut) = tokio::sync::watch::channel(false);
        let keys_store: http::keys::KeysStore = {
            let pipeline = pipeline.clone();
            Arc::new(move || pipeline.snapshot().stores().get(keys::KEYS_STORE).cloned())
        };
        let admin_routes = || {
            http::admin::routes(
                hot_swap.clone(),
                reloader.clone(),
                config.admin_token.clone(),
                config.max_plugin_bytes,
                metrics.admin_auth_failures(),
                keys_store.clone(),
            )
        };
        // With a listener of its own, the admin API is off on the API's.
        let (api_admin, admin) = match admin_listener {
            None => (admin_routes(), None),
            Some(listener) => {
                let admin = server::spawn(
                    listener,
                    http::admin::standalone(admin_routes()),
                    server::Limits {
                        max_connections: http::ops::MAX_CONNECTIONS,
                        ..api_limits(&config)
                    },
                    metrics.connections("admin"),
                )?;
                let off = http::admin::routes(
                    hot_swap.clone(),
                    reloader.clone(),
                    None,
                    config.max_plugin_bytes,
                    metrics.admin_auth_failures(),
                    keys_store.clone(),
                );
                (off, Some(admin))
            }
        };
        let api = server::spawn(
            api_listener,
            http::openai::routes(
                http::openai::ApiState {
                    pipeline: pipeline.clone(),
                    shutdown: streams_cut,
                    request_timeout: Duration::from_millis(config.request_timeout_ms),
                    stream_stall: Duration::from_millis(config.stream_stall_ms),
                    max_body_bytes: config.max_body_bytes,
                    traces: traces.clone(),
                },
                api_admin,
            ),
            api_limits(&config),
            metrics.connections("api"),
        )?;
        let ops = server::spawn(
            ops_listener,
            http::ops::routes(metrics.clone(), Some(pipeline.clone())),
            http::ops::limits(),
            metrics.connections("ops"),
        )?;
        let watcher = config
            .watch
            .then(|| control::watch::spawn(&config, hot_swap.clone(), reloader.clone()));
        Ok(Orchestrator {
            pipeline,
            cut_streams,
            hot_swap,
            api,
            ops,
            admin,
            watcher,
            reloader,
            traces,
        })
    }

    /// The API's address (with the real port when 0 was asked for).
    pub fn api_addr(&self) -> SocketAddr {
        self.api.addr()
    }

    /// The metrics/health address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.addr()
    }

    /// The admin API's own address, when it has one (`admin_listen`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(ServerHandle::addr)
    }

    /// The pipeline.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The stages' plugin versions (hot swap and rollback).
    pub fn hot_swap(&self) -> &Arc<HotSwap> {
        &self.hot_swap
    }

    /// Configuration reload.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Graceful shutdown within one deadline, `grace` from now:
    ///
    /// 1. stop admitting at once (`/health` answers 503 `draining`, a new
    ///    request 503 `shutting_down`), while requests in flight go on;
    /// 2. stop accepting API connections and let the requests in progress
    ///    finish; streams still open [`STREAM_CUT_MARGIN`] before the
    ///    deadline are ended with an `error` event (`shutting_down`) and
    ///    `[DONE]`, so no client sees a stream merely stop;
    /// 3. wait for the pipeline's last requests, with whatever time is
    ///    left;
    /// 4. stop the metrics server, waiting at most [`OPS_STOP`] for a
    ///    request on it (a client that never finishes its request does not
    ///    hold the exit);
    /// 5. with tracing on, export the spans still queued, for at most
    ///    [`OPS_STOP`].
    pub async fn shutdown(self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
        self.pipeline.stop_admitting();
        let cut = deadline
            .checked_sub(STREAM_CUT_MARGIN.min(grace / 2))
            .unwrap_or(deadline);
        let cut_streams = self.cut_streams;
        let cutter = tokio::spawn(async move {
            tokio::time::sleep_until(cut).await;
            let _ = cut_streams.send(true);
        });
        let _ = tokio::time::timeout_at(deadline, self.api.shutdown()).await;
        cutter.abort();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.pipeline.shutdown(left).await;
        if let Some(admin) = self.admin {
            let _ = tokio::time::timeout(OPS_STOP, admin.shutdown()).await;
        }
        let _ = tokio::time::timeout(OPS_STOP, self.ops.shutdown()).await;
        if let Some(traces) = self.traces {
            // The spans of the last requests: at most OPS_STOP more.
            let _ = tokio::task::spawn_blocking(move || traces.shutdown(OPS_STOP)).await;
        }
    }
}

/// How long before the drain deadline open streams are ended (with an
/// error event), so that the event reaches the client before the exit.
pub const STREAM_CUT_MARGIN: Duration = Duration::from_secs(1);

/// How long the metrics server may take to stop once everything else has.
pub const OPS_STOP: Duration = Duration::from_secs(1);

/// The API listener's limits (see [`server`]): the configured connection
/// limit, kept 256 below the file-descriptor limit; the header timeout and
/// size; the request deadline plus a second for the handler to answer it.
fn api_limits(config: &Config) -> server::Limits {
    server::Limits {
        max_connections: config.max_connections,
        header_read: Duration::from_millis(config.header_read_timeout_ms),
        max_header_bytes: config.max_header_bytes as usize,
        request: Duration::from_millis(config.request_timeout_ms) + Duration::from_secs(1),
    }
    .within_fd_limit(256)
}

/// Write the bundled corpus where a stage's grant expects it, if any grant
/// names [`config::default_corpus_dir`].
fn install_default_corpus(config: &Config) -> Result<(), StartError> {
    if let Some(dir) = bundled::default_corpus_in_use(config) {
        bundled::install_corpus(&dir).map_err(|source| StartError::Corpus { dir, source })?;
    }
    Ok(())
}
