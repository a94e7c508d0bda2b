//! The request of `POST /v1/chat/completions`: its validation into what
//! the pipeline takes (`parse`). The wire types are [`crate::chat`]'s.
//!
//! The chat is kept as the client sent it: every message with its role,
//! content parts, tool calls and extra fields, the tools, and every
//! parameter (those the host does not model included). What the host checks
//! is what it must: the roles, the model (404 if it routes nowhere), the
//! ranges OpenAI documents, and what the chosen backend cannot do, refused
//! with 400 naming the field rather than dropped (`n` > 1 everywhere, since
//! the pipeline answers with one choice; log probabilities, a required tool
//! call or a structured output from `echo`).

use serde_json::Value;
use warp::http::StatusCode;

use crate::chat::{ChatRequest, Message, Params, Tool};
use crate::config::BackendKind;
use crate::http::error::ApiError;
use crate::inference::{Router, Target};

/// Longest `model` accepted, in bytes (OpenAI's model names are short; the
/// name is echoed in every chunk of a stream).
pub const MAX_MODEL_BYTES: usize = 256;

/// Models a 404 names at most.
const MODELS_LISTED: usize = 20;
/// The longest stop sequence accepted, in bytes.
const MAX_STOP_BYTES: usize = 256;

/// A validated request.
pub(super) struct Parsed {
    /// Where it goes: resolved once, here, for the whole request.
    pub(super) target: Target,
    pub(super) messages: Vec<Message>,
    pub(super) params: Params,
    pub(super) tools: Vec<Tool>,
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
    let ChatRequest {
        messages,
        tools,
        stream,
        stream_options,
        params,
    } = request;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must not be empty",
            Some("messages"),
        ));
    }
    if let Some((n, message)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        return Err(ApiError::invalid(
            format!(
                "messages[{n}].role is {:?}; expected one of {}",
                message.role,
                ROLES.join(", ")
            ),
            Some("messages"),
        ));
    }
    if params.model.len() > MAX_MODEL_BYTES {
        // Echoed in every chunk of a stream: its size must not be the
        // client's choice.
        return Err(ApiError::invalid(
            format!("`model` is at most {MAX_MODEL_BYTES} bytes"),
            Some("model"),
        ));
    }
    let model = params.model.as_str();
    let Some(target) = router.resolve(model) else {
        // A bounded list: a 404 costs the same whatever the configuration.
        let total = router.models().count();
        let models: Vec<&str> = router
            .models()
            .map(|(model, _, _)| model)
            .take(MODELS_LISTED)
            .collect();
        let more = total.saturating_sub(MODELS_LISTED);
        let more = if more > 0 {
            format!(" and {more} more (GET /v1/models lists them)")
        } else {
            String::new()
        };
        return Err(ApiError::with_code(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "the model `{model}` does not exist; this orchestrator serves: {}{more}",
                models.join(", ")
            ),
        )
        .param("model"));
    };
    if params.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "`n` other than 1 is not supported: the pipeline answers with one choice",
            Some("n"),
        ));
    }
    for (field, value) in [
        ("max_tokens", params.max_tokens),
        ("max_completion_tokens", params.max_completion_tokens),
    ] {
        let Some(value) = value else { continue };
        if value == 0 {
            return Err(ApiError::invalid(
                format!("`{field}` must be at least 1"),
                Some(field),
            ));
        }
        let limit = target.max_tokens_limit();
        if value > limit {
            let backend = target.backend();
            return Err(ApiError::invalid(
                format!(
                    "`{field}` {value} is above the limit of {limit} for model `{model}` \
                     (backend `{backend}`'s max_tokens_limit)"
                ),
                Some(field),
            ));
        }
    }
    for (field, value, max) in [
        ("temperature", params.temperature, 2.0),
        ("top_p", params.top_p, 1.0),
    ] {
        if value.is_some_and(|v| !(0.0..=max).contains(&v)) {
            return Err(ApiError::invalid(
                format!("`{field}` must be between 0 and {max}"),
                Some(field),
            ));
        }
    }
    for (field, value) in [
        ("presence_penalty", params.presence_penalty),
        ("frequency_penalty", params.frequency_penalty),
    ] {
        if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(ApiError::invalid(
                format!("`{field}` must be between -2 and 2"),
                Some(field),
            ));
        }
    }
    if params.stop.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
    }
    // A streaming stage may hold back the longest stop sequence's prefix at
    // every delta: bounding it bounds that work.
    if params.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid(
            format!("a stop sequence may be at most {MAX_STOP_BYTES} bytes"),
            Some("stop"),
        ));
    }
    if target.kind() == BackendKind::Echo {
        refuse_what_echo_cannot_do(model, &params)?;
    }
    Ok(Parsed {
        target,
        messages,
        params,
        tools: tools.unwrap_or_default(),
        stream: stream.unwrap_or(false),
        include_usage: stream_options.is_some_and(|o| o.include_usage),
    })
}

/// `echo` repeats the last user message: it has no log probabilities, calls
/// no tool and follows no output format. A request that needs one of them is
/// refused rather than answered as if it had been honoured.
fn refuse_what_echo_cannot_do(model: &str, params: &Params) -> Result<(), ApiError> {
    let refuse = |field: &'static str, what: &str| {
        Err(ApiError::invalid(
            format!(
                "model `{model}` is served by the built-in `echo` backend, which {what}; \
                 route the model to a real backend for `{field}`"
            ),
            Some(field),
        ))
    };
    if params.logprobs == Some(true) || params.top_logprobs.is_some() {
        return refuse("logprobs", "has no log probabilities");
    }
    if let Some(choice) = &params.tool_choice
        && !matches!(choice.as_str(), Some("auto" | "none"))
    {
        return refuse("tool_choice", "never calls a tool");
    }
    if let Some(format) = &params.response_format
        && format.get("type") != Some(&Value::from("text"))
    {
        return refuse("response_format", "answers with the user's text, not JSON");
    }
    Ok(())
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
    fn model_names_and_the_404_list_are_bounded() {
        let long = format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"hi"}}]}}"#,
            "m".repeat(MAX_MODEL_BYTES + 1)
        );
        assert_eq!(parse_str(&long).err().unwrap().param, Some("model"));
        let mut config = crate::config::Config::default();
        for n in 0..100 {
            config
                .routing
                .models
                .insert(format!("model-{n:03}"), "echo".into());
        }
        let router = Router::new(&config, &crate::metrics::Metrics::new()).unwrap();
        let error = parse(
            br#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#,
            &router,
        )
        .err()
        .unwrap();
        assert_eq!(error.status, StatusCode::NOT_FOUND);
        assert!(
            error
                .message
                .ends_with("and 81 more (GET /v1/models lists them)"),
            "{}",
            error.message
        );
        assert!(error.message.len() < 600, "{}", error.message);
    }

    #[test]
    fn accepts_a_minimal_request() {
        let p =
            parse_str(r#"{"model":"echo","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(p.messages[0].text(), "hi");
        assert_eq!(p.params.max_tokens, None, "nothing the client did not say");
        assert_eq!(p.params.temperature, None);
        assert!(!p.stream);
    }

    #[test]
    fn keeps_roles_parts_and_unknown_fields_as_sent() {
        let p = parse_str(
            r#"{"model":"echo","user":"x","seed":1,"stop":"END","stream":true,"stream_options":{"include_usage":true},"brand_new":{"a":1},
                "messages":[{"role":"developer","content":"be nice"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(p.messages[0].role, "developer");
        assert_eq!(p.messages[1].text(), "a\nb");
        assert!(matches!(
            p.messages[1].content,
            Some(crate::chat::Content::Parts(_))
        ));
        assert_eq!(p.params.stop, ["END"]);
        assert_eq!(p.params.seed, Some(1));
        assert_eq!(p.params.user.as_deref(), Some("x"));
        assert_eq!(p.params.extra["brand_new"], serde_json::json!({"a": 1}));
        assert!(!p.params.extra.contains_key("stream"));
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
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"n":2}"#,
                "one choice",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"top_p":1.5}"#,
                "top_p",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"logprobs":true}"#,
                "log probabilities",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"echo","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#,
                "response_format",
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
                "image_url",
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

    /// The model is resolved once per request, where it is parsed: the
    /// generation goes to the backend that resolution found, with no
    /// lookup of its own (and a stage that changes the model gets it
    /// resolved again).
    #[tokio::test]
    async fn the_model_is_resolved_once_per_request() {
        let router = router();
        let parsed = parse(
            br#"{"model":"echo","max_tokens":9,"max_completion_tokens":9,"messages":[{"role":"user","content":"one two"}]}"#,
            &router,
        )
        .unwrap();
        assert_eq!(router.resolutions(), 1);
        let mut request = crate::inference::GenerateRequest::for_test("", 9);
        request.messages = parsed.messages;
        request.params = parsed.params;
        let target = Some(parsed.target);
        let mut tokens = router
            .stream(request.clone(), target.clone())
            .await
            .unwrap();
        while tokens.next().await.is_some() {}
        router
            .generate(request.clone(), target.clone())
            .await
            .unwrap();
        assert_eq!(router.resolutions(), 1, "the target travelled with it");
        request.params.model = "other".into();
        assert!(
            router.generate(request, target).await.is_err(),
            "`other` routes nowhere"
        );
        assert_eq!(router.resolutions(), 2, "a changed model is resolved again");
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
            field in proptest::sample::select(vec!["model", "messages", "stream", "max_tokens", "stop", "temperature", "n", "stream_options", "tools", "tool_choice", "seed", "top_p", "response_format"]),
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
