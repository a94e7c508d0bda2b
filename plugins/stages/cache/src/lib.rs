//! The `cache` stage: an exact-match response cache, placed just before
//! the generating stage (`auth, rag, assemble, ratelimit, cache, inference,
//! post, stream`), so that it keys on the prompt the model would get.
//!
//! # The key
//!
//! A request's key is the hex SHA-256 of the request as the generating
//! stage would see it ([`key`]), from the host's
//! [`fingerprint`](Request::fingerprint) of it:
//!
//! - its [`Route`](orchestrator_plugin::Route): pipeline, backend and
//!   upstream model, so one provider's answer is never served for another
//!   (nor one pipeline's for another's, whose stages may differ);
//! - every generation parameter (model, temperature, stop sequences,
//!   seed, tool choice, response format, the client's unknown fields, ...);
//! - every message, whole: roles, text or parts, names, tool calls, tool
//!   results and their unknown fields;
//! - the tools offered.
//!
//! and, unless the stage is `shared`, the principal (the caller an auth
//! stage named, or its absence): by default callers never see each
//! other's answers. The fingerprint and the principal go into the hash
//! framed (see [`key`]) behind a version prefix, so two different
//! requests cannot encode alike. The
//! client's `stream` flag is not part of the request's fields, so a plain
//! and a streamed request share entries: a hit is answered early
//! ([`Request::answer`]), the generating stage is skipped, the stages
//! after it still run, and a streaming client gets the cached answer in
//! chunks through the streaming stages.
//!
//! # Entries
//!
//! An entry ([`Entry`], stored as JSON under `entry:<key>` with the
//! configured `ttl_seconds`) is the answer as the request finally held
//! it: completion, tool calls, refusal, finish reason and usage. The
//! stage's [`finish`](orchestrator_plugin::Stage::finish) stores it, off
//! the client's latency path, only for a request that was answered in full
//! by a generation (not refused, failed, cancelled, or answered early by a
//! stage) and whose entry fits in `max_entry_bytes`. Because the answer is
//! stored after the stages that follow the cache (`post` and its cleanup
//! included) and those stages run again on a hit, they should be
//! idempotent, as `post`'s cleanup is. An entry that does not parse counts
//! as a miss, and the next answer overwrites it.
//!
//! # Single flight
//!
//! When identical requests arrive together, only one generates
//! (`single_flight`, on by default). The lookup is one
//! `Store::get_or_claim`: the entry if there is one, else the lock
//! `lock:<key>`, claimed in the same atomic operation unless another
//! request holds it; the lock lives `lock_ms` at most (so a claimant that
//! never finishes cannot block the key for longer). The request that
//! claims it generates; its `finish` stores the entry and
//! deletes the lock, whether or not there was anything to store (so that
//! after a failed generation a waiter takes over at once). A request that
//! finds the lock held waits, looking again with a backoff (2 ms,
//! doubling, at most 50 ms): the entry appears and is served as a hit; or
//! the lock goes and the request claims it and generates itself; or
//! `wait_ms` passes and it generates without the lock. The owner deletes
//! the lock without checking it still holds it: an owner that outlived
//! `lock_ms` (60 s by default, longer than a request's 30 s deadline) may
//! delete a later claimant's lock, which costs one extra generation, never
//! a wrong answer.
//!
//! # `Cache-Control` and the response header
//!
//! The request's `Cache-Control` header (granted to the bundled stage by
//! default) is honoured ([`Directives`]): `no-store` skips the cache
//! altogether (no read, nothing stored); `no-cache` skips the read but
//! stores the fresh answer.
//!
//! The response carries `x-orchestrator-cache` ([`HEADER`]): `hit`, `miss`
//! or `bypass` ([`Status`]). A store that fails never fails the request:
//! the stage logs the error, sets the note `cache.error` and lets the
//! request through as a `bypass`, storing nothing.
//!
//! The notes: `cache.key` (the key, on a miss or `no-cache`: what `finish`
//! stores under), `cache.owner` (`1` when the request holds the lock),
//! `cache.waited_ms` (how long a request waited for an identical one) and
//! `cache.error`.
//!
//! The pure logic is here ([`key`], [`Directives`], [`Entry`]); [`Cache`]
//! puts it behind the SDK's [`Stage`](orchestrator_plugin::Stage) trait.

mod stage;

mod key;

pub use key::key;
pub use stage::{Cache, Config};

use orchestrator_plugin::{Request, ToolCall, Usage};
use serde::{Deserialize, Serialize};

/// The response header that says what the cache did.
pub const HEADER: &str = "x-orchestrator-cache";

/// The note holding the request's key, for `finish` to store under (set
/// on a miss and with `no-cache`).
pub const KEY_NOTE: &str = "cache.key";

/// The note set to `1` when the request holds the single-flight lock.
pub const OWNER_NOTE: &str = "cache.owner";

/// The note holding the message of a store error (the request was then a
/// `bypass`).
pub const ERROR_NOTE: &str = "cache.error";

/// The note holding how long, in milliseconds, the request waited for an
/// identical one in flight.
pub const WAITED_NOTE: &str = "cache.waited_ms";

/// The store key of the entry of `key`.
pub fn entry_key(key: &str) -> String {
    format!("entry:{key}")
}

/// The store key of the single-flight lock of `key`.
pub fn lock_key(key: &str) -> String {
    format!("lock:{key}")
}

/// What the stage did with a request: the value of [`HEADER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Answered from the cache.
    Hit,
    /// Not in the cache: generated, and stored when it ends.
    Miss,
    /// The cache was not read (`Cache-Control`, or a store error).
    Bypass,
}

impl Status {
    /// The header's value: `hit`, `miss` or `bypass`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Miss => "miss",
            Status::Bypass => "bypass",
        }
    }
}

/// The directives of a request's `Cache-Control` header the stage honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Directives {
    /// `no-store`: neither read nor store.
    pub no_store: bool,
    /// `no-cache`: do not read, but store the fresh answer.
    pub no_cache: bool,
}

impl Directives {
    /// Parse a `Cache-Control` value: comma-separated directives, names
    /// compared case-insensitively, any `=value` ignored, the others
    /// (`max-age=...`, unknown ones) ignored. `None` (no header) says
    /// nothing.
    pub fn parse(header: Option<&str>) -> Directives {
        let mut directives = Directives::default();
        for token in header.unwrap_or_default().split(',') {
            let name = token.split('=').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("no-store") {
                directives.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                directives.no_cache = true;
            }
        }
        directives
    }
}

/// A cached answer, as stored (JSON): what a hit sets on the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The answer's text.
    pub completion: String,
    /// The answer's tool calls.
    pub tool_calls: Vec<StoredCall>,
    /// The model's refusal, if it refused.
    pub refusal: Option<String>,
    /// Why generation stopped.
    pub finish_reason: String,
    /// The generation's token usage.
    pub usage: StoredUsage,
}

/// A tool call of an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCall {
    /// The call's id.
    pub id: String,
    /// The kind of tool (`function`, when the entry does not say).
    #[serde(default = "function_kind")]
    pub kind: String,
    /// The function's name.
    pub name: String,
    /// Its arguments, as the JSON text the model produced.
    pub arguments: String,
}

fn function_kind() -> String {
    "function".into()
}

/// The usage of an [`Entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredUsage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens of the completion.
    pub completion_tokens: u32,
}

impl Entry {
    /// The answer `request` holds, with `usage` (the outcome's final
    /// usage).
    pub fn of(request: &dyn Request, usage: Usage) -> Entry {
        Entry {
            completion: request.completion(),
            tool_calls: request
                .tool_calls()
                .into_iter()
                .map(|call| StoredCall {
                    id: call.id,
                    kind: call.kind,
                    name: call.name,
                    arguments: call.arguments,
                })
                .collect(),
            refusal: request.refusal(),
            finish_reason: request.finish_reason(),
            usage: StoredUsage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            },
        }
    }

    /// The entry stored as `bytes`, if they are one.
    pub fn parse(bytes: &[u8]) -> Option<Entry> {
        serde_json::from_slice(bytes).ok()
    }

    /// The entry as stored.
    pub fn to_json(&self) -> String {
        // Strings and integers only: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Set the entry's answer on `request` (not answering it yet).
    pub fn apply(&self, request: &dyn Request) {
        let calls: Vec<ToolCall> = self
            .tool_calls
            .iter()
            .map(|call| ToolCall {
                id: call.id.clone(),
                kind: call.kind.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            })
            .collect();
        request.set_completion(&self.completion);
        request.set_tool_calls(&calls);
        request.set_refusal(self.refusal.as_deref());
        request.set_finish_reason(&self.finish_reason);
        request.set_usage(Usage {
            prompt_tokens: self.usage.prompt_tokens,
            completion_tokens: self.usage.completion_tokens,
        });
    }
}

#[cfg(test)]
mod tests {
    use orchestrator_plugin::testing::TestRequest;
    use orchestrator_plugin::{Content, ContentPart, Message, Route, Tool};

    use super::*;

    fn base() -> TestRequest {
        TestRequest::new().with_system("Be brief.").with_user("Hi")
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(Directives::parse(None), Directives::default());
        assert_eq!(Directives::parse(Some("")), Directives::default());
        assert_eq!(
            Directives::parse(Some("max-age=0, No-Store")),
            Directives {
                no_store: true,
                no_cache: false
            }
        );
        assert_eq!(
            Directives::parse(Some(" NO-CACHE ,private")),
            Directives {
                no_store: false,
                no_cache: true
            }
        );
        assert_eq!(
            Directives::parse(Some("no-cache=\"x\",no-store")),
            Directives {
                no_store: true,
                no_cache: true
            }
        );
        // Names only, whole: no substring matches.
        assert_eq!(
            Directives::parse(Some("x-no-store, no-stored, no-cache-please")),
            Directives::default()
        );
    }

    #[test]
    fn the_key_is_stable_hex() {
        let a = key(&base(), false);
        assert_eq!(a.len(), 64);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_eq!(a, key(&base(), false));
        // Notes, headers, the stream flag and the answer are not part of it.
        let other = base()
            .streaming()
            .with_header("cache-control", "max-age=5")
            .with_completion("old");
        assert_eq!(a, key(&other, false));
    }

    #[test]
    fn every_part_of_the_request_changes_the_key() {
        let a = key(&base(), false);
        let mut variants: Vec<TestRequest> = Vec::new();
        let route = |change: fn(&mut Route)| {
            let mut route = base().route();
            change(&mut route);
            base().with_route(route)
        };
        variants.push(route(|r| r.backend = "other".into()));
        variants.push(route(|r| r.upstream_model = "other".into()));
        variants.push(route(|r| r.pipeline = "other".into()));
        let params = |change: fn(&mut orchestrator_plugin::GenerationParams)| {
            let mut params = base().params();
            change(&mut params);
            base().with_params(params)
        };
        variants.push(params(|p| p.model = "other".into()));
        variants.push(params(|p| p.temperature = Some(0.7)));
        variants.push(params(|p| p.seed = Some(1)));
        variants.push(params(|p| p.extra = r#"{"x":1}"#.into()));
        variants.push(base().with_stop(&["END"]));
        variants.push(base().with_user("Hi"));
        variants.push(TestRequest::new().with_system("Be brief.").with_user("Hi!"));
        variants.push(TestRequest::new().with_user("Be brief.").with_user("Hi"));
        let mut parts = Message::new("user", "");
        parts.content = Some(Content::Parts(vec![ContentPart::Text("Hi".into())]));
        variants.push(
            TestRequest::new()
                .with_system("Be brief.")
                .with_messages([parts]),
        );
        let mut named = Message::new("user", "Hi");
        named.name = Some("bob".into());
        variants.push(
            TestRequest::new()
                .with_system("Be brief.")
                .with_messages([named]),
        );
        let mut extra = Message::new("user", "Hi");
        extra.extra = r#"{"x":1}"#.into();
        variants.push(
            TestRequest::new()
                .with_system("Be brief.")
                .with_messages([extra]),
        );
        variants.push(base().with_tools([Tool::function("search")]));
        // Where one string ends and the next begins is part of the key.
        variants.push(base().with_stop(&["ab", "c"]));
        variants.push(base().with_stop(&["a", "bc"]));
        variants.push(route(|r| r.max_tokens_limit += 1));
        let mut calling = Message::new("assistant", "");
        calling.content = None;
        calling.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            name: "search".into(),
            arguments: "{}".into(),
        }];
        let mut result = Message::new("tool", "found");
        result.tool_call_id = Some("call_1".into());
        variants.push(base().with_messages([calling.clone()]));
        variants.push(base().with_messages([calling, result]));
        let keys: Vec<String> = variants.iter().map(|r| key(r, false)).collect();
        for (at, k) in keys.iter().enumerate() {
            assert_ne!(*k, a, "variant {at} keeps the key");
            assert!(
                !keys[..at].contains(k),
                "variant {at} collides with an earlier one"
            );
        }
    }

    #[test]
    fn the_principal_is_part_of_the_key_unless_shared() {
        let anonymous = base();
        let alice = base();
        alice.set_principal("alice");
        let bob = base();
        bob.set_principal("bob");
        let dash = base();
        dash.set_principal("-");
        let private: Vec<String> = [&anonymous, &alice, &bob, &dash]
            .iter()
            .map(|r| key(*r, false))
            .collect();
        for (at, k) in private.iter().enumerate() {
            assert!(!private[..at].contains(k), "{at} collides");
        }
        let shared = key(&alice, true);
        assert_eq!(shared, key(&bob, true));
        assert_eq!(shared, key(&anonymous, true));
        assert!(!private.contains(&shared));
    }

    #[test]
    fn an_entry_round_trips_through_the_request() {
        let request = TestRequest::new()
            .with_completion("hello")
            .with_tool_calls([ToolCall::function("c1", "search", r#"{"q":"x"}"#)]);
        request.set_refusal(Some("no"));
        request.set_finish_reason("tool_calls");
        let usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
        };
        let entry = Entry::of(&request, usage);
        let json = entry.to_json();
        assert!(json.contains(r#""tool_calls":[{"id":"c1","kind":"function","name":"search""#));
        let parsed = Entry::parse(json.as_bytes()).expect("parses");
        assert_eq!(parsed, entry);

        let target = TestRequest::new();
        parsed.apply(&target);
        let fields = target.fields();
        assert_eq!(fields.completion, "hello");
        assert_eq!(fields.tool_calls, request.tool_calls());
        assert_eq!(fields.refusal.as_deref(), Some("no"));
        assert_eq!(fields.finish_reason, "tool_calls");
        assert_eq!(fields.usage, usage);
        assert!(!fields.answered, "applying does not answer");
    }

    #[test]
    fn entries_that_do_not_parse_are_none() {
        assert_eq!(Entry::parse(b""), None);
        assert_eq!(Entry::parse(b"not json"), None);
        assert_eq!(Entry::parse(br#"{"completion":"x"}"#), None);
        // A call without a kind is a function call.
        let entry = Entry::parse(
            br#"{"completion":"","tool_calls":[{"id":"a","name":"f","arguments":"{}"}],
                "refusal":null,"finish_reason":"tool_calls",
                "usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        )
        .expect("parses");
        assert_eq!(entry.tool_calls[0].kind, "function");
    }
}
