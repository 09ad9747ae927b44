//! DynamoDB goes away for a few seconds: `/ready` turns 503 with a reason, `/health` stays 200,
//! and the worker recovers by itself when DynamoDB returns.

use std::time::Duration;

use crate::support::*;
use kds_worker::http;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_outage_turns_ready_503_and_recovers() {
    let direct = aws().await;
    let (app, stream) = (unique("outage"), unique("outage"));
    create_stream(&direct, &stream, 4).await;
    let mut proxy = Proxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let aws = aws_with_dynamodb(&proxy.url()).await;

    let worker = TestWorker::start(settings(&app, &stream, "w0"), aws, None).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(http::serve(listener, worker.state.clone(), stop.clone()));

    wait_for(Duration::from_secs(20), "/ready 200", || async {
        (http_get(addr, "/ready").await.0 == 200).then_some(())
    })
    .await;

    // The worker reads its 4 shards before the outage.
    wait_for(
        Duration::from_secs(20),
        "the worker to hold all 4 leases",
        || async { (worker.state.leases().len() == 4).then_some(()) },
    )
    .await;

    proxy.cut().await;
    // Self-fencing: with its heartbeat stale, it stops every consumer no later than
    // failover_timeout after its last successful heartbeat, so before anyone may take over.
    let (stopped_at, _) = wait_for(
        FAILOVER * 2,
        "every consumer to stop (self-fencing)",
        || async {
            worker
                .state
                .leases()
                .is_empty()
                .then(tokio::time::Instant::now)
        },
    )
    .await;
    let last_ok = worker
        .state
        .last_heartbeat_ok()
        .expect("a heartbeat succeeded before the outage");
    let fenced_after = stopped_at - last_ok;
    eprintln!(
        "consumers stopped {fenced_after:?} after the last successful heartbeat (failover_timeout {FAILOVER:?})"
    );
    assert!(
        fenced_after <= FAILOVER,
        "still reading {fenced_after:?} after the last heartbeat"
    );
    let (body, took) = wait_for(
        Duration::from_secs(10),
        "/ready 503 during the outage",
        || async {
            let (code, body) = http_get(addr, "/ready").await;
            (code == 503).then_some(body)
        },
    )
    .await;
    eprintln!("outage noticed by /ready after {took:?}: {body}");
    let reasons: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reasons = reasons["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().unwrap().contains("heartbeat not renewed")),
        "{reasons:?}"
    );
    // Liveness must not depend on AWS: restarting the pod would not bring DynamoDB back.
    assert_eq!(http_get(addr, "/health").await.0, 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(http_get(addr, "/health").await.0, 200);
    assert_eq!(http_get(addr, "/ready").await.0, 503);

    proxy.restore().await;
    let (_, took) = wait_for(
        Duration::from_secs(20),
        "/ready 200 after the outage",
        || async { (http_get(addr, "/ready").await.0 == 200).then_some(()) },
    )
    .await;
    eprintln!("recovered {took:?} after DynamoDB returned");
    wait_for(
        FAILOVER * 3,
        "the lone worker to be coordinator again",
        || async { worker.is_coordinator().then_some(()) },
    )
    .await;
    // And it reads its shards again.
    wait_for(
        Duration::from_secs(20),
        "the leases to be read again",
        || async { (worker.state.leases().len() == 4).then_some(()) },
    )
    .await;
    stop.cancel();
    worker.shutdown().await;
}

/// DynamoDB hangs (connections accepted, never answered): the coordinator's renewal and the
/// heartbeat hang too, yet the coordinator's duties stop at its last good renewal +
/// failover_timeout − heartbeat_interval and every consumer at the fence, both before anyone
/// may take over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_coordinator_stops_its_duties_by_the_deadline() {
    let direct = aws().await;
    let (app, stream) = (unique("hung"), unique("hung"));
    create_stream(&direct, &stream, 4).await;
    let mut proxy = Proxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let aws = aws_with_dynamodb(&proxy.url()).await;
    let worker = TestWorker::start(settings(&app, &stream, "w0"), aws, None).await;
    wait_for(
        Duration::from_secs(20),
        "the worker to coordinate and read 4 shards",
        || async { (worker.is_coordinator() && worker.state.leases().len() == 4).then_some(()) },
    )
    .await;
    let deadline_before = worker.state.term_deadline().expect("coordinating");
    assert!(deadline_before > tokio::time::Instant::now());

    proxy.stall().await;
    let stalled = tokio::time::Instant::now();
    // Watch both at once: the duties (role) and the consumers (fence).
    let mut stopped_at = None;
    let mut fenced_at = None;
    wait_for(
        FAILOVER * 3,
        "the coordinator's duties and every consumer to stop",
        || {
            let now = tokio::time::Instant::now();
            if stopped_at.is_none() && !worker.is_coordinator() {
                stopped_at = Some(now);
            }
            if fenced_at.is_none() && worker.state.leases().is_empty() {
                fenced_at = Some(now);
            }
            let done = stopped_at.is_some() && fenced_at.is_some();
            async move { done.then_some(()) }
        },
    )
    .await;
    let (stopped_at, fenced_at) = (stopped_at.unwrap(), fenced_at.unwrap());
    let renewed = worker
        .state
        .last_term_renewal()
        .expect("a renewal succeeded before the stall");
    let deadline = renewed + FAILOVER - HEARTBEAT;
    eprintln!(
        "duties stopped {:?} after the last good renewal ({:?} after the stall); deadline {:?}, \
         a successor may take over after {FAILOVER:?}",
        stopped_at - renewed,
        stopped_at - stalled,
        deadline - renewed
    );
    // Stopped by the deadline (with room for the polling), long before a hung renewal would
    // have returned (the SDK's attempt timeout is 4 s).
    assert!(
        stopped_at <= deadline + Duration::from_millis(150),
        "duties ran {:?} past the deadline",
        stopped_at - deadline
    );
    assert!(stopped_at < renewed + FAILOVER);
    assert!(
        worker
            .state
            .metrics
            .encode()
            .contains("kds_is_coordinator 0")
    );
    // The consumers stopped at the fence too, although each heartbeat write hangs.
    let last_ok = worker.state.last_heartbeat_ok().unwrap();
    eprintln!(
        "consumers stopped {:?} after the last good heartbeat",
        fenced_at - last_ok
    );
    assert!(fenced_at <= last_ok + FAILOVER - HEARTBEAT + Duration::from_millis(150));

    proxy.restore().await;
    wait_for(
        FAILOVER * 4,
        "the worker to coordinate and read again",
        || async { (worker.is_coordinator() && worker.state.leases().len() == 4).then_some(()) },
    )
    .await;
    worker.shutdown().await;
}
