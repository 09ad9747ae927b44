//! Reads the pins of `flake.lock` (doctor, and the tidy test that README documents them).

use anyhow::Context;

use crate::util::project_root;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakePins {
    pub nixpkgs_ref: String,
    pub nixpkgs_rev: String,
    pub nixpkgs_nar_hash: String,
    pub crane_rev: String,
    pub crane_nar_hash: String,
}

pub fn flake_pins() -> anyhow::Result<FlakePins> {
    let path = project_root().join("flake.lock");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text)
}

pub fn parse(text: &str) -> anyhow::Result<FlakePins> {
    let lock: serde_json::Value = serde_json::from_str(text).context("flake.lock is not JSON")?;
    anyhow::ensure!(lock["version"] == 7, "flake.lock version must be 7");
    let node = |name: &str| -> anyhow::Result<(String, String, String)> {
        let n = &lock["nodes"][name];
        let rev = n["locked"]["rev"]
            .as_str()
            .with_context(|| format!("{name}: no locked.rev"))?;
        let hash = n["locked"]["narHash"]
            .as_str()
            .with_context(|| format!("{name}: no locked.narHash"))?;
        let r#ref = n["original"]["ref"].as_str().unwrap_or("").to_owned();
        Ok((rev.to_owned(), hash.to_owned(), r#ref))
    };
    let (nixpkgs_rev, nixpkgs_nar_hash, nixpkgs_ref) = node("nixpkgs")?;
    let (crane_rev, crane_nar_hash, _) = node("crane")?;
    Ok(FlakePins {
        nixpkgs_ref,
        nixpkgs_rev,
        nixpkgs_nar_hash,
        crane_rev,
        crane_nar_hash,
    })
}
