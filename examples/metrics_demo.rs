//! The metrics guide's quick start: run the real pipeline (bundled plugins,
//! `echo` backend) under synthetic load while serving `/metrics` and
//! `/health`, and print the totals as they grow.
//!
//! ```text
//! cargo run --example metrics_demo                      # until Ctrl-C, metrics on 127.0.0.1:9090
//! cargo run --example metrics_demo -- --requests 2000 --concurrency 16 --metrics-listen 127.0.0.1:0
//! curl -s localhost:9090/metrics | grep orchestrator_
//! ```
//!
//! One request in ten asks for a model the backend does not serve, so the
//! error series move too (`orchestrator_errors_total{stage="inference",error_type="upstream"}`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use orchestrator::chat::{Message, Params};
use orchestrator::trace::Trace;
use orchestrator::wasm::Envelope;
use orchestrator::{Config, Orchestrator, metrics};

const QUESTIONS: [&str; 4] = [
    "What is backpressure?",
    "How do plugins get their corpus?",
    "Which metric counts shed requests?",
    "How does a hot swap keep requests safe?",
];

fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.metrics_listen = arg("--metrics-listen").unwrap_or(config.metrics_listen);
    let total: Option<u64> = arg("--requests");
    let concurrency: usize = arg("--concurrency").unwrap_or(8);

    let host = Orchestrator::start(config, metrics::global().clone()).await?;
    println!(
        "metrics on http://{}/metrics, health on http://{}/health",
        host.metrics_addr(),
        host.metrics_addr()
    );

    let started = Instant::now();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let pipeline = host.pipeline().clone();
        let sent = sent.clone();
        clients.push(tokio::spawn(async move {
            loop {
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if total.is_some_and(|t| n >= t) {
                    break;
                }
                let model = if n % 10 == 9 { "no-such-model" } else { "echo" };
                let mut params = Params::for_model(model);
                params.max_tokens = Some(64);
                let envelope = Envelope::new(
                    format!("demo-{n}"),
                    vec![Message::new(
                        "user",
                        QUESTIONS[n as usize % QUESTIONS.len()],
                    )],
                    params,
                    Vec::new(),
                );
                let snapshot = pipeline.snapshot();
                let Some(route) = snapshot
                    .router()
                    .resolve(model)
                    .and_then(|target| snapshot.pipeline_for(&target))
                else {
                    continue;
                };
                let _ = pipeline
                    .run(
                        &snapshot,
                        &route,
                        envelope,
                        Instant::now() + Duration::from_secs(5),
                        Trace::off(),
                    )
                    .await;
            }
        }));
    }
    let report = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            println!("{:?}", metrics::get_metrics_summary());
        }
    });
    tokio::select! {
        _ = futures_util::future::join_all(clients) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    report.abort();
    let summary = metrics::get_metrics_summary();
    let done = summary.outcomes.iter().map(|(_, n)| n).sum::<u64>();
    println!("{summary:?}");
    println!(
        "{done} requests in {:.1} s ({:.0}/s)",
        started.elapsed().as_secs_f64(),
        done as f64 / started.elapsed().as_secs_f64()
    );
    host.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
