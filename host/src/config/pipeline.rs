//! Pipelines (`[pipelines.<name>]`) and where a model's requests go
//! (`[routing] models`): a backend and a pipeline.
//!
//! # Rules a pipeline must follow (checked at load and at every reload)
//!
//! - It names at least one stage, and only stages that are declared
//!   (`[stages.<name>]`, or one of the five defaults).
//! - No stage appears twice in it: a request holds one reservation per
//!   stage of its pipeline, and a stage's breaker and metrics count each
//!   request once.
//! - At most one of its stages is granted `inference`: that stage starts
//!   the request's generation; a second one would start another.
//! - (Warned of once the plugins are loaded, see `control::plan`: in the
//!   stages after the generating one, a streaming stage that follows a
//!   plain one no longer streams, since a streamed request's text reaches
//!   the stages after a plain stage only once the generation has ended. A
//!   valid pipeline, and a hot swap can make the same arrangement.)
//!
//! A stage may appear in several pipelines. It is then one stage: one
//! set of reservations, permits and instances, one breaker and one set of
//! metric series, shared by the requests of every pipeline that names it.
//! Its limits (`queue_capacity`, `workers`) are what the operator sized
//! for that plugin, and its metrics are what its dashboard row shows; to
//! give two pipelines separate capacity, declare two stages running the
//! same plugin.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::stage::Bundled;

/// The name of the pipeline that models without one of their own use.
pub const DEFAULT_PIPELINE: &str = "default";

/// One pipeline (`[pipelines.<name>]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Its stages, in the order a request passes through them.
    pub stages: Vec<String>,
}

impl PipelineConfig {
    /// The default pipeline: the five default stages.
    pub fn default_stages() -> PipelineConfig {
        PipelineConfig {
            stages: Bundled::DEFAULT_PIPELINE
                .map(|b| b.name().to_string())
                .to_vec(),
        }
    }
}

/// Where a model's requests go: `"backend"` in the file (the default
/// pipeline), or `{ backend = "...", pipeline = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    /// The backend that serves its generations.
    pub backend: String,
    /// The pipeline its requests run through; `None`: the default one.
    pub pipeline: Option<String>,
}

impl ModelRoute {
    /// The pipeline its requests run through.
    pub fn pipeline(&self) -> &str {
        self.pipeline.as_deref().unwrap_or(DEFAULT_PIPELINE)
    }
}

impl From<&str> for ModelRoute {
    fn from(backend: &str) -> ModelRoute {
        ModelRoute {
            backend: backend.to_string(),
            pipeline: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RouteForm {
    Backend(String),
    Full(RouteTable),
}

/// The table form; a mistyped key (`pipelne`) is an error, not ignored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTable {
    backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pipeline: Option<String>,
}

impl Serialize for ModelRoute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.pipeline {
            None => RouteForm::Backend(self.backend.clone()),
            Some(pipeline) => RouteForm::Full(RouteTable {
                backend: self.backend.clone(),
                pipeline: Some(pipeline.clone()),
            }),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelRoute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ModelRoute, D::Error> {
        // Untagged enums lose the inner error; say what the two forms are.
        let form = RouteForm::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a model routes to \"<backend>\" or { backend = \"<backend>\", pipeline = \"<pipeline>\" } \
                 (no other keys)",
            )
        })?;
        Ok(match form {
            RouteForm::Backend(backend) => ModelRoute {
                backend,
                pipeline: None,
            },
            RouteForm::Full(RouteTable { backend, pipeline }) => ModelRoute { backend, pipeline },
        })
    }
}

/// The default pipelines: `default`, the five default stages.
pub fn default_pipelines() -> BTreeMap<String, PipelineConfig> {
    BTreeMap::from([(
        DEFAULT_PIPELINE.to_string(),
        PipelineConfig::default_stages(),
    )])
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, PluginSource};

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("/etc/orchestrator")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_default_pipeline_is_the_five_and_models_use_it() {
        let config = parse("").unwrap();
        assert_eq!(
            config.pipelines[DEFAULT_PIPELINE].stages,
            ["rag", "assemble", "inference", "post", "stream"]
        );
        assert_eq!(config.routing.models["echo"].pipeline(), DEFAULT_PIPELINE);
        let names: Vec<&str> = config.stages_in_use().iter().map(|s| s.name()).collect();
        assert_eq!(names, ["rag", "assemble", "inference", "post", "stream"]);
    }

    #[test]
    fn a_new_stage_takes_the_defaults_of_the_plugin_it_runs() {
        let config = parse(
            "[stages.guard]\nconfig = { deny = 'x' }\n\
             [stages.second-post]\nbundled = \"post\"\nworkers = 1\n\
             [stages.mine]\nplugin = \"mine.wasm\"\n\
             [stages.gen]\nbundled = \"inference\"\n\
             [pipelines.default]\nstages = [\"guard\", \"assemble\", \"inference\", \"post\", \"second-post\", \"mine\", \"stream\"]\n\
             [pipelines.other]\nstages = [\"assemble\", \"gen\"]\n\
             [routing]\nmodels = { a = { backend = \"echo\", pipeline = \"other\" }, b = \"echo\" }",
        )
        .unwrap();
        let guard = config.stage("guard").unwrap();
        assert_eq!(guard.bundled, Some(Bundled::Guard));
        assert_eq!(guard.config["deny"], "x");
        let second = config.stage("second-post").unwrap();
        assert_eq!((second.bundled, second.workers), (Some(Bundled::Post), 1));
        assert_eq!(
            second.source(None),
            Some(PluginSource::Bundled(Bundled::Post))
        );
        let mine = config.stage("mine").unwrap();
        assert_eq!(mine.bundled, None);
        assert_eq!(
            mine.source(None),
            Some(PluginSource::File("/etc/orchestrator/mine.wasm".into()))
        );
        let generating = config.stage("gen").unwrap();
        assert!(generating.capabilities.inference, "inference's grant");
        assert_eq!(generating.timeout_ms, 30_000);
        assert_eq!(config.routing.models["a"].pipeline(), "other");
        assert_eq!(config.routing.models["b"].pipeline(), DEFAULT_PIPELINE);
        // `rag` is declared (a default) but unused: not loaded.
        let in_use: Vec<&str> = config.stages_in_use().iter().map(|s| s.name()).collect();
        assert_eq!(
            in_use,
            [
                "guard",
                "assemble",
                "inference",
                "post",
                "second-post",
                "mine",
                "stream",
                "gen"
            ]
        );
        assert_ne!(config.hash(), parse("").unwrap().hash());
        assert_eq!(config.hash().len(), 16);
    }

    #[test]
    fn a_pipeline_that_breaks_a_rule_is_refused_by_name() {
        let cases = [
            (
                "[pipelines.chat]\nstages = [\"rag\", \"nope\"]",
                &["pipelines.chat.stages", "`nope`", "not declared"][..],
            ),
            ("[pipelines.chat]\nstages = []", &["at least one stage"]),
            (
                "[pipelines.chat]\nstages = [\"post\", \"post\"]",
                &["`post` twice"],
            ),
            (
                "[stages.gen]\nbundled = \"inference\"\n[pipelines.chat]\nstages = [\"inference\", \"gen\"]",
                &["two stages granted inference", "`inference`", "`gen`"],
            ),
            (
                "[routing]\nmodels = { m = { backend = \"echo\", pipeline = \"none\" } }",
                &["routing.models.m", "\"none\""],
            ),
            (
                "[routing]\nmodels = { m = { pipeline = \"default\" } }",
                &["routing.models", "backend"],
            ),
            (
                "[routing]\nmodels = { m = { backend = \"echo\", pipelne = \"default\" } }",
                &["routing.models", "no other keys"],
            ),
            ("[pipelines.Chat]\nstages = [\"rag\"]", &["pipelines.Chat"]),
            ("[stages.Bad]\nworkers = 1", &["stages.Bad"]),
            (
                "[stages.x]\nbundled = \"nope\"",
                &["stages.x.bundled", "guard"],
            ),
            (
                "[stages.ragg]\nworkers = 4",
                &["stages.ragg", "no pipeline runs it"],
            ),
        ];
        for (text, needles) in cases {
            let err = parse(text).expect_err(text);
            for needle in needles {
                assert!(err.contains(needle), "{text}: {err}");
            }
        }
    }

    #[test]
    fn a_pipeline_may_be_longer_than_eight_stages() {
        let mut text = String::new();
        let mut stages = vec!["assemble".to_string(), "inference".to_string()];
        for n in 0..12 {
            text.push_str(&format!("[stages.post-{n}]\nbundled = \"post\"\n"));
            stages.push(format!("post-{n}"));
        }
        text.push_str(&format!("[pipelines.long]\nstages = {stages:?}\n"));
        let config = parse(&text).unwrap();
        assert_eq!(config.pipelines["long"].stages.len(), 14);
    }
}
