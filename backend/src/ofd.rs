//! Open file description (OFD) locks on the certificate blob.
//!
//! OFD locks belong to the open file, not the process, so each lease can own one, and they
//! conflict with the updaters' OFD locks from other processes. flock(2) locks would not: the
//! kernel keeps the two kinds apart. std has no OFD lock API, so this wraps fcntl directly.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

/// Which lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Readers (the sidecar while serving).
    Shared,
    /// Writers (an updater rewriting the blob).
    Exclusive,
}

fn setlk(file: &File, l_type: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // the whole file, however it grows
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

/// Tries once to take the lock. `Ok(false)` means another open file holds a conflicting one.
pub fn try_lock(file: &File, kind: LockKind) -> io::Result<bool> {
    setlk(
        file,
        match kind {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Exclusive => libc::F_WRLCK,
        },
    )
}

/// Takes the lock, waiting at most `wait`. Retries with short sleeps (from 200 us up to 5 ms)
/// rather than F_OFD_SETLKW, which cannot be given a deadline without signals.
pub fn lock_within(file: &File, kind: LockKind, wait: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + wait;
    let mut nap = Duration::from_micros(200);
    loop {
        if try_lock(file, kind)? {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(5));
    }
}

/// Drops this open file's lock (closing the file does the same).
pub fn unlock(file: &File) -> io::Result<()> {
    setlk(file, libc::F_UNLCK).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_locks_coexist_and_exclude_writers() {
        let dir = std::env::temp_dir().join(format!("ofd-test-{}", std::process::id()));
        std::fs::write(&dir, b"x").expect("write");
        let a = File::open(&dir).expect("open");
        let b = File::open(&dir).expect("open");
        let w = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dir)
            .expect("open");
        assert!(try_lock(&a, LockKind::Shared).expect("lock"));
        assert!(try_lock(&b, LockKind::Shared).expect("lock"));
        assert!(!try_lock(&w, LockKind::Exclusive).expect("lock"));
        drop(a);
        unlock(&b).expect("unlock");
        assert!(lock_within(&w, LockKind::Exclusive, Duration::from_millis(50)).expect("lock"));
        let c = File::open(&dir).expect("open");
        let t = Instant::now();
        assert!(!lock_within(&c, LockKind::Shared, Duration::from_millis(30)).expect("lock"));
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "waited the full bound"
        );
        std::fs::remove_file(&dir).expect("rm");
    }
}
