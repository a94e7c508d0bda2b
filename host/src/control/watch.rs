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
//! Polling (rather than inotify) keeps this portable and simple; with a
//! 200 ms interval a replaced file is swapped in well under a second plus
//! its load time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::swap::HotSwap;
use crate::config::{Config, PluginSource};
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

/// Start watching every stage's plugin file; runs until the runtime stops.
pub fn spawn(config: &Config, swap: Arc<HotSwap>) -> tokio::task::JoinHandle<()> {
    let max_bytes = config.max_plugin_bytes;
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
            for file in &mut files {
                let now = signature(&file.path);
                let stable = now == file.seen;
                file.seen = now;
                if !stable || now == file.handled || now.is_none() {
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
