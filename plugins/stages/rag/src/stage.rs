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
    /// The models to retrieve for, comma-separated (`models = "echo,
    /// llama"`): a request for any other model passes through untouched,
    /// with the note `rag.skipped = model`. Empty (the default): every
    /// model.
    pub models: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            corpus_dir: "/corpus".into(),
            top_k: 3,
            max_query_terms: 4096,
            models: Vec::new(),
        }
    }
}

/// The `rag` stage: the corpus, indexed once per instance at `init`.
pub struct Rag {
    index: Index,
    top_k: usize,
    max_query_terms: usize,
    models: Vec<String>,
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
            models: config.models,
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        if !self.models.is_empty() && !self.models.contains(&request.params().model) {
            request.set_note("rag.skipped", "model");
            return Ok(());
        }
        // A chat without a user message (only a system prompt, say) has
        // nothing to retrieve for: it goes on without passages.
        let Some(query) = query_of(&request.messages()) else {
            request.set_note("rag.skipped", "no_user_message");
            return Ok(());
        };
        let hits = self
            .index
            .search(&query, self.top_k, self.max_query_terms)
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

#[cfg(test)]
mod tests {
    use orchestrator_plugin::GenerationParams;
    use orchestrator_plugin::testing::TestRequest;

    use super::*;

    fn rag(models: &[&str]) -> Rag {
        Rag {
            index: Index::build([(
                "backpressure.md",
                "Backpressure is how a pipeline tells its producers to slow down.",
            )]),
            top_k: 3,
            max_query_terms: 100,
            models: models.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn ask(model: &str) -> TestRequest {
        TestRequest::new()
            .with_params(GenerationParams::new(model))
            .with_system("Be brief.")
            .with_user("What is backpressure?")
    }

    #[test]
    fn retrieves_for_the_last_user_message() {
        let request = ask("echo");
        rag(&[]).process(&request).unwrap();
        assert_eq!(request.note("rag.passages").as_deref(), Some("1"));
        assert_eq!(request.passages()[0].source, "backpressure.md");
        assert_eq!(request.note("rag.skipped"), None);
    }

    #[test]
    fn retrieves_only_for_the_configured_models() {
        let stage = rag(&["echo", "llama"]);
        let request = ask("llama");
        stage.process(&request).unwrap();
        assert_eq!(request.passages().len(), 1);

        let request = ask("gpt-4o");
        stage.process(&request).unwrap();
        assert!(request.passages().is_empty());
        assert_eq!(request.note("rag.skipped").as_deref(), Some("model"));
        assert_eq!(request.note("rag.passages"), None);
    }

    #[test]
    fn a_chat_without_a_user_message_passes_through() {
        let request = TestRequest::new().with_system("Be brief.");
        rag(&[]).process(&request).unwrap();
        assert!(request.passages().is_empty());
        assert_eq!(
            request.note("rag.skipped").as_deref(),
            Some("no_user_message")
        );
    }

    #[test]
    fn too_many_terms_is_invalid_input() {
        let mut stage = rag(&[]);
        stage.max_query_terms = 1;
        let err = stage.process(&ask("echo")).unwrap_err();
        assert!(
            matches!(&err, StageError::InvalidInput(m) if m.contains("max_query_terms")),
            "{err:?}"
        );
    }
}
