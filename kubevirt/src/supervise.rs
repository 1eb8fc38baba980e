//! Keeps coco-sidecar and the hook server running in the `virt-launcher` pod.
//!
//! KubeVirt's launcher pods never restart a container (`restartPolicy: Never`), so a crashed
//! sidecar would leave the VM without certificates until the pod ends: QEMU answers EAGAIN for
//! its grace period (30 s) and then the empty table. This process is the container's PID 1:
//! it owns the listening sockets and hands each child its socket as descriptor 3, so the
//! sockets outlive a crash (QEMU's reconnect waits in the kernel's accept queue instead of
//! failing), restarts a child that exits at once (or, if it keeps dying within
//! [`STABLE_AFTER`], after a delay doubling from 100 ms up to [`MAX_DELAY`]), reaps every
//! orphan as PID 1 must, and on SIGTERM or SIGINT stops the children (SIGTERM, then SIGKILL
//! after [`STOP_GRACE`]) and removes the sockets.
//!
//! It parses no input from outside the process, so that nothing a peer sends can bring it
//! down with the children. Written by hand rather than with an init system because the image
//! is FROM scratch with static binaries, and the whole job is a spawn-wait-respawn loop.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use coco_sidecar::listen::OwnedPath;
use crossbeam_channel::RecvTimeoutError;
use log::{error, info, warn};
use rustix::process::{Pid, Signal, WaitOptions};
use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;

/// The descriptor a child finds its listening socket at.
pub const CHILD_FD: i32 = 3;
/// A child that ran this long is restarted at once when it exits.
pub const STABLE_AFTER: Duration = Duration::from_secs(5);
/// The first delay before restarting a child that did not run [`STABLE_AFTER`].
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest delay before a restart, far below QEMU's 30 s grace period.
pub const MAX_DELAY: Duration = Duration::from_secs(1);
/// How long children get to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why supervision could not start.
#[derive(Debug, Error)]
pub enum SuperviseError {
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: PathBuf,
        source: io::Error,
    },
    #[error("cannot move the listening socket for {name} out of the way: {source}")]
    Descriptor { name: String, source: io::Error },
}

/// A program to keep running with a listening socket as descriptor [`CHILD_FD`].
#[derive(Debug)]
pub struct ChildSpec {
    /// For logs.
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The socket it serves.
    pub listener: UnixListener,
}

struct Slot {
    spec: ChildSpec,
    /// The listener at a descriptor number above [`CHILD_FD`], so that `dup2` in the child
    /// always makes a fresh descriptor 3 without close-on-exec.
    fd: OwnedFd,
    child: Option<Child>,
    started: Instant,
    delay: Duration,
    restart_at: Option<Instant>,
    restarts: u64,
}

impl Slot {
    fn spawn(&mut self) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args);
        // SAFETY: the closure runs in the forked child before exec and calls only dup2, which
        // is async-signal-safe; it allocates nothing and touches no lock. `fd` is open in the
        // parent (owned by this slot) and hence in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, CHILD_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn()?);
        self.started = Instant::now();
        self.restart_at = None;
        Ok(())
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(Pid::from_child)
    }

    /// Notes that the child exited; schedules its restart.
    fn exited(&mut self, status: ExitStatus, now: Instant) {
        self.child = None;
        let ran = now.duration_since(self.started);
        self.delay = if ran >= STABLE_AFTER {
            Duration::ZERO
        } else if self.delay.is_zero() {
            FIRST_DELAY
        } else {
            (self.delay * 2).min(MAX_DELAY)
        };
        self.restarts += 1;
        warn!(
            "{} exited ({status}) after {} ms; restarting it in {} ms (restart {})",
            self.spec.name,
            ran.as_millis(),
            self.delay.as_millis(),
            self.restarts
        );
        self.restart_at = Some(now + self.delay);
    }
}

/// A listener's descriptor duplicated above [`CHILD_FD`], close-on-exec.
fn high_fd(listener: &UnixListener) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(listener, 10)?)
}

/// Reaps every exited process (PID 1 inherits orphans); restarts children unless `stopping`.
fn reap(slots: &mut [Slot], stopping: bool) {
    // Ends when no child has exited (Ok(None)) or none is left (ECHILD).
    while let Ok(Some((pid, status))) = rustix::process::waitpid(None, WaitOptions::NOHANG) {
        let status = ExitStatus::from_raw(status.as_raw());
        let now = Instant::now();
        match slots.iter_mut().find(|s| s.pid() == Some(pid)) {
            Some(slot) if stopping => {
                info!("{} exited ({status})", slot.spec.name);
                slot.child = None;
            }
            Some(slot) => slot.exited(status, now),
            None => {}
        }
    }
}

fn signal_children(slots: &[Slot], signal: Signal) {
    // Each pid is an unreaped child of ours, so it names no other process.
    for pid in slots.iter().filter_map(Slot::pid) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// SIGKILLs the children and waits for them: SIGKILL cannot be ignored, so the waits end.
fn kill_children(slots: &mut [Slot]) {
    signal_children(slots, Signal::KILL);
    for slot in slots.iter_mut() {
        if let Some(mut c) = slot.child.take() {
            let _ = c.wait();
        }
    }
}

/// The signals the supervisor acts on, caught from the moment this exists: create it before
/// the sockets, so that a SIGTERM arriving once they appear is never the default (fatal) one.
#[derive(Debug)]
pub struct Supervisor {
    signals: Signals,
}

impl Supervisor {
    /// Catches SIGCHLD, SIGTERM and SIGINT.
    pub fn new() -> Result<Supervisor, SuperviseError> {
        let signals = Signals::new([SIGCHLD, SIGTERM, SIGINT]).map_err(SuperviseError::Signals)?;
        Ok(Supervisor { signals })
    }

    /// Runs `specs` until SIGTERM or SIGINT, then stops them and removes `sockets`.
    /// Only sockets whose paths still name the files bound here are removed.
    pub fn run(self, specs: Vec<ChildSpec>, sockets: &[OwnedPath]) -> Result<(), SuperviseError> {
        run(self.signals, specs, sockets)
    }
}

fn run(
    mut signals: Signals,
    specs: Vec<ChildSpec>,
    sockets: &[OwnedPath],
) -> Result<(), SuperviseError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for s in signals.forever() {
            if tx.send(s).is_err() {
                return;
            }
        }
    });

    let mut slots = Vec::with_capacity(specs.len());
    for spec in specs {
        let fd = high_fd(&spec.listener).map_err(|source| SuperviseError::Descriptor {
            name: spec.name.clone(),
            source,
        })?;
        slots.push(Slot {
            spec,
            fd,
            child: None,
            started: Instant::now(),
            delay: Duration::ZERO,
            restart_at: None,
            restarts: 0,
        });
    }
    for i in 0..slots.len() {
        if let Err(source) = slots[i].spawn() {
            // A child that cannot start at all is a configuration error: stop what started.
            kill_children(&mut slots);
            let s = &slots[i].spec;
            return Err(SuperviseError::Spawn {
                name: s.name.clone(),
                program: s.program.clone(),
                source,
            });
        }
        info!(
            "started {} (pid {})",
            slots[i].spec.name,
            Pid::as_raw(slots[i].pid())
        );
    }

    loop {
        let now = Instant::now();
        for slot in slots.iter_mut() {
            if slot.restart_at.is_some_and(|t| t <= now) {
                match slot.spawn() {
                    Ok(()) => info!(
                        "restarted {} (pid {})",
                        slot.spec.name,
                        Pid::as_raw(slot.pid())
                    ),
                    Err(e) => {
                        error!("cannot restart {}: {e}", slot.spec.name);
                        slot.delay = (slot.delay * 2).clamp(FIRST_DELAY, MAX_DELAY);
                        slot.restart_at = Some(now + slot.delay);
                    }
                }
            }
        }
        let next = slots.iter().filter_map(|s| s.restart_at).min();
        let received = match next {
            Some(t) => rx.recv_timeout(t.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(SIGCHLD) => reap(&mut slots, false),
            Ok(sig) => {
                info!("signal {sig}: stopping");
                break;
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }

    // Stop: SIGTERM, wait, SIGKILL whatever is left.
    signal_children(&slots, Signal::TERM);
    let deadline = Instant::now() + STOP_GRACE;
    while slots.iter().any(|s| s.child.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            warn!(
                "children still running {} s after SIGTERM: SIGKILL",
                STOP_GRACE.as_secs()
            );
            kill_children(&mut slots);
            break;
        }
        // A SIGCHLD, or a look every 100 ms in case one was coalesced with another signal
        let _ = rx.recv_timeout(left.min(Duration::from_millis(100)));
        reap(&mut slots, true);
    }
    handle.close();
    let _ = forwarder.join();
    for path in sockets {
        path.remove();
    }
    info!("stopped");
    Ok(())
}
