//! The configuration file: parsing, the overlay over the defaults, relative
//! paths, and range checks.

use std::path::{Path, PathBuf};

use super::backend::BackendKind;
use crate::files::read_bounded;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
use super::settings::{Config, ConfigError};
use super::stage::{Stage, StageConfig};

impl Config {
    /// Read `path` over the defaults. Relative paths in the file are
    /// resolved against the file's directory.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let bytes = read_bounded(path, MAX_CONFIG_BYTES).map_err(read_error)?;
        let text = String::from_utf8(bytes)
            .map_err(|e| read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
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
        let parse_error = |message: String| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: message.trim_end().to_string(),
        };
        let mut file: toml::Table = toml::from_str(text).map_err(|e| parse_error(e.to_string()))?;
        prepare_stages(&mut file)?;
        resolve_paths(&mut file, base)?;
        let mut merged = toml::Table::try_from(Config::default())
            .map_err(|e| parse_error(format!("the defaults cannot be laid out: {e}")))?;
        overlay(&mut merged, file);
        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Check ranges. Called by the loaders; call it again after changing
    /// fields by hand.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bounds = [
            ("request_timeout_ms", self.request_timeout_ms, 1, MAX_MS),
            ("stream_stall_ms", self.stream_stall_ms, 1, MAX_MS),
            (
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                1,
                MAX_MS,
            ),
            ("shutdown_grace_ms", self.shutdown_grace_ms, 1, MAX_MS),
            ("max_body_bytes", self.max_body_bytes, 1, GIB),
            ("max_plugin_bytes", self.max_plugin_bytes, 1, GIB),
            ("max_connections", self.max_connections as u64, 1, 1_000_000),
        ];
        for (key, value, min, max) in bounds {
            within(key.into(), value, min, max)?;
        }
        if self.watch && self.plugins_dir.is_none() {
            return invalid(
                "watch".into(),
                "needs a plugins directory (`plugins_dir` or --plugins)",
            );
        }
        self.validate_backends()?;
        self.validate_tracing()?;
        for stage in &self.stages {
            validate_stage(stage)?;
            self.validate_grants(stage)?;
        }
        Ok(())
    }

    /// A stage may not be granted the artifact cache (native code the host
    /// runs), its key (a sibling), or a directory holding them.
    fn validate_grants(&self, stage: &StageConfig) -> Result<(), ConfigError> {
        let Some(cache) = &self.cache_dir else {
            return Ok(());
        };
        let canonical = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let cache = canonical(cache);
        for (n, dir) in stage.capabilities.dirs.iter().enumerate() {
            let host = canonical(&dir.host);
            if host.starts_with(&cache) || cache.starts_with(&host) {
                return invalid(
                    format!("stages.{}.capabilities.dirs[{n}].host", stage.name()),
                    &format!(
                        "would expose the compiled-artifact cache ({}) to the plugin",
                        cache.display()
                    ),
                );
            }
        }
        Ok(())
    }

    fn validate_tracing(&self) -> Result<(), ConfigError> {
        let tracing = &self.tracing;
        within(
            "tracing.max_queued_spans".into(),
            tracing.max_queued_spans as u64,
            1,
            1_000_000,
        )?;
        within(
            "tracing.export_timeout_ms".into(),
            tracing.export_timeout_ms,
            1,
            MAX_MS,
        )?;
        if let Some(ratio) = tracing.sampling_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return invalid("tracing.sampling_ratio".into(), "must be between 0 and 1");
        }
        if let Some(endpoint) = &tracing.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return invalid(
                "tracing.endpoint".into(),
                "must be an http:// or https:// URL (OTLP/HTTP)",
            );
        }
        Ok(())
    }

    fn validate_backends(&self) -> Result<(), ConfigError> {
        for (name, backend) in &self.backends {
            let key = |field: &str| format!("backends.{name}.{field}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return invalid(
                    format!("backends.{name}"),
                    "names may use only ASCII letters, digits, `-` and `_`",
                );
            }
            match (backend.kind, &backend.base_url) {
                (BackendKind::Openai, None) => {
                    return invalid(key("base_url"), "is required for kind \"openai\"");
                }
                (BackendKind::Openai, Some(url))
                    if !(url.starts_with("http://") || url.starts_with("https://")) =>
                {
                    return invalid(
                        key("base_url"),
                        &format!("must be an http:// or https:// URL, got {url:?}"),
                    );
                }
                _ => {}
            }
            for (field, value, min, max) in [
                ("request_timeout_ms", backend.request_timeout_ms, 1, MAX_MS),
                ("connect_timeout_ms", backend.connect_timeout_ms, 1, MAX_MS),
                ("max_concurrent", backend.max_concurrent as u64, 1, 100_000),
                ("max_retries", u64::from(backend.max_retries), 0, 100),
                (
                    "max_tokens_limit",
                    u64::from(backend.max_tokens_limit),
                    1,
                    u64::from(u32::MAX),
                ),
                ("retry_backoff_ms", backend.retry_backoff_ms, 0, MAX_MS),
                (
                    "breaker_failures",
                    u64::from(backend.breaker_failures),
                    1,
                    u64::from(u32::MAX),
                ),
                (
                    "breaker_cooldown_ms",
                    backend.breaker_cooldown_ms,
                    0,
                    MAX_MS,
                ),
                (
                    "breaker_probes",
                    u64::from(backend.breaker_probes),
                    1,
                    10_000,
                ),
            ] {
                within(key(field), value, min, max)?;
            }
            if let Some(other) = &backend.failover
                && (other == name || !self.backends.contains_key(other))
            {
                return invalid(
                    key("failover"),
                    &format!("names {other:?}, which is not another configured backend"),
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
                    &format!(
                        "names backend {backend:?}, which is not configured (backends: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }
}

/// Longest duration any `*_ms` setting may have: a day.
const MAX_MS: u64 = 24 * 60 * 60 * 1000;
const GIB: u64 = 1 << 30;

/// Check that `value` of `key` is in `min..=max`.
fn within(key: String, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        let message = match (min, max) {
            (1, u64::MAX) => "must be at least 1".to_string(),
            (min, u64::MAX) => format!("must be at least {min}"),
            (min, max) => format!("must be between {min} and {max}"),
        };
        return invalid(key, &message);
    }
    Ok(())
}

fn invalid(key: String, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        message: message.into(),
    })
}

fn validate_stage(stage: &StageConfig) -> Result<(), ConfigError> {
    let key = |field: &str| format!("stages.{}.{field}", stage.name());
    for (field, value, min, max) in [
        ("workers", stage.workers as u64, 1, 256),
        // The queue's slots are allocated up front.
        ("queue_capacity", stage.queue_capacity as u64, 1, 65_536),
        ("recycle_after", stage.recycle_after, 1, u64::MAX),
        ("timeout_ms", stage.timeout_ms, 1, MAX_MS),
        // One wasm page to the whole 32-bit address space.
        (
            "max_memory_bytes",
            stage.max_memory_bytes as u64,
            65_536,
            4 * GIB,
        ),
        (
            "max_output_bytes",
            stage.max_output_bytes as u64,
            1,
            4 * GIB,
        ),
        ("fuel", stage.fuel.unwrap_or(1), 1, u64::MAX),
        (
            "breaker_failures",
            u64::from(stage.breaker_failures),
            1,
            u64::from(u32::MAX),
        ),
        ("breaker_cooldown_ms", stage.breaker_cooldown_ms, 0, MAX_MS),
        ("breaker_probes", u64::from(stage.breaker_probes), 1, 10_000),
    ] {
        within(key(field), value, min, max)?;
    }
    for (n, dir) in stage.capabilities.dirs.iter().enumerate() {
        if !dir.guest.starts_with('/') {
            return invalid(
                key(&format!("capabilities.dirs[{n}].guest")),
                "must be an absolute guest path such as \"/corpus\"",
            );
        }
    }
    Ok(())
}

/// Lay `file` over `defaults`: tables merge key by key, anything else
/// replaces the default.
fn overlay(defaults: &mut toml::Table, file: toml::Table) {
    for (key, value) in file {
        match (defaults.get_mut(&key), value) {
            (Some(toml::Value::Table(base)), toml::Value::Table(table)) => overlay(base, table),
            (_, value) => {
                defaults.insert(key, value);
            }
        }
    }
}

/// Make the relative paths the file gives (`plugins_dir`, `cache_dir`, a
/// stage's `plugin` and its `dirs` grants) relative to `base`, the file's
/// directory. Only the file's own paths: the defaults are left as they are.
fn resolve_paths(file: &mut toml::Table, base: &Path) -> Result<(), ConfigError> {
    let resolve = |key: String, value: &mut toml::Value| -> Result<(), ConfigError> {
        let toml::Value::String(text) = value else {
            return Ok(()); // the wrong type is reported by deserialization
        };
        if Path::new(text.as_str()).is_relative() {
            *text = base
                .join(text.as_str())
                .into_os_string()
                .into_string()
                .map_err(|_| ConfigError::Invalid {
                    key,
                    message: "resolves to a path that is not UTF-8".into(),
                })?;
        }
        Ok(())
    };
    for key in ["plugins_dir", "cache_dir"] {
        if let Some(value) = file.get_mut(key) {
            resolve(key.into(), value)?;
        }
    }
    let Some(toml::Value::Table(stages)) = file.get_mut("stages") else {
        return Ok(());
    };
    for (name, stage) in stages.iter_mut() {
        let toml::Value::Table(stage) = stage else {
            continue;
        };
        if let Some(plugin) = stage.get_mut("plugin") {
            resolve(format!("stages.{name}.plugin"), plugin)?;
        }
        let dirs = match stage.get_mut("capabilities") {
            Some(toml::Value::Table(capabilities)) => capabilities.get_mut("dirs"),
            _ => None,
        };
        let Some(toml::Value::Array(dirs)) = dirs else {
            continue;
        };
        for (n, dir) in dirs.iter_mut().enumerate() {
            if let toml::Value::Table(dir) = dir
                && let Some(host) = dir.get_mut("host")
            {
                resolve(format!("stages.{name}.capabilities.dirs[{n}].host"), host)?;
            }
        }
    }
    Ok(())
}

/// Check the file's `[stages.*]` names, and turn the values of each
/// stage's `config` table into the strings `init` receives.
fn prepare_stages(file: &mut toml::Table) -> Result<(), ConfigError> {
    let Some(toml::Value::Table(stages)) = file.get_mut("stages") else {
        return Ok(());
    };
    for (name, stage) in stages.iter_mut() {
        if Stage::from_name(name).is_none() {
            return Err(ConfigError::Invalid {
                key: format!("stages.{name}"),
                message: format!("is not a stage; the stages are {}", Stage::names()),
            });
        }
        let Some(toml::Value::Table(config)) = stage.get_mut("config") else {
            continue;
        };
        for (key, value) in config.iter_mut() {
            let text = match value {
                toml::Value::String(_) => continue,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::Invalid {
                        key: format!("stages.{name}.config.{key}"),
                        message: "must be a string, number or boolean".into(),
                    });
                }
            };
            *value = toml::Value::String(text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::stage::InstanceMode;
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
            "[stages.rag]\nworkers = 4\nplugin = \"p/rag.wasm\"\nconfig = { top_k = 5 }\n[stages.post]\ninstance_mode = \"per-request\"\nfuel = 1000",
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
        assert_eq!(rag.queue_capacity, 1024, "defaults kept");
        let post = config.stage("post").unwrap();
        assert_eq!(post.instance_mode, InstanceMode::PerRequest);
        assert_eq!(post.fuel, Some(1000));
        assert_eq!(config.stages[3].stage, Stage::Post, "pipeline order");
    }

    #[test]
    fn only_the_files_own_relative_paths_are_rebased() {
        let config = parse("plugins_dir = \"p\"\ncache_dir = \"/abs/cache\"").unwrap();
        assert_eq!(
            config.plugins_dir.as_deref(),
            Some(Path::new("/etc/orchestrator/p"))
        );
        assert_eq!(config.cache_dir.as_deref(), Some(Path::new("/abs/cache")));
        let defaults = Config::default();
        assert_eq!(
            config.stage("rag").unwrap().capabilities.dirs,
            defaults.stage("rag").unwrap().capabilities.dirs,
            "a default grant is kept as it is"
        );
    }

    #[test]
    fn capabilities_replace_key_by_key_and_paths_resolve() {
        let config = parse(
            "[stages.rag.capabilities]\ndirs = [{ host = \"docs\", guest = \"/docs\" }]\n[stages.inference.capabilities]\nenv = [\"LANG\"]",
        )
        .unwrap();
        let rag = config.stage("rag").unwrap();
        assert_eq!(rag.capabilities.dirs.len(), 1);
        assert_eq!(
            rag.capabilities.dirs[0].host,
            Path::new("/etc/orchestrator/docs")
        );
        let inference = config.stage("inference").unwrap();
        assert!(inference.capabilities.inference, "the other keys are kept");
        assert_eq!(inference.capabilities.env, ["LANG"]);
    }

    #[test]
    fn backends_and_routes_merge_over_the_defaults() {
        let config = parse(
            "admin_token = \"t\"\n[backends.llama]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:8081/v1\"\napi_key_env = \"LLAMA_KEY\"\nmax_retries = 0\n[routing]\nmodels = { gemma = \"llama\" }\ndefault = \"llama\"",
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
        assert!(config.admin_token.is_some_and(|t| t.matches("t")));
        assert!(parse("admin_token = \" \"").unwrap().admin_token.is_none());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse("[stages.rag]\nworkerz = 4").unwrap_err().to_string();
        assert!(err.contains("workerz"), "{err}");
        let err = parse("[stages.ragg]\nworkers = 4").unwrap_err().to_string();
        assert!(err.contains("ragg"), "{err}");
        let err = parse("listen = 5").unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let err = parse("lissen = \"x\"").unwrap_err().to_string();
        assert!(err.contains("lissen"), "{err}");
        let err = parse("[backends.up]\nkind = \"openai\"\nbase_uri = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("base_uri"), "{err}");
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
            stage in proptest::sample::select(Stage::ALL.map(Stage::name).to_vec()),
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
        let err = parse("[stages.rag]\nworkers = -1").unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
    }
}
