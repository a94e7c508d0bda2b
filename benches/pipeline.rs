//! Requests per second through all five stages in process (bundled
//! plugins, `echo` backend), by workers per stage and queue capacity, and
//! the CPU time one request costs.
//!
//! ```text
//! cargo bench -p orchestrator --bench pipeline
//! ```
//!
//! Each measurement submits requests from 64 concurrent tasks straight to
//! [`Pipeline::run`] (no HTTP). Criterion reports the time per request
//! (throughput = 1 / time); the CPU line printed first for each setting is
//! process CPU time (user + system, all threads) divided by requests.

#[path = "requests.rs"]
mod requests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orchestrator::trace::Trace;
use orchestrator::{Config, Metrics, Orchestrator, Pipeline};

const CONCURRENCY: usize = 64;

/// Run `total` requests with `CONCURRENCY` submitters; returns wall time.
async fn drive(pipeline: &Pipeline, total: u64) -> Duration {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (pipeline, next) = (pipeline.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let snapshot = pipeline.snapshot();
                    let target = snapshot.router().resolve("echo").expect("echo routes");
                    let route = snapshot.pipeline_for(&target).expect("echo has a pipeline");
                    let result = pipeline
                        .run(
                            &snapshot,
                            &route,
                            requests::envelope(n, "echo"),
                            Instant::now() + Duration::from_secs(30),
                            Trace::off(),
                        )
                        .await;
                    assert!(result.is_ok(), "{result:?}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// User + system CPU time of this process, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(1));
    for (workers, capacity) in [(1, 1024), (2, 1024), (4, 1024), (2, 64)] {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        for stage in &mut config.stages {
            stage.workers = workers;
            stage.queue_capacity = capacity;
        }
        let host = rt
            .block_on(Orchestrator::start(config, Arc::new(Metrics::new())))
            .unwrap();
        let pipeline = host.pipeline().clone();
        // Warm up, then measure CPU per request over a fixed run (short
        // when `cargo test --benches` runs this as a smoke test).
        let benching = std::env::args().any(|a| a == "--bench");
        rt.block_on(drive(&pipeline, if benching { 2_000 } else { 100 }));
        let cpu_before = cpu_time();
        let total = if benching { 10_000 } else { 200 };
        let wall = rt.block_on(drive(&pipeline, total));
        let cpu = cpu_time() - cpu_before;
        println!(
            "pipeline workers={workers} capacity={capacity}: {:.0} requests/s, {:.1} µs CPU per request",
            total as f64 / wall.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / total as f64
        );
        group.bench_function(format!("workers={workers}/capacity={capacity}"), |b| {
            b.iter_custom(|iters| rt.block_on(drive(&pipeline, iters)))
        });
        rt.block_on(host.shutdown(Duration::from_secs(5)));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = throughput
}
criterion_main!(benches);
