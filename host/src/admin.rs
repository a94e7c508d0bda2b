//! The admin API, on the API address: hot-swap and roll back stage
//! plugins. Off unless a token is configured (`admin_token` in the config
//! file, or the `ORCHESTRATOR_ADMIN_TOKEN` environment variable); without
//! one these paths answer 404 like any unknown path.
//!
//! - `PUT /admin/stages/{stage}` — body: the component bytes. Validates and
//!   swaps (see [`crate::versions`]); answers the new and previous sha256.
//! - `GET /admin/stages` — per stage the active and previous versions with
//!   their calls.
//! - `POST /admin/stages/{stage}/rollback` — back to the previous version.
//!
//! Every request needs `Authorization: Bearer <token>`; a missing or wrong
//! token gets 401 and changes nothing. Tokens are compared in constant time
//! (both sides are hashed, then the digests compared without early exit)
//! and never logged: [`AdminToken`]'s `Debug` prints `***`.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
use sha2::{Digest, Sha256};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use crate::api::ApiError;
use crate::config::PluginSource;
use crate::plugin::LoadError;
use crate::versions::{SwapError, Versions};

/// The admin bearer token. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; `None` for an empty string (which would disable nothing).
    pub fn new(token: impl Into<String>) -> Option<AdminToken> {
        let token = token.into();
        (!token.trim().is_empty()).then_some(AdminToken(token))
    }

    /// Constant-time check of a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        let expected = Sha256::digest(self.0.as_bytes());
        let given = Sha256::digest(presented.as_bytes());
        expected
            .iter()
            .zip(given.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

/// The admin routes: disabled (rejecting with "not found") without a token.
pub fn routes(
    versions: Arc<Versions>,
    token: Option<AdminToken>,
    max_plugin_bytes: u64,
) -> BoxedFilter<(Response,)> {
    let Some(token) = token else {
        return warp::path("admin")
            .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
            .boxed();
    };
    let auth = warp::header::optional::<String>("authorization")
        .and_then(move |value: Option<String>| {
            let ok = value
                .as_deref()
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|presented| token.matches(presented.trim()));
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(Unauthorized))
                }
            }
        })
        .untuple_one();
    let versions = warp::any().map(move || versions.clone());

    let list = warp::path!("admin" / "stages")
        .and(warp::get())
        .and(auth.clone())
        .and(versions.clone())
        .then(|versions: Arc<Versions>| async move {
            let status = versions.status().await;
            json_reply(StatusCode::OK, &json!({ "stages": status }))
        });
    let install = warp::path!("admin" / "stages" / String)
        .and(warp::put())
        .and(auth.clone())
        .and(warp::body::content_length_limit(max_plugin_bytes))
        .and(warp::body::bytes())
        .and(versions.clone())
        .then(
            |stage: String, body: Bytes, versions: Arc<Versions>| async move {
                swap_reply(
                    versions
                        .install(&stage, PluginSource::Upload, body.to_vec())
                        .await,
                )
            },
        );
    let rollback = warp::path!("admin" / "stages" / String / "rollback")
        .and(warp::post())
        .and(auth)
        .and(versions)
        .then(|stage: String, versions: Arc<Versions>| async move {
            swap_reply(versions.rollback(&stage).await)
        });
    list.or(install)
        .unify()
        .or(rollback)
        .unify()
        .recover(unauthorized)
        .unify()
        .boxed()
}

async fn unauthorized(rejection: warp::Rejection) -> Result<Response, warp::Rejection> {
    if rejection.find::<Unauthorized>().is_some() {
        let mut response = ApiError::with_code(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "unauthorized",
            "a valid `Authorization: Bearer <admin token>` header is required",
        )
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return Ok(response);
    }
    Err(rejection)
}

fn json_reply(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = Response::new(body.to_string().into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn swap_reply(result: Result<crate::versions::SwapReport, SwapError>) -> Response {
    match result {
        Ok(report) => json_reply(StatusCode::OK, &json!(report)),
        Err(error) => {
            let message = error.to_string();
            let (status, code) = match &error {
                SwapError::UnknownStage(_) => (StatusCode::NOT_FOUND, "unknown_stage"),
                SwapError::NoPrevious(_) => (StatusCode::CONFLICT, "no_previous_version"),
                SwapError::Invalid { error, .. } => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    match error {
                        LoadError::Read { .. } => "unreadable",
                        LoadError::NotWasm(_) => "not_wasm",
                        LoadError::CoreModule => "core_module",
                        LoadError::Compile(_) => "invalid_component",
                        LoadError::NotGranted { .. } => "not_granted",
                        LoadError::WrongWorld(_) => "wrong_world",
                        LoadError::Instantiate(_) => "instantiate_failed",
                        LoadError::Init(_) => "init_failed",
                    },
                ),
            };
            ApiError::with_code(status, "invalid_request_error", code, message).into_response()
        }
    }
}
