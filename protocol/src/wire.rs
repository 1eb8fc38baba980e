//! The channel's wire format: vhost-user framing, the vhost-user requests the channel uses,
//! and the private confidential-computing requests. All integers are little-endian.
//! `docs/protocol.md` is normative; the constants and layouts here follow it.
//!
//! Written by hand rather than on the `vhost` crate: its connection type sits in a private
//! module and its request trait is `pub(super)`, so it cannot carry the private requests.

use thiserror::Error;

use crate::exit::MAX_RECORD_SIZE;
use crate::le::{le_u32, le_u64};

/// Bytes in a message header.
pub const HEADER_SIZE: usize = 12;
/// Protocol version carried in flags bits 0-1.
pub const VERSION: u32 = 1;
/// Flags bits 0-1: version.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// Flags bit 2: this message is a reply.
pub const FLAG_REPLY: u32 = 1 << 2;
/// Flags bit 3: the sender asks for a REPLY_ACK.
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
/// Largest payload either side accepts.
pub const MAX_PAYLOAD: usize = 4096;
/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 8;
/// Most regions one SET_MEM_TABLE may carry (vhost-user's fixed table size).
pub const MAX_MEM_TABLE_REGIONS: usize = 8;
/// Memory slots the sidecar offers through GET_MAX_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 32;

/// `GET_FEATURES` bit: protocol features can be negotiated. The only feature bit offered.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature: NEED_REPLY is honoured with a u64 acknowledgement.
pub const PF_REPLY_ACK: u64 = 1 << 3;
/// Protocol feature: ADD_MEM_REG / REM_MEM_REG / GET_MAX_MEM_SLOTS.
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
/// Protocol feature (private): the COCO_* requests. Must be acknowledged to use them.
pub const PF_COCO: u64 = 1 << 48;
/// Protocol feature (private): COCO_GET_CAPS announces the sidecar's lock wait, so that a
/// frontend can check that its own reply timeout is longer.
pub const PF_COCO_LOCK_WAIT: u64 = 1 << 49;
/// Every protocol feature the sidecar offers.
pub const SUPPORTED_PROTOCOL_FEATURES: u64 =
    PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS | PF_COCO | PF_COCO_LOCK_WAIT;

/// Base of the private request range, far from vhost-user's numbers ("CC").
pub const COCO_REQUEST_BASE: u32 = 0x4343_0000;

/// Request codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Request {
    /// VHOST_USER_GET_FEATURES.
    GetFeatures = 1,
    /// VHOST_USER_SET_FEATURES.
    SetFeatures = 2,
    /// VHOST_USER_SET_OWNER.
    SetOwner = 3,
    /// VHOST_USER_SET_MEM_TABLE.
    SetMemTable = 5,
    /// VHOST_USER_GET_PROTOCOL_FEATURES.
    GetProtocolFeatures = 15,
    /// VHOST_USER_SET_PROTOCOL_FEATURES.
    SetProtocolFeatures = 16,
    /// VHOST_USER_GET_MAX_MEM_SLOTS.
    GetMaxMemSlots = 36,
    /// VHOST_USER_ADD_MEM_REG.
    AddMemReg = 37,
    /// VHOST_USER_REM_MEM_REG.
    RemMemReg = 38,
    /// COCO_GET_CAPS: the record ABIs and COCO sub-types the sidecar serves.
    CocoGetCaps = COCO_REQUEST_BASE + 1,
    /// COCO_EXIT: one exit record to answer.
    CocoExit = COCO_REQUEST_BASE + 2,
    /// COCO_DONE: a lease's request has reached firmware.
    CocoDone = COCO_REQUEST_BASE + 3,
}

impl Request {
    /// Every request code, in code order.
    pub const ALL: [Request; 12] = [
        Request::GetFeatures,
        Request::SetFeatures,
        Request::SetOwner,
        Request::SetMemTable,
        Request::GetProtocolFeatures,
        Request::SetProtocolFeatures,
        Request::GetMaxMemSlots,
        Request::AddMemReg,
        Request::RemMemReg,
        Request::CocoGetCaps,
        Request::CocoExit,
        Request::CocoDone,
    ];

    /// The request for a code, if known.
    pub fn from_code(code: u32) -> Option<Request> {
        Request::ALL.into_iter().find(|r| *r as u32 == code)
    }

    /// Whether this request always gets a reply with a payload (the GET_* and COCO_GET_CAPS,
    /// COCO_EXIT). The others get a u64 acknowledgement only when NEED_REPLY is set and
    /// REPLY_ACK was negotiated.
    pub fn has_reply(self) -> bool {
        matches!(
            self,
            Request::GetFeatures
                | Request::GetProtocolFeatures
                | Request::GetMaxMemSlots
                | Request::CocoGetCaps
                | Request::CocoExit
        )
    }
}

/// Everything that can be wrong with a message before its meaning is considered. Each of these
/// closes the connection: after it, the byte stream cannot be trusted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The header's version bits (the flags) are not 1.
    #[error("flags {0:#x}: version bits are not 1")]
    Version(u32),
    /// The header sets flag bits the protocol does not define (the flags).
    #[error("flags {0:#x}: unknown bits set")]
    UnknownFlags(u32),
    /// The header announces more payload than any message may have (the size).
    #[error("payload size {0} exceeds the limit of {MAX_PAYLOAD}")]
    PayloadTooLarge(u32),
    /// A request code the protocol does not define.
    #[error("unknown request code {0:#x}")]
    UnknownRequest(u32),
    /// A request with the REPLY flag.
    #[error("{request:?}: REPLY flag set on a request")]
    ReplyFlag {
        /// The request.
        request: Request,
    },
    /// A payload whose size is not the request's.
    #[error("{request:?}: payload is {got} bytes, expected {want}")]
    PayloadSize {
        /// The request.
        request: Request,
        /// The payload's size.
        got: usize,
        /// The size the request's payload has.
        want: usize,
    },
    /// A message with more or fewer file descriptors than its request takes.
    #[error("{request:?}: carries {got} file descriptors, expected {want}")]
    FdCount {
        /// The request.
        request: Request,
        /// Descriptors received.
        got: usize,
        /// Descriptors the request takes, in words ("1", "0 or 1", "one per region").
        want: &'static str,
    },
    /// SET_MEM_TABLE with more regions than a table may hold (the count).
    #[error("SET_MEM_TABLE: {0} regions, at most {MAX_MEM_TABLE_REGIONS}")]
    TooManyRegions(u32),
    /// COCO_EXIT with a record longer than any ABI's (the size).
    #[error("COCO_EXIT: record size {0} exceeds {MAX_RECORD_SIZE}")]
    RecordTooLarge(u32),
    /// A reserved field that is not zero.
    #[error("{request:?}: reserved field is {value:#x}, must be 0")]
    Reserved {
        /// The request.
        request: Request,
        /// The field's value.
        value: u64,
    },
    /// A reply whose code or flags do not answer the request sent.
    #[error("reply to {request:?} does not match: got code {code:#x}, flags {flags:#x}")]
    ReplyMismatch {
        /// The request sent.
        request: Request,
        /// The reply's request code.
        code: u32,
        /// The reply's flags.
        flags: u32,
    },
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version and REPLY / NEED_REPLY bits.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

impl Header {
    /// A request header.
    pub fn request(request: Request, size: usize, need_reply: bool) -> Header {
        Header {
            request: request as u32,
            flags: VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 },
            size: size as u32,
        }
    }

    /// A reply header.
    pub fn reply(request: Request, size: usize) -> Header {
        Header {
            request: request as u32,
            flags: VERSION | FLAG_REPLY,
            size: size as u32,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decodes and checks version, flags and size limit. The request code is checked later,
    /// so that the payload can still be read (and the peer told what was wrong).
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Header, WireError> {
        let h = Header {
            request: le_u32(b, 0),
            flags: le_u32(b, 4),
            size: le_u32(b, 8),
        };
        if h.flags & FLAG_VERSION_MASK != VERSION {
            return Err(WireError::Version(h.flags));
        }
        if h.flags & !(FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY) != 0 {
            return Err(WireError::UnknownFlags(h.flags));
        }
        if h.size as usize > MAX_PAYLOAD {
            return Err(WireError::PayloadTooLarge(h.size));
        }
        Ok(h)
    }

    /// NEED_REPLY is set.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// REPLY is set.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }
}

/// One guest memory region as vhost-user describes it (`VhostUserMemoryRegion`, 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionDesc {
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Region size in bytes.
    pub memory_size: u64,
    /// The frontend's virtual address of the region (informational; the sidecar ignores it).
    pub userspace_addr: u64,
    /// Offset of the region's first byte in the file descriptor sent with it.
    pub mmap_offset: u64,
}

/// Size of an encoded [`RegionDesc`].
pub const REGION_DESC_SIZE: usize = 32;
/// Size of an ADD_MEM_REG / REM_MEM_REG payload (`u64` padding, then a region).
pub const MEM_REG_MSG_SIZE: usize = 8 + REGION_DESC_SIZE;

impl RegionDesc {
    fn encode_into(&self, out: &mut Vec<u8>) {
        for v in [
            self.guest_phys_addr,
            self.memory_size,
            self.userspace_addr,
            self.mmap_offset,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn decode(b: &[u8]) -> RegionDesc {
        RegionDesc {
            guest_phys_addr: le_u64(b, 0),
            memory_size: le_u64(b, 8),
            userspace_addr: le_u64(b, 16),
            mmap_offset: le_u64(b, 24),
        }
    }
}

/// The sidecar's answer to COCO_GET_CAPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Bit `1 << tag` for each record ABI the sidecar decodes.
    pub abis: u64,
    /// COCO sub-types served, as the `KVM_CAP_EXIT_COCO` bitmask (bit 0 = REQ_CERTS).
    pub coco_subtypes: u64,
    /// Leases one connection may hold at once.
    pub max_leases: u32,
    /// Milliseconds after which an unreleased lease is dropped.
    pub lease_timeout_ms: u32,
    /// Longest wait, in milliseconds, for the blob's shared lock before a request is answered
    /// EAGAIN. Only with [`PF_COCO_LOCK_WAIT`] negotiated; 0 (reserved) otherwise.
    pub lock_wait_ms: u32,
}

/// Size of an encoded [`Caps`].
pub const CAPS_SIZE: usize = 32;

impl Caps {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CAPS_SIZE);
        b.extend_from_slice(&self.abis.to_le_bytes());
        b.extend_from_slice(&self.coco_subtypes.to_le_bytes());
        b.extend_from_slice(&self.max_leases.to_le_bytes());
        b.extend_from_slice(&self.lease_timeout_ms.to_le_bytes());
        b.extend_from_slice(&self.lock_wait_ms.to_le_bytes());
        b.extend_from_slice(&[0u8; 4]);
        b
    }

    /// Decodes the payload (reserved bytes are ignored, for forward compatibility).
    pub fn decode(b: &[u8]) -> Result<Caps, WireError> {
        expect_size(Request::CocoGetCaps, b, CAPS_SIZE)?;
        Ok(Caps {
            abis: le_u64(b, 0),
            coco_subtypes: le_u64(b, 8),
            max_leases: le_u32(b, 16),
            lease_timeout_ms: le_u32(b, 20),
            lock_wait_ms: le_u32(b, 24),
        })
    }
}

/// COCO_EXIT payload, in both directions: a 24-byte prefix and the raw exit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitMsg {
    /// ABI tag of the record ([`crate::Abi`]).
    pub abi: u32,
    /// vCPU index the exit came from.
    pub vcpu: u32,
    /// Request: 0. Reply: 0 when the record was answered, else an errno saying why not.
    pub status: u32,
    /// Request: 0. Reply: the lease to release with COCO_DONE, or 0 for none.
    pub lease: u64,
    /// The exit record, verbatim.
    pub record: Vec<u8>,
}

/// Size of the COCO_EXIT prefix before the record.
pub const EXIT_PREFIX_SIZE: usize = 24;

impl ExitMsg {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(EXIT_PREFIX_SIZE + self.record.len());
        b.extend_from_slice(&self.abi.to_le_bytes());
        b.extend_from_slice(&self.vcpu.to_le_bytes());
        b.extend_from_slice(&(self.record.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.status.to_le_bytes());
        b.extend_from_slice(&self.lease.to_le_bytes());
        b.extend_from_slice(&self.record);
        b
    }

    /// Decodes the payload and checks its framing (sizes). What the ABI tag and record mean
    /// is checked by whoever acts on it.
    pub fn decode(b: &[u8]) -> Result<ExitMsg, WireError> {
        if b.len() < EXIT_PREFIX_SIZE {
            return Err(WireError::PayloadSize {
                request: Request::CocoExit,
                got: b.len(),
                want: EXIT_PREFIX_SIZE,
            });
        }
        let record_size = le_u32(b, 8);
        if record_size as usize > MAX_RECORD_SIZE {
            return Err(WireError::RecordTooLarge(record_size));
        }
        expect_size(
            Request::CocoExit,
            b,
            EXIT_PREFIX_SIZE + record_size as usize,
        )?;
        Ok(ExitMsg {
            abi: le_u32(b, 0),
            vcpu: le_u32(b, 4),
            status: le_u32(b, 12),
            lease: le_u64(b, 16),
            record: b[EXIT_PREFIX_SIZE..].to_vec(),
        })
    }
}

/// A request as the sidecar receives it, framing-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendRequest {
    /// GET_FEATURES.
    GetFeatures,
    /// SET_FEATURES with the feature bits.
    SetFeatures(u64),
    /// SET_OWNER.
    SetOwner,
    /// Regions, one file descriptor each, in order.
    SetMemTable(Vec<RegionDesc>),
    /// GET_PROTOCOL_FEATURES.
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES with the protocol feature bits.
    SetProtocolFeatures(u64),
    /// GET_MAX_MEM_SLOTS.
    GetMaxMemSlots,
    /// Region, with one file descriptor.
    AddMemReg(RegionDesc),
    /// Region; zero or one file descriptor (a sent one is closed unused, as in vhost-user).
    RemMemReg(RegionDesc),
    /// COCO_GET_CAPS.
    CocoGetCaps,
    /// COCO_EXIT with its record.
    CocoExit(ExitMsg),
    /// COCO_DONE with the lease id.
    CocoDone(u64),
}

impl FrontendRequest {
    /// Decodes a request, checking its payload size and file descriptor count.
    pub fn decode(header: &Header, payload: &[u8], nfds: usize) -> Result<Self, WireError> {
        let request =
            Request::from_code(header.request).ok_or(WireError::UnknownRequest(header.request))?;
        if header.is_reply() {
            return Err(WireError::ReplyFlag { request });
        }
        let fds = |ok: bool, want: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(WireError::FdCount {
                    request,
                    got: nfds,
                    want,
                })
            }
        };
        match request {
            Request::SetMemTable => {}
            Request::AddMemReg => fds(nfds == 1, "1")?,
            Request::RemMemReg => fds(nfds <= 1, "0 or 1")?,
            _ => fds(nfds == 0, "0")?,
        }
        let msg = match request {
            Request::GetFeatures => empty(request, payload, FrontendRequest::GetFeatures)?,
            Request::SetOwner => empty(request, payload, FrontendRequest::SetOwner)?,
            Request::GetProtocolFeatures => {
                empty(request, payload, FrontendRequest::GetProtocolFeatures)?
            }
            Request::GetMaxMemSlots => empty(request, payload, FrontendRequest::GetMaxMemSlots)?,
            Request::CocoGetCaps => empty(request, payload, FrontendRequest::CocoGetCaps)?,
            Request::SetFeatures => FrontendRequest::SetFeatures(decode_u64(request, payload)?),
            Request::SetProtocolFeatures => {
                FrontendRequest::SetProtocolFeatures(decode_u64(request, payload)?)
            }
            Request::CocoDone => FrontendRequest::CocoDone(decode_u64(request, payload)?),
            Request::SetMemTable => {
                if payload.len() < 8 {
                    return Err(WireError::PayloadSize {
                        request,
                        got: payload.len(),
                        want: 8,
                    });
                }
                let n = le_u32(payload, 0);
                if n as usize > MAX_MEM_TABLE_REGIONS {
                    return Err(WireError::TooManyRegions(n));
                }
                expect_size(request, payload, 8 + n as usize * REGION_DESC_SIZE)?;
                let padding = le_u32(payload, 4);
                if padding != 0 {
                    return Err(WireError::Reserved {
                        request,
                        value: padding.into(),
                    });
                }
                fds(nfds == n as usize, "one per region")?;
                FrontendRequest::SetMemTable(
                    payload[8..]
                        .chunks_exact(REGION_DESC_SIZE)
                        .map(RegionDesc::decode)
                        .collect(),
                )
            }
            Request::AddMemReg | Request::RemMemReg => {
                expect_size(request, payload, MEM_REG_MSG_SIZE)?;
                let region = RegionDesc::decode(&payload[8..]);
                if request == Request::AddMemReg {
                    FrontendRequest::AddMemReg(region)
                } else {
                    FrontendRequest::RemMemReg(region)
                }
            }
            Request::CocoExit => {
                let msg = ExitMsg::decode(payload)?;
                if let Some(value) = [u64::from(msg.status), msg.lease]
                    .into_iter()
                    .find(|v| *v != 0)
                {
                    return Err(WireError::Reserved { request, value });
                }
                FrontendRequest::CocoExit(msg)
            }
        };
        Ok(msg)
    }

    /// The request code.
    pub fn request(&self) -> Request {
        match self {
            FrontendRequest::GetFeatures => Request::GetFeatures,
            FrontendRequest::SetFeatures(_) => Request::SetFeatures,
            FrontendRequest::SetOwner => Request::SetOwner,
            FrontendRequest::SetMemTable(_) => Request::SetMemTable,
            FrontendRequest::GetProtocolFeatures => Request::GetProtocolFeatures,
            FrontendRequest::SetProtocolFeatures(_) => Request::SetProtocolFeatures,
            FrontendRequest::GetMaxMemSlots => Request::GetMaxMemSlots,
            FrontendRequest::AddMemReg(_) => Request::AddMemReg,
            FrontendRequest::RemMemReg(_) => Request::RemMemReg,
            FrontendRequest::CocoGetCaps => Request::CocoGetCaps,
            FrontendRequest::CocoExit(_) => Request::CocoExit,
            FrontendRequest::CocoDone(_) => Request::CocoDone,
        }
    }
}

/// Encodes a SET_MEM_TABLE payload.
pub fn encode_mem_table(regions: &[RegionDesc]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + regions.len() * REGION_DESC_SIZE);
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for r in regions {
        r.encode_into(&mut b);
    }
    b
}

/// Encodes an ADD_MEM_REG / REM_MEM_REG payload.
pub fn encode_mem_reg(region: &RegionDesc) -> Vec<u8> {
    let mut b = Vec::with_capacity(MEM_REG_MSG_SIZE);
    b.extend_from_slice(&0u64.to_le_bytes());
    region.encode_into(&mut b);
    b
}

/// Decodes a u64 payload (features, acknowledgements, leases).
pub fn decode_u64(request: Request, payload: &[u8]) -> Result<u64, WireError> {
    expect_size(request, payload, 8)?;
    Ok(le_u64(payload, 0))
}

fn empty(
    request: Request,
    payload: &[u8],
    msg: FrontendRequest,
) -> Result<FrontendRequest, WireError> {
    expect_size(request, payload, 0)?;
    Ok(msg)
}

fn expect_size(request: Request, payload: &[u8], want: usize) -> Result<(), WireError> {
    if payload.len() == want {
        Ok(())
    } else {
        Err(WireError::PayloadSize {
            request,
            got: payload.len(),
            want,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_checks() {
        let h = Header::request(Request::CocoExit, 56, true);
        let b = h.encode();
        assert_eq!(b, [2, 0, 0x43, 0x43, 0x09, 0, 0, 0, 56, 0, 0, 0]);
        assert_eq!(Header::decode(&b), Ok(h));
        let mut bad = b;
        bad[4] = 0x0a; // version 2
        assert_eq!(Header::decode(&bad), Err(WireError::Version(0x0a)));
        bad[4] = 0x11; // unknown bit 4
        assert_eq!(Header::decode(&bad), Err(WireError::UnknownFlags(0x11)));
        let big = Header {
            request: 1,
            flags: 1,
            size: MAX_PAYLOAD as u32 + 1,
        }
        .encode();
        assert_eq!(Header::decode(&big), Err(WireError::PayloadTooLarge(4097)));
    }

    #[test]
    fn requests_check_payload_and_fds() {
        let h = |r: Request, n: usize| Header::request(r, n, false);
        assert_eq!(
            FrontendRequest::decode(&h(Request::GetFeatures, 0), &[], 0),
            Ok(FrontendRequest::GetFeatures)
        );
        assert!(matches!(
            FrontendRequest::decode(&h(Request::GetFeatures, 1), &[0], 0),
            Err(WireError::PayloadSize { .. })
        ));
        assert!(matches!(
            FrontendRequest::decode(&h(Request::GetFeatures, 0), &[], 1),
            Err(WireError::FdCount { .. })
        ));
        assert_eq!(
            FrontendRequest::decode(
                &Header {
                    request: 99,
                    flags: 1,
                    size: 0
                },
                &[],
                0
            ),
            Err(WireError::UnknownRequest(99))
        );
        let region = RegionDesc {
            guest_phys_addr: 0x1000,
            memory_size: 0x2000,
            userspace_addr: 7,
            mmap_offset: 0,
        };
        let table = encode_mem_table(&[region, region]);
        assert_eq!(table.len(), 8 + 64);
        assert_eq!(
            FrontendRequest::decode(&h(Request::SetMemTable, table.len()), &table, 2),
            Ok(FrontendRequest::SetMemTable(vec![region, region]))
        );
        assert!(matches!(
            FrontendRequest::decode(&h(Request::SetMemTable, table.len()), &table, 1),
            Err(WireError::FdCount { .. })
        ));
        let reg = encode_mem_reg(&region);
        assert_eq!(
            FrontendRequest::decode(&h(Request::AddMemReg, reg.len()), &reg, 1),
            Ok(FrontendRequest::AddMemReg(region))
        );
        assert!(matches!(
            FrontendRequest::decode(&h(Request::AddMemReg, reg.len()), &reg, 0),
            Err(WireError::FdCount { .. })
        ));
        let mut nine = 9u32.to_le_bytes().to_vec();
        nine.extend_from_slice(&[0; 4]);
        assert_eq!(
            FrontendRequest::decode(&h(Request::SetMemTable, 8), &nine, 0),
            Err(WireError::TooManyRegions(9))
        );
    }

    #[test]
    fn exit_msg_round_trip_and_limits() {
        let m = ExitMsg {
            abi: 2,
            vcpu: 3,
            status: 0,
            lease: 0,
            record: vec![9; 24],
        };
        let b = m.encode();
        assert_eq!(b.len(), 48);
        assert_eq!(&b[8..12], &24u32.to_le_bytes());
        assert_eq!(ExitMsg::decode(&b), Ok(m.clone()));
        assert!(matches!(
            ExitMsg::decode(&b[..47]),
            Err(WireError::PayloadSize { .. })
        ));
        let mut huge = b.clone();
        huge[8..12].copy_from_slice(&65u32.to_le_bytes());
        assert_eq!(ExitMsg::decode(&huge), Err(WireError::RecordTooLarge(65)));
        let mut leased = m;
        leased.lease = 5;
        let b = leased.encode();
        assert!(matches!(
            FrontendRequest::decode(&Header::request(Request::CocoExit, b.len(), false), &b, 0),
            Err(WireError::Reserved { .. })
        ));
    }

    #[test]
    fn caps_layout_is_the_documented_one() {
        // docs/protocol.md 6.1, byte by byte.
        let bytes: [u8; 32] = [
            0x06, 0, 0, 0, 0, 0, 0, 0, // abis
            0x01, 0, 0, 0, 0, 0, 0, 0, // coco_subtypes
            0x04, 0, 0, 0, // max_leases
            0x88, 0x13, 0, 0, // lease_timeout_ms = 5000
            0x64, 0, 0, 0, // lock_wait_ms = 100
            0, 0, 0, 0, // reserved
        ];
        let c = Caps {
            abis: 6,
            coco_subtypes: 1,
            max_leases: 4,
            lease_timeout_ms: 5000,
            lock_wait_ms: 100,
        };
        assert_eq!(c.encode(), bytes.to_vec());
        assert_eq!(Caps::decode(&bytes), Ok(c));
        // Reserved bytes are ignored on decode.
        let mut future = bytes;
        future[31] = 0xff;
        assert_eq!(Caps::decode(&future), Ok(c));
    }

    #[test]
    fn protocol_feature_bits_are_the_documented_ones() {
        // docs/protocol.md 5.1.
        assert_eq!(PF_REPLY_ACK, 0x8);
        assert_eq!(PF_CONFIGURE_MEM_SLOTS, 0x8000);
        assert_eq!(PF_COCO, 0x1_0000_0000_0000);
        assert_eq!(PF_COCO_LOCK_WAIT, 0x2_0000_0000_0000);
        assert_eq!(SUPPORTED_PROTOCOL_FEATURES, 0x3_0000_0000_8008);
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        // Deterministic pseudo-random inputs over every request code and payload size.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let code = Request::ALL[(x % 12) as usize] as u32;
            let len = (x >> 8) as usize % 300;
            let payload: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            let hdr = Header {
                request: code,
                flags: 1,
                size: len as u32,
            };
            let _ = FrontendRequest::decode(&hdr, &payload, (x >> 40) as usize % 10);
        }
    }
}
