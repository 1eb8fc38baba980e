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
    lease_timeout_ms: u32,
    lock_wait_ms: u32,
    max_leases: u32,
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
            lease_timeout_ms: u32::try_from(config.lease_timeout.as_millis()).unwrap_or(u32::MAX),
            lock_wait_ms: u32::try_from(config.lock_wait.as_millis()).unwrap_or(u32::MAX),
            max_leases: u32::try_from(config.max_leases).unwrap_or(u32::MAX),
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
                let caps = Caps {
                    abis: Abi::ALL.iter().fold(0, |bits, abi| bits | abi.cap_bit()),
                    coco_subtypes: COCO_SUBTYPE_REQ_CERTS,
                    max_leases: self.max_leases,
                    lease_timeout_ms: self.lease_timeout_ms,
                    // Reserved (0) for a frontend that did not ask for it.
                    lock_wait_ms: if self.has(PF_COCO_LOCK_WAIT) {
                        self.lock_wait_ms
                    } else {
                        0
                    },
                };
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
