//! The `post` stage: cleans the model's completion before it reaches the
//! client.
//!
//! In order: cut at the first stop sequence, trim surrounding whitespace,
//! redact e-mail addresses (`[redacted email]`) and strings that look like
//! API keys or tokens (`[redacted key]`). What changed is reported in
//! [`Cleaned`] and, by the glue, in the request's notes.
//!
//! Every rule looks only a bounded distance ahead, so both modes take time
//! linear in the completion, whatever its text (a megabyte of `.` or of
//! one unbroken word included):
//!
//! - an e-mail address has a local part of at most [`MAX_LOCAL_PART`]
//!   bytes (RFC 5321), and its domain is read from at most [`MAX_DOMAIN`]
//!   bytes;
//! - a word (`[A-Za-z0-9_-]+`) is a key if its first [`MAX_WORD`] bytes
//!   make it one (a known prefix and 16 more characters, or 32 characters
//!   with a letter and a digit), and is then redacted whole. Each word of a
//!   dotted token is judged on its own, so all three parts of a JWT go;
//! - at most [`MAX_TRAILING_SPACE`] bytes of trailing whitespace are
//!   trimmed (leading whitespace is all trimmed).
//!
//! The stage works in two modes, which give the same text:
//!
//! - whole mode, [`clean`]: the completion at once (the `process` export);
//! - chunk mode, [`process_chunk`]: a streamed completion delta by delta
//!   (the `process-chunk` export of the `streaming-request-stage` world). Each call
//!   emits the text that is already final and holds back, in the carry,
//!   only what may still change: a word that may yet turn out to be an
//!   e-mail address or a key, text that may be the start of a stop
//!   sequence, and whitespace that may turn out to be trailing.
//!
//! For any completion and any way of splitting it into deltas, the
//! concatenation of everything [`process_chunk`] emits equals
//! `clean(completion, stop).text`, and it reports `stop` exactly when
//! [`clean`] reports `stopped` (this is property-tested).
//!
//! The rules apply to the answer's text content only: its tool calls are
//! left as they are, unless `redact_tool_arguments = true` (see
//! [`Config`]): then e-mail addresses and keys inside the strings of each
//! call's JSON `arguments` are redacted too ([`redact_json`]), keeping the
//! JSON valid.

//!
//! Each rule has its module, with its tests: `stop` (stop sequences),
//! `trim` (whitespace), `email` (addresses), `key` (keys and tokens);
//! `redact` is the scan that applies the last two, and `chunk` the chunk
//! mode with its carry.

mod chunk;
mod email;
mod json;
mod key;
mod redact;
mod stage;
mod stop;
#[cfg(test)]
mod testing;
mod trim;

pub use chunk::{BadCarry, ChunkOut, MAX_HELD, process_chunk};
pub use email::{EMAIL_MARKER, MAX_DOMAIN, MAX_LOCAL_PART};
pub use json::{RedactedJson, redact_json};
pub use key::{KEY_MARKER, MAX_WORD};
pub use stage::{Config, Post};
pub use trim::MAX_TRAILING_SPACE;

use redact::{Counts, Scan, redact_into};
use trim::kept_trailing;

/// The result of [`clean`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cleaned {
    /// The cleaned text.
    pub text: String,
    /// A stop sequence was found and the text cut there.
    pub stopped: bool,
    /// Characters of whitespace trimmed.
    pub trimmed_chars: usize,
    /// E-mail addresses redacted.
    pub emails: usize,
    /// Key-like strings redacted.
    pub keys: usize,
}

/// Clean `completion` (see the module docs for the rules and their
/// bounds). Empty stop sequences are ignored.
pub fn clean(completion: &str, stop: &[String]) -> Cleaned {
    let cut = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| completion.find(s.as_str()))
        .min();
    let text = cut.map_or(completion, |at| &completion[..at]);
    let body = text.trim_start();
    let content = body.trim_end();
    let trailing = &body[content.len()..];
    let kept = &trailing[..kept_trailing(trailing)];
    let mut counts = Counts::default();
    let mut redacted = String::with_capacity(body.len());
    redact_into(content, false, Scan::Boundary, &mut redacted, &mut counts);
    redacted.push_str(kept);
    Cleaned {
        text: redacted,
        stopped: cut.is_some(),
        trimmed_chars: text.chars().count() - content.chars().count() - kept.chars().count(),
        emails: counts.emails,
        keys: counts.keys,
    }
}

/// Redact e-mail addresses and keys in `text`, as [`clean`] does, without
/// cutting at stop sequences or trimming (`stopped` is `false`,
/// `trimmed_chars` 0). The redacted text holds a quote or a backslash
/// only where `text` did: the markers have neither.
pub fn redact(text: &str) -> Cleaned {
    let mut counts = Counts::default();
    let mut redacted = String::with_capacity(text.len());
    redact_into(text, false, Scan::Boundary, &mut redacted, &mut counts);
    Cleaned {
        text: redacted,
        emails: counts.emails,
        keys: counts.keys,
        ..Cleaned::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_multibyte_text() {
        let c = clean("Grüße an jörg@beispiel.de — danke", &[]);
        assert_eq!(c.text, "Grüße an [redacted email] — danke");
    }
}
