//! Test harness: the real `orchestrator` binary on loopback ports, real
//! HTTP, and the guest test programs in `tests/plugins/` built for
//! wasm32-wasip2.
//!
//! A [`Host`] is the binary in its own process, or ([`Host::in_process`])
//! the same host started in the test's process through
//! `Orchestrator::start_with`: faster to start, for tests that need no log,
//! signal or exit code of their own. Both answer the same HTTP.

#![allow(dead_code)]

mod guests;
pub mod redis;
pub mod sse;
pub mod upstream;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

/// How long a host may take to start (a cold debug build compiles five
/// components).
const START_TIMEOUT: Duration = Duration::from_secs(120);

pub use guests::{bundled_wasm, cached, sha_of, target_dir, test_plugin};

/// What a host wrote to stderr, appended by a reader thread that wakes
/// waiters at each read.
#[derive(Default)]
struct Log {
    bytes: Mutex<Vec<u8>>,
    grew: Condvar,
}

impl Log {
    fn append(&self, chunk: &[u8]) {
        self.bytes.lock().unwrap().extend_from_slice(chunk);
        self.grew.notify_all();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, needle: &str, count: usize) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut bytes = self.bytes.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if text.matches(needle).count() >= count {
                return text;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "never logged {count}× {needle:?}:\n{text}");
            bytes = self.grew.wait_timeout(bytes, left).unwrap().0;
        }
    }
}

/// Where a [`Host`] runs.
enum Running {
    /// The binary, in a process of its own.
    Process(Child),
    /// In this process (dropped with the host).
    InProcess(#[allow(dead_code)] Box<orchestrator::Orchestrator>),
}

/// A running host: the `orchestrator` binary, or the same host in this
/// process.
pub struct Host {
    running: Running,
    /// `http://127.0.0.1:PORT` of the API.
    pub api: String,
    /// `http://127.0.0.1:PORT` of /metrics and /health.
    pub metrics: String,
    /// `http://127.0.0.1:PORT` of the admin API's own listener, if any.
    pub admin: Option<String>,
    stderr: Arc<Log>,
    /// The directory of a config file written for this host, if any.
    config_dir: Option<tempfile::TempDir>,
}

impl Host {
    /// Start the binary with `args` (plus loopback port-0 addresses and the
    /// shared test artifact cache); panic with its stderr if it fails.
    pub fn start(args: &[&str]) -> Host {
        Host::try_start(args)
            .unwrap_or_else(|stderr| panic!("orchestrator failed to start:\n{stderr}"))
    }

    /// Start the binary; `Err(stderr)` if it exits before listening.
    pub fn try_start(args: &[&str]) -> Result<Host, String> {
        Host::launch(args, &[], &target_dir().join("test-cache"))
    }

    /// Start the binary with extra environment variables and the given
    /// artifact cache directory; panic with its stderr if it fails.
    pub fn start_with(args: &[&str], env: &[(&str, &str)], cache: &Path) -> Host {
        Host::launch(args, env, cache)
            .unwrap_or_else(|stderr| panic!("orchestrator failed to start:\n{stderr}"))
    }

    /// Start the binary with the given artifact cache directory;
    /// `Err(stderr)` if it exits before listening.
    pub fn try_start_with_cache(args: &[&str], cache: &Path) -> Result<Host, String> {
        Host::launch(args, &[], cache)
    }

    /// Start a copy of the binary at `program`, from the working directory
    /// `cwd`, with extra environment variables; panic with its stderr if
    /// it fails.
    pub fn start_program(program: &Path, cwd: &Path, env: &[(&str, &str)]) -> Host {
        let cache = target_dir().join("test-cache");
        Host::launch_program(program, Some(cwd), &[], env, &cache)
            .unwrap_or_else(|stderr| panic!("orchestrator failed to start:\n{stderr}"))
    }

    fn launch(args: &[&str], env: &[(&str, &str)], cache: &Path) -> Result<Host, String> {
        let program = Path::new(env!("CARGO_BIN_EXE_orchestrator"));
        Host::launch_program(program, None, args, env, cache)
    }

    fn launch_program(
        program: &Path,
        cwd: Option<&Path>,
        args: &[&str],
        env: &[(&str, &str)],
        cache: &Path,
    ) -> Result<Host, String> {
        let mut command = Command::new(program);
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cache-dir",
            ])
            .arg(cache)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the orchestrator binary runs");
        let stderr = Arc::new(Log::default());
        let mut err_pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.append(&buf[..n]);
            }
        });
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("orchestrator listening") {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .expect("address printed")
                        .to_string()
                };
                let admin = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("admin="))
                    .map(String::from);
                Ok(Host {
                    api: field("api="),
                    metrics: field("metrics="),
                    admin,
                    running: Running::Process(child),
                    stderr,
                    config_dir: None,
                })
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                // The process is gone, so its stderr is at EOF: once the
                // reader has seen that, it has collected everything.
                let _ = reader.join();
                Err(stderr.text())
            }
        }
    }

    /// Start with a config file holding `toml` (removed with the host),
    /// the environment `env` and the shared artifact cache.
    pub fn try_with_config_env(toml: &str, env: &[(&str, &str)]) -> Result<Host, String> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("orchestrator.toml");
        std::fs::write(&path, toml).expect("write config");
        let args = ["--config", path.to_str().expect("a UTF-8 path")];
        let mut host = Host::launch(&args, env, &target_dir().join("test-cache"))?;
        host.config_dir = Some(dir);
        Ok(host)
    }

    /// Start with a config file holding `toml`; panic with stderr if it fails.
    pub fn with_config(toml: &str) -> Host {
        Host::try_with_config_env(toml, &[])
            .unwrap_or_else(|stderr| panic!("orchestrator failed to start:\n{stderr}"))
    }

    /// Start with a config file holding `toml`; `Err(stderr)` if it fails.
    pub fn try_with_config(toml: &str) -> Result<Host, String> {
        Host::try_with_config_env(toml, &[])
    }

    /// [`Host::with_config`], in this process: the file is read as the
    /// binary reads it, with the same overrides (loopback port-0 addresses,
    /// the shared artifact cache), and an admin reload reads it again. It
    /// has no log ([`Host::stderr`]) and no process to signal.
    pub async fn in_process(toml: &str) -> Host {
        use orchestrator::config::Config;

        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("orchestrator.toml");
        std::fs::write(&path, toml).expect("write config");
        let (file, cache) = (path.clone(), target_dir().join("test-cache"));
        let read = move || {
            let mut config = Config::from_file(&file)?;
            config.listen = "127.0.0.1:0".parse().expect("an address");
            config.metrics_listen = "127.0.0.1:0".parse().expect("an address");
            config.cache_dir = Some(cache.clone());
            Ok(config)
        };
        let config = read().unwrap_or_else(|e| panic!("the configuration: {e}"));
        let source = orchestrator::control::ConfigSource {
            path,
            read: Box::new(read),
        };
        let metrics = Arc::new(orchestrator::Metrics::new());
        let host = orchestrator::Orchestrator::start_with(config, metrics, Some(source))
            .await
            .unwrap_or_else(|e| panic!("the host did not start: {e}"));
        Host {
            api: format!("http://{}", host.api_addr()),
            metrics: format!("http://{}", host.metrics_addr()),
            admin: host.admin_addr().map(|addr| format!("http://{addr}")),
            running: Running::InProcess(Box::new(host)),
            stderr: Arc::default(),
            config_dir: Some(dir),
        }
    }

    /// The host's process; panics for a host in this process.
    fn child(&self) -> &Child {
        match &self.running {
            Running::Process(child) => child,
            Running::InProcess(_) => panic!("a host in this process has no process of its own"),
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        match &mut self.running {
            Running::Process(child) => child,
            Running::InProcess(_) => panic!("a host in this process has no process of its own"),
        }
    }

    /// What the host logged so far. A line the host writes just before
    /// answering may not have been read from the pipe yet when the answer
    /// arrives: to assert on such a line, use [`Host::wait_for_log`].
    pub fn stderr(&self) -> String {
        self.child();
        self.stderr.text()
    }

    /// Wait (up to 30 s, woken by each read from the pipe, never polling)
    /// until the log holds `needle` at least `count` times; returns the
    /// log. Panics with the log if it never does.
    pub async fn wait_for_log(&self, needle: &str, count: usize) -> String {
        self.child();
        let log = self.stderr.clone();
        let needle = needle.to_string();
        tokio::task::spawn_blocking(move || log.wait_for(&needle, count))
            .await
            .expect("the log waiter")
    }

    /// Send SIGTERM and wait for exit; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        self.send_sigterm();
        self.child_mut()
            .wait()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Wait up to `limit` for the process to exit; whether it exited
    /// cleanly, or `None` if it is still running.
    pub fn wait_for_exit(&mut self, limit: Duration) -> Option<bool> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child_mut().try_wait() {
                return Some(status.success());
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send SIGHUP (a host started with `--config` reloads the file).
    pub fn send_sighup(&self) {
        let pid = self.child().id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -HUP {pid} failed");
    }

    /// `/health`, as JSON.
    pub async fn health(&self) -> Value {
        get_json(&format!("{}/health", self.metrics)).await
    }

    /// `POST /admin/config/reload` with the admin `token`: status and JSON
    /// body.
    pub async fn reload(&self, token: &str) -> (u16, Value) {
        let response = client()
            .post(format!("{}/admin/config/reload", self.api))
            .bearer_auth(token)
            .send()
            .await
            .expect("the admin API answers");
        let status = response.status().as_u16();
        let text = response.text().await.expect("a body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("reload answered {status} with non-JSON ({e}): {text}"));
        (status, body)
    }

    /// Send SIGTERM without waiting for the process to exit.
    pub fn send_sigterm(&self) {
        let pid = self.child().id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
    }

    /// The current `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.metrics))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    /// One sample of `/metrics`: the value of the series `name{labels}`
    /// (labels written exactly as exposed, e.g. `stage="rag"`), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics_text().await, series)
    }

    /// POST a chat completion request.
    pub async fn post(&self, body: &Value) -> reqwest::Response {
        client()
            .post(format!("{}/v1/chat/completions", self.api))
            .json(body)
            .send()
            .await
            .expect("the API answers")
    }

    /// POST a chat completion; returns status and body text.
    pub async fn chat(&self, body: &Value) -> (u16, String) {
        let response = self.post(body).await;
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Running::Process(child) = &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A shared HTTP client.
pub fn client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new).clone()
}

/// The value of `series` (e.g. `orchestrator_requests_total{stage="rag"}`)
/// in an exposition, or 0 when absent. Label order must be as exposed
/// (alphabetical).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// Create an API key through `host`'s admin API (admin token `admin`)
/// with the request `body`; returns the key and its id.
pub async fn create_key(host: &Host, admin: &str, body: &Value) -> (String, String) {
    let response = client()
        .post(format!("{}/admin/keys", host.api))
        .bearer_auth(admin)
        .json(body)
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("a JSON body");
    let text = |v: &Value| v.as_str().expect("a string").to_string();
    (text(&created["key"]), text(&created["record"]["id"]))
}

/// The TOML a Kubernetes ConfigMap's `orchestrator.toml` holds, given the
/// ConfigMap's YAML.
pub fn configmap_toml(yaml: &str) -> String {
    yaml.split("orchestrator.toml: |\n")
        .nth(1)
        .expect("an orchestrator.toml entry")
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A minimal valid request asking `question`.
pub fn ask(question: &str) -> Value {
    serde_json::json!({"model": "echo", "messages": [{"role": "user", "content": question}]})
}

/// GET `url` and parse the JSON body.
pub async fn get_json(url: &str) -> Value {
    client()
        .get(url)
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("a JSON body")
}

/// Whether a required external tool may be skipped: only outside CI.
pub fn tool_missing(tool: &str) -> bool {
    let missing = Command::new(tool).arg("--version").output().is_err();
    if missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is required in CI (.ci/run installs it)"
        );
        eprintln!("note: {tool} not installed; skipping the part of this test that needs it");
    }
    missing
}

/// A config file in a directory of its own (removed with it).
pub fn config_file(toml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orchestrator.toml");
    std::fs::write(&path, toml).unwrap();
    (dir, path)
}
