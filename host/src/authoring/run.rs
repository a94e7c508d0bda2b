//! `orchestrator plugin run`: one call of a loaded plugin, on an envelope
//! given as JSON, or a sequence of deltas through its chunk path.
//!
//! The input is the request as the host keeps it, in JSON: the chat in
//! the OpenAI wire form (`messages`, `tools`, `params` with any request
//! field), and the answer's fields; every field may be left out:
//!
//! ```json
//! {
//!   "messages": [{"role": "user", "content": "What is a pipeline?"}],
//!   "params": {"model": "echo", "max_tokens": 64, "stop": ["END"]},
//!   "completion": "mail me at ann@example.com END",
//!   "metadata": [["request.stream", "false"]]
//! }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use super::error::AuthoringError;
use crate::chat::Params;
use crate::store::Stores;
use crate::wasm::{ChunkContext, Envelope, Instance, Plugin, params_to_wit};

/// The result of `process` calls.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The envelope as the stage left it.
    pub envelope: Envelope,
    /// The first call's duration, in microseconds: a fresh instance, so
    /// this includes cold caches and lazy initialisation.
    pub duration_us: f64,
    /// Fuel the first call used.
    pub fuel_used: Option<u64>,
    /// The calls after the first, on the same instance and the same input
    /// (`--repeat`): what the host's reused instances cost per request.
    pub warm: Option<Warm>,
    /// Linear memory the instance holds after the calls, in bytes.
    pub memory_bytes: usize,
}

/// Durations of the warm calls, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Warm {
    /// How many.
    pub calls: usize,
    /// The median.
    pub median_us: f64,
    /// The fastest.
    pub min_us: f64,
    /// The slowest.
    pub max_us: f64,
}

impl Warm {
    fn of(mut durations: Vec<f64>) -> Option<Warm> {
        durations.sort_by(f64::total_cmp);
        Some(Warm {
            calls: durations.len(),
            median_us: *durations.get(durations.len() / 2)?,
            min_us: *durations.first()?,
            max_us: *durations.last()?,
        })
    }
}

/// One call of the chunk path.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkStep {
    /// The delta given.
    pub delta: String,
    /// Whether it was the final call.
    pub last: bool,
    /// What the stage emitted.
    pub emit: Vec<String>,
    /// What it carried to the next call.
    pub carry: String,
    /// Whether it ended the completion.
    pub stop: bool,
    /// The call's duration, in microseconds.
    pub duration_us: f64,
    /// Fuel the call used.
    pub fuel_used: Option<u64>,
}

/// The envelope `input` describes: its fields over an empty envelope with
/// id `chatcmpl-plugin-run` and model `echo`.
///
/// # Errors
///
/// [`AuthoringError::Input`] naming what does not fit the envelope.
pub fn envelope_from_json(input: Value) -> Result<Envelope, AuthoringError> {
    let Value::Object(fields) = input else {
        return Err(AuthoringError::Input("must be a JSON object".into()));
    };
    let mut params = Params::for_model("echo");
    params.max_tokens = Some(256);
    let mut base = Envelope::new("chatcmpl-plugin-run".into(), Vec::new(), params, Vec::new());
    base.finish_reason = "stop".into();
    let Ok(Value::Object(mut merged)) = serde_json::to_value(&base) else {
        return Err(AuthoringError::Input(
            "cannot build the base envelope".into(),
        ));
    };
    for (key, value) in fields {
        match (merged.get_mut(&key), value) {
            (None, _) => {
                return Err(AuthoringError::Input(format!(
                    "unknown field `{key}`; the envelope has {}",
                    names(&merged)
                )));
            }
            // `params` may be given in part, and take any field (those
            // the host does not model go to `extra`, as from a client).
            (Some(Value::Object(inner)), Value::Object(given)) if key == "params" => {
                inner.extend(given);
            }
            // `usage` may be given in part.
            (Some(Value::Object(inner)), Value::Object(given)) => {
                for (name, value) in given {
                    if !inner.contains_key(&name) {
                        return Err(AuthoringError::Input(format!(
                            "unknown field `{key}.{name}`; it has {}",
                            names(inner)
                        )));
                    }
                    inner.insert(name, value);
                }
            }
            (Some(slot), value) => *slot = value,
        }
    }
    serde_json::from_value(Value::Object(merged)).map_err(|e| AuthoringError::Input(e.to_string()))
}

fn names(map: &Map<String, Value>) -> String {
    map.keys()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fuel used by the last call of `instance`, given the budget it started
/// with.
fn fuel_used(instance: &Instance, budget: Option<u64>) -> Option<u64> {
    Some(budget?.saturating_sub(instance.fuel_left()?))
}

/// Call `process` on a fresh instance, `calls` times (at least once), each
/// time on `input`; report the first call's result.
///
/// # Errors
///
/// The instance cannot be created, or a call fails.
pub async fn process(
    plugin: &Arc<Plugin>,
    stores: &Arc<Stores>,
    input: Envelope,
    calls: usize,
) -> Result<RunReport, AuthoringError> {
    let mut instance = Instance::new(plugin).await?;
    instance.set_stores(stores);
    let timeout = Duration::from_millis(plugin.settings().timeout_ms);
    let budget = plugin.settings().fuel;
    let mut envelope = input.clone();
    let started = Instant::now();
    instance.process(&mut envelope, timeout).await?;
    let duration_us = started.elapsed().as_secs_f64() * 1e6;
    let fuel_used = fuel_used(&instance, budget);
    let mut warm = Vec::with_capacity(calls.saturating_sub(1));
    for _ in 1..calls {
        let mut again = input.clone();
        let started = Instant::now();
        instance.process(&mut again, timeout).await?;
        warm.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(RunReport {
        envelope,
        duration_us,
        fuel_used,
        warm: Warm::of(warm),
        memory_bytes: instance.memory_bytes(),
    })
}

/// Feed `deltas` through the chunk path, then the final call, carrying
/// each call's `carry` to the next as the host does; stop early when the
/// stage does.
///
/// # Errors
///
/// The instance cannot be created, or a call fails.
pub async fn chunks(
    plugin: &Arc<Plugin>,
    stores: &Arc<Stores>,
    envelope: &Envelope,
    deltas: &[String],
) -> Result<Vec<ChunkStep>, AuthoringError> {
    let mut instance = Instance::new(plugin).await?;
    instance.set_stores(stores);
    let timeout = Duration::from_millis(plugin.settings().timeout_ms);
    let budget = plugin.settings().fuel;
    let context = ChunkContext {
        request_id: envelope.request_id.clone(),
        params: params_to_wit(&envelope.params),
    };
    let mut steps = Vec::new();
    let mut carry = String::new();
    let calls = deltas
        .iter()
        .map(|d| (d.as_str(), false))
        .chain(std::iter::once(("", true)));
    for (delta, last) in calls {
        let started = Instant::now();
        let output = instance
            .process_chunk(&context, &carry, delta, last, timeout)
            .await?;
        let duration_us = started.elapsed().as_secs_f64() * 1e6;
        carry.clone_from(&output.carry);
        let stop = output.stop;
        steps.push(ChunkStep {
            delta: delta.to_string(),
            last,
            emit: output.emit,
            carry: output.carry,
            stop,
            duration_us,
            fuel_used: fuel_used(&instance, budget),
        });
        if stop {
            break;
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_envelope_is_built_from_partial_json() {
        let envelope = envelope_from_json(serde_json::json!({
            "completion": "hi",
            "params": {"stop": ["END"]},
            "metadata": [["a", "b"]],
        }))
        .unwrap();
        assert_eq!(envelope.completion, "hi");
        assert_eq!(envelope.params.stop, ["END"]);
        assert_eq!(envelope.params.model, "echo");
        assert_eq!(envelope.metadata, [("a".to_string(), "b".to_string())]);
        let error = envelope_from_json(serde_json::json!({"completon": "x"})).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `completon`"),
            "{error}"
        );
        // `params` takes any request field, as a client's request does.
        let envelope =
            envelope_from_json(serde_json::json!({"params": {"seed": 3, "logit_bias": {}}}))
                .unwrap();
        assert_eq!(envelope.params.seed, Some(3));
        assert!(envelope.params.extra.contains_key("logit_bias"));
        let error = envelope_from_json(serde_json::json!({"usage": {"tokens": 1}})).unwrap_err();
        assert!(error.to_string().contains("`usage.tokens`"), "{error}");
        assert!(envelope_from_json(serde_json::json!([])).is_err());
    }
}
