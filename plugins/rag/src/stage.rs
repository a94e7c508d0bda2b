//! The stage itself: an [`Index`] of the corpus, searched for each
//! request's question.

use orchestrator_plugin::{InitError, Passage, Request, Stage, StageError, log};
use serde::Deserialize;

use crate::{Index, query_of};

/// The `rag` stage's configuration.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The corpus directory, as the plugin sees it (the host grants it).
    pub corpus_dir: String,
    /// Passages retrieved per request.
    pub top_k: usize,
    /// The most distinct terms a question may have: a longer one is
    /// refused with `invalid_input` (HTTP 400), so the search's cost per
    /// request is bounded. 4096 is about a 20,000-word document.
    pub max_query_terms: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            corpus_dir: "/corpus".into(),
            top_k: 3,
            max_query_terms: 4096,
        }
    }
}

/// The `rag` stage: the corpus, indexed once per instance at `init`.
pub struct Rag {
    index: Index,
    top_k: usize,
    max_query_terms: usize,
}

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

impl Stage for Rag {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        if config.max_query_terms == 0 {
            return Err("config key `max_query_terms`: must be at least 1".into());
        }
        let documents = read_corpus(&config.corpus_dir)?;
        let index = Index::build(documents.iter().map(|(s, t)| (s.as_str(), t.as_str())));
        log::info(
            "corpus indexed",
            &[("documents", &documents.len()), ("passages", &index.len())],
        );
        Ok(Rag {
            index,
            top_k: config.top_k,
            max_query_terms: config.max_query_terms,
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let messages = request.messages();
        let query = query_of(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str())),
        )
        .ok_or_else(|| StageError::InvalidInput("no user message to retrieve for".into()))?;
        let hits = self
            .index
            .search(query, self.top_k, self.max_query_terms)
            .map_err(|e| {
                StageError::InvalidInput(format!(
                    "{e}: the rag stage searches with at most {} (config key `max_query_terms`)",
                    e.limit
                ))
            })?;
        request.set_notes(&[("rag.passages", &hits.len())]);
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

orchestrator_plugin::export_stage!(Rag);
