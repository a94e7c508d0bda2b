//! The official OpenAI Python SDK works against the host unchanged: plain
//! and streaming completions, usage, model listing, and its typed errors
//! (`tests/openai_sdk.py`).

use std::process::Command;

use crate::common::Host;

#[test]
fn the_official_openai_python_sdk_works_unchanged() {
    let has_sdk = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_sdk {
        assert!(
            std::env::var_os("CI").is_none(),
            "the openai package is required in CI (.ci/run installs it)"
        );
        eprintln!("note: python3 with the openai package is missing; skipping");
        return;
    }
    let host = Host::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/openai_sdk.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(&host.api)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("ok"), "{text}");
}
