//! Prometheus metrics: counters and histograms kept in atomics on the serving path, rendered in
//! the Prometheus text exposition format (version 0.0.4) by a small HTTP endpoint on its own
//! thread (`--metrics ADDR`, off by default).
//!
//! Why not the `prometheus-client` crate: its histogram takes a lock on every observation and
//! its labelled families look label sets up in a locked map. Our label sets are fixed and tiny
//! (two ABIs x four `ret` values), so fixed arrays of atomics give the same output with nothing
//! but relaxed atomic adds on the request path, and no extra dependency in a sandboxed binary.
//! The end-to-end test parses the output with an independent parser (`prometheus-parse`).
//!
//! docs/hardening.md ("Metrics") lists every metric and what to alert on.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::{self, Abi, CertsRet};
use coco_protocol::wire::ExitMsg;
use log::{debug, info, warn};
use thiserror::Error;

use crate::blob::BlobStore;

/// Why the metrics endpoint could not start.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("--metrics {addr}: cannot listen: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Spawn(io::Error),
}

/// Upper bounds (inclusive, in nanoseconds) of the latency histograms' buckets: 25 us to 1 s.
/// A served request costs tens of microseconds; a lock wait is bounded by `--lock-wait-ms`
/// (default 100 ms).
const BOUNDS_NS: [u64; 14] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// A latency histogram: one atomic per bucket (not cumulative; summed when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A consistent-enough copy of a [`Histogram`]: cumulative counts per bound, then `+Inf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound in ns, observations <= bound)`, ascending; the last bound is `u64::MAX`
    /// for `+Inf`.
    pub cumulative: Vec<(u64, u64)>,
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// All observations (the `+Inf` bucket).
    pub fn count(&self) -> u64 {
        self.cumulative.last().map_or(0, |(_, n)| *n)
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let at = BOUNDS_NS.partition_point(|b| *b < ns);
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Reads the buckets.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = BOUNDS_NS
            .iter()
            .copied()
            .chain([u64::MAX])
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

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
}

impl Metrics {
    /// All zero.
    pub fn new() -> Metrics {
        Metrics::default()
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

    /// A connection was accepted and closed at once (a limit or a policy refused it).
    pub fn connection_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders every metric, with the blob store's counters, in the text format.
    pub fn render(&self, store: &BlobStore) -> String {
        let mut w = Writer::default();
        w.family(
            "coco_sidecar_build_info",
            "gauge",
            "Always 1; the version label says which coco-sidecar runs.",
        );
        w.sample(
            "coco_sidecar_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        w.family(
            "coco_sidecar_requests_total",
            "counter",
            "Certificate requests answered, by exit record ABI and ret value \
             (ok=0, eagain=11, enospc=28, eio=5).",
        );
        for (a, abi) in Abi::ALL.iter().enumerate() {
            for (r, ret) in RETS.iter().enumerate() {
                w.sample(
                    "coco_sidecar_requests_total",
                    &[("abi", abi_label(*abi)), ("ret", ret_label(*ret))],
                    self.requests[a][r].load(Ordering::Relaxed),
                );
            }
        }
        w.family(
            "coco_sidecar_exits_unanswered_total",
            "counter",
            "COCO_EXIT records returned unanswered: enotsup (unknown ABI or COCO sub-type), \
             einval (wrong record size). Non-zero means a frontend bug.",
        );
        for (i, (_, label)) in UNANSWERED.iter().enumerate() {
            w.sample(
                "coco_sidecar_exits_unanswered_total",
                &[("status", label)],
                self.unanswered[i].load(Ordering::Relaxed),
            );
        }
        w.histogram(
            "coco_sidecar_request_duration_seconds",
            "Time to answer one COCO_EXIT (lock wait, blob read, guest write), socket I/O \
             excluded.",
            &self.request_duration.snapshot(),
        );
        w.histogram(
            "coco_sidecar_blob_lock_wait_seconds",
            "Time spent taking the shared OFD lock on the blob, per request; a wait that \
             reaches --lock-wait-ms is answered EAGAIN.",
            &store.lock_wait().snapshot(),
        );
        let stats = store.stats();
        let counters = [
            (
                "coco_sidecar_blob_reloads_total",
                "Times the blob's bytes were read and validated (a new version, or one too \
                 fresh to cache).",
                stats.reloads,
            ),
            (
                "coco_sidecar_blob_invalid_total",
                "Times a read version of the blob failed validation (answered EAGAIN).",
                stats.invalid,
            ),
            (
                "coco_sidecar_blob_path_checks_total",
                "Requests that looked at the blob path with stat: the inotify watch reported a \
                 change, the once-a-second re-check, or the path is not watched.",
                stats.path_checks,
            ),
            (
                "coco_sidecar_lease_timeouts_total",
                "Leases dropped by --lease-timeout-ms because no COCO_DONE came.",
                self.lease_timeouts.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_eagain_fallbacks_total",
                "Requests answered with the empty table because the blob had not been \
                 servable for --max-eagain-ms.",
                self.eagain_fallbacks.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_connections_accepted_total",
                "Frontend connections accepted and served.",
                self.accepted.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_connections_refused_total",
                "Frontend connections closed at once (--max-connections or peer policy).",
                self.refused.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_connections_dropped_total",
                "Served connections the sidecar closed (protocol error, I/O timeout, socket \
                 error).",
                self.dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            w.family(name, "counter", help);
            w.sample(name, &[], value);
        }
        for (name, help, value) in [
            (
                "coco_sidecar_leases_held",
                "Shared blob locks held for requests on their way to firmware, all connections.",
                self.leases_held(),
            ),
            (
                "coco_sidecar_connections",
                "Frontend connections being served now.",
                self.connections.load(Ordering::Relaxed),
            ),
            (
                "coco_sidecar_blob_watched",
                "1 while the blob path is watched with inotify (requests need no stat), 0 \
                 before the first request and where it cannot be watched.",
                i64::from(stats.watched),
            ),
        ] {
            w.family(name, "gauge", help);
            let _ = writeln!(w.out, "{name} {value}");
        }
        w.out
    }
}

/// Builds the text exposition.
#[derive(Debug, Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let _ = write!(self.out, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, "histogram", help);
        for (bound, count) in &h.cumulative {
            let le = if *bound == u64::MAX {
                "+Inf".to_owned()
            } else {
                seconds(*bound)
            };
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{le}\"}} {count}");
        }
        let _ = writeln!(self.out, "{name}_sum {}", seconds(h.sum_ns));
        let _ = writeln!(self.out, "{name}_count {}", h.count());
    }
}

/// Nanoseconds as decimal seconds, exactly (no float rounding): 25000 -> "0.000025".
fn seconds(ns: u64) -> String {
    let (s, frac) = (ns / 1_000_000_000, ns % 1_000_000_000);
    if frac == 0 {
        return format!("{s}");
    }
    let digits = format!("{frac:09}");
    format!("{s}.{}", digits.trim_end_matches('0'))
}

/// Longest request head the endpoint reads; scrapers send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8192;
/// A scraper gets this long to send its request and to read the answer.
const SCRAPE_IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The `/metrics` endpoint: bound by [`Exporter::bind`], serving after [`Exporter::serve`].
#[derive(Debug)]
pub struct Exporter {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Exporter {
    /// Listens on `addr` (host:port; port 0 picks a free one). Do this before anything else
    /// is created, so that a bad address stops start-up cleanly, and before the seccomp
    /// filter, which forbids creating sockets.
    pub fn bind(addr: &str) -> Result<Exporter, MetricsError> {
        let bind_err = |source| MetricsError::Bind {
            addr: addr.to_owned(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        Ok(Exporter { listener, addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `GET /metrics` on a thread of its own, one scrape at a time, for as long as the
    /// process runs.
    pub fn serve(self, metrics: Arc<Metrics>, store: Arc<BlobStore>) -> Result<(), MetricsError> {
        let Exporter { listener, addr } = self;
        thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(s) => {
                            if let Err(e) = scrape(s, &metrics, &store) {
                                debug!("metrics: scrape failed: {e}");
                            }
                        }
                        Err(e) => {
                            warn!("metrics: accept failed: {e}");
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(MetricsError::Spawn)?;
        info!("metrics on http://{addr}/metrics");
        Ok(())
    }
}

/// Reads the request head (bounded in size and time) and answers it.
fn scrape(mut s: TcpStream, metrics: &Metrics, store: &BlobStore) -> io::Result<()> {
    s.set_read_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    s.set_write_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    let deadline = Instant::now() + SCRAPE_IO_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD || Instant::now() > deadline {
            return respond(&mut s, "431 Request Header Fields Too Large", "", false);
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET" | b"HEAD", b"/metrics") => {
            let body = metrics.render(store);
            respond(&mut s, "200 OK", &body, method == b"HEAD")
        }
        (b"GET" | b"HEAD", _) => respond(&mut s, "404 Not Found", "try /metrics\n", false),
        _ => respond(&mut s, "405 Method Not Allowed", "", false),
    }
}

fn respond(s: &mut TcpStream, status: &str, body: &str, head_only: bool) -> io::Result<()> {
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        reply.push_str(body);
    }
    s.write_all(reply.as_bytes())?;
    s.flush()?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    // Let the scraper read the answer before the close (a close with unread input resets).
    let _ = s.read(&mut [0u8; 256]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(25)); // exactly on the first bound
        h.observe(Duration::from_nanos(25_001)); // just above it
        h.observe(Duration::from_secs(5)); // past the last bound
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], (25_000, 1));
        assert_eq!(s.cumulative[1], (50_000, 2));
        assert_eq!(s.cumulative[BOUNDS_NS.len() - 1], (1_000_000_000, 2));
        assert_eq!(s.cumulative[BOUNDS_NS.len()], (u64::MAX, 3));
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_ns, 25_000 + 25_001 + 5_000_000_000);
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0");
        assert_eq!(seconds(25_000), "0.000025");
        assert_eq!(seconds(1_000_000_000), "1");
        assert_eq!(seconds(1_500_000_001), "1.500000001");
    }

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
