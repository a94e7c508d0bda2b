//! Keys and tokens: whether a word looks like a credential, judged by its
//! first [`MAX_WORD`] bytes.

/// Replacement for an API-key-like string.
pub const KEY_MARKER: &str = "[redacted key]";

/// Prefixes of well-known credential formats (OpenAI, Anthropic, Stripe,
/// GitHub, Slack, AWS, Google).
const KEY_PREFIXES: &[&str] = &[
    "sk-",
    "sk_live_",
    "sk_test_",
    "pk_live_",
    "rk_live_",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "xoxb-",
    "xoxp-",
    "AKIA",
    "AIza",
];

/// A word (a run of `[A-Za-z0-9_-]`) is judged a key, or not, by its first
/// `MAX_WORD` bytes; a key is redacted whole, however long.
pub const MAX_WORD: usize = 256;

/// Whether `word` (a run of `[A-Za-z0-9_-]`) looks like a credential,
/// judged by its first [`MAX_WORD`] bytes.
pub(crate) fn is_key(word: &str) -> bool {
    let word = &word[..word.len().min(MAX_WORD)];
    let known = KEY_PREFIXES
        .iter()
        .any(|p| word.starts_with(p) && word.len() >= p.len() + 16);
    let generic = word.len() >= 32
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic());
    known || generic
}

#[cfg(test)]
mod tests {
    use crate::clean;
    use crate::testing::stream;

    #[test]
    fn redacts_key_like_strings() {
        let c = clean(
            "key sk-abcdefghijklmnop1234 and AKIAABCDEFGHIJKLMNOP and 0123456789abcdef0123456789abcdef, not sk-short",
            &[],
        );
        assert_eq!(
            c.text,
            "key [redacted key] and [redacted key] and [redacted key], not sk-short"
        );
        assert_eq!(c.keys, 3);
    }

    #[test]
    fn chunked_key_split_across_chunks_is_redacted() {
        let deltas = [
            "token sk-abc",
            "defghijklmn",
            "op1234",
            " and AKIAABCD",
            "EFGHIJKLMNOP.",
        ];
        let streamed = stream(&[], &deltas);
        assert_eq!(streamed.text(), "token [redacted key] and [redacted key].");
        assert!(
            streamed
                .pieces
                .iter()
                .all(|p| !p.contains("sk-") && !p.contains("AKIA"))
        );
    }

    #[test]
    fn every_part_of_a_jwt_is_redacted() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";
        let text = format!("token: {jwt}.");
        let whole = clean(&text, &[]);
        assert_eq!(
            whole.text,
            "token: [redacted key].[redacted key].[redacted key]."
        );
        assert_eq!(whole.keys, 3);
        let deltas: Vec<&str> = text
            .as_bytes()
            .chunks(5)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        assert_eq!(stream(&[], &deltas).text(), whole.text);
    }

    #[test]
    fn a_word_is_judged_by_its_first_256_bytes() {
        // A word is judged by its first 256 bytes, and a key goes whole.
        let late_digit = format!("{}1", "a".repeat(300));
        assert_eq!(clean(&late_digit, &[]).text, late_digit);
        let long_key = format!("sk-{}", "abc123".repeat(1000));
        assert_eq!(
            clean(&format!("{long_key} ok"), &[]).text,
            "[redacted key] ok"
        );
    }
}
