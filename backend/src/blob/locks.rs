//! Open file description (OFD) locks on the certificate blob.
//!
//! OFD locks belong to the open file, not the process, so each lease can own one, and they
//! conflict with the updaters' OFD locks from other processes. flock(2) locks would not: the
//! kernel keeps the two kinds apart. std has no OFD lock API, so this wraps fcntl directly.
//!
//! Linux never makes a shared lock wait for an exclusive one that is queued, so requests that
//! keep a shared lock held at every instant would starve an updater. An updater therefore
//! announces that it waits ([`INTENT_OFFSET`]) and the sidecars stop granting new leases when
//! they see that (docs/design.md, "Updaters first").

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

/// The byte on which an updater waiting for the exclusive lock holds an exclusive lock while it
/// waits, and the end of the range shared locks cover: every byte a blob can have (at most
/// 1 MiB) and far more, but not this one, so that the announcement conflicts with no shared
/// lock. The sidecars find it in /proc/locks ([`super::waiters`]). Being an exclusive lock, it
/// needs the file open for writing, as the exclusive lock itself does: a local user who can
/// only read the blob cannot make the sidecars yield. Taking the exclusive lock on the whole
/// file later makes it part of that lock, and closing the file drops it.
pub const INTENT_OFFSET: i64 = 1 << 62;

fn setlk(file: &File, l_type: libc::c_int) -> io::Result<bool> {
    // l_len 0: the whole file, however it grows.
    setlk_range(file, l_type, 0, 0)
}

fn setlk_range(file: &File, l_type: libc::c_int, start: i64, len: i64) -> io::Result<bool> {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
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

/// Tries once to take the lock: a shared one on bytes 0 to [`INTENT_OFFSET`], an exclusive
/// one on the whole file. `Ok(false)` means another open file holds a conflicting one.
pub fn try_lock(file: &File, kind: LockKind) -> io::Result<bool> {
    match kind {
        LockKind::Shared => setlk_range(file, libc::F_RDLCK, 0, INTENT_OFFSET),
        LockKind::Exclusive => setlk(file, libc::F_WRLCK),
    }
}

/// Announces that this open file (open for writing) waits for the exclusive lock: an
/// exclusive lock on the byte [`INTENT_OFFSET`]. `Ok(false)`: another updater announced its
/// wait first, or holds the whole file.
pub fn announce_intent(file: &File) -> io::Result<bool> {
    setlk_range(file, libc::F_WRLCK, INTENT_OFFSET, 1)
}

/// Takes the lock, waiting at most `wait`. Retries with short sleeps (from 200 us up to 5 ms)
/// rather than F_OFD_SETLKW, which cannot be given a deadline without signals. A wait for the
/// exclusive lock is announced ([`announce_intent`]) for as long as it lasts.
pub fn lock_within(file: &File, kind: LockKind, wait: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + wait;
    let mut nap = Duration::from_micros(200);
    let mut announced = kind == LockKind::Shared;
    loop {
        if try_lock(file, kind)? {
            return Ok(true);
        }
        if !announced {
            announced = announce_intent(file)?;
        }
        let now = Instant::now();
        if now >= deadline {
            if kind == LockKind::Exclusive {
                setlk_range(file, libc::F_UNLCK, INTENT_OFFSET, 1)?;
            }
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
