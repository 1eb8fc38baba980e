//! The bound on EAGAIN (`--max-eagain-ms`, docs/protocol.md section 6.4): no connection's guest
//! sees EAGAIN for the blob continuously for longer than the bound. Past it the guest gets the
//! empty table (ret 0): it attests without a chain, which it then fetches from AMD, rather
//! than go on retrying until it gives up and discards its VMPCK (a Linux guest retries every
//! 2 s for 60 s). It gets the empty table until the blob can be served again.
//!
//! The run of EAGAIN is per connection (a guest's requests are serialised by its driver) and
//! counts only the blob's reasons (locked by or yielding to an updater, invalid, unreadable,
//! missing under `--missing-certs again`), not a frontend that holds its maximum of leases.

use std::time::{Duration, Instant};

use log::{info, warn};

use crate::blob::BlobError;

/// One connection's run of EAGAIN for the blob.
#[derive(Debug)]
pub struct EagainBound {
    connection: u64,
    limit: Duration,
    /// The first EAGAIN of the current run.
    since: Option<Instant>,
    /// The run has passed the bound (logged once per run).
    passed: bool,
    /// The last answer was the empty table because of the bound.
    fell_back: bool,
}

impl EagainBound {
    /// No run yet; `limit` is `--max-eagain-ms`.
    pub fn new(connection: u64, limit: Duration) -> EagainBound {
        EagainBound {
            connection,
            limit,
            since: None,
            passed: false,
            fell_back: false,
        }
    }

    /// The blob was servable: the run (if any) ends.
    pub fn servable(&mut self) {
        if self.passed {
            info!(
                "connection {}: the blob is servable again; serving it",
                self.connection
            );
        }
        self.since = None;
        self.passed = false;
    }

    /// The blob is not servable now (`why`): whether to answer with the empty table (the run of
    /// EAGAIN has lasted the bound) rather than EAGAIN.
    pub fn unservable(&mut self, why: &BlobError, now: Instant) -> bool {
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) < self.limit {
            return false;
        }
        if !self.passed {
            warn!(
                "connection {}: the blob has not been servable for {} ms ({why}); answering \
                 with the empty table until it is, so that the guest does not give up",
                self.connection,
                self.limit.as_millis()
            );
            self.passed = true;
        }
        self.fell_back = true;
        true
    }

    /// Whether the last answer was the empty table because of the bound (then clears it).
    pub fn take_fallback(&mut self) -> bool {
        std::mem::take(&mut self.fell_back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eagain_lasts_the_bound_then_the_empty_table_until_servable() {
        let why = BlobError::Missing("b".into());
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut b = EagainBound::new(1, Duration::from_millis(100));
        assert!(!b.unservable(&why, at(0)));
        assert!(!b.unservable(&why, at(99)));
        assert!(!b.take_fallback());
        assert!(b.unservable(&why, at(100)));
        assert!(b.take_fallback());
        assert!(!b.take_fallback(), "taken");
        assert!(b.unservable(&why, at(5000)));
        b.servable();
        // A new run starts from its own first EAGAIN.
        assert!(!b.unservable(&why, at(6000)));
        assert!(!b.unservable(&why, at(6099)));
        assert!(b.unservable(&why, at(6100)));
        let mut zero = EagainBound::new(2, Duration::ZERO);
        assert!(
            zero.unservable(&why, at(0)),
            "0 ms: never EAGAIN for the blob"
        );
    }
}
