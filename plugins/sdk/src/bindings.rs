//! The generated bindings of the `orchestrator:pipeline` WIT package.
//!
//! The package is `orchestrator:pipeline@0.2.2` (the `wit/` directory of
//! the repository; 0.1.x lives in `wit/v0.1/` and is not used here). Its
//! four worlds are generated here: `streaming-request-stage` with every
//! imported interface (`wasi:keyvalue` included), and `request-stage`,
//! `finishing-request-stage` and `finishing-streaming-request-stage`
//! reusing those interfaces (`with`), so all share one set of types. Their
//! export
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
        generate_all,
        pub_export_macro: true,
        export_macro_name: "__export_streaming_request_stage",
        default_bindings_module: "::orchestrator_plugin::bindings::streaming",
        runtime_path: "::orchestrator_plugin::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
        // Holds a resource, which has no `PartialEq`.
        additional_derives_ignore: ["cas-error"],
    });
}

/// A world generated with the interfaces of [`streaming`] (`with`), so
/// that every world shares one set of types: `$module`, its WIT `$world`,
/// its export macro `$export` (the two names written out: the bindings
/// generator takes only string literals), and any more interfaces to share.
macro_rules! sharing_world {
    ($(#[$doc:meta])* $module:ident, $world:literal, $export:literal, $path:literal, { $($more:tt)* }) => {
        $(#[$doc])*
        pub mod $module {
            wit_bindgen::generate!({
                world: $world,
                path: "../../wit",
                pub_export_macro: true,
                export_macro_name: $export,
                default_bindings_module: $path,
                runtime_path: "::orchestrator_plugin::__private::wit_bindgen::rt",
                with: {
                    "orchestrator:pipeline/types@0.2.2": crate::bindings::streaming::orchestrator::pipeline::types,
                    "orchestrator:pipeline/log@0.2.2": crate::bindings::streaming::orchestrator::pipeline::log,
                    "orchestrator:pipeline/inference@0.2.2": crate::bindings::streaming::orchestrator::pipeline::inference,
                    "orchestrator:pipeline/request@0.2.2": crate::bindings::streaming::orchestrator::pipeline::request,
                    "orchestrator:pipeline/expiring@0.2.2": crate::bindings::streaming::orchestrator::pipeline::expiring,
                    "wasi:keyvalue/store@0.2.0-draft2": crate::bindings::streaming::wasi::keyvalue::store,
                    "wasi:keyvalue/atomics@0.2.0-draft2": crate::bindings::streaming::wasi::keyvalue::atomics,
                    "wasi:keyvalue/batch@0.2.0-draft2": crate::bindings::streaming::wasi::keyvalue::batch,
                    $($more)*
                },
            });
        }
    };
}

sharing_world!(
    /// The `request-stage` world: the exports `init` and `process`, with the
    /// imported interfaces of [`streaming`].
    plain,
    "request-stage",
    "__export_request_stage",
    "::orchestrator_plugin::bindings::plain",
    {}
);

sharing_world!(
    /// The `finishing-request-stage` world: `request-stage` plus `finish`.
    finishing,
    "finishing-request-stage",
    "__export_finishing_request_stage",
    "::orchestrator_plugin::bindings::finishing",
    {}
);

sharing_world!(
    /// The `finishing-streaming-request-stage` world:
    /// `streaming-request-stage` plus `finish`.
    finishing_streaming,
    "finishing-streaming-request-stage",
    "__export_finishing_streaming_request_stage",
    "::orchestrator_plugin::bindings::finishing_streaming",
    {
        "orchestrator:pipeline/streaming@0.2.2": crate::bindings::streaming::orchestrator::pipeline::streaming,
    }
);
