//! The HTTP endpoint (`--metrics ADDR`, off by default): `GET /metrics` in the Prometheus text
//! format, `/healthz` and `/readyz`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use prometheus_client::encoding::prometheus_text;
use thiserror::Error;

use super::registry::Metrics;
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
