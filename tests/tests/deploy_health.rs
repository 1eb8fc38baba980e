//! End-to-end, through the real binary: `coco-sidecar health`, the probe the Kubernetes
//! manifests run. Exit 0 healthy, 1 socket, 2 blob; one line of reason. Issue 7.

mod deploy_support;

use std::os::unix::net::UnixListener;
use std::process::Output;
use std::time::{Duration, Instant};

use coco_tests::{table_of_size, write_blob, HeldLock, Sidecar};
use deploy_support::health;

fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes).into_owned();
    assert_eq!(text.lines().count(), 1, "exactly one line: {text:?}");
    text.trim_end().to_owned()
}

/// The exit status and the one line the probe printed (stdout when healthy, stderr if not).
fn probe(args: &[&str]) -> (i32, String) {
    let out: Output = health(args);
    let code = out.status.code().expect("exited");
    if code == 0 {
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, one_line(&out.stdout))
    } else {
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        (code, one_line(&out.stderr))
    }
}

#[test]
fn a_serving_sidecar_with_a_valid_blob_is_healthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(5000, 2));
    let sidecar = Sidecar::start(&blob, &[]);
    let sock = sidecar.socket.to_str().expect("utf-8");
    let certs = blob.to_str().expect("utf-8");

    let (code, line) = probe(&["--socket", sock]);
    assert_eq!(code, 0, "{line}");
    assert!(
        line.starts_with("healthy: sidecar answers (abis 0x6, sub-types 0x1"),
        "{line}"
    );

    let (code, line) = probe(&["--socket", sock, "--certs", certs]);
    assert_eq!(code, 0, "{line}");
    assert!(
        line.ends_with("blob valid: 3 entries, 5000 bytes"),
        "{line}"
    );

    // Over 16 KiB: still servable, but said.
    let big = write_blob(dir.path(), "big.bin", &table_of_size(20000, 5));
    let (code, line) = probe(&["--socket", sock, "--certs", big.to_str().expect("utf-8")]);
    assert_eq!(code, 0);
    assert!(
        line.contains("over the 16384 bytes Linux guests accept"),
        "{line}"
    );

    // The probe's connections are ordinary ones: the sidecar logged them and kept serving.
    assert!(sidecar.log().contains("closed by peer"));
}

#[test]
fn a_blob_the_sidecar_would_not_serve_is_reported_with_status_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 2));
    let sidecar = Sidecar::start(&blob, &[]);
    let sock = sidecar.socket.to_str().expect("utf-8");
    let certs = blob.to_str().expect("utf-8");

    // Locked by an updater: EAGAIN for guests, status 2 after the bounded wait.
    let lock = HeldLock::take("exclusive", &blob);
    let started = Instant::now();
    let (code, line) = probe(&["--socket", sock, "--certs", certs, "--lock-wait-ms", "300"]);
    let took = started.elapsed();
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("unhealthy: blob not servable now (guests get EAGAIN)"),
        "{line}"
    );
    assert!(line.contains("locked by an updater"), "{line}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "waited the bound, not forever: {took:?}"
    );
    lock.release();
    assert_eq!(probe(&["--socket", sock, "--certs", certs]).0, 0);

    // A shared lock (a sidecar's lease) does not disturb the probe.
    let lease = HeldLock::take("shared", &blob);
    assert_eq!(probe(&["--socket", sock, "--certs", certs]).0, 0);
    drop(lease);

    // Invalid: the same validation as serve.
    let mut bad = table_of_size(3000, 2);
    bad[16] = 0xff; // first entry's offset now points past the file
    std::fs::write(&blob, &bad).expect("write");
    let (code, line) = probe(&["--socket", sock, "--certs", certs]);
    assert_eq!(code, 2);
    assert!(line.contains("is not a valid certificate table"), "{line}");

    // Missing: servable as the empty table by default, not under --missing-certs eio/again.
    std::fs::remove_file(&blob).expect("rm");
    let (code, line) = probe(&["--socket", sock, "--certs", certs]);
    assert_eq!(code, 0);
    assert!(
        line.ends_with("blob absent: the empty table is served"),
        "{line}"
    );
    let (code, line) = probe(&["--socket", sock, "--certs", certs, "--missing-certs", "eio"]);
    assert_eq!(code, 2);
    assert!(
        line.contains("guests get EIO") && line.contains("does not exist"),
        "{line}"
    );
    let (code, _) = probe(&[
        "--socket",
        sock,
        "--certs",
        certs,
        "--missing-certs",
        "again",
    ]);
    assert_eq!(code, 2);
}

#[test]
fn a_sidecar_that_does_not_answer_is_reported_with_status_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nobody-home.sock");
    let s = sock.to_str().expect("utf-8");
    let (code, line) = probe(&["--socket", s]);
    assert_eq!(code, 1);
    assert!(
        line.starts_with(&format!("unhealthy: cannot connect to {s}")),
        "{line}"
    );

    // Something accepts (the kernel queues the connection) but never answers: a hung
    // sidecar. The probe gives up after --timeout-ms.
    let _listener = UnixListener::bind(&sock).expect("bind");
    let started = Instant::now();
    let (code, line) = probe(&["--socket", s, "--timeout-ms", "300"]);
    assert_eq!(code, 1);
    assert!(line.contains("no working handshake"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A stopped sidecar (SIGSTOP, as a frozen container) is the same case.
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(1000, 1));
    let sidecar = Sidecar::start(&blob, &[]);
    let ss = sidecar.socket.to_str().expect("utf-8");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(sidecar.pid() as i32, libc::SIGSTOP) };
    let (code, _) = probe(&["--socket", ss, "--timeout-ms", "300"]);
    // SAFETY: as above.
    unsafe { libc::kill(sidecar.pid() as i32, libc::SIGCONT) };
    assert_eq!(code, 1);
    assert_eq!(probe(&["--socket", ss]).0, 0, "healthy again once it runs");

    let out = health(&["--socket", ss, "--timeout-ms", "0"]);
    assert_eq!(out.status.code(), Some(64));
}
