//! The updaters' side of the blob lock: open the blob and take the *exclusive* OFD lock within
//! a bounded wait (the sidecar takes *shared* ones on its own open files, one per lease), make
//! sure the locked file is still the one at the path, and say who holds the lock when the wait
//! runs out. The wait is announced ([`locks::announce_intent`]) so that sidecars stop granting
//! new leases until it is over.
//!
//! A symbolic link at the path is refused, not followed: an updater that wrote through it
//! would lock and change whatever file it points to now, which need not be the one the
//! sidecars serve by the time they look.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::blob::locks::{self, LockKind};

/// Environment variable `blob lock` sets for its command: the blob it holds locked. A
/// `blob install` of the same blob inside it would wait for its own parent, so it fails at once.
pub const LOCK_ENV: &str = "COCO_SIDECAR_BLOB_LOCKED";

/// Times to start over when the path was replaced while we locked the file it named.
const REPLACED_RETRIES: usize = 10;

/// Why the exclusive lock was not taken.
#[derive(Debug, Error)]
pub enum LockingError {
    /// The blob does not exist.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// Opening, locking or stat-ing failed.
    #[error("{path}: cannot {what}: {source}")]
    Io {
        /// The blob.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The wait ran out.
    #[error("{path} is still locked after {waited_ms} ms: {holder}; retry, or raise --wait-ms")]
    Timeout {
        /// The blob.
        path: PathBuf,
        /// How long was waited.
        waited_ms: u128,
        /// Who holds it, as far as the kernel tells.
        holder: Holder,
    },
    /// The path is a symbolic link.
    #[error(
        "{path} is a symbolic link (to {target}); refusing to write through it: give the \
         blob's real path"
    )]
    Symlink {
        /// The blob path.
        path: PathBuf,
        /// Where it points.
        target: String,
    },
    /// Not a regular file.
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// Called inside `blob lock` of the same blob.
    #[error(
        "{0} is held by the enclosing `coco-sidecar blob lock`, which this command would wait \
         for forever; use `blob lock --install NEW BLOB -- COMMAND` to install under that lock"
    )]
    OwnParent(PathBuf),
}

/// The kind of lock that blocked us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Shared locks: sidecar leases.
    Shared,
    /// An exclusive lock: another updater.
    Exclusive,
    /// Free by the time we looked.
    Gone,
    /// F_OFD_GETLK failed.
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Holder::Shared => {
                "a coco-sidecar holds a shared lock: a guest's certificate request has not reached \
                 firmware yet (the lease ends at the VMM's COCO_DONE, or after the sidecar's \
                 --lease-timeout-ms; sidecars grant no new lease while an updater waits, so a \
                 wait longer than their --lease-timeout-ms + --lock-wait-ms + 1 s suffices)"
            }
            Holder::Exclusive => {
                "another updater holds the exclusive lock (a `coco-sidecar blob install` or \
                 `blob lock` still running?)"
            }
            Holder::Gone => "the lock was released just as the wait ran out",
            Holder::Unknown => "the kernel did not say who holds it",
        })
    }
}

/// Asks the kernel which lock would block an exclusive one on `file`.
pub fn holder(file: &File) -> Holder {
    match locks::exclusive_blocked_by(file) {
        Ok(Some(LockKind::Shared)) => Holder::Shared,
        Ok(Some(LockKind::Exclusive)) => Holder::Exclusive,
        Ok(None) => Holder::Gone,
        Err(_) => Holder::Unknown,
    }
}

/// Whether `path` is the blob that an enclosing `blob lock` holds.
fn held_by_parent(path: &Path) -> bool {
    let Some(locked) = std::env::var_os(LOCK_ENV) else {
        return false;
    };
    let same = match (std::fs::metadata(locked), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    // A stale variable (inherited by something that outlived its `blob lock`) must not block
    // installs: only an exclusive lock that is actually held counts.
    same && File::open(path).is_ok_and(|f| holder(&f) == Holder::Exclusive)
}

/// Refuses a symbolic link at `path` (whatever it points to), clearly.
pub fn refuse_symlink(path: &Path) -> Result<(), LockingError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(LockingError::Symlink {
            path: path.to_owned(),
            target: std::fs::read_link(path)
                .map_or_else(|_| "?".into(), |t| t.display().to_string()),
        }),
        _ => Ok(()),
    }
}

/// Opens the regular file at `path` for reading and writing, never through a symbolic link
/// (`O_NOFOLLOW`) and without blocking on a FIFO (`O_NONBLOCK`, which regular files ignore).
pub fn open_for_update(path: &Path) -> Result<File, LockingError> {
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LockingError::Missing(path.to_owned()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            refuse_symlink(path)?;
            return Err(io_error(path, "open", e));
        }
        Err(e) => return Err(io_error(path, "open", e)),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(file),
        Ok(_) => Err(LockingError::NotRegular(path.to_owned())),
        Err(e) => Err(io_error(path, "stat", e)),
    }
}

fn io_error(path: &Path, what: &'static str, source: io::Error) -> LockingError {
    LockingError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Opens `path` read-write (it must exist) and takes the exclusive OFD lock, waiting at most
/// `wait`. If the path was replaced (renamed over) while we waited, starts again on the new
/// file, so the lock is always on the file the sidecars open.
pub fn lock_exclusive(path: &Path, wait: Duration) -> Result<File, LockingError> {
    if held_by_parent(path) {
        return Err(LockingError::OwnParent(path.to_owned()));
    }
    let start = Instant::now();
    let io = |what: &'static str| move |source: io::Error| io_error(path, what, source);
    for _ in 0..REPLACED_RETRIES {
        let file = open_for_update(path)?;
        let left = wait.saturating_sub(start.elapsed());
        if !locks::lock_within(&file, LockKind::Exclusive, left).map_err(io("lock"))? {
            return Err(LockingError::Timeout {
                path: path.to_owned(),
                waited_ms: start.elapsed().as_millis(),
                holder: holder(&file),
            });
        }
        let locked = file.metadata().map_err(io("stat"))?;
        match std::fs::metadata(path) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => return Ok(file),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LockingError::Missing(path.to_owned()))
            }
            Err(e) => return Err(io("stat")(e)),
        }
    }
    Err(io("lock")(io::Error::other(
        "the path was replaced by another file again and again while locking",
    )))
}
