//! The `minikube` and `cluster` drivers: kubectl (and minikube) against the manifests.

use std::time::Duration;

use anyhow::Context;

use crate::config_file::{read_cap, replace_cap};
use crate::lab::{Driver, Snapshot, WorkerView, wait_until};
use crate::runner::{Runner, args};
use crate::state::DriverKind;
use crate::util::project_root;

pub const PROFILE: &str = "kds-lab";
/// Memory `minikube start` gives the profile (MiB); preflight wants it free.
pub const MINIKUBE_MEMORY_MIB: u64 = 4096;
pub const NAMESPACE: &str = "kds-lab";
pub const STATEFULSET: &str = "kds-consumer";
/// The image name manifests/ run; `setup` sets the tag to the image's content hash.
pub const IMAGE_NAME: &str = "kds-worker";
/// What `docker build` tags before the content tag is known.
const BUILD_TAG: &str = "kds-worker:build";
const IMAGE_TARBALL: &str = "kds-worker-image.tar";
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
            nix: crate::util::nix_builds_images(crate::util::nix_version()),
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

    /// Builds the image and returns its content tag: Nix tags it with a hash of its contents
    /// (`tag = null` in flake.nix), read back from the tarball's manifest; a Docker build is
    /// tagged with the start of its image id. A rebuilt worker gets a new tag, an unchanged one
    /// the same, so applying the manifests rolls the StatefulSet exactly when the worker
    /// changed. Nix failing (flakes refused, no build user) falls back to Docker with a reason.
    fn build_image(&self) -> anyhow::Result<ImageBuild> {
        let r = &self.runner;
        if self.nix {
            match self.build_with_nix() {
                Ok(built) => return Ok(built),
                Err(e) => eprintln!(
                    "nix could not build the image ({}); building it from the Dockerfile instead",
                    format!("{e:#}").lines().next().unwrap_or("")
                ),
            }
        }
        r.run("docker", &args(["build", "-t", BUILD_TAG, "."]))?;
        let id = r.output(
            "docker",
            &args(["image", "inspect", "--format", "{{.Id}}", BUILD_TAG]),
        )?;
        let tag = if r.dry_run {
            "<image-id>".to_owned()
        } else {
            docker_content_tag(&id)?
        };
        let image = format!("{IMAGE_NAME}:{tag}");
        r.run("docker", &args(["tag", BUILD_TAG, &image]))?;
        Ok(ImageBuild { tag, load: image })
    }

    fn build_with_nix(&self) -> anyhow::Result<ImageBuild> {
        let r = &self.runner;
        let lab = crate::util::lab_dir();
        let (link, tar) = (lab.join("image"), lab.join(IMAGE_TARBALL));
        let (link, tar) = (link.display().to_string(), tar.display().to_string());
        // A default Nix install has flakes off: enable them for this call only.
        r.run(
            "nix",
            &args([
                "--extra-experimental-features",
                "nix-command flakes",
                "build",
                ".#image",
                "--out-link",
                &link,
            ]),
        )?;
        // The paths are arguments, not script text: any character in them is safe.
        r.run("sh", &args(["-c", "\"$0\" > \"$1\"", &link, &tar]))?;
        let manifest = r.output("tar", &args(["-xOf", &tar, "manifest.json"]))?;
        let tag = if r.dry_run {
            "<nix-hash>".to_owned()
        } else {
            tarball_tag(&manifest)?
        };
        Ok(ImageBuild { tag, load: tar })
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

/// The image built, and what `minikube image load` takes (a tarball or an image name).
struct ImageBuild {
    tag: String,
    load: String,
}

/// `docker image inspect --format {{.Id}}` (`sha256:<64 hex>`) → its first 12 hex digits.
fn docker_content_tag(id: &str) -> anyhow::Result<String> {
    let hex = id.trim().trim_start_matches("sha256:");
    anyhow::ensure!(
        hex.len() >= 12 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "`docker image inspect` gave {id:?}, not an image id"
    );
    Ok(hex[..12].to_owned())
}

/// The tag in a `docker save`-format tarball's manifest.json (`[{"RepoTags": ["name:tag"]}]`).
fn tarball_tag(manifest: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(manifest)
        .map_err(|e| anyhow::anyhow!("the image tarball's manifest.json: {e}"))?;
    let repo_tag = v[0]["RepoTags"][0].as_str().ok_or_else(|| {
        anyhow::anyhow!("the image tarball's manifest.json names no tag: {manifest}")
    })?;
    match repo_tag.split_once(':') {
        Some((name, tag)) if name == IMAGE_NAME && !tag.is_empty() => Ok(tag.to_owned()),
        _ => anyhow::bail!("the image tarball is tagged {repo_tag:?}, not {IMAGE_NAME}:<tag>"),
    }
}

/// manifests/configmap.yaml as written in the checkout.
fn read_configmap() -> anyhow::Result<String> {
    let path = project_root().join("manifests/configmap.yaml");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// A short content hash (FNV-1a, 64 bits) of text, for the pod template annotation that rolls
/// the workers when their configuration changes.
pub fn content_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// `from` → `to` as a relative path (kustomize resources are relative to the overlay).
fn relative(from: &std::path::Path, to: &std::path::Path) -> String {
    let (from, to): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_owned(); from.len() - common];
    parts.extend(
        to[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

/// The kustomize overlay `setup` applies: manifests/ with the image's content tag, the
/// replica count asked for, and the ConfigMap's hash on the pod template (so a configuration
/// restored by re-running `setup` rolls the workers, and an unchanged one does not).
pub fn overlay(
    manifests: &std::path::Path,
    dir: &std::path::Path,
    tag: &str,
    replicas: u64,
    configmap: &str,
) -> String {
    let base = relative(dir, manifests);
    let hash = content_hash(configmap);
    format!(
        r#"# Written by `cargo xtask setup` and applied with `kubectl apply -k`; not edited by hand.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: {IMAGE_NAME}
    newTag: "{tag}"
patches:
  - target:
      kind: StatefulSet
      name: {STATEFULSET}
    patch: |-
      - op: replace
        path: /spec/replicas
        value: {replicas}
      - op: add
        path: /spec/template/metadata/annotations/{CONFIG_ANNOTATION_PATH}
        value: "{hash}"
"#
    )
}

/// The pod template annotation carrying the configuration's hash (`/` escaped for JSON Patch).
const CONFIG_ANNOTATION: &str = "kds-lab/config-hash";
const CONFIG_ANNOTATION_PATH: &str = "kds-lab~1config-hash";

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

    /// LocalStack ready → init Job done (stream and tables) → workers rolled out → reshard.
    /// The workers are applied with LocalStack and wait for their stream (`/ready` says so)
    /// rather than crash-looping; the reshard runs in a worker pod, so it comes last.
    fn setup(&mut self, shards: u32, workers: u32) -> anyhow::Result<()> {
        if self.minikube {
            let memory = MINIKUBE_MEMORY_MIB.to_string();
            self.runner.run(
                "minikube",
                &args(["start", "-p", PROFILE, "--cpus", "2", "--memory", &memory]),
            )?;
        }
        // From here on something exists: the state file says so, and `cleanup` removes it.
        if !self.runner.dry_run {
            crate::state::save_state(&crate::state::State {
                driver: self.kind(),
                local: None,
            })?;
        }
        let image = self.build_image()?;
        let r = &self.runner;
        if self.minikube {
            r.run(
                "minikube",
                &args(["-p", PROFILE, "image", "load", &image.load]),
            )?;
        } else {
            // A Nix image exists only as a tarball; a Docker build is in the local engine.
            let how = if image.load.ends_with(".tar") {
                format!(
                    "`kind load image-archive {}`, or `docker load -i` it and push",
                    image.load
                )
            } else {
                format!("push it, or `kind load docker-image {}`", image.load)
            };
            eprintln!(
                "cluster driver: make {IMAGE_NAME}:{} pullable by your cluster ({how})",
                image.tag
            );
        }
        let root = project_root();
        let configmap = read_configmap()?;
        // Absolute, so the overlay's relative path to manifests/ is right wherever the lab is.
        let dir = std::path::absolute(crate::util::lab_dir().join("kustomize"))?;
        std::fs::create_dir_all(&dir)?;
        let kustomization = overlay(
            &root.join("manifests"),
            &dir,
            &image.tag,
            u64::from(workers),
            &configmap,
        );
        std::fs::write(dir.join("kustomization.yaml"), kustomization)?;
        // A Job's pod template cannot change (a new image tag would be refused): the init Job
        // is deleted and runs again; it leaves an existing stream and tables as they are.
        r.run(
            "kubectl",
            &self.kubectl(&["delete", "job/kds-init", "--ignore-not-found"]),
        )?;
        let dir = dir.display().to_string();
        r.run("kubectl", &self.kubectl(&["apply", "-k", &dir]))?;
        self.wait(&["rollout", "status", "deployment/localstack", TIMEOUT])?;
        self.wait(&["wait", "--for=condition=complete", "job/kds-init", TIMEOUT])?;
        self.wait(&[
            "rollout",
            "status",
            &format!("statefulset/{STATEFULSET}"),
            TIMEOUT,
        ])?;
        if shards != 30 {
            self.set_shards(u64::from(shards))?;
        }
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

    /// The ConfigMap with the new cap, and its hash on the pod template: a rolling update.
    fn set_cap(&mut self, cap: u64) -> anyhow::Result<()> {
        let changed = replace_cap(&read_configmap()?, cap)?;
        let out = crate::util::lab_dir().join("configmap.yaml");
        std::fs::create_dir_all(crate::util::lab_dir())?;
        std::fs::write(&out, &changed)?;
        let out = out.display().to_string();
        self.runner
            .run("kubectl", &self.kubectl(&["apply", "-f", &out]))?;
        let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
            CONFIG_ANNOTATION: content_hash(&changed)
        }}}}});
        self.runner.run(
            "kubectl",
            &self.kubectl(&[
                "patch",
                &format!("statefulset/{STATEFULSET}"),
                "--type=merge",
                "-p",
                &patch.to_string(),
            ]),
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
        Ok(read_cap(&out).unwrap_or(80))
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
        if let Err(e) = deleted {
            let why = format!("{e:#}");
            let why = why.lines().next().unwrap_or("");
            // A stopped or deleted Minikube profile took the lab with it (or `--all` is
            // about to); anything else may have left the lab running: keep its record.
            let gone = self.minikube
                && (all
                    || self
                        .runner
                        .output("minikube", &args(["status", "-p", PROFILE]))
                        .is_err());
            if !gone {
                anyhow::bail!(
                    "kubectl could not delete the lab ({why}); it may still be running, so .lab/state.json is kept: fix the cluster access and run `cargo xtask cleanup` again"
                );
            }
            eprintln!("kubectl delete failed ({why}); the cluster is stopped or gone");
        }
        if all && self.minikube {
            self.runner
                .run("minikube", &args(["delete", "-p", PROFILE]))?;
        }
        if !self.runner.dry_run {
            let lab = crate::util::lab_dir();
            for file in ["state.json", IMAGE_TARBALL, "image", "configmap.yaml"] {
                let _ = std::fs::remove_file(lab.join(file));
            }
            let _ = std::fs::remove_dir_all(lab.join("kustomize"));
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

    fn position(c: &[String], needle: &str) -> usize {
        c.iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {c:#?}"))
    }

    #[test]
    fn minikube_setup_plan() {
        let mut k = dry(true, false);
        k.setup(30, 3).unwrap();
        let c = k.runner.commands();
        let k_ = "kubectl --context kds-lab -n kds-lab";
        let lab = crate::util::lab_dir()
            .join("kustomize")
            .display()
            .to_string();
        assert_eq!(
            c,
            vec![
                "minikube start -p kds-lab --cpus 2 --memory 4096".to_owned(),
                "docker build -t kds-worker:build .".into(),
                "docker image inspect --format {{.Id}} kds-worker:build".into(),
                "docker tag kds-worker:build kds-worker:<image-id>".into(),
                "minikube -p kds-lab image load kds-worker:<image-id>".into(),
                format!("{k_} delete job/kds-init --ignore-not-found"),
                format!("{k_} apply -k {lab}"),
                format!("{k_} rollout status deployment/localstack --timeout=600s"),
                format!("{k_} wait --for=condition=complete job/kds-init --timeout=600s"),
                format!("{k_} rollout status statefulset/kds-consumer --timeout=600s"),
            ]
        );
    }

    #[test]
    fn nix_builds_the_image_and_minikube_loads_the_tarball() {
        let mut k = dry(true, true);
        k.setup(30, 3).unwrap();
        let c = k.runner.commands();
        let lab = crate::util::lab_dir();
        let tar = lab.join("kds-worker-image.tar").display().to_string();
        assert_eq!(
            c[1],
            format!(
                "nix --extra-experimental-features 'nix-command flakes' build .#image --out-link {}",
                lab.join("image").display()
            )
        );
        let link = lab.join("image").display().to_string();
        assert_eq!(c[2], format!("sh -c '\"$0\" > \"$1\"' {link} {tar}"));
        assert_eq!(c[3], format!("tar -xOf {tar} manifest.json"));
        assert_eq!(c[4], format!("minikube -p kds-lab image load {tar}"));
    }

    #[test]
    fn setup_orders_localstack_init_workers_then_reshard() {
        let mut k = dry(false, false);
        k.setup(60, 5).unwrap();
        let c = k.runner.commands();
        assert!(c.iter().all(|l| !l.starts_with("minikube")));
        let localstack = position(&c, "rollout status deployment/localstack");
        let init = position(&c, "job/kds-init --timeout");
        let workers = position(&c, "rollout status statefulset/kds-consumer");
        // The reshard runs in a worker pod: after the workers are up.
        let reshard = position(
            &c,
            "exec kds-consumer-0 -c worker -- kds-worker --config /etc/kds-worker/config.toml admin reshard 60",
        );
        assert!(
            localstack < init && init < workers && workers < reshard,
            "{c:#?}"
        );
        // The init Job's pod template cannot change: it is deleted before the apply.
        assert!(position(&c, "delete job/kds-init") < position(&c, "apply -k"));
    }

    #[test]
    fn the_overlay_sets_the_content_tag_replicas_and_config_hash() {
        let root = std::path::Path::new("/src/lab-checkout");
        let text = overlay(
            &root.join("manifests"),
            &root.join(".lab/kustomize"),
            "0123456789ab",
            5,
            "max_leases_cap = 80",
        );
        assert!(text.contains("resources:\n  - ../../manifests\n"), "{text}");
        assert!(text.contains("  - name: kds-worker\n    newTag: \"0123456789ab\"\n"));
        assert!(text.contains("path: /spec/replicas\n        value: 5\n"));
        let hash = content_hash("max_leases_cap = 80");
        assert!(text.contains(&format!("kds-lab~1config-hash\n        value: \"{hash}\"")));
        // Another configuration, another hash: applying it rolls the workers.
        assert_ne!(hash, content_hash("max_leases_cap = 100"));
        // A lab directory outside the checkout still finds the manifests.
        let elsewhere = overlay(
            &root.join("manifests"),
            std::path::Path::new("/tmp/lab/kustomize"),
            "t",
            3,
            "",
        );
        assert!(
            elsewhere.contains("  - ../../../src/lab-checkout/manifests\n"),
            "{elsewhere}"
        );
    }

    #[test]
    fn content_tags_are_read_from_docker_and_the_nix_tarball() {
        assert_eq!(
            docker_content_tag("sha256:0123456789abcdef0123\n").unwrap(),
            "0123456789ab"
        );
        assert!(docker_content_tag("Error: no such image").is_err());
        assert_eq!(
            tarball_tag(r#"[{"Config":"c.json","RepoTags":["kds-worker:5x1v8r2q"],"Layers":[]}]"#)
                .unwrap(),
            "5x1v8r2q"
        );
        assert!(tarball_tag(r#"[{"RepoTags":["other:1"]}]"#).is_err());
        assert!(tarball_tag("not json").is_err());
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
    fn scenario_actions_plan() {
        let mut k = dry(true, false);
        k.set_shards(300).unwrap();
        k.restart_all().unwrap();
        k.set_cap(100).unwrap();
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
        // The new ConfigMap's hash on the pod template: a rolling update.
        assert!(
            c[4].starts_with(&format!(
                "{k_} patch statefulset/kds-consumer --type=merge -p "
            )) && c[4].contains("kds-lab/config-hash"),
            "{}",
            c[4]
        );
        let written =
            std::fs::read_to_string(crate::util::lab_dir().join("configmap.yaml")).unwrap();
        assert!(written.contains("max_leases_cap = 100"));
        assert!(c[4].contains(&content_hash(&written)));
    }
}
