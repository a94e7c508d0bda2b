//! What the host binary carries so that it runs with no file beside it: the
//! bundled stage plugins, compiled from `plugins/stages/` by the build script, and
//! the default `rag` corpus (`host/corpus`).
//!
//! Owns those bytes and writing the corpus to disk; it must not load or
//! run anything.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{self, Bundled, Config};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/bundled.rs"));
}

/// The component of the bundled plugin `plugin`.
pub fn component(plugin: Bundled) -> &'static [u8] {
    match plugin {
        Bundled::Rag => generated::RAG,
        Bundled::Assemble => generated::ASSEMBLE,
        Bundled::Inference => generated::INFERENCE,
        Bundled::Post => generated::POST,
        Bundled::Stream => generated::STREAM,
        Bundled::Guard => generated::GUARD,
        Bundled::Auth => generated::AUTH,
        Bundled::Ratelimit => generated::RATELIMIT,
        Bundled::Cache => generated::CACHE,
    }
}

/// Write the bundled corpus to `dir` (the `rag` stage's default grant, see
/// [`crate::config::default_corpus_dir`]), unless it is there already.
///
/// Each file is written to a temporary name and renamed into place, so a
/// host starting at the same time never reads half a file. Files that are
/// already there with the same content are left alone; other files in
/// `dir` are not touched.
pub fn install_corpus(dir: &Path) -> io::Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    for (name, contents) in generated::CORPUS {
        let path = dir.join(name);
        let installed = || std::fs::read(&path).is_ok_and(|existing| existing == *contents);
        if installed() {
            continue;
        }
        // A temporary name of its own, even for hosts started at once in
        // one process.
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, contents)?;
        if let Err(error) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            // Another host may have put the same file there meanwhile.
            if !installed() {
                return Err(error);
            }
        }
    }
    Ok(())
}

/// The default corpus directory, if a stage's grant in `config` names it:
/// then [`install_corpus`] must write the corpus there before that stage
/// loads.
pub fn default_corpus_in_use(config: &Config) -> Option<std::path::PathBuf> {
    let dir = config::default_corpus_dir();
    let used = config
        .stages
        .iter()
        .flat_map(|s| &s.capabilities.dirs)
        .any(|grant| grant.host == dir);
    used.then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_a_component_and_the_corpus_installs() {
        for stage in Bundled::ALL {
            assert!(component(stage).starts_with(b"\0asm"), "{stage}");
        }
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        install_corpus(&corpus).unwrap();
        install_corpus(&corpus).unwrap();
        let names: Vec<_> = std::fs::read_dir(&corpus)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), generated::CORPUS.len(), "{names:?}");
        assert!(names.iter().all(|n| n.ends_with(".md")), "{names:?}");
    }
}
