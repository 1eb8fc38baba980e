//! `coco-sidecar health`: the probe that liveness and readiness checks run.
//!
//! It checks what a VMM and a guest depend on, in that order:
//! 1. the sidecar answers on its socket: connect, the feature handshake, COCO_GET_CAPS, and the
//!    capabilities include certificate requests;
//! 2. (with a blob path) the blob is servable *now*: it is opened, share-locked with a bounded
//!    wait and validated by the very code `serve` uses ([`BlobStore::fetch`]), so "healthy"
//!    means a request arriving now would be answered with a table, not EAGAIN or EIO.
//!
//! The probe holds the shared lock only while it reads, like a request that is answered at
//! once; it never delays an updater by more than that.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use coco_protocol::exit::COCO_SUBTYPE_REQ_CERTS;
use coco_protocol::table::{Table, LINUX_GUEST_MAX_BYTES};
use coco_protocol::wire::Caps;
use coco_protocol::{Frontend, FrontendError};
use thiserror::Error;

use crate::blob::{BlobError, BlobStore, Fetch};
use crate::config::MissingCerts;

/// Exit status: the sidecar does not answer properly on its socket.
pub const EXIT_SOCKET: u8 = 1;
/// Exit status: the sidecar answers, but the blob is not servable now.
pub const EXIT_BLOB: u8 = 2;

/// What to probe.
#[derive(Debug, Clone)]
pub struct HealthOptions {
    /// The sidecar's socket.
    pub socket: PathBuf,
    /// The blob the sidecar serves, to check too.
    pub certs: Option<PathBuf>,
    /// Longest wait for each read or write on the socket.
    pub timeout: Duration,
    /// Longest wait for the shared lock on the blob.
    pub lock_wait: Duration,
    /// The sidecar's `--missing-certs` policy: whether an absent blob is servable.
    pub missing: MissingCerts,
}

/// Why the probe failed. The `Display` text is the one-line reason the probe prints.
#[derive(Debug, Error)]
pub enum HealthError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no working handshake: {source}")]
    Handshake {
        path: PathBuf,
        source: FrontendError,
    },
    #[error("{path}: COCO_GET_CAPS failed: {source}")]
    Caps {
        path: PathBuf,
        source: FrontendError,
    },
    #[error("{path}: the sidecar does not serve certificate requests (abis {abis:#x}, sub-types {subtypes:#x})")]
    NoCerts {
        path: PathBuf,
        abis: u64,
        subtypes: u64,
    },
    #[error("blob not servable now (guests get EAGAIN): {0}")]
    BlobAgain(BlobError),
    #[error("blob not servable (guests get EIO): {0}")]
    BlobIo(BlobError),
}

impl HealthError {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            HealthError::BlobAgain(_) | HealthError::BlobIo(_) => EXIT_BLOB,
            _ => EXIT_SOCKET,
        }
    }
}

/// What a healthy sidecar and blob look like; `Display` is the one-line report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthy {
    /// The capabilities the sidecar announced.
    pub caps: Caps,
    /// The blob's state, when one was checked.
    pub blob: Option<BlobState>,
}

/// A servable blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobState {
    /// A valid table of `bytes` bytes with `entries` entries.
    Table { bytes: usize, entries: usize },
    /// No file: the empty table is served (`--missing-certs empty`).
    AbsentServedEmpty,
}

impl std::fmt::Display for Healthy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "healthy: sidecar answers (abis {:#x}, sub-types {:#x}, lease timeout {} ms)",
            self.caps.abis, self.caps.coco_subtypes, self.caps.lease_timeout_ms
        )?;
        match &self.blob {
            None => Ok(()),
            Some(blob) => write!(f, "; {blob}"),
        }
    }
}

impl std::fmt::Display for BlobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobState::Table { bytes, entries } => {
                write!(f, "blob valid: {entries} entries, {bytes} bytes")?;
                if *bytes > LINUX_GUEST_MAX_BYTES {
                    write!(
                        f,
                        " (over the {LINUX_GUEST_MAX_BYTES} bytes Linux guests accept)"
                    )?;
                }
                Ok(())
            }
            BlobState::AbsentServedEmpty => write!(f, "blob absent: the empty table is served"),
        }
    }
}

/// Runs the probe.
pub fn check(opts: &HealthOptions) -> Result<Healthy, HealthError> {
    let caps = probe_socket(opts)?;
    let blob = opts
        .certs
        .as_ref()
        .map(|path| blob_ready(path, opts.lock_wait, opts.missing))
        .transpose()?;
    Ok(Healthy { caps, blob })
}

fn probe_socket(opts: &HealthOptions) -> Result<Caps, HealthError> {
    let path = &opts.socket;
    let connect = |source| HealthError::Connect {
        path: path.clone(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(connect)?;
    let timeout = Some(opts.timeout.max(Duration::from_millis(1)));
    stream.set_read_timeout(timeout).map_err(connect)?;
    stream.set_write_timeout(timeout).map_err(connect)?;
    let mut frontend = Frontend::handshake(stream).map_err(|source| HealthError::Handshake {
        path: path.clone(),
        source,
    })?;
    let caps = frontend.caps().map_err(|source| HealthError::Caps {
        path: path.clone(),
        source,
    })?;
    if caps.abis == 0 || caps.coco_subtypes & COCO_SUBTYPE_REQ_CERTS == 0 {
        return Err(HealthError::NoCerts {
            path: path.clone(),
            abis: caps.abis,
            subtypes: caps.coco_subtypes,
        });
    }
    Ok(caps)
}

/// Whether the blob at `path` is servable now, judged as `serve` judges it (with a store of
/// its own: the probe must not move the serving store's counters). Also the metrics
/// endpoint's `/readyz`.
pub fn blob_ready(
    path: &std::path::Path,
    lock_wait: Duration,
    missing: MissingCerts,
) -> Result<BlobState, HealthError> {
    let store = BlobStore::new(path, lock_wait, missing).unwatched().quiet();
    match store.fetch() {
        // Only a missing blob comes without a locked file.
        Fetch::Table { lock: None, .. } => Ok(BlobState::AbsentServedEmpty),
        Fetch::Table { bytes, lock } => {
            // `fetch` validated these bytes; parse again only to count the entries.
            let entries = Table::parse(&bytes).map_or(0, |t| t.entries().len());
            drop(lock);
            Ok(BlobState::Table {
                bytes: bytes.len(),
                entries,
            })
        }
        Fetch::Again(why) => Err(HealthError::BlobAgain(why)),
        Fetch::Io(why) => Err(HealthError::BlobIo(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::serve::{Server, Shutdown};

    fn opts(socket: PathBuf, certs: Option<PathBuf>) -> HealthOptions {
        HealthOptions {
            socket,
            certs,
            timeout: Duration::from_secs(2),
            lock_wait: Duration::from_millis(20),
            missing: MissingCerts::Empty,
        }
    }

    #[test]
    fn a_serving_sidecar_and_its_blob_are_healthy() {
        let dir = std::env::temp_dir().join(format!("health-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let socket = dir.join("s.sock");
        let blob = dir.join("certs.bin");
        let table = crate::demo::sample_table();
        std::fs::write(&blob, table.as_bytes()).expect("blob");
        let server = Server::bind(Config::new(&socket, &blob)).expect("bind");
        let shutdown = Shutdown::new().expect("shutdown");
        let stop = shutdown.handle().expect("handle");
        let serving = std::thread::spawn(move || server.run(&shutdown));

        let ok = check(&opts(socket.clone(), Some(blob.clone()))).expect("healthy");
        assert_eq!(
            ok.blob,
            Some(BlobState::Table {
                bytes: table.as_bytes().len(),
                entries: 3
            })
        );
        assert!(ok.to_string().starts_with("healthy: "), "{ok}");

        // The documented statuses (README, `health --help`): 2 the blob, 1 the socket.
        std::fs::write(&blob, b"not a table").expect("corrupt");
        let err = check(&opts(socket.clone(), Some(blob.clone()))).expect_err("invalid");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("not a valid certificate table"),
            "{err}"
        );

        std::fs::remove_file(&blob).expect("rm");
        let ok = check(&opts(socket.clone(), Some(blob.clone()))).expect("absent is served");
        assert_eq!(ok.blob, Some(BlobState::AbsentServedEmpty));
        let mut strict = opts(socket.clone(), Some(blob));
        strict.missing = MissingCerts::Io;
        assert_eq!(check(&strict).expect_err("eio").exit_code(), 2);

        stop.trigger();
        serving.join().expect("join").expect("run");
        let err = check(&opts(socket, None)).expect_err("stopped");
        assert_eq!(err.exit_code(), 1);
        assert!(err.to_string().starts_with("cannot connect to "), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
