//! Repository checks as ordinary tests: docs and manifests agree with the code.

use crate::util::project_root;

fn read(path: &str) -> String {
    std::fs::read_to_string(project_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn readme_names_the_test_command_and_ci_runs_it() {
    assert!(read("README.md").contains("cargo xtask test"));
    assert!(
        read(".ci/run")
            .lines()
            .any(|l| l.trim() == "cargo xtask test")
    );
}

#[test]
fn manifests_use_the_image_xtask_builds() {
    // `setup` replaces the tag with the image's content hash (kustomize `images:`).
    let image = format!("image: {}:dev", crate::kube::IMAGE_NAME);
    assert!(read("manifests/statefulset.yaml").contains(&image));
    assert!(read("manifests/init-job.yaml").contains(&image));
    assert!(
        read("manifests/namespace.yaml").contains(&format!("name: {}", crate::kube::NAMESPACE))
    );
}

#[test]
fn every_scenario_is_documented_in_the_lab_guide() {
    let guide = read("lab/README.md");
    for s in crate::scenario::catalog().unwrap().scenario {
        assert!(
            guide.contains(&s.name),
            "lab/README.md does not mention scenario {}",
            s.name
        );
    }
}

#[test]
fn readme_documents_the_flake_lock_pins() {
    let pins = crate::nixpins::flake_pins().unwrap();
    let readme = read("README.md");
    for (what, value) in [
        ("nixpkgs rev", &pins.nixpkgs_rev),
        ("nixpkgs narHash", &pins.nixpkgs_nar_hash),
        ("crane rev", &pins.crane_rev),
        ("crane narHash", &pins.crane_nar_hash),
    ] {
        assert!(
            readme.contains(value.as_str()),
            "README.md does not show the {what} {value} of flake.lock"
        );
    }
    assert_eq!(pins.nixpkgs_ref, "nixos-26.05");
}

#[test]
fn flake_inputs_are_nixpkgs_and_crane_only() {
    let flake = read("flake.nix");
    let inputs = &flake[flake.find("inputs = {").unwrap()..flake.find("outputs =").unwrap()];
    let urls: Vec<_> = inputs.lines().filter(|l| l.contains(".url")).collect();
    assert_eq!(urls.len(), 2, "{urls:?}");
    assert!(
        inputs.contains("github:NixOS/nixpkgs/nixos-26.05")
            && inputs.contains("github:ipetkov/crane")
    );
    // The image the flake builds is the one the manifests run, tagged by its contents.
    assert!(flake.contains("imageName = \"kds-worker\"") && flake.contains("tag = null;"));
    assert_eq!(crate::kube::IMAGE_NAME, "kds-worker");
}

#[test]
fn one_shard_limit_for_xtask_and_localstack() {
    let localstack = read("manifests/localstack.yaml");
    let at = localstack
        .find("name: KINESIS_SHARD_LIMIT")
        .expect("manifests/localstack.yaml sets KINESIS_SHARD_LIMIT");
    let value = localstack[at..]
        .lines()
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("value: "))
        .map(|v| v.trim_matches('"'))
        .expect("KINESIS_SHARD_LIMIT has a value on the next line");
    assert_eq!(value, crate::scenario::MAX_SHARDS.to_string());
    let emulators = read("lab/emulators.toml");
    let mock: u64 = emulators
        .lines()
        .find_map(|l| l.strip_prefix("shard_limit = "))
        .and_then(|v| v.trim().parse().ok())
        .expect("lab/emulators.toml sets kinesis-mock's shard_limit");
    assert!(mock >= crate::scenario::MAX_SHARDS);
}

#[test]
fn the_dockerfile_copies_every_workspace_member() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let dockerfile = read("Dockerfile");
    for member in manifest["workspace"]["members"].as_array().unwrap() {
        let m = member.as_str().unwrap();
        assert!(
            dockerfile.contains(&format!("COPY {m} {m}")),
            "the Dockerfile does not copy workspace member {m}: `docker build` would fail"
        );
    }
}

/// Files tracked by git, relative to the root.
fn tracked_files() -> Vec<String> {
    let out = std::process::Command::new("git")
        .args(["ls-files", "--cached", "--others", "--exclude-standard"])
        .current_dir(project_root())
        .output()
        .expect("git ls-files");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Path-like words in `text`: `worker/src/meta.rs`, `lab/README.md`, `moto_serial.py`.
fn path_words(text: &str) -> Vec<String> {
    const TOP: &[&str] = &[
        "worker/",
        "xtask/",
        "model/",
        "lab/",
        "manifests/",
        "docs/",
        ".ci/",
        ".github/",
    ];
    const SOURCE: &[&str] = &[".rs", ".md", ".nix", ".py"];
    text.split(|c: char| !(c.is_ascii_alphanumeric() || "._/-".contains(c)))
        .map(|w| w.trim_end_matches(['.', '/']))
        .filter(|w| {
            TOP.iter().any(|t| w.starts_with(t) && w.len() > t.len())
                || (!w.contains('/') && SOURCE.iter().any(|s| w.ends_with(s) && w.len() > s.len()))
        })
        .map(str::to_owned)
        .collect()
}

/// Files of other projects that comments name on purpose.
const ELSEWHERE: &[&str] = &[
    // nixpkgs' dockerTools script that parses the image's `created`.
    "stream_layered_image.py",
];

/// A comment (or a doc) that names a file sends the reader to it: the file must exist.
#[test]
fn comments_name_only_files_that_exist() {
    let files = tracked_files();
    let exists = |word: &str| {
        if ELSEWHERE.contains(&word) {
            return true;
        }
        if word.contains('/') {
            // A path, or a directory holding tracked files.
            files
                .iter()
                .any(|f| f == word || f.starts_with(&format!("{word}/")))
        } else {
            files.iter().any(|f| f.rsplit('/').next() == Some(word))
        }
    };
    let mut missing = Vec::new();
    for file in &files {
        let marker = match file.rsplit('.').next() {
            Some("rs") => "//",
            Some("toml" | "nix" | "py" | "yaml" | "yml") => "#",
            Some("md") => "",
            _ => continue,
        };
        let Ok(text) = std::fs::read_to_string(project_root().join(file)) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let comment = if marker.is_empty() {
                line
            } else {
                match line.find(marker) {
                    Some(at) => &line[at..],
                    None => continue,
                }
            };
            for word in path_words(comment) {
                if !exists(&word) {
                    missing.push(format!("{file}:{}: {word}", n + 1));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "comments name files that do not exist:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn path_words_are_found() {
    assert_eq!(
        path_words("see worker/src/meta.rs and moto_serial.py, not config.toml or e.g."),
        ["worker/src/meta.rs", "moto_serial.py"]
    );
}
