//! The command line, through the built binary. (Being an integration test of this package
//! also makes `cargo test --workspace` build the binary that tests/ drives.)

use std::process::Command;

fn sidecar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coco-sidecar"))
}

/// Runs the binary; its exit code (a signal would be `None`) and standard error.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = sidecar().args(args).output().expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A usage error (unknown option or subcommand, a missing or malformed argument) exits 64,
/// EX_USAGE, for every subcommand, so that 2 keeps meaning "invalid blob" and 1 "unhealthy
/// socket" (docs/operations.md, "Exit statuses"; `health --help`).
#[test]
fn usage_errors_exit_64_for_every_subcommand() {
    let cases: &[&[&str]] = &[
        &["frobnicate"],
        &["serve", "--socket", "/x", "--certs", "/y", "--frobnicate"],
        &["serve", "--socket", "/x"],
        &[
            "serve",
            "--socket",
            "/x",
            "--certs",
            "/y",
            "--socket-mode",
            "999",
        ],
        &["health"],
        &["health", "--socket", "/x", "--frobnicate"],
        &["health", "--socket", "/x", "--timeout-ms", "0"],
        &["demo", "extra"],
        &["blob"],
        &["blob", "frobnicate"],
        &["blob", "import", "dir"],
        &["blob", "export", "b"],
        &["blob", "show"],
        &["blob", "check"],
        &["blob", "install", "new"],
        &["blob", "lock", "b"],
        &["blob", "lock", "b", "--wait-ms", "soon", "--", "true"],
        &["blob", "recover"],
    ];
    for args in cases {
        let (code, err) = run(args);
        assert_eq!(code, Some(64), "{args:?}: {err}");
    }
    // Each subcommand with its arguments complete and one option it does not know.
    let complete: &[&[&str]] = &[
        &["blob", "import", "dir", "b", "--frobnicate"],
        &["blob", "export", "b", "dir", "--frobnicate"],
        &["blob", "show", "b", "--frobnicate"],
        &["blob", "check", "b", "--frobnicate"],
        &["blob", "install", "new", "b", "--frobnicate"],
        &["blob", "recover", "b", "--frobnicate"],
        &["blob", "lock", "b", "--frobnicate", "--", "true"],
    ];
    for args in complete {
        let (code, err) = run(args);
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert!(err.contains("'--frobnicate'"), "{args:?}: {err}");
    }
    assert_eq!(run(&["blob", "--help"]).0, Some(0), "help is not an error");
}

/// `serve` refuses option values it cannot use before it listens: status 1, naming the
/// option.
#[test]
fn invalid_options_are_refused_with_a_clear_message() {
    let (code, err) = run(&[
        "serve",
        "--socket",
        "/nonexistent/s",
        "--certs",
        "/x",
        "--lease-timeout-ms",
        "0",
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--lease-timeout-ms"), "{err}");
}

#[test]
fn an_unusable_socket_path_is_reported() {
    let (code, err) = run(&[
        "serve",
        "--socket",
        "/nonexistent-dir/s.sock",
        "--certs",
        "/x",
    ]);
    assert_eq!(code, Some(1), "{err}");
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
