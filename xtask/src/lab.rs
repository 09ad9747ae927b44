//! The driver interface every lab command goes through (`Driver`), what a driver reports
//! (`WorkerView`, `Audit`), and the waits: `wait_until` with a spinner and a deadline,
//! `retrying` for status reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::runner::Runner;
use crate::state::DriverKind;
use crate::util::secs;

/// The fleet as the worker's `admin snapshot --json` reports it: the worker's own type, so a
/// renamed field fails to parse instead of reading as zero.
pub use kds_model::Snapshot;

/// One worker as the platform sees it (pod or process).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub name: String,
    /// `Running`, `Pending`, `exited`, …
    pub phase: String,
    pub ready: bool,
}

/// What scenarios, status and monitor need from a lab, whatever runs it.
pub trait Driver {
    fn kind(&self) -> DriverKind;
    fn runner(&self) -> &Runner;
    fn setup(&mut self, shards: u32, workers: u32) -> anyhow::Result<()>;
    fn set_shards(&mut self, shards: u64) -> anyhow::Result<()>;
    fn set_workers(&mut self, workers: u64) -> anyhow::Result<()>;
    fn set_cap(&mut self, cap: u64) -> anyhow::Result<()>;
    fn restart_all(&mut self) -> anyhow::Result<()>;
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
    fn workers(&self) -> anyhow::Result<Vec<WorkerView>>;
    fn desired_workers(&self) -> anyhow::Result<u64>;
    fn cap(&self) -> anyhow::Result<u64>;
    fn logs(&self, follow: bool, worker: Option<u32>) -> anyhow::Result<()>;
    fn produce(&self, rate: u64, seconds: u64) -> anyhow::Result<()>;
    fn cleanup(&mut self, all: bool) -> anyhow::Result<()>;
    /// What to show when a wait times out: recent pod events, or the workers' last log lines.
    fn diagnostics(&self) -> String;
    /// The records processed so far checked against those produced (only the first `upto`
    /// produced ones, if given): `None` where the lab keeps no record logs (in a cluster).
    fn audit(&self, _upto: Option<usize>) -> anyhow::Result<Option<Audit>> {
        Ok(None)
    }
}

/// `kds-worker admin audit --json` as the lab reads it, plus how many records were put.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Audit {
    #[serde(default)]
    pub produced: usize,
    pub processed: usize,
    pub duplicates: usize,
    pub overlaps: Vec<serde_json::Value>,
    /// Produced records (of those audited) nobody processed yet.
    pub lost: Vec<String>,
    pub by_worker: BTreeMap<String, usize>,
}

/// An error that ends a [`wait_until`] at once (a process died; waiting will not help).
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Waits for `check` with a spinner; on timeout says what it waited for and `context()`.
pub fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    context: impl Fn() -> String,
) -> anyhow::Result<(T, Duration)> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .expect("valid template"),
    );
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner.set_message(what.to_owned());
    let start = Instant::now();
    let mut last_error = None;
    loop {
        let began = Instant::now();
        let result = check();
        // A check that reads the tables (a full lease scan) is not repeated faster than it
        // runs: the lab's own polling must not saturate the DynamoDB emulator it measures.
        let pause = Duration::from_millis(500).max(began.elapsed());
        match result {
            Ok(Some(v)) => {
                spinner.finish_and_clear();
                return Ok((v, start.elapsed()));
            }
            Ok(None) => {}
            // A check that can tell the wait is hopeless says so by failing with Fatal.
            Err(e) if e.downcast_ref::<Fatal>().is_some() => {
                spinner.finish_and_clear();
                return Err(e);
            }
            Err(e) => last_error = Some(format!("{e:#}")),
        }
        if start.elapsed() > deadline {
            spinner.finish_and_clear();
            let mut msg = format!("timed out after {} waiting for {what}", secs(deadline));
            if let Some(e) = last_error {
                msg.push_str(&format!("\nlast error: {e}"));
            }
            msg.push_str(&format!("\n{}", context()));
            bail!(msg);
        }
        std::thread::sleep(pause);
    }
}

/// How long a status read of the lab is retried before a command gives up: long enough for
/// an emulator busy with a 300-shard rolling restart on a loaded 2-core machine to catch up.
pub const STATUS_READ_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `read` (a status read of the lab) again after a transient failure, with growing pauses
/// (0.5 s doubling to 8 s), until `deadline` has passed: a scenario fails on what it checks,
/// never on one slow read. Each failure is printed, so a long wait is never silent.
pub fn retrying<T>(
    what: &str,
    deadline: Duration,
    mut read: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        match read() {
            Ok(v) => return Ok(v),
            Err(e) if e.downcast_ref::<Fatal>().is_some() || start.elapsed() + pause > deadline => {
                return Err(e.context(format!(
                    "{what} (attempt {attempt}, gave up after {})",
                    secs(start.elapsed())
                )));
            }
            Err(e) => {
                eprintln!(
                    "{what} failed ({e:#}); retrying in {} (for up to {} more)",
                    secs(pause),
                    secs(deadline.saturating_sub(start.elapsed()))
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(8));
                attempt += 1;
            }
        }
    }
}
