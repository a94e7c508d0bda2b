//! Loading a plugin into the [`Runtime`] (lifecycle steps 2–4): reading its
//! bytes, compiling (through the artifact cache), checking its imports
//! against the stage's grants, linking, telling its world, and validating
//! one instance.
//!
//! Owns the decision whether a component may serve a stage; it must not
//! publish the plugin anywhere (that is the caller's: the pipeline at
//! startup, [`crate::control`] for a swap).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

use super::bindings::ExportIndices;
use super::bindings::{keyvalue, v1, v2};
use super::engine::Runtime;
use super::error::{CallError, LoadError};
use super::host::HostState;
use super::inspect::{Inspection, inspect};
use super::instance::Instance;
use super::plugin::{Grants, HostServices, Plugin, StoreShape};
use crate::bundled;
use crate::config::{PluginSource, StageConfig};
use crate::files::read_bounded;
use crate::metrics::ErrorType;

/// Interface name prefix of this package's imports.
const PACKAGE: &str = "orchestrator:pipeline/";

/// A component's bytes with their sha256, computed once.
#[derive(Debug, Clone)]
pub struct PluginBytes {
    bytes: Vec<u8>,
    sha256: String,
}

impl PluginBytes {
    /// Hash `bytes`.
    pub fn new(bytes: Vec<u8>) -> PluginBytes {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        PluginBytes { bytes, sha256 }
    }

    /// Read a bundled component, or a file of at most `max_bytes` (a
    /// regular file: see [`read_bounded`]). An upload has nothing to read:
    /// its bytes come with the request.
    pub fn read(source: &PluginSource, max_bytes: u64) -> Result<PluginBytes, LoadError> {
        let bytes = match source {
            PluginSource::Bundled(stage) => bundled::component(*stage).to_vec(),
            PluginSource::File(path) => {
                read_bounded(path, max_bytes).map_err(|source| LoadError::Read {
                    path: path.clone(),
                    source,
                })?
            }
            PluginSource::Upload => {
                return Err(LoadError::Read {
                    path: "<upload>".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "an upload's bytes come with its request",
                    ),
                });
            }
        };
        Ok(PluginBytes::new(bytes))
    }

    /// Hex sha256 of the bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// Their number.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// A plugin [`Runtime::load`] accepted.
pub struct Loaded {
    /// The plugin.
    pub plugin: Arc<Plugin>,
    /// Whether its compiled artifact came from the cache.
    pub cached: bool,
    /// The instance that validated it, its `init` done: the stage it is
    /// published to keeps it as an idle instance, so that its first
    /// request does not run `init` (a slow one — a long deny list, say —
    /// would count against that request's deadline).
    pub instance: Instance,
}

impl Runtime {
    /// Prepare, link and validate a plugin for `stage` (lifecycle steps
    /// 2–4). What can be refused without compiling is refused first
    /// ([`inspect`]); compilation runs on the blocking thread pool, and its
    /// artifact is written to the cache only once the plugin has passed
    /// every check, so a refused plugin leaves nothing there. Returns the
    /// plugin, whether its compiled artifact came from the cache, and the
    /// instance that validated it ([`Loaded`]).
    pub async fn load(
        &self,
        stage: &StageConfig,
        source: PluginSource,
        bytes: PluginBytes,
        services: &HostServices,
    ) -> Result<Loaded, LoadError> {
        let started = Instant::now();
        let PluginBytes { bytes, sha256 } = bytes;
        let inspection = inspect(&bytes)?;
        check_world(&inspection)?;
        check_imports(&inspection, stage)?;
        let (engine, cache, key) = (self.engine.clone(), self.cache.clone(), sha256.clone());
        let (component, fresh) =
            tokio::task::spawn_blocking(move || cache.component(&engine, &bytes, &key))
                .await
                .map_err(|e| LoadError::Compile(e.into()))??;

        let linker = linker(&self.engine).map_err(|e| {
            LoadError::Instantiate(CallError::new(ErrorType::Instantiate, format!("{e:#}")))
        })?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld {
                reason: "its imports cannot be linked".into(),
                exports: inspection.exports.clone(),
                source: Some(e.into()),
            })?;
        let exports = ExportIndices::new(&pre).map_err(|reason| LoadError::WrongWorld {
            reason,
            exports: inspection.exports.clone(),
            source: None,
        })?;
        let calls = services.ledger.counter(&sha256);
        let plugin = Arc::new(Plugin {
            stage: stage.name(),
            sha256,
            source,
            loaded_at: SystemTime::now(),
            pre,
            exports,
            settings: stage.clone(),
            init_config: stage
                .config
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: services.clone(),
            fuel: self.fuel,
            ticker: self.ticker.clone(),
            calls,
            shape: StoreShape::of(&inspection),
            grants: Grants::of(stage),
        });
        // Validation: one instance must come up and accept its config.
        let instance = Instance::start(&plugin).await.map_err(|failure| {
            if failure.in_init {
                LoadError::Init(failure.error.message)
            } else {
                LoadError::Instantiate(failure.error)
            }
        })?;
        let cached = fresh.is_none();
        if let Some(artifact) = fresh {
            let (cache, key) = (self.cache.clone(), plugin.sha256.clone());
            // A failed write is logged by the cache and costs only a
            // compilation at the next start.
            let _ = tokio::task::spawn_blocking(move || cache.store(&key, &artifact)).await;
        }
        if inference_ungranted(&inspection, stage) {
            tracing::warn!(
                stage = stage.name(),
                "the plugin imports orchestrator:pipeline/inference, which this stage is not \
                 granted: its calls to generate will fail"
            );
        }
        tracing::info!(
            stage = stage.name(),
            source = %plugin.source,
            sha256 = %plugin.sha256,
            world = plugin.world().name(),
            cached,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin loaded"
        );
        Ok(Loaded {
            plugin,
            cached,
            instance,
        })
    }
}

/// The linker every stage gets: WASI 0.2 (sockets included, every socket
/// call denied by the store's [`WasiCtx`](wasmtime_wasi::WasiCtx)), and of
/// both contracts (0.2.x and 0.1.x) `log`, the `request` resource, and
/// `inference`, whose calls fail unless the stage is granted it (the store
/// of an ungranted stage holds no router).
fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker: Linker<HostState> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    {
        use v2::orchestrator::pipeline::{inference, log, request};
        log::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        request::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        inference::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        v2::orchestrator::pipeline::expiring::add_to_linker::<_, HasSelf<_>>(
            &mut linker,
            |state| state,
        )?;
    }
    {
        use keyvalue::wasi::keyvalue::{atomics, batch, store};
        store::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        atomics::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        batch::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    }
    {
        use v1::orchestrator::pipeline::{inference, log, request};
        log::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        request::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        inference::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    }
    Ok(linker)
}

/// The exports every stage world has, and the one the streaming worlds add.
const STAGE_EXPORTS: [&str; 2] = ["init", "process"];

/// Refuse a component that lacks the stage worlds' exports, listing the
/// worlds and what it exports instead. Their types are checked once it is
/// compiled.
fn check_world(inspection: &Inspection) -> Result<(), LoadError> {
    match STAGE_EXPORTS
        .iter()
        .find(|name| !inspection.exports.iter().any(|e| e == *name))
    {
        Some(missing) => Err(LoadError::WrongWorld {
            reason: format!("it has no export `{missing}`"),
            exports: inspection.exports.clone(),
            source: None,
        }),
        None => Ok(()),
    }
}

/// Whether the component imports `inference` although the stage is not
/// granted it: allowed (toolchains such as componentize-js import every
/// interface of the world), but its calls fail.
fn inference_ungranted(inspection: &Inspection, stage: &StageConfig) -> bool {
    !stage.capabilities.inference
        && inspection
            .imports
            .iter()
            .any(|name| name.split('@').next() == Some(INFERENCE))
}

/// The inference interface's name, without version.
const INFERENCE: &str = "orchestrator:pipeline/inference";

/// Refuse imports the host does not provide, naming what is missing.
///
/// Every stage is linked with all of WASI 0.2 and this package, so an
/// import is refused only when nothing could satisfy it: WASI HTTP (the
/// host does not link it), or an interface of another package. What a
/// stage may *do* with what it imports is the grants' business, checked at
/// each call: the WASI context has only the granted directories and
/// environment variables and denies every socket, and `inference` answers
/// only a stage granted it.
fn check_imports(inspection: &Inspection, stage: &StageConfig) -> Result<(), LoadError> {
    for name in &inspection.imports {
        let interface = name.split('@').next().unwrap_or(name);
        let refusal = if interface.starts_with("wasi:http/") {
            Some(
                "the host does not link WASI HTTP: plugins get no HTTP access (with \
                 componentize-js, build with `-d http`)"
                    .to_string(),
            )
        } else if !interface.starts_with("wasi:") && !interface.starts_with(PACKAGE) {
            Some(format!(
                "the host provides only WASI 0.2 and the orchestrator:pipeline interfaces \
                 to stage `{}`",
                stage.name()
            ))
        } else {
            None
        };
        if let Some(remedy) = refusal {
            return Err(LoadError::NotGranted {
                import: name.clone(),
                remedy,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_has_no_source_to_read_and_bundled_stages_do() {
        let error = PluginBytes::read(&PluginSource::Upload, 1 << 20).unwrap_err();
        assert!(matches!(error, LoadError::Read { .. }));
        assert!(
            error.report().contains("come with its request"),
            "{}",
            error.report()
        );
        let rag = PluginBytes::read(&PluginSource::Bundled(crate::config::Bundled::Rag), 1 << 20)
            .unwrap();
        assert_eq!(rag.sha256().len(), 64);
    }
}
