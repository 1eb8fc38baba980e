//! A connection's message handling: `Session::handle` driven with arbitrary message sequences,
//! exactly as the server drives it (expiry between messages, stop at the first Close), with
//! real file descriptors: a shrink-sealed memfd, an unsealed memfd, /dev/null. The blob is a
//! valid table in a temporary directory, shared by all inputs as the server shares it.
//!
//! The input is a sequence of messages. Each starts with a selector byte; most fields are
//! drawn from small sets of meaningful values (page-aligned addresses, known features, leases
//! that exist) so that the fuzzer reaches the request handling, with raw bytes mixed in.
//! Checked: replies are well-formed replies to the request, COCO_EXIT answers carry a legal
//! `ret` and change only `ret` (and `npages` with ENOSPC), nothing panics.
#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use coco_protocol::exit::{self, Abi, CertsRet};
use coco_protocol::table::Table;
use coco_protocol::wire::{
    self, ExitMsg, Header, RegionDesc, Request, FLAG_NEED_REPLY, PF_COCO, PF_CONFIGURE_MEM_SLOTS,
    PF_REPLY_ACK, VERSION,
};
use coco_protocol::CertKind;
use coco_sidecar::blob::BlobStore;
use coco_sidecar::serve::session::{Outcome, Session};
use coco_sidecar::{Config, MissingCerts};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
const MEMFD_SIZE: u64 = 16 * PAGE;

const REQUESTS: [Request; 12] = Request::ALL;

struct Fixture {
    config: Config,
    store: Arc<BlobStore>,
    sealed: File,
    unsealed: File,
    _dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("coco-fuzz-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let der = |len: usize, fill: u8| {
            let mut v = vec![0x30, 0x82, ((len - 4) >> 8) as u8, (len - 4) as u8];
            v.resize(len, fill);
            v
        };
        let (ark, ask, vcek) = (der(1500, 1), der(1400, 2), der(1300, 3));
        let table = Table::build(&[
            (CertKind::Ark.guid(), &ark[..]),
            (CertKind::Ask.guid(), &ask[..]),
            (CertKind::Vcek.guid(), &vcek[..]),
        ])
        .expect("valid table");
        let blob = dir.join("certs.bin");
        std::fs::write(&blob, table.as_bytes()).expect("blob");
        let mut config = Config::new(dir.join("unused.sock"), &blob);
        config.lock_wait = Duration::ZERO;
        config.max_leases = 4;
        config.lease_timeout = Duration::from_millis(50);
        let store = Arc::new(BlobStore::new(&blob, config.lock_wait, MissingCerts::Empty));
        let memfd = |seal: bool| {
            let m = memfd::MemfdOptions::default()
                .allow_sealing(true)
                .create("fuzz-guest")
                .expect("memfd");
            m.as_file().set_len(MEMFD_SIZE).expect("size");
            if seal {
                m.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
                    .expect("seal");
            }
            m.into_file()
        };
        Fixture {
            config,
            store,
            sealed: memfd(true),
            unsealed: memfd(false),
            _dir: dir,
        }
    })
}

/// Reads fields off the input; past its end every field is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u64(&mut self) -> u64 {
        let mut b = self.bytes(8);
        b.resize(8, 0);
        u64::from_le_bytes(b.try_into().unwrap_or_default())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// A page-aligned value from a small range, or (rarely) any value.
    fn pages(&mut self, max: u64) -> u64 {
        match self.u8() {
            0xff => self.u64(),
            v => u64::from(v) % (max + 1) * PAGE,
        }
    }
}

fn region(inp: &mut Input<'_>) -> RegionDesc {
    RegionDesc {
        guest_phys_addr: inp.pages(64),
        memory_size: inp.pages(16),
        userspace_addr: 0,
        mmap_offset: inp.pages(16),
    }
}

fn fd(inp: &mut Input<'_>, f: &Fixture) -> OwnedFd {
    let file = match inp.u8() % 3 {
        0 => f.sealed.try_clone(),
        1 => f.unsealed.try_clone(),
        _ => File::open("/dev/null"),
    };
    OwnedFd::from(file.expect("descriptor"))
}

/// One message: (header, payload, descriptors).
fn message(inp: &mut Input<'_>, f: &Fixture, leases: &[u64]) -> (Header, Vec<u8>, Vec<OwnedFd>) {
    let sel = inp.u8();
    let raw = sel & 0x80 != 0;
    let code = match REQUESTS.get(usize::from(sel & 0x0f)) {
        Some(r) => *r as u32,
        None => u32::from(inp.u16()),
    };
    let flags = match inp.u8() {
        0xff => inp.u64() as u32,
        v => VERSION | if v & 1 != 0 { FLAG_NEED_REPLY } else { 0 },
    };
    let nfds = usize::from(inp.u8() % 10);
    let fds: Vec<OwnedFd> = (0..nfds).map(|_| fd(inp, f)).collect();
    let payload = if raw {
        let n = usize::from(inp.u16()) % (wire::MAX_PAYLOAD + 1);
        inp.bytes(n)
    } else {
        match Request::from_code(code) {
            Some(Request::SetFeatures) => match inp.u8() % 3 {
                0 => wire::F_PROTOCOL_FEATURES,
                1 => 0,
                _ => inp.u64(),
            }
            .to_le_bytes()
            .to_vec(),
            Some(Request::SetProtocolFeatures) => {
                let bits = inp.u8();
                let mut v = 0;
                for (bit, f) in [PF_REPLY_ACK, PF_CONFIGURE_MEM_SLOTS, PF_COCO]
                    .into_iter()
                    .enumerate()
                {
                    if bits & (1 << bit) != 0 {
                        v |= f;
                    }
                }
                if bits & 0x80 != 0 {
                    v |= inp.u64();
                }
                v.to_le_bytes().to_vec()
            }
            Some(Request::SetMemTable) => {
                let n = inp.u8() % 10;
                let descs: Vec<RegionDesc> = (0..n).map(|_| region(inp)).collect();
                wire::encode_mem_table(&descs)
            }
            Some(Request::AddMemReg | Request::RemMemReg) => wire::encode_mem_reg(&region(inp)),
            Some(Request::CocoExit) => {
                let tag = u32::from(inp.u8() % 4);
                let record = match Abi::from_tag(tag) {
                    Some(abi) if !inp.u8().is_multiple_of(8) => {
                        let gpa = inp.pages(64);
                        let npages = u64::from(inp.u8() % 8);
                        exit::build_request(abi, gpa, npages)
                    }
                    _ => {
                        let n = usize::from(inp.u8()) % 65;
                        inp.bytes(n)
                    }
                };
                ExitMsg {
                    abi: tag,
                    vcpu: u32::from(inp.u8() % 8),
                    status: 0,
                    lease: 0,
                    record,
                }
                .encode()
            }
            Some(Request::CocoDone) => {
                let pick = inp.u8();
                match leases.get(usize::from(pick) % (leases.len() + 1)) {
                    Some(l) if pick & 0x80 == 0 => *l,
                    _ => u64::from(pick),
                }
                .to_le_bytes()
                .to_vec()
            }
            _ => Vec::new(),
        }
    };
    let header = Header {
        request: code,
        flags,
        size: payload.len() as u32,
    };
    (header, payload, fds)
}

fn check_exit_answer(request: &[u8], reply: &ExitMsg) {
    let asked = ExitMsg::decode(request).expect("we built it");
    assert_eq!((reply.abi, reply.vcpu), (asked.abi, asked.vcpu));
    assert_eq!(reply.record.len(), asked.record.len());
    if reply.status != 0 {
        assert!(reply.status == libc::ENOTSUP as u32 || reply.status == libc::EINVAL as u32);
        assert_eq!(
            reply.record, asked.record,
            "an unanswered record is unchanged"
        );
        assert_eq!(reply.lease, 0);
        return;
    }
    let abi = Abi::from_tag(reply.abi).expect("answered only for a known ABI");
    let (ret, npages) = exit::read_answer(abi, &reply.record).expect("answer");
    let ret = CertsRet::from_raw(ret).expect("ret is 0, EAGAIN, ENOSPC or EIO");
    if reply.lease != 0 {
        assert_eq!(ret, CertsRet::Ok, "a lease only with a written table");
    }
    // Only ret (and npages with ENOSPC) change: answer a copy ourselves and compare.
    let mut expect = asked.record.clone();
    let np = (ret == CertsRet::NoSpace).then_some(npages);
    exit::encode_answer(abi, &mut expect, ret, np);
    assert_eq!(
        reply.record, expect,
        "only ret/npages differ from the request"
    );
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut inp = Input(data);
    // The first byte chose --allow-unsealed-memory, which is gone; still consumed so that the
    // seeds keep their meaning.
    let _ = inp.u8();
    let mut session = Session::new(1, &f.config, Arc::clone(&f.store));
    let mut leases: Vec<u64> = Vec::new();
    for _ in 0..64 {
        if inp.is_empty() {
            break;
        }
        let (header, payload, fds) = message(&mut inp, f, &leases);
        session.expire(Instant::now());
        match session.handle(&header, &payload, fds) {
            Outcome::Reply(h, p) => {
                assert!(h.is_reply() && !h.need_reply());
                assert_eq!(h.flags & wire::FLAG_VERSION_MASK, VERSION);
                assert_eq!(h.request, header.request, "a reply answers its request");
                assert_eq!(h.size as usize, p.len());
                if h.request == Request::CocoExit as u32 {
                    let reply = ExitMsg::decode(&p).expect("a well-formed exit reply");
                    check_exit_answer(&payload, &reply);
                    if reply.lease != 0 {
                        assert!(!leases.contains(&reply.lease), "lease ids are not reused");
                        leases.push(reply.lease);
                    }
                }
                assert!(session.leases_held() <= f.config.max_leases);
            }
            Outcome::Quiet => {}
            Outcome::Close(why) => {
                assert!(!why.to_string().is_empty());
                break;
            }
        }
    }
});
