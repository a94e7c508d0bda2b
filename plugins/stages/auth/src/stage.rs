//! The stage itself: [`ApiKey`], [`KeyRecord`] and [`verify`] behind the
//! SDK's [`Stage`] trait.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use orchestrator_plugin::store::{Store, StoreError};
use orchestrator_plugin::{
    InitError, Outcome, Refusal, RefusalKind, Request, Stage, StageError, log,
};
use serde::Deserialize;

use crate::{
    ApiKey, INCORRECT_KEY_MESSAGE, INVALID_KEY_CODE, KEY_NOTE, KeyRecord, LIMITS_NOTE,
    MISSING_KEY_MESSAGE, MODEL_NOT_ALLOWED_CODE, RecordError, bearer_token, is_key_id,
    model_refusal_message, record_key, usage_counters, verify,
};

/// The store the stage reads key records from by default.
pub const DEFAULT_STORE: &str = "keys";

/// The `auth` stage's configuration (the `config` table of its
/// `[stages.<name>]` section).
///
/// ```toml
/// [stages.auth.config]
/// store = "keys"
///
/// [[stages.auth.config.keys]]
/// id = "0123456789ab"
/// sha256 = "<the SHA-256 of the whole key, 64 hex digits>"
/// principal = "ci"
/// models = ["gpt-4o-mini"]
/// limits = { requests_per_minute = 60 }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The store holding the key records (`key:<id>`) and the usage
    /// counters. Default `keys`.
    pub store: String,
    /// Keys declared here rather than in the store: checked first, by id,
    /// without a store call. Default none.
    pub keys: Vec<DeclaredKey>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: DEFAULT_STORE.into(),
            keys: Vec::new(),
        }
    }
}

/// A key declared in the configuration: the fields of a store record, the
/// hash named `sha256`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredKey {
    /// The key's id: 12 lowercase hex digits.
    pub id: String,
    /// The lowercase hex SHA-256 of the whole key
    /// ([`hash_key`](crate::hash_key)).
    pub sha256: String,
    /// Who the key belongs to.
    pub principal: String,
    /// A label, for people; not used.
    #[serde(default)]
    pub name: Option<String>,
    /// The models the key may use; empty (the default): every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// The key's limits, an object passed on as the note `auth.limits`.
    #[serde(default)]
    pub limits: Option<serde_json::Value>,
    /// When the key stops working, in unix seconds.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// Whether the key is turned off.
    #[serde(default)]
    pub disabled: bool,
}

/// The `auth` stage: accepts a request with a valid API key, setting its
/// principal and the notes `auth.key` and `auth.limits`; refuses any
/// other with 401 (or 403 for a model the key may not use). Its `finish`
/// counts each key's requests and tokens. See the crate's documentation.
#[derive(Debug, Clone)]
pub struct Auth {
    store: String,
    declared: BTreeMap<String, KeyRecord>,
}

/// What the lookup of an id found.
enum Lookup<'a> {
    Found(Cow<'a, KeyRecord>),
    Missing,
    Invalid(RecordError),
}

/// The time since the unix epoch, by the wall clock.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// What a failed store call makes of the request: a store the stage may
/// not use is a configuration error (500); any other failure (down, timed
/// out) makes it unavailable (503). Either way the request is not let
/// through.
fn store_error(store: &str, error: StoreError) -> StageError {
    match error {
        StoreError::NoSuchStore | StoreError::AccessDenied => {
            StageError::Config(format!("auth: key store `{store}`: {error}"))
        }
        StoreError::Other(message) => {
            // The store's own words may name internal hosts: the log gets
            // them, the client does not.
            log::warn(
                "key store unavailable; the request is refused",
                &[("store", &store), ("error", &message)],
            );
            StageError::UpstreamUnavailable(format!("auth: key store `{store}` is unavailable"))
        }
    }
}

/// A 401 or 403 refusal with `code`.
fn refusal(kind: RefusalKind, message: String, code: &str) -> Refusal {
    Refusal {
        kind,
        message,
        code: Some(code.into()),
        retry_after_ms: None,
        policy: None,
    }
}

impl Auth {
    /// The record of the key `id`: a declared one, else the store's (one
    /// round trip).
    fn look_up(&self, id: &str) -> Result<Lookup<'_>, StageError> {
        if let Some(record) = self.declared.get(id) {
            return Ok(Lookup::Found(Cow::Borrowed(record)));
        }
        let value = Store::open(&self.store)
            .and_then(|store| store.get(&record_key(id)))
            .map_err(|e| store_error(&self.store, e))?;
        Ok(match value {
            None => Lookup::Missing,
            Some(json) => match KeyRecord::parse(id, &json) {
                Ok(record) => Lookup::Found(Cow::Owned(record)),
                Err(error) => Lookup::Invalid(error),
            },
        })
    }
}

impl Stage for Auth {
    type Config = Config;

    fn init(config: Config) -> Result<Self, InitError> {
        if config.store.trim().is_empty() {
            return Err("config key `store`: the store's name is empty".into());
        }
        let mut declared = BTreeMap::new();
        for (at, key) in config.keys.into_iter().enumerate() {
            let entry = at + 1;
            if !is_key_id(&key.id) {
                return Err(format!(
                    "config key `keys`: entry {entry}: `id` is not 12 lowercase hex digits"
                )
                .into());
            }
            let record = KeyRecord::new(
                &key.sha256,
                key.principal,
                key.models,
                key.limits,
                key.expires_at,
                key.disabled,
            )
            .map_err(|e| format!("config key `keys`: entry {entry} (id `{}`): {e}", key.id))?;
            if declared.insert(key.id.clone(), record).is_some() {
                return Err(format!(
                    "config key `keys`: entry {entry}: the id `{}` is declared twice",
                    key.id
                )
                .into());
            }
        }
        Ok(Auth {
            store: config.store,
            declared,
        })
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        let header = request.header("authorization");
        let Some(token) = bearer_token(header.as_deref()) else {
            request.refuse(refusal(
                RefusalKind::Unauthorized,
                MISSING_KEY_MESSAGE.into(),
                INVALID_KEY_CODE,
            ));
            return Ok(());
        };
        let incorrect = || {
            refusal(
                RefusalKind::Unauthorized,
                INCORRECT_KEY_MESSAGE.into(),
                INVALID_KEY_CODE,
            )
        };
        let Some(key) = ApiKey::parse(token) else {
            log::info("auth: refused a key of the wrong shape", &[]);
            request.refuse(incorrect());
            return Ok(());
        };
        let id = key.id();
        let lookup = self.look_up(id)?;
        let record = match &lookup {
            Lookup::Found(record) => Some(record.as_ref()),
            Lookup::Missing | Lookup::Invalid(_) => None,
        };
        let record = match verify(&key, record, since_epoch().as_secs()) {
            Ok(record) => record,
            Err(denied) => {
                if let Lookup::Invalid(error) = &lookup {
                    log::warn(
                        "auth: refused a key whose record is invalid",
                        &[("key", &id), ("store", &self.store), ("error", error)],
                    );
                } else {
                    log::info("auth: refused a key", &[("key", &id), ("reason", &denied)]);
                }
                request.refuse(incorrect());
                return Ok(());
            }
        };
        if !record.models.is_empty() {
            let model = request.params().model;
            if !record.allows_model(&model) {
                request.refuse(refusal(
                    RefusalKind::Forbidden,
                    model_refusal_message(&model),
                    MODEL_NOT_ALLOWED_CODE,
                ));
                return Ok(());
            }
        }
        request.set_principal(&record.principal);
        request.set_note(KEY_NOTE, id);
        if let Some(limits) = &record.limits {
            request.set_note(LIMITS_NOTE, limits);
        }
        Ok(())
    }

    fn finish(&self, request: &dyn Request, outcome: &Outcome) {
        let Some(id) = request.note(KEY_NOTE) else {
            return;
        };
        if !is_key_id(&id) {
            return;
        }
        let tokens = if outcome.answered_early {
            0
        } else {
            u64::from(outcome.usage.prompt_tokens) + u64::from(outcome.usage.completion_tokens)
        };
        let counters = usage_counters(&id, since_epoch(), tokens);
        let counted = Store::open(&self.store).and_then(|store| store.windows(&counters));
        if let Err(error) = counted {
            log::warn(
                "auth: could not count a key's usage",
                &[("key", &id), ("store", &self.store), ("error", &error)],
            );
        }
    }
}

orchestrator_plugin::export_stage!(Auth, finish);

#[cfg(test)]
mod tests {
    use orchestrator_plugin::config::from_pairs;
    use orchestrator_plugin::testing::TestRequest;
    use orchestrator_plugin::{GenerationParams, OutcomeKind, Usage, store};

    use super::*;
    use crate::{KEY_PREFIX, hash_key};

    const ID: &str = "0123456789ab";
    const SECRET: &str = "00112233445566778899aabbccddeeff0011223344556677";
    const OTHER_SECRET: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa9988";

    fn key(id: &str, secret: &str) -> String {
        format!("{KEY_PREFIX}{id}-{secret}")
    }

    /// The stage as `init` builds it from these config pairs.
    fn auth(pairs: &[(&str, &str)]) -> Result<Auth, String> {
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config: Config = from_pairs(pairs).map_err(|e| e.to_string())?;
        Auth::init(config).map_err(|e| e.to_string())
    }

    /// Put the record `json` under `key:<id>` in the native store `name`.
    fn put(name: &str, id: &str, json: &str) {
        Store::open(name)
            .unwrap()
            .set(&record_key(id), json.as_bytes())
            .unwrap();
    }

    /// A store record of the key `ID`-`SECRET` for alice, with `extra`
    /// fields (`,"disabled":true`).
    fn alice(extra: &str) -> String {
        format!(
            r#"{{"id":"{ID}","hash":"{}","principal":"alice","name":"laptop","created_at":1765000000{extra}}}"#,
            hash_key(&key(ID, SECRET))
        )
    }

    fn presenting(key: &str) -> TestRequest {
        TestRequest::new()
            .with_header("Authorization", &format!("Bearer {key}"))
            .with_user("hi")
    }

    /// The refusal `request` got, as (status kind, code, message).
    fn refused(request: &TestRequest) -> (RefusalKind, String, String) {
        let refusal = request.fields().refused.expect("refused");
        assert_eq!(
            (refusal.retry_after_ms, refusal.policy.as_deref()),
            (None, None)
        );
        (
            refusal.kind,
            refusal.code.unwrap_or_default(),
            refusal.message,
        )
    }

    fn assert_incorrect(request: &TestRequest) {
        assert_eq!(
            refused(request),
            (
                RefusalKind::Unauthorized,
                "invalid_api_key".into(),
                "Incorrect API key provided.".into()
            )
        );
        let fields = request.fields();
        assert_eq!(fields.principal, None);
        assert!(fields.metadata.is_empty(), "{:?}", fields.metadata);
    }

    #[test]
    fn a_missing_key_is_refused_with_401() {
        store::reset();
        let stage = auth(&[]).unwrap();
        for request in [
            TestRequest::new(),
            TestRequest::new().with_header("authorization", "Basic YWxpY2U6cHc="),
            TestRequest::new().with_header("authorization", "Bearer  "),
        ] {
            stage.process(&request).unwrap();
            assert_eq!(
                refused(&request),
                (
                    RefusalKind::Unauthorized,
                    "invalid_api_key".into(),
                    MISSING_KEY_MESSAGE.into()
                )
            );
            assert_eq!(request.fields().principal, None);
        }
    }

    #[test]
    fn a_key_of_the_wrong_shape_is_not_echoed() {
        store::reset();
        let stage = auth(&[]).unwrap();
        let text = format!("{}X", key(ID, SECRET));
        let request = presenting(&text);
        stage.process(&request).unwrap();
        assert_incorrect(&request);
        let message = request.fields().refused.unwrap().message;
        assert!(!message.contains(ID) && !message.contains(&SECRET[..8]));
    }

    #[test]
    fn a_good_key_sets_the_principal_and_notes() {
        store::reset();
        put(
            "keys",
            ID,
            &alice(
                r#","models":[],"limits":{"requests_per_minute":60,"tokens_per_day":100000},"expires_at":4000000000"#,
            ),
        );
        let stage = auth(&[]).unwrap();
        let request = presenting(&key(ID, SECRET));
        stage.process(&request).unwrap();
        let fields = request.fields();
        assert_eq!(fields.refused, None);
        assert_eq!(fields.principal.as_deref(), Some("alice"));
        assert_eq!(request.note("auth.key").as_deref(), Some(ID));
        let limits: serde_json::Value =
            serde_json::from_str(&request.note("auth.limits").unwrap()).unwrap();
        assert_eq!(
            limits,
            serde_json::json!({"requests_per_minute": 60, "tokens_per_day": 100000})
        );

        // Without limits (the host writes `{}`), no `auth.limits` note.
        put("keys", ID, &alice(r#","limits":{}"#));
        let request = presenting(&key(ID, SECRET));
        stage.process(&request).unwrap();
        assert_eq!(request.metadata(), [("auth.key".into(), ID.into())]);
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        store::reset();
        put("keys", ID, &alice(""));
        let stage = auth(&[]).unwrap();
        for header in [
            format!("bearer {}", key(ID, SECRET)),
            format!("  BEARER \t{}  ", key(ID, SECRET)),
        ] {
            let request = TestRequest::new().with_header("authorization", &header);
            stage.process(&request).unwrap();
            assert_eq!(request.fields().refused, None, "{header}");
            assert_eq!(request.fields().principal.as_deref(), Some("alice"));
        }
    }

    #[test]
    fn a_wrong_secret_an_unknown_id_and_a_bad_record_look_the_same() {
        store::reset();
        put("keys", ID, &alice(""));
        put("keys", "ffffffffffff", "{not json");
        let stage = auth(&[]).unwrap();
        for text in [
            key(ID, OTHER_SECRET),
            key("aaaaaaaaaaaa", SECRET),
            key("ffffffffffff", SECRET),
        ] {
            let request = presenting(&text);
            stage.process(&request).unwrap();
            assert_incorrect(&request);
        }
    }

    #[test]
    fn disabled_and_expired_keys_are_refused() {
        store::reset();
        let stage = auth(&[]).unwrap();
        for extra in [r#","disabled":true"#, r#","expires_at":1"#] {
            put("keys", ID, &alice(extra));
            let request = presenting(&key(ID, SECRET));
            stage.process(&request).unwrap();
            assert_incorrect(&request);
        }
        put("keys", ID, &alice(r#","disabled":false,"expires_at":null"#));
        let request = presenting(&key(ID, SECRET));
        stage.process(&request).unwrap();
        assert_eq!(request.fields().refused, None);
    }

    #[test]
    fn a_model_the_key_may_not_use_is_refused_with_403() {
        store::reset();
        put("keys", ID, &alice(r#","models":["gpt-4o-mini","echo-2"]"#));
        let stage = auth(&[]).unwrap();
        let request = presenting(&key(ID, SECRET));
        stage.process(&request).unwrap();
        assert_eq!(
            refused(&request),
            (
                RefusalKind::Forbidden,
                "model_not_allowed".into(),
                "This key may not use the model `echo`.".into()
            )
        );
        assert_eq!(request.fields().principal, None);
        assert!(request.metadata().is_empty());

        let request =
            presenting(&key(ID, SECRET)).with_params(GenerationParams::new("gpt-4o-mini"));
        stage.process(&request).unwrap();
        assert_eq!(request.fields().refused, None);
        assert_eq!(request.fields().principal.as_deref(), Some("alice"));
    }

    #[test]
    fn declared_keys_work_without_the_store() {
        store::reset();
        let keys = format!(
            r#"[{{"id":"{ID}","sha256":"{}","principal":"ci","models":["echo"],"limits":{{"requests_per_second":5}}}},
                {{"id":"aaaaaaaaaaaa","sha256":"{}","principal":"old","expires_at":1}}]"#,
            hash_key(&key(ID, SECRET)).to_uppercase(),
            hash_key(&key("aaaaaaaaaaaa", SECRET)),
        );
        // The store would say otherwise: the declared key wins.
        put("stored", ID, &alice(r#","disabled":true"#));
        let stage = auth(&[("store", "stored"), ("keys", &keys)]).unwrap();
        let request = presenting(&key(ID, SECRET));
        stage.process(&request).unwrap();
        assert_eq!(request.fields().refused, None);
        assert_eq!(request.fields().principal.as_deref(), Some("ci"));
        assert_eq!(
            request.metadata(),
            [
                ("auth.key".into(), ID.into()),
                ("auth.limits".into(), r#"{"requests_per_second":5}"#.into()),
            ]
        );

        for text in [key(ID, OTHER_SECRET), key("aaaaaaaaaaaa", SECRET)] {
            let request = presenting(&text);
            stage.process(&request).unwrap();
            assert_incorrect(&request);
        }
    }

    #[test]
    fn bad_config_fails_init_naming_the_key() {
        let hash = hash_key("x");
        let cases = [
            (
                format!(r#"[{{"id":"ABC","sha256":"{hash}","principal":"p"}}]"#),
                "config key `keys`: entry 1: `id` is not 12 lowercase hex digits",
            ),
            (
                format!(r#"[{{"id":"{ID}","sha256":"abc","principal":"p"}}]"#),
                "config key `keys`: entry 1 (id `0123456789ab`): the hash is not",
            ),
            (
                format!(r#"[{{"id":"{ID}","sha256":"{hash}","principal":"p","limits":5}}]"#),
                "config key `keys`: entry 1 (id `0123456789ab`): `limits` is not an object",
            ),
            (
                format!(
                    r#"[{{"id":"{ID}","sha256":"{hash}","principal":"p"}},{{"id":"{ID}","sha256":"{hash}","principal":"q"}}]"#
                ),
                "config key `keys`: entry 2: the id `0123456789ab` is declared twice",
            ),
            (
                format!(r#"[{{"id":"{ID}","sha256":"{hash}","principal":"p","model":["x"]}}]"#),
                "config key `keys`: unknown field `model`",
            ),
        ];
        for (keys, expected) in cases {
            let err = auth(&[("keys", &keys)]).unwrap_err();
            assert!(err.starts_with(expected), "{err}");
        }
        let err = auth(&[("realm", "x")]).unwrap_err();
        assert_eq!(
            err,
            "config key `realm`: unknown key; this stage takes `store`, `keys`"
        );
        assert!(auth(&[("store", " ")]).is_err());
    }

    #[test]
    fn store_failures_fail_closed() {
        assert!(matches!(
            store_error("keys", StoreError::Other("timed out".into())),
            StageError::UpstreamUnavailable(m) if m == "auth: key store `keys` is unavailable"
        ));
        assert!(matches!(
            store_error("keys", StoreError::AccessDenied),
            StageError::Config(_)
        ));
    }

    fn outcome(prompt_tokens: u32, completion_tokens: u32, answered_early: bool) -> Outcome {
        Outcome {
            kind: OutcomeKind::Answered,
            status: 200,
            usage: Usage {
                prompt_tokens,
                completion_tokens,
            },
            answered_early,
            streamed: false,
        }
    }

    /// The counter `usage:<ID>:<what>:<unit>:<index>` for an index of a
    /// time between `before` and `after` (a window may have turned).
    fn counter(
        what: &str,
        unit: &str,
        period_ms: u128,
        before: Duration,
        after: Duration,
    ) -> Option<i64> {
        let store = Store::open("keys").unwrap();
        [before, after].into_iter().find_map(|at| {
            let index = at.as_millis() / period_ms;
            let value = store
                .get(&format!("usage:{ID}:{what}:{unit}:{index}"))
                .unwrap()?;
            String::from_utf8(value).ok()?.parse().ok()
        })
    }

    #[test]
    fn finish_counts_requests_and_tokens_per_key() {
        store::reset();
        let stage = auth(&[]).unwrap();
        let before = since_epoch();
        let request = TestRequest::new().with_note("auth.key", ID);
        stage.finish(&request, &outcome(10, 5, false));
        stage.finish(&request, &outcome(100, 50, true));
        // Not a request auth accepted: nothing counted.
        stage.finish(&TestRequest::new(), &outcome(1, 1, false));
        let after = since_epoch();
        for (unit, period) in [("minute", 60_000), ("hour", 3_600_000), ("day", 86_400_000)] {
            assert_eq!(
                counter("requests", unit, period, before, after),
                Some(2),
                "{unit}"
            );
            assert_eq!(
                counter("tokens", unit, period, before, after),
                Some(15),
                "{unit}"
            );
        }

        // A request answered early adds no tokens, and creates no counter.
        store::reset();
        stage.finish(&request, &outcome(100, 50, true));
        let after = since_epoch();
        assert_eq!(
            counter("requests", "day", 86_400_000, before, after),
            Some(1)
        );
        assert_eq!(counter("tokens", "day", 86_400_000, before, after), None);
    }

    #[test]
    fn a_good_key_end_to_end() {
        store::reset();
        put("keys", ID, &alice(r#","models":["echo"]"#));
        let stage = auth(&[]).unwrap();
        let before = since_epoch();
        let request = presenting(&key(ID, SECRET));
        stage.process(&request).unwrap();
        stage.finish(&request, &outcome(3, 4, false));
        let after = since_epoch();
        assert_eq!(
            counter("requests", "hour", 3_600_000, before, after),
            Some(1)
        );
        assert_eq!(counter("tokens", "hour", 3_600_000, before, after), Some(7));
    }
}
