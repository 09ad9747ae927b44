//! What a worker does with the records it reads: the [`RecordProcessor`] an application
//! supplies, and the built-in [`CountingProcessor`] behind `/status` and `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use aws_sdk_kinesis::types::Record;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;

use crate::metrics::ShardLabel;

/// What a worker does with records. Called in order, once per GetRecords batch; a batch is
/// checkpointed only after `process` returned (at-least-once).
///
/// `process` must return well within `heartbeat_interval`: the fence is checked right before
/// each batch, and another worker may take the lease one heartbeat after the fence, so a batch
/// still running then could overlap its successor's first one. Hand slow work to a queue.
///
/// `lease_counter` is the lease's counter when this worker acquired it: a fencing token that
/// rises every time the shard changes hands. A process frozen (SIGSTOP, a paused VM) between
/// the worker's last fence check and the application's write can apply one batch after its
/// successor began; a sink that must never accept that rejects a batch whose counter is below
/// the highest it has seen for the shard.
pub trait RecordProcessor: Send + Sync + 'static {
    fn process(&self, worker_id: &str, shard_id: &str, lease_counter: u64, records: &[Record]);
}

/// Per-shard totals of the default processor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShardCounts {
    pub records: u64,
    pub bytes: u64,
}

/// The default processor: counts records and bytes per shard (shown in `/metrics` and
/// `/status`).
#[derive(Default)]
pub struct CountingProcessor {
    counts: Mutex<BTreeMap<String, ShardCounts>>,
    pub records_metric: Family<ShardLabel, Counter>,
    pub bytes_metric: Family<ShardLabel, Counter>,
}

impl CountingProcessor {
    /// Counts into these metric families (shared with the worker's registry).
    pub fn new(
        records_metric: Family<ShardLabel, Counter>,
        bytes_metric: Family<ShardLabel, Counter>,
    ) -> Self {
        CountingProcessor {
            counts: Mutex::default(),
            records_metric,
            bytes_metric,
        }
    }

    pub fn counts(&self) -> BTreeMap<String, ShardCounts> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl RecordProcessor for CountingProcessor {
    fn process(&self, _worker_id: &str, shard_id: &str, _lease_counter: u64, records: &[Record]) {
        let bytes: u64 = records.iter().map(|r| r.data().as_ref().len() as u64).sum();
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let c = counts.entry(shard_id.to_owned()).or_default();
        c.records += records.len() as u64;
        c.bytes += bytes;
        let label = ShardLabel {
            shard: shard_id.to_owned(),
        };
        self.records_metric
            .get_or_create(&label)
            .inc_by(records.len() as u64);
        self.bytes_metric.get_or_create(&label).inc_by(bytes);
    }
}
