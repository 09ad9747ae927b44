//! What every loop of a worker shares, built once by [`crate::worker::Worker::new`].

use std::sync::Arc;

use crate::aws::AwsClients;
use crate::backoff::StartRetry;
use crate::config::ConsumerTuning;
use crate::meta::{HeartbeatOwner, MetaStore};
use crate::processor::RecordProcessor;
use crate::state::WorkerState;

/// Everything the loops share.
pub struct Context {
    pub state: Arc<WorkerState>,
    pub aws: AwsClients,
    pub meta: MetaStore,
    pub kube: Option<kube::Client>,
    /// The application's record processor, called after the built-in counting.
    pub processor: Option<Arc<dyn RecordProcessor>>,
    pub consumer_tuning: ConsumerTuning,
    pub start_retry: StartRetry,
    /// `false` only in `kds-swarm`: consumers stop polling a shard once it is caught up, so
    /// the lease protocol's cost can be measured alone.
    pub reading: bool,
}

impl Context {
    /// This process as the writer of its heartbeat.
    pub fn heartbeat_owner(&self) -> HeartbeatOwner {
        let s = &self.state.settings;
        HeartbeatOwner {
            worker_id: s.worker_id.clone(),
            instance: self.state.instance.clone(),
            failover: s.failover_timeout,
        }
    }
}

/// The pacing of every loop: a tick each `period`, and a late tick delays the next rather than
/// firing a burst to catch up (a slow AWS call must not be followed by a volley of calls).
pub fn ticker(period: std::time::Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}
