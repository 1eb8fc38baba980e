//! The KVM exit records for certificate requests, byte-exact as they sit in `kvm_run`.
//!
//! The VMM forwards the record verbatim and copies the answer back verbatim, so these layouts
//! are the contract with the kernel: offsets below are those of the C structs.

use thiserror::Error;

use crate::le::{le_u32, le_u64};

/// Which kernel ABI a record comes from. The numeric value is the ABI tag on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Abi {
    /// Seed RFC patch: `KVM_EXIT_COCO` (40), `struct kvm_exit_coco`, 32 bytes.
    CocoRfc = 1,
    /// Linux 7.0: `KVM_EXIT_SNP_REQ_CERTS` (43), `struct { u64 gpa, npages, ret; }`, 24 bytes.
    SnpReqCerts = 2,
}

/// Exit reason numbers the VMM sees in `kvm_run.exit_reason`.
pub const KVM_EXIT_COCO: u32 = 40;
/// Exit reason of the merged (Linux 7.0) ABI.
pub const KVM_EXIT_SNP_REQ_CERTS: u32 = 43;
/// `kvm_exit_coco.nr` of a certificate request.
pub const KVM_COCO_REQ_CERTS: u8 = 0;
/// `KVM_CAP_EXIT_COCO` bitmask bit of the certificate request sub-type.
pub const COCO_SUBTYPE_REQ_CERTS: u64 = 1 << KVM_COCO_REQ_CERTS;

/// Size of the seed ABI's `struct kvm_exit_coco`: `u8 nr; u8 pad0[7]; u32 ret; u32 pad1;`
/// then a union whose `req_certs` member `{ u64 gfn; u32 npages; }` is padded to 16 bytes.
pub const COCO_RFC_RECORD_SIZE: usize = 32;
/// Size of the merged ABI's record `{ u64 gpa; u64 npages; u64 ret; }`.
pub const SNP_REQ_CERTS_RECORD_SIZE: usize = 24;
/// Largest record any ABI has; the wire accepts no larger record.
pub const MAX_RECORD_SIZE: usize = 64;

/// Guest page size used by both ABIs for `gfn` and `npages`.
pub const PAGE_SIZE: u64 = 4096;

impl Abi {
    /// All ABIs this crate decodes, in tag order.
    pub const ALL: [Abi; 2] = [Abi::CocoRfc, Abi::SnpReqCerts];

    /// The ABI for a wire tag, if known.
    pub fn from_tag(tag: u32) -> Option<Abi> {
        Abi::ALL.into_iter().find(|abi| *abi as u32 == tag)
    }

    /// The wire tag.
    pub fn tag(self) -> u32 {
        self as u32
    }

    /// Size of this ABI's record.
    pub fn record_size(self) -> usize {
        match self {
            Abi::CocoRfc => COCO_RFC_RECORD_SIZE,
            Abi::SnpReqCerts => SNP_REQ_CERTS_RECORD_SIZE,
        }
    }

    /// Bit of this ABI in the capability bitmask (`1 << tag`).
    pub fn cap_bit(self) -> u64 {
        1 << self.tag()
    }
}

/// The only `ret` values KVM accepts from userspace for a certificate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CertsRet {
    /// Table written.
    Ok = 0,
    /// Transient: the guest retries (EAGAIN).
    Again = libc::EAGAIN as u32,
    /// The buffer is too small; `npages` holds the pages needed (ENOSPC).
    NoSpace = libc::ENOSPC as u32,
    /// Permanent failure (EIO). Linux guests then wipe their VMPCK.
    Io = libc::EIO as u32,
}

impl CertsRet {
    /// Decodes a `ret` value.
    pub fn from_raw(raw: u64) -> Option<CertsRet> {
        [
            CertsRet::Ok,
            CertsRet::Again,
            CertsRet::NoSpace,
            CertsRet::Io,
        ]
        .into_iter()
        .find(|r| *r as u64 == raw)
    }
}

/// A certificate request decoded from either record layout, in bytes and pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertsRequest {
    /// Guest physical address of the buffer.
    pub gpa: u64,
    /// Buffer size in 4 KiB pages.
    pub npages: u64,
}

/// Why a record could not be decoded as a certificate request.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// The record's length is not its ABI's.
    #[error("record is {got} bytes, ABI {abi:?} records are {want}")]
    Size {
        /// The ABI the record was tagged with.
        abi: Abi,
        /// The record's length.
        got: usize,
        /// The ABI's record length.
        want: usize,
    },
    /// A seed-ABI record of a sub-type other than REQ_CERTS.
    #[error("COCO exit sub-type {0} is not served")]
    SubType(u8),
    /// The seed ABI's gfn does not fit a 64-bit guest physical address.
    #[error("gfn {0:#x} overflows a guest physical address")]
    Gfn(u64),
}

// Field offsets, as the C compiler lays the structs out on x86-64.
const RFC_NR: usize = 0;
const RFC_RET: usize = 8;
const RFC_GFN: usize = 16;
const RFC_NPAGES: usize = 24;
const SNP_GPA: usize = 0;
const SNP_NPAGES: usize = 8;
const SNP_RET: usize = 16;

/// Decodes the certificate request carried by `record`.
pub fn decode_request(abi: Abi, record: &[u8]) -> Result<CertsRequest, RecordError> {
    if record.len() != abi.record_size() {
        return Err(RecordError::Size {
            abi,
            got: record.len(),
            want: abi.record_size(),
        });
    }
    match abi {
        Abi::CocoRfc => {
            if record[RFC_NR] != KVM_COCO_REQ_CERTS {
                return Err(RecordError::SubType(record[RFC_NR]));
            }
            let gfn = le_u64(record, RFC_GFN);
            let gpa = gfn.checked_mul(PAGE_SIZE).ok_or(RecordError::Gfn(gfn))?;
            Ok(CertsRequest {
                gpa,
                npages: u64::from(le_u32(record, RFC_NPAGES)),
            })
        }
        Abi::SnpReqCerts => Ok(CertsRequest {
            gpa: le_u64(record, SNP_GPA),
            npages: le_u64(record, SNP_NPAGES),
        }),
    }
}

/// Fills in the answer (`ret`, and `npages` when `ret` is ENOSPC) in place. Every other byte
/// stays as the kernel wrote it. `npages` saturates at the seed ABI's 32-bit field.
pub fn encode_answer(abi: Abi, record: &mut [u8], ret: CertsRet, npages: Option<u64>) {
    debug_assert_eq!(record.len(), abi.record_size());
    match abi {
        Abi::CocoRfc => {
            record[RFC_RET..RFC_RET + 4].copy_from_slice(&(ret as u32).to_le_bytes());
            if let Some(n) = npages {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                record[RFC_NPAGES..RFC_NPAGES + 4].copy_from_slice(&n.to_le_bytes());
            }
        }
        Abi::SnpReqCerts => {
            record[SNP_RET..SNP_RET + 8].copy_from_slice(&u64::from(ret as u32).to_le_bytes());
            if let Some(n) = npages {
                record[SNP_NPAGES..SNP_NPAGES + 8].copy_from_slice(&n.to_le_bytes());
            }
        }
    }
}

/// Builds a fresh record of `abi` for a request, as the kernel would (ret = 0).
pub fn build_request(abi: Abi, gpa: u64, npages: u64) -> Vec<u8> {
    let mut record = vec![0u8; abi.record_size()];
    match abi {
        Abi::CocoRfc => {
            record[RFC_NR] = KVM_COCO_REQ_CERTS;
            record[RFC_GFN..RFC_GFN + 8].copy_from_slice(&(gpa / PAGE_SIZE).to_le_bytes());
            let n = u32::try_from(npages).unwrap_or(u32::MAX);
            record[RFC_NPAGES..RFC_NPAGES + 4].copy_from_slice(&n.to_le_bytes());
        }
        Abi::SnpReqCerts => {
            record[SNP_GPA..SNP_GPA + 8].copy_from_slice(&gpa.to_le_bytes());
            record[SNP_NPAGES..SNP_NPAGES + 8].copy_from_slice(&npages.to_le_bytes());
        }
    }
    record
}

/// Reads the answer from a record: (`ret`, `npages`). `ret` is raw so that a caller can see a
/// value outside the four legal ones.
pub fn read_answer(abi: Abi, record: &[u8]) -> Result<(u64, u64), RecordError> {
    if record.len() != abi.record_size() {
        return Err(RecordError::Size {
            abi,
            got: record.len(),
            want: abi.record_size(),
        });
    }
    Ok(match abi {
        Abi::CocoRfc => (
            u64::from(le_u32(record, RFC_RET)),
            u64::from(le_u32(record, RFC_NPAGES)),
        ),
        Abi::SnpReqCerts => (le_u64(record, SNP_RET), le_u64(record, SNP_NPAGES)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_layout_matches_c_struct() {
        // struct kvm_exit_coco { __u8 nr; __u8 pad0[7]; __u32 ret; __u32 pad1;
        //   union { struct { __u64 gfn; __u32 npages; } req_certs; }; }
        let mut rec = vec![0u8; 32];
        rec[16..24].copy_from_slice(&0x1234u64.to_le_bytes());
        rec[24..28].copy_from_slice(&3u32.to_le_bytes());
        let req = decode_request(Abi::CocoRfc, &rec).expect("valid record");
        assert_eq!(
            req,
            CertsRequest {
                gpa: 0x1234 * 4096,
                npages: 3
            }
        );
        encode_answer(Abi::CocoRfc, &mut rec, CertsRet::NoSpace, Some(7));
        assert_eq!(&rec[8..12], &28u32.to_le_bytes());
        assert_eq!(&rec[24..28], &7u32.to_le_bytes());
        assert_eq!(read_answer(Abi::CocoRfc, &rec), Ok((28, 7)));
        assert_eq!(build_request(Abi::CocoRfc, 0x1234 * 4096, 3)[16..28], {
            let mut b = [0u8; 12];
            b[..8].copy_from_slice(&0x1234u64.to_le_bytes());
            b[8..].copy_from_slice(&3u32.to_le_bytes());
            b
        });
    }

    #[test]
    fn snp_layout_matches_c_struct() {
        let mut rec = vec![0u8; 24];
        rec[0..8].copy_from_slice(&0x5000u64.to_le_bytes());
        rec[8..16].copy_from_slice(&2u64.to_le_bytes());
        let req = decode_request(Abi::SnpReqCerts, &rec).expect("valid record");
        assert_eq!(
            req,
            CertsRequest {
                gpa: 0x5000,
                npages: 2
            }
        );
        encode_answer(Abi::SnpReqCerts, &mut rec, CertsRet::Again, None);
        assert_eq!(&rec[16..24], &11u64.to_le_bytes());
        assert_eq!(
            &rec[8..16],
            &2u64.to_le_bytes(),
            "npages untouched unless ENOSPC"
        );
    }

    #[test]
    fn rejects_wrong_sizes_subtypes_and_gfn_overflow() {
        assert!(matches!(
            decode_request(Abi::SnpReqCerts, &[0u8; 23]),
            Err(RecordError::Size { .. })
        ));
        let mut rec = vec![0u8; 32];
        rec[0] = 1;
        assert_eq!(
            decode_request(Abi::CocoRfc, &rec),
            Err(RecordError::SubType(1))
        );
        rec[0] = 0;
        rec[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode_request(Abi::CocoRfc, &rec),
            Err(RecordError::Gfn(u64::MAX))
        );
    }

    #[test]
    fn ret_values_are_the_four_kvm_accepts() {
        assert_eq!(CertsRet::from_raw(0), Some(CertsRet::Ok));
        assert_eq!(CertsRet::from_raw(11), Some(CertsRet::Again));
        assert_eq!(CertsRet::from_raw(28), Some(CertsRet::NoSpace));
        assert_eq!(CertsRet::from_raw(5), Some(CertsRet::Io));
        assert_eq!(CertsRet::from_raw(22), None);
    }
}
