//! The two kernel exit records for a certificate request, laid out by hand from the C structs
//! (not from the protocol crate), as the kernel writes them into `kvm_run`'s exit union.

/// Offset of the exit union in `struct kvm_run` on x86-64 (after `apic_base`).
pub const KVM_RUN_EXIT_UNION: usize = 32;
/// Size of the exit union (its `char padding[256]` member).
pub const KVM_RUN_EXIT_UNION_SIZE: usize = 256;

/// Which kernel ABI the exit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelAbi {
    /// The seed RFC patch: `KVM_EXIT_COCO` (40) with
    /// `struct kvm_exit_coco { __u8 nr; __u8 pad0[7]; __u32 ret; __u32 pad1;
    /// union { struct { __u64 gfn; __u32 npages; } req_certs; }; }`: 32 bytes,
    /// nr@0, ret@8, gfn@16, npages@24, and 4 bytes of tail padding.
    SeedRfc,
    /// Linux 7.0: `KVM_EXIT_SNP_REQ_CERTS` (43) with
    /// `struct { __u64 gpa; __u64 npages; __u64 ret; }`: 24 bytes, gpa@0, npages@8, ret@16.
    Linux70,
}

impl KernelAbi {
    /// Both, for tests that run each scenario under each ABI.
    pub const BOTH: [KernelAbi; 2] = [KernelAbi::SeedRfc, KernelAbi::Linux70];

    /// The ABI tag of the channel (docs/protocol.md 6.3).
    pub fn tag(self) -> u32 {
        match self {
            KernelAbi::SeedRfc => 1,
            KernelAbi::Linux70 => 2,
        }
    }

    /// `kvm_run.exit_reason` of a certificate request.
    pub fn exit_reason(self) -> u32 {
        match self {
            KernelAbi::SeedRfc => 40,
            KernelAbi::Linux70 => 43,
        }
    }

    /// The ABI of an exit reason.
    pub fn from_exit_reason(reason: u32) -> Option<KernelAbi> {
        KernelAbi::BOTH
            .into_iter()
            .find(|a| a.exit_reason() == reason)
    }

    /// Bytes of the record.
    pub fn record_size(self) -> usize {
        match self {
            KernelAbi::SeedRfc => 32,
            KernelAbi::Linux70 => 24,
        }
    }

    /// Offset and width of `ret`.
    pub fn ret_field(self) -> (usize, usize) {
        match self {
            KernelAbi::SeedRfc => (8, 4),
            KernelAbi::Linux70 => (16, 8),
        }
    }

    /// Offset and width of `npages`.
    pub fn npages_field(self) -> (usize, usize) {
        match self {
            KernelAbi::SeedRfc => (24, 4),
            KernelAbi::Linux70 => (8, 8),
        }
    }

    /// Writes a request into `record` (the start of the exit union) the way the kernel does:
    /// field by field, leaving padding as it was. `None` when the kernel could not express it
    /// (a gpa that is not page-aligned, or npages too wide for the seed ABI's u32).
    pub fn write_request(self, record: &mut [u8], gpa: u64, npages: u64) -> Option<()> {
        if gpa % 4096 != 0 || record.len() < self.record_size() {
            return None;
        }
        match self {
            KernelAbi::SeedRfc => {
                record[0] = 0; //                                      nr = REQ_CERTS
                record[8..12].copy_from_slice(&0u32.to_le_bytes()); // ret
                record[16..24].copy_from_slice(&(gpa / 4096).to_le_bytes()); // gfn
                let n = u32::try_from(npages).ok()?;
                record[24..28].copy_from_slice(&n.to_le_bytes()); //  npages
            }
            KernelAbi::Linux70 => {
                record[0..8].copy_from_slice(&gpa.to_le_bytes());
                record[8..16].copy_from_slice(&npages.to_le_bytes());
                record[16..24].copy_from_slice(&0u64.to_le_bytes());
            }
        }
        Some(())
    }

    /// Reads (`ret`, `npages`) from an answered record, as the kernel's completion does.
    pub fn read_answer(self, record: &[u8]) -> Option<(u64, u64)> {
        Some((
            field(record, self.ret_field())?,
            field(record, self.npages_field())?,
        ))
    }

    /// The record the sidecar must answer for `request`: the same bytes with `ret` set and,
    /// when `npages` is given, `npages` set. Widths as in the C struct.
    pub fn expected_answer(self, request: &[u8], ret: u64, npages: Option<u64>) -> Vec<u8> {
        let mut out = request.to_vec();
        let mut put = |(at, width): (usize, usize), v: u64| {
            if let Some(dst) = out.get_mut(at..at + width) {
                dst.copy_from_slice(&v.to_le_bytes()[..width]);
            }
        };
        put(self.ret_field(), ret);
        if let Some(n) = npages {
            put(self.npages_field(), n);
        }
        out
    }
}

fn field(record: &[u8], (at, width): (usize, usize)) -> Option<u64> {
    let src = record.get(at..at + width)?;
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(src);
    Some(u64::from_le_bytes(v))
}
