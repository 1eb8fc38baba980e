//! Stress (issue 4): the blob is rewritten as fast as a second process can while clients fire
//! certificate requests through the real sidecar on several connections. Every table a guest
//! receives must be one of the installed versions byte for byte, and `ret` only 0 or EAGAIN.
//!
//! Bounded in time: each stress test runs for `COCO_STRESS_SECS` seconds (default 6) and until
//! at least 10,000 requests were answered, but never longer than three times that.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::CertsRet;
use coco_sidecar::tool::install;
use coco_tests::{table_of_size, workspace_bin, write_blob, GuestMem, Sidecar, TmpfsMount};

const POISON: u8 = 0xa5;
const RAM: u64 = 64 * 1024;
const GPA: u64 = 0x2000;
const NPAGES: u64 = 2;
const PAGE: u64 = 4096;
const CONNECTIONS: u32 = 4;
const MIN_REQUESTS: u64 = 10_000;

fn stress_secs() -> u64 {
    std::env::var("COCO_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6)
}

/// A directory for the blob: tmpfs when there is one (fast rewrites), else the default
/// temporary directory.
fn blob_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Two different valid tables of the same size, so that neither size nor structure tells them
/// apart and a torn mix of them would still be well-formed.
fn versions() -> [Vec<u8>; 2] {
    [table_of_size(5000, 0x11), table_of_size(5000, 0x77)]
}

/// The updater process (`coco-test-updater`), stopped and reaped when dropped.
struct Updater {
    child: Child,
}

impl Updater {
    fn start(mode: &str, blob: &Path, files: &[PathBuf]) -> Updater {
        let mut child = Command::new(workspace_bin("coco-test-updater", "COCO_TEST_UPDATER_BIN"))
            .arg(mode)
            .arg(blob)
            .args(files)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the updater");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read the updater");
        assert_eq!(line.trim(), "started");
        Updater { child }
    }

    /// Stops it and returns how many updates it made.
    fn stop(mut self) -> u64 {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let mut out = String::new();
        let _ =
            std::io::Read::read_to_string(self.child.stdout.as_mut().expect("stdout"), &mut out);
        let status = self.child.wait().expect("wait for the updater");
        assert!(status.success(), "the updater failed: {status}");
        out.trim()
            .strip_prefix("updates ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("updater said {out:?}"))
    }
}

impl Drop for Updater {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Default)]
struct Counts {
    served: [AtomicU64; 2],
    again: AtomicU64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.served[0].load(Ordering::Relaxed)
            + self.served[1].load(Ordering::Relaxed)
            + self.again.load(Ordering::Relaxed)
    }
}

/// One connection firing requests until `stop`, checking every answer.
fn client(socket: &Path, vcpu: u32, versions: &[Vec<u8>; 2], counts: &Counts, stop: &AtomicBool) {
    let abi = Abi::ALL[vcpu as usize % Abi::ALL.len()];
    let mem = GuestMem::new(RAM, POISON);
    let mut vmm = coco_protocol::Frontend::connect(socket).expect("connect");
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let poison = vec![POISON; (NPAGES * PAGE) as usize];
    let len = versions[0].len();
    while !stop.load(Ordering::Relaxed) {
        mem.write(GPA, &poison);
        let reply = vmm
            .request_certs(abi, vcpu, GPA, NPAGES)
            .expect("the sidecar answers");
        match reply.ret {
            CertsRet::Ok => {}
            CertsRet::Again => {
                assert_eq!(reply.lease, 0, "no lease with EAGAIN");
                assert!(
                    mem.read(GPA, poison.len()) == poison,
                    "EAGAIN wrote into the guest"
                );
                counts.again.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            other => panic!("vcpu {vcpu}: ret {other:?}: only 0 and EAGAIN are allowed"),
        }
        let got = mem.read(GPA, len);
        let Some(which) = versions.iter().position(|v| *v == got) else {
            let diff = |v: &[u8]| v.iter().zip(&got).position(|(a, b)| a != b);
            panic!(
                "vcpu {vcpu}: served a table that is neither version (first difference from \
                 each at {:?} / {:?})",
                diff(&versions[0]),
                diff(&versions[1])
            );
        };
        assert!(
            mem.read(GPA + len as u64, poison.len() - len)
                .iter()
                .all(|b| *b == POISON),
            "bytes past the table were written"
        );
        counts.served[which].fetch_add(1, Ordering::Relaxed);
        vmm.done(reply.lease).expect("done");
    }
}

/// Runs the clients against `sidecar` while `updater` rewrites; returns the counts and the
/// updater's number of updates.
fn stress(sidecar: &Sidecar, updater: Updater, versions: &[Vec<u8>; 2]) -> (Counts, u64) {
    let counts = Counts::default();
    let stop = AtomicBool::new(false);
    let secs = Duration::from_secs(stress_secs());
    let start = Instant::now();
    thread::scope(|s| {
        let clients: Vec<_> = (0..CONNECTIONS)
            .map(|vcpu| {
                let (counts, stop) = (&counts, &stop);
                s.spawn(move || client(&sidecar.socket, vcpu, versions, counts, stop))
            })
            .collect();
        while (start.elapsed() < secs || counts.total() < MIN_REQUESTS)
            && start.elapsed() < 3 * secs
            && !clients.iter().any(|c| c.is_finished())
        {
            thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            if let Err(panic) = c.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let updates = updater.stop();
    eprintln!(
        "{:?}: {} requests (version A {}, version B {}, EAGAIN {}), {updates} updates",
        start.elapsed(),
        counts.total(),
        counts.served[0].load(Ordering::Relaxed),
        counts.served[1].load(Ordering::Relaxed),
        counts.again.load(Ordering::Relaxed)
    );
    (counts, updates)
}

/// Prints why requests got EAGAIN (the sidecar logs each at debug level), counted by reason.
fn eagain_reasons(log: &str) {
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for line in log.lines() {
        let Some((_, why)) = line.split_once(": EAGAIN: ") else {
            continue;
        };
        match reasons.iter_mut().find(|(r, _)| r == why) {
            Some((_, n)) => *n += 1,
            None => reasons.push((why.to_owned(), 1)),
        }
    }
    for (why, n) in reasons {
        eprintln!("  EAGAIN x{n}: {why}");
    }
}

fn assert_exercised(counts: &Counts, updates: u64, log: &str) {
    eagain_reasons(log);
    assert!(
        counts.total() >= MIN_REQUESTS,
        "only {} requests",
        counts.total()
    );
    assert!(
        updates >= 100,
        "only {updates} updates: the stress did not stress"
    );
    for (i, n) in counts.served.iter().enumerate() {
        assert!(
            n.load(Ordering::Relaxed) >= 100,
            "version {i} served only {n:?} times: the updates did not reach the guests"
        );
    }
    for bad in [
        "not a valid certificate table",
        "changed while it was read",
        "panicked",
    ] {
        assert!(!log.contains(bad), "the sidecar logged {bad:?}:\n{log}");
    }
}

/// The supported update: in-place rewrites under the exclusive OFD lock (`blob install`'s
/// code). Guarantee: every table is a complete version, and an update is never served torn.
#[test]
fn in_place_updates_under_the_lock_are_never_served_torn() {
    updates_are_never_served_torn("inplace");
}

/// The careless update: write a temporary file and rename it over the blob, with no lock.
/// Guarantee: every table is still a complete version byte for byte (each file the sidecar
/// opens is complete, and it reads only the file it locked and checked against the path);
/// what is lost is the lease: a guest can get the old chain after the rename.
#[test]
fn rename_over_updates_are_never_served_torn() {
    updates_are_never_served_torn("rename");
}

/// Held shared by the tests that load both CPUs, and exclusively by the one that needs
/// rewrites to finish within a scheduler tick, which they would make rare.
static CPU_HOGS: RwLock<()> = RwLock::new(());

/// Serves one of two versions while the updater `kind` alternates them as fast as it can,
/// and checks every answer.
fn updates_are_never_served_torn(kind: &str) {
    let _hog = CPU_HOGS.read().unwrap_or_else(PoisonError::into_inner);
    let dir = blob_dir();
    let v = versions();
    let files = [
        write_blob(dir.path(), "a.bin", &v[0]),
        write_blob(dir.path(), "b.bin", &v[1]),
    ];
    let blob = write_blob(dir.path(), "certs.bin", &v[0]);
    let sidecar = Sidecar::start(&blob, &[]);
    let updater = Updater::start(kind, &blob, &files);
    let (counts, updates) = stress(&sidecar, updater, &v);
    assert_exercised(&counts, updates, &sidecar.log());
}

fn request(vmm: &mut coco_protocol::Frontend, mem: &GuestMem) -> (CertsRet, Vec<u8>) {
    mem.write(GPA, &[POISON; 5000]);
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, GPA, NPAGES)
        .expect("answer");
    if r.lease != 0 {
        vmm.done(r.lease).expect("done");
    }
    (r.ret, mem.read(GPA, 5000))
}

/// Size and timestamps of the file at `path` (what a cache keyed by stamps compares).
fn stamps(path: &Path) -> (u64, i64, i64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("stat");
    (
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// Equal-size in-place rewrites back to back on a ramfs, whose timestamps are one scheduler
/// tick coarse, served by a sidecar that cannot watch the path (no inotify instance in its
/// user namespace): most rewrites leave size and stamps as they were (counted here with
/// `stat`), so only the racy rule can make the new version visible. Each request after an
/// update returns must see that update.
#[test]
fn equal_size_rewrites_within_one_tick_are_served_at_once() {
    let test = "equal_size_rewrites_within_one_tick_are_served_at_once";
    let Some(no_inotify) = coco_tests::without_inotify(test) else {
        return;
    };
    let Some(fs) = TmpfsMount::ramfs_or_skip(test) else {
        return;
    };
    let _alone = CPU_HOGS.write().unwrap_or_else(PoisonError::into_inner);
    let v = versions();
    let blob = write_blob(fs.path(), "certs.bin", &v[0]);
    let sidecar = Sidecar::start_wrapped(&no_inotify, &blob, &[]);
    let mem = GuestMem::new(RAM, POISON);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    assert_eq!(request(&mut vmm, &mem), (CertsRet::Ok, v[0].clone()));
    // At least 200 rounds, and on a loaded host more, up to 2000, until one rewrite kept the
    // stamps.
    let mut unchanged_stamps = 0;
    let mut rounds = 0;
    for i in 1..=2000 {
        rounds = i;
        let want = &v[i % 2];
        let before = stamps(&blob);
        install::write_blob(want, &blob, Duration::from_secs(5)).expect("install");
        if stamps(&blob) == before {
            unchanged_stamps += 1;
        }
        assert_eq!(
            request(&mut vmm, &mem),
            (CertsRet::Ok, want.clone()),
            "round {i}"
        );
        if i >= 200 && unchanged_stamps > 0 {
            break;
        }
    }
    println!("{unchanged_stamps} of {rounds} rewrites left size and stamps unchanged");
    assert!(
        unchanged_stamps > 0,
        "every rewrite changed the stamps: the racy rule was not exercised"
    );
    assert!(
        sidecar.log().contains("not watching the blob path"),
        "{}",
        sidecar.log()
    );
}

/// A new version that fails validation is not served, and neither is the old one: EAGAIN, and
/// an error in the log naming the problem; the next valid version is served at once.
#[test]
fn an_invalid_update_is_eagain_not_the_old_version() {
    let dir = blob_dir();
    let v = versions();
    let blob = write_blob(dir.path(), "certs.bin", &v[0]);
    let sidecar = Sidecar::start(&blob, &[]);
    let mem = GuestMem::new(RAM, POISON);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    assert_eq!(request(&mut vmm, &mem), (CertsRet::Ok, v[0].clone()));
    // Same size, one entry's length field broken: structurally invalid.
    let mut bad = v[1].clone();
    bad[20] = 0xff;
    install::write_blob(&bad, &blob, Duration::from_secs(5)).expect("install");
    for _ in 0..3 {
        assert_eq!(
            request(&mut vmm, &mem),
            (CertsRet::Again, vec![POISON; 5000])
        );
    }
    assert!(
        sidecar.log().contains("is not a valid certificate table"),
        "the log names the problem:\n{}",
        sidecar.log()
    );
    install::write_blob(&v[1], &blob, Duration::from_secs(5)).expect("install");
    assert_eq!(request(&mut vmm, &mem), (CertsRet::Ok, v[1].clone()));
}

/// While a lease is held the updater cannot take its lock; after DONE it can.
#[test]
fn a_lease_blocks_the_updater_until_done() {
    let dir = blob_dir();
    let v = versions();
    let blob = write_blob(dir.path(), "certs.bin", &v[0]);
    let sidecar = Sidecar::start(&blob, &[]);
    let mem = GuestMem::new(RAM, POISON);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let free = || coco_tests::exclusive_lock_free(&blob);
    let a = vmm
        .request_certs(Abi::SnpReqCerts, 0, GPA, NPAGES)
        .expect("answer");
    let b = vmm
        .request_certs(Abi::SnpReqCerts, 1, GPA, NPAGES)
        .expect("answer");
    assert!(a.lease != 0 && b.lease != 0);
    assert!(!free());
    vmm.done(a.lease).expect("done");
    assert!(!free(), "vcpu 1's lease still holds the lock");
    vmm.done(b.lease).expect("done");
    assert!(free(), "the last DONE released it");
}
