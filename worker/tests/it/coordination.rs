//! Election and publication against the emulators (kinesis-mock, moto) through the real SDK.
//! Run with `cargo xtask test`, which starts the emulators and exports their endpoints.

use std::time::Duration;

use crate::support::*;
use kds_worker::meta::PublishedLimit;

/// The lab's phase table (lab/scenarios.toml): 30/3 → 10, 30/5 → 6, 60/3 → 20, 300/3 → 80 with deficit 60.
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
    let t = wait_limit(&workers, 6, HEARTBEAT * 4 + MARGIN).await;
    eprintln!("30 shards / 5 workers -> 6 after {t:?}");

    // Back to 3 (graceful: heartbeats are removed, no failover wait).
    for w in workers.split_off(3) {
        w.shutdown().await;
    }
    let t = wait_limit(&workers, 10, HEARTBEAT * 4 + MARGIN).await;
    eprintln!("back to 3 workers -> 10 after {t:?}");

    // Reshard 30 -> 60: the new limit must arrive within one shard poll (plus a read).
    reshard(&aws, &stream, 60).await;
    let t = wait_limit(&workers, 20, SHARD_POLL + HEARTBEAT * 2 + MARGIN).await;
    eprintln!("60 shards / 3 workers -> 20 after {t:?}");

    // 60 -> 120 -> 240 -> 300: the cap binds.
    reshard(&aws, &stream, 300).await;
    // (240 shards already give 80: wait for the 300-shard publication itself.)
    let (limit, _) = wait_for(
        SHARD_POLL + HEARTBEAT * 2 + MARGIN,
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
    // Published with the decision: 4 workers would cover the 300 shards at cap 80.
    assert_eq!(stored.workers_needed, 4);
    assert_eq!(coordinators(&workers).len(), 1);
    for w in workers {
        w.shutdown().await;
    }
}

/// 20 workers start at the same instant on empty tables: one coordinator, one epoch, one limit.
/// Relaxed timings: 20 workers at a 300 ms heartbeat ask more of one moto process on a 2-core
/// machine than a heartbeat write bounded by the interval allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_of_twenty_workers_elects_exactly_one() {
    let aws = aws().await;
    let (app, stream) = (unique("race"), unique("race"));
    create_stream(&aws, &stream, 40).await;
    let ids = (0..20).map(|i| format!("w{i:02}"));
    let workers = start_workers_custom(&app, &stream, ids, &aws, None, relaxed).await;
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

    let budget = FAILOVER + HEARTBEAT + MARGIN;
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
    let stale = PublishedLimit {
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

    // The limit recomputed for 2 workers: the dead one is judged dead.
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

type Item = std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>;

fn n(v: impl ToString) -> aws_sdk_dynamodb::types::AttributeValue {
    aws_sdk_dynamodb::types::AttributeValue::N(v.to_string())
}

fn st(v: &str) -> aws_sdk_dynamodb::types::AttributeValue {
    aws_sdk_dynamodb::types::AttributeValue::S(v.to_owned())
}

/// A complete `lease_limits` item as an earlier coordinator left it.
fn limits_item(limit: u64, epoch: u64, version: u64) -> Item {
    let mut item = Item::new();
    item.insert("key".into(), st("lease_limits"));
    for (k, v) in [
        ("max_leases_per_worker", limit),
        ("shard_count", 99),
        ("worker_count", 1),
        ("live_workers", 1),
        ("cap", 80),
        ("capacity_deficit", 0),
        ("epoch", epoch),
        ("version", version),
    ] {
        item.insert(k.into(), n(v));
    }
    item.insert("computed_by".into(), st("gone"));
    item.insert("updated_at".into(), st("2020-01-01T00:00:00.000Z"));
    item
}

async fn put_meta_item(aws: &kds_worker::aws::AwsClients, app: &str, item: Item) {
    aws.dynamodb
        .put_item()
        .table_name(format!("{app}_meta"))
        .set_item(Some(item))
        .send()
        .await
        .expect("PutItem");
}

/// The coordinator item is gone but `lease_limits` carries epoch 7, or `lease_limits` is
/// malformed in any of the ways that used to stop publication for ever: a new coordinator
/// claims above every readable epoch, replaces the item, and nobody obeys a limit of 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_goes_above_lease_limits_and_replaces_malformed_items() {
    let aws = aws().await;
    let stream = unique("limits");
    create_stream(&aws, &stream, 6).await;
    let cases: Vec<(&str, Item, Option<u64>)> = vec![
        ("well-formed at epoch 7", limits_item(99, 7, 3), Some(7)),
        (
            "no version",
            {
                let mut i = limits_item(99, 7, 3);
                i.remove("version");
                i
            },
            Some(7),
        ),
        (
            "no max_leases_per_worker",
            {
                let mut i = limits_item(99, 7, 3);
                i.remove("max_leases_per_worker");
                i
            },
            Some(7),
        ),
        ("version u64::MAX", limits_item(99, 7, u64::MAX), Some(7)),
        (
            "epoch beyond u64",
            {
                let mut i = limits_item(99, 7, 3);
                i.insert("epoch".into(), n("100000000000000000000000000000"));
                i
            },
            Some(u64::MAX - 1),
        ),
        (
            "epoch a string",
            {
                let mut i = limits_item(99, 7, 3);
                i.insert("epoch".into(), st("seven"));
                i
            },
            None,
        ),
    ];
    for (case, item, old_epoch) in cases {
        let app = unique("limits");
        kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
            .await
            .unwrap();
        put_meta_item(&aws, &app, item).await;
        let w = TestWorker::start(settings(&app, &stream, "w0"), aws.clone(), None).await;
        let store = meta(&aws, &app);
        let (stored, took) = wait_for(Duration::from_secs(15), case, || async {
            assert_ne!(w.limit(), Some(0), "{case}: obeyed a limit of 0");
            let stored = store.read_limit().await.ok().flatten()?;
            (stored.computed_by == "w0" && stored.max_leases_per_worker == 6).then_some(stored)
        })
        .await;
        let row = store.read_coordinator().await.unwrap().unwrap();
        eprintln!(
            "{case}: published after {took:?} at epoch {} version {}",
            row.epoch, stored.version
        );
        assert_eq!(stored.epoch, row.epoch, "{case}");
        if let Some(old) = old_epoch {
            assert!(
                row.epoch > old,
                "{case}: epoch {} not above {old}",
                row.epoch
            );
        }
        assert_eq!(row.failover_ms, Some(FAILOVER.as_millis() as u64));
        wait_limit(std::slice::from_ref(&w), 6, Duration::from_secs(5)).await;
        w.shutdown().await;
    }
}

/// Followers read `lease_limits` only after a publication (the coordinator item's stamp says
/// when); in between, that stamp confirms the limit they hold, so `/ready` stays green on
/// every worker, not only on the coordinator that reads the item itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_stay_ready_between_publications() {
    let aws = aws().await;
    let (app, stream) = (unique("ready"), unique("ready"));
    create_stream(&aws, &stream, 6).await;
    let workers = start_workers(&app, &stream, (0..3).map(|i| format!("w{i}")), &aws).await;
    wait_limit(&workers, 2, Duration::from_secs(20)).await;
    let limit_reasons = |w: &TestWorker| -> Vec<String> {
        w.state
            .not_ready_reasons()
            .into_iter()
            .filter(|r| r.contains("lease_limits"))
            .collect()
    };
    let store = meta(&aws, &app);
    let published = || async {
        let l = store.read_limit().await.unwrap().unwrap();
        (l.epoch, l.version)
    };
    // Several times the staleness bound /ready applies, and still under the refresh interval
    // that would read the item anyway. A window in which something was published (a worker
    // judged dead on a loaded machine) shows nothing: it is tried again, three times at most.
    let s = settings(&app, &stream, "w0");
    let window = s.stale_after() * 5;
    assert!(window < s.stamp_refresh_interval());
    let mut quiet_windows = 0;
    for _ in 0..3 {
        let before = published().await;
        let until = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < until {
            for w in &workers {
                let reasons = limit_reasons(w);
                assert!(
                    reasons.is_empty(),
                    "{} not ready between publications: {reasons:?}",
                    w.state.settings.worker_id
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if published().await == before {
            quiet_windows += 1;
            break;
        }
    }
    assert_eq!(quiet_windows, 1, "every window had a publication in it");
    for w in workers {
        w.shutdown().await;
    }
}

/// A follower that reads a malformed `lease_limits` item keeps its last good limit and says
/// why in `/ready` (a live coordinator that does not fix it is simulated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_its_last_good_limit_when_the_item_is_malformed() {
    let aws = aws().await;
    let (app, stream) = (unique("malformed"), unique("malformed"));
    create_stream(&aws, &stream, 6).await;
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    let store = meta(&aws, &app);
    // A live coordinator "ghost" at epoch 5 that never fixes anything.
    store
        .claim_coordinator("ghost", None, 5, FAILOVER, HEARTBEAT)
        .await
        .unwrap();
    let renewing = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                let _ = store.renew_coordinator("ghost", 5, None).await;
                tokio::time::sleep(HEARTBEAT).await;
            }
        })
    };
    let mut broken = limits_item(4, 5, 1);
    broken.remove("max_leases_per_worker");
    put_meta_item(&aws, &app, broken.clone()).await;

    let w = TestWorker::start(settings(&app, &stream, "w0"), aws.clone(), None).await;
    let (reasons, _) = wait_for(
        Duration::from_secs(10),
        "the malformed item reported",
        || async {
            let reasons = w.state.not_ready_reasons();
            reasons
                .iter()
                .any(|r| r.contains("max_leases_per_worker is missing"))
                .then_some(reasons)
        },
    )
    .await;
    eprintln!("/ready reasons: {reasons:?}");
    assert_eq!(w.limit(), None, "a malformed item is never obeyed");
    assert!(!w.is_coordinator());

    // The ghost publishes a good record: obeyed.
    store
        .publish_limit(&PublishedLimit {
            computed_by: "ghost".into(),
            ..kds_worker::meta::parse_limit(&limits_item(4, 5, 2)).unwrap()
        })
        .await
        .unwrap();
    wait_limit(std::slice::from_ref(&w), 4, Duration::from_secs(5)).await;
    assert!(w.state.limit_problem().is_none());

    // Broken again, by hand (the coordinator item's stamp still shows version 2, so the
    // follower reads the item at its next refresh): the last good limit stays in force, and
    // /ready says why.
    broken.insert("version".into(), n(3));
    put_meta_item(&aws, &app, broken).await;
    let refresh = settings(&app, &stream, "w0").stamp_refresh_interval();
    let (reasons, _) = wait_for(
        refresh + HEARTBEAT + MARGIN,
        "the malformed item reported again",
        || async {
            let reasons = w.state.not_ready_reasons();
            reasons
                .iter()
                .any(|r| r.contains("max_leases_per_worker is missing"))
                .then_some(reasons)
        },
    )
    .await;
    assert!(
        reasons.iter().any(|r| r.contains("last good limit 4")),
        "{reasons:?}"
    );
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(w.limit(), Some(4));
    renewing.abort();
    w.shutdown().await;
}

/// Long enough that a failover timeout and a few heartbeats are far apart.
const LONG_FAILOVER: Duration = Duration::from_secs(6);

/// Three workers with [`LONG_FAILOVER`] on a 6-shard stream, two shards each.
async fn three_spread_with_long_failover(
    aws: &kds_worker::aws::AwsClients,
    app: &str,
    stream: &str,
) -> Vec<TestWorker> {
    create_stream(aws, stream, 6).await;
    let workers = start_workers_custom(
        app,
        stream,
        (0..3).map(|i| format!("w{i}")),
        aws,
        None,
        |mut s| {
            s.failover_timeout = LONG_FAILOVER;
            s
        },
    )
    .await;
    wait_spread(aws, app, &workers, 2, 2, LONG_FAILOVER * 3).await;
    workers
}

/// The coordinator dies: the follower that takes the post over read the heartbeats when it
/// saw a renewal missed, so it judges the old coordinator dead soon after the takeover — a
/// successor that started judging at its term's start would need a whole failover timeout
/// more — and its leases move about one timeout after the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_coordinators_leases_move_one_timeout_after_the_crash() {
    let aws = aws().await;
    let (app, stream) = (unique("coorddeath"), unique("coorddeath"));
    let mut workers = three_spread_with_long_failover(&aws, &app, &stream).await;
    let idx = workers.iter().position(|w| w.is_coordinator()).unwrap();
    workers.remove(idx).crash().await;
    let crashed = std::time::Instant::now();
    let (successor, _) = wait_for(LONG_FAILOVER * 3, "a new coordinator", || async {
        workers.iter().position(|w| w.is_coordinator())
    })
    .await;
    let taken_over = std::time::Instant::now();
    wait_for(
        LONG_FAILOVER * 3,
        "the successor to judge the old coordinator dead (a limit for 2 workers)",
        || async { (workers[successor].limit() == Some(3)).then_some(()) },
    )
    .await;
    let judged = taken_over.elapsed();
    eprintln!(
        "taken over {:?} and judged dead {:?} after the crash (failover {LONG_FAILOVER:?})",
        taken_over - crashed,
        crashed.elapsed()
    );
    assert!(
        judged < HEARTBEAT * 2 + MARGIN,
        "judged dead {judged:?} after the takeover: the successor did not bring the heartbeats it read"
    );
    wait_spread(&aws, &app, &workers, 3, 3, LONG_FAILOVER * 2).await;
    for w in workers {
        w.shutdown().await;
    }
}

/// The coordinator dies: its last renewal recorded its own worker's last heartbeat, so the
/// successor judges that worker dead in its very first lease round — its first publication
/// already counts the two survivors — instead of one failover timeout after the heartbeat read
/// it made when it saw a renewal missed (which would publish an unchanged limit first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_judges_the_old_coordinators_worker_when_it_takes_the_post() {
    let aws = aws().await;
    let (app, stream) = (unique("seed"), unique("seed"));
    let mut workers = three_spread_with_long_failover(&aws, &app, &stream).await;
    let idx = workers.iter().position(|w| w.is_coordinator()).unwrap();
    let old = workers.remove(idx);
    let old_id = old.state.settings.worker_id.clone();
    old.crash().await;
    // What the successor will find: the last renewal's record and the row as it stays.
    let store = meta(&aws, &app);
    let item = store.read_coordinator().await.unwrap().unwrap();
    let row = store
        .scan_heartbeats()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.worker_id == old_id)
        .expect("the crashed coordinator's heartbeat row");
    let before = store.read_limit().await.unwrap().unwrap();
    let recorded = item
        .owner_heartbeat
        .clone()
        .expect("renewals record the owner's heartbeat");
    let (last, _) = wait_for(
        LONG_FAILOVER * 3,
        "a publication by a new coordinator counting 2 workers",
        || {
            let store = &store;
            async move {
                let l = store.read_limit().await.ok()??;
                (l.epoch > before.epoch && l.live_workers == 2).then_some(l)
            }
        },
    )
    .await;
    eprintln!(
        "recorded heartbeat {} of {}, row at {} of {:?}; publications {}.{} -> {}.{}",
        recorded.counter,
        recorded.instance,
        row.counter,
        row.instance,
        before.epoch,
        before.version,
        last.epoch,
        last.version
    );
    if row.counter == recorded.counter && row.instance.as_deref() == Some(&recorded.instance) {
        // The row still shows the recorded heartbeat: judged in the first round, so the
        // term's first publication is this one.
        assert_eq!(
            last.version,
            before.version + 1,
            "the successor published before judging the old coordinator's worker dead"
        );
    } else {
        // The crash came between a heartbeat landing and the renewal recording it (a few
        // milliseconds a heartbeat): the read made at the missed renewal decides, as before.
        eprintln!("the row moved past the recorded heartbeat: nothing to check this time");
    }
    assert_eq!(last.max_leases_per_worker, 3);
    for w in workers {
        w.shutdown().await;
    }
}

/// Each worker publishes its own failover timeout: a coordinator configured with a longer one
/// than its followers is not taken over (nor its leases taken) before that longer timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_published_failover_timeout_is_waited_for() {
    const SLOW: Duration = Duration::from_millis(4500);
    let aws = aws().await;
    let (app, stream) = (unique("slowfo"), unique("slowfo"));
    create_stream(&aws, &stream, 4).await;
    let mut s = settings(&app, &stream, "w-slow");
    s.failover_timeout = SLOW;
    let slow = TestWorker::start(s, aws.clone(), None).await;
    wait_for(Duration::from_secs(10), "w-slow to coordinate", || async {
        slow.is_coordinator().then_some(())
    })
    .await;
    let fast = TestWorker::start(settings(&app, &stream, "w-fast"), aws.clone(), None).await;
    let both = [slow, fast];
    wait_spread(&aws, &app, &both, 2, 2, Duration::from_secs(20)).await;
    let [slow, fast] = both;
    let row = meta(&aws, &app)
        .scan_heartbeats()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.worker_id == "w-slow")
        .unwrap();
    assert_eq!(row.failover_ms, Some(4500));

    slow.crash().await;
    let crashed = std::time::Instant::now();
    let (_, took) = wait_for(SLOW * 3, "w-fast to coordinate", || async {
        fast.is_coordinator().then_some(())
    })
    .await;
    eprintln!(
        "coordinator taken over {took:?} after the crash (published failover {SLOW:?}, own {FAILOVER:?})"
    );
    assert!(
        took >= SLOW - HEARTBEAT * 2,
        "taken over after {took:?}, before the published {SLOW:?}"
    );
    wait_for(SLOW * 3, "w-fast to hold all 4 leases", || async {
        (fast.state.leases().len() == 4).then_some(())
    })
    .await;
    let took = crashed.elapsed();
    eprintln!("leases taken {took:?} after the crash");
    assert!(took >= SLOW - HEARTBEAT * 2, "leases taken after {took:?}");
    fast.shutdown().await;
}

/// Two processes started with one worker id: the second stays fenced (never ready, never
/// reading) while the first lives; it takes over about failover_timeout after the first
/// crashed, and at once after a graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_worker_id_waits_for_the_first() {
    let aws = aws().await;
    let (app, stream) = (unique("dupid"), unique("dupid"));
    create_stream(&aws, &stream, 4).await;
    let a = TestWorker::start(settings(&app, &stream, "w0"), aws.clone(), None).await;
    wait_for(
        Duration::from_secs(20),
        "the first w0 to read 4 shards",
        || async {
            (a.state.leases().len() == 4 && a.state.not_ready_reasons().is_empty()).then_some(())
        },
    )
    .await;

    let b = TestWorker::start(settings(&app, &stream, "w0"), aws.clone(), None).await;
    assert_ne!(a.state.instance, b.state.instance);
    let until = tokio::time::Instant::now() + FAILOVER * 3;
    let mut reason = None;
    while tokio::time::Instant::now() < until {
        assert!(!b.state.may_process(), "the duplicate may process records");
        assert!(b.state.leases().is_empty(), "the duplicate reads shards");
        assert!(!b.is_coordinator(), "the duplicate coordinates");
        assert!(
            !b.state.not_ready_reasons().is_empty(),
            "the duplicate is ready"
        );
        // (The first may fence itself for a moment when DynamoDB is slow; it is never
        // displaced by the second while it renews.)
        assert!(a.state.leases().len() <= 4);
        assert_eq!(a.state.instance_conflict(), None, "the first was displaced");
        if let Some(r) = b
            .state
            .not_ready_reasons()
            .into_iter()
            .find(|r| r.contains(&a.state.instance))
        {
            reason = Some(r);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("duplicate's /ready reason: {reason:?}");
    assert!(reason.is_some(), "no reason names the other instance");
    assert!(
        b.state
            .metrics
            .encode()
            .contains("kds_worker_id_conflict 1")
    );

    // kill -9 of the first: the second takes over after about the failover timeout.
    wait_for(
        Duration::from_secs(10),
        "the first w0 to read its 4 shards",
        || async { (a.state.leases().len() == 4).then_some(()) },
    )
    .await;
    let a_instance = a.state.instance.clone();
    a.crash().await;
    let (_, took) = wait_for(FAILOVER * 4, "the second w0 to read 4 shards", || async {
        (b.state.leases().len() == 4).then_some(())
    })
    .await;
    eprintln!("second instance took over {took:?} after the crash (failover_timeout {FAILOVER:?})");
    assert!(
        took >= FAILOVER - HEARTBEAT,
        "took over after only {took:?}"
    );
    assert!(took <= FAILOVER * 3, "took over after {took:?}");
    assert_eq!(b.state.instance_conflict(), None);
    let row = meta(&aws, &app)
        .read_heartbeat("w0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.instance.as_deref(), Some(b.state.instance.as_str()));
    assert_ne!(row.instance.as_deref(), Some(a_instance.as_str()));
    wait_for(FAILOVER * 3, "the second w0 to coordinate", || async {
        b.is_coordinator().then_some(())
    })
    .await;

    // A third one waits for the second; a graceful stop lets it start at once.
    let c = TestWorker::start(settings(&app, &stream, "w0"), aws.clone(), None).await;
    wait_for(
        Duration::from_secs(5),
        "the third to see the second",
        || async {
            (c.state.instance_conflict().as_deref() == Some(b.state.instance.as_str()))
                .then_some(())
        },
    )
    .await;
    let stopping = tokio::time::Instant::now();
    b.shutdown().await;
    let stopped = tokio::time::Instant::now();
    wait_for(FAILOVER * 2, "the third w0 to read 4 shards", || async {
        (c.state.leases().len() == 4).then_some(())
    })
    .await;
    eprintln!(
        "after a graceful stop ({:?}) the next instance read its shards after {:?}",
        stopped - stopping,
        stopped.elapsed()
    );
    assert!(
        stopped.elapsed() < FAILOVER,
        "graceful hand-over took {:?}",
        stopped.elapsed()
    );
    c.shutdown().await;
}

/// A heartbeat row deleted while its worker lives (by an operator, or by a coordinator that
/// judged the worker dead) comes back with a counter above every one it had, so an observer
/// that saw the old row takes the new one as progress, never as the old counter standing
/// still (a follower's one read of the heartbeats before it coordinates relies on this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_heartbeat_row_comes_back_with_a_counter_never_seen() {
    let aws = aws().await;
    let (app, stream) = (unique("hbagain"), unique("hbagain"));
    create_stream(&aws, &stream, 1).await;
    let w = TestWorker::start(settings(&app, &stream, "w0"), aws.clone(), None).await;
    let store = meta(&aws, &app);
    // Deleted as the coordinator deletes a dead worker's row: conditional on the counter
    // read, so it is read again until no heartbeat lands in between.
    let (deleted, _) = wait_for(
        Duration::from_secs(20),
        "w0's row at counter 3 or more, deleted",
        || async {
            let row = store.read_heartbeat("w0").await.ok().flatten()?;
            if row.counter < 3 {
                return None;
            }
            store
                .delete_dead_heartbeat("w0", row.counter, row.instance.as_deref())
                .await
                .ok()
                .map(|()| row)
        },
    )
    .await;
    let (again, _) = wait_for(
        Duration::from_secs(20),
        "w0's row written again",
        || async { store.read_heartbeat("w0").await.ok().flatten() },
    )
    .await;
    assert_eq!(
        again.instance, deleted.instance,
        "the same process wrote it"
    );
    assert!(
        again.counter > deleted.counter,
        "counter {} after the delete, {} before: an observer would see the old counter standing still",
        again.counter,
        deleted.counter
    );
    w.shutdown().await;
}

/// A heartbeat write that reaches DynamoDB after a later one (it timed out here, but was
/// applied late) is refused: the row's counter never goes back to a value an observer may
/// have seen, which would look like the worker standing still since then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_heartbeat_write_never_takes_the_counter_back() {
    let aws = aws().await;
    let app = unique("hblate");
    kds_worker::schema::ensure_tables(&aws, &app, &format!("{app}_meta"))
        .await
        .unwrap();
    let store = meta(&aws, &app);
    let me = kds_worker::meta::HeartbeatOwner {
        worker_id: "w0".into(),
        instance: "instance-a".into(),
        failover: FAILOVER,
    };
    let ttl = Duration::from_secs(3600);
    assert_eq!(store.heartbeat(&me, 4, 0, ttl, None).await.unwrap(), 4);
    assert_eq!(store.heartbeat(&me, 5, 0, ttl, None).await.unwrap(), 5);
    let late = store.heartbeat(&me, 3, 0, ttl, None).await.unwrap_err();
    assert!(late.is_condition_failed(), "{late}");
    // The same number applied twice (a retry of a write that landed) is refused too.
    let again = store.heartbeat(&me, 5, 0, ttl, None).await.unwrap_err();
    assert!(again.is_condition_failed(), "{again}");
    let row = store.read_heartbeat("w0").await.unwrap().unwrap();
    assert_eq!(row.counter, 5);
    // Another process's row is still refused whatever the number (it is not this one's).
    let other = kds_worker::meta::HeartbeatOwner {
        instance: "instance-b".into(),
        ..me
    };
    let refused = store.heartbeat(&other, 99, 0, ttl, None).await.unwrap_err();
    assert!(refused.is_condition_failed(), "{refused}");
}
