//! The `rag` stage: BM25 retrieval over a directory of text documents.
//!
//! At `init` the stage reads every `*.md` / `*.txt` file under its corpus
//! directory (a directory the host preopens read-only for this stage only),
//! splits each file into paragraph passages and builds an in-memory BM25
//! index. `process` scores the passages against the text of the last user
//! message (its text parts joined, for a multi-part message) and adds the
//! best `top_k` to the request, with their source file names. With
//! `models` set, it retrieves only for requests to those models.
//!
//! The logic lives in [`Index`], plain Rust; the SDK glue is in the
//! `stage` module ([`Rag`]).

use std::collections::{HashMap, HashSet};

use orchestrator_plugin::Message;

mod stage;

pub use stage::Rag;

/// BM25 term-frequency saturation.
const K1: f32 = 1.2;
/// BM25 length normalisation.
const B: f32 = 0.75;

/// A passage as it is stored in the index.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    /// File name relative to the corpus root.
    pub source: String,
    /// The paragraph text.
    pub text: String,
}

/// A search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit<'a> {
    /// The passage found.
    pub passage: &'a Passage,
    /// Its BM25 score (> 0).
    pub score: f32,
}

/// A BM25 index over passages.
#[derive(Debug, Default)]
pub struct Index {
    passages: Vec<Passage>,
    /// Length of each passage in terms.
    lengths: Vec<u32>,
    /// term -> postings (passage index, term frequency).
    postings: HashMap<String, Vec<(u32, u32)>>,
    average_length: f32,
}

impl Index {
    /// Build an index from `(source, document text)` pairs. Documents are
    /// split into passages at blank lines; passages shorter than
    /// `min_passage_chars` are merged into the next one so that headings
    /// travel with their paragraph.
    pub fn build<'a>(documents: impl IntoIterator<Item = (&'a str, &'a str)>) -> Index {
        let mut index = Index::default();
        for (source, text) in documents {
            for passage in split_passages(text) {
                index.add(Passage {
                    source: source.to_string(),
                    text: passage,
                });
            }
        }
        let total: u64 = index.lengths.iter().map(|&l| u64::from(l)).sum();
        index.average_length = if index.lengths.is_empty() {
            0.0
        } else {
            total as f32 / index.lengths.len() as f32
        };
        index
    }

    fn add(&mut self, passage: Passage) {
        let id = self.passages.len() as u32;
        let mut frequencies: HashMap<String, u32> = HashMap::new();
        let mut length = 0u32;
        for term in orchestrator_text::terms(&passage.text) {
            *frequencies.entry(term).or_default() += 1;
            length += 1;
        }
        for (term, tf) in frequencies {
            self.postings.entry(term).or_default().push((id, tf));
        }
        self.lengths.push(length);
        self.passages.push(passage);
    }

    /// Number of passages indexed.
    pub fn len(&self) -> usize {
        self.passages.len()
    }

    /// Whether the index holds no passage.
    pub fn is_empty(&self) -> bool {
        self.passages.is_empty()
    }

    /// The `k` best passages for `query`, best first. Passages that share no
    /// term with the query are never returned; ties keep corpus order.
    ///
    /// The work is linear in the query and in the postings of its terms.
    ///
    /// # Errors
    ///
    /// [`TooManyTerms`] if the query has more than `max_terms` distinct
    /// terms (found as soon as term `max_terms + 1` is seen).
    pub fn search(
        &self,
        query: &str,
        k: usize,
        max_terms: usize,
    ) -> Result<Vec<Hit<'_>>, TooManyTerms> {
        let n = self.passages.len() as f32;
        let mut scores: HashMap<u32, f32> = HashMap::new();
        // A set, not a list: a query of n distinct terms must cost O(n),
        // not O(n²) (80,000 distinct words took 5 s with a list).
        let mut seen = HashSet::new();
        for term in orchestrator_text::terms(query) {
            if seen.contains(&term) {
                continue;
            }
            if seen.len() == max_terms {
                return Err(TooManyTerms { limit: max_terms });
            }
            let postings = self.postings.get(&term);
            seen.insert(term);
            let Some(postings) = postings else {
                continue;
            };
            let df = postings.len() as f32;
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for &(id, tf) in postings {
                let tf = tf as f32;
                let length = self.lengths[id as usize] as f32;
                let norm = K1 * (1.0 - B + B * length / self.average_length.max(1.0));
                *scores.entry(id).or_default() += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        let mut ranked: Vec<(u32, f32)> = scores.into_iter().filter(|(_, s)| *s > 0.0).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(ranked
            .into_iter()
            .take(k)
            .map(|(id, score)| Hit {
                passage: &self.passages[id as usize],
                score,
            })
            .collect())
    }
}

/// A query with more distinct terms than [`Index::search`] was allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyTerms {
    /// The limit it exceeded.
    pub limit: usize,
}

impl std::fmt::Display for TooManyTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the question has more than {} distinct terms",
            self.limit
        )
    }
}

impl std::error::Error for TooManyTerms {}

/// Paragraphs of `text` (split at blank lines), with short ones (headings)
/// merged into the paragraph that follows them.
fn split_passages(text: &str) -> Vec<String> {
    const MIN_PASSAGE_CHARS: usize = 80;
    let mut passages = Vec::new();
    let mut pending = String::new();
    for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        if !pending.is_empty() {
            pending.push('\n');
        }
        pending.push_str(paragraph);
        if pending.len() >= MIN_PASSAGE_CHARS {
            passages.push(std::mem::take(&mut pending));
        }
    }
    if !pending.is_empty() {
        passages.push(pending);
    }
    passages
}

/// The query for a conversation: the text of the last `user` message
/// (see [`Message::text`]).
pub fn query_of(messages: &[Message]) -> Option<String> {
    messages
        .iter()
        .rev()
        .find(|m| m.is("user"))
        .map(Message::text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Index {
        Index::build([
            (
                "backpressure.md",
                "# Backpressure\n\nBackpressure is how a pipeline tells its producers to slow down when a queue is full. Bounded queues make it explicit.",
            ),
            (
                "wasm.md",
                "# WebAssembly\n\nEach stage is a WebAssembly component running in a sandbox with its own linear memory.\n\nComponents talk to the host through WIT interfaces.",
            ),
        ])
    }

    #[test]
    fn finds_the_relevant_passage_first() {
        let index = corpus();
        assert_eq!(index.len(), 3);
        let hits = index.search("What is backpressure?", 2, 100).unwrap();
        assert_eq!(hits[0].passage.source, "backpressure.md");
        assert!(hits[0].passage.text.starts_with("# Backpressure\n"));
        assert!(hits.iter().all(|h| h.score > 0.0));
    }

    #[test]
    fn unrelated_queries_find_nothing() {
        assert!(corpus().search("zebra giraffe", 3, 100).unwrap().is_empty());
        assert!(
            Index::build([])
                .search("anything", 3, 100)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn k_bounds_the_result() {
        assert_eq!(
            corpus()
                .search("the component sandbox queue", 1, 100)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn distinct_terms_are_capped_repeats_are_not() {
        let index = corpus();
        let repeated = "queue ".repeat(10_000);
        assert!(index.search(&repeated, 3, 2).is_ok());
        assert!(index.search("one two", 3, 2).is_ok());
        assert_eq!(
            index.search("one two three", 3, 2).unwrap_err(),
            TooManyTerms { limit: 2 }
        );
    }

    #[test]
    fn query_is_the_last_user_message() {
        let mut second = Message::new("user", "");
        second.content = Some(orchestrator_plugin::Content::Parts(vec![
            orchestrator_plugin::ContentPart::Text("second".into()),
            orchestrator_plugin::ContentPart::Other("{}".into()),
            orchestrator_plugin::ContentPart::Text("question".into()),
        ]));
        let messages = [
            Message::new("system", "s"),
            Message::new("user", "first"),
            Message::new("assistant", "a"),
            second,
            Message::new("tool", "result"),
        ];
        assert_eq!(query_of(&messages).as_deref(), Some("second\nquestion"));
        assert_eq!(query_of(&[Message::new("system", "s")]), None);
    }
}
