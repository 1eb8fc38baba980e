//! Connection slots: who is connected, which connections hold guest memory or leases, and which
//! one gives way when the sidecar is full, so that the real VMM always gets in.
//!
//! At most `--max-connections` connections may hold guest memory or leases (they are *pinned*:
//! a VMM with a running guest may stay idle for hours and must never be closed for that).
//! [`SPARE_SLOTS`] more slots exist for connections that hold neither: a VMM that has not
//! shared its memory yet, a health probe, or a peer that only connects. When every slot is
//! taken, a new connection takes the slot of an unpinned one, which is closed; there always is
//! one, since pinned connections are at most `--max-connections`. The one to go is the one that
//! has made the least progress (no message at all, then no handshake), and of those the one
//! idle longest. So a peer can hold a slot only by sharing memory (which the socket's mode and
//! `--allow-uid` decide who may do), and neither idle connections nor any number of new ones
//! can keep a VMM or a probe out.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use coco_protocol::wire::HEADER_SIZE;
use log::{debug, info};
use rustix::net::RecvFlags;

use crate::listen::Peer;

/// Slots beyond `--max-connections` for connections that hold no memory and no lease.
pub const SPARE_SLOTS: usize = 4;

/// How far a connection has come; the least advanced give way first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// Not even a whole message header yet.
    Silent,
    /// A message header at least (a VMM or a probe sends one as soon as it connects), but no
    /// SET_PROTOCOL_FEATURES yet.
    Talking,
    /// The handshake is done.
    Negotiated,
}

impl Progress {
    /// How far a connection has come by what waits unread in its socket: a VMM or a probe
    /// writes its first message as soon as it is connected, often before the sidecar accepts or
    /// its thread runs, while a peer that only holds a connection has sent nothing, or a few
    /// bytes. Looked at without reading (MSG_PEEK), so that a connection in a crowd of silent
    /// ones is not the first to give way because its thread was slow to start.
    pub fn waiting(stream: &UnixStream) -> Progress {
        let mut header = [0u8; HEADER_SIZE];
        let peeked = rustix::net::recv(stream, &mut header, RecvFlags::PEEK | RecvFlags::DONTWAIT);
        if peeked.is_ok_and(|(n, _)| n == HEADER_SIZE) {
            Progress::Talking
        } else {
            Progress::Silent
        }
    }
}

#[derive(Debug)]
struct Conn {
    /// A clone of the connection's socket, to shut it down from outside its thread.
    stream: UnixStream,
    peer: Option<Peer>,
    progress: Progress,
    last: Instant,
    pinned: bool,
    displaced: bool,
    /// Whether it was logged as a VMM (once it first held memory).
    vmm: bool,
}

#[derive(Debug, Default)]
struct State {
    conns: HashMap<u64, Conn>,
    pinned: usize,
}

/// Every connection of a server.
#[derive(Debug)]
pub struct Slots {
    max_pinned: usize,
    state: Mutex<State>,
    emptied: Condvar,
}

impl Slots {
    /// Room for `max_pinned` connections holding memory or leases, plus [`SPARE_SLOTS`].
    pub fn new(max_pinned: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max_pinned,
            state: Mutex::new(State::default()),
            emptied: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent data: every update is
        // one field at a time.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections open now (displaced ones on their way out excluded).
    pub fn open(&self) -> usize {
        self.lock().conns.values().filter(|c| !c.displaced).count()
    }

    /// Takes a slot for connection `id` (whose socket `stream` is cloned to close it from
    /// outside), which has come as far as `progress` already; when all are taken, first closes
    /// the unpinned connection that has made the least progress and been idle longest, and
    /// returns its id too.
    pub fn admit(
        self: &Arc<Self>,
        id: u64,
        stream: &UnixStream,
        peer: Option<Peer>,
        progress: Progress,
    ) -> std::io::Result<(Slot, Option<u64>)> {
        let clone = stream.try_clone()?;
        let now = Instant::now();
        let mut state = self.lock();
        let open = state.conns.values().filter(|c| !c.displaced).count();
        let mut displaced = None;
        if open >= self.max_pinned + SPARE_SLOTS {
            // A connection accepted silent whose first message has arrived since, but whose
            // thread has not run yet (a loaded host), has talked: it must not go before the
            // peers that really say nothing.
            for c in state.conns.values_mut() {
                if c.progress == Progress::Silent && !c.pinned && !c.displaced {
                    c.progress = Progress::waiting(&c.stream);
                }
            }
            let victim = state
                .conns
                .iter_mut()
                .filter(|(_, c)| !c.pinned && !c.displaced)
                .min_by_key(|(_, c)| (c.progress, c.last));
            if let Some((victim_id, c)) = victim {
                c.displaced = true;
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                displaced = Some(*victim_id);
            }
        }
        state.conns.insert(
            id,
            Conn {
                stream: clone,
                peer,
                progress,
                last: now,
                pinned: false,
                displaced: false,
                vmm: false,
            },
        );
        Ok((
            Slot {
                slots: Arc::clone(self),
                id,
            },
            displaced,
        ))
    }

    /// Shuts every connection down (their threads then end and drop their slots).
    pub fn close_all(&self) {
        for c in self.lock().conns.values() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until every slot was dropped, at most `limit`; whether they all were.
    pub fn wait_empty(&self, limit: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .emptied
            .wait_timeout_while(state, limit, |s| !s.conns.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        state.conns.is_empty()
    }
}

/// One connection's slot; dropping it frees the slot and closes the server's clone of the
/// socket at once.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slot {
    /// A message was handled on a connection that holds neither memory nor leases (any more):
    /// it gives its pin back, if it had one, and has come this far.
    pub fn settle(&self, progress: Progress) {
        let mut state = self.slots.lock();
        let Some(c) = state.conns.get_mut(&self.id) else {
            return;
        };
        c.progress = c.progress.max(progress);
        c.last = Instant::now();
        if c.pinned {
            c.pinned = false;
            state.pinned -= 1;
        }
    }

    /// Marks the connection as holding memory or leases. False when `--max-connections`
    /// connections already do (or this one is being closed).
    pub fn pin(&self) -> bool {
        let mut state = self.slots.lock();
        let full = state.pinned >= self.slots.max_pinned;
        let Some(c) = state.conns.get_mut(&self.id) else {
            return false;
        };
        if c.pinned {
            return true;
        }
        if c.displaced || full {
            return false;
        }
        c.pinned = true;
        if !c.vmm {
            c.vmm = true;
            match c.peer {
                Some(p) => info!(
                    "connection {}: a VMM (pid {}, uid {}, gid {}) shares guest memory",
                    self.id, p.pid, p.uid, p.gid
                ),
                None => info!("connection {}: a VMM shares guest memory", self.id),
            }
        }
        state.pinned += 1;
        true
    }

    /// The connection holds neither memory nor leases any more.
    pub fn unpin(&self) {
        let mut state = self.slots.lock();
        if let Some(c) = state.conns.get_mut(&self.id).filter(|c| c.pinned) {
            c.pinned = false;
            state.pinned -= 1;
        }
    }

    /// Whether a newer connection took this one's slot.
    pub fn displaced(&self) -> bool {
        self.slots
            .lock()
            .conns
            .get(&self.id)
            .is_some_and(|c| c.displaced)
    }

    /// Whether this connection ever held guest memory (it is a VMM's, not a probe's).
    pub fn was_vmm(&self) -> bool {
        self.slots.lock().conns.get(&self.id).is_some_and(|c| c.vmm)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        if let Some(c) = state.conns.remove(&self.id) {
            if c.pinned {
                state.pinned -= 1;
            }
            debug!("connection {}: slot freed", self.id);
        }
        if state.conns.is_empty() {
            self.slots.emptied.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("pair")
    }

    /// Whether the peer of `ours` was shut down (reading it gives end of stream).
    fn closed(theirs: &UnixStream) -> bool {
        theirs.set_nonblocking(true).expect("nonblocking");
        matches!(std::io::Read::read(&mut &*theirs, &mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn the_least_advanced_idlest_unpinned_connection_gives_way() {
        let slots = Slots::new(2);
        let pairs: Vec<_> = (0..6).map(|_| conn()).collect();
        let mut held = Vec::new();
        for (i, (ours, _)) in pairs.iter().enumerate() {
            let (slot, out) = slots
                .admit(i as u64, ours, None, Progress::Silent)
                .expect("admit");
            assert_eq!(out, None, "{} of 6 slots", i + 1);
            held.push(slot);
        }
        // 0 and 1 hold memory; 2 negotiated; 3 talked; 4 and 5 said nothing (4 is older).
        assert!(held[0].pin() && held[1].pin());
        assert!(!held[2].pin(), "only 2 may hold memory");
        held[2].settle(Progress::Negotiated);
        held[3].settle(Progress::Talking);
        assert_eq!(slots.open(), 6);
        let (a, b) = conn();
        let (_s6, out) = slots.admit(6, &a, None, Progress::Silent).expect("admit");
        assert_eq!(out, Some(4));
        assert!(closed(&pairs[4].1) && held[4].displaced());
        let (_s7, out) = slots.admit(7, &b, None, Progress::Silent).expect("admit");
        assert_eq!(out, Some(5));
        // Then the new ones (silent), before those that talked.
        let (c, _) = conn();
        let (_s8, out) = slots.admit(8, &c, None, Progress::Silent).expect("admit");
        assert_eq!(out, Some(6));
        assert!(!closed(&pairs[0].1) && !closed(&pairs[2].1));
        // A freed pin lets another connection hold memory.
        held[0].unpin();
        assert!(held[2].pin());
        drop(held);
        assert_eq!(slots.open(), 2, "7 and 8");
        drop((_s6, _s7, _s8));
        assert!(slots.wait_empty(Duration::from_secs(1)));
    }

    #[test]
    fn a_connection_whose_first_message_waits_unread_does_not_give_way_as_silent() {
        let slots = Slots::new(1);
        let pairs: Vec<_> = (0..5).map(|_| conn()).collect();
        let held: Vec<_> = pairs
            .iter()
            .enumerate()
            .map(|(i, (ours, _))| {
                let (slot, out) = slots
                    .admit(i as u64, ours, None, Progress::Silent)
                    .expect("admit");
                assert_eq!(out, None);
                slot
            })
            .collect();
        // 0, the oldest, was silent when accepted; its header arrives before its thread runs.
        std::io::Write::write_all(&mut &pairs[0].1, &[0u8; HEADER_SIZE]).expect("write");
        // Half a header is still silent.
        std::io::Write::write_all(&mut &pairs[1].1, &[0u8; HEADER_SIZE / 2]).expect("write");
        let (a, _) = conn();
        let (_s5, out) = slots.admit(5, &a, None, Progress::Silent).expect("admit");
        assert_eq!(out, Some(1));
        assert!(!closed(&pairs[0].1) && held[1].displaced());
    }
}
