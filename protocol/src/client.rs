//! A blocking frontend (VMM side) client: one socket, one request in flight at a time.
//! It holds no policy: what to do with a reply is the caller's business.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use thiserror::Error;

use crate::exit::{self, Abi, CertsRet, RecordError};
use crate::transport::{self, MessageReader, TransportError};
use crate::wire::{
    self, Caps, ExitMsg, Header, RegionDesc, Request, WireError, F_PROTOCOL_FEATURES, PF_COCO,
    PF_CONFIGURE_MEM_SLOTS, PF_REPLY_ACK, SUPPORTED_PROTOCOL_FEATURES,
};

/// Why a frontend call failed.
#[derive(Debug, Error)]
pub enum FrontendError {
    /// The socket could not be connected to.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket's path.
        path: String,
        /// Why not.
        source: std::io::Error,
    },
    /// Sending or receiving a message failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A reply that breaks the framing or does not answer the request.
    #[error("malformed reply: {0}")]
    Wire(#[from] WireError),
    /// The sidecar closed the connection instead of replying.
    #[error("the sidecar closed the connection")]
    Closed,
    /// A REPLY_ACK acknowledgement with a non-zero errno.
    #[error("the sidecar rejected {request:?}: {}", std::io::Error::from_raw_os_error(*errno as i32))]
    Rejected {
        /// The request refused.
        request: Request,
        /// The errno the acknowledgement carried.
        errno: u64,
    },
    /// The sidecar did not offer a feature the client needs (named).
    #[error("the sidecar does not offer {0}")]
    MissingFeature(&'static str),
    /// A COCO_EXIT reply with a non-zero status: the record was not answered.
    #[error("the sidecar did not answer the exit record: {}", std::io::Error::from_raw_os_error(*status as i32))]
    ExitStatus {
        /// The reply's status (an errno).
        status: u32,
    },
    /// The answered record does not decode.
    #[error("answered record: {0}")]
    Record(#[from] RecordError),
    /// An answered `ret` that is none of 0, EAGAIN, ENOSPC and EIO.
    #[error("the sidecar answered ret {0}, which KVM would reject")]
    IllegalRet(u64),
}

/// A guest memory region to share, backed by a file descriptor (a memfd in practice).
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion<'a> {
    /// Guest physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the first byte in `fd`.
    pub mmap_offset: u64,
    /// The frontend's own mapping address (informational for the sidecar).
    pub userspace_addr: u64,
    /// The backing file.
    pub fd: BorrowedFd<'a>,
}

impl MemoryRegion<'_> {
    /// The region as the wire describes it.
    pub fn desc(&self) -> RegionDesc {
        RegionDesc {
            guest_phys_addr: self.guest_phys_addr,
            memory_size: self.size,
            userspace_addr: self.userspace_addr,
            mmap_offset: self.mmap_offset,
        }
    }
}

/// A decoded answer to a certificate request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertsReply {
    /// The `ret` the guest will see.
    pub ret: CertsRet,
    /// `npages` from the answered record (the pages needed when `ret` is ENOSPC).
    pub npages: u64,
    /// Lease to release with [`Frontend::done`] once the request reached firmware; 0 for none.
    pub lease: u64,
    /// The answered record, to copy back into `kvm_run` verbatim.
    pub record: Vec<u8>,
}

/// A connected, negotiated frontend.
#[derive(Debug)]
pub struct Frontend {
    stream: UnixStream,
    reader: MessageReader,
    protocol_features: u64,
}

impl Frontend {
    /// Connects to the sidecar's socket and negotiates features.
    pub fn connect(path: impl AsRef<Path>) -> Result<Frontend, FrontendError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| FrontendError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Frontend::handshake(stream)
    }

    /// Negotiates features on a connected stream: GET_FEATURES, SET_FEATURES,
    /// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (every feature both sides know), SET_OWNER.
    pub fn handshake(stream: UnixStream) -> Result<Frontend, FrontendError> {
        let mut f = Frontend {
            stream,
            reader: MessageReader::new(),
            protocol_features: 0,
        };
        let features = f.call_u64(Request::GetFeatures)?;
        if features & F_PROTOCOL_FEATURES == 0 {
            return Err(FrontendError::MissingFeature(
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        f.send(
            Request::SetFeatures,
            &F_PROTOCOL_FEATURES.to_le_bytes(),
            &[],
            false,
        )?;
        let offered = f.call_u64(Request::GetProtocolFeatures)?;
        if offered & PF_COCO == 0 {
            return Err(FrontendError::MissingFeature("the COCO protocol feature"));
        }
        let acked = offered & SUPPORTED_PROTOCOL_FEATURES;
        f.send(
            Request::SetProtocolFeatures,
            &acked.to_le_bytes(),
            &[],
            false,
        )?;
        f.protocol_features = acked;
        f.ack(Request::SetOwner, &[], &[])?;
        Ok(f)
    }

    /// The socket, for callers that poll it or set timeouts. Reading from it directly would
    /// bypass the bytes this client may already have read ahead.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Protocol features in force.
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    fn send(
        &self,
        request: Request,
        payload: &[u8],
        fds: &[RawFd],
        need_reply: bool,
    ) -> Result<(), FrontendError> {
        let header = Header::request(request, payload.len(), need_reply);
        transport::send_message(&self.stream, &header, payload, fds)?;
        Ok(())
    }

    fn reply(&mut self, request: Request) -> Result<Vec<u8>, FrontendError> {
        let msg = self
            .reader
            .recv(&self.stream)?
            .ok_or(FrontendError::Closed)?;
        if msg.header.request != request as u32 || !msg.header.is_reply() {
            return Err(WireError::ReplyMismatch {
                request,
                code: msg.header.request,
                flags: msg.header.flags,
            }
            .into());
        }
        Ok(msg.payload)
    }

    fn call_u64(&mut self, request: Request) -> Result<u64, FrontendError> {
        self.send(request, &[], &[], false)?;
        Ok(wire::decode_u64(request, &self.reply(request)?)?)
    }

    /// Sends a request that has no reply of its own, asking for an acknowledgement when
    /// REPLY_ACK is in force, and turns a non-zero acknowledgement into an error.
    fn ack(
        &mut self,
        request: Request,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), FrontendError> {
        let want_ack = self.protocol_features & PF_REPLY_ACK != 0;
        self.send(request, payload, fds, want_ack)?;
        if want_ack {
            let errno = wire::decode_u64(request, &self.reply(request)?)?;
            if errno != 0 {
                return Err(FrontendError::Rejected { request, errno });
            }
        }
        Ok(())
    }

    /// COCO_GET_CAPS.
    pub fn caps(&mut self) -> Result<Caps, FrontendError> {
        self.send(Request::CocoGetCaps, &[], &[], false)?;
        Ok(Caps::decode(&self.reply(Request::CocoGetCaps)?)?)
    }

    /// GET_MAX_MEM_SLOTS.
    pub fn max_mem_slots(&mut self) -> Result<u64, FrontendError> {
        self.require(PF_CONFIGURE_MEM_SLOTS, "CONFIGURE_MEM_SLOTS")?;
        self.call_u64(Request::GetMaxMemSlots)
    }

    fn require(&self, feature: u64, name: &'static str) -> Result<(), FrontendError> {
        if self.protocol_features & feature == 0 {
            return Err(FrontendError::MissingFeature(name));
        }
        Ok(())
    }

    /// SET_MEM_TABLE: replaces every region.
    pub fn set_mem_table(&mut self, regions: &[MemoryRegion<'_>]) -> Result<(), FrontendError> {
        let descs: Vec<RegionDesc> = regions.iter().map(MemoryRegion::desc).collect();
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd.as_raw_fd()).collect();
        self.ack(Request::SetMemTable, &wire::encode_mem_table(&descs), &fds)
    }

    /// ADD_MEM_REG.
    pub fn add_mem_region(&mut self, region: &MemoryRegion<'_>) -> Result<(), FrontendError> {
        self.require(PF_CONFIGURE_MEM_SLOTS, "CONFIGURE_MEM_SLOTS")?;
        let payload = wire::encode_mem_reg(&region.desc());
        self.ack(Request::AddMemReg, &payload, &[region.fd.as_raw_fd()])
    }

    /// REM_MEM_REG: removes the region with this guest address and size.
    pub fn remove_mem_region(&mut self, region: RegionDesc) -> Result<(), FrontendError> {
        self.require(PF_CONFIGURE_MEM_SLOTS, "CONFIGURE_MEM_SLOTS")?;
        self.ack(Request::RemMemReg, &wire::encode_mem_reg(&region), &[])
    }

    /// COCO_EXIT with a raw record, returned as the sidecar answered it.
    pub fn forward_exit(
        &mut self,
        abi: u32,
        vcpu: u32,
        record: &[u8],
    ) -> Result<ExitMsg, FrontendError> {
        let msg = ExitMsg {
            abi,
            vcpu,
            status: 0,
            lease: 0,
            record: record.to_vec(),
        };
        self.send(Request::CocoExit, &msg.encode(), &[], false)?;
        Ok(ExitMsg::decode(&self.reply(Request::CocoExit)?)?)
    }

    /// Builds a certificate request record of `abi`, forwards it and decodes the answer.
    pub fn request_certs(
        &mut self,
        abi: Abi,
        vcpu: u32,
        gpa: u64,
        npages: u64,
    ) -> Result<CertsReply, FrontendError> {
        let reply = self.forward_exit(abi.tag(), vcpu, &exit::build_request(abi, gpa, npages))?;
        if reply.status != 0 {
            return Err(FrontendError::ExitStatus {
                status: reply.status,
            });
        }
        let (ret, npages) = exit::read_answer(abi, &reply.record)?;
        let ret = CertsRet::from_raw(ret).ok_or(FrontendError::IllegalRet(ret))?;
        Ok(CertsReply {
            ret,
            npages,
            lease: reply.lease,
            record: reply.record,
        })
    }

    /// COCO_DONE: the request of this lease reached firmware; the sidecar drops the lock.
    pub fn done(&mut self, lease: u64) -> Result<(), FrontendError> {
        self.ack(Request::CocoDone, &lease.to_le_bytes(), &[])
    }
}
