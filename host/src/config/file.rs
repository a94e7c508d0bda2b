//! The configuration file: parsing, the overlay over the defaults, relative
//! paths, and range checks.

use std::path::{Path, PathBuf};

use crate::files::read_bounded;

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
use super::settings::{Config, ConfigError};
use super::stage::{Bundled, DEMO_CORPUS_MODELS, StageConfig, valid_name};
use super::validate::invalid;

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
        let declared: Vec<String> = match file.get("stages") {
            Some(toml::Value::Table(stages)) => stages.keys().cloned().collect(),
            _ => Vec::new(),
        };
        resolve_paths(&mut file, base)?;
        let mut merged = toml::Table::try_from(Config::default())
            .map_err(|e| parse_error(format!("the defaults cannot be laid out: {e}")))?;
        declare_stages(&mut merged, &file)?;
        own_corpus_serves_every_model(&mut merged, &file);
        overlay(&mut merged, file);
        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| parse_error(e.to_string()))?;
        config.validate()?;
        // A stage the file declares but no pipeline runs is most likely a
        // typo (`[stages.ragg]`): say so rather than ignore it.
        for name in declared {
            if !config.pipelines.values().any(|p| p.stages.contains(&name)) {
                let pipelines: Vec<String> = config
                    .pipelines
                    .iter()
                    .map(|(n, p)| format!("{n} = [{}]", p.stages.join(", ")))
                    .collect();
                return invalid(
                    format!("stages.{name}"),
                    &format!(
                        "is declared, but no pipeline runs it; add it to a pipeline's `stages` \
                         (pipelines: {})",
                        pipelines.join("; ")
                    ),
                )
                .map(|()| config);
            }
        }
        Ok(config)
    }
}

/// Give each stage the file declares that the defaults lack the defaults
/// of its bundled plugin (`bundled = "..."`, or the one it is named
/// after), or the plain defaults, so the file's keys overlay them. A
/// pipeline may also name a bundled plugin's stage (`auth`, `guard`, ...)
/// without declaring it: it runs with that plugin's defaults.
fn declare_stages(merged: &mut toml::Table, file: &toml::Table) -> Result<(), ConfigError> {
    let Some(toml::Value::Table(stages)) = merged.get_mut("stages") else {
        return Ok(());
    };
    if let Some(toml::Value::Table(pipelines)) = file.get("pipelines") {
        let named = pipelines
            .values()
            .filter_map(|p| p.get("stages")?.as_array())
            .flatten()
            .filter_map(toml::Value::as_str);
        for name in named {
            let declared = file.get("stages").and_then(|s| s.get(name)).is_some();
            if let Some(bundled) = Bundled::from_name(name)
                && !declared
                && !stages.contains_key(name)
            {
                let defaults = toml::Table::try_from(StageConfig::bundled_default(bundled))
                    .map_err(|e| ConfigError::Invalid {
                        key: format!("stages.{name}"),
                        message: format!("its defaults cannot be laid out: {e}"),
                    })?;
                stages.insert(name.to_owned(), toml::Value::Table(defaults));
            }
        }
    }
    let Some(toml::Value::Table(declared)) = file.get("stages") else {
        return Ok(());
    };
    for (name, stage) in declared {
        if stages.contains_key(name) {
            continue;
        }
        let bundled = match stage.get("bundled") {
            Some(toml::Value::String(plugin)) => Some(Bundled::from_name(plugin).ok_or_else(
                || ConfigError::Invalid {
                    key: format!("stages.{name}.bundled"),
                    message: format!(
                        "`{plugin}` is not a bundled plugin; they are {}",
                        Bundled::names()
                    ),
                },
            )?),
            _ => Bundled::from_name(name),
        };
        let defaults =
            // The name is not part of the table (nor interned here: the
            // file may yet be refused).
            toml::Table::try_from(StageConfig::default_for("", bundled)).map_err(|e| {
                ConfigError::Invalid {
                    key: format!("stages.{name}"),
                    message: format!("its defaults cannot be laid out: {e}"),
                }
            })?;
        stages.insert(name.clone(), toml::Value::Table(defaults));
    }
    Ok(())
}

/// The bundled `rag` stage's default grant is the demo corpus, which serves
/// only the `echo` model (its default `config.models`): a stage whose
/// `dirs` the file grants has a corpus of its own, which serves every model
/// unless the file names them.
fn own_corpus_serves_every_model(merged: &mut toml::Table, file: &toml::Table) {
    let (Some(toml::Value::Table(declared)), Some(toml::Value::Table(stages))) =
        (file.get("stages"), merged.get_mut("stages"))
    else {
        return;
    };
    for (name, stage) in declared {
        let grants_dirs = stage
            .get("capabilities")
            .and_then(|c| c.get("dirs"))
            .is_some();
        let names_models = stage.get("config").and_then(|c| c.get("models")).is_some();
        if grants_dirs
            && !names_models
            && let Some(toml::Value::Table(config)) =
                stages.get_mut(name).and_then(|s| s.get_mut("config"))
            && config.get("models").and_then(toml::Value::as_str) == Some(DEMO_CORPUS_MODELS)
        {
            config.remove("models");
        }
    }
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
/// stage's `config` table into the strings `init` receives: scalars as
/// their text, lists and tables as their JSON.
fn prepare_stages(file: &mut toml::Table) -> Result<(), ConfigError> {
    let Some(toml::Value::Table(stages)) = file.get_mut("stages") else {
        return Ok(());
    };
    for (name, stage) in stages.iter_mut() {
        if !valid_name(name) {
            return Err(ConfigError::Invalid {
                key: format!("stages.{name}"),
                message: "stage names use 1 to 64 lower-case ASCII letters, digits, `-` and `_`"
                    .into(),
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
                // A list or table (a rate limiter's rules) reaches `init`
                // as its JSON text, which the SDK reads back.
                toml::Value::Array(_) | toml::Value::Table(_) => serde_json::to_string(&*value)
                    .map_err(|e| ConfigError::Invalid {
                        key: format!("stages.{name}.config.{key}"),
                        message: e.to_string(),
                    })?,
                toml::Value::Datetime(_) => {
                    return Err(ConfigError::Invalid {
                        key: format!("stages.{name}.config.{key}"),
                        message: "must be a string, number, boolean, list or table".into(),
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
    use super::super::backend::BackendKind;
    use super::super::stage::InstanceMode;
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/orchestrator"))
    }

    #[test]
    fn stores_on_one_redis_cannot_share_keys() {
        let url = "url = \"redis://127.0.0.1:6379/0\"";
        let ok =
            format!("[stores.a]\nkind = \"redis\"\n{url}\n[stores.b]\nkind = \"redis\"\n{url}\n");
        assert!(parse(&ok).is_ok());
        let nested = format!(
            "[stores.x]\nkind = \"redis\"\n{url}\nkey_prefix = \"foo:\"\n\
             [stores.y]\nkind = \"redis\"\n{url}\nkey_prefix = \"foo:x:\"\n"
        );
        let error = parse(&nested).unwrap_err().to_string();
        assert!(error.contains("stores.y.key_prefix"), "{error}");
        assert!(parse("[stores.m]\nkind = \"memory\"\nurl = \"redis://x\"\n").is_err());
        assert!(parse("[stores.r]\nkind = \"redis\"\n").is_err());
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
        assert_eq!(config.stages[3].name(), "post", "pipeline order");
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
        assert!(
            !rag.config.contains_key("models"),
            "a corpus of one's own serves every model"
        );
        let defaults = parse("").unwrap();
        assert_eq!(defaults.stage("rag").unwrap().config["models"], "echo");
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
        assert_eq!(config.routing.models["gemma"], "llama".into());
        assert_eq!(config.routing.models["echo"], "echo".into());
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

    #[test]
    fn more_than_256_stages_are_refused_before_their_names_are_kept() {
        let text: String = (0..257)
            .map(|i| format!("[stages.refused-{i}]\nbundled = \"post\"\n"))
            .collect();
        let error = format!("{:#}", parse(&text).unwrap_err());
        assert!(
            error.contains("stages: a configuration declares at most 256"),
            "{error}"
        );
        // Interned names live as long as the process: a refused file keeps
        // none (laying out the stages' defaults used to intern each).
        assert!((0..257).all(|i| !crate::config::stage::is_interned(&format!("refused-{i}"))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,300}") {
            let _ = parse(&text);
        }

        #[test]
        fn arbitrary_stage_sections_never_panic(
            stage in proptest::sample::select(vec!["rag", "post", "guard", "custom"]),
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
        let err = parse("[stages.rag.config]\nx = 1979-05-27T07:32:00Z")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stages.rag.config.x"), "{err}");
        // Lists and tables reach the stage as JSON.
        let config = parse("[stages.rag.config]\nx = [1, { a = \"b\" }]").unwrap();
        let rag = config.stage("rag").unwrap();
        assert_eq!(rag.config["x"], r#"[1,{"a":"b"}]"#);
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
