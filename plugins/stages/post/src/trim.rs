//! Trimming: leading whitespace all, trailing whitespace up to
//! [`MAX_TRAILING_SPACE`] bytes.

/// The most trailing whitespace [`clean`](crate::clean) trims, in bytes. Of a longer
/// trailing run, the bytes before its last `MAX_TRAILING_SPACE` are kept
/// (from the first character boundary on): this is what lets the chunk
/// path pass a long run of whitespace on instead of holding it whole.
pub const MAX_TRAILING_SPACE: usize = 1024;

/// How many leading bytes of `trailing`, a run of whitespace that ends the
/// text so far, are final whatever follows: all but its last
/// [`MAX_TRAILING_SPACE`] bytes, up to the next character boundary.
pub(crate) fn kept_trailing(trailing: &str) -> usize {
    let Some(mut at) = trailing.len().checked_sub(MAX_TRAILING_SPACE) else {
        return 0;
    };
    while !trailing.is_char_boundary(at) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::MAX_TRAILING_SPACE;
    use crate::clean;
    use crate::testing::stream;

    #[test]
    fn chunked_whitespace_is_trimmed_only_at_the_ends() {
        let streamed = stream(&[], &["  ", " \n", "Hi", " ", " there", "  ", "\n"]);
        // The inner whitespace goes out once text follows it.
        assert_eq!(streamed.pieces, ["Hi", "  ", "there"]);
        let streamed = stream(&[], &[" \t ", "\n"]);
        assert!(streamed.pieces.is_empty());
    }

    #[test]
    fn at_most_1024_bytes_of_trailing_whitespace_are_trimmed() {
        let spaces = format!("x{}", " ".repeat(3000));
        let cleaned = clean(&spaces, &[]);
        assert_eq!(
            cleaned.text,
            format!("x{}", " ".repeat(3000 - MAX_TRAILING_SPACE))
        );
        assert_eq!(cleaned.trimmed_chars, MAX_TRAILING_SPACE);
    }
}
