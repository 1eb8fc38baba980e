//! Sending and receiving one framed message, with file descriptors, over a Unix stream socket.
//! Shared by the frontend client and the sidecar so that both frame bytes the same way.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::wire::{Header, WireError, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD};

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
    Truncated {
        /// Bytes of the message received.
        got: usize,
        /// Bytes the message has (header and payload).
        want: usize,
    },
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

/// Reads framed messages from one stream, normally with a single `recvmsg` per message: it
/// asks for as many bytes as the largest message could have, and keeps what arrives beyond
/// the current message for the next call. Keep one reader per connection for its lifetime:
/// dropping it drops the bytes read ahead.
///
/// Descriptors that arrive with a `recvmsg` belong to the message holding the *last* byte
/// that call returned (protocol.md, section 1). Linux never lets one `recvmsg` on a stream
/// socket read past the bytes of a `sendmsg` that carried descriptors, so for a sender that
/// attaches a message's descriptors to a `sendmsg` carrying no other message's bytes, that
/// is always their message.
#[derive(Debug)]
pub struct MessageReader {
    buf: Box<[u8]>,
    /// `buf[start..end]` holds bytes read but not yet returned; `buf[start]` begins a message.
    start: usize,
    end: usize,
    /// Descriptors received, keyed by the stream offset of the message they belong to.
    fds: Vec<(u64, Vec<OwnedFd>)>,
    /// Stream offset of `buf[start]`.
    offset: u64,
}

impl Default for MessageReader {
    fn default() -> Self {
        MessageReader::new()
    }
}

impl MessageReader {
    /// A reader with nothing buffered.
    pub fn new() -> MessageReader {
        MessageReader {
            buf: vec![0u8; HEADER_SIZE + MAX_PAYLOAD].into_boxed_slice(),
            start: 0,
            end: 0,
            fds: Vec::new(),
            offset: 0,
        }
    }

    /// Whether bytes or descriptors of a next message were read ahead: a caller that waits
    /// for the socket to become readable must first take them with [`MessageReader::recv`].
    pub fn has_buffered(&self) -> bool {
        self.end > self.start || !self.fds.is_empty()
    }

    /// Receives one message. `Ok(None)` is a clean end of stream between messages. With a
    /// receive timeout set on the socket, [`TransportError::Idle`] says that it passed before
    /// the message began, and [`TransportError::Io`] (`WouldBlock`) that it passed in its
    /// middle.
    pub fn recv(&mut self, stream: &UnixStream) -> Result<Option<Received>, TransportError> {
        self.recv_with(stream, None)
    }

    /// Like [`MessageReader::recv`], but the whole message must arrive within `timeout` of
    /// its first byte; the socket's receive timeout must already be set to `timeout`. A
    /// message not complete in time is an `Io` error of kind `WouldBlock`, like a receive
    /// timeout.
    pub fn recv_within(
        &mut self,
        stream: &UnixStream,
        timeout: Duration,
    ) -> Result<Option<Received>, TransportError> {
        let mut deadline = Deadline {
            timeout,
            started: None,
            shortened: false,
        };
        let result = self.recv_with(stream, Some(&mut deadline));
        deadline.restore(stream)?;
        result
    }

    fn recv_with(
        &mut self,
        stream: &UnixStream,
        mut deadline: Option<&mut Deadline>,
    ) -> Result<Option<Received>, TransportError> {
        loop {
            if let Some(message) = self.take_message()? {
                return Ok(Some(message));
            }
            let begun = self.has_buffered();
            if let Some(d) = deadline.as_deref_mut() {
                // The fast path (a message that arrives whole in the first read) costs no
                // system call; from the first short read on, every read gets what is left.
                if begun {
                    d.started.get_or_insert_with(Instant::now);
                    d.shorten(stream)?;
                }
            }
            let (n, fds) = match self.read(stream) {
                Ok(got) => got,
                Err(TransportError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock && !begun => {
                    return Err(TransportError::Idle)
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                let got = self.end - self.start;
                if got == 0 && self.fds.is_empty() && fds.is_empty() {
                    return Ok(None);
                }
                return Err(TransportError::Truncated {
                    got,
                    want: self.len_at(self.start).unwrap_or(HEADER_SIZE),
                });
            }
            if !fds.is_empty() {
                self.attach(fds)?;
            }
        }
    }

    /// Total length of the buffered message starting at `at`, once its header is in (as the
    /// header says: not checked against the limit).
    fn len_at(&self, at: usize) -> Option<usize> {
        if at + HEADER_SIZE > self.end {
            return None;
        }
        let h = &self.buf[at..at + HEADER_SIZE];
        Some(HEADER_SIZE + u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize)
    }

    /// The first buffered message, if it is complete.
    fn take_message(&mut self) -> Result<Option<Received>, TransportError> {
        let buffered = self.end - self.start;
        if buffered < HEADER_SIZE {
            return Ok(None);
        }
        let mut raw = [0u8; HEADER_SIZE];
        raw.copy_from_slice(&self.buf[self.start..self.start + HEADER_SIZE]);
        // Checked as soon as it is in, so that an oversized size never waits for bytes.
        let header = Header::decode(&raw)?;
        let total = HEADER_SIZE + header.size as usize;
        if buffered < total {
            return Ok(None);
        }
        let payload = self.buf[self.start + HEADER_SIZE..self.start + total].to_vec();
        let at = self.offset;
        let fds = match self.fds.first() {
            Some((o, _)) if *o == at => self.fds.remove(0).1,
            _ => Vec::new(),
        };
        self.start += total;
        self.offset += total as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(Some(Received {
            header,
            payload,
            fds,
        }))
    }

    /// One `recvmsg` into the free end of the buffer.
    fn read(&mut self, stream: &UnixStream) -> Result<(usize, Vec<OwnedFd>), TransportError> {
        if self.start > 0 {
            // What is left is less than one message (a complete one would have been taken),
            // and no message is longer than the buffer: moved to the front, the rest of it
            // fits.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
            let free = &mut self.buf[self.end..];
            let mut iov = [libc::iovec {
                iov_base: free.as_mut_ptr().cast(),
                iov_len: free.len(),
            }];
            // SAFETY: the iovec points into `self.buf[self.end..]`, which we borrow mutably
            // for the call and into which arbitrary bytes may be written.
            match unsafe { stream.recv_with_fds(&mut iov, &mut raw) } {
                Ok((n, nfds)) => {
                    let fds = raw[..nfds]
                        .iter()
                        // SAFETY: recv_with_fds hands us ownership of the `nfds` descriptors
                        // it received; each is wrapped exactly once.
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
                        .collect();
                    self.end += n;
                    return Ok((n, fds));
                }
                Err(e) if e.errno() == libc::EINTR => continue,
                // vmm-sys-util reports a truncated control message (it closed the fds) as
                // ENOBUFS.
                Err(e) if e.errno() == libc::ENOBUFS => return Err(TransportError::TooManyFds),
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno()).into()),
            }
        }
    }

    /// Files descriptors that just arrived under the message holding the last byte read.
    fn attach(&mut self, fds: Vec<OwnedFd>) -> Result<(), TransportError> {
        // Walk the buffered messages from the first; the last one starting before the end
        // holds the last byte. A header not yet complete (or invalid) ends the walk: the
        // message it starts is then the last one.
        let mut at = self.start;
        while let Some(len) = self.len_at(at) {
            if len > HEADER_SIZE + MAX_PAYLOAD || at + len >= self.end {
                break;
            }
            at += len;
        }
        let key = self.offset + (at - self.start) as u64;
        match self.fds.iter_mut().find(|(o, _)| *o == key) {
            Some((_, list)) => list.extend(fds),
            None => self.fds.push((key, fds)),
        }
        if self.fds.iter().any(|(_, list)| list.len() > MAX_FDS) {
            return Err(TransportError::TooManyFds);
        }
        Ok(())
    }
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
        let mut r = MessageReader::new();
        let m = r.recv(&b).expect("recv").expect("message");
        assert_eq!(m.header, h);
        assert_eq!(m.payload, vec![1, 2, 3]);
        assert_eq!(m.fds.len(), 1);
        drop(a);
        assert!(r.recv(&b).expect("eof").is_none());
    }

    fn dev_null() -> std::fs::File {
        std::fs::File::open("/dev/null").expect("open")
    }

    #[test]
    fn messages_read_ahead_are_returned_in_order_with_their_own_descriptors() {
        let (a, b) = UnixStream::pair().expect("pair");
        let (f, g) = (dev_null(), dev_null());
        // Queued before the first recv, each by its own sendmsg: a message without
        // descriptors, one with one, one with two, then one without.
        let sent = [
            (
                Header::request(Request::SetFeatures, 8, false),
                vec![7u8; 8],
                vec![],
            ),
            (
                Header::request(Request::AddMemReg, 40, true),
                vec![1; 40],
                vec![f.as_raw_fd()],
            ),
            (
                Header::request(Request::SetMemTable, 3, true),
                vec![2; 3],
                vec![f.as_raw_fd(), g.as_raw_fd()],
            ),
            (
                Header::request(Request::GetFeatures, 0, false),
                vec![],
                vec![],
            ),
        ];
        for (h, p, fds) in &sent {
            send_message(&a, h, p, fds).expect("send");
        }
        drop(a);
        let mut r = MessageReader::new();
        for (h, p, fds) in &sent {
            let m = r.recv(&b).expect("recv").expect("message");
            assert_eq!((&m.header, &m.payload), (h, p));
            assert_eq!(m.fds.len(), fds.len(), "{h:?}");
        }
        assert!(!r.has_buffered());
        assert!(r.recv(&b).expect("eof").is_none());
    }

    #[test]
    fn descriptors_sent_with_the_payload_belong_to_that_message() {
        let (a, b) = UnixStream::pair().expect("pair");
        let f = dev_null();
        let h = Header::request(Request::AddMemReg, 4, true);
        send_bytes(&a, &h.encode(), &[]).expect("header");
        send_bytes(&a, &[1, 2], &[f.as_raw_fd()]).expect("half the payload, the fd");
        send_bytes(&a, &[3, 4], &[]).expect("rest");
        send_message(
            &a,
            &Header::request(Request::GetFeatures, 0, false),
            &[],
            &[],
        )
        .expect("next");
        let mut r = MessageReader::new();
        let m = r.recv(&b).expect("recv").expect("message");
        assert_eq!(
            (m.payload.as_slice(), m.fds.len()),
            (&[1u8, 2, 3, 4][..], 1)
        );
        let m = r.recv(&b).expect("recv").expect("message");
        assert_eq!(
            (m.header.request, m.fds.len()),
            (Request::GetFeatures as u32, 0)
        );
    }

    #[test]
    fn a_message_arriving_in_pieces_is_put_together() {
        let (a, b) = UnixStream::pair().expect("pair");
        let h = Header::request(Request::SetFeatures, 8, false);
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(&[9; 8]);
        let writer = std::thread::spawn(move || {
            for piece in bytes.chunks(5) {
                send_bytes(&a, piece, &[]).expect("piece");
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let m = MessageReader::new()
            .recv(&b)
            .expect("recv")
            .expect("message");
        assert_eq!((m.header, m.payload), (h, vec![9; 8]));
        writer.join().expect("writer");
    }

    #[test]
    fn descriptors_trickled_past_the_limit_are_refused() {
        let (a, b) = UnixStream::pair().expect("pair");
        let f = dev_null();
        let h = Header::request(Request::AddMemReg, 40, true).encode();
        // Five descriptors with each of two pieces of one message: ten in all.
        send_bytes(&a, &h, &[f.as_raw_fd(); 5]).expect("header");
        send_bytes(&a, &[0; 40], &[f.as_raw_fd(); 5]).expect("payload");
        assert!(matches!(
            MessageReader::new().recv(&b),
            Err(TransportError::TooManyFds)
        ));
    }

    #[test]
    fn an_oversized_header_is_refused_without_waiting_for_its_payload() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut h = Header::request(Request::SetFeatures, 0, false).encode();
        h[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        send_bytes(&a, &h, &[]).expect("send");
        assert!(matches!(
            MessageReader::new().recv(&b),
            Err(TransportError::Wire(WireError::PayloadTooLarge(_)))
        ));
    }

    #[test]
    fn a_timeout_between_messages_is_idle_and_within_one_is_an_error() {
        let (a, b) = UnixStream::pair().expect("pair");
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .expect("timeout");
        assert!(matches!(
            MessageReader::new().recv(&b),
            Err(TransportError::Idle)
        ));
        send_bytes(&a, &[1, 0, 0, 0], &[]).expect("send");
        assert!(matches!(
            MessageReader::new().recv(&b),
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
            MessageReader::new().recv(&b),
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
        assert!(matches!(
            MessageReader::new().recv(&b),
            Err(TransportError::TooManyFds)
        ));
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
        let err = MessageReader::new()
            .recv_within(&b, timeout)
            .expect_err("too slow");
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
