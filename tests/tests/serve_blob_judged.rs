//! `serve` judges the blob at start and on every change (issue 14), through the real binary:
//! a `--certs` that cannot be a blob stops it with exit status 2 and one line that names the
//! argument and the fix; a missing blob is legal; each state of the blob afterwards gets one
//! log line and the `coco_sidecar_blob_valid` / `..._vek_not_after_timestamp_seconds` gauges.
//! The expectations come from the fixtures' own documentation (tests/fixtures/amd/README.md:
//! the Turin VCEK is valid until 2031-11-06T21:14:00Z) and from `date -u -d ... +%s`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use coco_tests::updaters::wait_with_deadline;
use coco_tests::{amd_turin_blob, http_get, metrics_addr, sidecar_bin, Sidecar};

/// `date -u -d 2031-11-06T21:14:00Z +%s`: the Turin VCEK fixture's notAfter.
const TURIN_VCEK_NOT_AFTER: u64 = 1_951_766_040;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// `serve` that must not start: its output, bounded in time.
fn refused(certs: &Path) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new(sidecar_bin())
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--certs")
        .arg(certs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = wait_with_deadline(child, Duration::from_secs(10));
    assert!(
        !dir.path().join("s.sock").exists(),
        "no socket for a refused start"
    );
    out
}

#[test]
fn a_certs_that_cannot_be_a_blob_stops_serve_with_one_line_and_status_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let file = d.join("vcek.der");
    std::fs::copy(fixture("amd/vcek-turin.der"), &file).expect("copy");
    let garbage = d.join("garbage.blob");
    std::fs::write(&garbage, b"not a table").expect("write");
    let cases: [(&Path, String); 4] = [
        (d, "is a directory, not a blob file".into()),
        // A certificate is not a table: the structure error and its hint.
        (
            &file,
            "not a certificate blob: no all-zero terminator".into(),
        ),
        (&garbage, "not a certificate blob".into()),
        (
            &file.join("certs.blob"),
            format!("{} is a file, not a directory", file.display()),
        ),
    ];
    for (certs, message) in &cases {
        let out = refused(certs);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", certs.display());
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("--certs {}", certs.display())),
            "names the argument: {err}"
        );
        assert!(err.contains(message.as_str()), "{message:?} in {err}");
        assert!(err.contains("refusing to start"), "{err}");
    }
    // The same, as JSON for a log collector: one object, the same message.
    let out = Command::new(sidecar_bin())
        .args(["--log-format", "json", "serve", "--socket"])
        .arg(d.join("j.sock"))
        .arg("--certs")
        .arg(&garbage)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let line: serde_json::Value = serde_json::from_str(err.trim()).expect("a JSON object");
    assert_eq!(line["level"], "ERROR");
    let msg = line["msg"].as_str().expect("msg");
    assert!(msg.contains("not a certificate blob"), "{msg}");
}

fn gauges(sidecar: &Sidecar) -> (Option<f64>, Option<f64>) {
    let body = http_get(metrics_addr(sidecar), "/metrics").body;
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().parse::<f64>().expect("a number"))
    };
    (
        value("coco_sidecar_blob_valid"),
        value("coco_sidecar_blob_vek_not_after_timestamp_seconds"),
    )
}

/// Waits (bounded) until the log has `n` lines from the monitor; returns them.
fn monitor_lines(sidecar: &Sidecar, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = sidecar
            .log()
            .lines()
            .filter(|l| l.contains("coco_sidecar::daemon::monitor"))
            .map(str::to_owned)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_state_of_the_blob_is_logged_once_and_exported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = amd_turin_blob(dir.path());
    let blob = dir.path().join("certs.blob");
    std::fs::copy(&good, &blob).expect("copy");
    let sidecar = Sidecar::start_logging(&blob, &["--metrics", "127.0.0.1:0"], "info");
    let lines = monitor_lines(&sidecar, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    for part in [
        "INFO",
        &format!("blob {}: OK: Turin VCEK", blob.display()),
        "TCB bl=0,tee=0,snp=0,ucode=9,fmc=0",
        "valid until 2031-11-06T21:14:00Z",
        "chain verified",
    ] {
        assert!(lines[0].contains(part), "{part:?} in {}", lines[0]);
    }
    assert_eq!(
        gauges(&sidecar),
        (Some(1.0), Some(TURIN_VCEK_NOT_AFTER as f64))
    );

    // Garbage written over it: one error line with the fix, valid 0, no VCEK.
    std::fs::write(&blob, b"not a certificate table").expect("write");
    let lines = monitor_lines(&sidecar, 2);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("ERROR"), "{}", lines[1]);
    assert!(lines[1].contains("NOT servable"), "{}", lines[1]);
    assert!(
        lines[1].contains(&format!("coco-sidecar blob install NEW {}", blob.display())),
        "{}",
        lines[1]
    );
    assert_eq!(gauges(&sidecar), (Some(0.0), None));

    // Gone: the missing policy, said once.
    std::fs::remove_file(&blob).expect("rm");
    let lines = monitor_lines(&sidecar, 3);
    assert!(lines[2].contains("does not exist"), "{}", lines[2]);
    assert!(lines[2].contains("--missing-certs empty"), "{}", lines[2]);

    // Back: OK again; and nothing more while nothing changes.
    std::fs::copy(&good, &blob).expect("copy");
    let lines = monitor_lines(&sidecar, 4);
    assert!(lines[3].contains(": OK: Turin VCEK"), "{}", lines[3]);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        monitor_lines(&sidecar, 5).len(),
        4,
        "no line without a change"
    );
    assert_eq!(
        gauges(&sidecar),
        (Some(1.0), Some(TURIN_VCEK_NOT_AFTER as f64))
    );
}

#[test]
fn a_missing_blob_is_legal_at_start_and_follows_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("not-yet.blob");
    let sidecar = Sidecar::start_logging(&blob, &["--missing-certs", "again"], "info");
    let lines = monitor_lines(&sidecar, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    assert!(
        lines[0].contains("guests get EAGAIN, and the empty table once that lasted"),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("coco-sidecar blob import DIR {}", blob.display())),
        "{}",
        lines[0]
    );
    // Probes are not news at info level: two `health` runs add no line.
    let before = sidecar.log().lines().count();
    for _ in 0..2 {
        let out = Command::new(sidecar_bin())
            .arg("health")
            .arg("--socket")
            .arg(&sidecar.socket)
            .output()
            .expect("health");
        assert!(out.status.success(), "{out:?}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = sidecar.log();
    assert_eq!(log.lines().count(), before, "{log}");
}
