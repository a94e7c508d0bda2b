//! # Writing orchestrator stage plugins in Rust
//!
//! A stage plugin is a WebAssembly component that the orchestrator host
//! loads at run time and calls once per request (and, for a streaming
//! stage, once per chunk of a streamed completion). This crate is
//! everything a Rust plugin needs:
//!
//! - the WIT bindings of `orchestrator:pipeline@0.2.2` (the `wit/`
//!   directory of the orchestrator repository), generated here so a plugin
//!   does not copy the WIT or pick a `wit-bindgen` version;
//! - the [`Stage`] and [`StreamingStage`] traits, with typed configuration
//!   ([`Stage::Config`], any `serde` type; see [`config`]);
//! - [`export_stage!`] and [`export_streaming_stage!`], which export a type
//!   as the plugin and keep its instance;
//! - the [`Request`] a stage works on: the client's chat as it was sent
//!   ([`Message`]s with roles and [`Content`] as text or parts, [`Tool`]s,
//!   [`GenerationParams`] where `None` means the client said nothing), the
//!   answer ([`Request::completion`], [`Request::tool_calls`],
//!   [`Request::refusal`], [`Request::finish_reason`], [`Usage`]), notes
//!   ([`Request::set_notes`]) and generation ([`Request::generate`],
//!   [`Request::generate_stream`], for a stage with [`Stage::INFERENCE`]);
//! - helpers on those types ([`Message::new`], [`Message::text`],
//!   [`Content::text`], `StageError::from(InferenceError)`, ...);
//! - state and identity: key-value stores ([`store`]), the caller's
//!   headers and address ([`Request::header`], [`Request::client_address`]),
//!   the principal ([`Request::set_principal`]), answering early
//!   ([`Request::answer`]), refusals ([`Request::refuse`]), response headers
//!   ([`Request::set_response_header`]) and the finish call
//!   ([`Stage::finish`]);
//! - the chunk path ([`Chunk`], [`ChunkOutput`], [`Chunk::complete_words`]),
//!   logging ([`log`]) with a panic hook that sends panic messages to the
//!   host;
//! - [`testing`]: a native [`TestRequest`](testing::TestRequest), with a
//!   scripted generation, and a stream driver, so a stage is unit-tested
//!   with a plain `cargo test`.
//!
//! ## A stage
//!
//! ```
//! use orchestrator_plugin::{Request, Stage, StageError};
//! use serde::Deserialize;
//!
//! /// Replaces configured words in the completion.
//! struct Profanity {
//!     words: Vec<String>,
//! }
//!
//! #[derive(Deserialize)]
//! #[serde(default)]
//! struct Config {
//!     /// `words = "darn, heck"` in the stage's `config` table.
//!     words: Vec<String>,
//! }
//!
//! impl Default for Config {
//!     fn default() -> Self {
//!         Config { words: vec!["darn".into()] }
//!     }
//! }
//!
//! impl Stage for Profanity {
//!     type Config = Config;
//!
//!     fn init(config: Config) -> Result<Self, orchestrator_plugin::InitError> {
//!         Ok(Profanity { words: config.words })
//!     }
//!
//!     fn process(&self, request: &dyn Request) -> Result<(), StageError> {
//!         let mut text = request.completion();
//!         for word in &self.words {
//!             text = text.replace(word.as_str(), &"*".repeat(word.len()));
//!         }
//!         request.set_completion(&text);
//!         request.set_notes(&[("profanity.messages", &request.messages().len())]);
//!         Ok(())
//!     }
//! }
//!
//! orchestrator_plugin::export_stage!(Profanity);
//!
//! # use orchestrator_plugin::testing::TestRequest;
//! let stage = Profanity::init(Config::default()).unwrap();
//! let request = TestRequest::new().with_user("hi").with_completion("oh darn");
//! stage.process(&request).unwrap();
//! assert_eq!(request.completion(), "oh ****");
//! assert_eq!(request.note("profanity.messages").as_deref(), Some("1"));
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (or `cargo
//! component build --release`), from a crate with `crate-type =
//! ["cdylib"]`; `orchestrator plugin new` writes such a crate.
//!
//! ## Lifecycle
//!
//! The host creates instances of the component as the stage's
//! `instance_mode` setting says: `"reuse"` (the default: an instance goes
//! back to a pool after each call and serves many requests) or
//! `"per-request"` (a fresh instance for every request). In each instance
//! [`Stage::init`] runs once, with the stage's configuration, before any
//! call; an error (or a panic) there makes the plugin fail to load, with
//! the message in the host's error. Then `process` runs once per request,
//! and [`StreamingStage::process_chunk`] once per chunk of a streamed
//! completion. A stage keeps its configuration in `self`; it must keep
//! per-request state in the request (notes) or in the chunk's carry, never
//! in the instance, because any instance may serve any request.

#![warn(missing_docs)]

extern crate self as orchestrator_plugin;

#[doc(hidden)]
pub mod bindings;
pub mod config;
pub mod log;
mod request;
pub mod store;
mod stream;
pub mod testing;
mod types;

pub use bindings::streaming::orchestrator::pipeline::inference::InferenceError;
pub use bindings::streaming::orchestrator::pipeline::streaming::{ChunkContext, ChunkOutput};
pub use bindings::streaming::orchestrator::pipeline::types::{
    Content, ContentPart, GenerationParams, ImageUrl, Message, Outcome, OutcomeKind, Passage,
    Refusal, RefusalKind, Route, StageError, Tool, ToolCall, Usage,
};
pub use request::{Request, STREAM_NOTE};
pub use stream::Chunk;

/// Why a stage's [`init`](Stage::init) failed: any error, or a string
/// (`Err("corpus is empty".into())`). Its text becomes the `init_failed`
/// error the host reports.
pub type InitError = Box<dyn std::error::Error + Send + Sync>;

/// A pipeline stage: called once per request with the request's handle.
pub trait Stage: Sized + 'static {
    /// The stage's configuration: the `config` table of its
    /// `[stages.<name>]` section, deserialized as [`config`] describes. Use
    /// `()` for a stage that takes none.
    type Config: serde::de::DeserializeOwned;

    /// Build the stage from its configuration, once per instance, before
    /// any call.
    ///
    /// # Errors
    ///
    /// Any error: the plugin then fails to load (at startup, on hot swap,
    /// on `orchestrator plugin check`), with this message.
    fn init(config: Self::Config) -> Result<Self, InitError>;

    /// Whether the stage generates ([`Request::generate`],
    /// [`Request::generate_stream`]). Only a stage that says `true` imports
    /// the host's `orchestrator:pipeline/inference` interface; in any
    /// other, those calls return [`InferenceError::Unavailable`] without
    /// reaching the host (a [`TestRequest`](testing::TestRequest) answers
    /// them either way). The host answers them only for a stage configured
    /// with `inference = true`.
    const INFERENCE: bool = false;

    /// Transform the request, in place. For a stage after `inference` in a
    /// request that does not stream, the completion is all there.
    ///
    /// # Errors
    ///
    /// A [`StageError`]: the request fails with the matching HTTP status
    /// (400 for `invalid-input`, 502 for `upstream`, 503 for
    /// `upstream-unavailable`, 504 for `upstream-timeout`, 500 otherwise), and
    /// the case becomes the `error_type` label of
    /// `orchestrator_errors_total`.
    fn process(&self, request: &dyn Request) -> Result<(), StageError>;

    /// Called once per request after it ended — the answer complete, or
    /// the request refused, failed or cancelled (see [`Outcome`]) — for a
    /// stage exported with `finish` (`export_stage!(MyStage, finish)`),
    /// off the client's latency path. The request is its final state; what
    /// this sets changes nothing the client sees. Where a rate limiter
    /// settles a reservation and a cache stores an answer. Does nothing by
    /// default.
    fn finish(&self, request: &dyn Request, outcome: &Outcome) {
        let _ = (request, outcome);
    }
}

/// A stage that also transforms a streamed completion chunk by chunk (the
/// `streaming-request-stage` world).
///
/// In a streamed request, the streaming stages after the one that started
/// the generation get the text delta by delta through
/// [`process_chunk`](Self::process_chunk) instead of one `process` call.
/// Both paths must give the same text: a client should not see a
/// difference between a streamed and a plain answer.
pub trait StreamingStage: Stage {
    /// Transform one chunk; see [`Chunk`] and [`ChunkOutput`].
    ///
    /// # Errors
    ///
    /// A [`StageError`]: the stream ends with an error event.
    fn process_chunk(&self, chunk: Chunk) -> Result<ChunkOutput, StageError>;
}

/// The raw `inference` import: `generate(&handle)` and
/// `generate_stream(&handle)` on the host's request handle. A stage
/// normally calls [`Request::generate`] and [`Request::generate_stream`]
/// instead. Calls answer only at a position the host configures with
/// `inference = true` (any other stage's calls fail). Available only inside
/// a plugin (natively these functions panic), and a plugin that names them
/// imports the interface.
pub mod inference {
    pub use crate::bindings::streaming::orchestrator::pipeline::inference::{
        InferenceError, generate, generate_stream,
    };
}

/// Export `$stage`, a [`Stage`], as the plugin (the `request-stage`
/// world; with `finish`, the `finishing-request-stage` world, whose
/// [`Stage::finish`] the host calls after each request). Invoke it once, at
/// the top level of the plugin crate.
#[macro_export]
macro_rules! export_stage {
    ($stage:ty) => {
        $crate::__export_world!($stage, plain, __export_request_stage, {});
    };
    ($stage:ty, finish) => {
        $crate::__export_world!($stage, finishing, __export_finishing_request_stage, {
            $crate::__finish_export!($stage, finishing);
        });
    };
}

/// The `finish` export, calling [`Stage::finish`].
#[doc(hidden)]
#[macro_export]
macro_rules! __finish_export {
    ($stage:ty, $world:ident) => {
        fn finish(request: &$crate::bindings::$world::Request, outcome: $crate::Outcome) {
            let request =
                $crate::__private::HostRequest::<{ <$stage as $crate::Stage>::INFERENCE }>(request);
            $crate::__private::finish::<$stage>(&STAGE, &request, &outcome)
        }
    };
}

/// Export `$stage`, a [`StreamingStage`], as the plugin (the
/// `streaming-request-stage` world; with `finish`, the
/// `finishing-streaming-request-stage` world). Invoke it once, at the top level of
/// the plugin crate.
#[macro_export]
macro_rules! export_streaming_stage {
    ($stage:ty) => {
        $crate::__export_world!($stage, streaming, __export_streaming_request_stage, {
            $crate::__process_chunk_export!($stage);
        });
    };
    ($stage:ty, finish) => {
        $crate::__export_world!(
            $stage,
            finishing_streaming,
            __export_finishing_streaming_request_stage,
            {
                $crate::__process_chunk_export!($stage);
                $crate::__finish_export!($stage, finishing_streaming);
            }
        );
    };
}

/// The `process-chunk` export, calling [`StreamingStage::process_chunk`].
#[doc(hidden)]
#[macro_export]
macro_rules! __process_chunk_export {
    ($stage:ty) => {
        #[allow(clippy::too_many_arguments)]
        fn process_chunk(
            context: $crate::ChunkContext,
            carry: ::std::string::String,
            delta: ::std::string::String,
            last: bool,
        ) -> ::std::result::Result<$crate::ChunkOutput, $crate::StageError> {
            $crate::__private::process_chunk::<$stage>(
                &STAGE,
                $crate::Chunk {
                    context,
                    carry,
                    delta,
                    last,
                },
            )
        }
    };
}

/// The part of the export macros both worlds share: the instance's stage,
/// `init` and `process`, and the world's generated export macro.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_world {
    ($stage:ty, $world:ident, $export:ident, { $($extra:item)* }) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static STAGE: ::std::cell::OnceCell<$stage> = const { ::std::cell::OnceCell::new() };
            }
            struct Export;
            impl $crate::bindings::$world::Guest for Export {
                fn init(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>)
                    -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$stage>(&STAGE, config)
                }
                fn process(request: &$crate::bindings::$world::Request)
                    -> ::std::result::Result<(), $crate::StageError> {
                    // The stage's `INFERENCE` as a const generic: for
                    // `false` the inference import is not compiled in.
                    let request = $crate::__private::HostRequest::<
                        { <$stage as $crate::Stage>::INFERENCE },
                    >(request);
                    $crate::__private::process::<$stage>(&STAGE, &request)
                }
                $($extra)*
            }
            $crate::bindings::$world::$export!(Export with_types_in $crate::bindings::$world);
        };
    };
}

/// What the export macros expand to call. Not a stable interface.
#[doc(hidden)]
pub mod __private {
    use std::cell::OnceCell;
    use std::thread::LocalKey;

    pub use wit_bindgen;

    pub use crate::request::HostRequest;

    use crate::{Chunk, ChunkOutput, Outcome, Request, Stage, StageError, StreamingStage};

    pub type Slot<S> = LocalKey<OnceCell<S>>;

    pub fn init<S: Stage>(
        slot: &'static Slot<S>,
        config: Vec<(String, String)>,
    ) -> Result<(), String> {
        crate::log::install_panic_hook();
        let config = crate::config::from_pairs::<S::Config>(config).map_err(|e| e.to_string())?;
        let stage = S::init(config).map_err(|e| e.to_string())?;
        slot.with(|cell| cell.set(stage).map_err(|_| "init called twice".to_string()))
    }

    fn with_stage<S: Stage, T>(
        slot: &'static Slot<S>,
        call: impl FnOnce(&S) -> Result<T, StageError>,
    ) -> Result<T, StageError> {
        slot.with(|cell| match cell.get() {
            Some(stage) => call(stage),
            None => Err(StageError::Config("called before init".into())),
        })
    }

    pub fn process<S: Stage>(
        slot: &'static Slot<S>,
        request: &dyn Request,
    ) -> Result<(), StageError> {
        with_stage(slot, |stage| stage.process(request))
    }

    pub fn finish<S: Stage>(slot: &'static Slot<S>, request: &dyn Request, outcome: &Outcome) {
        slot.with(|cell| {
            if let Some(stage) = cell.get() {
                stage.finish(request, outcome);
            }
        });
    }

    pub fn process_chunk<S: StreamingStage>(
        slot: &'static Slot<S>,
        chunk: Chunk,
    ) -> Result<ChunkOutput, StageError> {
        with_stage(slot, |stage| stage.process_chunk(chunk))
    }
}
