//! Runs the external commands the drivers need (kubectl, minikube, docker, nix), or with
//! `--dry-run` only prints and records them.

use std::cell::RefCell;

use anyhow::Context;
use xshell::{Shell, cmd};

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
        if self.dry_run {
            println!("{line}");
        }
        self.log.borrow_mut().push(line);
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
