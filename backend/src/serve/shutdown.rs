//! Stopping the sidecar: the signals that stop it in order, those it logs and ignores, and a
//! trigger for callers (the demo, tests) that stop it themselves.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use coco_protocol::transport;
use log::info;

use crate::sys;

/// Wakes the accept loop to stop it: from signal handlers, or from a caller (demo, tests).
#[derive(Debug)]
pub struct Shutdown {
    /// Readable once the shutdown is triggered (the accept loop polls it).
    pub(super) rx: UnixStream,
    tx: UnixStream,
    /// Signals that are logged and otherwise ignored: their handlers set a flag and wake the
    /// accept loop through `notice`.
    ignored: Vec<(i32, Arc<AtomicBool>)>,
    /// Readable (`.0`) once an ignored signal arrived.
    pub(super) notice: Option<(UnixStream, UnixStream)>,
}

/// Signals that stop the sidecar in order (connections closed, locks released, socket removed).
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT];

/// Signals whose default action would kill the sidecar (and leave its socket behind) but that
/// mean nothing to it: logged and ignored. SIGHUP asks daemons to reload; the blob needs no
/// reload, since every request checks it (design.md, "Blob cache").
pub const IGNORED_SIGNALS: [i32; 9] = [
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
];

impl Shutdown {
    /// A shutdown trigger not yet tied to any signal.
    pub fn new() -> io::Result<Shutdown> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Shutdown {
            rx,
            tx,
            ignored: Vec::new(),
            notice: None,
        })
    }

    /// Also triggers on [`STOP_SIGNALS`], logs and ignores [`IGNORED_SIGNALS`], and ignores
    /// SIGXFSZ (a write past RLIMIT_FSIZE then fails with EFBIG instead of killing the process;
    /// SIGPIPE is ignored by the Rust runtime already).
    pub fn on_signals(mut self) -> io::Result<Shutdown> {
        for sig in STOP_SIGNALS {
            signal_hook::low_level::pipe::register(sig, self.tx.try_clone()?)?;
        }
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        for sig in IGNORED_SIGNALS {
            let flag = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
            // The handler only writes a byte to `tx`, which `self` keeps open.
            signal_hook::low_level::pipe::register_raw(sig, tx.as_raw_fd())?;
            self.ignored.push((sig, flag));
        }
        self.notice = Some((rx, tx));
        sys::ignore_signal(libc::SIGXFSZ)?;
        Ok(self)
    }

    /// A handle that triggers the shutdown from another thread.
    pub fn handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.tx.try_clone()?))
    }

    /// Logs the ignored signals that arrived since the last call.
    pub(super) fn log_ignored(&self) {
        if let Some((rx, _)) = &self.notice {
            let _ = transport::drain(rx);
        }
        for (sig, flag) in &self.ignored {
            if flag.swap(false, Ordering::Relaxed) {
                let name = signal_hook::low_level::signal_name(*sig).unwrap_or("signal");
                if *sig == libc::SIGHUP {
                    info!("{name} ignored: nothing to reload, every request checks the blob");
                } else {
                    info!("{name} ignored");
                }
            }
        }
    }
}

/// Triggers a [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownHandle(UnixStream);

impl ShutdownHandle {
    /// Asks the server to stop.
    pub fn trigger(&self) {
        use std::io::Write;
        let _ = (&self.0).write(&[1]);
    }
}
