//! One connection's protocol state and message handling, free of socket I/O so that it can be
//! driven and tested message by message.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use coco_protocol::exit::{Abi, COCO_SUBTYPE_REQ_CERTS};
use coco_protocol::wire::{
    Caps, FrontendRequest, Header, Request, WireError, F_PROTOCOL_FEATURES, MAX_MEM_SLOTS, PF_COCO,
    PF_COCO_LOCK_WAIT, PF_CONFIGURE_MEM_SLOTS, PF_REPLY_ACK, SUPPORTED_PROTOCOL_FEATURES,
};
use log::{info, warn};
use thiserror::Error;

use super::answer;
use super::eagain::EagainBound;
use super::lease::Leases;
use super::memory::{GuestRam, MemoryError};
use super::slots::{Progress, Slot};
use crate::blob::BlobStore;
use crate::config::Config;
use crate::metrics::Metrics;

/// What the transport does after a message.
#[derive(Debug)]
pub enum Outcome {
    /// Send this reply.
    Reply(Header, Vec<u8>),
    /// Nothing to send.
    Quiet,
    /// Close the connection; the reason is logged.
    Close(SessionError),
}

/// Why a message closes the connection (docs/protocol.md: the frontend broke the protocol,
/// or a request failed that it did not ask to hear about).
#[derive(Debug, Error)]
pub enum SessionError {
    /// The message is malformed: after it, the byte stream cannot be trusted.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A request that needs a protocol feature the handshake did not enable.
    #[error("{request:?} before the {feature} protocol feature was negotiated")]
    NotNegotiated {
        /// The request.
        request: Request,
        /// The feature it needs.
        feature: &'static str,
    },
    /// A second SET_PROTOCOL_FEATURES.
    #[error("SET_PROTOCOL_FEATURES sent twice")]
    Renegotiated,
    /// SET_PROTOCOL_FEATURES with bits GET_PROTOCOL_FEATURES did not offer.
    #[error("protocol features {0:#x} were not offered")]
    UnofferedProtocolFeatures(u64),
    /// SET_PROTOCOL_FEATURES without COCO (nothing but the handshake would be left to do).
    #[error("protocol features {0:#x} do not include COCO")]
    NoCoco(u64),
    /// A request refused on its meaning, sent without NEED_REPLY (or without REPLY_ACK), so
    /// that the frontend would not learn of the refusal.
    #[error("{request:?} refused without NEED_REPLY: {why}")]
    Refused {
        /// The request.
        request: Request,
        /// Why it was refused.
        #[source]
        why: Refusal,
    },
}

/// Why a request was refused on its meaning; each maps to the errno of its acknowledgement.
#[derive(Debug, Error)]
pub enum Refusal {
    /// `--max-connections` other connections hold guest memory or leases.
    #[error("--max-connections other connections hold guest memory or leases")]
    Busy,
    /// SET_FEATURES with bits GET_FEATURES did not offer.
    #[error("features {0:#x} were not offered")]
    UnofferedFeatures(u64),
    /// A memory region the sidecar cannot use.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

impl Refusal {
    /// The errno the acknowledgement carries (docs/protocol.md, 5.1 and 5.4).
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::Busy => libc::EBUSY,
            Refusal::UnofferedFeatures(_) => libc::EINVAL,
            Refusal::Memory(e) => e.errno(),
        }
    }
}

/// Per-connection state.
#[derive(Debug)]
pub struct Session {
    id: u64,
    store: Arc<BlobStore>,
    ram: GuestRam,
    leases: Leases,
    eagain: EagainBound,
    /// The COCO_GET_CAPS answer, from the configuration.
    caps: Caps,
    protocol_features: Option<u64>,
    metrics: Arc<Metrics>,
    /// Leases last added to the `leases_held` gauge.
    leases_reported: usize,
    /// The server's slot for this connection (none when driven on its own: tests, fuzzing).
    /// Last, so that memory and leases are gone when the slot is freed.
    slot: Option<Slot>,
}

impl Session {
    /// A fresh connection.
    pub fn new(id: u64, config: &Config, store: Arc<BlobStore>) -> Session {
        Session {
            id,
            store,
            ram: GuestRam::new(),
            leases: Leases::new(config.max_leases, config.lease_timeout),
            eagain: EagainBound::new(id, config.max_eagain),
            caps: Caps {
                abis: Abi::ALL.iter().fold(0, |bits, abi| bits | abi.cap_bit()),
                coco_subtypes: COCO_SUBTYPE_REQ_CERTS,
                max_leases: u32::try_from(config.max_leases).unwrap_or(u32::MAX),
                lease_timeout_ms: u32::try_from(config.lease_timeout.as_millis())
                    .unwrap_or(u32::MAX),
                lock_wait_ms: u32::try_from(config.lock_wait.as_millis()).unwrap_or(u32::MAX),
            },
            protocol_features: None,
            metrics: Arc::new(Metrics::new()),
            leases_reported: 0,
            slot: None,
        }
    }

    /// Takes part in the server's connection slots: holding memory or leases needs a pin.
    pub fn with_slot(mut self, slot: Slot) -> Session {
        self.slot = Some(slot);
        self
    }

    /// The connection's slot, if it has one.
    pub fn slot(&self) -> Option<&Slot> {
        self.slot.as_ref()
    }

    /// Whether the handshake is done (SET_PROTOCOL_FEATURES accepted).
    pub fn negotiated(&self) -> bool {
        self.protocol_features.is_some()
    }

    /// Before memory is added: a pin on the connection's slot. False when `--max-connections`
    /// other connections hold memory or leases.
    fn pin(&self) -> bool {
        self.slot.as_ref().is_none_or(Slot::pin)
    }

    /// Whether the connection holds guest memory or leases (then its slot is pinned).
    fn holds(&self) -> bool {
        !self.ram.is_empty() || !self.leases.is_empty()
    }

    /// Gives the pin back once neither memory nor leases are held.
    fn unpin_if_idle(&self) {
        if let Some(slot) = self.slot.as_ref().filter(|_| !self.holds()) {
            slot.unpin();
        }
    }

    /// After a message, for a connection holding neither memory nor leases: the pin back, and
    /// how far it has come (a pinned connection never gives way, so its path takes no lock).
    fn settle(&self) {
        if let Some(slot) = self.slot.as_ref().filter(|_| !self.holds()) {
            slot.settle(if self.negotiated() {
                Progress::Negotiated
            } else {
                Progress::Talking
            });
        }
    }

    /// Counts this connection's requests and leases in `metrics` (by default they go to a
    /// private set nobody reads).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Session {
        self.metrics = metrics;
        self
    }

    /// Brings the `leases_held` gauge in line with the leases this connection holds.
    fn report_leases(&mut self) {
        let held = self.leases.len();
        self.metrics
            .leases_changed(held as i64 - self.leases_reported as i64);
        self.leases_reported = held;
    }

    /// The earliest lease deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.leases.next_deadline()
    }

    /// Drops expired leases.
    pub fn expire(&mut self, now: Instant) {
        let expired = self.leases.expire(now);
        for (lease, vcpu) in &expired {
            warn!("connection {}: lease {lease} of vcpu {vcpu} timed out without COCO_DONE; lock released", self.id);
        }
        if !expired.is_empty() {
            self.metrics.lease_timeouts(expired.len());
            self.report_leases();
            self.unpin_if_idle();
        }
    }

    /// Leases held now.
    pub fn leases_held(&self) -> usize {
        self.leases.len()
    }

    fn has(&self, feature: u64) -> bool {
        self.protocol_features.is_some_and(|f| f & feature != 0)
    }

    fn ack(&self, header: &Header, request: Request, errno: i32) -> Outcome {
        if header.need_reply() && self.has(PF_REPLY_ACK) {
            Outcome::Reply(
                Header::reply(request, 8),
                (errno as u64).to_le_bytes().to_vec(),
            )
        } else {
            Outcome::Quiet
        }
    }

    /// A request that failed on its meaning: an error acknowledgement when the frontend asked
    /// for one, otherwise the connection is closed (the frontend would not learn of it).
    fn refuse(&self, header: &Header, request: Request, why: impl Into<Refusal>) -> Outcome {
        let why = why.into();
        if header.need_reply() && self.has(PF_REPLY_ACK) {
            warn!("connection {}: {request:?} refused: {why}", self.id);
            self.ack(header, request, why.errno())
        } else {
            Outcome::Close(SessionError::Refused { request, why })
        }
    }

    fn u64_reply(request: Request, value: u64) -> Outcome {
        Outcome::Reply(Header::reply(request, 8), value.to_le_bytes().to_vec())
    }

    /// Handles one received message.
    pub fn handle(&mut self, header: &Header, payload: &[u8], fds: Vec<OwnedFd>) -> Outcome {
        let outcome = self.dispatch(header, payload, fds);
        self.settle();
        outcome
    }

    fn dispatch(&mut self, header: &Header, payload: &[u8], fds: Vec<OwnedFd>) -> Outcome {
        let msg = match FrontendRequest::decode(header, payload, fds.len()) {
            Ok(m) => m,
            Err(e) => return Outcome::Close(e.into()),
        };
        let request = msg.request();
        let needs = match request {
            Request::GetFeatures | Request::SetFeatures | Request::SetOwner => None,
            Request::GetProtocolFeatures | Request::SetProtocolFeatures => None,
            Request::GetMaxMemSlots | Request::AddMemReg | Request::RemMemReg => {
                Some((PF_CONFIGURE_MEM_SLOTS, "CONFIGURE_MEM_SLOTS"))
            }
            Request::SetMemTable | Request::CocoGetCaps | Request::CocoExit | Request::CocoDone => {
                Some((PF_COCO, "COCO"))
            }
        };
        if let Some((feature, name)) = needs {
            if !self.has(feature) {
                return Outcome::Close(SessionError::NotNegotiated {
                    request,
                    feature: name,
                });
            }
        }
        let adds_memory = matches!(request, Request::SetMemTable | Request::AddMemReg);
        if adds_memory && !self.pin() {
            return self.refuse(header, request, Refusal::Busy);
        }
        match msg {
            FrontendRequest::GetFeatures => Self::u64_reply(request, F_PROTOCOL_FEATURES),
            FrontendRequest::SetFeatures(f) => {
                if f & !F_PROTOCOL_FEATURES != 0 {
                    return self.refuse(header, request, Refusal::UnofferedFeatures(f));
                }
                self.ack(header, request, 0)
            }
            FrontendRequest::SetOwner => self.ack(header, request, 0),
            FrontendRequest::GetProtocolFeatures => {
                Self::u64_reply(request, SUPPORTED_PROTOCOL_FEATURES)
            }
            FrontendRequest::SetProtocolFeatures(f) => {
                if self.protocol_features.is_some() {
                    return Outcome::Close(SessionError::Renegotiated);
                }
                if f & !SUPPORTED_PROTOCOL_FEATURES != 0 {
                    return Outcome::Close(SessionError::UnofferedProtocolFeatures(f));
                }
                // Without COCO nothing but the handshake would be left to do (protocol.md 5.1).
                if f & PF_COCO == 0 {
                    return Outcome::Close(SessionError::NoCoco(f));
                }
                self.protocol_features = Some(f);
                self.ack(header, request, 0)
            }
            FrontendRequest::GetMaxMemSlots => Self::u64_reply(request, MAX_MEM_SLOTS),
            FrontendRequest::SetMemTable(descs) => match self.ram.set_table(&descs, fds) {
                Ok(()) => {
                    info!(
                        "connection {}: memory table set, {} regions",
                        self.id,
                        descs.len()
                    );
                    self.ack(header, request, 0)
                }
                Err(e) => self.refuse(header, request, e),
            },
            FrontendRequest::AddMemReg(desc) => {
                let Some(fd) = fds.into_iter().next() else {
                    return Outcome::Close(
                        WireError::FdCount {
                            request,
                            got: 0,
                            want: "1",
                        }
                        .into(),
                    );
                };
                match self.ram.add(&desc, fd) {
                    Ok(()) => {
                        info!(
                            "connection {}: region added at {:#x}, {:#x} bytes",
                            self.id, desc.guest_phys_addr, desc.memory_size
                        );
                        self.ack(header, request, 0)
                    }
                    Err(e) => self.refuse(header, request, e),
                }
            }
            FrontendRequest::RemMemReg(desc) => match self.ram.remove(&desc) {
                Ok(()) => {
                    info!(
                        "connection {}: region removed at {:#x}, {:#x} bytes",
                        self.id, desc.guest_phys_addr, desc.memory_size
                    );
                    self.ack(header, request, 0)
                }
                Err(e) => self.refuse(header, request, e),
            },
            FrontendRequest::CocoGetCaps => {
                let mut caps = self.caps;
                // Reserved (0) for a frontend that did not ask for it.
                if !self.has(PF_COCO_LOCK_WAIT) {
                    caps.lock_wait_ms = 0;
                }
                let payload = caps.encode();
                Outcome::Reply(Header::reply(request, payload.len()), payload)
            }
            FrontendRequest::CocoExit(exit) => {
                let started = Instant::now();
                let reply = answer::answer(
                    exit,
                    &self.store,
                    &self.ram,
                    &mut self.leases,
                    &mut self.eagain,
                );
                self.metrics.record_exit(&reply, started.elapsed());
                if self.eagain.take_fallback() {
                    self.metrics.eagain_fallback();
                }
                self.report_leases();
                let payload = reply.encode();
                Outcome::Reply(Header::reply(request, payload.len()), payload)
            }
            FrontendRequest::CocoDone(lease) => {
                if self.leases.release(lease) {
                    self.report_leases();
                    self.ack(header, request, 0)
                } else {
                    // Expired or never granted: harmless, but the frontend may want to know.
                    log::debug!(
                        "connection {}: COCO_DONE for unknown lease {lease}",
                        self.id
                    );
                    self.ack(header, request, libc::ENOENT)
                }
            }
        }
    }
}

impl Drop for Session {
    /// The connection's leases go with it (their locks close with the files).
    fn drop(&mut self) {
        self.metrics.leases_changed(-(self.leases_reported as i64));
    }
}

/// The session driven as the connection loop drives it, without a socket: messages in,
/// outcomes out, guest RAM a memfd read back here.
#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    use coco_protocol::exit::{build_request, read_answer, CertsRet};
    use coco_protocol::table::pages_for;
    use coco_protocol::wire::{encode_mem_reg, ExitMsg, RegionDesc, FLAG_NEED_REPLY};

    use super::*;

    const GPA: u64 = 0x10_0000;
    const RAM: u64 = 16 * 4096;

    struct Fixture {
        _dir: tempfile::TempDir,
        table: Vec<u8>,
        config: Config,
        store: Arc<BlobStore>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        // The demo's sample chain: real certificates, a table of several pages.
        let table = crate::demo::sample_table().as_bytes().to_vec();
        let blob = dir.path().join("certs.bin");
        std::fs::write(&blob, &table).expect("blob");
        let mut config = Config::new(dir.path().join("unused.sock"), &blob);
        config.lock_wait = Duration::ZERO;
        config.max_leases = 2;
        let store = Arc::new(BlobStore::new(
            &blob,
            config.lock_wait,
            config.missing_certs,
        ));
        Fixture {
            _dir: dir,
            table,
            config,
            store,
        }
    }

    fn session(f: &Fixture) -> Session {
        Session::new(1, &f.config, f.store.clone())
    }

    fn send(s: &mut Session, request: Request, payload: &[u8], need_reply: bool) -> Outcome {
        s.handle(
            &Header::request(request, payload.len(), need_reply),
            payload,
            Vec::new(),
        )
    }

    /// The errno of an acknowledgement, or panics.
    fn acked(outcome: Outcome, request: Request) -> u64 {
        match outcome {
            Outcome::Reply(h, payload) => {
                assert_eq!(h, Header::reply(request, 8));
                u64::from_le_bytes(payload.try_into().expect("8 bytes"))
            }
            other => panic!("{request:?}: {other:?}, not an acknowledgement"),
        }
    }

    fn negotiate(s: &mut Session) {
        let features = PF_COCO | PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS;
        let out = send(
            s,
            Request::SetProtocolFeatures,
            &features.to_le_bytes(),
            true,
        );
        assert_eq!(acked(out, Request::SetProtocolFeatures), 0);
        assert!(s.negotiated());
    }

    /// A session with one memfd region of RAM at [`GPA`]; the memfd is returned to read back.
    fn with_ram(f: &Fixture) -> (Session, File) {
        let mut s = session(f);
        negotiate(&mut s);
        let ram = memfd::MemfdOptions::default()
            .create("guest")
            .expect("memfd")
            .into_file();
        ram.set_len(RAM).expect("size");
        let desc = RegionDesc {
            guest_phys_addr: GPA,
            memory_size: RAM,
            userspace_addr: 0,
            mmap_offset: 0,
        };
        let payload = encode_mem_reg(&desc);
        let out = s.handle(
            &Header::request(Request::AddMemReg, payload.len(), true),
            &payload,
            vec![ram.try_clone().expect("dup").into()],
        );
        assert_eq!(acked(out, Request::AddMemReg), 0);
        (s, ram)
    }

    /// Sends COCO_EXIT for `npages` at `gpa` from `vcpu`; returns the reply.
    fn exit(s: &mut Session, abi: Abi, vcpu: u32, gpa: u64, npages: u64) -> ExitMsg {
        let msg = ExitMsg {
            abi: abi.tag(),
            vcpu,
            status: 0,
            lease: 0,
            record: build_request(abi, gpa, npages),
        };
        match send(s, Request::CocoExit, &msg.encode(), false) {
            Outcome::Reply(h, payload) => {
                assert_eq!(h, Header::reply(Request::CocoExit, payload.len()));
                ExitMsg::decode(&payload).expect("reply")
            }
            other => panic!("COCO_EXIT: {other:?}"),
        }
    }

    #[test]
    fn the_handshake_offers_and_acks_what_protocol_md_says() {
        let f = fixture();
        let mut s = session(&f);
        let Outcome::Reply(_, features) = send(&mut s, Request::GetFeatures, &[], false) else {
            panic!("GET_FEATURES")
        };
        assert_eq!(features, F_PROTOCOL_FEATURES.to_le_bytes());
        let Outcome::Reply(_, offered) = send(&mut s, Request::GetProtocolFeatures, &[], false)
        else {
            panic!("GET_PROTOCOL_FEATURES")
        };
        assert_eq!(offered, SUPPORTED_PROTOCOL_FEATURES.to_le_bytes());
        assert!(!s.negotiated());
        negotiate(&mut s);
        // Negotiated once: again is a protocol error.
        let again = send(
            &mut s,
            Request::SetProtocolFeatures,
            &PF_COCO.to_le_bytes(),
            false,
        );
        assert!(matches!(again, Outcome::Close(SessionError::Renegotiated)));
    }

    #[test]
    fn handshakes_that_leave_nothing_to_do_close() {
        let f = fixture();
        let out = send(
            &mut session(&f),
            Request::SetProtocolFeatures,
            &PF_REPLY_ACK.to_le_bytes(),
            true,
        );
        assert!(matches!(out, Outcome::Close(SessionError::NoCoco(_))));
        let unoffered = PF_COCO | 1 << 63;
        let out = send(
            &mut session(&f),
            Request::SetProtocolFeatures,
            &unoffered.to_le_bytes(),
            true,
        );
        assert!(matches!(
            out,
            Outcome::Close(SessionError::UnofferedProtocolFeatures(x)) if x == unoffered
        ));
        // COCO requests before the handshake.
        let out = send(&mut session(&f), Request::CocoGetCaps, &[], false);
        assert!(matches!(
            out,
            Outcome::Close(SessionError::NotNegotiated {
                request: Request::CocoGetCaps,
                ..
            })
        ));
    }

    #[test]
    fn a_refusal_is_acked_when_asked_for_and_closes_otherwise() {
        let f = fixture();
        let mut s = session(&f);
        negotiate(&mut s);
        let unoffered = (F_PROTOCOL_FEATURES | 1).to_le_bytes();
        let out = send(&mut s, Request::SetFeatures, &unoffered, true);
        assert_eq!(acked(out, Request::SetFeatures), libc::EINVAL as u64);
        let out = send(&mut s, Request::SetFeatures, &unoffered, false);
        assert!(matches!(
            out,
            Outcome::Close(SessionError::Refused {
                request: Request::SetFeatures,
                why: Refusal::UnofferedFeatures(_),
            })
        ));
        // An accepted request without NEED_REPLY gets nothing back.
        let out = send(
            &mut s,
            Request::SetFeatures,
            &F_PROTOCOL_FEATURES.to_le_bytes(),
            false,
        );
        assert!(matches!(out, Outcome::Quiet));
        // The header's flag is what counts, not the request.
        let header = Header {
            flags: VERSION_FLAGS | FLAG_NEED_REPLY,
            ..Header::request(Request::SetOwner, 0, false)
        };
        assert_eq!(
            acked(s.handle(&header, &[], Vec::new()), Request::SetOwner),
            0
        );
    }

    const VERSION_FLAGS: u32 = coco_protocol::wire::VERSION;

    #[test]
    fn caps_report_the_configuration() {
        let f = fixture();
        let mut s = session(&f);
        negotiate(&mut s);
        let Outcome::Reply(_, payload) = send(&mut s, Request::CocoGetCaps, &[], false) else {
            panic!("caps")
        };
        let caps = Caps::decode(&payload).expect("caps");
        assert_eq!(
            caps.abis,
            Abi::CocoRfc.cap_bit() | Abi::SnpReqCerts.cap_bit()
        );
        assert_eq!(caps.coco_subtypes, COCO_SUBTYPE_REQ_CERTS);
        assert_eq!(caps.max_leases, 2);
        assert_eq!(caps.lease_timeout_ms, 5000);
        // Not negotiated: reserved.
        assert_eq!(caps.lock_wait_ms, 0);
    }

    #[test]
    fn a_request_gets_the_table_in_guest_ram_and_a_lease_until_done() {
        let f = fixture();
        let (mut s, ram) = with_ram(&f);
        let npages = pages_for(f.table.len());
        for (vcpu, abi) in [(0, Abi::SnpReqCerts), (1, Abi::CocoRfc)] {
            let gpa = GPA + u64::from(vcpu) * 4 * 4096;
            let reply = exit(&mut s, abi, vcpu, gpa, npages);
            assert_eq!(reply.status, 0);
            assert_eq!(
                read_answer(abi, &reply.record).expect("answer"),
                (CertsRet::Ok as u64, npages)
            );
            assert_ne!(reply.lease, 0);
            let mut written = vec![0; f.table.len()];
            ram.read_exact_at(&mut written, gpa - GPA)
                .expect("read back");
            assert_eq!(written, f.table);
        }
        assert_eq!(s.leases_held(), 2);
        // Both leases in use: a third vCPU is told to retry.
        let reply = exit(&mut s, Abi::SnpReqCerts, 2, GPA, npages);
        assert_eq!(
            read_answer(Abi::SnpReqCerts, &reply.record)
                .expect("answer")
                .0,
            CertsRet::Again as u64
        );
        assert_eq!(reply.lease, 0);
        // vCPU 0 asks again: its previous lease ends, and it gets a new one.
        let again = exit(&mut s, Abi::SnpReqCerts, 0, GPA, npages);
        assert_ne!(again.lease, 0);
        assert_eq!(s.leases_held(), 2);
        let done = |s: &mut Session, lease: u64| {
            acked(
                send(s, Request::CocoDone, &lease.to_le_bytes(), true),
                Request::CocoDone,
            )
        };
        assert_eq!(done(&mut s, again.lease), 0);
        assert_eq!(s.leases_held(), 1);
        assert_eq!(done(&mut s, again.lease), libc::ENOENT as u64);
        // The lease that remains expires on its own.
        let deadline = s.next_deadline().expect("a lease deadline");
        s.expire(deadline + Duration::from_millis(1));
        assert_eq!(s.leases_held(), 0);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn a_small_buffer_gets_enospc_and_nothing_written() {
        let f = fixture();
        let (mut s, ram) = with_ram(&f);
        let needed = pages_for(f.table.len());
        assert!(needed > 1);
        for npages in [0, needed - 1] {
            let reply = exit(&mut s, Abi::SnpReqCerts, 0, GPA, npages);
            assert_eq!(
                read_answer(Abi::SnpReqCerts, &reply.record).expect("answer"),
                (CertsRet::NoSpace as u64, needed)
            );
            assert_eq!(reply.lease, 0);
        }
        let mut ram_bytes = vec![0; RAM as usize];
        ram.read_exact_at(&mut ram_bytes, 0).expect("read back");
        assert!(ram_bytes.iter().all(|b| *b == 0));
        assert_eq!(s.leases_held(), 0);
    }

    #[test]
    fn a_buffer_outside_guest_ram_gets_eio() {
        let f = fixture();
        let (mut s, _ram) = with_ram(&f);
        let npages = pages_for(f.table.len());
        // Crosses the end of the region; unaligned; beyond 64 bits.
        for (gpa, npages) in [
            (GPA + RAM - 4096, npages),
            (GPA + 1, npages),
            (u64::MAX - 4095, npages),
        ] {
            let reply = exit(&mut s, Abi::SnpReqCerts, 0, gpa, npages);
            assert_eq!(
                read_answer(Abi::SnpReqCerts, &reply.record)
                    .expect("answer")
                    .0,
                CertsRet::Io as u64,
                "gpa {gpa:#x}"
            );
        }
        assert_eq!(s.leases_held(), 0);
    }

    #[test]
    fn records_that_are_not_certificate_requests_get_a_status() {
        let f = fixture();
        let (mut s, _ram) = with_ram(&f);
        let mut send_exit = |abi: u32, record: Vec<u8>| {
            let msg = ExitMsg {
                abi,
                vcpu: 0,
                status: 0,
                lease: 0,
                record,
            };
            match send(&mut s, Request::CocoExit, &msg.encode(), false) {
                Outcome::Reply(_, payload) => ExitMsg::decode(&payload).expect("reply"),
                other => panic!("{other:?}"),
            }
        };
        let unknown = send_exit(7, vec![0; 24]);
        assert_eq!(unknown.status, libc::ENOTSUP as u32);
        assert_eq!(unknown.record, [0; 24], "the record comes back untouched");
        let short = send_exit(Abi::SnpReqCerts.tag(), vec![0; 16]);
        assert_eq!(short.status, libc::EINVAL as u32);
        let mut rfc = build_request(Abi::CocoRfc, GPA, 4);
        rfc[0] = 1; // a sub-type other than REQ_CERTS
        let other = send_exit(Abi::CocoRfc.tag(), rfc.clone());
        assert_eq!(other.status, libc::ENOTSUP as u32);
        assert_eq!(other.record, rfc);
    }

    #[test]
    fn memory_refusals_carry_their_errno() {
        let f = fixture();
        let (mut s, ram) = with_ram(&f);
        let overlap = RegionDesc {
            guest_phys_addr: GPA + 4096,
            memory_size: 4096,
            userspace_addr: 0,
            mmap_offset: 0,
        };
        let payload = encode_mem_reg(&overlap);
        let out = s.handle(
            &Header::request(Request::AddMemReg, payload.len(), true),
            &payload,
            vec![ram.try_clone().expect("dup").into()],
        );
        assert_eq!(acked(out, Request::AddMemReg), libc::EEXIST as u64);
        let out = send(&mut s, Request::RemMemReg, &payload, true);
        assert_eq!(acked(out, Request::RemMemReg), libc::ENOENT as u64);
        // ADD_MEM_REG without its descriptor is malformed: the stream cannot be trusted.
        let out = send(&mut s, Request::AddMemReg, &payload, true);
        assert!(matches!(out, Outcome::Close(SessionError::Wire(_))));
    }
}
