//! The admin API, on the API address or on its own (`admin_listen`):
//! hot-swap and roll back stage plugins, reload the configuration. Off unless a token is configured (`admin_token` in the config
//! file, or the `ORCHESTRATOR_ADMIN_TOKEN` environment variable); without
//! one these paths answer 404 like any unknown path.
//!
//! - `PUT /admin/stages/{stage}` — body: the component bytes. Validates and
//!   swaps (see [`crate::control::swap`]); answers the new and previous sha256.
//! - `GET /admin/stages` — per stage the active and previous versions with
//!   their calls.
//! - `POST /admin/stages/{stage}/rollback` — back to the previous version.
//! - `POST /admin/config/reload` — read the configuration file again and
//!   switch to it (see [`crate::control::reload`]): 200 with the new and
//!   previous hash (`result` `ok` or `unchanged`), or 422 with the reason
//!   it was refused (409 when the host has no file).
//! - `/admin/keys[/{id}]` — create, list, show and revoke API keys (see
//!   [`super::keys`]).
//!
//! Every request needs `Authorization: Bearer <token>` (the scheme in any
//! case); a missing or wrong token gets 401 and changes nothing, and is
//! logged (with the peer's address, never what it presented) and counted in
//! `orchestrator_admin_auth_failures_total`. A client address with
//! [`MAX_FAILURES`] failures within [`LOCKOUT`] is refused with 429 (and
//! `Retry-After`) before its token is even compared, until that window
//! ends: guessing the token is limited to a few tries a minute per address. Tokens are compared in constant time
//! ([`AdminToken::matches`]) and never logged: its `Debug` prints `***`.
//!
//! Owns the admin API's HTTP surface: authentication, routes and answers.
//! Swapping is [`crate::control`]'s.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{StatusCode, header};
use warp::reply::Response;

use crate::config::{AdminToken, PluginSource};
use crate::control::{HotSwap, ReloadError, Reloader, SwapError, SwapReport};
use crate::http::error::{ApiError, json_response};
use crate::http::keys::KeysStore;
use crate::http::server::ClientAddr;

#[derive(Debug)]
struct Unauthorized;
impl warp::reject::Reject for Unauthorized {}

#[derive(Debug)]
struct LockedOut(Duration);
impl warp::reject::Reject for LockedOut {}

/// Failed attempts that lock a client address out.
pub const MAX_FAILURES: u32 = 10;
/// The window they are counted in, and the lockout that follows.
pub const LOCKOUT: Duration = Duration::from_secs(60);
/// Addresses remembered at most; beyond it, expired entries are dropped
/// first, then all (a flood of addresses cannot grow the map without end).
const TRACKED: usize = 10_000;

/// Failed authentications per client address, in the current window.
#[derive(Default)]
struct Failures {
    recent: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Failures {
    /// How long `ip` is still locked out, if it is.
    fn locked(&self, ip: IpAddr) -> Option<Duration> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (since, count) = recent.get(&ip)?;
        let left = LOCKOUT.checked_sub(since.elapsed())?;
        (*count >= MAX_FAILURES).then_some(left)
    }

    /// Count a failure of `ip`.
    fn failed(&self, ip: IpAddr) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= TRACKED {
            recent.retain(|_, (since, _)| since.elapsed() < LOCKOUT);
            if recent.len() >= TRACKED {
                recent.clear();
            }
        }
        let entry = recent.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= LOCKOUT {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// The admin routes: disabled (rejecting with "not found") without a token.
pub fn routes(
    swap: Arc<HotSwap>,
    reloader: Arc<Reloader>,
    token: Option<AdminToken>,
    max_plugin_bytes: u64,
    failures: IntCounter,
    keys: KeysStore,
) -> BoxedFilter<(Response,)> {
    let Some(token) = token else {
        return warp::path("admin")
            .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
            .boxed();
    };
    let tries = Arc::new(Failures::default());
    let auth = warp::header::optional::<String>("authorization")
        .and(warp::ext::optional::<ClientAddr>())
        .and_then(move |value: Option<String>, peer: Option<ClientAddr>| {
            let peer = peer.map(|ClientAddr(addr)| addr);
            let locked = peer.and_then(|p| tries.locked(p.ip()));
            if let Some(left) = locked {
                return futures_util::future::Either::Left(async move {
                    Err(warp::reject::custom(LockedOut(left)))
                });
            }
            // `Bearer <token>`; the scheme is case-insensitive (RFC 9110).
            let ok = value
                .as_deref()
                .and_then(|v| v.trim_start().split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .is_some_and(|(_, presented)| token.matches(presented.trim()));
            if !ok {
                failures.inc();
                if let Some(p) = peer {
                    tries.failed(p.ip());
                }
                // Never the presented value: it may be a mistyped token.
                let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
                tracing::warn!(%peer, "admin authentication failed");
            }
            futures_util::future::Either::Right(async move {
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(Unauthorized))
                }
            })
        })
        .untuple_one();
    let swap = warp::any().map(move || swap.clone());

    let list = warp::path!("admin" / "stages")
        .and(warp::get())
        .and(auth.clone())
        .and(swap.clone())
        .then(|swap: Arc<HotSwap>| async move {
            let status = swap.status().await;
            json_response(StatusCode::OK, &json!({ "stages": status }))
        });
    let install = warp::path!("admin" / "stages" / String)
        .and(warp::put())
        .and(auth.clone())
        .and(warp::body::content_length_limit(max_plugin_bytes))
        .and(warp::body::bytes())
        .and(swap.clone())
        .then(
            |stage: String, body: Bytes, swap: Arc<HotSwap>| async move {
                swap_reply(
                    swap.install(&stage, PluginSource::Upload, body.to_vec())
                        .await,
                )
            },
        );
    let rollback = warp::path!("admin" / "stages" / String / "rollback")
        .and(warp::post())
        .and(auth.clone())
        .and(swap)
        .then(|stage: String, swap: Arc<HotSwap>| async move {
            swap_reply(swap.rollback(&stage).await)
        });
    let keys = super::keys::routes(auth.clone(), keys);
    let reload = warp::path!("admin" / "config" / "reload")
        .and(warp::post())
        .and(auth)
        .and(warp::any().map(move || reloader.clone()))
        .then(|reloader: Arc<Reloader>| async move {
            match reloader.reload("admin").await {
                Ok(report) => json_response(StatusCode::OK, &report),
                Err(error) => {
                    let (status, code) = match &error {
                        ReloadError::NoFile => (StatusCode::CONFLICT, "no_config_file"),
                        ReloadError::Fixed(_) => {
                            (StatusCode::UNPROCESSABLE_ENTITY, "needs_restart")
                        }
                        _ => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"),
                    };
                    ApiError::with_code(status, "invalid_request_error", code, error.report())
                        .into_response()
                }
            }
        });
    list.or(install)
        .unify()
        .or(rollback)
        .unify()
        .or(reload)
        .unify()
        .or(keys)
        .unify()
        .recover(refusal)
        .unify()
        .boxed()
}

/// The admin routes on a listener of their own: anything else is 404.
pub fn standalone(
    admin: BoxedFilter<(Response,)>,
) -> impl Filter<Extract = (Response,), Error = std::convert::Infallible> + Clone {
    admin
        .or(warp::any().map(|| {
            ApiError::with_code(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "this is the admin listener: /admin/stages[/{stage}[/rollback]], /admin/config/reload, /admin/keys[/{id}]",
            )
            .into_response()
        }))
        .unify()
}

/// The admin routes' own refusals: 401 without a valid token, and 413
/// naming the setting that bounds an upload.
async fn refusal(rejection: warp::Rejection) -> Result<Response, warp::Rejection> {
    if let Some(LockedOut(left)) = rejection.find::<LockedOut>() {
        let seconds = left.as_secs().max(1);
        let mut response = ApiError::with_code(
            StatusCode::TOO_MANY_REQUESTS,
            "authentication_error",
            "too_many_failed_attempts",
            format!(
                "too many failed admin authentications from this address; retry in {seconds} s"
            ),
        )
        .into_response();
        if let Ok(value) = header::HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return Ok(response);
    }
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
    if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        return Ok(ApiError::with_code(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            "the plugin is larger than the configured max_plugin_bytes",
        )
        .into_response());
    }
    Err(rejection)
}

fn swap_reply(result: Result<SwapReport, SwapError>) -> Response {
    match result {
        Ok(report) => json_response(StatusCode::OK, &report),
        Err(error) => {
            let (status, code) = match &error {
                SwapError::UnknownStage(_) => (StatusCode::NOT_FOUND, "unknown_stage"),
                SwapError::NoPrevious(_) => (StatusCode::CONFLICT, "no_previous_version"),
                SwapError::Invalid { error, .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, error.code())
                }
            };
            ApiError::with_code(status, "invalid_request_error", code, error.report())
                .into_response()
        }
    }
}
