//! The host's module structure: dependencies run one way, and no file
//! grows into a grab bag.
//!
//! Every directory module's children (the top-level modules under the
//! crate root; the files and subdirectories of `wasm/`, `pipeline/`, ...)
//! form a graph whose edges are the `crate::` and `super::` paths one
//! child's code names in another. That graph must have no cycle, and a
//! child must name its siblings directly rather than items its parent
//! re-exports (which would hide a dependency behind the facade). Comments,
//! doc links and unit tests are not dependencies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest file allowed in `host/src` (a guide: past it, a file usually
/// mixes concerns).
const MAX_LINES: usize = 600;

/// A source file: its module path (`["wasm", "host", "log"]`) and its code
/// without comments.
struct Source {
    module: Vec<String>,
    code: String,
    path: PathBuf,
    lines: usize,
}

fn host_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn sources() -> Vec<Source> {
    fn walk(dir: &Path, module: &[String], out: &mut Vec<Source>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if path.is_dir() {
                let mut child = module.to_vec();
                child.push(name);
                walk(&path, &child, out);
                continue;
            }
            let Some(stem) = name.strip_suffix(".rs") else {
                continue;
            };
            if module.is_empty() && stem == "main" {
                continue; // the binary, not the library
            }
            let facade = matches!(stem, "mod" | "lib");
            let mut file_module = module.to_vec();
            if !facade {
                file_module.push(stem.to_string());
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Unit tests (at the end of a file, by convention) are not
            // dependencies of the module.
            let code = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .map(|line| line.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            out.push(Source {
                module: file_module,
                lines: text.lines().count(),
                code,
                path,
            });
        }
    }
    let mut out = Vec::new();
    walk(&host_src(), &[], &mut out);
    assert!(out.len() > 10, "found the host's sources");
    out
}

/// The absolute module paths `code` names (`crate::a::b`, `super::c`,
/// including each item of a `{...}` group), from a file of `module`.
fn references(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    // Path segments from `at` on: `a::b::{c, d::e}` -> [[a, b, c], [a, b, d, e]].
    fn paths(text: &str, ident: &dyn Fn(&str) -> String) -> Vec<Vec<String>> {
        let mut prefix = Vec::new();
        let mut rest = text;
        loop {
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                return group[..end]
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .flat_map(|item| paths(item, ident))
                    .map(|tail| prefix.iter().cloned().chain(tail).collect())
                    .collect();
            }
            let segment = ident(rest);
            if segment.is_empty() {
                return vec![prefix];
            }
            rest = &rest[segment.len()..];
            prefix.push(segment);
            match rest.strip_prefix("::") {
                Some(next) => rest = next,
                None => return vec![prefix],
            }
        }
    }
    // `super` of a facade (`a/mod.rs`, module `a`) is `a`'s parent too.
    let parent: Vec<String> = module[..module.len().saturating_sub(1)].to_vec();
    let mut out = Vec::new();
    for (keyword, base) in [("crate::", Vec::new()), ("super::", parent)] {
        for (at, _) in code.match_indices(keyword) {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut base = base.clone();
            let mut rest = &code[at + keyword.len()..];
            while let Some(up) = rest
                .strip_prefix("super::")
                .filter(|_| keyword == "super::")
            {
                base.pop();
                rest = up;
            }
            for tail in paths(rest, &ident) {
                out.push(base.iter().cloned().chain(tail).collect());
            }
        }
    }
    out
}

#[test]
fn module_dependencies_have_no_cycle() {
    let sources = sources();
    // Every directory module (a facade) and its children.
    let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for source in &sources {
        for depth in 0..source.module.len() {
            children
                .entry(source.module[..depth].to_vec())
                .or_default()
                .insert(source.module[depth].clone());
        }
    }
    let mut problems = Vec::new();
    for (parent, kids) in &children {
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for source in &sources {
            let Some(child) = source
                .module
                .strip_prefix(parent.as_slice())
                .and_then(|rest| rest.first())
            else {
                continue;
            };
            for path in references(&source.code, &source.module) {
                let Some(rest) = path.strip_prefix(parent.as_slice()) else {
                    continue;
                };
                let Some(target) = rest.first() else {
                    continue;
                };
                if target == child {
                    continue;
                }
                if let Some(target) = kids.get(target) {
                    edges.entry(child).or_default().insert(target.as_str());
                } else if !rest.is_empty() && source.module.len() > parent.len() {
                    problems.push(format!(
                        "{}: names `{}`, an item of its parent module's facade; name the sibling module that defines it",
                        source.path.display(),
                        path.join("::")
                    ));
                }
            }
        }
        if let Some(cycle) = find_cycle(&edges) {
            problems.push(format!(
                "a dependency cycle among the children of `crate{}`: {}",
                parent.iter().map(|p| format!("::{p}")).collect::<String>(),
                cycle.join(" -> ")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A cycle of `edges`, if there is one, as the nodes along it.
fn find_cycle<'a>(edges: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Option<Vec<&'a str>> {
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = path.iter().position(|n| *n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_cycle_check_finds_cycles() {
    let edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::from([
        ("config", BTreeSet::new()),
        ("wasm", BTreeSet::from(["config", "pipeline"])),
        ("pipeline", BTreeSet::from(["wasm"])),
    ]);
    let cycle = find_cycle(&edges).expect("a cycle");
    assert!(
        cycle.contains(&"wasm") && cycle.contains(&"pipeline"),
        "{cycle:?}"
    );
    let module = ["wasm".to_string(), "host".to_string(), "log".to_string()];
    let refs = references(
        "use super::state::{Field, HostState};\nuse crate::{config::Stage, metrics};\nuse super::super::engine::EPOCH_TICK;",
        &module,
    );
    let refs: Vec<String> = refs.iter().map(|r| r.join("::")).collect();
    assert_eq!(
        refs,
        [
            "config::Stage",
            "metrics",
            "wasm::host::state::Field",
            "wasm::host::state::HostState",
            "wasm::engine::EPOCH_TICK"
        ]
    );
}

#[test]
fn no_file_is_a_grab_bag() {
    let long: Vec<String> = sources()
        .iter()
        .filter(|s| s.lines > MAX_LINES)
        .map(|s| format!("{} ({} lines)", s.path.display(), s.lines))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines: {long:?}; split them by concern"
    );
}
