//! `cargo xtask setup`: check what the driver needs, create the lab, then check phase 1 like
//! every scenario.

use std::time::Duration;

use anyhow::bail;

use crate::driver::open_driver;
use crate::runner::Runner;
use crate::scenario::{self, MAX_WORKERS, parse_count, parse_shards};
use crate::state::{DriverKind, load_state};
use crate::{kube, preflight};

pub fn run(
    driver: Option<DriverKind>,
    shards: &str,
    workers: &str,
    dry: bool,
) -> anyhow::Result<()> {
    let shards = parse_shards("--shards", shards)?;
    let workers = parse_count("--workers", workers, MAX_WORKERS)?;
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
