//! Key-value stores (`[stores.<name>]`): what a stage granted a store
//! (`capabilities.stores`) opens with `wasi:keyvalue/store.open`.

use serde::{Deserialize, Serialize};

/// Which backend holds a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this process: bounded, lost at exit, not shared between
    /// replicas. The default, and what a granted store that is not
    /// declared gets.
    #[default]
    Memory,
    /// A Redis server (or a compatible one: Valkey, KeyDB), shared by
    /// every replica that names it.
    Redis,
}

/// One store's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The backend.
    pub kind: StoreKind,
    /// `redis://[user:password@]host:port/db` (or `rediss://`), for
    /// `redis`.
    pub url: Option<String>,
    /// The name of an environment variable holding the URL (for a URL with
    /// a password); wins over `url`.
    pub url_env: Option<String>,
    /// Prefix of every key in the backend: a key `k` of store `s` is
    /// `<key_prefix><s>:k`.
    pub key_prefix: String,
    /// Longest one operation may take, in milliseconds; past it the call
    /// gets an error (never longer than the stage call's own deadline).
    pub timeout_ms: u64,
    /// `memory`: most keys held; past it, keys are evicted (counted).
    pub max_keys: u64,
    /// `memory`: most bytes of keys and values held; past it, keys are
    /// evicted (counted).
    pub max_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Memory,
            url: None,
            url_env: None,
            key_prefix: "orchestrator:".into(),
            timeout_ms: 50,
            max_keys: 100_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl StoreConfig {
    /// The Redis URL: from `url_env` if set (`None` if that variable is
    /// unset), else `url`.
    pub fn resolved_url(&self) -> Option<String> {
        match &self.url_env {
            Some(name) => std::env::var(name).ok(),
            None => self.url.clone(),
        }
    }
}
