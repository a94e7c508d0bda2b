//! The stage itself: the rules of [`Config`] reserved in `process` and
//! settled in `finish`, behind the SDK's [`Stage`] trait.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use orchestrator_plugin::config::ConfigError;
use orchestrator_plugin::store::{Counter, Store, StoreError, Window};
use orchestrator_plugin::{
    GenerationParams, InitError, Outcome, Refusal, RefusalKind, Request, Stage, StageError, log,
};
use serde::Deserialize;

use crate::{
    By, KEY_COUNTERS, KEY_RULE, Kind, Limit, MAX_COUNTERS, OnStoreError, RESERVED_NOTE, Reserved,
    Rule, STORE_ERROR_NOTE, Unit, format_duration, key_rule, valid_rule_name,
};

/// The `ratelimit` stage's configuration (the `config` table of its
/// `[stages.<name>]` section).
///
/// ```toml
/// [stages.ratelimit]
/// capabilities = { stores = ["limits"], headers = ["x-team"], client_address = true }
/// config = { default_max_tokens = 1024, rules = [
///     { name = "per_user", requests_per_minute = 60, tokens_per_minute = 100000 },
///     { name = "per_team", by = "header:x-team", tokens_per_day = 5000000 },
///     { name = "per_ip", by = "client_address", requests_per_second = 20 },
///     { name = "everyone", by = "global", requests_per_second = 500, on_store_error = "deny" },
/// ] }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The store that holds the counters (granted in
    /// `capabilities.stores`). Default `limits`.
    pub store: String,
    /// The completion tokens reserved for a request whose client set no
    /// `max_tokens` (nor `max_completion_tokens`); 0 (the default): the
    /// backend's `max_tokens` limit, the most it may generate.
    pub default_max_tokens: u32,
    /// The rules, each counted apart; none (the default): only a key's
    /// own limits (the note `auth.limits`) apply.
    pub rules: Vec<RuleConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "limits".into(),
            default_max_tokens: 0,
            rules: Vec::new(),
        }
    }
}

/// One rule of [`Config::rules`]: a table in the TOML list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Its name, 1 to 64 lower-case ASCII letters, digits, `_` and `-`:
    /// the refusal's `policy`, the start of its counter keys. Required.
    pub name: String,
    /// What it counts by: `principal` (the default), `model`,
    /// `client_address`, `header:<name>` (lower case; the header granted
    /// in `capabilities.headers`) or `global`; see [`By`].
    #[serde(default = "default_by")]
    pub by: String,
    /// At most this many requests a second.
    pub requests_per_second: Option<u64>,
    /// At most this many requests a minute.
    pub requests_per_minute: Option<u64>,
    /// At most this many requests an hour.
    pub requests_per_hour: Option<u64>,
    /// At most this many requests a day.
    pub requests_per_day: Option<u64>,
    /// At most this many requests in 30 days.
    pub requests_per_month: Option<u64>,
    /// At most this many tokens (prompt and completion) a second.
    pub tokens_per_second: Option<u64>,
    /// At most this many tokens a minute.
    pub tokens_per_minute: Option<u64>,
    /// At most this many tokens an hour.
    pub tokens_per_hour: Option<u64>,
    /// At most this many tokens a day.
    pub tokens_per_day: Option<u64>,
    /// At most this many tokens in 30 days.
    pub tokens_per_month: Option<u64>,
    /// `allow` (the default): a request goes through when the store
    /// fails; `deny`: it fails with 503.
    #[serde(default)]
    pub on_store_error: OnStoreError,
}

fn default_by() -> String {
    "principal".into()
}

impl RuleConfig {
    /// The limits set, requests first, shortest window first.
    fn limits(&self) -> Vec<Limit> {
        let set = [
            (Kind::Requests, Unit::Second, self.requests_per_second),
            (Kind::Requests, Unit::Minute, self.requests_per_minute),
            (Kind::Requests, Unit::Hour, self.requests_per_hour),
            (Kind::Requests, Unit::Day, self.requests_per_day),
            (Kind::Requests, Unit::Month, self.requests_per_month),
            (Kind::Tokens, Unit::Second, self.tokens_per_second),
            (Kind::Tokens, Unit::Minute, self.tokens_per_minute),
            (Kind::Tokens, Unit::Hour, self.tokens_per_hour),
            (Kind::Tokens, Unit::Day, self.tokens_per_day),
            (Kind::Tokens, Unit::Month, self.tokens_per_month),
        ];
        set.into_iter()
            .filter_map(|(kind, unit, max)| max.map(|max| Limit { kind, unit, max }))
            .collect()
    }

    /// The checked rule.
    ///
    /// # Errors
    ///
    /// What is wrong, without the rule's name (the caller adds it).
    fn check(self) -> Result<Rule, String> {
        if !valid_rule_name(&self.name) {
            return Err(
                "`name` must be 1 to 64 lower-case ASCII letters, digits, `_` and `-`".into(),
            );
        }
        if self.name == KEY_RULE {
            return Err(format!(
                "the name `{KEY_RULE}` is reserved for the limits of the caller's key \
                 (the note `auth.limits`)"
            ));
        }
        let by = By::parse(&self.by)?;
        let limits = self.limits();
        if let Some(zero) = limits.iter().find(|limit| limit.max == 0) {
            return Err(format!(
                "a limit is at least 1 (`{}` is 0; leave a limit out for none)",
                zero.name()
            ));
        }
        if limits.is_empty() {
            let names: Vec<String> = Limit::names().map(|(name, _, _)| name).collect();
            return Err(format!(
                "no limit; set at least one of {}",
                names.join(", ")
            ));
        }
        Ok(Rule {
            name: self.name,
            by,
            limits,
            on_store_error: self.on_store_error,
        })
    }
}

/// The `ratelimit` stage: reserves each request's worst case against
/// every rule in `process` (refusing with 429 when a window is full) and
/// settles it to the real usage in `finish`; see the crate's docs.
#[derive(Debug, Clone)]
pub struct Ratelimit {
    store: String,
    default_max_tokens: u32,
    rules: Vec<Rule>,
    /// Now, in milliseconds since the Unix epoch.
    clock: fn() -> u64,
}

/// The wall clock, in milliseconds since the Unix epoch (0 for a clock
/// set before it).
fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// One counter of a request: the rule and limit it counts for, its key
/// and its window.
#[derive(Debug)]
struct Slot<'a> {
    rule: &'a Rule,
    limit: Limit,
    key: String,
    /// The window's number.
    window: u64,
    /// Milliseconds from the moment of the slot to its window's end.
    reset_ms: u64,
}

/// The counters of `rules` for `request` at the moment `at_ms`, in the
/// order of the rules and of their limits.
fn slots<'a>(rules: &[&'a Rule], request: &dyn Request, at_ms: u64) -> Vec<Slot<'a>> {
    let mut slots = Vec::new();
    for &rule in rules {
        let by = rule.by.kind();
        let subject = rule.by.subject(request);
        for &limit in &rule.limits {
            let window = limit.unit.window(at_ms);
            slots.push(Slot {
                rule,
                limit,
                key: crate::counter_key(&rule.name, &by, &subject, limit, window),
                window,
                reset_ms: limit.unit.reset_ms(at_ms),
            });
        }
    }
    slots
}

/// What is left of `limit` at `value`, floored at 0.
fn remaining(limit: Limit, value: i64) -> u64 {
    let left = i128::from(limit.max) - i128::from(value);
    u64::try_from(left.max(0)).unwrap_or(u64::MAX)
}

impl Stage for Ratelimit {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        if config.store.trim().is_empty() {
            return Err(ConfigError::for_key("store", "must name a store").into());
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(config.rules.len());
        for (at, rule) in config.rules.into_iter().enumerate() {
            let label = if rule.name.is_empty() {
                format!("rule {} (no `name`)", at + 1)
            } else {
                format!("rule `{}`", rule.name)
            };
            let rule = rule
                .check()
                .map_err(|error| ConfigError::for_key("rules", format!("{label}: {error}")))?;
            if rules.iter().any(|r| r.name == rule.name) {
                return Err(ConfigError::for_key(
                    "rules",
                    format!("{label}: a rule of that name comes before it"),
                )
                .into());
            }
            rules.push(rule);
        }
        let counters: usize = rules.iter().map(|rule| rule.limits.len()).sum();
        if counters > MAX_COUNTERS - KEY_COUNTERS {
            return Err(ConfigError::for_key(
                "rules",
                format!(
                    "{counters} limits in all; at most {} (a request's counters go to the \
                     store in one call of at most {MAX_COUNTERS}, {KEY_COUNTERS} kept for a \
                     key's own limits)",
                    MAX_COUNTERS - KEY_COUNTERS
                ),
            )
            .into());
        }
        Ok(Ratelimit {
            store: config.store,
            default_max_tokens: config.default_max_tokens,
            rules,
            clock: system_ms,
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let key = key_rule(request);
        let rules: Vec<&Rule> = self.rules.iter().chain(key.as_ref()).collect();
        if rules.is_empty() {
            return Ok(());
        }
        let now = (self.clock)();
        // The parameters are read once: a token rule needs them for the
        // worst case and then to cap the completion.
        let params = rules
            .iter()
            .any(|rule| rule.has(Kind::Tokens))
            .then(|| request.params());
        let tokens = params
            .as_ref()
            .map_or(0, |params| self.worst_case(request, params));
        let slots = slots(&rules, request, now);
        let delta = i64::try_from(tokens).unwrap_or(i64::MAX);
        let counters: Vec<Counter> = slots
            .iter()
            .map(|slot| Counter {
                key: slot.key.clone(),
                delta: match slot.limit.kind {
                    Kind::Requests => 1,
                    Kind::Tokens => delta,
                },
                window: Duration::from_millis(slot.limit.unit.period_ms()),
                limit: Some(slot.limit.store_limit()),
            })
            .collect();
        let windows = match self.apply(&counters) {
            Ok(windows) => windows,
            // A store that is not there or not granted is a mistake in the
            // configuration, not an outage: it fails the request.
            Err(error @ (StoreError::NoSuchStore | StoreError::AccessDenied)) => {
                return Err(StageError::Config(format!(
                    "rate limit store `{}`: {error}",
                    self.store
                )));
            }
            Err(error) => return self.store_failed(request, &rules, &error),
        };
        if windows.iter().all(|window| window.applied) {
            request.set_note(RESERVED_NOTE, &Reserved { tokens, at_ms: now }.note());
            if let Some(params) = params.filter(|_| tokens > 0) {
                cap_completion(request, params, self.default_max_tokens);
            }
            set_headers(request, &slots, &windows, None);
            return Ok(());
        }
        let blocking = blocking(&slots, &counters, &windows);
        set_headers(request, &slots, &windows, Some(blocking));
        request.refuse(refusal(
            &slots[blocking],
            &counters[blocking],
            &windows[blocking],
        ));
        Ok(())
    }

    fn finish(&self, request: &dyn Request, outcome: &Outcome) {
        let Some(note) = request.note(RESERVED_NOTE) else {
            return;
        };
        let reserved: Reserved = match note.parse() {
            Ok(reserved) => reserved,
            Err(error) => {
                log::warn(
                    "cannot settle the reservation",
                    &[("note", &RESERVED_NOTE), ("error", &error)],
                );
                return;
            }
        };
        let used = if outcome.answered_early {
            0
        } else {
            u64::from(outcome.usage.prompt_tokens) + u64::from(outcome.usage.completion_tokens)
        };
        if used == reserved.tokens {
            return;
        }
        let delta = i128::from(used) - i128::from(reserved.tokens);
        let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        let key = key_rule(request);
        let rules: Vec<&Rule> = self.rules.iter().chain(key.as_ref()).collect();
        let now = (self.clock)();
        let counters: Vec<Counter> = slots(&rules, request, reserved.at_ms)
            .into_iter()
            // Only a window still open: a settle never lands in another.
            .filter(|slot| {
                slot.limit.kind == Kind::Tokens && slot.limit.unit.window(now) == slot.window
            })
            .map(|slot| Counter {
                key: slot.key,
                delta,
                window: Duration::from_millis(slot.limit.unit.period_ms()),
                limit: None,
            })
            .collect();
        if counters.is_empty() {
            return;
        }
        if let Err(error) = self.apply(&counters) {
            log::warn(
                "rate limit store unavailable: the reservation is not settled",
                &[
                    ("store", &self.store),
                    ("error", &error),
                    ("reserved", &reserved.tokens),
                    ("used", &used),
                ],
            );
        }
    }
}

/// A client that set no `max_tokens` gets `default_max_tokens` (when set)
/// as its `max_tokens`, so the backend cannot generate past what was
/// reserved. Without `default_max_tokens` nothing is sent: the backend's
/// `max_tokens_limit` is reserved, which a model may not take as a
/// `max_tokens` (more than its context, or than its own cap).
fn cap_completion(request: &dyn Request, mut params: GenerationParams, default_max_tokens: u32) {
    if default_max_tokens == 0
        || params.max_tokens.is_some()
        || params.max_completion_tokens.is_some()
    {
        return;
    }
    params.max_tokens = Some(default_max_tokens);
    request.set_params(&params);
}

impl Ratelimit {
    /// The request's worst case in tokens: the prompt's estimate and the
    /// completion's reserve.
    fn worst_case(&self, request: &dyn Request, params: &GenerationParams) -> u64 {
        // The host's estimate: the chat is not copied into the plugin.
        let prompt = request.prompt_estimate();
        let completion = crate::completion_tokens(
            params,
            self.default_max_tokens,
            request.route().max_tokens_limit,
        );
        prompt.saturating_add(completion)
    }

    /// `counters` in one store call, a window for each.
    fn apply(&self, counters: &[Counter]) -> Result<Vec<Window>, StoreError> {
        let windows = Store::open(&self.store)?.windows(counters)?;
        if windows.len() != counters.len() {
            return Err(StoreError::Other(format!(
                "the store answered {} windows for {} counters",
                windows.len(),
                counters.len()
            )));
        }
        Ok(windows)
    }

    /// The store failed while reserving: fail the request if a rule in
    /// play says `deny`, else let it through with the note
    /// [`STORE_ERROR_NOTE`] and nothing to settle.
    fn store_failed(
        &self,
        request: &dyn Request,
        rules: &[&Rule],
        error: &StoreError,
    ) -> Result<(), StageError> {
        let deny = rules
            .iter()
            .find(|rule| rule.on_store_error == OnStoreError::Deny);
        let decision = if deny.is_some() { "denied" } else { "allowed" };
        log::warn(
            "rate limit store unavailable",
            &[
                ("store", &self.store),
                ("error", error),
                ("request", &decision),
            ],
        );
        match deny {
            // The store's error stays in the log: it may name hosts.
            Some(rule) => Err(StageError::UpstreamUnavailable(format!(
                "rate limit store unavailable: store `{}` failed and rule `{}` denies \
                 requests without it",
                self.store, rule.name
            ))),
            None => {
                request.set_note(STORE_ERROR_NOTE, "allowed");
                Ok(())
            }
        }
    }
}

/// The counter that refuses the request: among those that would pass
/// their limit, one the request is too large for whatever the window
/// holds if any, else the one whose window ends last (waiting for it lets
/// the request through).
fn blocking(slots: &[Slot<'_>], counters: &[Counter], windows: &[Window]) -> usize {
    let over: Vec<usize> = (0..counters.len())
        .filter(|&at| counters[at].passes_limit(windows[at].value))
        .collect();
    let latest = |candidates: &mut dyn Iterator<Item = usize>| {
        // The first of those that end last.
        candidates.max_by_key(|&at| (slots[at].reset_ms, std::cmp::Reverse(at)))
    };
    latest(
        &mut over
            .iter()
            .copied()
            .filter(|&at| counters[at].passes_limit(0)),
    )
    .or_else(|| latest(&mut over.iter().copied()))
    // The store refused without a counter over its limit (a counter
    // changed between its check and its answer): the longest wait.
    .or_else(|| latest(&mut (0..counters.len())))
    .unwrap_or(0)
}

/// The 429 of the counter `counter` in `slot`, whose window holds
/// `window.value`.
fn refusal(slot: &Slot<'_>, counter: &Counter, window: &Window) -> Refusal {
    let Slot {
        rule,
        limit,
        reset_ms,
        ..
    } = slot;
    let what = format!("{} per {}", limit.kind.name(), limit.unit.name());
    let (message, retry_after_ms) = if counter.passes_limit(0) {
        // No window ever takes it: waiting does not help.
        (
            format!(
                "Request too large for {what} (rule `{}`): limit {}, requested {}. \
                 Shorten the prompt or lower `max_tokens`.",
                rule.name, limit.max, counter.delta
            ),
            None,
        )
    } else {
        (
            format!(
                "Rate limit reached for {what} (rule `{}`): limit {}, used {}, requested {}. \
                 Try again in {}s.",
                rule.name,
                limit.max,
                window.value,
                counter.delta,
                reset_ms.div_ceil(1_000)
            ),
            Some(*reset_ms),
        )
    };
    Refusal {
        kind: RefusalKind::RateLimited,
        message,
        code: Some(limit.unit.refusal_code().into()),
        retry_after_ms,
        policy: Some(rule.name.clone()),
    }
}

/// Set `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: for each
/// kind the rules limit, the window with the fewest left (the later reset
/// among equals); the kind of the `blocking` counter reports it, with
/// nothing left.
fn set_headers(
    request: &dyn Request,
    slots: &[Slot<'_>],
    windows: &[Window],
    blocking: Option<usize>,
) {
    for kind in [Kind::Requests, Kind::Tokens] {
        let chosen = match blocking {
            Some(at) if slots[at].limit.kind == kind => Some((at, 0)),
            _ => slots
                .iter()
                .enumerate()
                .filter(|(_, slot)| slot.limit.kind == kind)
                .map(|(at, slot)| (at, remaining(slot.limit, windows[at].value)))
                .min_by_key(|&(at, left)| (left, std::cmp::Reverse(slots[at].reset_ms))),
        };
        let Some((at, left)) = chosen else {
            continue;
        };
        let slot = &slots[at];
        let (mut limit, mut remaining) = (itoa::Buffer::new(), itoa::Buffer::new());
        let limit = limit.format(slot.limit.max);
        let left = remaining.format(left);
        let reset = format_duration(slot.reset_ms);
        let values = [limit, left, reset.as_str()];
        for (header, value) in kind.headers().into_iter().zip(values) {
            if let Err(error) = request.set_response_header(header, value) {
                log::debug(
                    "response header refused",
                    &[("header", &header), ("error", &error)],
                );
            }
        }
    }
}

orchestrator_plugin::export_stage!(Ratelimit, finish);

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use orchestrator_plugin::config::from_pairs;
    use orchestrator_plugin::store::{self, Store};
    use orchestrator_plugin::testing::TestRequest;
    use orchestrator_plugin::{GenerationParams, OutcomeKind, Usage};

    use super::*;

    /// 20 s into a minute (and into an hour, a day and a 30-day month).
    const NOW: u64 = 1_700_000_000_000;

    thread_local! {
        static CLOCK: Cell<u64> = const { Cell::new(NOW) };
    }

    fn test_clock() -> u64 {
        CLOCK.with(Cell::get)
    }

    /// The stage as `init` builds it from these config pairs, on the
    /// test clock (at [`NOW`]), with empty stores.
    fn ratelimit(pairs: &[(&str, &str)]) -> Result<Ratelimit, String> {
        store::reset();
        CLOCK.with(|clock| clock.set(NOW));
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config: Config = from_pairs(pairs).map_err(|e| e.to_string())?;
        let mut stage = Ratelimit::init(config).map_err(|e| e.to_string())?;
        stage.clock = test_clock;
        Ok(stage)
    }

    fn rules(json: &str) -> Ratelimit {
        ratelimit(&[("rules", json)]).expect("valid config")
    }

    /// A request of `principal` whose worst case is `tokens`: an empty
    /// message (4 tokens) and `max_tokens` for the rest.
    fn request(principal: &str, tokens: u32) -> TestRequest {
        let request = TestRequest::new()
            .with_user("")
            .with_params(GenerationParams {
                max_tokens: Some(tokens - 4),
                ..GenerationParams::new("echo")
            });
        request.set_principal(principal);
        request
    }

    fn header(request: &TestRequest, name: &str) -> Option<String> {
        request
            .fields()
            .response_headers
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn counter(key: &str) -> Option<i64> {
        let value = Store::open("limits").unwrap().get(key).unwrap()?;
        Some(String::from_utf8(value).unwrap().parse().unwrap())
    }

    fn outcome(prompt_tokens: u32, completion_tokens: u32) -> Outcome {
        Outcome {
            kind: OutcomeKind::Answered,
            status: 200,
            usage: Usage {
                prompt_tokens,
                completion_tokens,
            },
            answered_early: false,
            streamed: false,
        }
    }

    const MINUTE: u64 = NOW / 60_000;

    #[test]
    fn the_request_after_the_limit_is_refused_with_when_to_retry() {
        let stage = rules(r#"[{"name": "per_user", "requests_per_minute": 3}]"#);
        for left in ["2", "1", "0"] {
            let request = request("alice", 100);
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None);
            assert_eq!(
                header(&request, "x-ratelimit-remaining-requests").as_deref(),
                Some(left)
            );
            assert_eq!(
                header(&request, "x-ratelimit-limit-requests").as_deref(),
                Some("3")
            );
            assert_eq!(
                header(&request, "x-ratelimit-reset-requests").as_deref(),
                Some("40s")
            );
            assert_eq!(header(&request, "x-ratelimit-limit-tokens"), None);
            assert_eq!(
                request.note(RESERVED_NOTE),
                Some(format!("0@{NOW}")),
                "no token limit, no tokens reserved"
            );
        }
        let key = format!("per_user:principal:alice:requests:minute:{MINUTE}");
        assert_eq!(counter(&key), Some(3));

        CLOCK.with(|clock| clock.set(NOW + 1_500));
        let fourth = request("alice", 100);
        stage.process(&fourth).unwrap();
        let refused = fourth.fields().refused.expect("refused");
        assert_eq!(refused.kind, RefusalKind::RateLimited);
        assert_eq!(refused.retry_after_ms, Some(38_500));
        assert_eq!(refused.policy.as_deref(), Some("per_user"));
        assert_eq!(refused.code.as_deref(), Some("rate_limit_exceeded"));
        assert_eq!(
            refused.message,
            "Rate limit reached for requests per minute (rule `per_user`): \
             limit 3, used 3, requested 1. Try again in 39s."
        );
        assert_eq!(
            header(&fourth, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(&fourth, "x-ratelimit-reset-requests").as_deref(),
            Some("39s")
        );
        assert_eq!(fourth.note(RESERVED_NOTE), None);
        assert_eq!(counter(&key), Some(3));

        // The next minute starts afresh.
        CLOCK.with(|clock| clock.set(NOW + 40_000));
        let next = request("alice", 100);
        stage.process(&next).unwrap();
        assert_eq!(next.fields().refused, None);
    }

    #[test]
    fn tokens_are_reserved_and_the_excess_refused() {
        let stage =
            rules(r#"[{"name": "tpm", "requests_per_minute": 100, "tokens_per_minute": 1000}]"#);
        for left in ["600", "200"] {
            let request = request("alice", 400);
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None);
            assert_eq!(request.note(RESERVED_NOTE), Some(format!("400@{NOW}")));
            assert_eq!(
                header(&request, "x-ratelimit-remaining-tokens").as_deref(),
                Some(left)
            );
            assert_eq!(
                header(&request, "x-ratelimit-limit-tokens").as_deref(),
                Some("1000")
            );
        }
        let third = request("alice", 400);
        stage.process(&third).unwrap();
        let refused = third.fields().refused.expect("refused");
        assert_eq!(
            refused.message,
            "Rate limit reached for tokens per minute (rule `tpm`): \
             limit 1000, used 800, requested 400. Try again in 40s."
        );
        assert_eq!(refused.retry_after_ms, Some(40_000));
        assert_eq!(
            header(&third, "x-ratelimit-remaining-tokens").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(&third, "x-ratelimit-remaining-requests").as_deref(),
            Some("98"),
            "the other kind as it stands"
        );
        // All or none: the refused request took no request either.
        let requests = format!("tpm:principal:alice:requests:minute:{MINUTE}");
        assert_eq!(counter(&requests), Some(2));
        let tokens = format!("tpm:principal:alice:tokens:minute:{MINUTE}");
        assert_eq!(counter(&tokens), Some(800));
        // A smaller request still fits.
        let small = request("alice", 200);
        stage.process(&small).unwrap();
        assert_eq!(small.fields().refused, None);
        assert_eq!(counter(&tokens), Some(1000));
    }

    #[test]
    fn a_request_too_large_for_a_window_is_told_so() {
        let stage = rules(r#"[{"name": "tpm", "tokens_per_minute": 1000}]"#);
        let request = request("alice", 1001);
        stage.process(&request).unwrap();
        let refused = request.fields().refused.expect("refused");
        assert_eq!(
            refused.message,
            "Request too large for tokens per minute (rule `tpm`): limit 1000, \
             requested 1001. Shorten the prompt or lower `max_tokens`."
        );
        assert_eq!(refused.retry_after_ms, None, "waiting would not help");
        assert_eq!(refused.policy.as_deref(), Some("tpm"));
    }

    #[test]
    fn the_worst_case_defaults_to_the_configured_then_the_backends_limit() {
        let stage = rules(r#"[{"name": "tpd", "tokens_per_day": 100000}]"#);
        // "hello" (2 tokens + 4) and the backend's 4096.
        let request = TestRequest::new().with_user("hello");
        stage.process(&request).unwrap();
        assert_eq!(request.note(RESERVED_NOTE), Some(format!("4102@{NOW}")));

        let stage = ratelimit(&[
            ("default_max_tokens", "500"),
            ("rules", r#"[{"name": "tpd", "tokens_per_day": 100000}]"#),
        ])
        .unwrap();
        let request = TestRequest::new().with_user("hello");
        stage.process(&request).unwrap();
        assert_eq!(request.note(RESERVED_NOTE), Some(format!("506@{NOW}")));
        let request = TestRequest::new()
            .with_user("hello")
            .with_params(GenerationParams {
                max_tokens: Some(50),
                max_completion_tokens: Some(70),
                ..GenerationParams::new("echo")
            });
        stage.process(&request).unwrap();
        assert_eq!(request.note(RESERVED_NOTE), Some(format!("76@{NOW}")));
    }

    #[test]
    fn finish_settles_the_reservation_to_the_usage() {
        let stage = rules(
            r#"[{"name": "tpm", "tokens_per_minute": 10000, "tokens_per_day": 50000, "requests_per_minute": 10}]"#,
        );
        let request = request("alice", 1000);
        stage.process(&request).unwrap();
        let minute = format!("tpm:principal:alice:tokens:minute:{MINUTE}");
        let day = format!("tpm:principal:alice:tokens:day:{}", NOW / 86_400_000);
        let requests = format!("tpm:principal:alice:requests:minute:{MINUTE}");
        assert_eq!(counter(&minute), Some(1000));
        assert_eq!(counter(&day), Some(1000));

        CLOCK.with(|clock| clock.set(NOW + 5_000));
        stage.finish(&request, &outcome(30, 120));
        assert_eq!(counter(&minute), Some(150));
        assert_eq!(counter(&day), Some(150));
        assert_eq!(counter(&requests), Some(1), "requests are not given back");

        // A usage above the reservation is charged too.
        let over = self::request("alice", 100);
        stage.process(&over).unwrap();
        stage.finish(&over, &outcome(90, 60));
        assert_eq!(counter(&minute), Some(300));
    }

    #[test]
    fn an_early_answer_costs_no_tokens_and_a_refusal_settles_nothing() {
        let stage = rules(r#"[{"name": "tpm", "tokens_per_minute": 1000}]"#);
        let key = format!("tpm:principal:alice:tokens:minute:{MINUTE}");
        let cached = request("alice", 600);
        stage.process(&cached).unwrap();
        let early = Outcome {
            answered_early: true,
            ..outcome(5, 50)
        };
        stage.finish(&cached, &early);
        assert_eq!(counter(&key), Some(0));

        let first = request("alice", 900);
        stage.process(&first).unwrap();
        let second = request("alice", 900);
        stage.process(&second).unwrap();
        assert!(second.fields().refused.is_some());
        let refused = Outcome {
            kind: OutcomeKind::Refused,
            status: 429,
            ..outcome(0, 0)
        };
        stage.finish(&second, &refused);
        assert_eq!(counter(&key), Some(900), "the refusal reserved nothing");
    }

    #[test]
    fn a_settle_after_the_window_ended_changes_nothing() {
        let stage = rules(r#"[{"name": "tpm", "tokens_per_minute": 1000}]"#);
        let request = request("alice", 600);
        stage.process(&request).unwrap();
        CLOCK.with(|clock| clock.set(NOW + 40_000));
        stage.finish(&request, &outcome(10, 10));
        let old = format!("tpm:principal:alice:tokens:minute:{MINUTE}");
        let new = format!("tpm:principal:alice:tokens:minute:{}", MINUTE + 1);
        assert_eq!(counter(&old), Some(600));
        assert_eq!(counter(&new), None);
    }

    #[test]
    fn principals_are_counted_apart() {
        let stage = rules(r#"[{"name": "per_user", "requests_per_minute": 1}]"#);
        for who in ["alice", "bob"] {
            let request = request(who, 10);
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None, "{who}");
        }
        let again = request("alice", 10);
        stage.process(&again).unwrap();
        assert!(again.fields().refused.is_some());

        // No principal: `-`, shared by every anonymous request.
        let anonymous = TestRequest::new().with_user("hi");
        stage.process(&anonymous).unwrap();
        let key = format!("per_user:principal:-:requests:minute:{MINUTE}");
        assert_eq!(counter(&key), Some(1));
        // An odd principal is hashed.
        let odd = request("user:with spaces", 10);
        stage.process(&odd).unwrap();
        let key = format!(
            "per_user:principal:{}:requests:minute:{MINUTE}",
            crate::subject(Some("user:with spaces"))
        );
        assert_eq!(counter(&key), Some(1));
    }

    #[test]
    fn a_header_a_model_an_address_or_everyone_is_a_subject() {
        let stage = rules(
            r#"[
                {"name": "team", "by": "header:x-team", "requests_per_hour": 2},
                {"name": "model", "by": "model", "requests_per_hour": 100},
                {"name": "ip", "by": "client_address", "requests_per_hour": 100},
                {"name": "all", "by": "global", "requests_per_hour": 100}
            ]"#,
        );
        let hour = NOW / 3_600_000;
        let team = |team: &str| {
            TestRequest::new()
                .with_user("hi")
                .with_header("X-Team", team)
                .with_client_address("203.0.113.7:5000")
        };
        for _ in 0..2 {
            let request = team("red");
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None);
        }
        let blue = team("blue");
        stage.process(&blue).unwrap();
        assert_eq!(blue.fields().refused, None);
        let red = team("red");
        stage.process(&red).unwrap();
        assert_eq!(
            red.fields().refused.and_then(|r| r.policy).as_deref(),
            Some("team")
        );
        assert_eq!(
            counter(&format!("team:header:x-team:red:requests:hour:{hour}")),
            Some(2)
        );
        assert_eq!(
            counter(&format!("model:model:echo:requests:hour:{hour}")),
            Some(3)
        );
        assert_eq!(
            counter(&format!(
                "ip:client_address:203.0.113.7:requests:hour:{hour}"
            )),
            Some(3)
        );
        assert_eq!(
            counter(&format!("all:global:*:requests:hour:{hour}")),
            Some(3)
        );
        // Without the header: `-`.
        let none = TestRequest::new().with_user("hi");
        stage.process(&none).unwrap();
        assert_eq!(
            counter(&format!("team:header:x-team:-:requests:hour:{hour}")),
            Some(1)
        );
    }

    #[test]
    fn a_keys_limits_come_from_the_auth_notes() {
        let stage = ratelimit(&[]).unwrap();
        let keyed = || {
            TestRequest::new()
                .with_user("hi")
                .with_note("auth.key", "key_123")
                .with_note(
                    "auth.limits",
                    r#"{"requests_per_day": 2, "tokens_per_day": 100000}"#,
                )
        };
        for _ in 0..2 {
            let request = keyed();
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None);
        }
        let third = keyed();
        stage.process(&third).unwrap();
        let refused = third.fields().refused.expect("refused");
        assert_eq!(refused.policy.as_deref(), Some("key"));
        assert_eq!(refused.code.as_deref(), Some("insufficient_quota"));
        let day = NOW / 86_400_000;
        assert_eq!(
            counter(&format!("key:key:key_123:requests:day:{day}")),
            Some(2)
        );
        // Settled under the same key.
        let request = keyed();
        CLOCK.with(|clock| clock.set(NOW + 86_400_000));
        stage.process(&request).unwrap();
        stage.finish(&request, &outcome(3, 4));
        assert_eq!(
            counter(&format!("key:key:key_123:tokens:day:{}", day + 1)),
            Some(7)
        );

        // Limits without a key id, or a note that is not JSON: no limit.
        let stage = ratelimit(&[]).unwrap();
        for request in [
            TestRequest::new().with_note("auth.limits", r#"{"requests_per_day": 0}"#),
            TestRequest::new()
                .with_note("auth.key", "k")
                .with_note("auth.limits", "nonsense"),
        ] {
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None);
            assert_eq!(request.note(RESERVED_NOTE), None);
        }
    }

    #[test]
    fn a_day_window_used_up_is_a_spent_quota() {
        let stage = rules(r#"[{"name": "daily", "requests_per_day": 1}]"#);
        stage.process(&request("alice", 10)).unwrap();
        let second = request("alice", 10);
        stage.process(&second).unwrap();
        let refused = second.fields().refused.expect("refused");
        assert_eq!(refused.code.as_deref(), Some("insufficient_quota"));
        // 1 700 000 000 000 ms is 22:13:20 UTC: 1 h 46 min 40 s to go.
        assert_eq!(refused.retry_after_ms, Some(6_400_000));
        assert_eq!(
            header(&second, "x-ratelimit-reset-requests").as_deref(),
            Some("1h46m40s")
        );
    }

    #[test]
    fn the_window_with_the_fewest_left_names_the_headers() {
        let stage = rules(
            r#"[
                {"name": "burst", "requests_per_second": 5, "requests_per_minute": 3},
                {"name": "other", "by": "global", "requests_per_hour": 1000}
            ]"#,
        );
        let request = request("alice", 10);
        stage.process(&request).unwrap();
        assert_eq!(
            header(&request, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            header(&request, "x-ratelimit-remaining-requests").as_deref(),
            Some("2")
        );
        assert_eq!(
            header(&request, "x-ratelimit-reset-requests").as_deref(),
            Some("40s")
        );
        // Within the same second, the minute's window fills first: it
        // refuses, and its wait is the one reported.
        CLOCK.with(|clock| clock.set(NOW + 750));
        for _ in 0..2 {
            stage.process(&self::request("alice", 10)).unwrap();
        }
        let fourth = self::request("alice", 10);
        stage.process(&fourth).unwrap();
        let refused = fourth.fields().refused.expect("refused");
        assert_eq!(refused.policy.as_deref(), Some("burst"));
        assert_eq!(refused.retry_after_ms, Some(39_250));
        assert_eq!(
            header(&fourth, "x-ratelimit-reset-requests").as_deref(),
            Some("40s")
        );
    }

    #[test]
    fn a_store_failure_allows_or_denies_as_the_rules_say() {
        let config = |deny: &str| {
            format!(
                r#"[{{"name": "per_user", "requests_per_minute": 5}},
                    {{"name": "all", "by": "global", "requests_per_minute": 50, "on_store_error": "{deny}"}}]"#
            )
        };
        // A counter that holds something else than a number fails the
        // store call, as a store that is down does.
        let break_store = || {
            let key = format!("all:global:*:requests:minute:{MINUTE}");
            Store::open("limits").unwrap().set(&key, b"x").unwrap();
        };
        let stage = rules(&config("allow"));
        break_store();
        let request = request("alice", 10);
        stage.process(&request).unwrap();
        assert_eq!(request.fields().refused, None);
        assert_eq!(request.note(STORE_ERROR_NOTE).as_deref(), Some("allowed"));
        assert_eq!(request.note(RESERVED_NOTE), None, "nothing to settle");
        stage.finish(&request, &outcome(1, 1));

        let stage = rules(&config("deny"));
        break_store();
        let err = stage.process(&self::request("alice", 10)).unwrap_err();
        let StageError::UpstreamUnavailable(message) = err else {
            panic!("not upstream-unavailable: {err:?}");
        };
        assert_eq!(
            message,
            "rate limit store unavailable: store `limits` failed and rule `all` denies \
             requests without it"
        );
    }

    #[test]
    fn without_rules_nothing_is_counted() {
        let stage = ratelimit(&[]).unwrap();
        let request = request("alice", 10);
        stage.process(&request).unwrap();
        assert!(request.metadata().is_empty());
        assert!(request.fields().response_headers.is_empty());
        stage.finish(&request, &outcome(1, 1));
    }

    #[test]
    fn bad_rules_fail_init_naming_the_rule() {
        let err = |rules: &str| ratelimit(&[("rules", rules)]).unwrap_err();
        assert_eq!(
            err(r#"[{"name": "empty"}]"#),
            "config key `rules`: rule `empty`: no limit; set at least one of \
             requests_per_second, requests_per_minute, requests_per_hour, requests_per_day, \
             requests_per_month, tokens_per_second, tokens_per_minute, tokens_per_hour, \
             tokens_per_day, tokens_per_month"
        );
        let text = err(r#"[{"name": "odd", "by": "user", "requests_per_day": 1}]"#);
        assert!(
            text.starts_with("config key `rules`: rule `odd`: `by` must be `principal`"),
            "{text}"
        );
        let text = err(r#"[{"name": "odd", "by": "header:X-Team", "requests_per_day": 1}]"#);
        assert!(text.contains("lower-case header name"), "{text}");
        let text = err(r#"[{"name": "Bad Name", "requests_per_day": 1}]"#);
        assert!(
            text.starts_with("config key `rules`: rule `Bad Name`: `name`"),
            "{text}"
        );
        let text = err(r#"[{"name": "", "requests_per_day": 1}]"#);
        assert!(
            text.starts_with("config key `rules`: rule 1 (no `name`)"),
            "{text}"
        );
        let text = err(r#"[{"name": "key", "requests_per_day": 1}]"#);
        assert!(text.contains("reserved"), "{text}");
        let text =
            err(r#"[{"name": "a", "requests_per_day": 1}, {"name": "a", "tokens_per_day": 1}]"#);
        assert!(text.contains("rule `a`: a rule of that name"), "{text}");
        let text = err(r#"[{"requests_per_day": 1}]"#);
        assert!(text.contains("missing field `name`"), "{text}");
        let text = err(r#"[{"name": "a", "requests_per_year": 1}]"#);
        assert!(text.contains("unknown field `requests_per_year`"), "{text}");
        let text = err(r#"[{"name": "a", "requests_per_day": 1, "on_store_error": "panic"}]"#);
        assert!(text.contains("unknown variant `panic`"), "{text}");
        let text = ratelimit(&[("store", " ")]).unwrap_err();
        assert_eq!(text, "config key `store`: must name a store");
        // Ten rules of ten limits: more than one store call takes.
        let full = r#"{"requests_per_second": 1, "requests_per_minute": 1, "requests_per_hour": 1,
            "requests_per_day": 1, "requests_per_month": 1, "tokens_per_second": 1,
            "tokens_per_minute": 1, "tokens_per_hour": 1, "tokens_per_day": 1,
            "tokens_per_month": 1"#;
        let many: Vec<String> = (0..10)
            .map(|n| format!("{full}, \"name\": \"r{n}\"}}"))
            .collect();
        let text = err(&format!("[{}]", many.join(",")));
        assert!(text.contains("100 limits in all; at most 90"), "{text}");
        let nine = format!("[{}]", many[..9].join(","));
        ratelimit(&[("rules", &nine)]).unwrap();
    }
}
