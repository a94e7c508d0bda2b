//! Configurations at run time: a [`Snapshot`] is one configuration's
//! stages, pipelines ([`Route`]s) and backends ([`Router`]); the state
//! shared by every snapshot is [`Shared`].
//!
//! # Lifecycle of a snapshot
//!
//! 1. **Plan** — the caller loads a configuration's plugins and gives a
//!    [`Plan`]: each stage's settings and plugin, each pipeline's stage
//!    names, the router.
//! 2. **Build** — [`Snapshot::build`] makes a runtime for each stage,
//!    *reusing* the runtime of the snapshot before it when the stage's
//!    settings are unchanged: then its reservations, permits, idle
//!    instances and breaker carry on, and a different plugin is swapped in
//!    as a hot swap would. A stage whose settings changed gets a new
//!    runtime (reservations, permits, breaker).
//! 3. **Publish** — the pipeline swaps its current snapshot atomically.
//!    New requests are admitted under the new one; a request keeps the
//!    snapshot it was admitted under (its [`Job`](super::stage::Job)
//!    holds it), so it finishes on the stages and backends it started
//!    with.
//! 4. **Retire** — when the last holder of an old snapshot lets go, each
//!    of its stages that no later snapshot includes is dropped, with its
//!    idle instances. Nothing waits for that: a request never waits for a
//!    reload, and a reload never waits for requests.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::stage::{Route, Shared, Snapshot, StageRuntime};
use crate::config::StageConfig;
use crate::inference::{Router, Target};
use crate::metrics::Metrics;
use crate::store::Stores;
use crate::wasm::{Instance, Plugin};

/// What a configuration runs: the input of [`Pipeline::start`](super::Pipeline::start)
/// and [`Pipeline::install`](super::Pipeline::install).
pub struct Plan {
    /// Every stage some pipeline names, with its loaded plugin, in the
    /// order `/health` lists them.
    pub stages: Vec<(StageConfig, Arc<Plugin>)>,
    /// Each pipeline's stage names, in order (validated by the
    /// configuration: every name is in `stages`).
    pub pipelines: BTreeMap<String, Vec<String>>,
    /// The backends and the model → backend and pipeline table.
    pub router: Router,
    /// The key-value stores.
    pub stores: Arc<Stores>,
    /// The configuration's digest (see [`crate::Config::hash`]).
    pub hash: String,
    /// The instances that validated the plugins loaded for it
    /// ([`crate::wasm::Loaded::instance`]): each becomes an idle instance
    /// of its stage, so that no request runs a fresh plugin's `init`.
    pub warm: Vec<Instance>,
}

/// Which pipeline a request runs through, chosen by its model
/// ([`Snapshot::pipeline_for`]).
#[derive(Clone)]
pub struct RouteRef(pub(super) Arc<Route>);

impl RouteRef {
    /// The pipeline's name.
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    /// Its stages' names, comma-separated, in order: a header value whose
    /// clone shares its bytes.
    pub fn stage_list(&self) -> &warp::http::HeaderValue {
        &self.0.stage_list
    }

    /// Its stages' names, in order.
    pub fn stage_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.stages.iter().map(|s| s.name())
    }
}

impl Snapshot {
    /// Build the snapshot of `plan`, reusing the stage runtimes of
    /// `previous` whose settings are unchanged.
    pub(super) fn build(
        plan: Plan,
        previous: Option<&Snapshot>,
        shared: &Arc<Shared>,
        metrics: &Metrics,
    ) -> Snapshot {
        let mut stages = Vec::with_capacity(plan.stages.len());
        for (settings, plugin) in plan.stages {
            let reusable = previous.and_then(|p| {
                p.stages
                    .iter()
                    .find(|s| s.name() == settings.name() && s.settings == settings)
            });
            let runtime = match reusable {
                Some(runtime) => {
                    if !Arc::ptr_eq(&runtime.plugin(), &plugin) {
                        metrics.set_plugin_version(runtime.name(), plugin.sha256());
                        runtime.publish(plugin);
                    }
                    runtime.clone()
                }
                None => Arc::new(StageRuntime::new(settings, plugin, metrics)),
            };
            stages.push(runtime);
        }
        for instance in plan.warm {
            if let Some(stage) = stages
                .iter()
                .find(|s| Arc::ptr_eq(instance.plugin(), &s.plugin()))
            {
                stage.keep_warm(instance);
            }
        }
        let routes = plan
            .pipelines
            .into_iter()
            .map(|(name, names)| {
                let route_stages: Vec<Arc<StageRuntime>> = names
                    .iter()
                    .filter_map(|n| stages.iter().find(|s| s.name() == n).cloned())
                    .collect();
                // Interned when the configuration was validated; one that
                // was not (an embedder's) past the interner's cap is kept
                // all the same rather than routed under another name.
                let name = crate::config::intern(&name)
                    .unwrap_or_else(|| Box::leak(name.clone().into_boxed_str()));
                let route = Route {
                    name,
                    // Valid header text: stage names are lower-case ASCII,
                    // digits, `-` and `_` (checked by the configuration).
                    stage_list: warp::http::HeaderValue::from_str(&names.join(","))
                        .unwrap_or_else(|_| warp::http::HeaderValue::from_static("")),
                    stores: route_stages
                        .iter()
                        .any(|s| !s.settings.capabilities.stores.is_empty()),
                    stages: route_stages,
                };
                (name, Arc::new(route))
            })
            .collect();
        Snapshot {
            stages,
            routes,
            router: plan.router,
            stores: plan.stores,
            hash: plan.hash,
            shared: shared.clone(),
        }
    }

    /// The backends and routing table of this configuration.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The names of the stages in use, in `/health` order.
    pub fn stage_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages.iter().map(|s| s.name())
    }

    /// The key-value stores of this configuration.
    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// The configuration's digest.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The pipeline of a request going to `target` (resolved by this
    /// snapshot's router).
    pub fn pipeline_for(&self, target: &Target) -> Option<RouteRef> {
        self.routes.get(target.pipeline()).cloned().map(RouteRef)
    }

    /// The pipelines, by name.
    pub fn routes(&self) -> impl Iterator<Item = RouteRef> + '_ {
        self.routes.values().cloned().map(RouteRef)
    }
}
