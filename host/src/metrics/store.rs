//! The series of the key-value stores (see [`crate::store`]).

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

/// Buckets of `orchestrator_store_duration_seconds`: 1 µs (a memory store)
/// to 1 s.
pub const STORE_BUCKETS: &[f64] = &[
    0.000_001, 0.000_005, 0.000_01, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A store operation, the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// `get`.
    Get,
    /// `set` (and `expiring.set`).
    Set,
    /// `delete` and `delete-many`.
    Delete,
    /// `exists`.
    Exists,
    /// `get-many`.
    GetMany,
    /// `set-many`.
    SetMany,
    /// `list-keys`.
    ListKeys,
    /// `atomics.increment`.
    Increment,
    /// `atomics.cas` and `swap`.
    Swap,
    /// `expiring.increment` and `increment-all`.
    Window,
    /// `expiring.get-or-claim`.
    GetOrClaim,
}

impl StoreOp {
    /// Every operation, in label order.
    pub const ALL: [StoreOp; 11] = [
        StoreOp::Get,
        StoreOp::Set,
        StoreOp::Delete,
        StoreOp::Exists,
        StoreOp::GetMany,
        StoreOp::SetMany,
        StoreOp::ListKeys,
        StoreOp::Increment,
        StoreOp::Swap,
        StoreOp::Window,
        StoreOp::GetOrClaim,
    ];

    /// The `op` label.
    pub fn label(self) -> &'static str {
        match self {
            StoreOp::Get => "get",
            StoreOp::Set => "set",
            StoreOp::Delete => "delete",
            StoreOp::Exists => "exists",
            StoreOp::GetMany => "get_many",
            StoreOp::SetMany => "set_many",
            StoreOp::ListKeys => "list_keys",
            StoreOp::Increment => "increment",
            StoreOp::Swap => "swap",
            StoreOp::Window => "window",
            StoreOp::GetOrClaim => "get_or_claim",
        }
    }
}

/// The `outcome` labels of `orchestrator_store_operations_total`.
const OUTCOMES: [&str; 4] = ["ok", "error", "timeout", "invalid"];

/// The metric families, registered once.
pub(super) struct StoreFamilies {
    pub(super) operations: IntCounterVec,
    pub(super) duration: HistogramVec,
    pub(super) evictions: IntCounterVec,
    pub(super) keys: IntGaugeVec,
}

impl StoreFamilies {
    /// Resolve (and create) the series of store `name`.
    pub(super) fn store(&self, name: &str) -> StoreMetrics {
        StoreMetrics {
            operations: Arc::new(StoreOp::ALL.map(|op| {
                OUTCOMES.map(|outcome| {
                    self.operations
                        .with_label_values(&[name, op.label(), outcome])
                })
            })),
            duration: Arc::new(
                StoreOp::ALL.map(|op| self.duration.with_label_values(&[name, op.label()])),
            ),
            evictions: self.evictions.with_label_values(&[name]),
            keys: self.keys.with_label_values(&[name]),
        }
    }
}

/// One store's series, resolved once.
#[derive(Clone)]
pub struct StoreMetrics {
    operations: Arc<[[IntCounter; 4]; 11]>,
    duration: Arc<[Histogram; 11]>,
    /// `orchestrator_store_evictions_total{store}` (memory stores).
    pub evictions: IntCounter,
    /// `orchestrator_store_keys{store}` (memory stores).
    pub keys: IntGauge,
}

/// How a store operation ended, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// It succeeded.
    Ok,
    /// The backend was unreachable or failed.
    Error,
    /// It did not finish in time.
    Timeout,
    /// It was refused as invalid.
    Invalid,
}

impl StoreMetrics {
    /// Count and time one operation.
    pub fn record(&self, op: StoreOp, outcome: StoreOutcome, elapsed: Duration) {
        self.operations[op as usize][outcome as usize].inc();
        self.duration[op as usize].observe(elapsed.as_secs_f64());
    }
}
