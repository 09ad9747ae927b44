//! `kds-worker`: a Kinesis consumer worker whose shard-lease limit is computed by an elected
//! coordinator and published in DynamoDB.
//!
//! The pipeline, each step a module, imports pointing down it:
//! inputs ([`inputs`]: open shards, desired replicas; [`election::LivenessTracker`]: live
//! workers) → pure policy ([`policy`], from the `kds-model` crate) → coordinator
//! ([`election`]: the pure rules; [`coordinator`]: the election loop and the term's duties,
//! with [`assignment`] planning the leases) → published limit ([`meta`], the metadata table)
//! → leases ([`leases`], [`lease_manager`]) → consumers ([`consumer`], handing records to a
//! [`processor`]). [`worker`] starts the loops, which share one [`context`]; [`state`] is what
//! they report.
//! Edges: [`config`] (figment), [`aws`] (SDK clients, error mapping), [`schema`] (tables),
//! [`http`] (hyper), [`metrics`], [`telemetry`], [`backoff`]; [`admin`] and [`audit`] serve the
//! operator commands and the lab.

pub mod admin;
pub mod assignment;
pub mod audit;
pub mod aws;
pub mod backoff;
pub mod config;
pub mod consumer;
pub mod context;
pub mod coordinator;
pub mod election;
pub mod http;
pub mod inputs;
pub mod lease_manager;
pub mod leases;
pub mod meta;
pub mod metrics;
pub mod processor;
pub mod schema;
pub mod state;
pub mod telemetry;
pub mod worker;

/// The fleet's shared data (its own crate, so the lab reads it without the AWS SDK).
pub use kds_model as model;
/// The lease-limit policy: a pure function of the fleet's inputs.
pub use kds_model::policy;
