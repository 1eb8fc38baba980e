//! The system calls that neither std nor `rustix` offers as this crate needs them, each behind
//! a safe function; everything else calls std or `rustix` (whose safe wrappers replace the
//! `libc` calls this crate once made by hand). What is here, and why not `rustix`:
//!
//! - OFD locks (`F_OFD_SETLK`, `F_OFD_GETLK`): `rustix::fs::fcntl_lock` takes process-owned
//!   POSIX locks (`F_SETLK`), which neither conflict among a process's open files nor outlive
//!   a `fork`+`exec` the way the sidecar's leases and `blob lock` need;
//! - `process_vm_readv(2)` on this process, the copy into a hugetlbfs mapping that the kernel
//!   makes and fails with EFAULT where a store would be SIGBUS: not in `rustix`;
//! - `SO_PEERCRED`: `rustix::net::sockopt::socket_peercred` types the pid as non-zero, but the
//!   kernel reports 0 for a peer whose pid is not visible in this pid namespace (a VMM in
//!   another container);
//! - setting a signal's disposition to `SIG_IGN`: `rustix` has no safe API for it, and
//!   `signal-hook` only installs handlers.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};

/// A `flock` structure for an OFD lock request of `l_type` on `len` bytes from `start` (`len`
/// 0: to the end of the file, however it grows).
fn flock(l_type: libc::c_int, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// `F_OFD_SETLK`: takes (or, with `F_UNLCK`, drops) the lock `l_type` (`F_RDLCK`, `F_WRLCK`)
/// on `len` bytes from `start` for the open file description of `file`, without waiting.
/// `Ok(false)`: another open file description holds a conflicting lock.
pub fn ofd_setlk(file: &File, l_type: libc::c_int, start: i64, len: i64) -> io::Result<bool> {
    let fl = flock(l_type, start, len);
    loop {
        // SAFETY: F_OFD_SETLK reads the flock struct we pass by pointer, which outlives the
        // call; the fd is valid for as long as `file` is borrowed.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// `F_OFD_GETLK`: the type of a lock (`F_RDLCK`, `F_WRLCK`) that another open file
/// description holds and that would block `l_type` on `len` bytes from `start` for `file`;
/// `F_UNLCK` when none would.
pub fn ofd_getlk(
    file: &File,
    l_type: libc::c_int,
    start: i64,
    len: i64,
) -> io::Result<libc::c_int> {
    let mut fl = flock(l_type, start, len);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass by pointer, which outlives
    // the call; the fd is valid while `file` is borrowed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(fl.l_type))
}

/// Whether `number` is an open descriptor of this process (F_GETFD), without claiming it.
pub fn fd_is_open(number: libc::c_int) -> io::Result<()> {
    // SAFETY: F_GETFD only reads the descriptor table; any integer is a valid argument.
    if unsafe { libc::fcntl(number, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The credentials of a Unix socket's peer as of its `connect` (`SO_PEERCRED`); the pid is 0
/// when the peer's is not visible in this pid namespace.
pub fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is `cred`'s size; the borrowed
    // descriptor is open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Sets `sig`'s disposition to `SIG_IGN`.
pub fn ignore_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    if unsafe { libc::signal(sig, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which of `fds` are readable (or closed, or in error), waiting at most `timeout` (`None`:
/// for ever) for one to be. Retried when a signal interrupts the wait.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    // ppoll(2) takes the timeout to the nanosecond and never wakes early.
    let timeout = timeout.map(Timespec::try_from).transpose();
    let timeout = timeout.map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    rustix::io::retry_on_intr(|| rustix::event::poll(&mut pfds, timeout.as_ref()))?;
    Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect())
}

/// Unmaps a mapping when dropped.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr` and `len` are exactly what mmap returned and took, and nothing refers
        // to the mapping any more.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Copies `data` to `offset` of `file` through a shared mapping of the pages under it (`page`
/// bytes each) that only the kernel touches: `process_vm_readv(2)` copies from `data` into it
/// on behalf of this very process, and a page the kernel cannot supply there is EFAULT (or a
/// short count), never SIGBUS. For files without `write(2)` (hugetlbfs). Returns the bytes
/// copied; the mapping is gone when this returns.
pub fn copy_through_mapping(file: &File, page: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
    let too_far = || io::Error::from_raw_os_error(libc::EOVERFLOW);
    let start = offset - offset % page;
    let end = offset
        .checked_add(data.len() as u64)
        .and_then(|e| e.checked_next_multiple_of(page))
        .ok_or_else(too_far)?;
    let len = usize::try_from(end - start).map_err(|_| too_far())?;
    let file_offset = libc::off_t::try_from(start).map_err(|_| too_far())?;
    // SAFETY: a new shared mapping of the file, placed by the kernel where nothing else is;
    // MAP_NORESERVE takes no huge pages from the pool for pages the file lacks (the copy
    // below fails on those instead).
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            file.as_fd().as_raw_fd(),
            file_offset,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mapping = Mapping { addr, len };
    let local = libc::iovec {
        // `offset - start < len`: inside the mapping.
        iov_base: mapping
            .addr
            .cast::<u8>()
            .wrapping_add((offset - start) as usize)
            .cast(),
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: both iovecs describe memory of this process valid for the whole call: `local`
    // the mapping (written by the kernel only), `remote` the slice (only read).
    let copied = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    drop(mapping);
    usize::try_from(copied).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::time::Instant;

    fn file(name: &str) -> (tempfile::TempDir, File, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, b"x").expect("write");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open")
        };
        let (a, b) = (open(), open());
        (dir, a, b)
    }

    #[test]
    fn ofd_locks_of_two_open_files_conflict_and_getlk_names_the_holder() {
        // Two open files of one process: OFD locks conflict (process-owned locks would not).
        let (_dir, a, b) = file("locks");
        assert!(ofd_setlk(&a, libc::F_RDLCK, 0, 0).expect("read lock"));
        assert!(ofd_setlk(&b, libc::F_RDLCK, 0, 0).expect("shared"));
        assert!(!ofd_setlk(&b, libc::F_WRLCK, 0, 0).expect("a conflicts"));
        assert_eq!(
            ofd_getlk(&b, libc::F_WRLCK, 0, 0).expect("getlk"),
            libc::F_RDLCK
        );
        // Ranges: a lock on one byte far out conflicts with nothing below it.
        assert!(ofd_setlk(&a, libc::F_UNLCK, 0, 0).expect("unlock"));
        assert!(ofd_setlk(&b, libc::F_UNLCK, 0, 0).expect("unlock"));
        assert!(ofd_setlk(&a, libc::F_WRLCK, 1 << 40, 1).expect("one byte"));
        assert!(ofd_setlk(&b, libc::F_RDLCK, 0, 1 << 40).expect("below it"));
        assert_eq!(
            ofd_getlk(&b, libc::F_WRLCK, 0, 0).expect("getlk"),
            libc::F_WRLCK
        );
        drop(a);
        assert_eq!(
            ofd_getlk(&b, libc::F_WRLCK, 0, 0).expect("getlk"),
            libc::F_UNLCK
        );
    }

    #[test]
    fn poll_reports_readable_descriptors_and_times_out() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let t = Instant::now();
        let ready = poll_readable(&[a.as_fd()], Some(Duration::from_millis(20))).expect("poll");
        assert_eq!(ready, vec![false]);
        assert!(t.elapsed() >= Duration::from_millis(20), "not early");
        std::io::Write::write_all(&mut &b, b"!").expect("write");
        let ready = poll_readable(&[b.as_fd(), a.as_fd()], None).expect("poll");
        assert_eq!(ready, vec![false, true]);
    }

    #[test]
    fn a_copy_through_a_mapping_lands_at_the_offset() {
        let (_dir, f, _) = file("copy");
        f.set_len(3 * 4096).expect("len");
        let data: Vec<u8> = (1..=200).collect();
        // Across a page boundary, at an offset inside a page.
        let at = 4096 - 100;
        assert_eq!(
            copy_through_mapping(&f, 4096, at, &data).expect("copy"),
            data.len()
        );
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, at).expect("read");
        assert_eq!(back, data);
        // Past the file's end the kernel cannot supply the page: no SIGBUS, an error.
        let past = copy_through_mapping(&f, 4096, 5 * 4096, &data);
        assert!(past.as_ref().map_or(true, |n| *n < data.len()), "{past:?}");
    }
}
