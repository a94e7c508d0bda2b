//! A live instance of a plugin version ([`Instance`]) and its calls: how a
//! call is armed (epoch deadline, fuel), bounded on the host side
//! ([`within`]), handed the envelope (by value or by handle), capped
//! (`max_output_bytes`) and classified when it fails ([`CallError`]).
//!
//! Owns one store and everything about calling into it; it must not decide
//! when to make or drop an instance (that is the stage's instance policy,
//! in [`crate::pipeline`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use wasmtime::component::Resource;
use wasmtime::{Store, Trap};

use super::bindings::{
    ChunkContext, ChunkOutput, Contract, Exports, Outcome, ProcessArgument, StageError,
};
use super::engine::Ticking;
use super::envelope::Envelope;
use super::error::CallError;
use super::host::{HostState, RequestBudget};
use super::legacy::{self, LegacyRequest};
use super::plugin::Plugin;
use crate::inference::{Router, TokenStream};
use crate::metrics::ErrorType;
use crate::store::{Holds, Stores};
use crate::trace::Trace;

/// How long past a call's deadline its host-side deadline fires: the epoch
/// deadline should win for guest code (it reports a precise trap), the
/// timeout only catches calls stuck in the host.
const HOST_CALL_GRACE: Duration = Duration::from_millis(20);

/// Why [`Instance::start`] failed, and whether in `init`.
pub(in crate::wasm) struct StartFailure {
    /// The failure happened in (or while waiting for) `init`.
    pub(in crate::wasm) in_init: bool,
    /// The failure.
    pub(in crate::wasm) error: CallError,
}

/// A live plugin instance with its store.
pub struct Instance {
    store: Store<HostState>,
    exports: Exports,
    plugin: Arc<Plugin>,
    calls: u64,
    memory_at_start: usize,
    /// The table entry of the request lent to the `process` call under
    /// way (`Ok`: 0.2, `Err`: 0.1), until the call gives it back.
    lending: Option<Result<u32, u32>>,
}

impl Instance {
    /// Create an instance of `plugin` and run its `init` (lifecycle step 5),
    /// within the stage's call deadline.
    pub async fn new(plugin: &Arc<Plugin>) -> Result<Instance, CallError> {
        Instance::start(plugin)
            .await
            .map_err(|failure| failure.error)
    }

    /// [`Instance::new`], saying which step failed: loading reports a
    /// failure in `init` (a refused configuration, a panic) as
    /// `init_failed`, anything before it as `instantiate_failed`.
    pub(in crate::wasm) async fn start(plugin: &Arc<Plugin>) -> Result<Instance, StartFailure> {
        let before_init = |error| StartFailure {
            in_init: false,
            error,
        };
        let mut store = plugin.store().map_err(before_init)?;
        let timeout = Duration::from_millis(plugin.settings.timeout_ms);
        let _ticking = arm(plugin, &mut store, timeout).map_err(before_init)?;
        let deadline = store.data().deadline + HOST_CALL_GRACE;
        let setup = async {
            let instance = plugin
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(|e| before_init(classify(e, ErrorType::Instantiate, timeout, None)))?;
            let exports = plugin
                .exports
                .exports(&mut store, &instance)
                .map_err(|e| before_init(classify(e, ErrorType::Instantiate, timeout, None)))?;
            let in_init = |error| StartFailure {
                in_init: true,
                error,
            };
            match exports.init(&mut store, &plugin.init_config).await {
                Ok(Ok(())) => Ok(exports),
                Ok(Err(message)) => Err(in_init(CallError::new(ErrorType::Config, message))),
                Err(e) => {
                    let panic = store.data_mut().panic.take();
                    Err(in_init(classify(e, ErrorType::Instantiate, timeout, panic)))
                }
            }
        };
        let exports = within(deadline, std::pin::pin!(setup))
            .await
            .ok_or_else(|| StartFailure {
                in_init: true,
                error: timed_out(timeout),
            })??;
        plugin.services.instances.inc();
        let memory_at_start = store.data().limits.memory_bytes();
        Ok(Instance {
            store,
            exports,
            plugin: plugin.clone(),
            calls: 0,
            memory_at_start,
            lending: None,
        })
    }

    /// The plugin version it runs.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    /// Fuel left after the last call, when the engine meters fuel (the
    /// call used its stage's `fuel` budget minus this).
    pub fn fuel_left(&self) -> Option<u64> {
        self.plugin
            .fuel
            .then(|| self.store.get_fuel().ok())
            .flatten()
    }

    /// Bytes of linear memory the instance holds.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limits.memory_bytes()
    }

    /// Bytes of linear memory the instance held once `init` had run.
    pub fn memory_at_start(&self) -> usize {
        self.memory_at_start
    }

    /// Calls served so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// The request lent to a `process` call that was cut short (its
    /// future dropped while the guest held the request): taken back from
    /// the store's table, as the call left it. `None` when no call is
    /// under way. The instance must not serve again afterwards.
    pub(crate) fn take_lent(&mut self) -> Option<Envelope> {
        let state = self.store.data_mut();
        state.lent = None;
        state.request = None;
        match self.lending.take()? {
            Ok(rep) => state.table.delete(Resource::<Envelope>::new_own(rep)).ok(),
            Err(rep) => state
                .table
                .delete(Resource::<LegacyRequest>::new_own(rep))
                .ok()
                .map(|legacy| legacy.0),
        }
    }

    /// Call `process` with a deadline of `timeout`.
    ///
    /// On success `envelope` holds what the stage made of it. On failure
    /// its content is unspecified (a stage working through a `request`
    /// handle may have set some fields before it failed), apart from the
    /// request id, which no stage can change through a handle.
    pub async fn process(
        &mut self,
        envelope: &mut Envelope,
        timeout: Duration,
    ) -> Result<(), CallError> {
        self.calls += 1;
        self.plugin.calls.fetch_add(1, Ordering::Relaxed);
        let _ticking = arm(&self.plugin, &mut self.store, timeout)?;
        let cap = self.plugin.settings.max_output_bytes;
        let state = self.store.data_mut();
        state.stream = None;
        state.backend_error = None;
        state.panic = None;
        let deadline = state.deadline + HOST_CALL_GRACE;
        // By handle: the envelope moves into the store's resource table for
        // the call (no copy) and is taken back after it, however it ended.
        // By value (0.1 only): its 0.1 view is copied in, and what comes
        // back merged into it.
        let world = self.exports.world();
        let hand_over = |e: wasmtime::component::ResourceTableError| {
            CallError::new(
                ErrorType::Trap,
                format!("cannot hand over the request: {e}"),
            )
        };
        let view = (!world.by_handle()).then(|| legacy::envelope_view(envelope));
        let argument = match &view {
            Some(view) => ProcessArgument::Value(view),
            None => {
                let taken = std::mem::replace(envelope, Envelope::placeholder());
                state.request = Some(RequestBudget::new(&taken, cap));
                match world.contract() {
                    Contract::V2 => {
                        ProcessArgument::Handle(state.table.push(taken).map_err(hand_over)?)
                    }
                    Contract::V1 => ProcessArgument::LegacyHandle(
                        state.table.push(LegacyRequest(taken)).map_err(hand_over)?,
                    ),
                }
            }
        };
        state.lent = match &argument {
            ProcessArgument::Handle(handle) => Some(handle.rep()),
            _ => None,
        };
        let owned = match &argument {
            ProcessArgument::Handle(handle) => Some(Ok(handle.rep())),
            ProcessArgument::LegacyHandle(handle) => Some(Err(handle.rep())),
            ProcessArgument::Value(_) => None,
        };
        let argument = match argument {
            ProcessArgument::Handle(handle) => {
                ProcessArgument::Handle(Resource::new_borrow(handle.rep()))
            }
            ProcessArgument::LegacyHandle(handle) => {
                ProcessArgument::LegacyHandle(Resource::new_borrow(handle.rep()))
            }
            value => value,
        };
        self.lending = owned;
        let result = {
            let call = self.exports.process(&mut self.store, argument);
            within(deadline, std::pin::pin!(call)).await
        };
        self.lending = None;
        let mut over_cap = None;
        self.store.data_mut().lent = None;
        if let Some(rep) = owned {
            let state = self.store.data_mut();
            over_cap = state.request.take().and_then(|budget| budget.exceeded);
            let take_back = |e: wasmtime::component::ResourceTableError| {
                CallError::new(
                    ErrorType::Trap,
                    format!("cannot take back the request: {e}"),
                )
            };
            *envelope = match rep {
                Ok(rep) => state
                    .table
                    .delete(Resource::<Envelope>::new_own(rep))
                    .map_err(take_back)?,
                Err(rep) => {
                    state
                        .table
                        .delete(Resource::<LegacyRequest>::new_own(rep))
                        .map_err(take_back)?
                        .0
                }
            };
        }
        drop(view);
        if let Some(size) = over_cap {
            return Err(CallError::new(
                ErrorType::OutputTooLarge,
                format!("the stage set {size} bytes; its max_output_bytes is {cap}"),
            ));
        }
        let output = match result {
            None => return Err(timed_out(timeout)),
            Some(Err(error)) => {
                let panic = self.store.data_mut().panic.take();
                return Err(classify(error, ErrorType::Trap, timeout, panic));
            }
            Some(Ok(Err(error))) => return Err(self.stage_error(error)),
            Some(Ok(Ok(Some(output)))) => output,
            // By handle: checked as it was set.
            Some(Ok(Ok(None))) => return Ok(()),
        };
        let size = legacy::envelope_view_bytes(&output);
        if size > cap {
            return Err(CallError::new(
                ErrorType::OutputTooLarge,
                format!("the stage returned {size} bytes; its max_output_bytes is {cap}"),
            ));
        }
        legacy::merge_envelope(envelope, output);
        Ok(())
    }

    /// Whether the instance's component exports `finish`.
    pub fn finishes(&self) -> bool {
        self.exports.world().finishes()
    }

    /// Call `finish` with the request's final envelope and `outcome`,
    /// within `timeout`. What the call sets in the envelope is kept within
    /// `max_output_bytes` like a `process` call's, and changes nothing the
    /// client sees (the answer is out). A component without `finish` is
    /// not called.
    pub async fn finish(
        &mut self,
        envelope: &mut Envelope,
        outcome: &Outcome,
        timeout: Duration,
    ) -> Result<(), CallError> {
        if !self.exports.world().finishes() {
            return Ok(());
        }
        self.calls += 1;
        let _ticking = arm(&self.plugin, &mut self.store, timeout)?;
        let cap = self.plugin.settings.max_output_bytes;
        let state = self.store.data_mut();
        state.panic = None;
        state.stream = None;
        state.backend_error = None;
        // A generation a finish call starts ends with the call (streamed,
        // whatever the last request's client was: it is collected there).
        state.request_deadline = Some(state.deadline);
        state.client_streams = true;
        let deadline = state.deadline + HOST_CALL_GRACE;
        let taken = std::mem::replace(envelope, Envelope::placeholder());
        state.request = Some(RequestBudget::new(&taken, cap));
        let handle = state.table.push(taken).map_err(|e| {
            CallError::new(
                ErrorType::Trap,
                format!("cannot hand over the request: {e}"),
            )
        })?;
        let rep = handle.rep();
        state.lent = Some(rep);
        let result = {
            let call = self
                .exports
                .finish(&mut self.store, Resource::new_borrow(rep), outcome);
            within(deadline, std::pin::pin!(call)).await
        };
        let state = self.store.data_mut();
        state.request = None;
        state.lent = None;
        // Nothing of a finish call is the next request's: a stream it
        // started is dropped (cancelled), its backend wait forgotten.
        state.stream = None;
        state.backend_error = None;
        state.backend_wait = Duration::ZERO;
        *envelope = state
            .table
            .delete(Resource::<Envelope>::new_own(rep))
            .map_err(|e| {
                CallError::new(
                    ErrorType::Trap,
                    format!("cannot take back the request: {e}"),
                )
            })?;
        match result {
            None => Err(timed_out(timeout)),
            Some(None | Some(Ok(()))) => Ok(()),
            Some(Some(Err(error))) => {
                let panic = self.store.data_mut().panic.take();
                Err(classify(error, ErrorType::Trap, timeout, panic))
            }
        }
    }

    /// The [`CallError`] of a stage's typed error. An `upstream` error
    /// takes the class of the backend failure behind it, if there was one.
    fn stage_error(&mut self, error: StageError) -> CallError {
        match error {
            StageError::InvalidInput(m) => CallError::new(ErrorType::InvalidInput, m),
            StageError::Config(m) => CallError::new(ErrorType::Config, m),
            // A 0.1 stage has only `upstream` for every backend failure:
            // the class of the failure its generation saw, if any, is the
            // host's to recover. A 0.2 stage says it with the case.
            StageError::Upstream(m) if self.exports.world().contract() == Contract::V1 => {
                let class = self.store.data_mut().backend_error.take();
                CallError::new(class.unwrap_or(ErrorType::Upstream), m)
            }
            StageError::Upstream(m) => CallError::new(ErrorType::Upstream, m),
            StageError::UpstreamUnavailable(m) => CallError::new(ErrorType::UpstreamUnavailable, m),
            StageError::UpstreamTimeout(m) => CallError::new(ErrorType::UpstreamTimeout, m),
            StageError::PluginError(m) => CallError::new(ErrorType::PluginError, m),
        }
    }

    /// Tell the instance when the request being processed must be
    /// answered: a generation started with `generate-stream` may run until
    /// then (by default, until the call's own deadline).
    pub fn set_request_deadline(&mut self, deadline: Instant) {
        self.store.data_mut().request_deadline = Some(deadline);
    }

    /// Tell the instance whether the client of the request being processed
    /// takes its answer as a stream (by default, yes). If not, a
    /// generation started with `generate-stream` asks the upstream for one
    /// JSON answer (see [`GenerateRequest::stream`]).
    ///
    /// [`GenerateRequest::stream`]: crate::inference::GenerateRequest::stream
    pub fn set_client_streams(&mut self, streams: bool) {
        self.store.data_mut().client_streams = streams;
    }

    /// The request the calls to come serve (until set again): its id and
    /// the stage's span. The plugin's log records carry both (and become
    /// events of the span), and its generations are children of the span.
    pub fn set_request(&mut self, request_id: &str, trace: Trace) {
        let state = self.store.data_mut();
        state.request_id.clear();
        state.request_id.push_str(request_id);
        state.trace = trace;
    }

    /// The backends the calls to come generate through: those of the
    /// configuration the request was admitted under (a reload changes
    /// them between requests). Ignored by a stage not granted `inference`,
    /// whose store holds no router.
    pub fn set_router(&mut self, router: &Router) {
        let state = self.store.data_mut();
        if let Some(current) = &mut state.router
            && !current.same_as(router)
        {
            *current = router.clone();
        }
    }

    /// The key-value stores the calls to come open: those of the
    /// configuration the request was admitted under.
    pub fn set_stores(&mut self, stores: &Arc<Stores>) {
        let state = self.store.data_mut();
        if !Arc::ptr_eq(&state.stores, stores) {
            state.stores = stores.clone();
        }
    }

    /// The request the calls to come hold against a cut while a store
    /// operation runs, and from a write until the call returns (`None`
    /// for calls whose future is never cut short: see [`Holds`]). Set
    /// before a call and cleared after it, which ends the call's hold.
    pub(crate) fn set_holds(&mut self, holds: Option<&Holds>) {
        let state = self.store.data_mut();
        state.changed_store = None;
        state.holds = holds.cloned();
    }

    /// How long the calls since the last time this was asked waited for
    /// the inference backend (`generate`, and `generate-stream` up to its
    /// first token).
    pub fn take_backend_wait(&mut self) -> Duration {
        std::mem::take(&mut self.store.data_mut().backend_wait)
    }

    /// The generation the last `process` call started with
    /// `inference.generate-stream`, if any.
    pub fn take_stream(&mut self) -> Option<TokenStream> {
        self.store.data_mut().stream.take()
    }

    /// Call `process-chunk` with a deadline of `timeout`. The emitted text
    /// and the carry count against the stage's `max_output_bytes`.
    pub async fn process_chunk(
        &mut self,
        context: &ChunkContext,
        carry: &str,
        delta: &str,
        last: bool,
        timeout: Duration,
    ) -> Result<ChunkOutput, CallError> {
        self.calls += 1;
        let _ticking = arm(&self.plugin, &mut self.store, timeout)?;
        let state = self.store.data_mut();
        state.backend_error = None;
        state.panic = None;
        // A chunk is of a streaming client's answer.
        state.client_streams = true;
        let deadline = state.deadline + HOST_CALL_GRACE;
        let result = {
            let call = self
                .exports
                .process_chunk(&mut self.store, context, carry, delta, last);
            within(deadline, std::pin::pin!(call)).await
        };
        let output = match result {
            None => return Err(timed_out(timeout)),
            Some(None) => {
                return Err(CallError::new(
                    ErrorType::PluginError,
                    "the stage's plugin does not export process-chunk",
                ));
            }
            Some(Some(Err(error))) => {
                let panic = self.store.data_mut().panic.take();
                return Err(classify(error, ErrorType::Trap, timeout, panic));
            }
            Some(Some(Ok(Err(error)))) => return Err(self.stage_error(error)),
            Some(Some(Ok(Ok(output)))) => output,
        };
        // Generations start only in `process`; one started here is cancelled.
        self.store.data_mut().stream = None;
        let size = output.carry.len() + output.emit.iter().map(String::len).sum::<usize>();
        let cap = self.plugin.settings.max_output_bytes;
        if size > cap {
            return Err(CallError::new(
                ErrorType::OutputTooLarge,
                format!(
                    "the stage returned {size} bytes for one chunk; its max_output_bytes is {cap}"
                ),
            ));
        }
        Ok(output)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.plugin.services.instances.dec();
    }
}

/// Arm the call's deadline and its fuel budget; the guard keeps the epoch
/// ticker running until the call ends.
fn arm(
    plugin: &Plugin,
    store: &mut Store<HostState>,
    timeout: Duration,
) -> Result<Ticking, CallError> {
    let ticking = plugin.ticker.busy();
    // At the next tick the store's epoch callback (see `Plugin::store`)
    // yields to the runtime, or traps once `deadline` has passed.
    store.set_epoch_deadline(1);
    store.data_mut().deadline = Instant::now() + timeout;
    if plugin.fuel {
        store
            .set_fuel(plugin.settings.fuel.unwrap_or(u64::MAX))
            .map_err(|e| CallError::new(ErrorType::Instantiate, e.to_string()))?;
    }
    Ok(ticking)
}

/// Run `future` until it finishes or `deadline` passes (then `None`).
///
/// Like `tokio::time::timeout_at`, except that the timer is created only
/// when `future` first returns `Pending`: a future that completes on its
/// first poll (every call of a stage that does not wait on the host) costs
/// no timer registration and no allocation. `future` is taken pinned
/// (`std::pin::pin!` at the caller) so that it is not moved again: a
/// component call's future is large enough for the copies to show.
async fn within<F: Future + Unpin>(deadline: Instant, mut future: F) -> Option<F::Output> {
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = Pin::new(&mut future).poll(cx) {
            return Poll::Ready(Some(output));
        }
        timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())))
            .as_mut()
            .poll(cx)
            .map(|()| None)
    })
    .await
}

fn timed_out(timeout: Duration) -> CallError {
    CallError::new(
        ErrorType::Timeout,
        format!("deadline of {} ms exceeded", timeout.as_millis()),
    )
}

/// Map a wasmtime error from a call into a [`CallError`].
fn classify(
    error: wasmtime::Error,
    default: ErrorType,
    timeout: Duration,
    panic: Option<String>,
) -> CallError {
    let message = format!("{error:#}");
    let error_type = match (error.downcast_ref::<Trap>(), panic) {
        (Some(Trap::Interrupt), _) => return timed_out(timeout),
        (Some(Trap::OutOfFuel), _) => {
            return CallError::new(ErrorType::Fuel, "fuel budget exhausted");
        }
        // The panic's own message says what went wrong; the trap and its
        // wasm backtrace only that the guest aborted.
        (Some(trap), Some(panic)) => {
            return CallError::new(ErrorType::Trap, format!("{panic} (then wasm trap: {trap})"));
        }
        (Some(_), None) => ErrorType::Trap,
        (None, _)
            if message.contains("forcing trap when growing memory")
                || message.contains("forcing a memory growth failure") =>
        {
            ErrorType::Memory
        }
        (None, _) => default,
    };
    CallError::new(error_type, message)
}
