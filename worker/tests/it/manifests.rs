//! The Kubernetes manifests, loaded into k8s-openapi types and cross-checked against the
//! worker: probes and port match its defaults, the ConfigMap is a valid configuration, RBAC
//! grants exactly what the coordinator calls, credentials live in a Secret, pods meet the
//! restricted Pod Security profile, and the image is the one the lab builds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Toml};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kds_worker::config::{Settings, Surroundings};

/// The tag `cargo xtask setup` builds and loads (xtask's own tidy test checks its side).
const IMAGE: &str = "kds-worker:dev";
const LOCALSTACK_IMAGE: &str = "localstack/localstack:4.14.0@sha256:3ebc37595918b8accb852f8048fef2aff047d465167edd655528065b07bc364a";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every document of every file the kustomization lists, by kind.
fn load() -> BTreeMap<String, Vec<serde_yaml::Value>> {
    let dir = manifests_dir();
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut by_kind: BTreeMap<String, Vec<serde_yaml::Value>> = BTreeMap::new();
    for file in kustomization["resources"].as_sequence().unwrap() {
        let path = dir.join(file.as_str().unwrap());
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            let kind = value["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: document without kind", path.display()));
            by_kind.entry(kind.to_owned()).or_default().push(value);
        }
    }
    by_kind
}

use serde::Deserialize;

fn one<T: serde::de::DeserializeOwned>(
    docs: &BTreeMap<String, Vec<serde_yaml::Value>>,
    kind: &str,
) -> T {
    let list = docs
        .get(kind)
        .unwrap_or_else(|| panic!("no {kind} in the manifests"));
    assert_eq!(list.len(), 1, "expected one {kind}");
    serde_yaml::from_value(list[0].clone())
        .unwrap_or_else(|e| panic!("{kind} does not load as k8s-openapi type: {e}"))
}

fn worker_settings(docs: &BTreeMap<String, Vec<serde_yaml::Value>>) -> Settings {
    let cm: ConfigMap = one(docs, "ConfigMap");
    let toml = cm
        .data
        .as_ref()
        .unwrap()
        .get("config.toml")
        .expect("config.toml key");
    let figment = Figment::new().merge(Toml::string(toml));
    let env = Surroundings {
        pod_name: Some("kds-consumer-0".into()),
        pod_namespace: Some("kds-lab".into()),
        in_kubernetes: true,
        ..Default::default()
    };
    Settings::from_figment(&figment, &env)
        .unwrap_or_else(|e| panic!("the ConfigMap's config.toml is not a valid configuration: {e}"))
        .0
}

fn worker_container(spec: &PodSpec) -> &Container {
    spec.containers
        .iter()
        .find(|c| c.name == "worker")
        .expect("worker container")
}

fn assert_restricted(spec: &PodSpec, what: &str) {
    let pod = spec
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no pod securityContext"));
    assert_eq!(pod.run_as_non_root, Some(true), "{what}: runAsNonRoot");
    assert_eq!(
        pod.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "{what}: seccomp"
    );
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let sc = c
            .security_context
            .as_ref()
            .unwrap_or_else(|| panic!("{what}/{}: no securityContext", c.name));
        assert_eq!(
            sc.allow_privilege_escalation,
            Some(false),
            "{what}/{}",
            c.name
        );
        assert_eq!(
            sc.read_only_root_filesystem,
            Some(true),
            "{what}/{}",
            c.name
        );
        let drop = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.clone())
            .unwrap_or_default();
        assert_eq!(
            drop,
            vec!["ALL".to_owned()],
            "{what}/{}: capabilities",
            c.name
        );
    }
}

#[test]
fn statefulset_matches_the_worker() {
    let docs = load();
    let settings = worker_settings(&docs);
    let sts: StatefulSet = one(&docs, "StatefulSet");
    assert_eq!(
        sts.metadata.name.as_deref(),
        Some(settings.statefulset_name.as_str())
    );
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let pod = spec.template.spec.as_ref().unwrap();
    let c = worker_container(pod);
    assert_eq!(c.image.as_deref(), Some(IMAGE));

    // Probes hit the worker's endpoints on the port it listens on.
    let port = settings.http_addr.port() as i32;
    let named = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("http"))
        .unwrap();
    assert_eq!(named.container_port, port);
    for (probe, path) in [
        (&c.liveness_probe, "/health"),
        (&c.readiness_probe, "/ready"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert!(
            matches!(&get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n) if n == "http")
        );
    }

    // Downward API for the worker id and namespace; credentials only from the Secret.
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert_eq!(
        env["POD_NAME"]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.name"
    );
    assert_eq!(
        env["POD_NAMESPACE"]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.namespace"
    );
    assert!(!env.contains_key("AWS_SECRET_ACCESS_KEY"));
    let secret: Secret = one(&docs, "Secret");
    let from_secret = c.env_from.iter().flatten().any(|e| {
        e.secret_ref
            .as_ref()
            .is_some_and(|s| s.name == secret.metadata.name.clone().unwrap())
    });
    assert!(from_secret, "credentials come from the Secret");
    let cm: ConfigMap = one(&docs, "ConfigMap");
    let cm_text = cm.data.unwrap()["config.toml"].to_lowercase();
    assert!(
        !cm_text.contains("secret") && !cm_text.contains("access_key"),
        "no credentials in the ConfigMap"
    );

    // The ConfigMap is mounted where the worker reads it.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "config")
        .unwrap();
    assert_eq!(
        format!("{}/config.toml", mount.mount_path),
        kds_worker::config::DEFAULT_CONFIG_PATH
    );

    // Long enough to hand leases off and step down; resources bounded.
    assert!(
        pod.termination_grace_period_seconds.unwrap() as u64 >= settings.failover_timeout.as_secs()
    );
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());
    assert_restricted(pod, "StatefulSet");
}

#[test]
fn rbac_grants_exactly_the_statefulset_watch() {
    let docs = load();
    let settings = worker_settings(&docs);
    let role: Role = one(&docs, "Role");
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1, "one rule");
    let r = &rules[0];
    assert_eq!(r.api_groups.as_deref(), Some(&["apps".to_owned()][..]));
    assert_eq!(
        r.resources.as_deref(),
        Some(&["statefulsets".to_owned()][..])
    );
    assert_eq!(
        r.resource_names.as_deref(),
        Some(&[settings.statefulset_name.clone()][..])
    );
    let mut verbs = r.verbs.clone();
    verbs.sort();
    assert_eq!(verbs, ["get", "list", "watch"]);

    let binding: RoleBinding = one(&docs, "RoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    let sts: StatefulSet = one(&docs, "StatefulSet");
    let sa = sts
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    assert!(
        binding
            .subjects
            .unwrap()
            .iter()
            .any(|s| s.kind == "ServiceAccount" && s.name == sa)
    );
}

#[test]
fn init_job_runs_the_workers_init_with_thirty_shards() {
    let docs = load();
    let job: Job = one(&docs, "Job");
    let pod = job.spec.unwrap().template.spec.unwrap();
    let c = pod.containers.iter().find(|c| c.name == "init").unwrap();
    assert_eq!(c.image.as_deref(), Some(IMAGE));
    let args = c.args.clone().unwrap();
    let init = args
        .iter()
        .position(|a| a == "init")
        .expect("runs `kds-worker init`");
    assert_eq!(&args[init + 1..], ["--shards", "30"]);
    assert!(pod.init_containers.is_some(), "waits for LocalStack first");
    assert_restricted(&pod, "Job");
}

#[test]
fn localstack_is_pinned_and_allows_the_300_shard_scenario() {
    let docs = load();
    let dep: Deployment = one(&docs, "Deployment");
    let pod = dep.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(LOCALSTACK_IMAGE));
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
        .collect();
    assert!(env["KINESIS_SHARD_LIMIT"].parse::<u64>().unwrap() >= 1000);
    assert!(env["SERVICES"].contains("kinesis") && env["SERVICES"].contains("dynamodb"));
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/_localstack/health")
    );
}
