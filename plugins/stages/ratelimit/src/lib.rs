//! The `ratelimit` stage: request and token limits over fixed windows of
//! a second to a month (a day or a month is a quota), per caller, model,
//! header value, client address or for everyone, kept in a store that
//! every replica naming it shares.
//!
//! # Rules and windows
//!
//! Each rule of the stage's `rules` setting ([`RuleConfig`]) says what it
//! counts by ([`By`]: the principal by default) and its limits
//! ([`Limit`]): `requests_per_<unit>` and `tokens_per_<unit>`, the unit a
//! `second`, `minute`, `hour`, `day` or `month` of 30 days ([`Unit`]).
//! An `auth` stage before this one may add a rule of its own for the
//! caller's key: with the notes `auth.key` (the key's id) and
//! `auth.limits` (a JSON object with the same limit names) the request
//! also counts against an implicit rule named `key` ([`key_rule`]).
//!
//! Windows are fixed and aligned on the Unix epoch: the window of a
//! moment `t` (milliseconds of wall clock) for a unit of period `p` is
//! number `t / p`, the same on every replica, and it ends at
//! `(t / p + 1) * p`. Each rule, subject, kind, unit and window is one
//! counter of the store, under the key
//! `<rule>:<by>:<subject>:<requests|tokens>:<unit>:<window>`
//! ([`counter_key`]; the subject made safe by [`subject`]), which expires
//! one period after it was started.
//!
//! # Reserve, then settle
//!
//! The tokens a request will use are known only once it is answered, but
//! the decision to let it run is taken before. So `process` reserves the
//! request's worst case and `finish` settles it:
//!
//! - **reserve** (`process`): one request, and in tokens the prompt's
//!   estimate (the host's [`Request::prompt_estimate`], which does not
//!   copy the chat into the plugin) plus the most the completion may take
//!   ([`completion_tokens`]: the client's `max_completion_tokens` or
//!   `max_tokens`, else the stage's `default_max_tokens`, else the
//!   backend's limit). Every counter of every rule goes to the store in
//!   one [`Store::windows`](orchestrator_plugin::store::Store::windows)
//!   call, each with its limit: either all are added or none is. When
//!   all are, the note `ratelimit.reserved` records the tokens reserved
//!   and the moment, `<tokens>@<ms>` ([`Reserved`]); when none is, the
//!   request is refused with 429 naming the rule, the limit and when to
//!   try again.
//! - **settle** (`finish`): the real usage is known (none for an answer a
//!   cache gave early; for a stream the client cut short, the tokens
//!   delivered). Each tokens counter the request reserved gets
//!   `used - reserved` added, in one store call: the keys are computed
//!   again from the note's moment and the request's subjects, so it is
//!   the very counter of the very window the reservation went to. A
//!   window that has ended since is left alone. Requests are never given
//!   back: a request that ran, ran.
//!
//! # Why it cannot overshoot
//!
//! The store checks every limit and adds every delta in one atomic
//! operation (a Lua script on Redis), so concurrent requests, on one
//! replica or on many, can never together take a counter past its limit,
//! and a request that one rule refuses takes nothing from the others.
//! While a request runs, its worst case is already counted; the settle
//! moves the reservation to the real usage only within the window it was
//! taken in, and a refund never starts a counter, so it never lands in a
//! later window. The completion cannot pass its reserve (the backend
//! stops at `max_tokens`). The prompt is an estimate (a quarter of its
//! bytes, plus 4 per message: generous for English and code); a prompt
//! that tokenizes denser can settle above its reservation, and the
//! counter then ends over its limit by that much: the requests that
//! follow wait for the window's end, none is ever reserved past it.
//!
//! # Store failures, answers and headers
//!
//! A store that fails lets the request through, with the note
//! `ratelimit.store_error` = `allowed` and nothing to settle, unless a
//! rule in play says `on_store_error = "deny"`: the request then fails
//! with 503. Either way the failure is logged.
//!
//! The answer (or the refusal) carries OpenAI's headers
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the window
//! of each kind with the fewest left ([`format_duration`] writes the
//! reset). A refusal's code is `rate_limit_exceeded`, or
//! `insufficient_quota` for a day or month window, and its `policy` is the
//! rule's name.
//!
//! The pure logic is here; [`Ratelimit`] puts it behind the SDK's
//! [`Stage`](orchestrator_plugin::Stage) trait.

mod stage;

pub use stage::{Config, Ratelimit, RuleConfig};

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use orchestrator_plugin::{GenerationParams, Request};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The note of a reservation: `<tokens>@<ms>` ([`Reserved`]).
pub const RESERVED_NOTE: &str = "ratelimit.reserved";

/// The note set (to `allowed`) when the store failed and the request went
/// through unlimited.
pub const STORE_ERROR_NOTE: &str = "ratelimit.store_error";

/// The note with the id of the caller's key, set by an `auth` stage.
pub const KEY_NOTE: &str = "auth.key";

/// The note with the limits of the caller's key (a JSON object with
/// [`Limit::name`]s as keys), set by an `auth` stage.
pub const KEY_LIMITS_NOTE: &str = "auth.limits";

/// The name of the implicit rule of a key's limits (reserved: no
/// configured rule may take it).
pub const KEY_RULE: &str = "key";

/// The most counters one store call takes.
pub const MAX_COUNTERS: usize = 100;

/// The counters kept for a key's limits: the configured rules together
/// have at most [`MAX_COUNTERS`] minus these.
pub const KEY_COUNTERS: usize = Unit::ALL.len() * 2;

/// The length of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// 1 000 ms.
    Second,
    /// 60 000 ms.
    Minute,
    /// 3 600 000 ms.
    Hour,
    /// 86 400 000 ms.
    Day,
    /// 30 days: 2 592 000 000 ms.
    Month,
}

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 5] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Month,
    ];

    /// Its name, in limit names and counter keys: `minute`.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Month => "month",
        }
    }

    /// Its length in milliseconds.
    pub fn period_ms(self) -> u64 {
        match self {
            Unit::Second => 1_000,
            Unit::Minute => 60_000,
            Unit::Hour => 3_600_000,
            Unit::Day => 86_400_000,
            Unit::Month => 2_592_000_000,
        }
    }

    /// The number of the window the moment `now_ms` falls in.
    pub fn window(self, now_ms: u64) -> u64 {
        now_ms / self.period_ms()
    }

    /// Milliseconds from `now_ms` to the end of its window (at least 1).
    pub fn reset_ms(self, now_ms: u64) -> u64 {
        let end = (self.window(now_ms) + 1).saturating_mul(self.period_ms());
        end.saturating_sub(now_ms).max(1)
    }

    /// The refusal code of a window of this unit used up:
    /// `insufficient_quota` for a day or a month (a quota: waiting a
    /// little does not help), `rate_limit_exceeded` otherwise.
    pub fn refusal_code(self) -> &'static str {
        match self {
            Unit::Day | Unit::Month => "insufficient_quota",
            Unit::Second | Unit::Minute | Unit::Hour => "rate_limit_exceeded",
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Requests: each counts 1.
    Requests,
    /// Tokens: prompt and completion.
    Tokens,
}

impl Kind {
    /// Its name, in limit names, counter keys and headers: `requests`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
        }
    }

    /// OpenAI's rate-limit headers of this kind: `x-ratelimit-limit-`,
    /// `x-ratelimit-remaining-` and `x-ratelimit-reset-` followed by its
    /// name.
    pub fn headers(self) -> [&'static str; 3] {
        match self {
            Kind::Requests => [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            Kind::Tokens => [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        }
    }
}

/// One limit of a rule: at most `max` of `kind` per window of `unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// What it counts.
    pub kind: Kind,
    /// Its window.
    pub unit: Unit,
    /// The most a window may count.
    pub max: u64,
}

impl Limit {
    /// Every limit name, `requests_per_second` to `tokens_per_month`, with
    /// its kind and unit.
    pub fn names() -> impl Iterator<Item = (String, Kind, Unit)> {
        [Kind::Requests, Kind::Tokens].into_iter().flat_map(|kind| {
            Unit::ALL
                .into_iter()
                .map(move |unit| (Limit::name_of(kind, unit), kind, unit))
        })
    }

    fn name_of(kind: Kind, unit: Unit) -> String {
        format!("{}_per_{}", kind.name(), unit.name())
    }

    /// The limit's name in the configuration: `tokens_per_minute`.
    pub fn name(self) -> String {
        Limit::name_of(self.kind, self.unit)
    }

    /// The limit as a store counter's limit (a limit past `i64::MAX` is
    /// as good as none).
    pub fn store_limit(self) -> i64 {
        i64::try_from(self.max).unwrap_or(i64::MAX)
    }
}

/// What a rule counts by: whose requests share its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum By {
    /// The principal an auth stage set (`by = "principal"`, the default).
    Principal,
    /// The model the client asked for (`by = "model"`).
    Model,
    /// The client's IP address, without its port (`by =
    /// "client_address"`; the stage must be granted
    /// `capabilities.client_address`).
    ClientAddress,
    /// The value of a request header (`by = "header:x-team"`; the stage
    /// must be granted the header in `capabilities.headers`).
    Header(String),
    /// Every request alike (`by = "global"`).
    Global,
    /// The caller's key, from the note `auth.key` (only the implicit
    /// `key` rule counts by it).
    Key,
}

impl By {
    /// Read a rule's `by` setting.
    ///
    /// # Errors
    ///
    /// What is wrong with it.
    pub fn parse(text: &str) -> Result<By, String> {
        match text {
            "principal" => Ok(By::Principal),
            "model" => Ok(By::Model),
            "client_address" => Ok(By::ClientAddress),
            "global" => Ok(By::Global),
            _ => match text.strip_prefix("header:") {
                Some(name) if valid_header_name(name) => Ok(By::Header(name.to_string())),
                Some(name) => Err(format!(
                    "`by`: `{name}` is not a lower-case header name \
                     (letters, digits and `-`, at most 64 bytes)"
                )),
                None => Err(format!(
                    "`by` must be `principal`, `model`, `client_address`, \
                     `header:<name>` or `global`, not `{text}`"
                )),
            },
        }
    }

    /// Its part of a counter key: `principal`, `header:x-team`, ...
    pub fn kind(&self) -> String {
        match self {
            By::Principal => "principal".into(),
            By::Model => "model".into(),
            By::ClientAddress => "client_address".into(),
            By::Header(name) => format!("header:{name}"),
            By::Global => "global".into(),
            By::Key => "key".into(),
        }
    }

    /// The request's subject for this rule, as it goes into a counter key
    /// (see [`subject`]): `*` for [`By::Global`].
    pub fn subject(&self, request: &dyn Request) -> String {
        match self {
            By::Principal => subject(request.principal().as_deref()),
            By::Model => subject(Some(&request.params().model)),
            By::ClientAddress => {
                subject(request.client_address().map(|a| client_ip(&a)).as_deref())
            }
            By::Header(name) => subject(request.header(name).as_deref()),
            By::Global => "*".into(),
            By::Key => subject(request.note(KEY_NOTE).as_deref()),
        }
    }
}

/// Whether `name` is a header name as a rule writes it: 1 to 64 bytes of
/// lower-case ASCII letters, digits and `-`.
fn valid_header_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `name` is a rule name: 1 to 64 bytes of lower-case ASCII
/// letters, digits, `_` and `-` (it is a refusal's `policy`, a metric
/// label).
pub fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// What a rule does when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Let the request through, unlimited (the default).
    #[default]
    Allow,
    /// Fail the request with 503 (`upstream-unavailable`).
    Deny,
}

/// A rule, checked: its name, what it counts by, its limits (at least
/// one) and what it does when the store fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name: the refusal's `policy` and the start of its counter keys.
    pub name: String,
    /// What it counts by.
    pub by: By,
    /// Its limits, requests first, shortest window first.
    pub limits: Vec<Limit>,
    /// What it does when the store fails.
    pub on_store_error: OnStoreError,
}

impl Rule {
    /// Whether the rule has a limit of `kind`.
    pub fn has(&self, kind: Kind) -> bool {
        self.limits.iter().any(|limit| limit.kind == kind)
    }
}

/// The implicit rule `key` of the caller's key: its id from the note
/// `auth.key`, its limits from the note `auth.limits`; `None` without
/// both notes or without a limit. A note that is not a JSON object is
/// logged and ignored (the key is then not limited), and so is a value
/// that is not a whole number of 1 or more.
pub fn key_rule(request: &dyn Request) -> Option<Rule> {
    let limits = request.note(KEY_LIMITS_NOTE)?;
    request.note(KEY_NOTE).filter(|key| !key.is_empty())?;
    let limits = match parse_key_limits(&limits) {
        Ok(limits) => limits,
        Err(error) => {
            orchestrator_plugin::log::warn(
                "ignoring the key's limits",
                &[("note", &KEY_LIMITS_NOTE), ("error", &error)],
            );
            return None;
        }
    };
    (!limits.is_empty()).then(|| Rule {
        name: KEY_RULE.into(),
        by: By::Key,
        limits,
        on_store_error: OnStoreError::Allow,
    })
}

/// The limits of the note `auth.limits`: a JSON object whose keys
/// [`Limit::names`] name limits (others, and `null` values, are skipped).
///
/// # Errors
///
/// The text is not a JSON object, or a limit is not a whole number of 1
/// or more.
pub fn parse_key_limits(text: &str) -> Result<Vec<Limit>, String> {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let mut limits = Vec::new();
    for (name, kind, unit) in Limit::names() {
        match object.get(&name) {
            None | Some(serde_json::Value::Null) => {}
            Some(value) => {
                let max = value
                    .as_u64()
                    .filter(|max| *max > 0)
                    .ok_or_else(|| format!("`{name}` is not a whole number of 1 or more"))?;
                limits.push(Limit { kind, unit, max });
            }
        }
    }
    Ok(limits)
}

/// A subject as it goes into a counter key: `-` for none (no principal,
/// the header absent or empty); the text itself if it is at most 64 bytes
/// of `[A-Za-z0-9._@-]`; else its hex SHA-256 (so a key never holds a
/// colon, a space or an unbounded value).
pub fn subject(raw: Option<&str>) -> String {
    match raw {
        None | Some("") => "-".into(),
        Some(text)
            if text.len() <= 64
                && text.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-')
                }) =>
        {
            text.to_string()
        }
        Some(text) => sha256_hex(text),
    }
}

/// The lower-case hex SHA-256 of `text`.
fn sha256_hex(text: &str) -> String {
    format!("{:x}", Sha256::digest(text.as_bytes()))
}

/// The IP address of a client address (`ip:port`, `[v6]:port`), without
/// the port; an IPv4 address mapped into IPv6 is written as IPv4. Text
/// that is no address is returned as it is.
pub fn client_ip(address: &str) -> String {
    let address = address.trim();
    match address.parse::<SocketAddr>() {
        Ok(socket) => socket.ip().to_canonical().to_string(),
        Err(_) => match address.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical().to_string(),
            Err(_) => address.to_string(),
        },
    }
}

/// The store key of a counter:
/// `<rule>:<by>:<subject>:<requests|tokens>:<unit>:<window>`.
pub fn counter_key(rule: &str, by: &str, subject: &str, limit: Limit, window: u64) -> String {
    // Pushed piece by piece: `format!` costs several times more in wasm,
    // and every request makes a key per limit (twice, with its settle).
    let mut digits = itoa::Buffer::new();
    let window = digits.format(window);
    let (kind, unit) = (limit.kind.name(), limit.unit.name());
    let mut key = String::with_capacity(
        rule.len() + by.len() + subject.len() + kind.len() + unit.len() + window.len() + 5,
    );
    for (at, part) in [rule, by, subject, kind, unit, window]
        .into_iter()
        .enumerate()
    {
        if at > 0 {
            key.push(':');
        }
        key.push_str(part);
    }
    key
}

/// The completion tokens reserved: the client's `max_completion_tokens`,
/// else its `max_tokens`, else `default_max_tokens` (when not 0), else
/// the backend's `max_tokens` limit `route_limit`; never more than
/// `route_limit` when there is one (not 0), which is the most the backend
/// generates.
pub fn completion_tokens(
    params: &GenerationParams,
    default_max_tokens: u32,
    route_limit: u32,
) -> u64 {
    let asked = params
        .max_completion_tokens
        .or(params.max_tokens)
        .or((default_max_tokens > 0).then_some(default_max_tokens))
        .unwrap_or(route_limit);
    let tokens = if route_limit > 0 {
        asked.min(route_limit)
    } else {
        asked
    };
    u64::from(tokens)
}

/// A duration as OpenAI's `x-ratelimit-reset-*` headers (and Go) write
/// it: `250ms` under a second; else whole seconds, rounded up, as `6s`,
/// `6m0s` or `1h2m3s`.
pub fn format_duration(ms: u64) -> String {
    let mut digits = itoa::Buffer::new();
    if ms < 1_000 {
        return if ms == 0 {
            "0s".into()
        } else {
            [digits.format(ms), "ms"].concat()
        };
    }
    let seconds = ms.div_ceil(1_000);
    let (hours, minutes, seconds) = (seconds / 3_600, seconds % 3_600 / 60, seconds % 60);
    let mut text = String::with_capacity(16);
    if hours > 0 {
        text.push_str(digits.format(hours));
        text.push('h');
    }
    if hours > 0 || minutes > 0 {
        text.push_str(digits.format(minutes));
        text.push('m');
    }
    text.push_str(digits.format(seconds));
    text.push('s');
    text
}

/// A reservation, as the note [`RESERVED_NOTE`] holds it:
/// `<tokens>@<ms>`, the tokens reserved and the moment (Unix
/// milliseconds) whose windows they went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// The tokens reserved in every tokens window.
    pub tokens: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl Reserved {
    /// The note's text, `<tokens>@<ms>` (what [`Reserved::from_str`]
    /// reads).
    pub fn note(&self) -> String {
        let mut digits = itoa::Buffer::new();
        let mut text = String::with_capacity(32);
        text.push_str(digits.format(self.tokens));
        text.push('@');
        text.push_str(digits.format(self.at_ms));
        text
    }
}

/// A note that is not `<tokens>@<ms>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadReservation(pub String);

impl fmt::Display for BadReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not `<tokens>@<ms>`", self.0)
    }
}

impl std::error::Error for BadReservation {}

impl FromStr for Reserved {
    type Err = BadReservation;

    fn from_str(text: &str) -> Result<Reserved, BadReservation> {
        let bad = || BadReservation(text.to_string());
        let (tokens, at_ms) = text.split_once('@').ok_or_else(bad)?;
        Ok(Reserved {
            tokens: tokens.parse().map_err(|_| bad())?,
            at_ms: at_ms.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_aligned_on_the_epoch() {
        assert_eq!(Unit::Minute.window(119_999), 1);
        assert_eq!(Unit::Minute.window(120_000), 2);
        assert_eq!(Unit::Minute.reset_ms(119_999), 1);
        assert_eq!(Unit::Minute.reset_ms(120_000), 60_000);
        assert_eq!(Unit::Month.period_ms(), 30 * 86_400_000);
        assert_eq!(Unit::Day.reset_ms(86_400_000 * 3 + 1), 86_399_999);
        let names: Vec<String> = Limit::names().map(|(name, _, _)| name).collect();
        assert_eq!(names.len(), KEY_COUNTERS);
        assert_eq!(names[0], "requests_per_second");
        assert_eq!(names[9], "tokens_per_month");
    }

    #[test]
    fn durations_are_written_as_openai_does() {
        for (ms, text) in [
            (0, "0s"),
            (1, "1ms"),
            (250, "250ms"),
            (999, "999ms"),
            (1_000, "1s"),
            (1_001, "2s"),
            (59_500, "1m0s"),
            (360_000, "6m0s"),
            (3_723_000, "1h2m3s"),
            (3_600_000, "1h0m0s"),
            (2_592_000_000, "720h0m0s"),
        ] {
            assert_eq!(format_duration(ms), text, "{ms} ms");
        }
    }

    #[test]
    fn subjects_are_kept_or_hashed() {
        assert_eq!(subject(None), "-");
        assert_eq!(subject(Some("")), "-");
        assert_eq!(subject(Some("alice@example.com")), "alice@example.com");
        assert_eq!(subject(Some("team-a_1.x")), "team-a_1.x");
        let hashed = subject(Some("a b"));
        assert_eq!(hashed.len(), 64);
        assert!(hashed.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            subject(Some("abc:")),
            sha256_hex("abc:"),
            "a colon would shift the key's fields"
        );
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let long = "x".repeat(65);
        assert_eq!(subject(Some(&long)), sha256_hex(&long));
        assert_eq!(subject(Some(&long[..64])), long[..64]);
    }

    #[test]
    fn client_addresses_lose_their_port() {
        assert_eq!(client_ip("203.0.113.7:51234"), "203.0.113.7");
        assert_eq!(client_ip("[2001:db8::1]:443"), "2001:db8::1");
        assert_eq!(client_ip("[::ffff:198.51.100.2]:80"), "198.51.100.2");
        assert_eq!(client_ip("198.51.100.2"), "198.51.100.2");
        assert_eq!(client_ip("not an address"), "not an address");
    }

    #[test]
    fn by_is_read_and_checked() {
        assert_eq!(By::parse("principal"), Ok(By::Principal));
        assert_eq!(By::parse("global"), Ok(By::Global));
        assert_eq!(By::parse("header:x-team"), Ok(By::Header("x-team".into())));
        assert_eq!(By::Header("x-team".into()).kind(), "header:x-team");
        let err = By::parse("header:X-Team").unwrap_err();
        assert!(err.contains("lower-case header name"), "{err}");
        assert!(By::parse("header:").is_err());
        let err = By::parse("user").unwrap_err();
        assert!(err.contains("not `user`"), "{err}");
        assert!(valid_rule_name("per-user_2"));
        assert!(!valid_rule_name("Per-user"));
        assert!(!valid_rule_name(""));
        assert!(!valid_rule_name(&"a".repeat(65)));
    }

    #[test]
    fn keys_name_every_part() {
        let limit = Limit {
            kind: Kind::Tokens,
            unit: Unit::Minute,
            max: 10,
        };
        assert_eq!(
            counter_key("per_user", "principal", "alice", limit, 28_333_333),
            "per_user:principal:alice:tokens:minute:28333333"
        );
        assert_eq!(limit.name(), "tokens_per_minute");
        let huge = Limit {
            max: u64::MAX,
            ..limit
        };
        assert_eq!(huge.store_limit(), i64::MAX);
    }

    #[test]
    fn the_completion_reserve_follows_the_client_then_the_config_then_the_backend() {
        let mut params = GenerationParams::new("echo");
        assert_eq!(completion_tokens(&params, 0, 4096), 4096);
        assert_eq!(completion_tokens(&params, 512, 4096), 512);
        assert_eq!(completion_tokens(&params, 8192, 4096), 4096);
        assert_eq!(completion_tokens(&params, 0, 0), 0);
        params.max_tokens = Some(100);
        assert_eq!(completion_tokens(&params, 512, 4096), 100);
        params.max_completion_tokens = Some(200);
        assert_eq!(completion_tokens(&params, 512, 4096), 200);
        assert_eq!(completion_tokens(&params, 512, 0), 200);
    }

    #[test]
    fn key_limits_parse_from_json() {
        let limits =
            parse_key_limits(r#"{"requests_per_minute": 5, "tokens_per_day": null, "label": "x"}"#)
                .unwrap();
        assert_eq!(
            limits,
            [Limit {
                kind: Kind::Requests,
                unit: Unit::Minute,
                max: 5
            }]
        );
        assert!(parse_key_limits("{}").unwrap().is_empty());
        assert!(parse_key_limits("[1]").is_err());
        let err = parse_key_limits(r#"{"tokens_per_hour": -1}"#).unwrap_err();
        assert!(err.contains("tokens_per_hour"), "{err}");
    }

    #[test]
    fn reservations_read_back() {
        let reserved = Reserved {
            tokens: 4100,
            at_ms: 1_700_000_000_000,
        };
        assert_eq!(reserved.note(), "4100@1700000000000");
        assert_eq!("4100@1700000000000".parse(), Ok(reserved));
        for bad in ["", "4100", "x@1", "1@", "-1@2"] {
            assert!(bad.parse::<Reserved>().is_err(), "{bad}");
        }
    }
}
