//! Reading one shard: GetShardIterator from the checkpoint, GetRecords in a loop with backoff,
//! periodic conditional checkpoints, `SHARD_END` at the end so children can start.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::types::{Record, ShardIteratorType};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Serialize;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::aws::{AwsError, call};
use crate::leases::{Lease, LeaseStore, SHARD_END, TRIM_HORIZON};
use crate::worker::Context;

/// What a worker does with records. Called in order, once per GetRecords batch; a batch is
/// checkpointed only after `process` returned (at-least-once).
pub trait RecordProcessor: Send + Sync + 'static {
    fn process(&self, worker_id: &str, shard_id: &str, records: &[Record]);
}

/// Per-shard totals of the default processor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShardCounts {
    pub records: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: String,
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
    fn process(&self, _worker_id: &str, shard_id: &str, records: &[Record]) {
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

/// When to checkpoint and how to pace reads.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerTuning {
    pub checkpoint_every_records: u64,
    pub checkpoint_every: Duration,
    /// Wait after an empty read (Kinesis allows 5 GetRecords/s per shard).
    pub idle_wait: Duration,
    pub max_records_per_call: i32,
}

impl Default for ConsumerTuning {
    fn default() -> Self {
        ConsumerTuning {
            checkpoint_every_records: 1000,
            checkpoint_every: Duration::from_secs(5),
            idle_wait: Duration::from_secs(1),
            max_records_per_call: 1000,
        }
    }
}

/// Why a consumer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerExit {
    /// Asked to stop; `last_processed` is the checkpoint to release the lease with.
    Stopped { last_processed: Option<String> },
    /// Read to the end; `SHARD_END` written and the lease released.
    ShardEnd,
    /// A conditional write failed: another worker owns the lease now. Stopped at once.
    Lost,
    /// The heartbeat could not be renewed in time: stopped before anyone may take over.
    Fenced,
}

/// Sleeps `d` unless stopped or fenced first.
async fn pause(
    d: Duration,
    stop: &CancellationToken,
    fence: &mut tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = fence.wait_for(|fenced| *fenced) => {}
        _ = sleep(d) => {}
    }
}

async fn iterator_at(
    ctx: &Context,
    shard_id: &str,
    position: &str,
) -> Result<Option<String>, AwsError> {
    let s = &ctx.state.settings;
    let mut req = ctx
        .aws
        .kinesis
        .get_shard_iterator()
        .stream_name(&s.stream_name)
        .shard_id(shard_id);
    req = if position == TRIM_HORIZON {
        req.shard_iterator_type(ShardIteratorType::TrimHorizon)
    } else {
        req.shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(position)
    };
    let out = call(&ctx.aws.metrics, "kinesis", "GetShardIterator", req.send()).await?;
    Ok(out.shard_iterator)
}

/// Reads `lease`'s shard until stopped, lost, fenced or finished.
pub async fn consume(
    ctx: Arc<Context>,
    store: LeaseStore,
    lease: Lease,
    stop: CancellationToken,
) -> ConsumerExit {
    let me = ctx.state.settings.worker_id.clone();
    let shard = lease.shard_id.clone();
    let tuning = ctx.consumer_tuning;
    let mut position = lease.checkpoint.clone();
    let mut last_processed: Option<String> = None;
    let mut since_checkpoint: u64 = 0;
    let mut last_checkpoint_at = Instant::now();
    let mut backoff = Duration::from_millis(200);
    let mut iterator: Option<String> = None;
    let mut fence = ctx.state.fence();

    loop {
        if stop.is_cancelled() {
            return ConsumerExit::Stopped { last_processed };
        }
        if !ctx.state.may_process() {
            return ConsumerExit::Fenced;
        }
        let it = match iterator.take() {
            Some(it) => it,
            None => match iterator_at(&ctx, &shard, last_processed.as_deref().unwrap_or(&position))
                .await
            {
                Ok(Some(it)) => it,
                Ok(None) => {
                    // No iterator: the shard is closed and fully read.
                    return finish(&store, &shard, &me).await;
                }
                Err(e) => {
                    tracing::warn!(shard = %shard, error = %e, "GetShardIterator failed");
                    // A stop during the pause is seen at the top of the loop.
                    pause(backoff, &stop, &mut fence).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        let out = call(
            &ctx.aws.metrics,
            "kinesis",
            "GetRecords",
            ctx.aws
                .kinesis
                .get_records()
                .shard_iterator(&it)
                .limit(tuning.max_records_per_call)
                .send(),
        )
        .await;
        let out = match out {
            Ok(out) => {
                backoff = Duration::from_millis(200);
                out
            }
            Err(e) => {
                // Expired iterators, throttling, outages: back off, then start again from the
                // last processed record.
                tracing::debug!(shard = %shard, error = %e, "GetRecords failed");
                pause(backoff, &stop, &mut fence).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let records = out.records();
        if !records.is_empty() {
            // The fence is checked right before the side effect.
            if !ctx.state.may_process() {
                return ConsumerExit::Fenced;
            }
            ctx.state.counting.process(&me, &shard, records);
            if let Some(p) = &ctx.processor {
                p.process(&me, &shard, records);
            }
            last_processed = records.last().map(|r| r.sequence_number().to_owned());
            since_checkpoint += records.len() as u64;
        }
        let due = since_checkpoint >= tuning.checkpoint_every_records
            || (since_checkpoint > 0 && last_checkpoint_at.elapsed() >= tuning.checkpoint_every);
        if due && let Some(seq) = &last_processed {
            match store.checkpoint(&shard, &me, seq).await {
                Ok(()) => {
                    position = seq.clone();
                    since_checkpoint = 0;
                    last_checkpoint_at = Instant::now();
                }
                Err(e) if e.is_condition_failed() => {
                    tracing::warn!(shard = %shard, "lease lost (checkpoint refused); stopping its consumer");
                    return ConsumerExit::Lost;
                }
                Err(e) => {
                    tracing::warn!(shard = %shard, error = %e, "checkpoint failed; will retry")
                }
            }
        }
        match out.next_shard_iterator() {
            None => {
                // The shard is closed and everything in it was processed.
                return finish(&store, &shard, &me).await;
            }
            Some(next) => iterator = Some(next.to_owned()),
        }
        let behind = out.millis_behind_latest().unwrap_or(0);
        let wait = if records.is_empty() {
            tuning.idle_wait
        } else if behind > 0 {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(500)
        };
        pause(wait, &stop, &mut fence).await;
    }
}

/// Writes `SHARD_END` and gives the lease up in one conditional write.
async fn finish(store: &LeaseStore, shard: &str, me: &str) -> ConsumerExit {
    loop {
        match store.release(shard, me, Some(SHARD_END)).await {
            Ok(()) => {
                tracing::info!(shard = %shard, "shard read to its end; children may start");
                return ConsumerExit::ShardEnd;
            }
            Err(e) if e.is_condition_failed() => return ConsumerExit::Lost,
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "cannot write SHARD_END; retrying");
                sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
