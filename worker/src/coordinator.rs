//! The coordinator's duties during one term (one epoch): gather the inputs, apply the policy,
//! publish `lease_limits` when something changed; keep the lease table in step with the
//! stream's shards; and assign the leases ([`crate::assignment`]) — the only scan of the lease
//! table in the fleet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::assignment::{self, Action, FleetView};
use crate::config::WorkerCountSource;
use crate::context::{Context, ticker};
use crate::election::LivenessTracker;
use crate::inputs::{ShardInfo, list_shards, open_shard_count, watch_desired_replicas};
use crate::leases::{Lease, LeaseStore, Pending};
use crate::policy::{self, FleetInputs};
use crate::store::{LimitRecord, now_iso8601};

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
            new.workers_needed()
        ));
    }
    line
}

/// Leases the coordinator asks to move per worker and round only for evenness (leases above
/// the limit always move).
pub const MAX_BALANCE_MOVES_PER_ROUND: usize = 2;

/// Assignment writes the coordinator keeps in flight at once.
const ASSIGNMENT_WRITES_IN_FLIGHT: usize = 4;

/// Keeps one lease per shard that still needs reading, from one ListShards and the round's
/// scan: creates leases for new shards (parents before children, so children wait), deletes
/// leases of shards the stream no longer lists (expired after the retention period). A closed
/// shard keeps its `SHARD_END` lease while it is listed, so a missing lease always means
/// "new", never "finished". Returns the listed ids.
async fn sync_leases(
    ctx: &Context,
    store: &LeaseStore,
    leases: &[Lease],
) -> Result<BTreeSet<String>, crate::aws::AwsError> {
    let listing = list_shards(&ctx.aws, &ctx.state.settings.stream_name).await;
    ctx.state.stream_call(
        "ListShards",
        listing.as_ref().map(|_| ()).map_err(|e| e.to_string()),
    );
    let mut listed = listing?;
    let have: BTreeSet<&str> = leases.iter().map(|l| l.shard_id.as_str()).collect();
    let listed_ids: BTreeSet<String> = listed.iter().map(|sh| sh.shard_id.clone()).collect();
    // Shards without parents first, then by id: a parent's lease exists before its child's.
    listed.sort_by(|a, b| {
        (!a.parents.is_empty(), &a.shard_id).cmp(&(!b.parents.is_empty(), &b.shard_id))
    });
    let missing: Vec<&ShardInfo> = listed
        .iter()
        .filter(|sh| !have.contains(sh.shard_id.as_str()))
        .collect();
    // A few at a time. The order is not what keeps children waiting: a child whose parent the
    // stream lists is not readable until the parent's lease exists and is finished.
    let mut created = 0;
    for chunk in missing.chunks(ASSIGNMENT_WRITES_IN_FLIGHT) {
        let results = futures::future::join_all(
            chunk
                .iter()
                .map(|sh| store.create_if_missing(&sh.shard_id, &sh.parents)),
        )
        .await;
        for result in results {
            if result? {
                created += 1;
            }
        }
    }
    let mut deleted = 0;
    for lease in leases {
        if !listed_ids.contains(&lease.shard_id) {
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
    Ok(listed_ids)
}

/// After a round, the coordinator waits at least this many times the lease scan's duration.
const SCAN_PAUSES: u32 = 2;

/// The coordinator's lease rounds: one scan of the lease table and of the heartbeats, the
/// lease table synced with the stream when `shard_poll_interval` is due (from the same scan),
/// a plan for the whole fleet, and its writes (each conditional on the lease as scanned).
///
/// Rounds start every `heartbeat_interval`, but never sooner than [`SCAN_PAUSES`] scan
/// durations after the last round ended: on a large table the scan dominates, and the
/// DynamoDB it shares with every heartbeat must not be kept busy by it (a slow table is
/// scanned at most a third of the time).
async fn lease_rounds(ctx: Arc<Context>, stop: CancellationToken) {
    let s = &ctx.state.settings;
    let me = s.worker_id.clone();
    let store = LeaseStore::new(ctx.aws.clone(), s.lease_table());
    let mut liveness = LivenessTracker::default();
    let mut last_deficit_report: Option<(u64, u64)> = None;
    let mut listed: Option<BTreeSet<String>> = None;
    let mut next_sync = Instant::now();
    let mut next_round = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(next_round) => {}
        }
        let began = Instant::now();
        let result = lease_round(
            &ctx,
            &store,
            &me,
            &mut liveness,
            &mut listed,
            &mut next_sync,
            &mut last_deficit_report,
            &stop,
        )
        .await;
        let scan_took = match result {
            Ok(took) => took,
            Err(e) => {
                tracing::warn!(error = %e, "lease round failed; retrying next round");
                began.elapsed()
            }
        };
        next_round = (began + s.heartbeat_interval).max(Instant::now() + scan_took * SCAN_PAUSES);
    }
    ctx.state.set_coverage(None);
    ctx.state.clear_stream_calls();
}

#[allow(clippy::too_many_arguments)]
async fn lease_round(
    ctx: &Context,
    store: &LeaseStore,
    me: &str,
    liveness: &mut LivenessTracker,
    listed: &mut Option<BTreeSet<String>>,
    next_sync: &mut Instant,
    last_deficit_report: &mut Option<(u64, u64)>,
    stop: &CancellationToken,
) -> Result<Duration, crate::aws::AwsError> {
    let s = &ctx.state.settings;
    let began = Instant::now();
    let leases = store.scan().await?;
    let scanned = began.elapsed();
    if Instant::now() >= *next_sync {
        match sync_leases(ctx, store, &leases).await {
            Ok(ids) => *listed = Some(ids),
            Err(e) => {
                tracing::warn!(error = %e, "cannot sync the lease table with the stream's shards")
            }
        }
        *next_sync = Instant::now() + s.shard_poll_interval;
    }
    let (Some(limit), Some(listed)) = (ctx.state.limit(), listed.as_ref()) else {
        return Ok(scanned);
    };
    // Heartbeats are read after the lease scan (and the sync): an owner that acquired a lease
    // the scan saw had its heartbeat land before, so it is seen alive. Lease owners without a
    // heartbeat row are expected too: dead only after `failover_timeout` of absence on this
    // coordinator's clock, row or no row.
    let issued = Instant::now();
    let rows = ctx.meta.scan_heartbeats().await?;
    let answered = Instant::now();
    let owners: BTreeSet<&str> = leases.iter().filter_map(|l| l.owner.as_deref()).collect();
    let judged = liveness.observe_read(&rows, owners, issued, answered, s.failover_timeout);
    // This worker is judged by its own row like anyone (a coordinator that cannot write its
    // heartbeat loses its leases like anyone); before its first row is read it counts while
    // it may read.
    let self_judged = judged.dead.iter().any(|(id, _)| id == me);
    let mut live: BTreeSet<String> = judged.live.into_iter().collect();
    if !self_judged && ctx.state.may_process() {
        live.insert(me.to_owned());
    }
    let view = FleetView {
        leases: &leases,
        live: &live,
        limit: limit.max_leases_per_worker,
        listed: Some(listed),
        release_excess: live.len() as u64 >= limit.live_workers,
    };
    let coverage = assignment::coverage(&view, limit.cap);
    if limit.capacity_deficit > 0 && coverage.unowned_shards > 0 {
        let report = (coverage.unowned_shards, coverage.workers_needed);
        if *last_deficit_report != Some(report) {
            tracing::warn!(
                unowned_shards = coverage.unowned_shards,
                workers_needed = coverage.workers_needed,
                capacity_deficit = limit.capacity_deficit,
                "{} shards unowned: every worker is at the cap ({}); {} workers would cover them",
                coverage.unowned_shards,
                limit.max_leases_per_worker,
                coverage.workers_needed
            );
        }
        *last_deficit_report = Some(report);
    } else {
        *last_deficit_report = None;
    }
    ctx.state.set_coverage(Some(coverage));

    let by_id: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.shard_id.as_str(), l)).collect();
    // Written a few at a time: each write is conditional on its own lease only.
    let actions = assignment::plan(&view, MAX_BALANCE_MOVES_PER_ROUND);
    tracing::debug!(
        leases = leases.len(),
        live = live.len(),
        actions = actions.len(),
        scan_ms = scanned.as_millis() as u64,
        round_ms = began.elapsed().as_millis() as u64,
        "lease round planned"
    );
    let writes = actions
        .into_iter()
        .map(|action| {
            let seen = by_id[action.shard()];
            async move {
                // The term may end (deposed, or its watchdog) in the middle of a plan.
                if stop.is_cancelled() {
                    return;
                }
                let result = match &action {
                    Action::Assign { to, .. } => store.assign(seen, to).await,
                    Action::HandOff { to, .. } => {
                        store.request(seen, &Pending::HandOff(to.clone())).await
                    }
                    Action::Release { .. } => store.request(seen, &Pending::Release).await,
                };
                match result {
                    Ok(()) => tracing::debug!(?action, "lease assignment written"),
                    Err(e) if e.is_condition_failed() => tracing::debug!(
                        shard = %action.shard(),
                        "lease changed since the scan; replanned next round"
                    ),
                    Err(e) => tracing::warn!(shard = %action.shard(), error = %e, "cannot write a lease assignment"),
                }
            }
        });
    futures::stream::iter(writes)
        .buffer_unordered(ASSIGNMENT_WRITES_IN_FLIGHT)
        .collect::<()>()
        .await;
    Ok(scanned)
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

    let mut shard_tick = ticker(s.shard_poll_interval);
    let mut heartbeat_tick = ticker(s.heartbeat_interval);
    let mut liveness = LivenessTracker::default();
    // The lease table sync and the assignment run beside the publication loop: creating
    // hundreds of lease items after a reshard must not delay the new limit.
    watchers.spawn(lease_rounds(ctx.clone(), stop.child_token()).in_current_span());
    let mut shards: Option<u64> = None;
    let mut live: Option<u64> = None;

    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = shard_tick.tick() => match open_shard_count(&ctx.aws, &s.stream_name).await {
                Ok(n) => {
                    ctx.state.stream_call("DescribeStreamSummary", Ok(()));
                    shards = Some(n)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the open shard count; keeping the last one");
                    ctx.state.stream_call("DescribeStreamSummary", Err(e.to_string()));
                }
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
