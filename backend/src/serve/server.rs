//! The accept loop: the listening socket, who may connect, one thread per connection within
//! the connection slots, and an orderly stop.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, error, info, warn};
use thiserror::Error;

use super::connection::{serve_connection, Timeouts};
use super::session::Session;
use super::shutdown::Shutdown;
use super::slots::{Progress, Slot, Slots, SPARE_SLOTS};
use crate::blob::BlobStore;
use crate::config::Config;
use crate::listen::{self, ListenError, Listener, Peer, PeerError, PeerPolicy};
use crate::metrics::Metrics;
use crate::sys;

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
        let mut fds = vec![self.listener.as_fd(), shutdown.rx.as_fd()];
        if let Some((rx, _)) = &shutdown.notice {
            fds.push(rx.as_fd());
        }
        let result = loop {
            let ready = match sys::poll_readable(&fds, None) {
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
    fn admit(&self, stream: &UnixStream) -> Result<Option<Peer>, PeerError> {
        match listen::peer(stream) {
            Ok(p) => {
                debug!("peer pid {} uid {} gid {}", p.pid, p.uid, p.gid);
                self.peers.admit(&p).map(|()| Some(p))
            }
            Err(e) if self.peers.restricts() => Err(PeerError::Credentials(e)),
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
