//! The sidecar's settings, validated. The CLI builds them; tests and the demo build them
//! directly.

use std::path::PathBuf;
use std::time::Duration;

use crate::listen::Listen;

/// The defaults of `serve`'s options, in the units the options take (milliseconds, counts);
/// [`Config::new`] and the command line both use these, and `--help` shows them.
pub mod defaults {
    /// `--lock-wait-ms`.
    pub const LOCK_WAIT_MS: u64 = 100;
    /// `--lease-timeout-ms`.
    pub const LEASE_TIMEOUT_MS: u64 = 5000;
    /// `--max-eagain-ms`: below the 60 s after which Linux guests give up.
    pub const MAX_EAGAIN_MS: u64 = 30_000;
    /// `--max-connections`.
    pub const MAX_CONNECTIONS: usize = 16;
    /// `--max-leases`.
    pub const MAX_LEASES: usize = 64;
    /// `--io-timeout-ms`.
    pub const IO_TIMEOUT_MS: u64 = 5000;
    /// `--handshake-timeout-ms`.
    pub const HANDSHAKE_TIMEOUT_MS: u64 = 2000;
    /// `--socket-mode`.
    pub const SOCKET_MODE: u32 = crate::listen::DEFAULT_SOCKET_MODE;
}

/// What a request gets while the certificate blob does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingCerts {
    /// The empty table (just the terminator) and ret 0: the guest attests without a chain.
    Empty,
    /// EAGAIN: the blob is expected to appear (the guest gives up after about 60 s).
    Again,
    /// EIO: a blob is required. Linux guests then lose attestation until reboot.
    Io,
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the listening socket comes from: a path to bind, or an inherited socket.
    pub listen: Listen,
    /// Permission bits of a socket the sidecar binds itself (default 0600).
    pub socket_mode: u32,
    /// Uids allowed to connect (checked with SO_PEERCRED); empty: whoever can open the socket.
    /// The sidecar's own uid is always allowed.
    pub allow_uids: Vec<u32>,
    /// Path of the certificate blob (a GHCB certificate table).
    pub certs: PathBuf,
    /// How long a request waits for the shared lock before answering EAGAIN.
    pub lock_wait: Duration,
    /// How long a lease may be held without COCO_DONE.
    pub lease_timeout: Duration,
    /// Longest run of EAGAIN for the blob a connection's guest sees; then the empty table.
    pub max_eagain: Duration,
    /// Policy while the blob is missing.
    pub missing_certs: MissingCerts,
    /// Connections that may hold guest memory or leases at once; [`crate::serve::slots::SPARE_SLOTS`]
    /// more may be open without either.
    pub max_connections: usize,
    /// Leases one connection may hold at once.
    pub max_leases: usize,
    /// How long the rest of a message may take once its first byte arrived.
    pub io_timeout: Duration,
    /// How long a new connection has to complete the handshake (SET_PROTOCOL_FEATURES).
    pub handshake_timeout: Duration,
    /// Serve Prometheus metrics on this TCP address (host:port); `None`: no endpoint.
    pub metrics: Option<String>,
    /// Install the seccomp filter before serving. `Config::new` leaves it off because a
    /// filter applies to the whole calling process (tests, the demo); the CLI turns it on
    /// unless `--no-seccomp`.
    pub seccomp: bool,
}

impl Config {
    /// Settings with the documented defaults, binding a socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>, certs: impl Into<PathBuf>) -> Config {
        Config {
            listen: Listen::Path(socket.into()),
            socket_mode: defaults::SOCKET_MODE,
            allow_uids: Vec::new(),
            certs: certs.into(),
            lock_wait: Duration::from_millis(defaults::LOCK_WAIT_MS),
            lease_timeout: Duration::from_millis(defaults::LEASE_TIMEOUT_MS),
            max_eagain: Duration::from_millis(defaults::MAX_EAGAIN_MS),
            missing_certs: MissingCerts::Empty,
            max_connections: defaults::MAX_CONNECTIONS,
            max_leases: defaults::MAX_LEASES,
            io_timeout: Duration::from_millis(defaults::IO_TIMEOUT_MS),
            handshake_timeout: Duration::from_millis(defaults::HANDSHAKE_TIMEOUT_MS),
            metrics: None,
            seccomp: false,
        }
    }
}
