//! The `redis` backend: a Redis server (or Valkey, KeyDB) shared by every
//! replica that names it, through the `redis` crate's `ConnectionManager`:
//! one multiplexed connection per store, which pipelines concurrent
//! operations and reconnects by itself after a failure.
//!
//! Each operation is one command or one Lua script, so one round trip and
//! atomic on the server: the windowed counters add, check their limits and
//! start their windows in one script, where a plugin writing `INCRBY` then
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

use super::backend::{Backend, BackendError, BackendFuture, Counter, Lookup, Window};

/// Keys asked of one `SCAN` step.
const SCAN_COUNT: usize = 1000;

/// Windowed counters, all or none: every check (an integer value, no
/// overflow, the limits) is made before the first write, so a refusal or
/// an error changes nothing. For counter i (KEYS[i]) ARGV holds
/// its delta, window (ms) and limit ('' for none) at 3i-2, 3i-1 and 3i.
/// Every delta is added only if no positive delta takes its counter past
/// its limit; a delta of zero or less never creates a key (a refund never
/// lands in a later window). A key without an expiry gets its window.
/// Returns value, applied (1/0) and milliseconds to the reset, per
/// counter, flattened.
const WINDOWS: &str = r"
local current = {}
local fits = true
for i = 1, #KEYS do
  local text = redis.call('GET', KEYS[i])
  local value = nil
  if text then
    if not string.match(text, '^%-?%d+$') or #text > 20 then
      return redis.error_reply('ERR the key holds a value that is not an integer')
    end
    value = tonumber(text)
  end
  current[i] = value
  local delta = tonumber(ARGV[3 * i - 2])
  local sum = (value or 0) + delta
  if sum > 9.2e18 or sum < -9.2e18 then
    return redis.error_reply('ERR increment or decrement would overflow')
  end
  local limit = ARGV[3 * i]
  if delta > 0 and limit ~= '' and sum > tonumber(limit) then
    fits = false
  end
end
local out = {}
for i = 1, #KEYS do
  local delta = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local value = current[i]
  local applied = 0
  local ttl = 0
  if fits then applied = 1 end
  if value == nil and delta <= 0 then
    value = 0
  elseif not fits then
    value = value or 0
    ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = window end
  else
    value = redis.call('INCRBY', KEYS[i], ARGV[3 * i - 2])
    ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then
      redis.call('PEXPIRE', KEYS[i], window)
      ttl = window
    end
  end
  out[3 * i - 2] = value
  out[3 * i - 1] = applied
  out[3 * i] = ttl
end
return out
";

/// KEYS[1]'s value, or else claim KEYS[2] (for ARGV[1] ms) unless it is
/// held. Returns {1, value}, {2} (claimed) or {3} (held by another).
const GET_OR_CLAIM: &str = r"
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {2} end
return {3}
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
    windows: Script,
    get_or_claim: Script,
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
            windows: Script::new(WINDOWS),
            get_or_claim: Script::new(GET_OR_CLAIM),
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

    fn get_or_claim<'a>(
        &'a self,
        key: &'a str,
        claim: &'a str,
        ttl: Duration,
    ) -> BackendFuture<'a, Lookup> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            let reply: redis::Value = self
                .get_or_claim
                .key(key)
                .key(claim)
                .arg(ttl.as_millis().max(1) as u64)
                .invoke_async(c)
                .await?;
            let redis::Value::Array(items) = reply else {
                return Err(unexpected());
            };
            match items.as_slice() {
                [redis::Value::Int(1), value] => {
                    Ok(Lookup::Found(redis::from_redis_value_ref(value)?))
                }
                [redis::Value::Int(2)] => Ok(Lookup::Claimed),
                [redis::Value::Int(3)] => Ok(Lookup::Busy),
                _ => Err(unexpected()),
            }
        })
    }

    fn windows<'a>(&'a self, counters: &'a [Counter]) -> BackendFuture<'a, Vec<Window>> {
        let mut connection = self.connection.clone();
        self.run(async move {
            let c = &mut connection;
            let mut invocation = self.windows.prepare_invoke();
            for counter in counters {
                invocation
                    .key(&counter.key)
                    .arg(counter.delta)
                    .arg(counter.window.as_millis().max(1) as u64)
                    .arg(counter.limit.map(|l| l.to_string()).unwrap_or_default());
            }
            let flat: Vec<i64> = invocation.invoke_async(c).await?;
            if flat.len() != counters.len() * 3 {
                return Err(RedisError::from((
                    ErrorKind::Client,
                    "the windows script answered with the wrong number of values",
                )));
            }
            Ok(flat
                .chunks_exact(3)
                .map(|w| Window {
                    value: w[0],
                    applied: w[1] == 1,
                    reset_ms: w[2].max(0) as u64,
                })
                .collect())
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

/// A script's reply of the wrong shape.
fn unexpected() -> RedisError {
    RedisError::from((
        ErrorKind::Client,
        "a script answered in an unexpected shape",
    ))
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
