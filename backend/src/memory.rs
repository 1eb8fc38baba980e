//! One connection's view of guest RAM: the regions the frontend shared, mapped with vm-memory.
//!
//! Every region is checked before it is mapped (alignment, overflow, overlap, count, a regular
//! file large enough, a shrink seal), so that a write can never fault or land outside the
//! guest's RAM. A file that could shrink after mapping would turn a later write into SIGBUS:
//! hence the seal, or, where the operator allows unsealed files, a size check before each write.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use coco_protocol::wire::{RegionDesc, MAX_MEM_SLOTS};
use thiserror::Error;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

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
    #[error("region {0:x?}: the fd is not a regular file")]
    NotRegular(RegionDesc),
    #[error("region {desc:x?}: the file is {file_size} bytes, smaller than offset + size")]
    FileTooSmall { desc: RegionDesc, file_size: u64 },
    #[error("region {0:x?}: the file is not sealed against shrinking (F_SEAL_SHRINK); seal it or start the sidecar with --allow-unsealed-memory")]
    NotSealed(RegionDesc),
    #[error("region {0:x?}: cannot inspect the fd: {1}")]
    Fd(RegionDesc, std::io::Error),
    #[error("region {0:x?}: mmap failed: {1}")]
    Map(RegionDesc, String),
    #[error("no region at {:#x} with size {:#x}", .0.guest_phys_addr, .0.memory_size)]
    NotFound(RegionDesc),
    #[error("[{gpa:#x}, +{len:#x}) is not entirely guest RAM")]
    OutsideRam { gpa: u64, len: u64 },
    #[error("a region's file shrank below its mapping")]
    Shrunk,
    #[error("write failed: {0}")]
    Write(String),
}

impl MemoryError {
    /// The errno reported to the frontend for a refused region.
    pub fn errno(&self) -> i32 {
        match self {
            MemoryError::Overlap(_) => libc::EEXIST,
            MemoryError::TooMany => libc::ENOSPC,
            MemoryError::NotSealed(_) => libc::EPERM,
            MemoryError::NotFound(_) => libc::ENOENT,
            MemoryError::Map(..) => libc::ENOMEM,
            MemoryError::NotRegular(_) | MemoryError::Fd(..) => libc::EBADF,
            _ => libc::EINVAL,
        }
    }
}

#[derive(Debug)]
struct Region {
    desc: RegionDesc,
    file: Arc<File>,
    sealed: bool,
}

/// The guest RAM shared on one connection.
#[derive(Debug, Default)]
pub struct GuestRam {
    regions: Vec<Region>,
    mem: GuestMemoryMmap,
    allow_unsealed: bool,
}

fn is_shrink_sealed(file: &File) -> bool {
    // SAFETY: F_GET_SEALS takes no argument and only reads the fd's seal set.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

impl GuestRam {
    /// Empty RAM; `allow_unsealed` accepts files without F_SEAL_SHRINK.
    pub fn new(allow_unsealed: bool) -> GuestRam {
        GuestRam {
            allow_unsealed,
            ..GuestRam::default()
        }
    }

    /// Regions mapped, in address order.
    pub fn regions(&self) -> impl Iterator<Item = &RegionDesc> {
        self.regions.iter().map(|r| &r.desc)
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
        if usize::try_from(desc.memory_size).is_err() || i64::try_from(file_end).is_err() {
            return Err(MemoryError::Overflow(*desc));
        }
        let overlaps = |r: &Region| {
            r.desc.guest_phys_addr < end
                && desc.guest_phys_addr < r.desc.guest_phys_addr + r.desc.memory_size
        };
        if self.regions.iter().chain(pending).any(overlaps) {
            return Err(MemoryError::Overlap(*desc));
        }
        if self.regions.len() + pending.len() >= MAX_MEM_SLOTS as usize {
            return Err(MemoryError::TooMany);
        }
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| MemoryError::Fd(*desc, e))?;
        if !meta.file_type().is_file() {
            return Err(MemoryError::NotRegular(*desc));
        }
        if meta.len() < file_end {
            return Err(MemoryError::FileTooSmall {
                desc: *desc,
                file_size: meta.len(),
            });
        }
        let sealed = is_shrink_sealed(&file);
        if !sealed && !self.allow_unsealed {
            return Err(MemoryError::NotSealed(*desc));
        }
        Ok(Region {
            desc: *desc,
            file: Arc::new(file),
            sealed,
        })
    }

    fn map(r: &Region) -> Result<GuestRegionMmap, MemoryError> {
        let offset = FileOffset::from_arc(Arc::clone(&r.file), r.desc.mmap_offset);
        let mmap = MmapRegion::from_file(offset, r.desc.memory_size as usize)
            .map_err(|e| MemoryError::Map(r.desc, e.to_string()))?;
        GuestRegionMmap::new(mmap, GuestAddress(r.desc.guest_phys_addr))
            .ok_or(MemoryError::Overflow(r.desc))
    }

    /// SET_MEM_TABLE: replaces every region, or changes nothing if any region is refused.
    pub fn set_table(
        &mut self,
        descs: &[RegionDesc],
        fds: Vec<OwnedFd>,
    ) -> Result<(), MemoryError> {
        let empty = GuestRam::new(self.allow_unsealed);
        let mut pending = Vec::with_capacity(descs.len());
        for (desc, fd) in descs.iter().zip(fds) {
            let region = empty.check(desc, fd, &pending)?;
            pending.push(region);
        }
        pending.sort_by_key(|r| r.desc.guest_phys_addr);
        let mut mem = GuestMemoryMmap::default();
        for r in &pending {
            mem = mem
                .insert_region(Arc::new(GuestRam::map(r)?))
                .map_err(|_| MemoryError::Overlap(r.desc))?;
        }
        self.regions = pending;
        self.mem = mem;
        Ok(())
    }

    /// ADD_MEM_REG.
    pub fn add(&mut self, desc: &RegionDesc, fd: OwnedFd) -> Result<(), MemoryError> {
        let region = self.check(desc, fd, &[])?;
        self.mem = self
            .mem
            .insert_region(Arc::new(GuestRam::map(&region)?))
            .map_err(|_| MemoryError::Overlap(*desc))?;
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
        let (mem, _) = self
            .mem
            .remove_region(GuestAddress(desc.guest_phys_addr), desc.memory_size)
            .map_err(|_| MemoryError::NotFound(*desc))?;
        self.mem = mem;
        self.regions.remove(at);
        Ok(())
    }

    /// Whether all of `[gpa, gpa + len)` is guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        if gpa.checked_add(len).is_none() {
            return false;
        }
        if len == 0 {
            return true;
        }
        usize::try_from(len)
            .is_ok_and(|len| GuestMemoryBackend::check_range(&self.mem, GuestAddress(gpa), len))
    }

    /// Writes `data` at `gpa` after checking that the whole buffer `[gpa, gpa + buf_len)` is
    /// guest RAM. Nothing is written when any check fails.
    pub fn write(&self, gpa: u64, buf_len: u64, data: &[u8]) -> Result<(), MemoryError> {
        if (data.len() as u64) > buf_len || !self.contains(gpa, buf_len) {
            return Err(MemoryError::OutsideRam { gpa, len: buf_len });
        }
        let end = gpa + data.len() as u64;
        for r in self.regions.iter().filter(|r| !r.sealed) {
            let (start, size) = (r.desc.guest_phys_addr, r.desc.memory_size);
            if start < end && gpa < start + size {
                let len = r.file.metadata().map(|m| m.len()).unwrap_or(0);
                if len < r.desc.mmap_offset + size {
                    return Err(MemoryError::Shrunk);
                }
            }
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| MemoryError::Write(e.to_string()))
    }
}
