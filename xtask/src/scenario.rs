//! Scenarios: read from `lab/scenarios.toml`, applied through a driver, checked against the
//! formula, reported as a PASS/FAIL table (and JSON with `--report`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::lab::{Audit, Driver, Snapshot};
use crate::util::{project_root, secs};

/// Most shards the lab may ask for: LocalStack's `KINESIS_SHARD_LIMIT` in
/// manifests/localstack.yaml (a tidy test keeps them equal; kinesis-mock allows more).
pub const MAX_SHARDS: u64 = 2_000;
pub const MAX_WORKERS: u64 = 100;
/// How long a scenario may take to converge: lease-cap (30 → 300 shards, 240 leases acquired)
/// took 116 s on a loaded 2-core machine with records flowing; three times that for a slower one.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(360);

#[derive(Debug, Clone, Deserialize)]
pub struct Catalog {
    pub scenario: Vec<Scenario>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub shards: Option<u64>,
    pub workers: Option<u64>,
    pub cap: Option<u64>,
    #[serde(default)]
    pub restart: bool,
    /// Which key the command-line number overrides.
    pub param: Option<String>,
    pub expect_limit: Option<u64>,
    pub expect_deficit: Option<u64>,
    #[serde(default)]
    pub expect_epoch_increase: bool,
    #[serde(default = "yes")]
    pub run_in_all: bool,
}

fn yes() -> bool {
    true
}

pub fn load_catalog(path: &Path) -> anyhow::Result<Catalog> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let catalog: Catalog =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    for s in &catalog.scenario {
        if let Some(p) = &s.param
            && !["shards", "workers", "cap"].contains(&p.as_str())
        {
            bail!(
                "{}: scenario {}: param must be shards, workers or cap, not {p:?}",
                path.display(),
                s.name
            );
        }
        for (key, v, max) in [
            ("shards", s.shards, MAX_SHARDS),
            ("workers", s.workers, MAX_WORKERS),
            ("cap", s.cap, u64::MAX),
        ] {
            if v == Some(0) || v.is_some_and(|v| v > max) {
                bail!(
                    "{}: scenario {}: {key} must be 1..={max}",
                    path.display(),
                    s.name
                );
            }
        }
    }
    Ok(catalog)
}

pub fn catalog() -> anyhow::Result<Catalog> {
    load_catalog(&project_root().join("lab/scenarios.toml"))
}

impl Catalog {
    pub fn get(&self, name: &str) -> anyhow::Result<Scenario> {
        self.scenario
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<_> = self.scenario.iter().map(|s| s.name.as_str()).collect();
                anyhow::anyhow!(
                    "no scenario {name:?} in lab/scenarios.toml; there are: {}",
                    names.join(", ")
                )
            })
    }
}

/// Parses a command-line count: a clear error names what was wrong, before anything changes.
pub fn parse_count(what: &str, text: &str, max: u64) -> anyhow::Result<u64> {
    let n: i64 = text.trim().parse().map_err(|_| {
        anyhow::anyhow!("{what} must be a whole number from 1 to {max}, not {text:?}")
    })?;
    if n < 1 || n as u64 > max {
        bail!("{what} must be from 1 to {max}, not {n}");
    }
    Ok(n as u64)
}

/// A shard count from the command line, at most [`MAX_SHARDS`] (saying why).
pub fn parse_shards(what: &str, text: &str) -> anyhow::Result<u64> {
    parse_count(what, text, MAX_SHARDS).map_err(|e| {
        e.context(format!(
            "the lab's LocalStack allows {MAX_SHARDS} shards (KINESIS_SHARD_LIMIT in manifests/localstack.yaml)"
        ))
    })
}

impl Scenario {
    /// Applies the command-line number to the key named by `param`.
    pub fn with_param(mut self, value: Option<u64>) -> anyhow::Result<Self> {
        let Some(v) = value else { return Ok(self) };
        match self.param.as_deref() {
            Some("shards") => {
                self.shards = Some(v);
                self.expect_limit = None;
                self.expect_deficit = None;
            }
            Some("workers") => {
                self.workers = Some(v);
                self.expect_limit = None;
                self.expect_deficit = None;
            }
            Some("cap") => {
                self.cap = Some(v);
                self.expect_limit = None;
                self.expect_deficit = None;
            }
            _ => bail!("scenario {} takes no number", self.name),
        }
        Ok(self)
    }
}

/// The records of one scenario, from the workers' record logs (see [`crate::lab::Audit`]).
#[derive(Debug, Clone, Serialize)]
pub struct RecordCounts {
    /// Records put while the scenario ran.
    pub produced: usize,
    /// Records processed while it ran (and until those produced were all processed).
    pub processed: usize,
    /// Records processed a second time.
    pub duplicated: usize,
    /// Records put before the scenario ended and not processed within the drain deadline.
    pub lost: usize,
    /// Records waiting on shards left unowned at the cap (a capacity deficit): not read by
    /// design until capacity allows; the next scenario without a deficit processes them.
    pub backlog: usize,
    /// Times two workers read one shard at once.
    pub overlaps: usize,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub shards: u64,
    pub workers: u64,
    pub cap: u64,
    pub expected_limit: u64,
    pub observed_limit: Option<u64>,
    pub capacity_deficit: Option<u64>,
    pub workers_needed: u64,
    pub epoch_before: u64,
    pub epoch_after: Option<u64>,
    pub max_unowned_seen: u64,
    pub converged_seconds: f64,
    pub pass: bool,
    pub detail: String,
    /// What the workers processed during this scenario (local lab only).
    pub records: Option<RecordCounts>,
}

/// What the formula and the table say must hold once the fleet has converged: the worker's
/// own policy ([`kds_model::compute`]) with every desired worker live.
pub fn expectations(shards: u64, workers: u64, cap: u64) -> (u64, u64) {
    let l = kds_model::compute(kds_model::FleetInputs {
        open_shards: shards,
        live_workers: workers,
        desired_workers: Some(workers),
        cap,
    });
    (l.max_leases_per_worker, l.capacity_deficit)
}

/// Why `snap` does not (yet) show the converged state; empty when it does.
pub fn unmet(
    snap: &Snapshot,
    shards: u64,
    workers: u64,
    limit: u64,
    deficit: u64,
    epoch_before: Option<u64>,
) -> Vec<String> {
    let mut why = Vec::new();
    let Some(l) = &snap.lease_limits else {
        return vec!["no lease_limits yet".into()];
    };
    if snap.open_shards != shards {
        why.push(format!(
            "stream has {} open shards, want {shards}",
            snap.open_shards
        ));
    }
    if (l.max_leases_per_worker, l.shard_count, l.worker_count) != (limit, shards, workers) {
        why.push(format!(
            "lease_limits says {} (shards {}, workers {}), want {limit} (shards {shards}, workers {workers})",
            l.max_leases_per_worker, l.shard_count, l.worker_count
        ));
    }
    if l.capacity_deficit != deficit {
        why.push(format!(
            "capacity_deficit {} want {deficit}",
            l.capacity_deficit
        ));
    }
    let leased = snap.leases.leased();
    let want_leased = snap.leases.readable.min(workers * limit);
    if snap.leases.parents_pending > 0 {
        why.push(format!(
            "{} closed parents not yet read to SHARD_END",
            snap.leases.parents_pending
        ));
    }
    if snap.leases.readable != shards {
        why.push(format!(
            "{} readable shards (parents not yet drained?), want {shards}",
            snap.leases.readable
        ));
    }
    if leased != want_leased {
        why.push(format!("{leased} shards leased, want {want_leased}"));
    }
    if let Some((w, n)) = snap.leases.by_owner.iter().find(|(_, n)| **n > limit) {
        why.push(format!("{w} holds {n} leases > limit {limit}"));
    }
    if snap.leases.by_owner.len() as u64 != workers.min(shards) && limit > 0 {
        why.push(format!(
            "{} workers hold leases, want {}",
            snap.leases.by_owner.len(),
            workers.min(shards)
        ));
    }
    match &snap.coordinator {
        Some(c) if !c.owner.is_empty() => {
            if let Some(before) = epoch_before
                && c.epoch <= before
            {
                why.push(format!("coordinator epoch {} not above {before}", c.epoch));
            }
        }
        _ => why.push("no coordinator".into()),
    }
    why
}

/// Applies `s` and waits until the fleet converges; never returns Err for a failed
/// expectation (that is a FAIL row), only for a broken lab.
pub fn run_one(driver: &mut dyn Driver, s: &Scenario) -> anyhow::Result<Outcome> {
    eprintln!("\n==> scenario {}: {}", s.name, s.description);
    let dry = driver.runner().dry_run;
    let before = crate::lab::retrying(
        "reading the lab's state",
        crate::lab::STATUS_READ_DEADLINE,
        || driver.snapshot(),
    )?;
    let epoch_before = before.coordinator.as_ref().map_or(0, |c| c.epoch);
    let records_before = driver.audit(None)?;
    let start = Instant::now();

    let current_workers = driver.desired_workers()?;
    let current_cap = driver.cap()?;
    // Fewer workers first (less to move while the stream changes), more workers after the
    // reshard has settled (so what is measured after a scale-up is the scale-up's own effect).
    let scale_to = s.workers.filter(|w| dry || *w != current_workers);
    if let Some(workers) = scale_to.filter(|w| *w < current_workers) {
        eprintln!("workers {current_workers} -> {workers}");
        driver.set_workers(workers)?;
    }
    let workers_now = driver.desired_workers()?;
    if let Some(shards) = s.shards
        && (dry || shards != before.open_shards)
    {
        eprintln!(
            "resharding {} -> {shards} (x2 or /2 per step)",
            before.open_shards
        );
        driver.set_shards(shards)?;
        if !dry && scale_to.is_some_and(|w| w > workers_now) {
            let (limit, deficit) = expectations(shards, workers_now, current_cap);
            crate::lab::wait_until(
                &format!("the reshard to settle at {shards} shards / {workers_now} workers"),
                CONVERGE_DEADLINE,
                || {
                    Ok(unmet(
                        &driver.snapshot()?,
                        shards,
                        workers_now,
                        limit,
                        deficit,
                        None,
                    )
                    .is_empty()
                    .then_some(()))
                },
                || driver.diagnostics(),
            )?;
        }
    }
    if let Some(cap) = s.cap
        && (dry || cap != current_cap)
    {
        eprintln!("max_leases_cap {current_cap} -> {cap}: config change and rolling restart");
        driver.set_cap(cap)?;
    }
    if let Some(workers) =
        scale_to.filter(|w| *w > current_workers || (dry && *w == current_workers))
    {
        eprintln!("workers {workers_now} -> {workers}");
        driver.set_workers(workers)?;
    }
    if s.restart {
        eprintln!("deleting every worker at once");
        driver.restart_all()?;
    }

    let shards = s.shards.unwrap_or(before.open_shards);
    let workers = s.workers.unwrap_or(current_workers);
    let cap = s.cap.unwrap_or(current_cap);
    let (limit, deficit) = expectations(shards, workers, cap);
    let limit = s.expect_limit.unwrap_or(limit);
    let deficit = s.expect_deficit.unwrap_or(deficit);
    let epoch_check = (s.expect_epoch_increase || s.restart).then_some(epoch_before);

    let mut outcome = Outcome {
        scenario: s.name.clone(),
        shards,
        workers,
        cap,
        expected_limit: limit,
        observed_limit: None,
        capacity_deficit: None,
        workers_needed: kds_model::compute(kds_model::FleetInputs {
            open_shards: shards,
            live_workers: workers,
            desired_workers: Some(workers),
            cap,
        })
        .workers_needed,
        epoch_before,
        epoch_after: None,
        max_unowned_seen: 0,
        converged_seconds: 0.0,
        pass: false,
        detail: String::new(),
        records: None,
    };
    if dry {
        outcome.pass = true;
        outcome.detail = "dry run".into();
        return Ok(outcome);
    }
    let mut last = Snapshot::default();
    let mut last_why = Vec::new();
    let result = crate::lab::wait_until(
        &format!("limit {limit} with {shards} shards / {workers} workers, every shard leased"),
        CONVERGE_DEADLINE,
        || {
            let snap = driver.snapshot()?;
            // Coverage is sampled on the way: with the stream settled (no parent draining,
            // whose children are briefly unowned by design), a shard unowned beyond the
            // deficit is a gap.
            if snap.leases.parents_pending == 0 && snap.open_shards == shards {
                let gap = snap.leases.unowned_readable.saturating_sub(deficit);
                outcome.max_unowned_seen = outcome.max_unowned_seen.max(gap);
            }
            last_why = unmet(&snap, shards, workers, limit, deficit, epoch_check);
            last = snap;
            Ok(last_why.is_empty().then_some(()))
        },
        || driver.diagnostics(),
    );
    outcome.converged_seconds = start.elapsed().as_secs_f64();
    outcome.observed_limit = last.lease_limits.as_ref().map(|l| l.max_leases_per_worker);
    outcome.capacity_deficit = last.lease_limits.as_ref().map(|l| l.capacity_deficit);
    outcome.epoch_after = last.coordinator.as_ref().map(|c| c.epoch);
    match result {
        Ok(_) => {
            outcome.pass = true;
            outcome.detail = if deficit > 0 {
                format!(
                    "{deficit} shards unowned at the cap; {} workers would cover them",
                    outcome.workers_needed
                )
            } else {
                "every shard leased, nobody above the limit".into()
            };
            if let Some(before) = &records_before {
                let counts = drain_records(driver, before, deficit == 0)?;
                let mut problems = Vec::new();
                if counts.lost > 0 {
                    problems.push(format!("{} records not processed", counts.lost));
                }
                if counts.duplicated > 0 {
                    problems.push(format!("{} records processed twice", counts.duplicated));
                }
                if counts.overlaps > 0 {
                    problems.push(format!("{} overlapping reads", counts.overlaps));
                }
                if !problems.is_empty() {
                    outcome.pass = false;
                    outcome.detail = problems.join("; ");
                }
                outcome.records = Some(counts);
            }
        }
        Err(e) => {
            // What it waited for, the last error, and events or log lines.
            eprintln!("{e:#}");
            outcome.detail = last_why.join("; ");
        }
    }
    eprintln!(
        "{} {} in {}: {}",
        if outcome.pass { "PASS" } else { "FAIL" },
        s.name,
        secs(Duration::from_secs_f64(outcome.converged_seconds)),
        outcome.detail
    );
    Ok(outcome)
}

/// How long records put before a scenario converged may take to be processed: the longest
/// idle poll of the local lab (20 s), a failover, and room for a loaded machine.
const DRAIN_DEADLINE: Duration = Duration::from_secs(90);

/// Waits until every record produced so far is processed, then counts what the scenario
/// added since `before`. Nothing in a scenario kills a worker: any duplicate is a failure.
/// With shards left unowned at the cap (`all_readable` false) their records wait by design:
/// they are counted as a backlog, not awaited (the next scenario without a deficit drains
/// them).
fn drain_records(
    driver: &dyn Driver,
    before: &Audit,
    all_readable: bool,
) -> anyhow::Result<RecordCounts> {
    let upto = driver.audit(None)?.map_or(0, |a| a.produced);
    if !all_readable {
        let now = driver.audit(Some(upto))?.unwrap_or_default();
        return Ok(RecordCounts {
            produced: upto.saturating_sub(before.produced),
            processed: now.processed.saturating_sub(before.processed),
            duplicated: now.duplicates.saturating_sub(before.duplicates),
            lost: 0,
            backlog: now.lost.len(),
            overlaps: now.overlaps.len().saturating_sub(before.overlaps.len()),
        });
    }
    let mut last = None;
    let drained = crate::lab::wait_until(
        &format!("the {upto} records produced so far to be processed"),
        DRAIN_DEADLINE,
        || {
            let a = driver.audit(Some(upto))?.unwrap_or_default();
            let done = a.lost.is_empty();
            last = Some(a.clone());
            Ok(done.then_some(a))
        },
        || driver.diagnostics(),
    );
    let after = match drained {
        Ok((a, _)) => a,
        Err(e) => {
            eprintln!("{e:#}");
            last.unwrap_or_default()
        }
    };
    Ok(RecordCounts {
        produced: upto.saturating_sub(before.produced),
        processed: after.processed.saturating_sub(before.processed),
        duplicated: after.duplicates.saturating_sub(before.duplicates),
        lost: after.lost.len(),
        backlog: 0,
        overlaps: after.overlaps.len().saturating_sub(before.overlaps.len()),
    })
}

pub fn print_table(rows: &[Outcome]) {
    println!(
        "\n{:<14} {:>7} {:>7} {:>4} {:>8} {:>8} {:>7} {:>6} {:>8} {:>19}  result",
        "scenario",
        "shards",
        "workers",
        "cap",
        "expected",
        "observed",
        "deficit",
        "epoch",
        "time",
        "records put/read/2x/lost"
    );
    for r in rows {
        println!(
            "{:<14} {:>7} {:>7} {:>4} {:>8} {:>8} {:>7} {:>6} {:>8} {:>19}  {}",
            r.scenario,
            r.shards,
            r.workers,
            r.cap,
            r.expected_limit,
            r.observed_limit.map_or("-".into(), |v| v.to_string()),
            r.capacity_deficit.map_or("-".into(), |v| v.to_string()),
            match r.epoch_after {
                Some(e) if e != r.epoch_before => format!("{}->{e}", r.epoch_before),
                Some(e) => e.to_string(),
                None => "-".into(),
            },
            secs(Duration::from_secs_f64(r.converged_seconds)),
            r.records.as_ref().map_or("-".into(), |c| format!(
                "{}/{}/{}/{}",
                c.produced, c.processed, c.duplicated, c.lost
            )),
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    let failed = rows.iter().filter(|r| !r.pass).count();
    println!("{} passed, {} failed", rows.len() - failed, failed);
}

pub fn write_report(path: &Path, rows: &[Outcome]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(rows)?)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[derive(clap::Subcommand)]
pub enum ScenarioCmd {
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

/// `cargo xtask scenario …`: bad numbers are refused before anything changes; then each
/// scenario runs in turn, the table is printed, and any FAIL fails the command.
pub fn run(
    which: ScenarioCmd,
    report: Option<std::path::PathBuf>,
    dry: bool,
) -> anyhow::Result<()> {
    let catalog = catalog()?;
    if let ScenarioCmd::List = which {
        for s in &catalog.scenario {
            println!("{:<14} {}", s.name, s.description);
        }
        return Ok(());
    }
    // Bad numbers are refused before anything changes.
    let plan: Vec<Scenario> = match which {
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
    let state = crate::state::require_lab()?;
    let mut d = crate::driver::open_driver(state.driver, crate::runner::Runner::new(dry)?)?;
    let mut rows = Vec::new();
    for s in &plan {
        rows.push(run_one(d.as_mut(), s)?);
    }
    print_table(&rows);
    if let Some(path) = report {
        write_report(&path, &rows)?;
        println!("report written to {}", path.display());
    }
    if rows.iter().any(|r| !r.pass) {
        bail!("some scenarios failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_holds_the_design_table() {
        let c = catalog().unwrap();
        let names: Vec<_> = c
            .scenario
            .iter()
            .filter(|s| s.run_in_all)
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "setup",
                "scale-shards",
                "scale-workers",
                "restart-all",
                "lease-cap",
                "config-change"
            ]
        );
        // Every pinned expectation agrees with the formula for the state it names.
        let (mut shards, mut workers, mut cap) = (30, 3, 80);
        for s in c.scenario.iter().filter(|s| s.run_in_all) {
            shards = s.shards.unwrap_or(shards);
            workers = s.workers.unwrap_or(workers);
            cap = s.cap.unwrap_or(cap);
            let (limit, deficit) = expectations(shards, workers, cap);
            if let Some(l) = s.expect_limit {
                assert_eq!(l, limit, "{}", s.name);
            }
            if let Some(d) = s.expect_deficit {
                assert_eq!(d, deficit, "{}", s.name);
            }
        }
        let quarter = c.get("quarter-cap").unwrap();
        assert_eq!(expectations(45, 4, 12), (quarter.expect_limit.unwrap(), 0));
    }

    #[test]
    fn bad_counts_are_refused_with_the_reason() {
        assert_eq!(parse_count("shards", "60", MAX_SHARDS).unwrap(), 60);
        for bad in ["0", "-5", "abc", "20000", "", "1.5"] {
            let err = parse_count("shards", bad, MAX_SHARDS)
                .unwrap_err()
                .to_string();
            assert!(err.contains("shards must be"), "{bad}: {err}");
        }
    }

    #[test]
    fn param_overrides_and_recomputes() {
        let s = catalog()
            .unwrap()
            .get("scale-shards")
            .unwrap()
            .with_param(Some(90))
            .unwrap();
        assert_eq!(s.shards, Some(90));
        assert_eq!(s.expect_limit, None);
        assert!(
            catalog()
                .unwrap()
                .get("restart-all")
                .unwrap()
                .with_param(Some(3))
                .is_err()
        );
    }

    #[test]
    fn a_bad_catalog_entry_is_named() {
        let dir = std::env::temp_dir().join(format!("kds-cat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.toml");
        std::fs::write(
            &p,
            "[[scenario]]\nname = \"x\"\ndescription = \"d\"\nshards = 0\n",
        )
        .unwrap();
        assert!(
            load_catalog(&p)
                .unwrap_err()
                .to_string()
                .contains("scenario x: shards")
        );
        std::fs::write(
            &p,
            "[[scenario]]\nname = \"x\"\ndescription = \"d\"\nshard = 4\n",
        )
        .unwrap();
        assert!(format!("{:#}", load_catalog(&p).unwrap_err()).contains("shard"));
    }

    #[test]
    fn convergence_checks_name_what_is_missing() {
        let snap = Snapshot::default();
        assert_eq!(
            unmet(&snap, 30, 3, 10, 0, None),
            vec!["no lease_limits yet".to_owned()]
        );
    }
}
