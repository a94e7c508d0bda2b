//! A scripted OpenAI-compatible upstream on loopback, for the cases a real
//! model server cannot be made to produce on demand: a fixed token split,
//! a stall, an endless stream whose cancellation is observable.
//!
//! It speaks just enough HTTP/1.1: it reads one request (headers and a
//! `Content-Length` body) per connection and answers a request with
//! `"stream": true` with a `text/event-stream` of `chat.completion.chunk`
//! events, any other with one `chat.completion` (the same answer, joined,
//! after the same pacing), as a real server does; it closes the connection
//! at the end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the upstream does with each request.
#[derive(Clone, Debug)]
pub enum Script {
    /// Stream these deltas, 10 ms apart, then finish with `stop` and usage.
    Deltas(Vec<&'static str>),
    /// Stream these deltas, then close the connection without finishing.
    Broken(Vec<&'static str>),
    /// Answer the first `times` requests with HTTP `status` (and a
    /// `Retry-After` of `retry_after` seconds, if given), then stream
    /// `then` as `Deltas` does.
    FailThen {
        status: u16,
        retry_after: Option<u32>,
        times: usize,
        then: Vec<&'static str>,
    },
    /// Accept the request and never answer.
    Stall,
    /// Stream a delta every 10 ms until the client goes away.
    Endless,
    /// A model that calls a tool: to a chat whose last message is not a
    /// tool result, a call of `get_weather` with `{"city":"Paris"}`, its
    /// arguments streamed in three pieces, finishing with `tool_calls`;
    /// to a tool result, the text `It is sunny in Paris.` finishing with
    /// `stop`.
    Agent,
    /// Stream the delta `first` at once, then hold each answer until
    /// `open_at` requests have arrived, then finish with `then`: answers
    /// complete only if that many generations are in flight at once.
    Gate {
        open_at: usize,
        first: &'static str,
        then: &'static str,
    },
}

/// A running scripted upstream.
pub struct Upstream {
    /// The backend `base_url` (`http://127.0.0.1:PORT/v1`).
    pub base_url: String,
    /// Requests received.
    pub requests: Arc<AtomicUsize>,
    /// Notified when an `Endless` stream's client went away.
    pub cancelled: Arc<Notify>,
    /// The `traceparent` header of each request that had one, in order.
    pub traceparents: Arc<Mutex<Vec<String>>>,
    /// The head (request line and headers, lower-cased) of each request,
    /// in order.
    pub heads: Arc<Mutex<Vec<String>>>,
    /// The JSON body of each request, in order.
    pub bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Start serving `script` on a free loopback port.
    pub async fn start(script: Script) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base_url = format!("http://{}/v1", listener.local_addr().expect("addr"));
        let requests = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(Notify::new());
        let traceparents = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (count, notify, seen) = (requests.clone(), cancelled.clone(), traceparents.clone());
        let recorded = bodies.clone();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded_heads = heads.clone();
        let (arrived, arrivals) = tokio::sync::watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let Some((head, body)) = read_request(&mut socket).await else {
                    continue;
                };
                let body: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                recorded.lock().unwrap().push(body.clone());
                recorded_heads.lock().unwrap().push(head.clone());
                if let Some(value) = head.lines().find_map(|l| l.strip_prefix("traceparent:")) {
                    seen.lock().unwrap().push(value.trim().to_string());
                }
                let n = count.fetch_add(1, Ordering::SeqCst);
                arrived.send_replace(n + 1);
                if body["stream"] != true {
                    let script = script.clone();
                    let notify = notify.clone();
                    let mut arrivals = arrivals.clone();
                    match script {
                        Script::Stall => held.push(socket),
                        Script::FailThen { times, .. } if n < times => {
                            // Answered below, as for a stream.
                            serve_failure(&mut socket, &script).await;
                        }
                        script => {
                            tokio::spawn(async move {
                                serve_whole(&mut socket, &script, &body, &mut arrivals).await;
                                if matches!(script, Script::Endless) {
                                    notify.notify_one();
                                }
                            });
                        }
                    }
                    continue;
                }
                match script.clone() {
                    Script::FailThen { times, .. } if n < times => {
                        serve_failure(&mut socket, &script).await;
                    }
                    Script::FailThen { then, .. } => {
                        tokio::spawn(async move {
                            let _ = serve_deltas(&mut socket, &then, true).await;
                        });
                    }
                    Script::Stall => held.push(socket),
                    Script::Deltas(deltas) => {
                        tokio::spawn(async move {
                            let _ = serve_deltas(&mut socket, &deltas, true).await;
                        });
                    }
                    Script::Broken(deltas) => {
                        tokio::spawn(async move {
                            let _ = serve_deltas(&mut socket, &deltas, false).await;
                        });
                    }
                    Script::Gate {
                        open_at,
                        first,
                        then,
                    } => {
                        let mut arrivals = arrivals.clone();
                        tokio::spawn(async move {
                            let _ = socket.write_all(HEAD).await;
                            let _ = stream_deltas(&mut socket, &[first]).await;
                            if arrivals.wait_for(|&n| n >= open_at).await.is_ok() {
                                let _ = stream_deltas(&mut socket, &[then]).await;
                                let _ = finish_stream(&mut socket, 2).await;
                            }
                        });
                    }
                    Script::Agent => {
                        tokio::spawn(async move {
                            let _ = serve_agent(&mut socket, &body).await;
                        });
                    }
                    Script::Endless => {
                        let notify = notify.clone();
                        tokio::spawn(async move {
                            serve_endless(&mut socket).await;
                            notify.notify_one();
                        });
                    }
                }
            }
        });
        Upstream {
            base_url,
            requests,
            cancelled,
            traceparents,
            heads,
            bodies,
            task,
        }
    }
}

/// Read one request; its head, lower-cased, and its body, or `None` if
/// the connection ends first.
async fn read_request(socket: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = socket.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            return Some((head, buffer[end + 4..end + 4 + length].to_vec()));
        }
    }
}

/// A [`Script::FailThen`] failure: its status, a JSON error body.
async fn serve_failure(socket: &mut TcpStream, script: &Script) {
    let Script::FailThen {
        status,
        retry_after,
        ..
    } = script
    else {
        return;
    };
    let retry = retry_after
        .map(|s| format!("retry-after: {s}\r\n"))
        .unwrap_or_default();
    let body = format!("{{\"error\":{{\"message\":\"scripted {status}\"}}}}");
    let head = format!(
        "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(format!("{head}{body}").as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// The answer to a request that did not ask for a stream: what `script`
/// would have streamed, as one `chat.completion`, sent when the stream
/// would have ended. `Broken` sends half the body and closes; `Endless`
/// sends an answer whose text never ends, 16 KiB every 10 ms, until the
/// client goes away.
async fn serve_whole(
    socket: &mut TcpStream,
    script: &Script,
    request: &serde_json::Value,
    arrivals: &mut tokio::sync::watch::Receiver<usize>,
) {
    // As the stream would have reported.
    let prompt_tokens = if matches!(script, Script::Agent) {
        20
    } else {
        11
    };
    let pace = |n: usize| tokio::time::sleep(Duration::from_millis(10 * n as u64));
    let message = |text: String| json!({"role": "assistant", "content": text});
    let (message, reason, tokens) = match script {
        Script::Deltas(deltas) | Script::FailThen { then: deltas, .. } => {
            pace(deltas.len()).await;
            (message(deltas.concat()), "stop", deltas.len())
        }
        Script::Broken(deltas) => {
            pace(deltas.len()).await;
            let body =
                json!({"choices": [{"index": 0, "message": message(deltas.concat())}]}).to_string();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&body.as_bytes()[..body.len() / 2]).await;
            let _ = socket.shutdown().await;
            return;
        }
        Script::Gate {
            open_at,
            first,
            then,
        } => {
            if arrivals.wait_for(|&n| n >= *open_at).await.is_err() {
                return;
            }
            (message(format!("{first}{then}")), "stop", 2)
        }
        Script::Agent => {
            let last_is_tool = request["messages"]
                .as_array()
                .and_then(|m| m.last())
                .is_some_and(|m| m["role"] == "tool");
            if last_is_tool {
                (message("It is sunny in Paris.".into()), "stop", 5)
            } else {
                let call = json!({"id": "call_abc123", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}});
                (
                    json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                    "tool_calls",
                    9,
                )
            }
        }
        Script::Endless => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let start = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":""#;
            let chunk = |data: &str| format!("{:x}\r\n{data}\r\n", data.len());
            if socket.write_all(chunk(start).as_bytes()).await.is_err() {
                return;
            }
            let words = chunk(&"word ".repeat(16 * 1024 / 5));
            let mut ticker = tokio::time::interval(Duration::from_millis(10));
            loop {
                ticker.tick().await;
                if socket.write_all(words.as_bytes()).await.is_err()
                    || socket.flush().await.is_err()
                {
                    return;
                }
            }
        }
        Script::Stall => return,
    };
    let body = json!({
        "id": "up", "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens},
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = socket.write_all(format!("{head}{body}").as_bytes()).await;
    let _ = socket.shutdown().await;
}

const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";

fn delta(text: &str) -> String {
    let chunk = json!({"id": "up", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

async fn serve_deltas(
    socket: &mut TcpStream,
    deltas: &[&str],
    finish: bool,
) -> std::io::Result<()> {
    socket.write_all(HEAD).await?;
    stream_deltas(socket, deltas).await?;
    if !finish {
        return socket.shutdown().await;
    }
    finish_stream(socket, deltas.len()).await
}

async fn stream_deltas(socket: &mut TcpStream, deltas: &[&str]) -> std::io::Result<()> {
    for text in deltas {
        socket.write_all(delta(text).as_bytes()).await?;
        socket.flush().await?;
        // Paced like a model, so that each delta usually reaches the
        // streaming stages on its own (the host passes deltas that arrive
        // together through the stages as one).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// End a stream of `tokens` deltas: `stop`, usage, `[DONE]`.
async fn finish_stream(socket: &mut TcpStream, tokens: usize) -> std::io::Result<()> {
    let end = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": tokens}});
    socket
        .write_all(format!("data: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n").as_bytes())
        .await?;
    socket.shutdown().await
}

async fn serve_endless(socket: &mut TcpStream) {
    if socket.write_all(HEAD).await.is_err() {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    loop {
        ticker.tick().await;
        if socket.write_all(delta("word ").as_bytes()).await.is_err()
            || socket.flush().await.is_err()
        {
            return;
        }
    }
}

/// [`Script::Agent`]'s answer to `request`.
async fn serve_agent(socket: &mut TcpStream, request: &serde_json::Value) -> std::io::Result<()> {
    let last_is_tool = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "tool");
    socket.write_all(HEAD).await?;
    let event = |choice: serde_json::Value| {
        let chunk = json!({"id": "up", "object": "chat.completion.chunk", "choices": [choice]});
        format!("data: {chunk}\n\n")
    };
    let mut events = Vec::new();
    let (reason, tokens) = if last_is_tool {
        events.push(event(
            json!({"index": 0, "delta": {"role": "assistant", "content": "It is sunny "}}),
        ));
        events.push(event(
            json!({"index": 0, "delta": {"content": "in Paris."}}),
        ));
        ("stop", 5)
    } else {
        let call = |function: serde_json::Value, first: bool| {
            let mut piece = json!({"index": 0, "function": function});
            if first {
                piece["id"] = json!("call_abc123");
                piece["type"] = json!("function");
            }
            event(json!({"index": 0, "delta": {"tool_calls": [piece]}}))
        };
        events.push(event(
            json!({"index": 0, "delta": {"role": "assistant", "content": null}}),
        ));
        events.push(call(json!({"name": "get_weather", "arguments": ""}), true));
        events.push(call(json!({"arguments": "{\"city\""}), false));
        events.push(call(json!({"arguments": ":\"Paris\"}"}), false));
        ("tool_calls", 9)
    };
    for event in events {
        socket.write_all(event.as_bytes()).await?;
        socket.flush().await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = event(json!({"index": 0, "delta": {}, "finish_reason": reason}));
    let usage = json!({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": tokens}});
    socket
        .write_all(format!("{end}data: {usage}\n\ndata: [DONE]\n\n").as_bytes())
        .await?;
    socket.shutdown().await
}
