//! The `local` driver: no cluster, no Docker. The pinned emulators and `kds-worker` processes
//! run on loopback, detached from this command, with their state in `.lab/state.json` and
//! their logs in `.lab/logs/`. Workers count each other by heartbeats
//! (`worker_count_source = heartbeats`); scaling starts and stops processes the way a
//! StatefulSet starts and stops pods (highest ordinal first).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config_file::replace_cap;
use crate::emulators;
use crate::lab::{Audit, Driver, Snapshot, WorkerView, wait_until};
use crate::process::{Launch, Signal, alive};
use crate::runner::Runner;
use crate::state::{DriverKind, LocalState, State, WorkerProcess, save_state};
use crate::util::{free_port, http_status, lab_dir};

pub const STREAM: &str = "kds-lab-stream";
pub const APP: &str = "kds-consumer-app";
const READY_DEADLINE: Duration = Duration::from_secs(120);
/// Records per second the lab's producer puts while it is set up.
pub const LAB_RECORD_RATE: u64 = 10;

pub struct Local {
    runner: Runner,
    state: LocalState,
}

fn config_path() -> PathBuf {
    lab_dir().join("config.toml")
}

/// Every worker's record log (`record_log`) and the producer's log of what it put.
pub fn records_dir() -> PathBuf {
    lab_dir().join("records")
}

fn produced_log() -> PathBuf {
    records_dir().join("produced.log")
}

fn logs_dir() -> PathBuf {
    lab_dir().join("logs")
}

/// The worker binary `setup` builds (debug profile: it is what `cargo xtask test` builds too).
pub fn worker_binary() -> PathBuf {
    crate::util::built_binary("debug", "kds-worker")
}

/// The local lab's config.toml: the ConfigMap's keys, with timings shortened so scenarios
/// converge in seconds (documented in lab/README.md).
pub fn config_toml(cap: u64) -> String {
    format!(
        "# Written by `cargo xtask setup --driver local`; `scenario config-change` edits the cap.\n\
         app_name = \"{APP}\"\n\
         stream_name = \"{STREAM}\"\n\
         max_leases_cap = {cap}\n\
         worker_count_source = \"heartbeats\"\n\
         shard_poll_interval = \"2s\"\n\
         heartbeat_interval = \"2s\"\n\
         failover_timeout = \"10s\"\n\
         idle_poll_max = \"20s\"\n\
         log_format = \"json\"\n"
    )
}

impl Local {
    pub fn open(runner: Runner) -> anyhow::Result<Self> {
        let state = crate::state::load_state()?
            .and_then(|s| s.local)
            .unwrap_or_default();
        Ok(Local { runner, state })
    }

    fn save(&self) -> anyhow::Result<()> {
        if self.runner.dry_run {
            return Ok(());
        }
        save_state(&State {
            driver: DriverKind::Local,
            local: Some(self.state.clone()),
        })
    }

    fn aws_env(&self) -> Vec<(&'static str, String)> {
        emulators::aws_env(&self.state.kinesis_url, &self.state.dynamodb_url)
    }

    /// The environment of a lab process: only this lab's KDS_* and AWS settings, none leaked
    /// in from the developer's shell.
    fn worker_env(&self) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| !k.starts_with("KDS_") && !k.starts_with("AWS_"))
            .chain(self.aws_env().into_iter().map(|(k, v)| (k.to_owned(), v)))
            .collect()
    }

    fn emulators_running(&self) -> bool {
        !self.state.emulator_pids.is_empty() && self.state.emulator_pids.iter().all(|p| alive(*p))
    }

    /// Runs `kds-worker --config .lab/config.toml ARGS` against the lab's emulators and
    /// returns its stdout; `None` in a dry run.
    fn worker_cli(&self, extra: &[&str]) -> anyhow::Result<Option<String>> {
        let mut command = std::process::Command::new(worker_binary());
        command
            .arg("--config")
            .arg(config_path())
            .args(extra)
            .envs(self.aws_env())
            .env("KDS_LOG_FORMAT", "pretty")
            .env("RUST_LOG", "warn");
        let Some(out) = self.runner.capture(command)? else {
            return Ok(None);
        };
        if !out.status.success() {
            bail!(
                "`kds-worker {}` failed: {}",
                extra.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Progress lines (reshard steps) go to the user.
        let err = String::from_utf8_lossy(&out.stderr);
        for line in err
            .lines()
            .filter(|l| l.starts_with("UpdateShardCount") || l.starts_with("put "))
        {
            eprintln!("  {line}");
        }
        Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    fn start_worker(&mut self, name: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        // The worker appends to its record log but does not create the directory.
        if !self.runner.dry_run {
            std::fs::create_dir_all(records_dir())?;
        }
        let launch = Launch::new(
            worker_binary(),
            ["--config".to_owned(), config_path().display().to_string()],
        )
        .full_env(self.worker_env())
        .env("KDS_WORKER_ID", name)
        .env("KDS_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env(
            "KDS_RECORD_LOG",
            records_dir()
                .join(format!("{name}.log"))
                .display()
                .to_string(),
        )
        .log(logs_dir().join(format!("{name}.log")), true);
        if let Some(pid) = self.runner.start_detached(launch)? {
            self.state
                .workers
                .insert(name.to_owned(), WorkerProcess { pid, port });
        }
        self.save()
    }

    pub fn stop_worker(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(w) = self.state.workers.remove(name) {
            // Like a pod's grace period: the worker hands its leases off and exits 0.
            self.runner.stop(w.pid, Duration::from_secs(30), name);
        }
        self.save()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        if self.runner.dry_run {
            return Ok(());
        }
        let n = self.state.workers.len();
        wait_until(
            &format!("{n} workers ready"),
            READY_DEADLINE,
            || {
                let views = self.workers()?;
                if let Some(dead) = views.iter().find(|v| v.phase == "exited") {
                    return Err(crate::lab::Fatal(format!(
                        "{} exited; its log ends:\n{}",
                        dead.name,
                        emulators::tail(&logs_dir().join(format!("{}.log", dead.name)), 10)
                    ))
                    .into());
                }
                Ok((views.len() == n && views.iter().all(|v| v.ready)).then_some(()))
            },
            || self.diagnostics(),
        )
        .map(|_| ())
    }

    /// Starts the record producer (`rate` records/s until stopped), detached like a worker;
    /// what it puts is logged to `records/produced.log` for [`Local::audit`].
    pub fn start_producer(&mut self, rate: u64) -> anyhow::Result<()> {
        self.stop_producer();
        std::fs::create_dir_all(records_dir())?;
        let launch = Launch::new(
            worker_binary(),
            [
                "--config".to_owned(),
                config_path().display().to_string(),
                "admin".into(),
                "produce".into(),
                "--rate".into(),
                rate.to_string(),
                "--seconds".into(),
                "0".into(),
                "--out".into(),
                produced_log().display().to_string(),
            ],
        )
        .full_env(self.worker_env())
        .log(logs_dir().join("producer.log"), true);
        self.state.producer_pid = self.runner.start_detached(launch)?;
        self.save()
    }

    /// Stops the producer (what it put so far stays logged).
    pub fn stop_producer(&mut self) {
        if let Some(pid) = self.state.producer_pid.take() {
            self.runner.stop(pid, Duration::from_secs(5), "producer");
            let _ = self.save();
        }
    }

    /// `kill -9` of one worker (a crashed pod); it is gone from the lab until started again.
    pub fn kill_worker(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(w) = self.state.workers.remove(name) {
            self.runner.signal(w.pid, Signal::Kill, name);
        }
        self.save()
    }

    /// Freezes one worker for `pause` (SIGSTOP, then SIGCONT): a stalled process, as after a
    /// long GC pause or a cut network, that wakes up after others may have taken its leases.
    pub fn pause_worker(&self, name: &str, pause: Duration) -> anyhow::Result<()> {
        let Some(w) = self.state.workers.get(name) else {
            bail!("no worker {name}");
        };
        self.runner.pause(w.pid, pause, name);
        Ok(())
    }

    /// Starts a worker by name (after [`Local::kill_worker`]) and waits until all are ready.
    pub fn restart_worker(&mut self, name: &str) -> anyhow::Result<()> {
        self.start_worker(name)?;
        self.wait_ready()
    }

    /// Every lease's checkpoint (shard id → checkpoint): `kds-worker admin checkpoints`.
    pub fn checkpoints(&self) -> anyhow::Result<BTreeMap<String, String>> {
        match self.worker_cli(&["admin", "checkpoints"])? {
            Some(out) => serde_json::from_str(&out).context("parsing the checkpoints"),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Names of the running workers.
    pub fn worker_names(&self) -> Vec<String> {
        self.state.workers.keys().cloned().collect()
    }

    /// Checks every worker's record log against the producer's (its first `upto` records, if
    /// given): `kds-worker admin audit`.
    pub fn audit_records(&self, upto: Option<usize>) -> anyhow::Result<Audit> {
        if self.runner.dry_run {
            return Ok(Audit::default());
        }
        let mut logs: Vec<String> = std::fs::read_dir(records_dir())
            .with_context(|| format!("reading {}", records_dir().display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p != &produced_log() && p.extension().is_some_and(|x| x == "log"))
            .map(|p| p.display().to_string())
            .collect();
        logs.sort();
        // What the producer had put when asked (its log grows while this runs).
        let produced_text = std::fs::read_to_string(produced_log()).unwrap_or_default();
        let produced: Vec<&str> = produced_text
            .lines()
            .take(upto.unwrap_or(usize::MAX))
            .collect();
        let audited = records_dir().join("produced-audited.txt");
        std::fs::write(&audited, produced.join("\n") + "\n")?;
        if logs.is_empty() {
            return Ok(Audit {
                produced: produced.len(),
                lost: produced.iter().map(|s| s.to_string()).collect(),
                ..Audit::default()
            });
        }
        let audited = audited.display().to_string();
        let mut args = vec!["admin", "audit", "--json", "--produced", &audited];
        args.extend(logs.iter().map(String::as_str));
        let Some(out) = self.worker_cli(&args)? else {
            return Ok(Audit::default());
        };
        let mut audit: Audit = serde_json::from_str(&out).context("parsing the audit report")?;
        audit.produced = produced.len();
        Ok(audit)
    }

    fn names(count: u64) -> Vec<String> {
        (0..count).map(|i| format!("kds-consumer-{i}")).collect()
    }
}

impl Driver for Local {
    fn kind(&self) -> DriverKind {
        DriverKind::Local
    }

    fn runner(&self) -> &Runner {
        &self.runner
    }

    fn setup(&mut self, shards: u32, workers: u32) -> anyhow::Result<()> {
        self.runner.run(
            "cargo",
            &crate::runner::args(["build", "--quiet", "-p", "kds-worker"]),
        )?;
        if !self.emulators_running() {
            if self.runner.dry_run {
                println!(
                    "# start the pinned emulators (lab/emulators.toml) on free loopback ports"
                );
            } else {
                let emu = emulators::start_detached(&self.runner.sh, &logs_dir())?;
                self.state.kinesis_url = emu.kinesis_url();
                self.state.dynamodb_url = emu.dynamodb_url();
                self.state.emulator_pids = emu.pids();
                self.state.workers.clear();
                self.state.cap = 80;
                self.save()?;
            }
        }
        if self.state.cap == 0 {
            self.state.cap = 80;
        }
        if !self.runner.dry_run {
            std::fs::write(config_path(), config_toml(self.state.cap))?;
        }
        let shards = shards.to_string();
        self.worker_cli(&["init", "--shards", &shards])?;
        // Re-running setup keeps running workers; it only starts missing ones.
        for name in Self::names(u64::from(workers)) {
            let running = self.state.workers.get(&name).is_some_and(|w| alive(w.pid));
            if !running {
                self.start_worker(&name)?;
            }
        }
        self.wait_ready()?;
        // Records flow through every scenario, so each can be judged by what was processed.
        if !self
            .state
            .producer_pid
            .is_some_and(|pid| self.runner.dry_run || alive(pid))
        {
            self.start_producer(LAB_RECORD_RATE)?;
        }
        Ok(())
    }

    fn set_shards(&mut self, shards: u64) -> anyhow::Result<()> {
        self.worker_cli(&["admin", "reshard", &shards.to_string()])
            .map(|_| ())
    }

    fn set_workers(&mut self, workers: u64) -> anyhow::Result<()> {
        let want = Self::names(workers);
        let extra: Vec<String> = self
            .state
            .workers
            .keys()
            .filter(|k| !want.contains(k))
            .cloned()
            .collect();
        // Highest ordinal first, like a StatefulSet scale-down.
        for name in extra.iter().rev() {
            self.stop_worker(name)?;
        }
        for name in want {
            if !self.state.workers.contains_key(&name) {
                self.start_worker(&name)?;
            }
        }
        self.wait_ready()
    }

    fn set_cap(&mut self, cap: u64) -> anyhow::Result<()> {
        let text =
            std::fs::read_to_string(config_path()).unwrap_or_else(|_| config_toml(self.state.cap));
        if !self.runner.dry_run {
            std::fs::write(config_path(), replace_cap(&text, cap)?)?;
        }
        self.state.cap = cap;
        self.save()?;
        // Rolling restart, highest ordinal first, one at a time (a StatefulSet rollout).
        let names: Vec<String> = self.state.workers.keys().rev().cloned().collect();
        for name in names {
            self.stop_worker(&name)?;
            self.start_worker(&name)?;
            self.wait_ready()?;
        }
        Ok(())
    }

    fn restart_all(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.state.workers.keys().cloned().collect();
        // All at once, like `kubectl delete pod -l …`: SIGTERM everyone, then start them again.
        let pids: Vec<u32> = self.state.workers.values().map(|w| w.pid).collect();
        for (name, pid) in names.iter().zip(&pids) {
            self.runner.signal(*pid, Signal::Term, name);
        }
        for (name, pid) in names.iter().zip(&pids) {
            self.runner.stop(*pid, Duration::from_secs(30), name);
        }
        self.state.workers.clear();
        for name in &names {
            self.start_worker(name)?;
        }
        self.wait_ready()
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        if !self.runner.dry_run && !self.emulators_running() {
            bail!(
                "the local lab's emulators are not running: run `cargo xtask setup --driver local`"
            );
        }
        match self.worker_cli(&["admin", "snapshot", "--json"])? {
            Some(text) => {
                serde_json::from_str(&text).context("parsing `kds-worker admin snapshot --json`")
            }
            None => Ok(Snapshot::default()),
        }
    }

    fn workers(&self) -> anyhow::Result<Vec<WorkerView>> {
        Ok(self
            .state
            .workers
            .iter()
            .map(|(name, w)| {
                let running = alive(w.pid);
                WorkerView {
                    name: name.clone(),
                    phase: if running {
                        "Running".into()
                    } else {
                        "exited".into()
                    },
                    ready: running
                        && http_status(([127, 0, 0, 1], w.port).into(), "/ready") == Some(200),
                }
            })
            .collect())
    }

    fn desired_workers(&self) -> anyhow::Result<u64> {
        Ok(self.state.workers.len() as u64)
    }

    fn cap(&self) -> anyhow::Result<u64> {
        Ok(self.state.cap)
    }

    fn logs(&self, follow: bool, worker: Option<u32>) -> anyhow::Result<()> {
        let files: Vec<String> = match worker {
            Some(n) => vec![
                logs_dir()
                    .join(format!("kds-consumer-{n}.log"))
                    .display()
                    .to_string(),
            ],
            None => self
                .state
                .workers
                .keys()
                .map(|n| logs_dir().join(format!("{n}.log")).display().to_string())
                .collect(),
        };
        if files.is_empty() {
            bail!("no workers: run `cargo xtask setup --driver local`");
        }
        let mut a = vec!["-n".to_owned(), "100".to_owned()];
        if follow {
            a.push("-F".into());
        }
        a.extend(files);
        self.runner.run("tail", &a)
    }

    fn produce(&self, rate: u64, seconds: u64) -> anyhow::Result<()> {
        let (rate, seconds) = (rate.to_string(), seconds.to_string());
        self.worker_cli(&["admin", "produce", "--rate", &rate, "--seconds", &seconds])
            .map(|_| ())
    }

    fn diagnostics(&self) -> String {
        let mut out = String::from("each worker's /ready and last log lines:\n");
        for (name, w) in &self.state.workers {
            let ready = match crate::util::http_get(([127, 0, 0, 1], w.port).into(), "/ready") {
                Some((status, body)) => format!("{status} {}", body.trim()),
                None if alive(w.pid) => "no answer (pid alive)".to_owned(),
                None => "no answer (exited)".to_owned(),
            };
            out.push_str(&format!(
                "--- {name} (pid {}): /ready {ready}\n{}\n",
                w.pid,
                emulators::tail(&logs_dir().join(format!("{name}.log")), 5)
            ));
        }
        out
    }

    fn audit(&self, upto: Option<usize>) -> anyhow::Result<Option<Audit>> {
        self.audit_records(upto).map(Some)
    }

    fn cleanup(&mut self, all: bool) -> anyhow::Result<()> {
        let names: Vec<String> = self.state.workers.keys().cloned().collect();
        for name in names {
            self.stop_worker(&name)?;
        }
        for pid in std::mem::take(&mut self.state.emulator_pids) {
            self.runner.stop(pid, Duration::from_secs(5), "emulator");
        }
        self.stop_producer();
        if !self.runner.dry_run {
            let _ = std::fs::remove_file(crate::state::state_path());
            let _ = std::fs::remove_file(config_path());
            let _ = std::fs::remove_dir_all(records_dir());
            if all {
                // Logs and installed emulators too; the next setup reinstalls them.
                let _ = std::fs::remove_dir_all(logs_dir());
                let _ = std::fs::remove_dir_all(crate::util::tools_dir());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_config_is_a_valid_worker_config_shape() {
        let text = config_toml(80);
        assert_eq!(crate::config_file::read_cap(&text), Some(80));
        assert!(text.contains("worker_count_source = \"heartbeats\""));
    }
}
