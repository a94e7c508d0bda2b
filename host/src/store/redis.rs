//! The `redis` backend: a Redis server (or Valkey, KeyDB) shared by every
//! replica that names it, through the `redis` crate's `ConnectionManager`:
//! one multiplexed connection per store, which pipelines concurrent
//! operations and reconnects by itself after a failure.
//!
//! Each operation is one command or one Lua script, so one round trip and
//! atomic on the server: the windowed counter adds, checks its limit and
//! starts its window in one script, where a plugin writing `INCRBY` then
//! `EXPIRE` could leave a counter without an expiry. The connection is
//! made at the first operation; while the server is down each operation
//! fails within the store's `timeout_ms` (the connection and response
//! timeouts are set to it too), and the manager keeps reconnecting in the
//! background.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script, ServerErrorKind};

use super::backend::{Backend, BackendError, BackendFuture, Window};

/// Keys asked of one `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// Add ARGV[1] to KEYS[1]; undo it if the value passes the limit ARGV[3]
/// (empty: none); give a key without an expiry the window ARGV[2] (ms).
/// Returns the value, 1 if applied, and the milliseconds to the reset.
const WINDOW: &str = r"
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local applied = 1
if ARGV[3] ~= '' and value > tonumber(ARGV[3]) then
  value = redis.call('DECRBY', KEYS[1], ARGV[1])
  applied = 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {value, applied, ttl}
";

/// Set KEYS[1] to ARGV[3] if it holds ARGV[2] (ARGV[1] = '1') or is
/// absent (ARGV[1] = '0'). Returns 1 if it did.
const SWAP: &str = r"
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
return 1
";

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// A store on a Redis server.
pub struct RedisBackend {
    connection: ConnectionManager,
    window: Script,
    swap: Script,
    state: AtomicU8,
}

impl RedisBackend {
    /// A backend for `url` that connects at its first operation; each
    /// connection attempt and response is bounded by `timeout`. Must be
    /// called within a tokio runtime. Fails on a malformed URL.
    pub fn new(url: &str, timeout: Duration) -> Result<RedisBackend, String> {
        let client = redis::Client::open(url).map_err(|e| format!("bad url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("cannot set up the connection: {e}"))?;
        Ok(RedisBackend {
            connection,
            window: Script::new(WINDOW),
            swap: Script::new(SWAP),
            state: AtomicU8::new(UNKNOWN),
        })
    }

    /// Run `operation` (on a handle to the shared connection), recording
    /// whether the server answered.
    fn run<'a, T: Send + 'a>(
        &'a self,
        operation: impl Future<Output = Result<T, RedisError>> + Send + 'a,
    ) -> BackendFuture<'a, T> {
        Box::pin(async move {
            let result = operation.await;
            let unavailable = result.as_ref().is_err_and(|e| !refused(e));
            self.state
                .store(if unavailable { DOWN } else { UP }, Ordering::Relaxed);
            result.map_err(classify)
        })
    }
}

/// Whether the server answered with an error (the command was refused),
/// rather than not answering.
fn refused(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
}

fn classify(error: RedisError) -> BackendError {
    if refused(&error) {
        BackendError::Invalid(error.to_string())
    } else {
        BackendError::Unavailable(error.to_string())
    }
}

impl Backend for RedisBackend {
    fn get<'a>(&'a self, key: &'a str) -> BackendFuture<'a, Option<Vec<u8>>> {
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("GET")
                .arg(key)
                .query_async(&mut connection)
                .await
        })
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: &'a [u8],
        ttl: Option<Duration>,
    ) -> BackendFuture<'a, ()> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            let mut command = redis::cmd("SET");
            command.arg(key).arg(value);
            if let Some(ttl) = ttl {
                command.arg("PX").arg(ttl.as_millis().max(1) as u64);
            }
            command.query_async(c).await
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BackendFuture<'a, ()> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            if keys.is_empty() {
                return Ok(());
            }
            redis::cmd("DEL").arg(keys).query_async::<i64>(c).await?;
            Ok(())
        })
    }

    fn exists<'a>(&'a self, key: &'a str) -> BackendFuture<'a, bool> {
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async(&mut connection)
                .await
        })
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> BackendFuture<'a, Vec<Option<Vec<u8>>>> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            redis::cmd("MGET").arg(keys).query_async(c).await
        })
    }

    fn set_many<'a>(&'a self, pairs: &'a [(String, Vec<u8>)]) -> BackendFuture<'a, ()> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            if pairs.is_empty() {
                return Ok(());
            }
            redis::cmd("MSET").arg(pairs).query_async(c).await
        })
    }

    fn list_keys<'a>(
        &'a self,
        prefix: &'a str,
        cursor: Option<&'a str>,
    ) -> BackendFuture<'a, (Vec<String>, Option<String>)> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            let pattern = format!("{}*", glob_escape(prefix));
            let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor.unwrap_or("0"))
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(c)
                .await?;
            Ok((keys, (next != "0").then_some(next)))
        })
    }

    fn increment<'a>(&'a self, key: &'a str, delta: i64) -> BackendFuture<'a, i64> {
        let mut connection = self.connection.clone();
        self.run(async move {
            redis::cmd("INCRBY")
                .arg(key)
                .arg(delta)
                .query_async(&mut connection)
                .await
        })
    }

    fn swap_if<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a [u8]>,
        value: &'a [u8],
    ) -> BackendFuture<'a, bool> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            let (present, expected) = match expected {
                Some(bytes) => ("1", bytes),
                None => ("0", &[][..]),
            };
            let swapped: i64 = self
                .swap
                .key(key)
                .arg(present)
                .arg(expected)
                .arg(value)
                .invoke_async(c)
                .await?;
            Ok(swapped == 1)
        })
    }

    fn window<'a>(
        &'a self,
        key: &'a str,
        delta: i64,
        window: Duration,
        limit: Option<i64>,
    ) -> BackendFuture<'a, Window> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            let limit = limit.map(|l| l.to_string()).unwrap_or_default();
            let (value, applied, reset_ms): (i64, i64, i64) = self
                .window
                .key(key)
                .arg(delta)
                .arg(window.as_millis().max(1) as u64)
                .arg(limit)
                .invoke_async(c)
                .await?;
            Ok(Window {
                value,
                applied: applied == 1,
                reset_ms: reset_ms.max(0) as u64,
            })
        })
    }

    fn timed_out(&self) {
        self.state.store(DOWN, Ordering::Relaxed);
    }

    fn healthy(&self) -> Option<bool> {
        match self.state.load(Ordering::Relaxed) {
            UP => Some(true),
            DOWN => Some(false),
            _ => None,
        }
    }
}

/// `text` with the glob characters of `SCAN MATCH` escaped.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}
