//! Patched QEMU under /dev/kvm (issue 11): a small guest built from tests/qemu-guest boots as
//! the VM's firmware and asks for its certificates through QEMU's real vCPU exit path. Only the
//! kernel's own exit stands in (the coco-sidecar object's `x-emulate-exit`): the guest's port
//! write becomes the exit record in `kvm_run`; QEMU forwards it to the real `coco-sidecar`,
//! checks the answer, sets `immediate_exit`, re-enters `KVM_RUN` and sends COCO_DONE. The
//! guest checks the table it received itself and reports on its serial port; each test asserts
//! what the guest saw, for every QEMU series in `COCO_QEMU_BINS`.
//!
//! Without `COCO_QEMU_BINS` each test prints one `SKIPPED:` line (`COCO_REQUIRE_QEMU=1`
//! makes that a failure, as `qemu-patches/build-and-test.sh` sets it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coco_tests::qemu::{self, fnv1a32, qemu_bins, QemuBin, Req, Vm, VmOptions};
use coco_tests::updaters::{blob_cmd, old_and_new, output_text};
use coco_tests::{
    exclusive_lock_free, meminfo, skip_unless_required, table_of_size, write_blob, HeldLock,
    Sidecar,
};
use serde_json::json;

const PAGE: usize = 4096;
/// Bound for anything a guest does: generous, since a loaded 2-core machine is slow.
const LONG: Duration = Duration::from_secs(120);

/// A blob, a socket directory the sidecar and QEMU agree on, and the sidecar.
struct Setup {
    blob: PathBuf,
    table: Vec<u8>,
    socket: PathBuf,
    sidecar: Option<Sidecar>,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// A sidecar serving a `size`-byte synthetic table (ARK, ASK, VCEK).
    fn new(size: usize) -> Setup {
        let mut s = Setup::without_sidecar(size);
        s.start_sidecar();
        s
    }

    /// Like [`Setup::new`], with no sidecar running yet.
    fn without_sidecar(size: usize) -> Setup {
        Setup::with_table(table_of_size(size, 0x41))
    }

    /// Serving `table` (not started).
    fn with_table(table: Vec<u8>) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = write_blob(dir.path(), "certs.bin", &table);
        let socket = dir.path().join("sidecar.sock");
        Setup {
            blob,
            table,
            socket,
            sidecar: None,
            _dir: dir,
        }
    }

    fn start_sidecar(&mut self) {
        self.start_sidecar_with(&[]);
    }

    fn start_sidecar_with(&mut self, args: &[&str]) {
        let logdir = tempfile::tempdir().expect("tempdir");
        self.sidecar = Some(Sidecar::start_at(
            logdir,
            self.socket.clone(),
            &self.blob,
            args,
        ));
    }

    fn digest(&self) -> u32 {
        fnv1a32(&self.table)
    }

    fn pages(&self) -> u32 {
        self.table.len().div_ceil(PAGE) as u32
    }
}

/// Each REQ line of `lines` got `setup`'s table, whole.
fn assert_served(setup: &Setup, reqs: &[Req]) {
    for r in reqs {
        assert_eq!(r.digest, setup.digest(), "{r:?}");
        assert_eq!(r.bytes as usize, setup.table.len(), "{r:?}");
        assert_eq!(r.entries, 3, "{r:?}");
        assert_eq!(r.pages, setup.pages(), "{r:?}");
    }
}

fn for_each_qemu(test: &str, f: impl Fn(&QemuBin)) {
    for bin in qemu_bins(test) {
        eprintln!("{test}: QEMU {} ({})", bin.label, bin.path.display());
        f(&bin);
    }
}

#[test]
fn both_abis_probe_then_success_on_two_vcpus() {
    for_each_qemu("both_abis_probe_then_success_on_two_vcpus", |bin| {
        for abi in ["snp-req-certs", "coco"] {
            let setup = Setup::new(5000);
            let mut opts = VmOptions::new(&setup.socket);
            opts.abi = abi;
            opts.smp = 2;
            opts.params.ncpus = 2;
            opts.params.requests = 3;
            opts.params.digests = [setup.digest(), 0];
            let mut vm = Vm::start(bin, &opts);
            let lines = vm.wait_done(LONG);
            let reqs = Req::all(&lines);
            assert_eq!(reqs.len(), 6, "{}", vm.transcript());
            assert_served(&setup, &reqs);
            for cpu in 0..2 {
                let mine: Vec<_> = reqs.iter().filter(|r| r.cpu == cpu).collect();
                assert_eq!(mine.len(), 3, "vCPU {cpu}: {}", vm.transcript());
                // The size probe: npages = 0, ENOSPC with the page count, then success
                assert!(mine.iter().all(|r| r.enospc == 1 && r.eagain == 0));
            }
            // The test-only injection path refuses to run outside qtest
            let err = vm
                .qmp
                .cmd(
                    "x-coco-sidecar-inject-certs",
                    json!({"id": "cs0", "gpa": 0x20_0000, "npages": 4}),
                )
                .expect_err("refused under KVM");
            assert!(err.contains("-accel qtest"), "{err}");
            assert_eq!(vm.qmp.status(), "running");
        }
    });
}

#[test]
fn a_table_of_exactly_two_pages_fills_them() {
    for_each_qemu("a_table_of_exactly_two_pages_fills_them", |bin| {
        let setup = Setup::new(2 * PAGE);
        let mut opts = VmOptions::new(&setup.socket);
        opts.params.requests = 2;
        let vm = Vm::start(bin, &opts);
        let reqs = Req::all(&vm.wait_done(LONG));
        assert_eq!(reqs.len(), 2, "{}", vm.transcript());
        assert_served(&setup, &reqs);
        assert!(reqs.iter().all(|r| r.pages == 2 && r.bytes == 8192));
    });
}

#[test]
fn blob_install_between_requests_serves_the_new_chain() {
    for_each_qemu(
        "blob_install_between_requests_serves_the_new_chain",
        |bin| {
            // The synthetic chain (real X.509, as `blob install` accepts), then with a CRL.
            let (old_table, new_table) = old_and_new();
            let mut setup = Setup::with_table(old_table);
            setup.start_sidecar();
            let new_blob = write_blob(setup._dir.path(), "new.bin", &new_table);
            let (old, new) = (setup.digest(), fnv1a32(&new_table));
            let mut opts = VmOptions::new(&setup.socket);
            opts.params.requests = 100_000;
            opts.params.pace_spins = 2000;
            opts.params.digests = [old, new];
            let vm = Vm::start(bin, &opts);
            vm.wait_line("a request served the old chain", LONG, |l| {
                Req::parse(l).is_some_and(|r| r.digest == old)
            });
            let out = blob_cmd()
                .arg("install")
                .arg(&new_blob)
                .arg(&setup.blob)
                .output()
                .expect("blob install");
            assert!(out.status.success(), "{}", output_text(&out));
            vm.wait_line("a request served the new chain", LONG, |l| {
                Req::parse(l).is_some_and(|r| r.digest == new)
            });
            // Once the guest has the new chain, it never gets the old one again
            let reqs = Req::all(&vm.lines());
            let first_new = reqs.iter().position(|r| r.digest == new).expect("new");
            assert!(reqs[first_new..]
                .iter()
                .all(|r| r.digest == new && r.entries == 4 && r.bytes as usize == new_table.len()));
            assert!(reqs[..first_new].iter().all(|r| r.entries == 3));
        },
    );
}

#[test]
fn an_updater_lock_gets_eagain_then_the_table() {
    for_each_qemu("an_updater_lock_gets_eagain_then_the_table", |bin| {
        let setup = Setup::new(5000);
        let lock = HeldLock::take("exclusive", &setup.blob);
        let mut opts = VmOptions::new(&setup.socket);
        opts.params.digests = [setup.digest(), 0];
        let vm = Vm::start(bin, &opts);
        vm.wait_line("EAGAIN while the updater holds the lock", LONG, |l| {
            l == "BUSY cpu=0 n=1"
        });
        assert!(Req::all(&vm.lines()).is_empty());
        lock.release();
        let reqs = Req::all(&vm.wait_done(LONG));
        assert_eq!(reqs.len(), 1);
        assert_served(&setup, &reqs);
        assert!(reqs[0].eagain >= 1, "{:?}", reqs[0]);
    });
}

/// Polls `cond` for up to `limit`.
fn within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_lease_holds_the_lock_until_the_request_reaches_firmware() {
    for_each_qemu(
        "the_lease_holds_the_lock_until_the_request_reaches_firmware",
        |bin| {
            let setup = Setup::new(5000);
            let mut opts = VmOptions::new(&setup.socket);
            opts.paused = true;
            opts.object_extra = ",\"x-hold-lease\":true".into();
            let mut vm = Vm::start(bin, &opts);
            vm.qmp.cmd("cont", json!({})).expect("cont");

            // Held between the sidecar's answer and the re-entry into KVM_RUN
            let held = |vm: &mut Vm| {
                vm.qmp
                    .cmd(
                        "qom-get",
                        json!({"path": "/objects/cs0", "property": "x-held-leases"}),
                    )
                    .expect("qom-get")
                    .as_u64()
            };
            assert!(
                within(LONG, || held(&mut vm) == Some(1)),
                "{}",
                vm.transcript()
            );
            assert!(
                !exclusive_lock_free(&setup.blob),
                "an updater got the lock while the lease was held"
            );
            assert!(Req::all(&vm.lines()).is_empty());

            // Released: KVM_RUN completes the exit, COCO_DONE goes out, the lock is free
            vm.qmp
                .cmd(
                    "qom-set",
                    json!({"path": "/objects/cs0", "property": "x-hold-lease", "value": false}),
                )
                .expect("qom-set");
            assert!(
                within(Duration::from_secs(5), || exclusive_lock_free(&setup.blob)),
                "the lock stayed held after the request reached firmware"
            );
            let reqs = Req::all(&vm.wait_done(LONG));
            assert_served(&setup, &reqs);
        },
    );
}

#[test]
fn a_sidecar_killed_and_restarted_costs_only_eagain() {
    for_each_qemu("a_sidecar_killed_and_restarted_costs_only_eagain", |bin| {
        let mut setup = Setup::new(5000);
        let mut opts = VmOptions::new(&setup.socket);
        opts.params.requests = 60;
        opts.params.pace_spins = 5000;
        opts.params.digests = [setup.digest(), 0];
        let vm = Vm::start(bin, &opts);
        vm.wait_line("the third request", LONG, |l| {
            l.starts_with("REQ cpu=0 n=3 ")
        });
        let mut sidecar = setup.sidecar.take().expect("sidecar");
        sidecar.signal_and_wait(libc::SIGKILL);
        let killed_after = Req::all(&vm.lines()).len();
        std::thread::sleep(Duration::from_secs(2));
        setup.start_sidecar();
        let lines = vm.wait_done(LONG);
        let reqs = Req::all(&lines);
        assert_eq!(reqs.len(), 60, "{}", vm.transcript());
        assert_served(&setup, &reqs);
        // The outage was seen, as EAGAIN only: the guest reports FAIL on anything else
        assert!(
            reqs[killed_after..].iter().any(|r| r.eagain > 0),
            "{}",
            vm.transcript()
        );
    });
}

#[test]
fn stop_and_cont_while_the_guest_requests() {
    for_each_qemu("stop_and_cont_while_the_guest_requests", |bin| {
        let setup = Setup::new(5000);
        let mut opts = VmOptions::new(&setup.socket);
        opts.smp = 2;
        opts.params.ncpus = 2;
        opts.params.requests = 150;
        opts.params.pace_spins = 500;
        opts.params.digests = [setup.digest(), 0];
        let mut vm = Vm::start(bin, &opts);
        vm.wait_line("requests under way", LONG, |l| {
            l.starts_with("REQ cpu=0 n=20 ")
        });
        let started = Instant::now();
        vm.qmp.cmd("stop", json!({})).expect("stop");
        let took = started.elapsed();
        eprintln!("stop returned after {took:?}");
        // A vCPU waits for the sidecar at most timeout-ms (300 ms) before it can stop
        assert!(took < Duration::from_secs(2), "stop took {took:?}");
        assert_eq!(vm.qmp.status(), "paused");
        let before = vm.lines().len();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(vm.lines().len(), before, "the guest ran while stopped");
        vm.qmp.cmd("cont", json!({})).expect("cont");
        let reqs = Req::all(&vm.wait_done(LONG));
        assert_eq!(reqs.len(), 300, "{}", vm.transcript());
        assert_served(&setup, &reqs);
    });
}

#[test]
fn no_sidecar_at_start_up_then_service_once_it_listens() {
    for_each_qemu(
        "no_sidecar_at_start_up_then_service_once_it_listens",
        |bin| {
            let mut setup = Setup::without_sidecar(5000);
            assert!(!Path::new(&setup.socket).exists());
            let mut opts = VmOptions::new(&setup.socket);
            opts.params.digests = [setup.digest(), 0];
            let mut vm = Vm::start(bin, &opts);
            assert_eq!(vm.qmp.status(), "running");
            vm.wait_line("EAGAIN while nothing listens", LONG, |l| {
                l == "BUSY cpu=0 n=1"
            });
            setup.start_sidecar();
            let reqs = Req::all(&vm.wait_done(LONG));
            assert_eq!(reqs.len(), 1);
            assert_served(&setup, &reqs);
            assert!(reqs[0].eagain >= 1);
        },
    );
}

#[test]
fn a_timeout_not_above_the_sidecars_lock_wait_is_reported_once() {
    for_each_qemu(
        "a_timeout_not_above_the_sidecars_lock_wait_is_reported_once",
        |bin| {
            let mut setup = Setup::without_sidecar(5000);
            setup.start_sidecar_with(&["--lock-wait-ms", "500"]);
            let mut opts = VmOptions::new(&setup.socket);
            opts.params.requests = 2;
            let vm = Vm::start(bin, &opts);
            let reqs = Req::all(&vm.wait_done(LONG));
            assert_served(&setup, &reqs);
            // The sidecar announced 500 ms in COCO_GET_CAPS; QEMU waits 300 ms by default
            let warning = "timeout-ms=300 is not above the sidecar's lock wait (500 ms)";
            assert_eq!(vm.stderr().matches(warning).count(), 1, "{}", vm.stderr());
        },
    );
}

#[test]
fn guest_ram_in_huge_pages_is_shared_in_whole_huge_pages() {
    let test = "guest_ram_in_huge_pages_is_shared_in_whole_huge_pages";
    let need = u64::from(qemu::RAM_MIB) / 2;
    if meminfo("HugePages_Free") < need {
        let why = format!("fewer than {need} free 2 MiB huge pages (vm.nr_hugepages)");
        skip_unless_required("COCO_REQUIRE_HUGEPAGES", test, &why);
        return;
    }
    for_each_qemu(test, |bin| {
        let setup = Setup::new(5000);
        let mut opts = VmOptions::new(&setup.socket);
        // A sealed hugetlb memfd: regions must be multiples of 2 MiB in file and guest
        // address; the guest's buffers (2 MiB and up) are in the first whole huge page.
        opts.ram_extra = ",hugetlb=on,hugetlbsize=2M".into();
        opts.params.requests = 2;
        opts.params.digests = [setup.digest(), 0];
        let vm = Vm::start(bin, &opts);
        let reqs = Req::all(&vm.wait_done(LONG));
        assert_eq!(reqs.len(), 2, "{}", vm.transcript());
        assert_served(&setup, &reqs);
    });
}
