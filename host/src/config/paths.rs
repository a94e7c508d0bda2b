//! Default locations on disk.

use std::path::PathBuf;

/// Where the `rag` stage's default grant finds the bundled corpus: a
/// directory the host writes the corpus embedded in its binary to at
/// startup (see [`crate::bundled::install_corpus`]), so that an installed
/// or copied binary needs no file from its source tree.
/// `<cache base>/orchestrator-corpus-<version>` (`~/.cache/...`), or
/// under the system's temporary directory when neither `$XDG_CACHE_HOME`
/// nor `$HOME` is set.
pub fn default_corpus_dir() -> PathBuf {
    // Beside the artifact cache, not in it: a grant of a directory inside
    // the cache would expose compiled code to the plugin (and is refused).
    let base = default_cache_dir()
        .and_then(|cache| cache.parent().map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("orchestrator-corpus-{}", env!("CARGO_PKG_VERSION")))
}

/// `$XDG_CACHE_HOME/orchestrator` or `$HOME/.cache/orchestrator`.
pub(super) fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("orchestrator"))
}
