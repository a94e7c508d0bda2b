//! Host configuration: its types and defaults ([`Config`]), and the
//! `orchestrator.toml` file laid over them ([`Config::from_file`]).
//!
//! Owns what can be configured and what is valid; it must not act on a
//! configuration (nothing here opens a socket, reads a plugin or starts a
//! thread) and depends on no other module of the host.
//!
//! Every setting has a default, so the host runs with no file at all. A file
//! only needs the keys it changes. Unknown keys and invalid values are
//! errors that name the key (`stages.rag.workers: must be at least 1`), found
//! at startup rather than at the first request.
//!
//! A file is an *overlay*: tables are merged key by key over the defaults,
//! anything else replaces the default. So `[stages.rag] workers = 4`
//! changes the workers of `rag` and keeps its other defaults, including its
//! grants; within `capabilities`, each key given replaces that key's
//! default (a `dirs` list replaces the default list); the stage's `config`
//! table, `[backends]` and `[routing] models` are merged key by key. Each
//! setting is declared once, in the serde types of this module; the overlay
//! works on TOML tables, so it needs no mirror of them.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! metrics_listen = "127.0.0.1:9090"
//! request_timeout_ms = 30000
//!
//! # Inference backends and routing: the request's `model` picks a backend.
//! [backends.llama]
//! kind = "openai"                      # or "echo"
//! base_url = "http://127.0.0.1:8081/v1"
//! model = "gemma-3-270m"               # name sent upstream (default: the client's)
//!
//! [routing]
//! models = { gemma = "llama" }         # merged over the default `echo = "echo"`
//! # default = "llama"                  # backend for any model not listed
//!
//! [stages.rag]
//! workers = 2
//! queue_capacity = 1024
//! config = { top_k = 3 }
//! capabilities = { dirs = [{ host = "docs", guest = "/corpus" }] }
//! ```

mod backend;
mod file;
mod paths;
mod pipeline;
mod settings;
mod stage;
mod store;
mod traces;
mod validate;

pub use backend::{BackendConfig, BackendKind, RoutingConfig};
pub use paths::default_corpus_dir;
pub use pipeline::{DEFAULT_PIPELINE, ModelRoute, PipelineConfig};
pub use settings::{AdminToken, Config, ConfigError};
pub use stage::{
    Bundled, Capabilities, DirGrant, InstanceMode, KEYS_STORE, MAX_INTERNED, PluginSource,
    StageConfig, intern, interned_out, valid_name,
};
pub use store::{StoreConfig, StoreKind};
pub use traces::TracingConfig;
