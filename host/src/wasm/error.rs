//! How loading a plugin ([`LoadError`]) and calling it ([`CallError`]) fail.

use std::path::PathBuf;

use crate::metrics::ErrorType;

/// An error from wasmtime or the file system, kept as the source of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a plugin could not be loaded. The lower-level error behind it, if
/// any, is its [`source`](std::error::Error::source); [`report`](Self::report)
/// renders the whole chain on one line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The plugin could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes are not WebAssembly.
    #[error("not a WebAssembly file (it starts with {0:02x?}, not \\0asm)")]
    NotWasm(Vec<u8>),
    /// The file is a native executable or library: built for the host
    /// rather than for WebAssembly.
    #[error(
        "{0}, not a WebAssembly component: build the plugin with `cargo build --release --target wasm32-wasip2` and use target/wasm32-wasip2/release/<crate>.wasm"
    )]
    NativeBinary(&'static str),
    /// A core module was given where a component is needed.
    #[error(
        "a core WebAssembly module, not a component: build the plugin with `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    /// wasmtime refused to compile the component.
    #[error("invalid component")]
    Compile(#[source] BoxError),
    /// The component imports something its stage is not granted.
    #[error("the plugin imports `{import}`, which this stage is not granted: {remedy}")]
    NotGranted {
        /// The import's name.
        import: String,
        /// What would grant it, if anything can.
        remedy: String,
    },
    /// The component implements none of the stage worlds.
    #[error(
        "the component implements none of the stage worlds of orchestrator:pipeline \
         (`stage`, `request-stage`: exports init and process; `streaming-stage`, \
         `streaming-request-stage`: also process-chunk): {reason}; it exports {}",
        list_exports(exports)
    )]
    WrongWorld {
        /// What is missing or mistyped.
        reason: String,
        /// What the component exports instead.
        exports: Vec<String>,
        /// The linker's error, when linking its imports failed.
        source: Option<BoxError>,
    },
    /// The validation instance could not be created.
    #[error("cannot instantiate")]
    Instantiate(#[source] CallError),
    /// The plugin's `init` refused the configuration or failed.
    #[error("init failed: {0}")]
    Init(String),
}

/// `exports` as `` `a`, `b` ``, or `nothing`.
fn list_exports(exports: &[String]) -> String {
    if exports.is_empty() {
        return "nothing".into();
    }
    exports
        .iter()
        .map(|e| format!("`{e}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl LoadError {
    /// The error and its sources, on one line (`a: b: c`), for logs and
    /// API answers.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// A short machine-readable name of the failure (the admin API's error
    /// `code`).
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::Read { .. } => "unreadable",
            LoadError::NotWasm(_) => "not_wasm",
            LoadError::NativeBinary(_) => "native_binary",
            LoadError::CoreModule => "core_module",
            LoadError::Compile(_) => "invalid_component",
            LoadError::NotGranted { .. } => "not_granted",
            LoadError::WrongWorld { .. } => "wrong_world",
            LoadError::Instantiate(_) => "instantiate_failed",
            LoadError::Init(_) => "init_failed",
        }
    }
}

/// Why a plugin call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", error_type.label())]
pub struct CallError {
    /// The cause, as the metrics label.
    pub error_type: ErrorType,
    /// A human-readable description.
    pub message: String,
}

impl CallError {
    /// An error of `error_type`.
    pub fn new(error_type: ErrorType, message: impl Into<String>) -> CallError {
        CallError {
            error_type,
            message: message.into(),
        }
    }

    /// Whether the instance that produced this error must be discarded:
    /// after a trap its state is undefined, and an instance that built an
    /// oversized result holds that memory until it is dropped.
    pub fn poisons_instance(&self) -> bool {
        matches!(
            self.error_type,
            ErrorType::Trap
                | ErrorType::Timeout
                | ErrorType::Memory
                | ErrorType::Fuel
                | ErrorType::OutputTooLarge
                | ErrorType::Instantiate
        )
    }
}
