//! The certificate blob: open, shared-lock, validate, cache.
//!
//! Every request opens the blob path and takes a shared OFD lock on that open file; the open
//! file then becomes the request's lease (closing it drops the lock). Parsing and validating
//! is done once per version of the file: the cache is keyed by what `fstat` says of the locked
//! file. Why that key is sound is argued in docs/design.md ("Blob cache"); in short:
//! - updaters rewrite under the exclusive lock, so while we hold the shared lock the file
//!   cannot change, and what we read and what we key it by belong together;
//! - any write changes the size or the mtime/ctime stamps, *unless* it falls within the same
//!   timestamp tick as the stamps we cached. So an entry whose ctime is within
//!   [`RACY_WINDOW`] of the moment we read it is not trusted: it is re-read until a read
//!   happens well after its ctime (the "racy clean" rule git uses for its index);
//! - a rename-replacement shows as a new inode number.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coco_protocol::table::{Table, TableError, EMPTY_TABLE, MAX_TABLE_BYTES};
use log::{error, warn};

use crate::config::MissingCerts;
use crate::metrics::Histogram;
use crate::ofd::{self, LockKind};

/// A cached version is trusted only if it was read this long after the file's last change.
/// Generous on purpose: it covers coarse timestamp ticks and 1-second timestamp filesystems.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);
/// The same validation error is logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What the blob gives a request.
#[derive(Debug)]
pub enum Fetch {
    /// Serve these bytes. `lock` is the locked open file to keep as the lease (`None` when
    /// there is no file, e.g. the empty table for a missing blob).
    Table {
        bytes: Arc<[u8]>,
        lock: Option<File>,
    },
    /// Answer EAGAIN; the reason is for the log.
    Again(String),
    /// Answer EIO; the reason is for the log.
    Io(String),
}

/// The identity and change stamps of one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> FileKey {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether a read at `read_at` (wall clock) happened safely after the last change.
    fn settled_at(&self, read_at: SystemTime, window: Duration) -> bool {
        let Ok(ctime) = u64::try_from(self.ctime.0) else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(ctime, self.ctime.1.clamp(0, 999_999_999) as u32);
        read_at.duration_since(changed).is_ok_and(|d| d > window)
    }
}

#[derive(Debug)]
struct Cached {
    key: FileKey,
    bytes: Arc<[u8]>,
    trusted: bool,
}

#[derive(Debug, Default)]
struct LogGate {
    last: Option<(String, Instant)>,
}

impl LogGate {
    fn should_log(&mut self, message: &str) -> bool {
        let now = Instant::now();
        let fresh = match &self.last {
            Some((m, at)) => m != message || now.duration_since(*at) >= ERROR_LOG_INTERVAL,
            None => true,
        };
        if fresh {
            self.last = Some((message.to_owned(), now));
        }
        fresh
    }
}

/// Counters a caller (metrics, tests, benchmarks) can read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlobStats {
    /// Times the file's bytes were read and validated.
    pub reloads: u64,
    /// Times a read version failed validation.
    pub invalid: u64,
}

/// The blob at one path, with the last validated version cached.
#[derive(Debug)]
pub struct BlobStore {
    path: PathBuf,
    lock_wait: Duration,
    missing: MissingCerts,
    racy_window: Duration,
    cache: Mutex<Option<Cached>>,
    stats: Mutex<BlobStats>,
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
            cache: Mutex::new(None),
            stats: Mutex::new(BlobStats::default()),
            lock_wait_seconds: Histogram::default(),
            errors: Mutex::new(LogGate::default()),
        }
    }

    /// The blob's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters so far.
    pub fn stats(&self) -> BlobStats {
        *lock(&self.stats)
    }

    /// Time each request spent taking the shared lock (for metrics).
    pub fn lock_wait(&self) -> &Histogram {
        &self.lock_wait_seconds
    }

    /// Opens and share-locks the blob and returns the version to serve.
    pub fn fetch(&self) -> Fetch {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.missing(),
            Err(e) => return self.fail_again(format!("cannot open {}: {e}", self.path.display())),
        };
        let waiting = Instant::now();
        let locked = ofd::lock_within(&file, LockKind::Shared, self.lock_wait);
        self.lock_wait_seconds.observe(waiting.elapsed());
        match locked {
            Ok(true) => {}
            Ok(false) => {
                return Fetch::Again(format!(
                    "{} is locked by an updater (waited {:?})",
                    self.path.display(),
                    self.lock_wait
                ))
            }
            Err(e) => return self.fail_again(format!("cannot lock {}: {e}", self.path.display())),
        }
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => return self.fail_again(format!("cannot stat {}: {e}", self.path.display())),
        };
        let key = FileKey::of(&meta);
        if let Some(c) = lock(&self.cache).as_ref() {
            if c.trusted && c.key == key {
                return Fetch::Table {
                    bytes: Arc::clone(&c.bytes),
                    lock: Some(file),
                };
            }
        }
        self.reload(file, key)
    }

    fn reload(&self, file: File, key: FileKey) -> Fetch {
        let read_at = SystemTime::now();
        if key.size > MAX_TABLE_BYTES as u64 {
            let err = TableError::TooLarge(key.size as usize);
            return self.invalid(err);
        }
        let mut bytes = Vec::with_capacity(key.size as usize);
        if let Err(e) = (&file)
            .take(MAX_TABLE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
        {
            return self.fail_again(format!("cannot read {}: {e}", self.path.display()));
        }
        lock(&self.stats).reloads += 1;
        let mut cache = lock(&self.cache);
        // Same bytes as cached: keep the validated copy.
        let bytes: Arc<[u8]> = match cache.as_ref() {
            Some(c) if *c.bytes == bytes[..] => Arc::clone(&c.bytes),
            _ => match Table::parse(&bytes) {
                Ok(t) => Arc::from(t.into_bytes()),
                Err(e) => {
                    // The old version is not served either: the file is no longer it.
                    *cache = None;
                    drop(cache);
                    return self.invalid(e);
                }
            },
        };
        *cache = Some(Cached {
            key,
            bytes: Arc::clone(&bytes),
            trusted: key.settled_at(read_at, self.racy_window),
        });
        Fetch::Table {
            bytes,
            lock: Some(file),
        }
    }

    fn missing(&self) -> Fetch {
        match self.missing {
            MissingCerts::Empty => Fetch::Table {
                bytes: Arc::from(&EMPTY_TABLE[..]),
                lock: None,
            },
            MissingCerts::Again => Fetch::Again(format!("{} does not exist", self.path.display())),
            MissingCerts::Io => Fetch::Io(format!("{} does not exist", self.path.display())),
        }
    }

    fn invalid(&self, err: TableError) -> Fetch {
        lock(&self.stats).invalid += 1;
        self.fail_again(format!(
            "{} is not a valid certificate table: {err}",
            self.path.display()
        ))
    }

    fn fail_again(&self, why: String) -> Fetch {
        if lock(&self.errors).should_log(&why) {
            error!("{why}; answering EAGAIN");
        }
        Fetch::Again(why)
    }
}

/// Logs at warn that a table cannot reach Linux guests, once per distinct size.
pub fn warn_if_too_large_for_linux(len: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
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

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("blob-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
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

    #[test]
    fn missing_policy_applies() {
        let p = tmp("missing");
        let d = Duration::from_millis(10);
        assert_eq!(
            served(BlobStore::new(&p, d, MissingCerts::Empty).fetch()),
            EMPTY_TABLE
        );
        assert!(matches!(
            BlobStore::new(&p, d, MissingCerts::Again).fetch(),
            Fetch::Again(_)
        ));
        assert!(matches!(
            BlobStore::new(&p, d, MissingCerts::Io).fetch(),
            Fetch::Io(_)
        ));
    }

    #[test]
    fn fresh_files_are_reread_until_settled() {
        let p = tmp("racy");
        std::fs::write(&p, table(1)).expect("write");
        let store = BlobStore::new(&p, Duration::from_millis(10), MissingCerts::Empty);
        assert_eq!(served(store.fetch()), table(1));
        // Same size, same second: only the racy rule makes this visible.
        std::fs::write(&p, table(2)).expect("write");
        assert_eq!(served(store.fetch()), table(2));
        assert_eq!(store.stats().reloads, 2);
        // An invalid version is not served, and neither is the old one.
        std::fs::write(&p, b"garbage").expect("write");
        assert!(matches!(store.fetch(), Fetch::Again(_)));
        assert_eq!(store.stats().invalid, 1);
        std::fs::remove_file(&p).expect("rm");
    }

    #[test]
    fn settled_versions_are_served_from_cache() {
        let p = tmp("settled");
        std::fs::write(&p, table(3)).expect("write");
        let key = FileKey::of(&std::fs::metadata(&p).expect("stat"));
        assert!(!key.settled_at(SystemTime::now(), RACY_WINDOW));
        assert!(key.settled_at(SystemTime::now() + Duration::from_secs(3), RACY_WINDOW));

        // With no racy window, the second fetch is a cache hit; a changed size is not.
        let mut store = BlobStore::new(&p, Duration::from_millis(10), MissingCerts::Empty);
        store.racy_window = Duration::ZERO;
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(served(store.fetch()), table(3));
        assert_eq!(served(store.fetch()), table(3));
        assert_eq!(store.stats().reloads, 1);
        std::fs::write(&p, EMPTY_TABLE).expect("write");
        assert_eq!(served(store.fetch()), EMPTY_TABLE);
        assert_eq!(store.stats().reloads, 2);
        std::fs::remove_file(&p).expect("rm");
    }
}
