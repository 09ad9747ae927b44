//! The lease loop: each worker's side of the lease protocol. A round reads only its own
//! leases (the `leaseOwner` index), acts on what the coordinator asked (hand a lease over, give
//! it up), gives up what lies above the published limit, and acquires (a conditional write)
//! each lease it owns but does not read yet before starting its consumer.
//!
//! Who gets which lease is decided by the coordinator alone ([`crate::assignment`]), so a
//! round costs this worker one Query of its own leases, not a scan of the table; and a
//! follower queries only when something may have changed for it ([`lease_query_due`]): the
//! coordinator stamps a lease generation on its item, which followers read every heartbeat
//! anyway, whenever an owner changed or was asked to move. In steady state a follower's
//! rounds cost nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::assignment;
use crate::config::SETTLING_INTERVAL_MIN;
use crate::consumer::{ConsumerExit, consume};
use crate::context::{Context, ticker};
use crate::leases::{Held, Lease, LeaseStore, Pending};
use crate::meta::LeaseStamp;
use crate::metrics::{OperationLabels, ReasonLabels};
use crate::state::Role;

/// How long a lease that could not be read waits before this worker tries it again (an
/// operator may have repaired its checkpoint meanwhile).
pub const UNREADABLE_RETRY: Duration = Duration::from_secs(30);

/// Acquire writes a worker keeps in flight at once.
const ACQUIRES_IN_FLIGHT: usize = 4;

/// Leases a worker starts reading per round: a worker given 80 leases at once starts them over
/// a few rounds instead of opening 80 shard iterators in the same instant (the KCL, too,
/// takes a bounded number of leases per cycle).
pub const MAX_ACQUIRES_PER_ROUND: usize = 16;

struct Running {
    held: Held,
    stop: CancellationToken,
    handle: Option<JoinHandle<ConsumerExit>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // A crashed (aborted) worker must not leave consumers reading.
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

impl Running {
    fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Asks the consumer to stop after its current batch and waits for its exit.
    async fn stop(mut self) -> (Held, ConsumerExit) {
        self.stop.cancel();
        let exit = match self.handle.take() {
            Some(h) => h.await.unwrap_or(ConsumerExit::Lost),
            None => ConsumerExit::Lost,
        };
        (self.held.clone(), exit)
    }

    /// Stops at once, without a final checkpoint (the lease is gone, or we are fenced).
    fn abort(self) {
        drop(self);
    }
}

/// A lease whose consumer stopped for a hand-off that could not be written yet: its checkpoint
/// is written before anything else happens to the lease.
struct Parked {
    counter: u64,
    checkpoint: String,
}

/// What this worker gives a lease up with.
struct GiveUp<'a> {
    shard_id: &'a str,
    /// The counter the item should still have: the consumer's acquire, or as seen.
    counter: Option<u64>,
    to: Option<&'a str>,
    checkpoint: Option<String>,
    kind: &'static str,
}

/// Short, fixed reason labels for the unreadable-lease metric.
fn reason_label(reason: &str) -> &'static str {
    if reason.contains("not a sequence number") {
        "invalid_checkpoint"
    } else if reason.contains("not found") {
        "shard_not_found"
    } else {
        "invalid_argument"
    }
}

/// After reading its leases, a worker waits at least this many times the Query's duration
/// before its next scheduled round.
const QUERY_PAUSES: u32 = 2;

/// Reads a worker makes, quicker than its settling reads, after its first limit while it has
/// no lease yet. The coordinator publishes a limit before it assigns under it, in the same
/// round, so a worker that has just learnt its first limit is usually given its leases a
/// moment later; at a long heartbeat the settling reads alone would find them up to a quarter
/// heartbeat later (3.75 s at 15 s). Once per start: a bounded burst, not a cadence.
pub const FIRST_LEASE_READS: u32 = 3;

/// The gap before the next read while a worker waits for its first leases, `done` of the
/// [`FIRST_LEASE_READS`] made: [`SETTLING_INTERVAL_MIN`] doubled at each read, never above
/// `settling_interval`; `None` once they are all made (the settling reads go on).
pub fn first_lease_gap(done: u32, settling_interval: Duration) -> Option<Duration> {
    (done < FIRST_LEASE_READS).then(|| {
        SETTLING_INTERVAL_MIN
            .saturating_mul(1 << done.min(16))
            .min(settling_interval)
    })
}

/// What decides whether a round reads this worker's leases (see [`lease_query_due`]).
#[derive(Debug, Clone, Copy)]
pub struct QueryInputs {
    /// This worker coordinates: it learns of changes from its own scans, not from a stamp.
    pub coordinating: bool,
    /// How long ago the last successful query was sent, and the lease stamp seen then
    /// (`None`: no query succeeded yet).
    pub last_query: Option<(Duration, Option<LeaseStamp>)>,
    /// The coordinator item's lease stamp as last looked at (`None`: no fresh look, or no
    /// stamp of the item's own epoch).
    pub stamp: Option<LeaseStamp>,
    /// Within the settling window after a change (a new limit, a new stamp, leases it
    /// assigned to itself as coordinator), or within a window of expected changes (a silent
    /// worker's verdict or a takeover due: see `WorkerState::expect_lease_changes`).
    pub settling: bool,
    /// Work of its own the next round finishes: a consumer ended, a checkpoint parked or
    /// draining, leases above the limit, leases it owns but has not acquired yet, an
    /// unreadable lease due to be tried again, the fence just moved.
    pub unfinished: bool,
    /// `Settings::stamp_refresh_interval`.
    pub refresh: Duration,
}

/// Whether this round reads the worker's own leases. Everything a follower's query can show
/// that is new was written or seen by the coordinator, which moves the stamp after such a
/// round (after its writes): a stamp equal to the one seen before the last query means
/// nothing changed for anyone as of the coordinator's last full round (a round that fails takes
/// the stamp off, and so does a step-down). Anything else reads: no query yet, no stamp of this
/// term (no coordinator, one that has not stamped yet, or a binary that does not), a new
/// stamp, settling, work of its own, and at least every `refresh` whatever the stamp says.
///
/// Reading less never makes a shard read twice: what keeps one reader per shard is the
/// fence and the conditional checkpoints, not this query.
pub fn lease_query_due(i: QueryInputs) -> bool {
    let Some((since, stamp_then)) = i.last_query else {
        return true;
    };
    i.coordinating
        || i.settling
        || i.unfinished
        || since >= i.refresh
        || i.stamp.is_none()
        || i.stamp != stamp_then
}

pub async fn lease_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let s = &ctx.state.settings;
    let me = s.worker_id.clone();
    let store = LeaseStore::new(ctx.aws.clone(), s.lease_table());
    let mut consumers: BTreeMap<String, Running> = BTreeMap::new();
    // Consumers stopped by the fence, still writing their last checkpoint: their shards are
    // not acquired again until they are done.
    let mut draining: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    let mut parked: BTreeMap<String, Parked> = BTreeMap::new();
    let mut unreadable: BTreeMap<String, (String, Instant)> = BTreeMap::new();
    // Since when this worker holds more than the published limit.
    let mut over_limit_since: Option<Instant> = None;
    // One round per heartbeat (which queries only when `lease_query_due`); also at once when
    // the fence changes, a new limit arrives or a look shows a new lease stamp, and every
    // `settling_interval` for a `settling_window` after a new limit or stamp (the leases they
    // bring are assigned, or handed over, within the next rounds of the coordinator and of
    // the other workers) or after this worker's coordinator assigned leases to it, and
    // within each window of expected changes (a verdict or a takeover due).
    let mut tick = ticker(s.heartbeat_interval);
    let mut settle_until: Option<Instant> = None;
    let mut fence = ctx.state.fence();
    let mut fence_moved = false;
    // Looks at the coordinator item: a new lease stamp wakes a round.
    let mut looks = ctx.state.coordinator_reads();
    // When leases are likely to move (a verdict or a takeover due): rounds every settling
    // interval within that window.
    let mut expected = ctx.state.expected_lease_changes();
    let mut last_stamp: Option<LeaseStamp> = None;
    let mut last_query: Option<(Instant, Option<LeaseStamp>)> = None;
    // Until its first leases after its first limit: how many quick reads were made (see
    // `FIRST_LEASE_READS`); `None` before the first limit and once they are over.
    let mut first_reads: Option<u32> = None;
    let mut had_limit = false;
    // Work of its own left for the next query: leases owned but not acquired (over the
    // per-round bound, or a write that failed), a hand-off or release that could not be
    // written, a drain that ended, a query that failed.
    let mut retry = false;
    loop {
        let window_opens = expected
            .borrow()
            .iter()
            .flatten()
            .map(|(from, _)| *from)
            .filter(|from| *from > Instant::now())
            .min();
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            // A new window: its start is waited for from the next turn.
            Ok(()) = expected.changed() => {
                expected.borrow_and_update();
            }
            _ = tokio::time::sleep_until(window_opens.unwrap_or_else(Instant::now)), if window_opens.is_some() => {}
            // Fence raised (stop now) or lowered (the first heartbeat, or the end of an
            // outage: resume now), not at the next round.
            _ = fence.changed() => fence_moved = true,
            // A new lease stamp: the coordinator changed (or saw a change of) who owns what.
            // Read now, and every settling interval for a while (the index may lag behind the
            // writes; a hand-off asked for lands when its giver acts).
            Ok(()) = looks.changed() => {
                // A failed look (or a stamp of an earlier term) is no news: only a stamp
                // different from the last one seen starts the settling reads.
                let stamp = looks.borrow_and_update().and_then(|(seen, _)| seen.lease_generation());
                if stamp.is_some() && stamp != last_stamp {
                    settle_until = Some(Instant::now() + s.settling_window());
                    last_stamp = stamp;
                }
            }
            // A new limit (the first one at start, a lower one after a scale-up): obey it now.
            _ = ctx.state.limit_changed.notified() => {
                settle_until = Some(Instant::now() + s.settling_window());
                if !had_limit {
                    had_limit = true;
                    // The coordinator's own worker queries every round and is woken when it
                    // assigns itself leases.
                    first_reads = (consumers.is_empty()
                        && ctx.state.role().0 != Role::Coordinator)
                        .then_some(0);
                }
            }
            // This worker, as coordinator, just assigned leases to itself (the index it
            // queries may not show them yet: the settling reads look again soon).
            _ = ctx.state.leases_assigned.notified() => {
                settle_until = Some(Instant::now() + s.settling_window());
            }
        }
        ctx.state.loop_went_round(crate::state::Loop::Lease);
        // A drain that ended leaves a lease this worker may read again (its fence has dropped
        // since, or it is handed on): the next query finds it.
        let drains = draining.len();
        draining.retain(|_, h| !h.is_finished());
        retry |= draining.len() < drains;

        // Consumers that ended by themselves (shard end, lost lease, fenced, unreadable).
        let ended: Vec<String> = consumers
            .iter()
            .filter(|(_, r)| r.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        let any_ended = !ended.is_empty();
        for id in ended {
            if let Some(r) = consumers.remove(&id) {
                let (held, exit) = r.stop().await;
                tracing::debug!(shard = %id, ?exit, "consumer ended");
                note_exit(&ctx, &id, &exit, &mut unreadable);
                park_fenced(&mut parked, &held, &exit);
            }
        }

        if !ctx.state.may_process() {
            if !consumers.is_empty() {
                tracing::warn!(
                    leases = consumers.len(),
                    "heartbeat not renewed in time: stopping every consumer before anyone may take over"
                );
                for (id, r) in std::mem::take(&mut consumers) {
                    // Each consumer stops before its next batch (it sees the fence too); its
                    // progress is then checkpointed, conditional on the counter it acquired,
                    // so a successor's take makes the write fail and nothing is overwritten.
                    r.stop.cancel();
                    let (store, me) = (store.clone(), me.clone());
                    let bound = s.heartbeat_interval * 2;
                    draining.insert(
                        id,
                        tokio::spawn(
                            async move {
                                let (held, exit) = r.stop().await;
                                if let ConsumerExit::Fenced {
                                    last_processed: Some(cp),
                                }
                                | ConsumerExit::Stopped {
                                    last_processed: Some(cp),
                                } = exit
                                {
                                    let _ = tokio::time::timeout(
                                        bound,
                                        store.checkpoint(&held, &me, &cp),
                                    )
                                    .await;
                                }
                            }
                            .in_current_span(),
                        ),
                    );
                }
            }
            ctx.state.set_leases(Vec::new());
            continue;
        }

        let now = Instant::now();
        let settling = settle_until.is_some_and(|until| now < until)
            || expected
                .borrow()
                .iter()
                .flatten()
                .any(|(from, until)| *from <= now && now < *until);
        let fresh_look = looks
            .borrow()
            .filter(|(_, read_at)| now.duration_since(*read_at) <= s.heartbeat_interval * 2);
        let stamp = fresh_look.and_then(|(seen, _)| seen.lease_generation());
        let due = lease_query_due(QueryInputs {
            coordinating: ctx.state.role().0 == Role::Coordinator,
            last_query: last_query.map(|(at, stamp)| (now.duration_since(at), stamp)),
            stamp,
            settling,
            unfinished: std::mem::take(&mut fence_moved)
                || std::mem::take(&mut retry)
                || !parked.is_empty()
                || !draining.is_empty()
                || over_limit_since.is_some()
                || unreadable.values().any(|(_, retry_at)| *retry_at <= now)
                || any_ended,
            refresh: s.stamp_refresh_interval(),
        });
        if !due {
            report_round(&ctx, &consumers, &unreadable);
            continue;
        }

        let query_began = Instant::now();
        let owned = store.owned_by(&me).await;
        // A slow Query (a loaded table) spaces the rounds out: the next one waits at least
        // twice as long as this one took, so this worker keeps DynamoDB busy at most a third
        // of the time.
        let pause = query_began.elapsed() * QUERY_PAUSES;
        // A failed read counts as one of the first-lease reads; a read that finds leases ends
        // them.
        let found = matches!(&owned, Ok(v) if !v.is_empty());
        let first_gap = first_reads
            .filter(|_| !found)
            .and_then(|done| first_lease_gap(done, s.settling_interval()));
        first_reads = first_gap.and(first_reads.map(|done| done + 1));
        if settling {
            tick.reset_after(pause.max(first_gap.unwrap_or(s.settling_interval())));
        } else if pause > s.heartbeat_interval {
            tick.reset_after(pause);
        }
        let owned = match owned {
            Ok(v) => {
                last_query = Some((query_began, stamp));
                v
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this worker's leases this round");
                retry = true;
                continue;
            }
        };
        // Fenced while this round read the table: change and start nothing.
        if !ctx.state.may_process() {
            continue;
        }
        let listed: BTreeSet<&str> = owned.iter().map(|l| l.shard_id.as_str()).collect();

        // A consumer whose lease the index no longer lists: the index lags behind writes, so
        // a consistent read decides. Lost means stop at once (someone else may read it now).
        let unlisted: Vec<String> = consumers
            .keys()
            .filter(|k| !listed.contains(k.as_str()))
            .cloned()
            .collect();
        for id in unlisted {
            let counter = consumers[&id].held.counter;
            match store.get(&id).await {
                Ok(Some(l))
                    if l.owner.as_deref() == Some(me.as_str()) && l.counter == Some(counter) => {}
                Ok(_) => {
                    if let Some(r) = consumers.remove(&id) {
                        if r.is_finished() {
                            // It ended by itself (shard end) since the round began.
                            let (_, exit) = r.stop().await;
                            note_exit(&ctx, &id, &exit, &mut unreadable);
                        } else {
                            tracing::warn!(shard = %id, "lease no longer ours; consumer stopped");
                            r.abort();
                        }
                    }
                }
                // Cannot tell: the consumer's own conditional checkpoint will.
                Err(e) => tracing::debug!(shard = %id, error = %e, "cannot confirm a lease"),
            }
        }

        // Checkpoints of stopped consumers whose hand-off could not be written last round.
        let mut stuck: BTreeSet<String> = BTreeSet::new();
        for (id, p) in std::mem::take(&mut parked) {
            let held = Held {
                shard_id: id.clone(),
                counter: p.counter,
                checkpoint: p.checkpoint.clone(),
                fence_epoch: 0,
            };
            match store.checkpoint(&held, &me, &p.checkpoint).await {
                Ok(()) => {}
                Err(e) if e.is_condition_failed() => {}
                Err(e) => {
                    tracing::warn!(shard = %id, error = %e, "cannot write a stopped consumer's checkpoint; will retry");
                    stuck.insert(id.clone());
                    parked.insert(id, p);
                }
            }
        }

        // What the coordinator asked for: hand over, or give up, after the last checkpoint.
        // Every consumer concerned is asked to stop first, so they stop together.
        for l in owned.iter().filter(|l| l.pending.is_some()) {
            if let Some(r) = consumers.get(&l.shard_id) {
                r.stop.cancel();
            }
        }
        for l in owned
            .iter()
            .filter(|l| !stuck.contains(&l.shard_id) && !draining.contains_key(&l.shard_id))
        {
            let Some(pending) = &l.pending else { continue };
            let (to, kind) = match pending {
                Pending::HandOff(to) => (Some(to.as_str()), "transfer"),
                Pending::Release => (None, "release"),
            };
            retry |= give_up(
                &ctx,
                &store,
                &me,
                &mut consumers,
                &mut parked,
                &mut unreadable,
                l,
                to,
                kind,
            )
            .await;
        }

        let Some(limit) = ctx.state.limit().map(|l| l.max_leases_per_worker) else {
            // No published limit yet: hold nothing new.
            ctx.state
                .lease_round_done(consumers.keys().cloned().collect(), BTreeMap::new());
            continue;
        };

        // Above the published limit (a lower limit, or two views of who died). The coordinator
        // asks for direct hand-offs (no unowned gap) within its next rounds; what it has not
        // asked for within the failover timeout (no coordinator, or one that cannot write) is
        // given up here.
        let excess = assignment::excess(&owned, limit);
        ctx.state
            .metrics
            .lease_limit_overrun
            .set(excess.len() as i64);
        let now = Instant::now();
        if !excess.is_empty() && over_limit_since.is_none() {
            // Given more than the limit this worker holds: usually a higher limit, published
            // before the assignment, that its next look would show. Read it now.
            ctx.state.limit_check.notify_one();
        }
        over_limit_since = if excess.is_empty() {
            None
        } else {
            Some(over_limit_since.unwrap_or(now))
        };
        let mut giving_up: BTreeSet<&str> = BTreeSet::new();
        if over_limit_since.is_some_and(|t| now.duration_since(t) >= s.failover_timeout) {
            for id in &excess {
                let Some(l) = owned.iter().find(|l| &l.shard_id == id) else {
                    continue;
                };
                if stuck.contains(id) || draining.contains_key(id) {
                    continue;
                }
                tracing::info!(shard = %id, limit, "above the published limit: giving a lease up");
                retry |= give_up(
                    &ctx,
                    &store,
                    &me,
                    &mut consumers,
                    &mut parked,
                    &mut unreadable,
                    l,
                    None,
                    "excess",
                )
                .await;
                giving_up.insert(id.as_str());
            }
        }

        // Leases this worker owns and does not read yet (given by the coordinator, handed
        // over by another worker, or still ours after a restart or a fence): acquire each
        // with a conditional write before reading it, within the limit.
        unreadable.retain(|id, _| listed.contains(id.as_str()));
        let mut to_acquire: Vec<&Lease> = Vec::new();
        for l in &owned {
            let id = l.shard_id.as_str();
            if l.pending.is_some()
                || consumers.contains_key(id)
                || draining.contains_key(id)
                || giving_up.contains(id)
                || stuck.contains(id)
                || unreadable
                    .get(id)
                    .is_some_and(|(_, retry_at)| *retry_at > now)
            {
                continue;
            }
            if l.is_finished() {
                // Read to its end but still marked as ours: done, let it go.
                retry |= give_up(
                    &ctx,
                    &store,
                    &me,
                    &mut consumers,
                    &mut parked,
                    &mut unreadable,
                    l,
                    None,
                    "shard_end",
                )
                .await;
                continue;
            }
            to_acquire.push(l);
        }
        let room = (limit as usize).saturating_sub(consumers.len());
        let wanted = to_acquire.len();
        to_acquire.truncate(room.min(MAX_ACQUIRES_PER_ROUND));
        // Held back by the per-round bound (not by the limit: a lower limit is its own work).
        retry |= wanted > to_acquire.len() && room > MAX_ACQUIRES_PER_ROUND;
        // A few at a time (each is its own conditional write): a worker given 80 leases must
        // not queue 80 writes ahead of every other worker's heartbeat.
        let mut acquired = Vec::with_capacity(to_acquire.len());
        // Captured before any acquire is sent: a fence in between invalidates them all.
        let epoch = ctx.state.reading_epoch();
        if let Some(epoch) = epoch {
            for chunk in to_acquire.chunks(ACQUIRES_IN_FLIGHT) {
                if !ctx.state.may_process_in(epoch) {
                    break;
                }
                acquired.extend(
                    futures::future::join_all(chunk.iter().map(|l| store.acquire(l, &me, epoch)))
                        .await,
                );
            }
        }
        for (l, result) in to_acquire.iter().zip(acquired) {
            let id = l.shard_id.as_str();
            match result {
                // Fenced since the acquires were sent: the lease stays ours, acquired again
                // (and read) after the fence drops.
                Ok(held) if !ctx.state.may_process_in(held.fence_epoch) => {}
                Ok(held) => {
                    tracing::info!(shard = %id, counter = held.counter, "acquired lease; reading");
                    // Repaired by hand (or readable again): it is read, not reported. If the
                    // checkpoint still cannot be read, the consumer reports it again.
                    if crate::consumer::invalid_checkpoint(&held.checkpoint).is_none() {
                        unreadable.remove(id);
                    }
                    start(&ctx, &store, held, &mut consumers);
                }
                // The index may have listed an older counter of a lease still ours: look again.
                Err(e) if e.is_condition_failed() => {
                    retry = true;
                    tracing::debug!(shard = %id, "lease moved on before it was acquired");
                }
                Err(e) => {
                    retry = true;
                    tracing::warn!(shard = %id, error = %e, "cannot acquire lease");
                }
            }
        }
        report_round(&ctx, &consumers, &unreadable);
    }

    // Graceful shutdown: stop every consumer at once, then checkpoint and give every lease
    // back so others take them without waiting for the failover timeout.
    let stopping = std::mem::take(&mut consumers).into_values().map(|r| {
        let store = store.clone();
        let me = me.clone();
        async move {
            let (held, exit) = r.stop().await;
            if let ConsumerExit::Stopped { last_processed } = exit
                && let Err(e) = store
                    .give_up(&held.shard_id, Some(held.counter), &me, None, last_processed.as_deref())
                    .await
                && !e.is_condition_failed()
            {
                tracing::warn!(shard = %held.shard_id, error = %e, "cannot release lease on shutdown");
            }
        }
    });
    futures::future::join_all(stopping).await;
    // Leases given to this worker that it had not started yet, and stopped consumers' parked
    // checkpoints.
    if ctx.state.may_process()
        && let Ok(owned) = store.owned_by(&me).await
    {
        for l in owned {
            let checkpoint = parked.remove(&l.shard_id).map(|p| p.checkpoint);
            let _ = store
                .give_up(&l.shard_id, l.counter, &me, None, checkpoint.as_deref())
                .await;
        }
    }
    ctx.state.set_leases(Vec::new());
}

/// Publishes what this worker reads after a round (and the unreadable-lease metric).
fn report_round(
    ctx: &Context,
    consumers: &BTreeMap<String, Running>,
    unreadable: &BTreeMap<String, (String, Instant)>,
) {
    ctx.state.metrics.unreadable_leases.clear();
    for (reason, _) in unreadable.values() {
        ctx.state
            .metrics
            .unreadable_leases
            .get_or_create(&ReasonLabels {
                reason: reason_label(reason),
            })
            .inc();
    }
    ctx.state.lease_round_done(
        consumers
            .iter()
            .filter(|(_, r)| !r.is_finished() && ctx.state.may_process())
            .map(|(k, _)| k.clone())
            .collect(),
        unreadable
            .iter()
            .map(|(k, (reason, _))| (k.clone(), reason.clone()))
            .collect(),
    );
}

/// A consumer that stopped at the fence keeps what it processed: its checkpoint is written
/// (conditional on its acquired counter) at the next round, before the lease is acquired or
/// handed on.
fn park_fenced(parked: &mut BTreeMap<String, Parked>, held: &Held, exit: &ConsumerExit) {
    if let ConsumerExit::Fenced {
        last_processed: Some(cp),
    } = exit
    {
        parked.insert(
            held.shard_id.clone(),
            Parked {
                counter: held.counter,
                checkpoint: cp.clone(),
            },
        );
    }
}

fn note_exit(
    ctx: &Context,
    id: &str,
    exit: &ConsumerExit,
    unreadable: &mut BTreeMap<String, (String, Instant)>,
) {
    match exit {
        ConsumerExit::Unreadable { reason } => {
            unreadable.insert(
                id.to_owned(),
                (reason.clone(), Instant::now() + UNREADABLE_RETRY),
            );
        }
        ConsumerExit::ShardEnd => {
            ctx.state
                .metrics
                .lease_hand_offs
                .get_or_create(&OperationLabels {
                    operation: "shard_end",
                })
                .inc();
        }
        ConsumerExit::Lost => tracing::warn!(shard = %id, "lease lost while reading"),
        ConsumerExit::Stopped { .. } | ConsumerExit::Fenced { .. } => {}
    }
}

/// Stops the consumer of `l` (if any) and, in one conditional write with its last checkpoint,
/// gives the lease to `to` (or to nobody). Nothing is written when the consumer ended because
/// the lease was lost or the worker fenced. True when the write failed for a reason other
/// than its condition: the lease is still this worker's, and the next round tries again.
#[allow(clippy::too_many_arguments)]
#[must_use]
async fn give_up(
    ctx: &Context,
    store: &LeaseStore,
    me: &str,
    consumers: &mut BTreeMap<String, Running>,
    parked: &mut BTreeMap<String, Parked>,
    unreadable: &mut BTreeMap<String, (String, Instant)>,
    l: &Lease,
    to: Option<&str>,
    kind: &'static str,
) -> bool {
    let plan = match consumers.remove(&l.shard_id) {
        Some(r) => {
            let (held, exit) = r.stop().await;
            note_exit(ctx, &l.shard_id, &exit, unreadable);
            match exit {
                ConsumerExit::Stopped { last_processed } => GiveUp {
                    shard_id: &l.shard_id,
                    counter: Some(held.counter),
                    to,
                    checkpoint: last_processed,
                    kind,
                },
                ConsumerExit::Unreadable { .. } => GiveUp {
                    shard_id: &l.shard_id,
                    counter: Some(held.counter),
                    to,
                    checkpoint: None,
                    kind,
                },
                // Fenced: its progress is written (conditionally) before the lease is touched
                // again; lost, or finished (SHARD_END already gave it up): nothing to write.
                exit @ ConsumerExit::Fenced { .. } => {
                    park_fenced(parked, &held, &exit);
                    return false;
                }
                ConsumerExit::Lost | ConsumerExit::ShardEnd => return false,
            }
        }
        None => GiveUp {
            shard_id: &l.shard_id,
            counter: l.counter,
            to,
            checkpoint: None,
            kind,
        },
    };
    if !ctx.state.may_process() {
        return false;
    }
    let result = store
        .give_up(
            plan.shard_id,
            plan.counter,
            me,
            plan.to,
            plan.checkpoint.as_deref(),
        )
        .await;
    match result {
        Ok(()) => {
            ctx.state
                .metrics
                .lease_hand_offs
                .get_or_create(&OperationLabels {
                    operation: plan.kind,
                })
                .inc();
            match plan.to {
                Some(to) => tracing::info!(shard = %plan.shard_id, to = %to, "handed lease off"),
                None => {
                    tracing::info!(shard = %plan.shard_id, reason = plan.kind, "released lease")
                }
            }
            false
        }
        Err(e) => {
            let unwritten = !e.is_condition_failed();
            if unwritten {
                tracing::warn!(shard = %plan.shard_id, error = %e, "cannot hand the lease on; keeping its checkpoint for the next round");
            }
            // Keep what was read: written before the lease is touched again (a refused
            // condition means it is no longer ours and the write will be refused too).
            if let (Some(counter), Some(checkpoint)) = (plan.counter, plan.checkpoint) {
                parked.insert(
                    plan.shard_id.to_owned(),
                    Parked {
                        counter,
                        checkpoint,
                    },
                );
            }
            unwritten
        }
    }
}

fn start(
    ctx: &Arc<Context>,
    store: &LeaseStore,
    held: Held,
    consumers: &mut BTreeMap<String, Running>,
) {
    // A new reader: failures of an earlier one (before a fence, say) are history.
    ctx.state.read_ok(&held.shard_id);
    let stop = CancellationToken::new();
    let id = held.shard_id.clone();
    let handle = tokio::spawn(
        consume(ctx.clone(), store.clone(), held.clone(), stop.clone()).in_current_span(),
    );
    consumers.insert(
        id,
        Running {
            held,
            stop,
            handle: Some(handle),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFRESH: Duration = Duration::from_secs(50);

    #[test]
    fn first_lease_reads_double_from_the_settling_minimum_and_stop() {
        let ms = Duration::from_millis;
        // A 15 s heartbeat (settling reads 3.75 s apart): 250 ms, 500 ms, 1 s, then over.
        let gaps: Vec<Option<Duration>> =
            (0..5).map(|done| first_lease_gap(done, ms(3750))).collect();
        assert_eq!(
            gaps,
            [Some(ms(250)), Some(ms(500)), Some(ms(1000)), None, None]
        );
        // Never further apart than the settling reads themselves (a 2 s heartbeat: 500 ms).
        let gaps: Vec<Option<Duration>> =
            (0..4).map(|done| first_lease_gap(done, ms(500))).collect();
        assert_eq!(gaps, [Some(ms(250)), Some(ms(500)), Some(ms(500)), None]);
        // Any count is safe.
        assert_eq!(first_lease_gap(u32::MAX, ms(500)), None);
    }

    fn stamp(epoch: u64, generation: u64) -> Option<LeaseStamp> {
        Some(LeaseStamp { epoch, generation })
    }

    fn quiet() -> QueryInputs {
        QueryInputs {
            coordinating: false,
            last_query: Some((Duration::from_secs(3), stamp(4, 7))),
            stamp: stamp(4, 7),
            settling: false,
            unfinished: false,
            refresh: REFRESH,
        }
    }

    #[test]
    fn a_follower_queries_only_when_something_may_have_changed() {
        // Steady state: the stamp seen before the last query is still the stamp.
        assert!(!lease_query_due(quiet()));
        // Each reason alone reads.
        type Reason = (&'static str, fn(&mut QueryInputs));
        let reasons: [Reason; 9] = [
            ("first round", |i| i.last_query = None),
            ("coordinating", |i| i.coordinating = true),
            ("settling", |i| i.settling = true),
            ("work of its own", |i| i.unfinished = true),
            ("refresh", |i| i.last_query = Some((REFRESH, stamp(4, 7)))),
            ("no stamp of this term", |i| i.stamp = None),
            ("a new generation", |i| i.stamp = stamp(4, 8)),
            ("a new term", |i| i.stamp = stamp(5, 1)),
            ("no stamp at the last query", |i| {
                i.last_query = Some((Duration::ZERO, None))
            }),
        ];
        for (what, set) in reasons {
            let mut i = quiet();
            set(&mut i);
            assert!(lease_query_due(i), "{what} must read");
        }
        // Every combination of the flags: quiet only when none is set.
        for bits in 0u8..16 {
            let i = QueryInputs {
                coordinating: bits & 1 != 0,
                settling: bits & 2 != 0,
                unfinished: bits & 4 != 0,
                last_query: Some((
                    if bits & 8 != 0 {
                        REFRESH
                    } else {
                        Duration::ZERO
                    },
                    stamp(4, 7),
                )),
                ..quiet()
            };
            assert_eq!(lease_query_due(i), bits != 0, "flags {bits:04b}");
        }
        // Just under the refresh: still quiet.
        let mut i = quiet();
        i.last_query = Some((REFRESH - Duration::from_millis(1), stamp(4, 7)));
        assert!(!lease_query_due(i));
    }
}
