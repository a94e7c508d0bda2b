//! The data of each plugin store ([`HostState`]) and the limits the host
//! imports enforce on it: the output budget of a `request`
//! ([`RequestBudget`]) and the log rate ([`LogBudget`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::inference::{Router, TokenStream};
use crate::metrics::ErrorType;
use crate::store::{Held, Holds, Stores};
use crate::trace::Trace;
use crate::wasm::bindings::{v1, v2};
use crate::wasm::envelope::Envelope;

/// The data of each plugin store.
pub struct HostState {
    /// WASI p2: exactly the stage's grants.
    pub(in crate::wasm) wasi: WasiCtx,
    /// WASI's resources, and the `request` lent for a `process` call.
    pub(in crate::wasm) table: ResourceTable,
    /// Memory, table and instance caps.
    pub(in crate::wasm) limits: Limits,
    /// The stage the instance serves (for its log records).
    pub(in crate::wasm) stage: &'static str,
    /// The inference router, for stages granted `inference`.
    pub(in crate::wasm) router: Option<Router>,
    /// The stores of the configuration serving the current call.
    pub(in crate::wasm) stores: Arc<Stores>,
    /// The holds on the request the current `process` call serves: one
    /// per store operation while it runs (see [`Holds`]).
    pub(in crate::wasm) holds: Option<Holds>,
    /// Held since a store operation of the current call changed a store,
    /// until the call returns.
    pub(in crate::wasm) changed_store: Option<Held>,
    /// Store and compare-and-swap handles the guest holds now (bounded:
    /// each may hold a value in host memory).
    pub(in crate::wasm) store_handles: usize,
    /// The stores the stage is granted (`capabilities.stores`).
    pub(in crate::wasm) granted_stores: Arc<[String]>,
    /// The request headers the stage is granted (lower case).
    pub(in crate::wasm) granted_headers: Arc<[String]>,
    /// Whether the stage is granted the client's address.
    pub(in crate::wasm) granted_client_address: bool,
    /// The instance's log rate.
    pub(in crate::wasm) log_budget: LogBudget,
    /// When the current call must end.
    pub(in crate::wasm) deadline: Instant,
    /// When the request as a whole must be answered, if the caller said:
    /// a streamed generation outlives the call that started it.
    pub(in crate::wasm) request_deadline: Option<Instant>,
    /// Whether the client of the current request takes its answer as a
    /// stream: a generation started with `generate-stream` is streamed
    /// upstream only then (by default, yes).
    pub(in crate::wasm) client_streams: bool,
    /// The request the current call serves (for log records and
    /// generations; empty outside a request).
    pub(in crate::wasm) request_id: String,
    /// The span of the current call's stage: its log records become
    /// events of it, and its generations' upstream attempts its children.
    pub(in crate::wasm) trace: Trace,
    /// Time the calls spent waiting for the inference backend (taken by
    /// the pipeline after each call).
    pub(in crate::wasm) backend_wait: Duration,
    /// A generation started by `generate-stream` in the current call.
    pub(in crate::wasm) stream: Option<TokenStream>,
    /// The class of the backend failure the current call saw, if any.
    pub(in crate::wasm) backend_error: Option<ErrorType>,
    /// The output budget of the request handed over by handle, during a
    /// `process` call of a `request-stage` plugin.
    pub(in crate::wasm) request: Option<RequestBudget>,
    /// The table entry of the 0.2 request lent to the current call, if any
    /// (for the principal in log records).
    pub(in crate::wasm) lent: Option<u32>,
    /// The message of the last panic the plugin logged (a record with the
    /// SDK's panic field): reported with the trap that follows it.
    pub(in crate::wasm) panic: Option<String>,
}

/// The store's [`StoreLimits`], counting the linear memory its instance
/// holds (what `orchestrator plugin run` reports).
pub struct Limits {
    limits: StoreLimits,
    memory_bytes: usize,
}

impl Limits {
    /// Enforce `limits`.
    pub fn new(limits: StoreLimits) -> Limits {
        Limits {
            limits,
            memory_bytes: 0,
        }
    }

    /// Bytes of linear memory the store's memories hold now.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            self.memory_bytes = (self.memory_bytes + desired).saturating_sub(current);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl v2::orchestrator::pipeline::types::Host for HostState {}

impl v2::orchestrator::pipeline::streaming::Host for HostState {}

impl v1::orchestrator::pipeline::types::Host for HostState {}

impl v1::orchestrator::pipeline::streaming::Host for HostState {}

/// What a stage working through a `request` handle has set, against its
/// `max_output_bytes`. A by-value stage's cap bounds the envelope it
/// returns, because all of it is copied out of the guest; through a handle
/// only what is set is copied out, so the cap bounds the bytes of the
/// fields set (each counted at its last value) plus all the notes. It is
/// checked at every setter, so a hostile guest cannot make the host hold
/// more than the cap (plus the one value being refused).
pub(in crate::wasm) struct RequestBudget {
    pub(super) cap: usize,
    /// Bytes of each field's last value set, by [`Field`].
    pub(super) set: [usize; Field::COUNT],
    /// Bytes of all the notes (keys and values), kept up to date by
    /// `set-note`.
    pub(super) note_bytes: usize,
    /// The total of the first setter that went over the cap.
    pub(in crate::wasm) exceeded: Option<usize>,
}

/// The envelope fields a `request` handle can set (notes apart).
#[derive(Clone, Copy)]
pub(super) enum Field {
    Messages,
    Params,
    Tools,
    Passages,
    Prompt,
    Completion,
    ToolCalls,
    Refusal,
    FinishReason,
    Chunks,
}

impl Field {
    const COUNT: usize = 10;
}

impl RequestBudget {
    pub(in crate::wasm) fn new(envelope: &Envelope, cap: usize) -> RequestBudget {
        RequestBudget {
            cap,
            set: [0; Field::COUNT],
            note_bytes: envelope
                .metadata
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum(),
            exceeded: None,
        }
    }

    /// The bytes counted against the cap if `field` held `size` bytes and
    /// the notes `note_bytes`.
    pub(super) fn total_with(&self, field: Option<(Field, usize)>, note_bytes: usize) -> usize {
        let mut set = self.set;
        if let Some((field, size)) = field {
            set[field as usize] = size;
        }
        set.iter().sum::<usize>() + note_bytes
    }

    /// Admit `field` at `size` bytes, or record the excess and return the
    /// error that ends the call.
    pub(super) fn admit(&mut self, field: Field, size: usize) -> wasmtime::Result<()> {
        let total = self.total_with(Some((field, size)), self.note_bytes);
        if total > self.cap {
            return Err(self.exceed(total));
        }
        self.set[field as usize] = size;
        Ok(())
    }

    /// Record `size` as over the cap; the error that ends the call.
    pub(super) fn exceed(&mut self, size: usize) -> wasmtime::Error {
        self.exceeded.get_or_insert(size);
        wasmtime::Error::msg(format!(
            "the stage set {size} bytes; its max_output_bytes is {}",
            self.cap
        ))
    }
}

/// A token bucket bounding how fast one instance may log: a chatty plugin
/// loses its excess records (and the host says how many) instead of
/// flooding the host's log.
pub(in crate::wasm) struct LogBudget {
    pub(super) tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LogBudget {
    const BURST: f64 = 100.0;
    const PER_SECOND: f64 = 50.0;

    pub(in crate::wasm) fn new() -> LogBudget {
        LogBudget {
            tokens: Self::BURST,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Whether a record may be written now; `Some(n)` carries the count of
    /// records dropped since the last one written.
    pub(super) fn take(&mut self) -> Option<u64> {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * Self::PER_SECOND;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.dropped))
        } else {
            self.dropped += 1;
            None
        }
    }
}
