//! A real `redis-server` (Debian's package) on a free loopback port, for
//! the store tests: started by the test, stopped (and its files removed)
//! when dropped; it can be stopped and started again on the same port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct Redis {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Redis {
    /// Start one, or `None` when `redis-server` is not installed (allowed
    /// only outside CI).
    pub fn start() -> Option<Redis> {
        if super::tool_missing("redis-server") {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Redis {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.restart();
        Some(redis)
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Stop the server (and wait until it has exited).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server (again) on the same port, and wait until it
    /// answers `PING`.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.command(&["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send one command; its reply as text (a status, an integer, a bulk
    /// string, or an array of bulk strings one per line; `None` for a nil
    /// reply or no connection).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        match line.split_at(1) {
            ("+", rest) | (":", rest) => Some(rest.to_string()),
            ("$", "-1") => None,
            ("$", length) => {
                let length: usize = length.parse().ok()?;
                let mut body = vec![0; length + 2];
                reader.read_exact(&mut body).ok()?;
                body.truncate(length);
                String::from_utf8(body).ok()
            }
            ("*", count) => {
                let mut items = Vec::new();
                for _ in 0..count.parse::<usize>().ok()? {
                    let mut head = String::new();
                    reader.read_line(&mut head).ok()?;
                    let length: usize = head.trim_end().strip_prefix('$')?.parse().ok()?;
                    let mut body = vec![0; length + 2];
                    reader.read_exact(&mut body).ok()?;
                    body.truncate(length);
                    items.push(String::from_utf8(body).ok()?);
                }
                Some(items.join("\n"))
            }
            ("-", error) => panic!("redis error: {error}"),
            _ => None,
        }
    }
}

/// A TCP proxy in front of a [`Redis`] that, once armed, holds the next
/// command containing a marker until released: a store operation caught
/// in flight, at a moment the test chooses.
pub struct Holding {
    /// `redis://127.0.0.1:<port>/0` of the proxy.
    pub url: String,
    /// Notified when the held command arrived (and is being held).
    pub arrived: std::sync::Arc<tokio::sync::Notify>,
    release: tokio::sync::watch::Sender<bool>,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Holding {
    /// Proxy to `redis`; once [armed](Self::arm), it holds the next
    /// command (of any connection) whose bytes contain `marker`.
    pub async fn start(redis: &Redis, marker: &'static [u8]) -> Holding {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/0", listener.local_addr().unwrap());
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (release, released) = tokio::sync::watch::channel(false);
        let armed = Arc::new(AtomicBool::new(false));
        let arming = armed.clone();
        let upstream = ("127.0.0.1", redis.port);
        let signal = arrived.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let (arming, signal, mut released) =
                    (arming.clone(), signal.clone(), released.clone());
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        let bytes = &buffer[..n];
                        if bytes.windows(marker.len()).any(|w| w == marker)
                            && arming.swap(false, Ordering::AcqRel)
                        {
                            signal.notify_one();
                            let _ = released.wait_for(|r| *r).await;
                        }
                        if server_write.write_all(bytes).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        });
        Holding {
            url,
            arrived,
            release,
            armed,
            task,
        }
    }

    /// Hold the next command that contains the marker.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Let the held command (and everything after it) through.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }
}
