//! The generated bindings of the `orchestrator:pipeline` WIT package.
//!
//! The package is `orchestrator:pipeline@0.2.0` (the `wit/` directory of
//! the repository; 0.1.x lives in `wit/v0.1/` and is not used here). Both
//! by-handle worlds are generated here: `streaming-request-stage`
//! with every imported interface, and `request-stage` reusing those
//! interfaces (`with`), so the two share one set of types. Their export
//! macros are public, and each writes its world's exports into the
//! plugin only when the plugin invokes it (through [`export_stage!`] or
//! [`export_streaming_stage!`]): a plugin exports exactly one world, and
//! `wit-component` drops the imports the plugin never calls, so a stage
//! that never generates does not import `inference`.
//!
//! [`export_stage!`]: crate::export_stage
//! [`export_streaming_stage!`]: crate::export_streaming_stage

#![allow(missing_docs, clippy::all)]

/// The `streaming-request-stage` world: all imported interfaces, and the
/// exports `init`, `process` and `process-chunk`. Its records and variants
/// also derive `PartialEq`, so tests can compare them.
pub mod streaming {
    wit_bindgen::generate!({
        world: "streaming-request-stage",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_streaming_request_stage",
        default_bindings_module: "::orchestrator_plugin::bindings::streaming",
        runtime_path: "::orchestrator_plugin::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

/// The `request-stage` world: the exports `init` and `process`, with the
/// imported interfaces of [`streaming`].
pub mod plain {
    wit_bindgen::generate!({
        world: "request-stage",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_request_stage",
        default_bindings_module: "::orchestrator_plugin::bindings::plain",
        runtime_path: "::orchestrator_plugin::__private::wit_bindgen::rt",
        with: {
            "orchestrator:pipeline/types@0.2.0": crate::bindings::streaming::orchestrator::pipeline::types,
            "orchestrator:pipeline/log@0.2.0": crate::bindings::streaming::orchestrator::pipeline::log,
            "orchestrator:pipeline/inference@0.2.0": crate::bindings::streaming::orchestrator::pipeline::inference,
            "orchestrator:pipeline/request@0.2.0": crate::bindings::streaming::orchestrator::pipeline::request,
        },
    });
}
