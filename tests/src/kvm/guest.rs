//! The guest: a small 32-bit protected-mode program (flat segments, no paging, interrupts off)
//! that asks for its certificates the way the Linux SNP guest driver does and checks the table
//! it gets from inside the VM.
//!
//! It is assembled here, at test time, by a tiny x86 encoder: each emitter writes the bytes of
//! one instruction form (encodings from the Intel SDM, noted beside each), and jumps are `rel32`
//! resolved from labels. The program never stores to memory and uses no stack, so after it ran
//! guest RAM holds only what the VMM and the sidecar put there.
//!
//! # The guest's side of the harness ABI
//!
//! At reset the VMM loads `ESI` = gpa of this vCPU's certificate buffer, `EBX` = pages of the
//! first request (0 for the size probe, as the brief's driver flow asks; 4 for Linux's usual
//! 16 KiB buffer) and `EDI` = how many requests the guest may make before it gives up.
//!
//! - `OUT PORT_REQ` is the stand-in for the VMGEXIT of an SNP Extended Guest Request:
//!   `EAX` = buffer gpa and `EBX` = npages, as Linux puts them in the GHCB's RAX and RBX. The
//!   VMM answers in `EDX` (`ret`, the stand-in for `sw_exit_info_2`) and, on ENOSPC only,
//!   `EBX` = pages needed, which is where KVM puts them (GHCB RBX).
//! - `OUT PORT_DELAY`: the guest backs off after EAGAIN (Linux sleeps 2 s; the VMM sleeps a
//!   configurable, short time).
//! - `OUT PORT_NOSPACE, EAX`: the page count the guest learned from an ENOSPC answer.
//! - `OUT PORT_ENTRY, EAX`: seven dwords per table entry: the GUID's 16 bytes as 4 dwords (as
//!   they sit in memory), `offset`, `length`, and the FNV-1a 32 checksum of the entry's data.
//! - `OUT PORT_END, EAX`: the byte offset of the all-zero terminator, then `HLT`.
//! - `OUT PORT_FAIL, EAX`: a failure code (below, or an unexpected `ret` value), then `HLT`.

use std::collections::HashMap;

/// Certificate request ("VMGEXIT").
pub const PORT_REQ: u16 = 0x10;
/// Back-off after EAGAIN.
pub const PORT_DELAY: u16 = 0x11;
/// Page count learned from ENOSPC.
pub const PORT_NOSPACE: u16 = 0x12;
/// One dword of a table entry report.
pub const PORT_ENTRY: u16 = 0x13;
/// Terminator found: its byte offset.
pub const PORT_END: u16 = 0x14;
/// The guest failed: a code.
pub const PORT_FAIL: u16 = 0x15;

/// Failure code: the request budget ran out (EAGAIN for too long).
pub const FAIL_BUDGET: u32 = 0x1000;
/// Failure code: ENOSPC asked for 0 pages or more than [`MAX_PAGES`].
pub const FAIL_SIZE: u32 = 0x1001;
/// Failure code: an entry or its data lies outside the buffer.
pub const FAIL_TABLE: u32 = 0x1002;

/// Largest buffer the guest offers, in pages: Linux's `SEV_FW_BLOB_MAX_SIZE` (16 KiB).
pub const MAX_PAGES: u32 = 4;

/// FNV-1a 32-bit offset basis.
pub const FNV_OFFSET: u32 = 0x811c_9dc5;
/// FNV-1a 32-bit prime.
pub const FNV_PRIME: u32 = 0x0100_0193;

const EAX: u8 = 0;
const ECX: u8 = 1;
const EDX: u8 = 2;
const EBX: u8 = 3;
const EBP: u8 = 5;
const ESI: u8 = 6;
const EDI: u8 = 7;

/// Condition codes (the low nibble of `0F 8x` Jcc).
#[derive(Debug, Clone, Copy)]
enum Cc {
    /// CF=1 (unsigned below / carry).
    C = 0x2,
    /// ZF=1.
    E = 0x4,
    /// ZF=0.
    Ne = 0x5,
    /// CF=0 and ZF=0 (unsigned above).
    A = 0x7,
}

/// A minimal x86 (32-bit operand size) encoder with labels.
#[derive(Debug, Default)]
struct Asm {
    code: Vec<u8>,
    labels: HashMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

fn modrm(md: u8, reg: u8, rm: u8) -> u8 {
    (md << 6) | (reg << 3) | rm
}

impl Asm {
    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.code.len());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    fn imm32(&mut self, v: u32) {
        self.code.extend_from_slice(&v.to_le_bytes());
    }

    /// `mov r32, imm32`: B8+rd id.
    fn mov_imm(&mut self, r: u8, v: u32) {
        self.bytes(&[0xb8 + r]);
        self.imm32(v);
    }

    /// `mov dst, src`: 89 /r (MOV r/m32, r32).
    fn mov(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x89, modrm(3, src, dst)]);
    }

    /// `add dst, src`: 01 /r.
    fn add(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x01, modrm(3, src, dst)]);
    }

    /// `sub dst, src`: 29 /r.
    fn sub(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x29, modrm(3, src, dst)]);
    }

    /// `xor dst, src`: 31 /r.
    fn xor(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x31, modrm(3, src, dst)]);
    }

    /// `test a, b`: 85 /r.
    fn test(&mut self, a: u8, b: u8) {
        self.bytes(&[0x85, modrm(3, b, a)]);
    }

    /// `cmp a, b` (flags of a - b): 39 /r (CMP r/m32, r32).
    fn cmp(&mut self, a: u8, b: u8) {
        self.bytes(&[0x39, modrm(3, b, a)]);
    }

    /// `cmp r32, imm32`: 81 /7 id.
    fn cmp_imm(&mut self, r: u8, v: u32) {
        self.bytes(&[0x81, modrm(3, 7, r)]);
        self.imm32(v);
    }

    /// `add r32, imm32`: 81 /0 id.
    fn add_imm(&mut self, r: u8, v: u32) {
        self.bytes(&[0x81, modrm(3, 0, r)]);
        self.imm32(v);
    }

    /// `shl r32, imm8`: C1 /4 ib.
    fn shl(&mut self, r: u8, n: u8) {
        self.bytes(&[0xc1, modrm(3, 4, r), n]);
    }

    /// `inc r32`: 40+rd (one byte in 32-bit mode).
    fn inc(&mut self, r: u8) {
        self.bytes(&[0x40 + r]);
    }

    /// `dec r32`: 48+rd.
    fn dec(&mut self, r: u8) {
        self.bytes(&[0x48 + r]);
    }

    /// `mov dst, [base + disp8]`: 8B /r, mod=01. `base` must not be ESP (that needs a SIB).
    fn load(&mut self, dst: u8, base: u8, disp: u8) {
        debug_assert_ne!(base, 4, "ESP as base needs a SIB byte");
        self.bytes(&[0x8b, modrm(1, dst, base), disp]);
    }

    /// `or dst, [base + disp8]`: 0B /r, mod=01.
    fn or_load(&mut self, dst: u8, base: u8, disp: u8) {
        debug_assert_ne!(base, 4, "ESP as base needs a SIB byte");
        self.bytes(&[0x0b, modrm(1, dst, base), disp]);
    }

    /// `movzx dst, byte [base + 0]`: 0F B6 /r, mod=01 disp8=0 (mod=00 with EBP means disp32).
    fn movzx_byte(&mut self, dst: u8, base: u8) {
        debug_assert_ne!(base, 4, "ESP as base needs a SIB byte");
        self.bytes(&[0x0f, 0xb6, modrm(1, dst, base), 0]);
    }

    /// `imul dst, src, imm32`: 69 /r id.
    fn imul_imm(&mut self, dst: u8, src: u8, v: u32) {
        self.bytes(&[0x69, modrm(3, dst, src)]);
        self.imm32(v);
    }

    /// `mov edx, port` then `out dx, al`: EE.
    fn out_al(&mut self, port: u16) {
        self.mov_imm(EDX, u32::from(port));
        self.bytes(&[0xee]);
    }

    /// `mov edx, port` then `out dx, eax`: EF.
    fn out_eax(&mut self, port: u16) {
        self.mov_imm(EDX, u32::from(port));
        self.bytes(&[0xef]);
    }

    /// `hlt`: F4.
    fn hlt(&mut self) {
        self.bytes(&[0xf4]);
    }

    /// `jmp rel32`: E9 cd.
    fn jmp(&mut self, to: &'static str) {
        self.bytes(&[0xe9]);
        self.fixup(to);
    }

    /// `jcc rel32`: 0F 80+cc cd.
    fn jcc(&mut self, cc: Cc, to: &'static str) {
        self.bytes(&[0x0f, 0x80 + cc as u8]);
        self.fixup(to);
    }

    fn fixup(&mut self, to: &'static str) {
        self.fixups.push((self.code.len(), to));
        self.imm32(0);
    }

    /// Resolves the jumps: rel32 counts from the end of the 4-byte displacement.
    fn finish(mut self) -> Result<Program, String> {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = *self
                .labels
                .get(to)
                .ok_or_else(|| format!("guest program: undefined label {to}"))?;
            let rel = target as i64 - (at as i64 + 4);
            let rel =
                i32::try_from(rel).map_err(|_| format!("guest program: {to} out of reach"))?;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        let after_request = *self
            .labels
            .get("after_request")
            .ok_or("guest program: no after_request label")?;
        Ok(Program {
            code: self.code,
            after_request,
        })
    }
}

/// The assembled guest program.
#[derive(Debug, Clone)]
pub struct Program {
    /// Machine code.
    pub code: Vec<u8>,
    /// Offset of the instruction after the request's `OUT`: where RIP is once KVM completed
    /// the exit, and before the guest ran on.
    pub after_request: usize,
}

/// Assembles the guest program. It uses only relative jumps, so it runs wherever the VMM
/// loads it.
pub fn program() -> Result<Program, String> {
    let mut a = Asm::default();

    // ---- ask for the certificates, like snp_issue_guest_request() does ----
    a.label("request");
    a.mov(EAX, ESI); //                  RAX = buffer gpa
    a.out_al(PORT_REQ); //               "VMGEXIT": EBX = npages; answer in EDX (+EBX)
    a.label("after_request");
    a.dec(EDI); //                       one request spent
    a.cmp_imm(EDX, 0);
    a.jcc(Cc::E, "table");
    a.cmp_imm(EDX, libc::ENOSPC as u32);
    a.jcc(Cc::E, "nospace");
    a.cmp_imm(EDX, libc::EAGAIN as u32);
    a.jcc(Cc::E, "again");
    a.mov(EAX, EDX); //                  anything else (EIO): report the ret itself
    a.jmp("fail");

    // ENOSPC: EBX = pages needed. Report it, refuse 0 or more than Linux's 4 pages, retry.
    a.label("nospace");
    a.mov(EAX, EBX);
    a.out_eax(PORT_NOSPACE);
    a.cmp_imm(EBX, MAX_PAGES);
    a.jcc(Cc::A, "bad_size");
    a.test(EBX, EBX);
    a.jcc(Cc::E, "bad_size");
    a.jmp("budget");

    // EAGAIN: back off, then ask again with the same buffer.
    a.label("again");
    a.out_al(PORT_DELAY);
    a.label("budget");
    a.test(EDI, EDI);
    a.jcc(Cc::Ne, "request");
    a.mov_imm(EAX, FAIL_BUDGET);
    a.jmp("fail");
    a.label("bad_size");
    a.mov_imm(EAX, FAIL_SIZE);
    a.jmp("fail");

    // ---- ret 0: walk the table in our own memory ----
    // ESI = table base, EBP = buffer bytes, EBX = entry pointer.
    a.label("table");
    a.mov(EBP, EBX);
    a.shl(EBP, 12);
    a.mov(EBX, ESI);
    a.label("entry");
    a.mov(EAX, EBX); //                  the entry must lie inside the buffer
    a.sub(EAX, ESI);
    a.add_imm(EAX, 24);
    a.cmp(EAX, EBP);
    a.jcc(Cc::A, "bad_table");
    a.load(EAX, EBX, 0); //              all 24 bytes zero: the terminator
    for disp in [4, 8, 12, 16, 20] {
        a.or_load(EAX, EBX, disp);
    }
    a.jcc(Cc::E, "end");
    for disp in [0, 4, 8, 12, 16, 20] {
        a.load(EAX, EBX, disp); //       GUID dwords, offset, length
        a.out_eax(PORT_ENTRY);
    }
    a.load(EDI, EBX, 16); //             EDI = offset
    a.load(ECX, EBX, 20); //             ECX = length
    a.mov(EAX, EDI); //                  offset + length must not wrap or pass the buffer
    a.add(EAX, ECX);
    a.jcc(Cc::C, "bad_table");
    a.cmp(EAX, EBP);
    a.jcc(Cc::A, "bad_table");
    a.add(EDI, ESI); //                  EDI = first data byte
    a.mov_imm(EAX, FNV_OFFSET);
    a.test(ECX, ECX);
    a.jcc(Cc::E, "hashed");
    a.label("hash"); //                  FNV-1a: h ^= byte; h *= prime
    a.movzx_byte(EDX, EDI);
    a.xor(EAX, EDX);
    a.imul_imm(EAX, EAX, FNV_PRIME);
    a.inc(EDI);
    a.dec(ECX);
    a.jcc(Cc::Ne, "hash");
    a.label("hashed");
    a.out_eax(PORT_ENTRY); //            the checksum, 7th dword
    a.add_imm(EBX, 24);
    a.jmp("entry");

    a.label("end");
    a.mov(EAX, EBX);
    a.sub(EAX, ESI);
    a.out_eax(PORT_END); //              terminator offset
    a.hlt();

    a.label("bad_table");
    a.mov_imm(EAX, FAIL_TABLE);
    a.label("fail");
    a.out_eax(PORT_FAIL);
    a.hlt();

    a.finish()
}

/// FNV-1a 32 over `data`, the checksum the guest computes.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(FNV_OFFSET, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(FNV_PRIME)
    })
}
