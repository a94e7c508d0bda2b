//! `orchestrator plugin new`: a new plugin crate, from the templates in
//! `template/`.
//!
//! The crate is a standalone workspace (so it builds anywhere on disk,
//! even inside another project), depends on the guest SDK and serde, and
//! holds a working stage (a word mask on the completion, streaming with
//! `--streaming`), its native unit tests and a README with the build,
//! check, run and hot-swap steps. It builds with `cargo build --release
//! --target wasm32-wasip2` and with `cargo component build --release`.

use std::path::{Path, PathBuf};

/// Where the generated crate gets the SDK from.
#[derive(Debug, Clone, PartialEq)]
pub enum SdkSource {
    /// The SDK and the WIT of this binary's own version, which it carries:
    /// written into the crate as they lie in the orchestrator's repository
    /// (`vendor/orchestrator/plugins/sdk/`, `vendor/orchestrator/wit/`), so
    /// the crate builds wherever the binary came from (an install, a
    /// container image, a copied binary) without the source tree. (Not in
    /// the crate's own `wit/`: cargo-component would take that for the
    /// plugin's target.)
    Bundled,
    /// A local checkout of the SDK crate (`plugins/sdk` of the repository).
    Path(PathBuf),
    /// A git repository holding the orchestrator, optionally at a revision.
    Git {
        /// The repository URL.
        url: String,
        /// A commit, tag or branch.
        rev: Option<String>,
    },
}

/// Where a bundled SDK is written, in the crate.
const VENDORED_SDK: &str = "vendor/orchestrator/plugins/sdk";

/// Where its WIT is written: `../../wit` from the SDK, as in the repository.
const VENDORED_WIT: &str = "vendor/orchestrator/wit";

/// The SDK's sources this binary carries, by path in its crate (its
/// manifest is written from [`VENDORED_MANIFEST`] instead of copied: the
/// original takes its versions from the repository's workspace).
const SDK_FILES: [(&str, &str); 9] = [
    (
        "src/bindings.rs",
        include_str!("../../../plugins/sdk/src/bindings.rs"),
    ),
    (
        "src/config.rs",
        include_str!("../../../plugins/sdk/src/config.rs"),
    ),
    (
        "src/lib.rs",
        include_str!("../../../plugins/sdk/src/lib.rs"),
    ),
    (
        "src/log.rs",
        include_str!("../../../plugins/sdk/src/log.rs"),
    ),
    (
        "src/request.rs",
        include_str!("../../../plugins/sdk/src/request.rs"),
    ),
    (
        "src/store.rs",
        include_str!("../../../plugins/sdk/src/store.rs"),
    ),
    (
        "src/stream.rs",
        include_str!("../../../plugins/sdk/src/stream.rs"),
    ),
    (
        "src/testing.rs",
        include_str!("../../../plugins/sdk/src/testing.rs"),
    ),
    (
        "src/types.rs",
        include_str!("../../../plugins/sdk/src/types.rs"),
    ),
];

/// The WIT the SDK generates its bindings from (`../../wit` from the SDK's
/// directory), with the `wasi:keyvalue` package it uses, by path under it.
const WIT_FILES: [(&str, &str); 6] = [
    ("pipeline.wit", include_str!("../../../wit/pipeline.wit")),
    (
        "deps/keyvalue/atomic.wit",
        include_str!("../../../wit/deps/keyvalue/atomic.wit"),
    ),
    (
        "deps/keyvalue/batch.wit",
        include_str!("../../../wit/deps/keyvalue/batch.wit"),
    ),
    (
        "deps/keyvalue/store.wit",
        include_str!("../../../wit/deps/keyvalue/store.wit"),
    ),
    (
        "deps/keyvalue/watch.wit",
        include_str!("../../../wit/deps/keyvalue/watch.wit"),
    ),
    (
        "deps/keyvalue/world.wit",
        include_str!("../../../wit/deps/keyvalue/world.wit"),
    ),
];

/// The vendored SDK's manifest: the repository's, with the workspace's
/// versions written out.
const VENDORED_MANIFEST: &str = r#"[package]
name = "orchestrator-plugin"
description = "The guest SDK for orchestrator stage plugins (vendored by `orchestrator plugin new`)."
version = "{{version}}"
edition = "2024"
license = "Apache-2.0"
publish = false

[dependencies]
serde = { version = "1", default-features = false, features = ["std"] }
serde_json = "1"
wit-bindgen = { version = "0.61", default-features = false, features = ["macros", "realloc"] }
"#;

impl SdkSource {
    /// The files a bundled SDK adds to the crate: `(path, contents)`.
    fn files(&self) -> Vec<(String, String)> {
        if *self != SdkSource::Bundled {
            return Vec::new();
        }
        let mut files = vec![(
            format!("{VENDORED_SDK}/Cargo.toml"),
            VENDORED_MANIFEST.replace("{{version}}", env!("CARGO_PKG_VERSION")),
        )];
        files.extend(
            WIT_FILES
                .iter()
                .map(|(path, text)| (format!("{VENDORED_WIT}/{path}"), text.to_string())),
        );
        files.extend(
            SDK_FILES
                .iter()
                .map(|(path, text)| (format!("{VENDORED_SDK}/{path}"), text.to_string())),
        );
        files
    }

    /// The dependency's TOML value.
    fn dependency(&self) -> String {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        match self {
            SdkSource::Bundled => format!("{{ path = {} }}", quote(VENDORED_SDK)),
            SdkSource::Path(path) => format!("{{ path = {} }}", quote(&path.to_string_lossy())),
            SdkSource::Git { url, rev: None } => format!("{{ git = {} }}", quote(url)),
            SdkSource::Git {
                url,
                rev: Some(rev),
            } => format!("{{ git = {}, rev = {} }}", quote(url), quote(rev)),
        }
    }
}

/// Why a crate could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not a valid crate name.
    #[error(
        "`{0}` is not a valid plugin name: use ASCII letters, digits, `-` and `_`, starting with a letter"
    )]
    BadName(String),
    /// The target directory exists and is not empty.
    #[error("{} already exists and is not empty", .0.display())]
    Exists(PathBuf),
    /// A file could not be written.
    #[error("cannot write {}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A plugin crate to write.
#[derive(Debug, Clone)]
pub struct Scaffold {
    /// The crate's name (`profanity-filter`); the `.wasm` file takes it
    /// with `-` turned into `_`.
    pub name: String,
    /// The stage position it is written for (`post`), used in its README
    /// and commands.
    pub stage: String,
    /// Whether it implements the chunk path (the streaming world).
    pub streaming: bool,
    /// Where it gets the SDK.
    pub sdk: SdkSource,
}

const CARGO_TOML: &str = include_str!("template/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("template/lib.rs.tmpl");
const README: &str = include_str!("template/README.md.tmpl");

const STREAMING_IMPL: &str = r#"
impl StreamingStage for WordMask {
    fn process_chunk(&self, chunk: Chunk) -> Result<ChunkOutput, StageError> {
        // Complete words are final; a trailing partial word may still turn
        // out to be one to mask, so it waits in the carry for the next chunk.
        let (ready, held) = chunk.complete_words();
        Ok(ChunkOutput::emit(self.mask(&ready).0).with_carry(held))
    }
}
"#;

const STREAMING_TEST: &str = r#"
    #[test]
    fn streams_the_same_text_as_a_whole_completion() {
        use orchestrator_plugin::testing;
        let deltas = ["Oh da", "rn, HE", "CK no. Darn", "ed!"];
        let streamed = testing::stream(&stage(), &testing::params(), &deltas).unwrap();
        assert_eq!(streamed.text(), "Oh ****, **** no. Darned!");
    }
"#;

impl Scaffold {
    /// The crate's `.wasm` file name, without extension.
    pub fn file_stem(&self) -> String {
        self.name.replace('-', "_")
    }

    /// Write the crate into `dir` (created; it must not exist or be
    /// empty). Returns the files written.
    ///
    /// # Errors
    ///
    /// [`ScaffoldError`] naming the problem.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ScaffoldError> {
        let valid = self
            .name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(ScaffoldError::BadName(self.name.clone()));
        }
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(ScaffoldError::Exists(dir.to_path_buf()));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ScaffoldError::Io { path, source }
        };
        let mut files = vec![
            ("Cargo.toml".to_string(), self.render(CARGO_TOML)),
            ("src/lib.rs".to_string(), self.render(LIB_RS)),
            ("README.md".to_string(), self.render(README)),
            (".gitignore".to_string(), "/target\n".to_string()),
        ];
        files.extend(self.sdk.files());
        let mut written = Vec::new();
        for (name, text) in files {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            std::fs::write(&path, text).map_err(io(&path))?;
            written.push(path);
        }
        Ok(written)
    }

    fn render(&self, template: &str) -> String {
        let (streaming_doc, streaming_use, streaming_impl, streaming_test, export_macro) =
            if self.streaming {
                (
                    " It also masks a streamed completion as it flows, holding a \
                     trailing partial word back until the next chunk.",
                    "\nuse orchestrator_plugin::{Chunk, ChunkOutput, StreamingStage};",
                    STREAMING_IMPL,
                    STREAMING_TEST,
                    "export_streaming_stage",
                )
            } else {
                ("", "", "", "", "export_stage")
            };
        let (streaming_readme, run_stream) = if self.streaming {
            (
                ", streaming",
                "\norchestrator plugin run $WASM --stage {{stage}} --input envelope.json --delta 'oh da' --delta 'rn it'",
            )
        } else {
            ("", "")
        };
        [
            ("{{streaming_doc}}", streaming_doc),
            ("{{streaming_use}}", streaming_use),
            ("{{streaming_impl}}", streaming_impl),
            ("{{streaming_test}}", streaming_test),
            ("{{export_macro}}", export_macro),
            ("{{streaming_readme}}", streaming_readme),
            ("{{run_stream}}", run_stream),
            ("{{sdk}}", &self.sdk.dependency()),
            ("{{file}}", &self.file_stem()),
            ("{{name}}", &self.name),
            ("{{stage}}", &self.stage),
        ]
        .iter()
        .fold(template.to_string(), |text, (key, value)| {
            text.replace(key, value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaffold(name: &str, streaming: bool) -> Scaffold {
        Scaffold {
            name: name.into(),
            stage: "post".into(),
            streaming,
            sdk: SdkSource::Path("/sdk \"quoted\"".into()),
        }
    }

    #[test]
    fn templates_are_filled_in_completely() {
        for streaming in [false, true] {
            let s = scaffold("word-mask", streaming);
            for template in [CARGO_TOML, LIB_RS, README] {
                let text = s.render(template);
                assert!(!text.contains("{{"), "{text}");
            }
            let cargo: toml::Table = toml::from_str(&s.render(CARGO_TOML)).unwrap();
            assert_eq!(
                cargo["dependencies"]["orchestrator-plugin"]["path"].as_str(),
                Some("/sdk \"quoted\"")
            );
            assert_eq!(s.render(LIB_RS).contains("StreamingStage"), streaming);
        }
    }

    #[test]
    fn bad_names_and_busy_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "1st", "a b", "x/y", "ü"] {
            assert!(matches!(
                scaffold(bad, false).write(&dir.path().join("x")),
                Err(ScaffoldError::BadName(_))
            ));
        }
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(matches!(
            scaffold("ok", false).write(dir.path()),
            Err(ScaffoldError::Exists(_))
        ));
        let written = scaffold("ok", true).write(&dir.path().join("ok")).unwrap();
        assert_eq!(written.len(), 4);
    }

    #[test]
    fn a_bundled_sdk_is_written_whole_into_the_crate() {
        // Every source file of the SDK is carried (a file added to the SDK
        // and not to `SDK_FILES` fails here).
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk/src");
        let mut on_disk: Vec<String> = std::fs::read_dir(sdk)
            .unwrap()
            .map(|e| format!("src/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        on_disk.sort();
        let carried: Vec<String> = SDK_FILES.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(carried, on_disk);
        // And every file of the WIT.
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let mut wit_on_disk: Vec<String> = ["", "deps/keyvalue/"]
            .iter()
            .flat_map(|sub| {
                std::fs::read_dir(wit.join(sub))
                    .unwrap()
                    .map(|e| e.unwrap())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "wit"))
                    .map(move |e| format!("{sub}{}", e.file_name().to_string_lossy()))
            })
            .collect();
        wit_on_disk.sort();
        let mut wit_carried: Vec<String> = WIT_FILES.iter().map(|(p, _)| p.to_string()).collect();
        wit_carried.sort();
        assert_eq!(wit_carried, wit_on_disk);

        let dir = tempfile::tempdir().unwrap();
        let mut bundled = scaffold("ok", false);
        bundled.sdk = SdkSource::Bundled;
        let root = dir.path().join("ok");
        bundled.write(&root).unwrap();
        let cargo: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
        assert_eq!(
            cargo["dependencies"]["orchestrator-plugin"]["path"].as_str(),
            Some(VENDORED_SDK)
        );
        let manifest: toml::Table = toml::from_str(
            &std::fs::read_to_string(root.join(VENDORED_SDK).join("Cargo.toml")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            manifest["package"]["version"].as_str(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        // Every dependency of the SDK, and no other.
        let sdk: toml::Table =
            toml::from_str(include_str!("../../../plugins/sdk/Cargo.toml")).unwrap();
        let names = |t: &toml::Table| -> Vec<String> {
            t["dependencies"]
                .as_table()
                .unwrap()
                .keys()
                .cloned()
                .collect()
        };
        assert_eq!(names(&manifest), names(&sdk));
        // The SDK finds the WIT where it looks for it: `../../wit`.
        assert!(
            root.join(VENDORED_SDK)
                .join("../../wit/pipeline.wit")
                .is_file()
        );
    }
}
