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
//! what a plain request cost before plain upstream requests), or plain
//! through the policy pipeline (`policies`: `auth`, `ratelimit` and `cache`
//! on memory stores before the five, one declared key, a prompt no earlier
//! request sent, so the cache misses and stores: its costliest path), or
//! through the same pipeline with one prompt over and over (`cache-hits`:
//! every counted request a cache hit, answered early);
//! `ORCHESTRATOR_BENCH_STAGES`, comma-separated, replaces the pipeline's
//! stages, to count one policy stage at a time, and
//! `ORCHESTRATOR_BENCH_EXTRA` is appended to its configuration).
//! It starts the host, warms up, then runs `--requests N` requests one
//! after the other, on a current-thread runtime (the upstream is another
//! process). `instructions.sh` runs it under `valgrind --tool=callgrind`
//! for two values of N and reports the difference in instructions per
//! request, which cancels whatever a run spends once.
//!
//! ```text
//! instructions <echo|upstream> <plain|streamed|plain-via-stream|policies|cache-hits> [--requests N]
//! ```

#[path = "requests.rs"]
mod requests;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orchestrator::config::{BackendConfig, BackendKind, ModelRoute};
use orchestrator::pipeline::{Answer, StreamItem};
use orchestrator::trace::Trace;
use orchestrator::wasm::{Caller, Envelope};
use orchestrator::{Config, Metrics, Orchestrator, Pipeline};

/// The requests each scenario warms up with (instances, connections,
/// caches), outside the measured function.
const WARM_UP: u64 = 20;

/// The model the scenario's requests ask for.
fn model(upstream: bool) -> &'static str {
    if upstream { "bench" } else { "echo" }
}

/// The API key the policy scenario's requests carry (declared in its
/// configuration by hash).
const KEY: &str = "sk-orch-0123456789ab-0123456789abcdef0123456789abcdef0123456789abcdef";

/// The policy pipeline: the three policy stages around the five defaults.
const POLICY_STAGES: &str = "auth,rag,assemble,ratelimit,cache,inference,post,stream";

/// Numbers the policy scenario's prompts: none repeats an earlier one.
static PROMPTS: AtomicU64 = AtomicU64::new(0);

/// Request `n`, or through the policy pipeline a request with the key and
/// a prompt no earlier request sent (misses) or always the same (hits).
fn request(n: u64, model: &str, policies: Option<Policies>) -> Envelope {
    let mut envelope = requests::envelope(n, model);
    if let Some(policies) = policies {
        let nonce = match policies {
            Policies::Misses => PROMPTS.fetch_add(1, Ordering::Relaxed),
            Policies::Hits => 0,
        };
        let message = &mut envelope.messages[0];
        *message = orchestrator::chat::Message::new(
            "user",
            format!("{nonce}: What is backpressure and how is load shed?"),
        );
        let mut headers = warp::http::HeaderMap::new();
        headers.insert(
            "authorization",
            format!("Bearer {KEY}").parse().expect("a header value"),
        );
        envelope.caller = Some(Arc::new(Caller {
            headers,
            address: Some("127.0.0.1:40000".parse().expect("an address")),
        }));
    }
    envelope
}

/// One request, plain or streamed, answered in full.
async fn one(
    pipeline: &Pipeline,
    n: u64,
    upstream: bool,
    streamed: bool,
    policies: Option<Policies>,
) {
    let snapshot = pipeline.snapshot();
    let target = snapshot
        .router()
        .resolve(model(upstream))
        .expect("the model routes");
    let route = snapshot.pipeline_for(&target).expect("a pipeline");
    let deadline = Instant::now() + Duration::from_secs(30);
    let envelope = request(n, model(upstream), policies);
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
        let answer = pipeline
            .run(&snapshot, &route, envelope, deadline, Trace::off())
            .await
            .expect("answered");
        // After the first, each request of `cache-hits` is a hit.
        if matches!(policies, Some(Policies::Hits)) && n > 0 {
            assert!(answer.answered, "request {n} was not a cache hit");
        }
        answer.completion
    };
    assert!(!completion.is_empty(), "request {n} got an empty answer");
}

/// The requests counted.
fn measured(
    rt: &tokio::runtime::Runtime,
    pipeline: &Pipeline,
    n: u64,
    Scenario {
        upstream,
        streamed,
        policies,
        ..
    }: Scenario,
) {
    rt.block_on(async {
        for i in 0..n {
            one(pipeline, i, upstream, streamed, policies).await;
        }
    });
}

fn warm_up(rt: &tokio::runtime::Runtime, pipeline: &Pipeline, scenario: Scenario) {
    rt.block_on(async {
        for i in 0..WARM_UP {
            one(
                pipeline,
                i,
                scenario.upstream,
                scenario.streamed,
                scenario.policies,
            )
            .await;
        }
    });
}

/// The policy scenario's configuration: the key, a rule never reached,
/// memory stores (the default).
fn policy_config(upstream: Option<&str>) -> Config {
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(KEY.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stages = std::env::var("ORCHESTRATOR_BENCH_STAGES").unwrap_or(POLICY_STAGES.into());
    let stages: Vec<String> = stages
        .split(',')
        .map(|s| format!("{:?}", s.trim()))
        .collect();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [pipelines.default]\nstages = [{}]\n",
        stages.join(", ")
    );
    if stages.contains(&"\"auth\"".to_string()) {
        toml.push_str(&format!(
            "[stages.auth.config]\n\
             keys = [{{ id = \"0123456789ab\", sha256 = \"{hash}\", principal = \"bench\" }}]\n"
        ));
    }
    if stages.contains(&"\"ratelimit\"".to_string()) {
        toml.push_str(
            "[stages.ratelimit.config]\n\
             rules = [{ name = \"per_key\", requests_per_minute = 100000000, \
             tokens_per_minute = 100000000000 }]\n",
        );
    }
    // More configuration, for profiling: e.g. `[stages.cache]` with
    // `plugin = "..."`, a build that keeps its function names for `perf`.
    if let Ok(extra) = std::env::var("ORCHESTRATOR_BENCH_EXTRA") {
        toml.push_str(&extra);
    }
    if let Some(base_url) = upstream {
        toml.push_str(&format!(
            "[backends.bench]\nkind = \"openai\"\nbase_url = \"{base_url}\"\n\
             [routing.models]\nbench = \"bench\"\n"
        ));
    }
    Config::from_toml(&toml, std::path::Path::new(".")).expect("the policy configuration")
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
    /// The policy pipeline, and what its cache finds.
    policies: Option<Policies>,
}

/// What the policy pipeline's cache finds.
#[derive(Debug, Clone, Copy)]
enum Policies {
    /// A prompt no earlier request sent (`policies`): a miss that claims,
    /// stores and releases.
    Misses,
    /// The same prompt every time (`cache-hits`): after the first, a hit.
    Hits,
}

impl Scenario {
    fn parse(backend: &str, client: &str) -> Option<Scenario> {
        let upstream = match backend {
            "echo" => false,
            "upstream" => true,
            _ => return None,
        };
        let (streamed, always_stream, policies) = match client {
            "plain" => (false, false, None),
            "streamed" => (true, false, None),
            "plain-via-stream" if upstream => (false, true, None),
            "policies" => (false, false, Some(Policies::Misses)),
            "cache-hits" => (false, false, Some(Policies::Hits)),
            _ => return None,
        };
        Some(Scenario {
            upstream,
            streamed,
            always_stream,
            policies,
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
                panic!(
                    "usage: instructions <echo|upstream> <plain|streamed|plain-via-stream|policies|cache-hits>"
                )
            })]
        }
        _ => {
            let mut all = vec![
                Scenario::parse("echo", "plain"),
                Scenario::parse("echo", "streamed"),
                Scenario::parse("echo", "policies"),
                Scenario::parse("echo", "cache-hits"),
            ];
            if std::env::var_os("ORCHESTRATOR_BENCH_UPSTREAM").is_some() {
                for client in ["plain", "streamed", "plain-via-stream", "policies"] {
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
    for scenario in scenarios {
        let Scenario {
            upstream,
            streamed,
            always_stream,
            policies,
        } = scenario;
        let base_url = upstream.then(|| {
            upstream_url
                .as_deref()
                .expect("ORCHESTRATOR_BENCH_UPSTREAM names the bench upstream")
        });
        let config = if policies.is_some() {
            policy_config(base_url)
        } else {
            config(base_url, always_stream)
        };
        let host = rt
            .block_on(Orchestrator::start(config, Arc::new(Metrics::new())))
            .expect("the host starts");
        let pipeline = host.pipeline().clone();
        warm_up(&rt, &pipeline, scenario);
        measured(&rt, &pipeline, requests, scenario);
        println!(
            "instructions: {} {}{}{} — {requests} requests answered",
            if upstream { "upstream" } else { "echo" },
            if streamed { "streamed" } else { "plain" },
            if always_stream { " via a stream" } else { "" },
            match policies {
                Some(Policies::Misses) => " through the policy stages",
                Some(Policies::Hits) => " through the policy stages, cache hits",
                None => "",
            },
        );
        rt.block_on(host.shutdown(Duration::from_secs(5)));
    }
}
