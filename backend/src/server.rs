//! Transport glue: the listening socket, one thread per connection, shutdown on signals.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use coco_protocol::transport::{self, MessageReader, TransportError};
use log::{debug, error, info, warn};
use thiserror::Error;

use crate::blob::BlobStore;
use crate::config::Config;
use crate::listen::{self, ListenError, Listener, PeerPolicy};
use crate::metrics::Metrics;
use crate::session::{Outcome, Session};

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
}

impl Shutdown {
    /// A shutdown trigger not yet tied to any signal.
    pub fn new() -> io::Result<Shutdown> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Shutdown { rx, tx })
    }

    /// Also triggers on SIGTERM and SIGINT.
    pub fn on_signals(self) -> io::Result<Shutdown> {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::low_level::pipe::register(sig, self.tx.try_clone()?)?;
        }
        Ok(self)
    }

    /// A handle that triggers the shutdown from another thread.
    pub fn handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.tx.try_clone()?))
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
    /// The socket file to remove when stopping (None for an inherited socket).
    owned_path: Option<PathBuf>,
    peers: PeerPolicy,
    config: Config,
    store: Arc<BlobStore>,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Binds the socket (replacing a stale one left by a dead sidecar) or takes over the
    /// inherited one.
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let Listener {
            listener,
            owned_path,
        } = Listener::open(&config.listen, config.socket_mode)?;
        let peers = PeerPolicy::new(&config.allow_uids);
        let store = Arc::new(BlobStore::new(
            &config.certs,
            config.lock_wait,
            config.missing_certs,
        ));
        Ok(Server {
            listener,
            owned_path,
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
    /// every lease and lock is released) and removes the socket.
    pub fn run(self, shutdown: &Shutdown) -> Result<(), ServerError> {
        info!(
            "serving {} on {} (lock wait {:?}, lease timeout {:?}, missing blob: {:?})",
            self.config.certs.display(),
            self.config.listen.describe(),
            self.config.lock_wait,
            self.config.lease_timeout,
            self.config.missing_certs
        );
        let active = Arc::new(AtomicUsize::new(0));
        let mut conns: Vec<(UnixStream, JoinHandle<()>)> = Vec::new();
        let mut next_id = 0u64;
        let result = loop {
            let ready = match poll_in(&[self.listener.as_raw_fd(), shutdown.rx.as_raw_fd()], None) {
                Ok(r) => r,
                Err(e) => break Err(ServerError::Poll(e)),
            };
            if ready[1] {
                info!("shutdown requested");
                break Ok(());
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
            conns.retain(|(_, h)| !h.is_finished());
            next_id += 1;
            if let Err(why) = self.admit(&stream) {
                warn!("connection {next_id} refused: {why}");
                self.metrics.connection_refused();
                continue;
            }
            if active.load(Ordering::SeqCst) >= self.config.max_connections {
                warn!(
                    "connection {next_id} refused: already {} connections (--max-connections)",
                    self.config.max_connections
                );
                self.metrics.connection_refused();
                continue;
            }
            match self.spawn(next_id, stream, &active) {
                Ok(conn) => conns.push(conn),
                Err(e) => error!("connection {next_id}: cannot start its thread: {e}"),
            }
        };
        for (stream, _) in &conns {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for (_, handle) in conns {
            let _ = handle.join();
        }
        if let Some(path) = &self.owned_path {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("cannot remove {}: {e}", path.display());
            }
        }
        info!("stopped");
        result
    }

    /// Identifies the peer (logged) and applies `--allow-uid`.
    fn admit(&self, stream: &UnixStream) -> Result<(), String> {
        match listen::peer(stream) {
            Ok(p) => {
                debug!("peer pid {} uid {} gid {}", p.pid, p.uid, p.gid);
                self.peers.admit(&p)
            }
            Err(e) if self.peers.restricts() => Err(format!("cannot read SO_PEERCRED: {e}")),
            Err(_) => Ok(()),
        }
    }

    fn spawn(
        &self,
        id: u64,
        stream: UnixStream,
        active: &Arc<AtomicUsize>,
    ) -> io::Result<(UnixStream, JoinHandle<()>)> {
        let session = Session::new(id, &self.config, Arc::clone(&self.store))
            .with_metrics(Arc::clone(&self.metrics));
        let metrics = Arc::clone(&self.metrics);
        let io_timeout = self.config.io_timeout;
        let active = Arc::clone(active);
        let peer = stream.try_clone()?;
        active.fetch_add(1, Ordering::SeqCst);
        metrics.connection_opened();
        let spawned = thread::Builder::new().name(format!("conn-{id}")).spawn({
            let active = Arc::clone(&active);
            let metrics = Arc::clone(&metrics);
            move || {
                info!("connection {id}: accepted");
                let result = serve_connection(&stream, session, io_timeout);
                match &result {
                    Ok(()) => info!("connection {id}: closed by peer"),
                    Err(e) => warn!("connection {id}: dropped: {e}"),
                }
                metrics.connection_closed(result.is_err());
                // The accept loop keeps a clone of this socket for shutdown; without this the
                // peer would not see the close until that clone is pruned.
                let _ = stream.shutdown(std::net::Shutdown::Both);
                active.fetch_sub(1, Ordering::SeqCst);
            }
        });
        match spawned {
            Ok(handle) => Ok((peer, handle)),
            Err(e) => {
                active.fetch_sub(1, Ordering::SeqCst);
                metrics.connection_closed(true);
                Err(e)
            }
        }
    }
}

/// How late a lease may expire when the connection waits in recvmsg rather than poll.
const LEASE_LATENESS: Duration = Duration::from_millis(10);

/// Serves one connection until the peer closes it (Ok) or it must be dropped (Err, with the
/// reason). Dropping the session releases its leases and unmaps its memory.
fn serve_connection(
    stream: &UnixStream,
    mut session: Session,
    io_timeout: Duration,
) -> Result<(), String> {
    stream
        .set_read_timeout(Some(io_timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(io_timeout))
        .map_err(|e| e.to_string())?;
    // Wait in recvmsg itself (one syscall less per message) unless a lease deadline comes
    // before its timeout (io_timeout) would wake us. The timeout wakes an idle connection once;
    // it then waits in poll until traffic.
    let mut idle = false;
    let mut reader = MessageReader::new();
    loop {
        session.expire(Instant::now());
        let wait = session
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()));
        // Bytes read ahead are the next message's: handle them before waiting.
        let waiting = !reader.has_buffered()
            && (idle || wait.is_some_and(|w| w.saturating_add(LEASE_LATENESS) < io_timeout));
        if waiting {
            let ready = poll_in(&[stream.as_raw_fd()], wait).map_err(|e| e.to_string())?;
            if !ready[0] {
                continue;
            }
            idle = false;
        }
        let msg = match reader.recv_within(stream, io_timeout) {
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
                idle = true;
                continue;
            }
            Err(TransportError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(format!("message not completed within {io_timeout:?}"))
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
