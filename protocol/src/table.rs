//! The GHCB certificate table that the guest receives.
//!
//! Layout: 24-byte entries `{ guid: [u8; 16], offset: u32 LE, length: u32 LE }`, ended by an
//! all-zero entry; offsets count from the start of the table; certificate bytes (DER) follow.
//! The blob file on the host *is* such a table, so validating the file validates what the guest
//! will see, and serving is a copy.

use std::fmt;

use thiserror::Error;

/// Size of one table entry, and of the terminator.
pub const ENTRY_SIZE: usize = 24;
/// The table of a host with no certificates: just the terminator.
pub const EMPTY_TABLE: [u8; ENTRY_SIZE] = [0; ENTRY_SIZE];
/// Linux guests never offer a certificate buffer larger than this (4 pages).
pub const LINUX_GUEST_MAX_BYTES: usize = 16 * 1024;
/// Largest table this crate builds or accepts. Well above anything real (a full chain is about
/// 5 KiB) and far below anything that could hurt a sidecar's memory.
pub const MAX_TABLE_BYTES: usize = 1 << 20;

/// A GUID in RFC 4122 byte order (the order of the hex digits in its string form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    pub fn parse(s: &str) -> Option<Guid> {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        if s.len() != 36 || hex.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).ok()?;
            out[i] = u8::from_str_radix(text, 16).ok()?;
        }
        Some(Guid(out))
    }

    const fn from_fields(a: u32, b: u16, c: u16, d: u16, e: u64) -> Guid {
        let a = a.to_be_bytes();
        let b = b.to_be_bytes();
        let c = c.to_be_bytes();
        let d = d.to_be_bytes();
        let e = e.to_be_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], e[2], e[3], e[4], e[5],
            e[6], e[7],
        ])
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a table entry holds, by GUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertKind {
    /// Versioned Chip Endorsement Key certificate.
    Vcek,
    /// Versioned Loaded Endorsement Key certificate.
    Vlek,
    /// AMD SEV Key (also holds an ASVK, which has no GUID of its own).
    Ask,
    /// AMD Root Key.
    Ark,
    /// Certificate revocation list.
    Crl,
}

impl CertKind {
    /// Every kind, in the order a built table lists them.
    pub const ALL: [CertKind; 5] = [
        CertKind::Ark,
        CertKind::Ask,
        CertKind::Vcek,
        CertKind::Vlek,
        CertKind::Crl,
    ];

    /// The GUID of this kind.
    pub const fn guid(self) -> Guid {
        match self {
            CertKind::Vcek => Guid::from_fields(0x63da758d, 0xe664, 0x4564, 0xadc5, 0xf4b93be8accd),
            CertKind::Vlek => Guid::from_fields(0xa8074bc2, 0xa25a, 0x483e, 0xaae6, 0x39c045a0b8a1),
            CertKind::Ask => Guid::from_fields(0x4ab7b379, 0xbbac, 0x4fe4, 0xa02f, 0x05aef327c782),
            CertKind::Ark => Guid::from_fields(0xc0b406a4, 0xa803, 0x4952, 0x9743, 0x3fb6014cd0ae),
            CertKind::Crl => Guid::from_fields(0x92f81bc3, 0x5811, 0x4d3d, 0x97ff, 0xd19f88dc67ea),
        }
    }

    /// The kind a GUID names, if any.
    pub fn from_guid(guid: Guid) -> Option<CertKind> {
        CertKind::ALL.into_iter().find(|k| k.guid() == guid)
    }

    /// Short lower-case name (`vcek`, `ask`, ...), as file names and logs use it.
    pub fn name(self) -> &'static str {
        match self {
            CertKind::Vcek => "vcek",
            CertKind::Vlek => "vlek",
            CertKind::Ask => "ask",
            CertKind::Ark => "ark",
            CertKind::Crl => "crl",
        }
    }
}

/// One entry of a parsed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertEntry {
    /// The entry's GUID.
    pub guid: Guid,
    /// Offset of the data from the start of the table.
    pub offset: u32,
    /// Length of the data.
    pub length: u32,
}

impl CertEntry {
    /// The kind its GUID names, if known.
    pub fn kind(&self) -> Option<CertKind> {
        CertKind::from_guid(self.guid)
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..self.offset as usize + self.length as usize
    }
}

/// A table that passed validation, with its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    bytes: Vec<u8>,
    entries: Vec<CertEntry>,
}

/// Why bytes are not a valid certificate table. Entry numbers count from 0.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TableError {
    /// Fewer bytes than the entries announce, or no terminator at all.
    #[error("no all-zero terminator entry within the {0} bytes")]
    NoTerminator(usize),
    /// The table is larger than [`MAX_TABLE_BYTES`].
    #[error("table is {0} bytes, more than the {MAX_TABLE_BYTES} accepted")]
    TooLarge(usize),
    /// An entry with length 0.
    #[error("entry {index} ({guid}) has length 0")]
    EmptyEntry {
        /// The entry's index in the list.
        index: usize,
        /// The entry's GUID.
        guid: Guid,
    },
    /// An entry whose data starts inside the entry list.
    #[error("entry {index} ({guid}) data at offset {offset} lies inside the entry list, which ends at {table_end}")]
    InsideHeader {
        /// The entry's index in the list.
        index: usize,
        /// The entry's GUID.
        guid: Guid,
        /// The entry's data offset.
        offset: u32,
        /// Where the entry list (with its terminator) ends.
        table_end: usize,
    },
    /// An entry whose data runs past the end of the bytes.
    #[error("entry {index} ({guid}) data {offset}+{length} runs past the end of the {size} bytes")]
    OutOfBounds {
        /// The entry's index in the list.
        index: usize,
        /// The entry's GUID.
        guid: Guid,
        /// The entry's data offset.
        offset: u32,
        /// The entry's data length.
        length: u32,
        /// The size of the bytes parsed.
        size: usize,
    },
    /// Two entries whose data overlap.
    #[error("entries {first} and {second} overlap")]
    Overlap {
        /// The index of the first entry.
        first: usize,
        /// The index of the second entry.
        second: usize,
    },
    /// The same GUID twice.
    #[error("entries {first} and {second} both carry GUID {guid}")]
    Duplicate {
        /// The index of the first entry.
        first: usize,
        /// The index of the second entry.
        second: usize,
        /// The GUID they share.
        guid: Guid,
    },
    /// Both a VCEK and a VLEK: a verifier expects exactly one of them.
    #[error("the table holds both a VCEK and a VLEK; verifiers expect exactly one")]
    VcekAndVlek,
    /// Bytes after the last certificate: a blob rewritten in place without truncation, or junk.
    #[error("{extra} bytes follow the last certificate (a torn or untruncated rewrite?)")]
    TrailingBytes {
        /// How many bytes.
        extra: usize,
    },
    /// A certificate entry whose bytes are not one DER SEQUENCE of exactly the entry's length.
    #[error("entry {index} ({kind}) is not a DER object of exactly {length} bytes: {why}")]
    NotDer {
        /// The entry's index in the list.
        index: usize,
        /// The kind of certificate its GUID names.
        kind: &'static str,
        /// The entry's data length.
        length: u32,
        /// What is wrong with the DER encoding.
        why: &'static str,
    },
    /// A certificate to build from is too large for a u32 length.
    #[error("certificate {0} is too large")]
    CertTooLarge(usize),
}

fn read_entry(bytes: &[u8], at: usize) -> CertEntry {
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&bytes[at..at + 16]);
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at + 16..at + 20]);
    let offset = u32::from_le_bytes(word);
    word.copy_from_slice(&bytes[at + 20..at + 24]);
    let length = u32::from_le_bytes(word);
    CertEntry {
        guid: Guid(guid),
        offset,
        length,
    }
}

/// Checks that `data` is exactly one DER TLV with tag SEQUENCE (every certificate and CRL is).
/// A full X.509 parse belongs to the blob tool; serving needs only to know that the entry is
/// not torn or padded, and this check costs nothing and needs no ASN.1 crate.
fn check_der_sequence(data: &[u8]) -> Result<(), &'static str> {
    let (&tag, rest) = data.split_first().ok_or("empty")?;
    if tag != 0x30 {
        return Err("does not start with a SEQUENCE tag (0x30)");
    }
    let (&first, rest) = rest.split_first().ok_or("truncated length")?;
    let (content_len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err("unsupported length encoding");
        }
        if rest.len() < n {
            return Err("truncated length");
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        if rest[0] == 0 || len < 0x80 {
            return Err("length is not minimally encoded (not DER)");
        }
        (len, &rest[n..])
    };
    match content_len.cmp(&rest.len()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err("truncated: the DER length is larger than the entry"),
        std::cmp::Ordering::Less => Err("bytes follow the DER object inside the entry"),
    }
}

// Steps of the duplicate and overlap checks (a sort key taken, a pair of neighbours compared),
// counted in tests so that they can see the work grow as n log n, not n squared, without
// timing anything.
#[cfg(test)]
thread_local! {
    static STEPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[inline]
fn count_step() {
    #[cfg(test)]
    STEPS.with(|s| s.set(s.get() + 1));
}

impl Table {
    /// Parses and validates `bytes` as a complete table: terminator, bounds, no overlaps, no
    /// zero lengths, no duplicate GUIDs, not both VCEK and VLEK, each known kind one DER
    /// SEQUENCE, nothing after the last certificate. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<Table, TableError> {
        if bytes.len() > MAX_TABLE_BYTES {
            return Err(TableError::TooLarge(bytes.len()));
        }
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            if at + ENTRY_SIZE > bytes.len() {
                return Err(TableError::NoTerminator(bytes.len()));
            }
            if bytes[at..at + ENTRY_SIZE] == EMPTY_TABLE {
                break;
            }
            entries.push(read_entry(bytes, at));
            at += ENTRY_SIZE;
        }
        let table_end = at + ENTRY_SIZE;
        let mut data_end = table_end;
        for (index, e) in entries.iter().enumerate() {
            if e.length == 0 {
                return Err(TableError::EmptyEntry {
                    index,
                    guid: e.guid,
                });
            }
            if (e.offset as usize) < table_end {
                return Err(TableError::InsideHeader {
                    index,
                    guid: e.guid,
                    offset: e.offset,
                    table_end,
                });
            }
            let end = e.offset as usize + e.length as usize;
            if end > bytes.len() {
                return Err(TableError::OutOfBounds {
                    index,
                    guid: e.guid,
                    offset: e.offset,
                    length: e.length,
                    size: bytes.len(),
                });
            }
            data_end = data_end.max(end);
        }
        // Sorting keeps these checks O(n log n): a table of many tiny entries must not take
        // quadratic time to validate. Among intervals sorted by start, any overlap shows
        // between neighbours.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_unstable_by_key(|&i| {
            count_step();
            (entries[i].guid, i)
        });
        if let Some(w) = order.windows(2).find(|w| {
            count_step();
            entries[w[0]].guid == entries[w[1]].guid
        }) {
            return Err(TableError::Duplicate {
                first: w[0],
                second: w[1],
                guid: entries[w[1]].guid,
            });
        }
        order.sort_unstable_by_key(|&i| {
            count_step();
            (entries[i].offset, i)
        });
        if let Some(w) = order.windows(2).find(|w| {
            count_step();
            entries[w[1]].range().start < entries[w[0]].range().end
        }) {
            return Err(TableError::Overlap {
                first: w[0].min(w[1]),
                second: w[0].max(w[1]),
            });
        }
        for (index, e) in entries.iter().enumerate() {
            if let Some(kind) = e.kind() {
                check_der_sequence(&bytes[e.range()]).map_err(|why| TableError::NotDer {
                    index,
                    kind: kind.name(),
                    length: e.length,
                    why,
                })?;
            }
        }
        let has = |k: CertKind| entries.iter().any(|e| e.kind() == Some(k));
        if has(CertKind::Vcek) && has(CertKind::Vlek) {
            return Err(TableError::VcekAndVlek);
        }
        if bytes.len() > data_end {
            return Err(TableError::TrailingBytes {
                extra: bytes.len() - data_end,
            });
        }
        Ok(Table {
            bytes: bytes.to_vec(),
            entries,
        })
    }

    /// Builds a table from `(guid, data)` pairs, in the given order, and validates it.
    pub fn build(certs: &[(Guid, &[u8])]) -> Result<Table, TableError> {
        let header = (certs.len() + 1) * ENTRY_SIZE;
        let mut bytes = vec![0u8; header];
        for (i, (guid, data)) in certs.iter().enumerate() {
            let offset =
                u32::try_from(bytes.len()).map_err(|_| TableError::TooLarge(bytes.len()))?;
            let length = u32::try_from(data.len()).map_err(|_| TableError::CertTooLarge(i))?;
            let at = i * ENTRY_SIZE;
            bytes[at..at + 16].copy_from_slice(&guid.0);
            bytes[at + 16..at + 20].copy_from_slice(&offset.to_le_bytes());
            bytes[at + 20..at + 24].copy_from_slice(&length.to_le_bytes());
            bytes.extend_from_slice(data);
            if bytes.len() > MAX_TABLE_BYTES {
                return Err(TableError::TooLarge(bytes.len()));
            }
        }
        Table::parse(&bytes)
    }

    /// The empty table: no certificates, just the terminator.
    pub fn empty() -> Table {
        Table {
            bytes: EMPTY_TABLE.to_vec(),
            entries: Vec::new(),
        }
    }

    /// The table's bytes, exactly as the guest receives them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Consumes the table, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The entries, in table order (without the terminator).
    pub fn entries(&self) -> &[CertEntry] {
        &self.entries
    }

    /// The data of one entry.
    pub fn data(&self, entry: &CertEntry) -> &[u8] {
        &self.bytes[entry.range()]
    }

    /// Pages the guest must offer to receive this table.
    pub fn pages(&self) -> u64 {
        pages_for(self.bytes.len())
    }
}

/// `ceil(bytes / 4096)`: the exact page count ENOSPC reports.
pub fn pages_for(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(crate::exit::PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DER SEQUENCE of `len` bytes in all, with a minimally encoded length.
    fn der(len: usize, fill: u8) -> Vec<u8> {
        let mut v = match len {
            0..=129 => vec![0x30, (len - 2) as u8],
            130..=258 => vec![0x30, 0x81, (len - 3) as u8],
            _ => vec![0x30, 0x82, ((len - 4) >> 8) as u8, (len - 4) as u8],
        };
        v.resize(len, fill);
        v
    }

    #[test]
    fn guids_match_their_strings() {
        assert_eq!(
            CertKind::Vcek.guid().to_string(),
            "63da758d-e664-4564-adc5-f4b93be8accd"
        );
        assert_eq!(
            CertKind::Vlek.guid().to_string(),
            "a8074bc2-a25a-483e-aae6-39c045a0b8a1"
        );
        assert_eq!(
            CertKind::Ask.guid().to_string(),
            "4ab7b379-bbac-4fe4-a02f-05aef327c782"
        );
        assert_eq!(
            CertKind::Ark.guid().to_string(),
            "c0b406a4-a803-4952-9743-3fb6014cd0ae"
        );
        assert_eq!(
            CertKind::Crl.guid().to_string(),
            "92f81bc3-5811-4d3d-97ff-d19f88dc67ea"
        );
        assert_eq!(
            Guid::parse("63da758d-e664-4564-adc5-f4b93be8accd"),
            Some(CertKind::Vcek.guid())
        );
        assert_eq!(CertKind::Vcek.guid().0[..4], [0x63, 0xda, 0x75, 0x8d]);
        assert_eq!(Guid::parse("63da758d-e664-4564-adc5-f4b93be8acc"), None);
    }

    #[test]
    fn build_then_parse_round_trips() {
        let ark = der(600, 1);
        let vcek = der(300, 2);
        let t = Table::build(&[(CertKind::Ark.guid(), &ark), (CertKind::Vcek.guid(), &vcek)])
            .expect("valid");
        let b = t.as_bytes();
        assert_eq!(b.len(), 3 * 24 + 600 + 300);
        assert_eq!(&b[16..20], &72u32.to_le_bytes());
        assert_eq!(&b[20..24], &600u32.to_le_bytes());
        assert_eq!(&b[24 + 16..24 + 20], &672u32.to_le_bytes());
        assert_eq!(&b[48..72], &[0u8; 24]);
        assert_eq!(t.data(&t.entries()[1]), &vcek[..]);
        assert_eq!(Table::parse(b).expect("reparse"), t);
        assert_eq!(t.pages(), 1);
    }

    #[test]
    fn empty_table_is_the_terminator() {
        assert_eq!(Table::parse(&[0u8; 24]).expect("valid").entries().len(), 0);
        assert_eq!(Table::empty().as_bytes(), &[0u8; 24]);
        assert_eq!(Table::empty().pages(), 1);
    }

    #[test]
    fn page_counts_are_exact() {
        assert_eq!(pages_for(4096), 1);
        assert_eq!(pages_for(4097), 2);
        assert_eq!(pages_for(8192), 2);
        assert_eq!(pages_for(1), 1);
    }

    fn valid() -> Vec<u8> {
        Table::build(&[
            (CertKind::Ask.guid(), &der(200, 3)),
            (CertKind::Vcek.guid(), &der(200, 4)),
        ])
        .expect("valid")
        .into_bytes()
    }

    fn set_entry(b: &mut [u8], i: usize, offset: u32, length: u32) {
        b[i * 24 + 16..i * 24 + 20].copy_from_slice(&offset.to_le_bytes());
        b[i * 24 + 20..i * 24 + 24].copy_from_slice(&length.to_le_bytes());
    }

    #[test]
    fn every_malformation_has_its_error() {
        let good = valid();
        assert!(matches!(
            Table::parse(&good[..40]),
            Err(TableError::NoTerminator(40))
        ));
        assert!(matches!(
            Table::parse(&[]),
            Err(TableError::NoTerminator(0))
        ));

        let mut b = good.clone();
        set_entry(&mut b, 0, 72, 0);
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::EmptyEntry { index: 0, .. })
        ));

        let mut b = good.clone();
        set_entry(&mut b, 1, 10, 200);
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::InsideHeader { index: 1, .. })
        ));

        let mut b = good.clone();
        set_entry(&mut b, 1, 272, u32::MAX);
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::OutOfBounds { index: 1, .. })
        ));

        let mut b = good.clone();
        set_entry(&mut b, 1, 100, 200);
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::Overlap {
                first: 0,
                second: 1
            })
        ));

        let mut b = good.clone();
        b[24..40].copy_from_slice(&CertKind::Ask.guid().0);
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::Duplicate { .. })
        ));

        let mut b = good.clone();
        b.push(0);
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::TrailingBytes { extra: 1 })
        ));

        let mut b = good.clone();
        b[72] = 0x04;
        assert!(matches!(
            Table::parse(&b),
            Err(TableError::NotDer { index: 0, .. })
        ));

        let both = Table::build(&[
            (CertKind::Vcek.guid(), &der(200, 1)),
            (CertKind::Vlek.guid(), &der(200, 2)),
        ]);
        assert_eq!(both, Err(TableError::VcekAndVlek));

        assert!(matches!(
            Table::parse(&vec![0u8; MAX_TABLE_BYTES + 1]),
            Err(TableError::TooLarge(_))
        ));
    }

    #[test]
    fn der_check_catches_padding_and_truncation() {
        assert!(check_der_sequence(&der(200, 0)).is_ok());
        let mut padded = der(200, 0);
        padded.push(0);
        assert!(check_der_sequence(&padded).is_err());
        assert!(check_der_sequence(&der(200, 0)[..199]).is_err());
        assert!(
            check_der_sequence(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5]).is_err(),
            "non-minimal"
        );
        assert!(check_der_sequence(&[0x30, 0x03, 1, 2, 3]).is_ok());
    }

    /// A valid table of `n` one-byte entries of distinct unknown GUIDs, in scrambled order.
    fn tiny_entries(n: u32) -> Vec<u8> {
        let guids: Vec<Guid> = (0..n)
            .map(|i| {
                let mut g = [0x11u8; 16];
                // An odd multiplier permutes the u32s: distinct GUIDs, not in order.
                g[..4].copy_from_slice(&i.wrapping_mul(0x9e37_79b1).to_be_bytes());
                Guid(g)
            })
            .collect();
        let certs: Vec<(Guid, &[u8])> = guids.iter().map(|g| (*g, &b"x"[..])).collect();
        Table::build(&certs).expect("valid").into_bytes()
    }

    /// Steps of the duplicate and overlap checks that validating `bytes` takes.
    fn steps_to_parse(bytes: &[u8]) -> u64 {
        STEPS.with(|s| s.set(0));
        assert!(Table::parse(bytes).is_ok());
        STEPS.with(|s| s.get())
    }

    #[test]
    fn many_tiny_entries_validate_without_quadratic_time() {
        // From 1,000 to 40,000 entries (the most a 1 MiB table holds), n log n work grows
        // about 61-fold (40 * log 40,000 / log 1,000), pairwise checks 1,600-fold.
        let (small, large) = (tiny_entries(1_000), tiny_entries(40_000));
        assert!(large.len() <= MAX_TABLE_BYTES);
        let (few, many) = (steps_to_parse(&small), steps_to_parse(&large));
        assert!(few >= 2 * 1_000, "{few} steps for 1,000 entries");
        assert!(
            many < 120 * few,
            "{many} steps for 40,000 entries against {few} for 1,000"
        );
        // An overlap far apart in the list is still found: entry 39,999 points at entry 5's
        // byte.
        let mut b = large;
        let five = &b[5 * ENTRY_SIZE + 16..5 * ENTRY_SIZE + 20].to_vec();
        let at = 39_999 * ENTRY_SIZE + 16;
        b[at..at + 4].copy_from_slice(five);
        assert_eq!(
            Table::parse(&b),
            Err(TableError::Overlap {
                first: 5,
                second: 39_999
            })
        );
    }

    #[test]
    fn unknown_guids_are_carried_without_der_check() {
        let other = Guid::parse("11111111-2222-3333-4444-555555555555").expect("guid");
        let t = Table::build(&[(other, b"opaque")]).expect("valid");
        assert_eq!(t.entries()[0].kind(), None);
    }
}
