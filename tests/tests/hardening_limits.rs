//! End-to-end: every limit on what a peer controls, on both sides of the limit, through the
//! real binary (docs/protocol.md section 10): regions per connection and per SET_MEM_TABLE,
//! descriptors per message, payload size, exit record size, leases, connections.

use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::transport::{self, send_bytes};
use coco_protocol::wire::{self, Header, RegionDesc, Request};
use coco_protocol::{CertsRet, Frontend, FrontendError, MemoryRegion};
use coco_tests::{exclusive_lock_free, rejected, table_of_size, write_blob, GuestMem, Sidecar};

const PAGE: u64 = 4096;
const CANARY: u8 = 0x5a;

fn blob_sidecar(extra: &[&str]) -> (tempfile::TempDir, Vec<u8>, Sidecar) {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 7);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, extra);
    (dir, table, sidecar)
}

/// Region `i`: page `i` of `mem`, at guest address `i * 64 KiB`.
fn page_region(mem: &GuestMem, i: u64) -> MemoryRegion<'_> {
    MemoryRegion {
        guest_phys_addr: i * 0x1_0000,
        size: PAGE,
        mmap_offset: i * PAGE,
        userspace_addr: 0,
        fd: mem.memfd.as_file().as_fd(),
    }
}

/// Sends `bytes` with `fds` on a negotiated connection and checks that the sidecar closes it
/// without a reply and logs `reason`.
fn assert_dropped(sidecar: &Sidecar, bytes: &[u8], fds: &[i32], reason: &str) {
    let vmm = sidecar.connect();
    send_bytes(vmm.stream(), bytes, fds).expect("send");
    vmm.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(
        transport::drain(vmm.stream()).expect("closed"),
        0,
        "{reason}: no reply"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sidecar.log().contains(reason) {
        assert!(
            Instant::now() < deadline,
            "log names {reason:?}:\n{}",
            sidecar.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn header(request: Request, size: u32) -> Vec<u8> {
    Header {
        request: request as u32,
        flags: wire::VERSION,
        size,
    }
    .encode()
    .to_vec()
}

#[test]
fn thirty_two_regions_fit_and_the_33rd_gets_enospc() {
    let (_dir, table, sidecar) = blob_sidecar(&[]);
    let mem = GuestMem::new(40 * PAGE, CANARY);
    let mut vmm = sidecar.connect();
    assert_eq!(vmm.max_mem_slots().expect("slots"), 32);
    for i in 0..32 {
        vmm.add_mem_region(&page_region(&mem, i))
            .unwrap_or_else(|e| panic!("region {i}: {e}"));
    }
    assert_eq!(
        rejected(vmm.add_mem_region(&page_region(&mem, 32))),
        libc::ENOSPC,
        "the 33rd region"
    );
    // The refusal changed nothing: region 31 serves, the 33rd's address is not RAM.
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 31 * 0x1_0000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(31 * PAGE, table.len()), table);
    assert_eq!(
        vmm.request_certs(Abi::SnpReqCerts, 1, 32 * 0x1_0000, 1)
            .expect("request")
            .ret,
        CertsRet::Io
    );
    assert_eq!(
        mem.read(32 * PAGE, PAGE as usize),
        vec![CANARY; PAGE as usize]
    );
    // Removing one makes room for one.
    vmm.remove_mem_region(page_region(&mem, 0).desc())
        .expect("remove");
    vmm.add_mem_region(&page_region(&mem, 32))
        .expect("room again");
    assert_eq!(
        rejected(vmm.add_mem_region(&page_region(&mem, 33))),
        libc::ENOSPC
    );
}

#[test]
fn set_mem_table_takes_eight_regions_and_descriptors_not_nine() {
    let (_dir, _table, sidecar) = blob_sidecar(&[]);
    let mem = GuestMem::new(16 * PAGE, CANARY);
    let mut vmm = sidecar.connect();
    let eight: Vec<MemoryRegion<'_>> = (0..8).map(|i| page_region(&mem, i)).collect();
    vmm.set_mem_table(&eight).expect("8 regions, 8 descriptors");
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 7 * 0x1_0000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);

    let fd = mem.memfd.as_file().as_raw_fd();
    let nine: Vec<RegionDesc> = (0..9).map(|i| page_region(&mem, i).desc()).collect();
    let payload = wire::encode_mem_table(&nine);
    assert_dropped(
        &sidecar,
        &[header(Request::SetMemTable, payload.len() as u32), payload].concat(),
        &[fd; 8],
        "9 regions, at most 8",
    );
    assert_dropped(
        &sidecar,
        &header(Request::GetFeatures, 0),
        &[fd; 9],
        "more than 8 file descriptors",
    );
}

#[test]
fn payloads_of_4096_bytes_are_read_and_larger_ones_refused_unread() {
    let (_dir, _table, sidecar) = blob_sidecar(&[]);
    // 4096 bytes: framing accepted, the payload read, then refused for its meaning.
    assert_dropped(
        &sidecar,
        &[header(Request::GetFeatures, 4096), vec![0; 4096]].concat(),
        &[],
        "payload is 4096 bytes, expected 0",
    );
    // 4097 bytes: refused from the header alone.
    assert_dropped(
        &sidecar,
        &header(Request::GetFeatures, 4097),
        &[],
        "payload size 4097 exceeds the limit of 4096",
    );
}

#[test]
fn exit_records_of_64_bytes_are_answered_and_larger_ones_refused() {
    let (_dir, _table, sidecar) = blob_sidecar(&[]);
    let mut vmm = sidecar.connect();
    // 64 bytes is a legal record size; no ABI has it, so the reply says EINVAL and returns
    // the record untouched, and the connection lives on.
    let record: Vec<u8> = (0..64).collect();
    let reply = vmm
        .forward_exit(Abi::SnpReqCerts.tag(), 0, &record)
        .expect("reply");
    assert_eq!(reply.status, libc::EINVAL as u32);
    assert_eq!(reply.record, record);
    assert_eq!(vmm.caps().expect("still connected").abis, 0x6);

    let mut payload = vec![0u8; 24 + 65];
    payload[8..12].copy_from_slice(&65u32.to_le_bytes());
    assert_dropped(
        &sidecar,
        &[header(Request::CocoExit, payload.len() as u32), payload].concat(),
        &[],
        "record size 65 exceeds 64",
    );
}

#[test]
fn sixty_four_leases_are_granted_and_the_65th_gets_eagain() {
    let (dir, table, sidecar) = blob_sidecar(&[]);
    let blob = dir.path().join("certs.bin");
    let mem = GuestMem::new(1 << 20, CANARY);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    assert_eq!(vmm.caps().expect("caps").max_leases, 64);
    let mut leases = Vec::new();
    for vcpu in 0..64 {
        let r = vmm
            .request_certs(Abi::SnpReqCerts, vcpu, 0x1000, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok, "vcpu {vcpu}");
        leases.push(r.lease);
    }
    let mut distinct = leases.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 64, "64 distinct leases");

    // The 65th vCPU: EAGAIN, nothing written.
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 64, 0x8_0000, 1)
        .expect("request");
    assert_eq!((r.ret, r.lease), (CertsRet::Again, 0));
    assert_eq!(
        mem.read(0x8_0000, PAGE as usize),
        vec![CANARY; PAGE as usize]
    );
    // A vCPU that holds a lease may ask again: its old lease is released first.
    let again = vmm
        .request_certs(Abi::SnpReqCerts, 5, 0x1000, 1)
        .expect("request");
    assert_eq!(again.ret, CertsRet::Ok);
    // One DONE makes room for the 65th.
    vmm.done(leases[0]).expect("done");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 64, 0x8_0000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x8_0000, table.len()), table);
    assert!(!exclusive_lock_free(&blob));
    drop(vmm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exclusive_lock_free(&blob) {
        assert!(Instant::now() < deadline, "closing releases all 64 leases");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the sidecar closed `s`: end of stream (or a reset) within `within`.
fn closed_within(s: &std::os::unix::net::UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    match transport::drain(s) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn sixteen_vmms_hold_memory_the_17th_gets_ebusy_and_newcomers_displace_idle_peers() {
    let (_dir, _table, sidecar) = blob_sidecar(&[]);
    let mem = GuestMem::new(16 * PAGE, CANARY);
    // Let the harness's readiness probe finish, so that it does not hold a slot.
    std::thread::sleep(Duration::from_millis(200));
    let mut vmms: Vec<Frontend> = (0..16).map(|_| sidecar.connect()).collect();
    for (i, v) in vmms.iter_mut().enumerate() {
        v.add_mem_region(&page_region(&mem, i as u64))
            .unwrap_or_else(|e| panic!("vmm {i}: {e}"));
    }
    // A 17th connects and negotiates (a spare slot), but may not hold memory.
    let mut extra = sidecar.connect();
    assert_eq!(extra.caps().expect("served").abis, 0x6);
    assert_eq!(
        rejected(extra.add_mem_region(&page_region(&mem, 0))),
        libc::EBUSY,
        "a 17th connection with memory"
    );
    // Three more spare slots, taken by peers that never send a byte; then four newcomers:
    // each takes the slot of the idlest of those that said nothing (the oldest silent peer
    // first), never a VMM's, nor the negotiated 17th.
    let silent: Vec<_> = (0..3).map(|_| sidecar.raw()).collect();
    std::thread::sleep(Duration::from_millis(50));
    let newcomers: Vec<_> = (0..3).map(|_| sidecar.raw()).collect();
    for (i, s) in silent.iter().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "silent peer {i} made room"
        );
    }
    let log = sidecar.log();
    assert!(log.contains("closed to make room for connection"), "{log}");
    for v in &mut vmms {
        assert_eq!(v.caps().expect("VMMs are never displaced").abis, 0x6);
    }
    assert_eq!(extra.caps().expect("still served").abis, 0x6);
    drop(newcomers);
    // A VMM leaves: its slot is free at once, and the 17th may now hold memory.
    vmms.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match extra.add_mem_region(&page_region(&mem, 15)) {
            Ok(()) => break,
            Err(FrontendError::Rejected { errno, .. }) if errno as i32 == libc::EBUSY => {}
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "the slot was not freed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = extra
        .request_certs(Abi::SnpReqCerts, 0, 15 * 0x1_0000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
}

#[test]
fn a_peer_that_does_not_complete_the_handshake_in_time_is_closed() {
    let (_dir, _table, sidecar) = blob_sidecar(&["--handshake-timeout-ms", "500"]);
    let started = Instant::now();
    // Silent, and one that keeps sending GET_FEATURES but never SET_PROTOCOL_FEATURES.
    let silent = sidecar.raw();
    let chatty = sidecar.raw();
    let keep_alive = std::thread::spawn(move || {
        let header = Header::request(Request::GetFeatures, 0, false).encode();
        let mut sent = 0;
        while send_bytes(&chatty, &header, &[]).is_ok() && sent < 100 {
            let mut reply = [0u8; wire::HEADER_SIZE + 8];
            if std::io::Read::read_exact(&mut &chatty, &mut reply).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        sent
    });
    assert!(closed_within(&silent, Duration::from_secs(10)));
    let took = started.elapsed();
    let sent = keep_alive.join().expect("keep-alive");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert!(
        sent < 20,
        "the keep-alive peer was closed too, after {sent} messages"
    );
    assert!(
        sidecar.log().contains("no handshake within 500ms"),
        "{}",
        sidecar.log()
    );
    // A negotiated connection may stay idle past it.
    let mut vmm = sidecar.connect();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(vmm.caps().expect("still served").abis, 0x6);
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').expect("comm").1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn out_of_descriptors_means_eagain_and_a_paused_accept_loop_then_recovery() {
    let (dir, table, sidecar) = blob_sidecar(&["--lease-timeout-ms", "60000"]);
    let blob = dir.path().join("certs.bin");
    assert!(
        sidecar.log().contains("descriptor limit"),
        "{}",
        sidecar.log()
    );
    let mem = GuestMem::new(1 << 20, CANARY);
    let mut a = sidecar.connect();
    a.set_mem_table(&[mem.region(0)]).expect("memory");
    // Squeeze the running sidecar so that no new descriptor fits (a new one must be numbered
    // below the limit; 0 to 2 are taken), while those it has stay open.
    // Only the soft limit moves: raising a hard limit needs CAP_SYS_RESOURCE.
    let set_limit = |n: u64| {
        let pid = sidecar.pid() as libc::pid_t;
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit with a null new limit only writes the current one into `old`.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
        let lim = libc::rlimit {
            rlim_cur: n.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: prlimit reads `lim` for the call and writes nothing (old is null).
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    set_limit(3);

    // The blob is replaced by a rename, so the next request must open it anew, which fails:
    // the request gets EAGAIN (which the guest retries), never EIO.
    let replacement = dir.path().join("certs.new");
    std::fs::write(&replacement, &table).expect("write");
    std::fs::rename(&replacement, &blob).expect("rename");
    for vcpu in 0..4 {
        let r = a
            .request_certs(Abi::SnpReqCerts, vcpu, 0x1000, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Again, "vcpu {vcpu} without descriptors");
    }

    // A new connection cannot be accepted now; the accept loop pauses instead of spinning.
    let b = sidecar.raw();
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(sidecar.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(sidecar.pid()) - before;
    assert!(
        used < 30,
        "{used} ticks of CPU in 1 s while out of descriptors"
    );
    assert!(sidecar.log().contains("accept failed"), "{}", sidecar.log());

    // With descriptors back, the queued connection is served, and so are requests.
    set_limit(1024);
    b.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = Frontend::handshake(b).expect("the queued connection is served");
    b.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = b
        .request_certs(Abi::CocoRfc, 0, 0x4000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x4000, table.len()), table);
    b.done(r.lease).expect("done");
    assert!(exclusive_lock_free(&blob));
}
