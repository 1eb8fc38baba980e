//! Sending and receiving one framed message, with file descriptors, over a Unix stream socket.
//! Shared by the frontend client and the sidecar so that both frame bytes the same way.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::wire::{Header, WireError, HEADER_SIZE, MAX_FDS};

/// Why a message could not be sent or received.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The socket failed (including a receive timeout in the middle of a message).
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The socket's receive timeout passed before any byte of a message arrived: the peer is
    /// idle, which is not an error of the connection.
    #[error("no message arrived within the receive timeout")]
    Idle,
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection after {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    /// More file descriptors than any message may carry; all of them were closed.
    #[error("more than {MAX_FDS} file descriptors sent with one message")]
    TooManyFds,
    /// The header is malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// The validated header.
    pub header: Header,
    /// Exactly `header.size` bytes.
    pub payload: Vec<u8>,
    /// Every file descriptor that arrived with the message, owned.
    pub fds: Vec<OwnedFd>,
}

/// A bound on the time one whole message may take, counted from its first byte. The socket's
/// receive timeout bounds each `recvmsg`; a peer trickling one byte per timeout would pass
/// that forever. So once a read comes back short (the slow path: the rest has not arrived
/// yet), the receive timeout is cut to what is left of the message's time, and put back when
/// the message is complete. The fast path (a message that arrives whole) costs no extra
/// system call.
#[derive(Debug)]
struct Deadline {
    timeout: Duration,
    started: Option<Instant>,
    shortened: bool,
}

impl Deadline {
    /// Before waiting for the rest of a message that came short.
    fn shorten(&mut self, stream: &UnixStream) -> Result<(), TransportError> {
        let at = *self.started.get_or_insert_with(Instant::now) + self.timeout;
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::from(io::ErrorKind::WouldBlock).into());
        }
        stream.set_read_timeout(Some(left))?;
        self.shortened = true;
        Ok(())
    }

    /// After the message: the next one gets the full timeout again.
    fn restore(&mut self, stream: &UnixStream) -> Result<(), TransportError> {
        if self.shortened {
            stream.set_read_timeout(Some(self.timeout))?;
            self.shortened = false;
        }
        Ok(())
    }
}

/// Reads into `buf` completely, collecting any file descriptors that arrive on the way.
/// Returns the bytes read, which is less than `buf.len()` only at end of stream. `boundary`:
/// `buf` starts a message, so a receive timeout before its first byte is [`TransportError::Idle`].
fn read_full(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    boundary: bool,
    mut deadline: Option<&mut Deadline>,
) -> Result<usize, TransportError> {
    let mut got = 0;
    while got < buf.len() {
        if let Some(d) = deadline.as_deref_mut() {
            // Not before the message's first byte, nor on the fast path; from the first short
            // read on, before every read.
            if d.started.is_some() && (got > 0 || d.shortened) {
                d.shorten(stream)?;
            }
        }
        let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        }];
        // SAFETY: the iovec points into `buf[got..]`, which we borrow mutably for the call and
        // into which arbitrary bytes may be written.
        let res = unsafe { stream.recv_with_fds(&mut iov, &mut raw) };
        match res {
            Ok((n, nfds)) => {
                for fd in &raw[..nfds] {
                    // SAFETY: recv_with_fds hands us ownership of the `nfds` descriptors it
                    // received; each is wrapped exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(*fd) });
                }
                if n == 0 {
                    return Ok(got);
                }
                if let Some(d) = deadline.as_deref_mut() {
                    d.started.get_or_insert_with(Instant::now);
                }
                got += n;
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if e.errno() == libc::EAGAIN && boundary && got == 0 && fds.is_empty() => {
                return Err(TransportError::Idle)
            }
            // vmm-sys-util reports a truncated control message (it closed the fds) as ENOBUFS.
            Err(e) if e.errno() == libc::ENOBUFS => return Err(TransportError::TooManyFds),
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    }
    Ok(got)
}

/// Receives one message. `Ok(None)` is a clean end of stream between messages. With a
/// receive timeout set on the socket, [`TransportError::Idle`] says that it passed before the
/// message began, and [`TransportError::Io`] (`WouldBlock`) that it passed in its middle.
pub fn recv_message(stream: &UnixStream) -> Result<Option<Received>, TransportError> {
    recv(stream, None)
}

/// Like [`recv_message`], but the whole message must arrive within `timeout` of its first
/// byte; the socket's receive timeout must already be set to `timeout`. A message not
/// complete in time is an `Io` error of kind `WouldBlock`, like a receive timeout.
pub fn recv_message_within(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<Option<Received>, TransportError> {
    let mut deadline = Deadline {
        timeout,
        started: None,
        shortened: false,
    };
    let result = recv(stream, Some(&mut deadline));
    deadline.restore(stream)?;
    result
}

fn recv(
    stream: &UnixStream,
    mut deadline: Option<&mut Deadline>,
) -> Result<Option<Received>, TransportError> {
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_SIZE];
    match read_full(stream, &mut hdr, &mut fds, true, deadline.as_deref_mut())? {
        0 if fds.is_empty() => return Ok(None),
        n if n < HEADER_SIZE => {
            return Err(TransportError::Truncated {
                got: n,
                want: HEADER_SIZE,
            })
        }
        _ => {}
    }
    let header = Header::decode(&hdr)?;
    let mut payload = vec![0u8; header.size as usize];
    let n = read_full(stream, &mut payload, &mut fds, false, deadline)?;
    if n < payload.len() {
        return Err(TransportError::Truncated {
            got: HEADER_SIZE + n,
            want: HEADER_SIZE + payload.len(),
        });
    }
    if fds.len() > MAX_FDS {
        return Err(TransportError::TooManyFds);
    }
    Ok(Some(Received {
        header,
        payload,
        fds,
    }))
}

/// Sends one message; the file descriptors travel with its first byte.
pub fn send_message(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), TransportError> {
    let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
    bytes.extend_from_slice(&header.encode());
    bytes.extend_from_slice(payload);
    send_bytes(stream, &bytes, fds)
}

/// Sends raw bytes with file descriptors: for peers that frame messages themselves, and for
/// tests that must send what no well-behaved peer would.
pub fn send_bytes(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> Result<(), TransportError> {
    let sent = loop {
        match stream.send_with_fds(&[bytes], fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
        }
    };
    let mut rest = &bytes[sent..];
    let mut s = stream;
    while !rest.is_empty() {
        match s.write(rest) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and discards bytes until end of stream; returns how many arrived. For tests that
/// check a peer closed the connection.
pub fn drain(stream: &UnixStream) -> io::Result<usize> {
    let mut total = 0;
    let mut buf = [0u8; 512];
    let mut s = stream;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Request;
    use std::os::fd::AsRawFd;

    #[test]
    fn message_with_fds_round_trips() {
        let (a, b) = UnixStream::pair().expect("pair");
        let f = std::fs::File::open("/dev/null").expect("open");
        let h = Header::request(Request::AddMemReg, 3, true);
        send_message(&a, &h, &[1, 2, 3], &[f.as_raw_fd()]).expect("send");
        let m = recv_message(&b).expect("recv").expect("message");
        assert_eq!(m.header, h);
        assert_eq!(m.payload, vec![1, 2, 3]);
        assert_eq!(m.fds.len(), 1);
        drop(a);
        assert!(recv_message(&b).expect("eof").is_none());
    }

    #[test]
    fn a_timeout_between_messages_is_idle_and_within_one_is_an_error() {
        let (a, b) = UnixStream::pair().expect("pair");
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .expect("timeout");
        assert!(matches!(recv_message(&b), Err(TransportError::Idle)));
        send_bytes(&a, &[1, 0, 0, 0], &[]).expect("send");
        assert!(matches!(
            recv_message(&b),
            Err(TransportError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock
        ));
    }

    #[test]
    fn truncated_and_fd_flood_are_errors() {
        let (a, b) = UnixStream::pair().expect("pair");
        send_bytes(
            &a,
            &Header::request(Request::SetFeatures, 8, false).encode(),
            &[],
        )
        .expect("send");
        send_bytes(&a, &[1, 2, 3], &[]).expect("send");
        drop(a);
        assert!(matches!(
            recv_message(&b),
            Err(TransportError::Truncated { got: 15, want: 20 })
        ));

        let (a, b) = UnixStream::pair().expect("pair");
        let f = std::fs::File::open("/dev/null").expect("open");
        let nine = [f.as_raw_fd(); 9];
        send_message(
            &a,
            &Header::request(Request::GetFeatures, 0, false),
            &[],
            &nine,
        )
        .expect("send");
        assert!(matches!(recv_message(&b), Err(TransportError::TooManyFds)));
    }
    #[test]
    fn a_trickled_message_times_out_as_a_whole() {
        let (a, b) = UnixStream::pair().expect("pair");
        let timeout = Duration::from_millis(300);
        b.set_read_timeout(Some(timeout)).expect("timeout");
        let bytes = Header::request(Request::SetFeatures, 8, false).encode();
        let writer = std::thread::spawn(move || {
            // One byte every 100 ms: each recv alone is well within 300 ms.
            for byte in bytes {
                if send_bytes(&a, &[byte], &[]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            a
        });
        let started = Instant::now();
        let err = recv_message_within(&b, timeout).expect_err("too slow");
        assert!(
            matches!(&err, TransportError::Io(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{err:?}"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(1000),
            "{took:?}"
        );
        assert_eq!(b.read_timeout().expect("get"), Some(timeout), "restored");
        drop(writer.join().expect("writer"));
    }
}
