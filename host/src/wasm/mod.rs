//! The WebAssembly runtime of stage plugins: compiling, checking,
//! instantiating and calling components of the `orchestrator:pipeline`
//! stage worlds.
//!
//! Owns everything between a component's bytes and a finished call:
//! `engine` (the wasmtime engine, pooling, epochs), `cache` (compiled
//! artifacts), `load` (checks, linking, world detection), `plugin` (a
//! loaded version and its sandbox), `instance` (calls and deadlines),
//! `host` (one file per import: `request`, `log`, `inference`) and
//! [`bindings`] (the WIT types and the worlds). It must not know about
//! queues, permits or HTTP: the pipeline decides when to instantiate and
//! call.
//!
//! # Lifecycle
//!
//! 1. **Engine** ([`Runtime::new`]): one wasmtime `Engine` for the
//!    process, with the component model, the pooling instance allocator
//!    (slots sized from the configuration), epoch interruption driven by a
//!    ticker thread, and component-model concurrency off (it triples the cost
//!    of small calls and no plugin uses async).
//! 2. **Prepare** ([`Runtime::load`]): the component bytes are hashed
//!    (sha256), compiled — or deserialized from the on-disk artifact cache,
//!    keyed by that hash and the engine's configuration — and their imports
//!    are checked against the stage's grants, so that a plugin importing
//!    something it was not granted fails *here*, with a message naming the
//!    grant, rather than trapping at its first call.
//! 3. **Link**: a per-stage `Linker` holds WASI p2 (whose context grants
//!    nothing but clocks and randomness unless configured), the `log`
//!    import, the `request` resource and, only for stages granted it, the
//!    `inference` import. The linker is resolved against the component once,
//!    into an `InstancePre`; its exports tell its [`World`] (`process` by
//!    value or by handle, with or without `process-chunk`) and are
//!    type-checked there (a component of no stage world is refused).
//! 4. **Validate**: one instance is created and its `init` run with the
//!    stage's configuration. A plugin whose `init` fails is refused.
//! 5. **Instantiate** ([`Instance::new`]): each instance gets a `Store`
//!    with its own WASI context and memory limits and instantiates from the
//!    pre-instantiated component (a pooled slot: a few microseconds), then
//!    runs `init`.
//! 6. **Call** ([`Instance::process`]): the epoch deadline and the fuel
//!    budget are armed, then, by the component's world: *by value*
//!    (`stage`, `streaming-stage`) the envelope is copied in, the result
//!    copied out and its size checked against the stage's output cap; *by
//!    handle* (`request-stage`, `streaming-request-stage`) the envelope is
//!    moved into the store's resource table and lent to the guest as a
//!    `request`, whose getters and setters copy single fields (each setter
//!    checked against the output cap), and moved back when the call ends.
//!    The world is detected at load, from the component's exports.
//!
//! # Deadlines
//!
//! A call has two clocks, because neither covers every case alone. Epoch
//! interruption traps a guest that computes past its deadline (an endless
//! loop), but cannot stop a guest blocked *inside a host call* — a WASI
//! sleep, say. So calls are made with wasmtime's async API and bounded by a
//! host-side deadline as well (`within`): when it passes, the call's
//! future is dropped, which abandons the blocked host call. Either way the
//! call fails with `timeout` and the instance is discarded. The host-side
//! timer is armed only if the call actually waits on the host (its future
//! returns `Pending`): a call that runs straight through — every call of
//! a stage without inference — never touches tokio's timer wheel.
//!
//! # Resource caps
//!
//! Linear memory is capped per instance (`max_memory_bytes`, enforced by a
//! `StoreLimits` that traps on a refused `memory.grow`, so the failure is
//! reported as `memory` rather than as whatever the guest's allocator does
//! on out-of-memory); tables, instances and memories per store are capped
//! too. The result of a call is lifted out of guest memory, so the host's
//! allocation for it is bounded by that cap; results larger than the
//! stage's `max_output_bytes` are then refused as `output_too_large`.
//! Optional fuel (`fuel`) bounds the instructions one call may execute,
//! independent of wall time.
//!
//! # Failure modes
//!
//! Loading fails with a [`LoadError`] that says what is wrong with the bytes
//! (not wasm, a core module instead of a component, wrong world, missing
//! grant, failing `init`), with wasmtime's error as its source. A call fails with a [`CallError`] whose
//! [`ErrorType`](crate::metrics::ErrorType) is the `error_type` metric label; after a host-side failure
//! (trap, timeout, memory cap) the instance is poisoned and must be dropped.

pub mod bindings;
mod cache;
mod convert;
mod engine;
mod envelope;
mod error;
mod host;
mod inspect;
mod instance;
pub mod legacy;
mod load;
mod plugin;
mod resources;

pub use bindings::{ChunkContext, ChunkOutput, Contract, Outcome, OutcomeKind, StageError, World};
pub use convert::params_to_wit;
pub use engine::{EPOCH_TICK, EngineError, EngineSettings, KEEP_RESIDENT_BYTES, Runtime};
pub use envelope::{Caller, Envelope, Passage, Refusal, envelope_bytes};
pub use error::{BoxError, CallError, LoadError};
pub use inspect::{Inspection, inspect};
pub use instance::Instance;
pub use load::{Loaded, PluginBytes};
pub use plugin::{CallLedger, HostServices, Plugin, PluginVersion};
