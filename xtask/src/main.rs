//! `cargo xtask …`: the KDS Lease Lab driver and the project's test command.
//!
//! Plain Rust instead of shell scripts; one module per command. Commands that drive external
//! tools take `--dry-run` to print the commands instead.

mod bench;
mod chaos;
mod cleanup;
mod config_file;
mod doctor;
mod driver;
mod e2e;
mod emulators;
mod kube;
mod lab;
mod local;
mod measure;
mod monitor;
mod nix;
mod nixpins;
mod preflight;
mod process;
mod runner;
mod scenario;
mod setup;
mod state;
mod test;
#[cfg(test)]
mod tidy;
mod util;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::driver::open_driver;
use crate::runner::Runner;
use crate::scenario::ScenarioCmd;
use crate::state::{DriverKind, require_lab};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "KDS Lease Lab: drive the lab and run the project's tests"
)]
struct Cli {
    /// Print the external commands instead of running them.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Which tools are present (with versions), which are missing, how to get them.
    Doctor,
    /// Create the lab: cluster (minikube), image, LocalStack, stream and tables, workers; then
    /// check phase 1 (30 shards / 3 workers -> limit 10, every shard leased). Safe to re-run.
    Setup {
        /// minikube (default), cluster (current kube context) or local (no cluster, no Docker).
        #[arg(long, value_enum)]
        driver: Option<DriverKind>,
        #[arg(long, default_value = "30")]
        shards: String,
        #[arg(long, default_value = "3")]
        workers: String,
    },
    /// Run a scenario of lab/scenarios.toml and check its expectation.
    Scenario {
        #[command(subcommand)]
        which: ScenarioCmd,
        /// Also write the results as JSON.
        #[arg(long, global = true, value_name = "PATH")]
        report: Option<PathBuf>,
    },
    /// Live dashboard: lease_limits and its inputs, the coordinator, each worker's leases.
    Monitor {
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Print the dashboard once as text and exit.
        #[arg(long)]
        once: bool,
    },
    /// The lab's state once.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Worker logs.
    Logs {
        #[arg(short, long)]
        follow: bool,
        /// Only worker N (kds-consumer-N).
        #[arg(long)]
        worker: Option<u32>,
    },
    /// Put records into the stream so consumption shows in /status and /metrics.
    Produce {
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Remove the lab. --all also deletes the minikube profile (local: the installed emulators).
    Cleanup {
        #[arg(long)]
        all: bool,
    },
    /// The project's test command: emulators, fmt, clippy, every test.
    Test(test::Args),
    /// Run the pinned emulators in the foreground, printing AWS_ENDPOINT_URL_* to use.
    Emulators,
    /// Random kills, freezes, restarts, reshards and scaling against a local lab under load,
    /// judged from the records processed: overlapping reads, lost and duplicated records.
    Chaos(chaos::Args),
    /// Measure the release worker against the emulators (binary size, start to ready, RSS,
    /// API calls per minute, DynamoDB writes at 300 shards, records/s) as Markdown.
    Measure(measure::Args),
    /// This worker beside the peer libraries (lifion-kinesis, async-kinesis) on the same
    /// emulators and script: coverage, failover, exactness, DynamoDB and Kinesis cost, CPU and
    /// memory. Writes bench/results.json, bench/REPORT.md and three SVG plots.
    Bench(bench::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let dry = cli.dry_run;
    match cli.command {
        Command::Test(args) => test::run(args),
        Command::Emulators => emulators::foreground(),
        Command::Measure(args) => measure::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Chaos(args) => chaos::run(args),
        Command::Doctor => doctor::run(),
        Command::Setup {
            driver,
            shards,
            workers,
        } => setup::run(driver, &shards, &workers, dry),
        Command::Scenario { which, report } => scenario::run(which, report, dry),
        Command::Monitor { interval, once } => {
            let state = require_lab()?;
            let d = open_driver(state.driver, Runner::new(dry)?)?;
            if once {
                print!(
                    "{}",
                    monitor::text(&monitor::gather(d.as_ref(), lab::STATUS_READ_DEADLINE)?)
                );
                Ok(())
            } else {
                monitor::live(d.as_ref(), interval)
            }
        }
        Command::Status { json } => {
            let state = require_lab()?;
            let d = open_driver(state.driver, Runner::new(dry)?)?;
            let view = monitor::gather(d.as_ref(), lab::STATUS_READ_DEADLINE)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", monitor::text(&view));
            }
            Ok(())
        }
        Command::Logs { follow, worker } => {
            let state = require_lab()?;
            open_driver(state.driver, Runner::new(dry)?)?.logs(follow, worker)
        }
        Command::Produce { rate, seconds } => {
            let state = require_lab()?;
            open_driver(state.driver, Runner::new(dry)?)?.produce(rate, seconds)
        }
        Command::Cleanup { all } => cleanup::run(all, dry),
    }
}
