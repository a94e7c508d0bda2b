//! The redaction scan: e-mail addresses ([`crate::email`]) and keys
//! ([`crate::key`]) replaced by their markers, left to right, resumable
//! mid-text in the state a chunk's carry records.

use crate::email::{EMAIL_MARKER, Found, email_at, is_email_local};
use crate::key::{KEY_MARKER, MAX_WORD, is_key};

/// Redaction counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counts {
    pub(crate) emails: usize,
    pub(crate) keys: usize,
}

pub(crate) fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

/// Where the redaction scan stands: what the character before the current
/// position allows to start there. The chunk path keeps it in the carry's
/// tag, so a scan resumes mid-run exactly as the whole-mode scan goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scan {
    /// At the start, or after a character that cannot be part of an e-mail
    /// address: an address or a word may start here.
    Boundary,
    /// After an address character that is not a word character (`.`, `+`,
    /// `%`, a non-ASCII letter): a word may start here, an address may not.
    AfterLocal,
    /// Inside a word already passed on (or right after an address): word
    /// characters continue it.
    InWord,
    /// Inside a word redacted as a key: its further word characters are
    /// dropped.
    InKey,
}

impl Scan {
    /// The carry tag of this state (the text has started).
    pub(crate) fn tag(self) -> char {
        match self {
            Scan::Boundary => 'B',
            Scan::AfterLocal => 'A',
            Scan::InWord => 'W',
            Scan::InKey => 'K',
        }
    }

    pub(crate) fn from_tag(tag: char) -> Option<Scan> {
        Some(match tag {
            'B' => Scan::Boundary,
            'A' => Scan::AfterLocal,
            'W' => Scan::InWord,
            'K' => Scan::InKey,
            _ => return None,
        })
    }

    /// The state after passing `c` outside a word start or an address.
    fn after(self, c: char) -> Scan {
        if is_word_char(c) {
            // Only reached inside a word: it goes on (redacted or not).
            if self == Scan::InKey {
                Scan::InKey
            } else {
                Scan::InWord
            }
        } else if is_email_local(c) {
            Scan::AfterLocal
        } else {
            Scan::Boundary
        }
    }
}

/// Redact `text` into `out`, counting what was redacted, starting in state
/// `scan`; return how many bytes of `text` were consumed and the state
/// there.
///
/// The scan goes left to right. At a boundary (see [`Scan`]) it replaces an
/// e-mail address by its marker; at the start of a word (a word character
/// after anything but a word character) it replaces the word by its marker
/// if the word is a key; everything else is copied. So each segment of a
/// dotted token (`eyJ….eyJ….sig`) is judged on its own.
///
/// Without `open`, `text` is complete (or known to be followed by
/// whitespace, which ends addresses and words alike): all of it is
/// consumed. With `open`, more text may follow, so the scan stops where a
/// decision needs it: before an undecided address or word, which is left
/// unconsumed. Everything consumed is final, and resuming at the returned
/// offset in the returned state gives what scanning on would.
pub(crate) fn redact_into(
    text: &str,
    open: bool,
    mut scan: Scan,
    out: &mut String,
    counts: &mut Counts,
) -> (usize, Scan) {
    let mut i = 0;
    while let Some(c) = text[i..].chars().next() {
        let rest = &text[i..];
        if scan == Scan::Boundary {
            match email_at(rest, open) {
                Found::Yes(len) => {
                    out.push_str(EMAIL_MARKER);
                    counts.emails += 1;
                    i += len;
                    // An address ends with a letter of its domain.
                    scan = Scan::InWord;
                    continue;
                }
                Found::Pending => return (i, scan),
                Found::No => {}
            }
        }
        if is_word_char(c) && matches!(scan, Scan::Boundary | Scan::AfterLocal) {
            let word = rest.find(|c| !is_word_char(c)).unwrap_or(rest.len());
            if open && word == rest.len() && word < MAX_WORD {
                // The word may still grow into a key.
                return (i, scan);
            }
            if is_key(&rest[..word]) {
                out.push_str(KEY_MARKER);
                counts.keys += 1;
                scan = Scan::InKey;
            } else {
                out.push_str(&rest[..word]);
                scan = Scan::InWord;
            }
            i += word;
            continue;
        }
        if !(scan == Scan::InKey && is_word_char(c)) {
            out.push(c);
        }
        scan = scan.after(c);
        i += c.len_utf8();
    }
    (i, scan)
}
