//! The sidecar's footprint under load, read from /proc/PID/status and /proc/PID/stat: the
//! figures that size the Kubernetes resource requests and limits (deploy/k8s/pod.yaml,
//! docs/kubernetes.md). Issue 7.
//!
//! Load: 16 VMM connections at once (the default --max-connections), each with 256 MiB of sealed memfd
//! guest RAM, 8 vCPUs and 16 KiB certificate tables (the largest a Linux guest accepts),
//! each request followed by COCO_DONE, plus health probes. The test prints the figures (one
//! line, past the harness's capture) and fails if the sidecar's own memory (anonymous RSS)
//! exceeds what the manifest's limit leaves room for.
//!
//! The figures depend on the build: run with COCO_SIDECAR_BIN=<static release binary> to
//! measure what the image ships (docs/kubernetes.md lists such a run).

mod deploy_support;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use coco_protocol::exit::Abi;
use coco_protocol::CertsRet;
use coco_tests::{proc_status, table_of_size, write_blob, GuestMem, Sidecar};
use deploy_support::health;

const CONNECTIONS: usize = 16;
const VCPUS: u32 = 8;
const REQUESTS_PER_CONNECTION: usize = 1500;
const GUEST_RAM: u64 = 256 << 20;
/// The sidecar container's memory limit in deploy/k8s/pod.yaml.
const MANIFEST_LIMIT_KIB: u64 = 64 * 1024;

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f[11] + f[12]
}

#[derive(Debug, Default, Clone, Copy)]
struct Peak {
    rss: u64,
    anon: u64,
    threads: u64,
}

impl Peak {
    fn sample(self, pid: u32) -> Peak {
        Peak {
            rss: self.rss.max(proc_status(pid, "VmRSS")),
            anon: self.anon.max(proc_status(pid, "RssAnon")),
            threads: self.threads.max(proc_status(pid, "Threads")),
        }
    }
}

/// Guest RAM as QEMU has it: a large shrink-sealed memfd, untouched (sparse) but for what the
/// sidecar writes.
fn sparse_guest_ram(size: u64) -> GuestMem {
    GuestMem::sparse(size)
}

struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn footprint_under_load_fits_the_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table_of_size(16 * 1024, 6);
    let blob = write_blob(dir.path(), "certs.bin", &table);
    // Room for the VMM connections and the probe's.
    let sidecar = Sidecar::start(&blob, &["--max-connections", "20"]);
    let pid = sidecar.pid();
    let idle = (proc_status(pid, "VmRSS"), proc_status(pid, "RssAnon"));
    let cpu_before = cpu_ticks(pid);

    let finished = AtomicUsize::new(0);
    let release = AtomicBool::new(false);
    let socket = sidecar.socket.clone();
    let mut peak = Peak::default();
    thread::scope(|s| {
        for c in 0..CONNECTIONS {
            let (socket, table, finished, release) = (&socket, &table, &finished, &release);
            s.spawn(move || {
                // Counts this worker as finished however it ends, so that a failed one (whose
                // panic the scope reports) does not keep the sampler waiting.
                let _finished = Finished(finished);
                let mem = sparse_guest_ram(GUEST_RAM);
                let mut vmm = coco_protocol::Frontend::connect(socket).expect("connect");
                vmm.set_mem_table(&[mem.region(0)]).expect("memory");
                for i in 0..REQUESTS_PER_CONNECTION {
                    let vcpu = (i as u32) % VCPUS;
                    let gpa = 0x10_0000 * u64::from(vcpu + 1);
                    let abi = Abi::ALL[i % 2];
                    let r = vmm.request_certs(abi, vcpu, gpa, 4).expect("request");
                    assert_eq!(r.ret, CertsRet::Ok, "connection {c} request {i}");
                    vmm.done(r.lease).expect("done");
                }
                assert_eq!(mem.read(0x10_0000, table.len()), *table);
                drop(_finished);
                // Keep the connection (and the sidecar's mapping) until the last sample.
                while !release.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        while finished.load(Ordering::SeqCst) < CONNECTIONS && Instant::now() < deadline {
            peak = peak.sample(pid);
            // The probe runs alongside, as the kubelet's would.
            let out = health(&["--socket", socket.to_str().expect("utf-8")]);
            assert_eq!(out.status.code(), Some(0), "{out:?}");
            thread::sleep(Duration::from_millis(20));
        }
        peak = peak.sample(pid);
        release.store(true, Ordering::SeqCst);
    });
    assert_eq!(
        finished.load(Ordering::SeqCst),
        CONNECTIONS,
        "load finished in time"
    );
    let cpu = cpu_ticks(pid) - cpu_before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let requests = (CONNECTIONS * REQUESTS_PER_CONNECTION) as u64;
    let hwm = proc_status(pid, "VmHWM");
    let line = format!(
        "FOOTPRINT: idle VmRSS {} kB (anon {} kB); under load ({CONNECTIONS} connections, \
         {requests} requests of {} bytes + DONE): peak VmRSS {} kB, peak RssAnon {} kB, \
         VmHWM {hwm} kB, threads {}; CPU {:.0} us per request; binary {}\n",
        idle.0,
        idle.1,
        table.len(),
        peak.rss,
        peak.anon,
        peak.threads,
        cpu as f64 * 1e6 / hz as f64 / requests as f64,
        coco_tests::sidecar_bin().display()
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
    assert!(
        peak.threads > CONNECTIONS as u64,
        "one thread per connection"
    );
    // Guest pages the sidecar wrote show in its RSS as shared memory but are charged to the
    // cgroup that first touched them (QEMU's, in a pod); its own memory is the anonymous part.
    assert!(
        peak.anon * 4 < MANIFEST_LIMIT_KIB,
        "anonymous RSS {} kB leaves less than 4x headroom under the {MANIFEST_LIMIT_KIB} kB limit",
        peak.anon
    );
}
