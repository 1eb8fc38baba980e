//! The seccomp filter `serve` installs once every socket exists and before it serves.
//!
//! It allows only what the serving path needs (docs/hardening.md lists each system call and
//! why) and kills the whole process on anything else (`SECCOMP_RET_KILL_PROCESS`: nothing can
//! be logged, the process ends with SIGSYS). Notably absent: `socket`, `bind`, `listen`,
//! `connect`, `execve`, `fork`-style `clone`, `ptrace`, `open` for writing, `ioctl`,
//! executable mappings. The filter is installed with TSYNC, so threads that exist already
//! (none in `serve` today) get it too; threads spawned later inherit it.
//!
//! `COCO_SIDECAR_SECCOMP_SELFTEST=1` makes the sidecar try `socket(AF_INET)` right after the
//! installation: the process must die with SIGSYS; `=sigsegv` and `=sigbus` make it fault on
//! purpose: it must die with that signal, not with SIGSYS. The tests use it; it can only make
//! the process stop, never widen what it may do.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use thiserror::Error;

/// Environment variable that triggers the self-test (value `1`).
pub const SELFTEST_ENV: &str = "COCO_SIDECAR_SECCOMP_SELFTEST";

/// Why the filter could not be built or installed.
#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("seccomp: unsupported architecture {0}; run with --no-seccomp")]
    Arch(&'static str),
    #[error("seccomp: cannot build the filter: {0}")]
    Build(#[from] BackendError),
    #[error("seccomp: cannot install the filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("seccomp self-test: a forbidden system call (socket) was not stopped")]
    SelfTestSurvived,
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// A rule: argument `arg`'s bits in `mask` are all clear.
fn bits_clear(arg: u8, mask: u64) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![cond(arg, SeccompCmpOp::MaskedEq(mask), 0)?])
}

/// One rule per allowed value of argument `arg` (the rules of a syscall are OR-ed).
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|v| SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, *v)?]))
        .collect()
}

/// System calls allowed whatever their arguments.
const UNCONDITIONAL: &[libc::c_long] = &[
    // Sockets the sidecar already has: accept connections and scrapes, exchange messages
    // (with SCM_RIGHTS), timeouts, shutdown, peer credentials.
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_ppoll,
    // Files: read the blob, inspect region files, close, logs to stderr.
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_write,
    // Writing the table into a tmpfs region's file (serve/memory.rs).
    libc::SYS_pwrite64,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    // Watching the blob's path: resolve it (links, a relative path), watch it, check its
    // filesystem.
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_rm_watch,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_statfs,
    // Which filesystem a region's file is on (tmpfs, hugetlbfs).
    libc::SYS_fstatfs,
    // Memory: the allocator, guest RAM mappings (executable ones are refused below).
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Threads (one per connection), their stacks and synchronisation.
    libc::SYS_clone3,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    // glibc's malloc sizes its per-thread arenas by the CPUs it may run on.
    libc::SYS_sched_getaffinity,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Time: deadlines, lock-wait naps; random keys for hash maps.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    // Removing the socket file on shutdown.
    libc::SYS_unlinkat,
];

/// Legacy x86_64 system calls that glibc still uses there (aarch64 has only the *at forms).
#[cfg(target_arch = "x86_64")]
const UNCONDITIONAL_X86_64: &[libc::c_long] = &[
    libc::SYS_poll,
    libc::SYS_nanosleep,
    libc::SYS_unlink,
    libc::SYS_gettimeofday,
    libc::SYS_readlink,
];
#[cfg(not(target_arch = "x86_64"))]
const UNCONDITIONAL_X86_64: &[libc::c_long] = &[];

/// The filter's rules.
fn rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = UNCONDITIONAL
        .iter()
        .chain(UNCONDITIONAL_X86_64)
        .map(|nr| (*nr, Vec::new()))
        .collect();
    let prot_exec = libc::PROT_EXEC as u64;
    // Mappings never executable: guest RAM, stacks and heap are data.
    rules.insert(libc::SYS_mmap, vec![bits_clear(2, prot_exec)?]);
    rules.insert(libc::SYS_mprotect, vec![bits_clear(2, prot_exec)?]);
    // Opening only for reading: the blob (and nothing is ever created or written).
    let write_flags = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u64;
    rules.insert(libc::SYS_openat, vec![bits_clear(2, write_flags)?]);
    // fcntl: OFD locks on the blob, seals of region files, descriptor flags and duplicates.
    rules.insert(
        libc::SYS_fcntl,
        one_of(
            1,
            &[
                libc::F_OFD_SETLK as u64,
                libc::F_OFD_GETLK as u64,
                libc::F_GET_SEALS as u64,
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
            ],
        )?,
    );
    // clone only for threads (glibc's fallback when clone3 is unavailable), never a fork.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    // glibc's own handlers (SIGCANCEL, SIGSETXID), installed when the first thread starts;
    // and SIGSEGV, SIGBUS: std's stack-overflow handler, on a fault that is not a stack
    // overflow, restores the default action and returns, so that the fault kills the process
    // as itself (without this, the filter would kill it with SIGSYS for that rt_sigaction).
    rules.insert(
        libc::SYS_rt_sigaction,
        one_of(0, &[32, 33, libc::SIGSEGV as u64, libc::SIGBUS as u64])?,
    );
    // Thread names (std names each connection thread).
    rules.insert(libc::SYS_prctl, one_of(0, &[libc::PR_SET_NAME as u64])?);
    // abort() signals only its own process.
    let pid = u64::from(std::process::id());
    rules.insert(libc::SYS_tgkill, one_of(0, &[pid])?);
    // Filling a hugetlbfs region's pages through a mapping with a copy the kernel makes, which
    // fails with EFAULT where a store would be SIGBUS (serve/memory.rs): only within this process.
    rules.insert(libc::SYS_process_vm_readv, one_of(0, &[pid])?);
    Ok(rules)
}

fn target_arch() -> Result<TargetArch, SeccompError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        other => Err(SeccompError::Arch(other)),
    }
}

/// The compiled filter (exposed for tests that inspect it).
pub fn program() -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules()?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `program` (from [`program`], built before start-up so that a failure to build it
/// stops start-up cleanly) on every thread of the process, setting `no_new_privs` first;
/// then runs the self-test when [`SELFTEST_ENV`] asks for it.
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter_all_threads(program)?;
    log::info!(
        "seccomp filter installed ({} instructions); a forbidden system call kills the process",
        program.len()
    );
    match std::env::var(SELFTEST_ENV).as_deref() {
        Ok("1") => {
            log::warn!("{SELFTEST_ENV}=1: calling socket(AF_INET), which must kill the process");
            let socket = rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                None,
            );
            drop(socket);
            Err(SeccompError::SelfTestSurvived)
        }
        Ok(fault @ ("sigsegv" | "sigbus")) => {
            log::warn!(
                "{SELFTEST_ENV}={fault}: faulting on purpose, which must kill the process with {}",
                fault.to_uppercase()
            );
            fault_on_purpose(fault == "sigbus");
            Err(SeccompError::SelfTestSurvived)
        }
        _ => Ok(()),
    }
}

/// Reads a page that the kernel answers with SIGSEGV (a PROT_NONE page) or SIGBUS (a page of
/// a file mapping past the file's end), so that a test can see such a fault end the process
/// as itself under the filter.
fn fault_on_purpose(bus: bool) {
    let page = 4096usize;
    let (prot, flags, fd, offset) = if bus {
        let Ok(exe) = std::fs::File::open("/proc/self/exe") else {
            return;
        };
        let len = exe.metadata().map_or(0, |m| m.len());
        let past_end = (len / page as u64 + 2) * page as u64;
        let Ok(offset) = libc::off_t::try_from(past_end) else {
            return;
        };
        // The mapping keeps the file open on its own.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(exe);
        (libc::PROT_READ, libc::MAP_PRIVATE, fd, offset)
    } else {
        (
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    // SAFETY: a new mapping placed by the kernel where nothing else is.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), page, prot, flags, fd, offset) };
    if addr == libc::MAP_FAILED {
        return;
    }
    // SAFETY: the address is mapped (by us, just above); reading it faults on purpose, and
    // the fault ends the process, which is the point.
    let _ = unsafe { std::ptr::read_volatile(addr.cast::<u8>()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::process::ExitStatusExt;

    /// Names the one system call a child run of this test binary makes under the filter.
    const CALL_ENV: &str = "COCO_SECCOMP_TEST_CALL";
    /// A child's exit status when the filter let its call through.
    const SURVIVED: i32 = 77;

    /// The calls, and whether docs/hardening.md ("What is allowed") lets them through.
    const CALLS: &[(&str, bool)] = &[
        ("getpid", true),
        ("openat read-only", true),
        ("openat for writing", false),
        ("mmap of data", true),
        ("mmap executable", false),
        ("process_vm_readv of this process", true),
        ("process_vm_readv of the parent", false),
        ("process_vm_writev of this process", false),
        ("fcntl F_OFD_GETLK", true),
        ("fcntl F_SETLK", false),
        ("clone of a thread", true),
        ("clone of a process", false),
        ("rt_sigaction SIGSEGV", true),
        ("rt_sigaction SIGINT", false),
        ("prctl PR_SET_NAME", true),
        ("prctl PR_SET_DUMPABLE", false),
        ("tgkill of this process", true),
        ("tgkill of the parent", false),
        ("kill", false),
        ("socket", false),
        ("ioctl", false),
        ("execve", false),
    ];

    /// The child half of [`the_kernel_enforces_the_documented_rules`], run by it (and only
    /// by it: ignored otherwise): installs the filter on this thread and makes the call named
    /// in [`CALL_ENV`]; exits [`SURVIVED`] if the call returned.
    #[test]
    #[ignore = "run by the_kernel_enforces_the_documented_rules in a child process"]
    fn child_makes_one_call_under_the_filter() {
        let call = std::env::var(CALL_ENV).expect("run by the parent test");
        let parent = i64::from(std::os::unix::process::parent_id());
        let page = 4096usize;
        let mut buf = [0u8; 8];
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: CALL_ENV.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let path = c"/proc/self/stat";
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the struct during the call: no core file for the SIGSYS.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        let filter = program().expect("filter");
        seccompiler::apply_filter(&filter).expect("install on this thread");
        // SAFETY: each call gets valid arguments: pointers to live locals or static strings,
        // descriptors it opened; none of them changes memory the test relies on. A call the
        // filter forbids never runs: the kernel kills the process instead. What an allowed call
        // returns does not matter, only that the process survives it.
        let _result = unsafe {
            let pid = i64::from(libc::getpid());
            let tid = libc::syscall(libc::SYS_gettid);
            match call.as_str() {
                "getpid" => libc::syscall(libc::SYS_getpid),
                "openat read-only" => libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDONLY,
                ),
                "openat for writing" => libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDWR,
                ),
                "mmap of data" | "mmap executable" => {
                    let prot = if call == "mmap of data" {
                        libc::PROT_READ | libc::PROT_WRITE
                    } else {
                        libc::PROT_READ | libc::PROT_EXEC
                    };
                    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                    let a = libc::syscall(libc::SYS_mmap, 0, page, prot, flags, -1, 0);
                    if a == -1 {
                        -1
                    } else {
                        0
                    }
                }
                "process_vm_readv of this process" | "process_vm_readv of the parent" => {
                    let target = if call.ends_with("parent") {
                        parent
                    } else {
                        pid
                    };
                    libc::syscall(libc::SYS_process_vm_readv, target, &local, 1, &remote, 1, 0)
                }
                "process_vm_writev of this process" => {
                    libc::syscall(libc::SYS_process_vm_writev, pid, &local, 1, &local, 1, 0)
                }
                "fcntl F_OFD_GETLK" | "fcntl F_SETLK" => {
                    let fd = libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        libc::O_RDONLY,
                    );
                    let mut fl: libc::flock = std::mem::zeroed();
                    fl.l_type = libc::F_RDLCK as libc::c_short;
                    let cmd = if call.ends_with("GETLK") {
                        libc::F_OFD_GETLK
                    } else {
                        libc::F_SETLK
                    };
                    libc::syscall(libc::SYS_fcntl, fd, cmd, &mut fl)
                }
                // Flags the kernel refuses (EINVAL: CLONE_THREAD without CLONE_SIGHAND), so
                // that an allowed call creates nothing; the filter looks only at the flags.
                "clone of a thread" => {
                    libc::syscall(libc::SYS_clone, libc::CLONE_THREAD, 0, 0, 0, 0)
                }
                "clone of a process" => libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0),
                "rt_sigaction SIGSEGV" | "rt_sigaction SIGINT" => {
                    let sig = if call.ends_with("SIGSEGV") {
                        libc::SIGSEGV
                    } else {
                        libc::SIGINT
                    };
                    let mut old: libc::sigaction = std::mem::zeroed();
                    // A query: no new action.
                    libc::syscall(libc::SYS_rt_sigaction, sig, 0, &mut old, 8)
                }
                "prctl PR_SET_NAME" => {
                    libc::syscall(libc::SYS_prctl, libc::PR_SET_NAME, c"child".as_ptr())
                }
                "prctl PR_SET_DUMPABLE" => libc::syscall(libc::SYS_prctl, libc::PR_SET_DUMPABLE, 0),
                // Signal 0: only the checks, nothing is sent.
                "tgkill of this process" => libc::syscall(libc::SYS_tgkill, pid, tid, 0),
                "tgkill of the parent" => libc::syscall(libc::SYS_tgkill, parent, parent, 0),
                "kill" => libc::syscall(libc::SYS_kill, pid, 0),
                "socket" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
                "ioctl" => libc::syscall(libc::SYS_ioctl, 0, libc::FIONREAD, buf.as_mut_ptr()),
                "execve" => libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0),
                other => panic!("unknown call {other}"),
            }
        };
        // SAFETY: _exit ends the process at once (exit_group, which the filter allows).
        unsafe { libc::_exit(SURVIVED) }
    }

    /// Each documented rule as the kernel applies it: a child process installs the filter and
    /// makes one call; an allowed call returns (whatever its result), a forbidden one ends the
    /// process with SIGSYS.
    #[test]
    fn the_kernel_enforces_the_documented_rules() {
        let exe = std::env::current_exe().expect("test binary");
        // The test's path within the crate, wherever the module lives.
        let (_, module) = module_path!().split_once("::").expect("a crate path");
        let child = format!("{module}::child_makes_one_call_under_the_filter");
        for (call, allowed) in CALLS {
            let status = std::process::Command::new(&exe)
                .args([child.as_str(), "--exact", "--ignored", "--test-threads=1"])
                .env(CALL_ENV, call)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run the child");
            if *allowed {
                assert_eq!(status.code(), Some(SURVIVED), "{call}: {status:?}");
            } else {
                assert_eq!(status.signal(), Some(libc::SIGSYS), "{call}: {status:?}");
            }
        }
    }

    #[test]
    fn dangerous_calls_are_not_in_the_allow_list() {
        let rules = rules().expect("rules");
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_ioctl,
            libc::SYS_kill,
            libc::SYS_memfd_create,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
        ] {
            assert!(!rules.contains_key(&nr), "syscall {nr} must not be allowed");
        }
    }
}
