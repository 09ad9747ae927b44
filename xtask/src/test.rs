//! `cargo xtask test`: the project's one test command, identical here and in CI.
//!
//! Steps: fmt check; clippy `-D warnings`; start the pinned emulators; every test of the
//! workspace with the emulator endpoints in the environment; stop the emulators (also on
//! failure); the local lab end to end; a short chaos run; a summary with each step's time.

use std::time::{Duration, Instant};

use anyhow::bail;
use xshell::{Shell, cmd};

use crate::emulators;
use crate::util::{lab_dir, project_root, secs};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the fmt and clippy steps (quicker while iterating).
    #[arg(long)]
    pub no_lint: bool,
    /// Skip the end-to-end run of the local lab (setup, every scenario, monitor, cleanup) and
    /// the short chaos run.
    #[arg(long)]
    pub no_lab: bool,
    /// Extra arguments for `cargo test` (a test name filter, `--nocapture`, ...).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

/// The chaos run inside `cargo xtask test`: short, and replayable by its seed.
const CHAOS_MINUTES: f64 = 1.0;
const CHAOS_SEED: u64 = 20261128;

struct Step {
    name: &'static str,
    took: Duration,
    ok: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    // The lab steps run this very binary; `cargo test --workspace` may rebuild it in place
    // (workspace-wide features), so they run a copy taken now.
    let exe = lab_dir().join("bin").join("xtask");
    std::fs::create_dir_all(lab_dir().join("bin"))?;
    std::fs::copy(std::env::current_exe()?, &exe)?;
    let mut steps: Vec<Step> = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> bool {
        eprintln!("\n==> {name}");
        let start = Instant::now();
        let result = f();
        if let Err(e) = &result {
            eprintln!("{name} failed: {e:#}");
        }
        steps.push(Step {
            name,
            took: start.elapsed(),
            ok: result.is_ok(),
        });
        result.is_ok()
    };

    if !args.no_lint {
        step("fmt", &mut || {
            Ok(cmd!(sh, "cargo fmt --all -- --check").run()?)
        });
        step("clippy", &mut || {
            Ok(cmd!(
                sh,
                "cargo clippy --workspace --all-targets --locked -- -D warnings"
            )
            .run()?)
        });
    }
    if crate::nix::available() {
        step("nix", &mut || crate::nix::check(&sh));
    } else {
        eprintln!("\n(nix not installed: flake checks skipped; .ci/run installs nix-bin)");
    }
    let mut emulators = None;
    step("emulators", &mut || {
        emulators = Some(emulators::start(&sh, &lab_dir().join("logs"))?);
        Ok(())
    });
    if let Some(emu) = &emulators {
        let extra = &args.cargo_test_args;
        step("tests", &mut || {
            let mut c = cmd!(sh, "cargo test --workspace --locked -- {extra...}");
            // One test at a time: every test shares the two emulators, and moto serves one
            // request at a time; two tests' fleets at once would measure the queue, not the
            // worker. RUST_TEST_THREADS in the environment overrides this.
            if std::env::var_os("RUST_TEST_THREADS").is_none() {
                c = c.env("RUST_TEST_THREADS", "1");
            }
            for (k, v) in emu.aws_env() {
                c = c.env(k, v);
            }
            Ok(c.run()?)
        });
    }
    if let Some(emu) = emulators.take() {
        emu.stop();
    }
    if !args.no_lab {
        step("lab-e2e", &mut || crate::e2e::run(&exe));
        step("chaos", &mut || {
            // A short run with a fixed seed (the same actions every time); its own process,
            // so its lab dir does not leak into this one.
            let (minutes, seed) = (CHAOS_MINUTES.to_string(), CHAOS_SEED.to_string());
            Ok(cmd!(sh, "{exe} chaos --minutes {minutes} --seed {seed}").run()?)
        });
    }

    eprintln!("\n==> summary");
    for s in &steps {
        eprintln!(
            "{:<10} {:<4} {:>8}",
            s.name,
            if s.ok { "ok" } else { "FAIL" },
            secs(s.took)
        );
    }
    let failed: Vec<_> = steps.iter().filter(|s| !s.ok).map(|s| s.name).collect();
    if failed.is_empty() {
        eprintln!("all {} steps passed", steps.len());
        Ok(())
    } else {
        bail!("failed steps: {}", failed.join(", "))
    }
}
