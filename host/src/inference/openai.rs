//! An OpenAI-compatible `/chat/completions` service (OpenAI, vLLM,
//! llama.cpp's `llama-server`, Ollama, ...), always asked for a stream.

use std::time::Duration;

use serde::Serialize;

use super::protocol::{
    AttemptError, ERROR_BODY_QUOTE, EventStream, Protocol, SendFuture, UpstreamRequest, quote,
};
use super::sse::sse_events;

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
    /// into the request body: no `serde_json::Value` and no copy of the
    /// prompt).
    pub fn body<'a>(request: &'a UpstreamRequest<'a>) -> Body<'a> {
        let r = &request.request;
        Body {
            model: request.model,
            messages: [BodyMessage {
                role: "user",
                content: &r.prompt,
            }],
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            stop: &r.stop,
        }
    }
}

/// The JSON body of an upstream request ([`OpenAi::body`]).
#[derive(Debug, Serialize)]
pub struct Body<'a> {
    model: &'a str,
    messages: [BodyMessage<'a>; 1],
    max_tokens: u32,
    temperature: f32,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Debug, Serialize)]
struct BodyMessage<'a> {
    role: &'static str,
    content: &'a str,
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
        r.stop = vec!["END".into()];
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
    }
}
