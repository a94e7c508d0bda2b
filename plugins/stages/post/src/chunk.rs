//! Chunk mode: [`process_chunk`], a streamed completion cleaned delta by
//! delta, with the carry that holds what may still change.

use std::fmt;

use crate::redact::{Counts, Scan, redact_into};
use crate::stop::{Cut, stop_cut};
use crate::trim::{MAX_TRAILING_SPACE, kept_trailing};

/// What [`process_chunk`] makes of one chunk of a streamed completion
/// (the `chunk-output` record of the WIT, with `emit` as one string).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChunkOut {
    /// Cleaned text to pass on, in order. Empty when everything new is
    /// held back.
    pub emit: String,
    /// State to hand back as `carry` with the next chunk of the same
    /// request (see [`process_chunk`] for its format and size).
    pub carry: String,
    /// A stop sequence ended the completion: `emit` holds the last of the
    /// text, and nothing more will be emitted for this request.
    pub stop: bool,
}

/// The `carry` handed to [`process_chunk`] is not one it returned.
///
/// Its [`Display`](fmt::Display) says so without quoting the carry, which
/// holds completion text that has not been redacted yet.
#[derive(Debug, Clone, PartialEq)]
pub struct BadCarry {
    /// Length of the rejected carry, in bytes.
    pub len: usize,
}

impl fmt::Display for BadCarry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "carry of {} bytes was not produced by the post stage's process-chunk",
            self.len
        )
    }
}

impl std::error::Error for BadCarry {}

/// Carry tag: no non-whitespace text has been committed yet, so leading
/// whitespace is still being dropped. An empty carry means the same.
const TAG_LEADING: char = 'L';
/// Carry tag (the whole carry): a stop sequence has ended the completion.
const TAG_STOPPED: char = 'S';

/// The longest carry [`process_chunk`] returns, stop sequences aside: the
/// tag and the longest text it holds back (trailing whitespace; a pending
/// address or word is shorter).
pub const MAX_HELD: usize = 1 + MAX_TRAILING_SPACE;

/// Clean one chunk of a streamed completion: the chunk path of the stage,
/// equivalent to [`clean`](crate::clean) on the whole completion.
///
/// `stop` are the request's stop sequences (empty ones are ignored, as in
/// [`clean`](crate::clean)); `carry` is the `carry` this function returned for the
/// previous chunk of the request (empty for the first); `delta` is the new
/// text; `last` marks the final call, which must emit everything still
/// held (its `delta` is normally empty, but a non-empty one is processed
/// too).
///
/// The text is emitted as soon as it is final, already redacted. Held back
/// are only:
///
/// - a word or an address that is still undecided: up to
///   [`MAX_WORD`](crate::MAX_WORD) bytes of a word that may still become a key (`sk-abc`),
///   or up to `64 + 1 + 255` bytes of what may still become an e-mail
///   address (`jo`, `john.doe@exam`);
/// - trailing whitespace, which [`clean`](crate::clean) drops if nothing follows it (at
///   most [`MAX_TRAILING_SPACE`] bytes: what comes before that in a run is
///   final);
/// - a tail that is a proper prefix of a stop sequence (`ST` when `STOP`
///   is one).
///
/// Leading whitespace is dropped as it arrives (unless it may be the start
/// of a stop sequence, such as `\n\n`).
///
/// The carry is one ASCII tag character (the stage's state: leading
/// whitespace still dropped, or where the scan stands in the text, or
/// stopped) followed by that held-back raw text, so its length in bytes is
/// at most [`MAX_HELD`] `+ p`, where `p` is the length of the longest stop
/// sequence minus one (0 without stop sequences), and never more than the
/// longest run of whitespace or non-whitespace in the completion plus
/// `1 + p`. For prose, that is a few dozen bytes. Each call's work is
/// linear in the carry and the delta, so a stream costs time linear in its
/// length whatever the text. The held-back text is not redacted yet: it
/// is state for this stage, never output, and should be handled as
/// confidentially as the raw completion.
///
/// After `stop` has been reported, the carry is `"S"` and further calls
/// emit nothing (and report `stop` again).
///
/// # Errors
///
/// [`BadCarry`] if `carry` is not empty and not one this function returned.
pub fn process_chunk(
    stop: &[String],
    carry: &str,
    delta: &str,
    last: bool,
) -> Result<ChunkOut, BadCarry> {
    let mut tag = carry.chars();
    let (started, scan) = match tag.next() {
        None => (false, Scan::Boundary),
        Some(TAG_LEADING) => (false, Scan::Boundary),
        Some(TAG_STOPPED) if carry.len() == 1 => {
            return Ok(ChunkOut {
                emit: String::new(),
                carry: carry.to_string(),
                stop: true,
            });
        }
        Some(t) => match Scan::from_tag(t) {
            Some(scan) => (true, scan),
            None => return Err(BadCarry { len: carry.len() }),
        },
    };
    let held = tag.as_str();
    let mut buf = String::with_capacity(held.len() + delta.len());
    buf.push_str(held);
    buf.push_str(delta);

    // 1. Stop sequences: how much of `buf` is certainly before the cut.
    let (end, stopped) = match stop_cut(&buf, stop, last) {
        Cut::At(at) => (at, true),
        Cut::Before(end) => (end, false),
    };
    let done = stopped || last;
    let committed = &buf[..end];

    // 2. Trimming: drop leading whitespace, hold back trailing whitespace
    // (no more of it than `clean` may trim).
    let lead = if started {
        0
    } else {
        committed.len() - committed.trim_start().len()
    };
    let body = &committed[lead..];
    let started = started || !body.is_empty();
    let content = body.trim_end();
    let trailing = &body[content.len()..];

    // 3. Redaction of what is final. `content` may still continue only if
    // nothing (no whitespace) follows it yet.
    let open = !done && trailing.is_empty();
    let mut emit = String::with_capacity(body.len());
    let (consumed, mut scan) = redact_into(content, open, scan, &mut emit, &mut Counts::default());
    let kept = kept_trailing(trailing);
    emit.push_str(&trailing[..kept]);
    if kept > 0 {
        scan = Scan::Boundary;
    }

    let carry = if stopped {
        TAG_STOPPED.to_string()
    } else if done {
        String::new()
    } else {
        let rest = &buf[lead + consumed + kept..];
        let mut carry = String::with_capacity(1 + rest.len());
        carry.push(if started { scan.tag() } else { TAG_LEADING });
        carry.push_str(rest);
        carry
    };
    Ok(ChunkOut {
        emit,
        carry,
        stop: stopped,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::clean;
    use crate::testing::{stops, stream};

    #[test]
    fn chunked_first_call_may_be_the_last() {
        let out = process_chunk(&stops(&["END"]), "", "", true).unwrap();
        assert_eq!(out, ChunkOut::default());
        let out = process_chunk(&[], "", "  a@b.co  ", true).unwrap();
        assert_eq!(out.emit, "[redacted email]");
    }

    #[test]
    fn chunked_rejects_a_foreign_carry_without_quoting_it() {
        let err = process_chunk(&[], "john@example.com", "", false).unwrap_err();
        assert_eq!(err, BadCarry { len: 16 });
        assert!(!err.to_string().contains("john"));
        assert!(process_chunk(&[], "Sx", "", false).is_err());
    }

    #[test]
    fn chunked_carry_stays_small_on_a_long_plain_text() {
        // 20,000 words of at most 9 letters, with punctuation and line
        // breaks, in deltas of 1 to 7 bytes, with stop sequences that
        // never match.
        let words = [
            "the", "pipeline", "streams", "tokens", "to", "a", "client,", "quickly.",
        ];
        let mut text = String::new();
        let mut seed = 7_u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as usize
        };
        for n in 0..20_000 {
            text.push_str(words[next() % words.len()]);
            text.push_str(if n % 17 == 16 { "\n" } else { " " });
        }
        let mut deltas = Vec::new();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let (delta, tail) = rest.split_at((1 + next() % 7).min(rest.len()));
            deltas.push(delta);
            rest = tail;
        }
        let stop = stops(&["STOP", "\n\n"]);
        let streamed = stream(&stop, &deltas);
        assert_eq!(streamed.text(), clean(&text, &stop).text);
        // The tag, the longest word (8 bytes), a stop prefix (3 bytes).
        assert!(
            streamed.max_carry <= 1 + 8 + 3,
            "carry grew to {}",
            streamed.max_carry
        );
    }

    /// Inputs that once made the chunk path quadratic (an unbroken run was
    /// held whole and rescanned at each delta), and others like them: the
    /// chunk path equals whole mode, and its carry (hence each call's work)
    /// does not grow when the input doubles.
    #[test]
    fn long_runs_stream_with_a_bounded_carry() {
        let stop = stops(&["STOP", "\n\n"]);
        let runs: [(&str, &str); 8] = [
            (".", ""),
            ("a", ""),
            ("é", ""),
            ("a.", ""),
            (" ", "x"),
            ("\n ", "x"),
            ("abc123", " ok"),
            ("x@a.", "com"),
        ];
        for (unit, tail) in runs {
            let mut carries = Vec::new();
            for n in [4_000, 8_000] {
                let text = format!("start {}{tail}", unit.repeat(n));
                let whole = clean(&text, &stop);
                // Deltas of 1 to 7 bytes, cut at character boundaries.
                let cuts = (0..text.len()).step_by(3).chain([text.len()]);
                let deltas = orchestrator_text::split_at_offsets(&text, cuts);
                let streamed = stream(&stop, &deltas);
                assert_eq!(streamed.text(), whole.text, "{unit:?} × {n}");
                assert!(
                    streamed.max_carry <= MAX_HELD + 3,
                    "{unit:?} × {n}: carry {}",
                    streamed.max_carry
                );
                carries.push(streamed.max_carry);
            }
            assert_eq!(
                carries[0], carries[1],
                "{unit:?}: the carry grew with the input"
            );
        }
    }

    /// Pieces of text that exercise every rule, including their edges.
    fn fragment() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "john.doe@example.com",
                "ann@ex.io",
                "a@b.co",
                "a@b.co.",
                "x@y.1",
                "user@localhost",
                "@handle",
                "jörg@beispiel.de",
                "sk-abcdefghijklmnop1234",
                "AKIAABCDEFGHIJKLMNOP",
                "0123456789abcdef0123456789abcdef",
                "ghp_",
                "END",
                "STOP",
                "Grüße",
                "—",
                "\u{2003}",
            ])
            .prop_map(String::from),
            "[a-c0-9._%+@ -]{1,4}",
            "[ \t\n]{1,3}",
            "[a-zé.@]{1,3}",
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(fragment(), 0..16).prop_map(|f| f.concat())
    }

    fn stop_list() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(
            prop_oneof![
                prop::sample::select(vec![
                    "END", "STOP", "\n\n", "EN", "ND", "@ex", "é", "", ". ", "abcd", "bc"
                ])
                .prop_map(String::from),
                "[a-c .@\n]{1,4}",
            ],
            0..3,
        )
    }

    /// `text` cut at the char boundaries nearest to `cuts` (which may
    /// repeat, giving empty deltas).
    fn split<'a>(text: &'a str, cuts: &[prop::sample::Index]) -> Vec<&'a str> {
        orchestrator_text::split_at_offsets(text, cuts.iter().map(|i| i.index(text.len() + 1)))
    }

    /// Longest run of whitespace or of non-whitespace characters, in bytes.
    fn longest_run(text: &str) -> usize {
        let mut longest = 0;
        let mut run = 0;
        let mut prev = None;
        for c in text.chars() {
            let ws = c.is_whitespace();
            run = if prev == Some(ws) {
                run + c.len_utf8()
            } else {
                c.len_utf8()
            };
            prev = Some(ws);
            longest = longest.max(run);
        }
        longest
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// The key property: any split of any text streams to exactly the
        /// whole-mode output, stops exactly when whole mode does, and keeps
        /// the carry within its documented bound.
        #[test]
        fn chunked_equals_whole(
            text in text(),
            stop in stop_list(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let whole = clean(&text, &stop);
            let longest_stop = stop.iter().map(String::len).max().unwrap_or(0);
            let bound = 1 + longest_run(&text).min(MAX_HELD - 1) + longest_stop.saturating_sub(1);

            let streamed = stream(&stop, &split(&text, &cuts));
            prop_assert_eq!(streamed.text(), whole.text.clone());
            prop_assert_eq!(streamed.stopped, whole.stopped);
            prop_assert!(streamed.max_carry <= bound, "carry {} > bound {}", streamed.max_carry, bound);

            // The finest split: one character per delta.
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            let streamed = stream(&stop, &chars);
            prop_assert_eq!(streamed.text(), whole.text);
            prop_assert_eq!(streamed.stopped, whole.stopped);
            prop_assert!(streamed.max_carry <= bound, "carry {} > bound {}", streamed.max_carry, bound);
        }

        /// Long runs (past every bound: local part, domain, word, trailing
        /// whitespace) stream to whole mode too.
        #[test]
        fn chunked_equals_whole_on_long_runs(
            parts in prop::collection::vec((text(), "[a.@ 1-]", 60..1300usize), 1..4),
            stop in stop_list(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let text: String = parts.iter().map(|(t, unit, n)| format!("{t}{}", unit.repeat(*n))).collect();
            let whole = clean(&text, &stop);
            let longest_stop = stop.iter().map(String::len).max().unwrap_or(0);
            let streamed = stream(&stop, &split(&text, &cuts));
            prop_assert_eq!(streamed.text(), whole.text);
            prop_assert_eq!(streamed.stopped, whole.stopped);
            prop_assert!(streamed.max_carry <= MAX_HELD + longest_stop.saturating_sub(1));
        }

        /// The one-delta stream is whole mode too.
        #[test]
        fn one_chunk_equals_whole(text in text(), stop in stop_list()) {
            let whole = clean(&text, &stop);
            let streamed = stream(&stop, &[text.as_str()]);
            prop_assert_eq!(streamed.text(), whole.text);
            prop_assert_eq!(streamed.stopped, whole.stopped);
        }
    }
}
