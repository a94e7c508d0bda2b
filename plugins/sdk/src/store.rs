//! Key-value stores: what the host's `[stores.<name>]` hold, opened by
//! name ([`Store::open`]) by a stage granted them (`capabilities.stores`).
//!
//! In a plugin a [`Store`] is a `wasi:keyvalue` bucket of the host: a
//! `memory` store in the host process or a Redis shared by every replica,
//! as the host's configuration says. Natively (a plain `cargo test`) it is
//! an in-memory double with the same semantics, shared by every `open` of
//! the same name on the test's thread, so a stage's logic is unit-tested
//! without a host ([`reset`] empties them between tests).
//!
//! Counters ([`Store::increment`], [`Store::window`]) are stored as the
//! decimal text of an `i64`, on every backend.
//!
//! ```
//! use std::time::Duration;
//! use orchestrator_plugin::store::Store;
//!
//! let limits = Store::open("limits").unwrap();
//! let minute = Duration::from_secs(60);
//! let first = limits.window("alice", 3, minute, Some(4)).unwrap();
//! assert!(first.applied);
//! let second = limits.window("alice", 3, minute, Some(4)).unwrap();
//! assert!(!second.applied, "3 + 3 would pass 4");
//! assert_eq!(limits.get("alice").unwrap().as_deref(), Some(&b"3"[..]));
//! ```

use std::time::Duration;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The host has no store of that name.
    NoSuchStore,
    /// The stage is not granted the store (`capabilities.stores`).
    AccessDenied,
    /// Anything else: the store is down or did not answer in time, the key
    /// is too long, a counter holds something else than an integer, ...
    Other(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::NoSuchStore => f.write_str("no such store"),
            StoreError::AccessDenied => f.write_str("the stage is not granted this store"),
            StoreError::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for StoreError {}

/// A windowed counter after [`Store::window`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The counter's value after the call.
    pub value: i64,
    /// Whether the delta was added (false: it would have passed the limit).
    pub applied: bool,
    /// Milliseconds until the window ends and the counter starts again.
    pub reset_ms: u64,
}

/// What [`Store::get_or_claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The key's value.
    Found(Vec<u8>),
    /// The key is absent and this caller now holds the claim: it is to
    /// produce the value (and delete the claim when done).
    Claimed,
    /// The key is absent and another caller holds the claim.
    Busy,
}

/// One counter of [`Store::windows`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// The counter's key.
    pub key: String,
    /// What to add (negative: take away).
    pub delta: i64,
    /// The window a new counter starts (at least 1 ms).
    pub window: Duration,
    /// The most a positive `delta` may take the value to.
    pub limit: Option<i64>,
}

impl Counter {
    /// Whether adding the delta to `current` would pass the limit (only a
    /// positive delta can).
    pub fn passes_limit(&self, current: i64) -> bool {
        self.delta > 0
            && self
                .limit
                .is_some_and(|limit| current.saturating_add(self.delta) > limit)
    }
}

/// An open store.
pub struct Store {
    inner: imp::Bucket,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Open store `name`.
    ///
    /// # Errors
    ///
    /// [`StoreError::AccessDenied`] if the stage is not granted it.
    pub fn open(name: &str) -> Result<Store, StoreError> {
        imp::open(name).map(|inner| Store { inner })
    }

    /// The value of `key`.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    /// Set `key` to `value`.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(key, value, None)
    }

    /// Set `key` to `value`, expiring after `ttl` (at least 1 ms).
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn set_with_ttl(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        self.inner.set(key, value, Some(ttl))
    }

    /// Delete `key` (absent is no error).
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key)
    }

    /// Whether `key` exists.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key)
    }

    /// Add `delta` to the counter `key` (0 if absent), atomically; its new
    /// value.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.increment(key, delta)
    }

    /// The value of `key`; if it is absent, claim the right to produce it:
    /// set `claim` (expiring after `ttl`) unless it exists. One atomic
    /// operation (one round trip), so of concurrent callers missing the
    /// same key exactly one is told [`Lookup::Claimed`]: a cache's single
    /// flight. Delete `claim` to give the right back.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn get_or_claim(
        &self,
        key: &str,
        claim: &str,
        ttl: Duration,
    ) -> Result<Lookup, StoreError> {
        self.inner.get_or_claim(key, claim, ttl)
    }

    /// Add `delta` to the windowed counter `key`, atomically: an absent
    /// (or expired) key starts at 0 with a window of `window`, which later
    /// calls do not extend; with a `limit`, a positive `delta` is added
    /// only if the value stays at most `limit`. A delta of zero or less
    /// never starts a window (against an absent key it reports value 0
    /// and `reset_ms` 0), so a refund never lands in a later window. One
    /// round trip on every backend.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn window(
        &self,
        key: &str,
        delta: i64,
        window: Duration,
        limit: Option<i64>,
    ) -> Result<Window, StoreError> {
        let counter = Counter {
            key: key.to_string(),
            delta,
            window,
            limit,
        };
        self.windows(std::slice::from_ref(&counter))?
            .pop()
            .ok_or_else(|| StoreError::Other("the store answered no window".into()))
    }

    /// [`Store::window`] on several counters (at most 100) as one atomic
    /// operation: every delta is added only if no counter passes its
    /// limit; otherwise none is and every window says `applied: false`.
    /// One round trip on every backend: what a rate limiter reserves with.
    ///
    /// # Errors
    ///
    /// A [`StoreError`].
    pub fn windows(&self, counters: &[Counter]) -> Result<Vec<Window>, StoreError> {
        self.inner.windows(counters)
    }
}

/// Empty every native store (between tests). Does nothing in a plugin.
pub fn reset() {
    #[cfg(not(target_arch = "wasm32"))]
    imp::reset();
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use std::time::Duration;

    use super::{Counter, Lookup, StoreError, Window};
    use crate::bindings::streaming::orchestrator::pipeline::expiring;
    use crate::bindings::streaming::wasi::keyvalue::{atomics, store};

    pub(super) struct Bucket(store::Bucket);

    fn error(error: store::Error) -> StoreError {
        match error {
            store::Error::NoSuchStore => StoreError::NoSuchStore,
            store::Error::AccessDenied => StoreError::AccessDenied,
            store::Error::Other(message) => StoreError::Other(message),
        }
    }

    fn millis(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub(super) fn open(name: &str) -> Result<Bucket, StoreError> {
        store::open(name).map(Bucket).map_err(error)
    }

    impl Bucket {
        pub(super) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(key).map_err(error)
        }
        pub(super) fn set(
            &self,
            key: &str,
            value: &[u8],
            ttl: Option<Duration>,
        ) -> Result<(), StoreError> {
            match ttl {
                Some(ttl) => expiring::set(&self.0, key, value, millis(ttl)).map_err(error),
                None => self.0.set(key, value).map_err(error),
            }
        }
        pub(super) fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.0.delete(key).map_err(error)
        }
        pub(super) fn exists(&self, key: &str) -> Result<bool, StoreError> {
            self.0.exists(key).map_err(error)
        }
        pub(super) fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
            atomics::increment(&self.0, key, delta).map_err(error)
        }
        pub(super) fn get_or_claim(
            &self,
            key: &str,
            claim: &str,
            ttl: Duration,
        ) -> Result<Lookup, StoreError> {
            expiring::get_or_claim(&self.0, key, claim, millis(ttl))
                .map(|lookup| match lookup {
                    expiring::Lookup::Found(value) => Lookup::Found(value),
                    expiring::Lookup::Claimed => Lookup::Claimed,
                    expiring::Lookup::Busy => Lookup::Busy,
                })
                .map_err(error)
        }
        pub(super) fn windows(&self, counters: &[Counter]) -> Result<Vec<Window>, StoreError> {
            let counters: Vec<expiring::Counter> = counters
                .iter()
                .map(|c| expiring::Counter {
                    key: c.key.clone(),
                    delta: c.delta,
                    window_ms: millis(c.window),
                    limit: c.limit,
                })
                .collect();
            expiring::increment_all(&self.0, &counters)
                .map(|windows| {
                    windows
                        .into_iter()
                        .map(|w| Window {
                            value: w.value,
                            applied: w.applied,
                            reset_ms: w.reset_ms,
                        })
                        .collect()
                })
                .map_err(error)
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use super::{Counter, Lookup, StoreError, Window};

    type Map = HashMap<String, (Vec<u8>, Option<Instant>)>;

    thread_local! {
        static STORES: RefCell<HashMap<String, Rc<RefCell<Map>>>> = RefCell::default();
    }

    pub(super) fn reset() {
        STORES.with(|stores| stores.borrow_mut().clear());
    }

    pub(super) struct Bucket(Rc<RefCell<Map>>);

    pub(super) fn open(name: &str) -> Result<Bucket, StoreError> {
        Ok(Bucket(STORES.with(|stores| {
            stores
                .borrow_mut()
                .entry(name.to_string())
                .or_default()
                .clone()
        })))
    }

    fn counter(value: &[u8]) -> Result<i64, StoreError> {
        std::str::from_utf8(value)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| StoreError::Other("the key holds a value that is not an integer".into()))
    }

    impl Bucket {
        /// The live entry of `key` (an expired one is removed).
        fn live(&self, key: &str) -> Option<(Vec<u8>, Option<Instant>)> {
            let mut map = self.0.borrow_mut();
            let expired = map
                .get(key)
                .is_some_and(|(_, at)| at.is_some_and(|at| at <= Instant::now()));
            if expired {
                map.remove(key);
            }
            map.get(key).cloned()
        }
        pub(super) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.live(key).map(|(v, _)| v))
        }
        pub(super) fn set(
            &self,
            key: &str,
            value: &[u8],
            ttl: Option<Duration>,
        ) -> Result<(), StoreError> {
            let expires = ttl.map(|t| Instant::now() + t);
            self.0
                .borrow_mut()
                .insert(key.to_string(), (value.to_vec(), expires));
            Ok(())
        }
        pub(super) fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.0.borrow_mut().remove(key);
            Ok(())
        }
        pub(super) fn exists(&self, key: &str) -> Result<bool, StoreError> {
            Ok(self.live(key).is_some())
        }
        pub(super) fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
            let (value, expires) = match self.live(key) {
                Some((v, at)) => (counter(&v)?, at),
                None => (0, None),
            };
            let value = value
                .checked_add(delta)
                .ok_or_else(|| StoreError::Other("overflow".into()))?;
            self.0
                .borrow_mut()
                .insert(key.to_string(), (value.to_string().into_bytes(), expires));
            Ok(value)
        }
        pub(super) fn get_or_claim(
            &self,
            key: &str,
            claim: &str,
            ttl: Duration,
        ) -> Result<Lookup, StoreError> {
            if let Some((value, _)) = self.live(key) {
                return Ok(Lookup::Found(value));
            }
            if self.live(claim).is_some() {
                return Ok(Lookup::Busy);
            }
            self.set(claim, b"1", Some(ttl))?;
            Ok(Lookup::Claimed)
        }
        pub(super) fn windows(&self, counters: &[Counter]) -> Result<Vec<Window>, StoreError> {
            let now = Instant::now();
            let mut current = Vec::with_capacity(counters.len());
            for counter in counters {
                current.push(match self.live(&counter.key) {
                    Some((v, at)) => (Some(self::counter(&v)?), at),
                    None => (None, None),
                });
            }
            let fits = counters
                .iter()
                .zip(&current)
                .all(|(c, (value, _))| !c.passes_limit(value.unwrap_or(0)));
            let reset_ms = |at: Instant| at.saturating_duration_since(now).as_millis() as u64;
            let mut windows = Vec::with_capacity(counters.len());
            for (counter, (value, expires)) in counters.iter().zip(current) {
                windows.push(match value {
                    None if counter.delta <= 0 => Window {
                        value: 0,
                        applied: fits,
                        reset_ms: 0,
                    },
                    _ if !fits => Window {
                        value: value.unwrap_or(0),
                        applied: false,
                        reset_ms: reset_ms(expires.unwrap_or(now + counter.window)),
                    },
                    _ => {
                        let expires = expires.unwrap_or(now + counter.window);
                        let value = value
                            .unwrap_or(0)
                            .checked_add(counter.delta)
                            .ok_or_else(|| StoreError::Other("overflow".into()))?;
                        self.0.borrow_mut().insert(
                            counter.key.clone(),
                            (value.to_string().into_bytes(), Some(expires)),
                        );
                        Window {
                            value,
                            applied: true,
                            reset_ms: reset_ms(expires),
                        }
                    }
                });
            }
            Ok(windows)
        }
    }
}
