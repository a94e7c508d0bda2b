//! The rogues' gallery: a stage that misbehaves in the way its `mode`
//! config names, but only for requests whose last user message contains
//! the word `rogue` — every other request passes through untouched, so a
//! test can check that the host serves normally right after the misdeed.
//!
//! Modes: `loop` (endless loop), `membomb` (allocates until the memory cap),
//! `trap` (wasm `unreachable`), `panic` (Rust panic), `big-output` (returns
//! `bytes` bytes, default 100 MiB), `sleep` (sleeps 30 s inside a host
//! call), `escape` (tries to read files outside its preopen), `flaky`
//! (fails 30% of all calls at random), `log-flood` (10 000 log records per
//! call), `init-fails` (refuses to start), `fail` (a plugin error), `env`
//! (reports the environment variables it can see), `grow` (touches and frees
//! `bytes` bytes, default 16 MiB, then answers normally: its linear memory
//! keeps the high-water mark).

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

// The by-value `stage` world of 0.1.2 (`wit/v0.1`): an old plugin, which
// the host must keep loading.
wit_bindgen::generate!({ world: "stage", path: "../../../wit/v0.1" });

use orchestrator::pipeline::log::{Level, emit};

static MODE: OnceLock<String> = OnceLock::new();
static BYTES: OnceLock<usize> = OnceLock::new();

fn triggered(request: &Envelope) -> bool {
    request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .is_some_and(|m| m.content.contains("rogue"))
}

/// A random number in 0..100 from WASI randomness (via std's hasher seeds).
fn percent() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u8(0);
    hasher.finish() % 100
}

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        for (key, value) in config {
            match key.as_str() {
                "mode" => {
                    let _ = MODE.set(value);
                }
                "bytes" => {
                    let _ = BYTES.set(value.parse().map_err(|_| "bytes: not a number")?);
                }
                _ => {}
            }
        }
        if MODE.get().map(String::as_str) == Some("init-fails") {
            return Err("rogue refuses to start: init-fails mode".into());
        }
        Ok(())
    }

    fn process(mut request: Envelope) -> Result<Envelope, StageError> {
        let mode = MODE.get().map(String::as_str).unwrap_or("");
        if mode == "flaky" {
            return if percent() < 30 {
                Err(StageError::PluginError("flaky failure".into()))
            } else {
                Ok(request)
            };
        }
        if !triggered(&request) {
            return Ok(request);
        }
        match mode {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "membomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => core::arch::wasm32::unreachable(),
            "panic" => panic!("the rogue panics"),
            "big-output" => {
                request.completion = "x".repeat(*BYTES.get().unwrap_or(&(100 << 20)));
                Ok(request)
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(30));
                Ok(request)
            }
            "escape" => {
                let mut found = Vec::new();
                let mut errors = Vec::new();
                for path in [
                    "/etc/passwd",
                    "/corpus/../../../etc/passwd",
                    "../etc/passwd",
                    "/proc/self/environ",
                ] {
                    match std::fs::read_to_string(path) {
                        Ok(text) => found.push(text),
                        Err(e) => errors.push(format!("{path}: {e}")),
                    }
                }
                if found.is_empty() {
                    Err(StageError::PluginError(format!(
                        "escape failed: {}",
                        errors.join("; ")
                    )))
                } else {
                    request.completion = found.join("\n");
                    Ok(request)
                }
            }
            "log-flood" => {
                for n in 0..10_000 {
                    emit(
                        Level::Warn,
                        "rogue log flood",
                        &[("n".into(), n.to_string())],
                    );
                }
                Ok(request)
            }
            "fail" => Err(StageError::PluginError("the rogue fails on request".into())),
            "grow" => {
                let hoard = vec![1u8; *BYTES.get().unwrap_or(&(16 << 20))];
                std::hint::black_box(&hoard);
                drop(hoard);
                Ok(request)
            }
            "env" => {
                let seen: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                request.metadata.push(("rogue.env".into(), seen.join(",")));
                Ok(request)
            }
            _ => Ok(request),
        }
    }
}

export!(Component);
