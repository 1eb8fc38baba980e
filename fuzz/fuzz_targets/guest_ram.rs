//! Guest memory as a hostile VMM shares it: `GuestRam` driven with region messages over real
//! files (sparse tmpfs memfds, a hugetlb memfd where the kernel has one, a write-sealed memfd,
//! a read-only descriptor, /dev/null), which the input also shrinks, grows and punches holes
//! into between writes, as a VMM can at any moment.
//!
//! Checked against an independent model of the regions: a region is accepted only if it is
//! aligned, does not overflow or overlap, fits in 32 slots and is a writable tmpfs or
//! hugetlbfs file large enough; a write is refused as outside RAM exactly when the model does
//! not cover the buffer; a write that succeeds put exactly `data` at the model's file offsets
//! (read back with pread); a write that fails says it can be retried. And nothing faults: a
//! SIGBUS from any of these files ends the run as a crash.
#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use coco_protocol::wire::RegionDesc;
use coco_sidecar::serve::memory::{GuestRam, MemoryError};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const MAX_REGIONS: usize = 32;

/// Reads the input as a stream of small numbers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        *b
    }

    fn u16(&mut self) -> u64 {
        u64::from(self.u8()) | u64::from(self.u8()) << 8
    }

    /// Mostly page-aligned values in a small range, sometimes anything.
    fn addr(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => u64::from_le_bytes(std::array::from_fn(|_| self.u8())),
            1 => self.u16(),
            _ => (self.u16() % 1024) * PAGE,
        }
    }
}

fn memfd(size: u64, flags: libc::c_uint) -> Option<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just created and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).ok()?;
    Some(f)
}

/// What the model knows of a file the input may offer as a region.
struct Candidate {
    file: File,
    /// A writable regular file on tmpfs or hugetlbfs.
    usable: bool,
    /// Huge page size for hugetlbfs (sizes change in whole pages).
    page: u64,
}

fn candidates() -> Vec<Candidate> {
    let mut v = Vec::new();
    for size in [1 << 20, 64 << 10] {
        let file = memfd(size, 0).expect("memfd");
        v.push(Candidate {
            file,
            usable: true,
            page: PAGE,
        });
    }
    if let Some(file) = memfd(2 * HUGE, libc::MFD_HUGETLB) {
        v.push(Candidate {
            file,
            usable: true,
            page: HUGE,
        });
    }
    let sealed = memfd(1 << 20, libc::MFD_ALLOW_SEALING).expect("memfd");
    // SAFETY: F_ADD_SEALS with an int argument on a descriptor we own.
    unsafe { libc::fcntl(sealed.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) };
    v.push(Candidate {
        file: sealed,
        usable: false,
        page: PAGE,
    });
    let read_only = File::open(format!("/proc/self/fd/{}", v[0].file.as_raw_fd())).expect("ro");
    v.push(Candidate {
        file: read_only,
        usable: false,
        page: PAGE,
    });
    v.push(Candidate {
        file: File::open("/dev/null").expect("null"),
        usable: false,
        page: PAGE,
    });
    v
}

#[derive(Clone, Copy)]
struct Modeled {
    desc: RegionDesc,
    file: usize,
}

fn end(d: &RegionDesc) -> Option<u64> {
    d.guest_phys_addr.checked_add(d.memory_size)
}

/// The model's pieces of `[gpa, gpa + len)`: (region, offset in its file, length).
fn covered(model: &[Modeled], gpa: u64, len: u64) -> Option<Vec<(Modeled, u64, u64)>> {
    let stop = gpa.checked_add(len)?;
    let mut at = gpa;
    let mut pieces = Vec::new();
    while at < stop {
        let r = model
            .iter()
            .find(|r| r.desc.guest_phys_addr <= at && at < end(&r.desc).unwrap_or(0))?;
        let n = end(&r.desc)?.min(stop) - at;
        pieces.push((*r, r.desc.mmap_offset + (at - r.desc.guest_phys_addr), n));
        at += n;
    }
    Some(pieces)
}

fn acceptable(model: &[Modeled], c: &Candidate, d: &RegionDesc) -> bool {
    let aligned = d.memory_size > 0
        && [d.guest_phys_addr, d.memory_size, d.mmap_offset]
            .iter()
            .all(|v| v % PAGE == 0);
    let file_end = d.mmap_offset.checked_add(d.memory_size);
    let fits = end(d).is_some() && file_end.is_some_and(|e| i64::try_from(e).is_ok());
    let free = !model.iter().any(|r| {
        r.desc.guest_phys_addr < end(d).unwrap_or(u64::MAX)
            && d.guest_phys_addr < end(&r.desc).unwrap_or(u64::MAX)
    });
    let size = c.file.metadata().map_or(0, |m| m.len());
    aligned
        && fits
        && free
        && model.len() < MAX_REGIONS
        && c.usable
        && file_end.is_some_and(|e| e <= size)
}

fuzz_target!(|data: &[u8]| {
    let files = candidates();
    let mut inp = Input(data);
    let mut ram = GuestRam::new();
    let mut model: Vec<Modeled> = Vec::new();
    for _ in 0..48 {
        if inp.0.is_empty() {
            break;
        }
        match inp.u8() % 6 {
            // ADD_MEM_REG
            0 | 1 => {
                let file = usize::from(inp.u8()) % files.len();
                let desc = RegionDesc {
                    guest_phys_addr: inp.addr(),
                    memory_size: inp.addr(),
                    userspace_addr: 0,
                    mmap_offset: inp.addr(),
                };
                let expect = acceptable(&model, &files[file], &desc);
                let fd = OwnedFd::from(files[file].file.try_clone().expect("dup"));
                match ram.add(&desc, fd) {
                    Ok(()) => {
                        assert!(expect, "accepted against the model: {desc:x?}");
                        model.push(Modeled { desc, file });
                    }
                    Err(MemoryError::Overlap(_)) => assert!(!expect),
                    Err(MemoryError::TooMany) => assert_eq!(model.len(), MAX_REGIONS),
                    Err(e) => assert!(!expect, "refused against the model: {e}"),
                }
            }
            // REM_MEM_REG of a region that exists, or not.
            2 => {
                let pick = usize::from(inp.u8());
                if let Some(r) = model.get(pick % model.len().max(1)).copied() {
                    ram.remove(&r.desc).expect("a modeled region exists");
                    model.retain(|m| m.desc.guest_phys_addr != r.desc.guest_phys_addr);
                } else {
                    let d = RegionDesc {
                        guest_phys_addr: inp.addr(),
                        memory_size: PAGE,
                        ..RegionDesc::default()
                    };
                    assert!(ram.remove(&d).is_err());
                }
            }
            // The VMM changes a file under the sidecar: shrink or grow it, punch a hole.
            3 => {
                let c = &files[usize::from(inp.u8()) % files.len()];
                if c.usable {
                    let size = (inp.u16() % 64) * c.page * if c.page == PAGE { 8 } else { 1 };
                    if inp.u8() % 2 == 0 {
                        let _ = c.file.set_len(size);
                    } else {
                        // SAFETY: fallocate on a descriptor we own; no pointers.
                        unsafe {
                            libc::fallocate(
                                c.file.as_raw_fd(),
                                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                                0,
                                size as i64,
                            )
                        };
                    }
                }
            }
            // A certificate table written at a guest buffer.
            _ => {
                let gpa = inp.addr();
                let buf_len = (inp.u16() % 64) * PAGE;
                let len = (inp.u16() as usize).min(buf_len as usize + usize::from(inp.u8() % 2));
                let fill = inp.u8();
                let table: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(fill)).collect();
                let pieces = covered(&model, gpa, buf_len).filter(|_| len as u64 <= buf_len);
                match ram.write(gpa, buf_len, &table) {
                    Ok(()) => {
                        let pieces = pieces.expect("written outside the model's RAM");
                        let mut rest = &table[..];
                        for (r, offset, n) in pieces {
                            let n = (n as usize).min(rest.len());
                            let mut got = vec![0u8; n];
                            files[r.file]
                                .file
                                .read_exact_at(&mut got, offset)
                                .expect("read back");
                            assert_eq!(got, rest[..n], "bytes at {offset:#x}");
                            rest = &rest[n..];
                        }
                    }
                    Err(MemoryError::OutsideRam { .. }) => {
                        assert!(pieces.is_none(), "refused a buffer the model covers")
                    }
                    Err(e) => {
                        assert!(pieces.is_some(), "{e}");
                        assert!(e.retryable(), "{e}");
                    }
                }
            }
        }
    }
});
