//! `--watch`: swap a stage's plugin when its file changes on disk.
//!
//! The watcher polls each stage's plugin file (`<plugins dir>/<stage>.wasm`,
//! or the stage's explicit `plugin` path) every [`POLL`]. A change is acted
//! on only once the file's size and modification time have stayed the same
//! for one whole poll interval, so a file being written is not read half
//! way; a file renamed into place is seen complete at once. The new bytes
//! then go through the same validated swap as an upload
//! ([`HotSwap::install`]): a file that is still incomplete, or broken,
//! fails validation, is logged and counted
//! (`orchestrator_plugin_reloads_total{result="error"}`), and the running
//! version keeps serving until the file changes again.
//!
//! Owns noticing file changes; swapping is [`super::swap`]'s.
//!
//! What is not swapped is logged, once per change, so an author is never
//! left guessing: a watched file that disappears (the running version
//! keeps serving), a `.wasm` file that appears in the plugins directory but
//! names no stage (`Post.wasm`, `post.wasm.bak.wasm`), and one that
//! reappears after it was removed.
//!
//! Polling (rather than inotify) keeps this portable and simple; with a
//! 200 ms interval a replaced file is swapped in well under a second plus
//! its load time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::swap::HotSwap;
use crate::config::{Config, PluginSource, Stage};
use crate::files::read_bounded;

/// Poll interval.
pub const POLL: Duration = Duration::from_millis(200);

type Signature = Option<(u64, SystemTime)>;

fn signature(path: &PathBuf) -> Signature {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

struct Watched {
    stage: &'static str,
    path: PathBuf,
    /// What the last poll saw.
    seen: Signature,
    /// What was last acted on.
    handled: Signature,
}

/// The `.wasm` files in `dir` whose names match no stage: a typo such as
/// `Post.wasm` would otherwise silently leave the bundled plugin in place.
/// `None` if the directory cannot be read.
pub fn unknown_plugins(dir: &Path) -> Option<BTreeSet<PathBuf>> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                path.extension().is_some_and(|e| e == "wasm") && Stage::from_name(stem).is_none()
            })
            .collect(),
    )
}

/// Log each `.wasm` file of the plugins directory that names no stage.
pub fn warn_unknown(files: &BTreeSet<PathBuf>) {
    for file in files {
        tracing::warn!(
            file = %file.display(),
            stages = %Stage::names(),
            "ignoring a .wasm file that names no stage"
        );
    }
}

/// Start watching every stage's plugin file; runs until the runtime stops.
pub fn spawn(config: &Config, swap: Arc<HotSwap>) -> tokio::task::JoinHandle<()> {
    let max_bytes = config.max_plugin_bytes;
    let dir = config.plugins_dir.clone();
    // Those present at startup were reported then.
    let mut unknown = dir.as_deref().and_then(unknown_plugins).unwrap_or_default();
    let mut files: Vec<Watched> = config
        .stages
        .iter()
        .filter_map(|stage| {
            let path = match stage.source(config.plugins_dir.as_deref()) {
                PluginSource::File(path) => path,
                _ => config
                    .plugins_dir
                    .as_ref()?
                    .join(format!("{}.wasm", stage.name())),
            };
            let now = signature(&path);
            Some(Watched {
                stage: stage.name(),
                path,
                seen: now,
                handled: now,
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Some(now) = dir.as_deref().and_then(unknown_plugins) {
                warn_unknown(&now.difference(&unknown).cloned().collect());
                unknown = now;
            }
            for file in &mut files {
                let now = signature(&file.path);
                let stable = now == file.seen;
                file.seen = now;
                if !stable || now == file.handled {
                    continue;
                }
                if now.is_none() {
                    file.handled = None;
                    tracing::warn!(
                        stage = file.stage,
                        path = %file.path.display(),
                        "watched plugin file removed; the running version keeps serving"
                    );
                    continue;
                }
                file.handled = now;
                let path = file.path.clone();
                let read = tokio::task::spawn_blocking(move || read_bounded(&path, max_bytes))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                let bytes = match read {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        tracing::warn!(stage = file.stage, path = %file.path.display(), %error, "cannot read the changed plugin");
                        continue;
                    }
                };
                let source = PluginSource::File(file.path.clone());
                match swap.install(file.stage, source, bytes).await {
                    Ok(report) => {
                        tracing::info!(stage = file.stage, sha256 = %report.sha256, "watched plugin swapped in")
                    }
                    Err(error) => {
                        tracing::warn!(stage = file.stage, error = %error.report(), "watched plugin refused")
                    }
                }
            }
        }
    })
}
