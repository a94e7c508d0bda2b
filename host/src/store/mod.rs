//! Key-value stores for stages: the backends behind the `wasi:keyvalue`
//! and `orchestrator:pipeline/expiring` imports.
//!
//! Owns the stores a configuration declares ([`Stores`], built at startup
//! and at each reload, keeping every store whose settings did not change),
//! one named store's operations with its deadline and metrics ([`Store`]),
//! and the backends behind the [`Backend`] trait: [`memory`] (in this
//! process, bounded) and [`redis`] (shared by every replica). It knows
//! nothing of plugins or grants: the wasm host functions check a stage's
//! grant before they open a store.
//!
//! # Lifecycle
//!
//! A store is built when a configuration that declares or grants it is
//! planned; a `redis` store connects at its first operation, not at
//! startup, so a Redis that is down delays nothing and its operations fail
//! fast until it is back (the client reconnects by itself). A reload keeps
//! each store whose settings are unchanged (a memory store keeps its keys);
//! one whose settings changed is built anew, and the old one is dropped when
//! the last request using it ends.
//!
//! # Keys and values
//!
//! A key `k` of store `s` is `<key_prefix><s>:k` in the backend, so stores
//! sharing a Redis database never see each other's keys. Values are bytes.
//! Counters (`atomics.increment`, `expiring.increment`) are the decimal
//! text of a signed 64-bit integer on every backend, so a counter written
//! through one backend reads the same through another (and from
//! `redis-cli`).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::time::{Duration, Instant};
//! use orchestrator::config::StoreConfig;
//! use orchestrator::metrics::Metrics;
//! use orchestrator::store::Store;
//!
//! let metrics = Metrics::new();
//! let store = Store::build("limits", &StoreConfig::default(), &metrics).unwrap();
//! let deadline = Instant::now() + Duration::from_secs(1);
//! let window = store
//!     .window("alice", 5, Duration::from_secs(60), Some(8), deadline)
//!     .await
//!     .unwrap();
//! assert_eq!((window.value, window.applied), (5, true));
//! let over = store
//!     .window("alice", 5, Duration::from_secs(60), Some(8), deadline)
//!     .await
//!     .unwrap();
//! assert_eq!((over.value, over.applied), (5, false));
//! assert_eq!(store.get("alice", deadline).await.unwrap(), Some(b"5".to_vec()));
//! # });
//! ```

mod backend;
mod holds;
pub mod memory;
pub mod redis;

pub use backend::{
    Backend, BackendError, BackendFuture, Counter, Lookup, MAX_BATCH_REPLY_BYTES, Window,
};
pub(crate) use holds::{Held, Holds};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, StoreConfig, StoreKind};
use crate::metrics::{Metrics, StoreMetrics, StoreOp, StoreOutcome};

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Longest window or claim: 400 days (a monthly quota's window is 30).
pub const MAX_TTL: Duration = Duration::from_secs(400 * 86_400);

/// Most keys in one batch operation.
pub const MAX_BATCH: usize = 100;

/// Why a store operation failed. The plugin sees the message as
/// `wasi:keyvalue/store.error.other`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or failed.
    #[error("store `{store}` is unavailable: {message}")]
    Unavailable {
        /// The store.
        store: String,
        /// What went wrong.
        message: String,
    },
    /// The operation did not finish within the store's `timeout_ms` or the
    /// call's deadline.
    #[error("store `{store}` did not answer within {ms} ms")]
    Timeout {
        /// The store.
        store: String,
        /// The time allowed.
        ms: u64,
    },
    /// The operation is not valid (a key too long, a counter that holds
    /// something else than an integer, ...).
    #[error("{0}")]
    Invalid(String),
}

/// One named store: a backend, its key prefix, its operation deadline and
/// its metrics.
pub struct Store {
    name: String,
    settings: StoreConfig,
    prefix: String,
    timeout: Duration,
    backend: Box<dyn Backend>,
    metrics: StoreMetrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("name", &self.name)
            .field("kind", &self.settings.kind)
            .finish()
    }
}

/// A store's state, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreHealth {
    /// `memory` or `redis`.
    pub kind: &'static str,
    /// `up`, `down`, or `unknown` before the first operation.
    pub state: &'static str,
}

impl Store {
    /// Build store `name` with `settings` (a `redis` store does not connect
    /// yet). Fails only on settings the backend cannot use (a malformed
    /// URL, an unset `url_env`).
    pub fn build(
        name: &str,
        settings: &StoreConfig,
        metrics: &Metrics,
    ) -> Result<Store, StoreSetupError> {
        let store_metrics = metrics.store(name);
        let backend: Box<dyn Backend> = match settings.kind {
            StoreKind::Memory => Box::new(memory::MemoryBackend::new(
                settings.max_keys,
                settings.max_bytes,
                store_metrics.clone(),
            )),
            StoreKind::Redis => {
                let url = settings.resolved_url().ok_or_else(|| StoreSetupError {
                    store: name.to_string(),
                    message: match &settings.url_env {
                        Some(var) => format!("the environment variable `{var}` is not set"),
                        None => "no url".into(),
                    },
                })?;
                let timeout = Duration::from_millis(settings.timeout_ms);
                Box::new(redis::RedisBackend::new(&url, timeout).map_err(|message| {
                    StoreSetupError {
                        store: name.to_string(),
                        message,
                    }
                })?)
            }
        };
        Ok(Store {
            name: name.to_string(),
            prefix: format!("{}{name}:", settings.key_prefix),
            timeout: Duration::from_millis(settings.timeout_ms),
            settings: settings.clone(),
            backend,
            metrics: store_metrics,
        })
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its state, for `/health`.
    pub fn health(&self) -> StoreHealth {
        StoreHealth {
            kind: match self.settings.kind {
                StoreKind::Memory => "memory",
                StoreKind::Redis => "redis",
            },
            state: match self.backend.healthy() {
                None => "unknown",
                Some(true) => "up",
                Some(false) => "down",
            },
        }
    }

    fn key(&self, key: &str) -> Result<String, StoreError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(StoreError::Invalid(format!(
                "a key is at most {MAX_KEY_BYTES} bytes; this one is {}",
                key.len()
            )));
        }
        let mut prefixed = String::with_capacity(self.prefix.len() + key.len());
        prefixed.push_str(&self.prefix);
        prefixed.push_str(key);
        Ok(prefixed)
    }

    fn keys(&self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        if keys.len() > MAX_BATCH {
            return Err(StoreError::Invalid(format!(
                "a batch is at most {MAX_BATCH} keys; this one is {}",
                keys.len()
            )));
        }
        keys.iter().map(|k| self.key(k)).collect()
    }

    fn value(value: &[u8]) -> Result<(), StoreError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(StoreError::Invalid(format!(
                "a value is at most {MAX_VALUE_BYTES} bytes; this one is {}",
                value.len()
            )));
        }
        Ok(())
    }

    /// Run one backend operation within the store's timeout and
    /// `deadline`, counted and timed.
    async fn run<T>(
        &self,
        op: StoreOp,
        deadline: Instant,
        operation: BackendFuture<'_, T>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let limit = self
            .timeout
            .min(deadline.saturating_duration_since(started));
        let result = match tokio::time::timeout(limit, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(BackendError::Unavailable(message))) => Err(StoreError::Unavailable {
                store: self.name.clone(),
                message,
            }),
            Ok(Err(BackendError::Invalid(message))) => Err(StoreError::Invalid(message)),
            Err(_) => {
                self.backend.timed_out();
                Err(StoreError::Timeout {
                    store: self.name.clone(),
                    ms: limit.as_millis() as u64,
                })
            }
        };
        let outcome = match &result {
            Ok(_) => StoreOutcome::Ok,
            Err(StoreError::Unavailable { .. }) => StoreOutcome::Error,
            Err(StoreError::Timeout { .. }) => StoreOutcome::Timeout,
            Err(StoreError::Invalid(_)) => StoreOutcome::Invalid,
        };
        self.metrics.record(op, outcome, started.elapsed());
        result
    }

    /// The value of `key`.
    pub async fn get(&self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(key)?;
        self.run(StoreOp::Get, deadline, self.backend.get(&key))
            .await
    }

    /// Set `key` to `value`, expiring after `ttl` if given.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let key = self.key(key)?;
        Self::value(value)?;
        self.run(StoreOp::Set, deadline, self.backend.set(&key, value, ttl))
            .await
    }

    /// Delete `keys`.
    pub async fn delete(&self, keys: &[String], deadline: Instant) -> Result<(), StoreError> {
        let keys = self.keys(keys)?;
        self.run(StoreOp::Delete, deadline, self.backend.delete(&keys))
            .await
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str, deadline: Instant) -> Result<bool, StoreError> {
        let key = self.key(key)?;
        self.run(StoreOp::Exists, deadline, self.backend.exists(&key))
            .await
    }

    /// The values of `keys`, in order.
    pub async fn get_many(
        &self,
        keys: &[String],
        deadline: Instant,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let full = self.keys(keys)?;
        self.run(StoreOp::GetMany, deadline, self.backend.get_many(&full))
            .await
    }

    /// Set every pair.
    pub async fn set_many(
        &self,
        pairs: &[(String, Vec<u8>)],
        deadline: Instant,
    ) -> Result<(), StoreError> {
        if pairs.len() > MAX_BATCH {
            return Err(StoreError::Invalid(format!(
                "a batch is at most {MAX_BATCH} keys"
            )));
        }
        let pairs = pairs
            .iter()
            .map(|(k, v)| {
                Self::value(v)?;
                Ok((self.key(k)?, v.clone()))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.run(StoreOp::SetMany, deadline, self.backend.set_many(&pairs))
            .await
    }

    /// A page of the store's keys (without the prefix) and the cursor of
    /// the next page.
    pub async fn list_keys(
        &self,
        cursor: Option<&str>,
        deadline: Instant,
    ) -> Result<(Vec<String>, Option<String>), StoreError> {
        let (keys, next) = self
            .run(
                StoreOp::ListKeys,
                deadline,
                self.backend.list_keys(&self.prefix, cursor),
            )
            .await?;
        let keys = keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string))
            .collect();
        Ok((keys, next))
    }

    /// Add `delta` to the counter `key`; its new value.
    pub async fn increment(
        &self,
        key: &str,
        delta: i64,
        deadline: Instant,
    ) -> Result<i64, StoreError> {
        let key = self.key(key)?;
        self.run(
            StoreOp::Increment,
            deadline,
            self.backend.increment(&key, delta),
        )
        .await
    }

    /// Set `key` to `value` only if it still holds `expected` (`None`: is
    /// still absent); whether it did.
    pub async fn swap_if(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        deadline: Instant,
    ) -> Result<bool, StoreError> {
        let key = self.key(key)?;
        Self::value(value)?;
        self.run(
            StoreOp::Swap,
            deadline,
            self.backend.swap_if(&key, expected, value),
        )
        .await
    }

    /// The value of `key`; if it is absent, claim the right to produce it
    /// (set `claim` for `ttl` unless it is set): one atomic operation.
    pub async fn get_or_claim(
        &self,
        key: &str,
        claim: &str,
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Lookup, StoreError> {
        let (key, claim) = (self.key(key)?, self.key(claim)?);
        if ttl > MAX_TTL {
            return Err(StoreError::Invalid("a claim lives at most 400 days".into()));
        }
        self.run(
            StoreOp::GetOrClaim,
            deadline,
            self.backend
                .get_or_claim(&key, &claim, ttl.max(Duration::from_millis(1))),
        )
        .await
    }

    /// Add `delta` to the windowed counter `key`, atomically: a key that
    /// is absent (or expired) starts at 0 with a window of `window`, which
    /// later increments do not extend; with a `limit`, a positive `delta`
    /// is added only if the value stays at most `limit`. A delta of zero
    /// or less never starts a window.
    pub async fn window(
        &self,
        key: &str,
        delta: i64,
        window: Duration,
        limit: Option<i64>,
        deadline: Instant,
    ) -> Result<Window, StoreError> {
        let counter = [Counter {
            key: key.to_owned(),
            delta,
            window,
            limit,
        }];
        let mut windows = self.windows(&counter, deadline).await?;
        windows
            .pop()
            .ok_or_else(|| StoreError::Invalid("the store answered no window".into()))
    }

    /// [`Store::window`] on several counters (at most [`MAX_BATCH`]) as one
    /// atomic operation: every delta is added only if no counter passes
    /// its limit; otherwise none is, and every window says `applied:
    /// false`. One round trip on every backend.
    pub async fn windows(
        &self,
        counters: &[Counter],
        deadline: Instant,
    ) -> Result<Vec<Window>, StoreError> {
        if counters.len() > MAX_BATCH {
            return Err(StoreError::Invalid(format!(
                "at most {MAX_BATCH} counters at once"
            )));
        }
        let mut prefixed = Vec::with_capacity(counters.len());
        for (at, counter) in counters.iter().enumerate() {
            if counter.window.is_zero() || counter.window > MAX_TTL {
                return Err(StoreError::Invalid(format!(
                    "a window is 1 ms to {} days",
                    MAX_TTL.as_secs() / 86_400
                )));
            }
            if counters[..at].iter().any(|c| c.key == counter.key) {
                return Err(StoreError::Invalid(format!(
                    "the counter `{}` is named twice in one call",
                    counter.key.escape_debug()
                )));
            }
            prefixed.push(Counter {
                key: self.key(&counter.key)?,
                delta: counter.delta,
                window: counter.window,
                limit: counter.limit,
            });
        }
        self.run(StoreOp::Window, deadline, self.backend.windows(&prefixed))
            .await
    }
}

/// A store's settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("store `{store}`: {message}")]
pub struct StoreSetupError {
    /// The store.
    pub store: String,
    /// What is wrong.
    pub message: String,
}

/// The stores of one configuration, by name: every declared store, and a
/// memory store for each granted name that is not declared.
#[derive(Debug, Default, Clone)]
pub struct Stores {
    by_name: BTreeMap<String, Arc<Store>>,
}

impl Stores {
    /// Build the stores of `config`, keeping those of `previous` whose
    /// settings are unchanged.
    pub fn reusing(
        config: &Config,
        metrics: &Metrics,
        previous: Option<&Stores>,
    ) -> Result<Stores, StoreSetupError> {
        let mut names: Vec<&str> = config.stores.keys().map(String::as_str).collect();
        for stage in config.stages_in_use() {
            names.extend(stage.capabilities.stores.iter().map(String::as_str));
        }
        names.sort_unstable();
        names.dedup();
        let mut by_name = BTreeMap::new();
        for name in names {
            let settings = config.store(name);
            let kept = previous
                .and_then(|p| p.by_name.get(name))
                .filter(|s| s.settings == settings);
            let store = match kept {
                Some(store) => store.clone(),
                None => Arc::new(Store::build(name, &settings, metrics)?),
            };
            by_name.insert(name.to_string(), store);
        }
        Ok(Stores { by_name })
    }

    /// Store `name`, if the configuration has it.
    pub fn get(&self, name: &str) -> Option<&Arc<Store>> {
        self.by_name.get(name)
    }

    /// Every store's state, for `/health`.
    pub fn health(&self) -> BTreeMap<String, StoreHealth> {
        self.by_name
            .iter()
            .map(|(name, store)| (name.clone(), store.health()))
            .collect()
    }
}
