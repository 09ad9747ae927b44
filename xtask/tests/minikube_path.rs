//! The README's first path — `cargo xtask setup` (minikube driver), scenarios, `monitor`,
//! `status`, `cleanup` — run through the real xtask binary against stand-in `minikube`,
//! `kubectl`, `docker` and `nix` executables (tests/standins/standin.py: they record every
//! call and answer like the real tools, including workers that are not ready until the init
//! Job has created the stream). What is asserted is what a user would see: the order of the
//! calls, the state file, which image runs, when the workers restart, and that cleanup can be
//! repeated.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Lab {
    root: PathBuf,
    standins: PathBuf,
    lab: PathBuf,
}

impl Lab {
    fn new(name: &str) -> Lab {
        let root = std::env::temp_dir().join(format!("kds-minikube-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let standins = root.join("bin");
        std::fs::create_dir_all(&standins).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/standins/standin.py");
        for tool in ["minikube", "kubectl", "docker", "nix"] {
            symlink(&script, standins.join(tool)).unwrap();
        }
        Lab {
            lab: root.join("lab"),
            standins,
            root,
        }
    }

    fn xtask(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = format!(
            "{}:{}",
            self.standins.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
            .env("PATH", path)
            .env("STANDIN_DIR", &self.root)
            .env("XTASK_LAB_DIR", &self.lab)
            // The host's free memory is not what these tests are about.
            .env("XTASK_ASSUME_FREE_MIB", "16000")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        eprintln!(
            "$ cargo xtask {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.xtask(args, env);
        assert!(out.status.success(), "cargo xtask {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every stand-in call so far, one line each (`tool args…`).
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn cluster(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.root.join("cluster.json")).unwrap())
            .unwrap()
    }

    fn state_file(&self) -> PathBuf {
        self.lab.join("state.json")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn index(calls: &[String], needle: &str) -> usize {
    calls
        .iter()
        .position(|c| c.contains(needle))
        .unwrap_or_else(|| panic!("no call containing {needle:?} in {calls:#?}"))
}

/// A setup that cannot start records nothing: no state file, so `setup --driver local` and
/// `cleanup` are not trapped by a lab that does not exist.
#[test]
fn a_failed_or_refused_setup_records_nothing() {
    let lab = Lab::new("refused");
    let out = lab.xtask(&["setup"], &[("STANDIN_DOCKER_DOWN", "1")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(stderr.contains("`docker info` fails"), "{stderr}");
    assert!(stderr.contains("--driver local"), "{stderr}");
    assert!(
        !lab.calls().iter().any(|c| c.starts_with("minikube start")),
        "preflight refused, yet minikube was started: {:#?}",
        lab.calls()
    );
    assert!(!lab.state_file().exists());

    let out = lab.xtask(&["setup"], &[("STANDIN_MINIKUBE_START_FAILS", "1")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`minikube` failed"));
    assert!(!lab.state_file().exists(), "a failed start recorded a lab");
    let cleanup = lab.ok(&["cleanup"], &[]);
    assert!(cleanup.contains("nothing to clean up"), "{cleanup}");
}

#[test]
fn setup_scenarios_monitor_and_cleanup_through_the_minikube_driver() {
    let lab = Lab::new("path");

    // setup: LocalStack ready -> init Job done -> workers rolled out.
    lab.ok(&["setup"], &[]);
    let calls = lab.calls();
    let order = [
        "minikube start -p kds-lab",
        "nix --extra-experimental-features nix-command flakes build .#image",
        "minikube -p kds-lab image load",
        "kubectl --context kds-lab -n kds-lab delete job/kds-init --ignore-not-found",
        "kubectl --context kds-lab -n kds-lab apply -k",
        "rollout status deployment/localstack",
        "wait --for=condition=complete job/kds-init",
        "rollout status statefulset/kds-consumer",
        "admin snapshot --json",
    ];
    let at: Vec<usize> = order.iter().map(|n| index(&calls, n)).collect();
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "calls out of order: {order:#?} at {at:?}\n{calls:#?}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lab.state_file()).unwrap()).unwrap();
    assert_eq!(state["driver"], "minikube");
    // The workers run the image just built and loaded, tagged by its contents.
    let cluster = lab.cluster();
    let image = cluster["ns"]["sts"]["template"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        image.starts_with("kds-worker:") && image != "kds-worker:dev",
        "{image}"
    );
    assert!(
        cluster["profile"]["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == &image[..])
    );
    assert!(
        cluster.get("pulls_of_missing_images").is_none(),
        "{cluster}"
    );
    assert_eq!(cluster["ns"]["sts"]["rollouts"], 0);

    // The README's scenario, then every scenario, checked like the local lab's.
    lab.ok(&["scenario", "scale-shards", "60"], &[]);
    assert_eq!(lab.cluster()["ns"]["stream_shards"], 60);
    let report = lab.root.join("all.json");
    lab.ok(
        &["scenario", "all", "--report", report.to_str().unwrap()],
        &[],
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6, "{rows:#?}");
    assert!(rows.iter().all(|r| r["pass"] == true), "{rows:#?}");
    // config-change rolled the workers by the ConfigMap's hash.
    let after_all = lab.cluster();
    assert_eq!(after_all["ns"]["sts"]["rollouts"], 1);
    assert!(
        after_all["ns"]["configmap"]
            .as_str()
            .unwrap()
            .contains("max_leases_cap = 100")
    );

    let monitor = lab.ok(&["monitor", "--once"], &[]);
    assert!(monitor.contains("300"), "{monitor}");
    let status: serde_json::Value =
        serde_json::from_str(&lab.ok(&["status", "--json"], &[])).unwrap();
    assert_eq!(status["driver"], "minikube");
    assert_eq!(status["snapshot"]["open_shards"], 300);
    assert_eq!(status["workers"].as_array().unwrap().len(), 3);

    // Re-running setup restores the ConfigMap and rolls the workers once; an unchanged
    // setup restarts nothing; a rebuilt worker gets a new tag and is rolled out.
    lab.ok(&["setup"], &[]);
    let c = lab.cluster();
    assert!(
        c["ns"]["configmap"]
            .as_str()
            .unwrap()
            .contains("max_leases_cap = 80")
    );
    assert_eq!(c["ns"]["sts"]["rollouts"], 2);
    lab.ok(&["setup"], &[]);
    assert_eq!(
        lab.cluster()["ns"]["sts"]["rollouts"],
        2,
        "an unchanged setup rolled the workers"
    );
    lab.ok(&["setup"], &[("STANDIN_IMAGE_CONTENT", "worker-v2")]);
    let c = lab.cluster();
    assert_eq!(c["ns"]["sts"]["rollouts"], 3);
    let rebuilt = c["ns"]["sts"]["template"]["image"].as_str().unwrap();
    assert_ne!(rebuilt, image);
    assert_eq!(
        c["ns"]["job"]["image"], rebuilt,
        "the init Job runs the new image too"
    );

    // A stopped cluster: cleanup --all still deletes the profile and the lab's files.
    Command::new(lab.standins.join("minikube"))
        .args(["stop", "-p", "kds-lab"])
        .env("STANDIN_DIR", &lab.root)
        .status()
        .unwrap();
    lab.ok(&["cleanup", "--all"], &[]);
    let calls = lab.calls();
    assert!(
        calls
            .last()
            .unwrap()
            .starts_with("minikube delete -p kds-lab"),
        "{calls:#?}"
    );
    assert!(lab.cluster()["profile"].is_null());
    assert!(!lab.state_file().exists());
    for left in [
        "kustomize",
        "image",
        "kds-worker-image.tar",
        "configmap.yaml",
    ] {
        assert!(!lab.lab.join(left).exists(), "cleanup left .lab/{left}");
    }
    // Idempotent.
    assert!(lab.ok(&["cleanup"], &[]).contains("nothing to clean up"));
    lab.ok(&["cleanup", "--all"], &[]);
    assert!(
        lab.calls()
            .last()
            .unwrap()
            .starts_with("minikube delete -p kds-lab")
    );
}

/// A Nix that cannot build (no build users, flakes refused) falls back to the Dockerfile with
/// a one-line reason; the Docker image is tagged by its id. `cleanup` (without --all) keeps
/// the profile; `cleanup --all` later still removes it.
#[test]
fn docker_fallback_then_cleanup_then_cleanup_all() {
    let lab = Lab::new("twice");
    let out = lab.xtask(&["setup"], &[("STANDIN_NIX_FAILS", "1")]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nix could not build the image (") && stderr.contains("Dockerfile instead"),
        "{stderr}"
    );
    let calls = lab.calls();
    let build = index(&calls, "docker build -t kds-worker:build .");
    let tag = index(&calls, "docker tag kds-worker:build kds-worker:");
    let load = index(&calls, "minikube -p kds-lab image load kds-worker:");
    assert!(build < tag && tag < load, "{calls:#?}");
    let running = lab.cluster()["ns"]["sts"]["template"]["image"].clone();
    let tag = running
        .as_str()
        .unwrap()
        .strip_prefix("kds-worker:")
        .unwrap()
        .to_owned();
    assert!(
        tag.len() == 12 && tag.chars().all(|c| c.is_ascii_hexdigit()),
        "{tag}"
    );
    assert!(calls[load].ends_with(&tag));
    lab.ok(&["cleanup"], &[]);
    assert!(!lab.state_file().exists());
    let c = lab.cluster();
    assert!(c["ns"].is_null() && !c["profile"].is_null(), "{c}");
    lab.ok(&["cleanup", "--all"], &[]);
    assert!(lab.cluster()["profile"].is_null());
    assert!(lab.ok(&["cleanup"], &[]).contains("nothing to clean up"));
}
