//! The on-disk cache of compiled components: a component seen before costs
//! a deserialization instead of a compilation.
//!
//! Owns the cache directory's layout and what it trusts (see
//! [`ArtifactCache`]); it must not decide *whether* to load a plugin.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::LoadError;

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
#[derive(Debug)]
pub(super) struct ArtifactCache {
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
    pub(super) fn new(dir: Option<PathBuf>, engine: &Engine) -> ArtifactCache {
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
    pub(super) fn component(
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
            .map_err(|e| LoadError::Compile(e.into()))?;
        // SAFETY: the artifact was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact) }
            .map_err(|e| LoadError::Compile(e.into()))?;
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
