//! The systems the bench runs: how each is installed, prepared, started as one consumer
//! process, and how its DynamoDB requests are sorted into lease, heartbeat, checkpoint and
//! coordination work. The peers are pinned in lab/bench/peers.toml and installed into
//! `.lab/tools/bench/`; their adapters live in lab/bench/.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use xshell::{Shell, cmd};

use super::proxy::Call;
use crate::emulators::Emulators;
use crate::process::Launch;
use crate::util::{project_root, tools_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// This worker at its defaults (heartbeat 2 s, failover 10 s).
    Worker,
    /// This worker at lifion-kinesis' failure timeout: a consumer is dropped after 40 s
    /// without a heartbeat. lifion heartbeats every 20 s; this worker needs at least four
    /// heartbeats per failover timeout, so it heartbeats every 10 s.
    WorkerLifionTimings,
    /// This worker at async-kinesis' timings: heartbeat 15 s, session (failover) 60 s.
    WorkerAsyncKinesisTimings,
    /// The naive design: this worker doing also what every worker does without a
    /// coordinator — polling `DescribeStreamSummary` and renewing each of its leases every
    /// failover/3 (`kds-swarm --naive --reading 1`, one consumer per process).
    Naive,
    Lifion,
    AsyncKinesis,
}

#[derive(Deserialize)]
struct Pins {
    lifion: Pin,
    async_kinesis: Pin,
}

#[derive(Deserialize)]
struct Pin {
    #[serde(alias = "npm_package", alias = "pip_package")]
    package: String,
    version: String,
}

fn pins() -> anyhow::Result<Pins> {
    let path = project_root().join("lab/bench/peers.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn bench_tools() -> PathBuf {
    tools_dir().join("bench")
}

fn venv_python() -> PathBuf {
    bench_tools().join("venv-async-kinesis/bin/python")
}

impl System {
    pub const ALL: [System; 6] = [
        System::Worker,
        System::WorkerLifionTimings,
        System::WorkerAsyncKinesisTimings,
        System::Naive,
        System::Lifion,
        System::AsyncKinesis,
    ];

    /// The heartbeat interval and failover timeout a worker row runs with, if not the defaults.
    pub fn worker_timings(self) -> Option<(Duration, Duration)> {
        match self {
            System::WorkerLifionTimings => Some((Duration::from_secs(10), Duration::from_secs(40))),
            System::WorkerAsyncKinesisTimings => {
                Some((Duration::from_secs(15), Duration::from_secs(60)))
            }
            _ => None,
        }
    }

    /// The kill phase lasts at least this long: a worker row at a peer's timings gets its
    /// failover timeout, two heartbeats and 10 s to take the leases and read again.
    pub fn min_kill_phase(self) -> Duration {
        self.worker_timings()
            .map_or(Duration::ZERO, |(heartbeat, failover)| {
                failover + heartbeat * 2 + Duration::from_secs(10)
            })
    }

    /// Serves `/ready` (this worker's rows run `kds-worker run`; naive runs `kds-swarm`).
    pub fn serves_ready(self) -> bool {
        matches!(
            self,
            System::Worker | System::WorkerLifionTimings | System::WorkerAsyncKinesisTimings
        )
    }

    /// Run by `--quick` (under 10 minutes): this worker at its defaults and the two peers.
    pub fn in_quick(self) -> bool {
        matches!(self, System::Worker | System::Lifion | System::AsyncKinesis)
    }

    pub fn parse(name: &str) -> anyhow::Result<System> {
        Ok(match name {
            "worker" => System::Worker,
            "worker-lifion-timings" => System::WorkerLifionTimings,
            "worker-async-kinesis-timings" => System::WorkerAsyncKinesisTimings,
            "naive" => System::Naive,
            "lifion" => System::Lifion,
            "async-kinesis" => System::AsyncKinesis,
            other => bail!(
                "unknown system {other:?}: choose from {}",
                System::ALL.map(System::name).join(", ")
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            System::Worker => "worker",
            System::WorkerLifionTimings => "worker-lifion-timings",
            System::WorkerAsyncKinesisTimings => "worker-async-kinesis-timings",
            System::Naive => "naive",
            System::Lifion => "lifion",
            System::AsyncKinesis => "async-kinesis",
        }
    }

    /// The version that ran.
    pub fn version(self) -> String {
        match self {
            System::Naive => format!("kds-worker {} (naive)", env!("CARGO_PKG_VERSION")),
            System::Worker | System::WorkerLifionTimings | System::WorkerAsyncKinesisTimings => {
                format!("kds-worker {}", env!("CARGO_PKG_VERSION"))
            }
            System::Lifion => pins()
                .map(|p| format!("{}@{}", p.lifion.package, p.lifion.version))
                .unwrap_or_default(),
            System::AsyncKinesis => pins()
                .map(|p| format!("{}=={}", p.async_kinesis.package, p.async_kinesis.version))
                .unwrap_or_default(),
        }
    }

    /// Installs the pinned peer if it is not there yet (npm, or pip into its own venv).
    pub fn install(self, sh: &Shell) -> anyhow::Result<()> {
        let pins = pins()?;
        let dir = bench_tools();
        std::fs::create_dir_all(&dir)?;
        match self {
            System::Lifion => {
                let spec = format!("{}@{}", pins.lifion.package, pins.lifion.version);
                let installed = dir.join("node_modules/lifion-kinesis/package.json");
                let have = std::fs::read_to_string(&installed).unwrap_or_default();
                if !have.contains(&format!("\"version\": \"{}\"", pins.lifion.version)) {
                    eprintln!("installing {spec} into {}", dir.display());
                    let _d = sh.push_dir(&dir);
                    cmd!(sh, "npm install --no-audit --no-fund --silent {spec}")
                        .run()
                        .with_context(|| format!("npm install {spec}"))?;
                }
            }
            System::AsyncKinesis => {
                let spec = format!(
                    "{}=={}",
                    pins.async_kinesis.package, pins.async_kinesis.version
                );
                let python = venv_python();
                let have = python.is_file()
                    && cmd!(sh, "{python} -m pip show async-kinesis")
                        .quiet()
                        .ignore_stderr()
                        .read()
                        .is_ok_and(|o| {
                            o.contains(&format!("Version: {}", pins.async_kinesis.version))
                        });
                if !have {
                    eprintln!("installing {spec} into its own virtualenv");
                    let venv = dir.join("venv-async-kinesis");
                    cmd!(sh, "python3 -m venv {venv}").run()?;
                    cmd!(sh, "{python} -m pip install --quiet {spec}")
                        .run()
                        .with_context(|| format!("pip install {spec}"))?;
                }
            }
            // This worker's rows: built by the bench.
            _ => {}
        }
        Ok(())
    }

    /// Set-up before the consumers start, straight to the emulators (not counted).
    pub fn prepare(self, emu: &Emulators, app: &str, stream: &str) -> anyhow::Result<()> {
        if self == System::Lifion {
            // Three consumers creating lifion's table at once on moto lose its state item:
            // the adapter creates it first, alone.
            let handle = self
                .launch(
                    "setup",
                    Path::new("/dev/null"),
                    &emu.kinesis_url(),
                    &emu.dynamodb_url(),
                    app,
                    stream,
                )
                .env("BENCH_CREATE_TABLE_ONLY", "1")
                .start()?;
            if !handle.wait()?.status.success() {
                bail!("creating lifion-kinesis' table failed");
            }
        }
        Ok(())
    }

    /// One consumer process named `name`, writing what it receives to `record_log`.
    pub fn launch(
        self,
        name: &str,
        record_log: &Path,
        kinesis_url: &str,
        dynamodb_url: &str,
        app: &str,
        stream: &str,
    ) -> Launch {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                !k.starts_with("KDS_") && !k.starts_with("AWS_") && !k.starts_with("BENCH_")
            })
            .chain(
                crate::emulators::aws_env(kinesis_url, dynamodb_url)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v)),
            )
            .collect();
        let adapter = |file: &str| project_root().join("lab/bench").join(file);
        let peer = |l: Launch| {
            l.full_env(env.clone())
                .env("BENCH_WORKER", name)
                .env("BENCH_RECORD_LOG", record_log.display().to_string())
                .env("BENCH_KINESIS_URL", kinesis_url)
                .env("BENCH_DYNAMODB_URL", dynamodb_url)
                .env("BENCH_APP", app)
                .env("BENCH_STREAM", stream)
                .env("BENCH_TABLE", format!("{app}-lifion-state"))
        };
        match self {
            System::Lifion => peer(Launch::new(
                "node",
                [adapter("lifion_consumer.js").into_os_string()],
            ))
            .env(
                "NODE_PATH",
                bench_tools().join("node_modules").display().to_string(),
            ),
            System::AsyncKinesis => peer(Launch::new(
                venv_python(),
                [adapter("async_kinesis_consumer.py").into_os_string()],
            )),
            // This worker's rows.
            _ => {
                let (program, args) = if self == System::Naive {
                    (super::swarm_bin(), vec!["--naive", "--reading", "1"])
                } else {
                    (super::worker_bin(), vec![])
                };
                let mut l = Launch::new(program, args)
                    .full_env(env)
                    .env("KDS_APP_NAME", app)
                    .env("KDS_STREAM_NAME", stream)
                    .env("KDS_WORKER_ID", name)
                    .env("KDS_HTTP_ADDR", "127.0.0.1:0")
                    .env("KDS_WORKER_COUNT_SOURCE", "heartbeats")
                    .env("KDS_RECORD_LOG", record_log.display().to_string())
                    .env("KDS_LOG_FORMAT", "json");
                if let Some((heartbeat, failover)) = self.worker_timings() {
                    l = l
                        .env(
                            "KDS_HEARTBEAT_INTERVAL",
                            format!("{}s", heartbeat.as_secs()),
                        )
                        .env("KDS_FAILOVER_TIMEOUT", format!("{}s", failover.as_secs()));
                }
                l
            }
        }
    }

    /// What a DynamoDB request of this system is for.
    pub fn category(self, call: &Call, app: &str) -> &'static str {
        let body = call.body.as_str();
        match self {
            System::Lifion => {
                if body.contains("checkpoint") {
                    "checkpoint"
                } else if body.contains("heartbeat") || body.contains("\"consumers\"") {
                    "heartbeat"
                } else {
                    "lease"
                }
            }
            System::AsyncKinesis => {
                if body.contains("sequence") && call.operation == "UpdateItem" {
                    "checkpoint"
                } else if call.operation == "UpdateItem" {
                    "heartbeat"
                } else {
                    "lease"
                }
            }
            // This worker's rows (the naive one's extra lease renewals count as lease work).
            _ => {
                let meta = format!("{app}_meta");
                match call.table.as_deref() {
                    Some(t) if t == meta && body.contains("worker#") => "heartbeat",
                    Some(t) if t == meta && call.operation == "Scan" => "heartbeat",
                    Some(t) if t == meta => "coordination",
                    _ if body.contains("checkpoint = :cp") => "checkpoint",
                    _ => "lease",
                }
            }
        }
    }
}
