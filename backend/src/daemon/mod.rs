//! The `serve` process around the server: its start-up sequence ([`run`]), the blob judged
//! for the operator at start and after every change ([`monitor`]), the descriptor limit
//! ([`rlimit`]) and the seccomp filter it runs under ([`seccomp`]).

use std::io;

use thiserror::Error;

use crate::listen;
use crate::metrics::{self, MetricsError};
use crate::serve::{Server, ServerError, Shutdown};
use crate::tool;
use crate::Config;

pub mod monitor;
pub mod rlimit;
pub mod seccomp;

/// Why `serve` could not start, or stopped serving.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// `--certs` names something that can never be a blob.
    #[error(transparent)]
    Certs(#[from] monitor::StartError),
    /// The signal handlers could not be set up.
    #[error("cannot set up signal handling: {0}")]
    Signals(io::Error),
    /// The metrics endpoint could not listen or start.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The blob monitor's thread could not start.
    #[error("cannot start the blob monitor: {0}")]
    Monitor(io::Error),
    /// Binding the socket, or serving on it, failed.
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl DaemonError {
    /// The exit status: [`tool::exit::INVALID`] for a `--certs` that is not a blob (as `blob
    /// check` says of it), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Certs(_) => tool::exit::INVALID,
            _ => 1,
        }
    }
}

/// Starts the sidecar and serves until SIGTERM or SIGINT. Each step that can fail for a bad
/// option comes before the socket exists; the seccomp filter comes last, once every socket
/// the process will ever have exists.
pub fn run(config: Config) -> Result<(), DaemonError> {
    // Before anything exists: a --certs that cannot be a blob is a mistake to fail on now.
    let monitor = monitor::start(&config)?;
    // Read once (by the command line); children must not mistake them for their own.
    // Single-threaded here, so changing the environment races with nothing.
    for var in listen::SYSTEMD_VARS {
        std::env::remove_var(var);
    }
    let shutdown = Shutdown::new()
        .and_then(Shutdown::on_signals)
        .map_err(DaemonError::Signals)?;
    rlimit::prepare(config.max_connections, config.max_leases);
    let exporter = config
        .metrics
        .as_deref()
        .map(metrics::Exporter::bind)
        .transpose()?;
    let filter = config.seccomp.then(seccomp::program).transpose()?;
    let readiness = metrics::Readiness {
        certs: config.certs.clone(),
        lock_wait: config.lock_wait,
        missing: config.missing_certs,
    };
    let server = Server::bind(config)?;
    monitor
        .spawn(server.metrics())
        .map_err(DaemonError::Monitor)?;
    if let Some(exporter) = exporter {
        exporter.serve(server.metrics(), server.store(), readiness)?;
    }
    if let Some(filter) = filter {
        seccomp::install(&filter)?;
    }
    Ok(server.run(&shutdown)?)
}
