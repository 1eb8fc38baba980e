//! End-to-end: `coco-sidecar serve --metrics` scraped over HTTP, parsed with an independent
//! Prometheus text-format parser (`prometheus-parse`), and checked to move exactly as the
//! requests, leases, blob versions and connections made here should move it.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::transport::{self, send_bytes};
use coco_protocol::wire::{Header, Request};
use coco_protocol::CertsRet;
use coco_tests::{http_get, metrics_addr, table_of_size, write_blob, GuestMem, HeldLock, Sidecar};
use prometheus_parse::{Sample, Scrape, Value};

const RAM: u64 = 1 << 20;

/// Every metric family the sidecar documents, with its type.
const FAMILIES: [(&str, &str); 15] = [
    ("coco_sidecar_build_info", "gauge"),
    ("coco_sidecar_requests_total", "counter"),
    ("coco_sidecar_exits_unanswered_total", "counter"),
    ("coco_sidecar_request_duration_seconds", "histogram"),
    ("coco_sidecar_blob_lock_wait_seconds", "histogram"),
    ("coco_sidecar_blob_reloads_total", "counter"),
    ("coco_sidecar_blob_invalid_total", "counter"),
    ("coco_sidecar_blob_path_checks_total", "counter"),
    ("coco_sidecar_blob_watched", "gauge"),
    ("coco_sidecar_lease_timeouts_total", "counter"),
    ("coco_sidecar_connections_accepted_total", "counter"),
    ("coco_sidecar_connections_refused_total", "counter"),
    ("coco_sidecar_connections_dropped_total", "counter"),
    ("coco_sidecar_leases_held", "gauge"),
    ("coco_sidecar_connections", "gauge"),
];

/// One parsed scrape.
struct Scraped {
    samples: Vec<Sample>,
}

/// Structural checks the lenient parser does not make: every family has HELP then TYPE, every
/// sample belongs to a declared family, histogram buckets ascend, are cumulative, and end in
/// `+Inf` equal to `_count`. Returns the number of sample lines that are not buckets plus the
/// number of histograms, which is how many samples the parser must return.
fn lint(text: &str) -> usize {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut expected = 0;
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().expect("name");
            assert!(helped.insert(name.to_owned()), "HELP twice for {name}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice for {name}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value of {line:?}"));
        assert!(value >= 0.0, "{line}");
        let name = series.split('{').next().expect("name");
        if let Some(base) = name.strip_suffix("_bucket") {
            assert_eq!(types.get(base).map(String::as_str), Some("histogram"));
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("le label");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le value")
            };
            buckets
                .entry(base.to_owned())
                .or_default()
                .push((le, value));
        } else if let Some(base) = name
            .strip_suffix("_count")
            .filter(|b| types.contains_key(*b))
        {
            assert_eq!(types[base], "histogram");
            counts.insert(base.to_owned(), value);
            expected += 1;
        } else if let Some(base) = name.strip_suffix("_sum").filter(|b| types.contains_key(*b)) {
            assert_eq!(types[base], "histogram");
            expected += 1;
        } else {
            assert!(types.contains_key(name), "sample of undeclared {name}");
            expected += 1;
        }
    }
    for (name, kind) in FAMILIES {
        assert_eq!(
            types.get(name).map(String::as_str),
            Some(kind),
            "family {name}"
        );
    }
    for (name, b) in &buckets {
        assert!(b.len() >= 2, "{name}: buckets");
        assert!(
            b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}: ascending, cumulative: {b:?}"
        );
        let last = b.last().expect("buckets");
        assert_eq!(last.0, f64::INFINITY, "{name}: ends in +Inf");
        assert_eq!(Some(&last.1), counts.get(name), "{name}: +Inf == _count");
        expected += 1;
    }
    expected
}

fn scrape(addr: std::net::SocketAddr) -> Scraped {
    let resp = http_get(addr, "/metrics");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        resp.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let expected = lint(&resp.body);
    let parsed =
        Scrape::parse(resp.body.lines().map(|l| Ok(l.to_owned()))).expect("valid text format");
    assert_eq!(
        parsed.samples.len(),
        expected,
        "the parser read every sample:\n{}",
        resp.body
    );
    Scraped {
        samples: parsed.samples,
    }
}

impl Scraped {
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> &Sample {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0]
    }

    /// A counter's or gauge's value.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match &self.find(name, labels).value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name}: not a single value: {other:?}"),
        }
    }

    fn requests(&self, abi: &str, ret: &str) -> f64 {
        self.value("coco_sidecar_requests_total", &[("abi", abi), ("ret", ret)])
    }

    /// Requests of every (abi, ret), for "nothing else moved" checks.
    fn all_requests(&self) -> BTreeMap<(String, String), f64> {
        let mut m = BTreeMap::new();
        for abi in ["coco_rfc", "snp_req_certs"] {
            for ret in ["ok", "eagain", "enospc", "eio"] {
                m.insert((abi.to_owned(), ret.to_owned()), self.requests(abi, ret));
            }
        }
        m
    }

    /// (cumulative count at `le`, _count, _sum) of a histogram.
    fn histogram(&self, name: &str, le: f64) -> (f64, f64, f64) {
        let Value::Histogram(b) = &self.find(name, &[]).value else {
            panic!("{name} is not a histogram");
        };
        let at = b
            .iter()
            .find(|c| c.less_than == le)
            .unwrap_or_else(|| panic!("{name}: no bucket le={le}"))
            .count;
        (
            at,
            self.value(&format!("{name}_count"), &[]),
            self.value(&format!("{name}_sum"), &[]),
        )
    }
}

/// Waits (bounded) until a scrape satisfies `cond`: counters that another thread of the
/// sidecar updates after the client already saw the effect (a closed connection).
fn eventually(addr: std::net::SocketAddr, what: &str, cond: impl Fn(&Scraped) -> bool) -> Scraped {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(addr);
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn with_one(
    mut before: BTreeMap<(String, String), f64>,
    abi: &str,
    ret: &str,
) -> BTreeMap<(String, String), f64> {
    *before
        .get_mut(&(abi.to_owned(), ret.to_owned()))
        .expect("known series") += 1.0;
    before
}

#[test]
fn metrics_move_with_requests_leases_blob_and_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 1));
    let sidecar = Sidecar::start(
        &blob,
        &["--metrics", "127.0.0.1:0", "--lock-wait-ms", "100"],
    );
    let addr = metrics_addr(&sidecar);
    assert!(addr.ip().is_loopback());

    // Start-up: nothing answered, nothing held. The harness's readiness probe may still be
    // counted as a connection for a moment.
    let m0 = eventually(addr, "the readiness probe is gone", |s| {
        s.value("coco_sidecar_connections", &[]) == 0.0
    });
    assert!(m0.all_requests().values().all(|v| *v == 0.0));
    assert_eq!(m0.value("coco_sidecar_leases_held", &[]), 0.0);
    assert_eq!(
        m0.value("coco_sidecar_blob_watched", &[]),
        0.0,
        "not looked at yet"
    );
    assert_eq!(
        m0.value(
            "coco_sidecar_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let accepted0 = m0.value("coco_sidecar_connections_accepted_total", &[]);
    let dropped0 = m0.value("coco_sidecar_connections_dropped_total", &[]);

    // One request of each kind of answer but EAGAIN.
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let ok = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(ok.ret, CertsRet::Ok);
    let probe = vmm
        .request_certs(Abi::CocoRfc, 1, 0x1000, 0)
        .expect("request");
    assert_eq!(probe.ret, CertsRet::NoSpace);
    let outside = vmm
        .request_certs(Abi::SnpReqCerts, 2, 4 * RAM, 1)
        .expect("request");
    assert_eq!(outside.ret, CertsRet::Io);

    let m1 = scrape(addr);
    let want = with_one(
        with_one(
            with_one(m0.all_requests(), "snp_req_certs", "ok"),
            "coco_rfc",
            "enospc",
        ),
        "snp_req_certs",
        "eio",
    );
    assert_eq!(m1.all_requests(), want);
    let (_, n, sum) = m1.histogram("coco_sidecar_request_duration_seconds", f64::INFINITY);
    assert_eq!(n, 3.0, "one latency observation per COCO_EXIT");
    assert!(sum > 0.0);
    // All three reached the blob (the RAM check comes after the lock), none waited.
    let (fast, n, _) = m1.histogram("coco_sidecar_blob_lock_wait_seconds", 0.05);
    assert_eq!((fast, n), (3.0, 3.0));
    assert_eq!(m1.value("coco_sidecar_leases_held", &[]), 1.0);
    assert_eq!(m1.value("coco_sidecar_connections", &[]), 1.0);
    assert_eq!(
        m1.value("coco_sidecar_connections_accepted_total", &[]),
        accepted0 + 1.0
    );
    assert!(m1.value("coco_sidecar_blob_reloads_total", &[]) >= 1.0);
    // Watched from the first request on: the others did not look at the path (unless a
    // second passed, when the cached version is confirmed again).
    assert_eq!(m1.value("coco_sidecar_blob_watched", &[]), 1.0);
    let checks = m1.value("coco_sidecar_blob_path_checks_total", &[]);
    assert!(
        (1.0..3.0).contains(&checks),
        "{checks} path checks for 3 requests"
    );
    assert_eq!(m1.value("coco_sidecar_blob_invalid_total", &[]), 0.0);

    vmm.done(ok.lease).expect("done");
    assert_eq!(
        scrape(addr).value("coco_sidecar_leases_held", &[]),
        0.0,
        "DONE releases the lease"
    );

    // Records returned unanswered (protocol.md 6.2) are counted by status, not as requests.
    let unanswered = |s: &Scraped, status: &str| {
        s.value("coco_sidecar_exits_unanswered_total", &[("status", status)])
    };
    assert_eq!(
        (unanswered(&m1, "enotsup"), unanswered(&m1, "einval")),
        (0.0, 0.0)
    );
    let mut sub_type = coco_protocol::exit::build_request(Abi::CocoRfc, 0x1000, 1);
    sub_type[0] = 1;
    for (tag, record, status) in [
        (9, vec![0u8; 24], libc::ENOTSUP),
        (1, sub_type, libc::ENOTSUP),
        (2, vec![0u8; 32], libc::EINVAL),
    ] {
        let r = vmm.forward_exit(tag, 7, &record).expect("exit");
        assert_eq!(r.status, status as u32);
    }
    let m = scrape(addr);
    assert_eq!(
        (unanswered(&m, "enotsup"), unanswered(&m, "einval")),
        (2.0, 1.0)
    );
    assert_eq!(m.all_requests(), m1.all_requests(), "no request answered");

    // An updater holds the lock past --lock-wait-ms: EAGAIN after a wait of at least 100 ms.
    let updater = HeldLock::take("exclusive", &blob);
    let busy = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(busy.ret, CertsRet::Again);
    updater.release();
    let m2 = scrape(addr);
    assert_eq!(
        m2.all_requests(),
        with_one(m1.all_requests(), "snp_req_certs", "eagain")
    );
    let (fast2, n2, sum2) = m2.histogram("coco_sidecar_blob_lock_wait_seconds", 0.05);
    let (_, _, sum1) = m1.histogram("coco_sidecar_blob_lock_wait_seconds", 0.05);
    assert_eq!((fast2, n2), (3.0, 4.0), "the slow wait is above 50 ms");
    assert!(sum2 - sum1 >= 0.1, "waited {} s", sum2 - sum1);

    // A blob rewritten with garbage: reloaded, refused, EAGAIN.
    let reloads = m2.value("coco_sidecar_blob_reloads_total", &[]);
    std::fs::write(&blob, b"not a certificate table").expect("rewrite");
    let bad = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(bad.ret, CertsRet::Again);
    let m3 = scrape(addr);
    assert_eq!(m3.value("coco_sidecar_blob_invalid_total", &[]), 1.0);
    assert_eq!(
        m3.value("coco_sidecar_blob_reloads_total", &[]),
        reloads + 1.0
    );
    assert_eq!(
        m3.all_requests(),
        with_one(m2.all_requests(), "coco_rfc", "eagain")
    );

    // A frontend breaking the protocol is dropped and counted.
    let rogue = sidecar.connect();
    let h = Header {
        request: Request::CocoGetCaps as u32,
        flags: 2, // version 2
        size: 0,
    };
    send_bytes(rogue.stream(), &h.encode(), &[]).expect("send");
    assert_eq!(transport::drain(rogue.stream()).expect("closed"), 0);
    eventually(addr, "the dropped connection is counted", |s| {
        s.value("coco_sidecar_connections_dropped_total", &[]) == dropped0 + 1.0
            && s.value("coco_sidecar_connections", &[]) == 1.0
    });

    // The last client leaves, holding a lease: no connection, no lease.
    std::fs::write(&blob, table_of_size(3000, 1)).expect("restore");
    let held = vmm
        .request_certs(Abi::SnpReqCerts, 3, 0x1000, 1)
        .expect("request");
    assert_eq!(held.ret, CertsRet::Ok);
    assert_eq!(scrape(addr).value("coco_sidecar_leases_held", &[]), 1.0);
    drop(vmm);
    let end = eventually(addr, "the last connection is gone", |s| {
        s.value("coco_sidecar_connections", &[]) == 0.0
    });
    assert_eq!(end.value("coco_sidecar_leases_held", &[]), 0.0);
    assert_eq!(
        end.value("coco_sidecar_connections_dropped_total", &[]),
        dropped0 + 1.0,
        "a peer that closes is not counted as dropped"
    );

    // Anything but /metrics is not found; the endpoint keeps serving.
    assert_eq!(http_get(addr, "/").status, 404);
    assert_eq!(scrape(addr).value("coco_sidecar_connections", &[]), 0.0);
}

#[test]
fn lease_timeouts_and_refused_connections_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 2));
    let sidecar = Sidecar::start(
        &blob,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--lease-timeout-ms",
            "200",
            "--max-connections",
            "1",
            "--socket-mode",
            "0666",
            "--allow-uid",
            "4242",
        ],
    );
    let addr = metrics_addr(&sidecar);
    eventually(addr, "the readiness probe is gone", |s| {
        s.value("coco_sidecar_connections", &[]) == 0.0
    });
    let refused0 = scrape(addr).value("coco_sidecar_connections_refused_total", &[]);
    let dropped0 = scrape(addr).value("coco_sidecar_connections_dropped_total", &[]);
    let mem = GuestMem::new(RAM, 0);
    let mut vmm = sidecar.connect();
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::CocoRfc, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(scrape(addr).value("coco_sidecar_leases_held", &[]), 1.0);
    let m = eventually(addr, "the lease times out", |s| {
        s.value("coco_sidecar_leases_held", &[]) == 0.0
    });
    assert_eq!(m.value("coco_sidecar_lease_timeouts_total", &[]), 1.0);

    // All slots taken (the VMM with memory, 4 spare): a fifth silent peer takes the slot of
    // the oldest, which the sidecar closes and counts as dropped.
    let silent: Vec<_> = (0..5)
        .map(|_| {
            let s = sidecar.raw();
            thread::sleep(Duration::from_millis(20));
            s
        })
        .collect();
    silent[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(transport::drain(&silent[0]).expect("closed"), 0);
    let m = eventually(addr, "the displaced connection is counted", |s| {
        s.value("coco_sidecar_connections_dropped_total", &[]) == dropped0 + 1.0
    });
    assert_eq!(m.value("coco_sidecar_connections", &[]), 5.0);
    assert_eq!(
        m.value("coco_sidecar_connections_refused_total", &[]),
        refused0
    );

    // A uid outside --allow-uid is closed at once and counted (needs root to be another uid).
    if !coco_tests::root_or_skip("lease_timeouts_and_refused_connections_are_counted") {
        return;
    }
    std::fs::set_permissions(
        sidecar.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let status = coco_tests::health_as_uid(&sidecar.socket, 65534);
    assert_eq!(status.code(), Some(1), "refused");
    eventually(addr, "the refusal is counted", |s| {
        s.value("coco_sidecar_connections_refused_total", &[]) == refused0 + 1.0
    });
    assert!(sidecar.log().contains("uid 65534"), "{}", sidecar.log());
}

/// TCP ports on which process `pid` listens, as the kernel lists them: its socket descriptors
/// (`/proc/PID/fd`) matched by inode with the LISTEN (`0A`) rows of its network namespace's
/// `/proc/PID/net/tcp` and `tcp6`.
fn listening_tcp_ports(pid: u32) -> Vec<u16> {
    let sockets: BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd list")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            let t = t.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
        for row in text.lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && sockets.contains(f[9]) {
                let port = f[1].rsplit(':').next().expect("address:port");
                ports.push(u16::from_str_radix(port, 16).expect("hex port"));
            }
        }
    }
    ports
}

/// Without `--metrics` the sidecar listens on no TCP port at all; with it, on exactly the one
/// it logs (which shows that the kernel's tables are read right).
#[test]
fn no_endpoint_without_the_option() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 3));
    let with = Sidecar::start(&blob, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&with);
    assert_eq!(listening_tcp_ports(with.pid()), [addr.port()]);
    let without = Sidecar::start(&blob, &[]);
    let _ = without.connect();
    assert_eq!(listening_tcp_ports(without.pid()), Vec::<u16>::new());
    assert!(
        !without.log().contains("metrics on"),
        "metrics are off by default:\n{}",
        without.log()
    );
}

#[test]
fn an_unusable_metrics_address_stops_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 5));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    for (addr, why) in [(taken.as_str(), "in use"), ("not-an-address", "invalid")] {
        let out = std::process::Command::new(coco_tests::sidecar_bin())
            .arg("serve")
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--certs")
            .arg(&blob)
            .args(["--metrics", addr])
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{why}: {stderr}");
        assert!(
            stderr.contains(&format!("--metrics {addr}: cannot listen")),
            "{why}: {stderr}"
        );
        assert!(
            !dir.path().join("s.sock").exists(),
            "{why}: no socket left behind"
        );
    }
}

#[test]
fn silent_peers_delay_a_scrape_little_and_healthz_and_readyz_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 6));
    let sidecar = Sidecar::start(&blob, &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&sidecar);
    let timed = |path: &str| {
        let started = Instant::now();
        let resp = http_get(addr, path);
        (resp, started.elapsed())
    };
    let (alone, quiet) = timed("/metrics");
    assert_eq!(alone.status, 200);
    // Peers that connect and send nothing: each scrape has its own thread, and each peer is
    // dropped after 1 s. The old endpoint served one scrape at a time and gave each peer 2 s.
    let mut figures = Vec::new();
    for silent_peers in [10, 20] {
        let peers: Vec<_> = (0..silent_peers)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        thread::sleep(Duration::from_millis(50));
        let (resp, took) = timed("/metrics");
        assert_eq!(resp.status, 200);
        figures.push((silent_peers, took));
        drop(peers);
    }
    println!("scrape alone {quiet:?}; with silent peers {figures:?}");
    // Functional bounds: 10 silent peers get no scrape in line behind them; 20, more than the
    // 16 served at once, hold one back for at most one peer timeout.
    assert!(figures[0].1 < Duration::from_millis(900), "{figures:?}");
    assert!(figures[1].1 < Duration::from_secs(3), "{figures:?}");

    let healthz = http_get(addr, "/healthz");
    assert_eq!((healthz.status, healthz.body.as_str()), (200, "serving\n"));
    let ready = http_get(addr, "/readyz");
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.body, "ready: blob valid: 3 entries, 3000 bytes\n");
    // An updater holding the exclusive lock past --lock-wait-ms: not ready (guests would get
    // EAGAIN), though alive.
    let lock = HeldLock::take("exclusive", &blob);
    let busy = http_get(addr, "/readyz");
    assert_eq!(busy.status, 503, "{busy:?}");
    assert!(
        busy.body.starts_with("not ready: blob not servable now"),
        "{busy:?}"
    );
    assert_eq!(http_get(addr, "/healthz").status, 200);
    lock.release();
    std::fs::write(&blob, b"not a table").expect("corrupt");
    assert_eq!(http_get(addr, "/readyz").status, 503);
    std::fs::remove_file(&blob).expect("rm");
    let absent = http_get(addr, "/readyz");
    assert_eq!(
        (absent.status, absent.body.as_str()),
        (200, "ready: blob absent: the empty table is served\n")
    );
}
