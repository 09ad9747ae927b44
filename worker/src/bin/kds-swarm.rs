//! `kds-swarm N`: N workers in one process, for `cargo xtask bench --swarm`. Each is a full
//! [`Worker`] (election, heartbeats, leases, its own AWS clients and metrics) built not to
//! poll: its consumers read a shard until it is caught up (the swarm's streams get no
//! records), finish closed parents, then hold their leases and wait, so what the swarm costs
//! is the lease protocol alone. Configured like `kds-worker` (the same file and `KDS_*` variables); worker
//! `i` is `{worker_id}-{i}`.
//!
//! `kds-swarm --naive N`: each worker also does what it would without a coordinator — the
//! design the original scripts describe: it polls `DescribeStreamSummary` itself every
//! `shard_poll_interval`, and renews each lease it holds KCL-style every `failover_timeout / 3`
//! (one conditional UpdateItem per lease, on an attribute nothing else reads). Ownership still
//! follows this worker's protocol; the mode measures what the coordinator saves.
//!
//! `kds-swarm --reading N`: the workers read like `kds-worker run`; with `record_log` set,
//! every record goes to that one log (each line names its worker). The bench runs the naive
//! design this way as one consumer process (`--naive --reading 1`). A swarm of one keeps
//! `worker_id` as it is.
//!
//! Input, one command per line: `stop I` stops worker `I` gracefully (it hands its leases off,
//! as on SIGTERM); `quit` stops all and exits. A closed stdin ends the commands, not the swarm:
//! SIGTERM or SIGINT stop all workers gracefully and exit, as `quit` does. Output, one JSON
//! line a second: `{"held": [leases of each running worker], "limit": published
//! max_leases_per_worker}`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use kds_worker::aws::AwsClients;
use kds_worker::config::{ConfigFile, Settings, Surroundings};
use kds_worker::metrics::Metrics;
use kds_worker::state::WorkerState;
use kds_worker::worker::Worker;
use tokio_util::sync::CancellationToken;

struct Member {
    state: Arc<WorkerState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let naive = args.iter().any(|a| a == "--naive");
    let reading = args.iter().any(|a| a == "--reading");
    let unknown = args
        .iter()
        .find(|a| a.starts_with("--") && !["--naive", "--reading"].contains(&a.as_str()));
    let count = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .and_then(|n| n.parse::<usize>().ok());
    let (None, Some(count)) = (unknown, count) else {
        eprintln!("usage: kds-swarm [--naive] [--reading] WORKERS (configured like kds-worker)");
        return ExitCode::from(2);
    };
    let (base, _) = match Settings::load(&ConfigFile::from_arg(None), &Surroundings::detect()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("kds-swarm: {e}");
            return ExitCode::from(2);
        }
    };
    kds_worker::telemetry::init(base.log_format);
    let record_log = match (&base.record_log, reading) {
        (Some(path), true) => match kds_worker::audit::RecordLog::open(path) {
            Ok(log) => Some(Arc::new(log)),
            Err(e) => {
                eprintln!(
                    "kds-swarm: invalid configuration: record_log = {:?}: cannot append to it: {e}",
                    path.display().to_string()
                );
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let mut members: Vec<Option<Member>> = Vec::new();
    for i in 0..count {
        let mut settings = base.clone();
        if count > 1 {
            settings.worker_id = format!("{}-{i}", base.worker_id);
        }
        let aws = AwsClients::from_env(Metrics::new()).await;
        let worker = Worker::new(settings, aws, None);
        let worker = match (&record_log, reading) {
            (Some(log), _) => worker.with_processor(log.clone()),
            (None, true) => worker,
            (None, false) => worker.without_reading(),
        };
        let state = worker.state();
        let stop = CancellationToken::new();
        if naive {
            let aws = AwsClients::from_env(Metrics::new()).await;
            tokio::spawn(naive_duties(aws, state.clone(), stop.clone()));
        }
        let run_stop = stop.clone();
        let task = tokio::spawn(async move {
            match worker.wait_to_start(&run_stop).await {
                Ok(true) => worker.run(run_stop).await,
                Ok(false) => {}
                Err(e) => eprintln!("kds-swarm: cannot start: {e}"),
            }
        });
        members.push(Some(Member { state, stop, task }));
    }
    // Commands from stdin, read on a thread (no async stdin needed).
    let (tx, mut input) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut input_open = true;
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        eprintln!("kds-swarm: cannot listen for SIGTERM");
        return ExitCode::FAILURE;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            line = input.recv(), if input_open => {
                let Some(line) = line else {
                    input_open = false;
                    continue;
                };
                let mut words = line.split_whitespace();
                match (words.next(), words.next().and_then(|i| i.parse::<usize>().ok())) {
                    (Some("stop"), Some(i)) => {
                        if let Some(m) = members.get_mut(i).and_then(Option::take) {
                            m.stop.cancel();
                            let _ = m.task.await;
                        }
                    }
                    (Some("quit"), _) => break,
                    _ => eprintln!("kds-swarm: unknown command {line:?}"),
                }
            }
            _ = tick.tick() => {
                let running: Vec<&Member> = members.iter().flatten().collect();
                let held: Vec<u64> = running.iter().map(|m| m.state.leases_held()).collect();
                let limit = running
                    .iter()
                    .filter_map(|m| m.state.limit())
                    .map(|l| l.max_leases_per_worker)
                    .max();
                println!("{}", serde_json::json!({ "held": held, "limit": limit }));
            }
        }
    }
    for m in members.iter().flatten() {
        m.stop.cancel();
    }
    for m in members.into_iter().flatten() {
        let _ = m.task.await;
    }
    ExitCode::SUCCESS
}

/// What every worker does in the naive design (see the module comment), until `stop`.
async fn naive_duties(aws: AwsClients, state: Arc<WorkerState>, stop: CancellationToken) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let s = state.settings.clone();
    let mut poll = tokio::time::interval(s.shard_poll_interval);
    let mut renew = tokio::time::interval(s.failover_timeout / 3);
    let mut renewals: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = poll.tick() => {
                let _ = kds_worker::inputs::open_shard_count(&aws, &s.stream_name).await;
            }
            _ = renew.tick() => {
                for shard in state.leases() {
                    renewals += 1;
                    let _ = aws
                        .dynamodb
                        .update_item()
                        .table_name(s.lease_table())
                        .key(kds_worker::schema::LEASE_KEY, AttributeValue::S(shard))
                        .update_expression("SET naiveRenewals = :n")
                        .condition_expression("leaseOwner = :me")
                        .expression_attribute_values(":n", AttributeValue::N(renewals.to_string()))
                        .expression_attribute_values(":me", AttributeValue::S(s.worker_id.clone()))
                        .send()
                        .await;
                }
            }
        }
    }
}
