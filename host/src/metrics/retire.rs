//! Forgetting the series of stages that left the configuration
//! ([`Metrics::retain_stages`]), so that neither reloads that rename
//! stages nor refused reloads that named new ones grow `/metrics`.

use std::collections::HashMap;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use super::registry::Metrics;

/// Remove every series of `vec` whose `stage` label is not in `keep`,
/// whatever its other labels.
fn forget_stages<T: MetricVecBuilder>(vec: &MetricVec<T>, keep: &[&str]) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("stage").is_some_and(|s| !keep.contains(s)) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

impl Metrics {
    /// Keep the series of the stages named in `stages` and remove those of
    /// every other stage: called with the stages of the configuration
    /// serving once a reload is applied or refused. A retired stage still
    /// finishing requests updates handles no longer exported; a stage that
    /// comes back starts its series at 0 again (a counter reset, which
    /// `rate()` handles).
    pub fn retain_stages<'a>(&self, stages: impl IntoIterator<Item = &'a str>) {
        let keep: Vec<&str> = stages.into_iter().collect();
        self.stage_order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| keep.contains(&s.as_str()));
        // Every series of a stage not kept, also one a request admitted
        // under an earlier configuration made after that stage's last
        // retirement (a refusal counted as it ended).
        forget_stages(&self.requests, &keep);
        forget_stages(&self.shed, &keep);
        forget_stages(&self.errors, &keep);
        forget_stages(&self.queue_depth, &keep);
        forget_stages(&self.queue_capacity, &keep);
        forget_stages(&self.stage_duration, &keep);
        forget_stages(&self.plugin_info, &keep);
        forget_stages(&self.instances, &keep);
        forget_stages(&self.circuit_state, &keep);
        forget_stages(&self.circuit_transitions, &keep);
        forget_stages(&self.reloads, &keep);
        forget_stages(self.policy.refusals(), &keep);
        self.policy.forget_policies(&keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_stage_leaves_no_series() {
        let metrics = Metrics::new();
        let kept = metrics.stage("kept");
        let gone = metrics.stage("gone");
        kept.requests.inc();
        gone.requests.inc();
        metrics.set_plugin_version("gone", "abc");
        let _ = metrics.reloads("gone");
        metrics.policy().refused("gone", 429, Some("per-minute"));
        assert!(metrics.gather().contains("stage=\"gone\""));
        metrics.retain_stages(["kept"]);
        let text = metrics.gather();
        assert!(!text.contains("stage=\"gone\""), "{text}");
        assert!(text.contains("orchestrator_requests_total{stage=\"kept\"} 1"));
        // Back again: fresh series.
        let back = metrics.stage("gone");
        back.requests.inc();
        assert!(
            metrics
                .gather()
                .contains("orchestrator_requests_total{stage=\"gone\"} 1")
        );
    }
}
