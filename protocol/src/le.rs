//! Little-endian fields read at an offset of a buffer whose length the caller has checked:
//! shared by the framing (`wire`) and the exit records (`exit`), which depend on nothing else of
//! each other's.

/// The `u32` at byte `at` of `b`.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// The `u64` at byte `at` of `b`.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
