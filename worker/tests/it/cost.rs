//! What the lease protocol costs in DynamoDB reads, counted by a recording proxy in front of the
//! emulator (items returned by every Scan, Query and GetItem): going from 4 to 8 workers at
//! 100 shards must raise the fleet's item reads per second by at most 1.4× (a scan of the
//! lease table by every worker every round would double them), and in steady state only the
//! coordinator reads `lease_limits` and queries its own leases every heartbeat. A still
//! fleet scans its lease table every second heartbeat, however often the stream is polled.

use std::time::Duration;

use crate::support::faults::FaultProxy;
use crate::support::*;
use kds_worker::aws::AwsClients;
use kds_worker::config::Settings;
use kds_worker::meta::LeaseStamp;
use tokio::time::Instant;

const SHARDS: u32 = 100;
/// How long the steady state is measured at each fleet size.
const WINDOW: Duration = Duration::from_secs(12);

/// Item reads per second over `WINDOW`, per operation and in total.
async fn measure(proxy: &FaultProxy) -> (f64, String) {
    let ops = ["Scan", "Query", "GetItem"];
    let before: Vec<u64> = ops.iter().map(|op| proxy.items(op)).collect();
    let began = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let secs = began.elapsed().as_secs_f64();
    let per_op: Vec<f64> = ops
        .iter()
        .zip(before)
        .map(|(op, b)| (proxy.items(op) - b) as f64 / secs)
        .collect();
    let detail = ops
        .iter()
        .zip(&per_op)
        .map(|(op, r)| format!("{op} {r:.0}/s"))
        .collect::<Vec<_>>()
        .join(", ");
    (per_op.iter().sum(), detail)
}

/// Every worker holds ⌊S/W⌋ or ⌈S/W⌉ of the `shards` leases and all of them are held.
async fn wait_even(workers: &[TestWorker], shards: u32) -> Duration {
    let n = workers.len() as u32;
    let (lo, hi) = (shards / n, shards.div_ceil(n));
    let what = format!("{shards} shards spread over {n} workers ({lo}..={hi} each)");
    wait_for(Duration::from_secs(90), &what, || async {
        let held: Vec<u32> = workers
            .iter()
            .map(|w| w.state.leases().len() as u32)
            .collect();
        (held.iter().sum::<u32>() == shards && held.iter().all(|h| (lo..=hi).contains(h)))
            .then_some(())
    })
    .await
    .1
}

/// Waits until the coordinator's lease stamp has stood still for two settling windows: the
/// hand-offs of the last spread are done and every worker's settling reads are over, so what
/// is measured next is the steady state.
async fn wait_quiet(aws: &AwsClients, app: &str, s: &Settings) {
    let store = meta(aws, app);
    let still_for = s.settling_window() * 2;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last: Option<(Option<LeaseStamp>, Instant)> = None;
    loop {
        let stamp = store
            .read_coordinator()
            .await
            .ok()
            .flatten()
            .map(|r| r.lease_stamp);
        match (stamp, last) {
            (Some(stamp), Some((seen, since))) if seen == stamp => {
                if since.elapsed() >= still_for {
                    return;
                }
            }
            (Some(stamp), _) => last = Some((stamp, Instant::now())),
            (None, _) => last = None,
        }
        assert!(
            Instant::now() < deadline,
            "the lease stamp did not stand still for {still_for:?} within 60 s (last {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubling_the_workers_raises_item_reads_by_at_most_1_4x() {
    let aws = aws().await;
    let (app, stream) = (unique("cost"), unique("cost"));
    create_stream(&aws, &stream, SHARDS).await;
    let proxy = FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let proxied = aws_with_dynamodb(&proxy.url()).await;
    let ids = |range: std::ops::Range<u32>| range.map(|i| format!("w{i}")).collect::<Vec<_>>();
    let mut workers = start_workers_custom(&app, &stream, ids(0..4), &proxied, None, relaxed).await;
    let took = wait_even(&workers, SHARDS).await;
    eprintln!("4 workers: spread in {took:?}");
    let s = relaxed(settings(&app, &stream, "w0"));
    wait_quiet(&aws, &app, &s).await;
    let gets_before = proxy.seen("GetItem");
    let queries_before = proxy.seen("Query");
    let began = Instant::now();
    let (four, four_detail) = measure(&proxy).await;
    // Each follower reads the coordinator item every heartbeat and `lease_limits` only after
    // a publication (the item's stamp): about W + 1 GetItems a heartbeat, not 2 W.
    let heartbeat = s.heartbeat_interval;
    let heartbeats = began.elapsed().as_secs_f64() / heartbeat.as_secs_f64();
    let gets = (proxy.seen("GetItem") - gets_before) as f64 / heartbeats;
    // Only the coordinator queries its own leases every round; a follower queries when the
    // lease stamp on the coordinator item moves (nothing moves in steady state).
    let queries = (proxy.seen("Query") - queries_before) as f64 / heartbeats;
    eprintln!("4 workers: {gets:.1} GetItems, {queries:.1} Queries a heartbeat");
    assert!(
        queries <= 1.5,
        "{queries:.1} Queries a heartbeat from 4 workers in steady state: followers still query their leases every heartbeat?"
    );
    assert!(
        gets <= 4.0 * 1.5,
        "{gets:.1} GetItems a heartbeat from 4 workers: followers still read lease_limits every heartbeat?"
    );
    let more = start_workers_custom(&app, &stream, ids(4..8), &proxied, None, relaxed).await;
    workers.extend(more);
    let took = wait_even(&workers, SHARDS).await;
    eprintln!("8 workers: spread in {took:?}");
    wait_quiet(&aws, &app, &s).await;
    let (eight, eight_detail) = measure(&proxy).await;
    let ratio = eight / four;
    eprintln!(
        "item reads at {SHARDS} shards: 4 workers {four:.0}/s ({four_detail}); \
         8 workers {eight:.0}/s ({eight_detail}); ratio {ratio:.2}"
    );
    assert!(
        four > 0.0 && ratio <= 1.4,
        "4 -> 8 workers raised item reads {ratio:.2}x ({four:.0}/s -> {eight:.0}/s)"
    );
}

/// A heartbeat of 3 s with the stream polled every second: every coordinator round (every
/// half heartbeat) finds the stream's sync due.
fn slow_heartbeat_fast_poll(mut s: Settings) -> Settings {
    s.heartbeat_interval = Duration::from_secs(3);
    s.failover_timeout = Duration::from_secs(12);
    s.shard_poll_interval = Duration::from_secs(1);
    s
}

/// The scan of every lease is the largest read there is. In a still fleet the coordinator's
/// rounds read the heartbeats every half heartbeat and the lease table every second
/// heartbeat; a sync with the stream that finds the shards it found before needs no scan
/// (it would otherwise make every round a full one whenever `shard_poll_interval` is under
/// half a heartbeat).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_still_fleet_scans_its_lease_table_every_second_heartbeat_however_often_it_polls() {
    const SHARDS: u32 = 30;
    let aws = aws().await;
    let (app, stream) = (unique("still"), unique("still"));
    create_stream(&aws, &stream, SHARDS).await;
    let proxy = FaultProxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let proxied = aws_with_dynamodb(&proxy.url()).await;
    let ids = ["w0", "w1", "w2"].map(String::from);
    let workers =
        start_workers_custom(&app, &stream, ids, &proxied, None, slow_heartbeat_fast_poll).await;
    wait_even(&workers, SHARDS).await;
    let s = slow_heartbeat_fast_poll(settings(&app, &stream, "w0"));
    wait_quiet(&aws, &app, &s).await;
    let (lease_table, meta_table) = (s.lease_table(), s.meta_table());
    let leases_before = proxy.seen_on("Scan", &lease_table);
    let heartbeats_before = proxy.seen_on("Scan", &meta_table);
    let began = Instant::now();
    tokio::time::sleep(s.heartbeat_interval * 8).await;
    let heartbeats = began.elapsed().as_secs_f64() / s.heartbeat_interval.as_secs_f64();
    let lease_scans = (proxy.seen_on("Scan", &lease_table) - leases_before) as f64 / heartbeats;
    let heartbeat_scans =
        (proxy.seen_on("Scan", &meta_table) - heartbeats_before) as f64 / heartbeats;
    eprintln!(
        "a still fleet, per heartbeat: {lease_scans:.2} scans of the lease table, \
         {heartbeat_scans:.2} of the heartbeats"
    );
    assert!(
        heartbeat_scans >= 1.5,
        "the coordinator read the heartbeats {heartbeat_scans:.2} times a heartbeat (rounds every half heartbeat expected)"
    );
    assert!(
        lease_scans <= 0.75,
        "the lease table was scanned {lease_scans:.2} times a heartbeat in a still fleet polled every second (every second heartbeat expected)"
    );
}
