//! Exactly one reader per shard, proven from the records each worker processed (not from the
//! lease table), under continuous production: joins, reshards, graceful stops, crashes with a
//! restart under the same id, and a worker cut off from DynamoDB. Against the emulators through
//! the real SDK (`cargo xtask test`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::support::ledger::{Ledger, Producer, Report};
use crate::support::*;

/// Records per producer tick and the tick: 50 records/s spread over every shard.
const PER_TICK: usize = 10;
const TICK: Duration = Duration::from_millis(200);

/// How long every produced record may take to be processed once production stops: a lease
/// round or two, a failover, and a stated margin of 10 s for a loaded 2-core machine.
fn drain_deadline() -> Duration {
    FAILOVER + HEARTBEAT * 4 + Duration::from_secs(10)
}

async fn drained(ledger: &Ledger, produced: &BTreeSet<String>) -> Report {
    let (_, took) = wait_for(
        drain_deadline(),
        "every produced record to be processed",
        || async { ledger.data().is_superset(produced).then_some(()) },
    )
    .await;
    let report = ledger.check(produced);
    eprintln!("drained {took:?} after production stopped: {report}");
    report
}

fn assert_exactly_once(report: &Report) {
    assert!(
        report.overlaps.is_empty() && report.duplicates == 0 && report.lost.is_empty(),
        "expected every record processed exactly once by one reader: {report}"
    );
}

async fn start_one(
    app: &str,
    stream: &str,
    id: &str,
    aws: &kds_worker::aws::AwsClients,
    ledger: &Arc<Ledger>,
) -> TestWorker {
    TestWorker::start_with(
        settings(app, stream, id),
        aws.clone(),
        None,
        Some(ledger.clone()),
    )
    .await
}

/// 2 → 3 workers while records flow: every hand-off checkpoints and transfers in one
/// conditional write, so nothing is read twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_hands_shards_over_without_double_reads() {
    let aws = aws().await;
    let (app, stream) = (unique("join"), unique("join"));
    create_stream(&aws, &stream, 12).await;
    let ledger = Arc::new(Ledger::default());
    let mut workers = start_workers_with(
        &app,
        &stream,
        ["w0".into(), "w1".into()],
        &aws,
        Some(ledger.clone()),
    )
    .await;
    wait_spread(&aws, &app, &workers, 6, 6, Duration::from_secs(30)).await;
    let producer = Producer::start(&aws, &stream, PER_TICK, TICK);
    tokio::time::sleep(HEARTBEAT * 4).await;
    workers.push(start_one(&app, &stream, "w2", &aws, &ledger).await);
    let took = wait_spread(&aws, &app, &workers, 4, 4, Duration::from_secs(30)).await;
    eprintln!("2 -> 3 workers: 4 each after {took:?}");
    tokio::time::sleep(HEARTBEAT * 4).await;
    let produced = producer.stop().await;
    assert_exactly_once(&drained(&ledger, &produced).await);
    // Only the coordinator scans; followers read their own leases through the index.
    for w in workers.iter().filter(|w| !w.is_coordinator()) {
        let calls = |operation| {
            w.state
                .metrics
                .api_calls
                .get_or_create(&kds_worker::metrics::ApiCallLabels {
                    service: "dynamodb",
                    operation,
                    outcome: kds_worker::metrics::CallOutcome::Ok,
                })
                .get()
        };
        assert_eq!(calls("Scan"), 0, "{} scanned a table", w.id);
        assert!(calls("Query") > 0, "{} never queried its leases", w.id);
    }
    for w in workers {
        w.shutdown().await;
    }
}

/// A reshard 4 → 8 while records flow: parents are read to their end before their children,
/// each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_reads_every_record_once() {
    let aws = aws().await;
    let (app, stream) = (unique("rsh"), unique("rsh"));
    create_stream(&aws, &stream, 4).await;
    let ledger = Arc::new(Ledger::default());
    let workers = start_workers_with(
        &app,
        &stream,
        ["w0".into(), "w1".into()],
        &aws,
        Some(ledger.clone()),
    )
    .await;
    wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(30)).await;
    let producer = Producer::start(&aws, &stream, PER_TICK, TICK);
    tokio::time::sleep(HEARTBEAT * 4).await;
    reshard(&aws, &stream, 8).await;
    let took = wait_spread(&aws, &app, &workers, 4, 4, Duration::from_secs(40)).await;
    eprintln!("4 -> 8 shards: 4 each after {took:?}");
    tokio::time::sleep(HEARTBEAT * 4).await;
    let produced = producer.stop().await;
    assert_exactly_once(&drained(&ledger, &produced).await);
    for w in workers {
        w.shutdown().await;
    }
}

/// SIGTERM of a lease holder while records flow: it checkpoints and gives its leases back, the
/// others go on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_loses_and_repeats_nothing() {
    let aws = aws().await;
    let (app, stream) = (unique("term"), unique("term"));
    create_stream(&aws, &stream, 6).await;
    let ledger = Arc::new(Ledger::default());
    let mut workers = start_workers_with(
        &app,
        &stream,
        (0..3).map(|i| format!("w{i}")),
        &aws,
        Some(ledger.clone()),
    )
    .await;
    wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(30)).await;
    let producer = Producer::start(&aws, &stream, PER_TICK, TICK);
    tokio::time::sleep(HEARTBEAT * 4).await;
    let idx = workers.iter().position(|w| !w.is_coordinator()).unwrap();
    workers.remove(idx).shutdown().await;
    let took = wait_spread(&aws, &app, &workers, 3, 3, Duration::from_secs(30)).await;
    eprintln!("after SIGTERM: 3 each after {took:?}");
    tokio::time::sleep(HEARTBEAT * 4).await;
    let produced = producer.stop().await;
    assert_exactly_once(&drained(&ledger, &produced).await);
    for w in workers {
        w.shutdown().await;
    }
}

/// kill -9 of a lease holder, and the same worker id back about `failover_timeout` later while
/// records flow: records after the last checkpoint may be read again (at-least-once), but
/// never by two workers at once, and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_and_restart_under_the_same_id_never_overlaps() {
    let aws = aws().await;
    let (app, stream) = (unique("kill"), unique("kill"));
    create_stream(&aws, &stream, 6).await;
    let ledger = Arc::new(Ledger::default());
    let mut workers = start_workers_with(
        &app,
        &stream,
        (0..3).map(|i| format!("w{i}")),
        &aws,
        Some(ledger.clone()),
    )
    .await;
    wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(30)).await;
    let producer = Producer::start(&aws, &stream, PER_TICK, TICK);
    tokio::time::sleep(HEARTBEAT * 4).await;
    let idx = workers.iter().position(|w| !w.is_coordinator()).unwrap();
    let victim = workers.remove(idx);
    let id = victim.id.clone();
    victim.crash().await;
    tokio::time::sleep(FAILOVER).await;
    workers.push(start_one(&app, &stream, &id, &aws, &ledger).await);
    let took = wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(40)).await;
    eprintln!("after kill -9 and restart of {id}: 2 each after {took:?}");
    tokio::time::sleep(HEARTBEAT * 4).await;
    let produced = producer.stop().await;
    let report = drained(&ledger, &produced).await;
    assert!(
        report.overlaps.is_empty() && report.lost.is_empty(),
        "a crash may repeat records, never read them twice at once or lose them: {report}"
    );
    for w in workers {
        w.shutdown().await;
    }
}

/// One worker's DynamoDB cut off for longer than `failover_timeout` while records flow: it stops
/// reading at its fence before anyone may take its leases, resumes (acquiring them again
/// conditionally) when DynamoDB returns; no two readers at once, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_dynamodb_never_reads_beside_its_successor() {
    let aws = aws().await;
    let (app, stream) = (unique("cut"), unique("cut"));
    create_stream(&aws, &stream, 4).await;
    let ledger = Arc::new(Ledger::default());
    let endpoint = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap();
    let mut proxy = Proxy::start(&endpoint).await;
    let cut_aws = aws_with_dynamodb(&proxy.url()).await;
    let mut workers = vec![start_one(&app, &stream, "w0", &aws, &ledger).await];
    wait_spread(&aws, &app, &workers, 4, 4, Duration::from_secs(30)).await;
    workers.push(start_one(&app, &stream, "w1", &cut_aws, &ledger).await);
    wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(30)).await;
    let producer = Producer::start(&aws, &stream, PER_TICK, TICK);
    tokio::time::sleep(HEARTBEAT * 4).await;
    proxy.cut().await;
    // Its leases move to w0 after the failover timeout.
    wait_for(
        FAILOVER * 4 + Duration::from_secs(5),
        "w0 to read all 4 shards",
        || async { (workers[0].state.leases().len() == 4).then_some(()) },
    )
    .await;
    tokio::time::sleep(HEARTBEAT * 2).await;
    proxy.restore().await;
    let took = wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(40)).await;
    eprintln!("after the cut: 2 each again after {took:?}");
    tokio::time::sleep(HEARTBEAT * 4).await;
    let produced = producer.stop().await;
    let report = drained(&ledger, &produced).await;
    assert!(
        report.overlaps.is_empty() && report.lost.is_empty(),
        "a cut-off worker may repeat records after its last checkpoint, never read beside its successor or lose any: {report}"
    );
    for w in workers {
        w.shutdown().await;
    }
}
