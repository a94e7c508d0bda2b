//! The host side of the WIT contracts: the interfaces' types and import
//! traits (generated) of `wit/` (0.2.x, [`v2`]) and of `wit/v0.1/`
//! (0.1.x, [`v1`]), and the stage worlds of both behind one abstraction,
//! [`Exports`].
//!
//! Owns the mapping between WIT and Rust; it must not hold state or policy
//! (deadlines, caps and metrics are the caller's).
//!
//! The worlds differ only in their exports: `process` takes the envelope by
//! value (0.1 only) or a `request` handle, and `process-chunk` is exported
//! by the streaming worlds. So instead of a generated binding per world, a
//! component's exports are resolved once at load ([`ExportIndices::new`]:
//! found by name and type-checked against the component, which tells its
//! [`World`] and [`Contract`]), then looked up in each new instance without
//! a second check ([`ExportIndices::exports`]). The two contracts' request
//! handles are different host types ([`Envelope`] and [`LegacyRequest`]),
//! so the type check alone tells a 0.2 component from a 0.1 one.

use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::{
    Component, ComponentExportIndex, Func, Instance, InstancePre, Resource, TypedFunc,
};
use wasmtime::{AsContextMut, Store};

/// What `bindgen!` generates for the current contract, `wit/` (0.2.x)
/// (undocumented: the WIT holds the docs).
#[allow(missing_docs)]
pub mod v2 {
    wasmtime::component::bindgen!({
        // The world that imports every interface and exports everything:
        // its generated modules hold the types and host traits of all.
        world: "finishing-streaming-request-stage",
        path: "../wit",
        additional_derives: [serde::Serialize, serde::Deserialize],
        imports: {
            // The inference functions wait for the network.
            "orchestrator:pipeline/inference": async | trappable,
            // So do the stores' (a Redis round trip); a handle that is not
            // in the table traps.
            "orchestrator:pipeline/expiring": async | trappable,
            // A request method called with a handle that is not the one the
            // call was given traps instead of answering.
            "orchestrator:pipeline/request": trappable,
        },
        with: {
            // The host keeps the request as its envelope, in the store's
            // resource table for the duration of a call.
            "orchestrator:pipeline/request.request": crate::wasm::envelope::Envelope,
            // Generated apart, without the serde derives (a `cas-error`
            // holds a resource).
            "wasi:keyvalue/store": crate::wasm::bindings::keyvalue::wasi::keyvalue::store,
            "wasi:keyvalue/atomics": crate::wasm::bindings::keyvalue::wasi::keyvalue::atomics,
            "wasi:keyvalue/batch": crate::wasm::bindings::keyvalue::wasi::keyvalue::batch,
        },
    });
}

/// What `bindgen!` generates for `wasi:keyvalue@0.2.0-draft2`
/// (`wit/deps/keyvalue/`), the standard store interfaces.
#[allow(missing_docs)]
pub mod keyvalue {
    wasmtime::component::bindgen!({
        world: "wasi:keyvalue/imports@0.2.0-draft2",
        path: "../wit",
        imports: {
            // A store operation may wait for a Redis round trip; a handle
            // that is not in the table traps.
            default: async | trappable,
        },
        with: {
            // An open store, and a compare-and-swap in progress.
            "wasi:keyvalue/store.bucket": crate::wasm::resources::Bucket,
            "wasi:keyvalue/atomics.cas": crate::wasm::resources::Cas,
        },
    });
}

/// What `bindgen!` generates for the previous contract, `wit/v0.1/`
/// (0.1.0-0.1.2), which the host still serves.
#[allow(missing_docs)]
pub mod v1 {
    wasmtime::component::bindgen!({
        world: "streaming-request-stage",
        path: "../wit/v0.1",
        additional_derives: [serde::Serialize, serde::Deserialize],
        imports: {
            "orchestrator:pipeline/inference": async,
            "orchestrator:pipeline/request": trappable,
        },
        with: {
            // The same envelope, behind a type of its own so that the two
            // contracts' `process` exports tell themselves apart.
            "orchestrator:pipeline/request.request": crate::wasm::bindings::LegacyRequest,
        },
    });
}

pub use v2::orchestrator::pipeline::streaming::{ChunkContext, ChunkOutput};
pub use v2::orchestrator::pipeline::types::{Outcome, OutcomeKind, StageError};

use crate::wasm::envelope::Envelope;

/// The envelope lent to a 0.1 component through its `request` handle: a
/// type of its own, so that the two contracts' `process` exports type-check
/// apart (see [`crate::wasm::legacy`] for what a 0.1 stage sees).
#[derive(Debug, Default)]
pub struct LegacyRequest(pub Envelope);
use v1::orchestrator::pipeline::streaming as streaming_v1;
use v1::orchestrator::pipeline::types as types_v1;

/// The contract a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `orchestrator:pipeline@0.1.x` (`wit/v0.1/`): the flattened chat.
    V1,
    /// `orchestrator:pipeline@0.2.x` (`wit/`): the structured chat.
    V2,
}

impl Contract {
    /// Its package version range, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Contract::V1 => "0.1",
            Contract::V2 => "0.2",
        }
    }
}

/// The world a stage component implements, told apart by its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    by_handle: bool,
    streams: bool,
    finishes: bool,
    contract: Contract,
}

impl World {
    /// Its WIT name.
    pub fn name(self) -> &'static str {
        match (self.by_handle, self.streams, self.finishes) {
            (false, false, _) => "stage",
            (false, true, _) => "streaming-stage",
            (true, false, false) => "request-stage",
            (true, true, false) => "streaming-request-stage",
            (true, false, true) => "finishing-request-stage",
            (true, true, true) => "finishing-streaming-request-stage",
        }
    }

    /// The contract it belongs to.
    pub fn contract(self) -> Contract {
        self.contract
    }

    /// Whether `process` takes a `request` handle.
    pub fn by_handle(self) -> bool {
        self.by_handle
    }

    /// Whether it exports `process-chunk`.
    pub fn streams(self) -> bool {
        self.streams
    }

    /// Whether it exports `finish`.
    pub fn finishes(self) -> bool {
        self.finishes
    }
}

/// `init: func(config: list<tuple<string, string>>) -> result<_, string>`.
type InitSig<'a> = TypedFunc<(&'a [(String, String)],), (Result<(), String>,)>;
/// 0.1 `process: func(request: envelope) -> result<envelope, stage-error>`.
type ProcessByValueSig<'a> =
    TypedFunc<(&'a types_v1::Envelope,), (Result<types_v1::Envelope, types_v1::StageError>,)>;
/// 0.2 `process: func(request: borrow<request>) -> result<_, stage-error>`.
type ProcessByHandleSig = TypedFunc<(Resource<Envelope>,), (Result<(), StageError>,)>;
/// 0.1 `process: func(request: borrow<request>) -> result<_, stage-error>`.
type ProcessByLegacyHandleSig =
    TypedFunc<(Resource<LegacyRequest>,), (Result<(), types_v1::StageError>,)>;
/// 0.2.1 `finish: func(request: borrow<request>, outcome: outcome)`.
type FinishSig<'a> = TypedFunc<(Resource<Envelope>, &'a Outcome), ()>;
/// 0.2 `process-chunk: func(context, carry, delta, last) -> result<chunk-output, stage-error>`.
type ProcessChunkSig<'a> =
    TypedFunc<(&'a ChunkContext, &'a str, &'a str, bool), (Result<ChunkOutput, StageError>,)>;
/// 0.1 `process-chunk`.
type ProcessChunkV1Sig<'a> = TypedFunc<
    (&'a streaming_v1::ChunkContext, &'a str, &'a str, bool),
    (Result<streaming_v1::ChunkOutput, types_v1::StageError>,),
>;

/// The exports of a component, found and type-checked at load.
#[derive(Debug, Clone)]
pub struct ExportIndices {
    world: World,
    init: ComponentExportIndex,
    process: ComponentExportIndex,
    process_chunk: Option<ComponentExportIndex>,
    finish: Option<ComponentExportIndex>,
}

impl ExportIndices {
    /// Find the stage exports of `pre`'s component and check their types.
    /// The error says what is missing or mistyped, and what the component
    /// exports.
    pub fn new<T>(pre: &InstancePre<T>) -> Result<ExportIndices, String> {
        let component = pre.component();
        let instance_type = pre.instance_type();
        let refuse = |what: String| {
            format!(
                "{what}; the component exports {}",
                export_names(component, pre.engine())
            )
        };
        let func = |name: &str| -> Result<Option<(ComponentFunc, ComponentExportIndex)>, String> {
            match component.get_export(None, name) {
                None => Ok(None),
                Some((ComponentItem::ComponentFunc(ty), index)) => Ok(Some((ty, index))),
                Some(_) => Err(refuse(format!("its export `{name}` is not a function"))),
            }
        };
        let check = |name: &str, result: wasmtime::Result<()>| {
            result.map_err(|e| refuse(format!("its export `{name}` has the wrong type ({e:#})")))
        };
        let (init_ty, init) = func("init")?.ok_or_else(|| refuse("no export `init`".into()))?;
        check(
            "init",
            init_ty.typecheck::<(&[(String, String)],), (Result<(), String>,)>(&instance_type),
        )?;
        let (process_ty, process) =
            func("process")?.ok_or_else(|| refuse("no export `process`".into()))?;
        let by_handle = matches!(process_ty.params().next(), Some((_, Type::Borrow(_))));
        let contract = if by_handle {
            let current = process_ty
                .typecheck::<(Resource<Envelope>,), (Result<(), StageError>,)>(&instance_type);
            match current {
                Ok(()) => Contract::V2,
                Err(current) => {
                    check(
                        "process",
                        process_ty
                            .typecheck::<(Resource<LegacyRequest>,), (Result<(), types_v1::StageError>,)>(
                                &instance_type,
                            )
                            .map_err(|_| current),
                    )?;
                    Contract::V1
                }
            }
        } else {
            check(
                "process",
                process_ty.typecheck::<(&types_v1::Envelope,), (Result<types_v1::Envelope, types_v1::StageError>,)>(
                    &instance_type,
                ),
            )?;
            Contract::V1
        };
        let process_chunk = match func("process-chunk")? {
            None => None,
            Some((ty, index)) => {
                let typed = match contract {
                    Contract::V2 => ty.typecheck::<(&ChunkContext, &str, &str, bool), (Result<ChunkOutput, StageError>,)>(
                        &instance_type,
                    ),
                    Contract::V1 => ty.typecheck::<
                        (&streaming_v1::ChunkContext, &str, &str, bool),
                        (Result<streaming_v1::ChunkOutput, types_v1::StageError>,),
                    >(&instance_type),
                };
                check("process-chunk", typed)?;
                Some(index)
            }
        };
        let finish = match func("finish")? {
            Some((ty, index)) if contract == Contract::V2 => {
                check(
                    "finish",
                    ty.typecheck::<(Resource<Envelope>, &Outcome), ()>(&instance_type),
                )?;
                Some(index)
            }
            _ => None,
        };
        Ok(ExportIndices {
            world: World {
                by_handle,
                streams: process_chunk.is_some(),
                finishes: finish.is_some(),
                contract,
            },
            init,
            process,
            process_chunk,
            finish,
        })
    }

    /// The component's world.
    pub fn world(&self) -> World {
        self.world
    }

    /// The exports of `instance`, an instance of the component these
    /// indices were made from.
    pub fn exports(
        &self,
        mut store: impl AsContextMut,
        instance: &Instance,
    ) -> wasmtime::Result<Exports> {
        let mut get = |index: &ComponentExportIndex| {
            instance
                .get_func(&mut store, index)
                .ok_or_else(|| wasmtime::Error::msg("an export checked at load is missing"))
        };
        Ok(Exports {
            world: self.world,
            init: get(&self.init)?,
            process: get(&self.process)?,
            process_chunk: self.process_chunk.as_ref().map(&mut get).transpose()?,
            finish: self.finish.as_ref().map(&mut get).transpose()?,
        })
    }
}

/// The exports of one live instance.
#[derive(Debug, Clone, Copy)]
pub struct Exports {
    world: World,
    init: Func,
    process: Func,
    process_chunk: Option<Func>,
    finish: Option<Func>,
}

/// The typed form of an export. Sound because [`ExportIndices::new`]
/// checked the export against exactly this signature (`$sig`), for the
/// component the instance was made from.
macro_rules! typed {
    ($sig:ty, $func:expr) => {
        // SAFETY: see above.
        unsafe { <$sig>::new_unchecked($func) }
    };
}

impl Exports {
    /// The instance's world.
    pub fn world(&self) -> World {
        self.world
    }

    /// Call `init`.
    pub async fn init<T: Send>(
        &self,
        store: &mut Store<T>,
        config: &[(String, String)],
    ) -> wasmtime::Result<Result<(), String>> {
        let (result,) = typed!(InitSig<'_>, self.init)
            .call_async(store, (config,))
            .await?;
        Ok(result)
    }

    /// Call `process` with the envelope by value (the 0.1 worlds `stage`,
    /// `streaming-stage`), or with a borrowed handle to it (the
    /// `request-stage` worlds): the result's envelope is `Some` only by
    /// value.
    pub async fn process<T: Send>(
        &self,
        store: &mut Store<T>,
        argument: ProcessArgument<'_>,
    ) -> wasmtime::Result<Result<Option<types_v1::Envelope>, StageError>> {
        match argument {
            ProcessArgument::Value(envelope) => {
                let (result,) = typed!(ProcessByValueSig<'_>, self.process)
                    .call_async(store, (envelope,))
                    .await?;
                Ok(result.map(Some).map_err(StageError::from))
            }
            ProcessArgument::Handle(request) => {
                let (result,) = typed!(ProcessByHandleSig, self.process)
                    .call_async(store, (request,))
                    .await?;
                Ok(result.map(|()| None))
            }
            ProcessArgument::LegacyHandle(request) => {
                let (result,) = typed!(ProcessByLegacyHandleSig, self.process)
                    .call_async(store, (request,))
                    .await?;
                Ok(result.map(|()| None).map_err(StageError::from))
            }
        }
    }

    /// Call `finish` with a borrowed handle to the envelope; `None` if the
    /// component does not export it.
    pub async fn finish<T: Send>(
        &self,
        store: &mut Store<T>,
        request: Resource<Envelope>,
        outcome: &Outcome,
    ) -> Option<wasmtime::Result<()>> {
        let func = self.finish?;
        let call = typed!(FinishSig<'_>, func)
            .call_async(store, (request, outcome))
            .await;
        Some(call)
    }

    /// Call `process-chunk`; `None` if the component does not export it.
    pub async fn process_chunk<T: Send>(
        &self,
        store: &mut Store<T>,
        context: &ChunkContext,
        carry: &str,
        delta: &str,
        last: bool,
    ) -> Option<wasmtime::Result<Result<ChunkOutput, StageError>>> {
        let func = self.process_chunk?;
        if self.world.contract == Contract::V1 {
            let context = streaming_v1::ChunkContext::from(context);
            let call = typed!(ProcessChunkV1Sig<'_>, func)
                .call_async(store, (&context, carry, delta, last))
                .await;
            return Some(call.map(|(result,)| {
                result
                    .map(|output| ChunkOutput {
                        emit: output.emit,
                        carry: output.carry,
                        stop: output.stop,
                    })
                    .map_err(StageError::from)
            }));
        }
        let call = typed!(ProcessChunkSig<'_>, func)
            .call_async(store, (context, carry, delta, last))
            .await;
        Some(call.map(|(result,)| result))
    }
}

/// What `process` is given, by the component's world.
pub enum ProcessArgument<'a> {
    /// The 0.1 envelope, copied into the guest.
    Value(&'a types_v1::Envelope),
    /// A borrowed handle to the envelope in the store's resource table.
    Handle(Resource<Envelope>),
    /// The same, for a 0.1 component.
    LegacyHandle(Resource<LegacyRequest>),
}

impl From<types_v1::StageError> for StageError {
    fn from(error: types_v1::StageError) -> StageError {
        match error {
            types_v1::StageError::InvalidInput(m) => StageError::InvalidInput(m),
            types_v1::StageError::Config(m) => StageError::Config(m),
            types_v1::StageError::Upstream(m) => StageError::Upstream(m),
            types_v1::StageError::PluginError(m) => StageError::PluginError(m),
        }
    }
}

/// The names of `component`'s exports, for messages.
fn export_names(component: &Component, engine: &wasmtime::Engine) -> String {
    let names: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(name, _)| format!("`{name}`"))
        .collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}
