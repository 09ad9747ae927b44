//! `cargo xtask …`: the KDS Lease Lab driver and the project's test command.
//!
//! Plain Rust instead of shell scripts; one module per command. Commands that drive external
//! tools take `--dry-run` to print the commands instead.

mod chaos;
mod config_file;
mod doctor;
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
mod runner;
mod scenario;
mod state;
mod test;
#[cfg(test)]
mod tidy;
mod util;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::lab::Driver;
use crate::runner::Runner;
use crate::scenario::{MAX_WORKERS, parse_count, parse_shards};
use crate::state::{DriverKind, load_state, require_lab};

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
}

#[derive(Subcommand)]
enum ScenarioCmd {
    /// Reshard to N shards (default 60), stepwise.
    ScaleShards {
        #[arg(allow_negative_numbers = true)]
        shards: Option<String>,
    },
    /// Scale to N workers (default 5) at 30 shards.
    ScaleWorkers {
        #[arg(allow_negative_numbers = true)]
        workers: Option<String>,
    },
    /// 300 shards / 3 workers: the cap binds, deficit 60.
    LeaseCap,
    /// Delete every worker at once.
    RestartAll,
    /// Change the cap (default 100) in the ConfigMap and roll the workers.
    ConfigChange {
        #[arg(allow_negative_numbers = true)]
        cap: Option<String>,
    },
    /// Every scenario in order (from a fresh setup) and the table of results.
    All,
    /// Any scenario of lab/scenarios.toml by name.
    Run { name: String },
    /// List the catalog.
    List,
}

/// The driver a lab was (or is being) set up with.
fn open_driver(kind: DriverKind, runner: Runner) -> anyhow::Result<Box<dyn Driver>> {
    Ok(match kind {
        DriverKind::Local => Box::new(crate::local::Local::open(runner)?),
        DriverKind::Minikube => Box::new(crate::kube::Kube::new(runner, true)),
        DriverKind::Cluster => Box::new(crate::kube::Kube::new(runner, false)),
    })
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
        Command::Chaos(args) => chaos::run(args),
        Command::Doctor => doctor::run(),
        Command::Setup {
            driver,
            shards,
            workers,
        } => {
            let shards = parse_shards("--shards", &shards)?;
            let workers = parse_count("--workers", &workers, MAX_WORKERS)?;
            let remembered = load_state()?.map(|s| s.driver);
            let kind = driver.or(remembered).unwrap_or(DriverKind::Minikube);
            if let (Some(old), Some(new)) = (remembered, driver)
                && old != new
            {
                bail!(
                    "a {old:?} lab is set up here; run `cargo xtask cleanup` before setting up a {new:?} one"
                );
            }
            // Everything the driver needs is checked before anything is changed or recorded.
            if !dry
                && let Some(refusal) =
                    preflight::refusal(kind, &preflight::needs(kind, &preflight::Probe::run()))
            {
                bail!(refusal);
            }
            let mut d = open_driver(kind, Runner::new(dry)?)?;
            d.setup(shards as u32, workers as u32)?;
            if kind != DriverKind::Local {
                kube::wait_pods_ready(d.as_ref(), Duration::from_secs(600))?;
            }
            // Phase 1, checked like every scenario.
            let setup = scenario::catalog()?.get("setup")?;
            let check = scenario::Scenario {
                shards: Some(shards),
                workers: Some(workers),
                expect_limit: None,
                expect_deficit: None,
                ..setup
            };
            let outcome = scenario::run_one(d.as_mut(), &check)?;
            if !outcome.pass {
                bail!("phase 1 check failed: {}", outcome.detail);
            }
            Ok(())
        }
        Command::Scenario { which, report } => {
            let catalog = scenario::catalog()?;
            if let ScenarioCmd::List = which {
                for s in &catalog.scenario {
                    println!("{:<14} {}", s.name, s.description);
                }
                return Ok(());
            }
            // Bad numbers are refused before anything changes.
            let plan: Vec<scenario::Scenario> = match which {
                ScenarioCmd::ScaleShards { shards } => vec![
                    catalog
                        .get("scale-shards")?
                        .with_param(shards.map(|s| parse_shards("shards", &s)).transpose()?)?,
                ],
                ScenarioCmd::ScaleWorkers { workers } => vec![
                    catalog.get("scale-workers")?.with_param(
                        workers
                            .map(|s| parse_count("workers", &s, MAX_WORKERS))
                            .transpose()?,
                    )?,
                ],
                ScenarioCmd::ConfigChange { cap } => vec![
                    catalog
                        .get("config-change")?
                        .with_param(cap.map(|s| parse_count("cap", &s, 100_000)).transpose()?)?,
                ],
                ScenarioCmd::LeaseCap => vec![catalog.get("lease-cap")?],
                ScenarioCmd::RestartAll => vec![catalog.get("restart-all")?],
                ScenarioCmd::Run { name } => vec![catalog.get(&name)?],
                ScenarioCmd::All => catalog
                    .scenario
                    .iter()
                    .filter(|s| s.run_in_all)
                    .cloned()
                    .collect(),
                ScenarioCmd::List => unreachable!(),
            };
            let state = require_lab()?;
            let mut d = open_driver(state.driver, Runner::new(dry)?)?;
            let mut rows = Vec::new();
            for s in &plan {
                rows.push(scenario::run_one(d.as_mut(), s)?);
            }
            scenario::print_table(&rows);
            if let Some(path) = report {
                scenario::write_report(&path, &rows)?;
                println!("report written to {}", path.display());
            }
            if rows.iter().any(|r| !r.pass) {
                bail!("some scenarios failed");
            }
            Ok(())
        }
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
        Command::Cleanup { all } => match load_state()? {
            Some(state) => open_driver(state.driver, Runner::new(dry)?)?.cleanup(all),
            // The lab is gone but `--all` still deletes the Minikube profile, if minikube is
            // here (`minikube delete` of a missing profile succeeds): a profile left by an
            // earlier `cleanup` or a failed setup is never stranded.
            None if all && preflight::Probe::run().minikube => {
                println!(
                    "no lab set up here; deleting the Minikube profile {}",
                    kube::PROFILE
                );
                Runner::new(dry)?.run("minikube", &runner::args(["delete", "-p", kube::PROFILE]))
            }
            None => {
                println!("nothing to clean up (no lab set up here)");
                Ok(())
            }
        },
    }
}
