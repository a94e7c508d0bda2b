//! The [`Router`]: the configured backends and the model → backend
//! table, and the entry points of a generation ([`Router::stream`],
//! [`Router::generate`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::backend::{Backend, BackendSetupError};
use super::delivery::{upstream_task, whole_answer};
use super::echo;
use super::generation::{BackendError, Completion, Events, GenerateRequest, TokenStream};
use crate::config::{BackendKind, Config, DEFAULT_PIPELINE, ModelRoute};
use crate::metrics::{BreakerState, Metrics};

struct Inner {
    /// Model resolutions made ([`Router::resolve`]): tests count them.
    #[cfg(test)]
    resolutions: std::sync::atomic::AtomicU64,
    backends: BTreeMap<String, Arc<Backend>>,
    models: BTreeMap<String, ModelRoute>,
    /// Where each routed model goes, resolved when the router is built:
    /// a request's resolution is one lookup and two reference counts.
    routes: BTreeMap<String, (Arc<Backend>, Arc<str>)>,
    /// Where the other models go (`[routing] default`), if anywhere.
    default_route: Option<(Arc<Backend>, Arc<str>)>,
    /// The runtime generations run on; `None`: the caller's.
    runtime: Option<tokio::runtime::Handle>,
}

/// The configured backends and the routing table. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("backends", &self.inner.backends.keys().collect::<Vec<_>>())
            .field("models", &self.inner.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// Build the backends of `config`. Their generations run as tasks on
    /// the tokio runtime this is called on (the host's runtime, which also
    /// runs the plugin calls), or, outside any runtime, on the caller's.
    pub fn new(config: &Config, metrics: &Metrics) -> Result<Router, BackendSetupError> {
        Router::reusing(config, metrics, None)
    }

    /// Like [`new`](Self::new), but keeping each backend of `previous`
    /// whose settings are unchanged (its connections, breaker and
    /// concurrency permits carry on): what a configuration reload builds.
    pub fn reusing(
        config: &Config,
        metrics: &Metrics,
        previous: Option<&Router>,
    ) -> Result<Router, BackendSetupError> {
        let runtime = tokio::runtime::Handle::try_current().ok();
        let mut backends = BTreeMap::new();
        for (name, settings) in &config.backends {
            let kept = previous
                .and_then(|p| p.inner.backends.get(name))
                .filter(|b| b.settings == *settings);
            let backend = match kept {
                Some(backend) => backend.clone(),
                None => Arc::new(Backend::new(name, settings, metrics)?),
            };
            backends.insert(name.clone(), backend);
        }
        let route = |backend: &str, pipeline: &str| {
            backends
                .get(backend)
                .map(|b| (b.clone(), Arc::<str>::from(pipeline)))
        };
        let routing = &config.routing;
        let routes = routing
            .models
            .iter()
            .filter_map(|(model, r)| Some((model.clone(), route(&r.backend, r.pipeline())?)))
            .collect();
        let default_route = routing.default.as_deref().and_then(|backend| {
            route(
                backend,
                routing
                    .default_pipeline
                    .as_deref()
                    .unwrap_or(DEFAULT_PIPELINE),
            )
        });
        Ok(Router {
            inner: Arc::new(Inner {
                #[cfg(test)]
                resolutions: Default::default(),
                models: routing.models.clone(),
                routes,
                default_route,
                backends,
                runtime,
            }),
        })
    }

    /// The runtime generations run on (`None`: the caller's).
    pub fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.inner.runtime.as_ref()
    }

    /// Whether `other` is this very router (a clone of it).
    pub fn same_as(&self, other: &Router) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The models clients may ask for, with the backend and the pipeline
    /// serving each.
    pub fn models(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.inner
            .models
            .iter()
            .map(|(model, route)| (model.as_str(), route.backend.as_str(), route.pipeline()))
    }

    /// Where `model`'s requests go: the backend that serves it and the
    /// name of its pipeline, or `None` if it routes nowhere. Made once per
    /// request, where the request is parsed; the [`Target`] then travels
    /// with the request to the stages and into a generation.
    pub fn resolve(&self, model: &str) -> Option<Target> {
        #[cfg(test)]
        self.inner
            .resolutions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (routed, (backend, pipeline)) = match self.inner.routes.get(model) {
            Some(route) => (true, route),
            None => (false, self.inner.default_route.as_ref()?),
        };
        Some(Target {
            model: model.to_string(),
            routed,
            backend: backend.clone(),
            pipeline: pipeline.clone(),
        })
    }

    /// The resolutions made so far.
    #[cfg(test)]
    pub(crate) fn resolutions(&self) -> u64 {
        self.inner
            .resolutions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `/health`'s view of the backends.
    pub fn health(&self) -> Vec<BackendHealth> {
        self.inner
            .backends
            .values()
            .map(|b| BackendHealth {
                name: b.name.clone(),
                kind: b.kind.to_string(),
                circuit: b.breaker.state(),
                in_flight: b.settings.max_concurrent - b.permits.available_permits(),
                max_concurrent: b.settings.max_concurrent,
            })
            .collect()
    }

    /// Where `request` goes: `target`, resolved when the request was
    /// parsed, unless a stage changed the model since (then the new model
    /// is resolved), or the model resolved now.
    fn target_of(
        &self,
        request: &GenerateRequest,
        target: Option<Target>,
    ) -> Result<Target, BackendError> {
        match target {
            Some(target) if target.model == request.model() => Ok(target),
            _ => self
                .resolve(request.model())
                .ok_or_else(|| BackendError::UnknownModel(request.model().to_string())),
        }
    }

    /// Start a generation of `request` at `target` (see
    /// [`resolve`](Self::resolve); `None`: resolve its model now): resolves
    /// once its first token is in (after retries and failover), or with the
    /// error that ended it. A generation not streamed upstream
    /// ([`GenerateRequest::stream`]) resolves at once: it is sent when its
    /// events are first awaited, and read whole on that task; its errors
    /// come as its first event.
    pub async fn stream(
        &self,
        request: GenerateRequest,
        target: Option<Target>,
    ) -> Result<TokenStream, BackendError> {
        let primary = self.target_of(&request, target)?.backend;
        if primary.kind == BackendKind::Echo {
            return Ok(TokenStream {
                backend: primary.name.clone(),
                deadline: request.deadline,
                events: Events::Ready(Box::new(echo::stream(primary, &request))),
            });
        }
        let failover = primary
            .settings
            .failover
            .as_ref()
            .and_then(|name| self.inner.backends.get(name))
            .cloned();
        if !primary.streams(&request) && failover.as_ref().is_none_or(|f| !f.streams(&request)) {
            // One JSON answer, asked for when its events are first wanted
            // and read on that task: no generation task, and the stage that
            // started it is not held while it is generated.
            return Ok(TokenStream {
                backend: primary.name.clone(),
                deadline: request.deadline,
                events: Events::Whole(Box::pin(whole_answer(primary, failover, request))),
            });
        }
        let (opened_tx, opened_rx) = oneshot::channel();
        let (events_tx, events_rx) = mpsc::channel(64);
        let deadline = request.deadline;
        let task = upstream_task(primary, failover, request, opened_tx, events_tx);
        // Detached: dropping this future (the plugin call's deadline) drops
        // the receiver, which the task notices.
        drop(match &self.inner.runtime {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        });
        match opened_rx.await {
            Ok(Ok(backend)) => Ok(TokenStream {
                backend,
                events: Events::Task(events_rx),
                deadline,
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(BackendError::Failed {
                backend: "?".into(),
                reason: "the generation task ended unexpectedly".into(),
            }),
        }
    }

    /// Run a whole generation of `request` at `target` and collect it.
    pub async fn generate(
        &self,
        request: GenerateRequest,
        target: Option<Target>,
    ) -> Result<Completion, BackendError> {
        let target = self.target_of(&request, target)?;
        if target.backend.kind == BackendKind::Echo {
            return Ok(echo::complete(&target.backend, &request));
        }
        let prompt_tokens = request.prompt_tokens();
        self.stream(request, Some(target))
            .await?
            .collect(|| prompt_tokens)
            .await
    }
}

/// Where one request goes ([`Router::resolve`]): the backend serving its
/// model and the name of its pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Target {
    model: String,
    /// Whether `model` is a configured route (else `[routing] default`
    /// took it).
    routed: bool,
    backend: Arc<Backend>,
    pipeline: Arc<str>,
}

impl Target {
    /// The model it was resolved for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The name of the backend.
    pub fn backend(&self) -> &str {
        &self.backend.name
    }

    /// The model name the backend is asked for: its own `model` setting,
    /// or the one the request was resolved for.
    pub fn upstream_model(&self) -> &str {
        self.backend
            .settings
            .model
            .as_deref()
            .unwrap_or(&self.model)
    }

    /// The model the answer names: the backend's own `model` setting, or
    /// else the configured route's name (the model the client asked for),
    /// or else, for a model that only `[routing] default` took, the
    /// backend's name. Never a name the configuration does not hold, so a
    /// client's model string is not echoed into every chunk of its answer.
    pub fn served_model(&self) -> &str {
        match (&self.backend.settings.model, self.routed) {
            (Some(model), _) => model,
            (None, true) => &self.model,
            (None, false) => &self.backend.name,
        }
    }

    /// The kind of the backend.
    pub fn kind(&self) -> BackendKind {
        self.backend.kind
    }

    /// The largest `max_tokens` the backend accepts.
    pub fn max_tokens_limit(&self) -> u32 {
        self.backend.settings.max_tokens_limit
    }

    /// The name of the pipeline the request runs through.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("model", &self.model)
            .field("backend", &self.backend.name)
            .field("pipeline", &self.pipeline)
            .finish()
    }
}

impl PartialEq for Target {
    fn eq(&self, other: &Target) -> bool {
        self.model == other.model
            && Arc::ptr_eq(&self.backend, &other.backend)
            && self.pipeline == other.pipeline
    }
}

/// `/health`'s view of one backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendHealth {
    /// Its name (the `worker_type` label).
    pub name: String,
    /// `echo` or `openai`.
    pub kind: String,
    /// Its circuit breaker.
    pub circuit: BreakerState,
    /// Generations holding one of its concurrency permits.
    pub in_flight: usize,
    /// Its concurrency limit.
    pub max_concurrent: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::Event;

    fn series(metrics: &Metrics, name: &str) -> f64 {
        let text = metrics.gather();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    const TOKENS: &str = "orchestrator_tokens_generated_total{worker_type=\"echo\"}";
    const OK: &str = "orchestrator_upstream_requests_total{outcome=\"ok\",worker_type=\"echo\"}";
    const CANCELLED: &str =
        "orchestrator_upstream_requests_total{outcome=\"cancelled\",worker_type=\"echo\"}";

    #[tokio::test]
    async fn an_echo_stream_counts_its_tokens_when_it_ends() {
        let metrics = Metrics::new();
        let router = Router::new(&Config::default(), &metrics).expect("default backends");
        let request = GenerateRequest::for_test("User: one two three four five\nAssistant:", 100);
        let mut tokens = router.stream(request, None).await.expect("echo streams");
        assert_eq!(series(&metrics, TOKENS), 0.0, "nothing counted up front");
        while let Some(event) = tokens.next().await {
            event.expect("echo cannot fail");
        }
        drop(tokens);
        assert_eq!(series(&metrics, TOKENS), 5.0);
        assert_eq!(series(&metrics, OK), 1.0);
        assert_eq!(series(&metrics, CANCELLED), 0.0);
    }

    #[tokio::test]
    async fn an_echo_stream_dropped_early_counts_what_it_delivered() {
        let metrics = Metrics::new();
        let router = Router::new(&Config::default(), &metrics).expect("default backends");
        let request = GenerateRequest::for_test("User: one two three four five\nAssistant:", 100);
        let mut tokens = router.stream(request, None).await.expect("echo streams");
        for _ in 0..2 {
            assert!(matches!(tokens.next().await, Some(Ok(Event::Delta(_)))));
        }
        drop(tokens);
        assert_eq!(series(&metrics, TOKENS), 2.0);
        assert_eq!(series(&metrics, OK), 0.0);
        assert_eq!(series(&metrics, CANCELLED), 1.0);
    }
}
