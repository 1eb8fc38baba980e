//! A minimal VMM on kvm-ioctls whose guest gets its certificates through `coco-sidecar`.
//!
//! Two layers, kept apart on purpose:
//!
//! - the **kernel stand-in** ([`kernel_exit`], [`kernel_complete`]) plays the part of KVM's
//!   SNP code, which this machine lacks: it turns the guest's `OUT PORT_REQ` into the exit
//!   record of the chosen ABI in `kvm_run` (exit reason and bytes, as the kernel writes them)
//!   and, on the next `KVM_RUN`, reads `ret`/`npages` back from `kvm_run` into the guest's
//!   registers, as KVM's completion callback does;
//! - the **VMM path** ([`Vmm::certs_exit`]) is what a production VMM does on that exit: it
//!   knows nothing of sub-types or ret values, forwards the record bytes verbatim, copies the
//!   answer back verbatim, and when the sidecar granted a lease sets `immediate_exit`, runs
//!   `KVM_RUN` (which completes the exit and returns -EINTR) and then sends COCO_DONE.
//!
//! Guest RAM is one shrink- and grow-sealed memfd mapped once, given to KVM as two memslots and
//! to the sidecar as two regions (one by SET_MEM_TABLE, one by ADD_MEM_REG) that meet at
//! [`LOW_SIZE`], so that vCPU 0's buffer spans both.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::Duration;

use coco_protocol::{Frontend, MemoryRegion};
use kvm_bindings::{
    kvm_run, kvm_segment, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::blob::Entry;
use super::guest::{self, PORT_DELAY, PORT_END, PORT_ENTRY, PORT_FAIL, PORT_NOSPACE, PORT_REQ};
use super::record::{KernelAbi, KVM_RUN_EXIT_UNION, KVM_RUN_EXIT_UNION_SIZE};

/// Guest RAM size.
pub const RAM_SIZE: u64 = 0x40000;
/// Size of the low region (memslot 0, SET_MEM_TABLE); the rest is memslot 1, ADD_MEM_REG.
pub const LOW_SIZE: u64 = 0x10000;
/// Where the guest program is loaded and starts.
pub const CODE_GPA: u64 = 0x1000;
/// A certificate buffer for each of up to four vCPUs (up to [`guest::MAX_PAGES`] pages each).
/// vCPU 0's crosses from the low region into the high one.
pub const BUFFERS: [u64; 4] = [0xe000, 0x20000, 0x28000, 0x30000];
/// What every byte of RAM outside the program holds before the guest runs.
pub const POISON: u8 = 0xa5;
/// Exits one vCPU may take before the harness calls the guest runaway.
const MAX_EXITS: usize = 100_000;

const _: () = assert!(std::mem::offset_of!(kvm_run, __bindgen_anon_1) == KVM_RUN_EXIT_UNION);

/// Why the harness failed (a message with context).
pub type Error = String;

/// A certificate exit as the VMM saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExit {
    /// Buffer gpa the guest asked with.
    pub gpa: u64,
    /// Pages the guest asked with.
    pub npages: u64,
    /// The record as the kernel stand-in wrote it into `kvm_run`, forwarded verbatim.
    pub record: Vec<u8>,
    /// The answered record, copied back into `kvm_run` verbatim.
    pub answered: Vec<u8>,
    /// `ret`, read by hand from the answered record.
    pub ret: u64,
    /// `npages`, read by hand from the answered record.
    pub answered_npages: u64,
    /// Lease from the sidecar (0 for none).
    pub lease: u64,
    /// The `immediate_exit` round trip, when there was a lease.
    pub immediate_exit: Option<ImmediateExit>,
}

/// What the `immediate_exit` re-entry showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImmediateExit {
    /// Guest RIP before. Where KVM takes its fast PIO path this is still the exiting `OUT`
    /// (KVM completes it on the next KVM_RUN); where it emulates the `OUT` (as on some nested
    /// hosts) RIP is already past it.
    pub rip_before: u64,
    /// Guest RIP after KVM_RUN returned -EINTR: just past the `OUT`, whichever path KVM took;
    /// the guest has not run on.
    pub rip_after: u64,
    /// Guest EDX after -EINTR: the `ret` the completion handed to the guest.
    pub rdx_after: u64,
}

/// Everything one vCPU did.
#[derive(Debug, Default)]
pub struct VcpuOutcome {
    /// Certificate exits, in order.
    pub exits: Vec<CertExit>,
    /// Back-offs after EAGAIN.
    pub delays: u32,
    /// Page counts the guest learned from ENOSPC answers.
    pub sizes_learned: Vec<u32>,
    /// Entries the guest found, with the checksums it computed over its own memory.
    pub entries: Vec<Entry>,
    /// Offset of the terminator the guest found.
    pub terminator_at: Option<u32>,
    /// A failure the guest reported.
    pub failure: Option<u32>,
    /// Times KVM_RUN returned -EINTR for a signal and the VMM entered again (not counting
    /// the `immediate_exit` round trips).
    pub interrupted: u32,
}

/// Callbacks at the points of the exit flow that tests watch. They run on the vCPU's thread.
pub trait Observer: Sync {
    /// Before the record is forwarded.
    fn forwarding(&self, _vcpu: u32, _record: &[u8]) {}
    /// The sidecar answered (the record is back in `kvm_run`; a lease, if any, is held).
    fn answered(&self, _vcpu: u32, _exit: &CertExit) {}
    /// KVM_RUN with `immediate_exit` returned -EINTR: the request reached "firmware"; the
    /// lease is still held.
    fn reached_firmware(&self, _vcpu: u32, _lease: u64) {}
    /// COCO_DONE was acknowledged.
    fn released(&self, _vcpu: u32, _lease: u64) {}
}

/// Observes nothing.
#[derive(Debug)]
pub struct NoObserver;

impl Observer for NoObserver {}

/// How one vCPU runs.
#[derive(Debug)]
pub struct VcpuSpec<'a> {
    /// The exit ABI the kernel stand-in uses for this vCPU.
    pub abi: KernelAbi,
    /// Guest physical address of the guest's certificate buffer (page-aligned; normally
    /// `BUFFERS[vcpu]`).
    pub buffer: u64,
    /// Pages of the guest's first request (0 = size probe).
    pub first_npages: u32,
    /// Requests the guest may make before it gives up.
    pub budget: u32,
    /// The connection this vCPU's exits go to (one request in flight per connection, hence
    /// the mutex; vCPUs may share one).
    pub channel: &'a Mutex<Frontend>,
}

/// The guest RAM mapping.
#[derive(Debug)]
struct Ram {
    memfd: memfd::Memfd,
    host: usize,
    size: usize,
}

impl Ram {
    fn new(image: &[u8]) -> Result<Ram, Error> {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("kvm-guest-ram")
            .map_err(|e| format!("memfd_create: {e}"))?;
        let file = memfd.as_file();
        file.set_len(image.len() as u64)
            .map_err(|e| format!("size guest RAM: {e}"))?;
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .map_err(|e| format!("seal guest RAM: {e}"))?;
        file.write_all_at(image, 0)
            .map_err(|e| format!("load guest RAM: {e}"))?;
        // SAFETY: a fresh shared mapping of a file we own, at an address the kernel picks;
        // nothing else refers to that address range. It is unmapped in Drop.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                image.len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(format!(
                "mmap guest RAM: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Ram {
            memfd,
            host: host as usize,
            size: image.len(),
        })
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in Ram::new. The VM that used it as memslots
        // is closed before (field order in Vmm), and no Rust reference into it exists: all
        // access goes through the memfd.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size) };
    }
}

/// The VM.
#[derive(Debug)]
pub struct Vmm {
    // Field order matters: the VM (and with it the memslots) goes before the RAM mapping.
    vm: VmFd,
    cpuid: CpuId,
    ram: Ram,
    /// How long the VMM makes the guest wait on each EAGAIN back-off.
    pub retry_delay: Duration,
    /// A signal vCPU threads take only inside KVM_RUN, as QEMU took its SIG_IPI before
    /// `immediate_exit`: blocked on the thread, unblocked for KVM_RUN by
    /// `KVM_SET_SIGNAL_MASK`. One sent to a vCPU thread while it runs the VMM's code stays
    /// pending and makes its next KVM_RUN return -EINTR; the VMM then takes it off the queue
    /// (`sigtimedwait`) and enters again. `None`: vCPU threads keep the mask they have.
    pub kick_signal: Option<libc::c_int>,
}

/// Opens /dev/kvm and checks that it can run this harness. `Err` holds the reason to print
/// in the SKIPPED line.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(format!("KVM API version {api}, expected 12"));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(format!("KVM lacks {name}"));
        }
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    vm.create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU failed: {e}"))?;
    Ok(kvm)
}

/// Exits of [`Vmm::enter`] the harness handles.
enum Exit {
    Out(u16, u32),
    Hlt,
    /// KVM_RUN returned -EINTR for a signal sent to the thread (the test process spawns and
    /// reaps processes all the time); a VMM enters again, as QEMU does.
    Interrupted,
}

impl Vmm {
    /// A VM with the guest program loaded and every other byte [`POISON`].
    pub fn new(kvm: &Kvm) -> Result<Vmm, Error> {
        let ram = Ram::new(&Vmm::initial_image()?)?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        // Needed on Intel hosts for real-mode/unpaged emulation; harmless elsewhere.
        vm.set_tss_address(0xfffb_d000)
            .map_err(|e| format!("KVM_SET_TSS_ADDR: {e}"))?;
        for (slot, gpa, size) in [(0, 0, LOW_SIZE), (1, LOW_SIZE, RAM_SIZE - LOW_SIZE)] {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: ram.host as u64 + gpa,
            };
            // SAFETY: the range lies inside the shared mapping of `ram`, which stays mapped
            // until after this VM fd is closed (Vmm's field order).
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION slot {slot}: {e}"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        Ok(Vmm {
            vm,
            cpuid,
            ram,
            retry_delay: Duration::from_millis(10),
            kick_signal: None,
        })
    }

    /// RAM as it is before the guest runs: the program at [`CODE_GPA`], [`POISON`] elsewhere.
    pub fn initial_image() -> Result<Vec<u8>, Error> {
        let program = guest::program()?.code;
        let mut image = vec![POISON; RAM_SIZE as usize];
        let at = CODE_GPA as usize;
        image
            .get_mut(at..at + program.len())
            .ok_or("guest program does not fit")?
            .copy_from_slice(&program);
        Ok(image)
    }

    /// Reads guest RAM through the memfd.
    pub fn read_ram(&self, gpa: u64, len: usize) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        self.ram
            .memfd
            .as_file()
            .read_exact_at(&mut buf, gpa)
            .map_err(|e| format!("read guest RAM at {gpa:#x}: {e}"))?;
        Ok(buf)
    }

    /// Gives the sidecar this VM's RAM on `frontend` (low region by SET_MEM_TABLE, high region
    /// by ADD_MEM_REG) and checks that it serves certificate requests of `abi`, as a VMM does
    /// before enabling the exit in KVM.
    pub fn share_memory(&self, frontend: &mut Frontend, abi: KernelAbi) -> Result<(), Error> {
        let fd = self.ram.memfd.as_file().as_fd();
        let region = |gpa: u64, size: u64| MemoryRegion {
            guest_phys_addr: gpa,
            size,
            mmap_offset: gpa,
            userspace_addr: self.ram.host as u64 + gpa,
            fd,
        };
        frontend
            .set_mem_table(&[region(0, LOW_SIZE)])
            .map_err(|e| format!("SET_MEM_TABLE: {e}"))?;
        frontend
            .add_mem_region(&region(LOW_SIZE, RAM_SIZE - LOW_SIZE))
            .map_err(|e| format!("ADD_MEM_REG: {e}"))?;
        let caps = frontend.caps().map_err(|e| format!("COCO_GET_CAPS: {e}"))?;
        if caps.abis & (1 << abi.tag()) == 0 || caps.coco_subtypes & 1 == 0 {
            return Err(format!(
                "the sidecar does not serve certificate requests of {abi:?} (caps {caps:?}); \
                 a VMM would not enable that exit"
            ));
        }
        Ok(())
    }

    fn create_vcpu(&self, index: u32, spec: &VcpuSpec<'_>) -> Result<VcpuFd, Error> {
        let vcpu = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(|e| format!("KVM_CREATE_VCPU {index}: {e}"))?;
        vcpu.set_cpuid2(&self.cpuid)
            .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        // Flat 32-bit protected mode: 4 GiB segments at base 0, no paging. The segment
        // registers are never reloaded, so no GDT is needed in guest memory.
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 1, // 32-bit
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3, // read/write, accessed
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 = 0x11; // PE | ET; paging and caching-disable off
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        regs.rip = CODE_GPA;
        regs.rflags = 0x2; // reserved bit 1; IF=0
        regs.rsi = spec.buffer;
        regs.rbx = u64::from(spec.first_npages);
        regs.rdi = u64::from(spec.budget);
        vcpu.set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        Ok(vcpu)
    }

    /// Runs one vCPU per spec, each on its own thread, until every guest halted.
    pub fn run(
        &self,
        specs: &[VcpuSpec<'_>],
        observer: &dyn Observer,
    ) -> Result<Vec<VcpuOutcome>, Error> {
        let vcpus = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| self.create_vcpu(i as u32, spec))
            .collect::<Result<Vec<_>, _>>()?;
        std::thread::scope(|s| {
            let threads: Vec<_> = vcpus
                .into_iter()
                .zip(specs)
                .enumerate()
                .map(|(i, (vcpu, spec))| {
                    std::thread::Builder::new()
                        .name(format!("vcpu{i}"))
                        .spawn_scoped(s, move || self.run_vcpu(i as u32, vcpu, spec, observer))
                        .map_err(|e| format!("spawn vCPU thread: {e}"))
                })
                .collect();
            threads
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    t?.join()
                        .map_err(|_| format!("vCPU {i} thread panicked"))?
                        .map_err(|e| format!("vCPU {i}: {e}"))
                })
                .collect()
        })
    }

    fn run_vcpu(
        &self,
        index: u32,
        mut vcpu: VcpuFd,
        spec: &VcpuSpec<'_>,
        observer: &dyn Observer,
    ) -> Result<VcpuOutcome, Error> {
        let mut out = VcpuOutcome::default();
        let mut entry_dwords = Vec::new();
        let mut pending = None;
        if let Some(sig) = self.kick_signal {
            signal_only_in_kvm_run(&vcpu, sig)?;
        }
        for _ in 0..MAX_EXITS {
            let exit =
                Vmm::enter(&mut vcpu, &mut pending).map_err(|e| format!("KVM_RUN: {e}"))??;
            match exit {
                Exit::Hlt => {
                    out.entries = entry_dwords
                        .chunks(7)
                        .map(|c: &[u32]| -> Result<Entry, Error> {
                            let [g0, g1, g2, g3, offset, length, fnv] = *c else {
                                return Err(format!("guest reported {} dwords", c.len()));
                            };
                            let mut guid = [0u8; 16];
                            for (dst, d) in guid.chunks_exact_mut(4).zip([g0, g1, g2, g3]) {
                                dst.copy_from_slice(&d.to_le_bytes());
                            }
                            Ok(Entry {
                                guid,
                                offset,
                                length,
                                fnv,
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    return Ok(out);
                }
                Exit::Out(PORT_REQ, _) => {
                    let regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
                    let (gpa, npages) = (regs.rax & 0xffff_ffff, regs.rbx & 0xffff_ffff);
                    kernel_exit(vcpu.get_kvm_run(), spec.abi, gpa, npages)?;
                    let exit = Vmm::certs_exit(&mut vcpu, &mut pending, index, spec, observer)?;
                    out.exits.push(exit);
                }
                Exit::Interrupted => {
                    out.interrupted += 1;
                    if let Some(sig) = self.kick_signal {
                        take_pending(sig);
                    }
                }
                Exit::Out(PORT_DELAY, _) => {
                    out.delays += 1;
                    std::thread::sleep(self.retry_delay);
                }
                Exit::Out(PORT_NOSPACE, v) => out.sizes_learned.push(v),
                Exit::Out(PORT_ENTRY, v) => entry_dwords.push(v),
                Exit::Out(PORT_END, v) => out.terminator_at = Some(v),
                Exit::Out(PORT_FAIL, v) => out.failure = Some(v),
                Exit::Out(port, v) => {
                    return Err(format!("guest wrote {v:#x} to unknown port {port:#x}"))
                }
            }
        }
        Err(format!("guest took more than {MAX_EXITS} exits"))
    }

    /// One `KVM_RUN`: first what the kernel's completion callback does for a pending
    /// certificate exit, then the real ioctl. The outer error is the ioctl's errno; the inner
    /// one an exit the harness does not expect.
    fn enter(
        vcpu: &mut VcpuFd,
        pending: &mut Option<KernelAbi>,
    ) -> Result<Result<Exit, Error>, kvm_ioctls::Error> {
        if let Some(abi) = pending.take() {
            if let Err(e) = kernel_complete(vcpu, abi) {
                return Ok(Err(e));
            }
        }
        let exit = match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => return Ok(Ok(Exit::Interrupted)),
            other => other?,
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Exit::Out(port, u32::from_le_bytes(v)))
            }
            VcpuExit::Hlt => Ok(Exit::Hlt),
            other => Err(format!("unexpected exit {other:?}")),
        })
    }

    /// The production VMM's handling of a certificate exit, from `kvm_run` alone.
    fn certs_exit(
        vcpu: &mut VcpuFd,
        pending: &mut Option<KernelAbi>,
        index: u32,
        spec: &VcpuSpec<'_>,
        observer: &dyn Observer,
    ) -> Result<CertExit, Error> {
        let run = vcpu.get_kvm_run();
        let abi = KernelAbi::from_exit_reason(run.exit_reason)
            .ok_or_else(|| format!("not a certificate exit: {}", run.exit_reason))?;
        let size = abi.record_size();
        let record = exit_union(run)[..size].to_vec();
        observer.forwarding(index, &record);
        let reply = lock(spec.channel)?
            .forward_exit(abi.tag(), index, &record)
            .map_err(|e| format!("COCO_EXIT: {e}"))?;
        if reply.status != 0 || reply.abi != abi.tag() || reply.vcpu != index {
            return Err(format!(
                "COCO_EXIT answered status {} abi {} vcpu {} (sent abi {} vcpu {index})",
                reply.status,
                reply.abi,
                reply.vcpu,
                abi.tag()
            ));
        }
        if reply.record.len() != size {
            return Err(format!(
                "answered record has {} bytes, sent {size}",
                reply.record.len()
            ));
        }
        exit_union(vcpu.get_kvm_run())[..size].copy_from_slice(&reply.record);
        *pending = Some(abi);

        let (ret, answered_npages) = abi
            .read_answer(&reply.record)
            .ok_or("answered record too short")?;
        let (gpa, npages) = request_of(abi, &record);
        let mut exit = CertExit {
            gpa,
            npages,
            record,
            answered: reply.record,
            ret,
            answered_npages,
            lease: reply.lease,
            immediate_exit: None,
        };
        observer.answered(index, &exit);
        if exit.lease != 0 {
            // The request must reach firmware before the lock may go: complete the exit in
            // KVM without running the guest on, then tell the sidecar.
            let rip_before = vcpu
                .get_regs()
                .map_err(|e| format!("KVM_GET_REGS: {e}"))?
                .rip;
            vcpu.set_kvm_immediate_exit(1);
            let r = Vmm::enter(vcpu, pending);
            vcpu.set_kvm_immediate_exit(0);
            match r {
                Ok(Ok(Exit::Interrupted)) => {}
                Err(e) => return Err(format!("KVM_RUN with immediate_exit: {e}, not EINTR")),
                Ok(Ok(_)) => return Err("KVM_RUN with immediate_exit ran the guest".into()),
                Ok(Err(e)) => return Err(e),
            }
            let after = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
            exit.immediate_exit = Some(ImmediateExit {
                rip_before,
                rip_after: after.rip,
                rdx_after: after.rdx,
            });
            observer.reached_firmware(index, exit.lease);
            lock(spec.channel)?
                .done(exit.lease)
                .map_err(|e| format!("COCO_DONE {}: {e}", exit.lease))?;
            observer.released(index, exit.lease);
        }
        Ok(exit)
    }
}

// _IOW(KVMIO, 0x8b, struct kvm_signal_mask), from the kernel's <linux/kvm.h>.
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_SIGNAL_MASK,
    kvm_bindings::KVMIO,
    0x8b,
    kvm_bindings::kvm_signal_mask
);

/// `sig` alone, as a signal set.
fn sigset_of(sig: libc::c_int) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset initialise it in place.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        set
    }
}

/// Blocks `sig` on this (the vCPU's) thread and has KVM_RUN run with the thread's mask
/// without it (see [`Vmm::kick_signal`]).
fn signal_only_in_kvm_run(vcpu: &VcpuFd, sig: libc::c_int) -> Result<(), Error> {
    let block = sigset_of(sig);
    // SAFETY: sigset_t is plain data; pthread_sigmask fills it in.
    let mut before: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads `block`, writes `before`; both outlive the call.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut before) };
    if rc != 0 {
        return Err(format!(
            "pthread_sigmask: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    // SAFETY: `before` is an initialised set.
    unsafe { libc::sigdelset(&mut before, sig) };
    // struct kvm_signal_mask: u32 len, then the kernel's sigset_t (64 bits on x86_64, one bit
    // per signal from bit 0 for signal 1), which is how glibc's set begins.
    let mut arg = [0u8; 12];
    arg[..4].copy_from_slice(&8u32.to_le_bytes());
    // SAFETY: glibc's sigset_t is 128 bytes of plain data; this reads its first 8.
    let bits: [u8; 8] = unsafe { std::ptr::read_unaligned(std::ptr::addr_of!(before).cast()) };
    arg[4..].copy_from_slice(&bits);
    // SAFETY: KVM_SET_SIGNAL_MASK reads `len` and then `len` bytes of set from `arg`, which
    // holds both and outlives the call; the descriptor is the vCPU's.
    let rc =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ptr(vcpu, KVM_SET_SIGNAL_MASK(), arg.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "KVM_SET_SIGNAL_MASK: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Takes a pending `sig` off this thread's queue, if there is one (it stays blocked).
fn take_pending(sig: libc::c_int) {
    let set = sigset_of(sig);
    let now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: sigtimedwait reads `set` and `now`, which outlive the call; no siginfo wanted.
    unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &now) };
}

fn lock(channel: &Mutex<Frontend>) -> Result<std::sync::MutexGuard<'_, Frontend>, Error> {
    channel
        .lock()
        .map_err(|_| "the connection's mutex is poisoned".to_string())
}

/// The exit union of `kvm_run` as bytes.
fn exit_union(run: &mut kvm_run) -> &mut [u8; KVM_RUN_EXIT_UNION_SIZE] {
    const _: () = assert!(
        std::mem::size_of::<kvm_bindings::kvm_run__bindgen_ty_1>() == KVM_RUN_EXIT_UNION_SIZE
    );
    // SAFETY: the union is 256 bytes of plain data (asserted above), every bit pattern is a
    // valid u8, and the returned borrow is derived from the exclusive borrow of `run`.
    unsafe {
        &mut *std::ptr::addr_of_mut!(run.__bindgen_anon_1).cast::<[u8; KVM_RUN_EXIT_UNION_SIZE]>()
    }
}

/// (gpa, npages) of a request record, by hand.
fn request_of(abi: KernelAbi, record: &[u8]) -> (u64, u64) {
    let le = |r: std::ops::Range<usize>| {
        let mut v = [0u8; 8];
        if let Some(src) = record.get(r.clone()) {
            v[..r.len()].copy_from_slice(src);
        }
        u64::from_le_bytes(v)
    };
    match abi {
        KernelAbi::SeedRfc => (le(16..24).wrapping_mul(4096), le(24..28)),
        KernelAbi::Linux70 => (le(0..8), le(8..16)),
    }
}

/// Kernel stand-in, exit side: what KVM's SNP code does when the guest asks for certificates:
/// fill in the exit record of `abi` in `kvm_run` and exit to userspace with its reason.
pub fn kernel_exit(run: &mut kvm_run, abi: KernelAbi, gpa: u64, npages: u64) -> Result<(), Error> {
    abi.write_request(exit_union(run), gpa, npages)
        .ok_or_else(|| format!("guest asked with gpa {gpa:#x} npages {npages}"))?;
    run.exit_reason = abi.exit_reason();
    Ok(())
}

/// Kernel stand-in, completion side: what KVM's completion callback does on the next KVM_RUN:
/// read `ret` (and `npages` for ENOSPC) from the record in `kvm_run` and give them to the
/// guest (`EDX` for the GHCB exit info, `EBX` for the page count). KVM fails the run for a
/// `ret` outside the four it accepts; so does this.
fn kernel_complete(vcpu: &mut VcpuFd, abi: KernelAbi) -> Result<(), Error> {
    let size = abi.record_size();
    let (ret, npages) = abi
        .read_answer(&exit_union(vcpu.get_kvm_run())[..size])
        .ok_or("record too short")?;
    let legal = [0, libc::EAGAIN, libc::ENOSPC, libc::EIO].map(|v| v as u64);
    if !legal.contains(&ret) {
        return Err(format!("userspace answered ret {ret}, which KVM rejects"));
    }
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rdx = ret;
    if ret == libc::ENOSPC as u64 {
        regs.rbx = npages;
    }
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))
}
