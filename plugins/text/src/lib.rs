//! Text utilities shared by the host and the bundled plugins.
//!
//! The bundled pipeline needs one notion of "token" that the `assemble`
//! stage (token budget), the host's `echo` backend (usage figures) and the
//! `stream` stage (chunking) agree on. This is not a BPE tokenizer: a token
//! here is a run of alphanumeric characters (at most [`MAX_TOKEN_BYTES`]
//! bytes of it: a longer run is several tokens, as it is for real
//! tokenizers) or a single other non-whitespace character. It is
//! deterministic, allocation-free when counting, and close enough to real
//! tokenizers for budgeting.

/// The longest token, in bytes. Bounding it keeps what a streaming stage
/// must hold back for an unfinished token bounded too.
pub const MAX_TOKEN_BYTES: usize = 64;

/// An iterator over the tokens of a string, as `&str` slices.
pub fn tokens(text: &str) -> Tokens<'_> {
    Tokens { rest: text }
}

/// Number of tokens in `text` (see [`tokens`]).
pub fn count_tokens(text: &str) -> usize {
    tokens(text).count()
}

/// Iterator returned by [`tokens`].
pub struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let trimmed = self.rest.trim_start();
        let mut chars = trimmed.char_indices();
        let (_, first) = chars.next()?;
        let end = if first.is_alphanumeric() {
            chars
                .find(|&(i, c)| !c.is_alphanumeric() || i + c.len_utf8() > MAX_TOKEN_BYTES)
                .map_or(trimmed.len(), |(i, _)| i)
        } else {
            first.len_utf8()
        };
        let (token, rest) = trimmed.split_at(end);
        self.rest = rest;
        Some(token)
    }
}

/// Lower-cased alphanumeric terms of `text`, for retrieval.
pub fn terms(text: &str) -> impl Iterator<Item = String> + '_ {
    tokens(text)
        .filter(|t| t.chars().next().is_some_and(char::is_alphanumeric))
        .map(str::to_lowercase)
}

/// The longest prefix of `text` that holds at most `max_tokens` tokens,
/// cut at a token boundary (trailing whitespace kept out).
pub fn truncate_tokens(text: &str, max_tokens: usize) -> &str {
    if max_tokens == 0 {
        return "";
    }
    let mut end = 0;
    for (n, token) in tokens(text).enumerate() {
        if n == max_tokens {
            break;
        }
        // `token` is a sub-slice of `text`: its end offset is its pointer
        // offset plus its length.
        let offset = token.as_ptr() as usize - text.as_ptr() as usize;
        end = offset + token.len();
    }
    &text[..end]
}

/// `text` cut at the byte offsets `cuts` (in any order, repeats allowed:
/// they give empty pieces), each moved down to a character boundary and
/// capped at `text.len()`. The pieces concatenate to `text`. Used to feed a
/// text to the streaming stages in arbitrary deltas (their property tests).
pub fn split_at_offsets(text: &str, cuts: impl IntoIterator<Item = usize>) -> Vec<&str> {
    let mut at: Vec<usize> = cuts
        .into_iter()
        .map(|cut| {
            let mut at = cut.min(text.len());
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            at
        })
        .collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(at.len() + 1);
    let mut from = 0;
    for at in at {
        pieces.push(&text[from..at]);
        from = at;
    }
    pieces.push(&text[from..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_offsets_respects_char_boundaries() {
        let text = "aé b";
        assert_eq!(split_at_offsets(text, [2, 0, 9]), ["", "a", "é b", ""]);
        assert_eq!(split_at_offsets(text, []).concat(), text);
    }

    #[test]
    fn splits_words_and_punctuation() {
        let t: Vec<_> = tokens("Hello, wörld! a1b2  x").collect();
        assert_eq!(t, ["Hello", ",", "wörld", "!", "a1b2", "x"]);
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("   \n"), 0);
    }

    #[test]
    fn a_long_run_is_several_tokens() {
        let run = "é".repeat(100);
        let t: Vec<_> = tokens(&run).collect();
        assert_eq!(
            t.iter().map(|t| t.len()).collect::<Vec<_>>(),
            [64, 64, 64, 8]
        );
        assert_eq!(t.concat(), run);
        assert_eq!(count_tokens(&"a".repeat(129)), 3);
    }

    #[test]
    fn terms_are_lowercase_words_only() {
        let t: Vec<_> = terms("What is Back-Pressure?").collect();
        assert_eq!(t, ["what", "is", "back", "pressure"]);
    }

    #[test]
    fn truncation_keeps_whole_tokens() {
        assert_eq!(truncate_tokens("one two, three", 3), "one two,");
        assert_eq!(truncate_tokens("one two", 10), "one two");
        assert_eq!(truncate_tokens("one two", 0), "");
    }
}
