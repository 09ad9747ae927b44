//! The metadata table's rows as read: the published limit (`lease_limits`), the coordinator
//! post and the heartbeats. The worker's store maps them to and from DynamoDB items; here they
//! are plain data.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `lease_limits` item: the coordinator's decision and the inputs that explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitRecord {
    pub max_leases_per_worker: u64,
    pub shard_count: u64,
    pub worker_count: u64,
    pub desired_workers: Option<u64>,
    pub live_workers: u64,
    pub cap: u64,
    pub capacity_deficit: u64,
    pub epoch: u64,
    pub version: u64,
    pub computed_by: String,
    pub updated_at: String,
}

impl LimitRecord {
    /// Workers needed so that nobody exceeds the cap at this shard count (the policy's
    /// [`crate::LeaseLimit::workers_needed`] for the published inputs).
    pub fn workers_needed(&self) -> u64 {
        self.shard_count.div_ceil(self.cap.max(1))
    }
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
}

impl CoordinatorRow {
    pub fn is_vacant(&self) -> bool {
        self.owner.is_empty()
    }

    /// The owner's published `failover_timeout`.
    pub fn failover(&self) -> Option<Duration> {
        self.failover_ms.map(Duration::from_millis)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_needed_rounds_up_and_survives_a_zero_cap() {
        let mut r = LimitRecord {
            max_leases_per_worker: 80,
            shard_count: 300,
            worker_count: 3,
            desired_workers: None,
            live_workers: 3,
            cap: 80,
            capacity_deficit: 60,
            epoch: 1,
            version: 1,
            computed_by: "w".into(),
            updated_at: String::new(),
        };
        assert_eq!(r.workers_needed(), 4);
        r.cap = 0;
        assert_eq!(r.workers_needed(), 300);
    }
}
