//! Plugin authoring: `orchestrator plugin new` writes a crate outside the
//! repository that builds both with `cargo build --target wasm32-wasip2`
//! and with `cargo component build`; each build loads into a running host
//! and a request shows it ran; `plugin check` and `plugin run` describe
//! good plugins and refuse bad ones with the host's reasons.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::common::{Host, bundled_wasm, sse, target_dir, test_plugin, tool_missing};

fn orchestrator(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(args)
        .output()
        .expect("the orchestrator binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A cargo command for a crate outside this workspace: the flags of the
/// host's build (coverage, wrappers) must not leak into it.
fn cargo(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(dir)
        .args(args)
        // One target directory for every run, so rebuilds are incremental
        // and the SDK is compiled once.
        .env("CARGO_TARGET_DIR", target_dir().join("authoring"));
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(var);
    }
    command.output().expect("cargo runs")
}

fn succeeded(what: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// Serve with `wasm` as the `post` stage and check that it masks, plain
/// and streamed, and notes the count under `note`; with `counts_in_store`,
/// that it keeps a running total in the store `profanity` it is granted.
async fn serves_as_post(wasm: &Path, note: &str, counts_in_store: bool) {
    let host = Host::with_config(&format!(
        "[stages.post]\nplugin = {:?}\nconfig = {{ words = \"darn, heck\" }}\n\
         capabilities = {{ stores = [\"profanity\"] }}\n",
        wasm.display().to_string()
    ));
    let (status, body) = host
        .chat(&json!({"model": "echo", "messages": [{"role": "user", "content": "oh darn, what the HECK"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"], "oh ****, what the ****",
        "{body}"
    );
    assert_eq!(body["orchestrator"]["metadata"][note], "2", "{body}");
    if counts_in_store {
        // The examples count in their store, across requests.
        assert_eq!(
            body["orchestrator"]["metadata"]["profanity.total"], "2",
            "{body}"
        );
        let (_, body) = host
            .chat(&json!({"model": "echo", "messages": [{"role": "user", "content": "darn"}]}))
            .await;
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body["orchestrator"]["metadata"]["profanity.total"], "3",
            "{body}"
        );
    }
    let (status, body) = host
        .chat(&json!({"model": "echo", "stream": true,
            "messages": [{"role": "user", "content": "darn it, heck yes"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sse::content(&sse::chunks(&body)),
        "**** it, **** yes",
        "{body}"
    );
}

/// Serve with `wasm` as the `post` stage right after `inference`, and check
/// that it read the structured chat (0.2.0): the example notes how many
/// messages the request has and the names of its tools.
async fn reads_messages_and_tools(wasm: &Path) {
    let host = Host::with_config(&format!(
        "[stages.post]\nplugin = {:?}\n[pipelines.default]\nstages = [\"inference\", \"post\"]\n",
        wasm.display().to_string()
    ));
    let tool = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
    let (status, body) = host
        .chat(&json!({"model": "echo",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "hello"}]}],
            "tools": [tool("get_weather"), tool("search")]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let notes = &body["orchestrator"]["metadata"];
    assert_eq!(notes["profanity.messages"], "2", "{body}");
    assert_eq!(notes["profanity.tools"], "get_weather,search", "{body}");
}

/// Generate the crate into a directory outside the repository, with a
/// copy of the binary run from there: what an installed or copied binary
/// does, with no source tree to point at. The crate carries the SDK and
/// the WIT of the binary's version.
fn generate(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let copied = bin.join("orchestrator");
    std::fs::copy(env!("CARGO_BIN_EXE_orchestrator"), &copied).unwrap();
    let output = Command::new(&copied)
        .current_dir(root)
        .args([
            "plugin",
            "new",
            "word-mask",
            "--stage",
            "post",
            "--streaming",
        ])
        .output()
        .expect("the copied binary runs");
    succeeded("plugin new", &output);
    let dir = root.join("word-mask");
    assert!(dir.join("README.md").is_file());
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    assert!(
        !manifest.contains(repository.to_str().unwrap()),
        "the crate must not point into the source tree: {manifest}"
    );
    assert!(
        dir.join("vendor/orchestrator/plugins/sdk/src/lib.rs")
            .is_file()
    );
    assert!(dir.join("vendor/orchestrator/wit/pipeline.wit").is_file());
    // A second `new` into the same place is refused, not merged.
    let again = orchestrator(&[
        "plugin",
        "new",
        "word-mask",
        "--stage",
        "post",
        "--dir",
        root.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "{}",
        text(&again.stderr)
    );
    dir
}

#[tokio::test]
async fn a_generated_plugin_builds_with_cargo_and_runs_in_the_host() {
    let root = tempfile::tempdir().unwrap();
    let dir = generate(root.path());
    // Its own native unit tests pass.
    succeeded("cargo test", &cargo(&dir, &["test", "--quiet"]));
    succeeded(
        "cargo build --target wasm32-wasip2",
        &cargo(&dir, &["build", "--release", "--target", "wasm32-wasip2"]),
    );
    let wasm = target_dir().join("authoring/wasm32-wasip2/release/word_mask.wasm");
    serves_as_post(&wasm, "word-mask.masked", false).await;

    // `plugin check` describes it, `plugin run` calls it.
    let output = orchestrator(&["plugin", "check", wasm.to_str().unwrap(), "--stage", "post"]);
    succeeded("plugin check", &output);
    let report = text(&output.stdout);
    assert!(
        report.contains("world:     orchestrator:pipeline/streaming-request-stage"),
        "{report}"
    );
    assert!(
        report.contains("exports:   init, process, process-chunk"),
        "{report}"
    );
    let input = root.path().join("envelope.json");
    std::fs::write(
        &input,
        r#"{"completion": "well, darn", "params": {"stop": []}}"#,
    )
    .unwrap();
    let output = orchestrator(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--stage",
        "post",
        "--input",
        input.to_str().unwrap(),
    ]);
    succeeded("plugin run", &output);
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(run["envelope"]["completion"], "well, ****", "{run}");
    assert!(run["fuel_used"].as_u64().unwrap() > 0, "{run}");
    let output = orchestrator(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--stage",
        "post",
        "--delta",
        "oh da",
        "--delta",
        "rn it",
    ]);
    succeeded("plugin run --delta", &output);
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(run["emitted"], "oh **** it", "{run}");
    assert_eq!(run["chunks"][0]["carry"], "da", "{run}");
}

#[tokio::test]
async fn a_generated_plugin_builds_with_cargo_component_and_runs_in_the_host() {
    if tool_missing("cargo-component") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = generate(root.path());
    succeeded(
        "cargo component build",
        &cargo(&dir, &["component", "build", "--release"]),
    );
    let wasm = target_dir().join("authoring/wasm32-wasip1/release/word_mask.wasm");
    serves_as_post(&wasm, "word-mask.masked", false).await;

    // A bundled plugin, from the workspace, builds the same way and still
    // redacts.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    succeeded(
        "cargo component build -p orchestrator-post",
        &cargo(
            &root,
            &["component", "build", "-p", "orchestrator-post", "--release"],
        ),
    );
    let wasm = target_dir().join("authoring/wasm32-wasip1/release/orchestrator_post.wasm");
    let host = Host::with_config(&format!(
        "[stages.post]\nplugin = {:?}\n",
        wasm.display().to_string()
    ));
    let (status, body) = host
        .chat(&json!({"model": "echo", "messages": [{"role": "user", "content": "write to ann@example.com"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("write to [redacted email]"), "{body}");
}

#[test]
fn plugin_check_refuses_what_the_host_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("native.wasm");
    std::fs::write(&elf, b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0").unwrap();
    let cases: [(PathBuf, &str, &str); 4] = [
        (
            test_plugin("wrong-world"),
            "post",
            "implements none of the stage worlds",
        ),
        (
            test_plugin("broken-init"),
            "post",
            "init failed: broken-init refuses",
        ),
        (
            test_plugin("foreign-import"),
            "post",
            "test:foreign/telemetry",
        ),
        (elf, "post", "an ELF executable"),
    ];
    for (file, stage, reason) in cases {
        let output = orchestrator(&["plugin", "check", file.to_str().unwrap(), "--stage", stage]);
        assert!(!output.status.success(), "{}", file.display());
        let stderr = text(&output.stderr);
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(reason), "{reason:?} not in {stderr}");
        assert!(!stderr.contains("Stack backtrace"), "{stderr}");
    }
    // The bundled stages pass, each at its own position.
    for stage in ["rag", "assemble", "inference", "post", "stream"] {
        let wasm = bundled_wasm(stage);
        let output = orchestrator(&["plugin", "check", wasm.to_str().unwrap(), "--stage", stage]);
        succeeded(&format!("plugin check {stage}"), &output);
    }
}

/// Build the example plugin of `examples/plugins/<language>` with its
/// `build.sh` into a temporary directory, and `plugin check` it; return
/// the directory (keep it), the component and the check's report.
fn build_and_check_example(language: &str) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("word_mask.wasm");
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/plugins")
        .join(language)
        .join("build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .env("OUT", &wasm)
        .output()
        .expect("bash runs");
    succeeded(&format!("{language}/build.sh"), &output);
    let output = orchestrator(&["plugin", "check", wasm.to_str().unwrap(), "--stage", "post"]);
    succeeded("plugin check", &output);
    (dir, wasm, text(&output.stdout))
}

/// The Python example (componentize-py: CPython inside the component,
/// importing wasi:sockets and inference, which the host links and denies)
/// loads, passes `plugin check`, and masks plain and streamed answers.
#[tokio::test]
async fn the_python_example_plugin_runs_in_the_host() {
    if tool_missing("componentize-py") {
        return;
    }
    let (_dir, wasm, report) = build_and_check_example("python");
    assert!(report.contains("wasi:sockets/tcp"), "{report}");
    assert!(report.contains("every socket call is denied"), "{report}");
    serves_as_post(&wasm, "profanity.masked", true).await;
    reads_messages_and_tools(&wasm).await;
}

/// The JavaScript example (componentize-js) loads and masks plain and
/// streamed answers; its inference import, never granted, stays unusable.
#[tokio::test]
async fn the_javascript_example_plugin_runs_in_the_host() {
    if tool_missing("npm") {
        return;
    }
    let (_dir, wasm, report) = build_and_check_example("js");
    assert!(report.contains("NOT granted"), "{report}");
    serves_as_post(&wasm, "profanity.masked", true).await;
    reads_messages_and_tools(&wasm).await;
}
