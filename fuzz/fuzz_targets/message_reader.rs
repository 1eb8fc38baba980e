//! The sidecar's message reader (`transport::MessageReader`) on an arbitrary stream: arbitrary
//! bytes, cut into arbitrary `sendmsg` calls, some carrying descriptors, over a real socket
//! pair. Beyond "never panics": every message returned is exactly the next bytes of the
//! stream, no message carries more than MAX_FDS descriptors, no descriptor is returned twice or
//! made up, and a clean end of stream comes only at a message boundary.
//!
//! Input: a sequence of at most 64 pieces, each one control byte (low 7 bits + 1: the piece's
//! length; bit 7: it carries one descriptor) followed by that many stream bytes (fewer at the
//! end).
#![no_main]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use coco_protocol::transport::{self, MessageReader, TransportError};
use coco_protocol::wire::{HEADER_SIZE, MAX_FDS};
use libfuzzer_sys::fuzz_target;

/// Each piece is its own socket buffer, with its overhead: this many fit in a socket's send
/// buffer whatever their size, so the writer never blocks before the reader runs (a writer
/// thread would need no bound, but LeakSanitizer reports glibc's per-thread state).
const MAX_PIECES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut stream = Vec::new();
    let mut fds_sent = 0;
    let mut rest = data;
    for _ in 0..MAX_PIECES {
        let Some((&control, tail)) = rest.split_first() else {
            break;
        };
        let len = usize::from(control & 0x7f) + 1;
        let piece = &tail[..len.min(tail.len())];
        rest = &tail[piece.len()..];
        if piece.is_empty() {
            break;
        }
        let fds: &[i32] = if control & 0x80 != 0 { &[null.as_raw_fd()] } else { &[] };
        transport::send_bytes(&a, piece, fds).expect("send");
        fds_sent += fds.len();
        stream.extend_from_slice(piece);
    }
    drop(a);
    read_all(&b, &stream, fds_sent);
});

fn read_all(b: &UnixStream, stream: &[u8], fds_sent: usize) {
    let mut reader = MessageReader::new();
    let mut at = 0;
    let mut fds_got = 0;
    loop {
        match reader.recv(b) {
            Ok(Some(m)) => {
                let end = at + HEADER_SIZE + m.payload.len();
                assert!(end <= stream.len(), "a message beyond the bytes sent");
                assert_eq!(&m.header.encode()[..], &stream[at..at + HEADER_SIZE]);
                assert_eq!(&m.payload[..], &stream[at + HEADER_SIZE..end]);
                assert!(m.fds.len() <= MAX_FDS);
                fds_got += m.fds.len();
                at = end;
            }
            Ok(None) => {
                assert_eq!(at, stream.len(), "a clean end only at a message boundary");
                break;
            }
            Err(TransportError::Truncated { got, .. }) => {
                assert_eq!(at + got, stream.len(), "truncated: the rest of the bytes sent");
                break;
            }
            Err(TransportError::Wire(_)) | Err(TransportError::TooManyFds) => break,
            Err(e) => panic!("unexpected error on a socket pair: {e}"),
        }
    }
    assert!(fds_got <= fds_sent, "descriptors made up");
}
