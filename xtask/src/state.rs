//! `.lab/state.json`: which driver `setup` used and what it created, so later commands find
//! the lab and `cleanup` removes exactly that.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::util::lab_dir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// A Minikube profile `kds-lab` (started, image loaded, deleted by `cleanup --all`).
    Minikube,
    /// The current kube context; no cluster lifecycle.
    Cluster,
    /// No cluster, no Docker: emulators on loopback and worker processes, state under .lab/.
    Local,
}

/// `.lab/state.json`: what `setup` created, so later commands find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub driver: DriverKind,
    #[serde(default)]
    pub local: Option<LocalState>,
}

pub fn state_path() -> PathBuf {
    lab_dir().join("state.json")
}

pub fn load_state() -> anyhow::Result<Option<State>> {
    let path = state_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!("{} is damaged; run `cargo xtask cleanup`", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Written to a temporary file and renamed: a crash never leaves half a state file.
pub fn save_state(state: &State) -> anyhow::Result<()> {
    let path = state_path();
    std::fs::create_dir_all(lab_dir())?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

pub fn require_lab() -> anyhow::Result<State> {
    load_state()?.ok_or_else(|| {
        anyhow::anyhow!(
            "no lab is set up here (no {}): run `cargo xtask setup` first",
            state_path().display()
        )
    })
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalState {
    pub kinesis_url: String,
    pub dynamodb_url: String,
    pub emulator_pids: Vec<u32>,
    /// Worker name (`kds-consumer-N`) → process.
    pub workers: BTreeMap<String, WorkerProcess>,
    pub cap: u64,
    /// The lab's record producer (`kds-worker admin produce --out`), while it runs.
    #[serde(default)]
    pub producer_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerProcess {
    pub pid: u32,
    pub port: u16,
}
