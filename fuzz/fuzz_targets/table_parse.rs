//! The blob parser: `Table::parse` on arbitrary bytes. An accepted table must satisfy every
//! rule of docs/protocol.md section 7 when checked independently here, and rebuilding it from
//! its entries must give a valid table with the same certificates.
#![no_main]

use coco_protocol::table::{pages_for, Table, EMPTY_TABLE, MAX_TABLE_BYTES};
use coco_protocol::CertKind;
use libfuzzer_sys::fuzz_target;

const ENTRY: usize = 24;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = Table::parse(data) else {
        return;
    };
    assert_eq!(t.as_bytes(), data);
    assert!(data.len() <= MAX_TABLE_BYTES);
    let n = t.entries().len();
    let list_end = (n + 1) * ENTRY;
    assert_eq!(&data[n * ENTRY..list_end], &EMPTY_TABLE[..], "terminator");
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut last_end = list_end;
    for (i, e) in t.entries().iter().enumerate() {
        let (start, len) = (e.offset as usize, e.length as usize);
        assert!(len > 0 && start >= list_end && start + len <= data.len());
        assert!(
            t.entries()[..i].iter().all(|o| o.guid != e.guid),
            "duplicate GUID accepted"
        );
        assert!(
            ranges
                .iter()
                .all(|(s, l)| start + len <= *s || s + l <= start),
            "overlap accepted"
        );
        ranges.push((start, len));
        last_end = last_end.max(start + len);
        let d = t.data(e);
        assert_eq!(d.len(), len);
        if e.kind().is_some() {
            assert_eq!(d[0], 0x30, "a known kind is a DER SEQUENCE");
        }
    }
    assert_eq!(last_end, data.len(), "nothing after the last certificate");
    let has = |k| t.entries().iter().any(|e| e.kind() == Some(k));
    assert!(!(has(CertKind::Vcek) && has(CertKind::Vlek)));
    assert_eq!(t.pages(), pages_for(data.len()));

    let certs: Vec<_> = t.entries().iter().map(|e| (e.guid, t.data(e))).collect();
    let rebuilt = Table::build(&certs).expect("a valid table's certificates rebuild");
    assert_eq!(rebuilt.entries().len(), n);
    for (a, b) in rebuilt.entries().iter().zip(t.entries()) {
        assert_eq!((a.guid, rebuilt.data(a)), (b.guid, t.data(b)));
    }
    assert!(
        rebuilt.as_bytes().len() <= data.len(),
        "build packs densely"
    );
});
