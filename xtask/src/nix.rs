//! The Nix checks that can run on a machine without the Nix binary cache or GitHub (part of
//! `cargo xtask test` when `nix` is installed): the flake parses, the lock parses and matches
//! the inputs, the outputs evaluate against stand-ins for nixpkgs and crane that check every
//! argument (xtask/flake-eval.nix), nixpkgs-fmt and deadnix are clean. Evaluating against the
//! real nixpkgs and building run in the user's CI (`nix flake check`,
//! .github/workflows/ci.yml). nixfmt, the newer official formatter, is a Haskell program that
//! cannot be installed here, so the flake stays in nixpkgs-fmt's style.

use std::path::{Path, PathBuf};

use anyhow::Context;
use xshell::{Shell, cmd};

use crate::util::{lab_dir, project_root, tools_dir};

/// Any working Nix (the checks below need only `nix-instantiate` and `nix flake metadata`).
pub fn available() -> bool {
    crate::util::nix_version().is_some()
}

/// nixpkgs-fmt and deadnix: the ones on PATH (`nix develop` provides both), else built once
/// from crates.io into .lab/tools/cargo.
fn linters(sh: &Shell) -> anyhow::Result<(PathBuf, PathBuf)> {
    let on_path = |tool: &str| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    };
    if let (Some(fmt), Some(dead)) = (on_path("nixpkgs-fmt"), on_path("deadnix")) {
        return Ok((fmt, dead));
    }
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
    evaluate()?;
    let (fmt, dead) = linters(sh)?;
    cmd!(sh, "{fmt} --check flake.nix")
        .run()
        .context("nixpkgs-fmt: run `nix fmt`")?;
    cmd!(sh, "{dead} --fail flake.nix")
        .run()
        .context("deadnix found unused bindings")?;
    Ok(())
}

/// Breakages the stand-in evaluation must catch, each a small edit of flake.nix (from, to,
/// the error expected): if one evaluates cleanly, the stand-ins no longer check that.
const MUST_FAIL: &[(&str, &str, &str)] = &[
    ("created =", "creatd =", "unknown argument(s) [\"creatd\"]"),
    ("\"${part 0 4}-", "\"@${part 0 4}-", "is not ISO 8601"),
    (
        "cargoClippyExtraArgs",
        "cargoClipyExtraArgs",
        "unknown argument(s) [\"cargoClipyExtraArgs\"]",
    ),
    (
        "inherit src;\n              pname = \"kds-lease-lab\";\n              version = \"0.1.0\";\n",
        "inherit src;\n",
        "craneLib.cargoFmt: missing argument(s) [\"pname\",\"version\"]",
    ),
];

/// `nix-instantiate --eval` of xtask/flake-eval.nix over `flake`: its JSON, or its error.
fn eval_with_stand_ins(flake: &Path) -> Result<String, String> {
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .arg(project_root().join("xtask/flake-eval.nix"))
        .arg("--arg")
        .arg("flakeFile")
        .arg(flake)
        .output()
        .map_err(|e| format!("nix-instantiate: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// flake.nix's outputs evaluated against stand-ins for nixpkgs and crane (no downloads): every
/// builder argument is one the real builder takes, the image's `created` is ISO 8601, every
/// package, check and shell evaluates; then each of [`MUST_FAIL`] must fail as expected.
fn evaluate() -> anyhow::Result<()> {
    let flake = project_root().join("flake.nix");
    let out = eval_with_stand_ins(&flake).map_err(|e| {
        anyhow::anyhow!("flake.nix's outputs do not evaluate against xtask/flake-eval.nix:\n{e}")
    })?;
    let summary: serde_json::Value = serde_json::from_str(&out)?;
    let linux = &summary["x86_64-linux"];
    anyhow::ensure!(
        linux["image"]["created"] == "2026-11-28T09:30:00Z",
        "the image's created time is not the commit time in ISO 8601: {}",
        linux["image"]["created"]
    );
    anyhow::ensure!(
        linux["image"]["tag"].is_null(),
        "the image has a fixed tag; `cargo xtask setup` relies on Nix's content tag"
    );
    for check in [
        "kds-clippy",
        "kds-fmt",
        "kds-image-streams",
        "kds-emulator-tests",
    ] {
        anyhow::ensure!(
            linux["checks"]
                .as_array()
                .is_some_and(|c| c.iter().any(|v| v == check)),
            "flake check {check} is missing on Linux: {}",
            linux["checks"]
        );
    }
    anyhow::ensure!(
        summary["aarch64-darwin"]["image"].is_null(),
        "the image must be Linux-only"
    );
    let text = std::fs::read_to_string(&flake)?;
    let dir = lab_dir().join("nix").join("broken");
    std::fs::create_dir_all(&dir)?;
    let broken = dir.join("flake.nix");
    // flake.nix reads the toolchain file beside it.
    std::fs::copy(
        project_root().join("rust-toolchain.toml"),
        dir.join("rust-toolchain.toml"),
    )?;
    for (from, to, expected) in MUST_FAIL {
        anyhow::ensure!(
            text.contains(from),
            "flake.nix no longer contains {from:?}: update MUST_FAIL in xtask/src/nix.rs"
        );
        std::fs::write(&broken, text.replacen(from, to, 1))?;
        match eval_with_stand_ins(&broken) {
            Err(e) if e.contains(expected) => {}
            Err(e) => anyhow::bail!(
                "flake.nix with {from:?} -> {to:?} should fail with {expected:?}, got:\n{e}"
            ),
            Ok(_) => anyhow::bail!(
                "flake.nix with {from:?} -> {to:?} evaluated cleanly: xtask/flake-eval.nix no longer checks it"
            ),
        }
    }
    Ok(())
}
