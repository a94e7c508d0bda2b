//! One stage's settings, the stage list, and where a stage's plugin comes
//! from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::paths::default_corpus_dir;

/// The plugins bundled in the host binary. This is the one place the list
/// is spelled out (`host/build.rs` builds the matching `plugins/stages/<name>`
/// crates). A stage named after one of them uses it unless it says
/// otherwise; any stage may name one with `bundled = "<name>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bundled {
    /// Retrieval: adds passages from a corpus.
    Rag,
    /// Prompt assembly.
    Assemble,
    /// Generation, through the `inference` import.
    Inference,
    /// Post-processing: stop sequences, redaction.
    Post,
    /// Splitting the completion into chunks for streaming.
    Stream,
    /// Refusing prompts that match configured patterns (before inference).
    Guard,
    /// API keys: who is calling, and which models they may use.
    Auth,
    /// Request and token limits per window, and quotas.
    Ratelimit,
    /// Exact-match response cache.
    Cache,
}

impl Bundled {
    /// Every bundled plugin.
    pub const ALL: [Bundled; 9] = [
        Bundled::Rag,
        Bundled::Assemble,
        Bundled::Inference,
        Bundled::Post,
        Bundled::Stream,
        Bundled::Guard,
        Bundled::Auth,
        Bundled::Ratelimit,
        Bundled::Cache,
    ];

    /// The stages declared when the configuration declares none, in the
    /// order of the default pipeline.
    pub const DEFAULT_PIPELINE: [Bundled; 5] = [
        Bundled::Rag,
        Bundled::Assemble,
        Bundled::Inference,
        Bundled::Post,
        Bundled::Stream,
    ];

    /// The plugin's name: the name of the default stage that runs it.
    pub fn name(self) -> &'static str {
        match self {
            Bundled::Rag => "rag",
            Bundled::Assemble => "assemble",
            Bundled::Inference => "inference",
            Bundled::Post => "post",
            Bundled::Stream => "stream",
            Bundled::Guard => "guard",
            Bundled::Auth => "auth",
            Bundled::Ratelimit => "ratelimit",
            Bundled::Cache => "cache",
        }
    }

    /// The bundled plugin called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Bundled> {
        Bundled::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The bundled plugins' names, comma-separated, for messages.
    pub fn names() -> String {
        Bundled::ALL.map(Bundled::name).join(", ")
    }
}

impl fmt::Display for Bundled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Bundled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Bundled {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bundled, D::Error> {
        let name = String::deserialize(d)?;
        Bundled::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{name}` is not a bundled plugin; they are {}",
                Bundled::names()
            ))
        })
    }
}

/// The most distinct names [`intern`] keeps: ~1.5 MiB of 64-byte names at
/// most, for the whole life of the process.
pub const MAX_INTERNED: usize = 16_384;

/// The `&'static str` for the stage or pipeline name `name`: such names are
/// metric labels, error fields and thread names all over the host, and they
/// are few (bounded by the configurations loaded), so each distinct name is
/// leaked once and shared from then on. `None` once [`MAX_INTERNED`]
/// distinct names were kept: a configuration naming yet another is refused
/// (a restart starts afresh), so configurations refused or replaced over
/// weeks of reloads cannot grow the process without bound.
pub fn intern(name: &str) -> Option<&'static str> {
    intern_into(&mut interned(), name, MAX_INTERNED)
}

/// [`intern`] into `names`, which keeps at most `cap` names.
fn intern_into(
    names: &mut std::collections::HashSet<&'static str>,
    name: &str,
    cap: usize,
) -> Option<&'static str> {
    if let Some(known) = names.get(name) {
        return Some(known);
    }
    if names.len() >= cap {
        return None;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(leaked);
    Some(leaked)
}

/// The names [`intern`] kept.
fn interned() -> std::sync::MutexGuard<'static, std::collections::HashSet<&'static str>> {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Whether `name` was interned.
#[cfg(test)]
pub(crate) fn is_interned(name: &str) -> bool {
    interned().contains(name)
}

/// Why a name [`intern`] refused is refused.
pub fn interned_out() -> String {
    format!(
        "this process already holds {MAX_INTERNED} distinct stage and pipeline names \
         (they are kept for its life); restart it to use new ones"
    )
}

/// Whether `name` may name a stage or a pipeline: 1 to 64 ASCII
/// lower-case letters, digits, `-` and `_` (it becomes a metric label
/// value, a file stem and part of a URL path).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The store the bundled `auth` stage reads keys from by default, and the
/// one the admin API and `orchestrator keys` manage.
pub const KEYS_STORE: &str = "keys";

/// The default `workers` of a stage granted `inference`: the default
/// `max_concurrent` of a backend.
pub const INFERENCE_WORKERS: usize = 64;

/// How a stage's calls use plugin instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// The stage keeps a pool of instances (at most one per permit) and
    /// reuses them for many requests; one is replaced after a trap or a
    /// timeout and after `recycle_after` calls. Fastest.
    Reuse,
    /// A fresh instance for every request, dropped afterwards: no state can
    /// leak between requests. Costs one pooled instantiation (and the
    /// plugin's `init`) per request.
    PerRequest,
}

impl fmt::Display for InstanceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceMode::Reuse => "reuse",
            InstanceMode::PerRequest => "per-request",
        })
    }
}

/// A directory made visible to a stage's plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    /// Directory on the host; relative paths are relative to the config
    /// file's directory (or the working directory without a file).
    pub host: PathBuf,
    /// Path under which the plugin sees it.
    pub guest: String,
    /// Allow writes (default: read-only).
    #[serde(default)]
    pub writable: bool,
}

/// What a stage's plugin may use beyond computing. Nothing is granted unless
/// listed: no files, no network, no environment, no stdio.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capabilities {
    /// The `orchestrator:pipeline/inference` import.
    pub inference: bool,
    /// Preopened directories.
    pub dirs: Vec<DirGrant>,
    /// Names of host environment variables passed through (absent ones are skipped).
    pub env: Vec<String>,
    /// The key-value stores the plugin may open (`[stores.<name>]`; a name
    /// not declared there is a `memory` store with the defaults).
    pub stores: Vec<String>,
    /// The request headers the plugin may read (`request.header`), by
    /// name, case-insensitive. `authorization` too is visible only when
    /// named.
    pub headers: Vec<String>,
    /// Whether the plugin may read the client's address
    /// (`request.client-address`).
    pub client_address: bool,
}

/// Where a stage's plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// A plugin embedded in the host binary.
    Bundled(Bundled),
    /// A component file.
    File(PathBuf),
    /// Bytes uploaded through the admin API.
    Upload,
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Kept as it was when each stage had exactly one bundled plugin:
            // `/health` and the admin API report it.
            PluginSource::Bundled(_) => f.write_str("bundled"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
            PluginSource::Upload => f.write_str("upload"),
        }
    }
}

/// One stage's settings (`[stages.<name>]`). In the file every key is
/// optional and overlays the stage's defaults ([`StageConfig::default_for`]:
/// those of its bundled plugin, if it runs one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// The stage's name: its config key, metric label, admin path and
    /// plugin file stem (set from the table's key).
    #[serde(skip)]
    pub name: &'static str,
    /// An explicit plugin file; `None` means `<plugins dir>/<name>.wasm` if
    /// that exists, else the bundled plugin `bundled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PathBuf>,
    /// The bundled plugin the stage runs when no file is found. A stage
    /// named after a bundled plugin defaults to it; any other stage has
    /// none unless it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundled: Option<Bundled>,
    /// Requests the stage holds at once, running or waiting for a permit
    /// (its queue bound); admission control refuses requests beyond it
    /// before any stage runs.
    pub queue_capacity: usize,
    /// Calls the stage runs at once (its permits; each call holds one
    /// instance). Requests beyond it wait, counted in the queue depth.
    pub workers: usize,
    /// Instance reuse policy.
    pub instance_mode: InstanceMode,
    /// In `reuse` mode, replace an instance after this many calls.
    pub recycle_after: u64,
    /// Deadline of one plugin call.
    pub timeout_ms: u64,
    /// Linear-memory cap of one instance.
    pub max_memory_bytes: usize,
    /// Cap on the bytes of strings a call may return (or set, through a
    /// `request` handle).
    pub max_output_bytes: usize,
    /// Instruction budget of one call (`None`: unmetered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Consecutive failures that open the stage's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker refuses requests before letting probes through.
    pub breaker_cooldown_ms: u64,
    /// Requests let through at once while half-open.
    pub breaker_probes: u32,
    /// Grants.
    pub capabilities: Capabilities,
    /// Passed to the plugin's `init`.
    pub config: BTreeMap<String, String>,
}

/// The models the bundled `rag` stage retrieves for from the demo corpus
/// it is granted by default.
pub const DEMO_CORPUS_MODELS: &str = "echo";

impl StageConfig {
    /// The defaults of the stage `name`, running the bundled plugin
    /// `bundled` (whose grants and config it takes) if any.
    pub fn default_for(name: &'static str, bundled: Option<Bundled>) -> StageConfig {
        let mut capabilities = Capabilities::default();
        let mut config = BTreeMap::new();
        match bundled {
            Some(Bundled::Rag) => {
                capabilities.dirs.push(DirGrant {
                    host: default_corpus_dir(),
                    guest: "/corpus".into(),
                    writable: false,
                });
                config.insert("corpus_dir".into(), "/corpus".into());
                // The demo corpus (this project's docs) answers questions
                // to `echo`, never a real model's traffic.
                config.insert("models".into(), DEMO_CORPUS_MODELS.into());
            }
            Some(Bundled::Inference) => capabilities.inference = true,
            // The policy stages: each is granted the store its settings
            // name by default, and what it reads of the caller.
            Some(Bundled::Auth) => {
                capabilities.stores.push(KEYS_STORE.into());
                capabilities.headers.push("authorization".into());
            }
            Some(Bundled::Ratelimit) => {
                capabilities.stores.push("limits".into());
                capabilities.client_address = true;
            }
            Some(Bundled::Cache) => {
                capabilities.stores.push("cache".into());
                capabilities.headers.push("cache-control".into());
            }
            _ => {}
        }
        // A cache stage waits for an identical request's answer (single
        // flight) for as long as a generation may take, holding its permit.
        let waits = capabilities.inference || bundled == Some(Bundled::Cache);
        StageConfig {
            name,
            plugin: None,
            bundled,
            queue_capacity: 1024,
            // A stage that generates holds its permit while it waits for the
            // backend's first token: its calls wait on I/O, not on a core,
            // and the backend's `max_concurrent` (64 by default) is what
            // bounds the generations. Two permits made it the bottleneck
            // (measured with perf: 4,850 against 7,000 plain req/s).
            workers: if waits { INFERENCE_WORKERS } else { 2 },
            instance_mode: InstanceMode::Reuse,
            recycle_after: 10_000,
            // A generation may take as long as the whole request may.
            timeout_ms: if waits { 30_000 } else { 5_000 },
            max_memory_bytes: 64 * 1024 * 1024,
            max_output_bytes: 4 * 1024 * 1024,
            fuel: None,
            breaker_failures: 5,
            breaker_cooldown_ms: 5_000,
            breaker_probes: 1,
            capabilities,
            config,
        }
    }

    /// The defaults of the default stage running `bundled`.
    pub fn bundled_default(bundled: Bundled) -> StageConfig {
        StageConfig::default_for(bundled.name(), Some(bundled))
    }

    /// The stage's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where this stage's plugin comes from, given the plugins directory:
    /// its `plugin` file, else `<plugins dir>/<name>.wasm` if that exists,
    /// else its bundled plugin; `None` when it has none of them.
    pub fn source(&self, plugins_dir: Option<&Path>) -> Option<PluginSource> {
        if let Some(path) = &self.plugin {
            return Some(PluginSource::File(path.clone()));
        }
        match plugins_dir.map(|dir| dir.join(format!("{}.wasm", self.name()))) {
            Some(path) if path.exists() => Some(PluginSource::File(path)),
            _ => self.bundled.map(PluginSource::Bundled),
        }
    }
}

#[cfg(test)]
mod interning_tests {
    #[test]
    fn names_past_the_cap_are_refused_and_known_ones_still_served() {
        let mut names = std::collections::HashSet::new();
        let first = super::intern_into(&mut names, "alpha", 2).unwrap();
        assert!(std::ptr::eq(
            first,
            super::intern_into(&mut names, "alpha", 2).unwrap()
        ));
        assert!(super::intern_into(&mut names, "beta", 2).is_some());
        assert_eq!(super::intern_into(&mut names, "gamma", 2), None);
        assert_eq!(super::intern_into(&mut names, "beta", 2), Some("beta"));
        assert_eq!(names.len(), 2);
    }
}
