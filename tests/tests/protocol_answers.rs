//! The points docs/protocol.md settles for an implementer who reads it alone (issue 15), each
//! asserted through the real binary: acknowledgements around SET_PROTOCOL_FEATURES, errnos of
//! refusals, what is and is not required of the handshake, which rule a region that breaks
//! several is refused for, the status order of COCO_EXIT, and which blobs are served.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use coco_protocol::exit::Abi;
use coco_protocol::table::{CertKind, Guid, EMPTY_TABLE, ENTRY_SIZE};
use coco_protocol::transport::{self, MessageReader};
use coco_protocol::wire::{
    self, Header, Request, F_PROTOCOL_FEATURES, PF_COCO, PF_CONFIGURE_MEM_SLOTS, PF_REPLY_ACK,
};
use coco_protocol::{CertsRet, FrontendError, MemoryRegion};
use coco_tests::{der_blob, rejected, table_of_size, write_blob, GuestMem, Sidecar};

const RAM: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A connection driven message by message, for what the Rust client never sends.
struct Raw {
    stream: UnixStream,
    reader: MessageReader,
}

impl Raw {
    fn connect(sidecar: &Sidecar) -> Raw {
        let stream = sidecar.raw();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Raw {
            stream,
            reader: MessageReader::new(),
        }
    }

    fn send(&self, request: Request, need_reply: bool, payload: &[u8], fds: &[RawFd]) {
        let h = Header::request(request, payload.len(), need_reply);
        transport::send_message(&self.stream, &h, payload, fds).expect("send");
    }

    /// The next message, which must be the reply to `request`, as a u64.
    fn reply_u64(&mut self, request: Request) -> u64 {
        let m = self
            .reader
            .recv(&self.stream)
            .expect("reply")
            .unwrap_or_else(|| panic!("closed instead of answering {request:?}"));
        assert!(m.header.is_reply(), "{request:?}: not a reply");
        assert_eq!(m.header.request, request as u32, "a reply to {request:?}");
        wire::decode_u64(request, &m.payload).expect("u64 reply")
    }

    /// Nothing was sent back since the last reply, and the connection lives: the next message
    /// is the answer to a GET_FEATURES sent now.
    fn assert_silent_and_alive(&mut self, what: &str) {
        self.send(Request::GetFeatures, false, &[], &[]);
        let m = self
            .reader
            .recv(&self.stream)
            .expect("reply")
            .unwrap_or_else(|| panic!("{what}: the connection was closed"));
        assert_eq!(
            (m.header.request, m.header.is_reply()),
            (Request::GetFeatures as u32, true),
            "{what}: something other than GET_FEATURES' reply came first"
        );
    }

    fn assert_closed(&mut self, what: &str) {
        assert!(!self.reader.has_buffered(), "{what}: a reply came");
        let n = transport::drain(&self.stream).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(n, 0, "{what}: bytes before the close");
    }

    fn set_protocol_features(&self, features: u64, need_reply: bool) {
        self.send(
            Request::SetProtocolFeatures,
            need_reply,
            &features.to_le_bytes(),
            &[],
        );
    }
}

fn sidecar(args: &[&str]) -> (tempfile::TempDir, Sidecar) {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 4));
    let sidecar = Sidecar::start(&blob, args);
    (dir, sidecar)
}

#[test]
fn set_protocol_features_that_enables_reply_ack_is_itself_acked() {
    let (_dir, sidecar) = sidecar(&[]);
    let mut c = Raw::connect(&sidecar);
    c.set_protocol_features(PF_COCO | PF_REPLY_ACK, true);
    assert_eq!(c.reply_u64(Request::SetProtocolFeatures), 0);
    c.assert_silent_and_alive("after the acked SET_PROTOCOL_FEATURES");

    // Without NEED_REPLY, or without REPLY_ACK in the value: no ack.
    for (features, need_reply) in [(PF_COCO | PF_REPLY_ACK, false), (PF_COCO, true)] {
        let mut c = Raw::connect(&sidecar);
        c.set_protocol_features(features, need_reply);
        c.assert_silent_and_alive(&format!("{features:#x}, NEED_REPLY {need_reply}"));
        c.send(Request::CocoGetCaps, false, &[], &[]);
        let caps = c.reader.recv(&c.stream).expect("caps").expect("open");
        assert_eq!(caps.header.request, Request::CocoGetCaps as u32);
    }
}

#[test]
fn set_features_with_bits_not_offered_is_einval_or_a_close() {
    let (_dir, sidecar) = sidecar(&[]);
    let mut c = Raw::connect(&sidecar);
    c.set_protocol_features(PF_COCO | PF_REPLY_ACK, false);
    let bad = (F_PROTOCOL_FEATURES | 1).to_le_bytes();
    c.send(Request::SetFeatures, true, &bad, &[]);
    assert_eq!(c.reply_u64(Request::SetFeatures), libc::EINVAL as u64);
    c.send(
        Request::SetFeatures,
        true,
        &F_PROTOCOL_FEATURES.to_le_bytes(),
        &[],
    );
    assert_eq!(c.reply_u64(Request::SetFeatures), 0, "offered bits, again");
    c.assert_silent_and_alive("after the refusal");

    // No ack can be sent: without NEED_REPLY, or with it but without REPLY_ACK.
    for (features, need_reply) in [(PF_COCO | PF_REPLY_ACK, false), (PF_COCO, true)] {
        let mut c = Raw::connect(&sidecar);
        c.set_protocol_features(features, false);
        c.send(Request::SetFeatures, need_reply, &bad, &[]);
        c.assert_closed(&format!("{features:#x}, NEED_REPLY {need_reply}"));
    }
}

#[test]
fn set_protocol_features_without_coco_closes_the_connection() {
    let (_dir, mut sidecar) = sidecar(&[]);
    for features in [0, PF_REPLY_ACK, PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS] {
        let mut c = Raw::connect(&sidecar);
        c.set_protocol_features(features, true);
        c.assert_closed(&format!("{features:#x}"));
    }
    assert!(sidecar.alive());
    assert!(sidecar.log().contains("do not include COCO"), "logged why");
}

#[test]
fn the_handshake_has_no_required_order_but_features_come_first() {
    let (_dir, sidecar) = sidecar(&[]);
    // A feature-gated request before SET_PROTOCOL_FEATURES closes the connection.
    for request in [
        Request::CocoGetCaps,
        Request::GetMaxMemSlots,
        Request::SetMemTable,
    ] {
        let mut c = Raw::connect(&sidecar);
        let payload = if request == Request::SetMemTable {
            vec![0u8; 8]
        } else {
            vec![]
        };
        c.send(request, false, &payload, &[]);
        c.assert_closed(&format!("{request:?} first"));
    }
    // SET_PROTOCOL_FEATURES first, with no GET before it; the rest in reverse, and again.
    let mut c = Raw::connect(&sidecar);
    c.set_protocol_features(PF_COCO | PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS, true);
    assert_eq!(c.reply_u64(Request::SetProtocolFeatures), 0);
    c.send(Request::CocoGetCaps, false, &[], &[]);
    let caps = c.reader.recv(&c.stream).expect("caps").expect("open");
    assert_eq!(caps.header.request, Request::CocoGetCaps as u32);
    for _ in 0..2 {
        c.send(Request::SetOwner, true, &[], &[]);
        assert_eq!(c.reply_u64(Request::SetOwner), 0);
        c.send(Request::GetProtocolFeatures, false, &[], &[]);
        assert_ne!(c.reply_u64(Request::GetProtocolFeatures) & PF_COCO, 0);
        c.send(
            Request::SetFeatures,
            true,
            &F_PROTOCOL_FEATURES.to_le_bytes(),
            &[],
        );
        assert_eq!(c.reply_u64(Request::SetFeatures), 0);
        c.send(Request::GetFeatures, false, &[], &[]);
        assert_eq!(c.reply_u64(Request::GetFeatures), F_PROTOCOL_FEATURES);
    }
    // And the connection serves.
    let mem = GuestMem::new(RAM, 0);
    let payload = wire::encode_mem_reg(&mem.region(0).desc());
    c.send(
        Request::AddMemReg,
        true,
        &payload,
        &[mem.memfd.as_file().as_raw_fd()],
    );
    assert_eq!(c.reply_u64(Request::AddMemReg), 0);
    // A second SET_PROTOCOL_FEATURES closes it.
    c.set_protocol_features(PF_COCO, false);
    c.assert_closed("a second SET_PROTOCOL_FEATURES");
}

#[test]
fn coco_done_of_an_unknown_lease_is_enoent_or_ignored_never_a_close() {
    let (_dir, sidecar) = sidecar(&[]);
    let lease = 77u64.to_le_bytes();
    let mut c = Raw::connect(&sidecar);
    c.set_protocol_features(PF_COCO | PF_REPLY_ACK, false);
    c.send(Request::CocoDone, true, &lease, &[]);
    assert_eq!(c.reply_u64(Request::CocoDone), libc::ENOENT as u64);
    c.send(Request::CocoDone, false, &lease, &[]);
    c.assert_silent_and_alive("REPLY_ACK, no NEED_REPLY");
    for need_reply in [true, false] {
        let mut c = Raw::connect(&sidecar);
        c.set_protocol_features(PF_COCO, false);
        c.send(Request::CocoDone, need_reply, &lease, &[]);
        c.assert_silent_and_alive(&format!("no REPLY_ACK, NEED_REPLY {need_reply}"));
    }
    // A lease another COCO_EXIT of its vCPU released is unknown too.
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let first = vmm
        .request_certs(Abi::SnpReqCerts, 3, 0x1000, 1)
        .expect("request");
    let second = vmm
        .request_certs(Abi::SnpReqCerts, 3, 0x1000, 1)
        .expect("request");
    assert!(first.lease != 0 && second.lease != 0);
    match vmm.done(first.lease) {
        Err(FrontendError::Rejected { errno, .. }) => assert_eq!(errno, libc::ENOENT as u64),
        other => panic!("DONE of a replaced lease: {other:?}"),
    }
    vmm.done(second.lease).expect("the current lease");
}

/// A file on the disk the tests run from (not tmpfs: refused with EPERM), of `len` bytes.
fn file_on_disk(len: u64) -> std::fs::File {
    let f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).expect("file on disk");
    f.set_len(len).expect("size");
    // SAFETY: statfs is a plain C struct; fstatfs writes it for the call.
    let kind = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        assert_eq!(libc::fstatfs(f.as_raw_fd(), &mut st), 0, "fstatfs");
        st.f_type
    };
    assert!(
        kind != libc::TMPFS_MAGIC && kind != libc::HUGETLBFS_MAGIC,
        "the tests must run from a directory on a disk filesystem"
    );
    f
}

#[test]
fn a_region_that_breaks_several_rules_gets_the_errno_of_the_first() {
    let (_dir, sidecar) = sidecar(&["--max-connections", "1"]);
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    let region = |gpa: u64, size: u64, offset: u64, fd| MemoryRegion {
        guest_phys_addr: gpa,
        size,
        mmap_offset: offset,
        userspace_addr: 0,
        fd,
    };
    let memfd = mem.memfd.as_file().as_fd();
    let disk = file_on_disk(RAM);
    let tiny_disk = file_on_disk(PAGE);
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let read_only = std::fs::File::open(format!("/proc/self/fd/{}", memfd.as_raw_fd()))
        .expect("read-only reopen");
    let sealed = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("sealed")
        .expect("memfd");
    sealed.as_file().set_len(PAGE).expect("size");
    sealed
        .add_seals(&[memfd::FileSeal::SealWrite])
        .expect("seal");

    // Another connection holds the one slot for memory: EBUSY before the region is looked at.
    let mut holder = sidecar.connect();
    holder.set_mem_table(&[mem.region(0)]).expect("holder");
    assert_eq!(
        rejected(vmm.add_mem_region(&region(0x800, 100, 0, devnull.as_fd()))),
        libc::EBUSY,
        "EBUSY and unaligned, and not a regular file"
    );
    drop(holder);
    // The holder's slot is freed when its connection thread has ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match vmm.add_mem_region(&region(0, RAM, 0, memfd)) {
            Ok(()) => break,
            Err(FrontendError::Rejected { errno, .. })
                if errno == libc::EBUSY as u64 && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("the first region once the holder is gone: {other:?}"),
        }
    }
    let cases = [
        (
            "unaligned, overlapping, not a regular file",
            region(0x800, PAGE, 0, devnull.as_fd()),
            libc::EINVAL,
        ),
        (
            "overflowing, on disk",
            region(u64::MAX - (PAGE - 1), 2 * PAGE, 0, disk.as_fd()),
            libc::EINVAL,
        ),
        (
            "overlapping, not a regular file",
            region(RAM / 2, RAM, 0, devnull.as_fd()),
            libc::EEXIST,
        ),
        (
            "overlapping, write-sealed and too small",
            region(0, 2 * PAGE, 0, sealed.as_file().as_fd()),
            libc::EEXIST,
        ),
        (
            "read-only, and too small",
            region(4 * RAM, 2 * RAM, 0, read_only.as_fd()),
            libc::EBADF,
        ),
        (
            "on disk, and too small",
            region(4 * RAM, RAM, 0, tiny_disk.as_fd()),
            libc::EPERM,
        ),
        (
            "too small, and write-sealed",
            region(4 * RAM, 2 * PAGE, 0, sealed.as_file().as_fd()),
            libc::EINVAL,
        ),
    ];
    for (what, r, errno) in &cases {
        assert_eq!(rejected(vmm.add_mem_region(r)), *errno, "{what}");
    }
    // In a SET_MEM_TABLE, the first refused region decides.
    assert_eq!(
        rejected(vmm.set_mem_table(&[
            region(8 * RAM, PAGE, 0, memfd),
            region(9 * RAM, PAGE, 0, disk.as_fd()),
            region(10 * RAM + 1, PAGE, 0, memfd),
        ])),
        libc::EPERM,
        "second region on disk, third unaligned"
    );
    // 32 regions: a 33rd that overlaps is EEXIST, one that does not is ENOSPC, even if its
    // descriptor is no memory at all.
    let pages = GuestMem::new(32 * PAGE, 0);
    let fd = pages.memfd.as_file().as_fd();
    let table: Vec<_> = (0..8)
        .map(|i| region(16 * RAM + i * PAGE, PAGE, i * PAGE, fd))
        .collect();
    vmm.set_mem_table(&table).expect("8 regions");
    for i in 8..32 {
        vmm.add_mem_region(&region(16 * RAM + i * PAGE, PAGE, i * PAGE, fd))
            .unwrap_or_else(|e| panic!("region {i}: {e}"));
    }
    assert_eq!(
        rejected(vmm.add_mem_region(&region(16 * RAM, PAGE, 0, fd))),
        libc::EEXIST,
        "a 33rd region that overlaps"
    );
    assert_eq!(
        rejected(vmm.add_mem_region(&region(0, PAGE, 0, devnull.as_fd()))),
        libc::ENOSPC,
        "a 33rd region on /dev/null"
    );
}

#[test]
fn exit_status_order_size_before_sub_type() {
    let (_dir, sidecar) = sidecar(&[]);
    let mut vmm = sidecar.connect();
    let mut not_certs = vec![0u8; 24];
    not_certs[0] = 1; // `nr` 1: a sub-type other than REQ_CERTS, in a record of the wrong size
    for (what, tag, record, status) in [
        ("unknown tag, wrong size", 7, vec![0u8; 5], libc::ENOTSUP),
        (
            "tag 1, wrong size, nr not REQ_CERTS",
            Abi::CocoRfc.tag(),
            not_certs.clone(),
            libc::EINVAL,
        ),
        (
            "tag 1, right size, nr not REQ_CERTS",
            Abi::CocoRfc.tag(),
            {
                let mut r = coco_protocol::exit::build_request(Abi::CocoRfc, 0, 1);
                r[0] = 1;
                r
            },
            libc::ENOTSUP,
        ),
        (
            "tag 2, wrong size",
            Abi::SnpReqCerts.tag(),
            vec![0u8; 32],
            libc::EINVAL,
        ),
    ] {
        let r = vmm.forward_exit(tag, 0, &record).expect("exit");
        assert_eq!(r.status, status as u32, "{what}");
        assert_eq!(r.record, record, "{what}: the record comes back unchanged");
        assert_eq!(r.lease, 0, "{what}");
    }
}

/// A table of entries `(guid, offset, data)` and the terminator, with `fill` in every byte
/// no entry's data covers: gaps are allowed, bytes after the last data are not.
fn table_with_gaps(entries: &[(Guid, usize, Vec<u8>)], fill: u8) -> Vec<u8> {
    let end = entries
        .iter()
        .map(|(_, at, d)| at + d.len())
        .max()
        .unwrap_or((entries.len() + 1) * ENTRY_SIZE);
    let mut t = vec![fill; end];
    for (i, (guid, at, data)) in entries.iter().enumerate() {
        let e = &mut t[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
        e[..16].copy_from_slice(&guid.0);
        e[16..20].copy_from_slice(&(*at as u32).to_le_bytes());
        e[20..24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        t[*at..at + data.len()].copy_from_slice(data);
    }
    let term = entries.len() * ENTRY_SIZE;
    t[term..term + ENTRY_SIZE].copy_from_slice(&EMPTY_TABLE);
    t
}

#[test]
fn unknown_guids_gaps_and_tables_without_vcek_are_served_byte_for_byte() {
    let unknown = Guid([0x5a; 16]);
    let header = 3 * ENTRY_SIZE;
    let ask = der_blob(300, 0x41);
    let cases = [
        (
            "an unknown GUID whose data is no DER, and a gap before the ASK",
            table_with_gaps(
                &[
                    (unknown, header, b"not DER".to_vec()),
                    (CertKind::Ask.guid(), header + 7 + 9, ask.clone()),
                ],
                0xee,
            ),
        ),
        (
            "data in the reverse order of the entries, and a gap before the first",
            table_with_gaps(
                &[
                    (CertKind::Ark.guid(), header + 40 + 300, der_blob(280, 0x52)),
                    (CertKind::Ask.guid(), header + 40, ask.clone()),
                ],
                0x77,
            ),
        ),
        ("the empty table as the blob", EMPTY_TABLE.to_vec()),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (what, table) in cases {
        let blob = write_blob(dir.path(), "certs.bin", &table);
        let sidecar = Sidecar::start(&blob, &[]);
        let mem = GuestMem::new(RAM, 0xa5);
        let mut vmm = sidecar.connect();
        vmm.set_mem_table(&[mem.region(0)]).expect("memory");
        let r = vmm
            .request_certs(Abi::SnpReqCerts, 0, PAGE, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok, "{what}");
        assert_eq!(mem.read(PAGE, table.len()), table, "{what}: byte for byte");
        assert_eq!(
            mem.read(PAGE + table.len() as u64, 1),
            vec![0xa5],
            "{what}: nothing past the table"
        );
        assert_ne!(r.lease, 0, "{what}: the blob file was locked");
        vmm.done(r.lease).expect("done");
    }
    // Bytes after the last entry's data are refused: EAGAIN, nothing written. (`serve` refuses
    // to start on such a blob, so it comes as an update.)
    let mut trailing = table_with_gaps(&[(unknown, 2 * ENTRY_SIZE, b"x".to_vec())], 0);
    trailing.push(0);
    let blob = write_blob(dir.path(), "trailing.bin", &EMPTY_TABLE);
    let sidecar = Sidecar::start(&blob, &[]);
    write_blob(dir.path(), "trailing.bin", &trailing);
    let mem = GuestMem::new(RAM, 0xa5);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, PAGE, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Again, "a byte after the last data");
    assert_eq!(mem.read(PAGE, 1), vec![0xa5]);
}
