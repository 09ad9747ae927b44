//! The fleet as one read sees it: what `kds-worker admin snapshot` prints, what the lab checks
//! after every scenario and what `cargo xtask monitor` shows. One type and one text rendering
//! for all three.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::rows::{CoordinatorRow, HeartbeatRow, PublishedLimit};

/// Everything the lab checks and the monitor shows, read in one go.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stream: String,
    pub open_shards: u64,
    pub lease_limits: Option<PublishedLimit>,
    /// Why the `lease_limits` item cannot be obeyed (then `lease_limits` is `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_limits_problem: Option<String>,
    pub coordinator: Option<CoordinatorRow>,
    pub heartbeats: Vec<HeartbeatRow>,
    pub leases: LeaseSummary,
}

/// The lease table summed up over the shards that may be read now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSummary {
    /// Shards that may be read now.
    pub readable: u64,
    /// Readable shards without an owner.
    pub unowned_readable: u64,
    /// Parents read to `SHARD_END`.
    pub finished: u64,
    /// Closed parents not yet read to the end (their children wait).
    pub parents_pending: u64,
    /// Readable leases per owner.
    pub by_owner: BTreeMap<String, u64>,
}

impl LeaseSummary {
    /// Readable shards with an owner.
    pub fn leased(&self) -> u64 {
        self.by_owner.values().sum()
    }
}

impl Snapshot {
    /// The published limit, its inputs, any deficit, and the coordinator: the lines every
    /// rendering of the fleet starts with.
    pub fn limits(&self) -> Limits<'_> {
        Limits(self)
    }
}

/// See [`Snapshot::limits`].
pub struct Limits<'a>(&'a Snapshot);

impl fmt::Display for Limits<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        match (&s.lease_limits, &s.lease_limits_problem) {
            (Some(l), _) => {
                writeln!(
                    f,
                    "lease_limits v{}: max_leases_per_worker = {} = min(cap {}, ceil({} shards / {} workers))",
                    l.version, l.max_leases_per_worker, l.cap, l.shard_count, l.worker_count
                )?;
                writeln!(
                    f,
                    "  live workers {}, desired {}, computed by {} (epoch {}) at {}",
                    l.live_workers,
                    l.desired_workers.map_or("-".into(), |d| d.to_string()),
                    l.computed_by,
                    l.epoch,
                    l.updated_at
                )?;
                if l.capacity_deficit > 0 {
                    writeln!(
                        f,
                        "  CAPACITY DEFICIT: {} shards cannot be leased at cap {}; {} workers would cover them",
                        l.capacity_deficit, l.cap, l.workers_needed
                    )?;
                }
            }
            (None, Some(problem)) => writeln!(f, "lease_limits: {problem}")?,
            (None, None) => writeln!(f, "lease_limits: not published yet")?,
        }
        match &s.coordinator {
            Some(c) if !c.is_vacant() => writeln!(
                f,
                "coordinator {} (epoch {}, renewal {} at {})",
                c.owner, c.epoch, c.counter, c.renewed_at
            ),
            Some(c) => writeln!(f, "coordinator: vacant (epoch {})", c.epoch),
            None => writeln!(f, "coordinator: none yet"),
        }
    }
}

/// The whole snapshot as text (`kds-worker admin snapshot`).
impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stream {}: {} open shards",
            self.stream, self.open_shards
        )?;
        write!(f, "{}", self.limits())?;
        for h in &self.heartbeats {
            let held = self.leases.by_owner.get(&h.worker_id).copied().unwrap_or(0);
            writeln!(
                f,
                "worker {}: {held} leases (heartbeat {} at {})",
                h.worker_id, h.counter, h.renewed_at
            )?;
        }
        let l = &self.leases;
        writeln!(
            f,
            "coverage: {}/{} readable shards leased, {} unowned, {} parents finished, {} parents pending",
            l.leased(),
            l.readable,
            l.unowned_readable,
            l.finished,
            l.parents_pending
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_the_cap() -> Snapshot {
        Snapshot {
            stream: "orders".into(),
            open_shards: 300,
            lease_limits: Some(PublishedLimit {
                max_leases_per_worker: 80,
                shard_count: 300,
                worker_count: 3,
                desired_workers: Some(3),
                live_workers: 3,
                cap: 80,
                capacity_deficit: 60,
                workers_needed: 4,
                epoch: 2,
                version: 7,
                computed_by: "w-1".into(),
                updated_at: "2026-11-28T12:00:00Z".into(),
            }),
            lease_limits_problem: None,
            coordinator: Some(CoordinatorRow {
                owner: "w-1".into(),
                epoch: 2,
                counter: 9,
                renewed_at: "2026-11-28T12:00:01Z".into(),
                failover_ms: Some(10_000),
                heartbeat_ms: Some(2_000),
                limit_stamp: None,
                lease_stamp: None,
                owner_heartbeat: None,
                verdict_due_in_ms: None,
            }),
            heartbeats: vec![HeartbeatRow {
                worker_id: "w-1".into(),
                counter: 4,
                leases_held: 80,
                renewed_at: "2026-11-28T12:00:02Z".into(),
                instance: None,
                failover_ms: None,
            }],
            leases: LeaseSummary {
                readable: 300,
                unowned_readable: 60,
                finished: 0,
                parents_pending: 0,
                by_owner: [
                    ("w-1".to_owned(), 80),
                    ("w-2".to_owned(), 80),
                    ("w-3".to_owned(), 80),
                ]
                .into(),
            },
        }
    }

    #[test]
    fn the_text_explains_the_limit_the_deficit_and_the_coordinator() {
        let text = at_the_cap().to_string();
        assert!(
            text.contains("max_leases_per_worker = 80 = min(cap 80, ceil(300 shards / 3 workers))"),
            "{text}"
        );
        assert!(text.contains(
            "CAPACITY DEFICIT: 60 shards cannot be leased at cap 80; 4 workers would cover them"
        ));
        assert!(text.contains("coordinator w-1 (epoch 2, renewal 9"));
        assert!(text.contains("worker w-1: 80 leases (heartbeat 4"));
        assert!(text.contains("coverage: 240/300 readable shards leased, 60 unowned"));
    }

    #[test]
    fn a_vacant_post_and_a_malformed_limit_are_said_plainly() {
        let mut s = at_the_cap();
        s.lease_limits = None;
        s.lease_limits_problem = Some("lease_limits item is malformed: cap is missing".into());
        s.coordinator.as_mut().unwrap().owner.clear();
        let text = s.limits().to_string();
        assert!(
            text.contains("lease_limits: lease_limits item is malformed"),
            "{text}"
        );
        assert!(text.contains("coordinator: vacant (epoch 2)"), "{text}");
    }

    /// The JSON the worker prints is the JSON the lab reads: every field, no defaults that
    /// would turn a renamed field into a zero.
    #[test]
    fn json_round_trips_and_a_missing_field_is_an_error() {
        let s = at_the_cap();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(serde_json::from_value::<Snapshot>(json.clone()).unwrap(), s);
        for field in ["open_shards", "leases", "heartbeats"] {
            let mut broken = json.clone();
            broken.as_object_mut().unwrap().remove(field);
            assert!(
                serde_json::from_value::<Snapshot>(broken).is_err(),
                "{field} missing was accepted"
            );
        }
        let mut broken = json;
        broken["lease_limits"]
            .as_object_mut()
            .unwrap()
            .remove("capacity_deficit");
        assert!(serde_json::from_value::<Snapshot>(broken).is_err());
    }
}
