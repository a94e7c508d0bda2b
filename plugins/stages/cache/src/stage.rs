//! The stage itself: [`key`](crate::key), [`Entry`] and the single-flight
//! lock behind the SDK's [`Stage`] trait, over a store.

use std::time::{Duration, Instant};

use orchestrator_plugin::store::{self, Store, StoreError};
use orchestrator_plugin::{InitError, Outcome, OutcomeKind, Request, Stage, StageError, log};
use serde::Deserialize;

use crate::{
    Directives, ERROR_NOTE, Entry, HEADER, KEY_NOTE, OWNER_NOTE, Status, WAITED_NOTE, entry_key,
    lock_key,
};

/// The first pause of a request waiting for an identical one.
const FIRST_PAUSE: Duration = Duration::from_millis(2);

/// The longest pause between two looks at the store while waiting.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// The `cache` stage's configuration (the `config` table of its
/// `[stages.<name>]` section).
///
/// ```toml
/// config = { ttl_seconds = 600, shared = true }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The store holding the entries and the locks (default `cache`); the
    /// stage must be granted it (`capabilities.stores`).
    pub store: String,
    /// How long an entry lives, in seconds (default 3600; at least 1).
    pub ttl_seconds: u64,
    /// The largest entry stored, in bytes of JSON (default 262144): a
    /// bigger answer is served but not stored.
    pub max_entry_bytes: usize,
    /// Whether callers share entries (default `false`: the principal is
    /// part of the key, so a caller never sees another's answers). Turn
    /// on only when every caller may see every answer.
    pub shared: bool,
    /// Whether only one of several identical requests in flight generates
    /// while the others wait for its answer (default `true`).
    pub single_flight: bool,
    /// How long a request waits for an identical one in flight, in
    /// milliseconds, before generating itself (default 25000).
    pub wait_ms: u64,
    /// How long a generating request's lock lives, in milliseconds, if it
    /// never finishes (default 60000; at least 1).
    pub lock_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "cache".into(),
            ttl_seconds: 3600,
            max_entry_bytes: 256 * 1024,
            shared: false,
            single_flight: true,
            wait_ms: 25_000,
            lock_ms: 60_000,
        }
    }
}

/// The `cache` stage: answers a request from the store when an identical
/// one was answered before, and stores the answers it did not have (see
/// the crate documentation). It sets the response header
/// `x-orchestrator-cache` and the notes `cache.key`, `cache.owner`,
/// `cache.waited_ms` and `cache.error`.
#[derive(Debug, Clone)]
pub struct Cache {
    store: String,
    ttl: Duration,
    max_entry_bytes: usize,
    shared: bool,
    single_flight: bool,
    wait: Duration,
    lock: Duration,
}

/// What looking a key up came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The entry is there.
    Hit {
        /// The entry.
        entry: Entry,
        /// How long the request waited for it.
        waited: Option<Duration>,
    },
    /// It is not: the request generates.
    Miss {
        /// Whether the request holds the lock.
        owner: bool,
        /// How long the request waited for an identical one.
        waited: Option<Duration>,
    },
}

impl Stage for Cache {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        if config.store.trim().is_empty() {
            return Err("config key `store`: empty; name a store the stage is granted".into());
        }
        if config.ttl_seconds == 0 {
            return Err("config key `ttl_seconds`: must be at least 1".into());
        }
        if config.lock_ms == 0 {
            return Err("config key `lock_ms`: must be at least 1".into());
        }
        Ok(Cache {
            store: config.store,
            ttl: Duration::from_secs(config.ttl_seconds),
            max_entry_bytes: config.max_entry_bytes,
            shared: config.shared,
            single_flight: config.single_flight,
            wait: Duration::from_millis(config.wait_ms),
            lock: Duration::from_millis(config.lock_ms),
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let directives = Directives::parse(request.header("cache-control").as_deref());
        if directives.no_store {
            set_status(request, Status::Bypass);
            return Ok(());
        }
        let key = crate::key(request, self.shared);
        if directives.no_cache {
            set_status(request, Status::Bypass);
            request.set_note(KEY_NOTE, &key);
            return Ok(());
        }
        match self.lookup(&key, &mut std::thread::sleep) {
            Ok(Lookup::Hit { entry, waited }) => {
                entry.apply(request);
                request.answer();
                set_status(request, Status::Hit);
                note_waited(request, waited);
            }
            Ok(Lookup::Miss { owner, waited }) => {
                set_status(request, Status::Miss);
                request.set_note(KEY_NOTE, &key);
                if owner {
                    request.set_note(OWNER_NOTE, "1");
                }
                note_waited(request, waited);
            }
            Err(error) => {
                log::warn(
                    "cache store failed; the request bypasses the cache",
                    &[("store", &self.store), ("error", &error)],
                );
                set_status(request, Status::Bypass);
                // The error's text may name internal hosts: it goes to the log only.
                request.set_note(ERROR_NOTE, "store unavailable");
            }
        }
        Ok(())
    }

    fn finish(&self, request: &dyn Request, outcome: &Outcome) {
        let Some(key) = request.note(KEY_NOTE) else {
            return;
        };
        let store = match Store::open(&self.store) {
            Ok(store) => store,
            Err(error) => {
                log::warn(
                    "cache store failed; the answer is not stored",
                    &[("store", &self.store), ("error", &error)],
                );
                return;
            }
        };
        if outcome.kind == OutcomeKind::Answered && !outcome.answered_early {
            let json = Entry::of(request, outcome.usage).to_json();
            if json.len() > self.max_entry_bytes {
                log::debug(
                    "answer too big for the cache; not stored",
                    &[
                        ("bytes", &json.len()),
                        ("max_entry_bytes", &self.max_entry_bytes),
                    ],
                );
            } else if let Err(error) =
                store.set_with_ttl(&entry_key(&key), json.as_bytes(), self.ttl)
            {
                log::warn(
                    "cache store failed; the answer is not stored",
                    &[("store", &self.store), ("error", &error)],
                );
            }
        }
        if request.note(OWNER_NOTE).is_some() {
            release(&store, &key);
        }
    }
}

impl Cache {
    /// Look `key` up: its entry, or, on a miss with single flight, the
    /// lock, waiting (each pause through `pause`) while an identical
    /// request holds it.
    pub(crate) fn lookup(
        &self,
        key: &str,
        pause: &mut dyn FnMut(Duration),
    ) -> Result<Lookup, StoreError> {
        let store = Store::open(&self.store)?;
        if !self.single_flight {
            return Ok(match read(&store, key)? {
                Some(entry) => Lookup::Hit {
                    entry,
                    waited: None,
                },
                None => Lookup::Miss {
                    owner: false,
                    waited: None,
                },
            });
        }
        // The read and the claim are one store operation (one round trip).
        match self.get_or_claim(&store, key)? {
            Found::Entry(entry) => Ok(Lookup::Hit {
                entry,
                waited: None,
            }),
            Found::Claimed => Ok(Lookup::Miss {
                owner: true,
                waited: None,
            }),
            // An entry that does not parse: a miss, overwritten by the
            // next answer.
            Found::Unreadable => Ok(Lookup::Miss {
                owner: false,
                waited: None,
            }),
            Found::Busy => self.wait(&store, key, pause),
        }
    }

    /// Wait, up to the configured `wait_ms`, for the identical request
    /// holding the lock of `key`: until its entry appears (a hit), or the
    /// lock goes and this request claims it (a miss it owns).
    fn wait(
        &self,
        store: &Store,
        key: &str,
        pause: &mut dyn FnMut(Duration),
    ) -> Result<Lookup, StoreError> {
        let start = Instant::now();
        let deadline = start + self.wait;
        let mut delay = FIRST_PAUSE;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(Lookup::Miss {
                    owner: false,
                    waited: Some(now - start),
                });
            }
            pause(delay.min(deadline - now));
            delay = (delay * 2).min(MAX_PAUSE);
            let waited = Some(start.elapsed());
            match self.get_or_claim(store, key)? {
                Found::Entry(entry) => return Ok(Lookup::Hit { entry, waited }),
                Found::Claimed => {
                    return Ok(Lookup::Miss {
                        owner: true,
                        waited,
                    });
                }
                Found::Unreadable => {
                    return Ok(Lookup::Miss {
                        owner: false,
                        waited,
                    });
                }
                Found::Busy => {}
            }
        }
    }

    /// The entry of `key`, or else the lock of `key` if no identical
    /// request holds it: one atomic store operation.
    fn get_or_claim(&self, store: &Store, key: &str) -> Result<Found, StoreError> {
        Ok(
            match store.get_or_claim(&entry_key(key), &lock_key(key), self.lock)? {
                store::Lookup::Found(bytes) => match parse(&bytes) {
                    Some(entry) => Found::Entry(entry),
                    None => Found::Unreadable,
                },
                store::Lookup::Claimed => Found::Claimed,
                store::Lookup::Busy => Found::Busy,
            },
        )
    }
}

/// What one look at the store found.
enum Found {
    /// An entry that parses.
    Entry(Entry),
    /// An entry that does not.
    Unreadable,
    /// No entry; the lock is now this request's.
    Claimed,
    /// No entry; an identical request holds the lock.
    Busy,
}

/// The entry of `key`, if the store holds one that parses (one that does
/// not is a miss, overwritten by the next answer).
fn read(store: &Store, key: &str) -> Result<Option<Entry>, StoreError> {
    Ok(store.get(&entry_key(key))?.and_then(|bytes| parse(&bytes)))
}

/// `bytes` as an entry, or `None` (logged) if they do not parse.
fn parse(bytes: &[u8]) -> Option<Entry> {
    let entry = Entry::parse(bytes);
    if entry.is_none() {
        log::warn(
            "cache entry does not parse; treated as a miss",
            &[("bytes", &bytes.len())],
        );
    }
    entry
}

/// Release the lock of `key` (an error is logged: the lock then lives out
/// its `lock_ms`).
fn release(store: &Store, key: &str) {
    if let Err(error) = store.delete(&lock_key(key)) {
        log::warn(
            "cache lock not released; it expires by itself",
            &[("error", &error)],
        );
    }
}

/// Send the [`HEADER`] of `status`.
fn set_status(request: &dyn Request, status: Status) {
    if let Err(error) = request.set_response_header(HEADER, status.as_str()) {
        log::warn("cache header refused", &[("error", &error)]);
    }
}

/// Note how long the request waited, if it did.
fn note_waited(request: &dyn Request, waited: Option<Duration>) {
    if let Some(waited) = waited {
        request.set_note(WAITED_NOTE, &waited.as_millis().to_string());
    }
}

orchestrator_plugin::export_stage!(Cache, finish);

#[cfg(test)]
mod tests {
    use orchestrator_plugin::config::from_pairs;
    use orchestrator_plugin::store::{Store, reset};
    use orchestrator_plugin::testing::TestRequest;
    use orchestrator_plugin::{Outcome, OutcomeKind, Request, Route, Stage, ToolCall, Usage};

    use super::*;

    /// The stage as `init` builds it from these config pairs.
    fn cache(pairs: &[(&str, &str)]) -> Result<Cache, String> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config: Config = from_pairs(pairs).map_err(|e| e.to_string())?;
        Cache::init(config).map_err(|e| e.to_string())
    }

    fn question() -> TestRequest {
        TestRequest::new()
            .with_system("Be brief.")
            .with_user("What is 2+2?")
    }

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 12,
            completion_tokens: 3,
        }
    }

    fn outcome(kind: OutcomeKind) -> Outcome {
        Outcome {
            kind,
            status: if kind == OutcomeKind::Answered {
                200
            } else {
                502
            },
            usage: usage(),
            answered_early: false,
            streamed: false,
        }
    }

    /// What the generating stage and the stages after it leave in the
    /// request.
    fn generate(request: &TestRequest) {
        request.set_completion("4");
        request.set_tool_calls(&[ToolCall::function("c1", "calc", r#"{"x":"2+2"}"#)]);
        request.set_finish_reason("stop");
        request.set_usage(usage());
    }

    fn status(request: &TestRequest) -> Option<String> {
        request
            .fields()
            .response_headers
            .into_iter()
            .find(|(name, _)| name == HEADER)
            .map(|(_, value)| value)
    }

    fn store() -> Store {
        Store::open("cache").unwrap()
    }

    /// Run `request` through the stage as a miss it generates and that
    /// ends with `kind`.
    fn miss_and_finish(stage: &Cache, request: &TestRequest, kind: OutcomeKind) {
        stage.process(request).unwrap();
        assert_eq!(status(request).as_deref(), Some("miss"));
        generate(request);
        stage.finish(request, &outcome(kind));
    }

    #[test]
    fn a_miss_is_stored_and_an_identical_request_hits() {
        reset();
        let stage = cache(&[]).unwrap();
        let first = question();
        stage.process(&first).unwrap();
        assert_eq!(status(&first).as_deref(), Some("miss"));
        assert!(!first.answered());
        let key = first.note(KEY_NOTE).expect("key noted");
        assert_eq!(key, crate::key(&question(), false));
        assert_eq!(first.note(OWNER_NOTE).as_deref(), Some("1"));
        assert!(store().get(&lock_key(&key)).unwrap().is_some(), "locked");
        generate(&first);
        stage.finish(&first, &outcome(OutcomeKind::Answered));
        assert!(store().get(&entry_key(&key)).unwrap().is_some(), "stored");
        assert_eq!(store().get(&lock_key(&key)).unwrap(), None, "released");

        // A streamed request shares the entry.
        let second = question().streaming();
        stage.process(&second).unwrap();
        let fields = second.fields();
        assert!(fields.answered);
        assert_eq!(status(&second).as_deref(), Some("hit"));
        assert_eq!(fields.completion, "4");
        assert_eq!(fields.tool_calls, first.tool_calls());
        assert_eq!(fields.finish_reason, "stop");
        assert_eq!(fields.usage, usage());
        assert_eq!(second.note(KEY_NOTE), None, "a hit stores nothing");
        assert_eq!(second.note(WAITED_NOTE), None);

        // Its finish (answered early) stores nothing and changes nothing.
        let mut early = outcome(OutcomeKind::Answered);
        early.answered_early = true;
        second.set_completion("changed by a later stage");
        stage.finish(&second, &early);
        let third = question();
        stage.process(&third).unwrap();
        assert_eq!(third.completion(), "4");
    }

    #[test]
    fn a_different_request_misses() {
        reset();
        let stage = cache(&[]).unwrap();
        miss_and_finish(&stage, &question(), OutcomeKind::Answered);

        let mut route = question().route();
        route.upstream_model = "gpt-x".into();
        let mut backend = question().route();
        backend.backend = "other".into();
        let mut params = question().params();
        params.temperature = Some(0.2);
        let mut model = question().params();
        model.model = "other".into();
        let alice = question();
        alice.set_principal("alice");
        let others: [(&str, TestRequest); 6] = [
            ("upstream model", question().with_route(route)),
            ("backend", question().with_route(backend)),
            ("temperature", question().with_params(params)),
            ("model", question().with_params(model)),
            ("message", question().with_user("And 3+3?")),
            ("principal", alice),
        ];
        for (what, request) in others {
            stage.process(&request).unwrap();
            assert!(!request.answered(), "{what}");
            assert_eq!(status(&request).as_deref(), Some("miss"), "{what}");
        }
        let same = question().with_route(Route {
            max_tokens_limit: 4096,
            ..question().route()
        });
        stage.process(&same).unwrap();
        assert!(same.answered());
    }

    #[test]
    fn shared_entries_hit_across_principals() {
        reset();
        let stage = cache(&[("shared", "true")]).unwrap();
        let alice = question();
        alice.set_principal("alice");
        miss_and_finish(&stage, &alice, OutcomeKind::Answered);
        let bob = question();
        bob.set_principal("bob");
        stage.process(&bob).unwrap();
        assert!(bob.answered());
        assert_eq!(status(&bob).as_deref(), Some("hit"));

        // Not shared: the same two callers keep their answers apart.
        reset();
        let stage = cache(&[]).unwrap();
        miss_and_finish(&stage, &alice, OutcomeKind::Answered);
        let bob = question();
        bob.set_principal("bob");
        stage.process(&bob).unwrap();
        assert!(!bob.answered());
    }

    #[test]
    fn no_store_bypasses_and_stores_nothing() {
        reset();
        let stage = cache(&[]).unwrap();
        miss_and_finish(&stage, &question(), OutcomeKind::Answered);
        let request = question().with_header("Cache-Control", "max-age=0, NO-STORE");
        stage.process(&request).unwrap();
        assert!(!request.answered(), "not read");
        assert_eq!(status(&request).as_deref(), Some("bypass"));
        assert!(request.metadata().is_empty());

        reset();
        let request = question().with_header("cache-control", "no-store, no-cache");
        stage.process(&request).unwrap();
        generate(&request);
        stage.finish(&request, &outcome(OutcomeKind::Answered));
        let key = crate::key(&question(), false);
        assert_eq!(store().get(&entry_key(&key)).unwrap(), None);
    }

    #[test]
    fn no_cache_skips_the_read_but_stores() {
        reset();
        let stage = cache(&[]).unwrap();
        miss_and_finish(&stage, &question(), OutcomeKind::Answered);
        let request = question().with_header("cache-control", "no-cache");
        stage.process(&request).unwrap();
        assert!(!request.answered(), "not read");
        assert_eq!(status(&request).as_deref(), Some("bypass"));
        let key = request.note(KEY_NOTE).expect("key noted");
        assert_eq!(request.note(OWNER_NOTE), None, "no lock");
        request.set_completion("fresh");
        request.set_finish_reason("stop");
        stage.finish(&request, &outcome(OutcomeKind::Answered));
        let stored = store().get(&entry_key(&key)).unwrap().unwrap();
        assert_eq!(Entry::parse(&stored).unwrap().completion, "fresh");

        let next = question();
        stage.process(&next).unwrap();
        assert_eq!(next.completion(), "fresh");
    }

    #[test]
    fn a_big_answer_is_not_stored() {
        reset();
        let stage = cache(&[("max_entry_bytes", "200")]).unwrap();
        let request = question();
        stage.process(&request).unwrap();
        request.set_completion(&"x".repeat(200));
        request.set_finish_reason("stop");
        stage.finish(&request, &outcome(OutcomeKind::Answered));
        let key = request.note(KEY_NOTE).unwrap();
        assert_eq!(store().get(&entry_key(&key)).unwrap(), None);
        assert_eq!(store().get(&lock_key(&key)).unwrap(), None, "released");

        // A small one is.
        let request = question();
        stage.process(&request).unwrap();
        request.set_completion("4");
        stage.finish(&request, &outcome(OutcomeKind::Answered));
        assert!(store().get(&entry_key(&key)).unwrap().is_some());
    }

    #[test]
    fn an_unfinished_answer_is_not_stored_and_the_lock_is_released() {
        for kind in [
            OutcomeKind::Failed,
            OutcomeKind::Refused,
            OutcomeKind::Cancelled,
        ] {
            reset();
            let stage = cache(&[]).unwrap();
            let request = question();
            miss_and_finish(&stage, &request, kind);
            let key = request.note(KEY_NOTE).unwrap();
            assert_eq!(store().get(&entry_key(&key)).unwrap(), None, "{kind:?}");
            assert_eq!(store().get(&lock_key(&key)).unwrap(), None, "{kind:?}");
            // The next identical request owns the key at once.
            let next = question();
            stage.process(&next).unwrap();
            assert_eq!(next.note(OWNER_NOTE).as_deref(), Some("1"), "{kind:?}");
        }
    }

    #[test]
    fn a_waiter_gives_up_after_wait_ms_and_generates_without_the_lock() {
        reset();
        let stage = cache(&[("wait_ms", "30")]).unwrap();
        let owner = question();
        stage.process(&owner).unwrap();
        assert_eq!(owner.note(OWNER_NOTE).as_deref(), Some("1"));

        let waiter = question();
        let started = Instant::now();
        stage.process(&waiter).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(!waiter.answered());
        assert_eq!(status(&waiter).as_deref(), Some("miss"));
        assert_eq!(waiter.note(OWNER_NOTE), None);
        let key = waiter.note(KEY_NOTE).unwrap();
        let waited: u64 = waiter.note(WAITED_NOTE).unwrap().parse().unwrap();
        assert!(waited >= 30, "{waited}");

        // Its answer is stored, but the owner's lock stays.
        generate(&waiter);
        stage.finish(&waiter, &outcome(OutcomeKind::Answered));
        assert!(store().get(&entry_key(&key)).unwrap().is_some());
        assert!(store().get(&lock_key(&key)).unwrap().is_some());
    }

    #[test]
    fn without_single_flight_nobody_waits_or_locks() {
        reset();
        let stage = cache(&[("single_flight", "false")]).unwrap();
        for _ in 0..2 {
            let request = question();
            stage.process(&request).unwrap();
            assert_eq!(status(&request).as_deref(), Some("miss"));
            assert_eq!(request.note(OWNER_NOTE), None);
            assert_eq!(request.note(WAITED_NOTE), None);
        }
        let key = crate::key(&question(), false);
        assert_eq!(store().get(&lock_key(&key)).unwrap(), None);
    }

    #[test]
    fn a_waiter_serves_the_entry_that_appears() {
        reset();
        let stage = cache(&[]).unwrap();
        let owner = question();
        stage.process(&owner).unwrap();
        let key = owner.note(KEY_NOTE).unwrap();
        generate(&owner);
        let json = Entry::of(&owner, usage()).to_json();

        let mut pauses = Vec::new();
        let found = stage
            .lookup(&key, &mut |pause| {
                pauses.push(pause);
                // The owner finishes during the third pause.
                if pauses.len() == 3 {
                    store().set(&entry_key(&key), json.as_bytes()).unwrap();
                }
            })
            .unwrap();
        let Lookup::Hit { entry, waited } = found else {
            panic!("not a hit: {found:?}");
        };
        assert_eq!(entry.completion, "4");
        assert!(waited.is_some());
        assert_eq!(
            pauses,
            [2, 4, 8].map(Duration::from_millis),
            "the backoff doubles"
        );

        // The lock still held, a later identical request finds the entry
        // at once.
        assert!(store().get(&lock_key(&key)).unwrap().is_some());
        let late = question();
        stage.process(&late).unwrap();
        assert!(late.answered());
        assert_eq!(status(&late).as_deref(), Some("hit"));
        assert_eq!(late.note(WAITED_NOTE), None);
    }

    #[test]
    fn a_waiter_takes_over_a_released_lock() {
        reset();
        let stage = cache(&[]).unwrap();
        let owner = question();
        stage.process(&owner).unwrap();
        let key = owner.note(KEY_NOTE).unwrap();

        let mut pauses = Vec::new();
        let found = stage
            .lookup(&key, &mut |pause| {
                pauses.push(pause);
                // The owner fails after a while: its finish releases.
                if pauses.len() == 8 {
                    stage.finish(&owner, &outcome(OutcomeKind::Failed));
                }
            })
            .unwrap();
        assert!(
            matches!(
                found,
                Lookup::Miss {
                    owner: true,
                    waited: Some(_)
                }
            ),
            "{found:?}"
        );
        assert_eq!(
            pauses,
            [2, 4, 8, 16, 32, 50, 50, 50].map(Duration::from_millis),
            "at most 50 ms"
        );
        assert!(store().get(&lock_key(&key)).unwrap().is_some(), "claimed");
    }

    #[test]
    fn an_entry_that_does_not_parse_is_a_miss_and_is_overwritten() {
        reset();
        let stage = cache(&[]).unwrap();
        let key = crate::key(&question(), false);
        store().set(&entry_key(&key), b"{broken").unwrap();
        let request = question();
        miss_and_finish(&stage, &request, OutcomeKind::Answered);
        assert!(!request.answered());
        let stored = store().get(&entry_key(&key)).unwrap().unwrap();
        assert_eq!(Entry::parse(&stored).unwrap().completion, "4");
    }

    #[test]
    fn bad_config_fails_init_naming_the_key() {
        let err = cache(&[("ttl_seconds", "0")]).unwrap_err();
        assert!(err.starts_with("config key `ttl_seconds`: "), "{err}");
        let err = cache(&[("lock_ms", "0")]).unwrap_err();
        assert!(err.starts_with("config key `lock_ms`: "), "{err}");
        let err = cache(&[("store", " ")]).unwrap_err();
        assert!(err.starts_with("config key `store`: "), "{err}");
        let err = cache(&[("wait_ms", "soon")]).unwrap_err();
        assert!(err.starts_with("config key `wait_ms`: "), "{err}");
        let err = cache(&[("ttl", "5")]).unwrap_err();
        assert!(err.starts_with("config key `ttl`: unknown key"), "{err}");
        let stage = cache(&[]).unwrap();
        assert_eq!(stage.store, "cache");
        assert_eq!(stage.ttl, Duration::from_secs(3600));
        assert_eq!(stage.max_entry_bytes, 262_144);
        assert_eq!(stage.wait, Duration::from_millis(25_000));
        assert_eq!(stage.lock, Duration::from_millis(60_000));
        assert!(!stage.shared && stage.single_flight);
    }
}
