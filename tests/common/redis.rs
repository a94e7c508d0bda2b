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
