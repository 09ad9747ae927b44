//! DynamoDB goes away for a few seconds: `/ready` turns 503 with a reason, `/health` stays 200,
//! and the worker recovers by itself when DynamoDB returns.

mod support;

use std::time::Duration;

use kds_worker::http;
use support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_outage_turns_ready_503_and_recovers() {
    let direct = aws().await;
    let (app, stream) = (unique("outage"), unique("outage"));
    create_stream(&direct, &stream, 4).await;
    let mut proxy = Proxy::start(&std::env::var("AWS_ENDPOINT_URL_DYNAMODB").unwrap()).await;
    let aws = aws_with_dynamodb(&proxy.url()).await;

    let worker = TestWorker::start(settings(&app, &stream, "w0"), aws, None).await;
    let listener = http::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
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
