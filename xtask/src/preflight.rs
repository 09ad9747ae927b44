//! What a driver needs before `setup` changes anything: the tools on `PATH`, a running
//! container engine, memory for the Minikube profile, a Nix that can build the image. `setup`
//! refuses with one line per missing thing (and records nothing); `doctor` prints the same.

use std::process::{Command, Stdio};

use crate::kube::{MINIKUBE_MEMORY_MIB, PROFILE};
use crate::state::DriverKind;

const MEMORY_HEADROOM_MIB: u64 = 512;

/// One thing a driver needs, found or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    pub what: String,
    /// `None` when present; else what is wrong and how to fix it.
    pub problem: Option<String>,
}

impl Need {
    fn ok(what: impl Into<String>) -> Self {
        Need {
            what: what.into(),
            problem: None,
        }
    }

    fn missing(what: impl Into<String>, problem: impl Into<String>) -> Self {
        Need {
            what: what.into(),
            problem: Some(problem.into()),
        }
    }
}

/// What the probes saw; [`needs`] is pure over it (and tested over every combination).
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub minikube: bool,
    /// `minikube status -p kds-lab` succeeds: the profile runs (and already has its memory).
    pub profile_running: bool,
    pub kubectl: bool,
    /// `kubectl config current-context` names a context.
    pub kube_context: Option<String>,
    pub docker_cli: bool,
    /// `docker info` (or `podman info`) answers: the engine is running.
    pub container_engine: Option<&'static str>,
    /// `docker info` answers (the Dockerfile build needs Docker itself, not Podman).
    pub docker_running: bool,
    /// `nix --version`, if Nix is installed.
    pub nix_version: Option<(u32, u32)>,
    /// MemAvailable (Linux); `None` where it cannot be read.
    pub available_mib: Option<u64>,
}

impl Probe {
    /// Runs the probes (a few quick commands, nothing changed).
    pub fn run() -> Self {
        let ok = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let present = |program: &str| {
            Command::new(program)
                .arg("--help")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        };
        let kubectl = present("kubectl");
        let kube_context = kubectl
            .then(|| {
                Command::new("kubectl")
                    .args(["config", "current-context"])
                    .stderr(Stdio::null())
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                    .filter(|c| !c.is_empty())
            })
            .flatten();
        let docker_running = ok("docker", &["info"]);
        let container_engine = if docker_running {
            Some("docker")
        } else if ok("podman", &["info"]) {
            Some("podman")
        } else {
            None
        };
        let nix_version = crate::util::nix_version();
        let minikube = present("minikube");
        Probe {
            profile_running: minikube && ok("minikube", &["status", "-p", PROFILE]),
            minikube,
            docker_running,
            kubectl,
            kube_context,
            docker_cli: present("docker"),
            container_engine,
            nix_version,
            available_mib: available_mib(),
        }
    }
}

/// MemAvailable in MiB; `XTASK_ASSUME_FREE_MIB` stands in for it (tests, or a host whose
/// /proc/meminfo does not tell the truth, such as some containers).
fn available_mib() -> Option<u64> {
    if let Some(v) = std::env::var("XTASK_ASSUME_FREE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Flakes arrived in Nix 2.4; xtask enables them per call.
fn nix_builds_images(p: &Probe) -> bool {
    crate::util::nix_builds_images(p.nix_version)
}

const GET_TOOLS: &str = "enter `nix develop` (it pins kubectl and minikube)";

/// Everything `setup --driver kind` needs, found or not, in the order it is used.
pub fn needs(kind: DriverKind, p: &Probe) -> Vec<Need> {
    let mut out = Vec::new();
    if kind == DriverKind::Local {
        return out;
    }
    if kind == DriverKind::Minikube {
        out.push(if p.minikube {
            Need::ok("minikube")
        } else {
            Need::missing(
                "minikube",
                format!(
                    "minikube is not on PATH: {GET_TOOLS}, or install it (https://minikube.sigs.k8s.io/docs/start/)"
                ),
            )
        });
    }
    out.push(if p.kubectl {
        Need::ok("kubectl")
    } else {
        Need::missing(
            "kubectl",
            format!("kubectl is not on PATH: {GET_TOOLS}, or install it (https://kubernetes.io/docs/tasks/tools/)"),
        )
    });
    if kind == DriverKind::Cluster && p.kubectl {
        out.push(match &p.kube_context {
            Some(c) => Need::ok(format!("kube context {c}")),
            None => Need::missing(
                "kube context",
                "kubectl has no current context: `kubectl config use-context NAME`",
            ),
        });
    }
    // Minikube runs its node in Docker or Podman.
    if kind == DriverKind::Minikube {
        out.push(match p.container_engine {
            Some(engine) => Need::ok(format!("{engine} running")),
            None if p.docker_cli => Need::missing(
                "docker running",
                "docker is installed but its engine does not answer (`docker info` fails): start Docker Desktop or `sudo systemctl start docker`",
            ),
            None => Need::missing(
                "docker or podman",
                "no container engine: install Docker (https://docs.docker.com/engine/install/) or Podman and start it",
            ),
        });
    }
    // Without Nix the image is built from the Dockerfile: that needs Docker itself.
    if !nix_builds_images(p) {
        let said_already = kind == DriverKind::Minikube && p.container_engine.is_none();
        if p.docker_running {
            out.push(Need::ok("docker (builds the image)"));
        } else if !said_already {
            out.push(Need::missing(
                "docker (builds the image)",
                "the image is built with `docker build` (no Nix 2.4+ here) and docker does not answer: start Docker, or install Nix (`nix develop`)",
            ));
        }
    }
    // A running profile already has its memory; starting one needs it free.
    if kind == DriverKind::Minikube
        && !p.profile_running
        && let Some(free) = p.available_mib
    {
        let want = MINIKUBE_MEMORY_MIB + MEMORY_HEADROOM_MIB;
        out.push(if free >= want {
            Need::ok(format!("{free} MiB free memory"))
        } else {
            Need::missing(
                "memory",
                format!(
                    "{free} MiB of memory available; the Minikube profile takes {MINIKUBE_MEMORY_MIB} MiB (and the machine {MEMORY_HEADROOM_MIB} MiB more): close something"
                ),
            )
        });
    }
    match p.nix_version {
        Some(v) if v < (2, 4) => out.push(Need::missing(
            "nix with flakes",
            format!(
                "nix {}.{} has no flakes (2.4 or later is needed to build the image with Nix): upgrade Nix, or uninstall it to build with Docker",
                v.0, v.1
            ),
        )),
        Some(_) if nix_builds_images(p) => out.push(Need::ok("nix (builds the image)")),
        _ => {}
    }
    out
}

/// The one-line-per-problem refusal `setup` prints, or `None` if nothing is missing.
pub fn refusal(kind: DriverKind, needs: &[Need]) -> Option<String> {
    let problems: Vec<&str> = needs.iter().filter_map(|n| n.problem.as_deref()).collect();
    if problems.is_empty() {
        return None;
    }
    let driver = format!("{kind:?}").to_lowercase();
    Some(format!(
        "the {driver} driver cannot start here; nothing was changed:\n  {}\nNo cluster at hand? `cargo xtask setup --driver local` needs only cargo, node and python3.",
        problems.join("\n  ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_present() -> Probe {
        Probe {
            minikube: true,
            profile_running: false,
            kubectl: true,
            kube_context: Some("kind-kind".into()),
            docker_cli: true,
            container_engine: Some("docker"),
            docker_running: true,
            nix_version: None,
            available_mib: Some(16_000),
        }
    }

    fn problems(kind: DriverKind, p: &Probe) -> Vec<String> {
        needs(kind, p)
            .into_iter()
            .filter_map(|n| n.problem)
            .collect()
    }

    #[test]
    fn nothing_missing_means_no_refusal() {
        for kind in [DriverKind::Minikube, DriverKind::Cluster, DriverKind::Local] {
            assert_eq!(
                refusal(kind, &needs(kind, &all_present())),
                None,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_machine_without_minikube_is_told_what_to_do() {
        let p = Probe {
            minikube: false,
            ..all_present()
        };
        let msg = refusal(DriverKind::Minikube, &needs(DriverKind::Minikube, &p)).unwrap();
        assert!(msg.contains("minikube is not on PATH"), "{msg}");
        assert!(
            msg.contains("nix develop") && msg.contains("--driver local"),
            "{msg}"
        );
        assert!(msg.contains("nothing was changed"), "{msg}");
        // The cluster driver does not need minikube.
        assert!(problems(DriverKind::Cluster, &p).is_empty());
    }

    #[test]
    fn each_missing_thing_is_one_line() {
        let p = Probe::default();
        let lines = problems(DriverKind::Minikube, &p);
        // minikube, kubectl, container engine (memory unknown: not judged).
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines.iter().all(|l| !l.contains('\n')));
        let lines = problems(DriverKind::Cluster, &p);
        assert_eq!(lines.len(), 2, "kubectl and a container engine: {lines:#?}");
    }

    #[test]
    fn a_stopped_engine_is_told_apart_from_a_missing_one() {
        let p = Probe {
            container_engine: None,
            docker_running: false,
            ..all_present()
        };
        let lines = problems(DriverKind::Minikube, &p);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("does not answer"), "{lines:?}");
        let p = Probe {
            docker_cli: false,
            ..p
        };
        assert!(problems(DriverKind::Minikube, &p)[0].contains("no container engine"));
    }

    #[test]
    fn podman_runs_the_node_but_without_nix_docker_builds_the_image() {
        let podman = Probe {
            docker_cli: false,
            docker_running: false,
            container_engine: Some("podman"),
            ..all_present()
        };
        let lines = problems(DriverKind::Minikube, &podman);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("docker build"), "{lines:?}");
        let with_nix = Probe {
            nix_version: Some((2, 18)),
            ..podman
        };
        if cfg!(target_os = "linux") {
            assert!(problems(DriverKind::Minikube, &with_nix).is_empty());
        }
    }

    #[test]
    fn too_little_memory_for_the_profile_is_refused_unless_it_runs_already() {
        let p = Probe {
            available_mib: Some(3000),
            ..all_present()
        };
        let lines = problems(DriverKind::Minikube, &p);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("3000 MiB") && lines[0].contains("4096"),
            "{lines:?}"
        );
        // A cluster's memory is not this machine's.
        assert!(problems(DriverKind::Cluster, &p).is_empty());
        // Re-running setup: the running profile holds its memory already.
        let running = Probe {
            profile_running: true,
            ..p
        };
        assert!(problems(DriverKind::Minikube, &running).is_empty());
    }

    #[test]
    fn nix_without_flakes_is_refused_and_new_nix_spares_the_cluster_driver_docker() {
        let old = Probe {
            nix_version: Some((2, 3)),
            ..all_present()
        };
        assert!(problems(DriverKind::Minikube, &old)[0].contains("no flakes"));
        let nix = Probe {
            nix_version: Some((2, 8)),
            container_engine: None,
            docker_running: false,
            docker_cli: false,
            ..all_present()
        };
        if cfg!(target_os = "linux") {
            assert!(problems(DriverKind::Cluster, &nix).is_empty());
        }
        // Minikube still needs an engine for its node.
        assert_eq!(problems(DriverKind::Minikube, &nix).len(), 1);
    }

    #[test]
    fn a_cluster_needs_a_current_context() {
        let p = Probe {
            kube_context: None,
            ..all_present()
        };
        assert!(problems(DriverKind::Cluster, &p)[0].contains("use-context"));
    }
}
