//! Stop sequences: where they cut a streamed completion, and the tail that
//! must wait because it may still become one.

/// What [`stop_cut`] decided about a buffer of streamed text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Cut {
    /// The completion ends at this offset: the earliest stop sequence of
    /// the whole completion starts here.
    At(usize),
    /// No stop sequence starts before this offset; the text from here on
    /// may still become one (or is all of `buf`).
    Before(usize),
}

/// Find where stop sequences cut `buf`, the not yet emitted text of a
/// stream, as [`clean`](crate::clean) would cut the whole completion.
///
/// No stop sequence starts in the text emitted before `buf` (that is what
/// earlier calls made sure of), so the earliest full occurrence in `buf`
/// is the cut, unless a proper prefix of a stop sequence at the end of
/// `buf` starts even earlier and may still complete: then the decision
/// waits, and only the text before that prefix is final. When `last`, no
/// prefix can complete any more.
pub(crate) fn stop_cut(buf: &str, stop: &[String], last: bool) -> Cut {
    let stops: Vec<&str> = stop
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let full = stops.iter().filter_map(|s| buf.find(s)).min();
    let partial = if last {
        None
    } else {
        partial_stop_start(buf, &stops)
    };
    match (full, partial) {
        (Some(at), partial) if partial.is_none_or(|from| at <= from) => Cut::At(at),
        (_, partial) => Cut::Before(partial.unwrap_or(buf.len())),
    }
}

/// The earliest offset from which the rest of `buf` is a non-empty proper
/// prefix of one of `stops` (all non-empty).
fn partial_stop_start(buf: &str, stops: &[&str]) -> Option<usize> {
    let longest = stops.iter().map(|s| s.len()).max()?;
    let from = buf.len().saturating_sub(longest.saturating_sub(1));
    (from..buf.len())
        .filter(|&at| buf.is_char_boundary(at))
        .find(|&at| {
            let tail = &buf[at..];
            stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
        })
}

#[cfg(test)]
mod tests {
    use crate::testing::{stops, stream};
    use crate::{clean, process_chunk};

    #[test]
    fn stop_sequences_cut_then_trim() {
        let c = clean("  Hello there. END more text", &["END".into(), "".into()]);
        assert_eq!(c.text, "Hello there.");
        assert!(c.stopped);
        assert_eq!(c.trimmed_chars, 3);
        assert!(!clean("no stop", &["zzz".into()]).stopped);
    }

    #[test]
    fn chunked_stop_sequence_split_across_chunks_stops() {
        let stop = stops(&["STOP"]);
        let out = process_chunk(&stop, "", "Hello ST", false).unwrap();
        assert_eq!((out.emit.as_str(), out.stop), ("Hello", false));
        let out = process_chunk(&stop, &out.carry, "OP and more", false).unwrap();
        assert_eq!((out.emit.as_str(), out.stop), ("", true));
        // Whatever the host still sends, nothing more comes out.
        let after = process_chunk(&stop, &out.carry, "more", false).unwrap();
        assert_eq!((after.emit.as_str(), after.stop), ("", true));
        let flush = process_chunk(&stop, &after.carry, "", true).unwrap();
        assert_eq!((flush.emit.as_str(), flush.stop), ("", true));

        // A prefix that does not complete is let through.
        let streamed = stream(&stop, &["Hello ST", "ART now"]);
        assert_eq!(
            (streamed.text().as_str(), streamed.stopped),
            ("Hello START now", false)
        );
        // A blank-line stop sequence split in two, right at the start.
        let streamed = stream(&stops(&["\n\n"]), &["\n", "\nHello"]);
        assert_eq!((streamed.text().as_str(), streamed.stopped), ("", true));
        // Stop found only by the final flush.
        let streamed = stream(&stops(&["abcd", "bc"]), &["xab", "c"]);
        assert_eq!((streamed.text().as_str(), streamed.stopped), ("xa", true));
    }

    #[test]
    fn chunked_earliest_stop_sequence_wins() {
        let stop = stops(&["abcd", "bc"]);
        // `bc` is complete, but `abcd` may still start earlier.
        let out = process_chunk(&stop, "", "x abc", false).unwrap();
        assert_eq!((out.emit.as_str(), out.stop), ("x", false));
        let done = process_chunk(&stop, &out.carry, "d y", false).unwrap();
        assert_eq!((done.emit.as_str(), done.stop), ("", true));
        let other = process_chunk(&stop, &out.carry, "e y", false).unwrap();
        assert_eq!((other.emit.as_str(), other.stop), (" a", true));
        assert_eq!(clean("x abce y", &stop).text, "x a");
    }
}
