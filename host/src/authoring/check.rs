//! `orchestrator plugin check`: load a plugin as the host would, and say
//! what it is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::error::AuthoringError;
use crate::bundled;
use crate::config::{
    Bundled, Config, ConfigError, PluginSource, StageConfig, intern, interned_out,
};
use crate::inference::Router;
use crate::metrics::Metrics;
use crate::store::Stores;
use crate::wasm::{EngineSettings, HostServices, Plugin, PluginBytes, Runtime, inspect};

/// The fuel budget of a call under `plugin run` when the stage sets none:
/// enough for any sane call, and metered so the report can say how much
/// was used.
const RUN_FUEL: u64 = 1 << 40;

/// An engine and one stage's settings, ready to load a plugin file.
pub struct Session {
    runtime: Arc<Runtime>,
    stage: StageConfig,
    stores: Arc<Stores>,
    services: HostServices,
    max_plugin_bytes: u64,
}

impl Session {
    /// A session for `stage` under `config` (its grants, limits and
    /// `config` table; the stage's `plugin` is ignored). Fuel is metered,
    /// with the stage's `fuel` budget or a large one, so that a run can
    /// report the fuel each call used.
    ///
    /// # Errors
    ///
    /// The engine or the configured backends cannot be set up, or the
    /// bundled corpus cannot be installed for a stage granted it.
    pub fn new(config: &Config, stage: &str) -> Result<Session, AuthoringError> {
        let mut config = config.clone();
        // A stage the configuration does not declare is checked as a new
        // stage would run: with the defaults of the bundled plugin it is
        // named after, or the plain defaults.
        if config.stage(stage).is_none() {
            let name = intern(stage).ok_or_else(|| ConfigError::Invalid {
                key: format!("stages.{stage}"),
                message: interned_out(),
            })?;
            config
                .stages
                .push(StageConfig::default_for(name, Bundled::from_name(stage)));
        }
        let settings = config
            .stages
            .iter_mut()
            .find(|s| s.name() == stage)
            .ok_or_else(|| ConfigError::Invalid {
                key: format!("stages.{stage}"),
                message: "is not configured".into(),
            })?;
        settings.fuel = Some(settings.fuel.unwrap_or(RUN_FUEL));
        let stage_config = settings.clone();
        let metrics = Arc::new(Metrics::new());
        let runtime = Arc::new(Runtime::new(
            &EngineSettings::for_config(&config),
            &metrics,
        )?);
        let router = Router::new(&config, &metrics)?;
        let stores = Arc::new(Stores::reusing(&config, &metrics, None)?);
        if let Some(dir) = bundled::default_corpus_in_use(&config) {
            bundled::install_corpus(&dir).map_err(AuthoringError::Corpus)?;
        }
        Ok(Session {
            services: HostServices {
                router: stage_config.capabilities.inference.then_some(router),
                instances: metrics.stage(stage).instances,
                ledger: Arc::default(),
            },
            stage: stage_config,
            stores,
            runtime,
            max_plugin_bytes: config.max_plugin_bytes,
        })
    }

    /// The stage's settings.
    pub fn stage(&self) -> &StageConfig {
        &self.stage
    }

    /// The configuration's key-value stores, which the plugin's calls open.
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// Load `file` for the stage, as startup and hot swap do.
    ///
    /// # Errors
    ///
    /// [`AuthoringError::Load`] with the reason the host would give.
    pub async fn load(&self, file: &Path) -> Result<(Arc<Plugin>, CheckReport), AuthoringError> {
        let source = PluginSource::File(file.to_path_buf());
        let bytes = PluginBytes::read(&source, self.max_plugin_bytes)?;
        let size = bytes.len();
        let sha256 = bytes.sha256().to_string();
        let shape = inspect(bytes.as_slice())?;
        let started = Instant::now();
        let crate::wasm::Loaded { plugin, cached, .. } = self
            .runtime
            .load(&self.stage, source, bytes, &self.services)
            .await?;
        let report = CheckReport {
            file: file.to_path_buf(),
            stage: self.stage.name(),
            size,
            sha256,
            world: plugin.world().name(),
            inference_granted: self.stage.capabilities.inference,
            stores_granted: self.stage.capabilities.stores.clone(),
            imports: shape.imports,
            exports: shape.exports,
            core_instances: shape.core_instances,
            load_ms: started.elapsed().as_secs_f64() * 1e3,
            cached,
        };
        Ok((plugin, report))
    }
}

/// What `plugin check` found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The file checked.
    pub file: PathBuf,
    /// The stage it was checked for.
    pub stage: &'static str,
    /// Its size in bytes.
    pub size: usize,
    /// Its sha256 (hex), as `/health` and the admin API show it.
    pub sha256: String,
    /// The stage world it implements.
    pub world: &'static str,
    /// Whether the stage is granted `inference`.
    pub inference_granted: bool,
    /// The stores the stage is granted.
    pub stores_granted: Vec<String>,
    /// Its imports.
    pub imports: Vec<String>,
    /// Its exports.
    pub exports: Vec<String>,
    /// Core instances per instantiation.
    pub core_instances: u32,
    /// Compiling (or reading from the cache), linking and the validation
    /// instance with its `init`, in milliseconds.
    pub load_ms: f64,
    /// Whether the compiled artifact came from the cache.
    pub cached: bool,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ok: {} can serve stage `{}`",
            self.file.display(),
            self.stage
        )?;
        writeln!(f, "  world:     orchestrator:pipeline/{}", self.world)?;
        writeln!(f, "  size:      {} bytes", self.size)?;
        writeln!(f, "  sha256:    {}", self.sha256)?;
        writeln!(
            f,
            "  load:      {:.1} ms ({}; init ran with the stage's config)",
            self.load_ms,
            if self.cached {
                "compiled artifact from the cache"
            } else {
                "compiled now"
            }
        )?;
        writeln!(
            f,
            "  instances: {} core instances each",
            self.core_instances
        )?;
        writeln!(f, "  exports:   {}", self.exports.join(", "))?;
        writeln!(f, "  imports:")?;
        for import in &self.imports {
            let note = if import.starts_with("orchestrator:pipeline/inference") {
                if self.inference_granted {
                    "granted"
                } else {
                    "NOT granted: its calls fail (set capabilities = { inference = true })"
                }
            } else if import.starts_with("wasi:sockets/") {
                "linked; every socket call is denied"
            } else if import.starts_with("wasi:keyvalue/store") {
                if self.stores_granted.is_empty() {
                    "linked; NOT granted a store: every open is access-denied (set capabilities = { stores = [\"name\"] })"
                } else {
                    "linked; opens only the stores granted"
                }
            } else {
                "linked"
            };
            writeln!(f, "    {import}  ({note})")?;
        }
        Ok(())
    }
}
