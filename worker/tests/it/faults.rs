//! Faults the worker must ride out, injected by a proxy between one worker and an emulator:
//! Kinesis throttling (`ProvisionedThroughputExceededException` on GetRecords,
//! `LimitExceededException` on the stream calls), cut connections, DynamoDB throttling,
//! internal errors, slow answers and cancelled transactions. Under each: the worker does not
//! crash, its call rate stays bounded (no hot loop), `/ready` and the metrics say what is
//! wrong, and once the fault ends it recovers without a restart — proven from the records it
//! processed (none lost, no two readers at once).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::support::faults::{Fault, FaultProxy};
use crate::support::ledger::{Ledger, Producer, Report};
use crate::support::*;
use kds_worker::aws::AwsClients;
use tokio::time::Instant;

/// Records per producer tick and the tick: 20 records/s over the stream's shards.
const PER_TICK: usize = 4;
const TICK: Duration = Duration::from_millis(200);
const SHARDS: u32 = 2;

/// How long each fault lasts: past `failover_timeout`, so that `/ready` must report it.
fn fault_window() -> Duration {
    FAILOVER + Duration::from_secs(2)
}

/// Every produced record is processed within this once the fault ends: a failover, the
/// longest consumer backoff (10 s) and the margin.
fn recovery_deadline() -> Duration {
    FAILOVER + Duration::from_secs(10) + MARGIN
}

/// Requests of one operation a bounded retry loop may send in `window`: per reader, one
/// worker-level attempt per second (every backoff starts at 1 s) times the SDK's 3 attempts,
/// plus one round in flight. A hot loop sends hundreds per second.
fn call_bound(readers: u64, window: Duration) -> u64 {
    readers * 3 * (window.as_secs() + 2)
}

struct Rig {
    aws: AwsClients,
    stream: String,
    ledger: Arc<Ledger>,
    proxy: FaultProxy,
    worker: TestWorker,
    producer: Option<Producer>,
}

/// One worker whose `service` ("kinesis" or "dynamodb") goes through a fault proxy, reading a
/// 2-shard stream while records flow. Returns once both shards have delivered records.
async fn rig(name: &str, service: &str) -> Rig {
    let aws = aws().await;
    let (app, stream) = (unique(name), unique(name));
    create_stream(&aws, &stream, SHARDS).await;
    let upstream = match service {
        "kinesis" => std::env::var("AWS_ENDPOINT_URL_KINESIS").unwrap(),
        _ => std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap(),
    };
    let proxy = FaultProxy::start(&upstream).await;
    let proxied = match service {
        "kinesis" => aws_with_kinesis(&proxy.url()).await,
        _ => aws_with_dynamodb(&proxy.url()).await,
    };
    let ledger = Arc::new(Ledger::default());
    let worker = TestWorker::start_with(
        settings(&app, &stream, "w0"),
        proxied,
        None,
        Some(ledger.clone()),
    )
    .await;
    let producer = Producer::start(&aws, &stream, PER_TICK, TICK);
    let l = ledger.clone();
    wait_for(
        FAILOVER + MARGIN * 2,
        "records from every shard before the fault",
        || async {
            let shards: BTreeSet<String> = l.events().into_iter().map(|e| e.shard).collect();
            (shards.len() == SHARDS as usize).then_some(())
        },
    )
    .await;
    Rig {
        aws,
        stream,
        ledger,
        proxy,
        worker,
        producer: Some(producer),
    }
}

impl Rig {
    /// Applies `fault` to `operations` for the fault window, checking on the way that
    /// `/ready` reports `reason` (a substring) while it lasts. Returns the window's length.
    async fn inject(&self, operations: &[&str], fault: Fault, reason: &str) -> Duration {
        let began = Instant::now();
        self.proxy.set(operations, fault);
        let w = &self.worker;
        let (reasons, took) = wait_for(
            fault_window() + MARGIN,
            &format!("/ready to report {reason:?}"),
            || async {
                let reasons = w.state.not_ready_reasons();
                reasons
                    .iter()
                    .any(|r| r.contains(reason))
                    .then_some(reasons)
            },
        )
        .await;
        eprintln!("/ready reported the fault after {took:?}: {reasons:?}");
        let rest = fault_window().saturating_sub(began.elapsed());
        tokio::time::sleep(rest).await;
        assert!(
            self.worker.is_running(),
            "the worker crashed under the fault"
        );
        self.proxy.clear();
        began.elapsed()
    }

    /// After the fault: ready again, every produced record processed; the ledger's report.
    async fn recover(mut self) -> (Report, TestWorker) {
        let w = &self.worker;
        let (_, took) = wait_for(recovery_deadline(), "/ready to recover", || async {
            w.state.not_ready_reasons().is_empty().then_some(())
        })
        .await;
        eprintln!("ready again {took:?} after the fault ended");
        // A few more records after recovery, then stop and drain.
        tokio::time::sleep(HEARTBEAT * 2).await;
        let produced = self.producer.take().unwrap().stop().await;
        let ledger = self.ledger.clone();
        let (_, took) = wait_for(
            recovery_deadline(),
            "every produced record to be processed",
            || async { ledger.data().is_superset(&produced).then_some(()) },
        )
        .await;
        let report = self.ledger.check(&produced);
        eprintln!("drained {took:?} after production stopped: {report}");
        assert!(self.worker.is_running(), "the worker ended");
        (report, self.worker)
    }
}

fn assert_exactly_once(report: &Report) {
    assert!(
        report.overlaps.is_empty() && report.duplicates == 0 && report.lost.is_empty(),
        "expected every record processed exactly once: {report}"
    );
}

/// A cut-off worker may repeat records after its last checkpoint (it cannot write one), never
/// read beside another reader or lose one.
fn assert_none_lost(report: &Report) {
    assert!(
        report.overlaps.is_empty() && report.lost.is_empty(),
        "expected no record lost and never two readers at once: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_reads_back_off_show_in_ready_and_recover() {
    let rig = rig("thr-get", "kinesis").await;
    let before = rig.proxy.seen("GetRecords");
    let window = rig
        .inject(
            &["GetRecords"],
            Fault::kinesis_throughput_exceeded(),
            "Kinesis reads failing on 2 of 2 shards",
        )
        .await;
    assert_eq!(rig.worker.state.metrics.failing_shard_reads.get(), 2);
    let calls = rig.proxy.seen("GetRecords") - before;
    let bound = call_bound(SHARDS as u64, window);
    eprintln!("GetRecords under throttling: {calls} in {window:?} (bound {bound})");
    assert!(
        calls <= bound,
        "{calls} GetRecords in {window:?}: a hot loop"
    );
    let (report, worker) = rig.recover().await;
    assert_eq!(worker.state.metrics.failing_shard_reads.get(), 0);
    // Throttled reads resume where they stopped: nothing repeats.
    assert_exactly_once(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_kinesis_connections_back_off_show_in_ready_and_recover() {
    let rig = rig("cut-kin", "kinesis").await;
    let before = rig.proxy.seen("GetRecords") + rig.proxy.seen("GetShardIterator");
    let window = rig
        .inject(&["*"], Fault::Cut, "Kinesis reads failing on 2 of 2 shards")
        .await;
    let calls = rig.proxy.seen("GetRecords") + rig.proxy.seen("GetShardIterator") - before;
    let bound = call_bound(SHARDS as u64, window);
    eprintln!("reads with Kinesis cut off: {calls} in {window:?} (bound {bound})");
    assert!(calls <= bound, "{calls} reads in {window:?}: a hot loop");
    let (report, _) = rig.recover().await;
    assert_exactly_once(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_stream_calls_show_in_ready_while_reading_goes_on() {
    let rig = rig("thr-list", "kinesis").await;
    assert!(rig.worker.is_coordinator(), "the only worker coordinates");
    let processed_before = rig.ledger.data().len();
    let before = rig.proxy.seen("ListShards") + rig.proxy.seen("DescribeStreamSummary");
    let window = rig
        .inject(
            &["ListShards", "DescribeStreamSummary"],
            Fault::kinesis_limit_exceeded(),
            "failing for",
        )
        .await;
    let calls = rig.proxy.seen("ListShards") + rig.proxy.seen("DescribeStreamSummary") - before;
    // Two calls per shard poll, each tried three times by the SDK.
    let bound = 2 * 3 * (window.as_millis() / SHARD_POLL.as_millis() + 2) as u64;
    eprintln!("stream calls under throttling: {calls} in {window:?} (bound {bound})");
    assert!(
        calls <= bound,
        "{calls} stream calls in {window:?}: a hot loop"
    );
    assert!(
        rig.ledger.data().len() > processed_before,
        "records must still be read while the stream calls are throttled"
    );
    assert!(rig.worker.is_coordinator(), "still the coordinator");
    let (report, worker) = rig.recover().await;
    assert_eq!(worker.state.metrics.failing_stream_calls.get(), 0);
    assert_exactly_once(&report);
}

/// DynamoDB refusing everything (heartbeats included) for longer than `failover_timeout`:
/// the worker fences itself, says why, and reads again once DynamoDB answers.
async fn dynamodb_refusing(name: &str, fault: Fault) {
    let rig = rig(name, "dynamodb").await;
    let calls_before: u64 = [
        "UpdateItem",
        "GetItem",
        "Query",
        "Scan",
        "TransactWriteItems",
    ]
    .iter()
    .map(|op| rig.proxy.seen(op))
    .sum();
    let window = rig.inject(&["*"], fault, "heartbeat not renewed").await;
    let calls: u64 = [
        "UpdateItem",
        "GetItem",
        "Query",
        "Scan",
        "TransactWriteItems",
    ]
    .iter()
    .map(|op| rig.proxy.seen(op))
    .sum::<u64>()
        - calls_before;
    // Per heartbeat: a heartbeat, a coordinator renewal, two reads of the meta table, a lease
    // round and a coordinator round (a few calls each), every one tried three times.
    let rounds = (window.as_millis() / HEARTBEAT.as_millis()) as u64 + 2;
    let bound = rounds * 8 * 3;
    eprintln!("DynamoDB calls while refused: {calls} in {window:?} (bound {bound})");
    assert!(
        calls <= bound,
        "{calls} DynamoDB calls in {window:?}: a hot loop"
    );
    let (report, _) = rig.recover().await;
    assert_none_lost(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_throttling_fences_reports_and_recovers() {
    dynamodb_refusing("thr-ddb", Fault::dynamodb_throttling()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_throughput_exceeded_fences_reports_and_recovers() {
    dynamodb_refusing("pte-ddb", Fault::dynamodb_throughput_exceeded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_internal_errors_fence_report_and_recover() {
    dynamodb_refusing("ise-ddb", Fault::dynamodb_internal_error()).await;
}

/// Every DynamoDB answer 150 ms late (under a heartbeat): nothing is fenced, nothing repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_dynamodb_answers_change_nothing() {
    let rig = rig("slow-ddb", "dynamodb").await;
    rig.proxy
        .set(&["*"], Fault::Delay(Duration::from_millis(150)));
    let began = Instant::now();
    let processed_before = rig.ledger.data().len();
    tokio::time::sleep(fault_window()).await;
    assert!(
        rig.worker.state.not_ready_reasons().is_empty(),
        "slow answers within a heartbeat are not a fault: {:?}",
        rig.worker.state.not_ready_reasons()
    );
    assert!(rig.ledger.data().len() > processed_before, "records flow");
    rig.proxy.clear();
    eprintln!("{:?} of slow DynamoDB answers", began.elapsed());
    let (report, _) = rig.recover().await;
    assert_exactly_once(&report);
}

/// A limit publication cancelled by a conflicting transaction is retried, not taken as a lost
/// post: the coordinator stays, and publishes once the conflicts stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_transaction_is_retried_not_a_lost_post() {
    let rig = rig("txn", "dynamodb").await;
    assert!(rig.worker.is_coordinator());
    let epoch = rig.worker.state.role().1;
    let app = rig.worker.state.settings.app_name.clone();
    rig.proxy
        .set(&["TransactWriteItems"], Fault::transaction_conflict());
    // A second worker (not proxied) halves the limit: 2 shards / 2 workers.
    let w1 = TestWorker::start(settings(&app, &rig.stream, "w1"), rig.aws.clone(), None).await;
    let limit_before = rig.worker.limit();
    let w = &rig.worker;
    wait_for(
        HEARTBEAT * 10 + MARGIN,
        "publications refused by conflicts",
        || async { (rig.proxy.faulted("TransactWriteItems") >= 3).then_some(()) },
    )
    .await;
    assert_eq!(
        w.limit(),
        limit_before,
        "nothing published during conflicts"
    );
    assert!(w.is_coordinator(), "a conflict is not a lost post");
    assert_eq!(w.state.role().1, epoch, "no new election");
    let conflicts = w
        .state
        .metrics
        .encode()
        .lines()
        .filter(|l| l.contains("TransactWriteItems") && l.contains("transaction_conflict"))
        .count();
    assert!(conflicts > 0, "conflicts are counted by their own outcome");
    rig.proxy.clear();
    let workers = [rig.worker, w1];
    let took = wait_limit(&workers, 1, HEARTBEAT * 6 + MARGIN).await;
    eprintln!("published {took:?} after the conflicts stopped");
    assert_eq!(workers[0].state.role().1, epoch);
}
