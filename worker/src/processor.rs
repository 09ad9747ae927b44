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

    /// Forgets every shard not in `held`: its counts and its per-shard metric series. A
    /// worker that ran through many reshards and hand-offs keeps only what it reads now, so
    /// neither the map nor the metric labels grow with every shard it ever read (a counter
    /// that comes back starts again from 0, which Prometheus reads as a reset).
    pub fn retain(&self, held: &[String]) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.retain(|shard, _| {
            let keep = held.contains(shard);
            if !keep {
                let label = ShardLabel {
                    shard: shard.clone(),
                };
                self.records_metric.remove(&label);
                self.bytes_metric.remove(&label);
            }
            keep
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_kinesis::primitives::{Blob, DateTime};

    fn record(seq: &str) -> Record {
        Record::builder()
            .sequence_number(seq)
            .data(Blob::new("x"))
            .partition_key("k")
            .approximate_arrival_timestamp(DateTime::from_secs(0))
            .build()
            .unwrap()
    }

    #[test]
    fn shards_no_longer_held_are_forgotten_with_their_metric_series() {
        let mut registry = prometheus_client::registry::Registry::default();
        let (records, bytes) = (Family::default(), Family::default());
        registry.register("records", "records", records.clone());
        let counting = CountingProcessor::new(records, bytes);
        counting.process("w", "shard-a", 1, &[record("1")]);
        counting.process("w", "shard-b", 1, &[record("1"), record("2")]);
        counting.retain(&["shard-a".to_owned()]);
        assert_eq!(counting.counts().keys().collect::<Vec<_>>(), ["shard-a"]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("shard=\"shard-a\""), "{text}");
        assert!(!text.contains("shard-b"), "{text}");
    }
}
