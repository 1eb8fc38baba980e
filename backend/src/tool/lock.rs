//! `blob lock BLOB -- COMMAND ARGS...`: hold the exclusive OFD lock on the blob while COMMAND
//! runs (SNP_COMMIT, SNP_SET_CONFIG, loading a VLEK: anything that changes the key firmware
//! signs reports with), then exit with COMMAND's status.
//!
//! While the lock is held, sidecars answer EAGAIN (guests retry), and no request that holds a
//! lease is still on its way to firmware, since leases are shared locks. The lock belongs to
//! the open file description, and COMMAND inherits that description as descriptor
//! `$COCO_SIDECAR_BLOB_LOCK_FD` ([`LOCK_FD_ENV`]): the lock lasts until the last of this
//! process, COMMAND and whatever inherited the descriptor from COMMAND has closed it, so it
//! stays held while COMMAND runs even if this process is killed. Termination signals are
//! forwarded to COMMAND rather than ending this process. With `--install NEW`, NEW is
//! validated before locking and written under the same lock after COMMAND succeeds, so guests
//! never see the old chain with the new firmware state (if this process is killed first, that
//! install does not happen: run `blob install` then).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;

use super::exit;
use super::install::{self, InstallError, InstallOptions, Installed};
use super::locking::{LockingError, LOCK_ENV};

/// Environment variable `blob lock` sets for COMMAND: the number of the descriptor through
/// which COMMAND holds the blob's exclusive lock.
pub const LOCK_FD_ENV: &str = "COCO_SIDECAR_BLOB_LOCK_FD";

/// Why COMMAND did not run under the lock, or its outcome was not applied.
#[derive(Debug, Error)]
pub enum LockError {
    /// The lock was not taken.
    #[error(transparent)]
    Locking(#[from] LockingError),
    /// `--install NEW` was refused or could not be written.
    #[error(transparent)]
    Install(#[from] InstallError),
    /// COMMAND could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The error.
        source: io::Error,
    },
    /// Waiting for COMMAND failed.
    #[error("cannot wait for {program}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// The error.
        source: io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot set up signal forwarding: {0}")]
    Signals(io::Error),
    /// COMMAND succeeded but NEW could not be written.
    #[error("the command succeeded, but installing the new blob failed: {0}")]
    InstallAfter(InstallError),
}

impl LockError {
    /// The exit status `blob lock` ends with: 124 lock busy, 126 not executable, 127 not
    /// found, 125 anything else (COMMAND's own statuses pass through unchanged).
    pub fn exit_code(&self) -> u8 {
        match self {
            LockError::Locking(LockingError::Timeout { .. }) => exit::LOCK_BUSY,
            LockError::Spawn { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                exit::NOT_FOUND
            }
            LockError::Spawn { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => {
                exit::NOT_EXECUTABLE
            }
            _ => exit::LOCK_FAILED,
        }
    }
}

/// What `blob lock` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOutcome {
    /// COMMAND's exit code, or 128 + the signal that ended it.
    pub status: u8,
    /// With `--install`: what was done to BLOB (None when COMMAND failed).
    pub installed: Option<Installed>,
}

/// Waits until `pid` (our child) has ended, without reaping it, so its pid cannot be reused
/// while the forwarding thread may still signal it.
fn wait_unreaped(pid: Pid) -> io::Result<()> {
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
    rustix::io::retry_on_intr(|| rustix::process::waitid(WaitId::Pid(pid), options))?;
    Ok(())
}

/// Runs `program args` with the exclusive lock on `blob` held; see the module docs.
pub fn run_locked(
    blob: &Path,
    program: &OsStr,
    args: &[OsString],
    wait: Duration,
    install_new: Option<(&[u8], &str, &InstallOptions)>,
) -> Result<LockOutcome, LockError> {
    if let Some((new, what, opts)) = install_new {
        install::validate(new, what, blob, opts)?;
    }
    let file = install::lock_and_recover(blob, wait).map_err(|e| match e {
        InstallError::Locking(e) => LockError::Locking(e),
        e => LockError::Install(e),
    })?;
    let name = program.to_string_lossy().into_owned();
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT]).map_err(LockError::Signals)?;
    let handle = signals.handle();
    let locked = std::fs::canonicalize(blob).unwrap_or_else(|_| blob.to_owned());
    let fd = file.as_raw_fd();
    let mut command = Command::new(program);
    command
        .args(args)
        .env(LOCK_ENV, &locked)
        .env(LOCK_FD_ENV, fd.to_string());
    // SAFETY: the closure runs in the child between fork and exec, and only calls fcntl(2),
    // which is async-signal-safe, on a descriptor the child inherited open.
    unsafe {
        command.pre_exec(move || {
            // Keep the locked file open across exec: COMMAND shares the lock.
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(source) => {
            handle.close();
            return Err(LockError::Spawn {
                program: name,
                source,
            });
        }
    };
    let pid = Pid::from_child(&child);
    let reaped = Arc::new(Mutex::new(false));
    let forwarder = {
        let reaped = Arc::clone(&reaped);
        thread::spawn(move || {
            for sig in signals.forever() {
                let done = reaped.lock().map_or(true, |g| *g);
                // Our child, not yet reaped (checked under the mutex), so its pid not reused.
                if let Some(sig) = Signal::from_named_raw(sig).filter(|_| !done) {
                    let _ = rustix::process::kill_process(pid, sig);
                }
            }
        })
    };
    let waited = wait_unreaped(pid).and_then(|()| {
        if let Ok(mut g) = reaped.lock() {
            *g = true;
        }
        child.wait()
    });
    handle.close();
    let _ = forwarder.join();
    let status = waited.map_err(|source| LockError::Wait {
        program: name,
        source,
    })?;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(exit::LOCK_FAILED),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(255),
        (None, None) => exit::LOCK_FAILED,
    };
    let installed = match install_new {
        Some((new, _, _)) if code == 0 => Some(
            install::write_locked(&file, blob, new)
                .map(|changed| {
                    if changed {
                        Installed::Rewritten
                    } else {
                        Installed::Unchanged
                    }
                })
                .map_err(LockError::InstallAfter)?,
        ),
        _ => None,
    };
    // Closing the file releases the lock.
    drop(file);
    Ok(LockOutcome {
        status: code,
        installed,
    })
}
