//! End-to-end: the real `coco-sidecar serve` binary, driven over its real socket with real
//! memfd guest memory, and OFD locks taken by a second process.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::transport::{self, send_bytes};
use coco_protocol::wire::{self, ExitMsg, Header, RegionDesc, Request, HEADER_SIZE};
use coco_protocol::{CertsRet, FrontendError};
use coco_tests::{
    exclusive_lock_free, http_get, metrics_addr, rejected, table_of_size, write_blob, GuestMem,
    HeldLock, Sidecar,
};

const CANARY: u8 = 0xa5;
const RAM: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn blob_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A sidecar serving a synthetic table of `size` bytes, with its blob directory and path.
fn serving(size: usize, fill: u8, args: &[&str]) -> (tempfile::TempDir, PathBuf, Sidecar) {
    let dir = blob_dir();
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(size, fill));
    let sidecar = Sidecar::start(&blob, args);
    (dir, blob, sidecar)
}

/// A negotiated connection with one megabyte of canary-filled RAM at gpa 0.
fn with_ram(sidecar: &Sidecar) -> (GuestMem, coco_protocol::Frontend) {
    let mem = GuestMem::new(RAM, CANARY);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    (mem, vmm)
}

/// Waits (bounded) for a condition that another process brings about asynchronously.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("not within 10 s: {what}");
}

fn assert_untouched(mem: &GuestMem) {
    let all = mem.read(0, mem.size as usize);
    if let Some(at) = all.iter().position(|b| *b != CANARY) {
        panic!("guest memory was written at {at:#x}");
    }
}

#[test]
fn success_writes_the_exact_table_and_nothing_else() {
    let dir = blob_dir();
    let table = table_of_size(5000, 1);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, &[]);
    for abi in Abi::ALL {
        let mem = GuestMem::new(RAM, CANARY);
        let mut vmm = sidecar.connect();
        vmm.set_mem_table(&[mem.region(0)]).expect("memory");
        let gpa = 0x4000;
        let reply = vmm.request_certs(abi, 0, gpa, 2).expect("request");
        assert_eq!(reply.ret, CertsRet::Ok, "{abi:?}");
        assert_ne!(reply.lease, 0, "a locked blob gives a lease");
        assert_eq!(
            mem.read(gpa, table.len()),
            table,
            "{abi:?}: table byte for byte"
        );
        assert_eq!(mem.read(gpa - 1, 1), [CANARY], "byte before the buffer");
        let tail = mem.read(gpa + table.len() as u64, (2 * PAGE) as usize - table.len());
        assert!(
            tail.iter().all(|b| *b == CANARY),
            "buffer past the table untouched"
        );
        assert_eq!(
            mem.read(gpa + 2 * PAGE, 1),
            [CANARY],
            "byte after the buffer"
        );
        vmm.done(reply.lease).expect("done");
    }
}

#[test]
fn enospc_reports_the_exact_page_count() {
    let dir = blob_dir();
    for (size, pages) in [(5000usize, 2u64), (8192, 2), (4096, 1), (4097, 2)] {
        let blob = write_blob(
            dir.path(),
            &format!("certs-{size}.bin"),
            &table_of_size(size, 7),
        );
        let sidecar = Sidecar::start(&blob, &[]);
        let mut vmm = sidecar.connect();
        for abi in Abi::ALL {
            let mem = GuestMem::new(RAM, CANARY);
            vmm.set_mem_table(&[mem.region(0)]).expect("memory");
            for offered in [0, pages - 1] {
                let r = vmm.request_certs(abi, 1, 0x8000, offered).expect("request");
                assert_eq!(
                    (r.ret, r.npages, r.lease),
                    (CertsRet::NoSpace, pages, 0),
                    "{size}-byte table, {offered} pages offered, {abi:?}"
                );
            }
            assert_untouched(&mem);
            let r = vmm.request_certs(abi, 1, 0x8000, pages).expect("request");
            assert_eq!(r.ret, CertsRet::Ok, "{size}-byte table in {pages} pages");
            vmm.done(r.lease).expect("done");
        }
    }
}

#[test]
fn missing_blob_serves_the_empty_table() {
    let dir = blob_dir();
    let sidecar = Sidecar::start(&dir.path().join("absent.bin"), &[]);
    let (mem, mut vmm) = with_ram(&sidecar);
    for abi in Abi::ALL {
        let probe = vmm.request_certs(abi, 0, 0x2000, 0).expect("probe");
        assert_eq!((probe.ret, probe.npages), (CertsRet::NoSpace, 1));
        let r = vmm.request_certs(abi, 0, 0x2000, 1).expect("request");
        assert_eq!((r.ret, r.lease), (CertsRet::Ok, 0), "no file, no lease");
        assert_eq!(mem.read(0x2000, 24), [0u8; 24]);
        assert_eq!(mem.read(0x2000 + 24, 1), [CANARY]);
    }
}

#[test]
fn missing_blob_policies_again_and_eio() {
    let dir = blob_dir();
    let absent = dir.path().join("absent.bin");
    for (policy, want) in [("again", CertsRet::Again), ("eio", CertsRet::Io)] {
        let sidecar = Sidecar::start(&absent, &["--missing-certs", policy]);
        let mem = GuestMem::new(RAM, CANARY);
        let mut vmm = sidecar.connect();
        vmm.set_mem_table(&[mem.region(0)]).expect("memory");
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 0, 0x2000, 1)
            .expect("request");
        assert_eq!(r.ret, want, "--missing-certs {policy}");
        assert_untouched(&mem);
    }
}

#[test]
fn eagain_while_an_updater_holds_the_lock_then_success() {
    let dir = blob_dir();
    let table = table_of_size(3000, 3);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, &["--lock-wait-ms", "50"]);
    let (mem, mut vmm) = with_ram(&sidecar);
    let updater = HeldLock::take("exclusive", &blob);
    for abi in Abi::ALL {
        let r = vmm.request_certs(abi, 0, 0x1000, 1).expect("request");
        assert_eq!(
            (r.ret, r.lease),
            (CertsRet::Again, 0),
            "{abi:?} while locked"
        );
    }
    assert_untouched(&mem);
    updater.release();
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x1000, table.len()), table);
}

#[test]
fn lease_blocks_updaters_until_done() {
    let (_dir, blob, sidecar) = serving(3000, 4, &[]);
    let (_mem, mut vmm) = with_ram(&sidecar);
    assert!(exclusive_lock_free(&blob), "no lock before any request");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 2, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert!(
        !exclusive_lock_free(&blob),
        "the lease holds the shared lock"
    );
    vmm.done(r.lease).expect("done");
    assert!(exclusive_lock_free(&blob), "DONE released it");
    // DONE of a lease that no longer exists is reported, not fatal.
    match vmm.done(r.lease) {
        Err(FrontendError::Rejected { errno, .. }) => assert_eq!(errno, libc::ENOENT as u64),
        other => panic!("expected ENOENT, got {other:?}"),
    }
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 2, 0x1000, 1)
        .expect("connection still usable");
    assert_eq!(r.ret, CertsRet::Ok);
}

/// A blob renamed over (the careless update): new requests lock and serve the new file at
/// once, while a lease granted before keeps the old file locked until its DONE, as another
/// process sees through a second name of the old file.
#[test]
fn a_renamed_over_blob_keeps_old_leases_on_the_old_file() {
    let dir = blob_dir();
    let (a, b) = (table_of_size(3000, 1), table_of_size(3000, 2));
    let blob = write_blob(dir.path(), "certs.bin", &a);
    let old_name = dir.path().join("old.bin");
    std::fs::hard_link(&blob, &old_name).expect("a second name for the old file");
    let sidecar = Sidecar::start(&blob, &[]);
    let (mem, mut vmm) = with_ram(&sidecar);
    let old = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(old.ret, CertsRet::Ok);
    std::fs::rename(write_blob(dir.path(), "certs.new", &b), &blob).expect("rename over");
    let new = vmm
        .request_certs(Abi::SnpReqCerts, 1, 0x2000, 1)
        .expect("request");
    assert_eq!(new.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x2000, b.len()), b, "the new file at once");
    assert!(
        !exclusive_lock_free(&blob),
        "the new lease locks the new file"
    );
    assert!(!exclusive_lock_free(&old_name), "the old lease the old one");
    vmm.done(new.lease).expect("done");
    assert!(exclusive_lock_free(&blob));
    assert!(!exclusive_lock_free(&old_name), "until its own DONE");
    vmm.done(old.lease).expect("done");
    assert!(exclusive_lock_free(&old_name));
}

#[test]
fn lease_released_when_the_client_disconnects() {
    let (_dir, blob, sidecar) = serving(3000, 5, &[]);
    let (_mem, mut vmm) = with_ram(&sidecar);
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert!(!exclusive_lock_free(&blob));
    drop(vmm);
    eventually("lock released after disconnect", || {
        exclusive_lock_free(&blob)
    });
}

/// COCO_GET_CAPS read off the socket byte for byte and compared with the layout of
/// protocol.md 6.1 written out by hand, with and without COCO_LOCK_WAIT (bit 49) negotiated.
#[test]
fn lock_wait_is_announced_only_to_a_frontend_that_negotiated_it() {
    use std::io::Read;
    let (_dir, _blob, sidecar) = serving(
        3000,
        7,
        &[
            "--lock-wait-ms",
            "250",
            "--max-leases",
            "5",
            "--lease-timeout-ms",
            "4660",
        ],
    );

    // The Rust client acknowledges every feature offered, this one included.
    let mut vmm = sidecar.connect();
    assert_eq!(vmm.protocol_features() & (1 << 49), 1 << 49);
    assert_eq!(vmm.caps().expect("caps").lock_wait_ms, 250);

    let caps_bytes = |features: u64| {
        let raw = sidecar.raw();
        let mut msg = header(Request::SetProtocolFeatures as u32, 1, 8);
        msg.extend_from_slice(&features.to_le_bytes());
        msg.extend_from_slice(&header(Request::CocoGetCaps as u32, 1, 0));
        send_bytes(&raw, &msg, &[]).expect("send");
        raw.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reply = [0u8; HEADER_SIZE + 32];
        (&raw).read_exact(&mut reply).expect("caps reply");
        // COCO_GET_CAPS (0x43430001) echoed, flags version 1 | REPLY, size 32.
        assert_eq!(
            reply[..HEADER_SIZE],
            [1, 0, 0x43, 0x43, 5, 0, 0, 0, 32, 0, 0, 0]
        );
        reply[HEADER_SIZE..].to_vec()
    };
    let expected = |lock_wait: [u8; 4]| {
        [
            &[6, 0, 0, 0, 0, 0, 0, 0][..], // abis: tags 1 and 2
            &[1, 0, 0, 0, 0, 0, 0, 0],     // coco_subtypes: REQ_CERTS
            &[5, 0, 0, 0],                 // max_leases
            &[0x34, 0x12, 0, 0],           // lease_timeout_ms 4660
            &lock_wait,                    // lock_wait_ms, or reserved
            &[0, 0, 0, 0],                 // reserved
        ]
        .concat()
    };
    let (reply_ack, mem_slots, coco, lock_wait) = (0x8u64, 0x8000u64, 1u64 << 48, 1u64 << 49);
    assert_eq!(
        caps_bytes(reply_ack | mem_slots | coco),
        expected([0; 4]),
        "without bit 49, bytes 24-27 stay reserved"
    );
    assert_eq!(
        caps_bytes(reply_ack | mem_slots | coco | lock_wait),
        expected([250, 0, 0, 0]),
        "with bit 49, the lock wait"
    );
}

#[test]
fn lease_released_after_the_timeout() {
    let (_dir, blob, sidecar) = serving(3000, 6, &["--lease-timeout-ms", "300"]);
    let (_mem, mut vmm) = with_ram(&sidecar);
    assert_eq!(vmm.caps().expect("caps").lease_timeout_ms, 300);
    let granted = Instant::now();
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert!(!exclusive_lock_free(&blob));
    eventually("lock released by the lease timeout", || {
        exclusive_lock_free(&blob)
    });
    assert!(
        granted.elapsed() >= Duration::from_millis(300),
        "not before the timeout"
    );
    assert!(
        sidecar.log().contains("timed out without COCO_DONE"),
        "{}",
        sidecar.log()
    );
    // The connection itself is still good.
    assert_eq!(
        vmm.request_certs(Abi::CocoRfc, 0, 0x1000, 1)
            .expect("request")
            .ret,
        CertsRet::Ok
    );
}

#[test]
fn a_new_request_of_the_same_vcpu_replaces_its_lease() {
    let (_dir, _blob, sidecar) = serving(3000, 6, &["--max-leases", "1"]);
    let (_mem, mut vmm) = with_ram(&sidecar);
    let first = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    let again = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(
        again.ret,
        CertsRet::Ok,
        "same vcpu: its old lease is dropped"
    );
    assert_ne!(first.lease, again.lease);
    let other = vmm
        .request_certs(Abi::CocoRfc, 1, 0x1000, 1)
        .expect("request");
    assert_eq!(
        other.ret,
        CertsRet::Again,
        "another vcpu: the one lease slot is taken"
    );
    vmm.done(again.lease).expect("done");
    assert_eq!(
        vmm.request_certs(Abi::CocoRfc, 1, 0x1000, 1)
            .expect("request")
            .ret,
        CertsRet::Ok
    );
}

/// `ret` of an answered record, from the offsets of protocol.md 6.3: u32 at 8 (tag 1), u64 at
/// 16 (tag 2).
fn ret_at(tag: u32, record: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    match tag {
        1 => b[..4].copy_from_slice(&record[8..12]),
        _ => b.copy_from_slice(&record[16..24]),
    }
    u64::from_le_bytes(b)
}

/// DONE of a lease the sidecar no longer holds: refused with ENOENT.
fn assert_lease_gone(vmm: &mut coco_protocol::Frontend, lease: u64, what: &str) {
    match vmm.done(lease) {
        Err(FrontendError::Rejected { errno, .. }) => {
            assert_eq!(errno, libc::ENOENT as u64, "{what}")
        }
        other => panic!("{what}: DONE of a released lease: {other:?}"),
    }
}

/// protocol.md 6.2: another COCO_EXIT of a vCPU ends that vCPU's lease whatever the new
/// request's answer: a non-zero status, EIO, ENOSPC, EAGAIN or success. Each time another
/// process's fcntl finds the blob's exclusive lock taken while the lease lives and free once
/// the same vCPU asked again (for success: held by the new lease only).
#[test]
fn another_exit_of_the_same_vcpu_ends_its_lease_whatever_the_answer() {
    let dir = blob_dir();
    let table = table_of_size(3000, 6);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, &["--lease-timeout-ms", "60000"]);
    let (_mem, mut vmm) = with_ram(&sidecar);
    let lease_of_vcpu_0 = |vmm: &mut coco_protocol::Frontend, what: &str| {
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok, "{what}");
        assert_ne!(r.lease, 0, "{what}");
        assert!(
            !exclusive_lock_free(&blob),
            "{what}: the lease holds the lock"
        );
        r.lease
    };
    let mut sub_type = coco_protocol::exit::build_request(Abi::CocoRfc, 0x1000, 1);
    sub_type[0] = 1;
    let mut gfn_overflow = coco_protocol::exit::build_request(Abi::CocoRfc, 0, 1);
    gfn_overflow[16..24].copy_from_slice(&(u64::MAX / 16).to_le_bytes());
    let snp = |gpa, npages| coco_protocol::exit::build_request(Abi::SnpReqCerts, gpa, npages);
    let (enotsup, einval) = (libc::ENOTSUP as u32, libc::EINVAL as u32);
    let (eio, enospc) = (libc::EIO as u64, libc::ENOSPC as u64);
    // (what, ABI tag, record, reply status, ret)
    let refusals: [(&str, u32, Vec<u8>, u32, u64); 7] = [
        ("an unknown ABI tag", 9, vec![0; 24], enotsup, 0),
        ("a COCO sub-type not served", 1, sub_type, enotsup, 0),
        ("a record of the wrong size", 2, vec![0; 32], einval, 0),
        ("a gfn whose address overflows", 1, gfn_overflow, 0, eio),
        ("an unaligned gpa", 2, snp(0x1001, 1), 0, eio),
        ("a buffer outside guest RAM", 2, snp(16 * RAM, 1), 0, eio),
        ("an npages = 0 probe", 2, snp(0x1000, 0), 0, enospc),
    ];
    for (what, tag, record, status, ret) in refusals {
        let lease = lease_of_vcpu_0(&mut vmm, what);
        // Another vCPU's request leaves vCPU 0's lease alone.
        let other = vmm.forward_exit(tag, 1, &record).expect("exit");
        assert_eq!(other.status, status, "{what}, vcpu 1");
        assert!(
            !exclusive_lock_free(&blob),
            "{what}: vcpu 1 ends no lease of vcpu 0"
        );
        let r = vmm.forward_exit(tag, 0, &record).expect("exit");
        assert_eq!(r.status, status, "{what}");
        if status == 0 {
            assert_eq!(ret_at(tag, &r.record), ret, "{what}");
        }
        assert_eq!(r.lease, 0, "{what}");
        assert!(exclusive_lock_free(&blob), "{what}: vcpu 0's lease ended");
        assert_lease_gone(&mut vmm, lease, what);
    }

    // EAGAIN: the blob rewritten invalid in place (no lock: the same file stays locked by
    // the lease until vCPU 0 asks again).
    let lease = lease_of_vcpu_0(&mut vmm, "EAGAIN");
    std::fs::write(&blob, b"not a certificate table").expect("rewrite");
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!((r.ret, r.lease), (CertsRet::Again, 0));
    assert!(exclusive_lock_free(&blob), "EAGAIN: vcpu 0's lease ended");
    assert_lease_gone(&mut vmm, lease, "EAGAIN");
    std::fs::write(&blob, &table).expect("restore");

    // Success: the new lease replaces the old one.
    let first = lease_of_vcpu_0(&mut vmm, "success");
    let second = lease_of_vcpu_0(&mut vmm, "success, again");
    assert_ne!(first, second);
    assert_lease_gone(&mut vmm, first, "success");
    assert!(!exclusive_lock_free(&blob), "the new lease holds the lock");
    vmm.done(second).expect("done");
    assert!(exclusive_lock_free(&blob));
}

#[test]
fn bad_buffers_get_eio_and_no_write() {
    let (_dir, blob, sidecar) = serving(3000, 8, &[]);
    let low = GuestMem::new(RAM, CANARY);
    let high = GuestMem::new(RAM, CANARY);
    let mut vmm = sidecar.connect();
    // RAM at [0, 1 MiB) and [2 MiB, 3 MiB): a hole between them.
    vmm.set_mem_table(&[low.region(0), high.region(2 * RAM)])
        .expect("memory");
    let cases: [(&str, Abi, u64, u64); 6] = [
        ("unaligned gpa", Abi::SnpReqCerts, 0x1001, 1),
        ("outside every region", Abi::SnpReqCerts, 16 * RAM, 1),
        ("inside the hole", Abi::CocoRfc, RAM + 0x1000, 1),
        (
            "crossing the end of a region",
            Abi::SnpReqCerts,
            RAM - PAGE,
            2,
        ),
        (
            "crossing the end of guest RAM",
            Abi::CocoRfc,
            3 * RAM - PAGE,
            2,
        ),
        ("absurd npages", Abi::SnpReqCerts, 0, u64::MAX / 2),
    ];
    for (what, abi, gpa, npages) in cases {
        let r = vmm.request_certs(abi, 0, gpa, npages).expect("request");
        assert_eq!((r.ret, r.lease), (CertsRet::Io, 0), "{what}");
    }
    // A gfn so large that gfn * 4096 overflows, in the seed ABI's record.
    let mut record = coco_protocol::exit::build_request(Abi::CocoRfc, 0, 1);
    record[16..24].copy_from_slice(&(u64::MAX / 16).to_le_bytes());
    let reply = vmm
        .forward_exit(Abi::CocoRfc.tag(), 0, &record)
        .expect("exit");
    assert_eq!(
        reply.record[8..12],
        5u32.to_le_bytes(),
        "gfn overflow is EIO"
    );
    assert_untouched(&low);
    assert_untouched(&high);
    assert!(exclusive_lock_free(&blob), "no lease for a failed request");
}

/// protocol.md 6.4 checks in order: the buffer's alignment (1) before the leases (2), the
/// blob (3) before the size (4), the size before guest RAM (5). So an `npages = 0` probe at
/// an address that is not RAM learns the size, and one while an updater holds the lock gets
/// EAGAIN.
#[test]
fn answers_follow_the_documented_check_order() {
    let (_dir, blob, sidecar) = serving(5000, 3, &["--max-leases", "1", "--lock-wait-ms", "20"]);
    let mut vmm = sidecar.connect();
    // No memory at all: 4 comes before 5.
    for abi in Abi::ALL {
        for (gpa, npages) in [(0x1000, 0), (64 * RAM, 1)] {
            let r = vmm.request_certs(abi, 0, gpa, npages).expect("probe");
            assert_eq!(
                (r.ret, r.npages, r.lease),
                (CertsRet::NoSpace, 2, 0),
                "{abi:?}: {npages} pages at {gpa:#x}, no RAM"
            );
        }
    }
    let (mem, mut vmm) = with_ram(&sidecar);
    let held = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 2)
        .expect("request");
    assert_eq!(held.ret, CertsRet::Ok);
    let written = mem.read(0, RAM as usize);
    // The one lease is vcpu 0's: vcpu 1 gets EAGAIN (2), unless its buffer is unaligned (1).
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 1, 0x1000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Again, "no room for a lease");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 1, 0x1800, 0)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Io, "unaligned: 1 before 2");
    vmm.done(held.lease).expect("done");
    // An updater holds the lock: 3 before 4.
    let updater = HeldLock::take("exclusive", &blob);
    let r = vmm
        .request_certs(Abi::CocoRfc, 1, 0x1000, 0)
        .expect("request");
    assert_eq!(
        (r.ret, r.npages),
        (CertsRet::Again, 0),
        "locked: 3 before 4"
    );
    updater.release();
    let r = vmm
        .request_certs(Abi::CocoRfc, 1, 0x1000, 0)
        .expect("request");
    assert_eq!((r.ret, r.npages), (CertsRet::NoSpace, 2));
    assert!(
        mem.read(0, RAM as usize) == written,
        "no refused request wrote"
    );
}

/// An updater that lets go within `--lock-wait-ms` costs the request a wait, not EAGAIN: the
/// request sent while another process held the exclusive lock is answered only after it let
/// go, and with the table.
#[test]
fn a_lock_released_within_the_lock_wait_is_success_not_eagain() {
    let dir = blob_dir();
    let table = table_of_size(3000, 4);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, &["--lock-wait-ms", "5000"]);
    let (mem, vmm) = with_ram(&sidecar);
    let updater = HeldLock::take("exclusive", &blob);
    let request = ExitMsg {
        abi: Abi::SnpReqCerts.tag(),
        vcpu: 0,
        status: 0,
        lease: 0,
        record: coco_protocol::exit::build_request(Abi::SnpReqCerts, 0x1000, 1),
    }
    .encode();
    let h = Header::request(Request::CocoExit, request.len(), false);
    transport::send_message(vmm.stream(), &h, &request, &[]).expect("send");
    thread::sleep(Duration::from_millis(300));
    let mut pending = [libc::pollfd {
        fd: vmm.stream().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll reads and writes the one pollfd, which outlives the call.
    let ready = unsafe { libc::poll(pending.as_mut_ptr(), 1, 0) };
    assert_eq!(ready, 0, "no answer while the updater holds the lock");
    updater.release();
    let reply = transport::MessageReader::new()
        .recv(vmm.stream())
        .expect("reply")
        .expect("not closed");
    let reply = ExitMsg::decode(&reply.payload).expect("exit reply");
    assert_eq!(reply.status, 0);
    assert_eq!(ret_at(reply.abi, &reply.record), 0, "success, not EAGAIN");
    assert_ne!(reply.lease, 0);
    assert_eq!(mem.read(0x1000, table.len()), table);
}

#[test]
fn unknown_abi_and_subtype_get_a_status_not_an_answer() {
    let (_dir, _blob, sidecar) = serving(3000, 8, &[]);
    let mut vmm = sidecar.connect();
    let r = vmm.forward_exit(9, 0, &[0u8; 24]).expect("exit");
    assert_eq!((r.status, r.record), (libc::ENOTSUP as u32, vec![0u8; 24]));
    let mut rfc = coco_protocol::exit::build_request(Abi::CocoRfc, 0, 1);
    rfc[0] = 1; // a COCO sub-type other than REQ_CERTS
    let r = vmm.forward_exit(Abi::CocoRfc.tag(), 0, &rfc).expect("exit");
    assert_eq!((r.status, &r.record), (libc::ENOTSUP as u32, &rfc));
    let r = vmm
        .forward_exit(Abi::SnpReqCerts.tag(), 0, &[0u8; 32])
        .expect("exit");
    assert_eq!(
        r.status,
        libc::EINVAL as u32,
        "wrong record size for the ABI"
    );
}

/// Sends `bytes` (and `fds`) on a fresh, negotiated connection and checks that the sidecar
/// closes it, then that the sidecar still serves a well-behaved client.
fn assert_closes(sidecar: &mut Sidecar, what: &str, bytes: &[u8], fds: &[i32], half_close: bool) {
    let vmm = sidecar.connect();
    let stream = vmm.stream();
    send_bytes(stream, bytes, fds).expect("send");
    if half_close {
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let n = transport::drain(stream).unwrap_or_else(|e| panic!("{what}: not closed: {e}"));
    assert_eq!(n, 0, "{what}: no reply bytes before the close");
    assert!(sidecar.alive(), "{what}: the sidecar died");
    let mem = GuestMem::new(RAM, CANARY);
    let mut good = sidecar.connect();
    good.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = good
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok, "{what}: a second connection is served");
    good.done(r.lease).expect("done");
}

fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    Header {
        request,
        flags,
        size,
    }
    .encode()
    .to_vec()
}

#[test]
fn malformed_messages_close_only_their_connection() {
    let (_dir, _blob, mut sidecar) = serving(3000, 9, &[]);
    let devnull = std::fs::File::open("/dev/null").expect("open");
    let fd = devnull.as_raw_fd();
    let get_features = Request::GetFeatures as u32;
    let caps = Request::CocoGetCaps as u32;
    let cases: Vec<(&str, Vec<u8>, Vec<i32>, bool)> = vec![
        ("version 0", header(get_features, 0, 0), vec![], false),
        ("version 2", header(get_features, 2, 0), vec![], false),
        (
            "unknown flag bit",
            header(get_features, 1 | 0x100, 0),
            vec![],
            false,
        ),
        (
            "REPLY on a request",
            header(get_features, 1 | 4, 0),
            vec![],
            false,
        ),
        ("size over the limit", header(caps, 1, 4097), vec![], false),
        ("unknown code", header(0x1234_5678, 1, 0), vec![], false),
        (
            "payload on an empty request",
            [header(caps, 1, 4), vec![0; 4]].concat(),
            vec![],
            false,
        ),
        (
            "truncated payload",
            [header(Request::CocoDone as u32, 1, 8), vec![0; 3]].concat(),
            vec![],
            true,
        ),
        (
            "truncated header",
            header(caps, 1, 0)[..7].to_vec(),
            vec![],
            true,
        ),
        ("extra fd", header(caps, 1, 0), vec![fd], false),
        ("nine fds", header(caps, 1, 0), vec![fd; 9], false),
        (
            "ADD_MEM_REG without its fd",
            [
                header(Request::AddMemReg as u32, 1, 40),
                wire::encode_mem_reg(&RegionDesc {
                    memory_size: 4096,
                    ..Default::default()
                }),
            ]
            .concat(),
            vec![],
            false,
        ),
        (
            "SET_MEM_TABLE with fewer fds than regions",
            [
                header(Request::SetMemTable as u32, 1, 40),
                wire::encode_mem_table(&[RegionDesc {
                    memory_size: 4096,
                    ..Default::default()
                }]),
            ]
            .concat(),
            vec![],
            false,
        ),
        (
            "COCO_EXIT record larger than 64 bytes",
            {
                let mut p = vec![0u8; 24 + 65];
                p[8..12].copy_from_slice(&65u32.to_le_bytes());
                [header(Request::CocoExit as u32, 1, p.len() as u32), p].concat()
            },
            vec![],
            false,
        ),
        (
            "SET_PROTOCOL_FEATURES twice",
            [
                header(Request::SetProtocolFeatures as u32, 1, 8),
                wire::PF_COCO.to_le_bytes().to_vec(),
            ]
            .concat(),
            vec![],
            false,
        ),
    ];
    for (what, bytes, fds, half_close) in cases {
        assert_closes(&mut sidecar, what, &bytes, &fds, half_close);
    }
    // COCO requests before negotiation: a raw connection that skips the handshake.
    let raw = sidecar.raw();
    send_bytes(&raw, &header(caps, 1, 0), &[]).expect("send");
    raw.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        transport::drain(&raw).expect("closed"),
        0,
        "COCO before negotiation"
    );
    let log = sidecar.log();
    for reason in [
        "version bits",
        "unknown bits",
        "exceeds the limit",
        "unknown request code",
    ] {
        assert!(
            log.contains(reason),
            "the log names the reason {reason:?}:\n{log}"
        );
    }
}

#[test]
fn a_stalled_half_message_is_dropped_after_the_io_timeout() {
    let (_dir, _blob, mut sidecar) = serving(3000, 9, &["--io-timeout-ms", "200"]);
    let vmm = sidecar.connect();
    send_bytes(
        vmm.stream(),
        &header(Request::CocoDone as u32, 1, 8)[..HEADER_SIZE],
        &[],
    )
    .expect("send");
    vmm.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        transport::drain(vmm.stream()).expect("closed by the sidecar"),
        0
    );
    assert!(sidecar.alive());
    assert!(
        sidecar.log().contains("not completed within"),
        "{}",
        sidecar.log()
    );
}

#[test]
fn refused_regions_get_an_errno_and_the_connection_lives_on() {
    let (_dir, _blob, sidecar) = serving(3000, 2, &[]);
    let mem = GuestMem::new(RAM, CANARY);
    let other = GuestMem::new(RAM, CANARY);
    let mut vmm = sidecar.connect();
    vmm.add_mem_region(&mem.region(0)).expect("first region");
    assert_eq!(
        rejected(vmm.add_mem_region(&other.region(RAM / 2))),
        libc::EEXIST,
        "overlap"
    );
    let mut big = other.region(4 * RAM);
    big.size = 2 * RAM;
    assert_eq!(
        rejected(vmm.add_mem_region(&big)),
        libc::EINVAL,
        "fd smaller than the region"
    );
    let mut odd = other.region(4 * RAM);
    odd.size = 100;
    assert_eq!(
        rejected(vmm.add_mem_region(&odd)),
        libc::EINVAL,
        "unaligned size"
    );
    // A file that can never be written: sealed against writes.
    let sealed = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("write-sealed")
        .expect("memfd");
    sealed.as_file().set_len(RAM).expect("size");
    sealed
        .add_seals(&[memfd::FileSeal::SealFutureWrite])
        .expect("seal");
    let mut region = other.region(8 * RAM);
    region.fd = std::os::fd::AsFd::as_fd(sealed.as_file());
    assert_eq!(
        rejected(vmm.add_mem_region(&region)),
        libc::EPERM,
        "a write seal"
    );
    // The same memfd opened read-only: not writable guest RAM.
    let read_only = std::fs::File::open(format!(
        "/proc/self/fd/{}",
        other.memfd.as_file().as_raw_fd()
    ))
    .expect("reopen");
    region.fd = std::os::fd::AsFd::as_fd(&read_only);
    assert_eq!(
        rejected(vmm.add_mem_region(&region)),
        libc::EBADF,
        "read-only"
    );
    // A file on the disk the tests run from: a write there could block on I/O.
    let disk = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).expect("file on disk");
    disk.set_len(RAM).expect("size");
    // SAFETY: statfs is a plain C struct; fstatfs writes it for the call.
    let on_tmpfs = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(disk.as_raw_fd(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    };
    region.fd = std::os::fd::AsFd::as_fd(&disk);
    if !on_tmpfs {
        assert_eq!(
            rejected(vmm.add_mem_region(&region)),
            libc::EPERM,
            "not tmpfs or hugetlbfs"
        );
    }
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let mut not_file = other.region(8 * RAM);
    not_file.fd = std::os::fd::AsFd::as_fd(&sock);
    assert_eq!(
        rejected(vmm.add_mem_region(&not_file)),
        libc::EBADF,
        "a socket is not memory"
    );
    assert_eq!(
        rejected(vmm.remove_mem_region(RegionDesc {
            guest_phys_addr: 4 * RAM,
            memory_size: RAM,
            ..Default::default()
        })),
        libc::ENOENT,
        "removing an unknown region"
    );
    // Still serving, from the one accepted region.
    assert_eq!(
        vmm.request_certs(Abi::CocoRfc, 0, 0, 1)
            .expect("request")
            .ret,
        CertsRet::Ok
    );
    // The same refusal without NEED_REPLY cannot be reported, so it closes the connection.
    let raw_vmm = sidecar.connect();
    let payload = wire::encode_mem_reg(&big.desc());
    let h = Header::request(Request::AddMemReg, payload.len(), false);
    transport::send_message(
        raw_vmm.stream(),
        &h,
        &payload,
        &[other.memfd.as_file().as_raw_fd()],
    )
    .expect("send");
    assert_eq!(transport::drain(raw_vmm.stream()).expect("closed"), 0);
}

/// The sidecar's open descriptors whose target `/proc` names `name` (a memfd shows as
/// `/memfd:NAME (deleted)`): the kernel's view of what it keeps.
fn descriptors_named(pid: u32, name: &str) -> usize {
    let want = format!("/memfd:{name} ");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd list")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&want))
        .count()
}

fn named_memfd(name: &str, size: u64) -> memfd::Memfd {
    let m = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create(name)
        .expect("memfd");
    m.as_file().set_len(size).expect("size");
    m
}

/// The refusals of protocol.md 5.4 not shown above: each alignment and overflow rule, an
/// overlap inside one SET_MEM_TABLE, F_SEAL_WRITE; a refused SET_MEM_TABLE changes nothing
/// (all or nothing); REM_MEM_REG closes a descriptor sent with it unused.
#[test]
fn every_region_rule_of_section_5_4_refuses_and_changes_nothing() {
    let (_dir, blob, sidecar) = serving(3000, 2, &[]);
    let table = std::fs::read(&blob).expect("blob");
    let a = GuestMem::new(RAM, CANARY);
    let b = GuestMem::new(4 * RAM, CANARY);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[a.region(0)]).expect("a at 0");
    let at = |gpa: u64, size: u64, offset: u64| coco_protocol::MemoryRegion {
        guest_phys_addr: gpa,
        size,
        mmap_offset: offset,
        userspace_addr: 0,
        fd: std::os::fd::AsFd::as_fd(b.memfd.as_file()),
    };
    let top = u64::MAX - (PAGE - 1); // the last page-aligned address
    for (what, region) in [
        ("unaligned guest_phys_addr", at(8 * RAM + 0x800, PAGE, 0)),
        ("unaligned mmap_offset", at(8 * RAM, PAGE, 0x800)),
        ("memory_size 0", at(8 * RAM, 0, 0)),
        (
            "guest_phys_addr + memory_size overflows",
            at(top, 2 * PAGE, 0),
        ),
        (
            "mmap_offset + memory_size overflows",
            at(8 * RAM, 2 * PAGE, top),
        ),
    ] {
        assert_eq!(
            rejected(vmm.add_mem_region(&region)),
            libc::EINVAL,
            "{what}"
        );
        assert_eq!(
            rejected(vmm.set_mem_table(&[at(12 * RAM, RAM, RAM), region])),
            libc::EINVAL,
            "{what}, second region of a SET_MEM_TABLE"
        );
    }
    assert_eq!(
        rejected(vmm.set_mem_table(&[at(8 * RAM, RAM, 0), at(8 * RAM + RAM / 2, RAM, RAM)])),
        libc::EEXIST,
        "an overlap inside one SET_MEM_TABLE"
    );
    let sealed = named_memfd("write-sealed", RAM);
    sealed
        .add_seals(&[memfd::FileSeal::SealWrite])
        .expect("F_SEAL_WRITE");
    let mut region = at(8 * RAM, RAM, 0);
    region.fd = std::os::fd::AsFd::as_fd(sealed.as_file());
    assert_eq!(
        rejected(vmm.add_mem_region(&region)),
        libc::EPERM,
        "F_SEAL_WRITE"
    );
    // All or nothing: `a` is still the connection's only memory, served; `b` is not RAM.
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(a.read(0x1000, table.len()), table);
    vmm.done(r.lease).expect("done");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 8 * RAM, 1)
        .expect("request");
    assert_eq!(
        r.ret,
        CertsRet::Io,
        "no region of a refused table was added"
    );
    assert_untouched(&b);
    // An accepted table replaces every region.
    vmm.set_mem_table(&[at(8 * RAM, RAM, 0)]).expect("b");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Io, "a is gone");

    // REM_MEM_REG: a descriptor sent with it is closed unused, whether the region existed.
    let pid = sidecar.pid();
    let probe = named_memfd("rem-probe", RAM);
    let extra = named_memfd("rem-extra", RAM);
    let mut probe_region = at(16 * RAM, RAM, 0);
    probe_region.fd = std::os::fd::AsFd::as_fd(probe.as_file());
    vmm.add_mem_region(&probe_region).expect("probe region");
    assert_eq!(
        descriptors_named(pid, "rem-probe"),
        1,
        "a region keeps its file"
    );
    for (region, errno) in [
        (probe_region.desc(), 0),
        (at(32 * RAM, RAM, 0).desc(), libc::ENOENT),
    ] {
        let payload = wire::encode_mem_reg(&region);
        let h = Header::request(Request::RemMemReg, payload.len(), true);
        transport::send_message(vmm.stream(), &h, &payload, &[extra.as_file().as_raw_fd()])
            .expect("REM_MEM_REG");
        let ack = transport::MessageReader::new()
            .recv(vmm.stream())
            .expect("ack")
            .expect("not closed");
        assert_eq!(ack.payload, (errno as u64).to_le_bytes(), "errno {errno}");
        eventually("the sent descriptor is closed", || {
            descriptors_named(pid, "rem-extra") == 0
        });
    }
    eventually("the removed region's file is closed", || {
        descriptors_named(pid, "rem-probe") == 0
    });
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 8 * RAM, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok, "the connection lives on");
}

#[test]
fn unsealed_memory_is_served_and_shrinking_it_is_no_crash() {
    let dir = blob_dir();
    let table = table_of_size(3000, 2);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let mut sidecar = Sidecar::start(&blob, &[]);
    let unsealed = memfd::MemfdOptions::default()
        .create("unsealed")
        .expect("memfd");
    unsealed.as_file().set_len(RAM).expect("size");
    let mut vmm = sidecar.connect();
    vmm.add_mem_region(&coco_protocol::MemoryRegion {
        guest_phys_addr: 0,
        size: RAM,
        mmap_offset: 0,
        userspace_addr: 0,
        fd: std::os::fd::AsFd::as_fd(unsealed.as_file()),
    })
    .expect("unsealed memory is accepted: writes cannot fault");
    assert_eq!(
        vmm.request_certs(Abi::CocoRfc, 0, 0, 1)
            .expect("request")
            .ret,
        CertsRet::Ok
    );
    // Shrunk to nothing under the sidecar: the next table is written with pwrite, which puts
    // it back where the region says, instead of faulting on a page past the end.
    unsealed.as_file().set_len(0).expect("shrink");
    assert_eq!(
        vmm.request_certs(Abi::CocoRfc, 0, 0x2000, 1)
            .expect("request")
            .ret,
        CertsRet::Ok
    );
    let mut got = vec![0u8; table.len()];
    std::os::unix::fs::FileExt::read_exact_at(unsealed.as_file(), &mut got, 0x2000).expect("read");
    assert_eq!(got, table);
    assert!(sidecar.alive());
}

#[test]
fn memory_added_and_removed_at_runtime() {
    let dir = blob_dir();
    let table = table_of_size(6000, 3);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, &[]);
    let a = GuestMem::new(RAM, CANARY);
    let b = GuestMem::new(RAM, CANARY);
    let mut vmm = sidecar.connect();
    assert_eq!(vmm.max_mem_slots().expect("slots"), 32);
    let probe = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0, 2)
        .expect("request");
    assert_eq!(probe.ret, CertsRet::Io, "no memory yet");
    vmm.add_mem_region(&a.region(0)).expect("add a");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x3000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(a.read(0x3000, table.len()), table);
    vmm.add_mem_region(&b.region(4 * RAM)).expect("add b");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 4 * RAM + 0x5000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(b.read(0x5000, table.len()), table);
    vmm.remove_mem_region(a.region(0).desc()).expect("remove a");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x7000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Io, "a is gone");
    assert_eq!(a.read(0x7000, 1), [CANARY]);
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 4 * RAM + 0x9000, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok, "b still served");
    // A buffer spanning two adjacent regions is one contiguous range of RAM.
    vmm.add_mem_region(&a.region(3 * RAM))
        .expect("re-add a just below b");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 4 * RAM - PAGE, 2)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    let mut got = a.read(RAM - PAGE, PAGE as usize);
    got.extend(b.read(0, table.len() - PAGE as usize));
    assert_eq!(
        got[..table.len()],
        table[..],
        "the table spans both regions"
    );
}

/// A DONE without NEED_REPLY and the ADD_MEM_REG after it are on their way together, as when
/// a VMM releases a lease and hot-plugs memory at once: the sidecar reads ahead, and the
/// region's descriptor must still go to ADD_MEM_REG, not to the DONE read with it.
#[test]
fn pipelined_messages_keep_their_own_descriptors() {
    let (_dir, blob, sidecar) = serving(6000, 4, &[]);
    let (mem, mut vmm) = with_ram(&sidecar);
    let table = std::fs::read(&blob).expect("blob");
    let hot = GuestMem::new(RAM, CANARY);
    for round in 0..20u64 {
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 0, 0x2000, 2)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok);
        assert_ne!(r.lease, 0);
        let gpa = (8 + round) * RAM;
        let stream = vmm.stream();
        transport::send_message(
            stream,
            &Header::request(Request::CocoDone, 8, false),
            &r.lease.to_le_bytes(),
            &[],
        )
        .expect("DONE");
        let reg = wire::encode_mem_reg(&hot.region(gpa).desc());
        transport::send_message(
            stream,
            &Header::request(Request::AddMemReg, reg.len(), true),
            &reg,
            &[hot.memfd.as_file().as_raw_fd()],
        )
        .expect("ADD_MEM_REG");
        let ack = transport::MessageReader::new()
            .recv(stream)
            .expect("ack")
            .expect("not closed");
        assert_eq!(ack.header.request, Request::AddMemReg as u32);
        assert_eq!(
            ack.payload,
            0u64.to_le_bytes(),
            "round {round}: region accepted"
        );
        assert!(
            exclusive_lock_free(&blob),
            "round {round}: DONE released the lease"
        );
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 1, gpa + 0x1000, 2)
            .expect("request");
        assert_eq!(
            r.ret,
            CertsRet::Ok,
            "round {round}: served into the new region"
        );
        assert_eq!(hot.read(0x1000, table.len()), table);
        vmm.done(r.lease).expect("done");
        vmm.remove_mem_region(hot.region(gpa).desc())
            .expect("remove");
    }
    assert_eq!(mem.read(0x2000, table.len()), table);
}

/// Where the blob path cannot be watched (here: no inotify instance may be made, as when a
/// node's sidecars have used up their user's `fs.inotify.max_user_instances`), the sidecar
/// says so once and checks the path on every request: updates are still seen at once.
#[test]
fn without_inotify_every_request_checks_the_path() {
    let Some(no_inotify) =
        coco_tests::without_inotify("without_inotify_every_request_checks_the_path")
    else {
        return;
    };
    let dir = blob_dir();
    let a = table_of_size(3000, 5);
    let b = table_of_size(3000, 6);
    let blob = write_blob(dir.path(), "certs.bin", &a);
    let sidecar = Sidecar::start_wrapped(&no_inotify, &blob, &["--metrics", "127.0.0.1:0"]);
    let (mem, mut vmm) = with_ram(&sidecar);
    let mut fetch = |vcpu: u32| {
        let r = vmm
            .request_certs(Abi::SnpReqCerts, vcpu, 0x1000, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok);
        vmm.done(r.lease).expect("done");
        mem.read(0x1000, a.len())
    };
    assert_eq!(fetch(0), a);
    let staged = write_blob(dir.path(), "certs.new", &b);
    std::fs::rename(&staged, &blob).expect("rename over");
    assert_eq!(fetch(1), b, "the first request after the rename");
    std::fs::write(&blob, &a).expect("rewrite in place, same size");
    assert_eq!(fetch(2), a, "an in-place rewrite within the same second");
    let log = sidecar.log();
    assert_eq!(
        log.matches("not watching the blob path").count(),
        1,
        "said once:\n{log}"
    );
    let metrics = http_get(metrics_addr(&sidecar), "/metrics").body;
    for line in [
        "coco_sidecar_blob_watched 0",
        "coco_sidecar_blob_path_checks_total 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} in:\n{metrics}"
        );
    }
}

#[test]
fn two_connections_with_different_memory_are_isolated() {
    let dir = blob_dir();
    let table = table_of_size(6000, 4);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, &[]);
    let socket = sidecar.socket.clone();
    let run = |gpa_base: u64, vcpu: u32| {
        let socket = socket.clone();
        let table = table.clone();
        thread::spawn(move || {
            let mem = GuestMem::new(RAM, CANARY);
            let mut vmm = coco_protocol::Frontend::connect(&socket).expect("connect");
            vmm.set_mem_table(&[mem.region(gpa_base)]).expect("memory");
            for i in 0..200u64 {
                let gpa = gpa_base + (i % 8) * 4 * PAGE;
                let r = vmm
                    .request_certs(Abi::ALL[i as usize % 2], vcpu, gpa, 2)
                    .expect("request");
                assert_eq!(r.ret, CertsRet::Ok);
                assert_eq!(mem.read(gpa - gpa_base, table.len()), table);
                vmm.done(r.lease).expect("done");
            }
            // The other connection's RAM is not this one's.
            let foreign = if gpa_base == 0 { 16 * RAM } else { 0 };
            let r = vmm
                .request_certs(Abi::SnpReqCerts, vcpu, foreign, 2)
                .expect("request");
            assert_eq!(r.ret, CertsRet::Io);
        })
    };
    let (one, two) = (run(0, 0), run(16 * RAM, 1));
    one.join().expect("first connection");
    two.join().expect("second connection");
}

#[test]
fn sigterm_releases_locks_removes_the_socket_and_exits_zero() {
    let (_dir, blob, mut sidecar) = serving(3000, 5, &[]);
    let (_mem, mut vmm) = with_ram(&sidecar);
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert!(!exclusive_lock_free(&blob));
    let status = sidecar.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    assert!(!sidecar.socket.exists(), "socket removed");
    assert!(exclusive_lock_free(&blob), "lease released");
}

#[test]
fn a_second_sidecar_refuses_a_live_socket_and_replaces_a_stale_one() {
    let dir = blob_dir();
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 5));
    let mut first = Sidecar::start(&blob, &[]);
    let out = std::process::Command::new(coco_tests::sidecar_bin())
        .args(["serve", "--certs"])
        .arg(&blob)
        .arg("--socket")
        .arg(&first.socket)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    // SIGKILL leaves the socket file behind; the next sidecar replaces it.
    let socket = first.socket.clone();
    first.signal_and_wait(libc::SIGKILL);
    assert!(socket.exists(), "a killed sidecar leaves its socket file");
    let dir2 = tempfile::tempdir().expect("tempdir");
    let second = Sidecar::start_at(dir2, socket.clone(), &blob, &[]);
    assert_eq!(second.connect().caps().expect("caps").coco_subtypes, 1);
    assert!(
        second.log().contains("removing stale socket"),
        "{}",
        second.log()
    );
}
