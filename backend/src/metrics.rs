//! Prometheus metrics: counters and histograms kept in atomics on the serving path, rendered in
//! the Prometheus text exposition format (version 0.0.4) by a small HTTP endpoint
//! (`--metrics ADDR`, off by default), which also answers `/healthz` and `/readyz`.
//!
//! `prometheus-client` provides the registry and the text encoding; the values come from
//! fixed arrays of atomics, so that the request path costs relaxed atomic adds and nothing
//! else (the crate's own histogram takes a lock per observation, its labelled families a map
//! lookup per increment). The end-to-end test parses the output with an independent parser
//! (`prometheus-parse`).
//!
//! docs/metrics.md lists every metric and what to alert on.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::{self, Abi, CertsRet};
use coco_protocol::wire::ExitMsg;
use log::{debug, info, warn};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use thiserror::Error;

use crate::blob::BlobStore;
use crate::config::MissingCerts;
use crate::health;

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

    /// The blob was judged ([`crate::monitor`]): `valid` when servable and `blob check` finds
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

/// Longest request head the endpoint reads; scrapers send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8192;
/// A scraper gets this long to send its request, and again to read the answer.
const SCRAPE_IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Scrapes served at once, each on a thread of its own. With all of them busy (peers that
/// connect and send nothing), the next waits in the listen queue for the first to time out.
const MAX_SCRAPES: usize = 16;

/// What `/readyz` checks: the blob, as `serve` would serve it (health::blob_ready).
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The blob's path.
    pub certs: PathBuf,
    /// The sidecar's `--lock-wait-ms`.
    pub lock_wait: Duration,
    /// The sidecar's `--missing-certs`.
    pub missing: MissingCerts,
}

/// The `/metrics` endpoint: bound by [`Exporter::bind`], serving after [`Exporter::serve`].
///
/// Hand-written rather than a crate's: `tiny_http` (0.12) sets no read timeout and starts a
/// thread per connection without a bound, so silent peers would hold threads for ever, and
/// `hyper` needs an async runtime whose epoll and eventfd calls the seccomp filter would have
/// to allow. A GET of one path needs a request line, a timeout and a bound on threads.
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

    /// Serves `GET /metrics`, `/healthz` and `/readyz` for as long as the process runs: each
    /// scrape on a thread of its own, at most 16 at once (`MAX_SCRAPES`), each bounded by
    /// 1 s (`SCRAPE_IO_TIMEOUT`) for its request and again for its answer.
    pub fn serve(
        self,
        metrics: Arc<Metrics>,
        store: Arc<BlobStore>,
        readiness: Readiness,
    ) -> Result<(), MetricsError> {
        let Exporter { listener, addr } = self;
        let busy = Arc::new((Mutex::new(0usize), Condvar::new()));
        let readiness = Arc::new(readiness);
        thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let s = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            warn!("metrics: accept failed: {e}");
                            thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    {
                        let (count, freed) = &*busy;
                        let mut n = count.lock().unwrap_or_else(PoisonError::into_inner);
                        while *n >= MAX_SCRAPES {
                            n = freed.wait(n).unwrap_or_else(PoisonError::into_inner);
                        }
                        *n += 1;
                    }
                    let (metrics, store, readiness, done) = (
                        Arc::clone(&metrics),
                        Arc::clone(&store),
                        Arc::clone(&readiness),
                        Arc::clone(&busy),
                    );
                    let spawned = thread::Builder::new().name("scrape".into()).spawn(move || {
                        if let Err(e) = scrape(s, &metrics, &store, &readiness) {
                            debug!("metrics: scrape failed: {e}");
                        }
                        let (count, freed) = &*done;
                        *count.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                        freed.notify_one();
                    });
                    if let Err(e) = spawned {
                        warn!("metrics: cannot start a scrape thread: {e}");
                        *busy.0.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                    }
                }
            })
            .map_err(MetricsError::Spawn)?;
        info!("metrics on http://{addr}/metrics");
        Ok(())
    }
}

/// Header fields a request may have; scrapers send a handful.
const MAX_HEADERS: usize = 32;

/// Reads the request head (bounded in size and time), parses it with `httparse` and answers.
fn scrape(
    mut s: TcpStream,
    metrics: &Arc<Metrics>,
    store: &Arc<BlobStore>,
    readiness: &Readiness,
) -> io::Result<()> {
    s.set_write_timeout(Some(SCRAPE_IO_TIMEOUT))?;
    let deadline = Instant::now() + SCRAPE_IO_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let (method, path) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                let method = request.method.unwrap_or_default().to_owned();
                let target = request.path.unwrap_or_default();
                let path = target.split('?').next().unwrap_or_default().to_owned();
                break (method, path);
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return respond(&mut s, "400 Bad Request", "", false),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if head.len() > MAX_REQUEST_HEAD || left.is_zero() {
            return respond(&mut s, "431 Request Header Fields Too Large", "", false);
        }
        // A peer sending a byte now and then gets the time that is left, not a fresh timeout.
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut s, "405 Method Not Allowed", "", false);
    }
    match path.as_str() {
        "/metrics" => respond(&mut s, "200 OK", &metrics.render(store), head_only),
        "/healthz" if metrics.serving() => respond(&mut s, "200 OK", "serving\n", head_only),
        "/healthz" => respond(
            &mut s,
            "503 Service Unavailable",
            "not serving\n",
            head_only,
        ),
        "/readyz" => {
            match health::blob_ready(&readiness.certs, readiness.lock_wait, readiness.missing) {
                Ok(state) => respond(&mut s, "200 OK", &format!("ready: {state}\n"), head_only),
                Err(e) => respond(
                    &mut s,
                    "503 Service Unavailable",
                    &format!("not ready: {e}\n"),
                    head_only,
                ),
            }
        }
        _ => respond(
            &mut s,
            "404 Not Found",
            "try /metrics, /healthz or /readyz\n",
            false,
        ),
    }
}

fn respond(s: &mut TcpStream, status: &str, body: &str, head_only: bool) -> io::Result<()> {
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        prometheus_text::CONTENT_TYPE,
        body.len()
    );
    if !head_only {
        reply.push_str(body);
    }
    s.set_read_timeout(Some(SCRAPE_IO_TIMEOUT))?;
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
