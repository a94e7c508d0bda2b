//! Startup errors: a bad plugin or config stops the host with a message
//! naming the file and the problem.

use std::path::Path;

use crate::common::{Host, ask, bundled_wasm, cached, get_json, sha_of, test_plugin};

/// Start with `post.wasm` = `bytes` in a plugins directory; return stderr
/// and the file's path (inside the returned directory, kept alive).
fn start_with_post(bytes: &[u8]) -> (String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("post.wasm");
    std::fs::write(&path, bytes).unwrap();
    let stderr = match Host::try_start(&["--plugins", dir.path().to_str().unwrap()]) {
        Ok(_) => panic!("the host started with a bad post.wasm"),
        Err(stderr) => stderr,
    };
    (stderr, path, dir)
}

fn assert_names(stderr: &str, path: &Path, problem: &str) {
    assert!(stderr.contains("stage `post`"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(problem),
        "expected {problem:?} in:\n{stderr}"
    );
}

#[test]
fn a_file_that_is_not_wasm_is_refused_by_name() {
    let (stderr, path, _dir) = start_with_post(b"#!/bin/sh\necho not a plugin\n");
    assert_names(&stderr, &path, "not a WebAssembly file");
}

#[test]
fn a_core_module_is_refused() {
    let (stderr, path, _dir) = start_with_post(b"\0asm\x01\0\0\0");
    assert_names(&stderr, &path, "a core WebAssembly module, not a component");
}

#[test]
fn a_component_of_the_wrong_world_is_refused() {
    let bytes = std::fs::read(test_plugin("wrong-world")).unwrap();
    let (stderr, path, _dir) = start_with_post(&bytes);
    assert_names(
        &stderr,
        &path,
        "implements none of the stage worlds of orchestrator:pipeline",
    );
    // The accepted worlds, and what the component has instead.
    assert!(
        stderr.contains("`streaming-request-stage`") && stderr.contains("it exports `run`"),
        "{stderr}"
    );
}

#[test]
fn a_native_binary_is_refused_with_the_build_command() {
    let (stderr, path, _dir) = start_with_post(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    assert_names(&stderr, &path, "an ELF executable or library");
    assert!(stderr.contains("--target wasm32-wasip2"), "{stderr}");
}

#[test]
fn an_import_no_host_provides_is_refused_before_compiling() {
    let bytes = std::fs::read(test_plugin("foreign-import")).unwrap();
    let (stderr, path, _dir) = start_with_post(&bytes);
    assert_names(&stderr, &path, "test:foreign/telemetry");
    assert!(stderr.contains("only WASI 0.2"), "{stderr}");
}

/// Nothing a refused plugin was compiled into stays in the artifact cache,
/// whether it was refused before compiling (its world, its imports) or
/// after (its `init`).
#[test]
fn a_refused_plugin_leaves_nothing_in_the_artifact_cache() {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path().join("cache");
    for name in ["foreign-import", "wrong-world", "broken-init"] {
        let bytes = std::fs::read(test_plugin(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("post.wasm"), &bytes).unwrap();
        let plugins = dir.path().to_str().unwrap();
        let stderr = Host::try_start_with_cache(&["--plugins", plugins], &cache)
            .err()
            .expect("refused");
        assert!(stderr.contains("stage `post`"), "{name}: {stderr}");
        assert!(
            !cached(&cache, &sha_of(&bytes)),
            "{name} left a cache entry"
        );
    }
    // A plugin that loads is cached (the check above can fail).
    let _host = Host::try_start_with_cache(&[], &cache).expect("starts");
    let post = std::fs::read(bundled_wasm("post")).unwrap();
    assert!(cached(&cache, &sha_of(&post)));
}

#[test]
fn a_panic_in_init_is_reported_with_its_message() {
    let stderr = Host::try_with_config(&format!(
        "[stages.post]\nplugin = {:?}\nconfig = {{ mode = \"init-panics\" }}\n",
        test_plugin("sdk-panic").display().to_string()
    ))
    .err()
    .expect("refused");
    assert!(
        stderr.contains("init failed")
            && stderr.contains("panicked at")
            && stderr.contains("deliberate panic: in init"),
        "{stderr}"
    );
}

#[test]
fn a_plugin_whose_init_fails_is_refused() {
    let stderr = Host::try_with_config("[stages.stream.config]\nchunk_tokens = \"many\"\n")
        .err()
        .expect("refused");
    assert!(
        stderr.contains("stage `stream`") && stderr.contains("init failed"),
        "{stderr}"
    );
    assert!(stderr.contains("chunk_tokens"), "{stderr}");
}

#[test]
fn config_errors_name_the_key() {
    let stderr = Host::try_with_config("[stages.rag]\nworkerz = 2\n")
        .err()
        .expect("refused");
    assert!(stderr.contains("workerz"), "{stderr}");
    let stderr = Host::try_with_config("[stages.post]\nqueue_capacity = 0\n")
        .err()
        .expect("refused");
    assert!(stderr.contains("stages.post.queue_capacity"), "{stderr}");
}

/// Files the host is pointed at are read only if they are regular files
/// of bounded size: a device is not read without end, a FIFO does not hang
/// startup, an absurd bound does not allocate.
#[test]
fn devices_fifos_and_unbounded_values_are_refused_at_startup() {
    let stderr = Host::try_start(&["--config", "/dev/zero"])
        .err()
        .expect("refused");
    assert!(
        stderr.contains("/dev/zero") && stderr.contains("not a regular file"),
        "{stderr}"
    );
    let stderr = Host::try_with_config("[stages.post]\nplugin = \"/dev/zero\"\n")
        .err()
        .expect("refused");
    assert!(
        stderr.contains("stage `post`") && stderr.contains("not a regular file"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("post.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let stderr = Host::try_start(&["--plugins", dir.path().to_str().unwrap()])
        .err()
        .expect("refused");
    assert!(
        stderr.contains("stage `post`") && stderr.contains("not a regular file"),
        "{stderr}"
    );
    let stderr = Host::try_with_config("[stages.rag]\nqueue_capacity = 1000000000000\n")
        .err()
        .expect("refused");
    assert!(
        stderr.contains("stages.rag.queue_capacity") && stderr.contains("between 1 and 65536"),
        "{stderr}"
    );
}

#[test]
fn plugins_from_a_directory_replace_the_bundled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::copy(bundled_wasm("post"), dir.join("post.wasm")).unwrap();
    let host = Host::start(&["--plugins", dir.to_str().unwrap()]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let health = runtime.block_on(get_json(&format!("{}/health", host.metrics)));
    let post = &health["stages"][3];
    assert_eq!(post["name"], "post");
    assert_eq!(
        post["plugin"]["source"],
        dir.join("post.wasm").display().to_string()
    );
    assert_eq!(health["stages"][0]["plugin"]["source"], "bundled");
}

/// The artifact cache runs only what this host compiled for exactly that
/// component: entries swapped, patched, planted, linked or piped in are
/// refused (logged, counted) and recompiled, never loaded.
#[test]
fn tampered_cache_entries_are_recompiled_not_trusted() {
    let base = tempfile::tempdir().unwrap();
    let cache = base.path().join("cache");
    let entries = |cache: &Path| {
        let mut entries: Vec<_> = std::fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        entries.sort();
        entries
    };
    let sha_of = |stage: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(bundled_wasm(stage)).unwrap(),
        ))
    };
    let entry_of = |stage: &str| {
        let sha = sha_of(stage);
        entries(&cache)
            .into_iter()
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&sha))
            .expect("an entry per bundled plugin")
    };
    drop(Host::start_with(&[], &[], &cache));
    assert_eq!(entries(&cache).len(), 5, "one entry per bundled plugin");
    assert!(
        base.path().join("cache.key").is_file(),
        "the key is outside the cache"
    );
    // Private whatever the umask: the directory 0700, key and entries 0600.
    let mode =
        |p: &Path| std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(p).unwrap()) & 0o777;
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&base.path().join("cache.key")), 0o600);
    for entry in entries(&cache) {
        assert_eq!(mode(&entry), 0o600, "{}", entry.display());
    }

    // 1. `stream`'s entry under `post`'s name: valid code, wrong component.
    std::fs::copy(entry_of("stream"), entry_of("post")).unwrap();
    // 2. A patched artifact (one byte flipped near the end).
    let rag = entry_of("rag");
    let mut data = std::fs::read(&rag).unwrap();
    let at = data.len() - 100;
    data[at] ^= 0x01;
    std::fs::write(&rag, data).unwrap();
    // 3. A link to a device that never ends.
    let assemble = entry_of("assemble");
    std::fs::remove_file(&assemble).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &assemble).unwrap();
    // 4. A FIFO, which would block a reader forever.
    let inference = entry_of("inference");
    std::fs::remove_file(&inference).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&inference)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());

    let host = Host::start_with(&[], &[], &cache);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // `post` still redacts: its own code runs, not `stream`'s.
    let (status, text) =
        runtime.block_on(host.chat(&crate::common::ask("Write to alice@example.com please")));
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("alice@example.com"), "{text}");
    assert!(text.contains("[redacted email]"), "{text}");
    let metrics = runtime.block_on(host.metrics_text());
    let refused = |reason: &str| {
        crate::common::metric_value(
            &metrics,
            &format!("orchestrator_artifact_cache_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refused("bad_mac"), 2.0, "{metrics}");
    assert_eq!(refused("unsafe_file"), 2.0, "{metrics}");
    let log = host.stderr();
    assert_eq!(
        log.matches("artifact cache entry refused; recompiling")
            .count(),
        4,
        "{log}"
    );
    // The rewritten entries are trusted again, and are plain files.
    drop(host);
    assert!(!std::fs::symlink_metadata(&assemble).unwrap().is_symlink());
    let host = Host::start_with(&[], &[], &cache);
    assert!(!host.stderr().contains("refused"), "{}", host.stderr());
}

/// A cache directory that others may write to is not used at all; the
/// host runs without it and says so.
#[test]
fn a_cache_directory_others_can_write_is_not_used() {
    use std::os::unix::fs::PermissionsExt;

    let base = tempfile::tempdir().unwrap();
    let cache = base.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let host = Host::start_with(&[], &[], &cache);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (status, text) = runtime.block_on(host.chat(&crate::common::ask("still served?")));
    assert_eq!(status, 200, "{text}");
    assert!(
        host.stderr()
            .contains("not using the artifact cache directory"),
        "{}",
        host.stderr()
    );
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "nothing written"
    );
}

/// Command-line flags win over the file: the file's addresses cannot be
/// bound here (TEST-NET-1 is on no interface), the flags' can.
#[test]
fn flags_override_the_config_file() {
    let file = "listen = \"192.0.2.1:8080\"\nmetrics_listen = \"192.0.2.1:9090\"\n";
    let host = Host::with_config(file);
    assert!(host.api.starts_with("http://127.0.0.1:"), "{}", host.api);
    // Without the flags, the file's address is used and fails, named.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestrator.toml");
    std::fs::write(&path, file).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["--config", path.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot listen on 192.0.2.1:8080"),
        "{stderr}"
    );
}

/// An installed or copied binary (`cargo install`, a release tarball) runs
/// from any directory with the bundled `rag` corpus: it carries the corpus
/// and writes it under the user's cache directory at startup.
#[tokio::test(flavor = "multi_thread")]
async fn a_copied_binary_serves_the_bundled_corpus_from_any_directory() {
    let install = tempfile::tempdir().unwrap();
    let program = install.path().join("orchestrator");
    std::fs::copy(env!("CARGO_BIN_EXE_orchestrator"), &program).unwrap();
    let cache_home = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let host = Host::start_program(
        &program,
        cwd.path(),
        &[("XDG_CACHE_HOME", cache_home.path().to_str().unwrap())],
    );
    let corpus = cache_home
        .path()
        .join(format!("orchestrator-corpus-{}", env!("CARGO_PKG_VERSION")));
    assert!(
        corpus.join("backpressure.md").is_file(),
        "the corpus was written to {}",
        corpus.display()
    );
    let (status, body) = host.chat(&ask("What is backpressure?")).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sources = answer["orchestrator"]["sources"].to_string();
    assert!(sources.contains("backpressure.md"), "{answer}");
}
