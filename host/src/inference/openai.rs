//! An OpenAI-compatible `/chat/completions` service (OpenAI, vLLM,
//! llama.cpp's `llama-server`, Ollama, ...), asked for a stream or for one
//! JSON answer.

use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;

use super::protocol::{
    AttemptError, ERROR_BODY_QUOTE, EventStream, Protocol, SendFuture, UpstreamRequest, quote,
};
use super::sse::{sse_events, whole_answer_events};
use crate::chat::MODELLED_FIELDS;

/// An OpenAI-compatible `/chat/completions` service, spoken to with
/// `"stream": true` and `stream_options.include_usage` for a streamed
/// attempt, without `stream` for a plain one.
pub struct OpenAi {
    client: reqwest::Client,
    /// Parsed once here, not on every request.
    url: reqwest::Url,
    api_key: Option<String>,
}

impl std::fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("url", &self.url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OpenAi {
    /// A client for `base_url` (`.../v1`).
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        connect_timeout: Duration,
    ) -> Result<OpenAi, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url)
            .map_err(|e| format!("base_url {base_url:?} is not a valid URL: {e}"))?;
        Ok(OpenAi {
            client,
            url,
            api_key,
        })
    }

    /// The JSON body of a request, borrowing from it (serialized straight
    /// into the request body: no `serde_json::Value`, no copy of the chat).
    pub fn body<'a>(request: &'a UpstreamRequest<'a>) -> Body<'a> {
        Body { request }
    }
}

/// The JSON body of an upstream request ([`OpenAi::body`]): the chat as the
/// stages left it, every parameter the client (or a stage) set and nothing
/// it did not, the fields the host does not model as they came, and — for a
/// streamed attempt — the host's `stream` with
/// `stream_options.include_usage`.
#[derive(Debug)]
pub struct Body<'a> {
    request: &'a UpstreamRequest<'a>,
}

impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let r = self.request.request;
        let p = &r.params;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("model", self.request.model)?;
        map.serialize_entry("messages", &r.messages)?;
        if !r.tools.is_empty() {
            map.serialize_entry("tools", &r.tools)?;
        }
        macro_rules! optional {
            ($($field:ident),*) => {$(
                if let Some(value) = &p.$field {
                    map.serialize_entry(stringify!($field), value)?;
                }
            )*};
        }
        optional!(
            max_tokens,
            max_completion_tokens,
            temperature,
            top_p,
            seed,
            presence_penalty,
            frequency_penalty,
            n,
            logprobs,
            top_logprobs,
            user,
            parallel_tool_calls,
            tool_choice,
            response_format
        );
        if !p.stop.is_empty() {
            map.serialize_entry("stop", &p.stop)?;
        }
        for (key, value) in &p.extra {
            // Never the body's own fields (a stage's `extra` is checked
            // when it is set; this keeps the body well-formed regardless).
            if !MODELLED_FIELDS.contains(&key.as_str()) {
                map.serialize_entry(key, value)?;
            }
        }
        if self.request.stream {
            map.serialize_entry("stream", &true)?;
            map.serialize_entry(
                "stream_options",
                &StreamOptions {
                    include_usage: true,
                },
            )?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
struct StreamOptions {
    include_usage: bool,
}

impl Protocol for OpenAi {
    fn send(&self, request: &UpstreamRequest<'_>) -> SendFuture {
        let mut builder = self
            .client
            .post(self.url.clone())
            .json(&OpenAi::body(request));
        if let Some(key) = &self.api_key {
            builder = builder.bearer_auth(key);
        }
        for (name, value) in &request.trace_headers {
            builder = builder.header(name, value);
        }
        let stream = request.stream;
        let max_body = whole_body_limit(request);
        Box::pin(async move {
            let response = builder.send().await.map_err(|e| {
                // reqwest's messages carry the URL but never headers.
                AttemptError::Connect(without_url(&e))
            })?;
            let status = response.status();
            if !status.is_success() {
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                // Quote the start of the body; read no more than that.
                let mut body = Vec::new();
                let mut response = response;
                while body.len() < 4 * ERROR_BODY_QUOTE {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                let body = String::from_utf8_lossy(&body);
                return Err(AttemptError::Status {
                    status: status.as_u16(),
                    retry_after,
                    message: quote(&body),
                });
            }
            if stream {
                let bytes = response.bytes_stream();
                return Ok(Box::pin(sse_events(bytes)) as EventStream);
            }
            let body = read_whole(response, max_body).await?;
            let events = whole_answer_events(&body);
            Ok(Box::pin(futures_util::stream::iter(events)) as EventStream)
        })
    }
}

/// The most bytes a plain answer's body may hold: room for the text the
/// request allows ([`UpstreamRequest::answer_limit`]) several times over
/// (JSON escapes, tool calls) and a megabyte of the rest; far more when log
/// probabilities were asked for (each token's entry is a small object).
fn whole_body_limit(request: &UpstreamRequest<'_>) -> usize {
    let per_byte = match request.request.params.logprobs {
        Some(true) => 64,
        _ => 8,
    };
    request
        .answer_limit
        .saturating_mul(per_byte)
        .saturating_add(1 << 20)
}

/// The body of a plain answer, up to `max` bytes: an upstream that ignores
/// `max_tokens` fails the attempt instead of filling the host's memory.
async fn read_whole(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, AttemptError> {
    let expected = response.content_length().unwrap_or(0) as usize;
    if expected > max {
        return Err(too_long(max));
    }
    let mut body = Vec::with_capacity(expected.max(1024));
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(too_long(max));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(AttemptError::Protocol(format!(
                    "the answer was cut: {}",
                    without_url(&e)
                )));
            }
        }
    }
}

fn too_long(max: usize) -> AttemptError {
    AttemptError::Protocol(format!(
        "the answer is longer than the request's max_tokens allow ({max} bytes)"
    ))
}

/// The error without reqwest's `for url (...)` suffix: the source chain.
fn without_url(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut message = if error.is_connect() {
        "cannot connect".to_string()
    } else if error.is_timeout() {
        "connect timeout".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::GenerateRequest;
    use serde_json::json;

    #[test]
    fn an_unparsable_base_url_is_refused_at_load() {
        let error = OpenAi::new("http://bad host/v1", None, Duration::from_secs(1)).unwrap_err();
        assert!(
            error.contains("base_url \"http://bad host/v1\" is not a valid URL"),
            "{error}"
        );
        let ok = OpenAi::new("http://127.0.0.1:8080/v1/", None, Duration::from_secs(1)).unwrap();
        assert_eq!(ok.url.as_str(), "http://127.0.0.1:8080/v1/chat/completions");
    }

    #[test]
    fn the_upstream_body_names_model_stop_and_asks_for_usage() {
        let mut r = GenerateRequest::for_test("User: hi", 9);
        r.params.stop = vec!["END".into()];
        let request = UpstreamRequest {
            trace_headers: Vec::new(),
            model: "gemma",
            request: &r,
            stream: true,
            answer_limit: 1 << 20,
        };
        let body = serde_json::to_value(OpenAi::body(&request)).unwrap();
        assert_eq!(body["model"], "gemma");
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stop"], json!(["END"]));
        assert_eq!(body["max_tokens"], 9);
        assert_eq!(body["messages"][0]["content"], "User: hi");
        assert!(body.get("temperature").is_none(), "unset: not sent");
    }

    #[test]
    fn a_plain_attempt_asks_for_no_stream() {
        let r = GenerateRequest::for_test("User: hi", 9);
        let request = UpstreamRequest {
            trace_headers: Vec::new(),
            model: "gemma",
            request: &r,
            stream: false,
            answer_limit: 9 * 16,
        };
        let body = serde_json::to_value(OpenAi::body(&request)).unwrap();
        assert!(body.get("stream").is_none(), "{body}");
        assert!(body.get("stream_options").is_none(), "{body}");
        assert_eq!(body["max_tokens"], 9);
        assert_eq!(whole_body_limit(&request), 9 * 16 * 8 + (1 << 20));
    }

    #[test]
    fn the_upstream_body_is_the_client_chat_as_sent() {
        let client = json!({
            "model": "client-name", "temperature": 0.7, "top_p": 0.5, "seed": 7,
            "tool_choice": "required", "response_format": {"type": "json_object"},
            "logit_bias": {"1": 5}, "future_param": {"x": [1]},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "messages": [{"role": "system", "content": "You are a pirate."},
                         {"role": "user", "content": [{"type": "text", "text": "hi"},
                             {"type": "image_url", "image_url": {"url": "data:x"}}]}]
        });
        let chat: crate::chat::ChatRequest = serde_json::from_value(client.clone()).unwrap();
        let mut r = GenerateRequest::for_test("", 1);
        r.messages = chat.messages;
        r.tools = chat.tools.unwrap();
        r.params = chat.params;
        let request = UpstreamRequest {
            trace_headers: Vec::new(),
            model: "upstream-name",
            request: &r,
            stream: true,
            answer_limit: 1 << 20,
        };
        let mut body = serde_json::to_value(OpenAi::body(&request)).unwrap();
        assert_eq!(body["model"], "upstream-name");
        assert_eq!(body["stream"], true);
        let object = body.as_object_mut().unwrap();
        object.remove("stream");
        object.remove("stream_options");
        object.insert("model".into(), json!("client-name"));
        assert_eq!(body, client);
    }
}
