//! One worker's loops: heartbeat, election (and, while elected, the coordinator's term), and
//! reading the published limit. `run` returns after a graceful shutdown: the coordinator steps
//! down so a successor need not wait for the failover timeout, and the heartbeat is removed.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aws::{AwsClients, AwsError};
use crate::config::Settings;
use crate::consumer::{ConsumerTuning, RecordProcessor};
use crate::coordinator;
use crate::election::{CoordinatorObserver, Verdict};
use crate::schema;
use crate::state::{Role, WorkerState};
use crate::store::MetaStore;

/// Heartbeat items outlive their worker by this much before DynamoDB's TTL may remove them
/// (the coordinator removes dead ones much sooner; TTL is the backstop when none runs).
const HEARTBEAT_TTL: Duration = Duration::from_secs(3600);

/// Everything the loops share.
pub struct Context {
    pub state: Arc<WorkerState>,
    pub aws: AwsClients,
    pub meta: MetaStore,
    pub kube: Option<kube::Client>,
    /// The application's record processor, called after the built-in counting.
    pub processor: Option<Arc<dyn RecordProcessor>>,
    pub consumer_tuning: ConsumerTuning,
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("stream {stream:?} does not exist (create it, or run `kds-worker init --shards N`)")]
    UnknownStream { stream: String },
    #[error("cannot reach AWS: {0}")]
    Aws(#[from] AwsError),
}

pub struct Worker {
    ctx: Context,
}

impl Worker {
    pub fn new(settings: Settings, aws: AwsClients, kube: Option<kube::Client>) -> Self {
        let state = Arc::new(WorkerState::new(settings, aws.metrics.clone()));
        let meta = MetaStore::new(aws.clone(), state.settings.meta_table());
        Worker {
            ctx: Context {
                state,
                aws,
                meta,
                kube,
                processor: None,
                consumer_tuning: ConsumerTuning::default(),
            },
        }
    }

    /// Hands every batch of records to `processor` too (after the built-in counting).
    pub fn with_processor(mut self, processor: Arc<dyn RecordProcessor>) -> Self {
        self.ctx.processor = Some(processor);
        self
    }

    pub fn with_consumer_tuning(mut self, tuning: ConsumerTuning) -> Self {
        self.ctx.consumer_tuning = tuning;
        self
    }

    pub fn state(&self) -> Arc<WorkerState> {
        self.ctx.state.clone()
    }

    /// Checks that the stream exists (before anything is written), then creates the tables if
    /// they are missing. The one Kinesis control-plane call a follower makes is this one.
    pub async fn prepare(&self) -> Result<(), StartError> {
        let s = &self.ctx.state.settings;
        match crate::inputs::open_shard_count(&self.ctx.aws, &s.stream_name).await {
            Ok(_) => {}
            Err(AwsError::NotFound { .. }) => {
                return Err(StartError::UnknownStream {
                    stream: s.stream_name.clone(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        schema::ensure_tables(&self.ctx.aws, &s.lease_table(), &s.meta_table()).await?;
        Ok(())
    }

    /// Runs until `stop` is cancelled, then shuts down gracefully. Dropping (aborting) the
    /// returned future instead simulates a crash: every loop stops without cleaning up.
    pub async fn run(self, stop: CancellationToken) {
        let ctx = Arc::new(self.ctx);
        let loops_stop = CancellationToken::new();
        let mut loops = JoinSet::new();
        loops.spawn(heartbeat_loop(ctx.clone(), loops_stop.clone()).in_current_span());
        loops.spawn(limit_loop(ctx.clone(), loops_stop.clone()).in_current_span());
        loops.spawn(
            crate::lease_manager::lease_loop(ctx.clone(), loops_stop.clone()).in_current_span(),
        );
        loops.spawn(fence_watchdog(ctx.clone(), loops_stop.clone()).in_current_span());
        let election =
            tokio::spawn(election_loop(ctx.clone(), loops_stop.clone()).in_current_span());
        // Aborting `run` must abort the election loop too (it owns the coordinator's term).
        let election = AbortOnDrop(Some(election));

        stop.cancelled().await;
        tracing::info!("shutting down");
        loops_stop.cancel();
        // Step down first, while the lease loop hands its leases back: a successor need not
        // wait for either.
        let term = election.join().await;
        let me = &ctx.state.settings.worker_id;
        if let Some(epoch) = term {
            match ctx.meta.step_down(me, epoch).await {
                Ok(()) => tracing::info!(epoch, "stepped down as coordinator"),
                Err(e) => {
                    tracing::warn!(epoch, error = %e, "could not step down; a successor takes over after the failover timeout")
                }
            }
        }
        while loops.join_next().await.is_some() {}
        if let Err(e) = ctx.meta.delete_heartbeat(me).await {
            tracing::warn!(error = %e, "could not remove the heartbeat item");
        }
        ctx.state.set_role(Role::Follower, ctx.state.role().1);
        tracing::info!("stopped");
    }
}

struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> T {
        let handle = self.0.take().expect("joined once");
        match handle.await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = interval(period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

async fn heartbeat_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let s = &ctx.state.settings;
    let mut tick = ticker(s.heartbeat_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ctx.state.beat("heartbeat");
        let sent = Instant::now();
        let result = ctx
            .meta
            .heartbeat(&s.worker_id, ctx.state.leases_held(), HEARTBEAT_TTL)
            .await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        ctx.state
            .heartbeat_result(sent, result.map(|_| ()).map_err(|e| e.to_string()));
        if let Some(ok) = ctx.state.last_heartbeat_ok() {
            ctx.state
                .metrics
                .heartbeat_age_seconds
                .set(ok.elapsed().as_secs_f64());
        }
    }
}

/// Raises the fence at the exact instant the heartbeat has been stale for
/// `failover_timeout - heartbeat_interval`, however long a blocked AWS call takes elsewhere.
async fn fence_watchdog(ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        let wake = ctx
            .state
            .fence_deadline()
            .filter(|d| *d > Instant::now())
            .unwrap_or_else(|| Instant::now() + ctx.state.settings.heartbeat_interval);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sleep_until(wake) => {}
        }
        ctx.state.update_fence();
    }
}

async fn limit_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let mut tick = ticker(ctx.state.settings.heartbeat_interval);
    let mut last_seen: Option<(u64, u64)> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ctx.state.beat("limit");
        match ctx.meta.read_limit().await {
            Ok(record) => {
                if let Some(r) = &record
                    && last_seen != Some((r.epoch, r.version))
                    && ctx.state.role().0 == Role::Follower
                {
                    tracing::info!(
                        max_leases_per_worker = r.max_leases_per_worker,
                        version = r.version,
                        epoch = r.epoch,
                        computed_by = %r.computed_by,
                        "obeying lease limit {}", r.max_leases_per_worker
                    );
                }
                last_seen = record.as_ref().map(|r| (r.epoch, r.version));
                ctx.state.limit_read_result(Ok(record));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read lease_limits");
                ctx.state.limit_read_result(Err(e.to_string()));
            }
        }
    }
}

/// The coordinator's term as the election loop holds it.
struct Term {
    epoch: u64,
    /// When the last successful claim or renewal was *sent*: others judge our silence from a
    /// later instant, so stepping down locally `failover_timeout` after this is always before
    /// anyone can take over.
    renewed_at: Instant,
    stop: CancellationToken,
    duties: JoinSet<()>,
}

impl Term {
    async fn end(mut self, ctx: &Context) {
        self.stop.cancel();
        while self.duties.join_next().await.is_some() {}
        ctx.state.set_role(Role::Follower, self.epoch);
    }
}

/// Returns the epoch still held when `stop` came (for a graceful step-down).
async fn election_loop(ctx: Arc<Context>, stop: CancellationToken) -> Option<u64> {
    let s = &ctx.state.settings;
    let me = s.worker_id.clone();
    let mut observer = CoordinatorObserver::default();
    let mut term: Option<Term> = None;
    let mut next_tick = Instant::now();
    let mut recheck_by: Option<Instant> = None;

    loop {
        let wake = match (&term, recheck_by) {
            (None, Some(r)) if r < next_tick => r,
            _ => next_tick,
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sleep_until(wake) => {}
        }
        if Instant::now() >= next_tick {
            next_tick += s.heartbeat_interval;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + s.heartbeat_interval;
            }
        }
        ctx.state.beat("election");

        if let Some(t) = term.as_mut() {
            let sent = Instant::now();
            match ctx.meta.renew_coordinator(&me, t.epoch).await {
                Ok(_) => t.renewed_at = sent,
                Err(e) if e.is_condition_failed() => {
                    tracing::warn!(
                        epoch = t.epoch,
                        "deposed: another worker holds the coordinator post"
                    );
                    term.take().expect("in a term").end(&ctx).await;
                }
                Err(e) => {
                    let silent = sent.duration_since(t.renewed_at);
                    tracing::warn!(error = %e, silent_s = silent.as_secs_f64(), "cannot renew the coordinator post");
                    if silent >= s.failover_timeout {
                        tracing::warn!(
                            epoch = t.epoch,
                            "coordinator post not renewed within the failover timeout; stepping down locally"
                        );
                        term.take().expect("in a term").end(&ctx).await;
                    }
                }
            }
            continue;
        }

        let row = match ctx.meta.read_coordinator().await {
            Ok(row) => row,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the coordinator item");
                continue;
            }
        };
        ctx.state.saw_coordinator(
            row.as_ref().map(|r| r.owner.clone()),
            row.as_ref().map_or(0, |r| r.epoch),
        );
        let min_epoch = ctx.state.limit().map_or(0, |l| l.epoch);
        match observer.judge(row, Instant::now(), s.failover_timeout, min_epoch) {
            Verdict::Follow { recheck_by: r, .. } => recheck_by = Some(r),
            Verdict::Claim { seen, next_epoch } => {
                recheck_by = None;
                let sent = Instant::now();
                match ctx
                    .meta
                    .claim_coordinator(&me, seen.as_ref(), next_epoch)
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
                        ctx.state.metrics.coordinator_takeovers.inc();
                        ctx.state.set_role(Role::Coordinator, next_epoch);
                        let term_stop = CancellationToken::new();
                        let mut duties = JoinSet::new();
                        duties.spawn(
                            coordinator::run_term(ctx.clone(), next_epoch, term_stop.clone())
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
