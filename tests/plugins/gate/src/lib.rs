//! A test stage for the stateful capabilities, through the SDK. Its
//! `mode` (config) picks what it does:
//!
//! - `auth`: the `authorization` header must be `Bearer <token>` (config
//!   `token`), else 401; on success the principal is `principal` (config).
//! - `limit`: a windowed counter per principal (`anon` without one) in the
//!   store `limits`: `limit` requests per `window_ms`; past it, 429 with
//!   `Retry-After`. Sets `x-ratelimit-remaining-requests`. A store error
//!   lets the request through and notes it (`gate.store_error`).
//! - `cache`: looks the last user message (its first 200 characters) up in
//!   the store `cache`; a hit
//!   answers the request early (header `x-cache: hit`).
//! - `remember`: after the generation, stores the completion under the last
//!   user message in `cache` (for 60 s).
//! - `probe`: notes what the stage can see: the `x-team` and
//!   `authorization` headers, the client address, the principal, and the
//!   result of opening the store `store` (config).
//! - `noop`: nothing.
//! - `forbid`: refuses every request with 403 (after a generation, too).
//!
//! Its `finish` appends `<name>:<outcome>:<status>:<completion tokens>:
//! <principal>` (`name` from config) to a log in the store `finish`, if
//! granted: `seq` counts the entries, `entry:<n>` holds the n-th. With
//! `finish_panic = true` it panics instead.

use std::time::Duration;

use orchestrator_plugin::store::{Store, StoreError};
use orchestrator_plugin::{
    Outcome, OutcomeKind, Refusal, RefusalKind, Request, Stage, StageError, Usage, export_stage,
};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    mode: String,
    token: String,
    principal: String,
    limit: i64,
    window_ms: u64,
    store: String,
    name: String,
    finish_panic: bool,
}

struct Gate(Config);

/// The cache key of a request: its last user message, cut to 200
/// characters.
fn last_user(request: &dyn Request) -> String {
    request
        .messages()
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(|m| m.text().chars().take(200).collect())
        .unwrap_or_default()
}

fn note_error(request: &dyn Request, error: &StoreError) {
    request.set_note("gate.store_error", &error.to_string());
}

impl Gate {
    fn auth(&self, request: &dyn Request) {
        let expected = format!("Bearer {}", self.0.token);
        if request.header("authorization").as_deref() == Some(expected.as_str()) {
            request.set_principal(&self.0.principal);
        } else {
            request.refuse(Refusal {
                kind: RefusalKind::Unauthorized,
                message: "missing or wrong API key".into(),
                code: None,
                retry_after_ms: None,
                policy: None,
            });
        }
    }

    fn limit(&self, request: &dyn Request) {
        let who = request.principal().unwrap_or_else(|| "anon".into());
        let counted = Store::open("limits").and_then(|store| {
            store.window(
                &who,
                1,
                Duration::from_millis(self.0.window_ms),
                Some(self.0.limit),
            )
        });
        match counted {
            Ok(window) => {
                let remaining = (self.0.limit - window.value).max(0);
                let _ = request
                    .set_response_header("x-ratelimit-remaining-requests", &remaining.to_string());
                request.set_note("gate.count", &window.value.to_string());
                if !window.applied {
                    request.refuse(Refusal {
                        kind: RefusalKind::RateLimited,
                        message: format!("{} requests per window", self.0.limit),
                        code: None,
                        retry_after_ms: Some(window.reset_ms),
                        policy: None,
                    });
                }
            }
            Err(error) => note_error(request, &error),
        }
    }

    fn cache(&self, request: &dyn Request) {
        let hit = Store::open("cache").and_then(|store| store.get(&last_user(request)));
        match hit {
            Ok(Some(answer)) => {
                request.set_completion(&String::from_utf8_lossy(&answer));
                request.set_finish_reason("stop");
                request.set_usage(Usage {
                    prompt_tokens: 0,
                    completion_tokens: 0,
                });
                request.answer();
                let _ = request.set_response_header("x-cache", "hit");
            }
            Ok(None) => {
                let _ = request.set_response_header("x-cache", "miss");
            }
            Err(error) => note_error(request, &error),
        }
    }

    fn remember(&self, request: &dyn Request) {
        if request.answered() {
            return;
        }
        let stored = Store::open("cache").and_then(|store| {
            store.set_with_ttl(
                &last_user(request),
                request.completion().as_bytes(),
                Duration::from_secs(60),
            )
        });
        if let Err(error) = stored {
            note_error(request, &error);
        }
    }

    fn probe(&self, request: &dyn Request) {
        let show = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        request.set_note("probe.team", &show(request.header("X-Team")));
        request.set_note("probe.authorization", &show(request.header("authorization")));
        request.set_note("probe.address", &show(request.client_address()));
        request.set_note("probe.principal", &show(request.principal()));
        let opened = match Store::open(&self.0.store) {
            Ok(_) => "ok".to_string(),
            Err(StoreError::AccessDenied) => "access-denied".into(),
            Err(other) => other.to_string(),
        };
        request.set_note("probe.store", &opened);
    }
}

impl Stage for Gate {
    type Config = Config;

    fn init(config: Config) -> Result<Self, orchestrator_plugin::InitError> {
        Ok(Gate(config))
    }

    fn process(&self, request: &dyn Request) -> Result<(), StageError> {
        match self.0.mode.as_str() {
            "auth" => self.auth(request),
            "limit" => self.limit(request),
            "cache" => self.cache(request),
            "remember" => self.remember(request),
            "probe" => self.probe(request),
            "noop" => {}
            "forbid" => request.refuse(Refusal {
                kind: RefusalKind::Forbidden,
                message: "not for you".into(),
                code: Some("model_not_allowed".into()),
                retry_after_ms: None,
                policy: None,
            }),
            other => return Err(StageError::Config(format!("unknown mode `{other}`"))),
        }
        Ok(())
    }

    fn finish(&self, request: &dyn Request, outcome: &Outcome) {
        assert!(!self.0.finish_panic, "finish was told to panic");
        let Ok(log) = Store::open("finish") else {
            return;
        };
        let kind = match outcome.kind {
            OutcomeKind::Answered => "answered",
            OutcomeKind::Refused => "refused",
            OutcomeKind::Failed => "failed",
            OutcomeKind::Cancelled => "cancelled",
        };
        let entry = format!(
            "{}:{kind}:{}:{}:{}",
            self.0.name,
            outcome.status,
            outcome.usage.completion_tokens,
            request.principal().unwrap_or_default()
        );
        if let Ok(n) = log.increment("seq", 1) {
            let _ = log.set(&format!("entry:{n}"), entry.as_bytes());
        }
    }
}

export_stage!(Gate, finish);
