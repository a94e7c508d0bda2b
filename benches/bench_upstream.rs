//! A tiny, fast OpenAI-compatible upstream for gateway benchmarks
//! (`benches/gateways.sh`): every gateway measured sits in front of it, so
//! what they add over it is theirs.
//!
//! ```text
//! cargo run --release --example bench_upstream -p orchestrator -- 127.0.0.1:8081
//! curl -s localhost:8081/v1/chat/completions -d '{"messages":[{"role":"user","content":"a b c"}],"max_tokens":4}'
//! ```
//!
//! `POST /v1/chat/completions` (or `/chat/completions`) answers with the
//! first `max_tokens` words (default 32) of the last user message, repeated
//! cyclically if it has fewer: a `chat.completion` with `usage`, or with
//! `"stream": true` server-sent `chat.completion.chunk` events, one word
//! each, then a `finish_reason` chunk, a usage chunk if
//! `stream_options.include_usage` is true, and `data: [DONE]`. There is no
//! artificial delay: the whole stream is sent as one body. It listens on
//! the address given as the first argument (default `127.0.0.1:0`: a free
//! port) and prints `listening on http://ADDR` once bound.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use warp::Filter;
use warp::http::{Response, StatusCode, header};

const DEFAULT_TOKENS: usize = 32;

/// The answer's words: the first `n` words of `prompt`, cycled.
fn answer_words(prompt: &str, n: usize) -> Vec<&str> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let words = if words.is_empty() { vec!["ok"] } else { words };
    words.iter().copied().cycle().take(n).collect()
}

/// The text of the last user message (a string, or the text parts of a list).
fn last_user_text(body: &Value) -> String {
    let messages = body["messages"].as_array().map_or(&[][..], Vec::as_slice);
    let Some(message) = messages.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &message["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts.iter().filter_map(|p| p["text"].as_str()).collect();
            texts.join(" ")
        }
        _ => String::new(),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<String> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(body)
        .expect("a valid response")
}

fn handle(bytes: bytes::Bytes) -> Response<String> {
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("invalid JSON: {e}"),
            );
        }
    };
    let model = body["model"].as_str().unwrap_or("bench-upstream");
    let n = body["max_tokens"]
        .as_u64()
        .or_else(|| body["max_completion_tokens"].as_u64())
        .map_or(DEFAULT_TOKENS, |n| n as usize);
    let prompt = last_user_text(&body);
    let words = answer_words(&prompt, n);
    let prompt_tokens = prompt.split_whitespace().count();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": words.len(),
        "total_tokens": prompt_tokens + words.len()});
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let id = format!("chatcmpl-bench-{created}");
    if body["stream"] != true {
        let completion = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": "length",
                "message": {"role": "assistant", "content": words.join(" ")}}],
            "usage": usage,
        });
        return reply(StatusCode::OK, "application/json", completion.to_string());
    }
    let chunk = |choices: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices})
    };
    let mut out = String::with_capacity(200 * (words.len() + 3));
    let mut event = |v: Value| out.push_str(&format!("data: {v}\n\n"));
    for (i, word) in words.iter().enumerate() {
        let delta = if i == 0 {
            json!({"role": "assistant", "content": word})
        } else {
            json!({"content": format!(" {word}")})
        };
        event(chunk(
            json!([{"index": 0, "delta": delta, "finish_reason": null}]),
        ));
    }
    event(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "length"}]),
    ));
    if body["stream_options"]["include_usage"] == true {
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        event(last);
    }
    out.push_str("data: [DONE]\n\n");
    reply(StatusCode::OK, "text/event-stream", out)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .map_err(std::io::Error::other)?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Accepted connections inherit TCP_NODELAY: no Nagle delay on answers.
    socket.set_nodelay(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(1024)?;
    let path = warp::path!("v1" / "chat" / "completions").or(warp::path!("chat" / "completions"));
    let route = warp::post()
        .and(path.unify())
        .and(warp::body::bytes())
        .map(handle);
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{}", listener.local_addr()?)?;
    stdout.flush()?;
    warp::serve(route).incoming(listener).run().await;
    Ok(())
}
