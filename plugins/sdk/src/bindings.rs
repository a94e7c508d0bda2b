//! The generated bindings of the `orchestrator:pipeline` WIT package.
//!
//! Both by-handle worlds are generated here: `streaming-request-stage`
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
/// exports `init`, `process` and `process-chunk`.
pub mod streaming {
    wit_bindgen::generate!({
        world: "streaming-request-stage",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "__export_streaming_request_stage",
        default_bindings_module: "::orchestrator_plugin::bindings::streaming",
        runtime_path: "::orchestrator_plugin::__private::wit_bindgen::rt",
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
            "orchestrator:pipeline/types@0.1.2": crate::bindings::streaming::orchestrator::pipeline::types,
            "orchestrator:pipeline/log@0.1.2": crate::bindings::streaming::orchestrator::pipeline::log,
            "orchestrator:pipeline/inference@0.1.2": crate::bindings::streaming::orchestrator::pipeline::inference,
            "orchestrator:pipeline/request@0.1.2": crate::bindings::streaming::orchestrator::pipeline::request,
        },
    });
}
