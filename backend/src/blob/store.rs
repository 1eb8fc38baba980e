//! The certificate blob: shared-lock, validate, cache.
//!
//! The store keeps **one open file description** of the blob and shares it among all leases:
//! the shared OFD lock is taken on it when the first lease starts and dropped when the last one
//! ends (a lock count), so a request costs a lock syscall only when no other lease holds it,
//! and never an `open`/`close`. Parsing and validating happens once per version of the file;
//! each request decides whether the cached version is still the file's content, *under the
//! shared lock*, with one `read` of an inotify queue that watches the path and the file
//! ([`super::watch`]): empty, and the cached version was read (or its stamps checked) after the
//! watch was made, means nothing changed. Otherwise, or where the path cannot be watched, it
//! takes one `stat(path)`. Why that is sound is argued in docs/design.md ("Blob cache"); in
//! short:
//! - updaters rewrite in place under the exclusive lock, so while we hold the shared lock the
//!   file cannot change, and the stamps we compare belong to the bytes we serve;
//! - `stat(path)` (not `fstat`) names the file at the path *now*: a rename-replacement (or a
//!   delete, or a swapped symlink) shows as another device/inode than the open file's, and is
//!   served from a fresh open. While we hold the old file open its inode number cannot be
//!   reused, so equal device/inode means the same file;
//! - every write through the syscall API changes ctime (and a size change changes the size).
//!   Two writes can share one timestamp tick, so a version whose ctime is within
//!   [`RACY_WINDOW`] of the moment it was read is not trusted: it is re-read (and compared)
//!   on each request until a read happens well after its ctime (git's "racy clean" rule);
//! - every change inotify reports (writes, truncation, renames and deletions of the file or of
//!   any name its resolution went through) is queued before the call that made it returns,
//!   so before an updater can drop its exclusive lock;
//! - writes that bypass the stamps and inotify (through a shared mapping whose pages are
//!   already dirty) are caught by checking the path and re-reading a cached version at least
//!   every [`REVERIFY_INTERVAL`].
//!
//! A version that fails validation is never served, and neither is the previous one once the
//! file changed: requests get EAGAIN and an error is logged at most every
//! [`ERROR_LOG_INTERVAL`] per distinct problem.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coco_protocol::table::{Table, TableError, EMPTY_TABLE, MAX_TABLE_BYTES};
use log::{error, info, warn};
use thiserror::Error;

use super::locks::{self, Backoff, LockKind};
use super::waiters;
use super::watch::PathWatch;
use crate::config::MissingCerts;
use crate::histogram::Histogram;

/// A cached version is trusted only if it was read this long after the file's last change.
/// Generous on purpose: it covers coarse timestamp ticks and 1- or 2-second timestamp
/// filesystems.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);
/// A trusted version is still re-read (and compared byte for byte) this often, which bounds how
/// long a change that leaves every stamp alone can go unnoticed.
pub const REVERIFY_INTERVAL: Duration = Duration::from_secs(1);
/// The same problem is logged at most this often.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// While the shared lock is being taken or joined, /proc/locks is read at most this often for
/// updaters waiting ([`super::waiters`]): an updater that starts waiting is seen within this,
/// then no new lease is granted, and it gets the lock once the leases held end (at most
/// `--lease-timeout-ms` later). docs/design.md, "Updaters first".
pub const UPDATER_SCAN_INTERVAL: Duration = Duration::from_millis(250);
/// While yielding to an updater, /proc/locks is read at most this often; two looks in a row
/// that find none end the yield.
pub const YIELD_RESCAN_INTERVAL: Duration = Duration::from_millis(25);

/// What `blob install` writes over the blob's first entry while it rewrites the rest (see
/// `tool::journal`): an entry of length 0, which no valid table holds, so that a rewrite
/// interrupted at any point never leaves a file that validates as a mix of two versions.
pub const INSTALL_MARKER: [u8; 24] = *b"COCO-INSTALLING\0\xff\xff\xff\xff\0\0\0\0";

/// Why a request cannot be served from the blob (answered EAGAIN, or EIO for
/// [`BlobError::Missing`] under `--missing-certs eio`). The text names the problem for the log.
#[derive(Debug, Error, Clone)]
pub enum BlobError {
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error("{path} is locked by an updater (waited {waited:?})")]
    Locked { path: PathBuf, waited: Duration },
    #[error(
        "an updater waits for the lock on {path}: no new leases until it has had it (waited \
         {waited:?})"
    )]
    UpdaterWaiting { path: PathBuf, waited: Duration },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        /// Shared: a verdict is cached and handed to every request that meets it.
        source: Arc<io::Error>,
    },
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    #[error(
        "{0} changed while it was read under the shared lock (an updater that does not lock?)"
    )]
    Changed(PathBuf),
    #[error("{path} is not a valid certificate table: {error}")]
    Invalid { path: PathBuf, error: TableError },
    #[error(
        "{0} was left half-written by an interrupted `blob install`: run `coco-sidecar blob \
         recover {0}`"
    )]
    InstallInterrupted(PathBuf),
}

/// What the blob gives a request.
#[derive(Debug)]
pub enum Fetch {
    /// Serve these bytes. `lock` is the share of the shared lock to keep as the lease (`None`
    /// when there is no file, e.g. the empty table for a missing blob).
    Table {
        bytes: Arc<[u8]>,
        lock: Option<BlobLock>,
    },
    /// Answer EAGAIN; the reason is for the log.
    Again(BlobError),
    /// Answer EIO; the reason is for the log.
    Io(BlobError),
}

/// The identity and change stamps of one version of the file: device, inode, size, mtime and
/// ctime. Also what the blob monitor ([`crate::daemon::monitor`]) compares to see a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    /// The key of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether a read at `read_at` (wall clock) happened safely after the last change.
    pub fn settled_at(&self, read_at: SystemTime, window: Duration) -> bool {
        let Ok(ctime) = u64::try_from(self.ctime.0) else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(ctime, self.ctime.1.clamp(0, 999_999_999) as u32);
        read_at.duration_since(changed).is_ok_and(|d| d > window)
    }
}

/// One open file description of the blob, shared by every lease taken through it.
#[derive(Debug)]
struct OpenBlob {
    file: File,
    dev: u64,
    ino: u64,
    holders: Mutex<Holders>,
    /// Unlocking failed: this file may still hold its lock, so it must not be used again (it
    /// is closed, which drops any lock, once its last lease ends).
    broken: AtomicBool,
}

/// Who holds the shared lock through one open file, and whether an updater waits for it.
#[derive(Debug)]
struct Holders {
    /// Leases holding the shared lock through this file; the OFD lock is held exactly while
    /// this is non-zero.
    count: usize,
    /// How /proc/locks names the file ([`waiters`]); `kernel` once read from fdinfo.
    lock_id: String,
    kernel: bool,
    /// When /proc/locks was last read.
    scanned: Option<Instant>,
    /// An updater waits for the exclusive lock: no new share is handed out until it is gone.
    yielding: bool,
    /// Scans in a row that found no updater while yielding.
    clear_scans: u8,
    /// /proc/locks could not be read (logged once).
    blind: bool,
}

/// Why a share of the lock was not handed out within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// An updater holds the exclusive lock.
    Locked,
    /// An updater waits for it, and the leases drain so that it gets it.
    Yielding,
}

impl OpenBlob {
    fn new(file: File, meta: &std::fs::Metadata) -> OpenBlob {
        OpenBlob {
            file,
            dev: meta.dev(),
            ino: meta.ino(),
            holders: Mutex::new(Holders {
                count: 0,
                lock_id: waiters::stat_lock_id(meta),
                kernel: false,
                scanned: None,
                yielding: false,
                clear_scans: 0,
                blind: false,
            }),
            broken: AtomicBool::new(false),
        }
    }

    /// Takes a share of the shared lock, waiting at most `wait` for an updater to finish (or,
    /// when one waits for the lock, for it to have had it), at the pace of [`Backoff`].
    fn acquire(self: &Arc<Self>, wait: Duration) -> io::Result<Result<BlobLock, Refused>> {
        let mut backoff = Backoff::new(wait);
        loop {
            let refused = {
                let mut holders = lock(&self.holders);
                self.look_for_updaters(&mut holders);
                if holders.yielding {
                    Refused::Yielding
                } else if holders.count > 0 || locks::try_lock(&self.file, LockKind::Shared)? {
                    if !holders.kernel {
                        self.learn_lock_id(&mut holders);
                    }
                    holders.count += 1;
                    return Ok(Ok(BlobLock {
                        blob: Arc::clone(self),
                    }));
                } else {
                    Refused::Locked
                }
            };
            if !backoff.pause() {
                return Ok(Err(refused));
            }
        }
    }

    /// Reads /proc/locks when the last look is [`UPDATER_SCAN_INTERVAL`] old (or, while
    /// yielding, [`YIELD_RESCAN_INTERVAL`]) and starts or stops yielding to an updater.
    fn look_for_updaters(&self, holders: &mut Holders) {
        let now = Instant::now();
        let every = if holders.yielding {
            YIELD_RESCAN_INTERVAL
        } else {
            UPDATER_SCAN_INTERVAL
        };
        if holders
            .scanned
            .is_some_and(|at| now.duration_since(at) < every)
        {
            return;
        }
        holders.scanned = Some(now);
        match waiters::updater_waiting(&holders.lock_id) {
            Ok(true) => {
                if !holders.yielding {
                    info!(
                        "an updater waits for the blob's exclusive lock; no new leases until it \
                         has had it ({} held now)",
                        holders.count
                    );
                }
                holders.yielding = true;
                holders.clear_scans = 0;
            }
            // Two clear looks in a row, at least YIELD_RESCAN_INTERVAL apart: an updater
            // woken by our unlock has had that long to take the lock.
            Ok(false) if holders.yielding => {
                holders.clear_scans += 1;
                if holders.clear_scans >= 2 {
                    holders.yielding = false;
                    info!("no updater waits for the blob any more; granting leases again");
                }
            }
            Ok(false) => {}
            Err(e) => {
                if !holders.blind {
                    warn!(
                        "cannot read {}: {e}; updaters that wait for the blob's lock are not \
                         seen, and requests arriving back to back can hold them off",
                        waiters::PROC_LOCKS
                    );
                    holders.blind = true;
                }
            }
        }
    }

    /// Learns the kernel's name of the file from fdinfo, while our lock is held.
    fn learn_lock_id(&self, holders: &mut Holders) {
        if let Some(id) = waiters::held_lock_id(&self.file, self.ino) {
            holders.lock_id = id;
        }
        holders.kernel = true;
    }

    fn release(&self) {
        let mut holders = lock(&self.holders);
        holders.count = holders.count.saturating_sub(1);
        if holders.count == 0 {
            if let Err(e) = locks::unlock(&self.file) {
                error!("cannot drop the shared lock on the blob: {e}; closing that file instead");
                self.broken.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// A share of the shared OFD lock on the blob: the lease's hold on it. The lock is released
/// when the last share of that open file is dropped.
#[derive(Debug)]
pub struct BlobLock {
    blob: Arc<OpenBlob>,
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        self.blob.release();
    }
}

#[derive(Debug)]
struct Cached {
    key: FileKey,
    /// The validated bytes, or why this version is not valid.
    verdict: Result<Arc<[u8]>, BlobError>,
    /// Read safely after the last change (see [`RACY_WINDOW`]).
    trusted: bool,
    /// When the file's bytes were last read and compared.
    verified: Instant,
    /// The watch under which this version was last confirmed (read, or its stamps compared,
    /// after the watch was made); `None` for none.
    watch: Option<u64>,
}

/// The inotify watch of the path, when it can be watched.
#[derive(Debug, Default)]
struct Watching {
    /// Made at the first look at the path and kept (see [`PathWatch::new`]).
    watch: Option<PathWatch>,
    /// Numbers the watches made, so that a cached version knows which one it was confirmed
    /// under.
    generation: u64,
    /// After a failure, no new watch is tried before this (each try costs system calls).
    retry_at: Option<Instant>,
    /// The last failure logged, so that each is logged once.
    logged: Option<String>,
}

#[derive(Debug, Default)]
struct LogGate {
    last: Option<(String, Instant)>,
    suppressed: u64,
}

impl LogGate {
    /// Whether to log `message` now, and how many repeats were suppressed before it.
    fn admit(&mut self, message: &str) -> Option<u64> {
        let now = Instant::now();
        let fresh = match &self.last {
            Some((m, at)) => m != message || now.duration_since(*at) >= ERROR_LOG_INTERVAL,
            None => true,
        };
        if !fresh {
            self.suppressed += 1;
            return None;
        }
        self.last = Some((message.to_owned(), now));
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Counters a caller (metrics, tests, benchmarks) can read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlobStats {
    /// Times the file's bytes were read (and validated unless equal to the cached ones).
    pub reloads: u64,
    /// Times a read version failed validation.
    pub invalid: u64,
    /// Times the blob was opened (the first time, and after the path was replaced).
    pub opens: u64,
    /// Requests that looked at the path with `stat` (no watch, or the watch had something to
    /// report, or the reverify interval had passed).
    pub path_checks: u64,
    /// The path was watchable at the last look: requests are served without a `stat` until
    /// something changes.
    pub watched: bool,
}

#[derive(Debug, Default)]
struct Counters {
    reloads: AtomicU64,
    invalid: AtomicU64,
    opens: AtomicU64,
    path_checks: AtomicU64,
}

/// The blob at one path, with the last validated version cached.
#[derive(Debug)]
pub struct BlobStore {
    path: PathBuf,
    lock_wait: Duration,
    missing: MissingCerts,
    racy_window: Duration,
    reverify: Duration,
    /// Watch the path with inotify when possible (tests turn it off to test `stat` alone).
    watch: bool,
    /// Log why a fetch is answered EAGAIN (off for stores that only judge the blob: their
    /// callers say it themselves, once).
    log_errors: bool,
    empty: Arc<[u8]>,
    current: Mutex<Option<Arc<OpenBlob>>>,
    cache: Mutex<Option<Cached>>,
    watching: Mutex<Watching>,
    counters: Counters,
    lock_wait_seconds: Histogram,
    errors: Mutex<LogGate>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlobStore {
    /// A store for `path`.
    pub fn new(path: impl Into<PathBuf>, lock_wait: Duration, missing: MissingCerts) -> BlobStore {
        BlobStore {
            path: path.into(),
            lock_wait,
            missing,
            racy_window: RACY_WINDOW,
            reverify: REVERIFY_INTERVAL,
            watch: true,
            log_errors: true,
            empty: Arc::from(&EMPTY_TABLE[..]),
            current: Mutex::new(None),
            cache: Mutex::new(None),
            watching: Mutex::new(Watching::default()),
            counters: Counters::default(),
            lock_wait_seconds: Histogram::default(),
            errors: Mutex::new(LogGate::default()),
        }
    }

    /// The same store, checking the path with `stat` on every fetch instead of keeping an
    /// inotify instance (for a caller that fetches rarely: instances are a per-user budget).
    pub fn unwatched(mut self) -> BlobStore {
        self.watch = false;
        self
    }

    /// The same store, logging nothing: for callers that judge the blob and report it
    /// themselves (start-up, the blob monitor, `/readyz`).
    pub fn quiet(mut self) -> BlobStore {
        self.log_errors = false;
        self
    }

    /// The blob's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters so far.
    pub fn stats(&self) -> BlobStats {
        BlobStats {
            reloads: self.counters.reloads.load(Ordering::Relaxed),
            invalid: self.counters.invalid.load(Ordering::Relaxed),
            opens: self.counters.opens.load(Ordering::Relaxed),
            path_checks: self.counters.path_checks.load(Ordering::Relaxed),
            watched: {
                let w = lock(&self.watching);
                w.generation > 0 && w.retry_at.is_none()
            },
        }
    }

    /// Share-locks the blob and returns the version to serve.
    pub fn fetch(&self) -> Fetch {
        let current = lock(&self.current)
            .as_ref()
            .filter(|b| !b.broken.load(Ordering::Relaxed))
            .map(Arc::clone);
        if let Some(blob) = current {
            let share = match self.acquire(&blob) {
                Ok(s) => s,
                Err(f) => return f,
            };
            let share = match self.unchanged(&blob, share) {
                Ok(served) => return served,
                Err(share) => share,
            };
            // Under the lock: is the path still this file, and which version does it hold?
            let watch = self.look_at_path();
            match std::fs::metadata(&self.path) {
                Ok(meta) if meta.dev() == blob.dev && meta.ino() == blob.ino => {
                    return self.serve(&blob, share, FileKey::of(&meta), watch)
                }
                // Replaced (renamed over, or a symlink swapped): serve the new file.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    drop(share);
                    self.forget(&blob);
                    return self.missing();
                }
                Err(e) => return self.fail_again(self.io_error("stat", e)),
            }
            drop(share);
            self.forget(&blob);
            return self.open_and_serve(watch);
        }
        let watch = self.look_at_path();
        self.open_and_serve(watch)
    }

    /// Opens the file at the path and serves it; `watch` was made before.
    fn open_and_serve(&self, watch: Option<u64>) -> Fetch {
        // The file we open now was at the path after this request began, so it is as new as
        // the request needs, even if the path is replaced again before we lock it.
        let blob = match self.open() {
            Ok(Some(b)) => b,
            Ok(None) => return self.missing(),
            Err(e) => return self.fail_again(e),
        };
        let share = match self.acquire(&blob) {
            Ok(s) => s,
            Err(f) => return f,
        };
        match blob.file.metadata() {
            Ok(meta) => self.serve(&blob, share, FileKey::of(&meta), watch),
            Err(e) => self.fail_again(self.io_error("stat", e)),
        }
    }

    /// Serves the cached version without looking at the path when the watch proves that
    /// neither the path nor the file changed since that version was confirmed. Gives the
    /// share back when it cannot.
    fn unchanged(&self, blob: &OpenBlob, share: BlobLock) -> Result<Fetch, BlobLock> {
        let generation = {
            let mut watching = lock(&self.watching);
            let generation = watching.generation;
            match watching.watch.as_mut().map(PathWatch::changed) {
                Some(Ok(false)) => generation,
                // Something changed (or the queue cannot be read, or there is no watch): look
                // at the path, watching it again first.
                _ => return Err(share),
            }
        };
        let verdict = match lock(&self.cache).as_ref() {
            Some(c)
                if c.watch == Some(generation)
                    && c.key.dev == blob.dev
                    && c.key.ino == blob.ino
                    && c.verified.elapsed() < self.reverify =>
            {
                c.verdict.clone()
            }
            _ => return Err(share),
        };
        Ok(self.answer(verdict, share))
    }

    /// The answer for a verdict taken out of the cache (whose lock is not held: the error path
    /// logs).
    fn answer(&self, verdict: Result<Arc<[u8]>, BlobError>, share: BlobLock) -> Fetch {
        match verdict {
            Ok(bytes) => Fetch::Table {
                bytes,
                lock: Some(share),
            },
            Err(e) => self.fail_again(e),
        }
    }

    /// Before a request looks at the path: counts it and makes a new watch.
    fn look_at_path(&self) -> Option<u64> {
        self.counters.path_checks.fetch_add(1, Ordering::Relaxed);
        self.rewatch()
    }

    /// Makes a new watch of the path, before the caller looks at it; returns its number, or
    /// `None` when the path cannot be watched (then every request checks it with `stat`).
    fn rewatch(&self) -> Option<u64> {
        let mut watching = lock(&self.watching);
        if !self.watch || watching.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let result = match watching.watch.as_mut() {
            Some(watch) => watch.watch(&self.path),
            None => PathWatch::new().and_then(|mut watch| {
                let result = watch.watch(&self.path);
                watching.watch = Some(watch);
                result
            }),
        };
        match result {
            Ok(()) => {
                watching.generation += 1;
                watching.retry_at = None;
                Some(watching.generation)
            }
            Err(e) => {
                watching.retry_at = Some(Instant::now() + self.reverify);
                let message = e.to_string();
                if watching.logged.as_ref() != Some(&message) {
                    info!("not watching the blob path ({message}); checking it on every request");
                    watching.logged = Some(message);
                }
                None
            }
        }
    }

    /// Time each request spent taking the shared lock (for metrics).
    pub fn lock_wait(&self) -> &Histogram {
        &self.lock_wait_seconds
    }

    /// A share of `blob`'s shared lock, or the answer when the lock cannot be had.
    fn acquire(&self, blob: &Arc<OpenBlob>) -> Result<BlobLock, Fetch> {
        let waiting = Instant::now();
        let acquired = blob.acquire(self.lock_wait);
        self.lock_wait_seconds.observe(waiting.elapsed());
        match acquired {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(Refused::Locked)) => Err(Fetch::Again(BlobError::Locked {
                path: self.path.clone(),
                waited: self.lock_wait,
            })),
            Ok(Err(Refused::Yielding)) => Err(Fetch::Again(BlobError::UpdaterWaiting {
                path: self.path.clone(),
                waited: self.lock_wait,
            })),
            Err(e) => Err(self.fail_again(self.io_error("lock", e))),
        }
    }

    fn io_error(&self, what: &'static str, e: io::Error) -> BlobError {
        BlobError::Io {
            what,
            path: self.path.clone(),
            source: Arc::new(e),
        }
    }

    /// Opens the file at the path and makes it the one to serve from. `Ok(None)`: missing.
    fn open(&self) -> Result<Option<Arc<OpenBlob>>, BlobError> {
        // O_NONBLOCK: a FIFO put at the path must not hang the request in open().
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_error("open", e)),
        };
        let meta = file.metadata().map_err(|e| self.io_error("stat", e))?;
        if !meta.is_file() {
            return Err(BlobError::NotRegular(self.path.clone()));
        }
        self.counters.opens.fetch_add(1, Ordering::Relaxed);
        let blob = Arc::new(OpenBlob::new(file, &meta));
        *lock(&self.current) = Some(Arc::clone(&blob));
        Ok(Some(blob))
    }

    /// Stops serving from `blob` (the path names another file, or none). Leases taken through
    /// it keep it open and locked until they end.
    fn forget(&self, blob: &Arc<OpenBlob>) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, blob)) {
            *current = None;
        }
    }

    /// Serves the version `key` of the share-locked `blob`: from the cache when it is known to
    /// be that version, otherwise by reading it.
    fn serve(&self, blob: &OpenBlob, share: BlobLock, key: FileKey, watch: Option<u64>) -> Fetch {
        let cached = match lock(&self.cache).as_mut() {
            Some(c) if c.key == key && c.trusted && c.verified.elapsed() < self.reverify => {
                // The stamps, taken after the watch was made, confirm this version.
                c.watch = watch;
                Some(c.verdict.clone())
            }
            _ => None,
        };
        match cached {
            Some(verdict) => self.answer(verdict, share),
            None => self.reload(blob, share, key, watch),
        }
    }

    fn reload(&self, blob: &OpenBlob, share: BlobLock, key: FileKey, watch: Option<u64>) -> Fetch {
        let read_at = SystemTime::now();
        let verdict = if key.size > MAX_TABLE_BYTES as u64 {
            Err(TableError::TooLarge(key.size as usize))
        } else {
            match read_all(&blob.file, key.size as usize) {
                Ok(bytes) if bytes.len() as u64 != key.size => {
                    return self.fail_again(BlobError::Changed(self.path.clone()))
                }
                Ok(bytes) => Ok(bytes),
                Err(e) => return self.fail_again(self.io_error("read", e)),
            }
        };
        self.counters.reloads.fetch_add(1, Ordering::Relaxed);
        let mut cache = lock(&self.cache);
        let interrupted = verdict
            .as_ref()
            .is_ok_and(|b| b.starts_with(&INSTALL_MARKER));
        let verdict = match verdict {
            Ok(bytes) => match cache.as_ref().map(|c| &c.verdict) {
                // Same bytes as cached: keep the validated copy.
                Some(Ok(old)) if **old == bytes[..] => Ok(Arc::clone(old)),
                _ => Table::parse(&bytes).map(|t| Arc::from(t.into_bytes())),
            },
            Err(e) => Err(e),
        };
        let verdict = verdict.map_err(|error| match interrupted {
            true => BlobError::InstallInterrupted(self.path.clone()),
            false => BlobError::Invalid {
                path: self.path.clone(),
                error,
            },
        });
        // The old version is not served either: the file is no longer it.
        *cache = Some(Cached {
            key,
            verdict: verdict.clone(),
            trusted: key.settled_at(read_at, self.racy_window),
            verified: Instant::now(),
            watch,
        });
        drop(cache);
        if verdict.is_err() {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
        }
        self.answer(verdict, share)
    }

    fn missing(&self) -> Fetch {
        match self.missing {
            MissingCerts::Empty => Fetch::Table {
                bytes: Arc::clone(&self.empty),
                lock: None,
            },
            MissingCerts::Again => Fetch::Again(BlobError::Missing(self.path.clone())),
            MissingCerts::Io => Fetch::Io(BlobError::Missing(self.path.clone())),
        }
    }

    fn fail_again(&self, why: BlobError) -> Fetch {
        if !self.log_errors {
            return Fetch::Again(why);
        }
        let message = why.to_string();
        if let Some(suppressed) = lock(&self.errors).admit(&message) {
            if suppressed > 0 {
                error!("{message}; answering EAGAIN ({suppressed} similar errors not logged)");
            } else {
                error!("{message}; answering EAGAIN");
            }
        }
        Fetch::Again(why)
    }
}

/// Reads the whole file from offset 0 (pread: the open file is shared between threads), at
/// most [`MAX_TABLE_BYTES`] + 1 bytes.
fn read_all(file: &File, size_hint: usize) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; size_hint.min(MAX_TABLE_BYTES) + 1];
    let mut got = 0;
    loop {
        if got == bytes.len() {
            if bytes.len() > MAX_TABLE_BYTES {
                break;
            }
            bytes.resize((bytes.len() * 2).min(MAX_TABLE_BYTES + 1), 0);
        }
        match file.read_at(&mut bytes[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(got);
    Ok(bytes)
}

/// Logs at warn that a table cannot reach Linux guests, once per distinct size.
pub fn warn_if_too_large_for_linux(len: usize) {
    use std::sync::atomic::AtomicUsize;
    static LAST: AtomicUsize = AtomicUsize::new(0);
    if len > coco_protocol::table::LINUX_GUEST_MAX_BYTES && LAST.swap(len, Ordering::Relaxed) != len
    {
        warn!(
            "the certificate table is {len} bytes; Linux guests offer at most {} and will never receive it",
            coco_protocol::table::LINUX_GUEST_MAX_BYTES
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Tmp {
            let p = std::env::temp_dir().join(format!("blob-{name}-{}", std::process::id()));
            let _ = std::fs::remove_file(&p);
            Tmp(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn table(fill: u8) -> Vec<u8> {
        let cert = [vec![0x30, 0x81, 200], vec![fill; 200]].concat();
        Table::build(&[(coco_protocol::CertKind::Vcek.guid(), &cert)])
            .expect("valid")
            .into_bytes()
    }

    fn served(f: Fetch) -> Vec<u8> {
        match f {
            Fetch::Table { bytes, .. } => bytes.to_vec(),
            other => panic!("expected a table, got {other:?}"),
        }
    }

    fn store(p: &Path) -> BlobStore {
        BlobStore::new(p, Duration::from_millis(10), MissingCerts::Empty)
    }

    /// A store that trusts the stamps of a version at once (no racy window) and does not
    /// watch: the behaviour of the `stat` check is then deterministic within one tick.
    fn trusting(p: &Path) -> BlobStore {
        let mut s = unwatched(p);
        s.racy_window = Duration::ZERO;
        s
    }

    /// A store that checks the path with `stat` on every request, as where it cannot be
    /// watched.
    fn unwatched(p: &Path) -> BlobStore {
        let mut s = store(p);
        s.watch = false;
        s
    }

    /// Whether an exclusive OFD lock on the whole file could be taken now, asked of the kernel
    /// with fcntl(2) through a new open file (OFD locks of different open files conflict even
    /// within one process), without the `locks` module under test.
    fn exclusive_free(p: &Path) -> bool {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open");
        // SAFETY: flock is plain data for which all-zero bytes are valid: the whole file.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        // SAFETY: F_OFD_SETLK reads the flock, which outlives the call; `f` is open.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        let err = std::io::Error::last_os_error().raw_os_error();
        assert!(
            rc == 0 || matches!(err, Some(libc::EAGAIN | libc::EACCES)),
            "{err:?}"
        );
        rc == 0
    }

    #[test]
    fn missing_policy_applies() {
        let p = Tmp::new("missing");
        let d = Duration::from_millis(10);
        assert_eq!(
            served(BlobStore::new(&p.0, d, MissingCerts::Empty).fetch()),
            EMPTY_TABLE
        );
        assert!(matches!(
            BlobStore::new(&p.0, d, MissingCerts::Again).fetch(),
            Fetch::Again(BlobError::Missing(_))
        ));
        assert!(matches!(
            BlobStore::new(&p.0, d, MissingCerts::Io).fetch(),
            Fetch::Io(BlobError::Missing(_))
        ));
    }

    #[test]
    fn a_watched_blob_is_served_without_looking_at_the_path_until_it_changes() {
        let p = Tmp::new("watched");
        let tmp = Tmp::new("watched-tmp");
        std::fs::write(&p.0, table(20)).expect("write");
        let store = store(&p.0);
        for _ in 0..10 {
            assert_eq!(served(store.fetch()), table(20));
        }
        let s = store.stats();
        assert_eq!((s.path_checks, s.reloads, s.opens), (1, 1, 1));
        assert!(s.watched);
        // In place, same size, same timestamp tick: the watch reports it.
        std::fs::write(&p.0, table(21)).expect("write");
        for _ in 0..3 {
            assert_eq!(served(store.fetch()), table(21));
        }
        let s = store.stats();
        assert_eq!((s.path_checks, s.reloads, s.opens), (2, 2, 1));
        // Renamed over: a new file at once.
        std::fs::write(&tmp.0, table(22)).expect("write");
        std::fs::rename(&tmp.0, &p.0).expect("rename");
        assert_eq!(served(store.fetch()), table(22));
        assert_eq!(served(store.fetch()), table(22));
        let s = store.stats();
        assert_eq!(
            (s.path_checks, s.opens),
            (3, 2),
            "one look at the path for the rename"
        );
        // Deleted: the missing policy, then the file again when it is back.
        std::fs::remove_file(&p.0).expect("rm");
        assert_eq!(served(store.fetch()), EMPTY_TABLE);
        std::fs::write(&p.0, table(23)).expect("write");
        assert_eq!(served(store.fetch()), table(23));
    }

    #[test]
    fn a_watched_blob_is_still_checked_every_reverify_interval() {
        let p = Tmp::new("watched-reverify");
        std::fs::write(&p.0, table(24)).expect("write");
        let mut store = store(&p.0);
        store.reverify = Duration::from_millis(100);
        assert_eq!(served(store.fetch()), table(24));
        assert_eq!(served(store.fetch()), table(24));
        assert_eq!(store.stats().path_checks, 1);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(served(store.fetch()), table(24));
        assert_eq!(store.stats().path_checks, 2);
    }

    #[test]
    fn without_a_watch_every_request_checks_the_path() {
        let p = Tmp::new("unwatched");
        std::fs::write(&p.0, table(25)).expect("write");
        let store = unwatched(&p.0);
        for _ in 0..4 {
            assert_eq!(served(store.fetch()), table(25));
        }
        assert_eq!(store.stats().path_checks, 4);
        assert!(!store.stats().watched);
    }

    /// Makes the cached version carry the stamps the file has now, as when a rewrite of equal
    /// size falls within the timestamp tick of the version read before it (this kernel's
    /// multigrain timestamps keep that from happening on ext4 and tmpfs, not everywhere).
    fn same_tick(store: &BlobStore, p: &Path) {
        let now = FileKey::of(&std::fs::metadata(p).expect("stat"));
        let mut cache = lock(&store.cache);
        let cached = cache.as_mut().expect("a cached version");
        assert_eq!(cached.key.size, now.size, "a rewrite of equal size");
        cached.key = now;
    }

    #[test]
    fn fresh_files_are_reread_until_settled() {
        let p = Tmp::new("racy");
        // Control: a store that trusts stamps at once serves the old bytes of a rewrite whose
        // stamps are those of the cached version, which is what the rule prevents.
        std::fs::write(&p.0, table(1)).expect("write");
        let store = trusting(&p.0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(served(store.fetch()), table(1));
        std::fs::write(&p.0, table(2)).expect("write");
        same_tick(&store, &p.0);
        assert_eq!(served(store.fetch()), table(1), "no rule: stale");

        std::fs::write(&p.0, table(1)).expect("write");
        let store = unwatched(&p.0);
        assert_eq!(served(store.fetch()), table(1));
        // Same size, same stamps: only the racy rule makes this visible.
        std::fs::write(&p.0, table(2)).expect("write");
        same_tick(&store, &p.0);
        assert_eq!(served(store.fetch()), table(2));
        assert_eq!(store.stats().reloads, 2);
        // An invalid version is not served, and neither is the old one.
        std::fs::write(&p.0, b"garbage").expect("write");
        assert!(matches!(
            store.fetch(),
            Fetch::Again(BlobError::Invalid { .. })
        ));
        assert_eq!(store.stats().invalid, 1);
    }

    #[test]
    fn settled_versions_are_served_from_cache() {
        let p = Tmp::new("settled");
        std::fs::write(&p.0, table(3)).expect("write");
        let key = FileKey::of(&std::fs::metadata(&p.0).expect("stat"));
        assert!(!key.settled_at(SystemTime::now(), RACY_WINDOW));
        assert!(key.settled_at(SystemTime::now() + Duration::from_secs(3), RACY_WINDOW));

        let store = trusting(&p.0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(served(store.fetch()), table(3));
        assert_eq!(served(store.fetch()), table(3));
        assert_eq!(store.stats().reloads, 1);
        assert_eq!(store.stats().opens, 1, "the open file is kept");
        std::fs::write(&p.0, EMPTY_TABLE).expect("write");
        assert_eq!(served(store.fetch()), EMPTY_TABLE);
        assert_eq!(store.stats().reloads, 2);
        assert_eq!(
            store.stats().opens,
            1,
            "an in-place rewrite needs no new open"
        );
    }

    #[test]
    fn an_invalid_version_is_not_reparsed_on_every_request() {
        let p = Tmp::new("invalid");
        std::fs::write(&p.0, b"not a table at all").expect("write");
        let store = trusting(&p.0);
        for _ in 0..5 {
            assert!(matches!(
                store.fetch(),
                Fetch::Again(BlobError::Invalid { .. })
            ));
        }
        assert_eq!(store.stats().reloads, 1);
        assert_eq!(store.stats().invalid, 1);
        std::fs::write(&p.0, table(4)).expect("write");
        assert_eq!(served(store.fetch()), table(4));
    }

    #[test]
    fn a_renamed_over_blob_is_served_at_once_and_old_leases_keep_the_old_file() {
        let p = Tmp::new("rename");
        let tmp = Tmp::new("rename-tmp");
        let old_name = Tmp::new("rename-old");
        std::fs::write(&p.0, table(5)).expect("write");
        std::fs::hard_link(&p.0, &old_name.0).expect("a second name for the old file");
        let store = trusting(&p.0);
        let old_lease = match store.fetch() {
            Fetch::Table { bytes, lock } => {
                assert_eq!(*bytes, table(5)[..]);
                lock.expect("a lease")
            }
            other => panic!("{other:?}"),
        };
        std::fs::write(&tmp.0, table(6)).expect("write");
        std::fs::rename(&tmp.0, &p.0).expect("rename");
        let new_lease = match store.fetch() {
            Fetch::Table { bytes, lock } => {
                assert_eq!(*bytes, table(6)[..], "the new file, at once");
                lock.expect("a lease")
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(store.stats().opens, 2);
        assert!(
            !exclusive_free(&p.0),
            "the new file is locked by the new lease"
        );
        drop(new_lease);
        assert!(exclusive_free(&p.0));
        // The old lease still locks the old file, now reachable only by its other name, until
        // it ends.
        assert!(!exclusive_free(&old_name.0), "the old file stays locked");
        drop(old_lease);
        assert!(exclusive_free(&old_name.0));
    }

    #[test]
    fn leases_share_one_lock_that_ends_with_the_last_of_them() {
        let p = Tmp::new("share");
        std::fs::write(&p.0, table(7)).expect("write");
        let store = trusting(&p.0);
        let take = || match store.fetch() {
            Fetch::Table { lock, .. } => lock.expect("a lease"),
            other => panic!("{other:?}"),
        };
        let (a, b) = (take(), take());
        assert!(!exclusive_free(&p.0));
        drop(a);
        assert!(!exclusive_free(&p.0), "b still holds it");
        drop(b);
        assert!(exclusive_free(&p.0), "released with the last lease");
        // A dropped Fetch releases its lock too.
        drop(store.fetch());
        assert!(exclusive_free(&p.0));
    }

    #[test]
    fn an_updaters_lock_means_eagain_after_the_wait() {
        let p = Tmp::new("updater");
        std::fs::write(&p.0, table(8)).expect("write");
        let store = store(&p.0);
        let w = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.0)
            .expect("open");
        assert!(locks::try_lock(&w, LockKind::Exclusive).expect("lock"));
        let t = Instant::now();
        assert!(matches!(
            store.fetch(),
            Fetch::Again(BlobError::Locked { .. })
        ));
        assert!(t.elapsed() >= Duration::from_millis(10));
        drop(w);
        assert_eq!(served(store.fetch()), table(8));
    }

    #[test]
    fn an_announced_updater_stops_new_leases_and_gets_the_lock_when_they_end() {
        let p = Tmp::new("yield");
        std::fs::write(&p.0, table(14)).expect("write");
        let store = BlobStore::new(&p.0, Duration::from_millis(100), MissingCerts::Empty);
        let take = || match store.fetch() {
            Fetch::Table { lock, .. } => lock.expect("a lease"),
            other => panic!("{other:?}"),
        };
        let held = take();
        let updater = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.0)
            .expect("open");
        assert!(locks::announce_intent(&updater).expect("announce"));
        // Joining a held lock costs no system call, but once the scan interval is over the
        // next request looks, sees the updater, and gets no share.
        std::thread::sleep(UPDATER_SCAN_INTERVAL);
        assert!(matches!(
            store.fetch(),
            Fetch::Again(BlobError::UpdaterWaiting { .. })
        ));
        assert!(!locks::try_lock(&updater, LockKind::Exclusive).expect("lock"));
        drop(held);
        assert!(locks::try_lock(&updater, LockKind::Exclusive).expect("lock"));
        assert!(
            matches!(store.fetch(), Fetch::Again(_)),
            "the updater has it"
        );
        // Once it is gone, two clear looks later (within the 100 ms lock wait), leases again.
        drop(updater);
        drop(take());
    }

    #[test]
    fn a_deleted_blob_follows_the_missing_policy_and_is_closed() {
        let p = Tmp::new("deleted");
        std::fs::write(&p.0, table(9)).expect("write");
        let store = trusting(&p.0);
        assert_eq!(served(store.fetch()), table(9));
        std::fs::remove_file(&p.0).expect("rm");
        assert_eq!(served(store.fetch()), EMPTY_TABLE);
        assert!(
            lock(&store.current).is_none(),
            "the unlinked file is closed"
        );
        std::fs::write(&p.0, table(10)).expect("write");
        assert_eq!(served(store.fetch()), table(10));
    }

    #[test]
    fn a_fifo_or_directory_at_the_path_is_eagain_not_a_hang() {
        let p = Tmp::new("fifo");
        let fifo = rustix::fs::FileType::Fifo;
        let mode = rustix::fs::Mode::from_raw_mode(0o600);
        rustix::fs::mknodat(rustix::fs::CWD, &p.0, fifo, mode, 0).expect("mkfifo");
        assert!(matches!(
            store(&p.0).fetch(),
            Fetch::Again(BlobError::NotRegular(_))
        ));
        let d = std::env::temp_dir().join(format!("blob-dir-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        assert!(matches!(store(&d).fetch(), Fetch::Again(_)));
        std::fs::remove_dir(&d).expect("rmdir");
    }

    #[test]
    fn changes_that_leave_the_stamps_alone_are_seen_within_the_reverify_interval() {
        // Writes through a shared mapping stamp the file only at the first write fault of a
        // clean page; later writes to the dirty page change no stamp.
        for watched in [false, true] {
            let p = Tmp::new(&format!("mmap-{watched}"));
            std::fs::write(&p.0, table(11)).expect("write");
            let mut store = if watched { store(&p.0) } else { trusting(&p.0) };
            store.reverify = Duration::from_millis(200);
            mapped_writes_are_seen_within_the_interval(&p.0, &store);
        }
    }

    fn mapped_writes_are_seen_within_the_interval(p: &Path, store: &BlobStore) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open");
        let len = table(11).len();
        // SAFETY: a fresh shared mapping of the whole (len-byte) file, checked for failure;
        // it is only written within its bounds and unmapped at the end of the test.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let put = |t: &[u8]| {
            // SAFETY: `t` is len bytes, the mapping is len bytes, live and writable.
            unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), map.cast::<u8>(), len) }
        };
        put(&table(12));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(served(store.fetch()), table(12));
        let stamps = FileKey::of(&std::fs::metadata(p).expect("stat"));
        put(&table(13));
        if FileKey::of(&std::fs::metadata(p).expect("stat")) == stamps {
            // Invisible to the stamps: the cached version is served until the interval ends.
            assert_eq!(served(store.fetch()), table(12));
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(served(store.fetch()), table(13));
        // SAFETY: unmaps the mapping made above; nothing uses it afterwards.
        unsafe { libc::munmap(map, len) };
    }

    #[test]
    fn log_gate_suppresses_repeats_and_counts_them() {
        let mut g = LogGate::default();
        assert_eq!(g.admit("a"), Some(0));
        assert_eq!(g.admit("a"), None);
        assert_eq!(g.admit("a"), None);
        assert_eq!(g.admit("b"), Some(2));
        assert_eq!(g.admit("b"), None);
    }
}
