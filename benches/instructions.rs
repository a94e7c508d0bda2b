//! Instructions per request through the in-process pipeline — a figure
//! that does not move with the machine's load, for catching regressions.
//!
//! ```text
//! bash benches/instructions.sh            # figures (valgrind's callgrind)
//! cargo test -p orchestrator --benches    # runs each scenario once, natively
//! ```
//!
//! One run serves one scenario: the five default stages (bundled plugins)
//! with the `echo` backend or with an `openai` backend at
//! `ORCHESTRATOR_BENCH_UPSTREAM` (`http://127.0.0.1:PORT/v1`: the bench
//! upstream, `benches/bench_upstream.rs`), the client plain or streaming
//! — or plain with the backend set to `always_stream` (`plain-via-stream`:
//! what a plain request cost before plain upstream requests).
//! It starts the host, warms up, then runs `--requests N` requests one
//! after the other, on a current-thread runtime (the upstream is another
//! process). `instructions.sh` runs it under `valgrind --tool=callgrind`
//! for two values of N and reports the difference in instructions per
//! request, which cancels whatever a run spends once.
//!
//! ```text
//! instructions <echo|upstream> <plain|streamed|plain-via-stream> [--requests N]
//! ```

#[path = "requests.rs"]
mod requests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator::config::{BackendConfig, BackendKind, ModelRoute};
use orchestrator::pipeline::{Answer, StreamItem};
use orchestrator::trace::Trace;
use orchestrator::{Config, Metrics, Orchestrator, Pipeline};

/// The requests each scenario warms up with (instances, connections,
/// caches), outside the measured function.
const WARM_UP: u64 = 20;

/// The model the scenario's requests ask for.
fn model(upstream: bool) -> &'static str {
    if upstream { "bench" } else { "echo" }
}

/// One request, plain or streamed, answered in full.
async fn one(pipeline: &Pipeline, n: u64, upstream: bool, streamed: bool) {
    let snapshot = pipeline.snapshot();
    let target = snapshot
        .router()
        .resolve(model(upstream))
        .expect("the model routes");
    let route = snapshot.pipeline_for(&target).expect("a pipeline");
    let deadline = Instant::now() + Duration::from_secs(30);
    let envelope = requests::envelope(n, model(upstream));
    let completion = if streamed {
        let answer = pipeline
            .run_streaming(&snapshot, &route, envelope, deadline, Trace::off())
            .await
            .expect("answered");
        match answer {
            Answer::Done(envelope) => envelope.completion,
            Answer::Streaming(mut streaming) => {
                let mut text = String::new();
                while let Some(item) = streaming.next().await {
                    match item.expect("streamed") {
                        StreamItem::Delta(delta) => text.push_str(&delta),
                        StreamItem::Extra(_) => {}
                        StreamItem::Done(_) => break,
                    }
                }
                text
            }
        }
    } else {
        pipeline
            .run(&snapshot, &route, envelope, deadline, Trace::off())
            .await
            .expect("answered")
            .completion
    };
    assert!(!completion.is_empty(), "request {n} got an empty answer");
}

/// The requests counted.
fn measured(
    rt: &tokio::runtime::Runtime,
    pipeline: &Pipeline,
    n: u64,
    upstream: bool,
    streamed: bool,
) {
    rt.block_on(async {
        for i in 0..n {
            one(pipeline, i, upstream, streamed).await;
        }
    });
}

fn warm_up(rt: &tokio::runtime::Runtime, pipeline: &Pipeline, upstream: bool, streamed: bool) {
    rt.block_on(async {
        for i in 0..WARM_UP {
            one(pipeline, i, upstream, streamed).await;
        }
    });
}

fn config(upstream: Option<&str>, always_stream: bool) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().expect("an address"),
        metrics_listen: "127.0.0.1:0".parse().expect("an address"),
        ..Config::default()
    };
    if let Some(base_url) = upstream {
        let mut backend = BackendConfig::of_kind(BackendKind::Openai);
        backend.base_url = Some(base_url.to_string());
        backend.always_stream = always_stream;
        config.backends.insert("bench".into(), backend);
        config.routing.models.insert(
            "bench".into(),
            ModelRoute {
                backend: "bench".into(),
                pipeline: None,
            },
        );
    }
    config
}

/// What one run measures.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    /// The bench upstream (else `echo`).
    upstream: bool,
    /// The client streams.
    streamed: bool,
    /// The backend streams for every client.
    always_stream: bool,
}

impl Scenario {
    fn parse(backend: &str, client: &str) -> Option<Scenario> {
        let upstream = match backend {
            "echo" => false,
            "upstream" => true,
            _ => return None,
        };
        let (streamed, always_stream) = match client {
            "plain" => (false, false),
            "streamed" => (true, false),
            "plain-via-stream" if upstream => (false, true),
            _ => return None,
        };
        Some(Scenario {
            upstream,
            streamed,
            always_stream,
        })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --benches` runs this without arguments (or with
    // `--bench` under `cargo bench`): each scenario it can, natively, once.
    let scenarios: Vec<Scenario> = match (args.first(), args.get(1)) {
        (Some(backend), Some(client)) => {
            vec![Scenario::parse(backend, client).unwrap_or_else(|| {
                panic!("usage: instructions <echo|upstream> <plain|streamed|plain-via-stream>")
            })]
        }
        _ => {
            let mut all = vec![
                Scenario::parse("echo", "plain"),
                Scenario::parse("echo", "streamed"),
            ];
            if std::env::var_os("ORCHESTRATOR_BENCH_UPSTREAM").is_some() {
                for client in ["plain", "streamed", "plain-via-stream"] {
                    all.push(Scenario::parse("upstream", client));
                }
            }
            all.into_iter().flatten().collect()
        }
    };
    let requests: u64 = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|at| args.get(at + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let upstream_url = std::env::var("ORCHESTRATOR_BENCH_UPSTREAM").ok();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    for Scenario {
        upstream,
        streamed,
        always_stream,
    } in scenarios
    {
        let base_url = upstream.then(|| {
            upstream_url
                .as_deref()
                .expect("ORCHESTRATOR_BENCH_UPSTREAM names the bench upstream")
        });
        let host = rt
            .block_on(Orchestrator::start(
                config(base_url, always_stream),
                Arc::new(Metrics::new()),
            ))
            .expect("the host starts");
        let pipeline = host.pipeline().clone();
        warm_up(&rt, &pipeline, upstream, streamed);
        measured(&rt, &pipeline, requests, upstream, streamed);
        println!(
            "instructions: {} {}{} — {requests} requests answered",
            if upstream { "upstream" } else { "echo" },
            if streamed { "streamed" } else { "plain" },
            if always_stream { " via a stream" } else { "" },
        );
        rt.block_on(host.shutdown(Duration::from_secs(5)));
    }
}
