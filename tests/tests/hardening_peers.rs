//! End-to-end: local peers that connect and hold on, trickle, keep a connection alive without
//! a handshake, flood the log, or send signals, against the real binary (docs/hardening.md,
//! "Peers"). The VMM must always get in, probes must pass, the log must stay small, and
//! nothing a closed connection had may linger.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::wire::{Header, Request, HEADER_SIZE};
use coco_protocol::{CertsRet, Frontend};
use coco_tests::{sidecar_bin, table_of_size, write_blob, GuestMem, Sidecar};

const MIB: u64 = 1 << 20;

fn start(extra: &[&str]) -> (tempfile::TempDir, Vec<u8>, Sidecar) {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 6);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let sidecar = Sidecar::start(&blob, extra);
    (dir, table, sidecar)
}

/// One VMM's start: connect, negotiate, share memory, one certificate request. Its duration.
fn vmm_start(socket: &Path, mem: &GuestMem, table: &[u8]) -> Duration {
    let started = Instant::now();
    let mut vmm = Frontend::connect(socket).expect("the VMM connects and negotiates");
    vmm.set_mem_table(&[mem.region(0)]).expect("memory");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    let took = started.elapsed();
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mem.read(0x1000, table.len()), table);
    vmm.done(r.lease).expect("done");
    took
}

/// A hostile peer: connects, then `behave`s until the sidecar closes the connection, then
/// connects again, until `stop`. Counts its connections.
fn hostile(
    socket: &Path,
    stop: &Arc<AtomicBool>,
    connects: &Arc<AtomicU64>,
    behave: fn(&UnixStream, &AtomicBool),
) -> thread::JoinHandle<()> {
    let (socket, stop, connects) = (socket.to_owned(), Arc::clone(stop), Arc::clone(connects));
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok(s) = UnixStream::connect(&socket) else {
                thread::sleep(Duration::from_millis(10));
                continue;
            };
            connects.fetch_add(1, Ordering::Relaxed);
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            behave(&s, &stop);
        }
    })
}

/// Whether the sidecar closed `s` (waits at most the socket's read timeout).
fn closed(s: &UnixStream) -> bool {
    let mut b = [0u8; 64];
    match (&*s).read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Never sends a byte.
fn idle(s: &UnixStream, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) && !closed(s) {}
}

/// Sends a GET_FEATURES header one byte per second, over and over.
fn trickle(s: &UnixStream, stop: &AtomicBool) {
    let header = Header::request(Request::GetFeatures, 0, false).encode();
    for byte in header.iter().cycle() {
        if stop.load(Ordering::Relaxed) || (&*s).write_all(&[*byte]).is_err() {
            return;
        }
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) || closed(s) {
                return;
            }
        }
    }
}

/// Sends GET_FEATURES every 4 s and reads the reply, never negotiating further.
fn keep_alive(s: &UnixStream, stop: &AtomicBool) {
    let header = Header::request(Request::GetFeatures, 0, false).encode();
    loop {
        if stop.load(Ordering::Relaxed) || (&*s).write_all(&header).is_err() {
            return;
        }
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut reply = [0u8; HEADER_SIZE + 8];
        if (&*s).read_exact(&mut reply).is_err() {
            return;
        }
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let next = Instant::now() + Duration::from_secs(4);
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) || closed(s) {
                return;
            }
        }
    }
}

fn log_bytes(sidecar: &Sidecar) -> usize {
    sidecar.log().len()
}

#[test]
fn idle_trickling_and_keep_alive_peers_never_keep_the_vmm_or_the_probe_out() {
    // At the level a deployment logs at (the harness's default is debug).
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(3000, 6);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    let mut sidecar = Sidecar::start_logging(&blob, &[], "info");
    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicU64::new(0));
    let mut peers = Vec::new();
    for (n, behave) in [
        (16, idle as fn(&UnixStream, &AtomicBool)),
        (20, trickle),
        (16, keep_alive),
    ] {
        for _ in 0..n {
            peers.push(hostile(&sidecar.socket, &stop, &connects, behave));
        }
    }
    // Let them fill every slot first.
    thread::sleep(Duration::from_millis(500));
    let log_before = log_bytes(&sidecar);
    let mem = GuestMem::new(MIB, 0);
    let mut starts = Vec::new();
    let mut probes = Vec::new();
    let attack = Instant::now();
    while attack.elapsed() < Duration::from_secs(8) {
        starts.push(vmm_start(&sidecar.socket, &mem, &table));
        let probe = Instant::now();
        let status = std::process::Command::new(sidecar_bin())
            .args(["health", "--socket"])
            .arg(&sidecar.socket)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("health");
        probes.push(probe.elapsed());
        assert!(status.success(), "the probe failed: {status:?}");
        thread::sleep(Duration::from_millis(300));
    }
    let attack_time = attack.elapsed();
    let log_growth = log_bytes(&sidecar) - log_before;
    stop.store(true, Ordering::Relaxed);
    for p in peers {
        p.join().expect("peer");
    }
    starts.sort();
    probes.sort();
    println!(
        "52 hostile peers ({} connections in {:.1} s): {} VMM starts, median {:?}, max {:?}; \
         {} health probes, max {:?}; log grew {} bytes",
        connects.load(Ordering::Relaxed),
        attack_time.as_secs_f64(),
        starts.len(),
        starts[starts.len() / 2],
        starts[starts.len() - 1],
        probes.len(),
        probes[probes.len() - 1],
        log_growth
    );
    // Functional bounds only: every start and probe succeeded (asserted above), none waited
    // for a hostile peer's timeout, and the log did not flood.
    assert!(starts[starts.len() - 1] < Duration::from_secs(2));
    assert!(log_growth < 512 * 1024, "{log_growth} bytes of log");
    assert!(sidecar.alive());
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .count()
}

fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn a_closed_connection_frees_its_descriptors_and_thread_at_once() {
    let (_dir, table, sidecar) = start(&[]);
    let pid = sidecar.pid();
    // A first request opens what the sidecar keeps for good: the blob's file, its watch.
    vmm_start(&sidecar.socket, &GuestMem::new(MIB, 0), &table);
    eventually(
        "the first connections are gone",
        Duration::from_secs(5),
        // At rest: the accept loop and the blob monitor (daemon/monitor.rs).
        || threads(pid) == 2,
    );
    let (fds0, threads0) = (fd_count(pid), threads(pid));
    let mems: Vec<GuestMem> = (0..8).map(|_| GuestMem::new(MIB, 0)).collect();
    let mut vmm = Frontend::connect(&sidecar.socket).expect("connect");
    let regions: Vec<_> = mems
        .iter()
        .enumerate()
        .map(|(i, m)| m.region(i as u64 * MIB))
        .collect();
    vmm.set_mem_table(&regions).expect("memory");
    let r = vmm
        .request_certs(Abi::SnpReqCerts, 0, 0x1000, 1)
        .expect("request");
    assert_eq!(r.ret, CertsRet::Ok);
    assert_eq!(mems[0].read(0x1000, table.len()), table);
    // Socket, the server's clone of it, 8 region files (the lease shares the blob's file).
    assert!(fd_count(pid) >= fds0 + 10, "{} -> {}", fds0, fd_count(pid));
    drop(vmm);
    // No other connection comes: what the closed one held goes by itself.
    let took = eventually("descriptors freed", Duration::from_secs(2), || {
        fd_count(pid) <= fds0 && threads(pid) == threads0
    });
    println!("freed {took:?} after the close");
    // The VMM's peer credentials at info level (once it shared memory); a probe's connection
    // (the harness's readiness probe, connection 1) only at debug level.
    let log = sidecar.log();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let vmm = format!("a VMM (pid {}, uid {uid}", std::process::id());
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains(&vmm)),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" DEBUG ") && l.contains("connection 1: closed by peer")),
        "{log}"
    );
    assert!(!log
        .lines()
        .any(|l| l.contains(" INFO ") && l.contains("connection 1: ")));
}

#[test]
fn signals_are_handled_deliberately() {
    let (_dir, table, mut sidecar) = start(&[]);
    for sig in [
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPIPE,
        libc::SIGXFSZ,
    ] {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(sidecar.pid() as i32, sig) };
    }
    let mem = GuestMem::new(MIB, 0);
    vmm_start(&sidecar.socket, &mem, &table);
    assert!(sidecar.alive(), "{}", sidecar.log());
    eventually(
        "the ignored signals are logged",
        Duration::from_secs(5),
        || {
            let log = sidecar.log();
            log.contains("SIGHUP ignored: nothing to reload") && log.contains("SIGUSR1 ignored")
        },
    );
    // SIGQUIT stops it in order: exit 0, socket removed.
    let status = sidecar.signal_and_wait(libc::SIGQUIT);
    assert_eq!(status.code(), Some(0), "{status:?}: {}", sidecar.log());
    assert!(!sidecar.socket.exists());
}

#[test]
fn shutdown_leaves_alone_a_socket_path_that_is_no_longer_its_own() {
    let (dir, _table, mut sidecar) = start(&[]);
    // Someone (another sidecar, an operator) put another file at the path.
    let other = dir.path().join("other");
    std::fs::write(&other, b"someone else's").expect("write");
    std::fs::rename(&other, &sidecar.socket).expect("rename over the socket");
    let status = sidecar.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        std::fs::read(&sidecar.socket).expect("still there"),
        b"someone else's"
    );
    assert!(sidecar.log().contains("no longer this sidecar's socket"));
}

#[test]
fn the_socket_path_appears_only_once_it_accepts_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = write_blob(dir.path(), "certs.bin", &table_of_size(3000, 7));
    for round in 0..10 {
        let socket = dir.path().join(format!("s{round}.sock"));
        let mut child = coco_tests::serve_command(&socket, &blob, &[], &dir.path().join("log"))
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "round {round}: no socket");
            assert!(child.try_wait().expect("wait").is_none(), "exited");
            thread::yield_now();
        }
        // The first connect after the path appears is accepted (it used to be ECONNREFUSED
        // now and then: the path existed before listen(2)).
        UnixStream::connect(&socket)
            .unwrap_or_else(|e| panic!("round {round}: connect as soon as the path exists: {e}"));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "{:?}", status.signal());
    }
}

#[test]
fn a_refused_uid_flooding_the_socket_logs_a_bounded_number_of_lines() {
    if !coco_tests::root_or_skip("a_refused_uid_flooding_the_socket_logs_a_bounded_number_of_lines")
    {
        return;
    }
    let (_dir, _table, sidecar) = start(&["--socket-mode", "0666", "--allow-uid", "4242"]);
    std::fs::set_permissions(
        sidecar.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    // A process of uid 65534 connecting as fast as it can for 2 s.
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            coco_tests::health_as_uid(&sidecar.socket, 65534).code(),
            Some(1)
        );
        refused += 1;
    }
    let logged = sidecar
        .log()
        .lines()
        .filter(|l| l.contains("is not allowed (--allow-uid)"))
        .count();
    println!("{refused} refused connections, {logged} lines logged");
    assert!(refused > 25, "only {refused} attempts");
    assert_eq!(logged, coco_sidecar::logging::BURST as usize);
    assert!(sidecar.log().len() < 64 * 1024);
}
