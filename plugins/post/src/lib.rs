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

mod json;
mod stage;

pub use json::{RedactedJson, redact_json};
pub use stage::{Config, Post};

use std::fmt;

/// Replacement for an e-mail address.
pub const EMAIL_MARKER: &str = "[redacted email]";
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

/// The most trailing whitespace [`clean`] trims, in bytes. Of a longer
/// trailing run, the bytes before its last `MAX_TRAILING_SPACE` are kept
/// (from the first character boundary on): this is what lets the chunk
/// path pass a long run of whitespace on instead of holding it whole.
pub const MAX_TRAILING_SPACE: usize = 1024;
/// A word (a run of `[A-Za-z0-9_-]`) is judged a key, or not, by its first
/// `MAX_WORD` bytes; a key is redacted whole, however long.
pub const MAX_WORD: usize = 256;
/// The longest local part of an e-mail address (RFC 5321): a longer run
/// before an `@` is not an address.
pub const MAX_LOCAL_PART: usize = 64;
/// The longest domain of an e-mail address (RFC 1035): a longer run of
/// domain characters is judged by its first `MAX_DOMAIN` bytes.
pub const MAX_DOMAIN: usize = 255;
/// The longest carry [`process_chunk`] returns, stop sequences aside: the
/// tag and the longest text it holds back (trailing whitespace; a pending
/// address or word is shorter).
pub const MAX_HELD: usize = 1 + MAX_TRAILING_SPACE;

/// Clean one chunk of a streamed completion: the chunk path of the stage,
/// equivalent to [`clean`] on the whole completion.
///
/// `stop` are the request's stop sequences (empty ones are ignored, as in
/// [`clean`]); `carry` is the `carry` this function returned for the
/// previous chunk of the request (empty for the first); `delta` is the new
/// text; `last` marks the final call, which must emit everything still
/// held (its `delta` is normally empty, but a non-empty one is processed
/// too).
///
/// The text is emitted as soon as it is final, already redacted. Held back
/// are only:
///
/// - a word or an address that is still undecided: up to
///   [`MAX_WORD`] bytes of a word that may still become a key (`sk-abc`),
///   or up to `64 + 1 + 255` bytes of what may still become an e-mail
///   address (`jo`, `john.doe@exam`);
/// - trailing whitespace, which [`clean`] drops if nothing follows it (at
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

/// How many leading bytes of `trailing`, a run of whitespace that ends the
/// text so far, are final whatever follows: all but its last
/// [`MAX_TRAILING_SPACE`] bytes, up to the next character boundary.
fn kept_trailing(trailing: &str) -> usize {
    let Some(mut at) = trailing.len().checked_sub(MAX_TRAILING_SPACE) else {
        return 0;
    };
    while !trailing.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// What [`stop_cut`] decided about a buffer of streamed text.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// The completion ends at this offset: the earliest stop sequence of
    /// the whole completion starts here.
    At(usize),
    /// No stop sequence starts before this offset; the text from here on
    /// may still become one (or is all of `buf`).
    Before(usize),
}

/// Find where stop sequences cut `buf`, the not yet emitted text of a
/// stream, as [`clean`] would cut the whole completion.
///
/// No stop sequence starts in the text emitted before `buf` (that is what
/// earlier calls made sure of), so the earliest full occurrence in `buf`
/// is the cut, unless a proper prefix of a stop sequence at the end of
/// `buf` starts even earlier and may still complete: then the decision
/// waits, and only the text before that prefix is final. When `last`, no
/// prefix can complete any more.
fn stop_cut(buf: &str, stop: &[String], last: bool) -> Cut {
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

/// Redaction counters.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    emails: usize,
    keys: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

fn is_email_local(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

fn is_email_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-')
}

/// Where the redaction scan stands: what the character before the current
/// position allows to start there. The chunk path keeps it in the carry's
/// tag, so a scan resumes mid-run exactly as the whole-mode scan goes on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scan {
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
    fn tag(self) -> char {
        match self {
            Scan::Boundary => 'B',
            Scan::AfterLocal => 'A',
            Scan::InWord => 'W',
            Scan::InKey => 'K',
        }
    }

    fn from_tag(tag: char) -> Option<Scan> {
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

/// What [`email_at`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Found {
    /// No e-mail address starts here.
    No,
    /// An e-mail address of this many bytes starts here.
    Yes(usize),
    /// Undecided: the text known so far ends inside what may be one.
    Pending,
}

/// Whether an e-mail address starts at `text[0]`, and how long it is. With
/// `open`, `text` may continue beyond what is known, so an address that
/// runs to its end is [`Found::Pending`].
///
/// The local part is at most [`MAX_LOCAL_PART`] bytes, and the domain is
/// read from at most [`MAX_DOMAIN`] bytes of domain characters, so the
/// decision never needs more than `64 + 1 + 255` bytes of text.
fn email_at(text: &str, open: bool) -> Found {
    let mut local = None;
    for (at, c) in text.char_indices() {
        if !is_email_local(c) {
            local = Some(at);
            break;
        }
        if at + c.len_utf8() > MAX_LOCAL_PART {
            return Found::No;
        }
    }
    let Some(local) = local else {
        // The local part runs to the end: an `@` may still follow.
        return if open && !text.is_empty() {
            Found::Pending
        } else {
            Found::No
        };
    };
    if local == 0 || !text[local..].starts_with('@') {
        return Found::No;
    }
    let domain_start = local + 1;
    let rest = &text[domain_start..];
    let run = rest
        .bytes()
        .take(MAX_DOMAIN)
        .position(|b| !is_email_domain(char::from(b)));
    let mut domain = match run {
        Some(end) => end,
        // The domain runs to the end: it may still grow (`example.c` ->
        // `example.com`).
        None if open && rest.len() < MAX_DOMAIN => return Found::Pending,
        None => rest.len().min(MAX_DOMAIN),
    };
    // A sentence may end right after the address.
    while domain > 0 && matches!(rest.as_bytes()[domain - 1], b'.' | b'-') {
        domain -= 1;
    }
    let host = &rest[..domain];
    let tld = host.rsplit('.').next().unwrap_or("");
    let valid =
        host.contains('.') && tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic());
    if valid {
        Found::Yes(domain_start + domain)
    } else {
        Found::No
    }
}

/// Whether `word` (a run of `[A-Za-z0-9_-]`) looks like a credential,
/// judged by its first [`MAX_WORD`] bytes.
fn is_key(word: &str) -> bool {
    let word = &word[..word.len().min(MAX_WORD)];
    let known = KEY_PREFIXES
        .iter()
        .any(|p| word.starts_with(p) && word.len() >= p.len() + 16);
    let generic = word.len() >= 32
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic());
    known || generic
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
fn redact_into(
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// What streaming `deltas` through [`process_chunk`] gave.
    #[derive(Debug, Default)]
    struct Streamed {
        /// Every emitted piece, in order.
        pieces: Vec<String>,
        /// Whether `stop` was reported.
        stopped: bool,
        /// The longest carry returned.
        max_carry: usize,
    }

    impl Streamed {
        fn text(&self) -> String {
            self.pieces.concat()
        }
    }

    /// Stream `deltas`, then the final empty `last` chunk, as the host
    /// does; check on the way that nothing is emitted after a stop.
    fn stream(stop: &[String], deltas: &[&str]) -> Streamed {
        let mut out = Streamed::default();
        let mut carry = String::new();
        let calls = deltas
            .iter()
            .map(|d| (*d, false))
            .chain(std::iter::once(("", true)));
        for (delta, last) in calls {
            let chunk = process_chunk(stop, &carry, delta, last).expect("own carry");
            if out.stopped {
                assert_eq!(chunk.emit, "", "output after the stop");
                assert!(chunk.stop, "a stopped stream stays stopped");
            } else if !chunk.emit.is_empty() {
                out.pieces.push(chunk.emit);
            }
            out.stopped |= chunk.stop;
            out.max_carry = out.max_carry.max(chunk.carry.len());
            carry = chunk.carry;
        }
        out
    }

    #[test]
    fn redacts_emails_and_keeps_punctuation() {
        let c = clean("Write to bob.smith+x@mail.example.com. Or ann@ex.io!", &[]);
        assert_eq!(c.text, "Write to [redacted email]. Or [redacted email]!");
        assert_eq!(c.emails, 2);
    }

    #[test]
    fn leaves_non_addresses_alone() {
        let text = "a @ b, user@localhost, x@y.1, @handle, 100% sure";
        let c = clean(text, &[]);
        assert_eq!(c.text, text);
        assert_eq!((c.emails, c.keys), (0, 0));
    }

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
    fn stop_sequences_cut_then_trim() {
        let c = clean("  Hello there. END more text", &["END".into(), "".into()]);
        assert_eq!(c.text, "Hello there.");
        assert!(c.stopped);
        assert_eq!(c.trimmed_chars, 3);
        assert!(!clean("no stop", &["zzz".into()]).stopped);
    }

    #[test]
    fn handles_multibyte_text() {
        let c = clean("Grüße an jörg@beispiel.de — danke", &[]);
        assert_eq!(c.text, "Grüße an [redacted email] — danke");
    }

    #[test]
    fn chunked_email_split_across_chunks_is_redacted() {
        let mut carry = String::new();
        let mut emitted = Vec::new();
        for delta in ["write to jo", "hn.doe@exam", "ple.com now"] {
            let out = process_chunk(&[], &carry, delta, false).unwrap();
            assert!(!out.stop);
            emitted.push(out.emit);
            carry = out.carry;
        }
        // Nothing of the address leaks before it is known to be one.
        assert_eq!(emitted, ["write to ", "", "[redacted email] "]);
        let out = process_chunk(&[], &carry, "", true).unwrap();
        assert_eq!(out.emit, "now");
        assert_eq!(out.carry, "");
        let streamed = stream(&[], &["write to jo", "hn.doe@exam", "ple.com now"]);
        assert_eq!(streamed.text(), "write to [redacted email] now");
        assert_eq!(
            streamed.text(),
            clean("write to john.doe@example.com now", &[]).text
        );
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

    #[test]
    fn chunked_whitespace_is_trimmed_only_at_the_ends() {
        let streamed = stream(&[], &["  ", " \n", "Hi", " ", " there", "  ", "\n"]);
        // The inner whitespace goes out once text follows it.
        assert_eq!(streamed.pieces, ["Hi", "  ", "there"]);
        let streamed = stream(&[], &[" \t ", "\n"]);
        assert!(streamed.pieces.is_empty());
    }

    #[test]
    fn chunked_text_after_an_address_stays_unredacted_as_in_whole_mode() {
        // After an address, the rest of its run is not at a word boundary:
        // whole mode copies it, even if it looks like a key.
        let text = "mail a@b.co_sk-abcdefghijklmnop1234 ok";
        let whole = clean(text, &[]).text;
        assert_eq!(whole, "mail [redacted email]_sk-abcdefghijklmnop1234 ok");
        assert_eq!(
            stream(&[], &["mail a@b.co_", "sk-abcdefghijklmnop1234 ok"]).text(),
            whole
        );
        assert_eq!(
            stream(&[], &["mail a@b.co_sk-abcdefghijklmnop12", "34 ok"]).text(),
            whole
        );
    }

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
    fn the_bounded_rules() {
        // A local part over 64 bytes is not an address's.
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert_eq!(clean(&long_local, &[]).emails, 0);
        assert_eq!(
            clean(&format!("{}@example.com", "a".repeat(64)), &[]).emails,
            1
        );
        // Punctuation run on after a domain does not hide the address.
        let dashes = format!("mail john@example.com{} now", "-".repeat(300));
        assert_eq!(
            clean(&dashes, &[]).text,
            format!("mail [redacted email]{} now", "-".repeat(300))
        );
        // A word is judged by its first 256 bytes, and a key goes whole.
        let late_digit = format!("{}1", "a".repeat(300));
        assert_eq!(clean(&late_digit, &[]).text, late_digit);
        let long_key = format!("sk-{}", "abc123".repeat(1000));
        assert_eq!(
            clean(&format!("{long_key} ok"), &[]).text,
            "[redacted key] ok"
        );
        // At most 1024 bytes of trailing whitespace are trimmed.
        let spaces = format!("x{}", " ".repeat(3000));
        let cleaned = clean(&spaces, &[]);
        assert_eq!(
            cleaned.text,
            format!("x{}", " ".repeat(3000 - MAX_TRAILING_SPACE))
        );
        assert_eq!(cleaned.trimmed_chars, MAX_TRAILING_SPACE);
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
