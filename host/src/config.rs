//! Host configuration: the `orchestrator.toml` file, its defaults, and
//! command-line overrides.
//!
//! Every setting has a default, so the host runs with no file at all. A file
//! only needs the keys it changes. Unknown keys and invalid values are
//! errors that name the key (`stages.rag.workers: must be at least 1`), found
//! at startup rather than at the first request.
//!
//! Stage sections are *overlays*: `[stages.rag] workers = 4` changes the
//! workers of `rag` and keeps its other defaults, including its grants.
//! Within `capabilities`, each key given replaces that key's default; the
//! stage's `config` table is merged key by key over the defaults.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! metrics_listen = "127.0.0.1:9090"
//! request_timeout_ms = 30000
//!
//! # Inference backends and routing: the request's `model` picks a backend.
//! [backends.llama]
//! kind = "openai"                      # or "echo"
//! base_url = "http://127.0.0.1:8081/v1"
//! model = "gemma-3-270m"               # name sent upstream (default: the client's)
//!
//! [routing]
//! models = { gemma = "llama" }         # merged over the default `echo = "echo"`
//! # default = "llama"                  # backend for any model not listed
//!
//! [stages.rag]
//! workers = 2
//! queue_capacity = 1024
//! config = { top_k = 3 }
//! capabilities = { dirs = [{ host = "docs", guest = "/corpus" }] }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::admin::AdminToken;

/// The pipeline's stages, in order.
pub const STAGES: [&str; 5] = ["rag", "assemble", "inference", "post", "stream"];

/// A configuration error, naming the offending key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("config: `{key}` {message}")]
    Invalid {
        /// The dotted key path.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

/// How a stage's workers use plugin instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// The component embedded in the host binary.
    Bundled,
    /// A component file.
    File(PathBuf),
    /// Bytes uploaded through the admin API.
    Upload,
}

impl fmt::Display for PluginSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginSource::Bundled => f.write_str("bundled"),
            PluginSource::File(path) => write!(f, "{}", path.display()),
            PluginSource::Upload => f.write_str("upload"),
        }
    }
}

/// One stage's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StageConfig {
    /// The stage's name (`rag`, ...).
    pub name: &'static str,
    /// An explicit plugin file; `None` means `<plugins dir>/<stage>.wasm` if
    /// that exists, else the bundled plugin.
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
    /// Cap on the bytes of strings a call may return.
    pub max_output_bytes: usize,
    /// Instruction budget of one call (`None`: unmetered).
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

/// What kind of service a backend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// The built-in deterministic stand-in (see [`crate::inference`]).
    Echo,
    /// An OpenAI-compatible `/v1/chat/completions` service: OpenAI, vLLM,
    /// llama.cpp's `llama-server`, Ollama, ...
    Openai,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Echo => "echo",
            BackendKind::Openai => "openai",
        })
    }
}

/// One named inference backend (`[backends.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// What it is.
    pub kind: BackendKind,
    /// Base URL of an `openai` backend, up to and including the version
    /// path: `https://api.openai.com/v1`, `http://127.0.0.1:8081/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The *name* of the environment variable holding the API key (sent as
    /// `Authorization: Bearer`); never the key itself.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The model name sent upstream; without it the client's `model` is sent.
    #[serde(default)]
    pub model: Option<String>,
    /// Longest wait for the response headers, and then between two
    /// streamed events (a stalled upstream fails with 504 after it).
    #[serde(default = "defaults::request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest wait for the TCP (and TLS) connection.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Requests sent to it at once; more wait (within their deadline).
    #[serde(default = "defaults::max_concurrent")]
    pub max_concurrent: usize,
    /// Retries after a connect error, a 429 or a 5xx, before the first token.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// First retry backoff; doubled per retry, with full jitter.
    #[serde(default = "defaults::retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Consecutive failed requests that open its circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker refuses requests.
    #[serde(default = "defaults::breaker_cooldown_ms")]
    pub breaker_cooldown_ms: u64,
    /// Probe requests let through at once while half-open.
    #[serde(default = "defaults::breaker_probes")]
    pub breaker_probes: u32,
    /// Another backend to try when this one fails before the first token
    /// (after its retries) or its breaker is open.
    #[serde(default)]
    pub failover: Option<String>,
}

mod defaults {
    pub fn request_timeout_ms() -> u64 {
        30_000
    }
    pub fn connect_timeout_ms() -> u64 {
        2_000
    }
    pub fn max_concurrent() -> usize {
        64
    }
    pub fn max_retries() -> u32 {
        2
    }
    pub fn retry_backoff_ms() -> u64 {
        100
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown_ms() -> u64 {
        10_000
    }
    pub fn breaker_probes() -> u32 {
        1
    }
}

impl BackendConfig {
    /// The built-in `echo` backend's settings.
    pub fn echo() -> BackendConfig {
        BackendConfig {
            kind: BackendKind::Echo,
            base_url: None,
            api_key_env: None,
            model: None,
            request_timeout_ms: defaults::request_timeout_ms(),
            connect_timeout_ms: defaults::connect_timeout_ms(),
            max_concurrent: defaults::max_concurrent(),
            max_retries: defaults::max_retries(),
            retry_backoff_ms: defaults::retry_backoff_ms(),
            breaker_failures: defaults::breaker_failures(),
            breaker_cooldown_ms: defaults::breaker_cooldown_ms(),
            breaker_probes: defaults::breaker_probes(),
            failover: None,
        }
    }
}

/// Which backend serves which model (`[routing]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Model name (as clients send it) → backend name. Listed by
    /// `GET /v1/models`.
    pub models: BTreeMap<String, String>,
    /// Backend for models not in `models`; without one they get 404.
    pub default: Option<String>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address of the OpenAI-compatible API.
    pub listen: SocketAddr,
    /// Address of `/metrics` and `/health`.
    pub metrics_listen: SocketAddr,
    /// Directory searched for `<stage>.wasm`.
    pub plugins_dir: Option<PathBuf>,
    /// Compiled-artifact cache directory; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// End-to-end deadline of one request (504 when it expires).
    pub request_timeout_ms: u64,
    /// Largest accepted request body.
    pub max_body_bytes: u64,
    /// Largest plugin accepted by `PUT /admin/stages/{stage}`.
    pub max_plugin_bytes: u64,
    /// Bearer token of the admin API; the API is off without one.
    pub admin_token: Option<AdminToken>,
    /// Swap in `<plugins_dir>/<stage>.wasm` when it changes on disk.
    pub watch: bool,
    /// Inference backends by name (`echo` is predefined).
    pub backends: BTreeMap<String, BackendConfig>,
    /// Model → backend routing.
    pub routing: RoutingConfig,
    /// The five stages, in pipeline order.
    pub stages: Vec<StageConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            plugins_dir: None,
            cache_dir: default_cache_dir(),
            request_timeout_ms: 30_000,
            max_body_bytes: 1024 * 1024,
            max_plugin_bytes: 64 * 1024 * 1024,
            admin_token: None,
            watch: false,
            backends: BTreeMap::from([("echo".to_string(), BackendConfig::echo())]),
            routing: RoutingConfig {
                models: BTreeMap::from([("echo".to_string(), "echo".to_string())]),
                default: None,
            },
            stages: STAGES
                .iter()
                .map(|name| StageConfig::default_for(name))
                .collect(),
        }
    }
}

/// The bundled corpus the `rag` stage reads by default.
pub fn default_corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/corpus")
}

/// `$XDG_CACHE_HOME/orchestrator` or `$HOME/.cache/orchestrator`.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("orchestrator"))
}

impl StageConfig {
    /// The defaults of stage `name`.
    pub fn default_for(name: &'static str) -> StageConfig {
        let mut capabilities = Capabilities::default();
        let mut config = BTreeMap::new();
        match name {
            "rag" => {
                capabilities.dirs.push(DirGrant {
                    host: default_corpus_dir(),
                    guest: "/corpus".into(),
                    writable: false,
                });
                config.insert("corpus_dir".into(), "/corpus".into());
            }
            "inference" => capabilities.inference = true,
            _ => {}
        }
        StageConfig {
            name,
            plugin: None,
            queue_capacity: 1024,
            workers: 2,
            instance_mode: InstanceMode::Reuse,
            recycle_after: 10_000,
            // A generation may take as long as the whole request may.
            timeout_ms: if name == "inference" { 30_000 } else { 5_000 },
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

    /// Where this stage's plugin comes from, given the plugins directory.
    pub fn source(&self, plugins_dir: Option<&Path>) -> PluginSource {
        if let Some(path) = &self.plugin {
            return PluginSource::File(path.clone());
        }
        match plugins_dir.map(|dir| dir.join(format!("{}.wasm", self.name))) {
            Some(path) if path.exists() => PluginSource::File(path),
            _ => PluginSource::Bundled,
        }
    }
}

// ----- the file format -------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    plugins_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    request_timeout_ms: Option<u64>,
    max_body_bytes: Option<u64>,
    max_plugin_bytes: Option<u64>,
    admin_token: Option<String>,
    watch: Option<bool>,
    backends: Option<BTreeMap<String, BackendConfig>>,
    routing: Option<RoutingFile>,
    stages: Option<StagesFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    models: Option<BTreeMap<String, String>>,
    default: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StagesFile {
    rag: Option<StageFile>,
    assemble: Option<StageFile>,
    inference: Option<StageFile>,
    post: Option<StageFile>,
    stream: Option<StageFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    plugin: Option<PathBuf>,
    queue_capacity: Option<usize>,
    workers: Option<usize>,
    instance_mode: Option<InstanceMode>,
    recycle_after: Option<u64>,
    timeout_ms: Option<u64>,
    max_memory_bytes: Option<usize>,
    max_output_bytes: Option<usize>,
    fuel: Option<u64>,
    breaker_failures: Option<u32>,
    breaker_cooldown_ms: Option<u64>,
    breaker_probes: Option<u32>,
    capabilities: Option<CapabilitiesFile>,
    config: Option<BTreeMap<String, toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesFile {
    inference: Option<bool>,
    dirs: Option<Vec<DirGrant>>,
    env: Option<Vec<String>>,
}

impl Config {
    /// Read `path` over the defaults. Relative paths in the file are
    /// resolved against the file's directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parse TOML text over the defaults; relative paths are resolved
    /// against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut config = Config::default();
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        if let Some(v) = file.listen {
            config.listen = v;
        }
        if let Some(v) = file.metrics_listen {
            config.metrics_listen = v;
        }
        config.plugins_dir = file.plugins_dir.map(resolve).or(config.plugins_dir);
        config.cache_dir = file.cache_dir.map(resolve).or(config.cache_dir);
        if let Some(v) = file.request_timeout_ms {
            config.request_timeout_ms = v;
        }
        if let Some(v) = file.max_body_bytes {
            config.max_body_bytes = v;
        }
        if let Some(v) = file.max_plugin_bytes {
            config.max_plugin_bytes = v;
        }
        if let Some(v) = file.admin_token {
            config.admin_token = AdminToken::new(v);
        }
        if let Some(v) = file.watch {
            config.watch = v;
        }
        config.backends.extend(file.backends.unwrap_or_default());
        if let Some(routing) = file.routing {
            config
                .routing
                .models
                .extend(routing.models.unwrap_or_default());
            if routing.default.is_some() {
                config.routing.default = routing.default;
            }
        }
        let stages = file.stages.unwrap_or_default();
        let overlays = [
            stages.rag,
            stages.assemble,
            stages.inference,
            stages.post,
            stages.stream,
        ];
        for (stage, overlay) in config.stages.iter_mut().zip(overlays) {
            if let Some(overlay) = overlay {
                overlay.apply(stage, &resolve)?;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Check ranges. Called by the loaders; call it again after changing
    /// fields by hand.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if self.request_timeout_ms == 0 {
            return invalid("request_timeout_ms".into(), "must be at least 1");
        }
        if self.max_body_bytes == 0 {
            return invalid("max_body_bytes".into(), "must be at least 1");
        }
        if self.max_plugin_bytes == 0 {
            return invalid("max_plugin_bytes".into(), "must be at least 1");
        }
        if self.watch && self.plugins_dir.is_none() {
            return invalid(
                "watch".into(),
                "needs a plugins directory (`plugins_dir` or --plugins)",
            );
        }
        self.validate_backends()?;
        for stage in &self.stages {
            let key = |field: &str| format!("stages.{}.{field}", stage.name);
            if stage.workers == 0 || stage.workers > 256 {
                return invalid(key("workers"), "must be between 1 and 256");
            }
            if stage.queue_capacity == 0 {
                return invalid(key("queue_capacity"), "must be at least 1");
            }
            if stage.recycle_after == 0 {
                return invalid(key("recycle_after"), "must be at least 1");
            }
            if stage.timeout_ms == 0 {
                return invalid(key("timeout_ms"), "must be at least 1");
            }
            if stage.max_memory_bytes < 64 * 1024 {
                return invalid(
                    key("max_memory_bytes"),
                    "must be at least 65536 (one wasm page)",
                );
            }
            for (n, dir) in stage.capabilities.dirs.iter().enumerate() {
                if !dir.guest.starts_with('/') {
                    return invalid(
                        format!("stages.{}.capabilities.dirs[{n}].guest", stage.name),
                        "must be an absolute guest path such as \"/corpus\"",
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| Err(ConfigError::Invalid { key, message });
        for (name, backend) in &self.backends {
            let key = |field: &str| format!("backends.{name}.{field}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return invalid(
                    format!("backends.{name}"),
                    "names may use only ASCII letters, digits, `-` and `_`".into(),
                );
            }
            match (backend.kind, &backend.base_url) {
                (BackendKind::Openai, None) => {
                    return invalid(key("base_url"), "is required for kind \"openai\"".into());
                }
                (BackendKind::Openai, Some(url))
                    if !(url.starts_with("http://") || url.starts_with("https://")) =>
                {
                    return invalid(
                        key("base_url"),
                        format!("must be an http:// or https:// URL, got {url:?}"),
                    );
                }
                _ => {}
            }
            for (field, value) in [
                ("request_timeout_ms", backend.request_timeout_ms),
                ("connect_timeout_ms", backend.connect_timeout_ms),
                ("max_concurrent", backend.max_concurrent as u64),
                ("breaker_failures", u64::from(backend.breaker_failures)),
                ("breaker_probes", u64::from(backend.breaker_probes)),
            ] {
                if value == 0 {
                    return invalid(key(field), "must be at least 1".into());
                }
            }
            if let Some(other) = &backend.failover
                && (other == name || !self.backends.contains_key(other))
            {
                return invalid(
                    key("failover"),
                    format!("names {other:?}, which is not another configured backend"),
                );
            }
        }
        let routes = self
            .routing
            .models
            .iter()
            .map(|(model, backend)| (format!("routing.models.{model}"), backend))
            .chain(
                self.routing
                    .default
                    .iter()
                    .map(|backend| ("routing.default".to_string(), backend)),
            );
        for (key, backend) in routes {
            if !self.backends.contains_key(backend) {
                let known: Vec<&str> = self.backends.keys().map(String::as_str).collect();
                return invalid(
                    key,
                    format!(
                        "names backend {backend:?}, which is not configured (backends: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    /// The settings of stage `name`.
    pub fn stage(&self, name: &str) -> Option<&StageConfig> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Mutable settings of stage `name`.
    pub fn stage_mut(&mut self, name: &str) -> Option<&mut StageConfig> {
        self.stages.iter_mut().find(|s| s.name == name)
    }
}

impl StageFile {
    fn apply(
        self,
        stage: &mut StageConfig,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Result<(), ConfigError> {
        if let Some(v) = self.plugin {
            stage.plugin = Some(resolve(v));
        }
        if let Some(v) = self.queue_capacity {
            stage.queue_capacity = v;
        }
        if let Some(v) = self.workers {
            stage.workers = v;
        }
        if let Some(v) = self.instance_mode {
            stage.instance_mode = v;
        }
        if let Some(v) = self.recycle_after {
            stage.recycle_after = v;
        }
        if let Some(v) = self.timeout_ms {
            stage.timeout_ms = v;
        }
        if let Some(v) = self.max_memory_bytes {
            stage.max_memory_bytes = v;
        }
        if let Some(v) = self.max_output_bytes {
            stage.max_output_bytes = v;
        }
        if self.fuel.is_some() {
            stage.fuel = self.fuel;
        }
        if let Some(v) = self.breaker_failures {
            stage.breaker_failures = v;
        }
        if let Some(v) = self.breaker_cooldown_ms {
            stage.breaker_cooldown_ms = v;
        }
        if let Some(v) = self.breaker_probes {
            stage.breaker_probes = v;
        }
        if let Some(caps) = self.capabilities {
            if let Some(v) = caps.inference {
                stage.capabilities.inference = v;
            }
            if let Some(dirs) = caps.dirs {
                stage.capabilities.dirs = dirs
                    .into_iter()
                    .map(|d| DirGrant {
                        host: resolve(d.host),
                        ..d
                    })
                    .collect();
            }
            if let Some(v) = caps.env {
                stage.capabilities.env = v;
            }
        }
        for (key, value) in self.config.unwrap_or_default() {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::Invalid {
                        key: format!("stages.{}.config.{key}", stage.name),
                        message: "must be a string, number or boolean".into(),
                    });
                }
            };
            stage.config.insert(key, text);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/orchestrator"))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        let config = Config::default();
        assert_eq!(config.stages.len(), 5);
        assert!(config.stage("inference").unwrap().capabilities.inference);
        assert!(!config.stage("post").unwrap().capabilities.inference);
        assert_eq!(config.stage("rag").unwrap().queue_capacity, 1024);
    }

    #[test]
    fn stage_sections_overlay_the_defaults() {
        let config = parse(
            "[stages.rag]\nworkers = 4\nplugin = \"p/rag.wasm\"\nconfig = { top_k = 5 }\n[stages.post]\ninstance_mode = \"per-request\"",
        )
        .unwrap();
        let rag = config.stage("rag").unwrap();
        assert_eq!(rag.workers, 4);
        assert_eq!(
            rag.plugin.as_deref(),
            Some(Path::new("/etc/orchestrator/p/rag.wasm"))
        );
        assert_eq!(rag.config["top_k"], "5");
        assert_eq!(rag.config["corpus_dir"], "/corpus", "defaults kept");
        assert_eq!(rag.capabilities.dirs.len(), 1, "grants kept");
        assert_eq!(
            config.stage("post").unwrap().instance_mode,
            InstanceMode::PerRequest
        );
    }

    #[test]
    fn backends_and_routes_merge_over_the_defaults() {
        let config = parse(
            "[backends.llama]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:8081/v1\"\napi_key_env = \"LLAMA_KEY\"\nmax_retries = 0\n[routing]\nmodels = { gemma = \"llama\" }\ndefault = \"llama\"",
        )
        .unwrap();
        assert_eq!(config.backends.len(), 2, "echo kept");
        let llama = &config.backends["llama"];
        assert_eq!(llama.kind, BackendKind::Openai);
        assert_eq!(llama.api_key_env.as_deref(), Some("LLAMA_KEY"));
        assert_eq!(llama.max_retries, 0);
        assert_eq!(llama.request_timeout_ms, 30_000, "defaults filled in");
        assert_eq!(config.routing.models["gemma"], "llama");
        assert_eq!(config.routing.models["echo"], "echo");
        assert_eq!(config.routing.default.as_deref(), Some("llama"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[stages.rag]\nworkerz = 4").unwrap_err().to_string();
        assert!(err.contains("workerz"), "{err}");
        let err = parse("[stages.ragg]\nworkers = 4").unwrap_err().to_string();
        assert!(err.contains("ragg"), "{err}");
        let err = parse("listen = 5").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for (open, close) in [("[", "]"), ("{ a = ", "}")] {
            let text = format!("x = {}1{}", open.repeat(50_000), close.repeat(50_000));
            assert!(parse(&text).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let _ = parse(&text);
        }

        #[test]
        fn arbitrary_stage_sections_never_panic(
            stage in proptest::sample::select(STAGES.to_vec()),
            key in "[a-z_]{1,20}",
            value in proptest::prop_oneof![
                "-?[0-9]{1,22}",
                "\"[a-z/ ]{0,10}\"",
                proptest::strategy::Just("true".to_string()),
                proptest::strategy::Just("[1, \"a\"]".to_string()),
                proptest::strategy::Just("{ x = 1 }".to_string()),
            ],
        ) {
            let _ = parse(&format!("[stages.{stage}]\n{key} = {value}\n"));
        }
    }

    #[test]
    fn invalid_values_are_named() {
        let err = parse("[stages.post]\nworkers = 0").unwrap_err().to_string();
        assert!(err.contains("stages.post.workers"), "{err}");
        let err = parse("[stages.rag.config]\nx = [1]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stages.rag.config.x"), "{err}");
        let err = parse("[routing.models]\ngpt = \"openai\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("routing.models.gpt"), "{err}");
        let err = parse("[backends.up]\nkind = \"openai\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("backends.up.base_url"), "{err}");
        let err = parse(
            "[backends.up]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\nfailover = \"up\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("backends.up.failover"), "{err}");
        let err = parse("[backends.up]\nkind = \"grpc\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("grpc"), "{err}");
        let err = parse("[stages.stream]\ninstance_mode = \"sometimes\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("instance_mode") || err.contains("sometimes"),
            "{err}"
        );
    }
}
