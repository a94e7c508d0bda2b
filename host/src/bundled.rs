//! The bundled stage plugins, compiled from `plugins/` by the build script
//! and embedded in the binary, so the host runs with no plugin files.

mod generated {
    include!(concat!(env!("OUT_DIR"), "/bundled.rs"));
}

/// The bundled component of `stage`, if there is one.
pub fn plugin(stage: &str) -> Option<&'static [u8]> {
    Some(match stage {
        "rag" => generated::RAG,
        "assemble" => generated::ASSEMBLE,
        "inference" => generated::INFERENCE,
        "post" => generated::POST,
        "stream" => generated::STREAM,
        _ => return None,
    })
}
