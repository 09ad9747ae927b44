//! The processes xtask starts and stops itself: the emulators, the local lab's workers and
//! producer, `measure`'s and `bench`'s workers. One way to start them (output to a log file,
//! optionally in their own process group so Ctrl-C on xtask does not take a lab down) and one
//! way to signal and stop them by pid.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

/// A process to start: program, arguments, environment and log file.
#[derive(Clone, Debug)]
pub struct Launch {
    /// An `OsString`, not a path: duct runs a one-component `Path` as `./name`, and
    /// `node` or `sh` must be looked up on PATH.
    program: OsString,
    args: Vec<OsString>,
    /// `Some`: the whole environment (nothing inherited). `None`: inherited.
    full_env: Option<Vec<(String, String)>>,
    /// Added to the environment, shown on the command line of a dry run.
    env: Vec<(String, String)>,
    log: Option<(PathBuf, bool)>,
    own_group: bool,
}

impl Launch {
    pub fn new<I, A>(program: impl Into<OsString>, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        Launch {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            full_env: None,
            env: Vec::new(),
            log: None,
            own_group: false,
        }
    }

    /// Replaces the inherited environment with `env`.
    pub fn full_env(mut self, env: Vec<(String, String)>) -> Self {
        self.full_env = Some(env);
        self
    }

    /// Sets one variable (after `full_env`, whichever order they were called in).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Stdout and stderr to `path`, appended to (a restarted worker keeps its history) or
    /// truncated.
    pub fn log(mut self, path: impl Into<PathBuf>, append: bool) -> Self {
        self.log = Some((path.into(), append));
        self
    }

    /// Its own process group: a Ctrl-C on xtask does not reach it.
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// How a dry run shows it: the variables set on top, the program and its arguments.
    pub fn command_line(&self) -> String {
        self.env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(std::iter::once(self.program.to_string_lossy().into_owned()))
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Starts it. The handle kills nothing when dropped; [`forget`](std::mem::forget) it to
    /// leave the process running after xtask exits.
    pub fn start(&self) -> anyhow::Result<duct::Handle> {
        let mut env = self
            .full_env
            .clone()
            .unwrap_or_else(|| std::env::vars().collect());
        for (k, v) in &self.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let mut expr = duct::cmd(&self.program, &self.args)
            .full_env(env)
            .stdin_null()
            .unchecked();
        if let Some((path, append)) = &self.log {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(*append)
                .truncate(!*append)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            expr = expr.stdout_file(file.try_clone()?).stderr_file(file);
        }
        if self.own_group {
            expr = expr.before_spawn(|c| {
                use std::os::unix::process::CommandExt;
                c.process_group(0);
                Ok(())
            });
        }
        expr.start()
            .with_context(|| format!("starting {}", self.program.to_string_lossy()))
    }

    /// Starts it in its own process group and leaves it running; returns its pid.
    pub fn start_detached(self) -> anyhow::Result<u32> {
        let handle = self.own_process_group().start()?;
        let pid = handle.pids()[0];
        // Detached processes outlive this command: never wait for (or kill) them on drop.
        std::mem::forget(handle);
        Ok(pid)
    }
}

/// The signals xtask sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Asks a worker to hand its leases off and exit (a pod's deletion).
    Term,
    /// A crash: no hand-off.
    Kill,
    /// Freezes the process (a long pause or a cut network).
    Stop,
    /// Wakes a frozen process.
    Cont,
}

impl Signal {
    pub fn flag(self) -> &'static str {
        match self {
            Signal::Term => "-TERM",
            Signal::Kill => "-KILL",
            Signal::Stop => "-STOP",
            Signal::Cont => "-CONT",
        }
    }
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

/// Sends `signal` to `pid`; a process already gone is not an error.
pub fn signal(pid: u32, signal: Signal) {
    let _ = std::process::Command::new("kill")
        .args([signal.flag(), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
pub fn stop(pid: u32, grace: Duration) {
    if !alive(pid) {
        return;
    }
    signal(pid, Signal::Term);
    let start = Instant::now();
    while alive(pid) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        signal(pid, Signal::Kill);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_can_be_stopped_and_is_then_not_alive() {
        let dir = std::env::temp_dir().join(format!("xtask-process-{}", std::process::id()));
        let log = dir.join("sleep.log");
        let pid = Launch::new("sh", ["-c", "echo started; exec sleep 30"])
            .log(&log, false)
            .start_detached()
            .unwrap();
        assert!(alive(pid));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&log).unwrap_or_default() != "started\n" {
            assert!(Instant::now() < deadline, "nothing in {}", log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        stop(pid, Duration::from_secs(5));
        assert!(!alive(pid), "pid {pid} still alive after stop");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_dry_run_line_shows_the_variables_set_on_top() {
        let l = Launch::new("/bin/kds-worker", ["--config", "c.toml"])
            .full_env(vec![("AWS_REGION".into(), "x".into())])
            .env("KDS_WORKER_ID", "w-0");
        assert_eq!(
            l.command_line(),
            "KDS_WORKER_ID=w-0 /bin/kds-worker --config c.toml"
        );
    }
}
