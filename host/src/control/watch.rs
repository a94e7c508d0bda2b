//! `--watch`: swap a stage's plugin when its file changes on disk, and
//! reload the configuration when its file changes.
//!
//! The watcher polls each stage's plugin file (`<plugins dir>/<stage>.wasm`,
//! or the stage's explicit `plugin` path) and the configuration file every
//! [`POLL`]. A change is acted on only once the file's size and
//! modification time (and, for the configuration, the file its path
//! resolves to) have stayed the same for one whole poll interval, so a file
//! being written is not read half way; a file renamed into place is seen
//! complete at once. A changed plugin goes through the same validated swap
//! as an upload ([`HotSwap::install`]): a file that is still incomplete, or
//! broken, fails validation, is logged and counted
//! (`orchestrator_plugin_reloads_total{result="error"}`), and the running
//! version keeps serving until the file changes again. A changed
//! configuration goes through [`Reloader::reload`].
//!
//! A Kubernetes ConfigMap volume updates by swapping a `..data` symlink
//! to a new directory, not by writing the file: the configuration path
//! then resolves to another file, which the watcher compares too, so the
//! swap is seen even when size and time match.
//!
//! After a reload the watcher follows the new configuration's stages.
//!
//! Owns noticing file changes; swapping is [`super::swap`]'s, reloading
//! [`super::reload`]'s.
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

use super::reload::Reloader;
use super::swap::HotSwap;
use crate::config::{Config, PluginSource};
use crate::files::read_bounded;

/// Poll interval.
pub const POLL: Duration = Duration::from_millis(200);

/// What a poll sees of a file: where its path resolves to, its size and
/// modification time; `None` when it is absent.
type Signature = Option<(PathBuf, u64, SystemTime)>;

fn signature(path: &Path) -> Signature {
    let meta = std::fs::metadata(path).ok()?;
    let resolved = std::fs::canonicalize(path).ok()?;
    Some((resolved, meta.len(), meta.modified().ok()?))
}

/// A file whose changes are acted on once they have settled.
struct Watched {
    path: PathBuf,
    /// What the last poll saw.
    seen: Signature,
    /// What was last acted on.
    handled: Signature,
}

/// A file's state at a poll.
enum Change {
    /// Nothing to do.
    None,
    /// It changed and has settled.
    Settled,
    /// It disappeared (once).
    Removed,
}

impl Watched {
    fn new(path: PathBuf) -> Watched {
        let now = signature(&path);
        Watched {
            path,
            seen: now.clone(),
            handled: now,
        }
    }

    fn poll(&mut self) -> Change {
        let now = signature(&self.path);
        let stable = now == self.seen;
        self.seen = now.clone();
        if !stable || now == self.handled {
            return Change::None;
        }
        self.handled = now.clone();
        match now {
            None => Change::Removed,
            Some(_) => Change::Settled,
        }
    }
}

/// The `.wasm` files in `dir` whose names match no stage of `config`: a
/// typo such as `Post.wasm` would otherwise silently leave the bundled
/// plugin in place. `None` if the directory cannot be read.
pub fn unknown_plugins(dir: &Path, config: &Config) -> Option<BTreeSet<PathBuf>> {
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
                path.extension().is_some_and(|e| e == "wasm") && config.stage(stem).is_none()
            })
            .collect(),
    )
}

/// Log each `.wasm` file of the plugins directory that names no stage.
pub fn warn_unknown(files: &BTreeSet<PathBuf>, config: &Config) {
    let stages: Vec<&str> = config.stages.iter().map(|s| s.name()).collect();
    for file in files {
        tracing::warn!(
            file = %file.display(),
            stages = %stages.join(", "),
            "ignoring a .wasm file that names no stage"
        );
    }
}

/// The plugin files of `config`'s stages in use: each stage's `plugin`
/// file, or `<plugins dir>/<stage>.wasm`.
fn plugin_files(config: &Config) -> Vec<(&'static str, PathBuf)> {
    config
        .stages_in_use()
        .into_iter()
        .filter_map(|stage| {
            let path = match stage.source(config.plugins_dir.as_deref()) {
                Some(PluginSource::File(path)) => path,
                _ => config
                    .plugins_dir
                    .as_ref()?
                    .join(format!("{}.wasm", stage.name())),
            };
            Some((stage.name(), path))
        })
        .collect()
}

/// Start watching; runs until the runtime stops.
pub fn spawn(
    config: &Config,
    swap: Arc<HotSwap>,
    reloader: Arc<Reloader>,
) -> tokio::task::JoinHandle<()> {
    let mut config = config.clone();
    // Those present at startup were reported then.
    let mut unknown = config
        .plugins_dir
        .as_deref()
        .and_then(|dir| unknown_plugins(dir, &config))
        .unwrap_or_default();
    let mut files: Vec<(&'static str, Watched)> = plugin_files(&config)
        .into_iter()
        .map(|(stage, path)| (stage, Watched::new(path)))
        .collect();
    let mut config_file = reloader.path().map(|p| Watched::new(p.to_path_buf()));
    let mut applied = reloader.applied();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(POLL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Some(file) = &mut config_file {
                match file.poll() {
                    Change::None => {}
                    Change::Removed => tracing::warn!(
                        path = %file.path.display(),
                        "watched configuration file removed; the running configuration keeps serving"
                    ),
                    // Logged and counted by the reloader either way.
                    Change::Settled => drop(reloader.reload("watch").await),
                }
            }
            // Follow every applied reload, this watcher's or another's
            // (`SIGHUP`, the admin API).
            if reloader.applied() != applied {
                applied = reloader.applied();
                config = reloader.config().await;
                // Follow the new stages; files already watched keep
                // their state, new ones start from what they are now.
                let mut next = Vec::new();
                for (stage, path) in plugin_files(&config) {
                    let kept = files
                        .iter()
                        .position(|(s, w)| *s == stage && w.path == path)
                        .map(|at| files.swap_remove(at));
                    next.push(kept.unwrap_or_else(|| (stage, Watched::new(path))));
                }
                files = next;
            }
            if let Some(now) = config
                .plugins_dir
                .as_deref()
                .and_then(|dir| unknown_plugins(dir, &config))
            {
                warn_unknown(&now.difference(&unknown).cloned().collect(), &config);
                unknown = now;
            }
            for (stage, file) in &mut files {
                match file.poll() {
                    Change::None => {}
                    Change::Removed => tracing::warn!(
                        stage = *stage,
                        path = %file.path.display(),
                        "watched plugin file removed; the running version keeps serving"
                    ),
                    Change::Settled => {
                        swap_in(&swap, stage, &file.path, config.max_plugin_bytes).await;
                    }
                }
            }
        }
    })
}

/// Read the changed plugin file of `stage` and swap it in.
async fn swap_in(swap: &HotSwap, stage: &'static str, path: &Path, max_bytes: u64) {
    let owned = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || read_bounded(&owned, max_bytes))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(stage, path = %path.display(), %error, "cannot read the changed plugin");
            return;
        }
    };
    let source = PluginSource::File(path.to_path_buf());
    match swap.install(stage, source, bytes).await {
        Ok(report) => {
            tracing::info!(stage, sha256 = %report.sha256, "watched plugin swapped in")
        }
        Err(error) => {
            tracing::warn!(stage, error = %error.report(), "watched plugin refused")
        }
    }
}
