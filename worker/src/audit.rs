//! What each worker actually processed, and the checks a user would make of it: records lost,
//! records processed twice, and two workers reading one shard at the same time. Pure: the
//! tests feed it from a shared in-process ledger, the lab from the record logs its workers
//! write ([`RecordLog`], the `record_log` setting) via `kds-worker admin audit`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::processor::RecordProcessor;

/// One processed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub worker: String,
    pub shard: String,
    /// The lease counter the worker read the shard under (its fencing token).
    pub counter: u64,
    pub sequence: String,
    pub data: String,
}

/// Two readers of one shard at once: `behind` processed a record under an older lease counter
/// after `ahead` had begun processing under a newer one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overlap {
    pub shard: String,
    pub ahead: String,
    pub behind: String,
    pub sequence: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub processed: usize,
    /// Records processed more than once (each extra processing counts).
    pub duplicates: usize,
    /// The first few duplicated records: (shard, sequence, workers in processing order).
    pub duplicate_examples: Vec<(String, String, Vec<String>)>,
    pub overlaps: Vec<Overlap>,
    /// Produced records nobody processed.
    pub lost: Vec<String>,
    /// Per worker: records processed.
    pub by_worker: BTreeMap<String, usize>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} processed ({:?}), {} duplicated, {} overlapping reads, {} lost",
            self.processed,
            self.by_worker,
            self.duplicates,
            self.overlaps.len(),
            self.lost.len()
        )?;
        if let Some((shard, seq, workers)) = self.duplicate_examples.first() {
            write!(
                f,
                "; first duplicate: {seq} of {shard} processed by {workers:?}"
            )?;
        }
        if let Some(o) = self.overlaps.first() {
            write!(
                f,
                "; first overlap: {} re-read {} of {} while {} kept reading it",
                o.behind, o.sequence, o.shard, o.ahead
            )?;
        }
        Ok(())
    }
}

/// Checks what was processed (`events`, in processing order across every worker) against what
/// was produced (the records' data).
pub fn check(events: &[Event], produced: &BTreeSet<String>) -> Report {
    let mut report = Report {
        processed: events.len(),
        ..Report::default()
    };
    let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut by_shard: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        *report.by_worker.entry(e.worker.clone()).or_default() += 1;
        if !seen.insert((e.shard.as_str(), e.sequence.as_str())) {
            report.duplicates += 1;
            if report.duplicate_examples.len() < 3 {
                let workers = events
                    .iter()
                    .filter(|o| o.shard == e.shard && o.sequence == e.sequence)
                    .map(|o| o.worker.clone())
                    .collect();
                report
                    .duplicate_examples
                    .push((e.shard.clone(), e.sequence.clone(), workers));
            }
        }
        by_shard.entry(e.shard.as_str()).or_default().push(e);
    }
    let processed: BTreeSet<&str> = events.iter().map(|e| e.data.as_str()).collect();
    report.lost = produced
        .iter()
        .filter(|d| !processed.contains(d.as_str()))
        .cloned()
        .collect();
    for (shard, list) in by_shard {
        report.overlaps.extend(overlaps(shard, &list));
    }
    report
}

/// On one shard (events in processing order): every acquire of a lease raises its counter, so
/// the readers of a shard follow each other in counter order. A record processed under a
/// counter below one already seen on the shard was processed by a reader whose lease had
/// moved on: two readers at once. A successor re-reading records after its predecessor
/// stopped (killed, fenced) is a duplicate, not an overlap; so is a worker reading the shard
/// again later under a new counter.
fn overlaps(shard: &str, events: &[&Event]) -> Vec<Overlap> {
    let mut newest: Option<&Event> = None;
    let mut found = Vec::new();
    for e in events {
        match newest {
            Some(n) if e.counter < n.counter => found.push(Overlap {
                shard: shard.to_owned(),
                ahead: n.worker.clone(),
                behind: e.worker.clone(),
                sequence: e.sequence.clone(),
            }),
            Some(n) if e.counter == n.counter => {}
            _ => newest = Some(e),
        }
    }
    found
}

/// A record processor that appends one line per processed record to a file (the `record_log`
/// setting): `unix-micros TAB worker TAB shard TAB lease-counter TAB sequence TAB data`, each
/// line stamped as it is written. Written and flushed before the batch counts as processed,
/// so a killed worker's log holds everything it processed. The lab's audit merges every
/// worker's log by time (one machine, one clock).
pub struct RecordLog {
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl RecordLog {
    /// Appends to `path` (created if missing).
    pub fn open(path: &Path) -> std::io::Result<RecordLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(RecordLog {
            file: Mutex::new(std::io::BufWriter::new(file)),
        })
    }
}

/// Tabs and line breaks in a record's data would break the line format.
fn one_field(text: &str) -> String {
    text.replace(['\t', '\n', '\r'], " ")
}

impl RecordProcessor for RecordLog {
    fn process(
        &self,
        worker_id: &str,
        shard_id: &str,
        lease_counter: u64,
        records: &[aws_sdk_kinesis::types::Record],
    ) {
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let data = String::from_utf8_lossy(r.data().as_ref());
            // A full disk must not stop reading; the audit would report the gap as lost.
            let _ = writeln!(
                f,
                "{micros}\t{worker_id}\t{shard_id}\t{lease_counter}\t{}\t{}",
                r.sequence_number(),
                one_field(&data)
            );
        }
        let _ = f.flush();
    }
}

/// Parses record log lines into `(micros, event)`; a torn last line (a killed writer) is
/// skipped.
pub fn parse_record_log(text: &str) -> Vec<(u128, Event)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(6, '\t');
            let micros = f.next()?.parse().ok()?;
            let (worker, shard) = (f.next()?, f.next()?);
            let counter = f.next()?.parse().ok()?;
            let (sequence, data) = (f.next()?, f.next()?);
            Some((
                micros,
                Event {
                    worker: worker.to_owned(),
                    shard: shard.to_owned(),
                    counter,
                    sequence: sequence.to_owned(),
                    data: data.to_owned(),
                },
            ))
        })
        .collect()
}

/// Every worker's record log merged into one processing order (by time; a worker's own lines
/// keep their order).
pub fn merge_record_logs(logs: &[String]) -> Vec<Event> {
    let mut all: Vec<(u128, usize, usize, Event)> = logs
        .iter()
        .enumerate()
        .flat_map(|(file, text)| {
            parse_record_log(text)
                .into_iter()
                .enumerate()
                .map(move |(line, (micros, e))| (micros, file, line, e))
        })
        .collect();
    all.sort_by_key(|a| (a.0, a.1, a.2));
    all.into_iter().map(|(_, _, _, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `worker` processed `seq` under lease counter `counter`.
    fn ev(worker: &str, counter: u64, seq: &str) -> Event {
        Event {
            worker: worker.into(),
            shard: "s".into(),
            counter,
            sequence: seq.into(),
            data: format!("{worker}-{seq}"),
        }
    }

    fn check(events: &[Event]) -> Vec<Overlap> {
        overlaps("s", &events.iter().collect::<Vec<_>>())
    }

    #[test]
    fn a_hand_off_and_back_is_no_overlap() {
        let e = [
            ev("a", 1, "1"),
            ev("a", 1, "2"),
            ev("b", 2, "3"),
            ev("b", 2, "4"),
            ev("a", 3, "5"),
        ];
        assert!(check(&e).is_empty());
    }

    #[test]
    fn a_reread_after_the_reader_died_is_no_overlap() {
        let e = [
            ev("a", 1, "1"),
            ev("a", 1, "2"),
            ev("b", 2, "2"),
            ev("b", 2, "3"),
        ];
        assert!(check(&e).is_empty());
    }

    #[test]
    fn a_reread_by_an_earlier_reader_after_a_failover_is_no_overlap() {
        // b died with its checkpoint at 3; a, which read the shard before b, takes it again.
        let e = [
            ev("a", 1, "1"),
            ev("a", 1, "2"),
            ev("b", 2, "3"),
            ev("b", 2, "4"),
            ev("b", 2, "5"),
            ev("a", 3, "4"),
            ev("a", 3, "5"),
        ];
        assert!(check(&e).is_empty());
    }

    #[test]
    fn a_restarted_giver_reading_beside_the_receiver_is_an_overlap() {
        let e = [
            ev("a", 1, "1"),
            ev("b", 2, "2"),
            ev("a", 1, "2"),
            ev("b", 2, "3"),
            ev("a", 1, "3"),
        ];
        let found = check(&e);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].ahead.as_str(), found[0].behind.as_str()),
            ("b", "a")
        );
    }

    #[test]
    fn a_frozen_reader_applying_a_batch_after_its_successor_began_is_an_overlap() {
        // Even above everything read so far: its lease had moved on.
        let e = [ev("a", 1, "1"), ev("b", 2, "2"), ev("a", 1, "9")];
        assert_eq!(check(&e).len(), 1);
    }

    #[test]
    fn record_logs_merge_by_time_and_skip_a_torn_line() {
        let a = "10\tw0\ts1\t1\t1\tp0\n30\tw0\ts1\t1\t2\tp1\n40\tw0\ts1\t1\t3";
        let b = "20\tw1\ts1\t2\t1\tp0\n";
        let merged = merge_record_logs(&[a.to_owned(), b.to_owned()]);
        let order: Vec<(&str, &str)> = merged
            .iter()
            .map(|e| (e.worker.as_str(), e.sequence.as_str()))
            .collect();
        assert_eq!(order, [("w0", "1"), ("w1", "1"), ("w0", "2")]);
        let produced = ["p0", "p1", "p2"].map(String::from).into();
        let report = super::check(&merged, &produced);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.lost, ["p2"]);
        assert_eq!(
            report.overlaps.len(),
            1,
            "w0 (counter 1) processed 2 after w1 (counter 2) began"
        );
    }
}
