//! End-to-end: the seccomp filter of `coco-sidecar serve`. Serving works under it in every
//! thread, a forbidden system call kills the process with SIGSYS, and `--no-seccomp` turns it
//! off. (Every other end-to-end test also runs under the filter, since it is on by default.)

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::{CertsRet, Frontend};
use coco_tests::{
    exclusive_lock_free, http_get, metrics_addr, table_of_size, write_blob, GuestMem, Sidecar,
};

const RAM: u64 = 1 << 20;
const SELFTEST_ENV: &str = "COCO_SIDECAR_SECCOMP_SELFTEST";

/// `(thread id, Seccomp mode, Seccomp_filters, NoNewPrivs)` of every thread of `pid`, from
/// /proc: the kernel's own account of what is installed.
fn thread_seccomp(pid: u32) -> Vec<(String, String, String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list");
    tasks
        .filter_map(|t| {
            let t = t.expect("task").file_name().to_string_lossy().into_owned();
            // A thread that ended since the listing (a scrape's, a closed connection's).
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            Some((
                t,
                field("Seccomp:"),
                field("Seccomp_filters:"),
                field("NoNewPrivs:"),
            ))
        })
        .collect()
}

#[test]
fn serving_works_under_the_filter_in_every_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(6000, 4);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let mut sidecar = Sidecar::start(&blob, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&sidecar);
    let mem = GuestMem::new(RAM, 0);
    let mut a = sidecar.connect();
    let mut b = sidecar.connect();
    a.set_mem_table(&[mem.region(0)]).expect("memory");
    b.add_mem_region(&mem.region(0)).expect("memory");
    assert_eq!(a.caps().expect("caps").abis, 0x6);
    assert_eq!(a.max_mem_slots().expect("slots"), 32);

    // Probe, then fetch; a lease (shared OFD lock) is held until DONE.
    let probe = a.request_certs(Abi::CocoRfc, 0, 0x2000, 0).expect("probe");
    assert_eq!((probe.ret, probe.npages), (CertsRet::NoSpace, 2));
    let got = a.request_certs(Abi::CocoRfc, 0, 0x2000, 2).expect("fetch");
    assert_eq!(got.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x2000, table.len()), table);
    assert!(!exclusive_lock_free(&blob), "the lease holds the lock");
    a.done(got.lease).expect("done");
    assert!(exclusive_lock_free(&blob));
    let other = b
        .request_certs(Abi::SnpReqCerts, 7, 0x8000, 4)
        .expect("fetch");
    assert_eq!(other.ret, CertsRet::Ok);
    b.remove_mem_region(mem.region(0).desc())
        .expect("remove region");
    assert_eq!(
        b.request_certs(Abi::SnpReqCerts, 7, 0x8000, 4)
            .expect("fetch")
            .ret,
        CertsRet::Io,
        "no memory left on b"
    );
    assert_eq!(http_get(addr, "/metrics").status, 200);

    // main, metrics, two connections (and maybe the probe's): every one filtered, no privs.
    let threads = thread_seccomp(sidecar.pid());
    assert!(threads.len() >= 4, "{threads:?}");
    for (tid, mode, filters, nnp) in &threads {
        assert_eq!(mode, "2", "thread {tid}: SECCOMP_MODE_FILTER");
        assert_eq!(filters, "1", "thread {tid}: one filter");
        assert_eq!(nnp, "1", "thread {tid}: no_new_privs");
    }

    // A new version of the blob, read under the filter.
    let newer = table_of_size(5000, 9);
    std::fs::write(&blob, &newer).expect("rewrite");
    let again = a.request_certs(Abi::CocoRfc, 1, 0x2000, 2).expect("fetch");
    assert_eq!(again.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x2000, newer.len()), newer);

    // Shutdown under the filter: connections closed, leases dropped, socket removed, exit 0.
    let status = sidecar.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", sidecar.log());
    assert!(!sidecar.socket.exists());
    assert!(exclusive_lock_free(&blob));
    assert!(sidecar.log().contains("seccomp filter installed"));
}

/// Starts `serve` directly (not through [`Sidecar`], which waits for it to accept).
fn spawn_serve(dir: &Path, blob: &Path, extra: &[&str], selftest: Option<&str>) -> Child {
    let mut cmd =
        coco_tests::serve_command(&dir.join("sidecar.sock"), blob, extra, &dir.join("log"));
    cmd.env("RUST_LOG", "info");
    match selftest {
        Some(value) => cmd.env(SELFTEST_ENV, value),
        None => cmd.env_remove(SELFTEST_ENV),
    };
    cmd.spawn().expect("spawn coco-sidecar")
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Runs the self-test `value` under the filter; returns the signal that ended the process and
/// its log.
fn selftest(value: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 1));
    let mut child = spawn_serve(dir.path(), &blob, &[], Some(value));
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the self-test did not end the process:\n{log}");
    };
    assert!(log.contains("seccomp filter installed"), "{log}");
    (status.signal(), log)
}

#[test]
fn a_fault_kills_the_process_with_its_own_signal_not_sigsys() {
    // std's handler for SIGSEGV and SIGBUS restores the default action with rt_sigaction and
    // lets the fault happen again; the filter allows that call, so the fault is what the
    // process dies of (and what the audit log and the container runtime report).
    for (value, signal) in [("sigsegv", libc::SIGSEGV), ("sigbus", libc::SIGBUS)] {
        let (got, log) = selftest(value);
        assert_eq!(got, Some(signal), "{value}: killed by {got:?}:\n{log}");
        assert!(log.contains("faulting on purpose"), "{log}");
    }
}

#[test]
fn a_forbidden_system_call_kills_the_process_with_sigsys() {
    let (signal, log) = selftest("1");
    assert_eq!(signal, Some(libc::SIGSYS), "killed by {signal:?}:\n{log}");
    assert!(log.contains("calling socket(AF_INET)"), "{log}");
    assert!(!log.contains("not stopped"), "{log}");
}

#[test]
fn no_seccomp_turns_the_filter_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 1));
    // The self-test runs only after installing a filter: without one, nothing dies.
    let mut child = spawn_serve(dir.path(), &blob, &["--no-seccomp"], Some("1"));
    let socket = dir.path().join("sidecar.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut vmm = loop {
        if let Ok(v) = Frontend::connect(&socket) {
            break v;
        }
        if let Some(s) = child.try_wait().expect("wait") {
            panic!("exited with {s:?}");
        }
        assert!(Instant::now() < deadline, "not serving within 10 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mem = GuestMem::new(RAM, 0);
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    let threads = thread_seccomp(child.id());
    assert!(
        threads.iter().all(|(_, mode, _, _)| mode == "0"),
        "{threads:?}"
    );
    assert!(child.try_wait().expect("wait").is_none(), "still running");
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
}
