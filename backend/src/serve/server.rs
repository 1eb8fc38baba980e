//! Transport glue: the listening socket, one thread per connection, its time limits, and
//! signals.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::transport::{self, MessageReader, TransportError};
use log::{debug, error, info, warn};
use thiserror::Error;

use super::session::{Outcome, Session};
use super::slots::{Progress, Slot, Slots, SPARE_SLOTS};
use crate::blob::BlobStore;
use crate::config::Config;
use crate::listen::{self, ListenError, Listener, Peer, PeerPolicy};
use crate::metrics::Metrics;

/// Pause after a failed accept (EMFILE, ENFILE, ENOMEM), so that a full descriptor table
/// does not turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the server could not start or stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot set up shutdown signals: {0}")]
    Signals(io::Error),
    #[error("poll failed: {0}")]
    Poll(io::Error),
}

/// Wakes the accept loop to stop it: from signal handlers, or from a caller (demo, tests).
#[derive(Debug)]
pub struct Shutdown {
    rx: UnixStream,
    tx: UnixStream,
    /// Signals that are logged and otherwise ignored: their handlers set a flag and wake the
    /// accept loop through `notice`.
    ignored: Vec<(i32, Arc<AtomicBool>)>,
    notice: Option<(UnixStream, UnixStream)>,
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
        // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
        if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
        Ok(self)
    }

    /// A handle that triggers the shutdown from another thread.
    pub fn handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.tx.try_clone()?))
    }

    /// Logs the ignored signals that arrived since the last call.
    fn log_ignored(&self) {
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

fn poll_in(fds: &[i32], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        t.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
    });
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the whole call.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A bound, not yet serving, sidecar.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    /// The socket file to remove when stopping, if it is still ours (None for an inherited
    /// socket).
    owned: Option<listen::OwnedPath>,
    peers: PeerPolicy,
    config: Config,
    store: Arc<BlobStore>,
    metrics: Arc<Metrics>,
}

/// How long shutdown waits for connection threads to end (each is woken at once; one may be
/// finishing a lock wait).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

impl Server {
    /// Binds the socket (replacing a stale one left by a dead sidecar) or takes over the
    /// inherited one.
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let Listener { listener, owned } = Listener::open(&config.listen, config.socket_mode)?;
        let peers = PeerPolicy::new(&config.allow_uids);
        let store = Arc::new(BlobStore::new(
            &config.certs,
            config.lock_wait,
            config.missing_certs,
        ));
        Ok(Server {
            listener,
            owned,
            peers,
            config,
            store,
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The blob store (for counters).
    pub fn store(&self) -> Arc<BlobStore> {
        Arc::clone(&self.store)
    }

    /// The process's counters (for the metrics endpoint and tests).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Serves until `shutdown` triggers; then stops accepting, closes every connection (so
    /// every lease and lock is released) and removes the socket if it is still ours.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), ServerError> {
        info!(
            "serving {} on {} (lock wait {:?}, lease timeout {:?}, missing blob: {:?}, \
             {} connections with memory + {} spare, handshake within {:?})",
            self.config.certs.display(),
            self.config.listen.describe(),
            self.config.lock_wait,
            self.config.lease_timeout,
            self.config.missing_certs,
            self.config.max_connections,
            SPARE_SLOTS,
            self.config.handshake_timeout,
        );
        let slots = Slots::new(self.config.max_connections);
        self.metrics.set_serving(true);
        let mut next_id = 0u64;
        let mut fds = vec![self.listener.as_raw_fd(), shutdown.rx.as_raw_fd()];
        if let Some((rx, _)) = &shutdown.notice {
            fds.push(rx.as_raw_fd());
        }
        let result = loop {
            let ready = match poll_in(&fds, None) {
                Ok(r) => r,
                Err(e) => break Err(ServerError::Poll(e)),
            };
            if ready[1] {
                info!("shutdown requested");
                break Ok(());
            }
            if ready.get(2).copied().unwrap_or(false) {
                shutdown.log_ignored();
            }
            if !ready[0] {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("accept failed: {e}");
                    // Out of descriptors or memory, the connection stays queued and poll
                    // reports it again at once: pause rather than spin on it.
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            next_id += 1;
            let peer = match self.admit(&stream) {
                Ok(peer) => peer,
                Err(why) => {
                    warn!("connection {next_id} refused: {why}");
                    self.metrics.connection_refused();
                    continue;
                }
            };
            let (slot, displaced) =
                match slots.admit(next_id, &stream, peer, Progress::waiting(&stream)) {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("connection {next_id} refused: {e}");
                        self.metrics.connection_refused();
                        continue;
                    }
                };
            if let Some(old) = displaced {
                info!(
                    "connection {old}: closed to make room for connection {next_id} (all {} \
                     slots taken; it held no memory and no lease)",
                    self.config.max_connections + SPARE_SLOTS
                );
            }
            if let Err(e) = self.spawn(next_id, stream, slot) {
                error!("connection {next_id}: cannot start its thread: {e}");
            }
        };
        self.metrics.set_serving(false);
        slots.close_all();
        if !slots.wait_empty(SHUTDOWN_WAIT) {
            warn!("connections still open after {SHUTDOWN_WAIT:?}; exiting anyway");
        }
        if let Some(owned) = &self.owned {
            owned.remove();
        }
        info!("stopped");
        result
    }

    /// Identifies the peer (logged) and applies `--allow-uid`.
    fn admit(&self, stream: &UnixStream) -> Result<Option<Peer>, String> {
        match listen::peer(stream) {
            Ok(p) => {
                debug!("peer pid {} uid {} gid {}", p.pid, p.uid, p.gid);
                self.peers.admit(&p).map(|()| Some(p))
            }
            Err(e) if self.peers.restricts() => Err(format!("cannot read SO_PEERCRED: {e}")),
            Err(_) => Ok(None),
        }
    }

    fn spawn(&self, id: u64, stream: UnixStream, slot: Slot) -> io::Result<()> {
        let mut session = Session::new(id, &self.config, Arc::clone(&self.store))
            .with_metrics(Arc::clone(&self.metrics))
            .with_slot(slot);
        let metrics = Arc::clone(&self.metrics);
        let timeouts = Timeouts {
            io: self.config.io_timeout,
            handshake: self.config.handshake_timeout,
        };
        metrics.connection_opened();
        // If the thread cannot start, the closure (and with it the session and its slot) is
        // dropped.
        let spawned = thread::Builder::new()
            .name(format!("conn-{id}"))
            .spawn(move || {
                debug!("connection {id}: accepted");
                let result = serve_connection(&stream, &mut session, timeouts);
                let displaced = session.slot().is_some_and(Slot::displaced);
                let vmm = session.slot().is_some_and(Slot::was_vmm);
                match &result {
                    _ if displaced => {}
                    Ok(()) if vmm => info!("connection {id}: closed by peer"),
                    Ok(()) => debug!("connection {id}: closed by peer"),
                    Err(e) => warn!("connection {id}: dropped: {e}"),
                }
                metrics.connection_closed(result.is_err() || displaced);
                // Memory, leases and the slot (with the server's clone of the socket) go
                // first, then the socket itself: nothing of the connection outlives its thread.
                drop(session);
                drop(stream);
            });
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                self.metrics.connection_closed(true);
                Err(e)
            }
        }
    }
}

/// A connection's time limits.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// For the rest of a message once its first byte arrived.
    io: Duration,
    /// For the handshake (SET_PROTOCOL_FEATURES), from the accept.
    handshake: Duration,
}

/// How late a lease may expire when the connection waits in recvmsg rather than poll.
const LEASE_LATENESS: Duration = Duration::from_millis(10);

/// Serves one connection until the peer closes it (Ok) or it must be dropped (Err, with the
/// reason). Dropping the session releases its leases and unmaps its memory.
fn serve_connection(
    stream: &UnixStream,
    session: &mut Session,
    timeouts: Timeouts,
) -> Result<(), String> {
    let handshake_by = Instant::now() + timeouts.handshake;
    stream
        .set_write_timeout(Some(timeouts.io))
        .map_err(|e| e.to_string())?;
    // Wait in recvmsg itself (one syscall less per message) unless a lease deadline comes
    // before its timeout would wake us. The timeout wakes an idle connection once; it then
    // waits in poll until traffic. Until the handshake is done, the receive timeout is also
    // what is left of the time for it, so a peer that never completes it is closed then.
    let mut idle = false;
    let mut receive_timeout = None;
    let mut reader = MessageReader::new();
    loop {
        let now = Instant::now();
        session.expire(now);
        let timeout = if session.negotiated() {
            timeouts.io
        } else {
            let left = handshake_by.saturating_duration_since(now);
            if left < Duration::from_millis(1) {
                return Err(format!("no handshake within {:?}", timeouts.handshake));
            }
            left.min(timeouts.io)
        };
        if receive_timeout != Some(timeout) {
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            receive_timeout = Some(timeout);
        }
        let wait = session
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        // Bytes read ahead are the next message's: handle them before waiting.
        let waiting = !reader.has_buffered()
            && (idle || wait.is_some_and(|w| w.saturating_add(LEASE_LATENESS) < timeout));
        if waiting {
            let ready = poll_in(&[stream.as_raw_fd()], wait).map_err(|e| e.to_string())?;
            if !ready[0] {
                continue;
            }
            idle = false;
        }
        let msg = match reader.recv_within(stream, timeout) {
            Ok(Some(m)) => m,
            Ok(None) => {
                if session.leases_held() > 0 {
                    info!(
                        "releasing {} leases of a closed connection",
                        session.leases_held()
                    );
                }
                return Ok(());
            }
            Err(TransportError::Idle) => {
                // Before the handshake, the loop's top closes the connection once its time is
                // up; after it, being idle is fine.
                idle = session.negotiated();
                continue;
            }
            Err(TransportError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                if !session.negotiated() && Instant::now() >= handshake_by {
                    return Err(format!("no handshake within {:?}", timeouts.handshake));
                }
                return Err(format!("message not completed within {timeout:?}"));
            }
            Err(e) => return Err(e.to_string()),
        };
        debug!(
            "request {:#x} size {} fds {}",
            msg.header.request,
            msg.header.size,
            msg.fds.len()
        );
        match session.handle(&msg.header, &msg.payload, msg.fds) {
            Outcome::Reply(header, payload) => {
                transport::send_message(stream, &header, &payload, &[])
                    .map_err(|e| e.to_string())?
            }
            Outcome::Quiet => {}
            Outcome::Close(why) => return Err(why),
        }
    }
}
