//! Serving benchmark for issue 4 (see docs/performance.md for method and results).
//!
//! ```sh
//! cargo bench -p coco-sidecar --bench serving               # everything, ~3 minutes
//! cargo bench -p coco-sidecar --bench serving -- --quick    # 10x fewer requests, for a smoke run
//! ```
//!
//! Options (after `--`): `--requests N` (per series, default 100000), `--rounds R` (default
//! 10), `--placement pinned|free|split|both|all` (default all), `--done sync|async|none`
//! (default sync), `--skip-latency`, `--skip-memory`, `--quick`; to profile one path:
//! `--only floor|in-process|sidecar`, `--conns 1|8`. `COCO_SIDECAR_BIN=PATH` measures another
//! build of the sidecar (for before/after comparisons).
//!
//! Three ways of answering the same certificate request, measured in one run, interleaved in
//! rounds so that background load hits all of them alike:
//! - **sidecar**: the real `coco-sidecar serve` (the release build cargo made for this bench)
//!   over its real socket; the client sends a COCO_EXIT for a 4-page buffer, the sidecar writes
//!   the 5000-byte table into a sealed memfd and replies; timed from before the send to after
//!   the whole reply arrived. Then COCO_DONE with NEED_REPLY, as the QEMU series sends it once
//!   the request reached firmware; its round trip is reported in its own column.
//! - **floor**: a second process that answers the same message sizes (60-byte request,
//!   60-byte reply, 20-byte DONE and its 20-byte ack) over a Unix socket and does nothing else.
//! - **in-process**: what a VMM does without a sidecar (the unmerged QEMU RFC): open the blob,
//!   take the shared OFD lock, fstat, read the whole file into the mapped guest buffer, close.
//!
//! Each runs with 1 connection (or thread) and with 8 concurrent ones: with every process
//! pinned to CPU 0, free to use all CPUs, and split (clients on CPU 0, servers on CPU 1).
//! Then memory (VmRSS idle, after 100,000 requests, with 64 connections), idle CPU, start-up
//! time (exec to accepting) and binary size.
//! Nothing here asserts a time: it measures and prints.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::{self, Abi};
use coco_protocol::table::{CertKind, Table};
use coco_protocol::wire::{ExitMsg, Header, Request, HEADER_SIZE};
use coco_protocol::{Frontend, MemoryRegion};

/// The release sidecar cargo built for this bench; `COCO_SIDECAR_BIN` measures another build.
fn sidecar_bin() -> PathBuf {
    std::env::var_os("COCO_SIDECAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_coco-sidecar")))
}
/// Size of the served table: an ARK, an ASK and a VCEK of about AMD's sizes.
const TABLE_BYTES: usize = 5000;
/// The buffer a Linux guest offers: 4 pages.
const NPAGES: u64 = 4;
const GPA: u64 = 0x1000;
const RAM: u64 = 64 * 1024;
const EXIT_LEN: usize = HEADER_SIZE + 24 + 24;
const DONE_LEN: usize = HEADER_SIZE + 8;
const CONCURRENT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Every process and thread on CPU 0.
    Pinned,
    /// Wherever the scheduler puts them.
    Free,
    /// Clients (and the in-process path) on CPU 0, the sidecar and the floor server on CPU 1:
    /// every round trip crosses CPUs.
    Split,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DoneMode {
    /// COCO_DONE with NEED_REPLY after each reply, waiting for the ack (timed separately), as
    /// the QEMU series sends it: the sidecar has released the lease before the next request.
    Sync,
    /// COCO_DONE without NEED_REPLY after each reply (untimed): the sidecar handles it while
    /// the next request is already on its way.
    Async,
    /// No COCO_DONE: the vCPU's next request releases its lease.
    None,
}

#[derive(Debug, Clone)]
struct Opts {
    requests: usize,
    rounds: usize,
    placements: Vec<Placement>,
    done: DoneMode,
    latency: bool,
    memory: bool,
    /// Only these kinds (for profiling one of them).
    only: Option<Kind>,
    /// Only this concurrency.
    conns: Option<usize>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        requests: 100_000,
        rounds: 10,
        placements: vec![Placement::Pinned, Placement::Free, Placement::Split],
        done: DoneMode::Sync,
        latency: true,
        memory: true,
        only: None,
        conns: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--bench" => {}
            "--quick" => o.requests = 10_000,
            "--requests" => o.requests = value("--requests").parse().expect("--requests N"),
            "--rounds" => o.rounds = value("--rounds").parse().expect("--rounds R"),
            "--placement" => {
                o.placements = match value("--placement").as_str() {
                    "pinned" => vec![Placement::Pinned],
                    "free" => vec![Placement::Free],
                    "split" => vec![Placement::Split],
                    "both" => vec![Placement::Pinned, Placement::Free],
                    "all" => vec![Placement::Pinned, Placement::Free, Placement::Split],
                    other => panic!("--placement {other}: pinned, free, split, both or all"),
                }
            }
            "--done" => {
                o.done = match value("--done").as_str() {
                    "sync" => DoneMode::Sync,
                    "async" => DoneMode::Async,
                    "none" => DoneMode::None,
                    other => panic!("--done {other}: sync, async or none"),
                }
            }
            "--skip-latency" => o.latency = false,
            "--only" => {
                o.only = Some(match value("--only").as_str() {
                    "floor" => Kind::Floor,
                    "in-process" => Kind::InProcess,
                    "sidecar" => Kind::Sidecar,
                    other => panic!("--only {other}: floor, in-process or sidecar"),
                })
            }
            "--conns" => o.conns = Some(value("--conns").parse().expect("--conns N")),
            "--skip-memory" => o.memory = false,
            other => panic!("unknown option {other}"),
        }
    }
    o
}

// ---------------------------------------------------------------------------------------------
// Fixtures.

fn der(len: usize, fill: u8) -> Vec<u8> {
    let content = len - 4;
    let mut v = vec![0x30, 0x82, (content >> 8) as u8, content as u8];
    v.resize(len, fill);
    v
}

/// A valid 5000-byte table: ARK, ASK and VCEK entries of synthetic DER.
fn table(fill: u8) -> Vec<u8> {
    let data = TABLE_BYTES - 4 * 24;
    let (a, b) = (data / 3, data / 3);
    let certs = [
        (CertKind::Ark.guid(), der(a, fill)),
        (CertKind::Ask.guid(), der(b, fill.wrapping_add(1))),
        (
            CertKind::Vcek.guid(),
            der(data - a - b, fill.wrapping_add(2)),
        ),
    ];
    let refs: Vec<_> = certs.iter().map(|(g, d)| (*g, d.as_slice())).collect();
    let t = Table::build(&refs).expect("valid table").into_bytes();
    assert_eq!(t.len(), TABLE_BYTES);
    t
}

/// Guest RAM: a shrink-sealed memfd, mapped shared into this process too.
struct GuestMem {
    memfd: memfd::Memfd,
    map: *mut u8,
}

// SAFETY: the mapping is plain shared memory that lives as long as the GuestMem; threads only
// write disjoint or racy-but-harmless bytes into it (the benchmark never reads them back while
// others write).
unsafe impl Send for GuestMem {}
// SAFETY: as above.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    fn new() -> GuestMem {
        let memfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("guest")
            .expect("memfd");
        memfd.as_file().set_len(RAM).expect("size");
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])
            .expect("seal");
        // SAFETY: a fresh shared mapping of a file of RAM bytes; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_file().as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap guest memory");
        GuestMem {
            memfd,
            map: map.cast(),
        }
    }

    fn region(&self) -> MemoryRegion<'_> {
        use std::os::fd::AsFd;
        MemoryRegion {
            guest_phys_addr: 0,
            size: RAM,
            mmap_offset: 0,
            userspace_addr: self.map as u64,
            fd: self.memfd.as_file().as_fd(),
        }
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= RAM as usize);
        // SAFETY: the range lies inside the live mapping.
        unsafe { std::slice::from_raw_parts(self.map.add(gpa as usize), len).to_vec() }
    }

    fn clear(&self) {
        // SAFETY: the whole mapping is writable and ours.
        unsafe { std::ptr::write_bytes(self.map, 0xa5, RAM as usize) };
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new(); nothing uses it afterwards.
        unsafe { libc::munmap(self.map.cast(), RAM as usize) };
    }
}

// ---------------------------------------------------------------------------------------------
// CPU placement and processes.

fn set_affinity(cpus: &[usize]) {
    // SAFETY: cpu_set_t is a plain bitmask for which all-zero bytes are valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: CPU_SET writes one bit of the set we own; cpu < CPU_SETSIZE.
        unsafe { libc::CPU_SET(*cpu, &mut set) };
    }
    // SAFETY: sched_setaffinity reads the set we pass for the calling thread only.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(rc, 0, "sched_setaffinity: {}", io::Error::last_os_error());
}

fn online_cpus() -> Vec<usize> {
    (0..thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// Sets the calling thread's CPUs; threads and processes it starts afterwards inherit them.
fn place(p: Placement) {
    match p {
        Placement::Pinned | Placement::Split => set_affinity(&[0]),
        Placement::Free => set_affinity(&online_cpus()),
    }
}

/// Runs `f` (which starts server processes) with the CPUs their side gets under `p`.
fn with_server_cpus<T>(p: Placement, f: impl FnOnce() -> T) -> T {
    let cpus = online_cpus();
    if p != Placement::Split || cpus.len() < 2 {
        return f();
    }
    set_affinity(&[1]);
    let t = f();
    place(p);
    t
}

/// A child process killed (by its own pid) when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_accepting(socket: &Path, child: &mut Child) -> Duration {
    let start = Instant::now();
    loop {
        if UnixStream::connect(socket).is_ok() {
            return start.elapsed();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{} exited with {status} before accepting", socket.display());
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not accepting");
        thread::sleep(Duration::from_micros(50));
    }
}

/// `coco-sidecar serve` on `socket` for `blob`, logging at info, no stdin or stdout.
fn serve_command(socket: &Path, blob: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(sidecar_bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--certs")
        .arg(blob)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

fn start_sidecar(dir: &Path, name: &str, blob: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let mut child = serve_command(&socket, blob, extra)
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log"))
        .spawn()
        .expect("spawn coco-sidecar");
    wait_accepting(&socket, &mut child);
    (Proc { child }, socket)
}

fn start_floor(dir: &Path, name: &str, done: DoneMode) -> (Proc, PathBuf) {
    let socket = dir.join(format!("{name}.sock"));
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .arg("--floor-server")
        .arg(&socket)
        .arg(format!("{done:?}"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn floor server");
    wait_accepting(&socket, &mut child);
    (Proc { child }, socket)
}

// ---------------------------------------------------------------------------------------------
// The floor: a second process answering the same message sizes with no work.

fn canned_reply() -> [u8; EXIT_LEN] {
    let record = exit::build_request(Abi::SnpReqCerts, GPA, NPAGES);
    let payload = ExitMsg {
        abi: Abi::SnpReqCerts.tag(),
        vcpu: 0,
        status: 0,
        lease: 1,
        record,
    }
    .encode();
    let mut b = [0u8; EXIT_LEN];
    b[..HEADER_SIZE].copy_from_slice(&Header::reply(Request::CocoExit, payload.len()).encode());
    b[HEADER_SIZE..].copy_from_slice(&payload);
    b
}

fn canned_ack() -> [u8; DONE_LEN] {
    let mut b = [0u8; DONE_LEN];
    b[..HEADER_SIZE].copy_from_slice(&Header::reply(Request::CocoDone, 8).encode());
    b
}

fn floor_server(socket: &Path, done: DoneMode) -> ! {
    let listener = UnixListener::bind(socket).expect("bind floor socket");
    loop {
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        thread::spawn(move || {
            let reply = canned_reply();
            let ack = canned_ack();
            let mut exit = [0u8; EXIT_LEN];
            let mut done_msg = [0u8; DONE_LEN];
            // The client sends EXIT, and after each reply DONE (acked in sync mode) then EXIT.
            if s.read_exact(&mut exit).is_err() {
                return;
            }
            loop {
                if s.write_all(&reply).is_err() {
                    return;
                }
                if done != DoneMode::None && s.read_exact(&mut done_msg).is_err() {
                    return;
                }
                if done == DoneMode::Sync && s.write_all(&ack).is_err() {
                    return;
                }
                if s.read_exact(&mut exit).is_err() {
                    return;
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// One connection's timed loop, the same code for the sidecar and the floor: write the 60-byte
/// COCO_EXIT, read the 60-byte reply, record the time; then the untimed DONE.
struct Conn {
    stream: UnixStream,
    request: [u8; EXIT_LEN],
    done: DoneMode,
    /// Kept alive (and mapped by the sidecar) for sidecar connections.
    _frontend: Option<Frontend>,
}

fn exit_request(vcpu: u32) -> [u8; EXIT_LEN] {
    let payload = ExitMsg {
        abi: Abi::SnpReqCerts.tag(),
        vcpu,
        status: 0,
        lease: 0,
        record: exit::build_request(Abi::SnpReqCerts, GPA, NPAGES),
    }
    .encode();
    let mut b = [0u8; EXIT_LEN];
    b[..HEADER_SIZE]
        .copy_from_slice(&Header::request(Request::CocoExit, payload.len(), false).encode());
    b[HEADER_SIZE..].copy_from_slice(&payload);
    b
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: u64,
    again: u64,
}

impl Conn {
    fn sidecar(socket: &Path, mem: &GuestMem, vcpu: u32, done: DoneMode) -> Conn {
        let mut f = Frontend::connect(socket).expect("connect to the sidecar");
        f.set_mem_table(&[mem.region()]).expect("memory table");
        let stream = f.stream().try_clone().expect("clone stream");
        Conn {
            stream,
            request: exit_request(vcpu),
            done,
            _frontend: Some(f),
        }
    }

    fn floor(socket: &Path, vcpu: u32, done: DoneMode) -> Conn {
        Conn {
            stream: UnixStream::connect(socket).expect("connect to the floor"),
            request: exit_request(vcpu),
            done,
            _frontend: None,
        }
    }

    /// `n` requests: the COCO_EXIT round trips go to `out`, the acknowledged COCO_DONE round
    /// trips (sync mode) to `done_out`.
    fn run(&mut self, n: usize, out: &mut Vec<u64>, done_out: &mut Vec<u64>) -> Tally {
        let mut reply = [0u8; EXIT_LEN];
        let mut ack = [0u8; DONE_LEN];
        let mut done = [0u8; DONE_LEN];
        let need_reply = self.done == DoneMode::Sync;
        done[..HEADER_SIZE]
            .copy_from_slice(&Header::request(Request::CocoDone, 8, need_reply).encode());
        let mut tally = Tally::default();
        let mut s = &self.stream;
        for _ in 0..n {
            let t0 = Instant::now();
            s.write_all(&self.request).expect("send COCO_EXIT");
            s.read_exact(&mut reply).expect("read the reply");
            out.push(t0.elapsed().as_nanos() as u64);
            let ret = u64::from_le_bytes(reply[52..60].try_into().expect("8 bytes"));
            match ret {
                0 => tally.ok += 1,
                11 => tally.again += 1,
                other => panic!("ret {other}"),
            }
            let lease = u64::from_le_bytes(reply[28..36].try_into().expect("8 bytes"));
            if self.done != DoneMode::None && lease != 0 {
                done[HEADER_SIZE..].copy_from_slice(&lease.to_le_bytes());
                let t1 = Instant::now();
                s.write_all(&done).expect("send COCO_DONE");
                if need_reply {
                    s.read_exact(&mut ack).expect("read the ack");
                    done_out.push(t1.elapsed().as_nanos() as u64);
                    assert_eq!(ack[HEADER_SIZE..], [0; 8], "DONE acknowledged");
                }
            }
        }
        tally
    }
}

/// The in-process path of a VMM without a sidecar, as the unmerged QEMU RFC does it.
struct InProcess {
    path: CString,
}

impl InProcess {
    fn run(&self, mem: &GuestMem, n: usize, out: &mut Vec<u64>) -> Tally {
        let mut tally = Tally::default();
        let buf_len = (NPAGES * 4096) as usize;
        for _ in 0..n {
            let t0 = Instant::now();
            let ok = self.once(mem, buf_len);
            out.push(t0.elapsed().as_nanos() as u64);
            if ok {
                tally.ok += 1;
            } else {
                tally.again += 1;
            }
        }
        tally
    }

    fn once(&self, mem: &GuestMem, buf_len: usize) -> bool {
        // SAFETY: plain syscalls on a NUL-terminated path and on the fd they return; the read
        // lands inside the guest mapping (GPA + buf_len <= RAM, and only st_size <= buf_len
        // bytes are read); every fd opened is closed.
        unsafe {
            let fd = libc::open(self.path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return false;
            }
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_RDLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            let mut ok = libc::fcntl(fd, libc::F_OFD_SETLK, &fl) == 0;
            let mut st: libc::stat = std::mem::zeroed();
            ok = ok && libc::fstat(fd, &mut st) == 0 && (st.st_size as usize) <= buf_len;
            if ok {
                let len = st.st_size as usize;
                let dst = mem.map.add(GPA as usize);
                ok = libc::pread(fd, dst.cast(), len, 0) == len as isize;
            }
            libc::close(fd);
            ok
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.

#[derive(Debug, Clone, Copy)]
struct Summary {
    n: usize,
    p50: u64,
    p99: u64,
    p999: u64,
    mean: u64,
}

fn summarize(v: &mut [u64]) -> Summary {
    v.sort_unstable();
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Summary {
        n: v.len(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        mean: v.iter().sum::<u64>() / v.len().max(1) as u64,
    }
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Latency runs.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Floor,
    InProcess,
    Sidecar,
}

const KINDS: [Kind; 3] = [Kind::Floor, Kind::InProcess, Kind::Sidecar];

/// Timed samples of one series: COCO_EXIT round trips, and acknowledged COCO_DONE round trips.
#[derive(Default)]
struct Samples {
    exit: Vec<u64>,
    done: Vec<u64>,
}

/// The connections (or in-process threads) of one kind at one concurrency.
enum Setup {
    Conns(Vec<Conn>),
    InProcess(usize),
}

fn run_chunk(
    setup: &mut Setup,
    inproc: &Arc<InProcess>,
    mem: &Arc<GuestMem>,
    per_conn: usize,
    samples: &mut Samples,
) -> Tally {
    match setup {
        Setup::Conns(conns) if conns.len() == 1 => {
            conns[0].run(per_conn, &mut samples.exit, &mut samples.done)
        }
        Setup::Conns(conns) => {
            let barrier = Barrier::new(conns.len());
            let results: Vec<(Samples, Tally)> = thread::scope(|s| {
                let handles: Vec<_> = conns
                    .iter_mut()
                    .map(|c| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            let mut v = Samples {
                                exit: Vec::with_capacity(per_conn),
                                done: Vec::with_capacity(per_conn),
                            };
                            barrier.wait();
                            let t = c.run(per_conn, &mut v.exit, &mut v.done);
                            (v, t)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("client thread"))
                    .collect()
            });
            merge(results, samples)
        }
        Setup::InProcess(1) => inproc.run(mem, per_conn, &mut samples.exit),
        Setup::InProcess(threads) => {
            let barrier = Barrier::new(*threads);
            let results: Vec<(Samples, Tally)> = thread::scope(|s| {
                let handles: Vec<_> = (0..*threads)
                    .map(|_| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            let mut v = Samples {
                                exit: Vec::with_capacity(per_conn),
                                done: Vec::new(),
                            };
                            barrier.wait();
                            let t = inproc.run(mem, per_conn, &mut v.exit);
                            (v, t)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("in-process thread"))
                    .collect()
            });
            merge(results, samples)
        }
    }
}

fn merge(results: Vec<(Samples, Tally)>, samples: &mut Samples) -> Tally {
    let mut tally = Tally::default();
    for (v, t) in results {
        samples.exit.extend_from_slice(&v.exit);
        samples.done.extend_from_slice(&v.done);
        tally.ok += t.ok;
        tally.again += t.again;
    }
    tally
}

struct Row {
    placement: Placement,
    conns: usize,
    kind: Kind,
    summary: Summary,
    /// Acknowledged COCO_DONE round trips (sync mode), if any.
    done: Option<Summary>,
    tally: Tally,
    wall: Duration,
    /// CPU time the server process (sidecar or floor) used per request, EXIT and DONE.
    server_cpu: Option<Duration>,
}

fn latency(opts: &Opts, dir: &Path, blob: &Path, expected: &[u8]) -> Vec<Row> {
    let mut rows = Vec::new();
    let inproc = Arc::new(InProcess {
        path: CString::new(blob.as_os_str().as_bytes()).expect("path"),
    });
    for &placement in &opts.placements {
        place(placement);
        let tag = format!("{placement:?}").to_lowercase();
        let ((sidecar, sidecar_sock), (floor, floor_sock)) = with_server_cpus(placement, || {
            (
                start_sidecar(dir, &format!("lat-{tag}"), blob, &[]),
                start_floor(dir, &format!("floor-{tag}"), opts.done),
            )
        });
        for conns in [1, CONCURRENT] {
            if opts.conns.is_some_and(|c| c != conns) {
                continue;
            }
            let mem = Arc::new(GuestMem::new());
            let mut setups: Vec<(Kind, Setup)> = KINDS
                .iter()
                .filter(|k| opts.only.is_none_or(|o| o == **k))
                .map(|k| {
                    let s = match k {
                        Kind::Floor => Setup::Conns(
                            (0..conns)
                                .map(|i| Conn::floor(&floor_sock, i as u32, opts.done))
                                .collect(),
                        ),
                        Kind::Sidecar => Setup::Conns(
                            (0..conns)
                                .map(|i| Conn::sidecar(&sidecar_sock, &mem, i as u32, opts.done))
                                .collect(),
                        ),
                        Kind::InProcess => Setup::InProcess(conns),
                    };
                    (*k, s)
                })
                .collect();
            // Check once that the sidecar serves the table byte for byte.
            mem.clear();
            if let Some((_, Setup::Conns(c))) = setups.iter_mut().find(|(k, _)| *k == Kind::Sidecar)
            {
                let t = c[0].run(1, &mut Vec::new(), &mut Vec::new());
                assert_eq!(t.ok, 1, "the sidecar answered");
                assert_eq!(
                    mem.read(GPA, expected.len()),
                    expected,
                    "table byte for byte"
                );
            }
            let per_conn = (opts.requests / opts.rounds).div_ceil(conns);
            let mut samples: Vec<Samples> = setups.iter().map(|_| Samples::default()).collect();
            let mut tallies = vec![Tally::default(); setups.len()];
            let mut walls = vec![Duration::ZERO; setups.len()];
            let mut ticks = vec![0u64; setups.len()];
            let server = |k: Kind| match k {
                Kind::Floor => Some(floor.pid()),
                Kind::Sidecar => Some(sidecar.pid()),
                Kind::InProcess => None,
            };
            // Warm-up, then rounds interleaving the three kinds.
            for (_, setup) in setups.iter_mut() {
                run_chunk(setup, &inproc, &mem, 2000 / conns, &mut Samples::default());
            }
            for _ in 0..opts.rounds {
                for (i, (kind, setup)) in setups.iter_mut().enumerate() {
                    let pid = server(*kind);
                    let t0 = pid.map_or(0, cpu_ticks);
                    let t = Instant::now();
                    let tally = run_chunk(setup, &inproc, &mem, per_conn, &mut samples[i]);
                    walls[i] += t.elapsed();
                    ticks[i] += pid.map_or(0, cpu_ticks) - t0;
                    tallies[i].ok += tally.ok;
                    tallies[i].again += tally.again;
                }
            }
            for (i, (kind, _)) in setups.iter().enumerate() {
                rows.push(Row {
                    placement,
                    conns,
                    kind: *kind,
                    summary: summarize(&mut samples[i].exit),
                    done: (!samples[i].done.is_empty()).then(|| summarize(&mut samples[i].done)),
                    tally: tallies[i],
                    wall: walls[i],
                    server_cpu: server(*kind)
                        .map(|_| ticks_to_duration(ticks[i]) / samples[i].exit.len().max(1) as u32),
                });
            }
            eprintln!("  {placement:?} x{conns} done (load {})", loadavg());
        }
    }
    rows
}

fn print_latency(rows: &[Row]) {
    println!("\n### Round trip of one certificate request (microseconds)\n");
    println!(
        "| placement | conns | path | n | p50 | p99 | p99.9 | mean | req/s | EAGAIN | \
         DONE p50 | DONE p99 | server CPU/req |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let done = r
            .done
            .map_or(("-".into(), "-".into()), |d| (us(d.p50), us(d.p99)));
        println!(
            "| {:?} | {} | {:?} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            r.placement,
            r.conns,
            r.kind,
            r.summary.n,
            us(r.summary.p50),
            us(r.summary.p99),
            us(r.summary.p999),
            us(r.summary.mean),
            r.summary.n as f64 / r.wall.as_secs_f64(),
            r.tally.again,
            done.0,
            done.1,
            r.server_cpu.map_or("-".into(), |c| us(c.as_nanos() as u64))
        );
    }
    println!("\n### Ratios and targets\n");
    println!(
        "| placement | conns | sidecar/floor p50 (<= 1.3) | sidecar/floor p99 (<= 1.5) | \
         sidecar/in-process p50 | sidecar/in-process p99 | own work p50-floor p50 (us) | \
         half in-process p50 (us) | own CPU/req: sidecar-floor (us) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut groups: Vec<(Placement, usize)> = rows.iter().map(|r| (r.placement, r.conns)).collect();
    groups.dedup();
    for (p, c) in groups {
        let row = |k: Kind| {
            rows.iter()
                .find(|r| r.placement == p && r.conns == c && r.kind == k)
        };
        let get = |k: Kind| row(k).map(|r| r.summary);
        let cpu = |k: Kind| {
            row(k)
                .and_then(|r| r.server_cpu)
                .map_or(0, |d| d.as_nanos() as i64)
        };
        let (Some(f), Some(i), Some(s)) =
            (get(Kind::Floor), get(Kind::InProcess), get(Kind::Sidecar))
        else {
            continue;
        };
        let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        let own = s.p50 as i64 - f.p50 as i64;
        println!(
            "| {p:?} | {c} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} |",
            ratio(s.p50, f.p50),
            ratio(s.p99, f.p99),
            ratio(s.p50, i.p50),
            ratio(s.p99, i.p99),
            own as f64 / 1000.0,
            i.p50 as f64 / 2000.0,
            (cpu(Kind::Sidecar) - cpu(Kind::Floor)) as f64 / 1000.0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Memory, CPU, start-up, size.

fn status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss(pid: u32) -> String {
    format!(
        "{} KiB (anon {}, file {}, shmem {}; threads {})",
        status_kb(pid, "VmRSS:"),
        status_kb(pid, "RssAnon:"),
        status_kb(pid, "RssFile:"),
        status_kb(pid, "RssShmem:"),
        status_kb(pid, "Threads:")
    )
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a system value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; rest starts at field 3.
    num(11) + num(12)
}

fn memory(dir: &Path, blob: &Path) {
    place(Placement::Free);
    println!("\n### Memory, CPU, start-up, size\n");
    let (sidecar, socket) = start_sidecar(dir, "mem", blob, &["--max-connections", "80"]);
    let pid = sidecar.pid();
    thread::sleep(Duration::from_millis(200));
    println!("- idle: {}", rss(pid));
    let ticks0 = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(2));
    println!(
        "- CPU used while idle for 2 s: {} ticks",
        cpu_ticks(pid) - ticks0
    );

    let mem = GuestMem::new();
    let mut c = Conn::sidecar(&socket, &mem, 0, DoneMode::Sync);
    let mut v = Vec::with_capacity(100_000);
    let mut d = Vec::with_capacity(100_000);
    c.run(1_000, &mut v, &mut d);
    println!("- 1 connection, after 1,000 requests: {}", rss(pid));
    v.clear();
    d.clear();
    let t = c.run(100_000, &mut v, &mut d);
    assert_eq!(t.ok, 100_000);
    println!("- 1 connection, after 101,000 requests: {}", rss(pid));
    v.clear();
    d.clear();
    c.run(100_000, &mut v, &mut d);
    println!("- 1 connection, after 201,000 requests: {}", rss(pid));
    drop(c);
    thread::sleep(Duration::from_millis(100));
    println!("- connection closed: {}", rss(pid));

    let mems: Vec<GuestMem> = (0..64).map(|_| GuestMem::new()).collect();
    let mut conns: Vec<Conn> = mems
        .iter()
        .enumerate()
        .map(|(i, m)| Conn::sidecar(&socket, m, i as u32, DoneMode::None))
        .collect();
    for c in conns.iter_mut() {
        c.run(1, &mut v, &mut d);
    }
    thread::sleep(Duration::from_millis(100));
    println!(
        "- 64 connections, each mapped and served once (lease held): {}",
        rss(pid)
    );
    let ticks0 = cpu_ticks(pid);
    thread::sleep(Duration::from_secs(2));
    println!(
        "- CPU used while idle for 2 s with 64 connections and 64 leases: {} ticks",
        cpu_ticks(pid) - ticks0
    );
    drop(conns);
    thread::sleep(Duration::from_millis(200));
    println!("- all closed again: {}", rss(pid));
    drop(sidecar);

    let mut times: Vec<u64> = (0..20)
        .map(|i| {
            let socket = dir.join(format!("start-{i}.sock"));
            let t0 = Instant::now();
            let mut child = serve_command(&socket, blob, &[])
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            wait_accepting(&socket, &mut child);
            let total = t0.elapsed();
            let _ = child.kill();
            let _ = child.wait();
            total.as_micros() as u64
        })
        .collect();
    times.sort_unstable();
    println!(
        "- start-up, spawn to first accepted connect, 20 runs: median {} us, max {} us \
         (50 us polling resolution)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    let bin = sidecar_bin();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    println!(
        "- binary: {}: {size} bytes ({:.2} MiB)",
        bin.display(),
        size as f64 / 1048576.0
    );
}

// ---------------------------------------------------------------------------------------------
// Blob check variants (the per-request cost of the cache check, in this process).

fn blob_checks(blob: &Path) {
    place(Placement::Pinned);
    println!("\n### Per-request blob check variants, in-process, pinned (ns)\n");
    println!("| variant | p50 | p99 |");
    println!("|---|---|---|");
    let path = CString::new(blob.as_os_str().as_bytes()).expect("path");
    let n = 100_000;
    let bench = |name: &str, f: &mut dyn FnMut()| {
        for _ in 0..n / 10 {
            f();
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            f();
            v.push(t.elapsed().as_nanos() as u64);
        }
        let s = summarize(&mut v);
        println!("| {name} | {} | {} |", s.p50, s.p99);
    };
    let setlk = |fd: i32, t: i32| {
        // SAFETY: flock is plain data; fcntl reads it during the call.
        unsafe {
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = t as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            libc::fcntl(fd, libc::F_OFD_SETLK, &fl)
        }
    };
    bench("open + shared lock + fstat + close", &mut || {
        // SAFETY: plain syscalls on a NUL-terminated path and the fd they return.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            setlk(fd, libc::F_RDLCK);
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(fd, &mut st);
            libc::close(fd);
        }
    });
    let held = std::fs::File::open(blob).expect("open");
    let fd = held.as_raw_fd();
    bench("held fd: shared lock + stat(path) + unlock", &mut || {
        setlk(fd, libc::F_RDLCK);
        // SAFETY: stat writes into the struct we own; the path is NUL-terminated.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::stat(path.as_ptr(), &mut st);
        }
        setlk(fd, libc::F_UNLCK);
    });
    bench(
        "held fd: shared lock + fstat + unlock (no rename check)",
        &mut || {
            setlk(fd, libc::F_RDLCK);
            // SAFETY: fstat writes into the struct we own.
            unsafe {
                let mut st: libc::stat = std::mem::zeroed();
                libc::fstat(fd, &mut st);
            }
            setlk(fd, libc::F_UNLCK);
        },
    );
    let store = coco_sidecar::blob::BlobStore::new(
        blob,
        Duration::from_millis(100),
        coco_sidecar::MissingCerts::Empty,
    );
    bench(
        "BlobStore::fetch + drop the lease (the sidecar's code)",
        &mut || {
            let f = store.fetch();
            std::hint::black_box(&f);
        },
    );
    let id = coco_sidecar::blob::waiters::stat_lock_id(&held.metadata().expect("stat"));
    bench(
        "read /proc/locks for waiting updaters (done every 250 ms while serving)",
        &mut || {
            let waiting = coco_sidecar::blob::waiters::updater_waiting(&id).expect("/proc/locks");
            std::hint::black_box(waiting);
        },
    );
    let locks =
        std::fs::read_to_string(coco_sidecar::blob::waiters::PROC_LOCKS).unwrap_or_default();
    println!("\n(/proc/locks: {} lines)", locks.lines().count());
    println!("\n(BlobStore: {:?})", store.stats());
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--floor-server") {
        let done = match args.get(3).map(String::as_str) {
            Some("None") => DoneMode::None,
            Some("Async") => DoneMode::Async,
            _ => DoneMode::Sync,
        };
        floor_server(Path::new(args.get(2).expect("socket path")), done);
    }
    let opts = parse_opts();
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = table(1);
    let blob = dir.path().join("certs.bin");
    std::fs::write(&blob, &expected).expect("write blob");
    // Let the blob's ctime age past the sidecar's racy window so that the cache is trusted.
    thread::sleep(Duration::from_millis(2100));

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("## coco-sidecar serving benchmark\n");
    println!(
        "- {} CPUs ({cpu}), kernel {}, blob {} bytes in {}, buffer {NPAGES} pages, \
         done mode {:?}, {} requests per series in {} rounds",
        online_cpus().len(),
        kernel.trim(),
        expected.len(),
        dir.path().display(),
        opts.done,
        opts.requests,
        opts.rounds
    );
    println!("- load average at start: {}", loadavg());
    let _ = io::stdout().flush();

    if opts.latency {
        let rows = latency(&opts, dir.path(), &blob, &expected);
        print_latency(&rows);
        blob_checks(&blob);
    }
    if opts.memory {
        memory(dir.path(), &blob);
    }
    println!("\n- load average at end: {}", loadavg());
}
