//! Forgetting the series of stages that left the configuration
//! ([`Metrics::retain_stages`]), so that neither reloads that rename
//! stages nor refused reloads that named new ones grow `/metrics`.

use std::collections::HashMap;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use super::registry::Metrics;

/// Remove every series of `vec` whose `stage` label is `stage`, whatever
/// its other labels.
fn forget_stage<T: MetricVecBuilder>(vec: &MetricVec<T>, stage: &str) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("stage") == Some(&stage) {
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
        let retired: Vec<String> = {
            let mut order = self.stage_order.lock().unwrap_or_else(|e| e.into_inner());
            let (kept, retired) = std::mem::take(&mut *order)
                .into_iter()
                .partition(|s| keep.contains(&s.as_str()));
            *order = kept;
            retired
        };
        for stage in &retired {
            forget_stage(&self.requests, stage);
            forget_stage(&self.shed, stage);
            forget_stage(&self.errors, stage);
            forget_stage(&self.queue_depth, stage);
            forget_stage(&self.queue_capacity, stage);
            forget_stage(&self.stage_duration, stage);
            forget_stage(&self.plugin_info, stage);
            forget_stage(&self.instances, stage);
            forget_stage(&self.circuit_state, stage);
            forget_stage(&self.circuit_transitions, stage);
            forget_stage(&self.reloads, stage);
            forget_stage(self.policy.refusals(), stage);
            self.policy.forget_policies(stage);
        }
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
