//! From a configuration to what the pipeline runs ([`Plan`]): each stage
//! in use loaded (or kept, when nothing about it changed), the pipeline
//! rule that needs the loaded plugins checked, the backends built.
//!
//! Startup and every reload go through [`plan`]; so a reload validates a
//! configuration exactly as startup does — plugins compiled and `init`
//! run with the new settings — before anything changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::swap::HotSwap;
use crate::config::{Config, StageConfig};
use crate::inference::{BackendSetupError, Router};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Plan};
use crate::store::{StoreSetupError, Stores};
use crate::wasm::{HostServices, LoadError, Plugin, PluginBytes, Runtime};

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A stage's plugin could not be loaded.
    #[error("stage `{stage}`: plugin {source_name}")]
    Plugin {
        /// The stage.
        stage: &'static str,
        /// Where the plugin came from.
        source_name: String,
        /// What is wrong with it.
        #[source]
        error: LoadError,
    },
    /// A stage has no plugin: no `plugin` file, no `<name>.wasm` in the
    /// plugins directory, no `bundled` one.
    #[error(
        "stage `{0}` has no plugin: set `plugin = \"path/to/{0}.wasm\"` or `bundled = \"...\"` \
         in [stages.{0}], or put {0}.wasm in the plugins directory"
    )]
    NoPlugin(&'static str),
    /// A backend could not be set up.
    #[error(transparent)]
    Backend(#[from] BackendSetupError),
    /// A key-value store could not be set up.
    #[error(transparent)]
    Store(#[from] StoreSetupError),
}

impl PlanError {
    /// The error and its sources, on one line.
    pub fn report(&self) -> String {
        match self {
            PlanError::Plugin { error, .. } => format!("{self}: {}", error.report()),
            other => other.to_string(),
        }
    }
}

/// A configuration ready to run: the plan, and each stage's settings with
/// the services its plugins are loaded with (for the hot-swap registry).
pub struct Planned {
    /// What the pipeline runs.
    pub plan: Plan,
    /// The stages in use, with their services.
    pub services: Vec<(StageConfig, HostServices)>,
    /// The stages that were loaded (not kept as they were).
    pub loaded: Vec<&'static str>,
}

/// What a plan may reuse of the configuration running now.
pub struct Running<'a> {
    /// The pipeline, for each stage's settings and plugin.
    pub pipeline: &'a Pipeline,
    /// The services of the stages in use (see [`HotSwap`]).
    pub hot_swap: &'a HotSwap,
}

/// Load what `config` runs. With `running`, a stage whose settings are
/// unchanged and whose plugin bytes are those running keeps its loaded
/// plugin (nothing is compiled or initialised again), and backends whose
/// settings are unchanged are kept.
pub async fn plan(
    runtime: &Runtime,
    config: &Config,
    metrics: &Metrics,
    running: Option<Running<'_>>,
) -> Result<Planned, PlanError> {
    let previous_router = running
        .as_ref()
        .map(|r| r.pipeline.snapshot().router().clone());
    let router = Router::reusing(config, metrics, previous_router.as_ref())?;
    let previous_stores = running
        .as_ref()
        .map(|r| r.pipeline.snapshot().stores().clone());
    let stores = Stores::reusing(config, metrics, previous_stores.as_deref())?;
    let mut stages = Vec::new();
    let mut services = Vec::new();
    let mut loaded = Vec::new();
    let mut warm = Vec::new();
    for stage in config.stages_in_use() {
        let kept = running.as_ref().and_then(|r| {
            Some((
                r.hot_swap.services(stage)?,
                r.pipeline.plugin(stage.name())?,
            ))
        });
        let stage_services = match &kept {
            Some((services, _)) => services.clone(),
            None => HostServices {
                router: stage.capabilities.inference.then(|| router.clone()),
                instances: metrics.stage(stage.name()).instances,
                ledger: Arc::default(),
            },
        };
        let source = stage
            .source(config.plugins_dir.as_deref())
            .ok_or(PlanError::NoPlugin(stage.name()))?;
        let fail = |error| PlanError::Plugin {
            stage: stage.name(),
            source_name: source.to_string(),
            error,
        };
        let bytes = PluginBytes::read(&source, config.max_plugin_bytes).map_err(fail)?;
        let plugin: Arc<Plugin> = match kept {
            Some((_, running)) if running.sha256() == bytes.sha256() => running,
            _ => {
                loaded.push(stage.name());
                let fresh = runtime
                    .load(stage, source.clone(), bytes, &stage_services)
                    .await
                    .map_err(fail)?;
                warm.push(fresh.instance);
                fresh.plugin
            }
        };
        stages.push((stage.clone(), plugin));
        services.push((stage.clone(), stage_services));
    }
    let pipelines: BTreeMap<String, Vec<String>> = config
        .pipelines
        .iter()
        .map(|(name, p)| (name.clone(), p.stages.clone()))
        .collect();
    warn_buffered_streaming(&pipelines, &stages);
    Ok(Planned {
        plan: Plan {
            stages,
            pipelines,
            router,
            stores: Arc::new(stores),
            hash: config.hash(),
            warm,
        },
        services,
        loaded,
    })
}

/// Warn of a streaming stage that follows a plain one after a pipeline's
/// generating stage: a streamed request's text reaches it only once the
/// generation has ended (the plain stage needs the whole text), so the
/// client sees the rest of the answer at once, not token by token. A valid
/// pipeline (a hot swap can make the same arrangement), but rarely meant.
fn warn_buffered_streaming(
    pipelines: &BTreeMap<String, Vec<String>>,
    stages: &[(StageConfig, Arc<Plugin>)],
) {
    for (name, names) in pipelines {
        let of = |n: &String| stages.iter().find(|(s, _)| s.name() == n);
        let Some(generating) = names
            .iter()
            .position(|n| of(n).is_some_and(|(s, _)| s.capabilities.inference))
        else {
            continue;
        };
        let mut plain: Option<&'static str> = None;
        for n in &names[generating + 1..] {
            let Some((settings, plugin)) = of(n) else {
                continue;
            };
            match (plugin.streams(), plain) {
                (false, None) => plain = Some(settings.name()),
                (true, Some(plain)) => {
                    tracing::warn!(
                        pipeline = %name,
                        plain,
                        streaming = settings.name(),
                        "a streaming stage follows a plain one after the generation: streamed \
                         answers are sent from the plain stage on only once the snapshot ends; \
                         put the streaming stage first to stream through it"
                    );
                    break;
                }
                _ => {}
            }
        }
    }
}
