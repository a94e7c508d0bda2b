//! An OpenAI-compatible `/chat/completions` service (OpenAI, vLLM,
//! llama.cpp's `llama-server`, Ollama, ...), always asked for a stream.

use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;

use super::protocol::{
    AttemptError, ERROR_BODY_QUOTE, EventStream, Protocol, SendFuture, UpstreamRequest, quote,
};
use super::sse::sse_events;
use crate::chat::MODELLED_FIELDS;

/// An OpenAI-compatible `/chat/completions` service, spoken to with
/// `"stream": true` and `stream_options.include_usage`.
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
/// it did not, the fields the host does not model as they came, and the
/// host's `stream` with `stream_options.include_usage`.
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
        map.serialize_entry("stream", &true)?;
        map.serialize_entry(
            "stream_options",
            &StreamOptions {
                include_usage: true,
            },
        )?;
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
            let bytes = response.bytes_stream();
            Ok(Box::pin(sse_events(bytes)) as EventStream)
        })
    }
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
