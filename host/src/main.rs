//! `orchestrator`: run the host, or work on a plugin.
//!
//! ```text
//! orchestrator [--config orchestrator.toml] [--plugins DIR]
//!              [--listen ADDR] [--metrics-listen ADDR] [--admin-listen ADDR]
//!              [--cache-dir DIR | --no-cache] [--watch]
//! orchestrator plugin new NAME --stage STAGE [--streaming] [--dir DIR] [--sdk-path P | --sdk-git URL [--sdk-rev R]]
//! orchestrator plugin check FILE --stage STAGE [--config F]
//! orchestrator plugin run FILE --stage STAGE [--input ENVELOPE.json] [--delta TEXT]... [--repeat N] [--config F]
//! ```
//!
//! Serving prints one line to stdout once both addresses are bound:
//! `orchestrator listening api=http://ADDR metrics=http://ADDR` (and
//! ` admin=http://ADDR` with `--admin-listen`).
//! Logs go to stderr (`RUST_LOG` filters them; default `info`, `warn` for
//! the plugin subcommands).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use orchestrator::authoring::{self, Scaffold, SdkSource, Session};
use orchestrator::config::{AdminToken, ConfigError, valid_name};
use orchestrator::control::ConfigSource;
use orchestrator::keys::{KEYS_STORE, KeyChange, Keys, NewKey};
use orchestrator::store::Stores;
use orchestrator::{Config, Orchestrator, metrics};

/// mimalloc for small blocks, the system allocator for large ones (see
/// `orchestrator::allocator`).
#[global_allocator]
static ALLOCATOR: orchestrator::allocator::Allocator = orchestrator::allocator::Allocator;

/// A WebAssembly-plugin orchestration host for LLM request pipelines.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write, check and try stage plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Create, list, show and revoke API keys in the configuration's
    /// `keys` store (a Redis store: a memory store lives inside each host,
    /// whose admin API `/admin/keys` manages it).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(clap::Args, Debug)]
struct KeysConfig {
    /// Configuration file (TOML) declaring `[stores.keys]`.
    #[arg(long, env = "ORCHESTRATOR_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Create a key and print it (it is shown only this once).
    Create {
        /// Who calls with it.
        #[arg(long)]
        principal: String,
        /// A label for people.
        #[arg(long)]
        name: Option<String>,
        /// A model it may use (repeat; none: every model).
        #[arg(long = "model")]
        models: Vec<String>,
        /// A limit of its own, `name=value` (`requests_per_minute=60`,
        /// `tokens_per_day=100000`, ...; repeat).
        #[arg(long = "limit", value_parser = parse_limit)]
        limits: Vec<(String, u64)>,
        /// It stops working after this many days.
        #[arg(long)]
        expires_in_days: Option<u64>,
        /// Store nothing: print the key and a `keys` entry for the `auth`
        /// stage's configuration instead (a key declared in the file).
        #[arg(long)]
        declare: bool,
        #[command(flatten)]
        config: KeysConfig,
    },
    /// List the keys (no secrets).
    List {
        #[command(flatten)]
        config: KeysConfig,
    },
    /// Show one key and its use in the current minute, hour and day.
    Show {
        /// The key's id.
        id: String,
        #[command(flatten)]
        config: KeysConfig,
    },
    /// Disable a key (refused until enabled again).
    Disable {
        /// The key's id.
        id: String,
        #[command(flatten)]
        config: KeysConfig,
    },
    /// Enable a disabled key.
    Enable {
        /// The key's id.
        id: String,
        #[command(flatten)]
        config: KeysConfig,
    },
    /// Revoke a key: every host sharing the store refuses it at once.
    Revoke {
        /// The key's id.
        id: String,
        #[command(flatten)]
        config: KeysConfig,
    },
}

fn parse_limit(text: &str) -> Result<(String, u64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| "a limit is `name=value`".to_string())?;
    let value = value
        .trim()
        .parse()
        .map_err(|_| format!("`{value}` is not a whole number"))?;
    Ok((name.trim().to_string(), value))
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Write a new plugin crate (builds with `cargo build --target
    /// wasm32-wasip2` and with `cargo component build`).
    New {
        /// The crate's name (`word-mask`).
        name: String,
        /// The stage position it is written for.
        #[arg(long, value_parser = parse_stage)]
        stage: String,
        /// Implement the chunk path too (the streaming-request-stage world).
        #[arg(long)]
        streaming: bool,
        /// Where to create the crate's directory (default: the current one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The SDK as a path dependency (default: the SDK and WIT of this
        /// binary's version, which it carries, written into the crate).
        #[arg(long, conflicts_with = "sdk_git")]
        sdk_path: Option<PathBuf>,
        /// The SDK from a git repository of the orchestrator.
        #[arg(long)]
        sdk_git: Option<String>,
        /// The revision of `--sdk-git`.
        #[arg(long, requires = "sdk_git")]
        sdk_rev: Option<String>,
    },
    /// Load a plugin exactly as startup and hot swap do, and describe it.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The stage whose grants, limits and config apply.
        #[arg(long, value_parser = parse_stage)]
        stage: String,
        /// Configuration file (TOML); without one, built-in defaults apply.
        #[arg(long, env = "ORCHESTRATOR_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load a plugin and call it once; print the result as JSON.
    Run {
        /// The component (`.wasm`).
        file: PathBuf,
        /// The stage whose grants, limits and config apply.
        #[arg(long, value_parser = parse_stage)]
        stage: String,
        /// The envelope to process, as JSON (any field may be left out).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Feed this delta through the chunk path (repeat for a sequence;
        /// the final call follows) instead of calling `process`.
        #[arg(long)]
        delta: Vec<String>,
        /// Call `process` this many times on the same instance and input,
        /// and report the warm calls' median, minimum and maximum.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        repeat: u32,
        /// Configuration file (TOML); without one, built-in defaults apply.
        #[arg(long, env = "ORCHESTRATOR_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn parse_stage(name: &str) -> Result<String, String> {
    if valid_name(name) {
        Ok(name.to_string())
    } else {
        Err("stage names use 1 to 64 lower-case ASCII letters, digits, `-` and `_`".into())
    }
}

/// Serve: the host's own flags.
#[derive(clap::Args, Debug)]
struct Args {
    /// Configuration file (TOML). Without one, built-in defaults apply.
    #[arg(long, env = "ORCHESTRATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of stage plugins (`<stage>.wasm`); stages without a file use the bundled plugin.
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Address of the OpenAI-compatible API (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of /metrics and /health (port 0 picks a free port).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Serve the admin API on this address instead of the API's.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Directory of the compiled-plugin cache.
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Compile plugins at every start, without the on-disk cache.
    #[arg(long)]
    no_cache: bool,
    /// Swap in `<plugins dir>/<stage>.wasm` whenever it changes.
    #[arg(long)]
    watch: bool,
    /// Export traces to this OTLP/HTTP traces URL (`[tracing] enabled =
    /// true` with this `endpoint`).
    #[arg(long, env = "ORCHESTRATOR_TRACE_ENDPOINT")]
    trace_endpoint: Option<String>,
}

/// The file (if any) with the command line's overrides: at startup and at
/// every reload.
fn load_config(args: &Args) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &args.plugins {
        config.plugins_dir = Some(dir.clone());
    }
    if let Some(addr) = args.listen {
        config.listen = addr;
    }
    if let Some(addr) = args.metrics_listen {
        config.metrics_listen = addr;
    }
    if let Some(addr) = args.admin_listen {
        config.admin_listen = Some(addr);
    }
    if let Some(dir) = &args.cache_dir {
        config.cache_dir = Some(dir.clone());
    }
    if args.no_cache {
        config.cache_dir = None;
    }
    if args.watch {
        config.watch = true;
    }
    if let Some(endpoint) = &args.trace_endpoint {
        config.tracing.enabled = true;
        config.tracing.endpoint = Some(endpoint.clone());
    }
    // The environment wins over the file, so the token need not be written
    // to disk. It is never logged.
    if let Ok(token) = std::env::var("ORCHESTRATOR_ADMIN_TOKEN") {
        config.admin_token = AdminToken::new(token);
    }
    if config.watch && config.plugins_dir.is_none() && args.config.is_none() {
        return Err(ConfigError::Invalid {
            key: "watch".into(),
            message: "needs a plugins directory (`plugins_dir` or --plugins) or a --config file"
                .into(),
        });
    }
    config.validate()?;
    Ok(config)
}

/// Reload the configuration on each `SIGHUP` (until the process ends).
#[cfg(unix)]
fn reload_on_sighup(reloader: std::sync::Arc<orchestrator::control::Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload through the admin API instead");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // Logged and counted by the reloader, success or not.
            let _ = reloader.reload("sighup").await;
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn config_file(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    })
}

async fn plugin_command(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::New {
            name,
            stage,
            streaming,
            dir,
            sdk_path,
            sdk_git,
            sdk_rev,
        } => {
            let sdk = match (sdk_path, sdk_git) {
                (Some(path), _) => SdkSource::Path(std::path::absolute(path)?),
                (None, Some(url)) => SdkSource::Git { url, rev: sdk_rev },
                (None, None) => SdkSource::Bundled,
            };
            let scaffold = Scaffold {
                name,
                stage: stage.clone(),
                streaming,
                sdk,
            };
            let dir = dir
                .unwrap_or_else(|| PathBuf::from("."))
                .join(&scaffold.name);
            scaffold.write(&dir)?;
            println!(
                "created {} (see its README.md)\n  cd {}\n  cargo build --release --target wasm32-wasip2\n  orchestrator plugin check target/wasm32-wasip2/release/{}.wasm --stage {}",
                dir.display(),
                dir.display(),
                scaffold.file_stem(),
                scaffold.stage
            );
        }
        PluginCommand::Check {
            file,
            stage,
            config,
        } => {
            let session = Session::new(&config_file(config.as_ref())?, &stage)?;
            let (_, report) = session.load(&file).await?;
            print!("{report}");
        }
        PluginCommand::Run {
            file,
            stage,
            input,
            delta,
            repeat,
            config,
        } => {
            let session = Session::new(&config_file(config.as_ref())?, &stage)?;
            let (plugin, _) = session.load(&file).await?;
            let input = match &input {
                Some(path) => {
                    let text = orchestrator::files::read_bounded(path, 16 << 20)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    serde_json::from_slice(&text)
                        .with_context(|| format!("{} is not JSON", path.display()))?
                }
                None => serde_json::json!({}),
            };
            let envelope = authoring::run::envelope_from_json(input)?;
            let output = if delta.is_empty() {
                let calls = usize::try_from(repeat).unwrap_or(1);
                serde_json::to_value(
                    authoring::run::process(&plugin, session.stores(), envelope, calls).await?,
                )?
            } else {
                let steps =
                    authoring::run::chunks(&plugin, session.stores(), &envelope, &delta).await?;
                let emitted: String = steps
                    .iter()
                    .flat_map(|s| s.emit.iter().map(String::as_str))
                    .collect();
                serde_json::json!({ "chunks": steps, "emitted": emitted })
            };
            println!("{}", serde_json::to_string_pretty(&output)?);
        }
    }
    Ok(())
}

/// The keys of the `keys` store the configuration at `path` declares: a
/// Redis store (a memory store is private to each host process).
fn keys_of(config: &KeysConfig) -> anyhow::Result<Keys> {
    let config = config_file(config.config.as_ref())?;
    match config.stores.get(KEYS_STORE).map(|s| s.kind) {
        Some(orchestrator::config::StoreKind::Redis) => {}
        _ => anyhow::bail!(
            "the configuration declares no Redis store `{KEYS_STORE}` ([stores.{KEYS_STORE}] kind = \"redis\"); \
             keys in a memory store live inside each host: manage them with its admin API (/admin/keys)"
        ),
    }
    let stores = Stores::reusing(&config, &metrics::Metrics::new(), None)?;
    let store = stores
        .get(KEYS_STORE)
        .cloned()
        .context("the keys store could not be opened")?;
    Ok(Keys::new(store))
}

/// Disable or enable key `id`.
async fn set_disabled(config: &KeysConfig, id: &str, disabled: bool) -> anyhow::Result<()> {
    let change = KeyChange {
        disabled: Some(disabled),
        ..KeyChange::default()
    };
    if keys_of(config)?.change(id, &change).await?.is_none() {
        anyhow::bail!("no key `{id}`");
    }
    println!("{} {id}", if disabled { "disabled" } else { "enabled" });
    Ok(())
}

async fn keys_command(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            principal,
            name,
            models,
            limits,
            expires_in_days,
            declare,
            config,
        } => {
            let new = NewKey {
                principal,
                name,
                models,
                limits: limits.into_iter().collect(),
                expires_in_seconds: expires_in_days.map(|d| d.saturating_mul(86_400)),
                disabled: false,
            };
            let created = if declare {
                new.make()?
            } else {
                keys_of(&config)?.create(new).await?
            };
            println!("{}", created.key);
            let record = &created.record;
            if declare {
                let entry = serde_json::json!({
                    "id": record.id, "sha256": record.hash, "principal": record.principal,
                    "models": record.models, "limits": record.limits,
                    "expires_at": record.expires_at,
                });
                eprintln!(
                    "add to the auth stage's `keys` list (config.keys) of the configuration file:\n{entry}"
                );
            } else {
                eprintln!(
                    "created key {} for `{}`; the key above is not shown again",
                    record.id, record.principal
                );
            }
        }
        KeysCommand::List { config } => {
            for record in keys_of(&config)?.list().await? {
                println!(
                    "{}  {}  models={}  {}{}",
                    record.id,
                    record.principal,
                    if record.models.is_empty() {
                        "*".to_string()
                    } else {
                        record.models.join(",")
                    },
                    record.name.as_deref().unwrap_or(""),
                    if record.disabled { "  (disabled)" } else { "" }
                );
            }
        }
        KeysCommand::Show { id, config } => {
            let keys = keys_of(&config)?;
            let record = keys.get(&id).await?.context("no such key")?;
            let usage = keys.usage(&record.id).await?;
            let mut record = serde_json::to_value(&record)?;
            if let Some(object) = record.as_object_mut() {
                object.remove("hash");
            }
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "record": record, "usage": usage })
                )?
            );
        }
        KeysCommand::Disable { id, config } => set_disabled(&config, &id, true).await?,
        KeysCommand::Enable { id, config } => set_disabled(&config, &id, false).await?,
        KeysCommand::Revoke { id, config } => {
            if !keys_of(&config)?.revoke(&id).await? {
                anyhow::bail!("no key `{id}`");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_filter = if cli.command.is_some() {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    if let Some(command) = cli.command {
        // A mistake is reported as one message, not a backtrace.
        let result = match command {
            Command::Plugin(command) => plugin_command(command).await,
            Command::Keys(command) => keys_command(command).await,
        };
        if let Err(error) = result {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let args = cli.serve;
    let config = load_config(&args)?;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let source = args.config.clone().map(|path| ConfigSource {
        path,
        read: Box::new(move || load_config(&args)),
    });
    let host = Orchestrator::start_with(config, metrics::global().clone(), source)
        .await
        .context("the orchestrator could not start")?;
    #[cfg(unix)]
    reload_on_sighup(host.reloader().clone());
    match host.admin_addr() {
        None => println!(
            "orchestrator listening api=http://{} metrics=http://{}",
            host.api_addr(),
            host.metrics_addr()
        ),
        Some(admin) => println!(
            "orchestrator listening api=http://{} metrics=http://{} admin=http://{admin}",
            host.api_addr(),
            host.metrics_addr()
        ),
    }
    tracing::info!(api = %host.api_addr(), metrics = %host.metrics_addr(), "ready");
    shutdown_signal().await;
    tracing::info!("shutting down: draining requests in flight");
    host.shutdown(grace).await;
    tracing::info!("stopped");
    Ok(())
}
