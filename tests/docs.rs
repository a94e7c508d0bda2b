//! The documentation against the code: the manual's metrics table lists
//! exactly the metrics `/metrics` exposes, and every relative link in the
//! repository's documentation resolves.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::common::Host;

/// The repository's root directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `## Metrics` section of `docs/observability.md`, up to the next
/// second-level heading.
fn metrics_section() -> String {
    let path = root().join("docs/observability.md");
    let whole =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let section = whole
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a `## Metrics` section in docs/observability.md");
    section.split("\n## ").next().unwrap_or(section).to_string()
}

/// The metric family named at the start of `text` (suffixes of histogram
/// series folded into their family).
fn family(text: &str) -> String {
    let name: String = text
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(&name)
        .to_string()
}

/// The metric families of the section's table: the first column of each
/// row that names one of ours.
fn tabled_metrics(section: &str) -> BTreeSet<String> {
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter(|l| l.starts_with("orchestrator_"))
        .map(family)
        .collect()
}

/// Every metric family of ours the section mentions anywhere: the table,
/// the prose and the PromQL examples.
fn mentioned_metrics(section: &str) -> BTreeSet<String> {
    section
        .match_indices("orchestrator_")
        .map(|(at, _)| family(&section[at..]))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manuals_metrics_table_and_the_metrics_endpoint_agree() {
    // A declared store, so that the store series exist.
    let host = Host::with_config("[stores.docs]\n");
    let text = host.metrics_text().await;
    let exposed: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let exposed_ours: BTreeSet<String> = exposed
        .iter()
        .filter(|n| n.starts_with("orchestrator_"))
        .cloned()
        .collect();
    let section = metrics_section();
    let tabled = tabled_metrics(&section);
    let undocumented: Vec<_> = exposed_ours.difference(&tabled).collect();
    let missing: Vec<_> = tabled.difference(&exposed_ours).collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not in the metrics table of docs/observability.md: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in the metrics table of docs/observability.md but not exposed: {missing:?}"
    );
    let unknown: Vec<_> = mentioned_metrics(&section)
        .into_iter()
        .filter(|n| !exposed_ours.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "named in the metrics section of docs/observability.md but not exposed: {unknown:?}"
    );
    assert!(
        exposed.iter().any(|n| n.starts_with("process_")),
        "process metrics"
    );
}

/// The documentation whose links are checked: README.md, CHANGELOG.md,
/// every `docs/*.md`, `benches/README.md` and `tests/README.md`.
fn documentation() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![
        root.join("README.md"),
        root.join("CHANGELOG.md"),
        root.join("benches/README.md"),
        root.join("tests/README.md"),
    ];
    let mut manual: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("a docs/ directory")
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    manual.sort();
    files.extend(manual);
    files
}

/// The targets of the markdown links `[text](target)` in `markdown`,
/// outside fenced code blocks (an optional `"title"` dropped).
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            let target = after[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.to_string());
            rest = &after[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_resolves() {
    let root = root();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in documentation() {
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let dir = file.parent().unwrap();
        let name = file.strip_prefix(&root).unwrap_or(&file).display();
        for target in link_targets(&text) {
            let external = ["http://", "https://", "mailto:"]
                .iter()
                .any(|scheme| target.starts_with(scheme));
            if external || target.starts_with('#') {
                continue;
            }
            checked += 1;
            let path = target.split('#').next().unwrap_or("");
            if path.is_empty() || !dir.join(path).exists() {
                broken.push(format!("{name}: ({target})"));
            }
        }
    }
    assert!(checked > 0, "no relative link found: is the parser broken?");
    assert!(
        broken.is_empty(),
        "{} broken relative link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn link_targets_are_found_outside_code_blocks_only() {
    let markdown = "[a](x.md) and [`b`](../y/z.rs#anchor \"title\") [c](#here)\n\
                    ```sh\n[not](a-link)\n```\n[d](https://example.com)";
    assert_eq!(
        link_targets(markdown),
        ["x.md", "../y/z.rs#anchor", "#here", "https://example.com"]
    );
}
