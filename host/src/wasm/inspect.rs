//! What a component file declares, read from its bytes before anything is
//! compiled (lifecycle step 2): its top-level imports and exports, and how
//! many core instances one instantiation creates.
//!
//! Compiling a component costs from milliseconds (a Rust plugin) to tens of
//! seconds and hundreds of MiB (an 18 MB Python one). Everything that can
//! refuse a plugin without compiling it does so here, first: not
//! WebAssembly, a core module, a native binary, an import the stage is not
//! granted, none of the stage worlds' exports. A refused plugin therefore
//! costs no compilation and leaves nothing in the artifact cache. The full
//! type check of the exports still happens after compilation
//! ([`ExportIndices`](super::bindings::ExportIndices)), because only
//! wasmtime's view of the component knows the types.

use wasmparser::{ComponentTypeRef, Encoding, Instance, Parser, Payload};

use super::error::LoadError;

/// The top-level shape of a component.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inspection {
    /// Names of the imported interfaces and functions
    /// (`wasi:cli/environment@0.2.0`, `orchestrator:pipeline/log@0.1.2`).
    pub imports: Vec<String>,
    /// Names of the exported items (`init`, `process`, ...).
    pub exports: Vec<String>,
    /// Core module instances one instantiation creates, nested components
    /// included: what the store's instance limit must allow.
    pub core_instances: u32,
    /// Core memories defined by the component's modules (an upper bound on
    /// the memories of one instantiation when each module is instantiated
    /// once, as toolchains do).
    pub core_memories: u32,
    /// Core tables defined by the component's modules, likewise.
    pub core_tables: u32,
}

/// The first bytes of an ELF, Mach-O or PE executable: a plugin built for
/// the host instead of for `wasm32-wasip2`.
fn native_format(bytes: &[u8]) -> Option<&'static str> {
    match bytes.get(..4)? {
        [0x7f, b'E', b'L', b'F'] => Some("an ELF executable or library"),
        [0xcf, 0xfa, 0xed, 0xfe] | [0xfe, 0xed, 0xfa, 0xcf] | [0xca, 0xfe, 0xba, 0xbe] => {
            Some("a Mach-O executable or library")
        }
        [b'M', b'Z', ..] => Some("a Windows executable or DLL"),
        [b'!', b'<', b'a', b'r'] => Some("a static library archive (an rlib?)"),
        _ => None,
    }
}

/// Read the shape of `bytes`.
///
/// # Errors
///
/// [`LoadError::NativeBinary`], [`LoadError::NotWasm`],
/// [`LoadError::CoreModule`], or [`LoadError::Compile`] when the binary is
/// malformed.
pub fn inspect(bytes: &[u8]) -> Result<Inspection, LoadError> {
    if let Some(format) = native_format(bytes) {
        return Err(LoadError::NativeBinary(format));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(LoadError::NotWasm(bytes.iter().take(4).copied().collect()));
    }
    let mut inspection = Inspection::default();
    // Nesting: 0 is the component itself.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| LoadError::Compile(e.into()))?;
        match payload {
            Payload::Version {
                encoding: Encoding::Module,
                ..
            } if depth == 0 => return Err(LoadError::CoreModule),
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.map_err(|e| LoadError::Compile(e.into()))?;
                    if matches!(
                        import.ty,
                        ComponentTypeRef::Instance(_) | ComponentTypeRef::Func(_)
                    ) {
                        inspection.imports.push(import.name.name.to_string());
                    }
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(|e| LoadError::Compile(e.into()))?;
                    inspection.exports.push(export.name.name.to_string());
                }
            }
            Payload::InstanceSection(reader) => {
                for instance in reader {
                    let instance = instance.map_err(|e| LoadError::Compile(e.into()))?;
                    if matches!(instance, Instance::Instantiate { .. }) {
                        inspection.core_instances += 1;
                    }
                }
            }
            Payload::MemorySection(reader) => inspection.core_memories += reader.count(),
            Payload::TableSection(reader) => inspection.core_tables += reader.count(),
            _ => {}
        }
    }
    Ok(inspection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Bundled as Stage;

    #[test]
    fn what_is_not_a_component_is_named() {
        assert!(matches!(
            inspect(b"hello world"),
            Err(LoadError::NotWasm(_))
        ));
        assert!(matches!(
            inspect(b"\x7fELF\x02\x01\x01\0"),
            Err(LoadError::NativeBinary(_))
        ));
        assert!(matches!(
            inspect(b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule)
        ));
        assert!(matches!(
            inspect(b"\0asm\x0d\0\x01\0\xff"),
            Err(LoadError::Compile(_))
        ));
    }

    #[test]
    fn a_bundled_stage_shows_its_world() {
        let post = inspect(crate::bundled::component(Stage::Post)).unwrap();
        for export in ["init", "process", "process-chunk"] {
            assert!(post.exports.iter().any(|e| e == export), "{post:?}");
        }
        assert!(
            post.imports
                .iter()
                .any(|i| i.starts_with("orchestrator:pipeline/request@")),
            "{post:?}"
        );
        // `post` never generates, so it does not import inference.
        assert!(
            !post.imports.iter().any(|i| i.contains("inference")),
            "{post:?}"
        );
        assert!(
            post.core_instances >= 1 && post.core_memories >= 1,
            "{post:?}"
        );
    }
}
