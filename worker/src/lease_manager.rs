//! The lease loop: every round, read the lease table and the heartbeats, plan with
//! [`crate::assignment`], take and hand off leases, and run one consumer per held shard.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;

use crate::assignment::{self, Snapshot};
use crate::consumer::{ConsumerExit, consume};
use crate::election::LivenessTracker;
use crate::leases::{Lease, LeaseStore};
use crate::worker::Context;

/// Leases handed off per round only for evenness (never limits obeying the published limit).
pub const MAX_BALANCE_MOVES_PER_ROUND: usize = 2;

struct Running {
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
    async fn stop(mut self) -> ConsumerExit {
        self.stop.cancel();
        match self.handle.take() {
            Some(h) => h.await.unwrap_or(ConsumerExit::Lost),
            None => ConsumerExit::Lost,
        }
    }

    /// Stops at once, without a final checkpoint (the lease is gone, or we are fenced).
    fn abort(self) {
        drop(self);
    }
}

pub async fn lease_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let s = &ctx.state.settings;
    let me = s.worker_id.clone();
    let store = LeaseStore::new(ctx.aws.clone(), s.lease_table());
    let mut consumers: BTreeMap<String, Running> = BTreeMap::new();
    let mut liveness = LivenessTracker::default();
    // One round per heartbeat: hand-offs transfer ownership directly (no unowned gap), so
    // rounds only bound how soon a receiver starts reading and a dead worker's leases move.
    let mut tick = interval(s.heartbeat_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_unowned_report: Option<(u64, u64)> = None;

    let mut fence = ctx.state.fence();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            // Fence raised (stop now) or lowered (the first heartbeat, or the end of an
            // outage: resume now), not at the next round.
            _ = fence.changed() => {}
            // A new limit (the first one at start, a lower one after a scale-up): obey it now.
            _ = ctx.state.limit_changed.notified() => {}
        }
        ctx.state.beat("lease");

        // Consumers that ended by themselves (shard end, lost lease, fenced).
        let ended: Vec<String> = consumers
            .iter()
            .filter(|(_, r)| r.is_finished())
            .map(|(k, _)| k.clone())
            .collect();
        for id in ended {
            if let Some(r) = consumers.remove(&id) {
                let exit = r.stop().await;
                tracing::debug!(shard = %id, ?exit, "consumer ended");
            }
        }

        if !ctx.state.may_process() {
            if !consumers.is_empty() {
                tracing::warn!(
                    leases = consumers.len(),
                    "heartbeat not renewed in time: stopping every consumer before anyone may take over"
                );
                for (_, r) in std::mem::take(&mut consumers) {
                    r.abort();
                }
            }
            ctx.state.set_leases(Vec::new(), None);
            continue;
        }

        let (leases, rows) = match tokio::try_join!(store.scan(), ctx.meta.scan_heartbeats()) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read leases or heartbeats this round");
                continue;
            }
        };
        let judged = liveness.observe(
            &rows,
            std::iter::empty(),
            Instant::now(),
            s.failover_timeout,
        );
        let mut live: BTreeSet<String> = judged.live.into_iter().collect();
        live.insert(me.clone());

        // Leases whose item no longer names us: lost (taken after we were judged dead, or
        // deleted with their shard). Stop reading them at once.
        let owned_in_table: BTreeSet<&str> = leases
            .iter()
            .filter(|l| l.owner.as_deref() == Some(me.as_str()))
            .map(|l| l.shard_id.as_str())
            .collect();
        let lost: Vec<String> = consumers
            .keys()
            .filter(|k| !owned_in_table.contains(k.as_str()))
            .cloned()
            .collect();
        for id in lost {
            if let Some(r) = consumers.remove(&id) {
                if r.is_finished() {
                    // It ended by itself (shard end) between the reap and the scan.
                    continue;
                }
                tracing::warn!(shard = %id, "lease no longer ours; consumer stopped");
                r.abort();
            }
        }

        let Some(limit) = ctx.state.limit().map(|l| l.max_leases_per_worker) else {
            // No published limit yet: hold nothing new.
            ctx.state
                .set_leases(consumers.keys().cloned().collect(), None);
            continue;
        };
        let snapshot = Snapshot {
            leases: &leases,
            live: &live,
            limit,
        };
        // Fenced while this round read the tables: take and start nothing.
        if !ctx.state.may_process() {
            continue;
        }
        let plan = assignment::plan(&snapshot, &me, MAX_BALANCE_MOVES_PER_ROUND);
        let by_id: BTreeMap<&str, &Lease> =
            leases.iter().map(|l| (l.shard_id.as_str(), l)).collect();

        for id in &plan.release {
            let Some(checkpoint) = stop_for_handoff(&mut consumers, id).await else {
                continue;
            };
            match store.release(id, &me, checkpoint.as_deref()).await {
                Ok(()) => tracing::info!(shard = %id, limit, "released lease"),
                Err(e) if e.is_condition_failed() => {}
                Err(e) => tracing::warn!(shard = %id, error = %e, "cannot release lease"),
            }
        }
        for (id, to) in &plan.hand_off {
            let Some(checkpoint) = stop_for_handoff(&mut consumers, id).await else {
                continue;
            };
            match store.transfer(id, &me, to, checkpoint.as_deref()).await {
                Ok(()) => tracing::info!(shard = %id, to = %to, limit, "handed lease off"),
                Err(e) if e.is_condition_failed() => {}
                Err(e) => tracing::warn!(shard = %id, error = %e, "cannot hand lease off"),
            }
        }

        // Leases the table says are ours but nothing reads (after a restart under the same
        // worker id, or after recovering from a fence).
        let readable = assignment::readable_shards(&leases);
        for id in &owned_in_table {
            if !consumers.contains_key(*id)
                && readable.contains(id)
                && !plan.release.iter().any(|r| r == id)
            {
                let lease = (*by_id[id]).clone();
                start(&ctx, &store, lease, &mut consumers);
            }
        }

        for id in &plan.take {
            let Some(seen) = by_id.get(id.as_str()) else {
                continue;
            };
            match store.take(seen, &me).await {
                Ok(lease) => {
                    match &seen.owner {
                        Some(dead) => {
                            tracing::info!(shard = %id, previous = %dead, "took lease of a dead worker")
                        }
                        None => tracing::info!(shard = %id, "took lease"),
                    }
                    start(&ctx, &store, lease, &mut consumers);
                }
                Err(e) if e.is_condition_failed() => {}
                Err(e) => tracing::warn!(shard = %id, error = %e, "cannot take lease"),
            }
        }

        // Shards nobody may read because every worker is at the cap (the coordinator's
        // capacity_deficit says so); during a rebalance a few are briefly unowned too.
        let owned_by_live = leases
            .iter()
            .filter(|l| readable.contains(l.shard_id.as_str()))
            .filter(|l| l.owner.as_ref().is_some_and(|o| live.contains(o)))
            .count() as u64;
        let unowned = (readable.len() as u64).saturating_sub(owned_by_live);
        let needed = (readable.len() as u64).div_ceil(s.max_leases_cap.max(1));
        let deficit = ctx.state.limit().map_or(0, |l| l.capacity_deficit);
        if deficit > 0 && unowned > 0 {
            if last_unowned_report != Some((unowned, needed)) {
                tracing::warn!(
                    unowned_shards = unowned,
                    workers_needed = needed,
                    capacity_deficit = deficit,
                    "{unowned} shards unowned: every worker is at the cap ({limit}); {needed} workers would cover them"
                );
            }
            last_unowned_report = Some((unowned, needed));
        } else {
            last_unowned_report = None;
        }
        ctx.state.set_leases(
            consumers
                .iter()
                .filter(|(_, r)| !r.is_finished() && ctx.state.may_process())
                .map(|(k, _)| k.clone())
                .collect(),
            Some(crate::state::Coverage {
                readable_shards: readable.len() as u64,
                unowned_shards: unowned,
                workers_needed: needed,
            }),
        );
    }

    // Graceful shutdown: stop every consumer at once, then checkpoint and hand every lease
    // back so others take them without waiting for the failover timeout.
    let stopping = std::mem::take(&mut consumers).into_iter().map(|(id, r)| {
        let store = store.clone();
        let me = me.clone();
        async move {
            if let ConsumerExit::Stopped { last_processed } = r.stop().await
                && let Err(e) = store.release(&id, &me, last_processed.as_deref()).await
                && !e.is_condition_failed()
            {
                tracing::warn!(shard = %id, error = %e, "cannot release lease on shutdown");
            }
        }
    });
    futures::future::join_all(stopping).await;
    ctx.state.set_leases(Vec::new(), None);
}

/// Stops the consumer of `id` (if any) for a hand-off. `Some(checkpoint)` to write with it;
/// `None` when the consumer ended by itself (shard end, lost, fenced): nothing to hand off.
async fn stop_for_handoff(
    consumers: &mut BTreeMap<String, Running>,
    id: &str,
) -> Option<Option<String>> {
    match consumers.remove(id) {
        Some(r) => match r.stop().await {
            ConsumerExit::Stopped { last_processed } => Some(last_processed),
            ConsumerExit::ShardEnd | ConsumerExit::Lost | ConsumerExit::Fenced => None,
        },
        None => Some(None),
    }
}

fn start(
    ctx: &Arc<Context>,
    store: &LeaseStore,
    lease: Lease,
    consumers: &mut BTreeMap<String, Running>,
) {
    let stop = CancellationToken::new();
    let id = lease.shard_id.clone();
    let handle = tokio::spawn(consume(ctx.clone(), store.clone(), lease, stop.clone()));
    consumers.insert(
        id,
        Running {
            stop,
            handle: Some(handle),
        },
    );
}
