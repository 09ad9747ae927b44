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
    let sts = read("manifests/statefulset.yaml");
    assert!(sts.contains(&format!("image: {}", crate::kube::IMAGE)));
    let job = read("manifests/init-job.yaml");
    assert!(job.contains(&format!("image: {}", crate::kube::IMAGE)));
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
