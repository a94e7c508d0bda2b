//! How a check or run fails.

use crate::config::ConfigError;
use crate::inference::BackendSetupError;
use crate::wasm::{CallError, EngineError, LoadError};

/// Why a check or run failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthoringError {
    /// The configuration is unusable, or names no such stage.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The engine could not be created.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The configured backends could not be set up.
    #[error(transparent)]
    Backend(#[from] BackendSetupError),
    /// A key-value store of the configuration cannot be set up.
    #[error(transparent)]
    Store(#[from] crate::store::StoreSetupError),
    /// The plugin was refused; [`LoadError::report`] says why (the whole
    /// chain, so this error has no further source).
    #[error("{}", .0.report())]
    Load(LoadError),
    /// A call failed.
    #[error("the call failed: {0}")]
    Call(#[from] CallError),
    /// The input envelope is not usable.
    #[error("input: {0}")]
    Input(String),
    /// The bundled corpus could not be installed for `rag`.
    #[error("cannot write the bundled rag corpus: {0}")]
    Corpus(#[source] std::io::Error),
}

impl From<LoadError> for AuthoringError {
    fn from(error: LoadError) -> Self {
        AuthoringError::Load(error)
    }
}
