//! Real-KVM end-to-end tests (issue 5): a guest under /dev/kvm asks for its certificates the
//! way the Linux SNP guest driver does, the VMM forwards each exit record verbatim to a running
//! `coco-sidecar`, the sidecar writes the table into the guest's (memfd) RAM, and the guest
//! walks and checksums the table itself.
//!
//! Without a usable /dev/kvm each test prints one `SKIPPED:` line to stderr and returns
//! (`COCO_REQUIRE_KVM=1` makes that a failure). Needs the workspace binaries built first:
//! `cargo build --workspace --bins`.

// The harness lives in tests/src/kvm/ and is compiled into this test binary only.
#[path = "../src/kvm/mod.rs"]
mod kvm;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use coco_tests::{exclusive_lock_free, HeldLock, Sidecar};
use kvm::blob::{self, Entry};
use kvm::guest::MAX_PAGES;
use kvm::record::KernelAbi;
use kvm::vmm::{
    CertExit, NoObserver, Observer, VcpuOutcome, VcpuSpec, Vmm, BUFFERS, CODE_GPA, POISON, RAM_SIZE,
};

const EAGAIN: u64 = libc::EAGAIN as u64;
const ENOSPC: u64 = libc::ENOSPC as u64;
const EIO: u64 = libc::EIO as u64;

/// A VM, a sidecar serving `blob` and the blob's path.
struct Rig {
    vmm: Vmm,
    sidecar: Sidecar,
    blob: Vec<u8>,
    blob_path: PathBuf,
    _blob_dir: tempfile::TempDir,
}

impl Rig {
    /// `None` (after the SKIPPED line) without a usable /dev/kvm.
    fn new(test: &str, table_len: usize, sidecar_args: &[&str]) -> Option<Rig> {
        let kvm = kvm::kvm_or_skip(test)?;
        let vmm = Vmm::new(&kvm).expect("set up the VM");
        let blob = blob::chain_of_size(table_len).expect("a valid chain of that size");
        let dir = tempfile::tempdir().expect("tempdir");
        let blob_path = coco_tests::write_blob(dir.path(), "certs.bin", &blob);
        let sidecar = Sidecar::start(&blob_path, sidecar_args);
        Some(Rig {
            vmm,
            sidecar,
            blob,
            blob_path,
            _blob_dir: dir,
        })
    }

    /// A new connection with this VM's memory shared on it.
    fn channel(&self, abi: KernelAbi) -> Mutex<coco_protocol::Frontend> {
        let mut f = self.sidecar.connect();
        self.vmm
            .share_memory(&mut f, abi)
            .expect("share guest memory with the sidecar");
        Mutex::new(f)
    }

    fn run(&self, specs: &[VcpuSpec<'_>], observer: &dyn Observer) -> Vec<VcpuOutcome> {
        let t = Instant::now();
        let out = self
            .vmm
            .run(specs, observer)
            .unwrap_or_else(|e| panic!("VM run failed: {e}\nsidecar log:\n{}", self.sidecar.log()));
        eprintln!("guest run took {:?}", t.elapsed());
        out
    }

    /// The guest of vCPU `i` found exactly the blob's entries (by its own checksums), and the
    /// VMM finds the blob's bytes in that vCPU's buffer.
    fn assert_served(&self, i: usize, out: &VcpuOutcome) {
        assert_eq!(out.failure, None, "vCPU {i}: the guest reported a failure");
        let (expected, terminator): (Vec<Entry>, usize) =
            blob::walk(&self.blob).expect("the blob walks");
        assert_eq!(out.entries, expected, "vCPU {i}: entries the guest found");
        let guids: Vec<[u8; 16]> = out.entries.iter().map(|e| e.guid).collect();
        let chain = [blob::GUID_ARK, blob::GUID_ASK, blob::GUID_VCEK]
            .map(|g| blob::guid_bytes(g).expect("GUID text"));
        assert_eq!(guids, chain, "vCPU {i}: ARK, ASK and VCEK, in order");
        assert_eq!(
            out.terminator_at,
            Some(terminator as u32),
            "vCPU {i}: terminator the guest found"
        );
        let in_ram = self
            .vmm
            .read_ram(BUFFERS[i], self.blob.len())
            .expect("read guest RAM");
        assert!(
            in_ram == self.blob,
            "vCPU {i}: guest buffer differs from the blob"
        );
    }

    /// RAM is the initial image with the blob at each given vCPU's buffer, and nothing else.
    fn assert_ram_exactly(&self, served: &[usize]) {
        let mut expect = Vmm::initial_image().expect("image");
        for &i in served {
            let at = BUFFERS[i] as usize;
            expect[at..at + self.blob.len()].copy_from_slice(&self.blob);
        }
        let ram = self.vmm.read_ram(0, expect.len()).expect("read guest RAM");
        if let Some(at) = ram.iter().zip(&expect).position(|(a, b)| a != b) {
            panic!(
                "guest RAM differs at {at:#x}: {:#04x}, expected {:#04x}",
                ram[at], expect[at]
            );
        }
    }

    /// Whether the buffer of vCPU `i` is still all poison (nothing written).
    fn buffer_untouched(&self, i: usize) -> bool {
        self.vmm
            .read_ram(BUFFERS[i], (MAX_PAGES * 4096) as usize)
            .expect("read guest RAM")
            .iter()
            .all(|b| *b == POISON)
    }

    fn lock_free(&self) -> bool {
        exclusive_lock_free(&self.blob_path)
    }
}

/// A certificate exit was answered with `ret` (and `npages` on ENOSPC) and nothing else in the
/// record changed, checked against the record layout written by hand.
fn assert_exit(
    abi: KernelAbi,
    exit: &CertExit,
    gpa: u64,
    npages: u64,
    ret: u64,
    needed: Option<u64>,
) {
    assert_eq!((exit.gpa, exit.npages), (gpa, npages), "request");
    assert_eq!(exit.record.len(), abi.record_size());
    assert_eq!(exit.ret, ret, "ret of request {gpa:#x}/{npages}");
    assert_eq!(
        exit.answered,
        abi.expected_answer(&exit.record, ret, needed),
        "answered record: only ret (and npages on ENOSPC) may change"
    );
    if ret == 0 {
        assert_ne!(exit.lease, 0, "a served blob file is leased");
        let ie = exit.immediate_exit.expect("immediate_exit round trip");
        let after_out = CODE_GPA + kvm::guest::program().expect("program").after_request as u64;
        assert!(
            ie.rip_before == after_out || ie.rip_before + 1 == after_out,
            "RIP {:#x} at the exit is the OUT or just past it",
            ie.rip_before
        );
        assert_eq!(
            ie.rip_after, after_out,
            "after EINTR the OUT is complete and the guest has not run on"
        );
        assert_eq!(ie.rdx_after, 0, "the completion handed ret 0 to the guest");
    } else {
        assert_eq!(exit.lease, 0, "no lease without a table");
        assert_eq!(exit.immediate_exit, None);
    }
}

/// vCPU `i`'s usual setup: its own buffer, a budget of 50 requests.
fn spec(
    i: usize,
    abi: KernelAbi,
    first_npages: u32,
    channel: &Mutex<coco_protocol::Frontend>,
) -> VcpuSpec<'_> {
    VcpuSpec {
        abi,
        buffer: BUFFERS[i],
        first_npages,
        budget: 50,
        channel,
    }
}

macro_rules! both_abis {
    ($scenario:ident: $($test:ident => $abi:expr),+) => {
        $(
            #[test]
            fn $test() {
                $scenario($abi, stringify!($test));
            }
        )+
    };
}

// ---- success on the first sized request ----

fn first_sized_request(abi: KernelAbi, test: &str) {
    let Some(rig) = Rig::new(test, 3 * 4096 - 100, &[]) else {
        return;
    };
    let ch = rig.channel(abi);
    // Linux's usual buffer: 4 pages, enough for this 3-page table.
    let out = rig.run(&[spec(0, abi, MAX_PAGES, &ch)], &NoObserver);
    let v = &out[0];
    assert_eq!(v.exits.len(), 1, "one request: {:?}", v.exits);
    assert_exit(abi, &v.exits[0], BUFFERS[0], 4, 0, None);
    assert!(v.sizes_learned.is_empty() && v.delays == 0);
    rig.assert_served(0, v);
    rig.assert_ram_exactly(&[0]);
    assert!(rig.lock_free(), "DONE released the lease");
}

both_abis!(first_sized_request:
    kvm_first_sized_request_succeeds_seed_rfc => KernelAbi::SeedRfc,
    kvm_first_sized_request_succeeds_linux70 => KernelAbi::Linux70);

// ---- the ENOSPC probe flow ----

/// Checks at each answer that an ENOSPC answer wrote nothing into the guest.
struct NothingWrittenOnEnospc<'a> {
    rig: &'a Rig,
    violations: Mutex<Vec<String>>,
}

impl Observer for NothingWrittenOnEnospc<'_> {
    fn answered(&self, vcpu: u32, exit: &CertExit) {
        if exit.ret != 0 && !self.rig.buffer_untouched(vcpu as usize) {
            self.violations
                .lock()
                .expect("violations")
                .push(format!("ret {} wrote into the buffer", exit.ret));
        }
    }
}

fn probe_flow(abi: KernelAbi, test: &str, table_len: usize, first_npages: u32) {
    let Some(rig) = Rig::new(test, table_len, &[]) else {
        return;
    };
    let needed = blob::pages_for(table_len);
    let ch = rig.channel(abi);
    let obs = NothingWrittenOnEnospc {
        rig: &rig,
        violations: Mutex::default(),
    };
    let out = rig.run(&[spec(0, abi, first_npages, &ch)], &obs);
    assert_eq!(
        *obs.violations.lock().expect("violations"),
        Vec::<String>::new()
    );
    let v = &out[0];
    assert_eq!(
        v.exits.len(),
        2,
        "probe, then the sized request: {:?}",
        v.exits
    );
    assert_exit(
        abi,
        &v.exits[0],
        BUFFERS[0],
        u64::from(first_npages),
        ENOSPC,
        Some(needed),
    );
    assert_eq!(v.exits[0].answered_npages, needed, "ceil(len / 4096)");
    assert_eq!(
        v.sizes_learned,
        vec![needed as u32],
        "what the guest learned"
    );
    assert_exit(abi, &v.exits[1], BUFFERS[0], needed, 0, None);
    rig.assert_served(0, v);
    rig.assert_ram_exactly(&[0]);
}

fn probe_zero(abi: KernelAbi, test: &str) {
    // 2 pages and one byte: needs 3.
    probe_flow(abi, test, 2 * 4096 + 1, 0);
}

fn probe_too_small(abi: KernelAbi, test: &str) {
    // Exactly 3 pages; the guest first offers 1.
    probe_flow(abi, test, 3 * 4096, 1);
}

both_abis!(probe_zero:
    kvm_enospc_probe_then_sized_request_seed_rfc => KernelAbi::SeedRfc,
    kvm_enospc_probe_then_sized_request_linux70 => KernelAbi::Linux70);

both_abis!(probe_too_small:
    kvm_enospc_on_small_buffer_then_sized_request_seed_rfc => KernelAbi::SeedRfc,
    kvm_enospc_on_small_buffer_then_sized_request_linux70 => KernelAbi::Linux70);

// ---- EAGAIN while an updater holds the exclusive lock ----

/// Releases the updater's lock after the guest got `after` EAGAINs; checks that EAGAIN wrote
/// nothing.
struct ReleaseAfter<'a> {
    rig: &'a Rig,
    after: usize,
    eagains: Mutex<usize>,
    updater: Mutex<Option<HeldLock>>,
    violations: Mutex<Vec<String>>,
}

impl Observer for ReleaseAfter<'_> {
    fn answered(&self, vcpu: u32, exit: &CertExit) {
        if exit.ret != EAGAIN {
            return;
        }
        if !self.rig.buffer_untouched(vcpu as usize) {
            self.violations
                .lock()
                .expect("violations")
                .push("EAGAIN wrote into the buffer".into());
        }
        let mut n = self.eagains.lock().expect("count");
        *n += 1;
        if *n == self.after {
            if let Some(updater) = self.updater.lock().expect("updater").take() {
                updater.release();
            }
        }
    }
}

fn eagain_then_success(abi: KernelAbi, test: &str) {
    let Some(rig) = Rig::new(test, 3 * 4096 - 100, &["--lock-wait-ms", "20"]) else {
        return;
    };
    let updater = HeldLock::take("exclusive", &rig.blob_path);
    let ch = rig.channel(abi);
    let obs = ReleaseAfter {
        rig: &rig,
        after: 3,
        eagains: Mutex::new(0),
        updater: Mutex::new(Some(updater)),
        violations: Mutex::default(),
    };
    // The Linux flow: probe first.
    let out = rig.run(&[spec(0, abi, 0, &ch)], &obs);
    assert_eq!(
        *obs.violations.lock().expect("violations"),
        Vec::<String>::new()
    );
    let v = &out[0];
    let rets: Vec<u64> = v.exits.iter().map(|e| e.ret).collect();
    assert_eq!(
        rets,
        vec![EAGAIN, EAGAIN, EAGAIN, ENOSPC, 0],
        "three EAGAINs while locked, then the probe and the sized request"
    );
    for e in &v.exits[..3] {
        assert_exit(abi, e, BUFFERS[0], 0, EAGAIN, None);
    }
    assert_exit(abi, &v.exits[3], BUFFERS[0], 0, ENOSPC, Some(3));
    assert_exit(abi, &v.exits[4], BUFFERS[0], 3, 0, None);
    assert_eq!(
        v.delays, 3,
        "the guest backed off after each EAGAIN by itself"
    );
    rig.assert_served(0, v);
    rig.assert_ram_exactly(&[0]);
    assert!(rig.lock_free());
}

both_abis!(eagain_then_success:
    kvm_eagain_while_updater_locks_then_success_seed_rfc => KernelAbi::SeedRfc,
    kvm_eagain_while_updater_locks_then_success_linux70 => KernelAbi::Linux70);

/// A guest whose updater never lets go gives up after its budget, having seen only EAGAIN
/// (never EIO, which would cost a Linux guest its VMPCK).
fn eagain_budget(abi: KernelAbi, test: &str) {
    let Some(rig) = Rig::new(test, 2 * 4096, &["--lock-wait-ms", "5"]) else {
        return;
    };
    let _updater = HeldLock::take("exclusive", &rig.blob_path);
    let ch = rig.channel(abi);
    let mut s = spec(0, abi, 0, &ch);
    s.budget = 4;
    let out = rig.run(&[s], &NoObserver);
    let v = &out[0];
    assert_eq!(v.failure, Some(kvm::guest::FAIL_BUDGET));
    assert_eq!(v.exits.len(), 4);
    assert!(v.exits.iter().all(|e| e.ret == EAGAIN && e.lease == 0));
    assert_eq!(v.delays, 4);
    assert!(v.entries.is_empty());
    rig.assert_ram_exactly(&[]);
}

both_abis!(eagain_budget:
    kvm_eagain_forever_exhausts_guest_budget_seed_rfc => KernelAbi::SeedRfc,
    kvm_eagain_forever_exhausts_guest_budget_linux70 => KernelAbi::Linux70);

// ---- a buffer that runs past guest RAM ----

/// The guest offers 4 pages of which only the first is RAM: EIO (the guest reports it), and
/// the sidecar writes nothing, not even into the page that is RAM.
fn buffer_past_ram(abi: KernelAbi, test: &str) {
    let Some(rig) = Rig::new(test, 3 * 4096 - 100, &[]) else {
        return;
    };
    let ch = rig.channel(abi);
    let mut s = spec(0, abi, MAX_PAGES, &ch);
    s.buffer = RAM_SIZE - 4096;
    let out = rig.run(&[s], &NoObserver);
    let v = &out[0];
    assert_eq!(v.exits.len(), 1);
    assert_exit(abi, &v.exits[0], RAM_SIZE - 4096, 4, EIO, None);
    assert_eq!(v.failure, Some(EIO as u32), "the guest saw EIO");
    assert!(v.entries.is_empty());
    rig.assert_ram_exactly(&[]);
}

both_abis!(buffer_past_ram:
    kvm_buffer_past_ram_end_gets_eio_and_no_write_seed_rfc => KernelAbi::SeedRfc,
    kvm_buffer_past_ram_end_gets_eio_and_no_write_linux70 => KernelAbi::Linux70);

// ---- the lease across immediate_exit, released by DONE ----

/// Looks at the blob's lock from another process at each step of a leased exit.
struct LockWatch<'a> {
    rig: &'a Rig,
    seen: Mutex<Vec<(&'static str, bool, bool)>>,
}

impl LockWatch<'_> {
    fn look(&self, step: &'static str) {
        let exclusive = exclusive_lock_free(&self.rig.blob_path);
        let shared = shared_lock_free(&self.rig.blob_path);
        self.seen
            .lock()
            .expect("seen")
            .push((step, exclusive, shared));
    }
}

impl Observer for LockWatch<'_> {
    fn answered(&self, _vcpu: u32, exit: &CertExit) {
        if exit.lease != 0 {
            self.look("answered");
        }
    }
    fn reached_firmware(&self, _vcpu: u32, _lease: u64) {
        self.look("EINTR");
    }
    fn released(&self, _vcpu: u32, _lease: u64) {
        self.look("DONE");
    }
}

/// Whether another process can take a shared lock at once (readers are never shut out by a
/// lease).
fn shared_lock_free(path: &Path) -> bool {
    coco_tests::lock_free("shared", path)
}

fn lease_until_done(abi: KernelAbi, test: &str) {
    let Some(rig) = Rig::new(test, 2 * 4096 + 500, &[]) else {
        return;
    };
    assert!(
        rig.lock_free(),
        "nobody holds the blob before the guest asks"
    );
    let ch = rig.channel(abi);
    let watch = LockWatch {
        rig: &rig,
        seen: Mutex::default(),
    };
    let out = rig.run(&[spec(0, abi, 0, &ch)], &watch);
    assert_eq!(
        *watch.seen.lock().expect("seen"),
        vec![
            ("answered", false, true),
            ("EINTR", false, true),
            ("DONE", true, true),
        ],
        "(step, exclusive free, shared free): the lease is a shared lock held from the \
         answer across the immediate_exit re-entry until DONE"
    );
    let v = &out[0];
    assert_eq!(v.exits.len(), 2);
    assert_exit(abi, &v.exits[1], BUFFERS[0], 3, 0, None);
    rig.assert_served(0, v);
    assert!(rig.lock_free());
}

both_abis!(lease_until_done:
    kvm_lease_held_across_immediate_exit_until_done_seed_rfc => KernelAbi::SeedRfc,
    kvm_lease_held_across_immediate_exit_until_done_linux70 => KernelAbi::Linux70);

// ---- two vCPUs at once ----

/// A barrier that gives up after a timeout (a stuck vCPU must fail the test, not hang it).
struct Rendezvous {
    n: usize,
    state: Mutex<(usize, u64)>,
    cv: Condvar,
}

impl Rendezvous {
    fn new(n: usize) -> Rendezvous {
        Rendezvous {
            n,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
        }
    }

    fn wait(&self) -> bool {
        let mut s = self.state.lock().expect("rendezvous");
        let generation = s.1;
        s.0 += 1;
        if s.0 == self.n {
            *s = (0, generation + 1);
            self.cv.notify_all();
            return true;
        }
        let (_s, timeout) = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(20), |s| s.1 == generation)
            .expect("rendezvous");
        !timeout.timed_out()
    }
}

/// Makes both vCPUs forward their sized requests together and hold their leases together.
struct Together<'a> {
    rig: &'a Rig,
    abi: KernelAbi,
    at_forward: Rendezvous,
    at_lease: Rendezvous,
    log: Mutex<Vec<String>>,
}

impl Observer for Together<'_> {
    fn forwarding(&self, vcpu: u32, record: &[u8]) {
        // Meet only at the sized request (the probe has npages 0).
        let (at, width) = self.abi.npages_field();
        let sized = record[at..at + width].iter().any(|b| *b != 0);
        if sized && !self.at_forward.wait() {
            self.log
                .lock()
                .expect("log")
                .push(format!("vCPU {vcpu}: partner never forwarded"));
        }
    }

    fn answered(&self, vcpu: u32, exit: &CertExit) {
        if exit.lease == 0 {
            return;
        }
        if !self.at_lease.wait() {
            self.log
                .lock()
                .expect("log")
                .push(format!("vCPU {vcpu}: partner never got a lease"));
        }
        if self.rig.lock_free() {
            self.log.lock().expect("log").push(format!(
                "vCPU {vcpu}: blob not locked while both leases are held"
            ));
        }
    }
}

fn two_vcpus(abi: KernelAbi, test: &str, shared_connection: bool) {
    let Some(rig) = Rig::new(test, 3 * 4096 + 7, &[]) else {
        return;
    };
    let ch0 = rig.channel(abi);
    let ch1 = if shared_connection {
        None
    } else {
        Some(rig.channel(abi))
    };
    let ch1 = ch1.as_ref().unwrap_or(&ch0);
    let obs = Together {
        rig: &rig,
        abi,
        at_forward: Rendezvous::new(2),
        at_lease: Rendezvous::new(2),
        log: Mutex::default(),
    };
    let out = rig.run(&[spec(0, abi, 0, &ch0), spec(1, abi, 0, ch1)], &obs);
    assert_eq!(*obs.log.lock().expect("log"), Vec::<String>::new());
    assert_eq!(out.len(), 2);
    for (i, v) in out.iter().enumerate() {
        assert_eq!(v.exits.len(), 2, "vCPU {i}: probe and sized request");
        assert_exit(abi, &v.exits[0], BUFFERS[i], 0, ENOSPC, Some(4));
        assert_exit(abi, &v.exits[1], BUFFERS[i], 4, 0, None);
        rig.assert_served(i, v);
    }
    if shared_connection {
        // Lease ids name a lease within its connection; two on one connection differ.
        assert_ne!(
            out[0].exits[1].lease, out[1].exits[1].lease,
            "one lease each"
        );
    }
    rig.assert_ram_exactly(&[0, 1]);
    assert!(rig.lock_free(), "both DONEs released their leases");
}

fn two_vcpus_own_connections(abi: KernelAbi, test: &str) {
    two_vcpus(abi, test, false);
}

fn two_vcpus_one_connection(abi: KernelAbi, test: &str) {
    two_vcpus(abi, test, true);
}

both_abis!(two_vcpus_own_connections:
    kvm_two_vcpus_at_once_own_connections_seed_rfc => KernelAbi::SeedRfc,
    kvm_two_vcpus_at_once_own_connections_linux70 => KernelAbi::Linux70);

both_abis!(two_vcpus_one_connection:
    kvm_two_vcpus_at_once_one_connection_seed_rfc => KernelAbi::SeedRfc,
    kvm_two_vcpus_at_once_one_connection_linux70 => KernelAbi::Linux70);

// ---- a stray signal interrupts KVM_RUN ----

/// Before each exit is forwarded, sends the vCPU's kick signal to its own thread, where it
/// stays pending (the thread blocks it outside KVM_RUN) for the next KVM_RUN.
#[derive(Default)]
struct Kicker {
    sent: AtomicU32,
}

impl Observer for Kicker {
    fn forwarding(&self, _vcpu: u32, _record: &[u8]) {
        // SAFETY: tgkill with this process's and this thread's ids, no pointers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                libc::SIGUSR1,
            )
        };
        assert_eq!(rc, 0, "tgkill: {}", std::io::Error::last_os_error());
        self.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// A signal pending when the VMM enters KVM_RUN makes it return -EINTR without running the
/// guest; the VMM enters again and the guest carries on unharmed: the probe, the sized
/// request with its lease and DONE, the table it walks. Each signal costs exactly one
/// -EINTR, so every one of them was followed by a new KVM_RUN.
fn stray_signal(abi: KernelAbi, test: &str) {
    let Some(mut rig) = Rig::new(test, 5000, &[]) else {
        return;
    };
    rig.vmm.kick_signal = Some(libc::SIGUSR1);
    let ch = rig.channel(abi);
    let kicker = Kicker::default();
    let out = rig.run(&[spec(0, abi, 0, &ch)], &kicker);
    let v = &out[0];
    assert_eq!(
        v.exits.len(),
        2,
        "probe, then the sized request: {:?}",
        v.exits
    );
    assert_exit(abi, &v.exits[0], BUFFERS[0], 0, ENOSPC, Some(2));
    assert_exit(abi, &v.exits[1], BUFFERS[0], 2, 0, None);
    rig.assert_served(0, v);
    rig.assert_ram_exactly(&[0]);
    assert_eq!(kicker.sent.load(Ordering::Relaxed), 2);
    assert_eq!(
        v.interrupted, 2,
        "one -EINTR per signal, each entered again"
    );
    assert!(rig.lock_free(), "DONE released the lease");
}

both_abis!(stray_signal:
    kvm_stray_signal_interrupts_kvm_run_and_the_vmm_enters_again_seed_rfc => KernelAbi::SeedRfc,
    kvm_stray_signal_interrupts_kvm_run_and_the_vmm_enters_again_linux70 => KernelAbi::Linux70);

// ---- no KVM needed: the hand-laid records agree with the protocol crate ----

/// Two independent layouts of the same C structs: if they disagree, one of them is wrong.
#[test]
fn hand_laid_records_agree_with_protocol_crate() {
    use coco_protocol::exit::{self, Abi};
    for (mine, theirs) in [
        (KernelAbi::SeedRfc, Abi::CocoRfc),
        (KernelAbi::Linux70, Abi::SnpReqCerts),
    ] {
        assert_eq!(mine.tag(), theirs.tag());
        assert_eq!(mine.record_size(), theirs.record_size());
        let mut rec = vec![0u8; mine.record_size()];
        mine.write_request(&mut rec, 0x7000, 3)
            .expect("expressible");
        assert_eq!(
            rec,
            exit::build_request(theirs, 0x7000, 3),
            "{mine:?} request"
        );
        let mut answered = rec.clone();
        exit::encode_answer(
            theirs,
            &mut answered,
            coco_protocol::CertsRet::NoSpace,
            Some(9),
        );
        assert_eq!(
            answered,
            mine.expected_answer(&rec, ENOSPC, Some(9)),
            "{mine:?} answer"
        );
        assert_eq!(mine.read_answer(&answered), Some((ENOSPC, 9)));
    }
    assert_eq!(KernelAbi::SeedRfc.exit_reason(), exit::KVM_EXIT_COCO);
    assert_eq!(
        KernelAbi::Linux70.exit_reason(),
        exit::KVM_EXIT_SNP_REQ_CERTS
    );
}

/// The guest's checksum is FNV-1a 32 (reference values of the published test vectors).
#[test]
fn fnv_reference_values() {
    assert_eq!(kvm::guest::fnv1a32(b""), 0x811c_9dc5);
    assert_eq!(kvm::guest::fnv1a32(b"a"), 0xe40c_292c);
    assert_eq!(kvm::guest::fnv1a32(b"foobar"), 0xbf9c_f968);
}
