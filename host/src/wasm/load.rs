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
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};

use super::bindings::ExportIndices;
use super::bindings::orchestrator::pipeline::{inference, log, request};
use super::engine::Runtime;
use super::error::{CallError, LoadError};
use super::host::HostState;
use super::instance::Instance;
use super::plugin::{HostServices, Plugin};
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
}

impl Runtime {
    /// Prepare, link and validate a plugin for `stage` (lifecycle steps
    /// 2–4). Compilation runs on the blocking thread pool. Returns the
    /// plugin and whether its compiled artifact came from the cache.
    pub async fn load(
        &self,
        stage: &StageConfig,
        source: PluginSource,
        bytes: PluginBytes,
        services: &HostServices,
    ) -> Result<(Arc<Plugin>, bool), LoadError> {
        let started = Instant::now();
        let PluginBytes { bytes, sha256 } = bytes;
        check_header(&bytes)?;
        let (engine, cache, key) = (self.engine.clone(), self.cache.clone(), sha256.clone());
        let (component, cached) =
            tokio::task::spawn_blocking(move || cache.component(&engine, &bytes, &key))
                .await
                .map_err(|e| LoadError::Compile(e.into()))??;
        check_imports(&component, &self.engine, stage)?;

        let linker = linker(&self.engine, stage.capabilities.inference).map_err(|e| {
            LoadError::Instantiate(CallError::new(ErrorType::Instantiate, format!("{e:#}")))
        })?;
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld {
                reason: "its imports cannot be linked".into(),
                source: Some(e.into()),
            })?;
        let exports = ExportIndices::new(&pre).map_err(|reason| LoadError::WrongWorld {
            reason,
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
            calls,
        });
        // Validation: one instance must come up and accept its config.
        Instance::new(&plugin)
            .await
            .map_err(|e| match e.error_type {
                ErrorType::Config => LoadError::Init(e.message),
                _ => LoadError::Instantiate(e),
            })?;
        tracing::info!(
            stage = stage.name(),
            source = %plugin.source,
            sha256 = %plugin.sha256,
            world = plugin.world().name(),
            cached,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "plugin loaded"
        );
        Ok((plugin, cached))
    }
}

/// The linker of a stage: WASI p2, `log` and the `request` resource for
/// every stage, `inference` only for a stage granted it.
fn linker(engine: &Engine, inference: bool) -> wasmtime::Result<Linker<HostState>> {
    let mut linker: Linker<HostState> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    log::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    request::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    if inference {
        inference::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
    }
    Ok(linker)
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
                stage.name()
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
    fn an_upload_has_no_source_to_read_and_bundled_stages_do() {
        let error = PluginBytes::read(&PluginSource::Upload, 1 << 20).unwrap_err();
        assert!(matches!(error, LoadError::Read { .. }));
        assert!(
            error.report().contains("come with its request"),
            "{}",
            error.report()
        );
        let rag =
            PluginBytes::read(&PluginSource::Bundled(crate::config::Stage::Rag), 1 << 20).unwrap();
        assert_eq!(rag.sha256().len(), 64);
    }
}
