//! The on-disk cache of compiled components: a component seen before costs
//! a deserialization instead of a compilation.
//!
//! Owns the cache directory's layout and what it trusts (see
//! [`ArtifactCache`]); it must not decide *whether* to load a plugin.
//!
//! # What is trusted
//!
//! A cached artifact is native code that the host maps and runs, so an
//! entry is used only if it provably came from this host's own compilation
//! of exactly this component under this engine: each entry carries an
//! HMAC-SHA256, under a key kept *outside* the cache directory, over the
//! component's sha256, the engine's compatibility hash and the artifact.
//! Whoever can write to the cache directory but cannot read the key can
//! therefore not plant, swap (another component's entry under this one's
//! name) or patch an entry: it is refused and the component recompiled.
//!
//! - **The key** is `<cache dir>.key` (a sibling of the directory, e.g.
//!   `~/.cache/orchestrator.key`): 32 random bytes from `/dev/urandom`,
//!   created with mode 0600. It is used only if it is a regular file (not a
//!   link) owned by the host's user and readable by no one else. Without a
//!   usable key file the host makes a key per process, held in memory: the
//!   cache then serves only that process, and entries of earlier runs are
//!   recompiled.
//! - **The directory** is created with mode 0700 and used only if it is a
//!   directory owned by the host's user and writable by no one else;
//!   otherwise the host runs without a cache (and says so).
//! - **An entry** is opened without following links and without blocking
//!   (a FIFO), and read only if it is a regular file owned by the host's
//!   user, writable by no one else, and no larger than [`MAX_ENTRY_BYTES`].
//! - **Writes** go to a temporary file created exclusively (`O_EXCL`, never
//!   through a link) with mode 0600 under a random name, renamed into
//!   place: concurrent hosts never see half an entry, and nothing planted
//!   at a predictable name is followed.
//!
//! **Pruning.** Every swap of a new version adds an entry, and entries of
//! earlier engines (another host version) are never read again, so after
//! each write the directory keeps only the [`MAX_ENTRIES`] entries used
//! most recently (by modification time, which a cache hit refreshes) and
//! removes the rest. Only files named like entries are touched.
//!
//! Every entry refused is logged and counted in
//! `orchestrator_artifact_cache_refused_total{reason}`, then recompiled and
//! rewritten. wasmtime additionally checks an artifact's version and
//! settings when it deserializes it.

use std::fs::{DirBuilder, File, OpenOptions};
use std::hash::Hasher;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::error::LoadError;
use crate::files::read_capped;
use crate::metrics::{CacheMetrics, CacheRefusal};

/// Largest cache entry read.
pub const MAX_ENTRY_BYTES: u64 = 512 << 20;

/// Entries kept in the directory; the least recently used beyond it are
/// removed after each write.
pub const MAX_ENTRIES: usize = 64;

/// Domain separation of the MAC input (and its format's version).
const MAC_DOMAIN: &[u8] = b"orchestrator artifact cache v2\0";

type HmacSha256 = Hmac<Sha256>;

/// On-disk cache of compiled components (see the module docs).
///
/// Entries are named `<component sha256>-<engine hash>.cwasm`, where the
/// engine hash covers wasmtime's version and every compilation-relevant
/// setting; each holds a 32-byte MAC followed by the artifact.
pub(super) struct ArtifactCache {
    /// `None`: no cache (not configured, or the directory is unsafe).
    dir: Option<PathBuf>,
    engine_hash: String,
    key: [u8; 32],
    metrics: CacheMetrics,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
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
    /// The cache in `dir` for `engine`'s artifacts, with its key.
    pub(super) fn new(dir: Option<PathBuf>, engine: &Engine, metrics: CacheMetrics) -> Self {
        let mut hasher = Sha256Hasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let mut dir = dir.and_then(|dir| match prepare_dir(&dir) {
            Ok(()) => Some(dir),
            Err(error) => {
                metrics.refused(CacheRefusal::UnsafeDirectory).inc();
                tracing::warn!(dir = %dir.display(), %error, "not using the artifact cache directory");
                None
            }
        });
        let from_file = dir.as_deref().and_then(|dir| {
            let path = key_path(dir);
            load_or_create_key(&path)
                .inspect_err(|error| {
                    tracing::warn!(
                        key = %path.display(),
                        %error,
                        "no usable artifact cache key; cached artifacts will serve this process only"
                    );
                })
                .ok()
        });
        let key = from_file.or_else(|| random_key().ok());
        if key.is_none() && dir.is_some() {
            tracing::warn!("no randomness for an artifact cache key; not using the cache");
            dir = None;
        }
        ArtifactCache {
            dir,
            engine_hash: hex::encode(&hasher.0.finalize()[..8]),
            key: key.unwrap_or_default(),
            metrics,
        }
    }

    fn path(&self, sha256: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{sha256}-{}.cwasm", self.engine_hash)))
    }

    fn mac(&self, sha256: &str, artifact: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(MAC_DOMAIN);
        mac.update(sha256.as_bytes());
        mac.update(b"\0");
        mac.update(self.engine_hash.as_bytes());
        mac.update(b"\0");
        mac.update(artifact);
        mac
    }

    /// The compiled component; with the artifact to [`store`](Self::store)
    /// if it was compiled now rather than read from the cache.
    pub(super) fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Component, Option<Vec<u8>>), LoadError> {
        if let Some(path) = self.path(sha256)
            && let Some(component) = self.read(engine, &path, sha256)
        {
            return Ok((component, None));
        }
        let artifact = engine
            .precompile_component(bytes)
            .map_err(|e| LoadError::Compile(e.into()))?;
        // SAFETY: the artifact was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact) }
            .map_err(|e| LoadError::Compile(e.into()))?;
        Ok((component, Some(artifact)))
    }

    /// Write `artifact`, compiled from the component `sha256` by
    /// [`component`](Self::component), as its entry (if there is a cache).
    /// A failure is logged: it costs only a compilation at the next load.
    pub(super) fn store(&self, sha256: &str, artifact: &[u8]) {
        let Some(path) = self.path(sha256) else {
            return;
        };
        match self.write(&path, sha256, artifact) {
            Ok(()) => {
                if let Some(dir) = &self.dir {
                    prune(dir, MAX_ENTRIES);
                }
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot write the artifact cache");
            }
        }
    }

    /// The component in entry `path`, if it is there and trusted.
    fn read(&self, engine: &Engine, path: &Path, sha256: &str) -> Option<Component> {
        let refuse = |reason: CacheRefusal, detail: &dyn std::fmt::Display| {
            self.metrics.refused(reason).inc();
            tracing::warn!(
                path = %path.display(),
                reason = reason.label(),
                %detail,
                "artifact cache entry refused; recompiling"
            );
        };
        let data = match read_entry(path) {
            Ok(Some(data)) => data,
            Ok(None) => return None,
            Err(error) => {
                refuse(CacheRefusal::UnsafeFile, &error);
                return None;
            }
        };
        let Some((tag, artifact)) = data.split_at_checked(32) else {
            refuse(CacheRefusal::BadMac, &"shorter than its MAC");
            return None;
        };
        if self.mac(sha256, artifact).verify_slice(tag).is_err() {
            refuse(
                CacheRefusal::BadMac,
                &"not this host's compilation of this component",
            );
            return None;
        }
        // SAFETY: the MAC proves that `write` below stored this artifact,
        // produced by `Engine::precompile_component` of an engine with the
        // same compatibility hash, for exactly this component; wasmtime
        // still checks its version and settings and refuses a mismatch.
        match unsafe { Component::deserialize(engine, artifact) } {
            Ok(component) => {
                // Recently used: keep it when the directory is pruned.
                if let Ok(file) = File::options().append(true).open(path) {
                    let _ = file.set_modified(std::time::SystemTime::now());
                }
                Some(component)
            }
            Err(error) => {
                refuse(CacheRefusal::Incompatible, &error);
                None
            }
        }
    }

    fn write(&self, path: &Path, sha256: &str, artifact: &[u8]) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
        let mut file = create_private(&tmp)?;
        let written = file
            .write_all(&self.mac(sha256, artifact).finalize().into_bytes())
            .and_then(|()| file.write_all(artifact))
            .and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// The key file of cache directory `dir`: a sibling, outside it.
fn key_path(dir: &Path) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "orchestrator-cache".into());
    name.push(".key");
    dir.with_file_name(name)
}

/// 32 bytes from the system's randomness: a new key.
fn random_key() -> io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// Read the key at `path`, or create it (0600, 32 random bytes).
fn load_or_create_key(path: &Path) -> io::Result<[u8; 32]> {
    match read_key(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let key = random_key()?;
    // Written completely under a private name, then linked into place, so
    // a host reading it at the same time never sees half a key; if another
    // host linked its key first, that one is used.
    let tmp = path.with_extension(format!("key.{:016x}.tmp", fastrand::u64(..)));
    let mut file = create_private(&tmp)?;
    let linked = file
        .write_all(&key)
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => read_key(path),
        Err(error) => Err(error),
    }
}

fn read_key(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = open_private(path)?;
    let metadata = file.metadata()?;
    check_owned(&metadata, 0o077, "readable or writable by others")?;
    if metadata.len() != 32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a 32-byte key",
        ));
    }
    let mut key = [0u8; 32];
    file.read_exact(&mut key)?;
    Ok(key)
}

/// Create the cache directory (0700) or check the one there.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let metadata = std::fs::metadata(dir)?;
    if !metadata.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory",
        ));
    }
    check_owned(&metadata, 0o022, "writable by others")
}

/// Create `path` for writing: a new file (never one already there, never
/// through a link), readable and writable by this user only.
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Open `path` for reading without following a link or blocking on a FIFO,
/// and check it is a regular file.
fn open_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Check that `metadata` is owned by this process's user and has none of
/// the `forbidden` mode bits.
fn check_owned(metadata: &std::fs::Metadata, forbidden: u32, what: &str) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if metadata.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by this host's uid {uid}",
                metadata.uid()
            ),
        ));
    }
    if metadata.mode() & forbidden != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{what} (mode {:o})", metadata.mode() & 0o7777),
        ));
    }
    Ok(())
}

/// The bytes of entry `path`; `None` if there is no entry; an error if
/// there is something there that must not be read.
fn read_entry(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match open_private(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        // A link (O_NOFOLLOW: ELOOP), a FIFO or device, ...
        Err(error) => return Err(error),
    };
    check_owned(&file.metadata()?, 0o022, "writable by others")?;
    read_capped(file, MAX_ENTRY_BYTES).map(Some)
}

/// Whether `name` is an entry's file name: `<64 hex>-<16 hex>.cwasm`.
fn is_entry_name(name: &str) -> bool {
    name.strip_suffix(".cwasm")
        .and_then(|stem| stem.split_once('-'))
        .is_some_and(|(sha, engine)| {
            sha.len() == 64
                && engine.len() == 16
                && sha
                    .chars()
                    .chain(engine.chars())
                    .all(|c| c.is_ascii_hexdigit())
        })
}

/// Keep the `keep` most recently modified entries of `dir`; remove the
/// others. Errors (an entry removed meanwhile by another host) are ignored.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_entry_name))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, e.path()))
        })
        .collect();
    if found.len() <= keep {
        return;
    }
    found.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in found.into_iter().skip(keep) {
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(path = %path.display(), "artifact cache entry pruned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_a_private_sibling_of_the_directory() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("cache");
        assert_eq!(key_path(&dir), base.path().join("cache.key"));
        prepare_dir(&dir).unwrap();
        let key = load_or_create_key(&key_path(&dir)).unwrap();
        assert_eq!(load_or_create_key(&key_path(&dir)).unwrap(), key, "reused");
        let mode = std::fs::metadata(key_path(&dir)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        // A key readable by others is not used.
        std::fs::set_permissions(
            key_path(&dir),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        assert!(load_or_create_key(&key_path(&dir)).is_err());
    }

    /// Without a usable key file the key is per process: the cache serves
    /// the process that wrote it, and another refuses its entries.
    #[test]
    fn without_a_key_file_entries_serve_only_their_process() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("cache");
        std::fs::create_dir(base.path().join("cache.key")).unwrap(); // unusable
        let engine = Engine::default();
        let metrics = crate::metrics::Metrics::new();
        let bytes = crate::bundled::component(crate::config::Bundled::Post);
        let sha = hex::encode(Sha256::digest(bytes));
        let first = ArtifactCache::new(Some(dir.clone()), &engine, metrics.cache());
        let artifact = first.component(&engine, bytes, &sha).unwrap().1;
        let artifact = artifact.expect("compiled, not cached");
        // Nothing is written until the loader says the plugin passed.
        assert!(first.component(&engine, bytes, &sha).unwrap().1.is_some());
        first.store(&sha, &artifact);
        // A hit refreshes the entry's modification time (what pruning
        // keeps by).
        let entry = first.path(&sha).unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        File::options()
            .append(true)
            .open(&entry)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(
            first.component(&engine, bytes, &sha).unwrap().1.is_none(),
            "cached"
        );
        let touched = std::fs::metadata(&entry).unwrap().modified().unwrap();
        assert!(touched > old + std::time::Duration::from_secs(60));
        let second = ArtifactCache::new(Some(dir), &engine, metrics.cache());
        assert!(
            second.component(&engine, bytes, &sha).unwrap().1.is_some(),
            "refused"
        );
        assert_eq!(metrics.cache().refused(CacheRefusal::BadMac).get(), 1);
    }

    #[test]
    fn links_fifos_and_devices_are_not_entries() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link.cwasm");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_entry(&link).is_err());
        assert!(read_entry(Path::new("/dev/zero")).is_err());
        assert!(read_entry(&dir.path().join("absent")).unwrap().is_none());
    }

    #[test]
    fn pruning_keeps_the_most_recently_used_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::time::SystemTime::now() - std::time::Duration::from_secs(10_000);
        for n in 0..70u64 {
            let path = dir.path().join(format!("{n:064x}-{:016x}.cwasm", 7));
            std::fs::write(&path, b"entry").unwrap();
            let file = File::options().append(true).open(&path).unwrap();
            file.set_modified(base + std::time::Duration::from_secs(n))
                .unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"not an entry").unwrap();
        prune(dir.path(), 64);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), 65, "64 entries and the other file");
        assert!(left.contains(&"notes.txt".to_string()));
        // The six oldest went.
        for n in 0..6u64 {
            assert!(!left.contains(&format!("{n:064x}-{:016x}.cwasm", 7)));
        }
        assert!(is_entry_name(&format!("{:064x}-{:016x}.cwasm", 1, 2)));
        assert!(!is_entry_name("x-y.cwasm") && !is_entry_name(".tmp.cwasm"));
    }
}
