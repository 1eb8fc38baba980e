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
    for abi in ["CocoRfc", "SnpReqCerts"] {
        assert!(report.contains(&format!("-- {abi} records --")), "{report}");
    }
    assert_eq!(
        report.matches("ret NoSpace, npages 2").count(),
        2,
        "{report}"
    );
    assert_eq!(report.matches("-> ret Ok").count(), 2, "{report}");
    assert!(
        report.contains("vcek  63da758d-e664-4564-adc5-f4b93be8accd"),
        "{report}"
    );
}
