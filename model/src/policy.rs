//! The lease-limit policy: a pure function of the fleet's inputs.
//!
//! `max_leases_per_worker = min(cap, ceil(open_shards / workers))`
//!
//! No I/O here: the coordinator gathers the inputs, calls [`compute`] and publishes the result.

use serde::{Deserialize, Serialize};

/// What the coordinator knows about the fleet when it computes the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetInputs {
    /// `DescribeStreamSummary.OpenShardCount`.
    pub open_shards: u64,
    /// Workers with a fresh heartbeat.
    pub live_workers: u64,
    /// `StatefulSet.spec.replicas` when the worker count comes from Kubernetes.
    pub desired_workers: Option<u64>,
    /// The configured `max_leases_cap` (≥ 1).
    pub cap: u64,
}

/// The published decision and the numbers that explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLimit {
    pub max_leases_per_worker: u64,
    /// The divisor actually used: `min(desired, live)` with a desired count, else `live`,
    /// never below 1 (the coordinator computing this is itself a live worker).
    pub worker_count: u64,
    /// Shards nobody may hold because every worker is at the cap:
    /// `max(0, open_shards - cap * worker_count)`.
    pub capacity_deficit: u64,
    /// Workers needed so that nobody exceeds the cap: `ceil(open_shards / cap)`.
    pub workers_needed: u64,
}

/// Computes the lease limit. Total: never panics, saturates instead of overflowing.
pub fn compute(inputs: FleetInputs) -> LeaseLimit {
    let cap = inputs.cap.max(1);
    // A scale-up must not shrink the limit before the new pods are live, and a scale-down
    // must shrink the divisor as soon as the StatefulSet says so: hence min(desired, live).
    let worker_count = match inputs.desired_workers {
        Some(desired) => desired.min(inputs.live_workers),
        None => inputs.live_workers,
    }
    .max(1);
    let max_leases_per_worker = inputs.open_shards.div_ceil(worker_count).min(cap);
    let capacity_deficit = inputs
        .open_shards
        .saturating_sub(cap.saturating_mul(worker_count));
    LeaseLimit {
        max_leases_per_worker,
        worker_count,
        capacity_deficit,
        workers_needed: workers_needed(inputs.open_shards, cap),
    }
}

/// Workers needed so that nobody exceeds the cap: `ceil(open_shards / cap)` (a cap of 0 counts
/// as 1).
pub fn workers_needed(open_shards: u64, cap: u64) -> u64 {
    open_shards.div_ceil(cap.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limit(open_shards: u64, live: u64, desired: Option<u64>, cap: u64) -> LeaseLimit {
        compute(FleetInputs {
            open_shards,
            live_workers: live,
            desired_workers: desired,
            cap,
        })
    }

    #[test]
    fn design_phase_table() {
        // (shards, workers, expected limit, expected deficit) from the lab's phases (lab/scenarios.toml).
        for (shards, workers, expected, deficit) in [
            (30, 3, 10, 0),
            (60, 3, 20, 0),
            (30, 5, 6, 0),
            (300, 3, 80, 60),
        ] {
            let got = limit(shards, workers, None, 80);
            assert_eq!(got.max_leases_per_worker, expected, "{shards}/{workers}");
            assert_eq!(got.capacity_deficit, deficit, "{shards}/{workers}");
        }
        assert_eq!(limit(300, 3, None, 80).workers_needed, 4);
        assert_eq!(workers_needed(300, 0), 300, "a cap of 0 counts as 1");
    }

    #[test]
    fn rounds_up() {
        assert_eq!(limit(31, 3, None, 80).max_leases_per_worker, 11);
        assert_eq!(limit(1, 3, None, 80).max_leases_per_worker, 1);
    }

    #[test]
    fn fewer_shards_than_workers_gives_one() {
        assert_eq!(limit(2, 5, None, 80).max_leases_per_worker, 1);
    }

    #[test]
    fn zero_shards_gives_zero_and_no_deficit() {
        let got = limit(0, 3, None, 80);
        assert_eq!(got.max_leases_per_worker, 0);
        assert_eq!(got.capacity_deficit, 0);
        assert_eq!(got.workers_needed, 0);
    }

    #[test]
    fn zero_workers_is_treated_as_one() {
        let got = limit(30, 0, None, 80);
        assert_eq!(got.worker_count, 1);
        assert_eq!(got.max_leases_per_worker, 30);
        assert_eq!(limit(30, 3, Some(0), 80).worker_count, 1);
    }

    #[test]
    fn cap_hit_reports_deficit() {
        let got = limit(100, 1, None, 80);
        assert_eq!(got.max_leases_per_worker, 80);
        assert_eq!(got.capacity_deficit, 20);
        assert_eq!(got.workers_needed, 2);
    }

    #[test]
    fn cap_zero_is_treated_as_one() {
        assert_eq!(limit(10, 2, None, 0).max_leases_per_worker, 1);
    }

    #[test]
    fn desired_below_live_uses_desired() {
        // Scale-down 5 -> 3 while 5 pods still heartbeat: divide by 3 at once.
        assert_eq!(limit(30, 5, Some(3), 80).worker_count, 3);
        assert_eq!(limit(30, 5, Some(3), 80).max_leases_per_worker, 10);
    }

    #[test]
    fn desired_above_live_uses_live() {
        // Scale-up 3 -> 5 before the new pods heartbeat: keep dividing by 3.
        assert_eq!(limit(30, 3, Some(5), 80).max_leases_per_worker, 10);
    }

    #[test]
    fn huge_values_saturate() {
        let got = limit(u64::MAX, 1, None, u64::MAX);
        assert_eq!(got.max_leases_per_worker, u64::MAX);
        assert_eq!(got.capacity_deficit, 0);
        let got = limit(u64::MAX, u64::MAX, Some(u64::MAX), 80);
        assert_eq!(got.max_leases_per_worker, 1);
        assert_eq!(got.capacity_deficit, 0);
        let got = limit(u64::MAX, 2, None, 80);
        assert_eq!(got.capacity_deficit, u64::MAX - 160);
    }

    /// Exhaustive over a small domain: every combination up to 64 shards, 12 workers, cap 20.
    #[test]
    fn exhaustive_small_domain() {
        for shards in 0..=64u64 {
            for live in 0..=12u64 {
                for desired in std::iter::once(None).chain((0..=12).map(Some)) {
                    for cap in 1..=20u64 {
                        let got = limit(shards, live, desired, cap);
                        check_invariants(shards, live, desired, cap, got);
                    }
                }
            }
        }
    }

    fn check_invariants(shards: u64, live: u64, desired: Option<u64>, cap: u64, got: LeaseLimit) {
        let w = got.worker_count;
        assert!(w >= 1);
        assert!(w <= live.max(1));
        if let Some(d) = desired {
            assert!(w <= d.max(1));
        }
        assert!(got.max_leases_per_worker <= cap);
        // Enough: w workers at the limit cover every shard, unless the cap binds.
        if got.max_leases_per_worker < cap {
            assert!(u128::from(got.max_leases_per_worker) * u128::from(w) >= u128::from(shards));
        }
        // Tight: one lease fewer each would not cover every shard.
        if shards > 0 {
            assert!(got.max_leases_per_worker >= 1);
            assert!(
                u128::from(got.max_leases_per_worker - 1) * u128::from(w) < u128::from(shards)
                    || got.max_leases_per_worker == cap
            );
        }
        assert_eq!(
            u128::from(got.capacity_deficit),
            (u128::from(shards)).saturating_sub(u128::from(cap) * u128::from(w))
        );
        assert!(u128::from(got.workers_needed) * u128::from(cap) >= u128::from(shards));
    }

    proptest! {
        #[test]
        fn invariants_hold_for_any_input(
            shards in any::<u64>(),
            live in any::<u64>(),
            desired in proptest::option::of(any::<u64>()),
            cap in 1..u64::MAX,
        ) {
            let got = limit(shards, live, desired, cap);
            check_invariants(shards, live, desired, cap, got);
        }
    }
}
