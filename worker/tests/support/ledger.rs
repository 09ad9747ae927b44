//! What each worker actually processed, and the checks a user would make of it: records lost,
//! records processed twice, and two workers reading one shard at the same time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kds_worker::aws::AwsClients;
use kds_worker::consumer::RecordProcessor;
use kds_worker::leases::sequence_cmp;

/// One processed record, in the order processing happened across all workers.
#[derive(Debug, Clone)]
pub struct Event {
    pub worker: String,
    pub shard: String,
    pub sequence: String,
    pub data: String,
}

/// A record processor shared by every worker of a test: logs (worker, shard, sequence, data)
/// in one global order (the lock serialises workers' calls).
#[derive(Default)]
pub struct Ledger {
    events: Mutex<Vec<Event>>,
}

impl RecordProcessor for Ledger {
    fn process(&self, worker_id: &str, shard_id: &str, records: &[aws_sdk_kinesis::types::Record]) {
        let mut events = self.events.lock().unwrap();
        for r in records {
            events.push(Event {
                worker: worker_id.to_owned(),
                shard: shard_id.to_owned(),
                sequence: r.sequence_number().to_owned(),
                data: String::from_utf8_lossy(r.data().as_ref()).into_owned(),
            });
        }
    }
}

/// Two workers read one shard at once: `behind` re-read records `ahead` had already processed
/// while `ahead` went on processing that shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub shard: String,
    pub ahead: String,
    pub behind: String,
    pub sequence: String,
}

#[derive(Debug, Default)]
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

impl Ledger {
    pub fn data(&self) -> BTreeSet<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.data.clone())
            .collect()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Checks what was processed against what was produced.
    pub fn check(&self, produced: &BTreeSet<String>) -> Report {
        let events = self.events();
        let mut report = Report {
            processed: events.len(),
            ..Report::default()
        };
        let mut seen: BTreeSet<(&str, &str)> = BTreeSet::new();
        let mut by_shard: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
        for e in &events {
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

/// Puts records continuously (`per_tick` every `every`, random-looking keys over every
/// shard) until stopped; returns every record it put.
pub struct Producer {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<BTreeSet<String>>,
}

impl Producer {
    pub fn start(aws: &AwsClients, stream: &str, per_tick: usize, every: Duration) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let (aws, stream, flag) = (aws.clone(), stream.to_owned(), stop.clone());
        let handle = tokio::spawn(async move {
            let mut produced = BTreeSet::new();
            let mut tick = 0usize;
            while !flag.load(Ordering::Relaxed) {
                let prefix = format!("p{tick}");
                produced.extend(super::put_records(&aws, &stream, &prefix, per_tick).await);
                tick += 1;
                tokio::time::sleep(every).await;
            }
            produced
        });
        Producer { stop, handle }
    }

    /// Stops after the batch in flight; returns every record put.
    pub async fn stop(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("producer task")
    }
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
}
