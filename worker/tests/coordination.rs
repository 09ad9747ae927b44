//! Election and publication against the emulators (kinesis-mock, moto) through the real SDK.
//! Run with `cargo xtask test`, which starts the emulators and exports their endpoints.

mod support;

use std::time::Duration;

use kds_worker::store::LimitRecord;
use support::*;

/// DESIGN.md's phase table: 30/3 → 10, 30/5 → 6, 60/3 → 20, 300/3 → 80 with deficit 60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_table() {
    let aws = aws().await;
    let (app, stream) = (unique("phases"), unique("phases"));
    create_stream(&aws, &stream, 30).await;
    let mut workers = start_workers(&app, &stream, (0..3).map(|i| format!("w{i}")), &aws).await;
    let t = wait_limit(&workers, 10, Duration::from_secs(20)).await;
    eprintln!("30 shards / 3 workers -> 10 after {t:?}");

    // Scale workers 3 -> 5.
    let extra = start_workers(&app, &stream, ["w3".to_owned(), "w4".to_owned()], &aws).await;
    workers.extend(extra);
    let t = wait_limit(&workers, 6, HEARTBEAT * 4 + Duration::from_secs(2)).await;
    eprintln!("30 shards / 5 workers -> 6 after {t:?}");

    // Back to 3 (graceful: heartbeats are removed, no failover wait).
    for w in workers.split_off(3) {
        w.shutdown().await;
    }
    let t = wait_limit(&workers, 10, HEARTBEAT * 4 + Duration::from_secs(2)).await;
    eprintln!("back to 3 workers -> 10 after {t:?}");

    // Reshard 30 -> 60: the new limit must arrive within one shard poll (plus a read).
    reshard(&aws, &stream, 60).await;
    let t = wait_limit(
        &workers,
        20,
        SHARD_POLL + HEARTBEAT * 2 + Duration::from_millis(500),
    )
    .await;
    eprintln!("60 shards / 3 workers -> 20 after {t:?}");

    // 60 -> 120 -> 240 -> 300: the cap binds.
    reshard(&aws, &stream, 300).await;
    // (240 shards already give 80: wait for the 300-shard publication itself.)
    let (limit, _) = wait_for(
        SHARD_POLL + HEARTBEAT * 2 + Duration::from_millis(500),
        "every worker to read the 300-shard limit",
        || async {
            let limits: Vec<_> = workers.iter().filter_map(|w| w.state.limit()).collect();
            (limits.len() == workers.len() && limits.iter().all(|l| l.shard_count == 300))
                .then(|| limits[0].clone())
        },
    )
    .await;
    assert_eq!(limit.max_leases_per_worker, 80);
    assert_eq!(limit.shard_count, 300);
    assert_eq!(limit.worker_count, 3);
    assert_eq!(limit.capacity_deficit, 60);
    assert_eq!(limit.cap, 80);
    assert_eq!(limit.desired_workers, None);

    // What a user reads in DynamoDB is the same.
    let stored = meta(&aws, &app).read_limit().await.unwrap().unwrap();
    assert_eq!(stored.max_leases_per_worker, 80);
    assert_eq!(stored.capacity_deficit, 60);
    assert_eq!(coordinators(&workers).len(), 1);
    for w in workers {
        w.shutdown().await;
    }
}

/// 20 workers start at the same instant on empty tables: one coordinator, one epoch, one limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_of_twenty_workers_elects_exactly_one() {
    let aws = aws().await;
    let (app, stream) = (unique("race"), unique("race"));
    create_stream(&aws, &stream, 40).await;
    let workers = start_workers(&app, &stream, (0..20).map(|i| format!("w{i:02}")), &aws).await;
    wait_limit(&workers, 2, Duration::from_secs(30)).await;
    // Every worker reads the same published version.
    let (version, _) = wait_for(
        Duration::from_secs(10),
        "all 20 workers to read the same version",
        || async {
            let versions: Vec<_> = workers
                .iter()
                .map(|w| w.state.limit().map(|l| l.version))
                .collect();
            versions
                .windows(2)
                .all(|p| p[0] == p[1])
                .then(|| versions[0])
        },
    )
    .await;
    assert!(version.is_some());
    assert_eq!(coordinators(&workers).len(), 1, "exactly one coordinator");
    let row = meta(&aws, &app).read_coordinator().await.unwrap().unwrap();
    assert_eq!(row.epoch, 1, "one epoch: nobody took over from anybody");
    let takeovers: u64 = workers
        .iter()
        .map(|w| w.state.metrics.coordinator_takeovers.get())
        .sum();
    assert_eq!(takeovers, 1);
    let conflicts: u64 = workers
        .iter()
        .map(|w| {
            w.state
                .metrics
                .conditional_write_conflicts
                .get_or_create(&kds_worker::metrics::OperationLabels {
                    operation: "UpdateItem",
                })
                .get()
        })
        .sum();
    eprintln!("20-way race: 1 winner, {conflicts} conditional-write conflicts");
    for w in workers {
        w.shutdown().await;
    }
}

/// The coordinator dies without stepping down: a successor within failover_timeout + one
/// heartbeat, with a higher epoch, and the old epoch can no longer write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_a_crash() {
    let aws = aws().await;
    let (app, stream) = (unique("failover"), unique("failover"));
    create_stream(&aws, &stream, 30).await;
    let mut workers = start_workers(&app, &stream, (0..3).map(|i| format!("w{i}")), &aws).await;
    wait_limit(&workers, 10, Duration::from_secs(20)).await;
    let idx = workers.iter().position(|w| w.is_coordinator()).unwrap();
    let old = workers.remove(idx);
    let old_id = old.id.clone();
    let (_, old_epoch) = old.state.role();
    old.crash().await;

    let budget = FAILOVER + HEARTBEAT + Duration::from_millis(400);
    let (new_epoch, took) = wait_for(budget * 2, "a new coordinator", || async {
        workers
            .iter()
            .find(|w| w.is_coordinator())
            .map(|w| w.state.role().1)
    })
    .await;
    eprintln!("failover took {took:?} (failover_timeout {FAILOVER:?} + heartbeat {HEARTBEAT:?})");
    assert!(took <= budget, "failover took {took:?}, budget {budget:?}");
    assert!(new_epoch > old_epoch);
    assert_eq!(coordinators(&workers).len(), 1);

    // The deposed coordinator's write is refused, whatever it claims to know.
    let store = meta(&aws, &app);
    let current = store.read_limit().await.unwrap().unwrap();
    let stale = LimitRecord {
        max_leases_per_worker: 99,
        epoch: old_epoch,
        version: current.version + 1,
        computed_by: old_id,
        ..current.clone()
    };
    let err = store.publish_limit(&stale).await.unwrap_err();
    assert!(err.is_condition_failed(), "{err}");
    assert_ne!(
        store
            .read_limit()
            .await
            .unwrap()
            .unwrap()
            .max_leases_per_worker,
        99
    );

    // The dead worker's heartbeat is removed and the limit recomputed for 2 workers.
    wait_limit(&workers, 15, FAILOVER * 3).await;
    for w in workers {
        w.shutdown().await;
    }
}

/// SIGTERM on the coordinator: a successor well before the failover timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_step_down_hands_over_quickly() {
    let aws = aws().await;
    let (app, stream) = (unique("stepdown"), unique("stepdown"));
    create_stream(&aws, &stream, 30).await;
    let mut workers = start_workers(&app, &stream, (0..3).map(|i| format!("w{i}")), &aws).await;
    wait_limit(&workers, 10, Duration::from_secs(20)).await;
    let idx = workers.iter().position(|w| w.is_coordinator()).unwrap();
    let old = workers.remove(idx);
    let old_id = old.id.clone();
    let (_, old_epoch) = old.state.role();
    let start = tokio::time::Instant::now();
    old.shutdown().await;
    let (new_epoch, _) = wait_for(FAILOVER, "a successor", || async {
        workers
            .iter()
            .find(|w| w.is_coordinator())
            .map(|w| w.state.role().1)
    })
    .await;
    let took = start.elapsed();
    eprintln!("graceful hand-over took {took:?} (failover_timeout {FAILOVER:?})");
    assert!(took < FAILOVER / 2 + HEARTBEAT, "hand-over took {took:?}");
    assert_eq!(new_epoch, old_epoch + 1);
    let rows = meta(&aws, &app).scan_heartbeats().await.unwrap();
    assert!(
        rows.iter().all(|r| r.worker_id != old_id),
        "heartbeat removed on shutdown"
    );
    wait_limit(&workers, 15, Duration::from_secs(5)).await;
    for w in workers {
        w.shutdown().await;
    }
}
