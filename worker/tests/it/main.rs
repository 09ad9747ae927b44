//! kds-worker's integration tests, in one binary (one link instead of one per file): each
//! module covers one area against the emulators (or, for `kubernetes`, an API-server
//! stand-in); `support` is the shared harness. Run one area with
//! `cargo test -p kds-worker --test it faults::`.

mod support;

mod bad_items;
mod binary;
mod coordination;
mod cost;
mod emulator_conformance;
mod faults;
mod kubernetes;
mod leases;
mod manifests;
mod outage;
mod readers;
