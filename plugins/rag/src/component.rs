//! WebAssembly glue: the `request-stage` world's exports for the `rag`
//! stage.

use std::sync::OnceLock;

use crate::{Index, query_of};

wit_bindgen::generate!({ world: "request-stage", path: "../../wit" });

use orchestrator::pipeline::log::{Level, emit};
use orchestrator::pipeline::types::Passage;

struct Rag {
    index: Index,
    top_k: usize,
}

static STATE: OnceLock<Rag> = OnceLock::new();

/// Read every `.md` / `.txt` file under `dir`, recursively, sorted by path.
fn read_corpus(dir: &str) -> Result<Vec<(String, String)>, String> {
    let mut documents = Vec::new();
    let mut pending = vec![std::path::PathBuf::from(dir)];
    while let Some(path) = pending.pop() {
        let entries = std::fs::read_dir(&path)
            .map_err(|e| format!("cannot read corpus directory {}: {e}", path.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", path.display()))?;
            let child = entry.path();
            if child.is_dir() {
                pending.push(child);
            } else if matches!(
                child.extension().and_then(|e| e.to_str()),
                Some("md" | "txt")
            ) {
                let text = std::fs::read_to_string(&child)
                    .map_err(|e| format!("cannot read {}: {e}", child.display()))?;
                let name = child
                    .strip_prefix(dir)
                    .unwrap_or(&child)
                    .display()
                    .to_string();
                documents.push((name.trim_start_matches('/').to_string(), text));
            }
        }
    }
    documents.sort();
    Ok(documents)
}

struct Component;

impl Guest for Component {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let mut dir = "/corpus".to_string();
        let mut top_k = 3usize;
        for (key, value) in config {
            match key.as_str() {
                "corpus_dir" => dir = value,
                "top_k" => {
                    top_k = value
                        .parse()
                        .map_err(|_| format!("top_k must be a whole number, got {value:?}"))?
                }
                other => {
                    return Err(format!(
                        "unknown config key {other:?} (expected corpus_dir, top_k)"
                    ));
                }
            }
        }
        let documents = read_corpus(&dir)?;
        let index = Index::build(documents.iter().map(|(s, t)| (s.as_str(), t.as_str())));
        emit(
            Level::Info,
            "corpus indexed",
            &[
                ("documents".into(), documents.len().to_string()),
                ("passages".into(), index.len().to_string()),
            ],
        );
        STATE
            .set(Rag { index, top_k })
            .map_err(|_| "init called twice".to_string())
    }

    fn process(request: &Request) -> Result<(), StageError> {
        let state = STATE
            .get()
            .ok_or_else(|| StageError::Config("process called before init".into()))?;
        let messages = request.messages();
        let query = query_of(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str())),
        )
        .ok_or_else(|| StageError::InvalidInput("no user message to retrieve for".into()))?;
        let hits = state.index.search(query, state.top_k);
        request.set_note("rag.passages", &hits.len().to_string());
        // After any passages an earlier stage put there.
        let mut passages = request.passages();
        passages.extend(hits.into_iter().map(|hit| Passage {
            source: hit.passage.source.clone(),
            text: hit.passage.text.clone(),
            score: hit.score,
        }));
        request.set_passages(&passages);
        Ok(())
    }
}

export!(Component);
