//! The coordinator's duties during one term (one epoch): gather the inputs, apply the policy,
//! publish `lease_limits` when something changed.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerCountSource;
use crate::election::LivenessTracker;
use crate::inputs::{list_shards, open_shard_count, watch_desired_replicas};
use crate::leases::LeaseStore;
use crate::policy::{self, FleetInputs};
use crate::store::{LimitRecord, now_iso8601};
use crate::worker::Context;

/// The fields whose change warrants a new `lease_limits` version.
fn same_decision(a: &LimitRecord, b: &LimitRecord) -> bool {
    (
        a.max_leases_per_worker,
        a.shard_count,
        a.worker_count,
        a.desired_workers,
        a.live_workers,
        a.cap,
        a.capacity_deficit,
    ) == (
        b.max_leases_per_worker,
        b.shard_count,
        b.worker_count,
        b.desired_workers,
        b.live_workers,
        b.cap,
        b.capacity_deficit,
    )
}

/// One line a human can read: "max_leases_per_worker 10 -> 20: shards 30 -> 60, workers 3".
pub fn describe_change(old: Option<&LimitRecord>, new: &LimitRecord) -> String {
    fn arrow(old: Option<u64>, new: u64) -> String {
        match old {
            Some(o) if o != new => format!("{o} -> {new}"),
            _ => new.to_string(),
        }
    }
    let mut line = format!(
        "max_leases_per_worker {}: shards {}, workers {}",
        arrow(
            old.map(|o| o.max_leases_per_worker),
            new.max_leases_per_worker
        ),
        arrow(old.map(|o| o.shard_count), new.shard_count),
        arrow(old.map(|o| o.worker_count), new.worker_count),
    );
    if let Some(desired) = new.desired_workers {
        line.push_str(&format!(
            " (desired {}, live {})",
            arrow(old.and_then(|o| o.desired_workers), desired),
            arrow(old.map(|o| o.live_workers), new.live_workers)
        ));
    }
    if new.capacity_deficit > 0 {
        line.push_str(&format!(
            ", capacity deficit {} shards (cap {}: {} workers would cover them)",
            new.capacity_deficit,
            new.cap,
            new.shard_count.div_ceil(new.cap.max(1))
        ));
    }
    line
}

/// Keeps one lease per shard that still needs reading: creates leases for new shards (with
/// their parents, so children wait), deletes leases of shards the stream no longer lists
/// (expired after the retention period). A closed shard keeps its `SHARD_END` lease while it
/// is listed, so a missing lease always means "new", never "finished".
async fn sync_leases(ctx: &Context, store: &LeaseStore) -> Result<(), crate::aws::AwsError> {
    let listed = list_shards(&ctx.aws, &ctx.state.settings.stream_name).await?;
    let leases = store.scan().await?;
    let have: std::collections::BTreeSet<&str> =
        leases.iter().map(|l| l.shard_id.as_str()).collect();
    let listed_ids: std::collections::BTreeSet<&str> =
        listed.iter().map(|sh| sh.shard_id.as_str()).collect();
    let mut created = 0;
    for shard in &listed {
        if !have.contains(shard.shard_id.as_str())
            && store
                .create_if_missing(&shard.shard_id, &shard.parents)
                .await?
        {
            created += 1;
        }
    }
    let mut deleted = 0;
    for lease in &leases {
        if !listed_ids.contains(lease.shard_id.as_str()) {
            store.delete(&lease.shard_id).await?;
            deleted += 1;
        }
    }
    if created > 0 || deleted > 0 {
        tracing::info!(
            created,
            deleted,
            shards = listed.len(),
            "lease table synced with the stream"
        );
    }
    Ok(())
}

async fn lease_sync_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let store = LeaseStore::new(ctx.aws.clone(), ctx.state.settings.lease_table());
    let mut tick = interval(ctx.state.settings.shard_poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sync_leases(&ctx, &store).await {
            tracing::warn!(error = %e, "cannot sync the lease table with the stream's shards");
        }
    }
}

/// Runs the coordinator's duties for `epoch` until `stop` is cancelled.
pub async fn run_term(ctx: Arc<Context>, epoch: u64, stop: CancellationToken) {
    let s = &ctx.state.settings;
    let me = s.worker_id.clone();
    let mut published = ctx.state.limit();

    let (desired_tx, mut desired_rx) = watch::channel(None::<u64>);
    let mut watchers = JoinSet::new();
    if s.worker_count_source == WorkerCountSource::Kubernetes {
        match &ctx.kube {
            Some(client) => {
                watchers.spawn(watch_desired_replicas(
                    client.clone(),
                    s.namespace.clone(),
                    s.statefulset_name.clone(),
                    desired_tx,
                    stop.child_token(),
                ));
            }
            None => tracing::warn!(
                "worker_count_source = kubernetes but no Kubernetes client; counting live workers only"
            ),
        }
    }

    let mut shard_tick = interval(s.shard_poll_interval);
    shard_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heartbeat_tick = interval(s.heartbeat_interval);
    heartbeat_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut liveness = LivenessTracker::default();
    // The lease table sync runs beside the publication loop: creating hundreds of lease items
    // after a reshard must not delay the new limit.
    watchers.spawn(lease_sync_loop(ctx.clone(), stop.child_token()));
    let mut shards: Option<u64> = None;
    let mut live: Option<u64> = None;

    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = shard_tick.tick() => match open_shard_count(&ctx.aws, &s.stream_name).await {
                Ok(n) => shards = Some(n),
                Err(e) => tracing::warn!(error = %e, "cannot read the open shard count; keeping the last one"),
            },
            _ = heartbeat_tick.tick() => match ctx.meta.scan_heartbeats().await {
                Ok(rows) => {
                    let judged =
                        liveness.observe(&rows, std::iter::empty(), Instant::now(), s.failover_timeout);
                    // Only rows can be deleted (a dead worker without a row has none).
                    let dead = judged.dead.iter().filter_map(|(id, c)| c.as_ref().map(|c| (id, c)));
                    for (id, counter) in dead {
                        tracing::info!(worker = %id, "worker's heartbeat stopped; removing it");
                        // Conditional: a worker that came back meanwhile keeps its row.
                        if let Err(e) = ctx.meta.delete_dead_heartbeat(id, *counter).await
                            && !e.is_condition_failed()
                        {
                            tracing::warn!(worker = %id, error = %e, "could not remove a dead heartbeat");
                        }
                    }
                    // This worker is alive by definition, even before its first row is read.
                    let mut n = judged.live.len() as u64;
                    if !judged.live.contains(&me) {
                        n += 1;
                    }
                    live = Some(n);
                }
                Err(e) => tracing::warn!(error = %e, "cannot scan heartbeats; keeping the last worker count"),
            },
            changed = desired_rx.changed() => {
                if changed.is_err() {
                    // The watcher ended (stop was cancelled); nothing more will come from it.
                    desired_rx.mark_unchanged();
                }
            }
        }

        let (Some(shards), Some(live)) = (shards, live) else {
            continue;
        };
        let desired = *desired_rx.borrow();
        let limit = policy::compute(FleetInputs {
            open_shards: shards,
            live_workers: live,
            desired_workers: desired,
            cap: s.max_leases_cap,
        });
        let record = LimitRecord {
            max_leases_per_worker: limit.max_leases_per_worker,
            shard_count: shards,
            worker_count: limit.worker_count,
            desired_workers: desired,
            live_workers: live,
            cap: s.max_leases_cap,
            capacity_deficit: limit.capacity_deficit,
            epoch,
            version: crate::store::next_version(published.as_ref(), epoch),
            computed_by: me.clone(),
            updated_at: now_iso8601(),
        };
        if published
            .as_ref()
            .is_some_and(|p| same_decision(p, &record))
        {
            continue;
        }
        match ctx.meta.publish_limit(&record).await {
            Ok(()) => {
                tracing::info!(
                    epoch,
                    version = record.version,
                    max_leases_per_worker = record.max_leases_per_worker,
                    shard_count = record.shard_count,
                    worker_count = record.worker_count,
                    capacity_deficit = record.capacity_deficit,
                    "{}",
                    describe_change(published.as_ref(), &record)
                );
                ctx.state.metrics.lease_limit_publications.inc();
                ctx.state.published(record.clone());
                published = Some(record);
            }
            Err(e) if e.is_condition_failed() => {
                // Deposed, or a newer version exists: the election loop ends this term at its
                // next renewal; re-read so a retry would carry the right version.
                tracing::warn!(
                    epoch,
                    "lease_limits write refused: no longer the coordinator of this epoch?"
                );
                if let Ok(current) = ctx.meta.read_limit().await {
                    published = current;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish lease_limits; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(limit: u64, shards: u64, workers: u64, deficit: u64) -> LimitRecord {
        LimitRecord {
            max_leases_per_worker: limit,
            shard_count: shards,
            worker_count: workers,
            desired_workers: None,
            live_workers: workers,
            cap: 80,
            capacity_deficit: deficit,
            epoch: 1,
            version: 1,
            computed_by: "w".into(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn change_lines_read_like_the_design() {
        assert_eq!(
            describe_change(Some(&rec(10, 30, 3, 0)), &rec(20, 60, 3, 0)),
            "max_leases_per_worker 10 -> 20: shards 30 -> 60, workers 3"
        );
        assert_eq!(
            describe_change(None, &rec(80, 300, 3, 60)),
            "max_leases_per_worker 80: shards 300, workers 3, capacity deficit 60 shards (cap 80: 4 workers would cover them)"
        );
    }

    #[test]
    fn version_and_time_do_not_count_as_a_change() {
        let a = rec(10, 30, 3, 0);
        let mut b = a.clone();
        b.version = 9;
        b.epoch = 4;
        b.updated_at = "later".into();
        assert!(same_decision(&a, &b));
        b.live_workers = 4;
        assert!(!same_decision(&a, &b));
    }
}
