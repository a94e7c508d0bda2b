//! Range and consistency checks of a whole configuration ([`Config::validate`]).

use std::path::Path;

use super::backend::BackendKind;
use super::pipeline::DEFAULT_PIPELINE;
use super::settings::stages_by_name::MAX_STAGES;
use super::settings::{Config, ConfigError};
use super::stage::{StageConfig, intern, interned_out, valid_name};
use super::store::StoreKind;

impl Config {
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
            ("max_header_bytes", self.max_header_bytes, 8192, 1024 * 1024),
            ("max_plugin_bytes", self.max_plugin_bytes, 1, GIB),
            ("max_connections", self.max_connections as u64, 1, 1_000_000),
        ];
        for (key, value, min, max) in bounds {
            within(key.into(), value, min, max)?;
        }
        self.validate_backends()?;
        self.validate_pipelines()?;
        self.validate_routes()?;
        self.validate_tracing()?;
        self.validate_stores()?;
        for stage in &self.stages {
            validate_stage(stage)?;
            self.validate_grants(stage)?;
        }
        Ok(())
    }

    /// The rules of [`super::pipeline`]'s module docs that need no plugin
    /// loaded.
    fn validate_pipelines(&self) -> Result<(), ConfigError> {
        if self.pipelines.len() > MAX_STAGES {
            return invalid(
                "pipelines".to_string(),
                &format!(
                    "{} pipelines: a configuration declares at most {MAX_STAGES}",
                    self.pipelines.len()
                ),
            );
        }
        if !self.pipelines.contains_key(DEFAULT_PIPELINE) {
            return invalid(
                format!("pipelines.{DEFAULT_PIPELINE}"),
                "is required: models without a pipeline of their own use it",
            );
        }
        let declared = || {
            self.stages
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (name, pipeline) in &self.pipelines {
            let key = format!("pipelines.{name}.stages");
            if !valid_name(name) {
                return invalid(
                    format!("pipelines.{name}"),
                    "pipeline names use 1 to 64 lower-case ASCII letters, digits, `-` and `_`",
                );
            }
            // Interned here, where a refusal can be reported, so that the
            // snapshot built from the configuration finds it.
            if intern(name).is_none() {
                return invalid(format!("pipelines.{name}"), &interned_out());
            }
            if pipeline.stages.is_empty() {
                return invalid(key, "must name at least one stage");
            }
            let mut generating: Option<&str> = None;
            for (n, stage) in pipeline.stages.iter().enumerate() {
                let Some(settings) = self.stage(stage) else {
                    return invalid(
                        key,
                        &format!(
                            "names stage `{stage}`, which is not declared (declare it as [stages.{stage}]; the declared stages are {})",
                            declared()
                        ),
                    );
                };
                if pipeline.stages[..n].contains(stage) {
                    return invalid(
                        key,
                        &format!(
                            "names stage `{stage}` twice; to run a plugin twice, declare a second stage running it"
                        ),
                    );
                }
                if settings.capabilities.inference {
                    if let Some(first) = generating {
                        return invalid(
                            key,
                            &format!(
                                "has two stages granted inference (`{first}` and `{stage}`): a pipeline has at most one stage that starts the generation"
                            ),
                        );
                    }
                    generating = Some(stage);
                }
            }
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

    fn validate_stores(&self) -> Result<(), ConfigError> {
        for (name, store) in &self.stores {
            let key = |k: &str| format!("stores.{name}.{k}");
            if !valid_name(name) {
                return invalid(
                    format!("stores.{name}"),
                    "a store name is lower-case letters, digits, `-` and `_` (at most 64)",
                );
            }
            within(key("timeout_ms"), store.timeout_ms, 1, MAX_MS)?;
            within(key("max_keys"), store.max_keys, 1, 10_000_000)?;
            within(key("max_bytes"), store.max_bytes, 1024, 1 << 40)?;
            match store.kind {
                StoreKind::Memory => {
                    if store.url.is_some() || store.url_env.is_some() {
                        return invalid(key("url"), "a `memory` store has no URL");
                    }
                }
                StoreKind::Redis => match (&store.url, &store.url_env) {
                    (None, None) => {
                        return invalid(key("url"), "a `redis` store needs `url` or `url_env`");
                    }
                    (Some(url), None)
                        if !url.starts_with("redis://") && !url.starts_with("rediss://") =>
                    {
                        return invalid(key("url"), "must start with redis:// or rediss://");
                    }
                    _ => {}
                },
            }
        }
        // Stores on one Redis must not see each other's keys: no store's
        // `<key_prefix><name>:` may start another's.
        let spaces: Vec<(&String, String, Option<&String>)> = self
            .stores
            .iter()
            .filter(|(_, s)| s.kind == StoreKind::Redis)
            .map(|(name, s)| {
                (
                    name,
                    format!("{}{name}:", s.key_prefix),
                    s.url_env.as_ref().or(s.url.as_ref()),
                )
            })
            .collect();
        for (a, prefix_a, server_a) in &spaces {
            for (b, prefix_b, server_b) in &spaces {
                if a != b && server_a == server_b && prefix_b.starts_with(prefix_a.as_str()) {
                    return invalid(
                        format!("stores.{b}.key_prefix"),
                        &format!(
                            "its keys (`{prefix_b}...`) would be keys of store `{a}` (`{prefix_a}...`) on the same server"
                        ),
                    );
                }
            }
        }
        for stage in &self.stages {
            for header in &stage.capabilities.headers {
                if header.is_empty()
                    || !header
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                {
                    return invalid(
                        format!("stages.{}.capabilities.headers", stage.name()),
                        &format!("`{header}` is not a header name"),
                    );
                }
            }
            for store in &stage.capabilities.stores {
                if !valid_name(store) {
                    return invalid(
                        format!("stages.{}.capabilities.stores", stage.name()),
                        &format!(
                            "`{store}` is not a store name (lower-case letters, digits, `-`, `_`)"
                        ),
                    );
                }
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
        Ok(())
    }
}

impl Config {
    /// Every route names a configured backend and pipeline.
    fn validate_routes(&self) -> Result<(), ConfigError> {
        let routing = &self.routing;
        let models = routing.models.iter().flat_map(|(model, route)| {
            let key = format!("routing.models.{model}");
            [
                (key.clone(), "backend", route.backend.as_str()),
                (key, "pipeline", route.pipeline()),
            ]
        });
        let defaults = [
            ("routing.default", "backend", routing.default.as_deref()),
            (
                "routing.default_pipeline",
                "pipeline",
                routing.default_pipeline.as_deref(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, kind, name)| Some((key.to_string(), kind, name?)));
        for (key, kind, name) in models.chain(defaults) {
            let known: Vec<&str> = match kind {
                "backend" => self.backends.keys().map(String::as_str).collect(),
                _ => self.pipelines.keys().map(String::as_str).collect(),
            };
            if !known.contains(&name) {
                return invalid(
                    key,
                    &format!(
                        "names {kind} {name:?}, which is not configured ({kind}s: {})",
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

pub(super) fn invalid(key: String, message: &str) -> Result<(), ConfigError> {
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
