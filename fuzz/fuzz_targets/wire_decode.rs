//! The message decoder: `Header::decode`, `FrontendRequest::decode`, `ExitMsg::decode`,
//! `Caps::decode` and the two exit record layouts, on arbitrary bytes. Beyond "never panics",
//! every accepted message must re-encode to the bytes it came from.
//!
//! Input: 12 header bytes, one byte whose value mod 10 is the descriptor count, the payload.
//! The payload's length stands for the header's `size` (the transport guarantees they agree).
#![no_main]

use coco_protocol::exit::{self, Abi, CertsRet};
use coco_protocol::wire::{self, Caps, ExitMsg, FrontendRequest, Header, HEADER_SIZE, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_SIZE + 1 {
        return;
    }
    let mut raw = [0u8; HEADER_SIZE];
    raw.copy_from_slice(&data[..HEADER_SIZE]);
    let nfds = usize::from(data[HEADER_SIZE] % 10);
    let payload = &data[HEADER_SIZE + 1..];

    if let Ok(h) = Header::decode(&raw) {
        assert_eq!(h.encode(), raw, "a decoded header re-encodes exactly");
        assert!(h.size as usize <= MAX_PAYLOAD);
        assert_eq!(h.flags & wire::FLAG_VERSION_MASK, wire::VERSION);
        if payload.len() <= MAX_PAYLOAD {
            let h = Header {
                size: payload.len() as u32,
                ..h
            };
            if let Ok(msg) = FrontendRequest::decode(&h, payload, nfds) {
                check_request(&h, &msg, payload, nfds);
            }
        }
    }

    if let Ok(m) = ExitMsg::decode(payload) {
        assert_eq!(m.encode(), payload, "an exit message re-encodes exactly");
    }
    if let Ok(c) = Caps::decode(payload) {
        assert_eq!(&c.encode()[..24], &payload[..24]);
    }
    for abi in Abi::ALL {
        if let Ok(req) = exit::decode_request(abi, payload) {
            let mut record = payload.to_vec();
            exit::encode_answer(abi, &mut record, CertsRet::NoSpace, Some(req.npages));
            assert_eq!(record.len(), payload.len());
            let (ret, _) = exit::read_answer(abi, &record).expect("own answer reads back");
            assert_eq!(ret, CertsRet::NoSpace as u64);
        }
    }
});

fn check_request(h: &Header, msg: &FrontendRequest, payload: &[u8], nfds: usize) {
    assert_eq!(msg.request() as u32, h.request);
    assert!(!h.is_reply());
    match msg {
        FrontendRequest::SetMemTable(descs) => {
            assert!(descs.len() <= wire::MAX_MEM_TABLE_REGIONS);
            assert_eq!(descs.len(), nfds, "one descriptor per region");
            assert_eq!(wire::encode_mem_table(descs), payload);
        }
        FrontendRequest::AddMemReg(d) => {
            assert_eq!(nfds, 1);
            assert_eq!(&wire::encode_mem_reg(d)[8..], &payload[8..]);
        }
        FrontendRequest::RemMemReg(d) => {
            assert!(nfds <= 1);
            assert_eq!(&wire::encode_mem_reg(d)[8..], &payload[8..]);
        }
        FrontendRequest::CocoExit(m) => {
            assert_eq!((m.status, m.lease), (0, 0), "reserved fields are zero");
            assert_eq!(m.encode(), payload);
        }
        FrontendRequest::SetFeatures(v)
        | FrontendRequest::SetProtocolFeatures(v)
        | FrontendRequest::CocoDone(v) => assert_eq!(v.to_le_bytes(), payload),
        FrontendRequest::GetFeatures
        | FrontendRequest::SetOwner
        | FrontendRequest::GetProtocolFeatures
        | FrontendRequest::GetMaxMemSlots
        | FrontendRequest::CocoGetCaps => assert!(payload.is_empty()),
    }
    if !matches!(
        msg,
        FrontendRequest::SetMemTable(_)
            | FrontendRequest::AddMemReg(_)
            | FrontendRequest::RemMemReg(_)
    ) {
        assert_eq!(nfds, 0);
    }
}
