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

    // Byte by byte, decoding a character only where a byte is not ASCII:
    // prompts are mostly ASCII, and decoding every character (as
    // `trim_start` and `char_indices` do) made tokenizing most of the
    // `assemble` stage's time. ASCII whitespace and alphanumerics are
    // exactly what `char::is_whitespace` and `char::is_alphanumeric` say
    // of those bytes (a unit test compares the two on random text).
    fn next(&mut self) -> Option<&'a str> {
        let text = self.rest;
        let bytes = text.as_bytes();
        let mut start = 0;
        let (first_len, alphanumeric) = loop {
            let &b = bytes.get(start)?;
            if b.is_ascii() {
                if is_ascii_whitespace(b) {
                    start += 1;
                    continue;
                }
                break (1, b.is_ascii_alphanumeric());
            }
            let c = char_at(text, start)?;
            if c.is_whitespace() {
                start += c.len_utf8();
                continue;
            }
            break (c.len_utf8(), c.is_alphanumeric());
        };
        let mut end = start + first_len;
        if alphanumeric {
            while let Some(&b) = bytes.get(end) {
                let len = if b.is_ascii() {
                    if !b.is_ascii_alphanumeric() {
                        break;
                    }
                    1
                } else {
                    match char_at(text, end) {
                        Some(c) if c.is_alphanumeric() => c.len_utf8(),
                        _ => break,
                    }
                };
                if end - start + len > MAX_TOKEN_BYTES {
                    break;
                }
                end += len;
            }
        }
        self.rest = &text[end..];
        Some(&text[start..end])
    }
}

/// The ASCII characters `char::is_whitespace` accepts: tab, line feed,
/// vertical tab, form feed, carriage return and space.
fn is_ascii_whitespace(b: u8) -> bool {
    matches!(b, b'\t'..=b'\r' | b' ')
}

/// The character at byte `at` of `text` (a character boundary).
fn char_at(text: &str, at: usize) -> Option<char> {
    text.get(at..)?.chars().next()
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

    /// The tokenizer as first written, character by character: the
    /// reference the byte-level one must agree with.
    fn reference_tokens(text: &str) -> Vec<&str> {
        let mut rest = text;
        let mut out = Vec::new();
        loop {
            let trimmed = rest.trim_start();
            let mut chars = trimmed.char_indices();
            let Some((_, first)) = chars.next() else {
                return out;
            };
            let end = if first.is_alphanumeric() {
                chars
                    .find(|&(i, c)| !c.is_alphanumeric() || i + c.len_utf8() > MAX_TOKEN_BYTES)
                    .map_or(trimmed.len(), |(i, _)| i)
            } else {
                first.len_utf8()
            };
            let (token, tail) = trimmed.split_at(end);
            out.push(token);
            rest = tail;
        }
    }

    #[test]
    fn agrees_with_the_character_by_character_reference() {
        // Characters of every class the tokenizer tells apart: ASCII and
        // other letters and digits, ASCII and other whitespace (NEL, NBSP,
        // ideographic space), punctuation, symbols, multi-byte letters.
        const ALPHABET: &[char] = &[
            'a', 'Z', '7', ' ', '\t', '\n', '\u{0B}', '\u{0C}', '\r', '\u{85}', '\u{A0}',
            '\u{3000}', '\u{1F}', ',', '.', '-', '_', 'é', 'ß', 'Ж', '中', '٣', '😀', '\u{301}',
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            // Long runs of one class too, to cross MAX_TOKEN_BYTES.
            let repeat = if next() % 8 == 0 { 40 } else { 1 };
            let text: String = (0..len)
                .flat_map(|_| {
                    let c = ALPHABET[(next() % ALPHABET.len() as u64) as usize];
                    std::iter::repeat_n(c, repeat)
                })
                .collect();
            assert_eq!(
                tokens(&text).collect::<Vec<_>>(),
                reference_tokens(&text),
                "{text:?}"
            );
        }
    }

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
