//! The descriptor budget. Everything a peer can make the sidecar hold open is bounded
//! (docs/hardening.md, "Resource limits"), so the worst case is known: per connection that may
//! hold memory its socket and the server's clone of it, one descriptor per memory region and
//! the descriptors of the message being read; per spare slot (no memory) the same without
//! regions; and the blob's open file, which all leases share. `serve` raises the soft
//! RLIMIT_NOFILE to the hard limit and warns when even that is below the worst case: a peer
//! holding all it may would then make others' requests answer EAGAIN (never EIO) and new
//! connections wait in the listen queue.

use std::io;

use coco_protocol::wire::{MAX_FDS, MAX_MEM_SLOTS};

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use thiserror::Error;

use crate::serve::slots::SPARE_SLOTS;

/// Descriptors the process holds whatever its VMM peers do (stdio, listener, shutdown and
/// signal pairs, the blob's file and watch, the metrics listener and its at most 16 scrapes,
/// each `/readyz` with a blob file and a watch of its own), with room to spare.
const BASELINE_FDS: u64 = 64;

/// Why the limit could not be read or raised.
#[derive(Debug, Error)]
pub enum RlimitError {
    #[error("cannot raise RLIMIT_NOFILE to {want}: {source}")]
    Set { want: u64, source: io::Error },
}

/// The most descriptors peers can make us hold with `max_connections` (connections that may
/// hold memory). Leases share the blob's one open file, so `--max-leases` adds nothing (only a
/// blob renamed over while leases on it live keeps its old file open until they end).
pub fn fd_budget(max_connections: usize) -> u64 {
    let spare = 2 + MAX_FDS as u64;
    let per_connection = spare + MAX_MEM_SLOTS;
    (max_connections as u64)
        .saturating_mul(per_connection)
        .saturating_add(SPARE_SLOTS as u64 * spare)
        .saturating_add(BASELINE_FDS)
}

/// Raises the soft descriptor limit to the hard one; returns the limit now in force
/// (`u64::MAX` for none).
pub fn raise_nofile() -> Result<u64, RlimitError> {
    let lim = getrlimit(Resource::Nofile);
    // `None`: RLIM_INFINITY.
    let (soft, hard) = (
        lim.current.unwrap_or(u64::MAX),
        lim.maximum.unwrap_or(u64::MAX),
    );
    if soft >= hard {
        return Ok(soft);
    }
    let raised = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    setrlimit(Resource::Nofile, raised).map_err(|e| RlimitError::Set {
        want: hard,
        source: e.into(),
    })?;
    Ok(hard)
}

/// Raises the limit and logs whether it covers the worst case of these settings.
pub fn prepare(max_connections: usize, max_leases: usize) {
    let budget = fd_budget(max_connections);
    match raise_nofile() {
        Ok(limit) if limit >= budget => {
            log::info!("descriptor limit {limit} covers the worst case of {budget}")
        }
        Ok(limit) => log::warn!(
            "descriptor limit {limit} is below the worst case of {budget} for \
             --max-connections {max_connections} and --max-leases {max_leases}: peers that \
             hold all they may will see EAGAIN and queued connections; raise the hard \
             RLIMIT_NOFILE or lower those options"
        ),
        Err(e) => log::warn!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_worst_case_is_counted_per_connection() {
        // 16 connections x (2 + 32 regions + 8 in flight) + 4 spare x (2 + 8) + 64.
        assert_eq!(fd_budget(16), 16 * 42 + 4 * 10 + 64);
        assert_eq!(fd_budget(usize::MAX), u64::MAX);
    }
}
