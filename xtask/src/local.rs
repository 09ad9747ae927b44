//! The `local` driver: no cluster, no Docker. The pinned emulators and `kds-worker` processes
//! run on loopback, detached from this command, with their state in `.lab/state.json` and
//! their logs in `.lab/logs/`. Workers count each other by heartbeats
//! (`worker_count_source = heartbeats`); scaling starts and stops processes the way a
//! StatefulSet starts and stops pods (highest ordinal first).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::emulators;
use crate::lab::{Driver, DriverKind, Runner, Snapshot, State, WorkerView, save_state, wait_until};
use crate::util::{free_port, http_status, lab_dir, project_root};

pub const STREAM: &str = "kds-lab-stream";
pub const APP: &str = "kds-consumer-app";
const READY_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalState {
    pub kinesis_url: String,
    pub dynamodb_url: String,
    pub emulator_pids: Vec<u32>,
    /// Worker name (`kds-consumer-N`) → process.
    pub workers: BTreeMap<String, WorkerProcess>,
    pub cap: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerProcess {
    pub pid: u32,
    pub port: u16,
}

pub struct Local {
    runner: Runner,
    state: LocalState,
}

fn config_path() -> PathBuf {
    lab_dir().join("config.toml")
}

fn logs_dir() -> PathBuf {
    lab_dir().join("logs")
}

/// The worker binary `setup` builds (debug profile: it is what `cargo xtask test` builds too).
pub fn worker_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"));
    target.join("debug").join("kds-worker")
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

/// Replaces the value of `max_leases_cap` in a config.toml (or a ConfigMap holding one).
pub fn replace_cap(text: &str, cap: u64) -> anyhow::Result<String> {
    let mut found = false;
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("max_leases_cap") && trimmed.contains('=') {
                found = true;
                let indent = &line[..line.len() - trimmed.len()];
                format!("{indent}max_leases_cap = {cap}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !found {
        bail!("no `max_leases_cap = …` line to change");
    }
    Ok(out.join("\n") + "\n")
}

pub fn read_cap(text: &str) -> Option<u64> {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("max_leases_cap"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// Is `pid` a live process (not a zombie)?
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
fn stop_process(pid: u32, grace: Duration) {
    if !alive(pid) {
        return;
    }
    signal(pid, "-TERM");
    let start = std::time::Instant::now();
    while alive(pid) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        signal(pid, "-KILL");
    }
}

impl Local {
    pub fn open(runner: Runner) -> anyhow::Result<Self> {
        let state = crate::lab::load_state()?
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
        vec![
            ("AWS_ENDPOINT_URL_KINESIS", self.state.kinesis_url.clone()),
            ("AWS_ENDPOINT_URL_DYNAMODB", self.state.dynamodb_url.clone()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    fn emulators_running(&self) -> bool {
        !self.state.emulator_pids.is_empty() && self.state.emulator_pids.iter().all(|p| alive(*p))
    }

    /// Runs `kds-worker --config .lab/config.toml ARGS` against the lab's emulators.
    fn worker_cli(&self, extra: &[&str]) -> anyhow::Result<String> {
        let bin = worker_binary();
        let mut a = vec!["--config".to_owned(), config_path().display().to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        let bin_s = bin.display().to_string();
        self.runner
            .log
            .borrow_mut()
            .push(format!("{bin_s} {}", a.join(" ")));
        if self.runner.dry_run {
            println!("{bin_s} {}", a.join(" "));
            return Ok(String::new());
        }
        let out = std::process::Command::new(&bin)
            .args(&a)
            .envs(self.aws_env())
            .env("KDS_LOG_FORMAT", "pretty")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
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
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_worker(&mut self, name: &str) -> anyhow::Result<()> {
        let port = free_port()?;
        let bin = worker_binary();
        let line = format!(
            "KDS_WORKER_ID={name} KDS_HTTP_ADDR=127.0.0.1:{port} {} --config {}",
            bin.display(),
            config_path().display()
        );
        self.runner.log.borrow_mut().push(line.clone());
        if self.runner.dry_run {
            println!("{line}");
            return Ok(());
        }
        std::fs::create_dir_all(logs_dir())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs_dir().join(format!("{name}.log")))?;
        // Only this lab's KDS_* settings: none leak in from the developer's shell.
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| !k.starts_with("KDS_") && !k.starts_with("AWS_"))
            .chain(self.aws_env().into_iter().map(|(k, v)| (k.to_owned(), v)))
            .chain([
                ("KDS_WORKER_ID".to_owned(), name.to_owned()),
                ("KDS_HTTP_ADDR".to_owned(), format!("127.0.0.1:{port}")),
            ])
            .collect();
        let handle = duct::cmd(
            &bin,
            ["--config".to_owned(), config_path().display().to_string()],
        )
        .full_env(env)
        .stdin_null()
        .stdout_file(log.try_clone()?)
        .stderr_file(log)
        // Its own process group: Ctrl-C on this command does not take the lab down.
        .before_spawn(|c| {
            use std::os::unix::process::CommandExt;
            c.process_group(0);
            Ok(())
        })
        .unchecked()
        .start()
        .with_context(|| format!("starting {}", bin.display()))?;
        let pid = handle.pids()[0];
        std::mem::forget(handle);
        self.state
            .workers
            .insert(name.to_owned(), WorkerProcess { pid, port });
        self.save()
    }

    fn stop_worker(&mut self, name: &str) -> anyhow::Result<()> {
        if let Some(w) = self.state.workers.remove(name) {
            self.runner
                .log
                .borrow_mut()
                .push(format!("kill -TERM {} # {name}", w.pid));
            if self.runner.dry_run {
                println!("kill -TERM {} # {name}", w.pid);
            } else {
                // Like a pod's grace period: the worker hands its leases off and exits 0.
                stop_process(w.pid, Duration::from_secs(30));
            }
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
            &crate::lab::args(["build", "--quiet", "-p", "kds-worker"]),
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
        self.wait_ready()
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
            self.runner
                .log
                .borrow_mut()
                .push(format!("kill -TERM {pid} # {name}"));
        }
        if !self.runner.dry_run {
            for pid in &pids {
                signal(*pid, "-TERM");
            }
            for pid in &pids {
                stop_process(*pid, Duration::from_secs(30));
            }
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
        let text = self.worker_cli(&["admin", "snapshot", "--json"])?;
        if self.runner.dry_run {
            return Ok(Snapshot::default());
        }
        serde_json::from_str(&text).context("parsing `kds-worker admin snapshot --json`")
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
        let mut out = String::from("last log lines:\n");
        for name in self.state.workers.keys() {
            out.push_str(&format!(
                "--- {name}\n{}\n",
                emulators::tail(&logs_dir().join(format!("{name}.log")), 5)
            ));
        }
        out
    }

    fn cleanup(&mut self, all: bool) -> anyhow::Result<()> {
        let names: Vec<String> = self.state.workers.keys().cloned().collect();
        for name in names {
            self.stop_worker(&name)?;
        }
        for pid in std::mem::take(&mut self.state.emulator_pids) {
            self.runner
                .log
                .borrow_mut()
                .push(format!("kill -TERM {pid}"));
            if !self.runner.dry_run {
                stop_process(pid, Duration::from_secs(5));
            }
        }
        if !self.runner.dry_run {
            let _ = std::fs::remove_file(crate::lab::state_path());
            let _ = std::fs::remove_file(config_path());
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
    fn cap_is_replaced_in_place() {
        let cm = "data:\n  config.toml: |\n    stream_name = \"s\"\n    max_leases_cap = 80\n";
        let out = replace_cap(cm, 100).unwrap();
        assert!(out.contains("    max_leases_cap = 100\n"));
        assert_eq!(read_cap(&out), Some(100));
        assert!(replace_cap("stream_name = \"s\"\n", 5).is_err());
    }

    #[test]
    fn local_config_is_a_valid_worker_config_shape() {
        let text = config_toml(80);
        assert_eq!(read_cap(&text), Some(80));
        assert!(text.contains("worker_count_source = \"heartbeats\""));
    }
}
