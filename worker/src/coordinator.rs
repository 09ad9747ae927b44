//! The coordinator: the election loop that claims, renews and gives up the post
//! ([`election_loop`], holding a `Term`), and the duties during one term (one epoch): gather the inputs, apply the policy,
//! publish `lease_limits` when something changed; keep the lease table in step with the
//! stream's shards; and assign the leases ([`crate::assignment`]) — the only scan of the lease
//! table in the fleet — stamping the lease generation on the coordinator item whenever who
//! owns what changed, so followers query their own leases only then.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::assignment::{self, Action, FleetView};
use crate::config::{Settings, WorkerCountSource};
use crate::context::{Context, ticker};
use crate::election::{
    CoordinatorObserver, Liveness, LivenessTracker, Verdict, claim_epoch, renewal_missed_after,
};
use crate::inputs::{ShardInfo, list_shards, open_shard_count, watch_desired_replicas};
use crate::leases::{Lease, LeaseStore, Pending};
use crate::meta::{HeartbeatRow, LimitReadError, PublishedLimit, now_iso8601};
use crate::policy::{self, FleetInputs};
use crate::state::{ChangeSource, Role};

/// The fields whose change warrants a new `lease_limits` version.
fn same_decision(a: &PublishedLimit, b: &PublishedLimit) -> bool {
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
pub fn describe_change(old: Option<&PublishedLimit>, new: &PublishedLimit) -> String {
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
            new.capacity_deficit, new.cap, new.workers_needed
        ));
    }
    if let Some(old) = old
        && old.epoch < new.epoch
        && same_decision(old, new)
    {
        line.push_str(&format!(
            " (unchanged; published again for epoch {})",
            new.epoch
        ));
    }
    line
}

/// Leases the coordinator asks to move per worker and round only for evenness (leases above
/// the limit always move).
pub const MAX_BALANCE_MOVES_PER_ROUND: usize = 2;

/// Assignment writes the coordinator keeps in flight at once.
const ASSIGNMENT_WRITES_IN_FLIGHT: usize = 4;

/// Lists the stream's shards (one `ListShards`, paged), recorded for `/status`.
async fn list_stream(ctx: &Context) -> Result<Vec<ShardInfo>, crate::aws::AwsError> {
    let listing = list_shards(&ctx.aws, &ctx.state.settings.stream_name).await;
    ctx.state.stream_call(
        "ListShards",
        listing.as_ref().map(|_| ()).map_err(|e| e.to_string()),
    );
    listing
}

/// The ids of listed shards.
fn shard_ids(listed: &[ShardInfo]) -> BTreeSet<String> {
    listed.iter().map(|sh| sh.shard_id.clone()).collect()
}

/// Keeps one lease per shard that still needs reading, from one ListShards and the round's
/// scan: creates leases for new shards (parents before children, so children wait), deletes
/// leases of shards the stream no longer lists (expired after the retention period). A closed
/// shard keeps its `SHARD_END` lease while it is listed, so a missing lease always means
/// "new", never "finished". Returns the listed ids, and whether it created any lease.
async fn sync_leases(
    ctx: &Context,
    store: &LeaseStore,
    leases: &[Lease],
) -> Result<(BTreeSet<String>, bool), crate::aws::AwsError> {
    let mut listed = list_stream(ctx).await?;
    let have: BTreeSet<&str> = leases.iter().map(|l| l.shard_id.as_str()).collect();
    let listed_ids = shard_ids(&listed);
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
    Ok((listed_ids, created > 0))
}

/// After a round, the coordinator waits at least this many times the lease scan's duration.
const SCAN_PAUSES: u32 = 2;

/// The coordinator's lease rounds: one scan of the lease table and of the heartbeats, the
/// lease table synced with the stream when `shard_poll_interval` is due (from the same scan;
/// a quiet round that finds the stream listing the shards of the last sync needs none),
/// a plan for the whole fleet, and its writes (each conditional on the lease as scanned).
/// They are the term's only reader of the heartbeats: the live-worker count goes from here to
/// the publication loop through `live_tx`.
///
/// Rounds start every half `heartbeat_interval` (every `settling_interval` for a while after a
/// round in which something moved: see [`RoundOutcome::changed`]; in a still fleet most are
/// quiet, reading only the heartbeats), but never sooner than [`SCAN_PAUSES`] scan
/// durations after the last round ended: on a large table the scan dominates, and the
/// DynamoDB it shares with every heartbeat must not be kept busy by it (a slow table is
/// scanned at most a third of the time). Within that bound a round also starts early:
/// - when a silent worker is due to be judged dead, so its leases are reassigned once
///   `failover_timeout` is up, not up to a round later (that round waits, a heartbeat at
///   most, for the limit the new count gives, and plans under it);
/// - when a limit is published that no round has planned under yet (the shard count or the
///   desired replicas changed, or a count's wait timed out), so leases that did not fit under
///   the old limit are planned at once.
async fn lease_rounds(
    ctx: Arc<Context>,
    epoch: u64,
    liveness: LivenessTracker,
    live_tx: watch::Sender<Option<LiveCount>>,
    handled: watch::Receiver<u64>,
    stop: CancellationToken,
) {
    let s = &ctx.state.settings;
    let store = LeaseStore::new(ctx.aws.clone(), s.lease_table());
    let mut round = RoundState {
        me: s.worker_id.clone(),
        epoch,
        liveness,
        owners: BTreeSet::new(),
        live_tx,
        sent: 0,
        handled,
        limits: ctx.state.limit_versions(),
        listed: None,
        next_sync: Instant::now(),
        synced_for: None,
        last_deficit_report: None,
        expected_digest: None,
        generation: 0,
        stamped: None,
        verdict_stamped: false,
        stamp_uncertain: false,
        rows_seen: None,
    };
    let mut next_round = Instant::now();
    let mut earliest = Instant::now();
    let mut settle_until = Instant::now();
    // When the lease table was last scanned, and whether anything moved since (or may have:
    // a new limit, a failed round).
    let mut last_full: Option<Instant> = None;
    let mut moved = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(next_round) => {}
            Ok(()) = round.limits.changed() => {
                moved = true;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = sleep_until(earliest) => {}
                }
            }
        }
        let began = Instant::now();
        // In a still fleet three rounds in four read only the heartbeats (see `lease_round`).
        let quiet = !moved
            && began >= settle_until
            && !round.limits.has_changed().unwrap_or(true)
            && !round.resharded(&ctx)
            && round.stamped == Some(round.generation)
            && !round.stamp_uncertain
            && !round.verdict_stamped
            && last_full.is_some_and(|t| began.duration_since(t) < s.heartbeat_interval * 7 / 4);
        let result = lease_round(&ctx, &store, &mut round, &stop, quiet).await;
        let scan_took = match &result {
            Ok(outcome) => {
                if outcome.changed {
                    settle_until = Instant::now() + s.settling_window();
                }
                if outcome.full {
                    last_full = Some(began);
                    moved = outcome.changed || outcome.awaiting;
                }
                outcome.scanned
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease round failed; retrying next round");
                round.clear_lease_stamp(&ctx).await;
                moved = true;
                began.elapsed()
            }
        };
        earliest = Instant::now() + scan_took * SCAN_PAUSES;
        // Rounds come every half heartbeat (a quarter while settling), so a row's last change
        // is seen, and its silence dated, within half a heartbeat; in a still fleet most of
        // them are quiet (heartbeats only).
        next_round = began
            + match &result {
                Err(_) => s.heartbeat_interval,
                Ok(_) if Instant::now() < settle_until => s.settling_interval(),
                Ok(_) => s.heartbeat_interval / 2,
            };
        // A failed round retries at the usual pace (a fast-failing scan must not spin on a
        // deadline it never gets past).
        if result.is_ok()
            && let Some(verdict) = round.liveness.next_verdict(s.failover_timeout)
        {
            next_round = next_round.min(verdict);
        }
        next_round = next_round.max(earliest);
    }
    ctx.state.set_coverage(None);
    ctx.state.clear_stream_calls();
}

/// What the lease rounds of one term carry from round to round.
struct RoundState {
    me: String,
    liveness: LivenessTracker,
    /// Lease owners in the last lease scan that succeeded: expected to heartbeat.
    owners: BTreeSet<String>,
    live_tx: watch::Sender<Option<LiveCount>>,
    /// The sequence number of the last count sent.
    sent: u64,
    /// The sequence number of the last count the publication loop has handled (published a
    /// limit for, found it changes nothing, failed to publish, or could not use yet because
    /// the shard count is not known).
    handled: watch::Receiver<u64>,
    /// Published limits: a change no round has planned under yet starts one.
    limits: watch::Receiver<(u64, u64)>,
    /// The stream's shard ids at the last completed sync (every lease created and deleted):
    /// the ids of the lease table then.
    listed: Option<BTreeSet<String>>,
    /// When the stream is next listed: by a full round's sync, or by a quiet round, which
    /// moves it on when the listing shows the ids of the last sync.
    next_sync: Instant,
    /// The published shard count the last sync ran under: a new one (a reshard the
    /// publication loop saw) syncs at once, not when `next_sync` comes.
    synced_for: Option<u64>,
    last_deficit_report: Option<(u64, u64)>,
    /// This term's epoch, which the lease stamp carries.
    epoch: u64,
    /// The ownership digest the next scan shows if nobody else changes anything (see
    /// [`assignment::ownership_digest`]); `None` before the first full round.
    expected_digest: Option<u64>,
    /// This term's lease generation: moves when a scan shows ownership the previous round did
    /// not expect (a hand-off done, a release, an edit) or when a round's writes land.
    generation: u64,
    /// The generation last stamped on the coordinator item.
    stamped: Option<u64>,
    /// Whether the last stamp written carried a suspect's verdict time.
    verdict_stamped: bool,
    /// A stamp write failed in a way that may have landed.
    stamp_uncertain: bool,
    /// The workers with a heartbeat row at the last full round.
    rows_seen: Option<BTreeSet<String>>,
}

impl RoundState {
    /// The publication loop published a shard count no completed sync ran under (a reshard
    /// it saw first, or a sync that failed): the next round syncs, and it is a full one.
    fn resharded(&self, ctx: &Context) -> bool {
        let published = ctx.state.limit().map(|l| l.shard_count);
        published.is_some() && published != self.synced_for
    }

    /// Moves the lease generation if this round's scan or writes changed who owns what, and
    /// stamps it on the coordinator item (after the writes: a follower that sees the stamp
    /// finds them when it queries). A stamp that could not be written is tried again next
    /// round. While a worker is silent (`suspect_verdict`: when its verdict is due) every
    /// round stamps, with the time left, so followers read their leases quickly around it.
    async fn stamp_lease_generation(
        &mut self,
        ctx: &Context,
        leases: &[Lease],
        landed: &[Action],
        suspect_verdict: Option<Instant>,
    ) {
        let scanned = assignment::ownership_digest(leases, &[]);
        if self.expected_digest != Some(scanned) || !landed.is_empty() {
            self.generation += 1;
        }
        self.expected_digest = Some(if landed.is_empty() {
            scanned
        } else {
            assignment::ownership_digest(leases, landed)
        });
        if self.stamped == Some(self.generation)
            && suspect_verdict.is_none()
            && !self.verdict_stamped
        {
            return;
        }
        let stamp = crate::meta::LeaseStamp {
            epoch: self.epoch,
            generation: self.generation,
        };
        let due_in = suspect_verdict.map(|at| at.saturating_duration_since(Instant::now()));
        match ctx.meta.stamp_leases(&self.me, stamp, due_in).await {
            Ok(()) => {
                self.stamped = Some(self.generation);
                self.verdict_stamped = due_in.is_some();
                self.stamp_uncertain = false;
            }
            // Deposed: the term is ending, and the next owner stamps its own epoch.
            Err(e) if e.is_condition_failed() => {}
            // The write may still have landed: what it carried counts as written until a
            // later stamp or a clear says otherwise.
            Err(e) => {
                self.stamp_uncertain = true;
                self.verdict_stamped |= due_in.is_some();
                tracing::warn!(error = %e, "cannot stamp the lease generation; retrying next round");
            }
        }
    }

    /// A round failed: the stamp no longer vouches that followers have nothing new to read
    /// (a hand-off may complete unseen), so it comes off until a round succeeds.
    async fn clear_lease_stamp(&mut self, ctx: &Context) {
        if self.stamped.is_none() && !self.stamp_uncertain {
            return;
        }
        match ctx.meta.clear_lease_stamp(&self.me, self.epoch).await {
            Ok(()) => {
                self.stamped = None;
                self.verdict_stamped = false;
                self.stamp_uncertain = false;
            }
            Err(e) if e.is_condition_failed() => {}
            Err(e) => tracing::debug!(error = %e, "cannot clear the lease stamp"),
        }
    }

    /// Hands the live-worker count to the publication loop (only a change wakes it); true
    /// when it changed.
    fn publish_live(&mut self, live_workers: u64) -> bool {
        if self
            .live_tx
            .borrow()
            .is_some_and(|c| c.workers == live_workers)
        {
            return false;
        }
        self.sent += 1;
        self.live_tx.send_replace(Some(LiveCount {
            seq: self.sent,
            workers: live_workers,
        }));
        true
    }
}

/// The live-worker count the lease rounds hand to the publication loop, numbered so the
/// round can wait for this very count to be handled (the same number may come back later).
#[derive(Debug, Clone, Copy)]
struct LiveCount {
    seq: u64,
    workers: u64,
}

/// What one lease round found.
struct RoundOutcome {
    /// How long the lease scan took (the pause before the next round scales with it; the
    /// heartbeat scan's in a quiet round).
    scanned: Duration,
    /// The lease table was scanned (false: a quiet round that found the fleet as it was).
    full: bool,
    /// The scan showed a request (`pendingOwner`) its owner has not acted on yet: the next
    /// round scans again to plan the step after it, quiet or not.
    awaiting: bool,
    /// Something moved: the live count changed, the stream's listed shards changed (a
    /// term's first sync included), or a write of the plan landed. The rounds then come every
    /// `settling_interval` for a `settling_window`, so the next step (a lease a worker
    /// released, a worker that appeared meanwhile) is planned within a quarter heartbeat. A
    /// fleet where nothing moves (one whose unread shards wait for capacity included) is
    /// scanned every second heartbeat (see `lease_round`'s quiet rounds).
    changed: bool,
}

/// A silent worker's heartbeat row as judged: worker id, counter, instance.
type DeadRow = (String, u64, Option<String>);

/// Deletes the heartbeat rows of workers judged dead, each conditional on the counter and
/// instance seen (a worker that came back meanwhile keeps its row). A deleted row is remembered as gone, so
/// the same worker writing a new row counts as progress.
async fn remove_dead_rows(ctx: &Context, liveness: &mut LivenessTracker, dead: &[DeadRow]) {
    let deletes = dead.iter().map(|(id, counter, instance)| async move {
        tracing::info!(worker = %id, "worker's heartbeat stopped; removing it");
        match ctx
            .meta
            .delete_dead_heartbeat(id, *counter, instance.as_deref())
            .await
        {
            Ok(()) => Some(id),
            Err(e) => {
                if !e.is_condition_failed() {
                    tracing::warn!(worker = %id, error = %e, "could not remove a dead heartbeat");
                }
                None
            }
        }
    });
    for id in futures::future::join_all(deletes)
        .await
        .into_iter()
        .flatten()
    {
        liveness.row_removed(id);
    }
}

/// Reads the heartbeats and judges them, with the lease owners of the last scan expected:
/// the rows, the judgement, and when the read was issued and answered.
async fn read_liveness(
    ctx: &Context,
    round: &mut RoundState,
) -> Result<(Vec<HeartbeatRow>, Liveness, Instant, Instant), crate::aws::AwsError> {
    let issued = Instant::now();
    let rows = ctx.meta.scan_heartbeats().await?;
    let answered = Instant::now();
    let judged = round.liveness.observe_read(
        &rows,
        round.owners.iter().map(String::as_str),
        issued,
        answered,
        ctx.state.settings.failover_timeout,
    );
    Ok((rows, judged, issued, answered))
}

/// The count the limit is computed from: workers judged live that have a heartbeat row (an
/// owner without one is waited for before its leases move, but is not counted), and `me`,
/// alive by definition there even before its first row is read.
fn live_count(judged: &Liveness, rows: &[HeartbeatRow], me: &str) -> u64 {
    let with_rows: BTreeSet<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
    judged
        .live
        .iter()
        .filter(|w| with_rows.contains(w.as_str()) && w.as_str() != me)
        .count() as u64
        + 1
}

/// In a quiet round with the stream's sync due: whether the stream still lists exactly the
/// shards of the last completed sync. The sync would then change nothing the stream changed;
/// a lease item lost from the table meanwhile (deleted by hand) is recreated by the next full
/// round, which syncs whenever its scan's ids differ from the last sync's. The next listing
/// is due a `shard_poll_interval` later, also after a failed one (as after a failed sync). A
/// listing that differs leaves the sync to a full round, which lists again after its scan (a
/// listing older than the scan could delete a lease created in between).
async fn stream_unchanged(ctx: &Context, round: &mut RoundState) -> bool {
    if Instant::now() < round.next_sync {
        return true;
    }
    let unchanged = match list_stream(ctx).await {
        Ok(listed) => round.listed.as_ref() == Some(&shard_ids(&listed)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the stream's shards; trying again later");
            true
        }
    };
    // A listing that differs leaves the sync due, so the full round it leads to syncs.
    if unchanged {
        round.next_sync = Instant::now() + ctx.state.settings.shard_poll_interval;
    }
    unchanged
}

/// One lease round. `quiet` (nothing moved at the last full round, which was under 1.75
/// heartbeats ago and showed no request waiting for its owner; no settling, no new limit or
/// unsynced reshard, the stamp written): read the heartbeats first, and if the same workers
/// have rows, the live count is the one published, nobody is due or silent for three
/// quarters of its timeout, and (when the sync is due) the stream lists the shards of the
/// last sync, stop there. Nothing the coordinator must act on can then have happened that a
/// lease scan a little later would not find just as well (a shard read to its end, a lease
/// given up), and in a still fleet the scan of every lease, the largest read there is, comes
/// every fourth round (every second heartbeat) while the heartbeats are read every half
/// heartbeat. The sync's listing is a Kinesis call: with `shard_poll_interval` under two
/// heartbeats, a sync that needed the scan would make most rounds full ones.
async fn lease_round(
    ctx: &Context,
    store: &LeaseStore,
    round: &mut RoundState,
    stop: &CancellationToken,
    quiet: bool,
) -> Result<RoundOutcome, crate::aws::AwsError> {
    let s = &ctx.state.settings;
    // Owned: `round` is borrowed mutably below.
    let me = round.me.clone();
    let me = me.as_str();
    if quiet {
        let (rows, judged, issued, answered) = read_liveness(ctx, round).await?;
        let with_rows: BTreeSet<String> = rows.iter().map(|r| r.worker_id.clone()).collect();
        let suspect = round
            .liveness
            .next_suspect_verdict(me, answered, s.failover_timeout)
            .is_some();
        // The count the limit was last published for (a worker judged dead and back with the
        // same row id changes it without changing the set of rows).
        let live_count = live_count(&judged, &rows, me);
        let published_for = round.live_tx.borrow().map(|c| c.workers);
        if judged.dead.is_empty()
            && !suspect
            && round.rows_seen.as_ref() == Some(&with_rows)
            && published_for == Some(live_count)
            && stream_unchanged(ctx, round).await
        {
            return Ok(RoundOutcome {
                scanned: answered.duration_since(issued),
                full: false,
                changed: false,
                awaiting: false,
            });
        }
    }
    let began = Instant::now();
    let scan = store.scan().await;
    let mut scanned = began.elapsed();
    if let Ok(leases) = &scan {
        round.owners = leases.iter().filter_map(|l| l.owner.clone()).collect();
    }
    // Heartbeats are read after the lease scan: an owner that acquired a lease the scan saw
    // had its heartbeat land before, so it is seen alive. Lease owners without a heartbeat
    // row are expected too: dead only after `failover_timeout` of absence on this
    // coordinator's clock, row or no row. They are read even when the scan failed, so the
    // limit keeps following the workers.
    let (rows, judged, ..) = read_liveness(ctx, round).await?;
    // Only rows can be deleted (a dead owner without a row has none).
    let dead_rows: Vec<DeadRow> = judged
        .dead
        .iter()
        .filter_map(|(id, c)| {
            let row = rows.iter().find(|r| &r.worker_id == id)?;
            c.map(|c| (id.clone(), c, row.instance.clone()))
        })
        .collect();
    round.rows_seen = Some(rows.iter().map(|r| r.worker_id.clone()).collect());
    let live_workers = live_count(&judged, &rows, me);
    // Sent at once: neither the sync (creating every lease item of a new stream) nor the
    // writes hold a new limit back. This round then plans under the limit the new count gives
    // (a death raises it: the dead worker's leases are all assigned now, not a round later),
    // waiting until the publication loop has handled the count — usually one write, a
    // heartbeat at most (it may be busy with DescribeStreamSummary). A term's first round,
    // with no limit yet, waits for the first publication the same way, so the stream's first
    // leases are assigned in this round, not in the next.
    let mut changed = round.publish_live(live_workers);
    if changed && scan.is_ok() {
        let seq = round.sent;
        let handled = round.handled.wait_for(|h| *h >= seq);
        tokio::select! {
            _ = stop.cancelled() => return Ok(RoundOutcome {
                scanned,
                full: true,
                changed,
                awaiting: false,
            }),
            _ = tokio::time::timeout(s.heartbeat_interval, handled) => {}
        }
    }
    let mut leases = match scan {
        Ok(leases) => leases,
        Err(e) => {
            remove_dead_rows(ctx, &mut round.liveness, &dead_rows).await;
            return Err(e);
        }
    };
    let published_shards = ctx.state.limit().map(|l| l.shard_count);
    // After a completed sync the lease table holds exactly the listed shards; a scan that
    // differs (an item deleted by hand, or a sync that failed half-way) syncs at once.
    let drifted = round.listed.as_ref().is_some_and(|listed| {
        leases.len() != listed.len() || leases.iter().any(|l| !listed.contains(&l.shard_id))
    });
    if Instant::now() >= round.next_sync || round.resharded(ctx) || drifted {
        match sync_leases(ctx, store, &leases).await {
            Ok((ids, created)) => {
                changed |= round.listed.as_ref() != Some(&ids);
                round.listed = Some(ids);
                // A failed sync leaves the reshard to be synced at the next round.
                round.synced_for = published_shards;
                // The leases just created (a new stream's above all: a reshard's children wait
                // for their parents anyway) are planned in this round, not a settling
                // interval later (3.75 s at a 15 s heartbeat). Only the new items are taken
                // from a second scan: every other lease is planned as the first scan showed
                // it, before the heartbeats were read. A scan that fails, or does not show
                // them yet (it is eventually consistent), leaves them to the next round.
                if created {
                    let began = Instant::now();
                    match store.scan().await {
                        Ok(rescanned) => {
                            let known: BTreeSet<String> =
                                leases.iter().map(|l| l.shard_id.clone()).collect();
                            leases.extend(
                                rescanned
                                    .into_iter()
                                    .filter(|l| !known.contains(&l.shard_id)),
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot scan the leases just created"),
                    }
                    scanned += began.elapsed();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot sync the lease table with the stream's shards")
            }
        }
        round.next_sync = Instant::now() + s.shard_poll_interval;
    }
    // Every limit published until now is planned under here (or, before the first sync,
    // there is nothing to plan): only a later one starts a round early.
    round.limits.mark_unchanged();
    let (Some(limit), Some(listed)) = (ctx.state.limit(), round.listed.as_ref()) else {
        remove_dead_rows(ctx, &mut round.liveness, &dead_rows).await;
        return Ok(RoundOutcome {
            scanned,
            full: true,
            changed,
            awaiting: false,
        });
    };
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
    if limit.capacity_deficit > 0 && coverage.uncovered_shards > 0 {
        let report = (coverage.uncovered_shards, coverage.workers_needed);
        if round.last_deficit_report != Some(report) {
            tracing::warn!(
                uncovered_shards = coverage.uncovered_shards,
                workers_needed = coverage.workers_needed,
                capacity_deficit = limit.capacity_deficit,
                "{} shards unread: every worker is at the cap ({}); {} workers would cover them",
                coverage.uncovered_shards,
                limit.max_leases_per_worker,
                coverage.workers_needed
            );
        }
        round.last_deficit_report = Some(report);
    } else {
        round.last_deficit_report = None;
    }
    ctx.state.set_coverage(Some(coverage));

    let by_id: BTreeMap<&str, &Lease> = leases.iter().map(|l| (l.shard_id.as_str(), l)).collect();
    // Written a few at a time: each write is conditional on its own lease only.
    let actions = assignment::plan(&view, MAX_BALANCE_MOVES_PER_ROUND);
    let assigns_me = actions
        .iter()
        .any(|a| matches!(a, Action::Assign { to, .. } if to == me));
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
                    return None;
                }
                let result = match &action {
                    Action::Assign { to, .. } => store.assign(seen, to).await,
                    Action::HandOff { to, .. } => {
                        store.request(seen, &Pending::HandOff(to.clone())).await
                    }
                    Action::Release { .. } => store.request(seen, &Pending::Release).await,
                };
                match result {
                    Ok(()) => {
                        tracing::debug!(?action, "lease assignment written");
                        return Some(action);
                    }
                    Err(e) if e.is_condition_failed() => tracing::debug!(
                        shard = %action.shard(),
                        "lease changed since the scan; replanned next round"
                    ),
                    Err(e) => tracing::warn!(shard = %action.shard(), error = %e, "cannot write a lease assignment"),
                }
                None
            }
        });
    let landed: Vec<Action> = futures::stream::iter(writes)
        .buffer_unordered(ASSIGNMENT_WRITES_IN_FLIGHT)
        .filter_map(futures::future::ready)
        .collect()
        .await;
    // Only writes that landed: a plan refused as stale (the scan is eventually consistent)
    // or failing for good must not keep the rounds quick.
    changed |= !landed.is_empty();
    // A worker that missed heartbeats: its verdict's time goes out with the stamp.
    let suspect_verdict =
        round
            .liveness
            .next_suspect_verdict(me, Instant::now(), s.failover_timeout);
    round
        .stamp_lease_generation(ctx, &leases, &landed, suspect_verdict)
        .await;
    if assigns_me {
        // This worker's own lease loop looks now, not at its next round, and again every
        // settling interval for a while (the leaseOwner index it queries may lag behind the
        // write).
        ctx.state.leases_assigned.notify_one();
    }
    remove_dead_rows(ctx, &mut round.liveness, &dead_rows).await;
    Ok(RoundOutcome {
        scanned,
        full: true,
        changed,
        awaiting: leases.iter().any(|l| l.pending.is_some()),
    })
}

/// Runs the coordinator's duties for `epoch` until `stop` is cancelled.
/// `liveness`: the heartbeats as this worker read them while the post was silent before
/// this term (see `observe_heartbeats`); empty when it never saw a renewal missed.
pub async fn run_term(
    ctx: Arc<Context>,
    epoch: u64,
    stop: CancellationToken,
    liveness: LivenessTracker,
) {
    let s = &ctx.state.settings;
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
    // The lease table sync and the assignment run beside the publication loop: creating
    // hundreds of lease items after a reshard must not delay the new limit. The lease rounds
    // are also the term's only reader of the heartbeats: they send the live-worker count
    // published here, from the same read their assignments are judged by.
    let (live_tx, mut live_rx) = watch::channel(None::<LiveCount>);
    let (handled_tx, handled_rx) = watch::channel(0u64);
    let mut handled_seq = 0;
    let mut live_open = true;
    watchers.spawn(
        lease_rounds(
            ctx.clone(),
            epoch,
            liveness,
            live_tx,
            handled_rx,
            stop.child_token(),
        )
        .in_current_span(),
    );
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
            changed = live_rx.changed(), if live_open => {
                match changed {
                    Ok(()) => {
                        if let Some(count) = *live_rx.borrow_and_update() {
                            live = Some(count.workers);
                            handled_seq = count.seq;
                        }
                    }
                    // The term is ending (the rounds stop with it)...
                    Err(_) if stop.is_cancelled() => break,
                    // ...and only a panic ends them sooner.
                    Err(_) => {
                        tracing::error!("the lease rounds stopped: no lease is assigned and the worker count stays as it is until this term ends");
                        live_open = false;
                        // Nothing will move the lease stamp now: followers query every
                        // heartbeat again (a failed write leaves it to the next owner).
                        let _ = ctx.meta.clear_lease_stamp(&s.worker_id, epoch).await;
                    }
                }
            }
            changed = desired_rx.changed() => {
                if changed.is_err() {
                    // The watcher ended (stop was cancelled); nothing more will come from it.
                    desired_rx.mark_unchanged();
                }
            }
        }

        if let (Some(shards), Some(live)) = (shards, live) {
            let inputs = FleetInputs {
                open_shards: shards,
                live_workers: live,
                desired_workers: *desired_rx.borrow(),
                cap: s.max_leases_cap,
            };
            publish_if_changed(&ctx, epoch, inputs, &mut published).await;
        }
        // The lease round that sent this count waits for it to be handled before it plans.
        handled_tx.send_replace(handled_seq);
    }
}

/// Publishes the limit `inputs` give, unless it is the decision already published.
async fn publish_if_changed(
    ctx: &Context,
    epoch: u64,
    inputs: FleetInputs,
    published: &mut Option<PublishedLimit>,
) {
    let s = &ctx.state.settings;
    let limit = policy::compute(inputs);
    let record = PublishedLimit {
        max_leases_per_worker: limit.max_leases_per_worker,
        shard_count: inputs.open_shards,
        worker_count: limit.worker_count,
        desired_workers: inputs.desired_workers,
        live_workers: inputs.live_workers,
        cap: s.max_leases_cap,
        capacity_deficit: limit.capacity_deficit,
        workers_needed: limit.workers_needed,
        epoch,
        version: crate::meta::next_version(published.as_ref(), epoch),
        computed_by: s.worker_id.clone(),
        updated_at: now_iso8601(),
    };
    // A new term publishes its first decision even when it is the one in force: the
    // publication stamps the coordinator item with this epoch, and until then followers read
    // `lease_limits` every heartbeat (see `meta::limit_read_due`).
    if published
        .as_ref()
        .is_some_and(|p| p.epoch == epoch && same_decision(p, &record))
    {
        return;
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
            *published = Some(record);
        }
        Err(e) if e.is_condition_failed() => {
            // Deposed, or a newer version exists: the election loop ends this term at its
            // next renewal; re-read so a retry would carry the right version.
            tracing::warn!(
                epoch,
                "lease_limits write refused: no longer the coordinator of this epoch?"
            );
            if let Ok(current) = ctx.meta.read_limit().await {
                *published = current;
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot publish lease_limits; will retry"),
    }
}

/// The coordinator's term as the election loop holds it.
struct Term {
    epoch: u64,
    /// When the last successful claim or renewal was *sent*: others judge our silence from a
    /// later instant, so stopping the duties `term_after` (failover − heartbeat) after this is
    /// always before anyone can take over.
    renewed_at: Instant,
    stop: CancellationToken,
    duties: JoinSet<()>,
}

impl Term {
    /// The instant the duties stop unless a renewal succeeds first.
    fn deadline(&self, s: &Settings) -> Instant {
        self.renewed_at + s.term_after()
    }

    /// Graceful (shutdown): the duties finish their current step.
    async fn end(mut self, ctx: &Context) {
        self.stop.cancel();
        while self.duties.join_next().await.is_some() {}
        ctx.state.set_role(Role::Follower, self.epoch);
    }

    /// At once (deposed, or past the deadline): a duty blocked in an AWS call is aborted.
    async fn abandon(mut self, ctx: &Context) {
        self.stop.cancel();
        self.duties.abort_all();
        while self.duties.join_next().await.is_some() {}
        ctx.state.set_role(Role::Follower, self.epoch);
    }
}

/// Returns the epoch still held when `stop` came (for a graceful step-down).
pub async fn election_loop(ctx: Arc<Context>, stop: CancellationToken) -> Option<u64> {
    let s = &ctx.state.settings;
    let me = s.worker_id.clone();
    let mut observer = CoordinatorObserver::default();
    let mut term: Option<Term> = None;
    let mut next_tick = Instant::now();
    let mut recheck_by: Option<Instant> = None;
    // The heartbeats as read once the coordinator post went silent, handed to the term this
    // worker may win (see `observe_heartbeats`), and when to look at the post again to tell
    // a missed renewal from a read that merely came just before one.
    let mut pre_term_liveness: Option<LivenessTracker> = None;
    let mut suspect_at: Option<Instant> = None;
    // One try per silence: followers of a post that looks silent because DynamoDB is
    // struggling must not all scan the heartbeats again at every look.
    let mut pre_term_read_tried = false;
    // The epoch of the silent post a takeover window was opened for.
    let mut takeover_watch: Option<u64> = None;
    // This turn renews because the worker's heartbeat just landed.
    let mut after_heartbeat = false;
    // The last verdict announcement seen (the stamp it came with, and its time left).
    let mut last_verdict: Option<(crate::meta::LeaseStamp, u64)> = None;

    loop {
        let mut wake = match (&term, recheck_by) {
            (None, Some(r)) if r < next_tick => r,
            _ => next_tick,
        };
        if term.is_none()
            && let Some(at) = suspect_at
        {
            wake = wake.min(at);
        }
        // The watchdog: wake at the term's deadline however the renewals fare.
        if let Some(t) = &term {
            wake = wake.min(t.deadline(s));
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(wake) => {}
            // A coordinator renews right after each heartbeat of its own worker lands, so the
            // renewal records it (a successor judges this worker from there) and the two
            // leave the same instant behind; the tick is a fallback while heartbeats fail.
            _ = ctx.state.heartbeat_landed.notified(), if term.is_some() => {
                next_tick = Instant::now();
                after_heartbeat = true;
            }
        }
        if let Some(t) = &term
            && Instant::now() >= t.deadline(s)
        {
            stop_duties_at_deadline(&ctx, term.take().expect("in a term")).await;
            continue;
        }
        if Instant::now() < next_tick {
            if term.is_some() {
                continue;
            }
        } else {
            next_tick += s.heartbeat_interval;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + s.heartbeat_interval;
            }
            // The fallback tick after a renewal that followed a heartbeat leaves the next
            // heartbeat an eighth of an interval to land first (still well within a renewal
            // interval plus the quarter followers allow before they take one as missed).
            if std::mem::take(&mut after_heartbeat) {
                next_tick += s.heartbeat_interval / 8;
            }
        }
        ctx.state.loop_went_round(crate::state::Loop::Election);

        if let Some(t) = term.as_mut() {
            if let Some(other) = ctx.state.instance_conflict() {
                let epoch = t.epoch;
                tracing::warn!(
                    epoch,
                    other = %other,
                    "another live instance holds this worker id; stepping down as coordinator"
                );
                term.take().expect("in a term").abandon(&ctx).await;
                if let Err(e) = ctx.meta.step_down(&me, epoch).await {
                    tracing::warn!(epoch, error = %e, "could not step down");
                }
                continue;
            }
            let sent = Instant::now();
            let deadline = t.deadline(s);
            let heartbeat = ctx.state.acknowledged_heartbeat();
            let renewal = ctx.meta.renew_coordinator(&me, t.epoch, heartbeat.as_ref());
            match timeout_at(deadline, renewal).await {
                Ok(Ok(_)) => {
                    t.renewed_at = sent;
                    ctx.state.term_renewed(sent);
                }
                Ok(Err(e)) if e.is_condition_failed() => {
                    tracing::warn!(
                        epoch = t.epoch,
                        "deposed: another worker holds the coordinator post"
                    );
                    term.take().expect("in a term").abandon(&ctx).await;
                }
                Ok(Err(e)) => {
                    let silent = sent.duration_since(t.renewed_at);
                    tracing::warn!(error = %e, silent_s = silent.as_secs_f64(), "cannot renew the coordinator post");
                }
                Err(_) => {
                    stop_duties_at_deadline(&ctx, term.take().expect("in a term")).await;
                }
            }
            continue;
        }

        // A claim needs lease_limits' epoch, read directly. Where a claim is plausible this
        // round (no live owner followed, or it is due to be judged silent), read both items
        // at once so a takeover waits for no extra round trip. That look is strongly
        // consistent (a claim goes by it); the others, one a heartbeat, are eventually
        // consistent at half the price.
        let claim_plausible = recheck_by.is_none_or(|r| Instant::now() >= r);
        let (row, limits) = if claim_plausible {
            let (row, limits) = tokio::join!(ctx.meta.read_coordinator(), ctx.meta.read_limit());
            (row, Some(limits))
        } else {
            (ctx.meta.follow_coordinator().await, None)
        };
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                ctx.state.coordinator_read(None);
                tracing::warn!(error = %e, "cannot read the coordinator item");
                // Try again at the next tick, not at a recheck instant already past (which
                // would spin while reads fail).
                recheck_by = None;
                suspect_at = None;
                continue;
            }
        };
        ctx.state.saw_coordinator(
            row.as_ref().map(|r| r.owner.clone()),
            row.as_ref().map_or(0, |r| r.epoch),
        );
        ctx.state
            .coordinator_read(row.as_ref().map(|r| crate::meta::SeenCoordinator {
                epoch: r.epoch,
                limit_stamp: r.limit_stamp,
                lease_stamp: r.lease_stamp,
            }));
        let min_epoch = ctx.state.limit().map_or(0, |l| l.epoch);
        let missed_after = row.as_ref().map_or(s.heartbeat_interval, |r| {
            renewal_missed_after(s.heartbeat_interval, r)
        });
        let read_at = Instant::now();
        // A silent worker's verdict, as the owner's last lease round announced it: a window
        // from each new announcement (one that stands still, its rounds stopped, is not
        // moved along look after look), withdrawn when a stamp of the term comes without one.
        let announced = row.as_ref().and_then(|r| {
            let stamp = r.lease_stamp.filter(|stamp| stamp.epoch == r.epoch)?;
            Some((stamp, r.verdict_due_in_ms))
        });
        match announced {
            Some((stamp, Some(ms))) if last_verdict != Some((stamp, ms)) => {
                last_verdict = Some((stamp, ms));
                // Bounded: a value written by hand cannot push the window out of reach.
                let due_in = Duration::from_millis(ms).min(s.failover_timeout * 2);
                ctx.state
                    .expect_lease_changes(ChangeSource::Verdict, Some(read_at + due_in));
            }
            Some((_, None)) => {
                last_verdict = None;
                ctx.state.expect_lease_changes(ChangeSource::Verdict, None);
            }
            _ => {}
        }
        let row_epoch = row.as_ref().map(|r| r.epoch);
        match observer.judge(row, read_at, s.failover_timeout, min_epoch) {
            Verdict::Follow {
                recheck_by: r,
                silent_since,
                ..
            } => {
                recheck_by = Some(r);
                if silent_since == read_at {
                    // Renewed since the last read.
                    pre_term_liveness = None;
                    pre_term_read_tried = false;
                    // The silent owner renewed after all: no takeover, withdraw the window.
                    // A new term is what the window waits for: it closes by itself.
                    if takeover_watch.is_some() && takeover_watch == row_epoch {
                        ctx.state.expect_lease_changes(ChangeSource::Takeover, None);
                    }
                    takeover_watch = None;
                }
                let suspect = silent_since + missed_after;
                if read_at < suspect {
                    suspect_at = Some(suspect);
                } else {
                    // Unchanged for more than a renewal interval: a renewal was missed. The
                    // post (and its worker's leases) may move when it is judged silent.
                    suspect_at = None;
                    // The window only once the takeover is near (within two heartbeats): a
                    // renewal that is merely late, on a loaded table, costs no reads.
                    if read_at + s.heartbeat_interval * 2 >= r {
                        ctx.state
                            .expect_lease_changes(ChangeSource::Takeover, Some(r));
                        takeover_watch = row_epoch;
                    }
                    if !pre_term_read_tried {
                        pre_term_read_tried = true;
                        pre_term_liveness =
                            observe_heartbeats(&ctx, observer.owner_heartbeat_seen()).await;
                    }
                }
            }
            Verdict::Claim { seen, next_epoch } => {
                recheck_by = None;
                suspect_at = None;
                if ctx.state.instance_conflict().is_some() {
                    // A duplicate of a live worker id never coordinates.
                    continue;
                }
                // A verdict from an eventually consistent look is confirmed by a strong read
                // first, so a stale answer costs no failed claim (which would start the
                // silence clock again). A row that moved on is judged at the next look.
                if limits.is_none() {
                    let key = crate::meta::CoordinatorRow::renewal_key;
                    match ctx.meta.read_coordinator().await {
                        Ok(fresh) if fresh.as_ref().map(key) == seen.as_ref().map(key) => {}
                        Ok(fresh) => {
                            tracing::debug!(
                                ?seen,
                                ?fresh,
                                "the coordinator item moved on since the look; not claiming"
                            );
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the coordinator item before claiming it");
                            continue;
                        }
                    }
                }
                // The new epoch must be above lease_limits' too, read now: this worker may
                // not have read any limit yet, and a lower epoch would be refused for ever.
                let limits = match limits {
                    Some(limits) => limits,
                    None => ctx.meta.read_limit().await,
                };
                let limits_epoch = match limits {
                    Ok(record) => record.map(|r| r.epoch),
                    Err(LimitReadError::Malformed(m)) => {
                        tracing::warn!("{m}: a new coordinator replaces it");
                        Some(m.epoch.unwrap_or(0))
                    }
                    Err(LimitReadError::Aws(e)) => {
                        tracing::warn!(error = %e, "cannot read lease_limits before claiming the coordinator post; not claiming now");
                        continue;
                    }
                };
                let next_epoch = next_epoch.max(claim_epoch(None, limits_epoch));
                let sent = Instant::now();
                match ctx
                    .meta
                    .claim_coordinator(
                        &me,
                        seen.as_ref(),
                        next_epoch,
                        s.failover_timeout,
                        s.heartbeat_interval,
                    )
                    .await
                {
                    Ok(_) => {
                        match &seen {
                            Some(prev) if !prev.is_vacant() => tracing::warn!(
                                epoch = next_epoch, previous = %prev.owner,
                                "took over the coordinator post from a silent coordinator"
                            ),
                            _ => tracing::info!(epoch = next_epoch, "became coordinator"),
                        }
                        observer.reset();
                        suspect_at = None;
                        pre_term_read_tried = false;
                        let liveness = pre_term_liveness.take().unwrap_or_default();
                        ctx.state.metrics.coordinator_takeovers.inc();
                        ctx.state.term_renewed(sent);
                        ctx.state.set_role(Role::Coordinator, next_epoch);
                        let term_stop = CancellationToken::new();
                        let mut duties = JoinSet::new();
                        duties.spawn(
                            run_term(ctx.clone(), next_epoch, term_stop.clone(), liveness)
                                .in_current_span(),
                        );
                        term = Some(Term {
                            epoch: next_epoch,
                            renewed_at: sent,
                            stop: term_stop,
                            duties,
                        });
                    }
                    Err(e) if e.is_condition_failed() => {
                        // Someone else won the race; follow them from the next read.
                        observer.reset();
                        pre_term_liveness = None;
                        pre_term_read_tried = false;
                        suspect_at = None;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot claim the coordinator post"),
                }
            }
        }
    }

    let epoch = term.as_ref().map(|t| t.epoch);
    if let Some(t) = term {
        t.end(&ctx).await;
    }
    epoch
}

/// One read of the heartbeats by a follower that saw the coordinator post go silent.
///
/// A new coordinator judges a worker dead only after `failover_timeout` without progress on
/// its own clock. Starting that clock when its term begins would leave a worker that died
/// with the old coordinator (usually the same process) unread for about two timeouts: one
/// until the post is taken over, another until the new term judges it. A follower that read
/// the heartbeats when the first renewal was missed brings that read to the term instead, so
/// the worker's leases move about `failover_timeout` after it went silent. The old owner's own
/// worker is judged from earlier still: its last renewal records the heartbeat it followed
/// (`owner_heartbeat`), so if the row still shows that heartbeat its silence counts from when
/// this follower first saw that renewal, the same instant the post's silence counts from, and
/// its leases move when the post does.
///
/// One read is enough, however long ago: the term's first round reads the heartbeats again,
/// and a worker that wrote anything in between shows a counter or instance never seen
/// before, which is progress (a process numbers its writes itself and sends each number
/// once, so even a row deleted and written again cannot show one twice; a row gone by then
/// counts as a change too). The verdict rule is the term's own, on the same clock. A read
/// that fails or takes longer than a heartbeat gives `None` (one try per silence: the term
/// then starts its own clock, as it would without this read).
async fn observe_heartbeats(
    ctx: &Context,
    owner_heartbeat: Option<(&str, &crate::meta::OwnerHeartbeat, Instant)>,
) -> Option<LivenessTracker> {
    let s = &ctx.state.settings;
    let issued = Instant::now();
    match tokio::time::timeout(s.heartbeat_interval, ctx.meta.scan_heartbeats()).await {
        Ok(Ok(rows)) => {
            let mut liveness = LivenessTracker::default();
            // The silent owner's own worker: if its row still shows the heartbeat its last
            // renewal recorded, it has been silent since that renewal was first seen here,
            // not only since this read (its successor can then reassign its leases when it
            // takes the post, not a failover timeout after).
            if let Some((owner, heartbeat, seen_by)) = owner_heartbeat {
                liveness.seed(owner, heartbeat.counter, &heartbeat.instance, seen_by);
            }
            liveness.observe_read(
                &rows,
                std::iter::empty(),
                issued,
                Instant::now(),
                s.failover_timeout,
            );
            Some(liveness)
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot read the heartbeats of a silent coordinator's fleet");
            None
        }
        Err(_) => None,
    }
}

/// The term's deadline passed without a successful renewal (the renewal failed or still
/// hangs): stop every duty now, before anyone may take the post over.
async fn stop_duties_at_deadline(ctx: &Context, term: Term) {
    let s = &ctx.state.settings;
    tracing::warn!(
        epoch = term.epoch,
        silent_s = term.renewed_at.elapsed().as_secs_f64(),
        "coordinator post not renewed within failover_timeout - heartbeat_interval ({:?}); \
         stopping the coordinator's duties",
        s.term_after()
    );
    term.abandon(ctx).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(limit: u64, shards: u64, workers: u64, deficit: u64) -> PublishedLimit {
        PublishedLimit {
            max_leases_per_worker: limit,
            shard_count: shards,
            worker_count: workers,
            desired_workers: None,
            live_workers: workers,
            cap: 80,
            capacity_deficit: deficit,
            workers_needed: shards.div_ceil(80),
            epoch: 1,
            version: 1,
            computed_by: "w".into(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn a_new_terms_unchanged_decision_says_so() {
        let old = rec(10, 30, 3, 0);
        let mut new = rec(10, 30, 3, 0);
        new.epoch = old.epoch + 1;
        assert_eq!(
            describe_change(Some(&old), &new),
            format!(
                "max_leases_per_worker 10: shards 30, workers 3 (unchanged; published again for epoch {})",
                new.epoch
            )
        );
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
