//! The cost of a plugin call, layer by layer, and of each bundled stage in
//! wasm against the same logic compiled natively.
//!
//! ```text
//! cargo bench -p orchestrator --bench stages
//! ```
//!
//! Groups:
//! - `call`: the cost of a call on a warm instance, host side included
//!   (deadline arming, async call, output check), by world:
//!   - `by_value/*`: the `noop` guest (a `stage` world plugin that returns
//!     its input) with an empty, a small (~100 B prompt) and a realistic
//!     envelope (4 KiB prompt, 8 × 512 B passages, 1 KiB completion): the
//!     whole envelope is copied in and out;
//!   - `by_handle/*`: the `touch` guest (a `request-stage` plugin) on the
//!     realistic envelope, doing nothing (`bare`: the call itself) or
//!     reading and setting back the 1 KiB completion (`completion`).
//! - `stage`: each bundled stage, wasm vs native, on the realistic envelope.
//! - `instance`: a fresh pooled instance + `init` + one small call + drop,
//!   as in the `per-request` instance mode, for a by-value guest (`noop`),
//!   a by-handle one that does nothing (`touch`), the same without Rust's
//!   `std` and so without any WASI import (`lean`) and the bundled `post`;
//!   and `noop/fresh_drop`, the instance without the call.
//! - `overhead`: the metric updates one request costs.
//! - `linear`: each bundled stage's logic (natively) on pathological input
//!   of size n and 2n, the kinds that once were quadratic: a question of
//!   distinct words (`rag`), a long question (`assemble`), unbroken runs of
//!   `.`, of a letter and of spaces streamed in 4-byte deltas (`post` and
//!   `stream`, chunk path), and the whole-mode `post` in wasm on a run of
//!   `.`. Linear work shows as a time ratio of about 2 between the two.

#[path = "../tests/common/guests.rs"]
mod guests;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use orchestrator::chat::{Message, Params};
use orchestrator::config::{Bundled as Stage, Config, PluginSource, StageConfig};
use orchestrator::inference::{GenerateRequest, Router};
use orchestrator::metrics::{Metrics, Outcome};
use orchestrator::wasm::{
    EngineSettings, Envelope, HostServices, Instance, Passage, Plugin, PluginBytes, Runtime,
};

const TIMEOUT: Duration = Duration::from_secs(5);

struct Bench {
    rt: tokio::runtime::Runtime,
    runtime: Runtime,
    metrics: Metrics,
    router: Router,
}

impl Bench {
    fn new() -> Bench {
        let settings = EngineSettings {
            max_instances: 64,
            max_memory_bytes: 64 << 20,
            cache_dir: Some(guests::target_dir().join("bench-cache")),
            fuel: false,
        };
        let metrics = Metrics::new();
        // The rag stage's default grant reads the bundled corpus there.
        orchestrator::bundled::install_corpus(&orchestrator::config::default_corpus_dir()).unwrap();
        Bench {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            runtime: Runtime::new(&settings, &metrics).unwrap(),
            router: Router::new(&Config::default(), &metrics).unwrap(),
            metrics,
        }
    }

    /// Load `bytes` as stage `stage` (with that stage's default grants).
    fn load(&self, stage: Stage, bytes: Vec<u8>) -> Arc<Plugin> {
        self.load_with(stage, bytes, &[])
    }

    /// Load `bytes` as stage `stage` with `config` as its config table.
    fn load_with(&self, stage: Stage, bytes: Vec<u8>, config: &[(&str, &str)]) -> Arc<Plugin> {
        let mut settings = StageConfig::bundled_default(stage);
        settings.config = config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let services = HostServices {
            router: Some(self.router.clone()),
            instances: self.metrics.stage(stage.name()).instances,
            ledger: Arc::default(),
        };
        self.rt
            .block_on(self.runtime.load(
                &settings,
                PluginSource::Upload,
                PluginBytes::new(bytes),
                &services,
            ))
            .unwrap()
            .plugin
    }

    fn instance(&self, plugin: &Arc<Plugin>) -> Instance {
        self.rt.block_on(Instance::new(plugin)).unwrap()
    }

    fn call(&self, instance: &mut Instance, envelope: &mut Envelope) {
        self.rt
            .block_on(instance.process(envelope, TIMEOUT))
            .unwrap()
    }

    /// Time `call` on a fresh copy of `envelope` each iteration (a stage
    /// transforms the envelope in place; the copy is not timed).
    fn bench_call(
        &self,
        group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        instance: &mut Instance,
        envelope: &Envelope,
    ) {
        group.bench_function(name, |b| {
            b.iter_batched_ref(
                || envelope.clone(),
                |envelope| self.call(instance, black_box(envelope)),
                BatchSize::SmallInput,
            )
        });
    }
}

fn bundled(stage: &str) -> Vec<u8> {
    std::fs::read(guests::bundled_wasm(stage)).unwrap()
}

fn params() -> Params {
    let mut params = Params::for_model("echo");
    params.max_tokens = Some(256);
    params.temperature = Some(0.0);
    params.stop = vec!["\n\nUser:".into()];
    params
}

const QUESTION: &str =
    "What is backpressure, and how does the orchestrator shed load when a queue is full?";

fn small() -> Envelope {
    Envelope::new(
        "chatcmpl-bench".into(),
        vec![Message::new("user", QUESTION)],
        params(),
        Vec::new(),
    )
}

/// A 4 KiB chat (a system prompt, an earlier turn, the question), 8 × 512 B
/// passages, 1 KiB completion with an e-mail address.
fn realistic() -> Envelope {
    let mut envelope = small();
    let sentence =
        "Bounded queues make backpressure explicit: a full queue refuses work at ingress. ";
    let text = |bytes: usize| sentence.repeat(bytes / sentence.len() + 1)[..bytes].to_string();
    envelope.passages = (0..8)
        .map(|n| Passage {
            source: format!("doc-{n}.md"),
            text: text(512),
            score: 8.0 - n as f32,
        })
        .collect();
    envelope.messages = vec![
        Message::new("system", "Be brief."),
        Message::new("user", text(2000)),
        Message::new("assistant", text(4096 - 2000 - QUESTION.len() - 9)),
        Message::new("user", QUESTION),
    ];
    envelope.completion = format!("{} Contact ops@example.com for details.", text(1000));
    envelope
}

fn call_layers(c: &mut Criterion) {
    let bench = Bench::new();
    let noop = bench.load(
        Stage::Post,
        std::fs::read(guests::test_plugin("noop")).unwrap(),
    );
    let mut instance = bench.instance(&noop);
    let mut group = c.benchmark_group("call");
    for (name, envelope) in [
        ("by_value/empty", Envelope::placeholder()),
        ("by_value/small", small()),
        ("by_value/realistic", realistic()),
    ] {
        bench.bench_call(&mut group, name, &mut instance, &envelope);
    }
    let touch = std::fs::read(guests::test_plugin("touch")).unwrap();
    for (name, mode) in [
        ("by_handle/bare", ""),
        ("by_handle/completion", "completion"),
    ] {
        let plugin = bench.load_with(Stage::Post, touch.clone(), &[("mode", mode)]);
        let mut instance = bench.instance(&plugin);
        bench.bench_call(&mut group, name, &mut instance, &realistic());
    }
    group.finish();
}

fn stages_vs_native(c: &mut Criterion) {
    let bench = Bench::new();
    let envelope = realistic();
    let mut group = c.benchmark_group("stage");

    // rag: BM25 search over the bundled corpus.
    let corpus_dir = orchestrator::config::default_corpus_dir();
    let documents: Vec<(String, String)> = std::fs::read_dir(&corpus_dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect();
    let index =
        orchestrator_rag::Index::build(documents.iter().map(|(s, t)| (s.as_str(), t.as_str())));
    group.bench_function("rag/native", |b| {
        b.iter(|| black_box(index.search(black_box(QUESTION), 3, 4096).map(|h| h.len())))
    });
    let mut rag_input = envelope.clone();
    rag_input.passages.clear();
    let mut rag = bench.instance(&bench.load(Stage::Rag, bundled("rag")));
    bench.bench_call(&mut group, "rag/wasm", &mut rag, &rag_input);

    // assemble: prompt under a token budget.
    let settings = orchestrator_assemble::Settings::default();
    group.bench_function("assemble/native", |b| {
        b.iter(|| {
            let passages: Vec<_> = envelope
                .passages
                .iter()
                .map(|p| (p.source.as_str(), p.text.as_str()))
                .collect();
            let messages: Vec<_> = envelope
                .messages
                .iter()
                .map(|m| orchestrator_plugin::Message::new(&m.role, m.text()))
                .collect();
            black_box(orchestrator_assemble::assemble(
                &settings, &passages, &messages,
            ))
        })
    });
    let mut assemble = bench.instance(&bench.load(Stage::Assemble, bundled("assemble")));
    bench.bench_call(&mut group, "assemble/wasm", &mut assemble, &envelope);

    // inference: the echo backend, through the host's backend machinery
    // (a generation task and its token channel) in both arms.
    group.bench_function("inference/native", |b| {
        b.iter(|| {
            let request = GenerateRequest {
                messages: envelope.messages.clone(),
                tools: Vec::new(),
                params: envelope.params.clone(),
                stream: false,
                deadline: Instant::now() + Duration::from_secs(5),
                request_id: String::new(),
                trace: orchestrator::trace::Trace::off(),
            };
            black_box(
                bench
                    .rt
                    .block_on(bench.router.generate(request, None))
                    .map(|c| c.completion_tokens),
            )
        })
    });
    let mut inference = bench.instance(&bench.load(Stage::Inference, bundled("inference")));
    bench.bench_call(&mut group, "inference/wasm", &mut inference, &envelope);

    // post: stop sequences, trim, redaction.
    group.bench_function("post/native", |b| {
        b.iter(|| {
            black_box(orchestrator_post::clean(
                &envelope.completion,
                &envelope.params.stop,
            ))
        })
    });
    let mut post = bench.instance(&bench.load(Stage::Post, bundled("post")));
    bench.bench_call(&mut group, "post/wasm", &mut post, &envelope);

    // stream: chunking.
    group.bench_function("stream/native", |b| {
        b.iter(|| {
            black_box(orchestrator_stream::chunks(
                &envelope.completion,
                orchestrator_stream::DEFAULT_CHUNK_TOKENS,
            ))
        })
    });
    let mut stream = bench.instance(&bench.load(Stage::Stream, bundled("stream")));
    bench.bench_call(&mut group, "stream/wasm", &mut stream, &envelope);
    group.finish();
}

fn instance_cost(c: &mut Criterion) {
    let bench = Bench::new();
    let envelope = small();
    let mut group = c.benchmark_group("instance");
    // Instantiation and `init` alone, without a call.
    let noop = bench.load(
        Stage::Post,
        std::fs::read(guests::test_plugin("noop")).unwrap(),
    );
    group.bench_function("noop/fresh_drop", |b| {
        b.iter(|| black_box(bench.instance(&noop)))
    });
    for (name, bytes) in [
        ("noop", std::fs::read(guests::test_plugin("noop")).unwrap()),
        (
            "touch",
            std::fs::read(guests::test_plugin("touch")).unwrap(),
        ),
        ("lean", std::fs::read(guests::test_plugin("lean")).unwrap()),
        ("post", bundled("post")),
    ] {
        let plugin = bench.load(Stage::Post, bytes);
        group.bench_function(format!("{name}/fresh_call_drop"), |b| {
            b.iter_batched_ref(
                || envelope.clone(),
                |envelope| {
                    let mut instance = bench.instance(&plugin);
                    bench.call(&mut instance, black_box(envelope));
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn overheads(c: &mut Criterion) {
    let metrics = Metrics::new();
    let stages: Vec<_> = Stage::DEFAULT_PIPELINE
        .iter()
        .map(|s| metrics.stage(s.name()))
        .collect();
    let requests = metrics.requests_by_outcome();
    let mut group = c.benchmark_group("overhead");
    // Exactly what the pipeline records for one successful request.
    group.bench_function("metrics_per_request", |b| {
        b.iter(|| {
            for stage in &stages {
                stage.queue_depth.inc();
                stage.queue_depth.dec();
                stage.requests.inc();
                stage.duration.observe(black_box(0.000_2));
            }
            requests.observe(
                Outcome::Ok,
                black_box(Duration::from_micros(900)),
                black_box(Duration::from_micros(300)),
            );
        })
    });
    group.finish();
}

/// Stream `text` through a chunk function in 4-byte deltas (cut at
/// character boundaries), then the final call, as the host does.
fn stream_through(text: &str, mut call: impl FnMut(&str, &str, bool) -> String) -> usize {
    let cuts = (0..text.len()).step_by(4);
    let deltas = orchestrator_text::split_at_offsets(text, cuts);
    let mut carry = String::new();
    let mut longest = 0;
    for (delta, last) in deltas.iter().map(|d| (*d, false)).chain([("", true)]) {
        carry = call(&carry, delta, last);
        longest = longest.max(carry.len());
    }
    longest
}

fn linear_in_input(c: &mut Criterion) {
    let bench = Bench::new();
    let mut group = c.benchmark_group("linear");
    let index = orchestrator_rag::Index::build([("a.md", "queue backpressure worker stage")]);
    let settings = orchestrator_assemble::Settings {
        max_question_tokens: usize::MAX,
        ..Default::default()
    };
    let stop = vec!["\n\nUser:".to_string()];
    for n in [100_000, 200_000] {
        let words: String = (0..n / 6).map(|i| format!("w{i:04x} ")).collect();
        group.bench_function(format!("rag/distinct_words/{n}"), |b| {
            b.iter(|| {
                index
                    .search(black_box(&words), 3, usize::MAX)
                    .map(|h| h.len())
            })
        });
        let question = "why ".repeat(n / 4);
        group.bench_function(format!("assemble/question/{n}"), |b| {
            b.iter(|| {
                let chat = [orchestrator_plugin::Message::new(
                    "user",
                    black_box(&question),
                )];
                orchestrator_assemble::assemble(&settings, &[], &chat).map(|a| a.prompt_tokens)
            })
        });
        for (name, unit) in [("dots", "."), ("letters", "a"), ("spaces", " ")] {
            let text = format!("start {}end", unit.repeat(n));
            group.bench_function(format!("post/chunks/{name}/{n}"), |b| {
                b.iter(|| {
                    stream_through(&text, |carry, delta, last| {
                        orchestrator_post::process_chunk(&stop, carry, delta, last)
                            .map(|out| out.carry)
                            .unwrap_or_default()
                    })
                })
            });
            group.bench_function(format!("stream/chunks/{name}/{n}"), |b| {
                b.iter(|| {
                    stream_through(&text, |carry, delta, last| {
                        orchestrator_stream::process_chunk(1, carry, delta, last).carry
                    })
                })
            });
        }
        let mut envelope = small();
        envelope.completion = ".".repeat(n);
        let mut post = bench.instance(&bench.load(Stage::Post, bundled("post")));
        bench.bench_call(
            &mut group,
            &format!("post/wasm/dots/{n}"),
            &mut post,
            &envelope,
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = call_layers, stages_vs_native, instance_cost, overheads, linear_in_input
}
criterion_main!(benches);
