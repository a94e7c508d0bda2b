//! The cost of the stateful-stage capabilities: a store operation from a
//! guest, a windowed counter on the host side (memory, and Redis on
//! loopback), and a finish call.
//!
//! ```text
//! cargo bench -p orchestrator --bench stores
//! ```
//!
//! Groups:
//! - `guest`: one `process` call of a `request-stage` guest on a warm
//!   instance: `touch` (the call alone) and `kv-counter/N` (the call plus
//!   `store.open`, N `atomics.increment` on a memory store, a note and the
//!   bucket's drop). `(kv-counter/11 - kv-counter/1) / 10` is what one
//!   store operation costs a guest.
//! - `host`: `Store::window` (the windowed counter with a limit) on a
//!   memory store, and on a `redis-server` of its own on loopback (one
//!   round trip; skipped when `redis-server` is not installed).
//! - `finish`: one `finish` call of a finishing guest (`gate`, whose
//!   `finish` returns at once without its store) on a warm instance.

#[path = "../tests/common/guests.rs"]
mod guests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use orchestrator::chat::{Message, Params};
use orchestrator::config::{Config, PluginSource, StageConfig, StoreConfig, StoreKind};
use orchestrator::metrics::Metrics;
use orchestrator::store::{Store, Stores};
use orchestrator::wasm::{
    EngineSettings, Envelope, HostServices, Instance, Outcome, OutcomeKind, Plugin, PluginBytes,
    Runtime,
};

const TIMEOUT: Duration = Duration::from_secs(5);

struct Bench {
    rt: tokio::runtime::Runtime,
    runtime: Runtime,
    metrics: Metrics,
}

impl Bench {
    fn new() -> Bench {
        let settings = EngineSettings {
            max_instances: 16,
            max_memory_bytes: 64 << 20,
            cache_dir: Some(guests::target_dir().join("bench-cache")),
            fuel: false,
        };
        let metrics = Metrics::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let runtime = rt
            .block_on(async { Runtime::new(&settings, &metrics) })
            .unwrap();
        Bench {
            rt,
            runtime,
            metrics,
        }
    }

    /// A warm instance of the test guest `name` as a stage granted the
    /// store `counters`, its calls opening `stores`.
    fn instance(
        &self,
        name: &'static str,
        config: &[(&str, &str)],
        stores: &Arc<Stores>,
    ) -> Instance {
        let mut settings = StageConfig::default_for(name, None);
        settings.capabilities.stores = vec!["counters".into()];
        settings.config = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let services = HostServices {
            router: None,
            instances: self.metrics.stage(name).instances,
            ledger: Arc::default(),
        };
        let bytes = std::fs::read(guests::test_plugin(name)).unwrap();
        let plugin: Arc<Plugin> = self
            .rt
            .block_on(self.runtime.load(
                &settings,
                PluginSource::Upload,
                PluginBytes::new(bytes),
                &services,
            ))
            .unwrap()
            .plugin;
        let mut instance = self.rt.block_on(Instance::new(&plugin)).unwrap();
        instance.set_stores(stores);
        instance
    }
}

fn envelope() -> Envelope {
    Envelope::new(
        "bench".into(),
        vec![Message::new("user", "What is backpressure?")],
        Params::for_model("echo"),
        Vec::new(),
    )
}

fn guest(c: &mut Criterion) {
    let bench = Bench::new();
    let stores = Arc::new(Stores::reusing(&Config::default(), &bench.metrics, None).unwrap());
    let mut config = Config::default();
    config
        .stores
        .insert("counters".into(), StoreConfig::default());
    let stores_with = Arc::new(Stores::reusing(&config, &bench.metrics, None).unwrap());
    let mut group = c.benchmark_group("guest");
    for (name, config, stores) in [
        ("touch", "1", &stores),
        ("kv-counter", "1", &stores_with),
        ("kv-counter", "11", &stores_with),
    ] {
        let (label, settings): (String, &[(&str, &str)]) = if name == "touch" {
            (name.to_string(), &[])
        } else {
            (format!("{name}/{config}"), &[("repeat", config)])
        };
        let mut instance = bench.instance(name, settings, stores);
        group.bench_function(label, |b| {
            b.iter_batched_ref(
                envelope,
                |envelope| {
                    bench
                        .rt
                        .block_on(instance.process(envelope, TIMEOUT))
                        .unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn host(c: &mut Criterion) {
    let bench = Bench::new();
    let mut group = c.benchmark_group("host");
    let memory = bench
        .rt
        .block_on(async { Store::build("memory", &StoreConfig::default(), &bench.metrics) })
        .unwrap();
    let window = |store: &Store| {
        let deadline = Instant::now() + TIMEOUT;
        bench
            .rt
            .block_on(store.window("k", 1, Duration::from_secs(60), None, deadline))
            .unwrap()
    };
    group.bench_function("memory/window", |b| b.iter(|| window(&memory)));
    let redis = redis::Redis::start();
    if let Some(redis) = &redis {
        let settings = StoreConfig {
            kind: StoreKind::Redis,
            url: Some(redis.url()),
            timeout_ms: 1000,
            ..StoreConfig::default()
        };
        let store = bench
            .rt
            .block_on(async { Store::build("redis", &settings, &bench.metrics) })
            .unwrap();
        window(&store);
        group.bench_function("redis/window", |b| b.iter(|| window(&store)));
    }
    group.finish();
}

fn finish(c: &mut Criterion) {
    let bench = Bench::new();
    let stores = Arc::new(Stores::default());
    let mut instance = bench.instance("gate", &[("mode", "noop"), ("name", "bench")], &stores);
    let outcome = Outcome {
        kind: OutcomeKind::Answered,
        status: 200,
        usage: orchestrator::wasm::bindings::v2::orchestrator::pipeline::types::Usage {
            prompt_tokens: 5,
            completion_tokens: 12,
        },
        answered_early: false,
        streamed: false,
    };
    let mut group = c.benchmark_group("finish");
    group.bench_function("gate", |b| {
        b.iter_batched_ref(
            envelope,
            |envelope| {
                bench
                    .rt
                    .block_on(instance.finish(envelope, &outcome, TIMEOUT))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// The test suite's `redis-server` helper.
#[path = "../tests/common/redis.rs"]
#[allow(dead_code)]
mod redis;

/// Whether `tool` is missing (the Redis group is then skipped).
fn tool_missing(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_err()
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = guest, host, finish
}
criterion_main!(benches);
