//! What each worker actually processed, and the checks a user would make of it: records lost,
//! records processed twice, and two workers reading one shard at the same time. Pure: the
//! tests feed it from a shared in-process ledger, the lab from the record logs its workers
//! write ([`RecordLog`], the `record_log` setting) via `kds-worker admin audit`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::consumer::RecordProcessor;
use crate::leases::sequence_cmp;

/// One processed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub worker: String,
    pub shard: String,
    pub sequence: String,
    pub data: String,
}

/// Two workers read one shard at once: `behind` re-read records `ahead` had already processed
/// while `ahead` went on processing that shard.
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

/// On one shard (events in processing order): worker W's event `e` is read beside another
/// worker when someone else processed this shard since W's previous event there and `e` does
/// not continue after everything processed so far (W went on from its own old position while
/// the other read too). A hand-off continues after the last record processed; a re-read by a
/// successor after its predecessor stopped for good (killed, cut off and fenced) is a
/// duplicate, not an overlap.
fn overlaps(shard: &str, events: &[&Event]) -> Vec<Overlap> {
    let mut previous_own: BTreeMap<&str, usize> = BTreeMap::new();
    // Index of the event holding the highest sequence number so far.
    let mut max_at: Option<usize> = None;
    let mut found = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if let (Some(p), Some(m)) = (previous_own.get(e.worker.as_str()), max_at) {
            let others_between = events[p + 1..i].iter().any(|o| o.worker != e.worker);
            let continues =
                sequence_cmp(&e.sequence, &events[m].sequence) == std::cmp::Ordering::Greater;
            if others_between && !continues {
                found.push(Overlap {
                    shard: shard.to_owned(),
                    ahead: events[m].worker.clone(),
                    behind: e.worker.clone(),
                    sequence: e.sequence.clone(),
                });
            }
        }
        previous_own.insert(e.worker.as_str(), i);
        if max_at.is_none_or(|m| {
            sequence_cmp(&e.sequence, &events[m].sequence) == std::cmp::Ordering::Greater
        }) {
            max_at = Some(i);
        }
    }
    found
}

/// A record processor that appends one line per processed record to a file (the `record_log`
/// setting): `unix-micros TAB worker TAB shard TAB sequence TAB data`. Written and flushed
/// before the batch counts as processed, so a killed worker's log holds everything it
/// processed. The lab's audit merges every worker's log by time (one machine, one clock).
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
    fn process(&self, worker_id: &str, shard_id: &str, records: &[aws_sdk_kinesis::types::Record]) {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        for r in records {
            let data = String::from_utf8_lossy(r.data().as_ref());
            // A full disk must not stop reading; the audit would report the gap as lost.
            let _ = writeln!(
                f,
                "{micros}\t{worker_id}\t{shard_id}\t{}\t{}",
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
            let mut f = line.splitn(5, '\t');
            let micros = f.next()?.parse().ok()?;
            let (worker, shard, sequence, data) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some((
                micros,
                Event {
                    worker: worker.to_owned(),
                    shard: shard.to_owned(),
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

    fn ev(worker: &str, seq: &str) -> Event {
        Event {
            worker: worker.into(),
            shard: "s".into(),
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
            ev("a", "1"),
            ev("a", "2"),
            ev("b", "3"),
            ev("b", "4"),
            ev("a", "5"),
        ];
        assert!(check(&e).is_empty());
    }

    #[test]
    fn a_reread_after_the_reader_died_is_no_overlap() {
        let e = [ev("a", "1"), ev("a", "2"), ev("b", "2"), ev("b", "3")];
        assert!(check(&e).is_empty());
    }

    #[test]
    fn a_restarted_giver_reading_beside_the_receiver_is_an_overlap() {
        let e = [
            ev("a", "1"),
            ev("b", "2"),
            ev("a", "2"),
            ev("b", "3"),
            ev("a", "3"),
        ];
        let found = check(&e);
        assert!(!found.is_empty());
        assert_eq!(
            (found[0].ahead.as_str(), found[0].behind.as_str()),
            ("b", "a")
        );
    }

    #[test]
    fn a_fenced_reader_resuming_after_its_successor_is_no_overlap() {
        // w1 read to 4 (checkpoint 2), was cut off; w0 re-read 3..4 and went on to 6, then
        // handed back: w1 continues at 7.
        let e = [
            ev("w1", "1"),
            ev("w1", "2"),
            ev("w1", "3"),
            ev("w1", "4"),
            ev("w0", "3"),
            ev("w0", "4"),
            ev("w0", "5"),
            ev("w0", "6"),
            ev("w1", "7"),
        ];
        assert!(check(&e).is_empty());
    }

    #[test]
    fn two_readers_from_one_checkpoint_overlap() {
        let e = [ev("a", "1"), ev("b", "1"), ev("a", "2"), ev("b", "2")];
        assert!(!check(&e).is_empty());
    }

    #[test]
    fn record_logs_merge_by_time_and_skip_a_torn_line() {
        let a = "10\tw0\ts1\t1\tp0\n30\tw0\ts1\t2\tp1\n40\tw0\ts1\t3";
        let b = "20\tw1\ts1\t1\tp0\n";
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
            "w0 went on from 2 after w1 re-read 1"
        );
    }
}
