//! Open file description (OFD) locks on the certificate blob.
//!
//! OFD locks belong to the open file, not the process, so each lease can own one, and they
//! conflict with the updaters' OFD locks from other processes. flock(2) locks would not: the
//! kernel keeps the two kinds apart. std has no OFD lock API; [`crate::sys`] makes the calls.
//!
//! Linux never makes a shared lock wait for an exclusive one that is queued, so requests that
//! keep a shared lock held at every instant would starve an updater. An updater therefore
//! announces that it waits ([`INTENT_OFFSET`]) and the sidecars stop granting new leases when
//! they see that (docs/design.md, "Updaters first").

use std::fs::File;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use crate::sys;

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

/// Tries once to take the lock: a shared one on bytes 0 to [`INTENT_OFFSET`], an exclusive
/// one on the whole file (`len` 0: however it grows). `Ok(false)` means another open file holds
/// a conflicting one.
pub fn try_lock(file: &File, kind: LockKind) -> io::Result<bool> {
    match kind {
        LockKind::Shared => sys::ofd_setlk(file, libc::F_RDLCK, 0, INTENT_OFFSET),
        LockKind::Exclusive => sys::ofd_setlk(file, libc::F_WRLCK, 0, 0),
    }
}

/// Announces that this open file (open for writing) waits for the exclusive lock: an
/// exclusive lock on the byte [`INTENT_OFFSET`]. `Ok(false)`: another updater announced its
/// wait first, or holds the whole file.
pub fn announce_intent(file: &File) -> io::Result<bool> {
    sys::ofd_setlk(file, libc::F_WRLCK, INTENT_OFFSET, 1)
}

/// Takes the lock, waiting at most `wait` ([`Backoff`]). A wait for the exclusive lock is
/// announced ([`announce_intent`]) for as long as it lasts.
pub fn lock_within(file: &File, kind: LockKind, wait: Duration) -> io::Result<bool> {
    let mut backoff = Backoff::new(wait);
    let mut announced = kind == LockKind::Shared;
    loop {
        if try_lock(file, kind)? {
            return Ok(true);
        }
        if !announced {
            announced = announce_intent(file)?;
        }
        if !backoff.pause() {
            if kind == LockKind::Exclusive {
                sys::ofd_setlk(file, libc::F_UNLCK, INTENT_OFFSET, 1)?;
            }
            return Ok(false);
        }
    }
}

/// Drops this open file's lock (closing the file does the same).
pub fn unlock(file: &File) -> io::Result<()> {
    sys::ofd_setlk(file, libc::F_UNLCK, 0, 0).map(|_| ())
}

/// The kind of lock another open file holds that keeps this one from taking the exclusive
/// lock on the whole file now (`F_OFD_GETLK`); `None` when nothing does.
pub fn exclusive_blocked_by(file: &File) -> io::Result<Option<LockKind>> {
    Ok(match sys::ofd_getlk(file, libc::F_WRLCK, 0, 0)? {
        libc::F_RDLCK => Some(LockKind::Shared),
        libc::F_WRLCK => Some(LockKind::Exclusive),
        _ => None,
    })
}

/// The pace of retries for a lock another process holds, which the sidecar and the updaters
/// wait for alike: sleeps of 200 us, doubling up to 5 ms, never past the deadline, never
/// spinning. Polling, because F_OFD_SETLKW cannot be given a deadline without signals.
#[derive(Debug)]
pub struct Backoff {
    wait: Duration,
    /// Set at the first pause, so that a lock taken at the first try costs no clock read.
    deadline: Option<Instant>,
    nap: Duration,
}

/// The first sleep.
const FIRST_NAP: Duration = Duration::from_micros(200);
/// The longest sleep.
const MAX_NAP: Duration = Duration::from_millis(5);

impl Backoff {
    /// Retries for at most `wait` after the first failed try.
    pub fn new(wait: Duration) -> Backoff {
        Backoff {
            wait,
            deadline: None,
            nap: FIRST_NAP,
        }
    }

    /// After a failed try: sleeps before the next one and returns true, or returns false at
    /// once when the wait is over.
    pub fn pause(&mut self) -> bool {
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.wait);
        if now >= deadline {
            return false;
        }
        thread::sleep(self.nap.min(deadline - now));
        self.nap = (self.nap * 2).min(MAX_NAP);
        true
    }
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
        assert_eq!(
            exclusive_blocked_by(&w).expect("getlk"),
            Some(LockKind::Shared)
        );
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
        assert_eq!(
            exclusive_blocked_by(&c).expect("getlk"),
            Some(LockKind::Exclusive)
        );
        drop(w);
        assert_eq!(exclusive_blocked_by(&c).expect("getlk"), None);
        std::fs::remove_file(&dir).expect("rm");
    }

    #[test]
    fn backoff_sleeps_doubling_naps_until_the_wait_is_over() {
        assert!(!Backoff::new(Duration::ZERO).pause(), "no wait: no sleep");
        let mut b = Backoff::new(Duration::from_millis(30));
        let t = Instant::now();
        let mut pauses = 0;
        while b.pause() {
            pauses += 1;
        }
        assert!(t.elapsed() >= Duration::from_millis(30), "the whole wait");
        // Sleeps never end early: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 ms, then 5 ms each, fill 30 ms
        // in at most 11 pauses (fewer on a loaded machine), never in a busy loop.
        assert!((1..=11).contains(&pauses), "{pauses} pauses");
    }
}
