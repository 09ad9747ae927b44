//! One worker's loops: the heartbeat (and its fence watchdog) and reading the published limit;
//! it starts the lease loop ([`crate::lease_manager`]) and the election loop
//! ([`crate::coordinator::election_loop`]). `run` returns after a graceful shutdown: the coordinator steps
//! down so a successor need not wait for the failover timeout, and the heartbeat is removed.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::aws::{AwsClients, AwsError};
use crate::backoff::{Backoff, StartRetry, jitter};
use crate::config::Settings;
use crate::context::{Context, ticker};
use crate::coordinator;
use crate::election::{Holder, HolderObserver};
use crate::meta::{
    HeartbeatOwner, HeartbeatRow, LimitReadError, MetaStore, PublishedLimit, next_version,
    now_iso8601,
};
use crate::processor::RecordProcessor;
use crate::schema;
use crate::state::{Role, WorkerState};

pub struct Worker {
    ctx: Context,
}

impl Worker {
    pub fn new(settings: Settings, aws: AwsClients, kube: Option<kube::Client>) -> Self {
        let consumer_tuning = settings.consumer_tuning();
        let state = Arc::new(WorkerState::new(settings, aws.metrics.clone()));
        let meta = MetaStore::new(aws.clone(), state.settings.meta_table());
        Worker {
            ctx: Context {
                state,
                aws,
                meta,
                kube,
                processor: None,
                consumer_tuning,
                start_retry: StartRetry::default(),
                reading: true,
            },
        }
    }

    /// Hands every batch of records to `processor` too (after the built-in counting).
    pub fn with_processor(mut self, processor: Arc<dyn RecordProcessor>) -> Self {
        self.ctx.processor = Some(processor);
        self
    }

    /// Holds leases without polling them (for `kds-swarm`, which measures the lease protocol
    /// alone): each consumer reads until its shard is caught up (once, on a stream nobody
    /// writes to), finishing a closed parent as any reader would, then waits until it is
    /// stopped or fenced.
    pub fn without_reading(mut self) -> Self {
        self.ctx.reading = false;
        self
    }

    /// How start-up calls are retried (tests shorten it).
    pub fn with_start_retry(mut self, retry: StartRetry) -> Self {
        self.ctx.start_retry = retry;
        self
    }

    pub fn state(&self) -> Arc<WorkerState> {
        self.ctx.state.clone()
    }

    /// Waits until the stream is ACTIVE (before anything is written), then creates the tables
    /// if they are missing. A worker started before its stream (a StatefulSet applied together with the Job that creates the stream), or before
    /// AWS answers, waits instead of exiting into a crash loop. While it waits `/ready`
    /// names what it waits for and `kds_stream_missing` is 1; it retries with the
    /// [`StartRetry`] backoff (never more than `max_delay` apart), without an attempt limit.
    /// Returns `Ok(false)` if `stop` is cancelled first. Errors that waiting cannot fix (access
    /// denied, a malformed request) still end the start.
    pub async fn wait_to_start(&self, stop: &CancellationToken) -> Result<bool, AwsError> {
        let s = &self.ctx.state.settings;
        let state = &self.ctx.state;
        let policy = self.ctx.start_retry;
        let mut retry = 0u32;
        loop {
            retry = retry.saturating_add(1);
            let delay = policy.delay(retry, jitter());
            // SIGTERM is honoured at once, even in the middle of a call.
            let answer = tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                answer = crate::inputs::stream_summary(&self.ctx.aws, &s.stream_name) => answer,
            };
            let waiting = match answer {
                Ok(summary) if !summary.is_creating() => break,
                // The Job that creates the stream has started it: nothing to list or read yet.
                Ok(_) => {
                    state.metrics.stream_missing.set(1);
                    tracing::info!(
                        stream = %s.stream_name,
                        attempt = retry,
                        "the stream is being created; checking again in {delay:?}"
                    );
                    format!(
                        "waiting for stream {:?} to become ACTIVE (CREATING)",
                        s.stream_name
                    )
                }
                Err(AwsError::NotFound { .. }) => {
                    state.metrics.stream_missing.set(1);
                    tracing::warn!(
                        stream = %s.stream_name,
                        attempt = retry,
                        "the stream does not exist yet; checking again in {delay:?}"
                    );
                    format!(
                        "waiting for stream {:?} to be created (create it, or run `kds-worker init --shards N`)",
                        s.stream_name
                    )
                }
                Err(e) if e.is_transient() => {
                    // Whether the stream exists is unknown again.
                    state.metrics.stream_missing.set(0);
                    state.metrics.start_retries.inc();
                    tracing::warn!(
                        error = %e,
                        attempt = retry,
                        "DescribeStreamSummary failed at start; retrying in {delay:?}"
                    );
                    format!("waiting for Kinesis to answer DescribeStreamSummary: {e}")
                }
                Err(e) => {
                    state.set_start_wait(None);
                    state.metrics.stream_missing.set(0);
                    return Err(e);
                }
            };
            state.set_start_wait(Some(waiting));
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = sleep(delay) => {}
            }
        }
        state.metrics.stream_missing.set(0);
        if retry > 1 {
            tracing::info!(stream = %s.stream_name, attempts = retry, "the stream is ACTIVE; starting");
        }
        state.set_start_wait(Some("creating the lease and metadata tables".to_owned()));
        let (lease_table, meta_table) = (s.lease_table(), s.meta_table());
        let made = tokio::select! {
            _ = stop.cancelled() => return Ok(false),
            made = self.retrying("creating the tables", || {
                schema::ensure_tables(&self.ctx.aws, &lease_table, &meta_table)
            }) => made,
        };
        made?;
        state.set_start_wait(None);
        // Stopped just as the start finished: nothing may be written after SIGTERM.
        Ok(!stop.is_cancelled())
    }

    /// Runs `call` until it succeeds, fails for good, or [`StartRetry::attempts`] are spent.
    async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, AwsError>>,
    {
        let policy = self.ctx.start_retry;
        let mut retry = 0u32;
        loop {
            match call().await {
                Err(e) if e.is_transient() && retry + 1 < policy.attempts => {
                    retry += 1;
                    let delay = policy.delay(retry, jitter());
                    tracing::warn!(
                        error = %e,
                        retry,
                        retries = policy.attempts - 1,
                        delay_ms = delay.as_millis() as u64,
                        "{what} failed at start; retrying in {delay:?} ({retry} of {})",
                        policy.attempts - 1
                    );
                    self.ctx.state.metrics.start_retries.inc();
                    sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Runs until `stop` is cancelled, then shuts down gracefully. Dropping (aborting) the
    /// returned future instead simulates a crash: every loop stops without cleaning up.
    pub async fn run(self, stop: CancellationToken) {
        let ctx = Arc::new(self.ctx);
        let loops_stop = CancellationToken::new();
        // The heartbeat (and its fence watchdog) outlive the lease loop at shutdown: a slow
        // hand-back must not fence itself and skip its final checkpoints.
        let heartbeat_stop = CancellationToken::new();
        let mut loops = JoinSet::new();
        let mut heartbeat = JoinSet::new();
        heartbeat.spawn(heartbeat_loop(ctx.clone(), heartbeat_stop.clone()).in_current_span());
        heartbeat.spawn(fence_watchdog(ctx.clone(), heartbeat_stop.clone()).in_current_span());
        loops.spawn(limit_loop(ctx.clone(), loops_stop.clone()).in_current_span());
        loops.spawn(
            crate::lease_manager::lease_loop(ctx.clone(), loops_stop.clone()).in_current_span(),
        );
        let election = tokio::spawn(
            coordinator::election_loop(ctx.clone(), loops_stop.clone()).in_current_span(),
        );
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
        heartbeat_stop.cancel();
        while heartbeat.join_next().await.is_some() {}
        match ctx.meta.delete_heartbeat(&ctx.heartbeat_owner()).await {
            Ok(()) => {}
            Err(e) if e.is_condition_failed() => {
                tracing::info!("the heartbeat item belongs to another instance; left alone")
            }
            Err(e) => tracing::warn!(error = %e, "could not remove the heartbeat item"),
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

/// Renews the heartbeat every interval (sooner after a failed write), each write bounded by
/// `heartbeat_write_timeout` (one interval before the fence: a slower write counts as failed,
/// so the fence cannot be outrun by one hung call). While another live process holds this
/// worker id's row, this one stays fenced and watches it; once it has been silent for the
/// failover timeout on this process's clock, the row is taken over.
async fn heartbeat_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let s = &ctx.state.settings;
    let me = ctx.heartbeat_owner();
    let mut tick = ticker(s.heartbeat_interval);
    let mut holder = HolderObserver::default();
    let mut take_over: Option<HeartbeatRow> = None;
    let mut warned_about: Option<String> = None;
    // The counter each write sets: one number per attempt, so a row's (instance, counter)
    // never repeats, even when the row is deleted and written again.
    let mut writes: u64 = 0;
    // After a failed write the next attempt (with a new number) comes sooner than the next
    // interval, as the SDK's own retries would have (they are off for this write): within a
    // quarter interval, then a half, then at the interval, with jitter, so a brief fault
    // costs no heartbeat and a table that stays throttled is not pressed harder.
    let mut retry = Backoff::new(s.heartbeat_interval / 4, s.heartbeat_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ctx.state.loop_went_round(crate::state::Loop::Heartbeat);
        let sent = Instant::now();
        writes += 1;
        let write = ctx.meta.heartbeat(
            &me,
            writes,
            ctx.state.leases_held(),
            s.heartbeat_ttl(),
            take_over.as_ref(),
        );
        let result = match tokio::time::timeout(s.heartbeat_write_timeout(), write).await {
            Ok(result) => result,
            Err(_) => Err(AwsError::Unavailable {
                operation: "UpdateItem",
                message: format!(
                    "heartbeat write took longer than {:?} (one heartbeat before the fence)",
                    s.heartbeat_write_timeout()
                ),
            }),
        };
        match result {
            Ok(_) => {
                retry.reset();
                if let Some(row) = take_over.take() {
                    tracing::warn!(
                        previous = row.instance.as_deref().unwrap_or(""),
                        instance = %me.instance,
                        "took worker id {} over from a silent instance", me.worker_id
                    );
                }
                holder.reset();
                warned_about = None;
                if ctx.state.set_instance_conflict(None) {
                    tracing::info!(instance = %me.instance, "this instance now holds worker id {}", me.worker_id);
                }
                ctx.state.heartbeat_result(sent, Ok(()));
                ctx.state.heartbeat_acknowledged(writes);
            }
            Err(e) if e.is_condition_failed() => {
                take_over = None;
                let why =
                    other_instance(&ctx, &me, &mut holder, &mut take_over, &mut warned_about).await;
                ctx.state.heartbeat_result(sent, Err(why));
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                ctx.state.heartbeat_result(sent, Err(e.to_string()));
                let at = Instant::now() + retry.next_wait();
                if at < sent + s.heartbeat_interval {
                    tick.reset_at(at);
                }
            }
        }
        if let Some(ok) = ctx.state.last_heartbeat_ok() {
            ctx.state
                .metrics
                .heartbeat_age_seconds
                .set(ok.elapsed().as_secs_f64());
        }
    }
}

/// The heartbeat write was refused: another instance holds this worker id's row. Judges it
/// and returns the reason for `/ready`; sets `take_over` once it is silent.
async fn other_instance(
    ctx: &Context,
    me: &HeartbeatOwner,
    holder: &mut HolderObserver,
    take_over: &mut Option<HeartbeatRow>,
    warned_about: &mut Option<String>,
) -> String {
    let s = &ctx.state.settings;
    let read = tokio::time::timeout(
        s.heartbeat_write_timeout(),
        ctx.meta.read_heartbeat(&me.worker_id),
    )
    .await;
    let row = match read {
        Ok(Ok(Some(row))) if row.instance.as_deref() != Some(me.instance.as_str()) => row,
        // Deleted or ours again meanwhile: the next write decides.
        Ok(Ok(_)) => return "heartbeat item changed during the write; retrying".to_owned(),
        Ok(Err(e)) => return format!("cannot read the heartbeat item: {e}"),
        Err(_) => return "cannot read the heartbeat item: timed out".to_owned(),
    };
    match holder.judge(&row, Instant::now(), s.failover_timeout) {
        Holder::Live { instance, .. } => {
            if warned_about.as_deref() != Some(instance.as_str()) {
                tracing::warn!(
                    other = %instance,
                    instance = %me.instance,
                    "worker id {} is held by another live instance {instance}: not processing \
                     records until it stops or stays silent for the failover timeout",
                    me.worker_id
                );
                *warned_about = Some(instance.clone());
            }
            ctx.state.set_instance_conflict(Some(instance.clone()));
            format!("worker id held by another live instance {instance}")
        }
        Holder::Silent { instance } => {
            tracing::warn!(
                other = %instance,
                instance = %me.instance,
                "instance {instance} holding worker id {} has been silent for the failover \
                 timeout; taking over", me.worker_id
            );
            ctx.state.set_instance_conflict(Some(instance.clone()));
            *take_over = Some(row);
            format!("taking worker id over from silent instance {instance}")
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

/// Until this worker has its first limit, it reads `lease_limits` again after this, for
/// [`FIRST_LIMIT_QUICK_READS`] reads, then after twice as long each time up to
/// `heartbeat_interval`: a fleet starting together reads before its coordinator has
/// published (an election, a `DescribeStreamSummary` and a scan, well under a second), and
/// `/ready` should not wait a whole heartbeat, nor half a second, for the next look.
const FIRST_LIMIT_RETRY: Duration = Duration::from_millis(100);

/// Reads `FIRST_LIMIT_RETRY` apart before the retries space out: at most this many extra
/// reads per worker start.
const FIRST_LIMIT_QUICK_READS: u32 = 10;

/// Reads `lease_limits` into the worker's state. The coordinator reads it every heartbeat; a
/// follower when the coordinator row it read shows a limit it does not hold, and at least
/// once a `stamp_refresh_interval` ([`crate::meta::limit_read_due`]): the row, which followers read
/// every heartbeat anyway, carries the stamp of the latest publication.
async fn limit_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let heartbeat = ctx.state.settings.heartbeat_interval;
    let refresh = ctx.state.settings.stamp_refresh_interval();
    let mut tick = ticker(heartbeat);
    let mut coordinator_reads = ctx.state.coordinator_reads();
    let mut first_retry = FIRST_LIMIT_RETRY;
    let mut quick_reads = 0;
    let mut last_read: Option<Instant> = None;
    // Read once now, whatever the stamp says (see `WorkerState::limit_check`).
    let mut force_read = false;
    let mut last_seen: Option<(u64, u64)> = None;
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            // A row read that shows something new: a newer limit is read now, not a tick later.
            Ok(()) = coordinator_reads.changed() => {}
            // The lease loop found itself given more leases than the limit it holds: the
            // coordinator publishes before it assigns, so a higher limit is out. Read now,
            // not at the look that would show its stamp.
            _ = ctx.state.limit_check.notified() => force_read = true,
        }
        ctx.state.loop_went_round(crate::state::Loop::Limit);
        // A row read more than two heartbeats ago (the election loop is stuck in a slow call,
        // or this worker coordinated meanwhile) tells nothing: read.
        let fresh = coordinator_reads
            .borrow_and_update()
            .filter(|(_, read_at)| read_at.elapsed() <= heartbeat * 2);
        let seen = fresh.map(|(seen, _)| seen);
        let held = ctx.state.limit().map(|l| l.stamp());
        if ctx.state.role().0 == Role::Follower
            && !std::mem::take(&mut force_read)
            && !crate::meta::limit_read_due(held, seen, last_read.map(|t| t.elapsed()), refresh)
        {
            // The look that showed the stamp already counted as a read for /ready.
            continue;
        }
        let sent = Instant::now();
        let result = ctx.meta.read_limit().await;
        if result.is_ok() {
            last_read = Some(sent);
        }
        if ctx.state.limit().is_none() && !matches!(result, Ok(Some(_))) && first_retry < heartbeat
        {
            tick.reset_after(first_retry);
            quick_reads += 1;
            if quick_reads >= FIRST_LIMIT_QUICK_READS {
                first_retry *= 2;
            }
        }
        match result {
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
                last_problem = None;
                ctx.state.limit_read_result(Ok(record));
            }
            Err(LimitReadError::Malformed(m)) => {
                let problem = m.to_string();
                if last_problem.as_ref() != Some(&problem) {
                    match ctx.state.limit() {
                        Some(last) => tracing::warn!(
                            "{problem}: not obeying it; keeping the last good limit {}",
                            last.max_leases_per_worker
                        ),
                        None => {
                            tracing::warn!("{problem}: not obeying it; no good limit known yet")
                        }
                    }
                }
                last_problem = Some(problem.clone());
                last_seen = None;
                ctx.state.limit_malformed(problem);
                replace_malformed_limit(&ctx).await;
            }
            Err(LimitReadError::Aws(e)) => {
                tracing::warn!(error = %e, "cannot read lease_limits");
                ctx.state.limit_read_result(Err(e.to_string()));
            }
        }
    }
}

/// The coordinator replaces a malformed `lease_limits` item with the last good limit it knows
/// (its own latest publication) at once, whether or not its inputs changed. Without one, its
/// term publishes as soon as it has inputs.
async fn replace_malformed_limit(ctx: &Context) {
    let (role, epoch) = ctx.state.role();
    if role != Role::Coordinator {
        return;
    }
    let Some(last) = ctx.state.limit() else {
        return;
    };
    let record = PublishedLimit {
        epoch,
        version: next_version(Some(&last), epoch),
        computed_by: ctx.state.settings.worker_id.clone(),
        updated_at: now_iso8601(),
        ..last
    };
    match ctx.meta.publish_limit(&record).await {
        Ok(()) => {
            tracing::warn!(
                epoch,
                version = record.version,
                max_leases_per_worker = record.max_leases_per_worker,
                "replaced the malformed lease_limits item with the last good limit"
            );
            ctx.state.metrics.lease_limit_publications.inc();
            ctx.state.published(record);
        }
        Err(e) => tracing::warn!(error = %e, "cannot replace the malformed lease_limits item"),
    }
}
