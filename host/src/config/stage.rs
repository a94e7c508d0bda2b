//! One stage's settings, the stage list, and where a stage's plugin comes
//! from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::paths::default_corpus_dir;

/// The stages of the pipeline, in order. This is the one place the list is
/// spelled out (`host/build.rs` builds the matching `plugins/<stage>`
/// crates); the rest of the host iterates [`Stage::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
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
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Rag,
        Stage::Assemble,
        Stage::Inference,
        Stage::Post,
        Stage::Stream,
    ];

    /// The stage's name: its config key, metric label and plugin file stem.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Rag => "rag",
            Stage::Assemble => "assemble",
            Stage::Inference => "inference",
            Stage::Post => "post",
            Stage::Stream => "stream",
        }
    }

    /// The stage called `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The stage names, comma-separated, for messages.
    pub fn names() -> String {
        Stage::ALL.map(Stage::name).join(", ")
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a stage's workers use plugin instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// Each worker keeps one instance and reuses it for many requests; it is
    /// replaced after a trap and after `recycle_after` calls. Fastest.
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
}

/// Where a stage's plugin comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginSource {
    /// The component of this stage embedded in the host binary.
    Bundled(Stage),
    /// A component file.
    File(PathBuf),
    /// Bytes uploaded through the admin API.
    Upload,
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Bundled(_) => f.write_str("bundled"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
            PluginSource::Upload => f.write_str("upload"),
        }
    }
}

/// One stage's settings (`[stages.<name>]`). In the file every key is
/// optional and overlays the stage's defaults ([`StageConfig::default_for`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Which stage.
    #[serde(skip, default = "placeholder_stage")]
    pub stage: Stage,
    /// An explicit plugin file; `None` means `<plugins dir>/<stage>.wasm` if
    /// that exists, else the bundled plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PathBuf>,
    /// Bound of the stage's queue; admission control refuses requests
    /// beyond it.
    pub queue_capacity: usize,
    /// Worker threads, each running one plugin instance at a time.
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

fn placeholder_stage() -> Stage {
    Stage::Rag
}

impl StageConfig {
    /// The defaults of `stage`.
    pub fn default_for(stage: Stage) -> StageConfig {
        let mut capabilities = Capabilities::default();
        let mut config = BTreeMap::new();
        match stage {
            Stage::Rag => {
                capabilities.dirs.push(DirGrant {
                    host: default_corpus_dir(),
                    guest: "/corpus".into(),
                    writable: false,
                });
                config.insert("corpus_dir".into(), "/corpus".into());
            }
            Stage::Inference => capabilities.inference = true,
            Stage::Assemble | Stage::Post | Stage::Stream => {}
        }
        StageConfig {
            stage,
            plugin: None,
            queue_capacity: 1024,
            workers: 2,
            instance_mode: InstanceMode::Reuse,
            recycle_after: 10_000,
            // A generation may take as long as the whole request may.
            timeout_ms: if stage == Stage::Inference {
                30_000
            } else {
                5_000
            },
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

    /// The stage's name.
    pub fn name(&self) -> &'static str {
        self.stage.name()
    }

    /// Where this stage's plugin comes from, given the plugins directory.
    pub fn source(&self, plugins_dir: Option<&Path>) -> PluginSource {
        if let Some(path) = &self.plugin {
            return PluginSource::File(path.clone());
        }
        match plugins_dir.map(|dir| dir.join(format!("{}.wasm", self.name()))) {
            Some(path) if path.exists() => PluginSource::File(path),
            _ => PluginSource::Bundled(self.stage),
        }
    }
}
