//! Pure judgement of the coordinator post and of worker liveness.
//!
//! Both are judged on the observer's monotonic clock: a row is dead when its `counter` has not
//! changed for `failover_timeout` *as measured by the observer*, and never sooner than the
//! writer's own published timeout (`failover_ms`), so a worker configured with a longer
//! timeout than its observers is not taken over early. Wall-clock timestamps in the rows are
//! for humans only, so skew between pods cannot make two owners.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::MIN_FAILOVER_HEARTBEATS;
use crate::meta::{CoordinatorRow, HeartbeatRow};

/// The epoch a claimant takes: above both the coordinator item's epoch and the epoch of the
/// `lease_limits` item (a coordinator item deleted by hand must not make epochs go backwards,
/// or the claimant's publications would be refused for ever). Saturates at `u64::MAX`.
pub fn claim_epoch(coordinator_epoch: Option<u64>, limits_epoch: Option<u64>) -> u64 {
    coordinator_epoch
        .unwrap_or(0)
        .max(limits_epoch.unwrap_or(0))
        .saturating_add(1)
}

/// The least slack a follower allows past the owner's renewal interval before it takes a
/// renewal as missed (a renewal's own latency varies by a few milliseconds to tens).
pub const RENEWAL_SLACK_MIN: Duration = Duration::from_millis(250);

/// How long after the coordinator row last changed (on this follower's clock) a follower takes
/// a renewal as missed: the owner's renewal interval — its published heartbeat or, in a row
/// without one, the longest it can be (a quarter of its published timeout) — never shorter
/// than this follower's own heartbeat, plus a quarter of that, at least
/// [`RENEWAL_SLACK_MIN`]. A fleet in the middle of a change of heartbeat interval must not
/// take every renewal for a missed one.
pub fn renewal_missed_after(own_heartbeat: Duration, row: &CoordinatorRow) -> Duration {
    let owner = row
        .heartbeat()
        .or_else(|| row.failover().map(|f| f / MIN_FAILOVER_HEARTBEATS))
        .unwrap_or_default();
    let interval = owner.max(own_heartbeat);
    interval + (interval / 4).max(RENEWAL_SLACK_MIN)
}

/// How long an observer with `timeout` waits on a row whose writer published `published`.
fn effective_timeout(timeout: Duration, published: Option<Duration>) -> Duration {
    timeout.max(published.unwrap_or_default())
}

/// What a follower should do after reading the coordinator row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Someone holds the post and renewed recently. Read again by `recheck_by` at the latest,
    /// the instant the current owner would become stale. `silent_since`: when the row last
    /// changed on this observer's clock (the instant of this read when it just changed).
    Follow {
        owner: String,
        recheck_by: Instant,
        silent_since: Instant,
    },
    /// Try to claim the post with `next_epoch`, conditional on the row still being `seen`.
    /// `next_epoch` is above the row's epoch and `min_epoch`; the caller must also go above
    /// the `lease_limits` item's epoch ([`claim_epoch`]).
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
    /// coordinator row that was deleted by hand cannot make epochs go backwards. A live owner
    /// is taken over only after max(`timeout`, the row's published `failover_ms`) without a
    /// change, on this observer's clock.
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
                next_epoch: claim_epoch(None, Some(min_epoch)),
            };
        };
        let next_epoch = claim_epoch(Some(row.epoch), Some(min_epoch));
        if row.is_vacant() {
            self.last = None;
            return Verdict::Claim {
                seen: Some(row),
                next_epoch,
            };
        }
        let timeout = effective_timeout(timeout, row.failover());
        // Only a claim or a renewal is progress: the owner's publications also write the row
        // (their stamp), and a coordinator that publishes but cannot renew must still be
        // taken over on time.
        let since = match &self.last {
            Some((last, since)) if last.renewal_key() == row.renewal_key() => *since,
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
                silent_since: since,
            }
        }
    }

    /// The row as last read and since when its renewal has stood still on this observer's
    /// clock (`None` before a row of a live owner was read, and after a vacant or absent one).
    pub fn last_renewal(&self) -> Option<(&CoordinatorRow, Instant)> {
        self.last.as_ref().map(|(row, since)| (row, *since))
    }

    /// What the silent owner's last renewal proves about its own worker, for a takeover's
    /// liveness (see [`LivenessTracker::seed`]): its heartbeat row showed the recorded
    /// counter no later than this observer first saw that renewal.
    pub fn owner_heartbeat_seen(&self) -> Option<(&str, &crate::meta::OwnerHeartbeat, Instant)> {
        let (row, since) = self.last_renewal()?;
        Some((row.owner.as_str(), row.owner_heartbeat.as_ref()?, since))
    }

    /// Forget what was seen (after becoming coordinator, or losing a claim race).
    pub fn reset(&mut self) {
        self.last = None;
    }
}

/// What one worker id looked like in the previous scans.
#[derive(Debug, Clone)]
struct Seen {
    /// `None`: expected (a lease owner) but without a heartbeat row.
    counter: Option<u64>,
    /// The process that wrote the row: a new one (a restart) is progress even when its
    /// counter, starting again at 1, happens to equal the old one.
    instance: Option<String>,
    /// Last change (counter moved, another instance wrote the row, the row appeared or
    /// vanished without this observer removing it) on the observer's clock.
    since: Instant,
    /// The writer's published timeout, remembered after its row vanished.
    failover: Option<Duration>,
}

/// The coordinator's view of which workers are alive, from repeated heartbeat scans (one
/// per lease round, and the one its worker made as a follower when the post went silent).
#[derive(Debug, Default)]
pub struct LivenessTracker {
    seen: HashMap<String, Seen>,
    /// When the last judged read was issued: workers due after it have not been judged dead.
    judged_at: Option<Instant>,
}

/// One scan's judgement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Liveness {
    /// Worker ids that made progress within their timeout, sorted.
    pub live: Vec<String>,
    /// `(worker_id, counter)` of workers without progress for their timeout, sorted; the
    /// counter is `None` for an expected worker without a heartbeat row.
    pub dead: Vec<(String, Option<u64>)>,
}

impl LivenessTracker {
    /// Judges `rows` (every heartbeat item) and `expected` (worker ids known from elsewhere,
    /// such as lease owners). A worker is dead only after `timeout` (or the longer timeout its
    /// row publishes) without progress on this observer's clock, row or no row: a counter
    /// change is progress, and so are a new instance writing the row, a row appearing, and a
    /// row vanishing unless this observer removed it ([`LivenessTracker::row_removed`]); an
    /// expected worker without a row is live until it has been absent for the timeout.
    ///
    /// Everything seen for the first time counts as live: a row was written recently enough
    /// to exist (graceful shutdown deletes rows, the coordinator removes dead ones), and
    /// counting a new worker at once is what makes scale-ups visible at the next scan.
    /// Ids neither in `rows` nor in `expected` are forgotten.
    pub fn observe<'a>(
        &mut self,
        rows: &[HeartbeatRow],
        expected: impl IntoIterator<Item = &'a str>,
        now: Instant,
        timeout: Duration,
    ) -> Liveness {
        self.observe_read(rows, expected, now, now, timeout)
    }

    /// [`LivenessTracker::observe`] for rows read by a request sent at `issued` and answered
    /// at `answered`: progress is dated `answered` (the latest the heartbeat can have landed),
    /// silence is judged at `issued` (nothing after it is known). Both err towards "alive", so
    /// a slow scan or a slow round can never make a live worker look dead.
    pub fn observe_read<'a>(
        &mut self,
        rows: &[HeartbeatRow],
        expected: impl IntoIterator<Item = &'a str>,
        issued: Instant,
        answered: Instant,
        timeout: Duration,
    ) -> Liveness {
        let now = answered;
        let mut next: HashMap<String, Seen> = HashMap::with_capacity(rows.len());
        let mut out = Liveness::default();
        let mut judge = |id: &str, seen: Seen, out: &mut Liveness| {
            if issued.saturating_duration_since(seen.since)
                >= effective_timeout(timeout, seen.failover)
            {
                out.dead.push((id.to_owned(), seen.counter));
            } else {
                out.live.push(id.to_owned());
            }
            next.insert(id.to_owned(), seen);
        };
        for row in rows {
            let since = match self.seen.get(&row.worker_id) {
                Some(prev)
                    if prev.counter == Some(row.counter) && prev.instance == row.instance =>
                {
                    prev.since
                }
                _ => now,
            };
            let seen = Seen {
                counter: Some(row.counter),
                instance: row.instance.clone(),
                since,
                failover: row.failover(),
            };
            judge(&row.worker_id, seen, &mut out);
        }
        let with_rows: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.worker_id.as_str()).collect();
        let mut done = std::collections::HashSet::new();
        for id in expected {
            if with_rows.contains(id) || !done.insert(id) {
                continue;
            }
            let seen = match self.seen.get(id) {
                // Still absent: the absence clock keeps running.
                Some(prev) if prev.counter.is_none() => prev.clone(),
                // The row vanished without this observer removing it (an operator deleted it,
                // or a coordinator before this one did): the worker may have written it until
                // the delete, unseen, so its absence counts from now, like a row appearing.
                Some(prev) => Seen {
                    counter: None,
                    instance: None,
                    since: now,
                    failover: prev.failover,
                },
                // Never seen: absent from now.
                None => Seen {
                    counter: None,
                    instance: None,
                    since: now,
                    failover: None,
                },
            };
            judge(id, seen, &mut out);
        }
        self.seen = next;
        self.judged_at = Some(issued);
        out.live.sort();
        out.dead.sort();
        out
    }

    /// The earliest instant at which a worker seen so far, silent since, would be judged
    /// dead: where to schedule the next scan so a death is noticed when it is due, not up to
    /// a whole round later. Only workers judged alive at the last read count (the others
    /// were judged dead there); `None` when there are none.
    pub fn next_verdict(&self, timeout: Duration) -> Option<Instant> {
        let judged_at = self.judged_at?;
        self.seen
            .values()
            .map(|seen| seen.since + effective_timeout(timeout, seen.failover))
            .filter(|due| *due > judged_at)
            .min()
    }

    /// Starts `worker_id`'s silence clock at `seen_by` when its row shows `counter` written by
    /// `instance` at the next read: `seen_by` must be no earlier than that write landed (a
    /// coordinator renewal recording the heartbeat, first seen at `seen_by`, was sent after
    /// the heartbeat was acknowledged). A row showing anything else at the next read is
    /// progress, as usual. Only fills a worker this observer has not seen yet.
    pub fn seed(&mut self, worker_id: &str, counter: u64, instance: &str, seen_by: Instant) {
        self.seen.entry(worker_id.to_owned()).or_insert(Seen {
            counter: Some(counter),
            instance: Some(instance.to_owned()),
            since: seen_by,
            failover: None,
        });
    }

    /// The earliest verdict due among *suspects*, workers other than `except` silent for at
    /// least three quarters of their timeout as of `now` (three missed heartbeats at four
    /// heartbeats a timeout, whatever heartbeat each runs: by then its own fence is up, so a
    /// suspect is all but certainly gone, and an overloaded table that merely delays
    /// heartbeats seldom makes one): when their leases will likely move. `None` when nobody
    /// is that silent.
    pub fn next_suspect_verdict(
        &self,
        except: &str,
        now: Instant,
        timeout: Duration,
    ) -> Option<Instant> {
        let judged_at = self.judged_at?;
        self.seen
            .iter()
            .filter(|(id, _)| id.as_str() != except)
            .map(|(_, seen)| (seen.since, effective_timeout(timeout, seen.failover)))
            .filter(|(since, timeout)| now.saturating_duration_since(*since) >= *timeout * 3 / 4)
            .map(|(since, timeout)| since + timeout)
            .filter(|due| *due > judged_at)
            .min()
    }

    /// This observer deleted `worker_id`'s row, conditional on the counter and instance it
    /// judged, so nothing was written unseen before it went: while the row is absent the
    /// worker stays silent since its counter last moved, and whatever row appears for it next
    /// is progress. (A row that reappears and is deleted again by hand before the next scan
    /// is never seen: heartbeat rows of running workers must not be deleted by hand.)
    pub fn row_removed(&mut self, worker_id: &str) {
        if let Some(seen) = self.seen.get_mut(worker_id) {
            seen.counter = None;
            seen.instance = None;
        }
    }
}

/// This worker id's own heartbeat row while another process (instance) holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// The other instance made progress within the timeout: stay fenced, look again.
    /// `silent_since` is when its row last changed on this observer's clock.
    Live {
        instance: String,
        silent_since: Instant,
    },
    /// Silent for the timeout: take the row over, conditional on it being unchanged.
    Silent { instance: String },
}

/// Judges the other instance holding this worker's heartbeat row, on this process's clock:
/// it is silent once its counter stood still for max(own timeout, its published timeout).
#[derive(Debug, Default)]
pub struct HolderObserver {
    last: Option<(Option<String>, u64, Instant)>,
}

impl HolderObserver {
    pub fn judge(&mut self, row: &HeartbeatRow, now: Instant, timeout: Duration) -> Holder {
        let key = (row.instance.clone(), row.counter);
        let since = match &self.last {
            Some((instance, counter, since)) if (instance, counter) == (&key.0, &key.1) => *since,
            _ => now,
        };
        self.last = Some((key.0, key.1, since));
        let instance = row.instance.clone().unwrap_or_default();
        if now.duration_since(since) >= effective_timeout(timeout, row.failover()) {
            Holder::Silent { instance }
        } else {
            Holder::Live {
                instance,
                silent_since: since,
            }
        }
    }

    /// Forget the row (after this instance wrote it).
    pub fn reset(&mut self) {
        self.last = None;
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
            failover_ms: None,
            heartbeat_ms: None,
            limit_stamp: None,
            lease_stamp: None,
            owner_heartbeat: None,
            verdict_due_in_ms: None,
        }
    }

    #[test]
    fn a_renewal_is_missed_after_the_owners_interval_and_some_slack() {
        let ms = Duration::from_millis;
        let mut r = row("a", 1, 1);
        // Published heartbeat: a quarter of it as slack, at least 250 ms.
        r.heartbeat_ms = Some(2_000);
        assert_eq!(renewal_missed_after(ms(2_000), &r), ms(2_500));
        r.heartbeat_ms = Some(500);
        assert_eq!(renewal_missed_after(ms(500), &r), ms(750));
        // An owner renewing more slowly than this follower's heartbeat is waited for...
        r.heartbeat_ms = Some(10_000);
        assert_eq!(renewal_missed_after(ms(2_000), &r), ms(12_500));
        // ...and one renewing faster is judged at this follower's own pace.
        r.heartbeat_ms = Some(1_000);
        assert_eq!(renewal_missed_after(ms(2_000), &r), ms(2_500));
        // A row without a published heartbeat: the longest it can be, a quarter of the
        // published timeout.
        r.heartbeat_ms = None;
        r.failover_ms = Some(40_000);
        assert_eq!(renewal_missed_after(ms(2_000), &r), ms(12_500));
        // Neither published: this follower's own heartbeat.
        r.failover_ms = None;
        assert_eq!(renewal_missed_after(ms(2_000), &r), ms(2_500));
    }

    fn hb(id: &str, counter: u64) -> HeartbeatRow {
        HeartbeatRow {
            worker_id: id.into(),
            counter,
            leases_held: 0,
            renewed_at: String::new(),
            instance: None,
            failover_ms: None,
        }
    }

    fn none() -> std::iter::Empty<&'static str> {
        std::iter::empty()
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
                Verdict::Follow {
                    owner,
                    recheck_by,
                    silent_since,
                } => {
                    assert_eq!(owner, "a");
                    assert_eq!(recheck_by, now + T);
                    // Renewed since the last read: not silent at all.
                    assert_eq!(silent_since, now);
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
        // Unchanged at a later read: silent since the first read that saw it.
        assert!(matches!(
            o.judge(Some(r.clone()), t0 + T - Duration::from_millis(1), T, 0),
            Verdict::Follow { silent_since, .. } if silent_since == t0
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
    fn a_new_limit_stamp_is_not_a_renewal() {
        let t0 = Instant::now();
        let mut o = CoordinatorObserver::default();
        o.judge(Some(row("a", 1, 5)), t0, T, 0);
        let mut stamped = row("a", 1, 5);
        stamped.limit_stamp = Some(crate::meta::LimitStamp {
            epoch: 1,
            version: 9,
        });
        // Published, never renewed: taken over one timeout after the counter last moved.
        assert!(matches!(
            o.judge(Some(stamped.clone()), t0 + T / 2, T, 0),
            Verdict::Follow { silent_since, .. } if silent_since == t0
        ));
        assert!(matches!(
            o.judge(Some(stamped), t0 + T, T, 0),
            Verdict::Claim { .. }
        ));
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
        let out = l.observe(&[hb("a", 1), hb("b", 1)], none(), t0, T);
        assert_eq!(out.live, vec!["a", "b"]);
        let out = l.observe(&[hb("a", 2), hb("b", 1)], none(), t0 + T, T);
        assert_eq!(out.live, vec!["a"]);
        assert_eq!(out.dead, vec![("b".to_owned(), Some(1))]);
        // b comes back to life.
        let out = l.observe(&[hb("a", 3), hb("b", 2)], none(), t0 + T * 2, T);
        assert_eq!(out.live, vec!["a", "b"]);
        // A deleted row is forgotten.
        let out = l.observe(&[hb("a", 4)], none(), t0 + T * 3, T);
        assert_eq!(out.live, vec!["a"]);
        assert!(out.dead.is_empty());
    }

    #[test]
    fn a_seeded_owner_is_judged_from_its_last_renewal_unless_its_row_moved() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let with = |id: &str, counter: u64, instance: &str| HeartbeatRow {
            instance: Some(instance.into()),
            ..hb(id, counter)
        };
        // The renewal recording heartbeat 7 of process p1 was first seen at t0; the rows are
        // read at t0 + 3 s.
        let seeded = || {
            let mut l = LivenessTracker::default();
            l.seed("c", 7, "p1", t0);
            l
        };
        let mut l = seeded();
        l.observe(&[with("c", 7, "p1"), with("w", 3, "p2")], none(), at(3), T);
        assert_eq!(l.next_verdict(T), Some(t0 + T), "silent since the renewal");
        let out = l.observe(&[with("c", 7, "p1"), with("w", 4, "p2")], none(), t0 + T, T);
        assert_eq!(out.dead, vec![("c".to_owned(), Some(7))]);
        assert_eq!(out.live, vec!["w"]);
        // Its row moved on after the renewal, or another process writes it: progress as of
        // the read, as without a seed.
        for row in [with("c", 8, "p1"), with("c", 7, "p9")] {
            let mut l = seeded();
            l.observe(std::slice::from_ref(&row), none(), at(3), T);
            assert_eq!(l.next_verdict(T), Some(at(3) + T), "{row:?}");
        }
        // A worker already observed keeps what was seen of it.
        let mut l = LivenessTracker::default();
        l.observe(&[with("c", 7, "p1")], none(), at(2), T);
        l.seed("c", 7, "p1", t0);
        l.observe(&[with("c", 7, "p1")], none(), at(3), T);
        assert_eq!(l.next_verdict(T), Some(at(2) + T));
    }

    #[test]
    fn a_suspect_is_a_worker_silent_for_three_quarters_of_its_timeout_other_than_the_observer() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        l.observe(&[hb("me", 1), hb("a", 1), hb("b", 1)], none(), t0, T);
        // a and the observer's own row silent since t0; b moved at t0 + 3 s.
        l.observe(
            &[hb("me", 1), hb("a", 1), hb("b", 2)],
            none(),
            t0 + s * 3,
            T,
        );
        let suspect = |now: Instant| l.next_suspect_verdict("me", now, T);
        assert_eq!(suspect(t0 + s * 7), None, "nobody silent for 7.5 s yet");
        assert_eq!(suspect(t0 + s * 8), Some(t0 + T), "a, due at t0 + T");
        // A row publishing a longer timeout is a suspect only after three quarters of that.
        let mut l2 = LivenessTracker::default();
        let slow = HeartbeatRow {
            failover_ms: Some(40_000),
            ..hb("c", 1)
        };
        l2.observe(std::slice::from_ref(&slow), none(), t0, T);
        assert_eq!(l2.next_suspect_verdict("me", t0 + s * 29, T), None);
        assert_eq!(
            l2.next_suspect_verdict("me", t0 + s * 30, T),
            Some(t0 + s * 40)
        );
    }

    #[test]
    fn the_next_verdict_is_the_earliest_silent_worker_due() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        assert_eq!(l.next_verdict(T), None);
        l.observe(&[hb("a", 1), hb("b", 1)], none(), t0, T);
        // b goes silent at t0; a keeps writing, so b is the one due first.
        l.observe(&[hb("a", 2), hb("b", 1)], none(), t0 + s * 2, T);
        assert_eq!(l.next_verdict(T), Some(t0 + T));
        // Read exactly when due, b is dead; a's deadline is the next one.
        let out = l.observe(&[hb("a", 2), hb("b", 1)], none(), t0 + T, T);
        assert_eq!(out.dead, vec![("b".to_owned(), Some(1))]);
        assert_eq!(l.next_verdict(T), Some(t0 + s * 2 + T));
        // A longer published timeout is what a worker is judged by.
        let mut slow = hb("c", 1);
        slow.failover_ms = Some(30_000);
        l.observe(&[slow], none(), t0 + T, T);
        assert_eq!(l.next_verdict(T), Some(t0 + T + Duration::from_secs(30)));
        // An expected owner without a row is due once it has been absent for the timeout.
        let mut l = LivenessTracker::default();
        l.observe(&[], ["d"], t0, T);
        assert_eq!(l.next_verdict(T), Some(t0 + T));
        let out = l.observe(&[], ["d"], t0 + T, T);
        assert_eq!(out.dead, vec![("d".to_owned(), None)]);
        assert_eq!(l.next_verdict(T), None);
    }

    #[test]
    fn a_new_row_after_the_dead_one_was_removed_is_progress() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        l.observe(&[hb("e", 1)], none(), t0, T);
        let out = l.observe(&[hb("e", 1)], ["e"], t0 + T, T);
        assert_eq!(out.dead, vec![("e".to_owned(), Some(1))]);
        // Unremoved, the same counter read again is still silence.
        let out = l.observe(&[hb("e", 1)], ["e"], t0 + T * 2, T);
        assert_eq!(out.dead, vec![("e".to_owned(), Some(1))]);
        // Removed, the next row read (a restarted instance's, counter 1 again) is progress,
        // even when no read saw the row missing in between.
        l.row_removed("e");
        let out = l.observe(&[hb("e", 1)], ["e"], t0 + T * 2, T);
        assert_eq!(out.live, vec!["e"]);
        // A new process writing the row is progress too, whatever its counter.
        let mut restarted = hb("e", 1);
        restarted.instance = Some("second".into());
        let out = l.observe(&[restarted.clone()], ["e"], t0 + T * 4, T);
        assert_eq!(out.live, vec!["e"]);
        let out = l.observe(&[restarted], ["e"], t0 + T * 4 + Duration::from_secs(1), T);
        assert_eq!(out.live, vec!["e"]);
    }

    #[test]
    fn a_row_publishing_a_longer_timeout_is_waited_for() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        let mut slow = hb("slow", 1);
        slow.failover_ms = Some(30_000);
        let mut fast = hb("fast", 1);
        fast.failover_ms = Some(1_000);
        l.observe(&[slow.clone(), fast.clone()], none(), t0, T);
        // The observer's own (longer) timeout applies to "fast"; "slow" publishes 30 s.
        let out = l.observe(&[slow.clone(), fast.clone()], none(), t0 + T, T);
        assert_eq!(out.live, vec!["slow"]);
        assert_eq!(out.dead, vec![("fast".to_owned(), Some(1))]);
        let out = l.observe(&[slow.clone()], none(), t0 + Duration::from_secs(29), T);
        assert_eq!(out.live, vec!["slow"]);
        let out = l.observe(&[slow], none(), t0 + Duration::from_secs(30), T);
        assert_eq!(out.dead, vec![("slow".to_owned(), Some(1))]);
    }

    #[test]
    fn an_expected_worker_without_a_row_is_live_until_absent_for_the_timeout() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        // A fresh tracker: a lease owner without a row is live at first sight.
        let out = l.observe(&[], ["owner"], t0, T);
        assert_eq!(out.live, vec!["owner"]);
        let out = l.observe(
            &[],
            ["owner", "owner"],
            t0 + T - Duration::from_millis(1),
            T,
        );
        assert_eq!(out.live, vec!["owner"]);
        assert!(out.dead.is_empty());
        let out = l.observe(&[], ["owner"], t0 + T, T);
        assert!(out.live.is_empty());
        assert_eq!(out.dead, vec![("owner".to_owned(), None)]);
        // Its row appears: progress.
        let out = l.observe(&[hb("owner", 1)], ["owner"], t0 + T * 2, T);
        assert_eq!(out.live, vec!["owner"]);
    }

    #[test]
    fn a_row_that_vanished_unseen_is_absent_from_then_with_its_timeout() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        let mut r = hb("w", 5);
        r.failover_ms = Some(20_000);
        l.observe(std::slice::from_ref(&r), ["w"], t0, T);
        l.observe(
            std::slice::from_ref(&r),
            ["w"],
            t0 + Duration::from_secs(5),
            T,
        );
        // Gone at 6 s, deleted by someone else (an operator, an earlier coordinator): the
        // worker may have written it until the delete, unseen, so its absence counts from the
        // read that found it gone, judged with the timeout it published.
        let gone = t0 + Duration::from_secs(6);
        assert_eq!(l.observe(&[], ["w"], gone, T).live, vec!["w"]);
        let out = l.observe(&[], ["w"], gone + Duration::from_millis(19_999), T);
        assert_eq!(out.live, vec!["w"]);
        let out = l.observe(&[], ["w"], gone + Duration::from_secs(20), T);
        assert_eq!(out.dead, vec![("w".to_owned(), None)]);
        // A live worker writes its row again: alive from then on.
        let out = l.observe(&[hb("w", 6)], ["w"], t0 + Duration::from_secs(27), T);
        assert_eq!(out.live, vec!["w"]);
        // Not expected any more and no row: forgotten.
        let out = l.observe(&[], none(), t0 + Duration::from_secs(28), T);
        assert_eq!(out, Liveness::default());
    }

    #[test]
    fn a_row_this_observer_removed_stays_silent_since_its_counter_last_moved() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        l.observe(&[hb("w", 5)], ["w"], t0, T);
        l.observe(&[hb("w", 5)], ["w"], t0 + T, T);
        // Deleted by this observer, conditional on counter 5: nothing written in between.
        l.row_removed("w");
        let out = l.observe(&[], ["w"], t0 + T + Duration::from_millis(1), T);
        assert_eq!(out.dead, vec![("w".to_owned(), None)]);
    }

    #[test]
    fn an_owner_never_seen_is_live_for_a_whole_timeout() {
        let mut l = LivenessTracker::default();
        let t0 = Instant::now();
        assert_eq!(l.observe(&[], ["x"], t0, T).live, vec!["x"]);
        assert_eq!(
            l.observe(&[], ["x"], t0 + T - Duration::from_millis(1), T)
                .live,
            vec!["x"]
        );
        assert_eq!(
            l.observe(&[], ["x"], t0 + T, T).dead,
            vec![("x".to_owned(), None)]
        );
    }

    #[test]
    fn the_coordinator_rows_published_timeout_delays_a_takeover() {
        let mut o = CoordinatorObserver::default();
        let t0 = Instant::now();
        let mut r = row("a", 3, 42);
        r.failover_ms = Some(25_000);
        match o.judge(Some(r.clone()), t0, T, 0) {
            Verdict::Follow { recheck_by, .. } => {
                assert_eq!(recheck_by, t0 + Duration::from_secs(25))
            }
            v => panic!("{v:?}"),
        }
        assert!(matches!(
            o.judge(Some(r.clone()), t0 + Duration::from_secs(24), T, 0),
            Verdict::Follow { .. }
        ));
        assert!(matches!(
            o.judge(Some(r.clone()), t0 + Duration::from_secs(25), T, 0),
            Verdict::Claim { next_epoch: 4, .. }
        ));
        // A shorter published timeout never shortens the observer's own.
        let mut o = CoordinatorObserver::default();
        r.failover_ms = Some(1);
        o.judge(Some(r.clone()), t0, T, 0);
        assert!(matches!(
            o.judge(Some(r), t0 + T - Duration::from_millis(1), T, 0),
            Verdict::Follow { .. }
        ));
    }

    #[test]
    fn claim_epochs_go_above_both_items_and_saturate() {
        assert_eq!(claim_epoch(None, None), 1);
        assert_eq!(claim_epoch(None, Some(7)), 8);
        assert_eq!(claim_epoch(Some(3), Some(7)), 8);
        assert_eq!(claim_epoch(Some(9), Some(7)), 10);
        assert_eq!(claim_epoch(Some(u64::MAX), None), u64::MAX);
        let mut o = CoordinatorObserver::default();
        assert_eq!(
            o.judge(Some(row("", u64::MAX, 0)), Instant::now(), T, 0),
            Verdict::Claim {
                seen: Some(row("", u64::MAX, 0)),
                next_epoch: u64::MAX
            }
        );
    }

    #[test]
    fn another_instance_is_silent_after_the_timeout_without_progress() {
        let mut h = HolderObserver::default();
        let t0 = Instant::now();
        let mut r = hb("w0", 7);
        r.instance = Some("other".into());
        assert_eq!(
            h.judge(&r, t0, T),
            Holder::Live {
                instance: "other".into(),
                silent_since: t0
            }
        );
        // It renews: the clock restarts.
        r.counter = 8;
        let t1 = t0 + Duration::from_secs(9);
        assert!(
            matches!(h.judge(&r, t1, T), Holder::Live { silent_since, .. } if silent_since == t1)
        );
        assert!(matches!(
            h.judge(&r, t1 + T - Duration::from_millis(1), T),
            Holder::Live { .. }
        ));
        assert_eq!(
            h.judge(&r, t1 + T, T),
            Holder::Silent {
                instance: "other".into()
            }
        );
        // Another instance appearing in the row is a change.
        r.instance = Some("third".into());
        assert!(matches!(h.judge(&r, t1 + T * 2, T), Holder::Live { .. }));
        // Its published timeout counts when it is longer.
        r.failover_ms = Some(15_000);
        let t2 = t1 + T * 2;
        assert!(matches!(h.judge(&r, t2 + T, T), Holder::Live { .. }));
        assert!(matches!(
            h.judge(&r, t2 + Duration::from_secs(15), T),
            Holder::Silent { .. }
        ));
    }
}
