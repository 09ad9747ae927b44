//! Bad lease items never leave a shard silently unread, proven from what a user observes: the
//! records each worker processed (the ledger), `/status` and `/metrics`. Lease items are damaged
//! directly with the SDK, as another tool or an operator would: no `leaseCounter`, a
//! `leaseOwner` that is not a string, a checkpoint that is no reading position, a `LATEST`
//! checkpoint; and a rollout that lowers `failover_timeout` while an old worker is cut off from
//! DynamoDB. Against the emulators through the real SDK (`cargo xtask test`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::ledger::{Ledger, Producer, Report};
use crate::support::*;
use aws_sdk_dynamodb::types::AttributeValue;
use kds_worker::aws::AwsClients;
use kds_worker::consumer::LATEST;
use kds_worker::lease_manager::UNREADABLE_RETRY;
use kds_worker::leases::TRIM_HORIZON;
use kds_worker::metrics::ApiCallLabels;
use kds_worker::processor::RecordProcessor;
use kds_worker::schema::LEASE_KEY;
use kds_worker::state::WorkerState;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long records put to a shard that is read may take to be processed: the consumer's idle
/// poll backs off to 5 s (`idle_poll_max`), a lease round or two, and the stated margin.
fn read_deadline() -> Duration {
    Duration::from_secs(5) + HEARTBEAT * 4 + MARGIN
}

/// A checkpoint Kinesis refuses is given up on after three GetShardIterator calls, 1 s and 2 s
/// (at most) apart; the lease loop reports it at its next round.
fn unreadable_deadline() -> Duration {
    Duration::from_secs(3) + HEARTBEAT * 4 + MARGIN
}

/// Polls `check` every 25 ms until it returns `Ok`, or panics after `deadline` naming `what`
/// and what was last observed (the `Err`), so a failure says what the user would have seen.
async fn wait_until<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(v) => return (v, start.elapsed()),
            Err(last) => last,
        };
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}; last observed: {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One shard and the first hash key it owns: records put with it land on this shard.
#[derive(Debug, Clone)]
struct Shard {
    id: String,
    hash_key: String,
}

async fn shards(aws: &AwsClients, stream: &str) -> Vec<Shard> {
    let out = aws
        .kinesis
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .expect("ListShards");
    let mut shards: Vec<Shard> = out
        .shards()
        .iter()
        .map(|s| Shard {
            id: s.shard_id().to_owned(),
            hash_key: s
                .hash_key_range()
                .expect("a shard has a hash key range")
                .starting_hash_key()
                .to_owned(),
        })
        .collect();
    shards.sort_by(|a, b| a.id.cmp(&b.id));
    shards
}

/// Puts `n` records named `{prefix}-{i}` onto `shard` (explicit hash key); returns the names.
async fn put_to(
    aws: &AwsClients,
    stream: &str,
    shard: &Shard,
    prefix: &str,
    n: usize,
) -> BTreeSet<String> {
    let mut req = aws.kinesis.put_records().stream_name(stream);
    let mut names = BTreeSet::new();
    for i in 0..n {
        let name = format!("{prefix}-{i}");
        req = req.records(
            aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .data(aws_sdk_kinesis::primitives::Blob::new(
                    name.clone().into_bytes(),
                ))
                .partition_key(format!("pk-{prefix}-{i}"))
                .explicit_hash_key(&shard.hash_key)
                .build()
                .unwrap(),
        );
        names.insert(name);
    }
    let out = req.send().await.expect("PutRecords");
    assert_eq!(
        out.failed_record_count().unwrap_or(0),
        0,
        "PutRecords failed"
    );
    for r in out.records() {
        assert_eq!(
            r.shard_id(),
            Some(shard.id.as_str()),
            "record on another shard"
        );
    }
    names
}

/// Writes a whole lease item (as another tool would), replacing any.
async fn put_lease(aws: &AwsClients, app: &str, shard: &str, attrs: Vec<(&str, AttributeValue)>) {
    let mut req = aws
        .dynamodb
        .put_item()
        .table_name(app)
        .item(LEASE_KEY, AttributeValue::S(shard.to_owned()));
    for (k, v) in attrs {
        req = req.item(k, v);
    }
    req.send().await.expect("PutItem of a lease");
}

/// One unconditional UpdateItem on a lease item (an operator's edit).
async fn edit_lease(
    aws: &AwsClients,
    app: &str,
    shard: &str,
    expression: &str,
    values: Vec<(&str, AttributeValue)>,
) -> Result<(), String> {
    let mut req = aws
        .dynamodb
        .update_item()
        .table_name(app)
        .key(LEASE_KEY, AttributeValue::S(shard.to_owned()))
        .update_expression(expression);
    for (k, v) in values {
        req = req.expression_attribute_values(k, v);
    }
    req.send().await.map(|_| ()).map_err(|e| {
        use aws_sdk_dynamodb::error::ProvideErrorMetadata;
        format!(
            "{}: {}",
            e.code().unwrap_or("error"),
            e.message().unwrap_or("")
        )
    })
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Records of `shard` the ledger holds (any worker).
fn processed_on(ledger: &Ledger, shard: &str) -> BTreeSet<String> {
    ledger
        .events()
        .into_iter()
        .filter(|e| e.shard == shard)
        .map(|e| e.data)
        .collect()
}

async fn wait_processed(ledger: &Ledger, names: &BTreeSet<String>, what: &str) -> Duration {
    let (_, took) = wait_until(read_deadline(), what, || async {
        let data = ledger.data();
        let missing = names.iter().filter(|d| !data.contains(*d)).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!("{missing} of {} not processed", names.len()))
        }
    })
    .await;
    took
}

/// Workers w0 and w1 on a two-shard stream, processing into `ledger`, once each reads one
/// shard; and how long the spread took.
async fn two_readers(
    app: &str,
    stream: &str,
    aws: &AwsClients,
    ledger: &Arc<Ledger>,
) -> (Vec<TestWorker>, Duration) {
    let workers = start_workers_with(
        app,
        stream,
        ["w0".into(), "w1".into()],
        aws,
        Some(ledger.clone()),
    )
    .await;
    let took = wait_spread(aws, app, &workers, 1, 1, Duration::from_secs(30)).await;
    (workers, took)
}

fn assert_none_lost_never_two_readers(report: &Report) {
    assert!(
        report.overlaps.is_empty() && report.lost.is_empty(),
        "every record processed, never by two readers at once: {report}"
    );
}

/// The worker's HTTP endpoints on a free loopback port, as a user (or Prometheus) reads them.
struct Http {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Http {
    async fn serve(state: Arc<WorkerState>) -> Http {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(kds_worker::http::serve(listener, state, stop.clone()));
        Http { addr, stop }
    }

    async fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.addr, "/status").await;
        assert_eq!(code, 200, "/status: {body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    /// `kds_unreadable_leases` by its `reason` label, from `/metrics`.
    async fn unreadable_metric(&self) -> BTreeMap<String, f64> {
        let (code, body) = http_get(self.addr, "/metrics").await;
        assert_eq!(code, 200);
        body.lines()
            .filter_map(|l| l.strip_prefix("kds_unreadable_leases{reason=\""))
            .filter_map(|rest| {
                let (reason, value) = rest.split_once("\"}")?;
                Some((reason.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// 1. A lease item without `leaseCounter` (written by another tool before the workers start,
///    or the attribute removed while the shard is read): the shard is still read, records put
///    after the damage are processed, and the item has a numeric counter again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_without_a_counter_is_still_read() {
    let aws = aws().await;
    let (app, stream) = (unique("nocount"), unique("nocount"));
    create_stream(&aws, &stream, 2).await;
    let sh = shards(&aws, &stream).await;
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    // Before any worker runs: shard 1's lease has no counter (and no owner).
    put_lease(&aws, &app, &sh[1].id, vec![("checkpoint", s(TRIM_HORIZON))]).await;
    let mut produced = put_to(&aws, &stream, &sh[1], "before", 20).await;
    let ledger = Arc::new(Ledger::default());
    let (workers, _) = two_readers(&app, &stream, &aws, &ledger).await;
    let took = wait_processed(&ledger, &produced, "shard 1 (created without a counter)").await;
    eprintln!("lease created without leaseCounter: its records processed {took:?} after spread");
    let store = lease_store(&aws, &app);
    let l = store.get(&sh[1].id).await.unwrap().unwrap();
    assert!(l.counter.is_some(), "shard 1's lease has a counter: {l:?}");

    // While shard 0 is read: its counter is removed.
    edit_lease(&aws, &app, &sh[0].id, "REMOVE leaseCounter", vec![])
        .await
        .unwrap();
    let damaged_at = Instant::now();
    let after = put_to(&aws, &stream, &sh[0], "after-damage", 20).await;
    produced.extend(after.iter().cloned());
    let took = wait_processed(
        &ledger,
        &after,
        "shard 0's records after its counter was removed",
    )
    .await;
    eprintln!("counter removed: records put after it processed within {took:?}");
    // The damage shows when the running consumer's next checkpoint (5 s after its last one,
    // at its next read: idle reads are up to `idle_poll_max` apart) is refused; the lease is
    // then acquired again, with a counter, at the next round.
    let (counter, _) = wait_until(
        Duration::from_secs(5) + Duration::from_secs(5) + HEARTBEAT * 4 + MARGIN,
        "shard 0's lease to have a counter again",
        || {
            let store = store.clone();
            let id = sh[0].id.clone();
            async move {
                let l = store.get(&id).await.unwrap().unwrap();
                l.counter.ok_or_else(|| format!("{l:?}"))
            }
        },
    )
    .await;
    eprintln!(
        "counter removed: numeric again ({counter}) {:?} after the damage",
        damaged_at.elapsed()
    );
    // And it is read from then on, not only by the consumer that was running at the damage.
    let again = put_to(&aws, &stream, &sh[0], "after-repair", 20).await;
    produced.extend(again.iter().cloned());
    let took = wait_processed(
        &ledger,
        &again,
        "shard 0's records after its counter was set again",
    )
    .await;
    eprintln!("after the counter was set again: records processed within {took:?}");
    assert!(
        workers.iter().any(|w| w.state.leases().contains(&sh[0].id)),
        "shard 0 is read"
    );
    let report = ledger.check(&produced);
    eprintln!("{report}");
    assert_none_lost_never_two_readers(&report);
    for w in workers {
        w.shutdown().await;
    }
}

/// 1b. A lease item whose `leaseCounter` is there but no counter (a string, a negative
///     number) is as bad as one without: the shard is still read and gets a numeric counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_with_a_mistyped_counter_is_still_read() {
    let aws = aws().await;
    let (app, stream) = (unique("badcount"), unique("badcount"));
    create_stream(&aws, &stream, 2).await;
    let sh = shards(&aws, &stream).await;
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    put_lease(
        &aws,
        &app,
        &sh[0].id,
        vec![("leaseCounter", s("3")), ("checkpoint", s(TRIM_HORIZON))],
    )
    .await;
    put_lease(
        &aws,
        &app,
        &sh[1].id,
        vec![
            ("leaseCounter", AttributeValue::N("-1".into())),
            ("checkpoint", s(TRIM_HORIZON)),
        ],
    )
    .await;
    let mut produced = put_to(&aws, &stream, &sh[0], "before0", 10).await;
    produced.extend(put_to(&aws, &stream, &sh[1], "before1", 10).await);
    let ledger = Arc::new(Ledger::default());
    let w = TestWorker::start_with(
        settings(&app, &stream, "w0"),
        aws.clone(),
        None,
        Some(ledger.clone()),
    )
    .await;
    let store = lease_store(&aws, &app);
    let (_, took) = wait_until(
        Duration::from_secs(10) + read_deadline(),
        "both shards read (records processed, numeric counters)",
        || async {
            let data = ledger.data();
            let missing = produced.iter().filter(|d| !data.contains(*d)).count();
            let leases = store.scan().await.unwrap();
            let counted = leases.iter().filter(|l| l.counter.is_some()).count();
            if missing == 0 && counted == 2 {
                Ok(())
            } else {
                Err(format!(
                    "{missing} of {} records not processed; reading {:?}; leases {leases:?}",
                    produced.len(),
                    w.state.leases()
                ))
            }
        },
    )
    .await;
    eprintln!("mistyped counters: both shards read {took:?} after start");
    let report = ledger.check(&produced);
    eprintln!("{report}");
    assert_none_lost_never_two_readers(&report);
    w.shutdown().await;
}

/// 1c. A lease item deleted while its shard is read (by hand, or by another tool): the
///     coordinator's next full round finds the lease table short of what the stream lists and
///     creates the lease again, so the shard is read again (from the start: its checkpoint
///     went with the item), never by two workers at once, and nothing put is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_comes_back_and_its_shard_is_read_again() {
    let aws = aws().await;
    let (app, stream) = (unique("deleted"), unique("deleted"));
    create_stream(&aws, &stream, 2).await;
    let sh = shards(&aws, &stream).await;
    let ledger = Arc::new(Ledger::default());
    let (workers, _) = two_readers(&app, &stream, &aws, &ledger).await;
    let mut produced = put_to(&aws, &stream, &sh[0], "before", 20).await;
    wait_processed(&ledger, &produced, "shard 0's first records").await;

    aws.dynamodb
        .delete_item()
        .table_name(&app)
        .key(LEASE_KEY, s(&sh[0].id))
        .send()
        .await
        .expect("DeleteItem of a lease");
    let deleted_at = Instant::now();
    let store = lease_store(&aws, &app);
    // A full round comes every second heartbeat at most; the next round assigns the lease.
    let (owner, took) = wait_until(
        HEARTBEAT * 4 + MARGIN,
        "shard 0's lease to be back and held",
        || {
            let store = store.clone();
            let id = sh[0].id.clone();
            async move {
                match store.get(&id).await.unwrap() {
                    Some(l) => l
                        .owner
                        .clone()
                        .ok_or_else(|| format!("back, unowned: {l:?}")),
                    None => Err("no lease item".into()),
                }
            }
        },
    )
    .await;
    eprintln!("deleted lease: back and held by {owner} {took:?} after the delete");
    let after = put_to(&aws, &stream, &sh[0], "after-delete", 20).await;
    produced.extend(after.iter().cloned());
    let took = wait_processed(
        &ledger,
        &after,
        "shard 0's records after its lease was deleted",
    )
    .await;
    eprintln!(
        "deleted lease: records put after it processed within {took:?} ({:?} after the delete)",
        deleted_at.elapsed()
    );
    let report = ledger.check(&produced);
    eprintln!("{report}");
    assert_none_lost_never_two_readers(&report);
    for w in workers {
        w.shutdown().await;
    }
}

/// 2. A lease item whose `leaseOwner` is not a string. DynamoDB refuses such an item while the
///    `leaseOwner-index` exists (the index key is a string), so it comes from a lease table
///    made without the index (by another tool), which the workers find at start and index.
///    The shards are still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_owner_is_not_a_string_is_still_read() {
    let aws = aws().await;
    let (app, stream) = (unique("numowner"), unique("numowner"));
    create_stream(&aws, &stream, 2).await;
    let sh = shards(&aws, &stream).await;
    kds_worker::schema::ensure_table(&aws, &app, LEASE_KEY)
        .await
        .unwrap();
    put_lease(
        &aws,
        &app,
        &sh[0].id,
        vec![
            ("leaseOwner", n(7)),
            ("leaseCounter", n(3)),
            ("checkpoint", s(TRIM_HORIZON)),
        ],
    )
    .await;
    put_lease(
        &aws,
        &app,
        &sh[1].id,
        vec![
            ("leaseOwner", AttributeValue::Bool(true)),
            ("checkpoint", s(TRIM_HORIZON)),
        ],
    )
    .await;
    let mut produced = put_to(&aws, &stream, &sh[0], "before0", 20).await;
    produced.extend(put_to(&aws, &stream, &sh[1], "before1", 20).await);
    let ledger = Arc::new(Ledger::default());
    let (workers, took) = two_readers(&app, &stream, &aws, &ledger).await;
    eprintln!("non-string owners (N, BOOL): one lease each after {took:?}");
    let took = wait_processed(&ledger, &produced, "records put before the workers started").await;
    eprintln!("non-string owners: earlier records processed {took:?} later");
    let after0 = put_to(&aws, &stream, &sh[0], "after0", 20).await;
    let after1 = put_to(&aws, &stream, &sh[1], "after1", 20).await;
    produced.extend(after0.iter().cloned());
    produced.extend(after1.iter().cloned());
    wait_processed(
        &ledger,
        &after0.union(&after1).cloned().collect(),
        "later records",
    )
    .await;
    let ids: BTreeSet<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    for l in lease_store(&aws, &app).scan().await.unwrap() {
        assert!(
            l.owner.as_deref().is_some_and(|o| ids.contains(o)) && l.counter.is_some(),
            "lease owned by a worker with a counter: {l:?}"
        );
    }

    // With the index in place the same damage is refused; should it ever be accepted, the
    // shard must still be read.
    match edit_lease(
        &aws,
        &app,
        &sh[0].id,
        "SET leaseOwner = :n",
        vec![(":n", n(7))],
    )
    .await
    {
        Err(e) => {
            eprintln!("numeric leaseOwner refused while the index exists: {e}");
            assert!(e.contains("ValidationException"), "{e}");
        }
        Ok(()) => {
            let late = put_to(&aws, &stream, &sh[0], "after-damage", 20).await;
            produced.extend(late.iter().cloned());
            let (_, took) = wait_for(
                FAILOVER + read_deadline(),
                "shard 0's records after a numeric leaseOwner was written",
                || async { ledger.data().is_superset(&late).then_some(()) },
            )
            .await;
            eprintln!("numeric leaseOwner written while running: records processed {took:?} later");
        }
    }
    let report = ledger.check(&produced);
    eprintln!("{report}");
    assert_none_lost_never_two_readers(&report);
    for w in workers {
        w.shutdown().await;
    }
}

/// 3. Checkpoints that are no reading position: one that is not a sequence number, one that
///    is a well-formed sequence number of another (deleted) stream. Each lease shows up as
///    unreadable in `/status` and in `kds_unreadable_leases{reason}`, is not covered, and once
///    the checkpoint is repaired (TRIM_HORIZON) the shard is read within the retry period
///    (30 s) plus margin, and no longer reported unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_is_no_position_is_reported_until_repaired() {
    let aws = aws().await;
    let (app, stream) = (unique("badcp"), unique("badcp"));
    // A sequence number of a stream that no longer exists.
    let gone = unique("gone");
    create_stream(&aws, &gone, 1).await;
    let foreign = aws
        .kinesis
        .put_record()
        .stream_name(&gone)
        .data(aws_sdk_kinesis::primitives::Blob::new("x"))
        .partition_key("x")
        .send()
        .await
        .unwrap()
        .sequence_number()
        .to_owned();
    aws.kinesis
        .delete_stream()
        .stream_name(&gone)
        .send()
        .await
        .unwrap();

    create_stream(&aws, &stream, 3).await;
    let sh = shards(&aws, &stream).await;
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    let garbage = "not-a-sequence-number";
    for (shard, checkpoint) in [(&sh[0], garbage), (&sh[1], foreign.as_str())] {
        put_lease(
            &aws,
            &app,
            &shard.id,
            vec![("leaseCounter", n(0)), ("checkpoint", s(checkpoint))],
        )
        .await;
    }
    // Records on every shard before anyone reads: kinesis-mock refuses another stream's
    // sequence number only on a shard that has records (ResourceNotFoundException, so the
    // reason label is `shard_not_found`; AWS answers InvalidArgumentException,
    // `invalid_argument`). On an empty shard it accepts it and returns nothing.
    let mut before = BTreeMap::new();
    for (i, shard) in sh.iter().enumerate() {
        before.insert(
            shard.id.clone(),
            put_to(&aws, &stream, shard, &format!("before{i}"), 10).await,
        );
    }
    let ledger = Arc::new(Ledger::default());
    let w = TestWorker::start_with(
        settings(&app, &stream, "w0"),
        aws.clone(),
        None,
        Some(ledger.clone()),
    )
    .await;
    let http = Http::serve(w.state.clone()).await;
    let bad: BTreeSet<String> = [sh[0].id.clone(), sh[1].id.clone()].into();

    // Start-up (tables, the first limit, the assignment) takes a few rounds; 20 s as in the
    // other tests' start-up deadlines.
    let ((reasons, metric, coverage), took) = wait_until(
        Duration::from_secs(20) + unreadable_deadline(),
        "both bad leases unreadable in /status, /metrics and the coverage",
        || async {
            let status = http.status().await;
            let metric = http.unreadable_metric().await;
            let unreadable: BTreeMap<String, String> =
                serde_json::from_value(status["unreadable_leases"].clone()).unwrap();
            let coverage = status["coverage"].clone();
            let listed: BTreeSet<String> = unreadable.keys().cloned().collect();
            let counted: f64 = metric.values().sum();
            if listed == bad
                && counted == 2.0
                && coverage["unreadable_shards"] == 2
                && coverage["readable_shards"] == 3
            {
                Ok((unreadable, metric, coverage))
            } else {
                Err(format!(
                    "unreadable_leases {unreadable:?}, kds_unreadable_leases {metric:?}, coverage {coverage}"
                ))
            }
        },
    )
    .await;
    eprintln!("unreadable reported {took:?} after start: {reasons:?}, {metric:?}, {coverage}");
    assert!(reasons[&sh[0].id].contains(garbage), "{reasons:?}");
    assert_eq!(
        metric.get("invalid_checkpoint"),
        Some(&1.0),
        "the garbage checkpoint is counted as invalid_checkpoint: {metric:?}"
    );
    assert!(
        metric
            .iter()
            .any(|(r, v)| r != "invalid_checkpoint" && *v == 1.0),
        "the foreign sequence number is counted as refused by Kinesis: {metric:?}"
    );
    // Not covered: neither counted as covered nor read.
    assert_eq!(coverage["uncovered_shards"], 2, "{coverage}");
    let status = http.status().await;
    let read: BTreeSet<String> = status["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["shard_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        read,
        [sh[2].id.clone()].into(),
        "only the good shard is read"
    );
    wait_processed(&ledger, &before[&sh[2].id], "the good shard's records").await;
    for id in &bad {
        assert!(
            processed_on(&ledger, id).is_empty(),
            "nothing processed from {id}"
        );
    }

    // The operator repairs both checkpoints.
    for id in &bad {
        edit_lease(
            &aws,
            &app,
            id,
            "SET checkpoint = :cp",
            vec![(":cp", s(TRIM_HORIZON))],
        )
        .await
        .unwrap();
    }
    let repaired_at = Instant::now();
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for (i, shard) in sh[..2].iter().enumerate() {
        expected.extend(before[&shard.id].iter().cloned());
        expected.extend(put_to(&aws, &stream, shard, &format!("repaired{i}"), 10).await);
    }
    let (_, took) = wait_until(
        UNREADABLE_RETRY + HEARTBEAT * 4 + MARGIN,
        "the repaired shards' records to be processed",
        || async {
            let data = ledger.data();
            let missing = expected.iter().filter(|d| !data.contains(*d)).count();
            if missing == 0 {
                Ok(())
            } else {
                Err(format!("{missing} of {} not processed", expected.len()))
            }
        },
    )
    .await;
    eprintln!(
        "repaired checkpoints: shards read again {took:?} after the repair (retry period {UNREADABLE_RETRY:?})"
    );
    // Read again, so no longer reported unreadable anywhere.
    let (_, took) = wait_until(
        HEARTBEAT * 4 + MARGIN,
        "the repaired leases to be reported readable in /status, /metrics and the coverage",
        || async {
            let status = http.status().await;
            let metric = http.unreadable_metric().await;
            let unreadable = status["unreadable_leases"].clone();
            let coverage = status["coverage"].clone();
            let counted: f64 = metric.values().sum();
            if unreadable.as_object().is_some_and(|m| m.is_empty())
                && counted == 0.0
                && coverage["unreadable_shards"] == 0
                && coverage["uncovered_shards"] == 0
                && status["leases_held"] == 3
            {
                Ok(())
            } else {
                Err(format!(
                    "reading {}, unreadable_leases {unreadable}, kds_unreadable_leases {metric:?}, coverage {coverage}",
                    status["leases"]
                ))
            }
        },
    )
    .await;
    eprintln!(
        "repaired leases reported readable {took:?} after their records were processed ({:?} after the repair)",
        repaired_at.elapsed()
    );
    let report = ledger.check(&before.values().flatten().cloned().collect());
    eprintln!("{report}");
    assert_none_lost_never_two_readers(&report);
    drop(http);
    w.shutdown().await;
}

/// 4. A `LATEST` checkpoint: the shard is read from the tip, so records put before its reader
///    started are not processed, records put after are. (The other shard, at TRIM_HORIZON,
///    gets everything.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_checkpoint_reads_only_what_comes_after() {
    let aws = aws().await;
    let (app, stream) = (unique("latest"), unique("latest"));
    create_stream(&aws, &stream, 2).await;
    let sh = shards(&aws, &stream).await;
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    put_lease(
        &aws,
        &app,
        &sh[0].id,
        vec![("leaseCounter", n(0)), ("checkpoint", s(LATEST))],
    )
    .await;
    let old_latest = put_to(&aws, &stream, &sh[0], "before-latest", 10).await;
    let old_trim = put_to(&aws, &stream, &sh[1], "before-trim", 10).await;
    let ledger = Arc::new(Ledger::default());
    let w = TestWorker::start_with(
        settings(&app, &stream, "w0"),
        aws.clone(),
        None,
        Some(ledger.clone()),
    )
    .await;
    // Both consumers have their iterator (the LATEST one is fixed at that call).
    let (_, took) = wait_until(
        Duration::from_secs(20),
        "both shards read (two GetShardIterator calls answered)",
        || async {
            let iterators = w
                .state
                .metrics
                .api_calls
                .get_or_create(&ApiCallLabels {
                    service: "kinesis",
                    operation: "GetShardIterator",
                    outcome: kds_worker::metrics::CallOutcome::Ok,
                })
                .get();
            let leases = w.state.leases();
            if iterators >= 2 && leases.len() == 2 {
                Ok(())
            } else {
                Err(format!("{iterators} iterators, reading {leases:?}"))
            }
        },
    )
    .await;
    eprintln!("LATEST: both shards read {took:?} after start");
    let new_latest = put_to(&aws, &stream, &sh[0], "after-latest", 10).await;
    let new_trim = put_to(&aws, &stream, &sh[1], "after-trim", 10).await;
    let all: BTreeSet<String> = [&new_latest, &old_trim, &new_trim]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let took = wait_processed(
        &ledger,
        &all,
        "records after LATEST, and all of TRIM_HORIZON",
    )
    .await;
    eprintln!("LATEST: later records processed {took:?} after they were put");
    // The later records of the LATEST shard come after the earlier ones in the shard: had the
    // earlier ones been read, they would have been processed by now.
    let early_seen: BTreeSet<String> = processed_on(&ledger, &sh[0].id)
        .intersection(&old_latest)
        .cloned()
        .collect();
    assert!(
        early_seen.is_empty(),
        "records put before the LATEST shard was read were processed: {early_seen:?}"
    );
    let report = ledger.check(&all);
    eprintln!("{report}");
    assert_none_lost_never_two_readers(&report);
    w.shutdown().await;
}

/// 4b. A `LATEST` shard whose reader leaves (SIGTERM) before any record arrived: its
///     successor goes on from where reading started, so records put after the first reader
///     started (here: while nobody reads the shard, between the leave and the successor's
///     start) are processed: "at-least-once, nothing lost", leaves repeat nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_shard_handed_on_before_its_first_record_loses_nothing() {
    let aws = aws().await;
    let (app, stream) = (unique("latestleave"), unique("latestleave"));
    create_stream(&aws, &stream, 1).await;
    let sh = shards(&aws, &stream).await;
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    put_lease(
        &aws,
        &app,
        &sh[0].id,
        vec![("leaseCounter", n(0)), ("checkpoint", s(LATEST))],
    )
    .await;
    let old = put_to(&aws, &stream, &sh[0], "before-start", 10).await;
    let ledger = Arc::new(Ledger::default());
    let first = TestWorker::start_with(
        settings(&app, &stream, "w0"),
        aws.clone(),
        None,
        Some(ledger.clone()),
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "w0 reading the LATEST shard (its iterator answered)",
        || async {
            let iterators = first
                .state
                .metrics
                .api_calls
                .get_or_create(&ApiCallLabels {
                    service: "kinesis",
                    operation: "GetShardIterator",
                    outcome: kds_worker::metrics::CallOutcome::Ok,
                })
                .get();
            let leases = first.state.leases();
            if iterators >= 1 && leases.len() == 1 {
                Ok(())
            } else {
                Err(format!("{iterators} iterators, reading {leases:?}"))
            }
        },
    )
    .await;
    first.shutdown().await;
    let l = lease_store(&aws, &app)
        .get(&sh[0].id)
        .await
        .unwrap()
        .unwrap();
    eprintln!(
        "LATEST reader left before any record: the lease says owner {:?}, checkpoint {:?}",
        l.owner, l.checkpoint
    );
    let between = put_to(&aws, &stream, &sh[0], "between-readers", 10).await;
    let second = TestWorker::start_with(
        settings(&app, &stream, "w1"),
        aws.clone(),
        None,
        Some(ledger.clone()),
    )
    .await;
    wait_for(Duration::from_secs(20), "w1 reading the shard", || async {
        (second.state.leases().len() == 1).then_some(())
    })
    .await;
    let later = put_to(&aws, &stream, &sh[0], "after-successor", 10).await;
    let took = wait_processed(&ledger, &later, "records put after w1 started reading").await;
    eprintln!("LATEST after a leave: w1's later records processed {took:?} after they were put");
    // Everything put after reading first started comes before these in the shard.
    let seen = processed_on(&ledger, &sh[0].id);
    let lost: BTreeSet<&String> = between.difference(&seen).collect();
    let early: BTreeSet<&String> = old.intersection(&seen).collect();
    eprintln!(
        "LATEST after a leave: {} of {} records put between the readers lost",
        lost.len(),
        between.len()
    );
    assert!(
        early.is_empty(),
        "records from before reading started: {early:?}"
    );
    assert!(
        lost.is_empty(),
        "records put after the shard was first read from LATEST were skipped when its reader left \
         (checkpoint left at {:?}, so the successor started at the new tip): {lost:?}",
        l.checkpoint
    );
    second.shutdown().await;
}

/// Every batch each worker processed, with when: who read which shard when.
struct Timed {
    ledger: Arc<Ledger>,
    batches: Mutex<Vec<(String, String, Instant)>>,
}

impl RecordProcessor for Timed {
    fn process(
        &self,
        worker_id: &str,
        shard_id: &str,
        lease_counter: u64,
        records: &[aws_sdk_kinesis::types::Record],
    ) {
        self.batches.lock().unwrap().push((
            worker_id.to_owned(),
            shard_id.to_owned(),
            Instant::now(),
        ));
        self.ledger
            .process(worker_id, shard_id, lease_counter, records);
    }
}

impl Timed {
    /// When `worker` processed batches of `shard` at or after `since`: (first, last).
    fn span(&self, worker: &str, shard: &str, since: Instant) -> Option<(Instant, Instant)> {
        let b = self.batches.lock().unwrap();
        let at: Vec<Instant> = b
            .iter()
            .filter(|(w, s, t)| w == worker && s == shard && *t >= since)
            .map(|(_, _, t)| *t)
            .collect();
        Some((*at.iter().min()?, *at.iter().max()?))
    }
}

/// The old workers' failover timeout, longer than the test fleet's [`FAILOVER`].
const OLD_FAILOVER: Duration = Duration::from_secs(6);

/// 5. A rollout that lowers `failover_timeout`: old worker A (6 s) holds leases next to new
///    worker B (2.5 s) and is cut off from DynamoDB while records flow. B reads A's shards no
///    sooner than A's own failover timeout after A's last heartbeat, never while A may still
///    read them, and nothing is lost. `b_coordinates`: B (the new one) is the coordinator,
///    judging A itself; else A was, and B first takes the coordinator post over.
async fn rollout_lowering_the_failover(b_coordinates: bool) {
    let aws = aws().await;
    let (app, stream) = (unique("rollout"), unique("rollout"));
    create_stream(&aws, &stream, 4).await;
    let ledger = Arc::new(Ledger::default());
    let timed = Arc::new(Timed {
        ledger: ledger.clone(),
        batches: Mutex::default(),
    });
    let mut proxy = Proxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let cut_aws = aws_with_dynamodb(&proxy.url()).await;
    let mut old = settings(&app, &stream, "a-old");
    old.failover_timeout = OLD_FAILOVER;
    let start_a =
        || TestWorker::start_with(old.clone(), cut_aws.clone(), None, Some(timed.clone()));
    let start_b = || {
        TestWorker::start_with(
            settings(&app, &stream, "b-new"),
            aws.clone(),
            None,
            Some(timed.clone()),
        )
    };
    let (a, b) = if b_coordinates {
        let b = start_b().await;
        wait_for(
            Duration::from_secs(30),
            "B to read all 4 shards",
            || async { (b.state.leases().len() == 4).then_some(()) },
        )
        .await;
        (start_a().await, b)
    } else {
        let a = start_a().await;
        wait_for(
            Duration::from_secs(30),
            "A to read all 4 shards",
            || async { (a.state.leases().len() == 4).then_some(()) },
        )
        .await;
        let b = start_b().await;
        (a, b)
    };
    let workers = [a, b];
    wait_spread(&aws, &app, &workers, 2, 2, Duration::from_secs(30)).await;
    let [a, b] = workers;
    assert_eq!(b.is_coordinator(), b_coordinates, "coordinator as arranged");
    let producer = Producer::start(&aws, &stream, 10, Duration::from_millis(200));
    tokio::time::sleep(HEARTBEAT * 4).await;
    let a_shards = a.state.leases();
    assert_eq!(a_shards.len(), 2);
    proxy.cut().await;
    let cut_at = Instant::now();
    let takeover = if b_coordinates {
        OLD_FAILOVER
    } else {
        // The coordinator post first, then the leases: each after A's own timeout.
        OLD_FAILOVER * 2
    };
    let (_, took) = wait_for(
        takeover + HEARTBEAT * 4 + MARGIN,
        "B to read all 4 shards",
        || async { (b.state.leases().len() == 4).then_some(()) },
    )
    .await;
    let last_heartbeat = a
        .state
        .last_heartbeat_ok()
        .expect("A's heartbeat succeeded before the cut");
    tokio::time::sleep(HEARTBEAT * 4).await;
    let produced = producer.stop().await;
    let (_, drained) = wait_for(
        OLD_FAILOVER + HEARTBEAT * 4 + Duration::from_secs(10),
        "every produced record to be processed",
        || async { ledger.data().is_superset(&produced).then_some(()) },
    )
    .await;
    let report = ledger.check(&produced);
    eprintln!(
        "B {} coordinator: B read all 4 shards {took:?} after the cut; drained {drained:?} after production stopped: {report}",
        if b_coordinates { "the" } else { "not the" }
    );
    for shard in &a_shards {
        let (b_first, _) = timed
            .span(&b.id, shard, cut_at)
            .unwrap_or_else(|| panic!("B processed nothing of {shard} after the cut"));
        let after_heartbeat = b_first.saturating_duration_since(last_heartbeat);
        let a_last = timed.span(&a.id, shard, cut_at).map(|(_, last)| last);
        eprintln!(
            "{shard}: A's last heartbeat sent {:?} before the cut; A processed it until {:?} after the cut; \
             B's first batch {after_heartbeat:?} after A's last heartbeat (A's failover {OLD_FAILOVER:?}, B's {FAILOVER:?})",
            cut_at.saturating_duration_since(last_heartbeat),
            a_last.map(|t| t.saturating_duration_since(cut_at)),
        );
        assert!(
            b_first >= last_heartbeat + OLD_FAILOVER,
            "B read {shard} {after_heartbeat:?} after A's last heartbeat, sooner than A's own failover_timeout {OLD_FAILOVER:?}"
        );
        if let Some(a_last) = a_last {
            assert!(
                a_last < b_first,
                "A processed {shard} {:?} after B began reading it",
                a_last - b_first
            );
        }
    }
    assert_none_lost_never_two_readers(&report);
    a.crash().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_lowering_the_failover_waits_for_the_old_coordinators_own_timeout() {
    rollout_lowering_the_failover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_with_a_shorter_failover_waits_for_an_old_workers_own_timeout() {
    rollout_lowering_the_failover(true).await;
}
