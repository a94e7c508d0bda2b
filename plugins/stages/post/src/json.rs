//! Redaction inside JSON text: the arguments of the answer's tool calls
//! (`redact_tool_arguments = true`).
//!
//! Only the contents of string literals are redacted, never the structure
//! around them (numbers, `true`, keys' quotes...), so valid JSON stays
//! valid: each string is decoded, redacted with the rules of the text
//! (e-mail addresses and keys; stop sequences and trimming do not apply),
//! and, only if something was redacted, encoded again. The markers hold no
//! quote or backslash. A string that does not decode (a bad escape) is left
//! as it is, and so is text that is not JSON at all outside its strings.

use crate::redact;

/// What [`redact_json`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RedactedJson {
    /// The text, with the strings' addresses and keys replaced.
    pub text: String,
    /// E-mail addresses redacted.
    pub emails: usize,
    /// Key-like strings redacted.
    pub keys: usize,
}

/// Redact e-mail addresses and keys inside the string literals of `json`.
pub fn redact_json(json: &str) -> RedactedJson {
    let mut out = String::with_capacity(json.len());
    let (mut emails, mut keys) = (0, 0);
    let mut rest = json;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let end = string_end(rest);
        let raw = &rest[..end.unwrap_or(rest.len())];
        match unescape(raw).map(|text| redact(&text)) {
            Some(redacted) if redacted.emails + redacted.keys > 0 => {
                emails += redacted.emails;
                keys += redacted.keys;
                escape_into(&redacted.text, &mut out);
            }
            _ => out.push_str(raw),
        }
        match end {
            Some(end) => {
                out.push('"');
                rest = &rest[end + 1..];
            }
            None => rest = "",
        }
    }
    out.push_str(rest);
    RedactedJson {
        text: out,
        emails,
        keys,
    }
}

/// The offset of the quote that closes the string whose contents start
/// `text`, if it is closed.
fn string_end(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => return Some(at),
            b'\\' => at += 2,
            _ => at += 1,
        }
    }
    None
}

/// The value of a string literal's contents, or `None` if an escape is
/// invalid (a lone surrogate included).
fn unescape(raw: &str) -> Option<String> {
    if !raw.contains('\\') {
        return Some(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let decoded = match chars.next()? {
            '"' => '"',
            '\\' => '\\',
            '/' => '/',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let high = hex4(&mut chars)?;
                if (0xD800..0xDC00).contains(&high) {
                    if chars.next()? != '\\' || chars.next()? != 'u' {
                        return None;
                    }
                    let low = hex4(&mut chars)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))?
                } else {
                    char::from_u32(high)?
                }
            }
            _ => return None,
        };
        out.push(decoded);
    }
    Some(out)
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u32> {
    (0..4).try_fold(0, |value, _| Some(value * 16 + chars.next()?.to_digit(16)?))
}

/// `text` as the contents of a JSON string literal.
fn escape_into(text: &str, out: &mut String) {
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{EMAIL_MARKER, KEY_MARKER};

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn the_markers_hold_no_quote_or_backslash() {
        for marker in [EMAIL_MARKER, KEY_MARKER] {
            assert!(!marker.contains(['"', '\\']), "{marker}");
        }
    }

    #[test]
    fn strings_are_redacted_and_the_json_stays_valid() {
        let json = r#"{"to": "ann@example.com", "note": "say \"hi\"\nto bob@example.org",
            "auth": {"key": "sk-abcdefghijklmnop123456"}, "n": 1234567890123456789012345678901e5,
            "list": ["x", "ghp_abcdefghijklmnopqrstu", true, null], "esc": "caf\u00e9 \ud83d\ude00"}"#;
        let out = redact_json(json);
        assert_eq!((out.emails, out.keys), (2, 2));
        let value = parse(&out.text);
        assert_eq!(value["to"], EMAIL_MARKER);
        assert_eq!(value["note"], format!("say \"hi\"\nto {EMAIL_MARKER}"));
        assert_eq!(value["auth"]["key"], KEY_MARKER);
        assert_eq!(value["list"][1], KEY_MARKER);
        assert_eq!(value["list"][2], true);
        // A number outside strings is never touched, however key-like.
        assert_eq!(
            parse(json)["n"],
            value["n"],
            "the structure outside strings is kept"
        );
        // An untouched string keeps its escapes as written.
        assert!(
            out.text.contains(r#""caf\u00e9 \ud83d\ude00""#),
            "{}",
            out.text
        );
    }

    #[test]
    fn nothing_to_redact_leaves_the_text_byte_for_byte() {
        for json in [
            r#"{"city": "Paris", "days": 3}"#,
            r#"{"a": "\u12"#,
            "not json at all: ann@example.com",
            r#"{"bad": "\x", "open": "ann"#,
        ] {
            let out = redact_json(json);
            if json.starts_with("not json") {
                assert_eq!(out.text, json, "text outside strings is kept");
            } else {
                assert_eq!(
                    out,
                    RedactedJson {
                        text: json.into(),
                        ..Default::default()
                    }
                );
            }
        }
    }

    #[test]
    fn escapes_inside_an_address_are_read() {
        let json = r#"{"to":"ann\u0040example.com","path":"C:\\sk-abcdefghijklmnop123456"}"#;
        let out = redact_json(json);
        assert_eq!((out.emails, out.keys), (1, 1));
        let value = parse(&out.text);
        assert_eq!(value["to"], EMAIL_MARKER);
        assert_eq!(value["path"], format!("C:\\{KEY_MARKER}"));
    }

    /// Whatever the strings hold, redacting valid JSON gives valid JSON
    /// whose strings are the redacted originals.
    #[test]
    fn valid_json_stays_valid() {
        let pieces = [
            "ann@example.com",
            "sk-abcdefghijklmnop123456",
            "\"",
            "\\",
            "\n",
            "\u{1}",
            "é",
            "😀",
            " ",
            "x",
            "@",
            ".",
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..2_000 {
            let strings: Vec<String> = (0..3)
                .map(|_| (0..next(6)).map(|_| pieces[next(pieces.len())]).collect())
                .collect();
            let value =
                serde_json::json!({ "a": strings[0], "b": [strings[1], 1, {"c": strings[2]}] });
            let text = if next(2) == 0 {
                serde_json::to_string(&value).unwrap()
            } else {
                serde_json::to_string_pretty(&value).unwrap()
            };
            let out = redact_json(&text);
            let redacted = parse(&out.text);
            let expect = |s: &str| crate::redact(s).text;
            assert_eq!(redacted["a"], expect(&strings[0]), "{text}");
            assert_eq!(redacted["b"][0], expect(&strings[1]), "{text}");
            assert_eq!(redacted["b"][1], 1);
            assert_eq!(redacted["b"][2]["c"], expect(&strings[2]), "{text}");
        }
    }
}
