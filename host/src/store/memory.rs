//! The `memory` backend: a map in this process, bounded in keys and bytes.
//!
//! Expired keys are invisible to reads; they are dropped when written
//! again, swept whenever a write finds the store full, and swept in the
//! background every [`SWEEP_EVERY`]. When a write would pass `max_keys`
//! or `max_bytes` after the expired keys are gone, other keys are evicted
//! (arbitrary ones, like Redis's `allkeys-random`) and counted in
//! `orchestrator_store_evictions_total{store}`. A rate limit whose counter
//! is evicted starts again from zero, so size the bounds for the keys a
//! store holds at once (a memory store is for one process; use `redis`
//! where a limit must hold across replicas).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::backend::{
    Backend, BackendError, BackendFuture, Counter, Lookup, MAX_BATCH_REPLY_BYTES, Window,
};
use crate::metrics::StoreMetrics;

/// How often expired keys are swept in the background.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Keys returned by one `list_keys` page.
const PAGE: usize = 1000;

/// Bytes counted for a key besides its text and value (the map's own
/// bookkeeping, roughly).
const ENTRY_OVERHEAD: usize = 64;

struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

struct Map {
    entries: HashMap<String, Entry>,
    bytes: usize,
}

fn size(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl Map {
    /// The entry of `key` unless it has expired (one lookup: an expired
    /// entry stays until it is overwritten or swept).
    fn live(&self, key: &str, now: Instant) -> Option<&Entry> {
        self.entries.get(key).filter(|e| e.live(now))
    }

    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.bytes -= size(key, &entry.value);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let bytes = &mut self.bytes;
        self.entries.retain(|key, entry| {
            let keep = entry.live(now);
            if !keep {
                *bytes -= size(key, &entry.value);
            }
            keep
        });
    }

    /// Insert, evicting other keys if the bounds need it; the number
    /// evicted.
    fn insert(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expires: Option<Instant>,
        bounds: (usize, usize),
        now: Instant,
    ) -> u64 {
        self.remove(key);
        let added = size(key, &value);
        let (max_keys, max_bytes) = bounds;
        let over = |map: &Map| map.entries.len() + 1 > max_keys || map.bytes + added > max_bytes;
        let mut evicted = 0;
        if over(self) {
            self.sweep(now);
        }
        if over(self) {
            let mut keys_needed = (self.entries.len() + 1).saturating_sub(max_keys);
            let mut bytes_needed = (self.bytes + added).saturating_sub(max_bytes);
            let mut victims = Vec::new();
            for (k, e) in &self.entries {
                if keys_needed == 0 && bytes_needed == 0 {
                    break;
                }
                keys_needed = keys_needed.saturating_sub(1);
                bytes_needed = bytes_needed.saturating_sub(size(k, &e.value));
                victims.push(k.clone());
            }
            for victim in victims {
                self.remove(&victim);
                evicted += 1;
            }
        }
        self.bytes += added;
        self.entries
            .insert(key.to_string(), Entry { value, expires });
        evicted
    }
}

/// A bounded in-process store.
pub struct MemoryBackend {
    map: Arc<Mutex<Map>>,
    max_keys: usize,
    max_bytes: usize,
    metrics: StoreMetrics,
}

impl MemoryBackend {
    /// An empty store holding at most `max_keys` keys and `max_bytes`
    /// bytes. Within a tokio runtime, a task sweeps expired keys every
    /// [`SWEEP_EVERY`] until the store is dropped.
    pub fn new(max_keys: u64, max_bytes: u64, metrics: StoreMetrics) -> MemoryBackend {
        let map = Arc::new(Mutex::new(Map {
            entries: HashMap::new(),
            bytes: 0,
        }));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Mutex<Map>> = Arc::downgrade(&map);
            let keys = metrics.keys.clone();
            runtime.spawn(async move {
                let mut ticks = tokio::time::interval(SWEEP_EVERY);
                ticks.tick().await;
                loop {
                    ticks.tick().await;
                    let Some(map) = weak.upgrade() else { return };
                    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                    map.sweep(Instant::now());
                    keys.set(map.entries.len() as i64);
                }
            });
        }
        MemoryBackend {
            map,
            max_keys: usize::try_from(max_keys).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            metrics,
        }
    }

    fn with<T>(&self, work: impl FnOnce(&mut Map, Instant) -> T) -> T {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let result = work(&mut map, Instant::now());
        self.metrics.keys.set(map.entries.len() as i64);
        result
    }

    fn insert(
        &self,
        map: &mut Map,
        key: &str,
        value: Vec<u8>,
        expires: Option<Instant>,
        now: Instant,
    ) -> Result<(), BackendError> {
        // A value the whole store cannot hold is refused: taking it would
        // evict every other key and still pass the bound.
        if size(key, &value) > self.max_bytes {
            return Err(BackendError::Invalid(format!(
                "a key and value of {} bytes do not fit the store's max_bytes ({})",
                size(key, &value),
                self.max_bytes
            )));
        }
        let evicted = map.insert(key, value, expires, (self.max_keys, self.max_bytes), now);
        if evicted > 0 {
            self.metrics.evictions.inc_by(evicted);
        }
        Ok(())
    }

    /// Set the counter `key` to `value` (its decimal text) expiring at
    /// `expires`: in place when the key holds a value and the new text
    /// fits the bounds (no new key, one lookup), else as an insert.
    fn set_counter(
        &self,
        map: &mut Map,
        key: &str,
        value: i64,
        expires: Option<Instant>,
        now: Instant,
    ) -> Result<(), BackendError> {
        let mut digits = itoa::Buffer::new();
        let text = digits.format(value).as_bytes();
        let max_bytes = self.max_bytes;
        let bytes = map.bytes;
        if let Some(entry) = map.entries.get_mut(key) {
            let grown = bytes - entry.value.len() + text.len();
            if grown <= max_bytes {
                // A counter's buffer is reused; a large value's (the key
                // held something else before it expired) is not kept
                // behind the few bytes the store counts for it.
                if entry.value.capacity() > 32 {
                    entry.value = text.to_vec();
                } else {
                    entry.value.clear();
                    entry.value.extend_from_slice(text);
                }
                entry.expires = expires;
                map.bytes = grown;
                return Ok(());
            }
        }
        self.insert(map, key, text.to_vec(), expires, now)
    }
}

/// `work` as a backend future, run when it is first polled (so that the
/// store's timing covers it).
fn lazy<'a, T: Send + 'a>(
    work: impl FnOnce() -> Result<T, BackendError> + Send + 'a,
) -> BackendFuture<'a, T> {
    Box::pin(async move { work() })
}

/// A counter's value: the decimal text of an i64.
fn counter(value: &[u8]) -> Result<i64, BackendError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| BackendError::Invalid("the key holds a value that is not an integer".into()))
}

fn add(value: i64, delta: i64) -> Result<i64, BackendError> {
    value
        .checked_add(delta)
        .ok_or_else(|| BackendError::Invalid("increment or decrement would overflow".into()))
}

impl Backend for MemoryBackend {
    fn get<'a>(&'a self, key: &'a str) -> BackendFuture<'a, Option<Vec<u8>>> {
        lazy(move || Ok(self.with(|map, now| map.live(key, now).map(|e| e.value.clone()))))
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        ttl: Option<Duration>,
    ) -> BackendFuture<'a, ()> {
        lazy(move || {
            self.with(|map, now| self.insert(map, key, value.to_vec(), ttl.map(|t| now + t), now))
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BackendFuture<'a, ()> {
        lazy(move || {
            self.with(|map, _| keys.iter().for_each(|k| map.remove(k)));
            Ok(())
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BackendFuture<'a, bool> {
        lazy(move || Ok(self.with(|map, now| map.live(key, now).is_some())))
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> BackendFuture<'a, Vec<Option<Vec<u8>>>> {
        lazy(move || {
            self.with(|map, now| {
                let bytes: usize = keys
                    .iter()
                    .filter_map(|k| map.live(k, now).map(|e| e.value.len()))
                    .sum();
                if bytes > MAX_BATCH_REPLY_BYTES {
                    return Err(BackendError::Invalid(format!(
                        "the batch would return {bytes} bytes; at most {}",
                        MAX_BATCH_REPLY_BYTES
                    )));
                }
                Ok(keys
                    .iter()
                    .map(|k| map.live(k, now).map(|e| e.value.clone()))
                    .collect())
            })
        })
    }

    fn set_many<'a>(&'a self, pairs: &'a [(String, Vec<u8>)]) -> BackendFuture<'a, ()> {
        lazy(move || {
            self.with(|map, now| {
                pairs
                    .iter()
                    .try_for_each(|(key, value)| self.insert(map, key, value.clone(), None, now))
            })
        })
    }

    fn list_keys<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
    ) -> BackendFuture<'a, (Vec<String>, Option<String>)> {
        lazy(move || {
            Ok(self.with(|map, now| {
                let mut keys: Vec<&String> = map
                    .entries
                    .iter()
                    .filter(|(k, e)| {
                        e.live(now)
                            && k.starts_with(prefix)
                            && cursor.is_none_or(|c| k.as_str() > c)
                    })
                    .map(|(k, _)| k)
                    .collect();
                keys.sort_unstable();
                let more = keys.len() > PAGE;
                keys.truncate(PAGE);
                let next = more.then(|| keys.last().map(|k| (*k).clone())).flatten();
                (keys.into_iter().cloned().collect(), next)
            }))
        })
    }

    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> BackendFuture<'a, i64> {
        lazy(move || {
            self.with(|map, now| {
                let (current, expires) = match map.live(key, now) {
                    Some(entry) => (counter(&entry.value)?, entry.expires),
                    None => (0, None),
                };
                let value = add(current, delta)?;
                self.set_counter(map, key, value, expires, now)?;
                Ok(value)
            })
        })
    }

    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: &'a [u8],
    ) -> BackendFuture<'a, bool> {
        lazy(move || {
            self.with(|map, now| {
                let current = map.live(key, now).map(|e| e.value.as_slice());
                if current != expected {
                    return Ok(false);
                }
                self.insert(map, key, value.to_vec(), None, now)?;
                Ok(true)
            })
        })
    }

    fn get_or_claim<'a>(
        &'a self,
        key: &'a str,
        claim: &'a str,
        ttl: Duration,
    ) -> BackendFuture<'a, Lookup> {
        lazy(move || {
            self.with(|map, now| {
                if let Some(entry) = map.live(key, now) {
                    return Ok(Lookup::Found(entry.value.clone()));
                }
                if map.live(claim, now).is_some() {
                    return Ok(Lookup::Busy);
                }
                self.insert(map, claim, b"1".to_vec(), Some(now + ttl), now)?;
                Ok(Lookup::Claimed)
            })
        })
    }

    fn windows<'a>(&'a self, counters: &'a [Counter]) -> BackendFuture<'a, Vec<Window>> {
        lazy(move || {
            self.with(|map, now| {
                // Read every counter first: all of them are applied or none.
                let mut current = Vec::with_capacity(counters.len());
                for counter in counters {
                    current.push(match map.live(&counter.key, now) {
                        Some(entry) => (Some(self::counter(&entry.value)?), entry.expires),
                        None => (None, None),
                    });
                }
                // Every check before the first write: all or none.
                for (counter, (value, _)) in counters.iter().zip(&current) {
                    add(value.unwrap_or(0), counter.delta)?;
                }
                let fits = counters
                    .iter()
                    .zip(&current)
                    .all(|(c, (value, _))| !c.passes_limit(value.unwrap_or(0)));
                let mut windows = Vec::with_capacity(counters.len());
                for (counter, (value, expires)) in counters.iter().zip(current) {
                    let reset_ms = |expires: Instant| {
                        expires.saturating_duration_since(now).as_millis() as u64
                    };
                    let window = match value {
                        // A refund or a read never starts a window.
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
                            let value = add(value.unwrap_or(0), counter.delta)?;
                            self.set_counter(map, &counter.key, value, Some(expires), now)?;
                            Window {
                                value,
                                applied: true,
                                reset_ms: reset_ms(expires),
                            }
                        }
                    };
                    windows.push(window);
                }
                Ok(windows)
            })
        })
    }

    fn healthy(&self) -> Option<bool> {
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn block<T>(future: BackendFuture<'_, T>) -> Result<T, BackendError> {
        futures_util::FutureExt::now_or_never(future).expect("the memory store never waits")
    }

    #[test]
    fn bounds_hold_and_evictions_are_counted() {
        let metrics = Metrics::new();
        let store = metrics.store("bounded");
        let backend = MemoryBackend::new(100, 1 << 20, store.clone());
        for n in 0..1000 {
            block(backend.set(&format!("k{n}"), b"v", None)).unwrap();
        }
        assert_eq!(store.keys.get(), 100);
        assert_eq!(store.evictions.get(), 900);
        let big = MemoryBackend::new(1000, 10_000, metrics.store("bytes"));
        for n in 0..100 {
            block(big.set(&format!("k{n}"), &[0; 1000], None)).unwrap();
        }
        assert!(matches!(
            block(big.set("huge", &[0; 20_000], None)),
            Err(BackendError::Invalid(_))
        ));
        let map = big.map.lock().unwrap();
        assert!(map.bytes <= 10_000, "{}", map.bytes);
        assert!(map.entries.len() < 10 && !map.entries.is_empty());
    }

    fn counter(key: &str, delta: i64, limit: Option<i64>) -> Counter {
        Counter {
            key: key.into(),
            delta,
            window: Duration::from_millis(200),
            limit,
        }
    }

    impl MemoryBackend {
        fn window(
            &self,
            key: &str,
            delta: i64,
            _window: Duration,
            limit: Option<i64>,
        ) -> BackendFuture<'static, Window> {
            let result = block(self.windows(&[counter(key, delta, limit)]));
            Box::pin(async move { result.map(|mut w| w.remove(0)) })
        }
    }

    #[test]
    fn several_windows_are_applied_all_or_none_and_refunds_never_open_one() {
        let backend = MemoryBackend::new(100, 1 << 20, Metrics::new().store("w"));
        let both = [counter("r", 1, Some(2)), counter("t", 10, Some(15))];
        let first = block(backend.windows(&both)).unwrap();
        assert!(first.iter().all(|w| w.applied));
        // The second would pass `t`'s limit: neither is added.
        let second = block(backend.windows(&both)).unwrap();
        assert!(second.iter().all(|w| !w.applied));
        assert_eq!((second[0].value, second[1].value), (1, 10));
        // A refund: always applied, and it never starts a window.
        let refund = [counter("t", -5, None), counter("absent", -5, None)];
        let refunded = block(backend.windows(&refund)).unwrap();
        assert_eq!((refunded[0].value, refunded[0].applied), (5, true));
        assert_eq!((refunded[1].value, refunded[1].reset_ms), (0, 0));
        assert_eq!(block(backend.get("absent")).unwrap(), None);
        assert!(block(backend.windows(&both)).unwrap()[1].applied);
    }

    #[test]
    fn windows_start_reset_and_respect_their_limit() {
        let backend = MemoryBackend::new(100, 1 << 20, Metrics::new().store("w"));
        let window = Duration::from_millis(200);
        let first = block(backend.window("c", 3, window, Some(5))).unwrap();
        assert_eq!((first.value, first.applied), (3, true));
        assert!(first.reset_ms <= 200);
        let refused = block(backend.window("c", 3, window, Some(5))).unwrap();
        assert_eq!((refused.value, refused.applied), (3, false));
        assert_eq!(block(backend.increment("c", 2)).unwrap(), 5);
        assert_eq!(block(backend.get("c")).unwrap(), Some(b"5".to_vec()));
        // Expire the window by hand: the next increment starts from zero.
        backend
            .map
            .lock()
            .unwrap()
            .entries
            .get_mut("c")
            .unwrap()
            .expires = Some(Instant::now() - Duration::from_millis(1));
        let again = block(backend.window("c", 1, window, Some(5))).unwrap();
        assert_eq!((again.value, again.applied), (1, true));
        block(backend.set("text", b"abc", None)).unwrap();
        assert!(matches!(
            block(backend.increment("text", 1)),
            Err(BackendError::Invalid(_))
        ));
    }

    #[test]
    fn a_batch_read_is_bounded_before_it_copies() {
        let backend = MemoryBackend::new(100, 64 << 20, Metrics::new().store("b"));
        block(backend.set("big", &vec![0; 1 << 20], None)).unwrap();
        let keys = vec!["big".to_string(); MAX_BATCH_REPLY_BYTES / (1 << 20) + 1];
        assert!(matches!(
            block(backend.get_many(&keys)),
            Err(BackendError::Invalid(_))
        ));
        assert_eq!(block(backend.get_many(&keys[..2])).unwrap().len(), 2);
    }

    #[test]
    fn swap_only_when_unchanged() {
        let backend = MemoryBackend::new(100, 1 << 20, Metrics::new().store("s"));
        assert!(block(backend.swap_if("k", None, b"1")).unwrap());
        assert!(!block(backend.swap_if("k", None, b"2")).unwrap());
        assert!(block(backend.swap_if("k", Some(b"1"), b"2")).unwrap());
        assert_eq!(block(backend.get("k")).unwrap(), Some(b"2".to_vec()));
    }
}
