//! The Nix checks that can run on a machine without the Nix binary cache or GitHub (part of
//! `cargo xtask test` when `nix` is installed): the flake parses, the lock parses and matches
//! the inputs, nixpkgs-fmt and deadnix are clean. Evaluating against nixpkgs and building run
//! in the user's CI (`nix flake check`, .github/workflows/ci.yml).

use std::path::PathBuf;

use anyhow::Context;
use xshell::{Shell, cmd};

use crate::util::{lab_dir, tools_dir};

pub fn available(sh: &Shell) -> bool {
    cmd!(sh, "nix --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}

/// nixpkgs-fmt and deadnix, built once from crates.io into .lab/tools/cargo.
fn linters(sh: &Shell) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = tools_dir().join("cargo");
    let bin = root.join("bin");
    let (fmt, dead) = (bin.join("nixpkgs-fmt"), bin.join("deadnix"));
    if !fmt.is_file() || !dead.is_file() {
        eprintln!("installing nixpkgs-fmt and deadnix (cargo install --locked, once)");
        cmd!(
            sh,
            "cargo install --quiet --locked --root {root} nixpkgs-fmt deadnix"
        )
        .run()
        .context("cargo install nixpkgs-fmt deadnix")?;
    }
    Ok((fmt, dead))
}

pub fn check(sh: &Shell) -> anyhow::Result<()> {
    cmd!(sh, "nix-instantiate --parse flake.nix")
        .quiet()
        .ignore_stdout()
        .run()
        .context("flake.nix does not parse")?;
    // A throwaway store and no substituters: nothing is downloaded.
    let conf_dir = lab_dir().join("nix");
    std::fs::create_dir_all(&conf_dir)?;
    let conf = conf_dir.join("nix.conf");
    std::fs::write(
        &conf,
        "sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command flakes\n",
    )?;
    let store = conf_dir.join("store");
    let out = cmd!(
        sh,
        "nix --store {store} flake metadata --no-update-lock-file ."
    )
    .env("NIX_USER_CONF_FILES", &conf)
    .quiet()
    .read()
    .context(
        "nix flake metadata: flake.lock does not parse or does not match flake.nix's inputs",
    )?;
    let pins = crate::nixpins::flake_pins()?;
    anyhow::ensure!(
        out.contains(&pins.nixpkgs_rev) && out.contains(&pins.crane_rev),
        "nix flake metadata does not show the locked revisions:\n{out}"
    );
    let (fmt, dead) = linters(sh)?;
    cmd!(sh, "{fmt} --check flake.nix")
        .run()
        .context("nixpkgs-fmt: run `nix fmt`")?;
    cmd!(sh, "{dead} --fail flake.nix")
        .run()
        .context("deadnix found unused bindings")?;
    Ok(())
}
