//! The request of `POST /v1/chat/completions`: its wire types and their
//! validation into what the pipeline takes (`parse`).
//!
//! Unknown fields are ignored, as OpenAI does; everything the host cannot
//! honour (`n` > 1, non-text content parts, an unknown model) is refused
//! with a 4xx naming the field.

use serde::Deserialize;
use warp::http::StatusCode;

use crate::http::error::ApiError;
use crate::inference::Router;
use crate::wasm::{GenerationParams, Message};

/// Default `max_tokens` when the client gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 512;

/// The longest stop sequence accepted, in bytes.
const MAX_STOP_BYTES: usize = 256;

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// A validated request.
pub(super) struct Parsed {
    /// The model, as the client named it.
    pub(super) model: String,
    pub(super) messages: Vec<Message>,
    pub(super) params: GenerationParams,
    /// `"stream": true`.
    pub(super) stream: bool,
    /// `stream_options.include_usage`.
    pub(super) include_usage: bool,
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

pub(super) fn parse(body: &[u8], router: &Router) -> Result<Parsed, ApiError> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "the body is not valid JSON"
        } else {
            "the body is not a valid chat completion request"
        };
        ApiError::invalid(format!("{what}: {e}"), None)
    })?;
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (n, message) in request.messages.into_iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return Err(ApiError::invalid(
                format!(
                    "messages[{n}].role is {:?}; expected one of {}",
                    message.role,
                    ROLES.join(", ")
                ),
                Some("messages"),
            ));
        }
        let content = match message.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(&t);
                        }
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                format!(
                                    "messages[{n}].content: only text parts are supported, got {kind:?}"
                                ),
                                Some("messages"),
                            ));
                        }
                    }
                }
                text
            }
        };
        messages.push(Message {
            role: if message.role == "developer" {
                "system".into()
            } else {
                message.role
            },
            content,
        });
    }
    if !messages
        .iter()
        .any(|m| m.role == "user" && !m.content.trim().is_empty())
    {
        return Err(ApiError::invalid(
            "`messages` must contain a user message with content",
            Some("messages"),
        ));
    }
    if router.route(&request.model).is_none() {
        let models: Vec<&str> = router.models().map(|(model, _, _)| model).collect();
        return Err(ApiError::with_code(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model `{}` does not exist; this orchestrator serves: {}",
                request.model,
                models.join(", ")
            ),
        )
        .param("model"));
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let max_tokens = request
        .max_completion_tokens
        .or(request.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            "`max_tokens` must be at least 1",
            Some("max_tokens"),
        ));
    }
    if let Some((limit, backend)) = router.max_tokens_limit(&request.model)
        && max_tokens > limit
    {
        return Err(ApiError::invalid(
            format!(
                "`max_tokens` {max_tokens} is above the limit of {limit} for model `{}` \
                 (backend `{backend}`'s max_tokens_limit)",
                request.model
            ),
            Some("max_tokens"),
        ));
    }
    let temperature = request.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "`temperature` must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let stop = match request.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) if v.len() <= 4 => v,
        Some(Stop::Many(_)) => {
            return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
        }
    };
    // A streaming stage may hold back the longest stop sequence's prefix at
    // every delta: bounding it bounds that work.
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            format!("a stop sequence may be at most {MAX_STOP_BYTES} bytes"),
            Some("stop"),
        ));
    }
    Ok(Parsed {
        params: GenerationParams {
            model: request.model.clone(),
            max_tokens,
            temperature,
            stop,
        },
        model: request.model,
        messages,
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    fn router() -> Router {
        Router::new(&Config::default(), &Metrics::new()).expect("default backends")
    }

    fn parse_str(body: &str) -> Result<Parsed, ApiError> {
        parse(body.as_bytes(), &router())
    }

    #[test]
    fn accepts_a_minimal_request() {
        let p =
            parse_str(r#"{"model":"echo","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(p.messages[0].content, "hi");
        assert_eq!(p.params.max_tokens, DEFAULT_MAX_TOKENS);
        assert!(!p.stream);
    }

    #[test]
    fn flattens_text_parts_and_ignores_unknown_fields() {
        let p = parse_str(
            r#"{"model":"echo","user":"x","seed":1,"stop":"END","stream":true,"stream_options":{"include_usage":true},
                "messages":[{"role":"developer","content":"be nice"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(p.messages[0].role, "system");
        assert_eq!(p.messages[1].content, "a\nb");
        assert_eq!(p.params.stop, ["END"]);
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn rejects_bad_requests_with_reasons() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "not a valid chat completion request"),
            (r#"{"model":"echo"}"#, "missing field `messages`"),
            (r#"{"model":"echo","messages":[]}"#, "must not be empty"),
            (r#"{"model":"echo","messages":"hi"}"#, "invalid type"),
            (
                r#"{"model":"echo","messages":[{"role":"wizard","content":"x"}]}"#,
                "role",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"system","content":"x"}]}"#,
                "user message",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"n":2}"#,
                "n = 1",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "text parts",
            ),
        ];
        for (body, expected) in cases {
            let error = parse_str(body)
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                error.message.contains(expected),
                "{body}: {}",
                error.message
            );
        }
        let error = parse_str(r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#)
            .err()
            .unwrap();
        assert_eq!(error.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        for open in ["[", "{\"a\":"] {
            let body = format!(
                r#"{{"model":"echo","messages":[{{"role":"user","content":{}}}]}}"#,
                open.repeat(100_000)
            );
            let error = parse_str(&body).err().unwrap();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn a_stop_sequence_over_256_bytes_is_refused() {
        let ok = json!({"model": "echo", "stop": "x".repeat(256),
                        "messages": [{"role": "user", "content": "q"}]});
        assert!(parse_str(&ok.to_string()).is_ok());
        let long = json!({"model": "echo", "stop": ["a", "x".repeat(257)],
                          "messages": [{"role": "user", "content": "q"}]});
        let error = parse_str(&long.to_string()).err().unwrap();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("256 bytes"), "{}", error.message);
    }

    /// A valid request, as JSON, to mutate.
    fn valid() -> Value {
        json!({"model": "echo", "stream": false, "max_tokens": 5, "stop": ["x"],
               "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse(&body, &router());
        }

        #[test]
        fn arbitrary_json_never_panics(value in any_json()) {
            let _ = parse(value.to_string().as_bytes(), &router());
        }

        #[test]
        fn any_field_of_a_valid_request_may_be_replaced(
            field in proptest::sample::select(vec!["model", "messages", "stream", "max_tokens", "stop", "temperature", "n", "stream_options"]),
            value in any_json(),
        ) {
            let mut request = valid();
            request[field] = value.clone();
            match parse(request.to_string().as_bytes(), &router()) {
                Ok(parsed) => proptest::prop_assert!(!parsed.messages.is_empty()),
                Err(error) => proptest::prop_assert!(error.status.is_client_error(), "{} = {}: {:?}", field, value, error),
            }
        }
    }
}
