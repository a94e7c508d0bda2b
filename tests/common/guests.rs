//! Where the compiled guests are: the bundled plugins (built by
//! `host/build.rs`) and the test guests of `tests/plugins/` (built here, on
//! first use, for wasm32-wasip2). Shared by the integration tests and the
//! benchmarks.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's `target/` directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A bundled plugin's compiled component, as the build script left it.
pub fn bundled_wasm(stage: &str) -> PathBuf {
    target_dir().join(format!(
        "wasm-plugins/wasm32-wasip2/plugin/orchestrator_{stage}.wasm"
    ))
}

/// A guest test program from `tests/plugins/<name>`, built once per run.
pub fn test_plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target = target_dir().join("test-plugins");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/plugins/Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building tests/plugins failed");
        target.join("wasm32-wasip2/release")
    });
    let path = dir.join(format!("test_{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "no test plugin {}", path.display());
    path
}

/// Hex sha256 of `bytes`: a plugin's identity in `/health`, the admin API
/// and the artifact cache's entry names.
pub fn sha_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Whether the artifact cache `dir` has an entry for the component `sha256`.
pub fn cached(dir: &Path, sha256: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with(sha256))
        })
        .unwrap_or(false)
}
