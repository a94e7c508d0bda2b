//! The `auth` stage: API keys. It tells who is calling (the request's
//! principal), refuses a request without a valid key, and counts each
//! key's use for the admin API.
//!
//! # Keys
//!
//! A client sends its key as `Authorization: Bearer <key>` (the scheme in
//! any case, surrounding whitespace ignored). A key has the shape
//! `sk-orch-<id>-<secret>`: `<id>` is 12 lowercase hex digits and names the
//! key, `<secret>` is 48 lowercase hex digits ([`ApiKey::parse`]). The
//! stage never holds a key itself, only its hash: the lowercase hex
//! SHA-256 of the whole key text ([`hash_key`]).
//!
//! A key is looked up by its id: first among the keys declared in the
//! stage's configuration (`keys`, see [`Config`]), without a store call;
//! otherwise as the record under `key:<id>` ([`record_key`]) in the stage's
//! key store (`store`, default `keys`), one round trip. The record is JSON
//! ([`KeyRecord::parse`]):
//!
//! ```json
//! {"id":"0123456789ab","hash":"<SHA-256 of the key, 64 hex digits>","principal":"alice",
//!  "name":"CI","models":["gpt-4o-mini"],"limits":{"requests_per_minute":60},
//!  "expires_at":1893456000,"disabled":false,"created_at":1765000000}
//! ```
//!
//! `models` empty or absent lets the key use every model; `limits`
//! (optional; `{}` is none) is an object the stage passes on without
//! reading it;
//! `expires_at` (optional) is in unix seconds; `disabled` is false when
//! absent; other fields (`name`, `created_at`, ...) are ignored.
//!
//! # Decisions
//!
//! - No `Authorization` header, or not a `Bearer` one: refused, 401
//!   (`unauthorized`) with code `invalid_api_key` and
//!   [`MISSING_KEY_MESSAGE`].
//! - A key of the wrong shape, an unknown id, a wrong secret, a disabled or
//!   expired key (`expires_at` at or before now), a record that does not
//!   parse: refused, 401 `invalid_api_key` with [`INCORRECT_KEY_MESSAGE`],
//!   the same for all, so a client cannot tell them apart. The stage logs
//!   why (with the key's id, never the key). The presented key is hashed
//!   and compared in constant time ([`constant_time_eq`]) whether or not a
//!   record was found ([`verify`]), so the time taken says nothing about
//!   the secret (whether an id exists may show: a found record is parsed
//!   too; ids are not secret).
//! - A valid key whose `models` does not list the request's model:
//!   refused, 403 (`forbidden`) with code `model_not_allowed`
//!   ([`model_refusal_message`]).
//! - A valid key allowed the model: the request's principal becomes the
//!   key's `principal`, the note [`KEY_NOTE`] (`auth.key`) its id and, if
//!   the key has `limits`, the note [`LIMITS_NOTE`] (`auth.limits`) those
//!   limits as compact JSON. The `ratelimit` stage reads these two notes.
//! - The key store fails (down, timed out): the request fails with
//!   `upstream-unavailable` (503): the stage fails closed. A store the stage
//!   may not open (absent, not granted) is a `config` error (500).
//!
//! # Usage counters
//!
//! After each request that carries the note `auth.key`, the stage's
//! `finish` adds to six windowed counters of the key store, in one
//! [`Store::windows`](orchestrator_plugin::store::Store::windows) call
//! ([`usage_counters`]): `usage:<id>:requests:<unit>:<index>` (by 1) and
//! `usage:<id>:tokens:<unit>:<index>` (by the prompt and completion tokens
//! of the outcome; 0 for a request answered early), for the units `minute`,
//! `hour` and `day`. `<index>` is the unix time in milliseconds divided by
//! the unit's length: fixed windows aligned on the epoch, each counter
//! expiring one unit after it starts. A delta of 0 creates no counter.
//!
//! The pure logic is here; [`Auth`] puts it behind the SDK's
//! [`Stage`](orchestrator_plugin::Stage) trait.

mod stage;

pub use stage::{Auth, Config, DeclaredKey};

use std::fmt;
use std::time::Duration;

use orchestrator_plugin::store::Counter;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The refusal text when no key was sent.
pub const MISSING_KEY_MESSAGE: &str =
    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.";

/// The refusal text for every key that is not accepted, whatever the
/// reason.
pub const INCORRECT_KEY_MESSAGE: &str = "Incorrect API key provided.";

/// The error code of a 401 refusal.
pub const INVALID_KEY_CODE: &str = "invalid_api_key";

/// The error code of a refusal for a model the key may not use (403).
pub const MODEL_NOT_ALLOWED_CODE: &str = "model_not_allowed";

/// The note holding the accepted key's id.
pub const KEY_NOTE: &str = "auth.key";

/// The note holding the accepted key's limits, as compact JSON.
pub const LIMITS_NOTE: &str = "auth.limits";

/// What every key starts with.
pub const KEY_PREFIX: &str = "sk-orch-";

/// The length of a key's id, in hex digits.
pub const ID_LEN: usize = 12;

/// The length of a key's secret, in hex digits.
pub const SECRET_LEN: usize = 48;

/// The length of a hash: a SHA-256 in hex digits.
pub const HASH_LEN: usize = 64;

/// The most bytes of a model name a refusal repeats.
pub const MAX_MODEL_IN_MESSAGE: usize = 256;

/// What an absent record's hash is compared with, so that an unknown id
/// costs the same work as a known one.
const DUMMY_HASH: &[u8; HASH_LEN] =
    b"0000000000000000000000000000000000000000000000000000000000000000";

/// The windows of the usage counters: the unit's name and its length in
/// milliseconds.
pub const USAGE_WINDOWS: [(&str, u64); 3] =
    [("minute", 60_000), ("hour", 3_600_000), ("day", 86_400_000)];

/// Whether `text` is `len` lowercase hex digits.
fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `id` has the shape of a key's id (12 lowercase hex digits).
pub fn is_key_id(id: &str) -> bool {
    is_lower_hex(id, ID_LEN)
}

/// The key a request presents with `Authorization: <header>`: the token
/// after a `Bearer` scheme (in any case), trimmed. `None` when there is no
/// header, another scheme, or an empty token: no key was provided.
pub fn bearer_token(header: Option<&str>) -> Option<&str> {
    let header = header?.trim();
    let (scheme, token) = header.split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A presented key of the right shape. Its `Debug` shows the id only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ApiKey<'a> {
    text: &'a str,
}

impl<'a> ApiKey<'a> {
    /// `text` as a key, if it has the shape `sk-orch-<id>-<secret>` (12,
    /// then 48 lowercase hex digits).
    pub fn parse(text: &'a str) -> Option<ApiKey<'a>> {
        let rest = text.strip_prefix(KEY_PREFIX)?;
        let (id, secret) = rest.split_once('-')?;
        (is_key_id(id) && is_lower_hex(secret, SECRET_LEN)).then_some(ApiKey { text })
    }

    /// The key's id.
    pub fn id(&self) -> &'a str {
        &self.text[KEY_PREFIX.len()..KEY_PREFIX.len() + ID_LEN]
    }

    /// The hash of the key ([`hash_key`]).
    pub fn hash(&self) -> String {
        hash_key(self.text)
    }
}

impl fmt::Debug for ApiKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// The lowercase hex SHA-256 of `key`'s text: what a record's `hash` (a
/// declared key's `sha256`) holds.
pub fn hash_key(key: &str) -> String {
    format!("{:x}", Sha256::digest(key.as_bytes()))
}

/// Whether `a` and `b` are equal, in a time that depends only on their
/// lengths (inputs of different lengths are unequal at once): every byte
/// pair is compared, the differences accumulated.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b) {
        // `black_box` keeps the compiler from stopping at the first
        // difference.
        difference = std::hint::black_box(difference | (x ^ y));
    }
    difference == 0
}

/// The store key of the record of the key `id`: `key:<id>`.
pub fn record_key(id: &str) -> String {
    ["key:", id].concat()
}

/// A key as the stage checks it: a store record, or a key declared in the
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The lowercase hex SHA-256 of the whole key.
    pub hash: String,
    /// Who the key belongs to: the request's principal.
    pub principal: String,
    /// The models the key may use; empty: every model.
    pub models: Vec<String>,
    /// The key's limits, as compact JSON text of an object; `None`: none
    /// given (an empty object included).
    pub limits: Option<String>,
    /// When the key stops working, in unix seconds.
    pub expires_at: Option<u64>,
    /// Whether the key is turned off.
    pub disabled: bool,
}

/// Why a record (or a declared key) is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(String);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RecordError {}

/// A record as stored: every field the stage reads, each optional (a
/// `null` counts as absent); the others are ignored.
#[derive(Deserialize)]
struct StoredRecord {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    hash: Option<String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    limits: Option<serde_json::Value>,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    disabled: Option<bool>,
}

impl KeyRecord {
    /// The record of the key `id`, from the JSON the store holds. Lenient
    /// about fields it does not read; strict about those it does.
    ///
    /// # Errors
    ///
    /// A [`RecordError`] when the value is not a JSON object of the right
    /// shape: no `hash` of 64 hex digits, no non-empty `principal`, an
    /// `id` other than `id`, `limits` not an object, a field of the wrong
    /// type.
    pub fn parse(id: &str, json: &[u8]) -> Result<KeyRecord, RecordError> {
        let stored: StoredRecord = serde_json::from_slice(json)
            .map_err(|e| RecordError(format!("not a key record: {e}")))?;
        if let Some(stored_id) = &stored.id
            && stored_id != id
        {
            return Err(RecordError("the record's `id` is another key's".into()));
        }
        KeyRecord::new(
            stored.hash.as_deref().unwrap_or_default(),
            stored.principal.unwrap_or_default(),
            stored.models.unwrap_or_default(),
            stored.limits,
            stored.expires_at,
            stored.disabled.unwrap_or(false),
        )
    }

    /// A record from its parts, checked: `hash` is 64 hex digits (in any
    /// case; kept lowercase), `principal` is not empty, `limits` (`null`
    /// or `{}`: none) is an object.
    ///
    /// # Errors
    ///
    /// A [`RecordError`] naming the field at fault.
    pub fn new(
        hash: &str,
        principal: String,
        models: Vec<String>,
        limits: Option<serde_json::Value>,
        expires_at: Option<u64>,
        disabled: bool,
    ) -> Result<KeyRecord, RecordError> {
        let hash = hash.to_ascii_lowercase();
        if !is_lower_hex(&hash, HASH_LEN) {
            return Err(RecordError(
                "the hash is not a SHA-256 in hex (64 hex digits)".into(),
            ));
        }
        if principal.trim().is_empty() {
            return Err(RecordError("the principal is empty".into()));
        }
        let limits = match limits {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(limits)) if limits.is_empty() => None,
            Some(limits @ serde_json::Value::Object(_)) => Some(limits.to_string()),
            Some(_) => return Err(RecordError("`limits` is not an object".into())),
        };
        Ok(KeyRecord {
            hash,
            principal,
            models,
            limits,
            expires_at,
            disabled,
        })
    }

    /// Whether the key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// Whether the key has expired at `now` (unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// Why a presented key was not accepted. For the log only: the client is
/// told [`INCORRECT_KEY_MESSAGE`] whatever the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No record for the id.
    Unknown,
    /// The key's hash is not the record's.
    WrongSecret,
    /// The record is disabled.
    Disabled,
    /// The record has expired.
    Expired,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denied::Unknown => "no such key",
            Denied::WrongSecret => "wrong secret",
            Denied::Disabled => "key disabled",
            Denied::Expired => "key expired",
        })
    }
}

/// Check `key` against its `record` (`None`: none found) at `now` (unix
/// seconds): the record if the key is accepted. The key is hashed and the
/// hash compared in constant time even without a record (against a dummy),
/// so an unknown id takes the same work as a wrong secret.
///
/// # Errors
///
/// Why the key is not accepted.
pub fn verify<'r>(
    key: &ApiKey<'_>,
    record: Option<&'r KeyRecord>,
    now: u64,
) -> Result<&'r KeyRecord, Denied> {
    let presented = key.hash();
    let expected = record.map_or(&DUMMY_HASH[..], |r| r.hash.as_bytes());
    let matches = constant_time_eq(presented.as_bytes(), expected);
    let record = record.ok_or(Denied::Unknown)?;
    if !matches {
        Err(Denied::WrongSecret)
    } else if record.disabled {
        Err(Denied::Disabled)
    } else if record.expired(now) {
        Err(Denied::Expired)
    } else {
        Ok(record)
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The refusal text for a model the key may not use (the model's name cut
/// to [`MAX_MODEL_IN_MESSAGE`] bytes).
pub fn model_refusal_message(model: &str) -> String {
    format!(
        "This key may not use the model `{}`.",
        cut(model, MAX_MODEL_IN_MESSAGE)
    )
}

/// The usage counters of one request of the key `id` that ended at
/// `now` (since the unix epoch) and used `tokens` tokens: for each unit of
/// [`USAGE_WINDOWS`], `usage:<id>:requests:<unit>:<index>` by 1, then for
/// each unit `usage:<id>:tokens:<unit>:<index>` by `tokens`, where
/// `<index>` is `now` in milliseconds divided by the unit's length and each
/// window lasts one unit. No limits.
pub fn usage_counters(id: &str, now: Duration, tokens: u64) -> Vec<Counter> {
    let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
    [("requests", 1), ("tokens", tokens)]
        .into_iter()
        .flat_map(|(what, delta)| {
            USAGE_WINDOWS.iter().map(move |&(unit, period_ms)| Counter {
                // Pushed piece by piece: `format!` costs several times
                // more in wasm, and every request counts six.
                key: [
                    "usage:",
                    id,
                    ":",
                    what,
                    ":",
                    unit,
                    ":",
                    itoa::Buffer::new().format(now_ms / period_ms),
                ]
                .concat(),
                delta,
                window: Duration::from_millis(period_ms),
                limit: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789ab";
    const SECRET: &str = "00112233445566778899aabbccddeeff0011223344556677";

    fn key_text() -> String {
        format!("{KEY_PREFIX}{ID}-{SECRET}")
    }

    fn record(hash: &str) -> KeyRecord {
        KeyRecord::new(hash, "alice".into(), Vec::new(), None, None, false).unwrap()
    }

    #[test]
    fn hash_key_is_hex_sha256() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hash_key(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn bearer_scheme_in_any_case_trimmed() {
        assert_eq!(bearer_token(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer_token(Some("  bEaReR \t abc  ")), Some("abc"));
        assert_eq!(bearer_token(Some("BEARER\tabc")), Some("abc"));
        for header in [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer   "),
            Some("Basic abc"),
            Some("abc"),
        ] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
    }

    #[test]
    fn keys_have_one_shape() {
        let text = key_text();
        let key = ApiKey::parse(&text).unwrap();
        assert_eq!(key.id(), ID);
        assert_eq!(key.hash(), hash_key(&text));
        let debug = format!("{key:?}");
        assert!(debug.contains(ID) && !debug.contains(SECRET), "{debug}");

        let bad = [
            String::new(),
            format!("sk-{ID}-{SECRET}"),
            format!("{KEY_PREFIX}{}-{SECRET}", ID.to_uppercase()),
            format!("{KEY_PREFIX}{ID}-{}", SECRET.to_uppercase()),
            format!("{KEY_PREFIX}{ID}{SECRET}"),
            format!("{KEY_PREFIX}{ID}-{SECRET}0"),
            format!("{KEY_PREFIX}{ID}-{}", &SECRET[1..]),
            format!("{KEY_PREFIX}{}-{SECRET}", &ID[1..]),
            format!("{KEY_PREFIX}0123456789ag-{SECRET}"),
            format!("{KEY_PREFIX}{ID}-{SECRET} "),
            format!("{KEY_PREFIX}{ID}-{}é", &SECRET[2..]),
        ];
        for text in &bad {
            assert!(ApiKey::parse(text).is_none(), "{text:?}");
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_inputs() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"xbc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc", b""));
    }

    #[test]
    fn verify_accepts_only_a_live_key_with_the_right_hash() {
        let text = key_text();
        let key = ApiKey::parse(&text).unwrap();
        let good = record(&hash_key(&text));
        assert_eq!(verify(&key, Some(&good), 100), Ok(&good));
        // A hash written in capitals is the same hash.
        let upper = record(&hash_key(&text).to_uppercase());
        assert_eq!(verify(&key, Some(&upper), 100), Ok(&upper));

        assert_eq!(verify(&key, None, 100), Err(Denied::Unknown));
        let other = record(&hash_key("sk-orch-something-else"));
        assert_eq!(verify(&key, Some(&other), 100), Err(Denied::WrongSecret));
        let disabled = KeyRecord {
            disabled: true,
            ..good.clone()
        };
        assert_eq!(verify(&key, Some(&disabled), 100), Err(Denied::Disabled));
        let expiring = KeyRecord {
            expires_at: Some(100),
            ..good.clone()
        };
        assert_eq!(verify(&key, Some(&expiring), 99), Ok(&expiring));
        assert_eq!(verify(&key, Some(&expiring), 100), Err(Denied::Expired));
        // A wrong secret says so before the record's state is looked at.
        let both = KeyRecord {
            disabled: true,
            ..other
        };
        assert_eq!(verify(&key, Some(&both), 100), Err(Denied::WrongSecret));
    }

    #[test]
    fn records_parse_leniently_but_read_fields_are_checked() {
        let hash = hash_key(&key_text());
        let json = format!(
            r#"{{"id":"{ID}","hash":"{hash}","principal":"alice","name":"CI",
                "models":["gpt-4o-mini"],"limits":{{"tokens_per_day":100000, "requests_per_minute":60}},
                "expires_at":1893456000,"disabled":false,"created_at":1765000000,"future":{{"x":[1]}}}}"#
        );
        let parsed = KeyRecord::parse(ID, json.as_bytes()).unwrap();
        assert_eq!(parsed.hash, hash);
        assert_eq!(parsed.principal, "alice");
        assert_eq!(parsed.models, ["gpt-4o-mini"]);
        let limits: serde_json::Value =
            serde_json::from_str(parsed.limits.as_deref().unwrap()).unwrap();
        assert_eq!(
            limits,
            serde_json::json!({"requests_per_minute": 60, "tokens_per_day": 100000})
        );
        assert!(!parsed.limits.as_deref().unwrap().contains(' '), "compact");
        assert_eq!(parsed.expires_at, Some(1_893_456_000));
        assert!(!parsed.disabled);
        assert!(parsed.allows_model("gpt-4o-mini") && !parsed.allows_model("gpt-4o"));

        let minimal =
            format!(r#"{{"hash":"{hash}","principal":"bob","models":null,"limits":{{}}}}"#);
        let parsed = KeyRecord::parse(ID, minimal.as_bytes()).unwrap();
        assert!(parsed.allows_model("anything"));
        assert_eq!(
            (
                parsed.models.len(),
                parsed.limits,
                parsed.expires_at,
                parsed.disabled
            ),
            (0, None, None, false)
        );

        let bad = [
            "not json".to_string(),
            "[]".into(),
            r#"{"principal":"bob"}"#.into(),
            r#"{"hash":"abc","principal":"bob"}"#.into(),
            format!(r#"{{"hash":"{hash}"}}"#),
            format!(r#"{{"hash":"{hash}","principal":" "}}"#),
            format!(r#"{{"id":"ffffffffffff","hash":"{hash}","principal":"bob"}}"#),
            format!(r#"{{"hash":"{hash}","principal":"bob","limits":[1]}}"#),
            format!(r#"{{"hash":"{hash}","principal":"bob","expires_at":-1}}"#),
            format!(r#"{{"hash":"{hash}","principal":"bob","disabled":"no"}}"#),
            format!(r#"{{"hash":"{hash}","principal":"bob","models":"gpt-4o"}}"#),
        ];
        for json in &bad {
            assert!(KeyRecord::parse(ID, json.as_bytes()).is_err(), "{json}");
        }
    }

    #[test]
    fn the_model_refusal_cuts_long_names() {
        assert_eq!(
            model_refusal_message("gpt-4o"),
            "This key may not use the model `gpt-4o`."
        );
        let long = "é".repeat(200);
        let message = model_refusal_message(&long);
        assert_eq!(
            message,
            format!("This key may not use the model `{}`.", "é".repeat(128))
        );
        assert_eq!(cut("aé", 2), "a");
    }

    #[test]
    fn usage_counters_are_epoch_aligned_windows() {
        let now = Duration::from_millis(90_061_000); // 1 day, 1 hour, 1 minute, 1 s
        let counters = usage_counters(ID, now, 42);
        let keys: Vec<&str> = counters.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "usage:0123456789ab:requests:minute:1501",
                "usage:0123456789ab:requests:hour:25",
                "usage:0123456789ab:requests:day:1",
                "usage:0123456789ab:tokens:minute:1501",
                "usage:0123456789ab:tokens:hour:25",
                "usage:0123456789ab:tokens:day:1",
            ]
        );
        let deltas: Vec<i64> = counters.iter().map(|c| c.delta).collect();
        assert_eq!(deltas, [1, 1, 1, 42, 42, 42]);
        let windows: Vec<u64> = counters.iter().map(|c| c.window.as_secs()).collect();
        assert_eq!(windows, [60, 3600, 86_400, 60, 3600, 86_400]);
        assert!(counters.iter().all(|c| c.limit.is_none()));
    }
}
