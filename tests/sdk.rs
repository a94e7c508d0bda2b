//! The official OpenAI Python SDK works against the host unchanged: plain
//! and streaming completions, usage, model listing, and its typed errors
//! (`tests/openai_sdk.py`); tool calls, tool results and structured output
//! (`tests/openai_sdk_tools.py`).

use std::process::Command;

use crate::common::Host;
use crate::common::upstream::{Script, Upstream};

/// Whether `python3` has the `openai` package (required in CI).
fn has_sdk() -> bool {
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
    }
    has_sdk
}

/// Run `tests/<script>` with `args`; its output, asserting it succeeded.
fn run_script(script: &str, args: &[&str]) -> String {
    let path = format!("{}/../tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    text
}

#[test]
fn the_official_openai_python_sdk_works_unchanged() {
    if !has_sdk() {
        return;
    }
    let host = Host::start(&[]);
    let text = run_script("openai_sdk.py", &[&host.api]);
    assert!(text.contains("ok"), "{text}");
}

/// Tool calls (plain, and streamed with the arguments reassembled by the
/// SDK's users' code), the follow-up with the tool's result, JSON mode and
/// a JSON schema, through the default pipeline (`tests/openai_sdk_tools.py`).
#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_sdk_gets_tool_calls_and_sends_tool_results() {
    if !has_sdk() {
        return;
    }
    let upstream = Upstream::start(Script::Agent).await;
    let host = Host::with_config(&format!(
        "[backends.up]\nkind = \"openai\"\nbase_url = \"{}\"\n[routing.models]\ngpt-test = \"up\"\n",
        upstream.base_url
    ));
    let api = host.api.clone();
    let text =
        tokio::task::spawn_blocking(move || run_script("openai_sdk_tools.py", &[&api, "gpt-test"]))
            .await
            .unwrap();
    assert!(text.contains("ok"), "{text}");
    // Five requests reached the upstream, each with the tools as sent.
    let bodies = upstream.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 5);
    assert_eq!(bodies[0]["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(bodies[2]["messages"][3]["role"], "tool");
}
