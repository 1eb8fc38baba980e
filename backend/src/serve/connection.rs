//! One connection's transport: its thread's loop of receiving a message, handing it to the
//! [`Session`], and sending the reply, within its time limits.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use coco_protocol::transport::{self, MessageReader, TransportError};
use log::{debug, info};
use thiserror::Error;

use super::session::{Outcome, Session, SessionError};
use crate::sys;

/// Why a connection was dropped (logged with its number).
#[derive(Debug, Error)]
pub enum ConnectionError {
    /// SET_PROTOCOL_FEATURES did not come within `--handshake-timeout-ms`.
    #[error("no handshake within {0:?}")]
    NoHandshake(Duration),
    /// The rest of a message did not come within `--io-timeout-ms`.
    #[error("message not completed within {0:?}")]
    Stalled(Duration),
    /// The socket failed (setting its timeouts, waiting for it).
    #[error(transparent)]
    Socket(#[from] io::Error),
    /// Receiving or sending a message failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The message broke the protocol (the session closes the connection).
    #[error(transparent)]
    Protocol(#[from] SessionError),
}

/// A connection's time limits.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// For the rest of a message once its first byte arrived.
    pub(super) io: Duration,
    /// For the handshake (SET_PROTOCOL_FEATURES), from the accept.
    pub(super) handshake: Duration,
}

/// How late a lease may expire when the connection waits in recvmsg rather than poll.
const LEASE_LATENESS: Duration = Duration::from_millis(10);

/// Serves one connection until the peer closes it (Ok) or it must be dropped (Err, with the
/// reason). Dropping the session releases its leases and unmaps its memory.
pub(super) fn serve_connection(
    stream: &UnixStream,
    session: &mut Session,
    timeouts: Timeouts,
) -> Result<(), ConnectionError> {
    let handshake_by = Instant::now() + timeouts.handshake;
    stream.set_write_timeout(Some(timeouts.io))?;
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
                return Err(ConnectionError::NoHandshake(timeouts.handshake));
            }
            left.min(timeouts.io)
        };
        if receive_timeout != Some(timeout) {
            stream.set_read_timeout(Some(timeout))?;
            receive_timeout = Some(timeout);
        }
        let wait = session
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        // Bytes read ahead are the next message's: handle them before waiting.
        let waiting = !reader.has_buffered()
            && (idle || wait.is_some_and(|w| w.saturating_add(LEASE_LATENESS) < timeout));
        if waiting {
            let ready = sys::poll_readable(&[stream.as_fd()], wait)?;
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
                    return Err(ConnectionError::NoHandshake(timeouts.handshake));
                }
                return Err(ConnectionError::Stalled(timeout));
            }
            Err(e) => return Err(e.into()),
        };
        debug!(
            "request {:#x} size {} fds {}",
            msg.header.request,
            msg.header.size,
            msg.fds.len()
        );
        match session.handle(&msg.header, &msg.payload, msg.fds) {
            Outcome::Reply(header, payload) => {
                transport::send_message(stream, &header, &payload, &[])?
            }
            Outcome::Quiet => {}
            Outcome::Close(why) => return Err(why.into()),
        }
    }
}
