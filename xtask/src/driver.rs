//! Opens the driver a lab runs on (the one place that knows every driver).

use crate::lab::Driver;
use crate::runner::Runner;
use crate::state::DriverKind;

/// The driver a lab was (or is being) set up with.
pub fn open_driver(kind: DriverKind, runner: Runner) -> anyhow::Result<Box<dyn Driver>> {
    Ok(match kind {
        DriverKind::Local => Box::new(crate::local::Local::open(runner)?),
        DriverKind::Minikube => Box::new(crate::kube::Kube::new(runner, true)),
        DriverKind::Cluster => Box::new(crate::kube::Kube::new(runner, false)),
    })
}
