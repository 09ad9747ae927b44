//! What each worker actually processed, and the checks a user would make of it: records lost,
//! records processed twice, and two workers reading one shard at the same time.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use kds_worker::audit::{self, Event, Report};
use kds_worker::aws::AwsClients;
use kds_worker::processor::RecordProcessor;

/// A record processor shared by every worker of a test: logs (worker, shard, sequence, data)
/// in one global order (the lock serialises workers' calls).
#[derive(Default)]
pub struct Ledger {
    events: Mutex<Vec<Event>>,
}

impl RecordProcessor for Ledger {
    fn process(
        &self,
        worker_id: &str,
        shard_id: &str,
        lease_counter: u64,
        records: &[aws_sdk_kinesis::types::Record],
    ) {
        let mut events = self.events.lock().unwrap();
        for r in records {
            events.push(Event {
                worker: worker_id.to_owned(),
                shard: shard_id.to_owned(),
                counter: lease_counter,
                sequence: r.sequence_number().to_owned(),
                data: String::from_utf8_lossy(r.data().as_ref()).into_owned(),
            });
        }
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
        audit::check(&self.events(), produced)
    }
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
