//! The series of the gateway policies that stages carry out: refusals (an
//! API key, a rate limit), the response cache's answers, and what each
//! principal spends.
//!
//! Stages name policies and principals, so their label values come from
//! outside the host's configuration. Each label is bounded: a refusal's
//! `policy` label takes at most [`MAX_POLICIES`] values per stage, and at
//! most [`MAX_PRINCIPALS`] principals get series of their own; the rest
//! are counted under `other`. A principal keeps its series once it has
//! one (counters must not go down, which a "top N" chosen anew at every
//! scrape would make them do), so the series go to the first principals
//! that spend.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// Most `policy` label values of one stage; later ones are `other`.
pub const MAX_POLICIES: usize = 32;

/// Most principals with series of their own; later ones are `other`.
pub const MAX_PRINCIPALS: usize = 100;

/// The label value of everything past a bound.
const OTHER: &str = "other";

/// What the response cache did for a request: the value of the
/// `x-orchestrator-cache` header a cache stage set.
pub const CACHE_RESULTS: [&str; 3] = ["hit", "miss", "bypass"];

/// The policy series, registered once; cheap to clone.
#[derive(Clone)]
pub struct PolicyMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    refusals: IntCounterVec,
    cache: [IntCounter; 3],
    principal_requests: IntCounterVec,
    principal_tokens: IntCounterVec,
    /// `(stage, policy)` pairs with a label of their own.
    policies: Mutex<HashSet<(String, String)>>,
    /// Principals with series of their own.
    principals: Mutex<HashSet<String>>,
}

impl PolicyMetrics {
    /// Register the policy families in `registry`.
    pub(super) fn register(registry: &Registry) -> PolicyMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let refusals = counter(
            "orchestrator_refusals_total",
            "Requests a stage refused, by stage, HTTP status (401, 403, 429) and policy (a rate limit rule; empty if the stage named none).",
            &["stage", "status", "policy"],
        );
        let cache = counter(
            "orchestrator_response_cache_total",
            "Answers by what the response cache did for them (x-orchestrator-cache: hit, miss, bypass).",
            &["result"],
        );
        let principal_requests = counter(
            "orchestrator_principal_requests_total",
            "Requests that ended, by principal (the first 100 principals; the rest as other).",
            &["principal"],
        );
        let principal_tokens = counter(
            "orchestrator_principal_tokens_total",
            "Tokens the inference backends spent, by principal (as orchestrator_principal_requests_total) and kind (prompt, completion).",
            &["principal", "kind"],
        );
        PolicyMetrics {
            inner: Arc::new(Inner {
                cache: CACHE_RESULTS.map(|result| cache.with_label_values(&[result])),
                refusals,
                principal_requests,
                principal_tokens,
                policies: Mutex::default(),
                principals: Mutex::default(),
            }),
        }
    }

    /// Count a refusal by `stage` with HTTP `status`, under `policy`.
    pub fn refused(&self, stage: &str, status: u16, policy: Option<&str>) {
        let policy = policy.unwrap_or_default();
        let policy = if policy.is_empty()
            || admit(
                &self.inner.policies,
                (stage.to_owned(), policy.to_owned()),
                |set, (stage, _)| set.iter().filter(|(s, _)| s == stage).count() < MAX_POLICIES,
            ) {
            policy
        } else {
            OTHER
        };
        self.inner
            .refusals
            .with_label_values(&[stage, &status.to_string(), policy])
            .inc();
    }

    /// `orchestrator_refusals_total`, for removing a retired stage's
    /// series.
    pub(super) fn refusals(&self) -> &IntCounterVec {
        &self.inner.refusals
    }

    /// Forget the policy labels of the stages not in `keep` (they left the
    /// configuration).
    pub(super) fn forget_policies(&self, keep: &[&str]) {
        self.inner
            .policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _)| keep.contains(&s.as_str()));
    }

    /// Count an answer whose cache header said `result` (a value other
    /// than [`CACHE_RESULTS`] is not counted).
    pub fn cached(&self, result: &str) {
        if let Some(at) = CACHE_RESULTS.iter().position(|r| *r == result) {
            self.inner.cache[at].inc();
        }
    }

    /// Count a request by `principal` and the tokens it spent.
    pub fn spent(&self, principal: &str, prompt_tokens: u64, completion_tokens: u64) {
        let label = if admit(&self.inner.principals, principal.to_owned(), |set, _| {
            set.len() < MAX_PRINCIPALS
        }) {
            principal
        } else {
            OTHER
        };
        self.inner
            .principal_requests
            .with_label_values(&[label])
            .inc();
        if prompt_tokens > 0 {
            self.inner
                .principal_tokens
                .with_label_values(&[label, "prompt"])
                .inc_by(prompt_tokens);
        }
        if completion_tokens > 0 {
            self.inner
                .principal_tokens
                .with_label_values(&[label, "completion"])
                .inc_by(completion_tokens);
        }
    }
}

/// Whether `item` has a label of its own: it had one already, or `room`
/// says the set may take it (then it is added).
fn admit<T: Eq + std::hash::Hash>(
    set: &Mutex<HashSet<T>>,
    item: T,
    room: impl FnOnce(&HashSet<T>, &T) -> bool,
) -> bool {
    let mut set = set.lock().unwrap_or_else(|e| e.into_inner());
    if set.contains(&item) {
        return true;
    }
    if room(&set, &item) {
        set.insert(item);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_and_policies_past_their_bounds_are_other() {
        let registry = Registry::new();
        let metrics = PolicyMetrics::register(&registry);
        for n in 0..MAX_PRINCIPALS + 5 {
            metrics.spent(&format!("p{n}"), 1, 2);
        }
        metrics.spent("p0", 0, 1);
        for n in 0..MAX_POLICIES + 3 {
            metrics.refused("ratelimit", 429, Some(&format!("rule{n}")));
        }
        let families = registry.gather();
        let series = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.get_metric().len())
                .unwrap_or(0)
        };
        assert_eq!(
            series("orchestrator_principal_requests_total"),
            MAX_PRINCIPALS + 1
        );
        assert_eq!(series("orchestrator_refusals_total"), MAX_POLICIES + 1);
        let other = families
            .iter()
            .find(|f| f.name() == "orchestrator_principal_requests_total")
            .and_then(|f| {
                f.get_metric()
                    .iter()
                    .find(|m| m.get_label().iter().any(|l| l.value() == OTHER))
                    .map(|m| m.get_counter().value())
            });
        assert_eq!(other, Some(5.0));
    }
}
