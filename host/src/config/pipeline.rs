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
//! - (Checked once the plugins are loaded, see `Orchestrator`: in the
//!   stages after the generating one, a streaming stage may not follow a
//!   plain one, since a streamed request's text reaches the stages after a
//!   plain stage only once the generation has ended.)
//!
//! A stage may appear in several pipelines. It is then one stage: one
//! queue, one set of workers and instances, one breaker and one set of
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
    Full {
        backend: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pipeline: Option<String>,
    },
}

impl Serialize for ModelRoute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.pipeline {
            None => RouteForm::Backend(self.backend.clone()),
            Some(pipeline) => RouteForm::Full {
                backend: self.backend.clone(),
                pipeline: Some(pipeline.clone()),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelRoute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ModelRoute, D::Error> {
        // Untagged enums lose the inner error; say what the two forms are.
        let form = RouteForm::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a model routes to \"<backend>\" or { backend = \"<backend>\", pipeline = \"<pipeline>\" }",
            )
        })?;
        Ok(match form {
            RouteForm::Backend(backend) => ModelRoute {
                backend,
                pipeline: None,
            },
            RouteForm::Full { backend, pipeline } => ModelRoute { backend, pipeline },
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
