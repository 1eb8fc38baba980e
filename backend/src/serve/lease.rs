//! Leases: a shared lock on the blob kept from the moment a table was written into the guest
//! until the request reached firmware (COCO_DONE), the connection closed, or the timeout.
//! A lease owns its hold on the lock ([`BlobLock`]); dropping the lease drops that hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::blob::BlobLock;

#[derive(Debug)]
struct Lease<L> {
    vcpu: u32,
    deadline: Instant,
    _lock: L,
}

/// One connection's leases, each holding an `L` (the blob's lock; tests use other types).
#[derive(Debug)]
pub struct Leases<L = BlobLock> {
    held: HashMap<u64, Lease<L>>,
    next_id: u64,
    max: usize,
    timeout: Duration,
}

impl<L> Leases<L> {
    /// No leases yet; at most `max` at once, each for at most `timeout`.
    pub fn new(max: usize, timeout: Duration) -> Leases<L> {
        Leases {
            held: HashMap::new(),
            next_id: 1,
            max,
            timeout,
        }
    }

    /// Number held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Drops a lease this vCPU still holds: a vCPU that asks again has passed its previous
    /// request to firmware, whether or not the frontend said DONE.
    pub fn release_vcpu(&mut self, vcpu: u32) -> bool {
        let before = self.held.len();
        self.held.retain(|_, l| l.vcpu != vcpu);
        self.held.len() != before
    }

    /// Whether one more lease fits.
    pub fn has_room(&self) -> bool {
        self.held.len() < self.max
    }

    /// Takes a lease for `vcpu` holding `lock`. The caller checked [`Leases::has_room`].
    pub fn grant(&mut self, vcpu: u32, lock: L, now: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.held.insert(
            id,
            Lease {
                vcpu,
                deadline: now + self.timeout,
                _lock: lock,
            },
        );
        id
    }

    /// Releases a lease; false if there was none with this id (never granted, or expired).
    pub fn release(&mut self, id: u64) -> bool {
        self.held.remove(&id).is_some()
    }

    /// Drops the leases past their deadline and returns their (id, vcpu).
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, u32)> {
        let gone: Vec<(u64, u32)> = self
            .held
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, l)| (*id, l.vcpu))
            .collect();
        for (id, _) in &gone {
            self.held.remove(id);
        }
        gone
    }

    /// The earliest deadline, if any lease is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|l| l.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn grant_release_expire() {
        let f = || File::open("/dev/null").expect("open");
        let t0 = Instant::now();
        let mut l = Leases::new(2, Duration::from_secs(1));
        let a = l.grant(0, f(), t0);
        let b = l.grant(1, f(), t0 + Duration::from_millis(500));
        assert_ne!(a, b);
        assert!(!l.has_room());
        assert_eq!(l.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(l.expire(t0 + Duration::from_secs(1)), vec![(a, 0)]);
        assert!(!l.release(a), "expired lease is gone");
        assert!(l.release_vcpu(1));
        assert!(!l.release(b));
        assert!(l.is_empty());
    }
}
