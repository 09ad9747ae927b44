//! The metadata table's rows as read: the published limit (`lease_limits`), the coordinator
//! post and the heartbeats. The worker's store maps them to and from DynamoDB items; here they
//! are plain data.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `lease_limits` item: the coordinator's decision and the inputs that explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedLimit {
    pub max_leases_per_worker: u64,
    pub shard_count: u64,
    pub worker_count: u64,
    pub desired_workers: Option<u64>,
    pub live_workers: u64,
    pub cap: u64,
    pub capacity_deficit: u64,
    /// Workers needed so that nobody exceeds the cap (the policy's
    /// [`crate::LeaseLimit::workers_needed`]), published with the decision.
    pub workers_needed: u64,
    pub epoch: u64,
    pub version: u64,
    pub computed_by: String,
    pub updated_at: String,
}

/// The coordinator item as read. `owner` is empty while the post is vacant (after a step-down).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRow {
    pub owner: String,
    pub epoch: u64,
    pub counter: u64,
    pub renewed_at: String,
    /// The claimant's `failover_timeout` in milliseconds (`None` in items written before it
    /// was published): followers wait at least this long before taking over.
    pub failover_ms: Option<u64>,
    /// The claimant's `heartbeat_interval` in milliseconds, how often it renews (`None` in
    /// items written before it was published): followers take a renewal as missed from it.
    #[serde(default)]
    pub heartbeat_ms: Option<u64>,
    /// The (epoch, version) of the latest `lease_limits` publication, written in the same
    /// transaction as the item: the previous owner's until this one publishes (at the start
    /// of its term), `None` if no binary that writes it ever published. Followers, who read
    /// this row every heartbeat anyway, read `lease_limits` itself only when a stamp of this
    /// row's epoch is newer than the limit they hold (or there is none of this epoch).
    #[serde(default)]
    pub limit_stamp: Option<LimitStamp>,
    /// The (epoch, generation) of the lease table as the owner last saw and changed it: the
    /// generation moves whenever a lease changed owner or was asked to move (by its own writes
    /// or anyone's). Followers, who read this row every heartbeat anyway, query their own
    /// leases only when it moved since their last query (or it is not of this row's epoch).
    /// `None` if no binary that writes it ever coordinated.
    #[serde(default)]
    pub lease_stamp: Option<LeaseStamp>,
    /// The owner's own heartbeat as of its latest renewal: the counter of the last heartbeat
    /// its worker had written (and seen acknowledged) before sending the renewal, and the
    /// process that wrote it. Whoever first saw that renewal at instant `t` knows the
    /// heartbeat row showed this counter (or a later one) by `t`: a follower taking the post
    /// over judges the old owner's worker from there, not from its own first look at the
    /// row. A claim by this binary removes it; one by an older binary, or a step-down, leaves
    /// the previous process's, which never matches the new owner's row.
    #[serde(default)]
    pub owner_heartbeat: Option<OwnerHeartbeat>,
    /// Written with the lease stamp while a worker has been silent for three quarters of its failover
    /// timeout: how long after that lease round its verdict is due (its leases move then), in
    /// milliseconds. Followers, who cannot know when the round wrote it, read their leases
    /// quickly in a window around the instant it gives. Valid only with a lease stamp of the
    /// item's own epoch.
    #[serde(default)]
    pub verdict_due_in_ms: Option<u64>,
}

/// A heartbeat of the coordinator's own worker, as its renewal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerHeartbeat {
    pub counter: u64,
    pub instance: String,
}

/// The lease table's (epoch, generation) as stamped on the coordinator item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStamp {
    pub epoch: u64,
    pub generation: u64,
}

/// A published limit's (epoch, version): which `lease_limits` item a reader holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LimitStamp {
    pub epoch: u64,
    pub version: u64,
}

impl PublishedLimit {
    pub fn stamp(&self) -> LimitStamp {
        LimitStamp {
            epoch: self.epoch,
            version: self.version,
        }
    }
}

impl CoordinatorRow {
    pub fn is_vacant(&self) -> bool {
        self.owner.is_empty()
    }

    /// The owner's published `failover_timeout`.
    pub fn failover(&self) -> Option<Duration> {
        self.failover_ms.map(Duration::from_millis)
    }

    /// What shows the owner alive: a claim or a renewal moves it; a publication's or a lease
    /// round's stamp does not. The owner's heartbeat its renewals record is part of it, so a
    /// renewal key seen again (an item deleted and claimed again at the same epoch) cannot
    /// pair one version's first sighting with another version's heartbeat.
    pub fn renewal_key(&self) -> (&str, u64, u64, Option<&OwnerHeartbeat>) {
        (
            &self.owner,
            self.epoch,
            self.counter,
            self.owner_heartbeat.as_ref(),
        )
    }

    /// The owner's published `heartbeat_interval`: how often it renews the post.
    pub fn heartbeat(&self) -> Option<Duration> {
        self.heartbeat_ms.map(Duration::from_millis)
    }
}

/// A heartbeat item as read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRow {
    pub worker_id: String,
    pub counter: u64,
    pub leases_held: u64,
    pub renewed_at: String,
    /// The process (instance id) that writes this row; `None` in items written before
    /// instances were recorded.
    pub instance: Option<String>,
    /// The writer's `failover_timeout` in milliseconds: observers judge this row dead only
    /// after max(their own timeout, this).
    pub failover_ms: Option<u64>,
}

impl HeartbeatRow {
    /// The writer's published `failover_timeout`.
    pub fn failover(&self) -> Option<Duration> {
        self.failover_ms.map(Duration::from_millis)
    }
}
