//! Pure judgement of the coordinator post and of worker liveness.
//!
//! Both are judged on the observer's monotonic clock: a row is dead when its `counter` has not
//! changed for `failover_timeout` *as measured by the observer*. Wall-clock timestamps in the
//! rows are for humans only, so skew between pods cannot make two owners.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{CoordinatorRow, HeartbeatRow};

/// What a follower should do after reading the coordinator row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Someone holds the post and renewed recently. Read again by `recheck_by` at the latest,
    /// the instant the current owner would become stale.
    Follow { owner: String, recheck_by: Instant },
    /// Try to claim the post with `next_epoch`, conditional on the row still being `seen`.
    Claim {
        seen: Option<CoordinatorRow>,
        next_epoch: u64,
    },
}

/// Remembers the last coordinator row seen and since when it has been unchanged.
#[derive(Debug, Default)]
pub struct CoordinatorObserver {
    last: Option<(CoordinatorRow, Instant)>,
}

impl CoordinatorObserver {
    /// `min_epoch`: the highest epoch known from elsewhere (the `lease_limits` item), so a
    /// coordinator row that was deleted by hand cannot make epochs go backwards.
    pub fn judge(
        &mut self,
        row: Option<CoordinatorRow>,
        now: Instant,
        timeout: Duration,
        min_epoch: u64,
    ) -> Verdict {
        let Some(row) = row else {
            self.last = None;
            return Verdict::Claim {
                seen: None,
                next_epoch: min_epoch + 1,
            };
        };
        let next_epoch = row.epoch.max(min_epoch) + 1;
        if row.is_vacant() {
            self.last = None;
            return Verdict::Claim {
                seen: Some(row),
                next_epoch,
            };
        }
        let since = match &self.last {
            Some((last, since)) if *last == row => *since,
            _ => now,
        };
        self.last = Some((row.clone(), since));
        if now.duration_since(since) >= timeout {
            Verdict::Claim {
                seen: Some(row),
                next_epoch,
            }
        } else {
            Verdict::Follow {
                owner: row.owner,
                recheck_by: since + timeout,
            }
        }
    }

    /// Forget what was seen (after becoming coordinator, or losing a claim race).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

/// The coordinator's view of which workers are alive, from repeated heartbeat scans.
#[derive(Debug, Default)]
pub struct LivenessTracker {
    seen: HashMap<String, (u64, Instant)>,
}

/// One scan's judgement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Liveness {
    /// Worker ids with a heartbeat counter that moved within the timeout, sorted.
    pub live: Vec<String>,
    /// `(worker_id, counter)` of rows unchanged for the timeout.
    pub dead: Vec<(String, u64)>,
}

impl LivenessTracker {
    /// A row seen for the first time counts as live: it was written recently enough to exist
    /// (graceful shutdown deletes rows, TTL removes old ones), and counting a new worker at once
    /// is what makes scale-ups visible within one heartbeat.
    pub fn observe(&mut self, rows: &[HeartbeatRow], now: Instant, timeout: Duration) -> Liveness {
        let mut next = HashMap::with_capacity(rows.len());
        let mut out = Liveness::default();
        for row in rows {
            let since = match self.seen.get(&row.worker_id) {
                Some((counter, since)) if *counter == row.counter => *since,
                _ => now,
            };
            if now.duration_since(since) >= timeout {
                out.dead.push((row.worker_id.clone(), row.counter));
            } else {
                out.live.push(row.worker_id.clone());
            }
            next.insert(row.worker_id.clone(), (row.counter, since));
        }
        self.seen = next;
        out.live.sort();
        out.dead.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn row(owner: &str, epoch: u64, counter: u64) -> CoordinatorRow {
        CoordinatorRow {
            owner: owner.into(),
            epoch,
            counter,
            renewed_at: String::new(),
        }
    }

    fn hb(id: &str, counter: u64) -> HeartbeatRow {
        HeartbeatRow {
            worker_id: id.into(),
            counter,
            leases_held: 0,
            renewed_at: String::new(),
        }
    }

    #[test]
    fn absent_row_is_claimed_above_known_epoch() {
        let mut o = CoordinatorObserver::default();
        let now = Instant::now();
        assert_eq!(
            o.judge(None, now, T, 0),
            Verdict::Claim {
                seen: None,
                next_epoch: 1
            }
        );
        assert_eq!(
            o.judge(None, now, T, 7),
            Verdict::Claim {
                seen: None,
                next_epoch: 8
            }
        );
    }

    #[test]
    fn vacant_post_is_claimed_at_once_with_next_epoch() {
        let mut o = CoordinatorObserver::default();
        let vacant = row("", 4, 9);
        assert_eq!(
            o.judge(Some(vacant.clone()), Instant::now(), T, 2),
            Verdict::Claim {
                seen: Some(vacant),
                next_epoch: 5
            }
        );
    }

    #[test]
    fn renewing_owner_is_followed() {
        let mut o = CoordinatorObserver::default();
        let t0 = Instant::now();
        for i in 0..100u64 {
            let now = t0 + Duration::from_secs(i * 2);
            match o.judge(Some(row("a", 1, i)), now, T, 0) {
                Verdict::Follow { owner, recheck_by } => {
                    assert_eq!(owner, "a");
                    assert_eq!(recheck_by, now + T);
                }
                v => panic!("claimed a live post: {v:?}"),
            }
        }
    }

    #[test]
    fn silent_owner_is_taken_over_after_the_timeout_on_the_observers_clock() {
        let mut o = CoordinatorObserver::default();
        let t0 = Instant::now();
        let r = row("a", 3, 42);
        assert!(matches!(
            o.judge(Some(r.clone()), t0, T, 0),
            Verdict::Follow { .. }
        ));
        assert!(matches!(
            o.judge(Some(r.clone()), t0 + T - Duration::from_millis(1), T, 0),
            Verdict::Follow { .. }
        ));
        assert_eq!(
            o.judge(Some(r.clone()), t0 + T, T, 0),
            Verdict::Claim {
                seen: Some(r),
                next_epoch: 4
            }
        );
    }

    #[test]
    fn any_change_restarts_the_clock() {
        let mut o = CoordinatorObserver::default();
        let t0 = Instant::now();
        o.judge(Some(row("a", 3, 1)), t0, T, 0);
        // A new owner at a new epoch with counter 0 is a change even if counters look alike.
        let v = o.judge(Some(row("b", 4, 1)), t0 + T, T, 0);
        assert!(
            matches!(v, Verdict::Follow { ref owner, .. } if owner == "b"),
            "{v:?}"
        );
    }

    #[test]
    fn fresh_observer_never_claims_a_live_looking_row_at_once() {
        // A worker that just started knows nothing about the row's age: it must wait a full
        // timeout, whatever the row's wall-clock timestamp says.
        let mut o = CoordinatorObserver::default();
        let v = o.judge(Some(row("a", 1, 0)), Instant::now(), T, 0);
        assert!(matches!(v, Verdict::Follow { .. }));
    }

    #[test]
    fn liveness_counts_new_rows_and_drops_silent_ones() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        let out = l.observe(&[hb("a", 1), hb("b", 1)], t0, T);
        assert_eq!(out.live, vec!["a", "b"]);
        let out = l.observe(&[hb("a", 2), hb("b", 1)], t0 + T, T);
        assert_eq!(out.live, vec!["a"]);
        assert_eq!(out.dead, vec![("b".to_owned(), 1)]);
        // b comes back to life.
        let out = l.observe(&[hb("a", 3), hb("b", 2)], t0 + T * 2, T);
        assert_eq!(out.live, vec!["a", "b"]);
        // A deleted row is forgotten.
        let out = l.observe(&[hb("a", 4)], t0 + T * 3, T);
        assert_eq!(out.live, vec!["a"]);
        assert!(out.dead.is_empty());
    }
}
