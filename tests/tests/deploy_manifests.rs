//! The Kubernetes manifests (deploy/k8s/*.yaml), checked by deploy/k8s/check-manifests.py:
//! strict schema validation with kubernetes-validate (offline, Kubernetes 1.33 and the newest
//! it knows), the security and probe policy docs/kubernetes.md promises, and a smoke run of the
//! manifests' own command lines (serve, every probe, the updater Job's `blob install`) against
//! this build's coco-sidecar. Issue 7.
//!
//! Needs python3 with kubernetes-validate (`python3 -m pip install kubernetes-validate==1.37.0`);
//! without it this prints one `SKIPPED:` line, unless COCO_REQUIRE_K8S_VALIDATE=1 (CI).

mod deploy_support;

use std::path::Path;
use std::process::Command;

use deploy_support::{bin, skipped};

#[test]
fn the_manifests_validate_and_their_commands_work() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/check-manifests.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--bin")
        .arg(bin())
        .output();
    let required = std::env::var("COCO_REQUIRE_K8S_VALIDATE").as_deref() == Ok("1");
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            assert!(
                !required,
                "COCO_REQUIRE_K8S_VALIDATE=1 but python3 cannot run: {e}"
            );
            skipped(&format!("manifest checks: python3 not runnable: {e}"));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) {
        assert!(!required, "COCO_REQUIRE_K8S_VALIDATE=1 but: {stderr}");
        skipped(&format!("manifest checks: {}", stderr.trim()));
        return;
    }
    assert!(
        out.status.success(),
        "check-manifests.py failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("smoke: the served blob is the new one"),
        "the smoke run happened:\n{stdout}"
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
