//! `cargo xtask cleanup [--all]`: remove the lab the state file records (idempotent).

use crate::driver::open_driver;
use crate::runner::{self, Runner};
use crate::state::load_state;
use crate::{kube, preflight};

pub fn run(all: bool, dry: bool) -> anyhow::Result<()> {
    match load_state()? {
        Some(state) => open_driver(state.driver, Runner::new(dry)?)?.cleanup(all),
        // The lab is gone but `--all` still deletes the Minikube profile, if minikube is
        // here (`minikube delete` of a missing profile succeeds): a profile left by an
        // earlier `cleanup` or a failed setup is never stranded.
        None if all && preflight::Probe::run().minikube => {
            println!(
                "no lab set up here; deleting the Minikube profile {}",
                kube::PROFILE
            );
            Runner::new(dry)?.run("minikube", &runner::args(["delete", "-p", kube::PROFILE]))
        }
        None => {
            println!("nothing to clean up (no lab set up here)");
            Ok(())
        }
    }
}
