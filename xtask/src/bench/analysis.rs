//! The bench's figures from what each consumer delivered: pure functions of the record lines
//! every system writes (`unix-micros TAB worker TAB shard TAB counter TAB sequence TAB data`,
//! the worker's `record_log` format) and of the script's marks. Nothing here reads a lease
//! table: a shard counts as read when a record from it reached a consumer's callback.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One record as a consumer's callback received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Seconds since the run began.
    pub at: f64,
    pub worker: String,
    pub shard: String,
    pub sequence: String,
    pub data: String,
    /// When the producer put it (its data's `"at"`), in seconds since the run began.
    pub put_at: Option<f64>,
}

/// Parses record-log lines; `t0_micros` is the run's start (unix microseconds). Torn or
/// foreign lines are skipped.
pub fn parse(text: &str, t0_micros: u128) -> Vec<Delivery> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, '\t');
            let micros: u128 = f.next()?.parse().ok()?;
            let (worker, shard, _counter) = (f.next()?, f.next()?, f.next()?);
            let (sequence, data) = (f.next()?, f.next()?);
            let put_ms: Option<u128> = data
                .split("\"at\":")
                .nth(1)
                .map(|r| {
                    r.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .and_then(|d| d.parse().ok());
            let secs = |m: u128| (m as f64 - t0_micros as f64) / 1e6;
            Some(Delivery {
                at: secs(micros),
                worker: worker.to_owned(),
                shard: shard.to_owned(),
                sequence: sequence.to_owned(),
                data: data.to_owned(),
                put_at: put_ms.map(|ms| secs(ms * 1000)),
            })
        })
        .collect()
}

/// Shards read in the `window` seconds up to each whole second `0..=end`.
pub fn coverage(deliveries: &[Delivery], end: u64, window: f64) -> Vec<u64> {
    let mut by_shard: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for d in deliveries {
        by_shard.entry(&d.shard).or_default().push(d.at);
    }
    for times in by_shard.values_mut() {
        times.sort_by(f64::total_cmp);
    }
    (0..=end)
        .map(|s| {
            let t = s as f64;
            by_shard
                .values()
                .filter(|times| {
                    // Any delivery in (t - window, t]?
                    let i = times.partition_point(|x| *x <= t);
                    i > 0 && times[i - 1] > t - window
                })
                .count() as u64
        })
        .collect()
}

/// The first second from `from` on at which `coverage` reaches `expected`.
pub fn time_to_cover(coverage: &[u64], expected: u64, from: u64) -> Option<u64> {
    (from as usize..coverage.len())
        .find(|s| coverage[*s] >= expected)
        .map(|s| s as u64 - from)
}

/// Shard-seconds without a delivery in `[from, to)`: the sum of `expected - coverage`.
pub fn unread_shard_seconds(coverage: &[u64], expected: u64, from: u64, to: u64) -> u64 {
    (from..to.min(coverage.len() as u64))
        .map(|s| expected.saturating_sub(coverage[s as usize]))
        .sum()
}

/// Shards each worker read in `(at - window, at]`; `max - min` over `workers` is the spread.
pub fn shards_per_worker(
    deliveries: &[Delivery],
    at: f64,
    window: f64,
    workers: &[String],
) -> BTreeMap<String, u64> {
    let mut sets: BTreeMap<&str, BTreeSet<&str>> = workers
        .iter()
        .map(|w| (w.as_str(), BTreeSet::new()))
        .collect();
    for d in deliveries
        .iter()
        .filter(|d| d.at > at - window && d.at <= at)
    {
        if let Some(s) = sets.get_mut(d.worker.as_str()) {
            s.insert(&d.shard);
        }
    }
    sets.into_iter()
        .map(|(w, s)| (w.to_owned(), s.len() as u64))
        .collect()
}

/// After `victim` stopped at `at`: seconds until every shard it read in the `window` before
/// was read by someone else (`None` if one never was, or it read nothing).
pub fn failover(deliveries: &[Delivery], victim: &str, at: f64, window: f64) -> Option<f64> {
    let orphans: BTreeSet<&str> = deliveries
        .iter()
        .filter(|d| d.worker == victim && d.at > at - window && d.at <= at)
        .map(|d| d.shard.as_str())
        .collect();
    if orphans.is_empty() {
        return None;
    }
    let mut worst: f64 = 0.0;
    for shard in orphans {
        let first = deliveries
            .iter()
            .filter(|d| d.shard == shard && d.worker != victim && d.at > at)
            .map(|d| d.at)
            .min_by(f64::total_cmp)?;
        worst = worst.max(first - at);
    }
    Some(worst)
}

/// Records processed twice, and two readers at once.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Exactness {
    pub delivered: u64,
    /// Extra deliveries of a (shard, sequence) already delivered.
    pub duplicates: u64,
    /// Of those, the ones no failure explains: not a re-delivery, after the failure, of a
    /// record the failed consumer had delivered.
    pub duplicates_without_failure: u64,
    /// Deliveries made while another worker was also reading the same shard (see
    /// [`exactness`]).
    pub concurrent_deliveries: u64,
    pub produced: u64,
    /// Produced records nobody delivered by the end of the run.
    pub lost: u64,
}

/// Counts duplicates, concurrent readers and lost records. Two readers are "at once" when
/// their reading intervals on one shard intersect; a worker's interval is a run of its
/// deliveries on that shard with no gap above `gap` seconds (records arrive every second on
/// every shard, so a reader that stopped leaves a gap). A hand-off leaves none.
pub fn exactness(
    deliveries: &[Delivery],
    produced: &[String],
    failure: Option<(&str, f64)>,
    gap: f64,
) -> Exactness {
    // (shard, sequence) → who delivered it first.
    let mut seen: BTreeMap<(&str, &str), &str> = BTreeMap::new();
    let mut out = Exactness {
        delivered: deliveries.len() as u64,
        produced: produced.len() as u64,
        ..Exactness::default()
    };
    let mut by_shard: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    // In delivery order: the later of two deliveries is the duplicate (the logs come one
    // consumer after another).
    let mut in_time: Vec<&Delivery> = deliveries.iter().collect();
    in_time.sort_by(|a, b| a.at.total_cmp(&b.at));
    for d in in_time {
        match seen.get(&(d.shard.as_str(), d.sequence.as_str())) {
            None => {
                seen.insert((&d.shard, &d.sequence), &d.worker);
            }
            Some(first) => {
                out.duplicates += 1;
                let explained = failure.is_some_and(|(victim, at)| *first == victim && d.at >= at);
                if !explained {
                    out.duplicates_without_failure += 1;
                }
            }
        }
        by_shard.entry(&d.shard).or_default().push(d);
    }
    for list in by_shard.values_mut() {
        list.sort_by(|a, b| a.at.total_cmp(&b.at));
        // Intervals per worker.
        let mut intervals: Vec<(String, f64, f64)> = Vec::new();
        let mut open: BTreeMap<&str, usize> = BTreeMap::new();
        for d in list.iter() {
            match open.get(d.worker.as_str()) {
                Some(&i) if d.at - intervals[i].2 <= gap => intervals[i].2 = d.at,
                _ => {
                    open.insert(&d.worker, intervals.len());
                    intervals.push((d.worker.clone(), d.at, d.at));
                }
            }
        }
        for d in list.iter() {
            let other = intervals
                .iter()
                .any(|(w, a, b)| *w != d.worker && *a <= d.at && d.at <= *b);
            out.concurrent_deliveries += u64::from(other);
        }
    }
    let delivered: BTreeSet<&str> = deliveries.iter().map(|d| d.data.as_str()).collect();
    out.lost = produced
        .iter()
        .filter(|p| !delivered.contains(p.as_str()))
        .count() as u64;
    out
}

/// The deliveries of shards first read at or after `since` (after a reshard: the children,
/// not the closed parents whose last records were still arriving).
pub fn shards_first_read_since(deliveries: &[Delivery], since: f64) -> Vec<Delivery> {
    let mut first: BTreeMap<&str, f64> = BTreeMap::new();
    for d in deliveries {
        let f = first.entry(&d.shard).or_insert(d.at);
        *f = f.min(d.at);
    }
    deliveries
        .iter()
        .filter(|d| first[d.shard.as_str()] >= since)
        .cloned()
        .collect()
}

/// End-to-end lag (delivery − put) in seconds: (p50, p95), over deliveries in `[from, to)`.
pub fn lag(deliveries: &[Delivery], from: f64, to: f64) -> Option<(f64, f64)> {
    let mut lags: Vec<f64> = deliveries
        .iter()
        .filter(|d| d.at >= from && d.at < to)
        .filter_map(|d| d.put_at.map(|p| d.at - p))
        .collect();
    if lags.is_empty() {
        return None;
    }
    lags.sort_by(f64::total_cmp);
    let q = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    Some((q(0.5), q(0.95)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(at: f64, worker: &str, shard: &str, seq: u32) -> Delivery {
        Delivery {
            at,
            worker: worker.into(),
            shard: shard.into(),
            sequence: format!("{seq:05}"),
            data: format!("{shard}-{seq}"),
            put_at: Some(at - 0.5),
        }
    }

    #[test]
    fn lines_parse_with_the_put_time_from_the_data() {
        let t0 = 1_000_000_000u128;
        let text = "1002000000\tw0\tshard-1\t3\t495\t{\"run\":1,\"record\":7,\"at\":1001500}\n\
                    torn line\n";
        let got = parse(text, t0);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].at, 2.0);
        assert_eq!(got[0].put_at, Some(1.5));
        assert_eq!(got[0].shard, "shard-1");
    }

    #[test]
    fn coverage_counts_shards_read_in_the_window_and_finds_the_gap() {
        // s1 read every second; s2 only until 3 s, then again from 8 s.
        let mut v: Vec<Delivery> = (0..=10).map(|s| d(s as f64, "a", "s1", s)).collect();
        v.extend([0.5, 1.5, 2.5, 8.5, 9.5].map(|t| d(t, "a", "s2", (t * 10.0) as u32)));
        let c = coverage(&v, 10, 2.0);
        // s2's last early record (2.5 s) is in the window up to 4 s, gone at 5 s; back at 9 s.
        assert_eq!(c[0], 1);
        assert_eq!(&c[1..=4], &[2, 2, 2, 2]);
        assert_eq!(&c[5..=8], &[1, 1, 1, 1]);
        assert_eq!(&c[9..=10], &[2, 2]);
        assert_eq!(time_to_cover(&c, 2, 0), Some(1));
        assert_eq!(time_to_cover(&c, 2, 5), Some(4));
        assert_eq!(unread_shard_seconds(&c, 2, 0, 11), 1 + 4);
    }

    #[test]
    fn failover_is_the_last_orphan_picked_up() {
        let v = vec![
            d(9.0, "a", "s1", 1),
            d(9.5, "a", "s2", 1),
            d(12.0, "b", "s1", 2),
            d(15.0, "b", "s2", 2),
        ];
        assert_eq!(failover(&v, "a", 10.0, 5.0), Some(5.0));
        assert_eq!(failover(&v[..3], "a", 10.0, 5.0), None);
        assert_eq!(failover(&v, "z", 10.0, 5.0), None, "z read nothing");
    }

    #[test]
    fn a_hand_off_is_not_concurrent_but_interleaved_readers_are() {
        let hand_off = vec![
            d(1.0, "a", "s", 1),
            d(2.0, "a", "s", 2),
            d(3.0, "b", "s", 3),
            d(4.0, "b", "s", 4),
        ];
        let produced: Vec<String> = (1..=5).map(|i| format!("s-{i}")).collect();
        let e = exactness(&hand_off, &produced, None, 3.0);
        assert_eq!((e.duplicates, e.concurrent_deliveries, e.lost), (0, 0, 1));
        let both = vec![
            d(1.0, "a", "s", 1),
            d(1.5, "b", "s", 1),
            d(2.0, "a", "s", 2),
            d(2.5, "b", "s", 2),
        ];
        // Given one consumer's log after the other's, as the bench reads them.
        let mut by_log = both.clone();
        by_log.sort_by(|x, y| x.worker.cmp(&y.worker));
        // a failed at 2.2 s: b's re-delivery at 2.5 s of a's record is explained, the one at
        // 1.5 s is not.
        let e = exactness(&by_log, &produced, Some(("a", 2.2)), 3.0);
        assert_eq!(e.duplicates, 2);
        assert_eq!(e.duplicates_without_failure, 1);
        // Nor is one after the failure of a record the failed consumer never had.
        let e = exactness(&by_log, &produced, Some(("c", 2.2)), 3.0);
        assert_eq!(e.duplicates_without_failure, 2);
        // a read [1, 2] and b [1.5, 2.5]: b's first and a's last fall inside the other's.
        assert_eq!(e.concurrent_deliveries, 2);
    }

    #[test]
    fn a_re_read_after_the_failure_counts_after_it_whatever_the_log_order() {
        // b read the record, was killed at 2 s, and a read it again at 3 s; a's log is read
        // first.
        let logs = vec![d(3.0, "a", "s", 1), d(1.0, "b", "s", 1)];
        let e = exactness(&logs, &["s-1".to_owned()], Some(("b", 2.0)), 3.0);
        assert_eq!((e.duplicates, e.duplicates_without_failure), (1, 0));
    }

    #[test]
    fn after_a_reshard_only_the_children_count() {
        let v = vec![
            d(9.0, "a", "parent", 1),
            d(11.0, "a", "parent", 2),
            d(12.0, "b", "child", 1),
        ];
        let children = shards_first_read_since(&v, 10.0);
        assert_eq!(children.len(), 1);
        assert_eq!(children[0].shard, "child");
    }

    #[test]
    fn spread_and_lag() {
        let v = vec![
            d(1.0, "a", "s1", 1),
            d(1.0, "a", "s2", 1),
            d(1.0, "b", "s3", 1),
        ];
        let per = shards_per_worker(&v, 1.0, 2.0, &["a".into(), "b".into(), "c".into()]);
        assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![2, 1, 0]);
        assert_eq!(lag(&v, 0.0, 2.0), Some((0.5, 0.5)));
    }
}
