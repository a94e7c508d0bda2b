//! The admin API's key routes, behind the admin token (see [`super::admin`]):
//!
//! - `POST /admin/keys` — body: a [`NewKey`] as JSON (`principal`, and
//!   optionally `name`, `models`, `limits`, `expires_in_seconds`,
//!   `disabled`). Answers 201 with the record and `key`, the secret, which
//!   is never shown again.
//! - `GET /admin/keys` — every key's record, without secrets.
//! - `GET /admin/keys/{id}` — one record with its `usage`: requests and
//!   tokens in the current minute, hour and day.
//! - `PATCH /admin/keys/{id}` — body: a [`KeyChange`] as JSON (`disabled`,
//!   `name`, `models`, `limits`, `expires_in_seconds`): the fields given
//!   replace the record's; answers the new record.
//! - `DELETE /admin/keys/{id}` — revoke it: every host sharing the store
//!   refuses it from its next request.
//!
//! They work on the store [`KEYS_STORE`] of the configuration in force; a
//! configuration that neither declares it nor grants it to a stage has
//! none (409 `no_keys_store`).

use std::sync::Arc;

use serde_json::json;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::http::error::{ApiError, json_response};
use crate::keys::{KEYS_STORE, KeyChange, KeyError, KeyRecord, Keys, NewKey};
use crate::store::Store;

/// Largest body of `POST /admin/keys`.
const MAX_BODY_BYTES: u64 = 64 * 1024;

/// Where the routes find the keys store of the configuration in force.
pub type KeysStore = Arc<dyn Fn() -> Option<Arc<Store>> + Send + Sync>;

/// The key routes, each behind `auth`.
pub fn routes<A>(auth: A, store: KeysStore) -> BoxedFilter<(Response,)>
where
    A: Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static,
{
    let keys = warp::any().map(move || store().map(Keys::new));
    let create = warp::path!("admin" / "keys")
        .and(warp::post())
        .and(auth.clone())
        .and(warp::body::content_length_limit(MAX_BODY_BYTES))
        .and(warp::body::bytes())
        .and(keys.clone())
        .then(|body: bytes::Bytes, keys: Option<Keys>| async move {
            let Some(keys) = keys else { return no_store() };
            let new: NewKey = match serde_json::from_slice(&body) {
                Ok(new) => new,
                Err(error) => return invalid(format!("the body is not a key request: {error}")),
            };
            match keys.create(new).await {
                Ok(created) => json_response(
                    StatusCode::CREATED,
                    &json!({ "key": created.key, "record": public(&created.record) }),
                ),
                Err(error) => failed(error),
            }
        });
    let list = warp::path!("admin" / "keys")
        .and(warp::get())
        .and(auth.clone())
        .and(keys.clone())
        .then(|keys: Option<Keys>| async move {
            let Some(keys) = keys else { return no_store() };
            match keys.list().await {
                Ok(records) => json_response(
                    StatusCode::OK,
                    &json!({ "keys": records.iter().map(public).collect::<Vec<_>>() }),
                ),
                Err(error) => failed(error),
            }
        });
    let show = warp::path!("admin" / "keys" / String)
        .and(warp::get())
        .and(auth.clone())
        .and(keys.clone())
        .then(|id: String, keys: Option<Keys>| async move {
            let Some(keys) = keys else { return no_store() };
            match keys.get(&id).await {
                Ok(Some(record)) => match keys.usage(&id).await {
                    Ok(usage) => json_response(
                        StatusCode::OK,
                        &json!({ "record": public(&record), "usage": usage }),
                    ),
                    Err(error) => failed(error),
                },
                Ok(None) => not_found(&id),
                Err(error) => failed(error),
            }
        });
    let change = warp::path!("admin" / "keys" / String)
        .and(warp::patch())
        .and(auth.clone())
        .and(warp::body::content_length_limit(MAX_BODY_BYTES))
        .and(warp::body::bytes())
        .and(keys.clone())
        .then(
            |id: String, body: bytes::Bytes, keys: Option<Keys>| async move {
                let Some(keys) = keys else { return no_store() };
                let change: KeyChange = match serde_json::from_slice(&body) {
                    Ok(change) => change,
                    Err(error) => return invalid(format!("the body is not a key change: {error}")),
                };
                match keys.change(&id, &change).await {
                    Ok(Some(record)) => {
                        json_response(StatusCode::OK, &json!({ "record": public(&record) }))
                    }
                    Ok(None) => not_found(&id),
                    Err(error) => failed(error),
                }
            },
        );
    let revoke = warp::path!("admin" / "keys" / String)
        .and(warp::delete())
        .and(auth)
        .and(keys)
        .then(|id: String, keys: Option<Keys>| async move {
            let Some(keys) = keys else { return no_store() };
            match keys.revoke(&id).await {
                Ok(true) => json_response(StatusCode::OK, &json!({ "id": id, "revoked": true })),
                Ok(false) => not_found(&id),
                Err(error) => failed(error),
            }
        });
    create
        .or(list)
        .unify()
        .or(show)
        .unify()
        .or(change)
        .unify()
        .or(revoke)
        .unify()
        .boxed()
}

/// A record as the API shows it: everything but the hash.
fn public(record: &KeyRecord) -> serde_json::Value {
    let mut value = serde_json::to_value(record).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.remove("hash");
    }
    value
}

fn no_store() -> Response {
    ApiError::with_code(
        StatusCode::CONFLICT,
        "invalid_request_error",
        "no_keys_store",
        format!(
            "this configuration has no `{KEYS_STORE}` store: grant it to a stage (the bundled `auth` stage is granted it) or declare [stores.{KEYS_STORE}]"
        ),
    )
    .into_response()
}

fn invalid(message: String) -> Response {
    ApiError::with_code(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_key_request",
        message,
    )
    .into_response()
}

fn not_found(id: &str) -> Response {
    let mut id = id.to_owned();
    id.truncate(id.floor_char_boundary(64));
    ApiError::with_code(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_key",
        format!("no key `{id}`"),
    )
    .into_response()
}

fn failed(error: KeyError) -> Response {
    match error {
        KeyError::Invalid(message) => invalid(message),
        KeyError::Corrupt { .. } => {
            tracing::warn!(%error, "key record not readable");
            ApiError::with_code(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "corrupt_key_record",
                error.to_string(),
            )
            .into_response()
        }
        error => {
            // The store's own words (which may name hosts) go to the log.
            tracing::warn!(%error, "key operation failed");
            ApiError::with_code(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "keys_store_unavailable",
                format!("the `{KEYS_STORE}` store is unavailable"),
            )
            .into_response()
        }
    }
}
