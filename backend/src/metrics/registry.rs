//! The process's counters and gauges, kept in atomics on the serving path, and their
//! rendering at a scrape: `prometheus-client` provides the registry and the text encoding
//! (version 0.0.4); the values come from fixed arrays of atomics, so that the request path
//! costs relaxed atomic adds and nothing else (the crate's labelled families take a map lookup
//! per increment).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coco_protocol::exit::{self, Abi, CertsRet};
use coco_protocol::wire::ExitMsg;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::blob::BlobStore;
use crate::histogram::Histogram;

const RETS: [CertsRet; 4] = [
    CertsRet::Ok,
    CertsRet::Again,
    CertsRet::NoSpace,
    CertsRet::Io,
];

fn ret_label(ret: CertsRet) -> &'static str {
    match ret {
        CertsRet::Ok => "ok",
        CertsRet::Again => "eagain",
        CertsRet::NoSpace => "enospc",
        CertsRet::Io => "eio",
    }
}

fn abi_label(abi: Abi) -> &'static str {
    match abi {
        Abi::CocoRfc => "coco_rfc",
        Abi::SnpReqCerts => "snp_req_certs",
    }
}

/// Why a COCO_EXIT record was returned unanswered (non-zero reply `status`).
const UNANSWERED: [(u32, &str); 2] = [
    (libc::ENOTSUP as u32, "enotsup"),
    (libc::EINVAL as u32, "einval"),
];

/// Every counter of one sidecar process. Shared by the accept loop, every connection and the
/// endpoint; all updates are relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Answered certificate requests, `[abi][ret]` in [`Abi::ALL`] and [`RETS`] order.
    requests: [[AtomicU64; RETS.len()]; Abi::ALL.len()],
    /// COCO_EXIT records returned with a non-zero status, in [`UNANSWERED`] order.
    unanswered: [AtomicU64; UNANSWERED.len()],
    request_duration: Histogram,
    leases_held: AtomicI64,
    lease_timeouts: AtomicU64,
    eagain_fallbacks: AtomicU64,
    connections: AtomicI64,
    accepted: AtomicU64,
    refused: AtomicU64,
    dropped: AtomicU64,
    /// Whether the accept loop runs (`/healthz`).
    serving: AtomicBool,
    /// The blob monitor's last judgement: servable and `blob check` finds no error.
    blob_valid: AtomicBool,
    /// The VCEK's or VLEK's `notAfter`, Unix seconds; -1 when the blob has none.
    vek_not_after: AtomicI64,
}

impl Metrics {
    /// All zero, the blob not judged yet (no VCEK/VLEK expiry).
    pub fn new() -> Metrics {
        Metrics {
            vek_not_after: AtomicI64::new(-1),
            ..Metrics::default()
        }
    }

    /// A COCO_EXIT was handled in `took`; `reply` is what goes back to the frontend.
    pub fn record_exit(&self, reply: &ExitMsg, took: Duration) {
        self.request_duration.observe(took);
        if reply.status != 0 {
            if let Some(i) = UNANSWERED.iter().position(|(s, _)| *s == reply.status) {
                self.unanswered[i].fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let Some(abi) = Abi::from_tag(reply.abi) else {
            return;
        };
        let Ok((raw, _)) = exit::read_answer(abi, &reply.record) else {
            return;
        };
        let (Some(a), Some(r)) = (
            Abi::ALL.iter().position(|x| *x == abi),
            RETS.iter()
                .position(|x| Some(*x) == CertsRet::from_raw(raw)),
        ) else {
            return;
        };
        self.requests[a][r].fetch_add(1, Ordering::Relaxed);
    }

    /// Answered requests of one ABI with one `ret` so far.
    pub fn requests(&self, abi: Abi, ret: CertsRet) -> u64 {
        let a = Abi::ALL.iter().position(|x| *x == abi).unwrap_or(0);
        let r = RETS.iter().position(|x| *x == ret).unwrap_or(0);
        self.requests[a][r].load(Ordering::Relaxed)
    }

    /// The number of leases held changed by `delta` (grants minus releases).
    pub fn leases_changed(&self, delta: i64) {
        if delta != 0 {
            self.leases_held.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Leases held by all connections now.
    pub fn leases_held(&self) -> i64 {
        self.leases_held.load(Ordering::Relaxed)
    }

    /// `n` leases were dropped by their timeout (no COCO_DONE).
    pub fn lease_timeouts(&self, n: usize) {
        self.lease_timeouts.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A request got the empty table because the blob had not been servable for
    /// `--max-eagain-ms`.
    pub fn eagain_fallback(&self) {
        self.eagain_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was accepted and is being served.
    pub fn connection_opened(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A served connection ended; `dropped` when the sidecar closed it (protocol error,
    /// timeout, I/O error) rather than the peer.
    pub fn connection_closed(&self, dropped: bool) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        if dropped {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The accept loop started (true) or stopped (false).
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    /// Whether the accept loop runs.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// The blob was judged ([`crate::daemon::monitor`]): `valid` when servable and `blob check` finds
    /// no error, with its VCEK's or VLEK's `notAfter` (Unix seconds) when it has one.
    pub fn set_blob_judged(&self, valid: bool, vek_not_after: Option<u64>) {
        self.blob_valid.store(valid, Ordering::Relaxed);
        let at = vek_not_after.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX));
        self.vek_not_after.store(at, Ordering::Relaxed);
    }

    /// The blob monitor's last judgement: (valid, VCEK/VLEK `notAfter`).
    pub fn blob_judged(&self) -> (bool, Option<u64>) {
        let at = self.vek_not_after.load(Ordering::Relaxed);
        (
            self.blob_valid.load(Ordering::Relaxed),
            u64::try_from(at).ok(),
        )
    }

    /// A connection was accepted and closed at once (a limit or a policy refused it).
    pub fn connection_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders every metric, with the blob store's counters, in the Prometheus text format
    /// (version 0.0.4), encoded by `prometheus-client`.
    pub fn render(self: &Arc<Self>, store: &Arc<BlobStore>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition {
            metrics: Arc::clone(self),
            store: Arc::clone(store),
        }));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// The metrics as `prometheus-client` collects them at a scrape: read from the atomics the
/// serving path updates.
#[derive(Debug)]
struct Exposition {
    metrics: Arc<Metrics>,
    store: Arc<BlobStore>,
}

/// A histogram family: per-bucket counts by upper bound in seconds (the encoder makes them
/// cumulative and ends with `+Inf`), the sum in seconds and the count.
fn encode_histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &Histogram,
) -> std::fmt::Result {
    let s = h.snapshot();
    let mut below = 0;
    let buckets: Vec<(f64, u64)> = s
        .cumulative
        .iter()
        .map(|(bound, n)| {
            let bound = if *bound == u64::MAX {
                f64::INFINITY
            } else {
                *bound as f64 / 1e9
            };
            let in_bucket = n - below;
            below = *n;
            (bound, in_bucket)
        })
        .collect();
    encoder
        .encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(s.sum_ns as f64 / 1e9, s.count(), &buckets, None)
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let m = &self.metrics;
        // Counters are named without `_total`, which the encoder appends.
        let build = [("version", env!("CARGO_PKG_VERSION"))];
        let mut family = encoder.encode_descriptor(
            "coco_sidecar_build_info",
            "Always 1; the version label says which coco-sidecar runs.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(family.encode_family(&build)?)?;
        let mut family = encoder.encode_descriptor(
            "coco_sidecar_requests",
            "Certificate requests answered, by exit record ABI and ret value \
             (ok=0, eagain=11, enospc=28, eio=5).",
            None,
            MetricType::Counter,
        )?;
        for (a, abi) in Abi::ALL.iter().enumerate() {
            for (r, ret) in RETS.iter().enumerate() {
                let labels = [("abi", abi_label(*abi)), ("ret", ret_label(*ret))];
                let n = m.requests[a][r].load(Ordering::Relaxed);
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "coco_sidecar_exits_unanswered",
            "COCO_EXIT records returned unanswered: enotsup (unknown ABI or COCO sub-type), \
             einval (wrong record size). Non-zero means a frontend bug.",
            None,
            MetricType::Counter,
        )?;
        for (i, (_, label)) in UNANSWERED.iter().enumerate() {
            let n = m.unanswered[i].load(Ordering::Relaxed);
            ConstCounter::new(n).encode(family.encode_family(&[("status", *label)])?)?;
        }
        encode_histogram(
            &mut encoder,
            "coco_sidecar_request_duration_seconds",
            "Time to answer one COCO_EXIT (lock wait, blob read, guest write), socket I/O \
             excluded.",
            &m.request_duration,
        )?;
        encode_histogram(
            &mut encoder,
            "coco_sidecar_blob_lock_wait_seconds",
            "Time spent taking the shared OFD lock on the blob, per request; a wait that \
             reaches --lock-wait-ms is answered EAGAIN.",
            self.store.lock_wait(),
        )?;
        let stats = self.store.stats();
        let counters = [
            (
                "coco_sidecar_blob_reloads",
                "Times the blob's bytes were read and validated (a new version, or one too \
                 fresh to cache).",
                stats.reloads,
            ),
            (
                "coco_sidecar_blob_invalid",
                "Times a read version of the blob failed validation (answered EAGAIN).",
                stats.invalid,
            ),
            (
                "coco_sidecar_blob_path_checks",
                "Requests that looked at the blob path with stat: the inotify watch reported a \
                 change, the once-a-second re-check, or the path is not watched.",
                stats.path_checks,
            ),
            (
                "coco_sidecar_lease_timeouts",
                "Leases dropped by --lease-timeout-ms because no COCO_DONE came.",
                m.lease_timeouts.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_eagain_fallbacks",
                "Requests answered with the empty table because the blob had not been \
                 servable for --max-eagain-ms.",
                m.eagain_fallbacks.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_connections_accepted",
                "Frontend connections accepted and served.",
                m.accepted.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_connections_refused",
                "Frontend connections closed at once by the peer policy (--allow-uid).",
                m.refused.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_connections_dropped",
                "Served connections the sidecar closed (protocol error, I/O or handshake \
                 timeout, socket error, or to make room for a new connection).",
                m.dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(e)?;
        }
        let gauges = [
            (
                "coco_sidecar_leases_held",
                "Shared blob locks held for requests on their way to firmware, all connections.",
                m.leases_held(),
            ),
            (
                "coco_sidecar_connections",
                "Frontend connections being served now.",
                m.connections.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_blob_watched",
                "1 while the blob path is watched with inotify (requests need no stat), 0 \
                 before the first request and where it cannot be watched.",
                i64::from(stats.watched),
            ),
            (
                "coco_sidecar_blob_valid",
                "1 while the blob is servable and `blob check` finds no error in it (judged at \
                 start and within a second of every change); 0 when it is missing, invalid, \
                 or its chain has errors (expired, wrong signature).",
                i64::from(m.blob_valid.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, value) in gauges {
            let e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(e)?;
        }
        if let (_, Some(at)) = m.blob_judged() {
            let e = encoder.encode_descriptor(
                "coco_sidecar_blob_vek_not_after_timestamp_seconds",
                "End of validity (notAfter) of the blob's VCEK or VLEK, seconds since the Unix \
                 epoch; absent while the blob has none.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(at).unwrap_or(i64::MAX)).encode(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_counted_by_abi_and_ret() {
        let m = Metrics::new();
        let mut record = exit::build_request(Abi::SnpReqCerts, 0x1000, 1);
        exit::encode_answer(Abi::SnpReqCerts, &mut record, CertsRet::NoSpace, Some(3));
        let reply = ExitMsg {
            abi: Abi::SnpReqCerts.tag(),
            vcpu: 0,
            status: 0,
            lease: 0,
            record,
        };
        m.record_exit(&reply, Duration::from_micros(10));
        m.record_exit(
            &ExitMsg {
                status: libc::ENOTSUP as u32,
                abi: 99,
                ..reply.clone()
            },
            Duration::from_micros(10),
        );
        assert_eq!(m.requests(Abi::SnpReqCerts, CertsRet::NoSpace), 1);
        assert_eq!(m.requests(Abi::SnpReqCerts, CertsRet::Ok), 0);
        assert_eq!(m.requests(Abi::CocoRfc, CertsRet::NoSpace), 0);
        assert_eq!(m.unanswered[0].load(Ordering::Relaxed), 1);
        assert_eq!(m.request_duration.snapshot().count(), 2);
    }
}
