//! `orchestrator`: run the host.
//!
//! ```text
//! orchestrator [--config orchestrator.toml] [--plugins DIR]
//!              [--listen ADDR] [--metrics-listen ADDR] [--cache-dir DIR | --no-cache] [--watch]
//! ```
//!
//! Prints one line to stdout once both addresses are bound:
//! `orchestrator listening api=http://ADDR metrics=http://ADDR`.
//! Logs go to stderr (`RUST_LOG` filters them; default `info`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use orchestrator::config::AdminToken;
use orchestrator::{Config, Orchestrator, metrics};

/// A WebAssembly-plugin orchestration host for LLM request pipelines.
#[derive(Parser, Debug)]
#[command(version, about)]
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
    /// Directory of the compiled-plugin cache.
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Compile plugins at every start, without the on-disk cache.
    #[arg(long)]
    no_cache: bool,
    /// Swap in `<plugins dir>/<stage>.wasm` whenever it changes.
    #[arg(long)]
    watch: bool,
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
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
    if let Some(dir) = &args.cache_dir {
        config.cache_dir = Some(dir.clone());
    }
    if args.no_cache {
        config.cache_dir = None;
    }
    if args.watch {
        config.watch = true;
    }
    // The environment wins over the file, so the token need not be written
    // to disk. It is never logged.
    if let Ok(token) = std::env::var("ORCHESTRATOR_ADMIN_TOKEN") {
        config.admin_token = AdminToken::new(token);
    }
    config.validate()?;
    Ok(config)
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = load_config(&args)?;
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let host = Orchestrator::start(config, metrics::global().clone())
        .await
        .context("the orchestrator could not start")?;
    println!(
        "orchestrator listening api=http://{} metrics=http://{}",
        host.api_addr(),
        host.metrics_addr()
    );
    tracing::info!(api = %host.api_addr(), metrics = %host.metrics_addr(), "ready");
    shutdown_signal().await;
    tracing::info!("shutting down: draining requests in flight");
    host.shutdown(grace).await;
    tracing::info!("stopped");
    Ok(())
}
