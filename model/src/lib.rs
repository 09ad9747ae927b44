//! `kds-model`: the fleet's data, shared by the worker (which computes, publishes and reads it)
//! and the lab (which reads it as JSON from `kds-worker admin snapshot --json`). Serde only:
//! no I/O, no AWS SDK, so the lab can depend on it without the SDK.
//!
//! - [`policy`]: the lease-limit formula, a pure function of the fleet's inputs.
//! - [`rows`]: the metadata table's rows as read (the published limit, the coordinator post,
//!   heartbeats).
//! - [`snapshot`]: everything the lab checks and the monitor shows, read in one go, with its
//!   text rendering.

pub mod policy;
pub mod rows;
pub mod snapshot;

pub use policy::{FleetInputs, LeaseLimit, compute};
pub use rows::{CoordinatorRow, HeartbeatRow, LimitRecord};
pub use snapshot::{LeaseSummary, Snapshot};
