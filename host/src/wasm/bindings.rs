//! The host side of `wit/pipeline.wit`: the interfaces' types and import
//! traits (generated), and the four stage worlds behind one abstraction,
//! [`Exports`].
//!
//! Owns the mapping between WIT and Rust; it must not hold state or policy
//! (deadlines, caps and metrics are the caller's).
//!
//! The worlds differ only in their exports: `process` takes the envelope by
//! value or a `request` handle, and `process-chunk` is exported by the
//! streaming worlds. So instead of a generated binding per world, a
//! component's exports are resolved once at load ([`ExportIndices::new`]:
//! found by name and type-checked against the component, which tells its
//! [`World`]), then looked up in each new instance without a second check
//! ([`ExportIndices::exports`]). A new world is a new [`World`] variant and,
//! if it adds an export, one more field here.

use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::{
    Component, ComponentExportIndex, Func, Instance, InstancePre, Resource, TypedFunc,
};
use wasmtime::{AsContextMut, Store};

/// What `bindgen!` generates (undocumented: the WIT holds the docs).
#[allow(missing_docs)]
mod generated {
    wasmtime::component::bindgen!({
        // The world that imports every interface: its generated modules hold
        // the types and host traits of all four worlds.
        world: "streaming-request-stage",
        path: "../wit",
        // `orchestrator plugin run` reads and prints envelopes as JSON.
        additional_derives: [serde::Serialize, serde::Deserialize],
        imports: {
            // The inference functions wait for the network.
            "orchestrator:pipeline/inference": async,
            // A request method called with a handle that is not the one the
            // call was given traps instead of answering.
            "orchestrator:pipeline/request": trappable,
        },
        with: {
            // The host keeps the request as the envelope itself, in the store's
            // resource table for the duration of a call.
            "orchestrator:pipeline/request.request": crate::wasm::bindings::generated::orchestrator::pipeline::types::Envelope,
        },
    });
}

pub use generated::orchestrator;
pub use generated::{ChunkContext, ChunkOutput, StageError};

pub use orchestrator::pipeline::types::{Envelope, GenerationParams, Message, Passage, Usage};

/// The worlds a stage component may implement, told apart by its exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// `stage`: `process` takes and returns the envelope.
    Stage,
    /// `streaming-stage`: `stage` plus `process-chunk`.
    StreamingStage,
    /// `request-stage` (WIT 0.1.2): `process` borrows a `request` handle.
    RequestStage,
    /// `streaming-request-stage`: `request-stage` plus `process-chunk`.
    StreamingRequestStage,
}

impl World {
    /// Its WIT name.
    pub fn name(self) -> &'static str {
        match self {
            World::Stage => "stage",
            World::StreamingStage => "streaming-stage",
            World::RequestStage => "request-stage",
            World::StreamingRequestStage => "streaming-request-stage",
        }
    }

    /// Whether `process` takes a `request` handle.
    pub fn by_handle(self) -> bool {
        matches!(self, World::RequestStage | World::StreamingRequestStage)
    }

    /// Whether it exports `process-chunk`.
    pub fn streams(self) -> bool {
        matches!(self, World::StreamingStage | World::StreamingRequestStage)
    }

    fn of(by_handle: bool, streams: bool) -> World {
        match (by_handle, streams) {
            (false, false) => World::Stage,
            (false, true) => World::StreamingStage,
            (true, false) => World::RequestStage,
            (true, true) => World::StreamingRequestStage,
        }
    }
}

/// `init: func(config: list<tuple<string, string>>) -> result<_, string>`.
type InitSig<'a> = TypedFunc<(&'a [(String, String)],), (Result<(), String>,)>;
/// `process: func(request: envelope) -> result<envelope, stage-error>`.
type ProcessByValueSig<'a> = TypedFunc<(&'a Envelope,), (Result<Envelope, StageError>,)>;
/// `process: func(request: borrow<request>) -> result<_, stage-error>`.
type ProcessByHandleSig = TypedFunc<(Resource<Envelope>,), (Result<(), StageError>,)>;
/// `process-chunk: func(context, carry, delta, last) -> result<chunk-output, stage-error>`.
type ProcessChunkSig<'a> =
    TypedFunc<(&'a ChunkContext, &'a str, &'a str, bool), (Result<ChunkOutput, StageError>,)>;

/// The exports of a component, found and type-checked at load.
#[derive(Debug, Clone)]
pub struct ExportIndices {
    world: World,
    init: ComponentExportIndex,
    process: ComponentExportIndex,
    process_chunk: Option<ComponentExportIndex>,
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
        if by_handle {
            check(
                "process",
                process_ty
                    .typecheck::<(Resource<Envelope>,), (Result<(), StageError>,)>(&instance_type),
            )?;
        } else {
            check(
                "process",
                process_ty
                    .typecheck::<(&Envelope,), (Result<Envelope, StageError>,)>(&instance_type),
            )?;
        }
        let process_chunk = match func("process-chunk")? {
            None => None,
            Some((ty, index)) => {
                check(
                    "process-chunk",
                    ty.typecheck::<(&ChunkContext, &str, &str, bool), (Result<ChunkOutput, StageError>,)>(
                        &instance_type,
                    ),
                )?;
                Some(index)
            }
        };
        Ok(ExportIndices {
            world: World::of(by_handle, process_chunk.is_some()),
            init,
            process,
            process_chunk,
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

    /// Call `process` with the envelope by value (worlds `stage`,
    /// `streaming-stage`), or with a borrowed handle to it (the
    /// `request-stage` worlds): the result's envelope is `Some` only by
    /// value.
    pub async fn process<T: Send>(
        &self,
        store: &mut Store<T>,
        argument: ProcessArgument<'_>,
    ) -> wasmtime::Result<Result<Option<Envelope>, StageError>> {
        match argument {
            ProcessArgument::Value(envelope) => {
                let (result,) = typed!(ProcessByValueSig<'_>, self.process)
                    .call_async(store, (envelope,))
                    .await?;
                Ok(result.map(Some))
            }
            ProcessArgument::Handle(request) => {
                let (result,) = typed!(ProcessByHandleSig, self.process)
                    .call_async(store, (request,))
                    .await?;
                Ok(result.map(|()| None))
            }
        }
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
        let call = typed!(ProcessChunkSig<'_>, func)
            .call_async(store, (context, carry, delta, last))
            .await;
        Some(call.map(|(result,)| result))
    }
}

/// What `process` is given, by the component's world.
pub enum ProcessArgument<'a> {
    /// The envelope, copied into the guest.
    Value(&'a Envelope),
    /// A borrowed handle to the envelope in the store's resource table.
    Handle(Resource<Envelope>),
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
