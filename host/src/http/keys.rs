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

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use proptest::collection::{btree_map, vec as list};
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::config::StoreConfig;
    use crate::keys::LIMIT_NAMES;
    use crate::metrics::Metrics;

    type Fixture = (tokio::runtime::Runtime, BoxedFilter<(Response,)>, String);

    /// A runtime, the key routes over a memory store (without
    /// authentication), and the id of a key in it.
    fn fixture() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let store = Store::build(KEYS_STORE, &StoreConfig::default(), &Metrics::new());
            let store = Arc::new(store.unwrap());
            let new = NewKey {
                principal: "p".into(),
                ..NewKey::default()
            };
            let created = runtime.block_on(Keys::new(store.clone()).create(new));
            let store: KeysStore = Arc::new(move || Some(store.clone()));
            let no_auth = warp::header::optional::<String>("authorization")
                .map(|_| ())
                .untuple_one();
            (runtime, routes(no_auth, store), created.unwrap().record.id)
        })
    }

    /// The status of `method /admin/keys{path}` with `body`.
    fn status(method: &str, path: &str, body: Vec<u8>) -> StatusCode {
        let (runtime, routes, _) = fixture();
        let request = warp::http::Request::builder()
            .method(method)
            .uri(format!("http://host/admin/keys{path}"))
            .header("content-length", body.len())
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let service = hyper_util::service::TowerToHyperService::new(warp::service(routes.clone()));
        let response = runtime.block_on(hyper::service::Service::call(&service, request));
        response.unwrap().status()
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = (0..5usize, any::<i64>(), any::<f64>(), ".{0,8}").prop_map(|(k, n, f, s)| {
            vec![Value::Null, (n > 0).into(), n.into(), f.into(), s.into()].swap_remove(k)
        });
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                list(inner.clone(), 0..4).prop_map(Value::Array),
                btree_map("[a-z_]{1,8}", inner, 0..4).prop_map(Value::from_iter),
            ]
        })
    }

    /// A field of a key body: left out, of its type (near its limits), or
    /// any JSON.
    fn field(typed: impl Strategy<Value = Value>) -> impl Strategy<Value = Option<Value>> {
        prop_oneof![3 => Just(None), 6 => typed.prop_map(Some), 1 => any_json().prop_map(Some)]
    }

    /// A key request or change, its fields each left out, typed or any
    /// JSON, perhaps with an unknown field.
    fn key_body() -> impl Strategy<Value = Vec<u8>> {
        let text = || prop_oneof![6 => ".{1,8}", 1 => "|.{250,260}"].prop_map(Value::from);
        let limit = proptest::sample::select([&LIMIT_NAMES[..], &["requests_per_week"]].concat());
        let fields = (
            (field(text()), field(text())),
            field(
                prop_oneof![6 => list(text(), 0..4), 1 => list(text(), 99..102)]
                    .prop_map(Value::from),
            ),
            field(btree_map(limit, 0..9u64, 0..4).prop_map(Value::from_iter)),
            field(any::<u64>().prop_map(Value::from)),
            field(any::<bool>().prop_map(Value::from)),
            prop_oneof![3 => Just(String::new()), 1 => "x|principal"],
        );
        fields.prop_map(
            |((principal, name), models, limits, expires, disabled, other)| {
                let fields = [
                    ("principal", principal),
                    ("name", name),
                    ("models", models),
                    ("limits", limits),
                    ("expires_in_seconds", expires),
                    ("disabled", disabled),
                    (&other, (!other.is_empty()).then_some(Value::Null)),
                ];
                let object = fields
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v?)));
                Value::from_iter(object).to_string().into_bytes()
            },
        )
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_key_bodies_are_taken_or_refused_with_a_4xx(
            body in prop_oneof![1 => list(any::<u8>(), 0..600), 1 => any_json().prop_map(|v| v.to_string().into_bytes()), 3 => key_body()],
            // The fixture's key (empty), another id, or anything a path may hold.
            id in "|[0-9a-f]{12}|[A-Za-z0-9%._~-]{1,30}",
        ) {
            let created = status("POST", "", body.clone());
            prop_assert!(created == StatusCode::CREATED || created.is_client_error(), "{}", created);
            let id = if id.is_empty() { &fixture().2 } else { &id };
            let changed = status("PATCH", &format!("/{id}"), body);
            prop_assert!(changed == StatusCode::OK || changed.is_client_error(), "{}", changed);
        }
    }
}
