//! End-to-end fault tests: the sidecar killed with SIGKILL while it holds a lease, and peers
//! that stall or trickle a message while others must still be served.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::transport::send_bytes;
use coco_protocol::wire::{Header, Request, HEADER_SIZE};
use coco_protocol::CertsRet;
use coco_tests::{exclusive_lock_free, sidecar_bin, table_of_size, write_blob, GuestMem, Sidecar};

const RAM: u64 = 1 << 20;

/// `coco-sidecar blob lock --wait-ms WAIT BLOB -- cp NEW BLOB`: an updater rewriting the blob
/// in place under the exclusive OFD lock. Returns its exit code (124: lock busy).
fn updater_copies(blob: &std::path::Path, new: &std::path::Path, wait_ms: u64) -> i32 {
    Command::new(sidecar_bin())
        .args(["blob", "lock", "--wait-ms", &wait_ms.to_string()])
        .arg(blob)
        .arg("--")
        .arg("cp")
        .arg(new)
        .arg(blob)
        .status()
        .expect("run blob lock")
        .code()
        .expect("exit code")
}

#[test]
fn sigkill_mid_lease_releases_the_lock_and_an_updater_proceeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = table_of_size(3000, 1);
    let new = table_of_size(4000, 2);
    let blob = write_blob(dir.path(), "certs.bin", &old);
    let new_path = write_blob(dir.path(), "new.bin", &new);
    let mut sidecar = Sidecar::start(&blob, &["--lease-timeout-ms", "60000"]);
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_ne!(r.lease, 0);

    // The lease blocks the updater: its bounded wait runs out (124 = lock busy).
    assert!(!exclusive_lock_free(&blob));
    assert_eq!(updater_copies(&blob, &new_path, 200), 124);
    assert_eq!(std::fs::read(&blob).expect("read"), old);

    // SIGKILL: no handler runs, no DONE, no cleanup code. The kernel closes the open file
    // description, and with it the OFD lock.
    let status = sidecar.signal_and_wait(libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(exclusive_lock_free(&blob), "the lock died with the process");
    assert_eq!(
        updater_copies(&blob, &new_path, 200),
        0,
        "the updater proceeds"
    );
    assert_eq!(std::fs::read(&blob).expect("read"), new);

    // The frontend sees its connection gone; a restarted sidecar replaces the stale socket
    // and serves the new blob.
    assert!(vmm.caps().is_err());
    let socket = sidecar.socket.clone();
    let restarted = Sidecar::start_at(
        tempfile::tempdir().expect("tempdir"),
        socket.clone(),
        &blob,
        &[],
    );
    assert!(restarted.log().contains("removing stale socket"));
    let mut vmm = restarted.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x1000, new.len()), new);
}

/// Whether the sidecar closed `s` (end of stream) without blocking; false while it is open.
fn closed_by_peer(s: &UnixStream) -> bool {
    s.set_nonblocking(true).expect("nonblocking");
    let mut b = [0u8; 16];
    let mut reader = s;
    let r = reader.read(&mut b);
    s.set_nonblocking(false).expect("blocking");
    match r {
        Ok(0) => true,
        Ok(n) => panic!("unexpected {n} bytes"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("read: {e}"),
    }
}

#[test]
fn a_stalled_half_message_does_not_stop_others_and_is_dropped_after_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 3);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let timeout = Duration::from_millis(2000);
    let sidecar = Sidecar::start(&blob, &["--io-timeout-ms", "2000"]);

    // Half a COCO_DONE header, then nothing.
    let staller = sidecar.connect();
    let started = Instant::now();
    send_bytes(
        staller.stream(),
        &Header::request(Request::CocoDone, 8, false).encode()[..HEADER_SIZE / 2],
        &[],
    )
    .expect("send");

    // Meanwhile another VMM is served, request after request, at full speed.
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let mut served = 0;
    while started.elapsed() < timeout / 2 {
        let r = vmm
            .request_certs(Abi::CocoRfc, served % 4, 0x1000, 1)
            .expect("request");
        assert_eq!(r.ret, CertsRet::Ok);
        vmm.done(r.lease).expect("done");
        served += 1;
    }
    assert!(served >= 10, "only {served} requests in {:?}", timeout / 2);
    assert_eq!(mem.read(0x1000, table.len()), table);
    assert!(
        !closed_by_peer(staller.stream()),
        "the staller is not dropped before its timeout"
    );

    // Then the staller is dropped, about one timeout after its first byte.
    staller
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let n = staller
        .stream()
        .read(&mut [0u8; 16])
        .expect("end of stream");
    let took = started.elapsed();
    assert_eq!(n, 0);
    assert!(
        took >= timeout - Duration::from_millis(100) && took < timeout * 3,
        "dropped after {took:?}"
    );
    assert!(sidecar.log().contains("not completed within"));
    // And the other VMM is still served.
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
}

#[test]
fn a_peer_trickling_a_message_is_dropped_after_the_timeout_of_the_whole_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 4));
    let sidecar = Sidecar::start(&blob, &["--io-timeout-ms", "1000"]);
    let trickler = sidecar.connect();
    // A 20-byte COCO_DONE, one byte every 300 ms: every single read is well within the
    // timeout, the whole message (6 s) is not.
    let mut msg = Header::request(Request::CocoDone, 8, false)
        .encode()
        .to_vec();
    msg.extend_from_slice(&77u64.to_le_bytes());
    let started = Instant::now();
    let mut dropped_after = None;
    for byte in &msg {
        if send_bytes(trickler.stream(), &[*byte], &[]).is_err()
            || closed_by_peer(trickler.stream())
        {
            dropped_after = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(300));
    }
    let took = dropped_after.expect("the trickler was never dropped");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "dropped after {took:?}"
    );
    assert!(sidecar.log().contains("not completed within"));
    // Others are unaffected.
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    assert_eq!(
        vmm.request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
            .expect("request")
            .ret,
        CertsRet::Ok
    );
}
