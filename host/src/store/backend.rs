//! The trait a store backend implements ([`Backend`]), and what its
//! operations return.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Most bytes one batch read may return (the memory backend refuses before
/// copying; a Redis reply past it is dropped).
pub const MAX_BATCH_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// What a backend's failure is, before the store names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// Unreachable or failing.
    Unavailable(String),
    /// Refused as invalid.
    Invalid(String),
}

/// A windowed counter after `Store::window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The value after the call.
    pub value: i64,
    /// Whether the delta was added (false when it would have passed the
    /// limit).
    pub applied: bool,
    /// Milliseconds until the window ends.
    pub reset_ms: u64,
}

/// One counter of [`Backend::windows`], on a whole (prefixed) key.
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
    /// Whether adding the delta to `current` would pass the limit. Only a
    /// positive delta can.
    pub fn passes_limit(&self, current: i64) -> bool {
        self.delta > 0
            && self
                .limit
                .is_some_and(|limit| current.saturating_add(self.delta) > limit)
    }
}

/// What [`Backend::get_or_claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The key's value.
    Found(Vec<u8>),
    /// The key is absent; the claim is now the caller's.
    Claimed,
    /// The key is absent; another caller holds the claim.
    Busy,
}

/// A backend's future.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// The operations a store backend provides, on whole (prefixed) keys.
/// Each is one atomic operation, and one round trip for a remote backend.
pub trait Backend: Send + Sync {
    /// The value of `key`.
    fn get<'a>(&'a self, key: &'a str) -> BackendFuture<'a, Option<Vec<u8>>>;
    /// Set `key`, expiring after `ttl` if given.
    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        ttl: Option<Duration>,
    ) -> BackendFuture<'a, ()>;
    /// Delete `keys` (absent ones are no error).
    fn delete<'a>(&'a self, keys: &'a [String]) -> BackendFuture<'a, ()>;
    /// Whether `key` exists.
    fn exists<'a>(&'a self, key: &'a str) -> BackendFuture<'a, bool>;
    /// The values of `keys`, in order.
    fn get_many<'a>(&'a self, keys: &'a [String]) -> BackendFuture<'a, Vec<Option<Vec<u8>>>>;
    /// Set every pair.
    fn set_many<'a>(&'a self, pairs: &'a [(String, Vec<u8>)]) -> BackendFuture<'a, ()>;
    /// Keys starting with `prefix`, a page at a time: the keys and the
    /// cursor of the next page (`None` at the end).
    fn list_keys<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
    ) -> BackendFuture<'a, (Vec<String>, Option<String>)>;
    /// Add `delta` to the counter `key` (0 if absent); the new value.
    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> BackendFuture<'a, i64>;
    /// Set `key` to `value` only if it holds `expected` (`None`: only if
    /// absent); whether it did.
    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: &'a [u8],
    ) -> BackendFuture<'a, bool>;
    /// Read `key`; if absent, set `claim` (expiring after `ttl`) unless it
    /// exists: one atomic operation.
    fn get_or_claim<'a>(
        &'a self,
        key: &'a str,
        claim: &'a str,
        ttl: Duration,
    ) -> BackendFuture<'a, Lookup>;
    /// Add each counter's delta to its windowed counter, all or none (see
    /// `Store::windows`): one window per counter, in order.
    fn windows<'a>(&'a self, counters: &'a [Counter]) -> BackendFuture<'a, Vec<Window>>;
    /// An operation did not finish in time (its future was dropped): the
    /// backend is to be reported down until one succeeds.
    fn timed_out(&self) {}

    /// Whether the backend answered its last operation (`None`: no
    /// operation yet), for `/health`.
    fn healthy(&self) -> Option<bool>;
}
