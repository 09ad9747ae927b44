//! Runs the external commands and processes the drivers need (kubectl, minikube, docker,
//! nix, the local lab's workers), or with `--dry-run` only prints and records them. Every
//! command, start and signal goes through here, so a dry run cannot skip one.

use std::cell::RefCell;
use std::time::Duration;

use anyhow::Context;
use xshell::{Shell, cmd};

use crate::process::{self, Launch, Signal};
use crate::util::project_root;

/// Runs external commands, or with `--dry-run` only prints (and records) them.
pub struct Runner {
    pub dry_run: bool,
    pub sh: Shell,
    pub log: RefCell<Vec<String>>,
}

impl Runner {
    pub fn new(dry_run: bool) -> anyhow::Result<Self> {
        let sh = Shell::new()?;
        sh.change_dir(project_root());
        Ok(Runner {
            dry_run,
            sh,
            log: RefCell::new(Vec::new()),
        })
    }

    fn note_line(&self, line: String) {
        if self.dry_run {
            println!("{line}");
        }
        self.log.borrow_mut().push(line);
    }

    fn note(&self, program: &str, args: &[String]) {
        let line = std::iter::once(program.to_owned())
            .chain(args.iter().map(|a| {
                if a.contains(' ') || a.is_empty() {
                    format!("'{a}'")
                } else {
                    a.clone()
                }
            }))
            .collect::<Vec<_>>()
            .join(" ");
        self.note_line(line);
    }

    /// Starts `launch` detached (it outlives xtask) and returns its pid; `None` in a dry run.
    pub fn start_detached(&self, launch: Launch) -> anyhow::Result<Option<u32>> {
        self.note_line(launch.command_line());
        if self.dry_run {
            return Ok(None);
        }
        launch.start_detached().map(Some)
    }

    /// Sends `signal` to `pid` (`what` names it in the record).
    pub fn signal(&self, pid: u32, signal: Signal, what: &str) {
        self.note_line(format!("kill {} {pid} # {what}", signal.flag()));
        if !self.dry_run {
            process::signal(pid, signal);
        }
    }

    /// SIGTERM, then SIGKILL after `grace` (`what` names it in the record).
    pub fn stop(&self, pid: u32, grace: Duration, what: &str) {
        self.note_line(format!("kill -TERM {pid} # {what}"));
        if !self.dry_run {
            process::stop(pid, grace);
        }
    }

    /// Freezes `pid` for `pause`, then wakes it.
    pub fn pause(&self, pid: u32, pause: Duration, what: &str) {
        self.note_line(format!(
            "kill -STOP {pid}; sleep {pause:?}; kill -CONT {pid} # {what}"
        ));
        if !self.dry_run {
            process::signal(pid, Signal::Stop);
            std::thread::sleep(pause);
            process::signal(pid, Signal::Cont);
        }
    }

    /// Runs `command` to completion and returns its output; `None` in a dry run.
    pub fn capture(
        &self,
        mut command: std::process::Command,
    ) -> anyhow::Result<Option<std::process::Output>> {
        let line = std::iter::once(command.get_program())
            .chain(command.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        self.note_line(line);
        if self.dry_run {
            return Ok(None);
        }
        command
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {}", command.get_program().to_string_lossy()))
            .map(Some)
    }

    /// Runs `program args`, output to the terminal.
    pub fn run(&self, program: &str, args: &[String]) -> anyhow::Result<()> {
        self.note(program, args);
        if self.dry_run {
            return Ok(());
        }
        cmd!(self.sh, "{program} {args...}")
            .run()
            .with_context(|| format!("`{program}` failed"))
    }

    /// Runs `program args` and returns its stdout (empty in a dry run).
    pub fn output(&self, program: &str, args: &[String]) -> anyhow::Result<String> {
        self.note(program, args);
        if self.dry_run {
            return Ok(String::new());
        }
        cmd!(self.sh, "{program} {args...}")
            .quiet()
            .read()
            .with_context(|| format!("`{program} {}` failed", args.join(" ")))
    }

    #[cfg(test)]
    pub fn commands(&self) -> Vec<String> {
        self.log.borrow().clone()
    }
}

pub fn args<const N: usize>(a: [&str; N]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
