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

/// What the pool holds unused: slots that served an instance before and
/// the bytes of linear memory they keep resident.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// Linear-memory slots that are free but were used before ("warm").
    pub unused_warm_slots: u64,
    /// The bytes those slots keep resident.
    pub unused_resident_bytes: u64,
}

/// Reads the pool's usage at each scrape.
struct PoolCollector {
    warm: IntGauge,
    resident: IntGauge,
    read: Box<dyn Fn() -> PoolUsage + Send + Sync>,
}

impl PoolCollector {
    fn new(read: Box<dyn Fn() -> PoolUsage + Send + Sync>) -> PoolCollector {
        let gauge = |name: &str, help: &str| {
            IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge options")
        };
        PoolCollector {
            warm: gauge(
                "orchestrator_instance_pool_unused_warm_slots",
                "Free linear-memory slots of the plugin instance pool that served an instance before.",
            ),
            resident: gauge(
                "orchestrator_instance_pool_unused_resident_bytes",
                "Bytes of linear memory those free slots keep resident.",
            ),
            read,
        }
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.warm
            .desc()
            .into_iter()
            .chain(self.resident.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let usage = (self.read)();
        self.warm
            .set(i64::try_from(usage.unused_warm_slots).unwrap_or(i64::MAX));
        self.resident
            .set(i64::try_from(usage.unused_resident_bytes).unwrap_or(i64::MAX));
        self.warm
            .collect()
            .into_iter()
            .chain(self.resident.collect())
            .collect()
    }
}
