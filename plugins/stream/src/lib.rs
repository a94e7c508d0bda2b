//! The `stream` stage: splits the completion into the chunks the API sends
//! as server-sent events.
//!
//! Each chunk holds up to `chunk_tokens` tokens (see `orchestrator-text`)
//! and the whitespace that follows them, so that concatenating the chunks
//! gives back the completion exactly.

#[cfg(target_arch = "wasm32")]
mod component;

/// Default number of tokens per chunk.
pub const DEFAULT_CHUNK_TOKENS: usize = 4;

/// Split `text` into chunks of at most `chunk_tokens` tokens (at least 1).
/// `chunks(text).concat() == text` always holds.
pub fn chunks(text: &str, chunk_tokens: usize) -> Vec<String> {
    let chunk_tokens = chunk_tokens.max(1);
    let base = text.as_ptr() as usize;
    // Start offsets of every `chunk_tokens`-th token after the first chunk.
    let starts = orchestrator_text::tokens(text)
        .map(|token| token.as_ptr() as usize - base)
        .enumerate()
        .filter(|(n, _)| *n > 0 && n % chunk_tokens == 0)
        .map(|(_, offset)| offset);
    let mut out = Vec::new();
    let mut from = 0;
    for start in starts {
        out.push(text[from..start].to_string());
        from = start;
    }
    if from < text.len() {
        out.push(text[from..].to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_concatenate_to_the_text() {
        let text = "  Backpressure, in short: slow the producer down.  ";
        for n in 1..8 {
            assert_eq!(chunks(text, n).concat(), text, "chunk size {n}");
        }
        assert_eq!(chunks("a b c d e", 2), ["a b ", "c d ", "e"]);
    }

    #[test]
    fn empty_text_has_no_chunks() {
        assert!(chunks("", 4).is_empty());
        assert_eq!(chunks("a", 0), ["a"]);
    }
}
