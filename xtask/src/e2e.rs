//! The local lab end to end, as a user runs it: `setup --driver local`, `scenario all
//! --report`, `monitor --once`, `status --json`, `cleanup`; asserting the values in the
//! report (limits, coverage, and the records put and processed in each scenario), not just
//! exit codes. Part of `cargo xtask test`, in its own lab dir.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, bail, ensure};

use crate::util::project_root;

struct Xtask {
    exe: PathBuf,
    lab: PathBuf,
}

impl Xtask {
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        eprintln!("$ cargo xtask {}", args.join(" "));
        let out = Command::new(&self.exe)
            .args(args)
            .env("XTASK_LAB_DIR", &self.lab)
            .current_dir(project_root())
            .output()
            .with_context(|| format!("running xtask {}", args.join(" ")))?;
        Ok(out)
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("`cargo xtask {}` failed:\n{stderr}", args.join(" "));
        }
        // Progress and PASS lines, for the log.
        for line in stderr
            .lines()
            .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
        {
            eprintln!("  {line}");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Runs the lab end to end with the xtask binary `exe`.
pub fn run(exe: &Path) -> anyhow::Result<()> {
    let lab = project_root().join(".lab").join("e2e");
    let x = Xtask {
        exe: exe.to_path_buf(),
        lab: lab.clone(),
    };
    // A leftover from an interrupted run is cleaned first.
    let _ = x.run(&["cleanup"]);
    let result = scenarios(&x, &lab);
    let cleanup = x.ok(&["cleanup"]);
    result?;
    cleanup?;
    ensure!(
        !lab.join("state.json").exists(),
        "cleanup left the lab state behind"
    );
    let after = x.run(&["status"])?;
    let msg = String::from_utf8_lossy(&after.stderr);
    ensure!(
        !after.status.success() && msg.contains("run `cargo xtask setup` first"),
        "status without a lab: {msg}"
    );
    Ok(())
}

fn scenarios(x: &Xtask, lab: &Path) -> anyhow::Result<()> {
    // Bad input is refused before anything exists.
    let bad = x.run(&["scenario", "scale-shards", "0"])?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("shards must be")
    );
    let none = x.run(&["scenario", "restart-all"])?;
    ensure!(String::from_utf8_lossy(&none.stderr).contains("run `cargo xtask setup` first"));

    x.ok(&["setup", "--driver", "local"])?;
    // Setup again on a running lab is safe.
    x.ok(&["setup"])?;
    let report_path = lab.join("report.json");
    let report = report_path.display().to_string();
    x.ok(&["scenario", "all", "--report", &report])?;
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    let rows = rows.as_array().context("report is a list")?;
    let get = |name: &str| {
        rows.iter()
            .find(|r| r["scenario"] == name)
            .with_context(|| format!("{name} missing"))
    };
    let mut produced = 0;
    for (name, limit) in [
        ("setup", 10),
        ("scale-shards", 20),
        ("scale-workers", 6),
        ("restart-all", 6),
        ("lease-cap", 80),
        ("config-change", 100),
    ] {
        let r = get(name)?;
        ensure!(r["pass"] == true, "{name} failed: {}", r["detail"]);
        ensure!(
            r["observed_limit"] == limit,
            "{name}: observed {} want {limit}",
            r["observed_limit"]
        );
        // Records flowed through the scenario and each was processed exactly once.
        let rec = &r["records"];
        ensure!(
            rec["duplicated"] == 0 && rec["lost"] == 0 && rec["overlaps"] == 0,
            "{name}: records {rec}"
        );
        produced += rec["produced"].as_u64().unwrap_or(0);
        eprintln!(
            "  {name}: limit {limit} in {:.1}s; records put {}, read {}, twice {}, lost {}",
            r["converged_seconds"].as_f64().unwrap_or(0.0),
            rec["produced"],
            rec["processed"],
            rec["duplicated"],
            rec["lost"]
        );
    }
    ensure!(
        produced > 0,
        "no records were produced during the scenarios"
    );
    ensure!(get("lease-cap")?["capacity_deficit"] == 60);
    ensure!(get("lease-cap")?["workers_needed"] == 4);
    let restart = get("restart-all")?;
    ensure!(
        restart["epoch_after"].as_u64() > restart["epoch_before"].as_u64(),
        "epoch did not increase"
    );
    ensure!(
        get("scale-workers")?["max_unowned_seen"] == 0,
        "a shard was unowned while workers started"
    );

    let monitor = x.ok(&["monitor", "--once"])?;
    ensure!(
        monitor
            .contains("max_leases_per_worker = 100 = min(cap 100, ceil(300 shards / 3 workers))"),
        "{monitor}"
    );
    let status: serde_json::Value = serde_json::from_str(&x.ok(&["status", "--json"])?)?;
    ensure!(status["workers"].as_array().map(Vec::len) == Some(3));
    ensure!(status["snapshot"]["leases"]["unowned_readable"] == 0);
    ensure!(
        status["records"]["produced"].as_u64() > Some(0)
            && status["records"]["overlaps"] == 0
            && status["records"]["duplicated"] == 0,
        "status records: {}",
        status["records"]
    );
    Ok(())
}
