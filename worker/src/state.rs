//! What one worker knows about itself, shared by its loops and its HTTP endpoints.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::Settings;
use crate::meta::PublishedLimit;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    Follower,
}

/// The loops whose liveness `/health` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Loop {
    /// Renews this worker's heartbeat row (and raises the fence when it cannot).
    Heartbeat,
    /// Claims, renews or watches the coordinator post.
    Election,
    /// Reads the published limit.
    Limit,
    /// Acquires, renews and hands off shard leases.
    Lease,
}

impl Loop {
    pub const ALL: [Loop; 4] = [Loop::Heartbeat, Loop::Election, Loop::Limit, Loop::Lease];

    pub fn name(self) -> &'static str {
        match self {
            Loop::Heartbeat => "heartbeat",
            Loop::Election => "election",
            Loop::Limit => "limit",
            Loop::Lease => "lease",
        }
    }
}

pub use crate::assignment::Coverage;

/// One held lease in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct HeldLease {
    pub shard_id: String,
    pub records: u64,
    pub bytes: u64,
}

#[derive(Debug)]
struct Inner {
    role: Role,
    /// Epoch of the coordinator post as last seen (own epoch while coordinating).
    epoch: u64,
    coordinator: Option<String>,
    limit: Option<PublishedLimit>,
    leases: Vec<String>,
    /// Held leases this worker cannot read, with the reason.
    unreadable: BTreeMap<String, String>,
    coverage: Option<Coverage>,
    lease_rounds: u64,
    last_heartbeat_ok: Option<Instant>,
    /// The counter of the last heartbeat written and acknowledged.
    last_heartbeat_counter: Option<u64>,
    last_heartbeat_error: Option<String>,
    last_limit_read_ok: Option<Instant>,
    last_limit_read_error: Option<String>,
    /// Why the last `lease_limits` read could not be obeyed (a malformed item).
    limit_problem: Option<String>,
    /// Another live instance holding this worker id's heartbeat row.
    instance_conflict: Option<String>,
    /// Held shards whose Kinesis reads fail: since when (the first failure not followed by a
    /// success) and the last error.
    failing_reads: BTreeMap<String, (Instant, String)>,
    /// The coordinator's Kinesis calls about the stream that fail (`ListShards`,
    /// `DescribeStreamSummary`): since when, and the last error.
    failing_stream_calls: BTreeMap<&'static str, (Instant, String)>,
    /// What start-up is waiting for (the stream to exist, AWS to answer); `None` once started.
    start_wait: Option<String>,
    /// Changes every time the fence is up (raised by the watchdog, seen up when a heartbeat
    /// lands, or a second instance of this worker id): a consumer acquired before a change
    /// must not read after it, even if the fence has dropped again meanwhile.
    fence_epoch: u64,
    /// When the last successful coordinator claim or renewal was sent.
    term_renewed: Option<Instant>,
    /// When each loop last went round.
    loops_alive: BTreeMap<Loop, Instant>,
}

/// A random 128-bit instance id (32 hex digits) for this process. Two processes started with
/// one worker id tell their heartbeats apart by it. Seeded from the standard library's
/// per-process random hash keys, the clock and the process id.
pub fn new_instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_u64(n);
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

/// Shared, lock-protected worker state. Locks are held only to copy values in or out.
pub struct WorkerState {
    pub settings: Settings,
    /// This process's random instance id ([`new_instance_id`]), written into its heartbeat.
    pub instance: String,
    pub metrics: Metrics,
    /// Records and bytes per shard (the default record processor), for `/status`.
    pub counting: crate::processor::CountingProcessor,
    started: Instant,
    inner: Mutex<Inner>,
    /// True while this worker must not process records (see [`WorkerState::may_process`]).
    fenced: tokio::sync::watch::Sender<bool>,
    /// Woken when a new `lease_limits` version arrives: the lease loop obeys it at once
    /// instead of at its next round.
    pub limit_changed: tokio::sync::Notify,
    /// Woken when this worker, as coordinator, assigned leases to itself: its lease loop
    /// takes them at once.
    pub leases_assigned: tokio::sync::Notify,
    /// Woken when the lease loop finds this worker owning more leases than the limit it holds
    /// allows: the limit loop reads `lease_limits` at once (see `lease_manager`).
    pub limit_check: tokio::sync::Notify,
    /// Woken when a heartbeat write is acknowledged: a coordinator renews its post right
    /// after, recording that heartbeat (see [`WorkerState::acknowledged_heartbeat`]).
    pub heartbeat_landed: tokio::sync::Notify,
    /// The `(epoch, version)` of the limit in force, for any loop that waits for a new one
    /// (the coordinator's lease rounds).
    limit_version: tokio::sync::watch::Sender<(u64, u64)>,
    /// The coordinator row as this worker last read it as a follower (`None`: not read yet,
    /// or the last read failed); a change wakes the limit loop, which reads `lease_limits`
    /// when the row shows a limit this worker does not hold.
    coordinator_seen: tokio::sync::watch::Sender<Option<(crate::meta::SeenCoordinator, Instant)>>,
    /// Windows in which this worker's leases are likely to change, one per
    /// [`ChangeSource`] (see [`WorkerState::expect_lease_changes`]).
    lease_changes_expected: tokio::sync::watch::Sender<ChangeWindows>,
}

/// Why this worker's leases may move soon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSource {
    /// A silent worker's verdict, as the coordinator item announces it.
    Verdict = 0,
    /// The coordinator's own renewal missed: a takeover, and its worker's verdict.
    Takeover = 1,
}

/// One `(from, until)` window per [`ChangeSource`].
pub type ChangeWindows = [Option<(Instant, Instant)>; 2];

/// `GET /status` body.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub worker_id: String,
    /// This process's instance id (see [`new_instance_id`]).
    pub instance: String,
    pub role: Role,
    pub epoch: u64,
    pub coordinator: Option<String>,
    pub ready: bool,
    pub not_ready_reasons: Vec<String>,
    pub leases_held: u64,
    pub leases: Vec<HeldLease>,
    /// Leases held but not read, with the reason (their shards do not count as covered).
    pub unreadable_leases: BTreeMap<String, String>,
    pub max_leases_per_worker: Option<u64>,
    pub coverage: Option<Coverage>,
    /// The inputs and output of the formula as last published.
    pub lease_limits: Option<PublishedLimit>,
    pub uptime_seconds: u64,
}

impl WorkerState {
    pub fn new(settings: Settings, metrics: Metrics) -> Self {
        let counting = crate::processor::CountingProcessor::new(
            metrics.records_processed.clone(),
            metrics.bytes_processed.clone(),
        );
        WorkerState {
            settings,
            instance: new_instance_id(),
            metrics,
            counting,
            started: Instant::now(),
            // Fenced until the first heartbeat succeeds.
            fenced: tokio::sync::watch::Sender::new(true),
            limit_changed: tokio::sync::Notify::new(),
            leases_assigned: tokio::sync::Notify::new(),
            heartbeat_landed: tokio::sync::Notify::new(),
            limit_check: tokio::sync::Notify::new(),
            limit_version: tokio::sync::watch::Sender::new((0, 0)),
            coordinator_seen: tokio::sync::watch::Sender::new(None),
            lease_changes_expected: tokio::sync::watch::Sender::new([None; 2]),
            inner: Mutex::new(Inner {
                role: Role::Follower,
                epoch: 0,
                coordinator: None,
                limit: None,
                leases: Vec::new(),
                unreadable: BTreeMap::new(),
                coverage: None,
                lease_rounds: 0,
                last_heartbeat_ok: None,
                last_heartbeat_counter: None,
                last_heartbeat_error: None,
                failing_reads: BTreeMap::new(),
                failing_stream_calls: BTreeMap::new(),
                start_wait: None,
                last_limit_read_ok: None,
                last_limit_read_error: None,
                limit_problem: None,
                instance_conflict: None,
                fence_epoch: 0,
                term_renewed: None,
                loops_alive: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the plain values inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start-up is waiting for `what` (`None`: no longer waiting). While it waits, that is the
    /// one reason `/ready` gives: nothing else has started.
    /// Waiting is not stuck: `/health` stays 200, and each loop's allowance starts when the
    /// wait ends.
    pub fn set_start_wait(&self, what: Option<String>) {
        let mut g = self.lock();
        if g.start_wait.is_some() && what.is_none() {
            let now = Instant::now();
            for l in Loop::ALL {
                g.loops_alive.insert(l, now);
            }
        }
        g.start_wait = what;
    }

    /// `l` went round just now (what `/health` judges liveness by).
    pub fn loop_went_round(&self, l: Loop) {
        self.lock().loops_alive.insert(l, Instant::now());
    }

    pub fn set_role(&self, role: Role, epoch: u64) {
        let mut g = self.lock();
        if g.role != role {
            // A new term starts with a clean record of the stream calls.
            g.failing_stream_calls.clear();
            self.metrics.failing_stream_calls.set(0);
        }
        g.role = role;
        g.epoch = epoch;
        if role == Role::Coordinator {
            g.coordinator = Some(self.settings.worker_id.clone());
        }
        self.metrics
            .is_coordinator
            .set(i64::from(role == Role::Coordinator));
        self.metrics.coordinator_epoch.set(epoch as i64);
    }

    pub fn role(&self) -> (Role, u64) {
        let g = self.lock();
        (g.role, g.epoch)
    }

    /// The coordinator row as a follower saw it.
    pub fn saw_coordinator(&self, owner: Option<String>, epoch: u64) {
        let mut g = self.lock();
        if g.role == Role::Follower {
            g.coordinator = owner.filter(|o| !o.is_empty());
            g.epoch = epoch;
            self.metrics.coordinator_epoch.set(epoch as i64);
        }
    }

    pub fn heartbeat_result(&self, sent: Instant, result: Result<(), String>) {
        {
            let mut g = self.lock();
            match result {
                Ok(()) => {
                    let fence_after = self.settings.fence_after();
                    if g.last_heartbeat_ok
                        .is_none_or(|t| t.elapsed() >= fence_after)
                    {
                        // The fence was up until this heartbeat, seen or not.
                        g.fence_epoch += 1;
                    }
                    g.last_heartbeat_ok = Some(sent);
                    g.last_heartbeat_error = None;
                }
                Err(e) => g.last_heartbeat_error = Some(e),
            }
        }
        self.update_fence();
    }

    /// Heartbeat number `counter` of this process was written and acknowledged.
    pub fn heartbeat_acknowledged(&self, counter: u64) {
        self.lock().last_heartbeat_counter = Some(counter);
        self.heartbeat_landed.notify_one();
    }

    /// This process's last acknowledged heartbeat, as a coordinator renewal records it: its
    /// row showed this counter (or a later one) before the renewal was sent.
    pub fn acknowledged_heartbeat(&self) -> Option<crate::meta::OwnerHeartbeat> {
        self.lock()
            .last_heartbeat_counter
            .map(|counter| crate::meta::OwnerHeartbeat {
                counter,
                instance: self.instance.clone(),
            })
    }

    /// The instant [`WorkerState::may_process`] turns false unless a heartbeat succeeds first.
    pub fn fence_deadline(&self) -> Option<Instant> {
        let fence_after = self.settings.fence_after();
        self.lock().last_heartbeat_ok.map(|t| t + fence_after)
    }

    /// Another live process holds this worker id's heartbeat row (`Some(its instance id)`):
    /// this one stays fenced and not ready until that one goes silent. Returns whether the
    /// conflict began or ended with this call.
    pub fn set_instance_conflict(&self, other: Option<String>) -> bool {
        let changed = {
            let mut g = self.lock();
            let changed = g.instance_conflict.is_some() != other.is_some();
            if other.is_some() {
                g.fence_epoch += 1;
            }
            g.instance_conflict = other;
            changed
        };
        self.metrics
            .worker_id_conflict
            .set(i64::from(self.instance_conflict().is_some()));
        self.update_fence();
        changed
    }

    /// The other instance holding this worker id, if any.
    pub fn instance_conflict(&self) -> Option<String> {
        self.lock().instance_conflict.clone()
    }

    /// The election loop records when each successful claim or renewal was sent.
    pub fn term_renewed(&self, sent: Instant) {
        self.lock().term_renewed = Some(sent);
    }

    /// When the last successful coordinator claim or renewal was sent (kept after the term
    /// ended, for reports and tests).
    pub fn last_term_renewal(&self) -> Option<Instant> {
        self.lock().term_renewed
    }

    /// The instant the coordinator's duties stop unless a renewal succeeds first.
    pub fn term_deadline(&self) -> Option<Instant> {
        let g = self.lock();
        (g.role == Role::Coordinator)
            .then_some(g.term_renewed)
            .flatten()
            .map(|t| t + self.settings.term_after())
    }

    /// Re-evaluates the fence and tells consumers and the lease loop when it changes.
    pub fn update_fence(&self) {
        let fenced = !self.may_process();
        let raised = self.fenced.send_if_modified(|f| {
            let changed = *f != fenced;
            *f = fenced;
            changed
        }) && fenced;
        if raised {
            // Every consumer stops at this signal (before its next batch), whatever the lease
            // loop is busy with: report that at once.
            let mut g = self.lock();
            g.fence_epoch += 1;
            g.leases.clear();
            self.metrics.leases_held.set(0);
        }
    }

    /// Subscribes to fence changes (`true`: stop processing now).
    pub fn fence(&self) -> tokio::sync::watch::Receiver<bool> {
        self.fenced.subscribe()
    }

    /// Monotonic instant the last successful heartbeat was sent.
    pub fn last_heartbeat_ok(&self) -> Option<Instant> {
        self.lock().last_heartbeat_ok
    }

    pub fn limit_read_result(&self, result: Result<Option<PublishedLimit>, String>) {
        let mut g = self.lock();
        match result {
            Ok(record) => {
                g.last_limit_read_ok = Some(Instant::now());
                g.last_limit_read_error = None;
                g.limit_problem = None;
                if let Some(r) = record {
                    self.set_limit_locked(&mut g, r);
                }
            }
            Err(e) => g.last_limit_read_error = Some(e),
        }
    }

    /// The `lease_limits` item was read but cannot be obeyed: keep the last good limit and
    /// report why in `/ready`.
    pub fn limit_malformed(&self, problem: String) {
        let mut g = self.lock();
        g.last_limit_read_ok = Some(Instant::now());
        g.last_limit_read_error = None;
        g.limit_problem = Some(problem);
    }

    /// Why the last read `lease_limits` item could not be obeyed, if it could not.
    pub fn limit_problem(&self) -> Option<String> {
        self.lock().limit_problem.clone()
    }

    /// The coordinator installs what it just published without waiting for a read.
    pub fn published(&self, record: PublishedLimit) {
        let mut g = self.lock();
        g.limit_problem = None;
        self.set_limit_locked(&mut g, record);
    }

    fn set_limit_locked(&self, g: &mut Inner, record: PublishedLimit) {
        // Never go back to an older version (a read racing a fresh publication).
        if g.limit
            .as_ref()
            .is_some_and(|old| (old.epoch, old.version) > (record.epoch, record.version))
        {
            return;
        }
        self.metrics
            .max_leases_per_worker
            .set(record.max_leases_per_worker as i64);
        self.metrics.shard_count.set(record.shard_count as i64);
        self.metrics.worker_count.set(record.worker_count as i64);
        self.metrics
            .capacity_deficit
            .set(record.capacity_deficit as i64);
        let newer = g
            .limit
            .as_ref()
            .is_none_or(|old| (old.epoch, old.version) != (record.epoch, record.version));
        let version = (record.epoch, record.version);
        g.limit = Some(record);
        if newer {
            // notify_one keeps a permit when the lease loop is busy, so no change is missed.
            self.limit_changed.notify_one();
            self.limit_version.send_replace(version);
        }
    }

    /// The election loop read the coordinator row (`None`: the read failed). Wakes the limit
    /// and lease loops only when what it shows changed. A row whose stamp shows the held limit is still
    /// the latest confirms it for `/ready` at once, as a read of `lease_limits` would.
    pub fn coordinator_read(&self, seen: Option<crate::meta::SeenCoordinator>) {
        let now = Instant::now();
        {
            let mut g = self.lock();
            let held = g.limit.as_ref().map(PublishedLimit::stamp);
            if let (Some(held), Some(seen)) = (held, seen)
                && crate::meta::stamp_confirms(held, seen)
                && g.last_limit_read_ok.is_none_or(|t| t < now)
            {
                g.last_limit_read_ok = Some(now);
                g.last_limit_read_error = None;
            }
        }
        self.coordinator_seen.send_if_modified(|old| {
            let changed = old.map(|(o, _)| o) != seen;
            *old = seen.map(|s| (s, Instant::now()));
            changed
        });
    }

    /// Wakes whenever a read of the coordinator row shows something new (see
    /// [`WorkerState::coordinator_read`]); the value also says when it was last read.
    pub fn coordinator_reads(
        &self,
    ) -> tokio::sync::watch::Receiver<Option<(crate::meta::SeenCoordinator, Instant)>> {
        self.coordinator_seen.subscribe()
    }

    /// Leases are likely to move at about `due` for `source` (`None`: no longer): the lease
    /// loop reads this worker's leases every settling interval from a heartbeat before to two
    /// after, so it takes what it is given within a fraction of a heartbeat instead of at its
    /// next look. (`due` comes from a look that may be up to a heartbeat late, hence the
    /// window's start.) A later estimate from the same source replaces the earlier one.
    pub fn expect_lease_changes(&self, source: ChangeSource, due: Option<Instant>) {
        let heartbeat = self.settings.heartbeat_interval;
        let window = due.and_then(|due| {
            Some((
                due.checked_sub(heartbeat).unwrap_or(due),
                due.checked_add(heartbeat * 2)?,
            ))
        });
        self.lease_changes_expected.send_if_modified(|w| {
            let slot = &mut w[source as usize];
            let changed = *slot != window;
            *slot = window;
            changed
        });
    }

    /// The windows set by [`WorkerState::expect_lease_changes`], waking on each change.
    pub fn expected_lease_changes(&self) -> tokio::sync::watch::Receiver<ChangeWindows> {
        self.lease_changes_expected.subscribe()
    }

    /// Changes whenever a newer limit is installed.
    pub fn limit_versions(&self) -> tokio::sync::watch::Receiver<(u64, u64)> {
        self.limit_version.subscribe()
    }

    pub fn limit(&self) -> Option<PublishedLimit> {
        self.lock().limit.clone()
    }

    pub fn leases_held(&self) -> u64 {
        self.lock().leases.len() as u64
    }

    /// Shard ids this worker reads now.
    pub fn leases(&self) -> Vec<String> {
        self.lock().leases.clone()
    }

    pub fn coverage(&self) -> Option<Coverage> {
        self.lock().coverage
    }

    /// What this worker reads now (between rounds: after the fence stopped everything).
    pub fn set_leases(&self, leases: Vec<String>) {
        let mut g = self.lock();
        self.metrics.leases_held.set(leases.len() as i64);
        g.leases = leases;
    }

    /// A read of `shard` failed (throttling, an outage): reported by `/ready` once it has
    /// failed for longer than `failover_timeout`, and counted in `kds_failing_shard_reads`.
    pub fn read_failed(&self, shard: &str, error: String) {
        let mut g = self.lock();
        let since = g
            .failing_reads
            .get(shard)
            .map_or_else(Instant::now, |(since, _)| *since);
        g.failing_reads.insert(shard.to_owned(), (since, error));
        self.metrics
            .failing_shard_reads
            .set(g.failing_reads.len() as i64);
    }

    /// A read of `shard` succeeded (or its consumer ended).
    pub fn read_ok(&self, shard: &str) {
        let mut g = self.lock();
        if g.failing_reads.remove(shard).is_some() {
            self.metrics
                .failing_shard_reads
                .set(g.failing_reads.len() as i64);
        }
    }

    /// The outcome of one of the coordinator's calls about the stream.
    pub fn stream_call(&self, operation: &'static str, outcome: Result<(), String>) {
        let mut g = self.lock();
        // A call that returns after this worker stepped down (the stall that deposed it) is
        // not its concern any more.
        if g.role != Role::Coordinator {
            return;
        }
        match outcome {
            Ok(()) => {
                g.failing_stream_calls.remove(operation);
            }
            Err(error) => {
                let since = g
                    .failing_stream_calls
                    .get(operation)
                    .map_or_else(Instant::now, |(since, _)| *since);
                g.failing_stream_calls.insert(operation, (since, error));
            }
        }
        self.metrics
            .failing_stream_calls
            .set(g.failing_stream_calls.len() as i64);
    }

    /// Coordinator duties ended: its stream calls are no longer this worker's concern.
    pub fn clear_stream_calls(&self) {
        self.lock().failing_stream_calls.clear();
        self.metrics.failing_stream_calls.set(0);
    }

    /// After each completed lease round: what is read, and what is held but cannot be read.
    pub fn lease_round_done(&self, leases: Vec<String>, unreadable: BTreeMap<String, String>) {
        let mut g = self.lock();
        // Failing reads of shards no longer read are over.
        g.failing_reads.retain(|shard, _| leases.contains(shard));
        // Counts and per-shard metrics of shards no longer held are dropped.
        self.counting.retain(&leases);
        self.metrics
            .failing_shard_reads
            .set(g.failing_reads.len() as i64);
        self.metrics.leases_held.set(leases.len() as i64);
        g.leases = leases;
        g.unreadable = unreadable;
        g.lease_rounds += 1;
    }

    /// The coordinator's view of the fleet's coverage (`None` on followers).
    pub fn set_coverage(&self, coverage: Option<Coverage>) {
        let mut g = self.lock();
        if let Some(c) = coverage {
            self.metrics.uncovered_shards.set(c.uncovered_shards as i64);
            self.metrics.workers_needed.set(c.workers_needed as i64);
        }
        g.coverage = coverage;
    }

    /// False once the last successful heartbeat is so old that others may soon judge this
    /// worker dead: one heartbeat before `failover_timeout`, so every consumer has stopped
    /// (they check before each batch, the lease loop each round) before anyone can take its
    /// leases. Also false while another live process holds this worker id.
    pub fn may_process(&self) -> bool {
        let fence_after = self.settings.fence_after();
        let g = self.lock();
        g.instance_conflict.is_none()
            && g.last_heartbeat_ok
                .is_some_and(|t| t.elapsed() < fence_after)
    }

    /// The current fence epoch while this worker may process (`None` while fenced): captured
    /// before a lease is acquired, and checked with [`WorkerState::may_process_in`].
    pub fn reading_epoch(&self) -> Option<u64> {
        let fence_after = self.settings.fence_after();
        let g = self.lock();
        (g.instance_conflict.is_none()
            && g.last_heartbeat_ok
                .is_some_and(|t| t.elapsed() < fence_after))
        .then_some(g.fence_epoch)
    }

    /// Whether a consumer acquired in fence epoch `epoch` may process now: the fence is down
    /// and has not been up since.
    pub fn may_process_in(&self, epoch: u64) -> bool {
        self.reading_epoch() == Some(epoch)
    }

    /// Why this worker is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let g = self.lock();
        let now = Instant::now();
        if let Some(waiting) = &g.start_wait {
            return vec![waiting.clone()];
        }
        let mut reasons = Vec::new();
        if let Some(other) = &g.instance_conflict {
            reasons.push(format!(
                "worker id {:?} is held by another live instance {other} (this is instance {}); \
                 not processing records until it stops or stays silent for the failover timeout",
                self.settings.worker_id, self.instance
            ));
        }
        match (&g.limit_problem, &g.limit) {
            (Some(problem), Some(last)) => reasons.push(format!(
                "{problem}; obeying the last good limit {} (epoch {}, version {})",
                last.max_leases_per_worker, last.epoch, last.version
            )),
            (Some(problem), None) => reasons.push(format!("{problem}; no good limit known yet")),
            (None, None) => reasons.push("no lease_limits item read yet".to_owned()),
            (None, Some(_)) => {}
        }
        if g.lease_rounds == 0 {
            reasons.push("lease loop has not completed a round yet".to_owned());
        }
        // Two missed renewals: the worker can no longer show it is alive.
        let stale_after = self.settings.stale_after();
        match g.last_heartbeat_ok {
            None => reasons.push("no heartbeat written yet".to_owned()),
            Some(t) if now.duration_since(t) > stale_after => reasons.push(format!(
                "heartbeat not renewed for {:.1}s: {}",
                now.duration_since(t).as_secs_f64(),
                g.last_heartbeat_error.as_deref().unwrap_or("no answer")
            )),
            Some(_) => {}
        }
        // Reads failing for longer than a dead worker's leases would wait: the shards are as
        // good as unread.
        let failing: Vec<_> = g
            .failing_reads
            .values()
            .filter(|(since, _)| now.duration_since(*since) > self.settings.failover_timeout)
            .collect();
        if let Some((oldest, _)) = failing.iter().min_by_key(|(since, _)| *since) {
            let last = failing
                .iter()
                .max_by_key(|(since, _)| *since)
                .map_or("", |(_, e)| e.as_str());
            reasons.push(format!(
                "Kinesis reads failing on {} of {} shards for up to {:.1}s: {last}",
                failing.len(),
                g.leases.len(),
                now.duration_since(*oldest).as_secs_f64()
            ));
        }
        // Only while coordinating: a deposed coordinator's last failed call (during the stall
        // that deposed it) is no longer its concern.
        let stream_calls = g
            .failing_stream_calls
            .iter()
            .filter(|_| g.role == Role::Coordinator);
        for (operation, (since, error)) in stream_calls {
            reasons.push(format!(
                "{operation} failing for {:.1}s (the limit and the lease table follow the stream \
                 only once it answers): {error}",
                now.duration_since(*since).as_secs_f64()
            ));
        }
        if let Some(t) = g.last_limit_read_ok
            && now.duration_since(t) > stale_after
        {
            reasons.push(format!(
                "lease_limits not read for {:.1}s: {}",
                now.duration_since(t).as_secs_f64(),
                g.last_limit_read_error.as_deref().unwrap_or("no answer")
            ));
        }
        reasons
    }

    /// Loops that have not gone round within the allowed time; empty when healthy.
    pub fn stuck_loops(&self) -> Vec<String> {
        let g = self.lock();
        if g.start_wait.is_some() {
            return Vec::new();
        }
        let now = Instant::now();
        // A loop iteration may wait on one AWS call with retries; it must not take longer than
        // the failover timeout plus that call's own time limit.
        let allowed = self.settings.failover_timeout + crate::aws::OPERATION_TIMEOUT;
        let mut stuck = Vec::new();
        for l in Loop::ALL {
            let last = g.loops_alive.get(&l).copied().unwrap_or(self.started);
            if now.duration_since(last) > allowed {
                stuck.push(format!(
                    "{} loop silent for {:.1}s",
                    l.name(),
                    now.duration_since(last).as_secs_f64()
                ));
            }
        }
        stuck
    }

    pub fn report(&self) -> StatusReport {
        let reasons = self.not_ready_reasons();
        let g = self.lock();
        StatusReport {
            worker_id: self.settings.worker_id.clone(),
            instance: self.instance.clone(),
            role: g.role,
            epoch: g.epoch,
            coordinator: g.coordinator.clone(),
            ready: reasons.is_empty(),
            not_ready_reasons: reasons,
            leases_held: g.leases.len() as u64,
            leases: {
                let counts = self.counting.counts();
                g.leases
                    .iter()
                    .map(|id| {
                        let c = counts.get(id).copied().unwrap_or_default();
                        HeldLease {
                            shard_id: id.clone(),
                            records: c.records,
                            bytes: c.bytes,
                        }
                    })
                    .collect()
            },
            unreadable_leases: g.unreadable.clone(),
            coverage: g.coverage,
            max_leases_per_worker: g.limit.as_ref().map(|l| l.max_leases_per_worker),
            lease_limits: g.limit.clone(),
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, WorkerCountSource};
    use std::time::Duration;

    fn state() -> WorkerState {
        let settings = Settings {
            app_name: "app".into(),
            stream_name: "s".into(),
            max_leases_cap: 80,
            worker_id: "w0".into(),
            worker_count_source: WorkerCountSource::Heartbeats,
            statefulset_name: "kds-consumer".into(),
            namespace: "lab".into(),
            shard_poll_interval: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            failover_timeout: Duration::from_secs(10),
            idle_poll_max: Duration::from_secs(5),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            log_format: LogFormat::Pretty,
            record_log: None,
        };
        WorkerState::new(settings, Metrics::new())
    }

    fn record(limit: u64, epoch: u64, version: u64) -> PublishedLimit {
        PublishedLimit {
            max_leases_per_worker: limit,
            shard_count: 30,
            worker_count: 3,
            desired_workers: None,
            live_workers: 3,
            cap: 80,
            capacity_deficit: 0,
            workers_needed: 1,
            epoch,
            version,
            computed_by: "w1".into(),
            updated_at: String::new(),
        }
    }

    #[test]
    fn an_expected_lease_change_opens_a_window_around_it() {
        let st = state();
        let mut w = st.expected_lease_changes();
        assert_eq!(*w.borrow_and_update(), [None, None]);
        let hb = Duration::from_secs(2);
        let due = Instant::now() + Duration::from_secs(7);
        st.expect_lease_changes(ChangeSource::Verdict, Some(due));
        assert!(w.has_changed().unwrap());
        assert_eq!(w.borrow_and_update()[0], Some((due - hb, due + hb * 2)));
        // The same estimate again wakes nobody; a later one replaces it; the other source
        // has its own window; `None` withdraws one.
        st.expect_lease_changes(ChangeSource::Verdict, Some(due));
        assert!(!w.has_changed().unwrap());
        st.expect_lease_changes(ChangeSource::Verdict, Some(due + hb));
        st.expect_lease_changes(ChangeSource::Takeover, Some(due));
        assert_eq!(
            *w.borrow_and_update(),
            [Some((due, due + hb * 3)), Some((due - hb, due + hb * 2))]
        );
        st.expect_lease_changes(ChangeSource::Verdict, None);
        assert_eq!(
            *w.borrow_and_update(),
            [None, Some((due - hb, due + hb * 2))]
        );
    }

    #[test]
    fn the_last_acknowledged_heartbeat_is_what_a_renewal_records() {
        let st = state();
        assert_eq!(st.acknowledged_heartbeat(), None);
        st.heartbeat_acknowledged(3);
        st.heartbeat_acknowledged(4);
        let h = st.acknowledged_heartbeat().unwrap();
        assert_eq!((h.counter, h.instance), (4, st.instance.clone()));
    }

    #[test]
    fn instance_ids_are_random_128_bit_hex() {
        let a = new_instance_id();
        let b = new_instance_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(state().instance, state().instance);
    }

    #[tokio::test]
    async fn another_live_instance_fences_and_names_itself_in_ready() {
        let st = state();
        st.heartbeat_result(Instant::now(), Ok(()));
        assert!(st.may_process());
        let fence = st.fence();
        assert!(st.set_instance_conflict(Some("feedbeef".into())));
        assert!(!st.may_process());
        assert!(*fence.borrow(), "the fence rises at once");
        let reasons = st.not_ready_reasons();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("feedbeef") && r.contains(&st.instance)),
            "{reasons:?}"
        );
        assert!(st.metrics.encode().contains("kds_worker_id_conflict 1"));
        assert!(
            !st.set_instance_conflict(Some("feedbeef".into())),
            "no change"
        );
        assert!(st.set_instance_conflict(None));
        assert!(st.may_process());
        assert!(!*st.fence().borrow());
        assert!(st.metrics.encode().contains("kds_worker_id_conflict 0"));
    }

    #[test]
    fn a_malformed_item_keeps_the_last_good_limit_and_says_why() {
        let st = state();
        st.limit_malformed("lease_limits item is malformed: version is missing".into());
        assert_eq!(st.limit(), None);
        let reasons = st.not_ready_reasons();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("version is missing") && r.contains("no good limit")),
            "{reasons:?}"
        );
        st.limit_read_result(Ok(Some(record(10, 2, 5))));
        assert!(st.limit_problem().is_none());
        st.limit_malformed(
            "lease_limits item is malformed: max_leases_per_worker is missing".into(),
        );
        assert_eq!(st.limit().unwrap().max_leases_per_worker, 10);
        let reasons = st.not_ready_reasons();
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("max_leases_per_worker is missing")
                    && r.contains("last good limit 10")),
            "{reasons:?}"
        );
        // A good read (or the coordinator's own publication) clears it.
        st.published(record(12, 3, 1));
        assert!(st.limit_problem().is_none());
        assert_eq!(st.limit().unwrap().max_leases_per_worker, 12);
    }

    #[test]
    fn fence_and_term_deadlines_use_the_derived_margin() {
        let st = state();
        let sent = Instant::now();
        st.heartbeat_result(sent, Ok(()));
        assert_eq!(st.fence_deadline(), Some(sent + Duration::from_secs(8)));
        st.term_renewed(sent);
        assert_eq!(st.term_deadline(), None, "only while coordinating");
        st.set_role(Role::Coordinator, 3);
        assert_eq!(st.term_deadline(), Some(sent + Duration::from_secs(8)));
        assert_eq!(st.last_term_renewal(), Some(sent));
    }

    #[test]
    fn failing_stream_calls_are_the_coordinators_concern_only() {
        let st = state();
        st.heartbeat_result(Instant::now(), Ok(()));
        st.set_role(Role::Coordinator, 1);
        st.stream_call("ListShards", Err("LimitExceededException".into()));
        let reasons = st.not_ready_reasons();
        assert!(
            reasons.iter().any(|r| r.starts_with("ListShards failing")),
            "{reasons:?}"
        );
        assert_eq!(st.metrics.failing_stream_calls.get(), 1);
        // Deposed: the failure is gone, and one returning late is not recorded.
        st.set_role(Role::Follower, 2);
        st.stream_call("DescribeStreamSummary", Err("timed out".into()));
        assert!(
            !st.not_ready_reasons()
                .iter()
                .any(|r| r.contains("failing for")),
            "{:?}",
            st.not_ready_reasons()
        );
        assert_eq!(st.metrics.failing_stream_calls.get(), 0);
    }

    #[test]
    fn reads_failing_past_the_failover_timeout_are_reported_until_they_succeed() {
        let st = state();
        st.heartbeat_result(Instant::now(), Ok(()));
        st.read_failed("s1", "ProvisionedThroughputExceededException".into());
        assert_eq!(st.metrics.failing_shard_reads.get(), 1);
        // Not yet: a throttled read is normal until it lasts a failover timeout.
        assert!(
            !st.not_ready_reasons()
                .iter()
                .any(|r| r.contains("Kinesis reads"))
        );
        st.read_ok("s1");
        assert_eq!(st.metrics.failing_shard_reads.get(), 0);
        // A shard no longer read is no longer failing.
        st.read_failed("s2", "cut".into());
        st.lease_round_done(vec!["s3".into()], BTreeMap::new());
        assert_eq!(st.metrics.failing_shard_reads.get(), 0);
    }
}
