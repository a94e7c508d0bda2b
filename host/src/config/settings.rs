//! The whole configuration ([`Config`]) and its defaults, the admin token,
//! and how a configuration is wrong ([`ConfigError`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::backend::{BackendConfig, BackendKind, RoutingConfig};
use super::paths::default_cache_dir;
use super::pipeline::{ModelRoute, PipelineConfig, default_pipelines};
use super::stage::{Bundled, StageConfig, intern, valid_name};
use super::store::StoreConfig;
use super::traces::TracingConfig;

/// A configuration error, naming the offending key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key.
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

/// The admin bearer token. Its `Debug` never shows it, and it is never
/// serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; `None` for an empty string (which would protect nothing).
    pub fn new(token: impl Into<String>) -> Option<AdminToken> {
        let token = token.into();
        (!token.trim().is_empty()).then_some(AdminToken(token))
    }

    /// Constant-time check of a presented token: both sides are hashed,
    /// then the digests compared without early exit.
    pub fn matches(&self, presented: &str) -> bool {
        let expected = Sha256::digest(self.0.as_bytes());
        let given = Sha256::digest(presented.as_bytes());
        expected
            .iter()
            .zip(given.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the OpenAI-compatible API.
    pub listen: SocketAddr,
    /// Address of `/metrics` and `/health`.
    pub metrics_listen: SocketAddr,
    /// Address of the admin API, if it should not share the API's: then
    /// the API's `/admin/...` paths answer 404, and the admin API is served
    /// only here (keep it on a private interface).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// Directory searched for `<stage>.wasm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins_dir: Option<PathBuf>,
    /// Compiled-artifact cache directory; `None` disables the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// End-to-end deadline of one request (504 when it expires).
    pub request_timeout_ms: u64,
    /// How long a streamed answer waits for a client that does not read
    /// before it is cut: the generation is cancelled and the request's
    /// queue reservations and backend permit are freed (a client that
    /// stops reading must not hold admission slots until its deadline).
    pub stream_stall_ms: u64,
    /// The whole drain on SIGTERM: requests in flight get until then, and
    /// streams still open near its end are ended with an error event. Keep
    /// it below the orchestrator's own kill deadline (Kubernetes:
    /// `terminationGracePeriodSeconds` minus any `preStop` wait).
    pub shutdown_grace_ms: u64,
    /// Largest accepted request body.
    pub max_body_bytes: u64,
    /// Open connections the API accepts at once; more are closed at once.
    /// Lowered at startup, if needed, to leave 256 of the process's file
    /// descriptors for everything else.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (on a new connection
    /// and between requests on a kept-alive one).
    pub header_read_timeout_ms: u64,
    /// Largest request line and headers the API reads, in bytes; a larger
    /// head is answered 431 (at least 8,192).
    pub max_header_bytes: u64,
    /// Largest plugin accepted by `PUT /admin/stages/{stage}`.
    pub max_plugin_bytes: u64,
    /// Bearer token of the admin API; the API is off without one.
    #[serde(default, skip_serializing, deserialize_with = "admin_token")]
    pub admin_token: Option<AdminToken>,
    /// Swap in `<plugins_dir>/<stage>.wasm` when it changes on disk.
    pub watch: bool,
    /// Inference backends by name (`echo` is predefined).
    pub backends: BTreeMap<String, BackendConfig>,
    /// Model → backend routing.
    pub routing: RoutingConfig,
    /// Every declared stage (a table by stage name in the file): the five
    /// defaults first, in the default pipeline's order, then the others by
    /// name.
    #[serde(with = "stages_by_name")]
    pub stages: Vec<StageConfig>,
    /// The pipelines by name (`default` is the five default stages).
    pub pipelines: BTreeMap<String, PipelineConfig>,
    /// Key-value stores by name (`[stores.<name>]`).
    #[serde(default)]
    pub stores: BTreeMap<String, StoreConfig>,
    /// OpenTelemetry trace export (`[tracing]`).
    #[serde(default)]
    pub tracing: TracingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_listen: None,
            plugins_dir: None,
            cache_dir: default_cache_dir(),
            request_timeout_ms: 30_000,
            stream_stall_ms: 10_000,
            shutdown_grace_ms: 25_000,
            max_body_bytes: 1024 * 1024,
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 32 * 1024,
            max_plugin_bytes: 64 * 1024 * 1024,
            admin_token: None,
            watch: false,
            backends: BTreeMap::from([(
                "echo".to_string(),
                BackendConfig::of_kind(BackendKind::Echo),
            )]),
            routing: RoutingConfig {
                models: BTreeMap::from([("echo".to_string(), ModelRoute::from("echo"))]),
                default: None,
                default_pipeline: None,
            },
            stages: Bundled::DEFAULT_PIPELINE
                .map(StageConfig::bundled_default)
                .to_vec(),
            pipelines: default_pipelines(),
            stores: BTreeMap::new(),
            tracing: TracingConfig::default(),
        }
    }
}

impl Config {
    /// The settings of store `name`: as declared, or a `memory` store with
    /// the defaults.
    pub fn store(&self, name: &str) -> StoreConfig {
        self.stores.get(name).cloned().unwrap_or_default()
    }

    /// The settings of stage `name`.
    pub fn stage(&self, name: &str) -> Option<&StageConfig> {
        self.stages.iter().find(|s| s.name() == name)
    }

    /// The stages some pipeline names, in order of first appearance (the
    /// default pipeline's first): the stages the host loads and runs. A
    /// declared stage no pipeline names is not loaded.
    pub fn stages_in_use(&self) -> Vec<&StageConfig> {
        let mut names: Vec<&str> = Vec::new();
        let default = self.pipelines.get(super::pipeline::DEFAULT_PIPELINE);
        let others = self
            .pipelines
            .iter()
            .filter(|(name, _)| *name != super::pipeline::DEFAULT_PIPELINE)
            .map(|(_, p)| p);
        for pipeline in default.into_iter().chain(others) {
            for stage in &pipeline.stages {
                if !names.contains(&stage.as_str()) {
                    names.push(stage);
                }
            }
        }
        names.into_iter().filter_map(|n| self.stage(n)).collect()
    }

    /// A digest of the configuration (its canonical TOML form, without
    /// the admin token): 16 hex digits, in `/health` and
    /// `orchestrator_config_info{hash}`.
    pub fn hash(&self) -> String {
        let text = toml::to_string(self).unwrap_or_default();
        let digest = Sha256::digest(text.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `admin_token = "..."`: an empty token is no token.
fn admin_token<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<AdminToken>, D::Error> {
    Ok(AdminToken::new(String::deserialize(deserializer)?))
}

/// `Config::stages` as a table keyed by stage name, read back in pipeline
/// order.
pub(super) mod stages_by_name {
    /// The most `[stages.<name>]` sections a configuration may have.
    pub const MAX_STAGES: usize = 256;

    use std::collections::BTreeMap;

    use super::*;

    pub fn serialize<S: Serializer>(stages: &[StageConfig], s: S) -> Result<S::Ok, S::Error> {
        let by_name: BTreeMap<&str, &StageConfig> =
            stages.iter().map(|stage| (stage.name(), stage)).collect();
        by_name.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StageConfig>, D::Error> {
        let mut by_name = BTreeMap::<String, StageConfig>::deserialize(d)?;
        // Checked before any name is interned (interned names live as
        // long as the process, so a refused file must not add many).
        if by_name.len() > MAX_STAGES {
            return Err(D::Error::custom(format!(
                "{} stages: a configuration declares at most {MAX_STAGES}",
                by_name.len()
            )));
        }
        let mut stages = Vec::with_capacity(by_name.len());
        for bundled in Bundled::DEFAULT_PIPELINE {
            if let Some(mut settings) = by_name.remove(bundled.name()) {
                settings.name = bundled.name();
                stages.push(settings);
            }
        }
        for (name, mut settings) in by_name {
            if !valid_name(&name) {
                return Err(D::Error::custom(format!(
                    "stage name `{name}`: use 1 to 64 lower-case ASCII letters, digits, `-` and `_`"
                )));
            }
            settings.name = intern(&name).ok_or_else(|| {
                D::Error::custom(format!(
                    "stage name `{name}`: {}",
                    crate::config::stage::interned_out()
                ))
            })?;
            stages.push(settings);
        }
        Ok(stages)
    }
}
