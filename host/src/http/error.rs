//! The error answer of every HTTP route ([`ApiError`], in OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` shape), and the one
//! JSON response helper ([`json_response`]).

use std::borrow::Cow;

use serde_json::json;
use warp::http::{StatusCode, header};
use warp::reply::Response;

/// An API error, rendered in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) param: Option<&'static str>,
    pub(super) code: Option<Cow<'static, str>>,
    pub(super) retry_after: Option<u32>,
}

impl ApiError {
    /// A 400 `invalid_request_error`, naming the request field at fault.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param,
            code: None,
            retry_after: None,
        }
    }

    /// An error with a status, OpenAI error `type` and `code`.
    pub fn with_code(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: Some(code.into()),
            retry_after: None,
        }
    }

    /// The same error, naming the request field at fault.
    pub fn param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    /// The same error, telling the client when to retry (`Retry-After`).
    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body (also sent as the last event of a broken stream).
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }

    /// The HTTP response.
    pub fn into_response(self) -> Response {
        let mut response = json_response(self.status, &self.body());
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        response
    }
}

/// A JSON response with `status`.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let mut response = Response::new(serde_json::to_string(body).unwrap_or_default().into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
