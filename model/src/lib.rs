//! `kds-model`: the fleet's data, shared by the worker (which computes, publishes and reads it)
//! and the lab (which reads it as JSON from `kds-worker admin snapshot --json`). Serde only:
//! no I/O, no AWS SDK, so the lab can depend on it without the SDK.
//!
//! - [`policy`]: the lease-limit formula, a pure function of the fleet's inputs.
//! - [`rows`]: the metadata table's rows as read (the published limit, the coordinator post,
//!   heartbeats).
//! - [`snapshot`]: everything the lab checks and the monitor shows, read in one go, with its
//!   text rendering.
//!
//! # Words
//!
//! One limit, one name for each thing about it:
//! - **`max_leases_per_worker`**: the limit itself, `min(cap, ceil(open shards / workers))`,
//!   the most leases one worker may hold.
//! - **cap** (`max_leases_cap` in the config): the users' upper bound on that limit (80).
//! - [`LeaseLimit`]: the policy's decision: the limit with what follows from it (the worker
//!   count used, the capacity deficit, the workers needed).
//! - [`PublishedLimit`]: that decision as the coordinator publishes it in the metadata
//!   table's `lease_limits` item, with its inputs, epoch and version: what workers obey.
//!
//! And for shards: **unowned** means a lease with no owner; **uncovered** means a readable
//! shard no live worker reads (unowned, owned by a dead worker, or unreadable for its owner).

pub mod policy;
pub mod rows;
pub mod snapshot;

pub use policy::{FleetInputs, LeaseLimit, compute};
pub use rows::{
    CoordinatorRow, HeartbeatRow, LeaseStamp, LimitStamp, OwnerHeartbeat, PublishedLimit,
};
pub use snapshot::{LeaseSummary, Snapshot};
