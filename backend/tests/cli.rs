//! The command line, through the built binary. (Being an integration test of this package
//! also makes `cargo test --workspace` build the binary that tests/ drives.)

use std::process::Command;

fn sidecar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coco-sidecar"))
}

#[test]
fn invalid_options_are_refused_with_a_clear_message() {
    let out = sidecar()
        .args([
            "serve",
            "--socket",
            "/nonexistent/s",
            "--certs",
            "/x",
            "--lease-timeout-ms",
            "0",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lease-timeout-ms"), "{err}");

    let out = sidecar()
        .args(["serve", "--certs", "/x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket"));
}

#[test]
fn an_unusable_socket_path_is_reported() {
    let out = sidecar()
        .args([
            "serve",
            "--socket",
            "/nonexistent-dir/s.sock",
            "--certs",
            "/x",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on /nonexistent-dir/s.sock"),
        "{err}"
    );
}

#[test]
fn the_demo_runs_the_whole_flow() {
    let out = sidecar().arg("demo").output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    for kernel in ["KVM_EXIT_SNP_REQ_CERTS", "KVM_EXIT_COCO"] {
        assert!(report.contains(kernel), "{report}");
    }
    // The sample table is 4328 bytes: two pages, for each kernel's records.
    assert_eq!(
        report
            .matches("-> ENOSPC, too small: it needs 2 page(s)")
            .count(),
        2,
        "{report}"
    );
    assert_eq!(report.matches("-> 0, success").count(), 2, "{report}");
    assert!(
        report.contains("(ark, ask, vcek, then the all-zero end entry)"),
        "{report}"
    );
    assert!(report.contains("Next:\n"), "{report}");
    // Plain words, not the sidecar's internals.
    for internal in ["NoSpace", "CocoRfc", "0b1", "protocol features"] {
        assert!(!report.contains(internal), "{internal} in {report}");
    }
}
