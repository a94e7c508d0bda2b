//! The wasm engine's instance pool, read when `/metrics` is scraped.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGauge, Opts};

use super::registry::Metrics;

impl Metrics {
    /// Report the wasm engine's instance pool, as `read` finds it at each
    /// scrape. Once per registry: a second engine on the same registry
    /// (a test's) is not reported.
    pub fn watch_instance_pool(&self, read: Box<dyn Fn() -> PoolUsage + Send + Sync>) {
        let collector = PoolCollector::new(read);
        if let Err(error) = self.registry.register(Box::new(collector)) {
            tracing::debug!(%error, "the instance pool is already reported");
        }
    }
}

/// What the pool holds unused: slots that served an instance before.
///
/// wasmtime also counts the bytes such slots keep resident, but that count
/// read 0 throughout a soak while slots were in use and reused, so it is
/// not reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Linear-memory slots that are free but were used before ("warm").
    pub unused_warm_slots: u64,
}

/// Reads the pool's usage at each scrape.
struct PoolCollector {
    warm: IntGauge,
    read: Box<dyn Fn() -> PoolUsage + Send + Sync>,
}

impl PoolCollector {
    fn new(read: Box<dyn Fn() -> PoolUsage + Send + Sync>) -> PoolCollector {
        let warm = IntGauge::with_opts(Opts::new(
            "orchestrator_instance_pool_unused_warm_slots",
            "Free linear-memory slots of the plugin instance pool that served an instance before.",
        ))
        .expect("valid gauge options");
        PoolCollector { warm, read }
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.warm.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let usage = (self.read)();
        self.warm
            .set(i64::try_from(usage.unused_warm_slots).unwrap_or(i64::MAX));
        self.warm.collect()
    }
}
