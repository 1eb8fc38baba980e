//! The KubeVirt manifests (deploy/kubevirt/), checked by deploy/kubevirt/check-manifests.py
//! (issue 17): the admission policies with kubernetes-validate (strict, Kubernetes 1.36 and the
//! newest it knows), the VirtualMachines and KubeVirt CR patches with TypeScript's compiler
//! against KubeVirt's API as the npm package @kubevirt-ui-ext/kubevirt-api 1.7.0 publishes it
//! (and misspelt copies refused), the Plugin against KubeVirt's socket path rules, and the
//! Plugin, the policies and the hook's socket layout agreeing with each other.
//!
//! Needs python3 with kubernetes-validate (COCO_REQUIRE_K8S_VALIDATE=1 makes its absence a
//! failure) and npm, which installs the two npm packages once into
//! /var/cache/coco-sidecar/kubevirt-api (COCO_KUBEVIRT_API_DIR); without npm or the registry
//! this prints one `SKIPPED:` line unless COCO_REQUIRE_KUBEVIRT_API=1.

mod deploy_support;

use std::path::Path;
use std::process::Command;

use deploy_support::skipped;

fn required(var: &str) -> bool {
    std::env::var(var).as_deref() == Ok("1")
}

#[test]
fn the_kubevirt_manifests_pass_kubevirts_and_kubernetes_api_checks() {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubevirt/check-manifests.py");
    let out = match Command::new("python3").arg(&script).output() {
        Ok(o) => o,
        Err(e) => {
            assert!(
                !required("COCO_REQUIRE_K8S_VALIDATE") && !required("COCO_REQUIRE_KUBEVIRT_API"),
                "python3 cannot run: {e}"
            );
            skipped(&format!(
                "KubeVirt manifest checks: python3 not runnable: {e}"
            ));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let missing = match out.status.code() {
        Some(2) => Some("COCO_REQUIRE_K8S_VALIDATE"),
        Some(3) => Some("COCO_REQUIRE_KUBEVIRT_API"),
        _ => None,
    };
    if let Some(var) = missing {
        assert!(!required(var), "{var}=1 but: {stderr}");
        skipped(&format!("KubeVirt manifest checks: {}", stderr.trim()));
        return;
    }
    assert!(
        out.status.success(),
        "check-manifests.py failed:\n{stdout}\n{stderr}"
    );
    for line in [
        "VirtualMachine/snp-vm1: KubeVirt's API types (tsc)",
        "VirtualMachine/snp-vm1 (misspelt copy): refused by KubeVirt's API types",
        "MutatingAdmissionPolicy/coco-sidecar-injector: strict schema of Kubernetes 1.36.0",
        "the hook listens at the Plugin's socketPath",
    ] {
        assert!(stdout.contains(line), "no '{line}':\n{stdout}");
    }
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
