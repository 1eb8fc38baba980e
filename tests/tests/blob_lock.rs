//! `coco-sidecar blob lock` and `blob install` against a running `coco-sidecar serve` (issue 3):
//! while the exclusive lock is held requests get EAGAIN, afterwards they get the new blob; an
//! install waits for an active lease (or times out saying why); `blob lock` passes COMMAND's
//! status through and never lets go of the lock while COMMAND runs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use coco_protocol::{Abi, CertsRet, Frontend};
use coco_tests::updaters::{
    blob_cmd, connect_with_ram, old_and_new, output_text as text, staged, wait_for_file,
    wait_with_deadline, Staged,
};
use coco_tests::{exclusive_lock_free, sidecar_bin, GuestMem, HeldLock, Sidecar};

const MEM: u64 = coco_tests::updaters::MEM;

/// A sidecar serving `served`, a connection with 64 KiB of guest RAM at gpa 0.
fn serving(served: &Path, extra: &[&str]) -> (Sidecar, Frontend, GuestMem) {
    let sidecar = Sidecar::start(served, extra);
    let (fe, mem) = connect_with_ram(&sidecar.socket, 0xaa);
    (sidecar, fe, mem)
}

/// One request for the whole of guest RAM; returns (ret, lease).
fn request(fe: &mut Frontend) -> (CertsRet, u64) {
    let r = fe
        .request_certs(Abi::SnpReqCerts, 0, 0, MEM / 4096)
        .expect("request");
    (r.ret, r.lease)
}

fn assert_serves(fe: &mut Frontend, mem: &GuestMem, expected: &[u8]) {
    let (ret, lease) = request(fe);
    assert_eq!(ret, CertsRet::Ok);
    assert_eq!(mem.read(0, expected.len()), expected);
    fe.done(lease).expect("done");
}

#[test]
fn requests_get_eagain_under_blob_lock_and_the_new_blob_after() {
    let Staged {
        dir,
        old,
        new,
        served,
        new_path,
    } = staged();
    let (_sidecar, mut fe, mem) = serving(&served, &["--lock-wait-ms", "50"]);
    assert_serves(&mut fe, &mem, &old);

    // COMMAND signals that it runs, then waits until the test lets it finish.
    let held = dir.path().join("held");
    let release = dir.path().join("release");
    let script = format!(
        "touch '{}'; while [ ! -e '{}' ]; do sleep 0.02; done",
        held.display(),
        release.display()
    );
    let mut child = blob_cmd()
        .arg("lock")
        .arg(&served)
        .arg("--install")
        .arg(&new_path)
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blob lock");
    wait_for_file(&held, &mut child);
    assert!(!exclusive_lock_free(&served), "blob lock holds the lock");
    for abi in [Abi::SnpReqCerts, Abi::CocoRfc] {
        let r = fe.request_certs(abi, 1, 0, MEM / 4096).expect("request");
        assert_eq!(r.ret, CertsRet::Again, "{abi:?} while locked");
        assert_eq!(r.lease, 0);
    }
    assert_eq!(
        std::fs::read(&served).expect("read"),
        old,
        "not yet installed"
    );

    std::fs::write(&release, b"").expect("release");
    let out = wait_with_deadline(child, Duration::from_secs(10));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("rewritten under the exclusive lock"),
        "{}",
        text(&out)
    );
    assert!(exclusive_lock_free(&served), "released");
    assert_serves(&mut fe, &mem, &new);
}

/// Whether process `pid` holds an exclusive OFD lock on the single byte 2^62 of the file with
/// inode `ino`, the way updaters announce that they wait for the whole file (docs/design.md,
/// "Updaters first"), as the kernel lists it in `/proc/PID/fdinfo`:
/// `lock:\t1: OFDLCK ADVISORY  WRITE -1 MAJ:MIN:INODE START END`.
fn announces_wait(pid: u32, ino: u64) -> bool {
    let byte = (1u64 << 62).to_string();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .flat_map(|info| info.lines().map(str::to_owned).collect::<Vec<_>>())
        .any(|line| {
            let t: Vec<&str> = line.split_whitespace().collect();
            t.first() == Some(&"lock:")
                && t.get(2) == Some(&"OFDLCK")
                && t.get(4) == Some(&"WRITE")
                && t.get(6).is_some_and(|f| f.ends_with(&format!(":{ino}")))
                && t.get(7) == Some(&byte.as_str())
                && t.get(8) == Some(&byte.as_str())
        })
}

#[test]
fn install_waits_for_an_active_lease_and_succeeds_after_done() {
    let Staged {
        dir: _dir,
        old,
        new,
        served,
        new_path,
    } = staged();
    let (_sidecar, mut fe, mem) = serving(&served, &["--lease-timeout-ms", "20000"]);

    // A request granted, not yet DONE: its lease holds a shared lock.
    let (ret, lease) = request(&mut fe);
    assert_eq!(ret, CertsRet::Ok);
    assert_ne!(lease, 0);

    let mut install = blob_cmd()
        .arg("install")
        .arg(&new_path)
        .arg(&served)
        .args(["--wait-ms", "10000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn install");
    // The kernel's view: install waits with its wait announced on the blob (docs/design.md,
    // "Updaters first"), and has not finished.
    let ino = std::fs::metadata(&served).expect("stat").ino();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !announces_wait(install.id(), ino) {
        assert!(
            install.try_wait().expect("try_wait").is_none(),
            "install ended instead of waiting for the lease"
        );
        assert!(
            Instant::now() < deadline,
            "install never waited on the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(install.try_wait().expect("try_wait").is_none());
    assert_eq!(std::fs::read(&served).expect("read"), old);

    let done_at = Instant::now();
    fe.done(lease).expect("done");
    let out = wait_with_deadline(install, Duration::from_secs(10));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        done_at.elapsed() < Duration::from_secs(3),
        "install finished soon after DONE"
    );
    assert_eq!(std::fs::read(&served).expect("read"), new);
    assert_serves(&mut fe, &mem, &new);
}

#[test]
fn install_times_out_naming_the_holder() {
    let Staged {
        dir: _dir,
        old,
        new,
        served,
        new_path,
    } = staged();
    let (_sidecar, mut fe, mem) = serving(&served, &["--lease-timeout-ms", "20000"]);
    let (_, lease) = request(&mut fe);
    assert_ne!(lease, 0);

    let install = |wait: &str| {
        blob_cmd()
            .arg("install")
            .arg(&new_path)
            .arg(&served)
            .args(["--wait-ms", wait])
            .output()
            .expect("install")
    };
    let started = Instant::now();
    let out = install("300");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(started.elapsed() >= Duration::from_millis(300));
    let msg = text(&out);
    for needle in [
        "is still locked after",
        "a coco-sidecar holds a shared lock",
        "COCO_DONE",
        "raise --wait-ms",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing: {msg}");
    }
    assert_eq!(std::fs::read(&served).expect("read"), old, "untouched");
    fe.done(lease).expect("done");

    // Another updater holding the exclusive lock is named as such.
    let other = HeldLock::take("exclusive", &served);
    let out = install("100");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("another updater holds the exclusive lock"),
        "{}",
        text(&out)
    );
    other.release();
    let out = install("1000");
    assert!(out.status.success(), "{}", text(&out));
    assert_serves(&mut fe, &mem, &new);
}

#[test]
fn install_creates_an_absent_blob() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, new) = old_and_new();
    let served = dir.path().join("certs.blob");
    let new_path = dir.path().join("new.blob");
    std::fs::write(&new_path, &new).expect("write");
    let (_sidecar, mut fe, mem) = serving(&served, &["--missing-certs", "again"]);
    assert_eq!(request(&mut fe).0, CertsRet::Again);
    let out = blob_cmd()
        .arg("install")
        .arg(&new_path)
        .arg(&served)
        .output()
        .expect("install");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created"), "{}", text(&out));
    let mode = std::fs::metadata(&served)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_serves(&mut fe, &mem, &new);
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn blob_lock_passes_status_signals_and_failures_through() {
    let Staged {
        dir,
        old,
        new: _,
        served,
        new_path,
    } = staged();
    let lock = |extra: &[&str], command: &[&str]| {
        blob_cmd()
            .arg("lock")
            .arg(&served)
            .args(extra)
            .arg("--")
            .args(command)
            .output()
            .expect("blob lock")
    };
    assert_eq!(lock(&[], &["sh", "-c", "exit 7"]).status.code(), Some(7));
    assert_eq!(lock(&[], &["true"]).status.code(), Some(0));
    assert_eq!(
        lock(&[], &["sh", "-c", "kill -TERM $$"]).status.code(),
        Some(128 + 15)
    );
    let out = lock(&[], &["/nonexistent/command"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out));
    assert!(
        text(&out).contains("cannot run /nonexistent/command"),
        "{}",
        text(&out)
    );
    let not_executable = dir.path().join("not-executable.sh");
    std::fs::write(&not_executable, "#!/bin/sh\nexit 0\n").expect("write");
    let out = lock(&[], &[not_executable.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));

    // COMMAND sees which blob is locked; an install of it inside fails at once.
    let out = lock(&[], &["sh", "-c", "test -n \"$COCO_SIDECAR_BLOB_LOCKED\""]);
    assert!(out.status.success());
    let inner = format!(
        "'{}' blob install '{}' '{}' --wait-ms 5000",
        sidecar_bin().display(),
        new_path.display(),
        served.display()
    );
    let started = Instant::now();
    let out = lock(&[], &["sh", "-c", &inner]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(4), "no deadlock");
    assert!(text(&out).contains("blob lock --install"), "{}", text(&out));

    // --install after a failed COMMAND leaves the blob alone.
    let out = lock(
        &["--install", new_path.to_str().expect("utf-8")],
        &["false"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is unchanged"), "{}", text(&out));
    assert_eq!(std::fs::read(&served).expect("read"), old);
    // --install of an invalid blob is refused before COMMAND runs.
    let bad = dir.path().join("bad.blob");
    std::fs::write(&bad, b"junk").expect("write");
    let marker = dir.path().join("ran");
    let touch = format!("touch '{}'", marker.display());
    let out = lock(
        &["--install", bad.to_str().expect("utf-8")],
        &["sh", "-c", &touch],
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(!marker.exists(), "COMMAND must not run");

    // Busy: another updater holds the lock past --wait-ms.
    let other = HeldLock::take("exclusive", &served);
    let out = lock(&["--wait-ms", "100"], &["sh", "-c", &touch]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out));
    assert!(text(&out).contains("another updater"), "{}", text(&out));
    assert!(!marker.exists());
    // `blob recover` waits for the same lock: 4 once --wait-ms is over.
    let out = blob_cmd()
        .arg("recover")
        .arg(&served)
        .args(["--wait-ms", "100"])
        .output()
        .expect("blob recover");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    other.release();

    // A missing blob is an error, not a lock on a new empty file.
    let out = blob_cmd()
        .args(["lock", "/nonexistent/certs.blob", "--", "true"])
        .output()
        .expect("blob lock");
    assert_eq!(out.status.code(), Some(125), "{}", text(&out));
    assert!(text(&out).contains("does not exist"), "{}", text(&out));
}

#[test]
fn termination_signals_go_to_command_and_the_lock_stays_until_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, _) = old_and_new();
    let served = dir.path().join("certs.blob");
    std::fs::write(&served, &old).expect("write");
    let held = dir.path().join("held");
    let trapped = dir.path().join("trapped");
    let release = dir.path().join("release");
    // On SIGTERM, COMMAND notes it, keeps going until released, then exits 42.
    let script = format!(
        "trap \"touch '{t}'\" TERM; touch '{h}'; while [ ! -e '{r}' ]; do sleep 0.02; done; exit 42",
        t = trapped.display(),
        h = held.display(),
        r = release.display()
    );
    let mut child = blob_cmd()
        .arg("lock")
        .arg(&served)
        .args(["--", "sh", "-c", &script])
        .spawn()
        .expect("spawn");
    wait_for_file(&held, &mut child);
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_for_file(&trapped, &mut child);
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "blob lock survives SIGTERM"
    );
    assert!(!exclusive_lock_free(&served), "and keeps the lock");
    std::fs::write(&release, b"").expect("release");
    let out = wait_with_deadline(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(42));
    assert!(exclusive_lock_free(&served));
}
