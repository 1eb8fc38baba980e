//! Certificate blobs for the harness, built and read by hand, independently of the protocol
//! crate's table code, so that the expectations the tests check do not come from the code
//! under test.

use super::guest::fnv1a32;

/// GUIDs as the GHCB table stores them: RFC 4122 byte order, i.e. the hex digits of the text
/// form, in order.
pub const GUID_VCEK: &str = "63da758d-e664-4564-adc5-f4b93be8accd";
/// AMD SEV Key.
pub const GUID_ASK: &str = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
/// AMD Root Key.
pub const GUID_ARK: &str = "c0b406a4-a803-4952-9743-3fb6014cd0ae";

/// The 16 bytes of a GUID in its text form (`None` if it is not one).
pub fn guid_bytes(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    if text.len() != 36 || hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// One entry as a table walk sees it, with the FNV-1a 32 of its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// GUID bytes as stored.
    pub guid: [u8; 16],
    /// Offset of the data from the table's start.
    pub offset: u32,
    /// Length of the data.
    pub length: u32,
    /// FNV-1a 32 over the data.
    pub fnv: u32,
}

/// A DER SEQUENCE of exactly `len` bytes (long form, two length bytes), its content a byte
/// pattern that differs per `seed` so that every certificate has its own checksum.
pub fn der(len: usize, seed: u8) -> Option<Vec<u8>> {
    let content = len.checked_sub(4)?;
    if !(0x100..=0xffff).contains(&content) {
        return None;
    }
    let mut v = vec![0x30, 0x82, (content >> 8) as u8, content as u8];
    v.extend((0..content).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    Some(v)
}

/// Lays out a GHCB certificate table by hand: entries, the 24-byte zero terminator, then the
/// data of each entry in order.
pub fn build(certs: &[([u8; 16], Vec<u8>)]) -> Option<Vec<u8>> {
    let mut offset = (certs.len() + 1) * 24;
    let mut head = Vec::new();
    let mut data = Vec::new();
    for (guid, bytes) in certs {
        head.extend_from_slice(guid);
        head.extend_from_slice(&u32::try_from(offset).ok()?.to_le_bytes());
        head.extend_from_slice(&u32::try_from(bytes.len()).ok()?.to_le_bytes());
        data.extend_from_slice(bytes);
        offset += bytes.len();
    }
    head.extend_from_slice(&[0u8; 24]);
    head.extend_from_slice(&data);
    Some(head)
}

/// An ARK, ASK and VCEK chain whose table is exactly `total` bytes.
pub fn chain_of_size(total: usize) -> Option<Vec<u8>> {
    let data = total.checked_sub(4 * 24)?;
    let (ark, ask) = (data / 3, data / 3);
    let vcek = data - ark - ask;
    build(&[
        (guid_bytes(GUID_ARK)?, der(ark, 0x11)?),
        (guid_bytes(GUID_ASK)?, der(ask, 0x22)?),
        (guid_bytes(GUID_VCEK)?, der(vcek, 0x33)?),
    ])
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Walks a table the way the guest does: entries until the all-zero one, with checksums.
/// Returns the entries and the terminator's offset, or `None` if the table is malformed.
pub fn walk(table: &[u8]) -> Option<(Vec<Entry>, usize)> {
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let raw = table.get(at..at + 24)?;
        if raw.iter().all(|b| *b == 0) {
            return Some((entries, at));
        }
        let offset = u32_at(raw, 16)?;
        let length = u32_at(raw, 20)?;
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(length).ok()?)?;
        entries.push(Entry {
            guid: raw[..16].try_into().ok()?,
            offset,
            length,
            fnv: fnv1a32(table.get(start..end)?),
        });
        at += 24;
    }
}

/// Pages a table of `len` bytes needs: ceil(len / 4096).
pub fn pages_for(len: usize) -> u64 {
    (len as u64).div_ceil(4096)
}
