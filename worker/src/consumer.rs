//! Reading one shard: GetShardIterator from the checkpoint, GetRecords in a loop with backoff,
//! periodic checkpoints conditional on the lease as acquired ([`Held`]), `SHARD_END` at the end
//! so children can start.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kinesis::types::ShardIteratorType;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::aws::{AwsError, call};
use crate::backoff::Backoff;
use crate::context::Context;
use crate::leases::{Held, LeaseStore, SHARD_END, TRIM_HORIZON};
use crate::processor::RecordProcessor;

/// Why a consumer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerExit {
    /// Asked to stop; `last_processed` is the checkpoint to hand the lease on with.
    Stopped { last_processed: Option<String> },
    /// Read to the end; `SHARD_END` written and the lease released.
    ShardEnd,
    /// A conditional write failed: the lease is no longer held as acquired. Stopped at once.
    Lost,
    /// The heartbeat could not be renewed in time: stopped before anyone may take over.
    /// `last_processed` may still be checkpointed (conditionally: refused if taken since).
    Fenced { last_processed: Option<String> },
    /// The shard cannot be read from its checkpoint (recorded on the lease item).
    Unreadable { reason: String },
}

/// Latest-position checkpoint some KCL versions write: reading starts at the tip.
pub const LATEST: &str = "LATEST";

/// Attempts of a GetShardIterator refused as invalid before the shard counts as unreadable.
const INVALID_ATTEMPTS: u32 = 3;

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
    req = match position {
        TRIM_HORIZON => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        LATEST => req.shard_iterator_type(ShardIteratorType::Latest),
        p if pinned_millis(p).is_some() => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(
                pinned_millis(p).unwrap_or(0),
            )),
        seq => req
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq),
    };
    let out = call(&ctx.aws.metrics, "kinesis", "GetShardIterator", req.send()).await?;
    Ok(out.shard_iterator)
}

/// A `LATEST` checkpoint once a reader started: `AT_TIMESTAMP:<unix millis>`.
pub const AT_TIMESTAMP_PREFIX: &str = "AT_TIMESTAMP:";

/// `LATEST` pinned to `now`: reading starts at the records Kinesis received from then on
/// (`AT_TIMESTAMP`, compared with each record's arrival time, so this relies on the worker's
/// clock agreeing with Kinesis', as NTP keeps it).
fn pinned_latest(now: std::time::SystemTime) -> String {
    let millis = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{AT_TIMESTAMP_PREFIX}{millis}")
}

/// A pinned time further ahead of this worker's clock than this is pinned again to now.
const PIN_AHEAD_LIMIT_MS: i64 = 60_000;

/// The time of a pinned `LATEST` checkpoint.
fn pinned_millis(checkpoint: &str) -> Option<i64> {
    let digits = checkpoint.strip_prefix(AT_TIMESTAMP_PREFIX)?;
    (!digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// Why a checkpoint cannot be a reading position, if it cannot (checked before any call).
pub fn invalid_checkpoint(checkpoint: &str) -> Option<String> {
    let ok = matches!(checkpoint, TRIM_HORIZON | LATEST)
        || pinned_millis(checkpoint).is_some()
        || (!checkpoint.is_empty()
            && checkpoint.len() <= 128
            && checkpoint.bytes().all(|b| b.is_ascii_digit()));
    (!ok).then(|| format!("checkpoint {checkpoint:?} is not a sequence number"))
}

/// Reads `held`'s shard until stopped, lost, fenced or finished.
pub async fn consume(
    ctx: Arc<Context>,
    store: LeaseStore,
    held: Held,
    stop: CancellationToken,
) -> ConsumerExit {
    let me = ctx.state.settings.worker_id.clone();
    let shard = held.shard_id.clone();
    let tuning = ctx.consumer_tuning;
    let mut last_processed: Option<String> = None;
    let mut since_checkpoint: u64 = 0;
    let mut last_checkpoint_at = Instant::now();
    // Failed Kinesis calls back off from 1 s to 10 s (with jitter): hundreds of consumers of
    // one worker must not hammer a throttled or overloaded endpoint together.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    let mut invalid_attempts = 0;
    let mut idle_streak: u32 = 0;
    let mut previous_read_had_records = false;
    let mut iterator: Option<String> = None;
    let mut fence = ctx.state.fence();

    if let Some(reason) = invalid_checkpoint(&held.checkpoint) {
        return unreadable(&store, &held, &me, reason).await;
    }

    // Where reading starts: the checkpoint, except that `LATEST` is pinned to a time first, so
    // that whoever reads this shard after this reader (a hand-off, a crash) starts where this
    // one did, not at a later tip.
    let mut start_at = held.checkpoint.clone();
    if held.checkpoint == LATEST {
        // Nothing is read before the pin is stored: reading from an unrecorded tip would let
        // a successor start at a later one and skip what came between.
        let pinned = pinned_latest(std::time::SystemTime::now());
        loop {
            if stop.is_cancelled() {
                return ConsumerExit::Stopped {
                    last_processed: None,
                };
            }
            if !ctx.state.may_process_in(held.fence_epoch) {
                return ConsumerExit::Fenced {
                    last_processed: None,
                };
            }
            match store.checkpoint(&held, &me, &pinned).await {
                Ok(()) => break,
                Err(e) if e.is_condition_failed() => return ConsumerExit::Lost,
                Err(e) => {
                    tracing::warn!(shard = %shard, error = %e, "cannot pin LATEST to a time yet");
                    pause(backoff.next_wait(), &stop, &mut fence).await;
                }
            }
        }
        backoff.reset();
        start_at = pinned;
    }
    loop {
        if stop.is_cancelled() {
            return ConsumerExit::Stopped { last_processed };
        }
        if !ctx.state.may_process_in(held.fence_epoch) {
            return ConsumerExit::Fenced { last_processed };
        }
        let it = match iterator.take() {
            Some(it) => it,
            None => match iterator_at(&ctx, &shard, last_processed.as_deref().unwrap_or(&start_at))
                .await
            {
                Ok(Some(it)) => it,
                Ok(None) => {
                    // No iterator: the shard is closed and fully read.
                    return finish(&ctx, &store, &held, &me, last_processed, &stop).await;
                }
                Err(e @ (AwsError::Invalid { .. } | AwsError::NotFound { .. })) => {
                    // A pinned time "in the future" (this worker's clock ahead of Kinesis')
                    // becomes valid as time passes: wait, never give the shard up for it.
                    // One beyond this worker's own clock (written by hand, or a clock that
                    // stepped back) is not waited for: pinned again to now.
                    if matches!(e, AwsError::Invalid { .. })
                        && last_processed.is_none()
                        && let Some(at) = pinned_millis(&start_at)
                    {
                        let now = pinned_latest(std::time::SystemTime::now());
                        if pinned_millis(&now).is_some_and(|now| at > now + PIN_AHEAD_LIMIT_MS) {
                            match store.checkpoint(&held, &me, &now).await {
                                Ok(()) => start_at = now,
                                Err(e) if e.is_condition_failed() => return ConsumerExit::Lost,
                                Err(_) => {}
                            }
                        }
                        tracing::warn!(shard = %shard, error = %e, "pinned LATEST refused; retrying");
                        ctx.state.read_failed(&shard, e.to_string());
                        pause(backoff.next_wait(), &stop, &mut fence).await;
                        continue;
                    }
                    invalid_attempts += 1;
                    if invalid_attempts >= INVALID_ATTEMPTS {
                        return unreadable(&store, &held, &me, e.to_string()).await;
                    }
                    pause(backoff.next_wait(), &stop, &mut fence).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(shard = %shard, error = %e, "GetShardIterator failed");
                    ctx.state.read_failed(&shard, e.to_string());
                    // A stop during the pause is seen at the top of the loop.
                    pause(backoff.next_wait(), &stop, &mut fence).await;
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
                backoff.reset();
                invalid_attempts = 0;
                ctx.state.read_ok(&shard);
                out
            }
            Err(e) => {
                // Throttling, outages: back off, then read on with the same iterator (valid
                // for 5 minutes). An expired or refused one: start again from the last
                // processed record.
                tracing::debug!(shard = %shard, error = %e, "GetRecords failed");
                ctx.state.read_failed(&shard, e.to_string());
                if e.is_transient() && !e.to_string().contains("ExpiredIterator") {
                    iterator = Some(it);
                }
                pause(backoff.next_wait(), &stop, &mut fence).await;
                continue;
            }
        };
        let records = out.records();
        if !records.is_empty() {
            // A busy shard (records in two reads in a row) is read at full pace again; a
            // sparse one (a record now and then) keeps its idle pace, or a few records per
            // minute on hundreds of shards would keep Kinesis as busy as a full stream.
            if previous_read_had_records {
                idle_streak = 0;
            }
            // The fence and a stop are checked right before the side effect: a batch that
            // arrives after either is not processed (a successor may already read it).
            if !ctx.state.may_process_in(held.fence_epoch) {
                return ConsumerExit::Fenced { last_processed };
            }
            if stop.is_cancelled() {
                return ConsumerExit::Stopped { last_processed };
            }
            ctx.state
                .counting
                .process(&me, &shard, held.counter, records);
            if let Some(p) = &ctx.processor {
                p.process(&me, &shard, held.counter, records);
            }
            last_processed = records.last().map(|r| r.sequence_number().to_owned());
            since_checkpoint += records.len() as u64;
        }
        let due = since_checkpoint >= tuning.checkpoint_every_records
            || (since_checkpoint > 0 && last_checkpoint_at.elapsed() >= tuning.checkpoint_every);
        if due && let Some(seq) = &last_processed {
            match store.checkpoint(&held, &me, seq).await {
                Ok(()) => {
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
                return finish(&ctx, &store, &held, &me, last_processed, &stop).await;
            }
            Some(next) => iterator = Some(next.to_owned()),
        }
        if !ctx.reading && records.is_empty() {
            // kds-swarm: the shard is open and caught up; hold the lease without polling it.
            // A fence stops it like a reader.
            tokio::select! {
                _ = stop.cancelled() => return ConsumerExit::Stopped { last_processed },
                _ = fence.wait_for(|fenced| *fenced) => {
                    return ConsumerExit::Fenced { last_processed };
                }
            }
        }
        let behind = out.millis_behind_latest().unwrap_or(0);
        previous_read_had_records = !records.is_empty();
        let wait = if records.is_empty() {
            // An idle shard is polled less often the longer it stays idle (up to
            // `idle_poll_max`): hundreds of idle shards must not keep Kinesis busy.
            idle_streak = idle_streak.saturating_add(1);
            tuning
                .idle_wait
                .saturating_mul(idle_streak)
                .min(tuning.idle_poll_max)
        } else if behind > 0 {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(500)
        };
        pause(wait, &stop, &mut fence).await;
    }
}

/// Records why the shard cannot be read (conditional on still holding it) and ends.
async fn unreadable(store: &LeaseStore, held: &Held, me: &str, reason: String) -> ConsumerExit {
    tracing::warn!(shard = %held.shard_id, checkpoint = %held.checkpoint, %reason, "shard cannot be read from its checkpoint; not counted as covered");
    match store.mark_unreadable(held, me, &reason).await {
        Err(e) if e.is_condition_failed() => ConsumerExit::Lost,
        _ => ConsumerExit::Unreadable { reason },
    }
}

/// Writes `SHARD_END` and gives the lease up in one conditional write, retrying with bounded
/// backoff while DynamoDB fails; a stop or the fence ends the retries (the next owner then
/// reads the empty rest of the shard again and writes `SHARD_END` itself).
async fn finish(
    ctx: &Context,
    store: &LeaseStore,
    held: &Held,
    me: &str,
    last_processed: Option<String>,
    stop: &CancellationToken,
) -> ConsumerExit {
    let shard = &held.shard_id;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut fence = ctx.state.fence();
    loop {
        if !ctx.state.may_process_in(held.fence_epoch) {
            return ConsumerExit::Fenced { last_processed };
        }
        match store
            .give_up(shard, Some(held.counter), me, None, Some(SHARD_END))
            .await
        {
            Ok(()) => {
                tracing::info!(shard = %shard, "shard read to its end; children may start");
                return ConsumerExit::ShardEnd;
            }
            Err(e) if e.is_condition_failed() => return ConsumerExit::Lost,
            Err(e) => {
                tracing::warn!(shard = %shard, error = %e, "cannot write SHARD_END; retrying");
            }
        }
        if stop.is_cancelled() {
            return ConsumerExit::Stopped { last_processed };
        }
        pause(backoff.next_wait(), stop, &mut fence).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_positions_or_refused() {
        assert_eq!(invalid_checkpoint(TRIM_HORIZON), None);
        assert_eq!(invalid_checkpoint(LATEST), None);
        let pinned = pinned_latest(std::time::UNIX_EPOCH + Duration::from_secs(1_000));
        assert_eq!(pinned, "AT_TIMESTAMP:1000000");
        assert_eq!(invalid_checkpoint(&pinned), None);
        assert_eq!(pinned_millis(&pinned), Some(1_000_000));
        assert!(invalid_checkpoint("AT_TIMESTAMP:").is_some());
        assert!(invalid_checkpoint("AT_TIMESTAMP:soon").is_some());
        assert_eq!(
            invalid_checkpoint("49590338271490256608559692538361571095921575989136588898"),
            None
        );
        assert!(invalid_checkpoint("").is_some());
        assert!(invalid_checkpoint("AT_TIMESTAMP").is_some());
        assert!(invalid_checkpoint(SHARD_END).is_some());
        assert!(invalid_checkpoint(&"9".repeat(129)).is_some());
    }
}
