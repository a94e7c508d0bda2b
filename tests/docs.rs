//! The README's metrics section and `/metrics` list the same metrics.

use std::collections::BTreeSet;

use crate::common::Host;

/// Metric family names mentioned in the README's `## Metrics` section
/// (suffixes of histogram series folded into their family).
fn readme_metrics() -> BTreeSet<String> {
    let whole =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = whole
        .split("\n## Metrics\n")
        .nth(1)
        .expect("a Metrics section");
    let readme = section.split("\n## ").next().unwrap_or(section);
    let mut names = BTreeSet::new();
    for (at, _) in readme.match_indices("orchestrator_") {
        let name: String = readme[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.insert(family.to_string());
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_and_metrics_endpoint_agree() {
    let host = Host::start(&[]);
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
    let documented = readme_metrics();
    let undocumented: Vec<_> = exposed_ours.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exposed_ours).collect();
    assert!(
        undocumented.is_empty(),
        "exposed but not in the README: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in the README but not exposed: {missing:?}"
    );
    assert!(
        exposed.iter().any(|n| n.starts_with("process_")),
        "process metrics"
    );
}
