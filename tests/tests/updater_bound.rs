//! Updaters are not starved by guest requests (issue 12): whatever the request pattern, an
//! updater that waits for the exclusive lock gets it within `--lease-timeout-ms` plus
//! `--lock-wait-ms` plus 1 s, through the real sidecar:
//! - an honest VMM whose two vCPUs interleave their requests (a lease is held at every
//!   instant, each ended by COCO_DONE);
//! - a hostile VMM that sends a request every 150 ms from vCPUs 0 to 7 in turn and never
//!   DONE, so that each lease lasts its full timeout and seven overlap at any time;
//! - updaters: `blob install` and `blob lock` (which announce their wait), and a third party
//!   that simply blocks in `F_OFD_SETLKW` for an exclusive lock on the whole file.
//!
//! Each test first shows that the pattern keeps the shared lock held (a non-announced
//! exclusive try never succeeds), then runs the updater with the bound as its deadline.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::{Abi, CertsRet};
use coco_tests::updaters::{blob_cmd, connect_with_ram, output_text, staged, Staged, MEM};
use coco_tests::{lock_free, locker_bin, Sidecar, StopOnDrop};

const LEASE_TIMEOUT_MS: u64 = 1000;
const LOCK_WAIT_MS: u64 = 100;

/// What the sidecar promises an updater: `--lease-timeout-ms` + `--lock-wait-ms` + 1 s.
const BOUND_MS: u64 = LEASE_TIMEOUT_MS + LOCK_WAIT_MS + 1000;

fn sidecar(blob: &Path) -> Sidecar {
    Sidecar::start(
        blob,
        &[
            "--lease-timeout-ms",
            &LEASE_TIMEOUT_MS.to_string(),
            "--lock-wait-ms",
            &LOCK_WAIT_MS.to_string(),
        ],
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    /// Two vCPUs interleave: EXIT 0, EXIT 1, DONE 0, EXIT 0, DONE 1, EXIT 1, ...
    Honest,
    /// A request every 150 ms from vCPU 0, 1, ..., 7, 0, ..., never a DONE: a vCPU asks
    /// again only after 1.2 s, so each lease lasts until the lease timeout (1 s).
    NoDone,
}

/// A VMM sending `pattern` until `stop`; counts the tables it got.
fn vmm(socket: &Path, pattern: Pattern, tables: &AtomicU64, stop: &AtomicBool) {
    let (mut fe, _mem) = connect_with_ram(socket, 0);
    let mut held: [Option<u64>; 2] = [None, None];
    let mut vcpu = 0u32;
    let vcpus = match pattern {
        Pattern::Honest => 2,
        Pattern::NoDone => 8,
    };
    while !stop.load(Ordering::Relaxed) {
        let r = fe
            .request_certs(Abi::SnpReqCerts, vcpu, 0, MEM / 4096)
            .expect("the sidecar answers");
        assert!(matches!(r.ret, CertsRet::Ok | CertsRet::Again), "{r:?}");
        if r.ret == CertsRet::Ok {
            tables.fetch_add(1, Ordering::Relaxed);
        }
        match pattern {
            Pattern::Honest => {
                // The other vCPU's request reaches firmware now that this one holds a lease.
                if let Some(lease) = held[1 - vcpu as usize].take() {
                    fe.done(lease).expect("done");
                }
                held[vcpu as usize] = (r.lease != 0).then_some(r.lease);
                thread::sleep(Duration::from_millis(1));
            }
            Pattern::NoDone => thread::sleep(Duration::from_millis(150)),
        }
        vcpu = (vcpu + 1) % vcpus;
    }
}

/// Runs `pattern` against `sidecars` sidecars of one fresh blob (one VMM each), checks that
/// it keeps the lock held, and then calls `updater`, which checks that it got the lock within
/// the bound and returns how long it took; checks that guests are served again afterwards.
fn under(pattern: Pattern, sidecars: usize, updater: impl FnOnce(&Path, &Path) -> Duration) {
    let Staged {
        dir: _dir,
        served: blob,
        new_path,
        ..
    } = staged();
    let sidecars: Vec<Sidecar> = (0..sidecars).map(|_| sidecar(&blob)).collect();
    let tables: Vec<AtomicU64> = sidecars.iter().map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let traffic: Vec<_> = sidecars
            .iter()
            .zip(&tables)
            .map(|(sidecar, tables)| {
                let stop = &stop;
                s.spawn(move || vmm(&sidecar.socket, pattern, tables, stop))
            })
            .collect();
        let _stop = StopOnDrop(&stop);
        // The pattern is under way once every VMM has had two tables.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tables.iter().any(|t| t.load(Ordering::Relaxed) < 2) {
            assert!(Instant::now() < deadline, "the VMMs are not served");
            thread::sleep(Duration::from_millis(10));
        }
        // The pattern holds the shared lock at every instant: an exclusive try that does not
        // announce itself never gets it (and does not make the sidecar yield).
        for _ in 0..10 {
            assert!(!lock_free("exclusive", &blob), "{pattern:?} left a gap");
            thread::sleep(Duration::from_millis(50));
        }
        let took = updater(&blob, &new_path);
        eprintln!("{pattern:?}: the updater took {took:?} (bound {BOUND_MS} ms)");
        // Guests are served again, from the blob as the updater left it.
        let before: Vec<u64> = tables.iter().map(|t| t.load(Ordering::Relaxed)).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while tables
            .iter()
            .zip(&before)
            .any(|(t, b)| t.load(Ordering::Relaxed) == *b)
        {
            assert!(Instant::now() < deadline, "no table after the update");
            assert!(traffic.iter().all(|t| !t.is_finished()), "a VMM failed");
            thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        for t in traffic {
            if let Err(panic) = t.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    for sidecar in &sidecars {
        assert!(
            sidecar
                .log()
                .contains("an updater waits for the blob's exclusive lock; no new leases"),
            "{}",
            sidecar.log()
        );
    }
}

/// `blob install --wait-ms BOUND` succeeds (the tool gives up when its wait for the lock,
/// which starts once NEW is validated, lasts longer), and BLOB is the new blob.
fn install_within_the_bound(blob: &Path, new: &Path) -> Duration {
    let t = Instant::now();
    let out = blob_cmd()
        .arg("install")
        .arg(new)
        .arg(blob)
        .args(["--wait-ms", &BOUND_MS.to_string()])
        .output()
        .expect("install");
    let waited = t.elapsed();
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        std::fs::read(blob).expect("read"),
        std::fs::read(new).expect("read")
    );
    waited
}

#[test]
fn an_install_is_not_starved_by_interleaved_requests_of_an_honest_vmm() {
    under(Pattern::Honest, 1, install_within_the_bound);
}

#[test]
fn an_install_is_not_starved_by_a_vmm_that_never_sends_done() {
    under(Pattern::NoDone, 1, install_within_the_bound);
}

#[test]
fn blob_lock_is_not_starved_by_a_vmm_that_never_sends_done() {
    under(Pattern::NoDone, 1, |blob, _| {
        let t = Instant::now();
        let out = blob_cmd()
            .arg("lock")
            .arg(blob)
            .args(["--wait-ms", &BOUND_MS.to_string(), "--", "true"])
            .output()
            .expect("blob lock");
        assert!(out.status.success(), "{}", output_text(&out));
        t.elapsed()
    });
}

/// The third-party updater (`coco-test-locker wait exclusive`), stopped when dropped.
struct ThirdParty {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ThirdParty {
    fn start(blob: &Path) -> ThirdParty {
        let mut child = Command::new(locker_bin())
            .args(["wait", "exclusive"])
            .arg(blob)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the locker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ThirdParty { child, lines }
    }

    fn said(&self, what: &str, within: Duration) {
        let got = self.lines.recv_timeout(within);
        assert_eq!(
            got.as_deref(),
            Ok(what),
            "the locker did not say {what:?} in time"
        );
    }
}

impl Drop for ThirdParty {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn third_party_within_the_bound(blob: &Path) -> Duration {
    let locker = ThirdParty::start(blob);
    locker.said("waiting", Duration::from_secs(10));
    let t = Instant::now();
    locker.said("locked", Duration::from_millis(BOUND_MS));
    let waited = t.elapsed();
    // While it holds the lock, guests get EAGAIN (the VMM asserts nothing else comes).
    thread::sleep(Duration::from_millis(200));
    drop(locker);
    waited
}

#[test]
fn a_third_party_waiting_in_f_ofd_setlkw_is_not_starved_by_an_honest_vmm() {
    under(Pattern::Honest, 1, |blob, _| {
        third_party_within_the_bound(blob)
    });
}

#[test]
fn a_third_party_waiting_in_f_ofd_setlkw_is_not_starved_by_a_vmm_that_never_sends_done() {
    under(Pattern::NoDone, 1, |blob, _| {
        third_party_within_the_bound(blob)
    });
}

/// Two sidecars of one blob (two VMs of the node), each under the hostile pattern: both
/// yield to the same waiting updater, whichever lock it waits behind.
#[test]
fn updaters_are_not_starved_by_two_sidecars_that_never_see_done() {
    under(Pattern::NoDone, 2, install_within_the_bound);
    under(Pattern::NoDone, 2, |blob, _| {
        third_party_within_the_bound(blob)
    });
}
