//! The `minikube` and `cluster` drivers: kubectl (and minikube) against the manifests.

use std::time::Duration;

use anyhow::Context;

use crate::lab::{Driver, DriverKind, Runner, Snapshot, WorkerView, args, wait_until};
use crate::util::project_root;

pub const PROFILE: &str = "kds-lab";
pub const NAMESPACE: &str = "kds-lab";
pub const STATEFULSET: &str = "kds-consumer";
pub const IMAGE: &str = "kds-worker:dev";
const SELECTOR: &str = "app.kubernetes.io/name=kds-consumer";
const CONFIG: &str = "/etc/kds-worker/config.toml";
const TIMEOUT: &str = "--timeout=600s";

pub struct Kube {
    runner: Runner,
    minikube: bool,
    /// Build the image with Nix (else the Dockerfile).
    nix: bool,
}

impl Kube {
    pub fn new(runner: Runner, minikube: bool) -> Self {
        Kube {
            runner,
            minikube,
            nix: nix_available(),
        }
    }

    /// Runs a kubectl wait; on failure adds the namespace's recent events to the error.
    fn wait(&self, rest: &[&str]) -> anyhow::Result<()> {
        self.runner
            .run("kubectl", &self.kubectl(rest))
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.recent_events()))
    }

    fn kubectl(&self, rest: &[&str]) -> Vec<String> {
        let mut a = Vec::new();
        if self.minikube {
            a.extend(["--context".to_owned(), PROFILE.to_owned()]);
        }
        a.extend(["-n".to_owned(), NAMESPACE.to_owned()]);
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    }

    fn exec_worker(&self, rest: &[&str]) -> Vec<String> {
        let mut a = vec![
            "exec",
            "kds-consumer-0",
            "-c",
            "worker",
            "--",
            "kds-worker",
            "--config",
            CONFIG,
        ];
        a.extend_from_slice(rest);
        self.kubectl(&a)
    }

    /// `nix build .#image` where Nix can build Linux images, else the Dockerfile.
    pub fn image_plan(nix_available: bool) -> Vec<(String, Vec<String>)> {
        if nix_available {
            vec![
                (
                    "nix".into(),
                    // A default Nix install has flakes off: enable them for this call only.
                    args([
                        "--extra-experimental-features",
                        "nix-command flakes",
                        "build",
                        ".#image",
                        "--out-link",
                        ".lab/image",
                    ]),
                ),
                (
                    "sh".into(),
                    args(["-c", ".lab/image > .lab/kds-worker-image.tar"]),
                ),
            ]
        } else {
            vec![("docker".into(), args(["build", "-t", IMAGE, "."]))]
        }
    }

    fn recent_events(&self) -> String {
        let out = self.runner.output(
            "kubectl",
            &self.kubectl(&["get", "events", "--sort-by=.lastTimestamp"]),
        );
        match out {
            Ok(text) => {
                let lines: Vec<_> = text.lines().collect();
                format!(
                    "recent events:\n{}",
                    lines[lines.len().saturating_sub(10)..].join("\n")
                )
            }
            Err(e) => format!("(could not read events: {e:#})"),
        }
    }
}

pub fn nix_available() -> bool {
    cfg!(target_os = "linux")
        && std::process::Command::new("nix")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

impl Driver for Kube {
    fn kind(&self) -> DriverKind {
        if self.minikube {
            DriverKind::Minikube
        } else {
            DriverKind::Cluster
        }
    }

    fn runner(&self) -> &Runner {
        &self.runner
    }

    fn setup(&mut self, shards: u32, workers: u32) -> anyhow::Result<()> {
        let r = &self.runner;
        if self.minikube {
            r.run(
                "minikube",
                &args(["start", "-p", PROFILE, "--cpus", "2", "--memory", "4096"]),
            )?;
        }
        let mut nix_image = self.nix;
        if nix_image {
            let built = Self::image_plan(true)
                .iter()
                .try_for_each(|(program, a)| r.run(program, a));
            if let Err(e) = built {
                let why = format!("{e:#}");
                eprintln!(
                    "nix could not build the image ({}); building it from the Dockerfile instead",
                    why.lines().next().unwrap_or("")
                );
                nix_image = false;
            }
        }
        if !nix_image {
            for (program, a) in Self::image_plan(false) {
                r.run(&program, &a)?;
            }
        }
        if self.minikube {
            let source = if nix_image {
                ".lab/kds-worker-image.tar"
            } else {
                IMAGE
            };
            r.run("minikube", &args(["-p", PROFILE, "image", "load", source]))?;
        } else {
            eprintln!(
                "cluster driver: make {IMAGE} pullable by your cluster (push it, or `kind load docker-image {IMAGE}`)"
            );
        }
        r.run("kubectl", &self.kubectl(&["apply", "-k", "manifests/"]))?;
        self.wait(&["rollout", "status", "deployment/localstack", TIMEOUT])?;
        self.wait(&["wait", "--for=condition=complete", "job/kds-init", TIMEOUT])?;
        if shards != 30 {
            self.set_shards(u64::from(shards))?;
        }
        self.set_workers(u64::from(workers))?;
        Ok(())
    }

    fn set_shards(&mut self, shards: u64) -> anyhow::Result<()> {
        let n = shards.to_string();
        self.runner
            .run("kubectl", &self.exec_worker(&["admin", "reshard", &n]))
    }

    fn set_workers(&mut self, workers: u64) -> anyhow::Result<()> {
        let n = format!("--replicas={workers}");
        self.runner.run(
            "kubectl",
            &self.kubectl(&["scale", &format!("statefulset/{STATEFULSET}"), &n]),
        )?;
        self.wait(&[
            "rollout",
            "status",
            &format!("statefulset/{STATEFULSET}"),
            TIMEOUT,
        ])
    }

    fn set_cap(&mut self, cap: u64) -> anyhow::Result<()> {
        let path = project_root().join("manifests/configmap.yaml");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let changed = crate::local::replace_cap(&text, cap)?;
        let out = crate::util::lab_dir().join("configmap.yaml");
        std::fs::create_dir_all(crate::util::lab_dir())?;
        std::fs::write(&out, changed)?;
        let out = out.display().to_string();
        self.runner
            .run("kubectl", &self.kubectl(&["apply", "-f", &out]))?;
        self.runner.run(
            "kubectl",
            &self.kubectl(&["rollout", "restart", &format!("statefulset/{STATEFULSET}")]),
        )?;
        self.wait(&[
            "rollout",
            "status",
            &format!("statefulset/{STATEFULSET}"),
            TIMEOUT,
        ])
    }

    fn restart_all(&mut self) -> anyhow::Result<()> {
        self.runner.run(
            "kubectl",
            &self.kubectl(&["delete", "pod", "-l", SELECTOR, "--wait=true"]),
        )?;
        self.wait(&[
            "rollout",
            "status",
            &format!("statefulset/{STATEFULSET}"),
            TIMEOUT,
        ])
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let text = self.runner.output(
            "kubectl",
            &self.exec_worker(&["admin", "snapshot", "--json"]),
        )?;
        if self.runner.dry_run {
            return Ok(Snapshot::default());
        }
        serde_json::from_str(&text).context("parsing `kds-worker admin snapshot --json`")
    }

    fn workers(&self) -> anyhow::Result<Vec<WorkerView>> {
        let text = self.runner.output(
            "kubectl",
            &self.kubectl(&["get", "pods", "-l", SELECTOR, "-o", "json"]),
        )?;
        if self.runner.dry_run {
            return Ok(Vec::new());
        }
        let list: serde_json::Value = serde_json::from_str(&text)?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pod| WorkerView {
                name: pod["metadata"]["name"].as_str().unwrap_or("?").to_owned(),
                phase: pod["status"]["phase"].as_str().unwrap_or("?").to_owned(),
                ready: pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True"),
            })
            .collect())
    }

    fn desired_workers(&self) -> anyhow::Result<u64> {
        let out = self.runner.output(
            "kubectl",
            &self.kubectl(&[
                "get",
                &format!("statefulset/{STATEFULSET}"),
                "-o",
                "jsonpath={.spec.replicas}",
            ]),
        )?;
        Ok(out.trim().parse().unwrap_or(0))
    }

    fn cap(&self) -> anyhow::Result<u64> {
        let out = self.runner.output(
            "kubectl",
            &self.kubectl(&[
                "get",
                "configmap/kds-worker-config",
                "-o",
                "jsonpath={.data.config\\.toml}",
            ]),
        )?;
        Ok(crate::local::read_cap(&out).unwrap_or(80))
    }

    fn logs(&self, follow: bool, worker: Option<u32>) -> anyhow::Result<()> {
        let mut a = vec!["logs".to_owned()];
        match worker {
            Some(n) => a.push(format!("{STATEFULSET}-{n}")),
            None => a.extend(args(["-l", SELECTOR, "--prefix", "--max-log-requests=20"])),
        }
        a.extend(args(["-c", "worker", "--tail=100"]));
        if follow {
            a.push("-f".into());
        }
        let rest: Vec<&str> = a.iter().map(String::as_str).collect();
        self.runner.run("kubectl", &self.kubectl(&rest))
    }

    fn produce(&self, rate: u64, seconds: u64) -> anyhow::Result<()> {
        let (rate, seconds) = (rate.to_string(), seconds.to_string());
        self.runner.run(
            "kubectl",
            &self.exec_worker(&["admin", "produce", "--rate", &rate, "--seconds", &seconds]),
        )
    }

    fn diagnostics(&self) -> String {
        self.recent_events()
    }

    /// Idempotent: a cluster that is already gone (or stopped) is not an error, `--all` always
    /// reaches `minikube delete`, and the lab's files go with it, so the lab is no longer
    /// "set up" afterwards.
    fn cleanup(&mut self, all: bool) -> anyhow::Result<()> {
        let deleted = self.runner.run(
            "kubectl",
            &self.kubectl(&["delete", "-k", "manifests/", "--ignore-not-found"]),
        );
        if let Err(e) = &deleted {
            eprintln!(
                "kubectl delete failed ({}); the cluster may be gone already",
                format!("{e:#}").lines().next().unwrap_or("")
            );
        }
        if all && self.minikube {
            self.runner
                .run("minikube", &args(["delete", "-p", PROFILE]))?;
        }
        if !self.runner.dry_run {
            let lab = crate::util::lab_dir();
            for file in [
                "state.json",
                "kds-worker-image.tar",
                "image",
                "configmap.yaml",
            ] {
                let _ = std::fs::remove_file(lab.join(file));
            }
        }
        Ok(())
    }
}

/// Waits (with the driver's spinner and deadline) until the StatefulSet's pods are all ready.
pub fn wait_pods_ready(driver: &dyn Driver, deadline: Duration) -> anyhow::Result<()> {
    if driver.runner().dry_run {
        return Ok(());
    }
    let want = driver.desired_workers()?;
    wait_until(
        &format!("{want} worker pods ready"),
        deadline,
        || {
            let pods = driver.workers()?;
            Ok((pods.len() as u64 == want && pods.iter().all(|p| p.ready)).then_some(()))
        },
        || match driver.workers() {
            Ok(pods) => format!("pods: {pods:?}"),
            Err(e) => format!("pods unknown: {e:#}"),
        },
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dry(minikube: bool, nix: bool) -> Kube {
        Kube {
            runner: Runner::new(true).unwrap(),
            minikube,
            nix,
        }
    }

    #[test]
    fn minikube_setup_plan() {
        let mut k = dry(true, false);
        k.setup(30, 3).unwrap();
        let k_ = "kubectl --context kds-lab -n kds-lab";
        assert_eq!(
            k.runner.commands(),
            vec![
                "minikube start -p kds-lab --cpus 2 --memory 4096".to_owned(),
                "docker build -t kds-worker:dev .".into(),
                "minikube -p kds-lab image load kds-worker:dev".into(),
                format!("{k_} apply -k manifests/"),
                format!("{k_} rollout status deployment/localstack --timeout=600s"),
                format!("{k_} wait --for=condition=complete job/kds-init --timeout=600s"),
                format!("{k_} scale statefulset/kds-consumer --replicas=3"),
                format!("{k_} rollout status statefulset/kds-consumer --timeout=600s"),
            ]
        );
    }

    #[test]
    fn nix_builds_the_image_and_minikube_loads_the_tarball() {
        let mut k = dry(true, true);
        k.setup(30, 3).unwrap();
        let c = k.runner.commands();
        assert_eq!(
            c[1],
            "nix --extra-experimental-features 'nix-command flakes' build .#image --out-link .lab/image"
        );
        assert_eq!(c[2], "sh -c '.lab/image > .lab/kds-worker-image.tar'");
        assert_eq!(
            c[3],
            "minikube -p kds-lab image load .lab/kds-worker-image.tar"
        );
    }

    #[test]
    fn cleanup_all_deletes_the_manifests_then_the_profile() {
        let mut k = dry(true, true);
        k.cleanup(true).unwrap();
        let c = k.runner.commands();
        assert!(
            c[0].contains("delete -k manifests/ --ignore-not-found"),
            "{c:?}"
        );
        assert_eq!(c[1], "minikube delete -p kds-lab");
    }

    #[test]
    fn cluster_setup_has_no_minikube_and_no_context() {
        let mut k = dry(false, false);
        k.setup(60, 5).unwrap();
        let c = k.runner.commands();
        assert!(c.iter().all(|l| !l.starts_with("minikube")));
        assert!(c.contains(&"kubectl -n kds-lab apply -k manifests/".to_owned()));
        // A non-default shard count reshards through a worker pod, after the init Job.
        assert!(c.contains(
            &"kubectl -n kds-lab exec kds-consumer-0 -c worker -- kds-worker --config /etc/kds-worker/config.toml admin reshard 60"
                .to_owned()
        ));
        assert!(c.contains(
            &"kubectl -n kds-lab scale statefulset/kds-consumer --replicas=5".to_owned()
        ));
    }

    #[test]
    fn scenario_actions_plan() {
        let mut k = dry(true, false);
        k.set_shards(300).unwrap();
        k.restart_all().unwrap();
        k.set_cap(100).unwrap();
        k.cleanup(true).unwrap();
        let c = k.runner.commands();
        let k_ = "kubectl --context kds-lab -n kds-lab";
        assert_eq!(
            c[0],
            format!(
                "{k_} exec kds-consumer-0 -c worker -- kds-worker --config /etc/kds-worker/config.toml admin reshard 300"
            )
        );
        assert_eq!(
            c[1],
            format!("{k_} delete pod -l app.kubernetes.io/name=kds-consumer --wait=true")
        );
        assert_eq!(
            c[2],
            format!("{k_} rollout status statefulset/kds-consumer --timeout=600s")
        );
        assert!(c[3].starts_with(&format!("{k_} apply -f ")) && c[3].ends_with("configmap.yaml"));
        assert_eq!(
            c[4],
            format!("{k_} rollout restart statefulset/kds-consumer")
        );
        assert_eq!(
            c[6],
            format!("{k_} delete -k manifests/ --ignore-not-found")
        );
        assert_eq!(c[7], "minikube delete -p kds-lab");
        let written =
            std::fs::read_to_string(crate::util::lab_dir().join("configmap.yaml")).unwrap();
        assert!(written.contains("max_leases_cap = 100"));
    }
}
