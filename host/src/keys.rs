//! API keys for the bundled `auth` stage: how a key looks, how it is
//! stored, and the operations of the admin API (`/admin/keys`) and the
//! `orchestrator keys` command on the store that holds them.
//!
//! A key is `sk-orch-<id>-<secret>`: a 12-hex-digit id and a 48-hex-digit
//! (192-bit) secret from the operating system's random source. The store
//! [`KEYS_STORE`] holds, under `key:<id>`, a [`KeyRecord`] with the key's
//! SHA-256 and never the key itself: the secret is shown once, when the
//! key is created. A fast hash is enough for a random 192-bit secret (a
//! password hash is for guessable secrets). The `auth` stage reads the
//! record in one store round trip, hashes what the client presented and
//! compares the digests in constant time.
//!
//! Usage per key is counted by the `auth` stage's finish call into
//! epoch-aligned windows, `usage:<id>:<requests|tokens>:<minute|hour|day>:<n>`
//! where `n` is the Unix time in milliseconds divided by the window's
//! length; [`Keys::usage`] reads the current ones.
//!
//! Lifecycle: a [`Keys`] is made per operation over the current
//! configuration's store (cheap: it holds the store's `Arc`); records live
//! in the store, so every replica sharing a Redis store sees a created or
//! revoked key at its next request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::config::KEYS_STORE;
use crate::store::{Store, StoreError};

/// What every key starts with.
pub const KEY_PREFIX: &str = "sk-orch-";

/// The names a key's (or a rate limit rule's) limits may take.
pub const LIMIT_NAMES: [&str; 10] = [
    "requests_per_second",
    "requests_per_minute",
    "requests_per_hour",
    "requests_per_day",
    "requests_per_month",
    "tokens_per_second",
    "tokens_per_minute",
    "tokens_per_hour",
    "tokens_per_day",
    "tokens_per_month",
];

/// The usage windows [`Keys::usage`] reports, with their length in ms.
const USAGE_WINDOWS: [(&str, u64); 3] =
    [("minute", 60_000), ("hour", 3_600_000), ("day", 86_400_000)];

/// Most keys [`Keys::list`] returns.
pub const MAX_LISTED: usize = 10_000;

/// How long one key operation may take in all.
const DEADLINE: Duration = Duration::from_secs(5);

/// A key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The request to create a key is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record in the store is not a key record.
    #[error("the record of key `{id}` is not valid: {message}")]
    Corrupt {
        /// The key's id.
        id: String,
        /// What is wrong.
        message: String,
    },
}

/// A key as the store holds it (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The key's id (its public part; the store key's, if left out).
    #[serde(default)]
    pub id: String,
    /// SHA-256 of the whole key text, in lower-case hex.
    pub hash: String,
    /// Who calls with it: the principal the other stages, logs, traces
    /// and usage figures use.
    pub principal: String,
    /// A label for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The models it may use; empty: every model.
    #[serde(default, deserialize_with = "null_as_default")]
    pub models: Vec<String>,
    /// Limits of its own, applied by the `ratelimit` stage (see
    /// [`LIMIT_NAMES`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub limits: BTreeMap<String, u64>,
    /// When it stops working, in Unix seconds.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Refused while set.
    #[serde(default, deserialize_with = "null_as_default")]
    pub disabled: bool,
    /// When it was created, in Unix seconds.
    #[serde(default, deserialize_with = "null_as_default")]
    pub created_at: u64,
}

/// A field's default for `null` too (as the `auth` stage reads records).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// What a new key is to carry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Who calls with it (1 to 256 bytes).
    pub principal: String,
    /// A label for people.
    #[serde(default)]
    pub name: Option<String>,
    /// The models it may use; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Limits of its own.
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
    /// It stops working this many seconds after its creation.
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
    /// Created disabled.
    #[serde(default)]
    pub disabled: bool,
}

/// A change to a key (`PATCH /admin/keys/{id}`): each field given replaces
/// the record's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    /// Refuse it (`true`) or accept it again (`false`).
    #[serde(default)]
    pub disabled: Option<bool>,
    /// A new label.
    #[serde(default)]
    pub name: Option<String>,
    /// The models it may use (empty: every model).
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// Its own limits (empty: none).
    #[serde(default)]
    pub limits: Option<BTreeMap<String, u64>>,
    /// It stops working this many seconds from now.
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
}

impl KeyChange {
    /// Apply the change to `record`, checked as a new key's fields are.
    fn apply(&self, record: &mut KeyRecord) -> Result<(), KeyError> {
        let checked = NewKey {
            principal: record.principal.clone(),
            name: self.name.clone(),
            models: self.models.clone().unwrap_or_default(),
            limits: self.limits.clone().unwrap_or_default(),
            ..NewKey::default()
        };
        checked.check()?;
        if let Some(disabled) = self.disabled {
            record.disabled = disabled;
        }
        if let Some(name) = &self.name {
            record.name = Some(name.clone());
        }
        if let Some(models) = &self.models {
            record.models = models.clone();
        }
        if let Some(limits) = &self.limits {
            record.limits = limits.clone();
        }
        if let Some(seconds) = self.expires_in_seconds {
            record.expires_at = Some(now_secs().saturating_add(seconds));
        }
        Ok(())
    }
}

/// A key's use in the current windows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    /// Requests in the current minute, hour and day.
    pub requests: BTreeMap<&'static str, i64>,
    /// Backend tokens in the current minute, hour and day.
    pub tokens: BTreeMap<&'static str, i64>,
}

/// A new key: its record, and the key text (shown once).
#[derive(Debug, Clone)]
pub struct Created {
    /// The record the store holds.
    pub record: KeyRecord,
    /// The key: `sk-orch-<id>-<secret>`.
    pub key: String,
}

/// Hex SHA-256 of `key`: what a record holds and the `auth` stage
/// compares.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| KeyError::Invalid(format!("no random source: {e}")))?;
    Ok(hex::encode(buf))
}

impl NewKey {
    /// Check it, and make the key and its record (nothing is stored).
    pub fn make(self) -> Result<Created, KeyError> {
        self.check()?;
        let id = random_hex(6)?;
        let key = format!("{KEY_PREFIX}{id}-{}", random_hex(24)?);
        let created_at = now_secs();
        let record = KeyRecord {
            hash: hash_key(&key),
            id,
            principal: self.principal,
            name: self.name,
            models: self.models,
            limits: self.limits,
            expires_at: self
                .expires_in_seconds
                .map(|s| created_at.saturating_add(s)),
            disabled: self.disabled,
            created_at,
        };
        Ok(Created { record, key })
    }

    /// Whether its fields are valid.
    fn check(&self) -> Result<(), KeyError> {
        if self.principal.is_empty() || self.principal.len() > 256 {
            return Err(KeyError::Invalid("`principal` is 1 to 256 bytes".into()));
        }
        if self.name.as_ref().is_some_and(|n| n.len() > 256) {
            return Err(KeyError::Invalid("`name` is at most 256 bytes".into()));
        }
        if self.models.len() > 100 || self.models.iter().any(|m| m.is_empty() || m.len() > 256) {
            return Err(KeyError::Invalid(
                "`models` lists at most 100 model names of 1 to 256 bytes".into(),
            ));
        }
        if let Some((name, _)) = self
            .limits
            .iter()
            .find(|(name, value)| !LIMIT_NAMES.contains(&name.as_str()) || **value == 0)
        {
            return Err(KeyError::Invalid(format!(
                "limit `{name}`: limits are positive and named {}",
                LIMIT_NAMES.join(", ")
            )));
        }
        Ok(())
    }
}

/// The record of key `id` stored as `text`.
fn parse(id: &str, text: &[u8]) -> Result<KeyRecord, KeyError> {
    let mut record: KeyRecord = serde_json::from_slice(text).map_err(|e| KeyError::Corrupt {
        id: id.into(),
        message: e.to_string(),
    })?;
    if record.id.is_empty() {
        record.id = id.to_owned();
    }
    Ok(record)
}

/// Whether `id` looks like a key id (so it is safe in a store key).
pub fn valid_id(id: &str) -> bool {
    id.len() == 12
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The key operations on one store.
#[derive(Clone)]
pub struct Keys {
    store: Arc<Store>,
}

impl Keys {
    /// The keys held in `store`.
    pub fn new(store: Arc<Store>) -> Keys {
        Keys { store }
    }

    fn deadline() -> Instant {
        Instant::now() + DEADLINE
    }

    /// Create a key from `new` and store its record.
    pub async fn create(&self, new: NewKey) -> Result<Created, KeyError> {
        // Stored only where no key is: a new id never replaces another
        // key's record (a 48-bit id collides rarely, but it may).
        for _ in 0..3 {
            let created = new.clone().make()?;
            let text = serde_json::to_vec(&created.record)
                .map_err(|e| KeyError::Invalid(e.to_string()))?;
            let key = format!("key:{}", created.record.id);
            if self
                .store
                .swap_if(&key, None, &text, Self::deadline())
                .await?
            {
                return Ok(created);
            }
        }
        Err(KeyError::Invalid("no free key id after three tries".into()))
    }

    /// The record of key `id`, if there is one.
    pub async fn get(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let Some(text) = self
            .store
            .get(&format!("key:{id}"), Self::deadline())
            .await?
        else {
            return Ok(None);
        };
        parse(id, &text).map(Some)
    }

    /// Every key's record (at most [`MAX_LISTED`]), by id.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, KeyError> {
        let deadline = Self::deadline();
        let mut ids = Vec::new();
        let mut cursor = None;
        loop {
            let (keys, next) = self.store.list_keys(cursor.as_deref(), deadline).await?;
            ids.extend(
                keys.into_iter()
                    .filter_map(|k| k.strip_prefix("key:").map(str::to_owned))
                    .filter(|id| valid_id(id)),
            );
            cursor = next;
            if cursor.is_none() || ids.len() >= MAX_LISTED {
                break;
            }
        }
        ids.sort();
        ids.truncate(MAX_LISTED);
        let mut records = Vec::with_capacity(ids.len());
        for batch in ids.chunks(crate::store::MAX_BATCH) {
            let keys: Vec<String> = batch.iter().map(|id| format!("key:{id}")).collect();
            let values = self.store.get_many(&keys, deadline).await?;
            for (id, value) in batch.iter().zip(values) {
                // Revoked between the listing and the read: left out.
                let Some(text) = value else { continue };
                // One bad record does not hide the others: it is logged.
                match parse(id, &text) {
                    Ok(record) => records.push(record),
                    Err(error) => tracing::warn!(%error, "key record left out of the list"),
                }
            }
        }
        Ok(records)
    }

    /// Revoke key `id` (its record is deleted); whether it existed.
    pub async fn revoke(&self, id: &str) -> Result<bool, KeyError> {
        if !valid_id(id) {
            return Ok(false);
        }
        let key = format!("key:{id}");
        let existed = self.store.exists(&key, Self::deadline()).await?;
        self.store.delete(&[key], Self::deadline()).await?;
        Ok(existed)
    }

    /// Change key `id`; its new record, `None` if there is no such key.
    /// Written only if the record is still the one read (a change made
    /// meanwhile on another replica is not lost: the change is made again
    /// on it, up to three times).
    pub async fn change(
        &self,
        id: &str,
        change: &KeyChange,
    ) -> Result<Option<KeyRecord>, KeyError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let key = format!("key:{id}");
        for _ in 0..3 {
            let Some(old) = self.store.get(&key, Self::deadline()).await? else {
                return Ok(None);
            };
            let mut record = parse(id, &old)?;
            change.apply(&mut record)?;
            let text = serde_json::to_vec(&record).map_err(|e| KeyError::Invalid(e.to_string()))?;
            if self
                .store
                .swap_if(&key, Some(&old), &text, Self::deadline())
                .await?
            {
                return Ok(Some(record));
            }
        }
        Err(KeyError::Invalid(
            "the key changed three times while being changed; try again".into(),
        ))
    }

    /// Key `id`'s requests and tokens in the current minute, hour and day
    /// windows (as counted by the `auth` stage's finish calls).
    pub async fn usage(&self, id: &str) -> Result<KeyUsage, KeyError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut keys = Vec::new();
        for kind in ["requests", "tokens"] {
            for (unit, period) in USAGE_WINDOWS {
                keys.push(format!("usage:{id}:{kind}:{unit}:{}", now_ms / period));
            }
        }
        let values = self.store.get_many(&keys, Self::deadline()).await?;
        let mut usage = KeyUsage::default();
        let mut values = values.into_iter();
        for kind in ["requests", "tokens"] {
            for (unit, _) in USAGE_WINDOWS {
                let value = values
                    .next()
                    .flatten()
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
                    .unwrap_or(0);
                let table = if kind == "requests" {
                    &mut usage.requests
                } else {
                    &mut usage.tokens
                };
                table.insert(unit, value);
            }
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_has_its_hash_and_no_secret_in_the_record() {
        let created = NewKey {
            principal: "alice".into(),
            models: vec!["gpt".into()],
            limits: BTreeMap::from([("requests_per_minute".into(), 5)]),
            expires_in_seconds: Some(60),
            ..NewKey::default()
        }
        .make()
        .unwrap();
        let rest = created.key.strip_prefix(KEY_PREFIX).unwrap();
        let (id, secret) = rest.split_once('-').unwrap();
        assert!(valid_id(id));
        assert_eq!(secret.len(), 48);
        assert_eq!(created.record.hash, hash_key(&created.key));
        let text = serde_json::to_string(&created.record).unwrap();
        assert!(!text.contains(secret));
        assert_eq!(
            created.record.expires_at,
            Some(created.record.created_at + 60)
        );
    }

    #[test]
    fn invalid_keys_are_refused() {
        assert!(NewKey::default().make().is_err());
        let bad_limit = NewKey {
            principal: "a".into(),
            limits: BTreeMap::from([("requests_per_week".into(), 5)]),
            ..NewKey::default()
        };
        assert!(bad_limit.make().is_err());
        assert!(!valid_id("../../etc"));
    }
}
