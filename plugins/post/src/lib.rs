//! The `post` stage: cleans the model's completion before it reaches the
//! client.
//!
//! In order: cut at the first stop sequence, trim surrounding whitespace,
//! redact e-mail addresses (`[redacted email]`) and strings that look like
//! API keys or tokens (`[redacted key]`). What changed is reported in
//! [`Cleaned`] and, by the glue, in the envelope's metadata.

#[cfg(target_arch = "wasm32")]
mod component;

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

/// Clean `completion` (see the module docs).
pub fn clean(completion: &str, stop: &[String]) -> Cleaned {
    let cut = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| completion.find(s.as_str()))
        .min();
    let text = cut.map_or(completion, |at| &completion[..at]);
    let trimmed = text.trim();
    let mut out = Cleaned {
        stopped: cut.is_some(),
        trimmed_chars: text.chars().count() - trimmed.chars().count(),
        ..Cleaned::default()
    };
    out.text = redact(trimmed, &mut out.emails, &mut out.keys);
    out
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

/// Length in bytes of the e-mail address starting at `text[0]`, if one does.
fn email_at(text: &str) -> Option<usize> {
    let local = text.find(|c| !is_email_local(c)).unwrap_or(text.len());
    if local == 0 || !text[local..].starts_with('@') {
        return None;
    }
    let domain_start = local + 1;
    let rest = &text[domain_start..];
    let mut domain = rest.find(|c| !is_email_domain(c)).unwrap_or(rest.len());
    // A sentence may end right after the address.
    while domain > 0 && matches!(rest.as_bytes()[domain - 1], b'.' | b'-') {
        domain -= 1;
    }
    let host = &rest[..domain];
    let tld = host.rsplit('.').next().unwrap_or("");
    let valid =
        host.contains('.') && tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic());
    valid.then_some(domain_start + domain)
}

/// Whether `word` (a run of `[A-Za-z0-9_-]`) looks like a credential.
fn is_key(word: &str) -> bool {
    let known = KEY_PREFIXES
        .iter()
        .any(|p| word.starts_with(p) && word.len() >= p.len() + 16);
    let generic = word.len() >= 32
        && word.chars().any(|c| c.is_ascii_digit())
        && word.chars().any(|c| c.is_ascii_alphabetic());
    known || generic
}

fn redact(text: &str, emails: &mut usize, keys: &mut usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        // Only start a match at a word boundary.
        let boundary = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !is_email_local(c));
        if boundary {
            if let Some(len) = email_at(rest) {
                out.push_str(EMAIL_MARKER);
                *emails += 1;
                i += len;
                continue;
            }
            let word = rest.find(|c| !is_word_char(c)).unwrap_or(rest.len());
            if word > 0 {
                if is_key(&rest[..word]) {
                    out.push_str(KEY_MARKER);
                    *keys += 1;
                } else {
                    out.push_str(&rest[..word]);
                }
                i += word;
                continue;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
