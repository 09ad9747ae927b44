//! `kds-worker` binary: wires configuration, telemetry, AWS, the worker loops and HTTP.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kds_worker::aws::AwsClients;
use kds_worker::config::{ConfigFile, Settings, Surroundings, WorkerCountSource, describe_file};
use kds_worker::metrics::Metrics;
use kds_worker::worker::Worker;
use kds_worker::{http, schema, telemetry};
use tokio_util::sync::CancellationToken;

/// Exit code for configuration mistakes (before any AWS call).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "kds-worker",
    version,
    about = "Kinesis consumer worker with a coordinator-published lease limit",
    long_about = "Kinesis consumer worker. One worker is elected coordinator through DynamoDB \
conditional writes; it publishes max_leases_per_worker = min(cap, ceil(open_shards / workers)) \
in <app_name>_meta and every worker obeys it.\n\nConfiguration: built-in defaults < TOML file \
(--config) < KDS_* environment variables. AWS region, credentials and endpoints come from the \
standard AWS settings (AWS_REGION, AWS_ENDPOINT_URL, ...)."
)]
struct Cli {
    /// TOML configuration file (the mounted ConfigMap). A missing default file is ignored;
    /// a file named here must exist.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "KDS_CONFIG_FILE",
        hide_env = true
    )]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker (the default).
    Run,
    /// Print the effective configuration and where each value came from.
    Config {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Operator commands used by the lab (`cargo xtask`).
    #[command(subcommand)]
    Admin(Admin),
    /// Create the stream (if missing) and both tables, then exit. Idempotent.
    Init {
        /// Shard count of a newly created stream (an existing stream is left as it is).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10000))]
        shards: u32,
    },
}

#[derive(Subcommand)]
enum Admin {
    /// Print the fleet's state: stream, lease_limits, coordinator, heartbeats, leases.
    Snapshot {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print every lease's checkpoint as JSON (shard id → checkpoint).
    Checkpoints,
    /// Reshard to N open shards stepwise (at most x2 or /2 per call), waiting for ACTIVE.
    Reshard {
        #[arg(value_parser = clap::value_parser!(u64).range(1..=10000))]
        shards: u64,
    },
    /// Put records: RATE per second for SECONDS (0: until Ctrl-C).
    Produce {
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100000))]
        rate: u64,
        /// Seconds to run; 0: until stopped.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// `rate` records per second to each open shard (explicit hash keys, the shard list
        /// read again every 5 s), instead of `rate` in all spread by partition key.
        #[arg(long)]
        each_shard: bool,
        /// Append the data of every accepted record to this file (one per line).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check record logs (the `record_log` setting) against a producer's log: records lost,
    /// processed twice, and read by two workers at once.
    Audit {
        /// The producer's log (`admin produce --out`).
        #[arg(long)]
        produced: PathBuf,
        /// Every worker's record log.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The config file path may come from KDS_CONFIG_FILE; it is not a configuration key.
    // SAFETY: single-threaded here, before the runtime starts.
    unsafe { std::env::remove_var("KDS_CONFIG_FILE") };
    let file = ConfigFile::from_arg(cli.config);
    let (settings, provenance) = match Settings::load(&file, &Surroundings::detect()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("kds-worker: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Config { json } = command {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&provenance).expect("serialisable")
            );
        } else {
            println!("# config file: {}", describe_file(&file));
            let width = provenance.iter().map(|p| p.key.len()).max().unwrap_or(0);
            for p in &provenance {
                println!("{:width$} = {:<28} # {}", p.key, p.value, p.source);
            }
            println!("# AWS settings (standard SDK variables; secrets redacted):");
            for (var, value) in aws_settings() {
                println!("#   {var} = {value}");
            }
        }
        return ExitCode::SUCCESS;
    }
    telemetry::init(settings.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        match command {
            Command::Init { shards } => init(settings, shards).await,
            Command::Admin(cmd) => admin(settings, cmd).await,
            _ => run(settings).await,
        }
    })
}

/// The AWS SDK settings from the environment, secrets shown only as "set (redacted)".
fn aws_settings() -> Vec<(&'static str, String)> {
    const SECRET: &[&str] = &["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"];
    [
        "AWS_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_KINESIS",
        "AWS_ENDPOINT_URL_DYNAMODB",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ]
    .into_iter()
    .filter_map(|var| {
        let value = std::env::var(var).ok()?;
        Some((
            var,
            if SECRET.contains(&var) {
                "set (redacted)".to_owned()
            } else {
                value
            },
        ))
    })
    .collect()
}

/// `admin audit`: reads the logs, prints the report (JSON or text). Needs no AWS.
fn audit(produced: &std::path::Path, logs: &[PathBuf], json: bool) -> ExitCode {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let result = read(produced).and_then(|produced| {
        let texts = logs
            .iter()
            .map(|p| read(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((produced, texts))
    });
    let (produced, texts) = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("kds-worker admin audit: {e}");
            return ExitCode::FAILURE;
        }
    };
    let produced = produced.lines().map(str::to_owned).collect();
    let events = kds_worker::audit::merge_record_logs(&texts);
    let report = kds_worker::audit::check(&events, &produced);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("serialisable")
        );
    } else {
        println!("{report}");
    }
    ExitCode::SUCCESS
}

async fn admin(settings: Settings, cmd: Admin) -> ExitCode {
    if let Admin::Audit {
        produced,
        logs,
        json,
    } = &cmd
    {
        return audit(produced, logs, *json);
    }
    let aws = AwsClients::from_env(Metrics::new()).await;
    let stream = settings.stream_name.clone();
    let result = match cmd {
        Admin::Checkpoints => {
            let store = kds_worker::leases::LeaseStore::new(aws.clone(), settings.lease_table());
            store.scan().await.map(|leases| {
                let map: std::collections::BTreeMap<String, String> = leases
                    .into_iter()
                    .map(|l| (l.shard_id, l.checkpoint))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&map).expect("serialisable")
                );
            })
        }
        Admin::Snapshot { json } => {
            kds_worker::admin::snapshot(&aws, &settings)
                .await
                .map(|snap| {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&snap).expect("serialisable")
                        );
                    } else {
                        print!("{snap}");
                    }
                })
        }
        Admin::Reshard { shards } => {
            kds_worker::admin::reshard(&aws, &stream, shards, |from, to| {
                eprintln!("UpdateShardCount {from} -> {to}; waiting for ACTIVE");
            })
            .await
        }
        Admin::Audit { .. } => unreachable!("answered above"),
        Admin::Produce {
            rate,
            seconds,
            each_shard,
            out,
        } => kds_worker::admin::produce(&aws, &stream, rate, seconds, each_shard, out.as_deref())
            .await
            .map(|n| eprintln!("put {n} records into {stream}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A missing stream or table has its own exit code, so a script can tell "create the
        // stream first" from "AWS is down".
        Err(e @ kds_worker::aws::AwsError::NotFound { .. }) => {
            eprintln!(
                "kds-worker admin: {e} (stream {stream:?}, tables {:?} and {:?}: `kds-worker init --shards N` creates them)",
                settings.lease_table(),
                settings.meta_table()
            );
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("kds-worker admin: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn init(settings: Settings, shards: u32) -> ExitCode {
    let aws = AwsClients::from_env(Metrics::new()).await;
    let open = match schema::ensure_stream(&aws, &settings.stream_name, shards).await {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, stream = %settings.stream_name, "cannot create the stream");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) =
        schema::ensure_tables(&aws, &settings.lease_table(), &settings.meta_table()).await
    {
        tracing::error!(error = %e, "cannot create the tables");
        return ExitCode::FAILURE;
    }
    tracing::info!(
        stream = %settings.stream_name,
        open_shards = open,
        lease_table = %settings.lease_table(),
        meta_table = %settings.meta_table(),
        "initialised"
    );
    ExitCode::SUCCESS
}

async fn run(settings: Settings) -> ExitCode {
    let kube = match settings.worker_count_source {
        WorkerCountSource::Heartbeats => None,
        WorkerCountSource::Kubernetes => match kube::Client::try_default().await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!(
                    "kds-worker: invalid configuration: worker_count_source = \"kubernetes\" but no \
                     Kubernetes API is configured ({e}): run in a pod or set KDS_WORKER_COUNT_SOURCE=heartbeats"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let listener = match tokio::net::TcpListener::bind(settings.http_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "kds-worker: invalid configuration: http_addr = {:?}: cannot listen: {e}",
                settings.http_addr.to_string()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing::info!(
        worker_id = %settings.worker_id,
        stream = %settings.stream_name,
        app_name = %settings.app_name,
        http_addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "starting"
    );
    let aws = AwsClients::from_env(Metrics::new()).await;
    let record_log = match &settings.record_log {
        Some(path) => match kds_worker::audit::RecordLog::open(path) {
            Ok(log) => Some(Arc::new(log)),
            Err(e) => {
                eprintln!(
                    "kds-worker: invalid configuration: record_log = {:?}: cannot append to it: {e}",
                    path.display().to_string()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    let mut worker = Worker::new(settings, aws, kube);
    if let Some(log) = record_log {
        worker = worker.with_processor(log);
    }
    // Serve /health, /ready and /metrics from the start: a worker waiting for its stream
    // says so on /ready instead of being invisible.
    let stop = CancellationToken::new();
    tokio::spawn(shutdown_signal(stop.clone()));
    let server = tokio::spawn(http::serve(listener, worker.state(), stop.clone()));
    match worker.wait_to_start(&stop).await {
        Ok(true) => worker.run(stop.clone()).await,
        Ok(false) => tracing::info!("stopped before starting"),
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("kds-worker: {e}");
            stop.cancel();
            let _ = server.await;
            return ExitCode::FAILURE;
        }
    }
    let _ = server.await;
    ExitCode::SUCCESS
}

/// Cancels `stop` on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal(stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    stop.cancel();
}
