//! The certificate blob, from the file to the bytes a request serves.
//!
//! - [`store`]: opens, share-locks, validates and caches the blob; one open file and one lock
//!   shared by every lease; yields to waiting updaters.
//! - [`watch`]: an inotify watch of the path and the file, which lets a request serve the
//!   cached version without looking at the path.
//! - [`locks`]: OFD lock calls (shared for leases, exclusive for updaters, the byte on which
//!   updaters announce their wait), and who holds a lock.
//! - [`waiters`]: updaters waiting for the lock, as `/proc/locks` lists them.
//!
//! docs/design.md ("Locks and leases", "Updaters first", "Blob cache") argues why this is
//! sound.

pub mod locks;
pub mod store;
pub mod waiters;
pub mod watch;

pub use store::{
    warn_if_too_large_for_linux, BlobError, BlobLock, BlobStats, BlobStore, Fetch, FileKey,
    INSTALL_MARKER, RACY_WINDOW,
};
