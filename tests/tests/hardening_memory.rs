//! End-to-end: guest memory a hostile VMM shares cannot crash the sidecar or starve others
//! (docs/hardening.md, "Guest memory"). Each attack runs against the real binary with its
//! seccomp filter on: a hugetlb memfd whose huge-page pool is empty, a sparse file on a full
//! tmpfs, a file truncated and punched while requests write into it, and connections that
//! register hundreds of TiB.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::{CertsRet, MemoryRegion};
use coco_tests::{
    meminfo, proc_status, skip_unless_required, table_of_size, write_blob, GuestMem, Sidecar,
    TmpfsMount, REQUIRE_HUGETLB_VAR,
};

const MIB: u64 = 1 << 20;

fn sidecar(dir: &Path, table: &[u8]) -> Sidecar {
    let blob = write_blob(dir, "certs.bin", table);
    Sidecar::start(&blob, &[])
}

fn region(fd: &File, gpa: u64, size: u64, offset: u64) -> MemoryRegion<'_> {
    MemoryRegion {
        guest_phys_addr: gpa,
        size,
        mmap_offset: offset,
        userspace_addr: 0,
        fd: fd.as_fd(),
    }
}

/// A memfd of `size` bytes created with `flags` (e.g. MFD_HUGETLB); `None` if the kernel
/// refuses it.
fn memfd(size: u64, flags: libc::c_uint) -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just created and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).ok()?;
    Some(f)
}

fn sysctl(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/vm/{name}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Grows the huge-page pool by `n` pages until dropped (root only).
struct PoolGrowth(Option<u64>);

impl PoolGrowth {
    fn by(n: u64) -> PoolGrowth {
        let before = sysctl("nr_hugepages");
        let ok = std::fs::write("/proc/sys/vm/nr_hugepages", (before + n).to_string()).is_ok();
        PoolGrowth(ok.then_some(before))
    }
}

impl Drop for PoolGrowth {
    fn drop(&mut self) {
        if let Some(before) = self.0 {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before.to_string());
        }
    }
}

fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own; no pointers.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn hugetlb_memory_without_free_huge_pages_gets_eagain_and_with_them_the_table() {
    let test = "hugetlb_memory_without_free_huge_pages_gets_eagain_and_with_them_the_table";
    let Some(probe) = memfd(2 * MIB, libc::MFD_HUGETLB) else {
        skip_unless_required(REQUIRE_HUGETLB_VAR, test, "this kernel has no MFD_HUGETLB");
        return;
    };
    drop(probe);
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 1);
    let mut sidecar = sidecar(dir.path(), &table);
    let page = 2 * MIB;

    // The attack: a shrink-sealed hugetlb memfd, and no free huge page to back it. Writing
    // through a mapping was SIGBUS (SIGSYS under seccomp); now the guest gets EAGAIN.
    let free = meminfo("HugePages_Free");
    let hog = memfd(free.max(1) * page, libc::MFD_HUGETLB).expect("memfd");
    if free > 0 {
        fallocate(&hog, 0, 0, free * page).expect("take every free huge page");
    }
    assert_eq!(meminfo("HugePages_Free"), 0, "the pool is empty now");
    let empty = meminfo("HugePages_Free") == 0 && sysctl("nr_overcommit_hugepages") == 0;
    let ram = memfd(2 * page, libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING).expect("memfd");
    // SAFETY: F_ADD_SEALS with an int argument on a descriptor we own.
    let sealed =
        unsafe { libc::fcntl(ram.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0;
    assert!(sealed);
    let mut vmm = sidecar.connect();
    vmm.add_mem_region(&region(&ram, 0, 2 * page, 0))
        .expect("accepted: the write is what cannot be done");
    for vcpu in 0..3 {
        let r = vmm
            .request_certs(Abi::SnpReqCerts, vcpu, 0x1000, 1)
            .expect("an answer, not a dead sidecar");
        if empty {
            assert_eq!((r.ret, r.lease), (CertsRet::Again, 0), "vcpu {vcpu}");
        }
    }
    assert!(sidecar.alive(), "{}", sidecar.log());
    assert!(
        sidecar.log().contains("writing guest RAM at 0x1000 failed"),
        "{}",
        sidecar.log()
    );
    // The connection lives on: tmpfs memory added to it is served.
    let tmpfs = GuestMem::new(MIB, 0);
    vmm.add_mem_region(&tmpfs.region(64 * MIB)).expect("tmpfs");
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 64 * MIB, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(tmpfs.read(0, table.len()), table);

    // Give the pages back; with a free huge page the table lands in the hugetlb file (read
    // back with read(2): hugetlbfs has no write(2), which is why the sidecar copies through a
    // mapping).
    drop(hog);
    let _grown = (meminfo("HugePages_Free") == 0).then(|| PoolGrowth::by(1));
    if meminfo("HugePages_Free") == 0 && sysctl("nr_overcommit_hugepages") == 0 {
        let why = "the half with a free huge page: cannot grow the pool (not root?)";
        skip_unless_required(REQUIRE_HUGETLB_VAR, test, why);
    } else {
        let ram = memfd(2 * page, libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING).expect("memfd");
        let mut vmm = sidecar.connect();
        vmm.add_mem_region(&region(&ram, 0, 2 * page, 0))
            .expect("hugetlb region");
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 0, page + 0x3000, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok, "{}", sidecar.log());
        vmm.done(r.lease).expect("done");
        let mut got = vec![0u8; table.len()];
        ram.read_exact_at(&mut got, page + 0x3000)
            .expect("read back");
        assert_eq!(got, table);
    }
}

#[test]
fn a_sparse_file_on_a_full_tmpfs_gets_eagain_until_space_is_free() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 2);
    let mut sidecar = sidecar(dir.path(), &table);
    let test = "a_sparse_file_on_a_full_tmpfs_gets_eagain_until_space_is_free";
    let Some(tmpfs) = TmpfsMount::or_skip(test, 256 * 1024) else {
        return;
    };
    let mnt = tmpfs.path();
    // Guest RAM: 1 MiB, sparse, unsealed, on a 256 KiB tmpfs that the filler then fills.
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(mnt.join("ram"))
        .expect("ram");
    ram.set_len(MIB).expect("size");
    let filler_path = mnt.join("filler");
    let mut filler = File::create(&filler_path).expect("filler");
    let chunk = vec![1u8; 4096];
    while std::io::Write::write_all(&mut filler, &chunk).is_ok() {}
    drop(filler);

    let mut vmm = sidecar.connect();
    vmm.add_mem_region(&region(&ram, 0, MIB, 0))
        .expect("a sparse tmpfs file");
    for vcpu in 0..3 {
        let r = vmm
            .request_certs(Abi::SnpReqCerts, vcpu, 0x4000, 1)
            .expect("an answer, not a dead sidecar");
        assert_eq!((r.ret, r.lease), (CertsRet::Again, 0), "vcpu {vcpu}");
    }
    assert!(sidecar.alive());
    assert!(
        sidecar.log().contains("No space left on device"),
        "{}",
        sidecar.log()
    );
    // Space again: the same request is served.
    std::fs::remove_file(&filler_path).expect("rm filler");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x4000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    let mut got = vec![0u8; table.len()];
    ram.read_exact_at(&mut got, 0x4000).expect("read");
    assert_eq!(got, table);
}

#[test]
fn truncating_and_punching_guest_ram_under_requests_never_crashes_the_sidecar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(6000, 3);
    let mut sidecar = sidecar(dir.path(), &table);
    // Unsealed, so that the peer can shrink it while the sidecar writes: the documented race
    // that killed the old --allow-unsealed-memory within seconds.
    let ram = memfd(4 * MIB, 0).expect("memfd");
    let mut vmm = sidecar.connect();
    vmm.add_mem_region(&region(&ram, 0, 4 * MIB, 0))
        .expect("region");
    let stop = Arc::new(AtomicBool::new(false));
    let vandal = {
        let ram = ram.try_clone().expect("dup");
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ram.set_len(0).expect("shrink");
                ram.set_len(4 * MIB).expect("grow");
                let _ = fallocate(
                    &ram,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4 * MIB,
                );
                rounds += 1;
            }
            rounds
        })
    };
    let started = Instant::now();
    let mut answers = [0u64; 2];
    while started.elapsed() < Duration::from_secs(2) {
        let gpa = (answers[0] + answers[1]) % 512 * 0x2000;
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 0, gpa, 2)
            .expect("an answer, not a dead sidecar");
        match r.ret {
            CertsRet::Ok => answers[0] += 1,
            CertsRet::Again => answers[1] += 1,
            other => panic!("ret {other:?} at {gpa:#x}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = vandal.join().expect("vandal");
    println!(
        "truncate race: {} ok, {} eagain, {rounds} truncate/punch rounds in 2 s",
        answers[0], answers[1]
    );
    assert!(rounds > 100 && answers[0] > 100, "{rounds} {answers:?}");
    assert!(sidecar.alive(), "{}", sidecar.log());
}

#[test]
fn peers_registering_hundreds_of_tib_cost_no_address_space_and_starve_no_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 4);
    let sidecar = sidecar(dir.path(), &table);
    // Two connections, each 32 regions of 4 TiB of one sparse sealed memfd: 256 TiB, more
    // than x86-64 user address space. Mapped, they took it all and starved thread stacks.
    const TIB: u64 = 1 << 40;
    let huge = GuestMem::sparse(32 * 4 * TIB);
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut hog = sidecar.connect();
        for i in 0..32 {
            let r = region(huge.memfd.as_file(), i * 4 * TIB, 4 * TIB, i * 4 * TIB);
            hog.add_mem_region(&r)
                .unwrap_or_else(|e| panic!("region {i}: {e}"));
        }
        hogs.push(hog);
    }
    let vm_size_kib = proc_status(sidecar.pid(), "VmSize");
    println!("VmSize with 256 TiB registered: {vm_size_kib} KiB");
    assert!(
        vm_size_kib < 4 * 1024 * 1024,
        "{vm_size_kib} KiB of address space: guest memory is not mapped"
    );
    // The hogs' memory is served where it is, even at its far end.
    let far = 128 * TIB - 0x2000;
    let r = hogs[1]
        .request_certs(Abi::SnpReqCerts, 0, far, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(huge.read(far, table.len()), table);
    // A legitimate VMM connects (a new thread, a new connection) and is served.
    let mem = GuestMem::new(MIB, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x1000, table.len()), table);
}
