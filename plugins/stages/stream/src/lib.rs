//! The `stream` stage: splits the completion into the chunks the API sends
//! as server-sent events.
//!
//! Each chunk holds up to `chunk_tokens` tokens (see `orchestrator-text`)
//! and the whitespace that follows them, so that concatenating the chunks
//! gives back the completion exactly. A chunk also ends once it reaches
//! [`MAX_PIECE_BYTES`] (after a token or inside a run of whitespace), and
//! the next one counts its tokens afresh: so the chunk path never holds
//! more than that much text back, and its work is linear in the
//! completion whatever the text (a megabyte of spaces included).
//!
//! The stage works in two modes, which give the same pieces:
//!
//! - whole mode, [`chunks`]: the completion at once (the `process` export);
//! - chunk mode, [`process_chunk`]: a streamed completion delta by delta
//!   (the `process-chunk` export of the `streaming-stage` world). A piece
//!   goes out as soon as it is complete, that is when the first character
//!   of the token after it arrives; only the piece still being filled is
//!   held back. For any completion and any way of splitting it into
//!   deltas, the pieces emitted are exactly `chunks(completion,
//!   chunk_tokens)` (this is property-tested). With `chunk_tokens = 1` a
//!   token goes out as soon as the next one starts.

mod stage;

pub use stage::Stream;

/// Default number of tokens per chunk.
pub const DEFAULT_CHUNK_TOKENS: usize = 4;

/// A piece ends once it holds this many bytes (or a few more: it never
/// cuts a token or a character), whatever `chunk_tokens` says.
pub const MAX_PIECE_BYTES: usize = 1024;

/// Split `text` into chunks of at most `chunk_tokens` tokens (at least 1)
/// and about [`MAX_PIECE_BYTES`]. `chunks(text).concat() == text` always
/// holds.
pub fn chunks(text: &str, chunk_tokens: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(piece_len(rest, chunk_tokens.max(1)));
        out.push(piece.to_string());
        rest = tail;
    }
    out
}

/// The length of the piece that starts `text` (non-empty): its tokens and
/// the whitespace after them, ended by the start of token
/// `chunk_tokens + 1` or by reaching [`MAX_PIECE_BYTES`]. It depends only
/// on the text up to its end, so a piece that ends before the end of the
/// text known so far is final.
fn piece_len(text: &str, chunk_tokens: usize) -> usize {
    let mut at = 0;
    let mut count = 0;
    while at < text.len() {
        let rest = &text[at..];
        let space = rest.len() - rest.trim_start().len();
        if space > 0 {
            // Whitespace, up to the cap.
            let room = MAX_PIECE_BYTES.saturating_sub(at);
            if space >= room {
                let mut end = at + room;
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                return end.max(1);
            }
            at += space;
            continue;
        }
        if count == chunk_tokens {
            return at;
        }
        let token = orchestrator_text::tokens(rest)
            .next()
            .map_or(rest.len(), str::len);
        count += 1;
        at += token;
        if at >= MAX_PIECE_BYTES {
            return at;
        }
    }
    at
}

/// What [`process_chunk`] makes of one chunk of a streamed completion
/// (the `chunk-output` record of the WIT; this stage never stops a
/// stream).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChunkOut {
    /// Complete pieces to pass on, in order; never empty strings.
    pub emit: Vec<String>,
    /// The piece still being filled, to hand back as `carry` with the next
    /// chunk of the same request: raw text holding at most `chunk_tokens`
    /// tokens (and the whitespace after them), and at most
    /// [`MAX_PIECE_BYTES`] plus one token. Empty after the `last` call.
    pub carry: String,
}

/// Split one chunk of a streamed completion into pieces: the chunk path of
/// the stage, equivalent to [`chunks`] on the whole completion.
///
/// `carry` is the `carry` this function returned for the previous chunk of
/// the request (empty for the first); `delta` is the new text; `last`
/// marks the final call, which emits everything still held (its `delta` is
/// normally empty, but a non-empty one is processed too).
///
/// The carry always starts where a piece of [`chunks`] starts, and a
/// piece depends only on the text from its start, so splitting from the
/// carry gives the same pieces as splitting the whole completion. Every
/// piece of `chunks(carry + delta)` but the last is complete: it ends
/// where a later token starts or at the size cap, whatever text comes
/// next. The last one may still grow and is carried over, unless `last`.
pub fn process_chunk(chunk_tokens: usize, carry: &str, delta: &str, last: bool) -> ChunkOut {
    let mut buf = String::with_capacity(carry.len() + delta.len());
    buf.push_str(carry);
    buf.push_str(delta);
    let mut emit = chunks(&buf, chunk_tokens);
    let carry = if last {
        String::new()
    } else {
        emit.pop().unwrap_or_default()
    };
    ChunkOut { emit, carry }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Stream `deltas`, then the final empty `last` chunk, as the host
    /// does: the pieces emitted, and the carries returned.
    fn stream(chunk_tokens: usize, deltas: &[&str]) -> (Vec<String>, Vec<String>) {
        let mut pieces = Vec::new();
        let mut carries = Vec::new();
        let mut carry = String::new();
        let calls = deltas
            .iter()
            .map(|d| (*d, false))
            .chain(std::iter::once(("", true)));
        for (delta, last) in calls {
            let out = process_chunk(chunk_tokens, &carry, delta, last);
            pieces.extend(out.emit);
            carries.push(out.carry.clone());
            carry = out.carry;
        }
        (pieces, carries)
    }

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

    #[test]
    fn chunked_pieces_go_out_when_the_next_token_starts() {
        let out = process_chunk(2, "", "a b", false);
        assert_eq!(
            out,
            ChunkOut {
                emit: vec![],
                carry: "a b".into()
            }
        );
        // `b` may still grow (`bc`), so "a b" is not complete before `c`
        // starts a new token.
        let out = process_chunk(2, &out.carry, "c ", false);
        assert_eq!(
            out,
            ChunkOut {
                emit: vec![],
                carry: "a bc ".into()
            }
        );
        let out = process_chunk(2, &out.carry, "d e f g", false);
        assert_eq!(out.emit, ["a bc ", "d e "]);
        assert_eq!(out.carry, "f g");
        let out = process_chunk(2, &out.carry, "", true);
        assert_eq!(
            out,
            ChunkOut {
                emit: vec!["f g".into()],
                carry: String::new()
            }
        );
    }

    #[test]
    fn chunked_last_flushes_everything() {
        assert_eq!(
            stream(4, &["  Hello", ",", " wor", "ld  "]).0,
            ["  Hello, world  "]
        );
        assert_eq!(process_chunk(4, "", "", true), ChunkOut::default());
        assert_eq!(process_chunk(4, "", "only", true).emit, ["only"]);
        assert_eq!(process_chunk(4, "", "   ", true).emit, ["   "]);
        let (pieces, carries) = stream(1, &["one", " two", " three"]);
        assert_eq!(pieces, ["one ", "two ", "three"]);
        assert_eq!(carries, ["one", "two", "three", ""]);
    }

    /// Inputs that once made the chunk path quadratic (a run held whole
    /// and rescanned at each delta): the carry does not grow when the
    /// input doubles.
    #[test]
    fn long_runs_stream_with_a_bounded_carry() {
        for unit in [" ", "a", "é", "\n\t", "a "] {
            let mut longest = Vec::new();
            for n in [5_000, 10_000] {
                let text = format!("start {}", unit.repeat(n));
                let cuts = (0..text.len()).step_by(3);
                let deltas = orchestrator_text::split_at_offsets(&text, cuts);
                let (pieces, carries) = stream(1, &deltas);
                assert_eq!(pieces, chunks(&text, 1), "{unit:?} × {n}");
                longest.push(carries.iter().map(String::len).max().unwrap_or(0));
            }
            assert!(longest[0] <= MAX_PIECE_BYTES + 64, "{unit:?}: {longest:?}");
            assert_eq!(
                longest[0], longest[1],
                "{unit:?}: the carry grew with the input"
            );
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                "[a-c0-9]{1,6}",
                "[ \t\n]{1,3}",
                "[.,!?'-]{1,2}",
                prop::sample::select(vec!["Grüße", "jörg", "—", "\u{2003}", "日本語"])
                    .prop_map(String::from),
            ],
            0..24,
        )
        .prop_map(|f| f.concat())
    }

    /// Text with runs past the token and piece caps.
    fn long_text() -> impl Strategy<Value = String> {
        prop::collection::vec((text(), "[a \n.é]", 30..1500usize), 1..4).prop_map(|parts| {
            parts
                .iter()
                .map(|(t, unit, n)| format!("{t}{}", unit.repeat(*n)))
                .collect()
        })
    }

    /// `text` cut at the char boundaries nearest to `cuts` (which may
    /// repeat, giving empty deltas).
    fn split<'a>(text: &'a str, cuts: &[prop::sample::Index]) -> Vec<&'a str> {
        orchestrator_text::split_at_offsets(text, cuts.iter().map(|i| i.index(text.len() + 1)))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Any split of any text streams to the text itself, in exactly
        /// the pieces of whole mode, none empty, with a carry of at most
        /// `chunk_tokens` tokens and nothing left after `last`.
        #[test]
        fn chunked_equals_whole(
            text in text(),
            chunk_tokens in 0_usize..6,
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let whole = chunks(&text, chunk_tokens);
            for deltas in [split(&text, &cuts), text.split_inclusive(|_| true).collect()] {
                let (pieces, carries) = stream(chunk_tokens, &deltas);
                prop_assert_eq!(pieces.concat(), text.clone());
                prop_assert_eq!(&pieces, &whole);
                prop_assert!(pieces.iter().all(|p| !p.is_empty()));
                for carry in &carries {
                    prop_assert!(orchestrator_text::count_tokens(carry) <= chunk_tokens.max(1));
                }
                prop_assert_eq!(carries.last().map(String::as_str), Some(""));
            }
        }

        /// Long runs of one character stream to whole mode too, and the
        /// carry stays within a piece and a token.
        #[test]
        fn chunked_equals_whole_on_long_runs(
            text in long_text(),
            chunk_tokens in 1_usize..6,
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let whole = chunks(&text, chunk_tokens);
            let (pieces, carries) = stream(chunk_tokens, &split(&text, &cuts));
            prop_assert_eq!(&pieces, &whole);
            let bound = MAX_PIECE_BYTES + orchestrator_text::MAX_TOKEN_BYTES;
            prop_assert!(carries.iter().all(|c| c.len() <= bound));
        }
    }
}
