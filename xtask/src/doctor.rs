//! `cargo xtask doctor`: which tools are here (with versions), which are missing, how to get
//! them, and which image build path `setup` will take.

use std::process::Command;

use crate::state::DriverKind;

/// (tool, version flag, needed for, pinned version in flake.nix if any)
const TOOLS: &[(&str, &str, &str)] = &[
    ("cargo", "--version", "everything"),
    ("node", "--version", "kinesis-mock (local driver, tests)"),
    ("npm", "--version", "installing kinesis-mock"),
    ("python3", "--version", "moto server (local driver, tests)"),
    ("kubectl", "version --client", "minikube / cluster drivers"),
    ("minikube", "version --short", "minikube driver"),
    ("docker", "--version", "image build without Nix"),
    (
        "awslocal",
        "--version",
        "poking LocalStack by hand (optional)",
    ),
    ("nix", "--version", "nix develop, nix build .#image"),
];

pub fn version_of(tool: &str, flag: &str) -> Option<String> {
    let out = Command::new(tool)
        .args(flag.split_whitespace())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_owned();
    (out.status.success() || !line.is_empty()).then_some(line)
}

/// Versions `nix develop` recorded for the flake's pinned tools (see flake.nix's shellHook).
fn flake_versions() -> std::collections::BTreeMap<String, String> {
    let path = crate::util::project_root().join(".lab/flake-tools.tsv");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(t, v)| (t.to_owned(), v.trim().to_owned()))
        .collect()
}

pub fn run() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let pinned = flake_versions();
    let mut differs = Vec::new();
    println!("{:<10} {:<44} needed for", "tool", "version");
    for (tool, flag, why) in TOOLS {
        match version_of(tool, flag) {
            Some(v) => {
                println!("{tool:<10} {:<44} {why}", truncate(&v, 44));
                if let Some(p) = pinned.get(*tool)
                    && *p != v
                {
                    differs.push(format!("{tool}: here {v:?}, flake {p:?}"));
                }
            }
            None => {
                println!("{tool:<10} {:<44} {why}", "MISSING");
                missing.push(*tool);
            }
        }
    }
    println!();
    // What the README's first command needs, judged like `setup` judges it.
    let probe = crate::preflight::Probe::run();
    let needs = crate::preflight::needs(DriverKind::Minikube, &probe);
    println!("the Minikube path (`cargo xtask setup`):");
    for need in &needs {
        match &need.problem {
            None => println!("  ok       {}", need.what),
            Some(fix) => println!("  MISSING  {fix}"),
        }
    }
    if needs.iter().any(|n| n.problem.is_some()) {
        println!("  or, with none of that: `cargo xtask setup --driver local`");
    }
    println!();
    if crate::util::nix_builds_images(crate::util::nix_version()) {
        println!("image: `nix build .#image` (Nix found), loaded with `minikube image load`");
    } else {
        println!(
            "image: `docker build -t kds-worker:dev .` (no Nix), loaded with `minikube image load`"
        );
    }
    if let Ok(pins) = crate::nixpins::flake_pins() {
        println!(
            "flake.lock pins nixpkgs {} ({}); `nix develop` gives every developer the same kubectl, minikube and awslocal",
            &pins.nixpkgs_rev[..12],
            pins.nixpkgs_ref
        );
    }
    if pinned.is_empty() {
        println!("flake versions unknown: run `nix develop` once to record them");
    } else if differs.is_empty() {
        println!("every tool matches the version `nix develop` pins");
    } else {
        println!(
            "differs from the flake's pins (enter `nix develop`):\n  {}",
            differs.join("\n  ")
        );
    }
    if missing.is_empty() {
        println!("all tools present");
    } else {
        println!(
            "missing: {}. Enter `nix develop` for the pinned set; the local driver and `cargo xtask test` need only cargo, node/npm and python3.",
            missing.join(", ")
        );
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
