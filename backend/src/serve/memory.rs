//! One connection's view of guest RAM: the regions the frontend shared, kept as open files.
//!
//! The table is written with system calls, never by storing through a mapping: a store into a
//! page the kernel cannot supply (a file shrunk after it was shared, a sparse file on a full
//! tmpfs, a hugetlbfs file whose huge-page pool is empty, a hole punched a moment ago) is a
//! SIGBUS that kills the process, and no check made beforehand can rule it out, since the
//! frontend can change the file at any moment. A system call that meets the same page returns
//! an error instead. So:
//! - tmpfs files (memfds, `/dev/shm`): `pwrite(2)` on the region's descriptor;
//! - hugetlbfs files, which have no `write(2)`: the pages under the buffer are mapped for the
//!   one write and filled by `process_vm_readv(2)` on this very process, whose copy into the
//!   mapping is done by the kernel and fails with EFAULT where a store would fault. Nothing in
//!   this process touches that mapping, and it is unmapped before the write returns.
//!
//! So no mapping outlives a write: a region costs one descriptor, whatever its size, and the
//! sum of what peers register bounds nothing. Files anywhere else (a disk, FUSE, NFS) are
//! refused: a write there can block on I/O, or on a peer's FUSE server, while the request
//! holds the blob's lock.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use coco_protocol::wire::{RegionDesc, MAX_MEM_SLOTS};
use rustix::fs::{OFlags, SealFlags};
use thiserror::Error;

use crate::sys;

// `statfs` magic numbers of the filesystems guest RAM may live on (`__fsword_t` is not i64
// on every architecture).
#[allow(clippy::unnecessary_cast)]
const TMPFS_MAGIC: i64 = libc::TMPFS_MAGIC as i64;
#[allow(clippy::unnecessary_cast)]
const HUGETLBFS_MAGIC: i64 = libc::HUGETLBFS_MAGIC as i64;

const PAGE: u64 = 4096;

/// Why a region was refused or a write was not done. Each maps to the errno the frontend sees.
#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("region {0:x?}: address, size and offset must be 4 KiB-aligned and size non-zero")]
    Unaligned(RegionDesc),
    #[error("region {0:x?}: end overflows")]
    Overflow(RegionDesc),
    #[error("region {0:x?} overlaps a region already mapped")]
    Overlap(RegionDesc),
    #[error("already {MAX_MEM_SLOTS} regions")]
    TooMany,
    #[error("region {0:x?}: the fd is not a regular file open for reading and writing ({1})")]
    NotUsable(RegionDesc, &'static str),
    #[error("region {0:x?}: the file is not on tmpfs or hugetlbfs (a write elsewhere could block on I/O while the blob is locked)")]
    Filesystem(RegionDesc),
    #[error("region {desc:x?}: the file is {file_size} bytes, smaller than offset + size")]
    FileTooSmall { desc: RegionDesc, file_size: u64 },
    #[error(
        "region {0:x?}: the file is sealed against writing (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE)"
    )]
    WriteSealed(RegionDesc),
    #[error("region {0:x?}: cannot inspect the fd: {1}")]
    Fd(RegionDesc, io::Error),
    #[error("no region at {:#x} with size {:#x}", .0.guest_phys_addr, .0.memory_size)]
    NotFound(RegionDesc),
    #[error("[{gpa:#x}, +{len:#x}) is not entirely guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("writing guest RAM at {gpa:#x} failed: {source}")]
    Write { gpa: u64, source: io::Error },
    #[error(
        "writing guest RAM at {gpa:#x} failed: {copied} of {len} bytes copied (a page of the \
         file is missing)"
    )]
    ShortCopy { gpa: u64, copied: usize, len: usize },
}

impl MemoryError {
    /// The errno reported to the frontend for a refused region.
    pub fn errno(&self) -> i32 {
        match self {
            MemoryError::Overlap(_) => libc::EEXIST,
            MemoryError::TooMany => libc::ENOSPC,
            MemoryError::WriteSealed(_) | MemoryError::Filesystem(_) => libc::EPERM,
            MemoryError::NotFound(_) => libc::ENOENT,
            MemoryError::NotUsable(..) | MemoryError::Fd(..) => libc::EBADF,
            _ => libc::EINVAL,
        }
    }

    /// Whether a retry can succeed: the buffer is guest RAM, but its file could not take the
    /// bytes now (no space on the tmpfs, no free huge page, a write seal added since). Such a
    /// request is answered EAGAIN, never EIO, which would cost a Linux guest its VMPCK.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            MemoryError::Write { .. } | MemoryError::ShortCopy { .. }
        )
    }
}

/// How a region's file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// tmpfs (every memfd without MFD_HUGETLB): pwrite.
    Tmpfs,
    /// hugetlbfs with pages of this many bytes: a mapping for the write, filled by the kernel.
    HugeTlb { page: u64 },
}

#[derive(Debug)]
struct Region {
    desc: RegionDesc,
    file: File,
    backing: Backing,
}

impl Region {
    fn end(&self) -> u64 {
        self.desc.guest_phys_addr + self.desc.memory_size
    }
}

/// The guest RAM shared on one connection.
#[derive(Debug, Default)]
pub struct GuestRam {
    /// In address order, never overlapping.
    regions: Vec<Region>,
}

/// The filesystem type and block size of the file (for hugetlbfs: its huge page size).
fn filesystem(file: &File) -> io::Result<(i64, u64)> {
    let st = rustix::fs::fstatfs(file)?;
    #[allow(clippy::unnecessary_cast)] // the fields' types differ between architectures
    Ok((st.f_type as i64, st.f_bsize as u64))
}

impl GuestRam {
    /// Empty RAM.
    pub fn new() -> GuestRam {
        GuestRam::default()
    }

    /// Whether any region is shared.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    fn check(
        &self,
        desc: &RegionDesc,
        fd: OwnedFd,
        pending: &[Region],
    ) -> Result<Region, MemoryError> {
        if desc.memory_size == 0
            || desc.guest_phys_addr % PAGE != 0
            || desc.memory_size % PAGE != 0
            || desc.mmap_offset % PAGE != 0
        {
            return Err(MemoryError::Unaligned(*desc));
        }
        let end = desc.guest_phys_addr.checked_add(desc.memory_size);
        let file_end = desc.mmap_offset.checked_add(desc.memory_size);
        let (Some(end), Some(file_end)) = (end, file_end) else {
            return Err(MemoryError::Overflow(*desc));
        };
        // pwrite and mmap take the offset as a signed 64-bit number.
        if i64::try_from(file_end).is_err() {
            return Err(MemoryError::Overflow(*desc));
        }
        let overlaps = |r: &Region| r.desc.guest_phys_addr < end && desc.guest_phys_addr < r.end();
        if self.regions.iter().chain(pending).any(overlaps) {
            return Err(MemoryError::Overlap(*desc));
        }
        if self.regions.len() + pending.len() >= MAX_MEM_SLOTS as usize {
            return Err(MemoryError::TooMany);
        }
        let file = File::from(fd);
        let fd_err = |e| MemoryError::Fd(*desc, e);
        let meta = file.metadata().map_err(fd_err)?;
        if !meta.file_type().is_file() {
            return Err(MemoryError::NotUsable(*desc, "not a regular file"));
        }
        let access = rustix::fs::fcntl_getfl(&file).map_err(|e| fd_err(e.into()))?;
        if access & OFlags::RWMODE != OFlags::RDWR {
            return Err(MemoryError::NotUsable(*desc, "not open read-write"));
        }
        let backing = match filesystem(&file).map_err(fd_err)? {
            (TMPFS_MAGIC, _) => Backing::Tmpfs,
            (HUGETLBFS_MAGIC, page) if page.is_power_of_two() => Backing::HugeTlb { page },
            _ => return Err(MemoryError::Filesystem(*desc)),
        };
        if meta.len() < file_end {
            return Err(MemoryError::FileTooSmall {
                desc: *desc,
                file_size: meta.len(),
            });
        }
        // A courtesy: such a file can never be written. A seal added later makes the write
        // fail instead (EAGAIN).
        let seals = rustix::fs::fcntl_get_seals(&file).map_err(|e| fd_err(e.into()))?;
        if seals.intersects(SealFlags::WRITE | SealFlags::FUTURE_WRITE) {
            return Err(MemoryError::WriteSealed(*desc));
        }
        Ok(Region {
            desc: *desc,
            file,
            backing,
        })
    }

    /// SET_MEM_TABLE: replaces every region, or changes nothing if any region is refused.
    pub fn set_table(
        &mut self,
        descs: &[RegionDesc],
        fds: Vec<OwnedFd>,
    ) -> Result<(), MemoryError> {
        let empty = GuestRam::new();
        let mut pending = Vec::with_capacity(descs.len());
        for (desc, fd) in descs.iter().zip(fds) {
            let region = empty.check(desc, fd, &pending)?;
            pending.push(region);
        }
        pending.sort_by_key(|r| r.desc.guest_phys_addr);
        self.regions = pending;
        Ok(())
    }

    /// ADD_MEM_REG.
    pub fn add(&mut self, desc: &RegionDesc, fd: OwnedFd) -> Result<(), MemoryError> {
        let region = self.check(desc, fd, &[])?;
        let at = self
            .regions
            .partition_point(|r| r.desc.guest_phys_addr < desc.guest_phys_addr);
        self.regions.insert(at, region);
        Ok(())
    }

    /// REM_MEM_REG: removes the region with this guest address and size.
    pub fn remove(&mut self, desc: &RegionDesc) -> Result<(), MemoryError> {
        let at = self
            .regions
            .iter()
            .position(|r| {
                r.desc.guest_phys_addr == desc.guest_phys_addr
                    && r.desc.memory_size == desc.memory_size
            })
            .ok_or(MemoryError::NotFound(*desc))?;
        self.regions.remove(at);
        Ok(())
    }

    /// The pieces of `[gpa, gpa + len)`: each region it crosses with the file offset and length
    /// of its part, in address order; `None` unless the whole range is guest RAM.
    fn pieces(&self, gpa: u64, len: u64) -> Option<Vec<(&Region, u64, u64)>> {
        let end = gpa.checked_add(len)?;
        let mut pieces = Vec::new();
        let mut at = gpa;
        let mut i = self.regions.partition_point(|r| r.end() <= gpa);
        while at < end {
            let r = self
                .regions
                .get(i)
                .filter(|r| r.desc.guest_phys_addr <= at)?;
            let n = r.end().min(end) - at;
            pieces.push((r, r.desc.mmap_offset + (at - r.desc.guest_phys_addr), n));
            at += n;
            i += 1;
        }
        Some(pieces)
    }

    /// Whether all of `[gpa, gpa + len)` is guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.pieces(gpa, len).is_some()
    }

    /// Writes `data` at `gpa` after checking that the whole buffer `[gpa, gpa + buf_len)` is
    /// guest RAM; nothing is written when it is not. A write that fails part-way
    /// ([`MemoryError::retryable`]) may have written a prefix of `data`.
    pub fn write(&self, gpa: u64, buf_len: u64, data: &[u8]) -> Result<(), MemoryError> {
        let outside = MemoryError::OutsideRam { gpa, len: buf_len };
        if data.len() as u64 > buf_len {
            return Err(outside);
        }
        let pieces = self.pieces(gpa, buf_len).ok_or(outside)?;
        let mut rest = data;
        let mut at = gpa;
        for (region, offset, len) in pieces {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            let (now, later) = rest.split_at(n);
            let written = match region.backing {
                Backing::Tmpfs => region.file.write_all_at(now, offset).map(|()| n),
                Backing::HugeTlb { page } => {
                    sys::copy_through_mapping(&region.file, page, offset, now)
                }
            };
            match written {
                Ok(copied) if copied == n => {}
                Ok(copied) => {
                    return Err(MemoryError::ShortCopy {
                        gpa: at,
                        copied,
                        len: n,
                    })
                }
                Err(source) => return Err(MemoryError::Write { gpa: at, source }),
            }
            rest = later;
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::MemfdFlags;
    use std::os::fd::AsRawFd;

    fn memfd(size: u64, flags: MemfdFlags) -> Option<File> {
        let fd = rustix::fs::memfd_create("test", flags | MemfdFlags::CLOEXEC).ok()?;
        let file = File::from(fd);
        file.set_len(size).ok()?;
        Some(file)
    }

    fn region(gpa: u64, size: u64, offset: u64) -> RegionDesc {
        RegionDesc {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: 0,
            mmap_offset: offset,
        }
    }

    #[test]
    fn a_write_spans_adjacent_regions_and_lands_at_their_offsets() {
        let (a, b) = (
            memfd(0x4000, MemfdFlags::empty()).expect("a"),
            memfd(0x4000, MemfdFlags::empty()).expect("b"),
        );
        let mut ram = GuestRam::new();
        ram.add(
            &region(0x10000, 0x2000, 0x2000),
            a.try_clone().expect("dup").into(),
        )
        .expect("a");
        ram.add(
            &region(0x12000, 0x2000, 0),
            b.try_clone().expect("dup").into(),
        )
        .expect("b");
        let data: Vec<u8> = (0..0x2000u32).map(|i| i as u8 | 1).collect();
        ram.write(0x11000, 0x3000, &data).expect("write");
        let mut got = vec![0u8; 0x1000];
        a.read_exact_at(&mut got, 0x3000).expect("read a");
        assert_eq!(got, data[..0x1000]);
        b.read_exact_at(&mut got, 0).expect("read b");
        assert_eq!(got, data[0x1000..]);
        // A hole between regions, or past the end, is not RAM, and nothing is written.
        assert!(ram.contains(0x10000, 0x4000));
        assert!(!ram.contains(0x10000, 0x5000));
        assert!(matches!(
            ram.write(0x13000, 0x2000, &[7]),
            Err(MemoryError::OutsideRam { .. })
        ));
        b.read_exact_at(&mut got, 0x1000).expect("read b");
        assert!(got.iter().all(|x| *x == 0));
    }

    #[test]
    fn only_writable_tmpfs_and_hugetlbfs_files_are_accepted() {
        let mut ram = GuestRam::new();
        let dev_null = File::open("/dev/null").expect("null");
        let err = ram
            .add(&region(0, 0x1000, 0), dev_null.into())
            .expect_err("chr");
        assert_eq!(err.errno(), libc::EBADF);
        let f = memfd(0x1000, MemfdFlags::empty()).expect("memfd");
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let ro = File::open(&path).expect("reopen read-only");
        let err = ram
            .add(&region(0, 0x1000, 0), ro.into())
            .expect_err("read-only");
        assert_eq!(err.errno(), libc::EBADF, "{err}");
        // A file on the disk the tests run from (not tmpfs): refused, a write could block.
        let disk = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).expect("tempfile");
        disk.set_len(0x1000).expect("len");
        if filesystem(&disk).expect("statfs").0 != TMPFS_MAGIC {
            let err = ram
                .add(&region(0, 0x1000, 0), disk.into())
                .expect_err("disk");
            assert!(err.to_string().contains("not on tmpfs"), "{err}");
        }
        let sealed = memfd(0x1000, MemfdFlags::ALLOW_SEALING).expect("memfd");
        rustix::fs::fcntl_add_seals(&sealed, SealFlags::FUTURE_WRITE).expect("seal");
        let err = ram
            .add(&region(0, 0x1000, 0), sealed.into())
            .expect_err("sealed");
        assert_eq!(err.errno(), libc::EPERM);
        assert!(ram.is_empty());
    }

    #[test]
    fn a_hugetlb_file_without_pages_fails_the_write_instead_of_faulting() {
        // An MFD_HUGETLB memfd whose pages were never allocated: with an empty pool the kernel
        // cannot supply them, and a store would be SIGBUS.
        let Some(f) = memfd(2 << 20, MemfdFlags::HUGETLB) else {
            // CI sets COCO_REQUIRE_HUGETLB=1 where the kernel has huge pages.
            assert!(
                std::env::var("COCO_REQUIRE_HUGETLB").as_deref() != Ok("1"),
                "COCO_REQUIRE_HUGETLB=1 but this kernel has no MFD_HUGETLB"
            );
            eprintln!("SKIPPED: no MFD_HUGETLB on this kernel");
            return;
        };
        let free = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("HugePages_Free:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let mut ram = GuestRam::new();
        ram.add(&region(0, 2 << 20, 0), f.try_clone().expect("dup").into())
            .expect("a hugetlb region");
        let result = ram.write(0x1000, 0x1000, b"table");
        if free == 0 {
            let err = result.expect_err("no huge page to write into");
            assert!(err.retryable(), "{err}");
        } else {
            result.expect("a free huge page takes the write");
            let mut got = [0u8; 5];
            // hugetlbfs files can be read (just not written) with read(2).
            f.read_exact_at(&mut got, 0x1000).expect("read back");
            assert_eq!(&got, b"table");
        }
    }
}
