//! E-mail addresses: where one starts and how long it is, within the
//! bounds that keep the scan linear (a local part of at most
//! [`MAX_LOCAL_PART`] bytes, a domain read from at most [`MAX_DOMAIN`]).

/// Replacement for an e-mail address.
pub const EMAIL_MARKER: &str = "[redacted email]";

/// The longest local part of an e-mail address (RFC 5321): a longer run
/// before an `@` is not an address.
pub const MAX_LOCAL_PART: usize = 64;
/// The longest domain of an e-mail address (RFC 1035): a longer run of
/// domain characters is judged by its first `MAX_DOMAIN` bytes.
pub const MAX_DOMAIN: usize = 255;

pub(crate) fn is_email_local(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-')
}

pub(crate) fn is_email_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-')
}

/// What [`email_at`] found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Found {
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
pub(crate) fn email_at(text: &str, open: bool) -> Found {
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

#[cfg(test)]
mod tests {
    use crate::testing::stream;
    use crate::{clean, process_chunk};

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
    fn an_address_is_bounded() {
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
    }
}
