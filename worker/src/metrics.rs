//! Prometheus metrics, served as text on `GET /metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiCallLabels {
    pub service: &'static str,
    pub operation: &'static str,
    pub outcome: CallOutcome,
}

/// How an AWS call ended, as the `outcome` label of `kds_aws_api_calls_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    /// A conditional write lost (another writer was first), alone or inside a transaction.
    ConditionalCheckFailed,
    /// A transaction cancelled by a conflict with another one (worth another try).
    TransactionConflict,
    Throttled,
    NotFound,
    AlreadyExists,
    InvalidArgument,
    Error,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::ConditionalCheckFailed => "conditional_check_failed",
            CallOutcome::TransactionConflict => "transaction_conflict",
            CallOutcome::Throttled => "throttled",
            CallOutcome::NotFound => "not_found",
            CallOutcome::AlreadyExists => "already_exists",
            CallOutcome::InvalidArgument => "invalid_argument",
            CallOutcome::Error => "error",
        }
    }
}

impl prometheus_client::encoding::EncodeLabelValue for CallOutcome {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The shard a per-shard metric is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
}

/// Every metric the worker exports. Cheap to clone (all handles are shared).
#[derive(Clone, Default)]
pub struct Metrics {
    pub api_calls: Family<ApiCallLabels, Counter>,
    pub conditional_write_conflicts: Family<OperationLabels, Counter>,
    pub leases_held: Gauge,
    pub max_leases_per_worker: Gauge,
    pub is_coordinator: Gauge,
    pub coordinator_epoch: Gauge,
    pub shard_count: Gauge,
    pub worker_count: Gauge,
    pub capacity_deficit: Gauge,
    pub lease_limit_publications: Counter,
    pub coordinator_takeovers: Counter,
    pub heartbeat_age_seconds: Gauge<f64, AtomicU64>,
    pub uncovered_shards: Gauge,
    pub workers_needed: Gauge,
    pub unreadable_leases: Family<ReasonLabels, Gauge>,
    /// Held shards whose last Kinesis read failed (throttling, an outage).
    pub failing_shard_reads: Gauge,
    /// The coordinator's stream calls (ListShards, DescribeStreamSummary) failing now.
    pub failing_stream_calls: Gauge,
    pub lease_limit_overrun: Gauge,
    pub lease_hand_offs: Family<OperationLabels, Counter>,
    /// 1 while another live process holds this worker id (this one stays fenced).
    pub worker_id_conflict: Gauge,
    /// Start-up calls retried after throttling or a transient error.
    pub start_retries: Counter,
    /// 1 while the worker waits at start for its stream to be created.
    pub stream_missing: Gauge,
    pub records_processed: Family<ShardLabel, Counter>,
    pub bytes_processed: Family<ShardLabel, Counter>,
    /// Built from the handles above at the first scrape and reused after: every metric is
    /// registered once per worker, not once per scrape. Shared by clones.
    registry: Arc<OnceLock<Registry>>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding this worker's metrics (see `registry`).
    fn build_registry(&self) -> Registry {
        let mut r = Registry::with_prefix("kds");
        r.register(
            "aws_api_calls",
            "AWS API calls by service, operation and outcome",
            self.api_calls.clone(),
        );
        r.register(
            "conditional_write_conflicts",
            "DynamoDB conditional writes that lost (another writer was first)",
            self.conditional_write_conflicts.clone(),
        );
        r.register(
            "leases_held",
            "Shard leases this worker holds",
            self.leases_held.clone(),
        );
        r.register(
            "max_leases_per_worker",
            "The published lease limit this worker obeys",
            self.max_leases_per_worker.clone(),
        );
        r.register(
            "is_coordinator",
            "1 while this worker is the coordinator, else 0",
            self.is_coordinator.clone(),
        );
        r.register(
            "coordinator_epoch",
            "Epoch of the coordinator this worker last saw",
            self.coordinator_epoch.clone(),
        );
        r.register(
            "shard_count",
            "Open shards in the published lease limit",
            self.shard_count.clone(),
        );
        r.register(
            "worker_count",
            "Workers in the published lease limit",
            self.worker_count.clone(),
        );
        r.register(
            "capacity_deficit",
            "Shards that no worker may hold because every worker is at the cap",
            self.capacity_deficit.clone(),
        );
        r.register(
            "lease_limit_publications",
            "lease_limits writes by this worker as coordinator",
            self.lease_limit_publications.clone(),
        );
        r.register(
            "coordinator_takeovers",
            "Times this worker became coordinator",
            self.coordinator_takeovers.clone(),
        );
        r.register(
            "heartbeat_age_seconds",
            "Seconds since this worker's last successful heartbeat",
            self.heartbeat_age_seconds.clone(),
        );
        r.register(
            "uncovered_shards",
            "Readable shards no live worker holds (non-zero when every worker is at the cap)",
            self.uncovered_shards.clone(),
        );
        r.register(
            "workers_needed",
            "Workers needed so that nobody exceeds the cap: ceil(readable shards / cap)",
            self.workers_needed.clone(),
        );
        r.register(
            "unreadable_leases",
            "Leases this worker holds but cannot read, by reason",
            self.unreadable_leases.clone(),
        );
        r.register(
            "failing_shard_reads",
            "Held shards whose last Kinesis read failed (throttled, unreachable); 0 once reads succeed again",
            self.failing_shard_reads.clone(),
        );
        r.register(
            "failing_stream_calls",
            "Coordinator calls about the stream (ListShards, DescribeStreamSummary) failing now",
            self.failing_stream_calls.clone(),
        );
        r.register(
            "lease_limit_overrun",
            "Leases this worker holds above the published limit (given up at its next round)",
            self.lease_limit_overrun.clone(),
        );
        r.register(
            "lease_hand_offs",
            "Leases handed over or given up by this worker, by kind (transfer, release, excess, shard_end)",
            self.lease_hand_offs.clone(),
        );
        r.register(
            "worker_id_conflict",
            "1 while another live process holds this worker id's heartbeat (this one processes nothing)",
            self.worker_id_conflict.clone(),
        );
        r.register(
            "start_retries",
            "Start-up AWS calls retried after throttling or a transient error",
            self.start_retries.clone(),
        );
        r.register(
            "stream_missing",
            "1 while the worker waits at start for its stream to be created (it reads nothing until then)",
            self.stream_missing.clone(),
        );
        r.register(
            "records_processed",
            "Records processed per shard by this worker",
            self.records_processed.clone(),
        );
        r.register(
            "bytes_processed",
            "Record payload bytes processed per shard by this worker",
            self.bytes_processed.clone(),
        );
        r
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let registry = self.registry.get_or_init(|| self.build_registry());
        let _ = prometheus_client::encoding::text::encode(&mut out, registry);
        out
    }

    pub fn record_call(
        &self,
        service: &'static str,
        operation: &'static str,
        outcome: CallOutcome,
    ) {
        self.api_calls
            .get_or_create(&ApiCallLabels {
                service,
                operation,
                outcome,
            })
            .inc();
        if outcome == CallOutcome::ConditionalCheckFailed {
            self.conditional_write_conflicts
                .get_or_create(&OperationLabels { operation })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_conflicts_are_exported() {
        let m = Metrics::new();
        m.record_call("dynamodb", "UpdateItem", CallOutcome::Ok);
        m.record_call(
            "dynamodb",
            "UpdateItem",
            CallOutcome::ConditionalCheckFailed,
        );
        m.record_call("kinesis", "DescribeStreamSummary", CallOutcome::Ok);
        let text = m.encode();
        assert!(text.contains(
            r#"kds_aws_api_calls_total{service="dynamodb",operation="UpdateItem",outcome="ok"} 1"#
        ));
        assert!(
            text.contains(r#"kds_conditional_write_conflicts_total{operation="UpdateItem"} 1"#)
        );
        // Scraped again: the same registry, the new values.
        m.record_call("kinesis", "DescribeStreamSummary", CallOutcome::Ok);
        assert!(m.encode().contains(
            r#"kds_aws_api_calls_total{service="kinesis",operation="DescribeStreamSummary",outcome="ok"} 2"#
        ));
        assert!(std::ptr::eq(
            m.registry.get().unwrap(),
            m.clone().registry.get().unwrap()
        ));
    }
}
