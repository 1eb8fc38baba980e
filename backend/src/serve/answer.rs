//! Answering one certificate-request exit record: the semantics of docs/protocol.md,
//! "Answering a certificate request".

use std::sync::Arc;
use std::time::Instant;

use coco_protocol::exit::{self, Abi, CertsRet, RecordError, PAGE_SIZE};
use coco_protocol::table::{pages_for, EMPTY_TABLE};
use coco_protocol::wire::ExitMsg;
use log::{debug, warn};

use super::eagain::EagainBound;
use super::lease::Leases;
use super::memory::GuestRam;
use crate::blob::{self, BlobStore, Fetch};

/// Answers `msg`: the reply's record carries ret (and npages for ENOSPC); `status` is non-zero
/// when the record was not a certificate request this sidecar serves. `eagain` is the
/// connection's run of EAGAIN for the blob.
pub fn answer(
    msg: ExitMsg,
    store: &BlobStore,
    ram: &GuestRam,
    leases: &mut Leases,
    eagain: &mut EagainBound,
) -> ExitMsg {
    let mut reply = ExitMsg {
        status: 0,
        lease: 0,
        ..msg
    };
    // A vCPU asks again only once its previous request has gone to firmware, so that request's
    // lease ends here, whatever this one's answer (protocol.md 6.2).
    leases.release_vcpu(reply.vcpu);
    let Some(abi) = Abi::from_tag(reply.abi) else {
        warn!("vcpu {}: unknown record ABI tag {}", reply.vcpu, reply.abi);
        reply.status = libc::ENOTSUP as u32;
        return reply;
    };
    let request = match exit::decode_request(abi, &reply.record) {
        Ok(r) => r,
        Err(e @ RecordError::Size { .. }) => {
            warn!("vcpu {}: {e}", reply.vcpu);
            reply.status = libc::EINVAL as u32;
            return reply;
        }
        Err(e @ RecordError::SubType(_)) => {
            warn!("vcpu {}: {e}", reply.vcpu);
            reply.status = libc::ENOTSUP as u32;
            return reply;
        }
        Err(e @ RecordError::Gfn(_)) => {
            warn!("vcpu {}: {e}; answering EIO", reply.vcpu);
            exit::encode_answer(abi, &mut reply.record, CertsRet::Io, None);
            return reply;
        }
    };
    let (ret, npages, lease) = serve(request, store, ram, leases, eagain, reply.vcpu);
    exit::encode_answer(abi, &mut reply.record, ret, npages);
    reply.lease = lease;
    debug!(
        "vcpu {} {:?} gpa {:#x} npages {} -> ret {:?}{} lease {}",
        reply.vcpu,
        abi,
        request.gpa,
        request.npages,
        ret,
        npages.map(|n| format!(" npages {n}")).unwrap_or_default(),
        lease
    );
    reply
}

fn serve(
    req: exit::CertsRequest,
    store: &BlobStore,
    ram: &GuestRam,
    leases: &mut Leases,
    eagain: &mut EagainBound,
    vcpu: u32,
) -> (CertsRet, Option<u64>, u64) {
    let buf_len = req
        .npages
        .checked_mul(PAGE_SIZE)
        .filter(|len| req.gpa.checked_add(*len).is_some());
    let Some(buf_len) = buf_len.filter(|_| req.gpa % PAGE_SIZE == 0) else {
        warn!(
            "vcpu {vcpu}: buffer gpa {:#x} npages {} is unaligned or overflows; answering EIO",
            req.gpa, req.npages
        );
        return (CertsRet::Io, None, 0);
    };
    if !leases.has_room() {
        warn!("vcpu {vcpu}: this connection already holds its maximum of leases; answering EAGAIN");
        return (CertsRet::Again, None, 0);
    }
    let (bytes, lock) = match store.fetch() {
        Fetch::Table { bytes, lock } => {
            eagain.servable();
            (bytes, lock)
        }
        Fetch::Again(why) => {
            if !eagain.unservable(&why, Instant::now()) {
                debug!("vcpu {vcpu}: EAGAIN: {why}");
                return (CertsRet::Again, None, 0);
            }
            debug!("vcpu {vcpu}: the empty table, EAGAIN lasted --max-eagain-ms: {why}");
            (Arc::from(&EMPTY_TABLE[..]), None)
        }
        Fetch::Io(why) => {
            warn!("vcpu {vcpu}: EIO: {why}");
            return (CertsRet::Io, None, 0);
        }
    };
    if bytes.len() as u64 > buf_len {
        blob::warn_if_too_large_for_linux(bytes.len());
        return (CertsRet::NoSpace, Some(pages_for(bytes.len())), 0);
    }
    if let Err(e) = ram.write(req.gpa, buf_len, &bytes) {
        // Guest RAM that cannot take the bytes now (a full tmpfs, no free huge page) can later;
        // a buffer that is not guest RAM never will.
        let ret = if e.retryable() {
            CertsRet::Again
        } else {
            CertsRet::Io
        };
        warn!("vcpu {vcpu}: {e}; answering {ret:?}");
        return (ret, None, 0);
    }
    let lease = lock.map_or(0, |file| leases.grant(vcpu, file, Instant::now()));
    (CertsRet::Ok, None, lease)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use coco_protocol::exit::{build_request, read_answer};

    use super::*;
    use crate::MissingCerts;

    /// A request for a blob that does not exist, under each `--missing-certs`.
    fn missing(policy: MissingCerts, ram: &GuestRam) -> (u64, u64, u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::new(dir.path().join("absent"), Duration::ZERO, policy);
        let mut leases = Leases::new(4, Duration::from_secs(5));
        let mut eagain = EagainBound::new(1, Duration::from_secs(30));
        let msg = ExitMsg {
            abi: Abi::SnpReqCerts.tag(),
            vcpu: 3,
            status: 0,
            lease: 0,
            record: build_request(Abi::SnpReqCerts, 0, 1),
        };
        let reply = answer(msg, &store, ram, &mut leases, &mut eagain);
        assert_eq!((reply.abi, reply.vcpu, reply.status), (2, 3, 0));
        let (ret, npages) = read_answer(Abi::SnpReqCerts, &reply.record).expect("answer");
        (ret, npages, reply.lease)
    }

    #[test]
    fn a_missing_blob_is_answered_per_policy() {
        let memfd = memfd::MemfdOptions::default()
            .create("guest")
            .expect("memfd")
            .into_file();
        memfd.set_len(PAGE_SIZE).expect("size");
        let mut ram = GuestRam::new();
        let desc = coco_protocol::wire::RegionDesc {
            guest_phys_addr: 0,
            memory_size: PAGE_SIZE,
            userspace_addr: 0,
            mmap_offset: 0,
        };
        // Poisoned, to see the empty table land.
        std::os::unix::fs::FileExt::write_all_at(&memfd, &[0xa5; 64], 0).expect("poison");
        ram.add(&desc, memfd.try_clone().expect("dup").into())
            .expect("region");
        assert_eq!(
            missing(MissingCerts::Again, &ram),
            (CertsRet::Again as u64, 1, 0)
        );
        assert_eq!(missing(MissingCerts::Io, &ram), (CertsRet::Io as u64, 1, 0));
        // The empty table, and no lease: there is no file to lock.
        assert_eq!(missing(MissingCerts::Empty, &ram), (0, 1, 0));
        let mut head = [0; 64];
        std::os::unix::fs::FileExt::read_exact_at(&memfd, &mut head, 0).expect("read");
        assert_eq!(head[..EMPTY_TABLE.len()], EMPTY_TABLE);
        assert!(head[EMPTY_TABLE.len()..].iter().all(|b| *b == 0xa5));
    }
}
