//! What one worker knows about itself, shared by its loops and its HTTP endpoints.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::store::LimitRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    Follower,
}

/// The loops whose liveness `/health` reports.
pub const LOOPS: &[&str] = &["heartbeat", "election", "limit", "lease"];

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
    limit: Option<LimitRecord>,
    leases: Vec<String>,
    /// Held leases this worker cannot read, with the reason.
    unreadable: BTreeMap<String, String>,
    coverage: Option<Coverage>,
    lease_rounds: u64,
    last_heartbeat_ok: Option<Instant>,
    last_heartbeat_error: Option<String>,
    last_limit_read_ok: Option<Instant>,
    last_limit_read_error: Option<String>,
    loop_beats: BTreeMap<&'static str, Instant>,
}

/// Shared, lock-protected worker state. Locks are held only to copy values in or out.
pub struct WorkerState {
    pub settings: Settings,
    pub metrics: Metrics,
    /// Records and bytes per shard (the default record processor), for `/status`.
    pub counting: crate::consumer::CountingProcessor,
    started: Instant,
    inner: Mutex<Inner>,
    /// True while this worker must not process records (see [`WorkerState::may_process`]).
    fenced: tokio::sync::watch::Sender<bool>,
    /// Woken when a new `lease_limits` version arrives: the lease loop obeys it at once
    /// instead of at its next round.
    pub limit_changed: tokio::sync::Notify,
}

/// `GET /status` body.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub worker_id: String,
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
    pub lease_limits: Option<LimitRecord>,
    pub uptime_seconds: u64,
}

impl WorkerState {
    pub fn new(settings: Settings, metrics: Metrics) -> Self {
        let counting = crate::consumer::CountingProcessor::new(
            metrics.records_processed.clone(),
            metrics.bytes_processed.clone(),
        );
        WorkerState {
            settings,
            metrics,
            counting,
            started: Instant::now(),
            // Fenced until the first heartbeat succeeds.
            fenced: tokio::sync::watch::Sender::new(true),
            limit_changed: tokio::sync::Notify::new(),
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
                last_heartbeat_error: None,
                last_limit_read_ok: None,
                last_limit_read_error: None,
                loop_beats: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the plain values inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn beat(&self, loop_name: &'static str) {
        self.lock().loop_beats.insert(loop_name, Instant::now());
    }

    pub fn set_role(&self, role: Role, epoch: u64) {
        let mut g = self.lock();
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
                    g.last_heartbeat_ok = Some(sent);
                    g.last_heartbeat_error = None;
                }
                Err(e) => g.last_heartbeat_error = Some(e),
            }
        }
        self.update_fence();
    }

    /// The instant [`WorkerState::may_process`] turns false unless a heartbeat succeeds first.
    pub fn fence_deadline(&self) -> Option<Instant> {
        let s = &self.settings;
        let fence_after = s.failover_timeout.saturating_sub(s.heartbeat_interval);
        self.lock().last_heartbeat_ok.map(|t| t + fence_after)
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

    pub fn limit_read_result(&self, result: Result<Option<LimitRecord>, String>) {
        let mut g = self.lock();
        match result {
            Ok(record) => {
                g.last_limit_read_ok = Some(Instant::now());
                g.last_limit_read_error = None;
                if let Some(r) = record {
                    self.set_limit_locked(&mut g, r);
                }
            }
            Err(e) => g.last_limit_read_error = Some(e),
        }
    }

    /// The coordinator installs what it just published without waiting for a read.
    pub fn published(&self, record: LimitRecord) {
        let mut g = self.lock();
        self.set_limit_locked(&mut g, record);
    }

    fn set_limit_locked(&self, g: &mut Inner, record: LimitRecord) {
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
        g.limit = Some(record);
        if newer {
            // notify_one keeps a permit when the lease loop is busy, so no change is missed.
            self.limit_changed.notify_one();
        }
    }

    pub fn limit(&self) -> Option<LimitRecord> {
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

    /// After each completed lease round: what is read, and what is held but cannot be read.
    pub fn lease_round_done(&self, leases: Vec<String>, unreadable: BTreeMap<String, String>) {
        let mut g = self.lock();
        self.metrics.leases_held.set(leases.len() as i64);
        g.leases = leases;
        g.unreadable = unreadable;
        g.lease_rounds += 1;
    }

    /// The coordinator's view of the fleet's coverage (`None` on followers).
    pub fn set_coverage(&self, coverage: Option<Coverage>) {
        let mut g = self.lock();
        if let Some(c) = coverage {
            self.metrics.unowned_shards.set(c.unowned_shards as i64);
            self.metrics.workers_needed.set(c.workers_needed as i64);
        }
        g.coverage = coverage;
    }

    /// False once the last successful heartbeat is so old that others may soon judge this
    /// worker dead: one heartbeat before `failover_timeout`, so every consumer has stopped
    /// (they check before each batch, the lease loop each round) before anyone can take its
    /// leases (DESIGN.md safety rules).
    pub fn may_process(&self) -> bool {
        let s = &self.settings;
        let fence_after = s.failover_timeout.saturating_sub(s.heartbeat_interval);
        self.lock()
            .last_heartbeat_ok
            .is_some_and(|t| t.elapsed() < fence_after)
    }

    /// Why this worker is not ready; empty when it is.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let g = self.lock();
        let now = Instant::now();
        let s = &self.settings;
        let mut reasons = Vec::new();
        if g.limit.is_none() {
            reasons.push("no lease_limits item read yet".to_owned());
        }
        if g.lease_rounds == 0 {
            reasons.push("lease loop has not completed a round yet".to_owned());
        }
        // Two missed renewals: the worker can no longer show it is alive.
        let stale_after = s.heartbeat_interval * 2 + Duration::from_millis(500);
        match g.last_heartbeat_ok {
            None => reasons.push("no heartbeat written yet".to_owned()),
            Some(t) if now.duration_since(t) > stale_after => reasons.push(format!(
                "heartbeat not renewed for {:.1}s: {}",
                now.duration_since(t).as_secs_f64(),
                g.last_heartbeat_error.as_deref().unwrap_or("no answer")
            )),
            Some(_) => {}
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
        let now = Instant::now();
        // A loop iteration may wait on one AWS call with retries; it must not take longer than
        // the failover timeout plus that call's own time limit.
        let allowed = self.settings.failover_timeout + crate::aws::OPERATION_TIMEOUT;
        let mut stuck = Vec::new();
        for name in LOOPS {
            let last = g.loop_beats.get(name).copied().unwrap_or(self.started);
            if now.duration_since(last) > allowed {
                stuck.push(format!(
                    "{name} loop silent for {:.1}s",
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
