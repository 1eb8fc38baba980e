//! Patched QEMU under `/dev/kvm`: which QEMU binaries to test, the test guest built from
//! `tests/qemu-guest`, a QMP client, and a VM whose serial output the tests read.
//!
//! The guest reaches the certificate path through the `coco-sidecar` object's kernel stand-in
//! (`x-emulate-exit`): its port write becomes the exit record in `kvm_run`, and everything
//! after that is QEMU's real exit path. See docs/qemu.md, "What runs for real".

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A patched `qemu-system-x86_64` to test.
#[derive(Debug, Clone)]
pub struct QemuBin {
    /// Which series it was built from ("10.2", "10.0").
    pub label: String,
    /// The binary.
    pub path: PathBuf,
}

/// The binaries named by `COCO_QEMU_BINS` ("10.2=/path 10.0=/path", as
/// `qemu-patches/build-and-test.sh` passes them), or none: then the caller's test prints one
/// `SKIPPED:` line, and fails instead when `COCO_REQUIRE_QEMU=1`.
pub fn qemu_bins(test: &str) -> Vec<QemuBin> {
    let bins: Vec<QemuBin> = std::env::var("COCO_QEMU_BINS")
        .unwrap_or_default()
        .split_whitespace()
        .map(|item| {
            let (label, path) = item.split_once('=').unwrap_or(("qemu", item));
            QemuBin {
                label: label.to_owned(),
                path: PathBuf::from(path),
            }
        })
        .collect();
    for b in &bins {
        assert!(
            b.path.is_file(),
            "{}: {} not found",
            b.label,
            b.path.display()
        );
    }
    if bins.is_empty() {
        let why = "COCO_QEMU_BINS is not set (qemu-patches/build-and-test.sh builds the patched \
                   QEMU and runs these tests with it)";
        crate::skip_unless_required("COCO_REQUIRE_QEMU", test, why);
        return bins;
    }
    if !Path::new("/dev/kvm").exists() {
        crate::skip_unless_required("COCO_REQUIRE_KVM", test, "/dev/kvm is missing");
        return Vec::new();
    }
    bins
}

/// Where the guest looks for its parameters: offset 0x100 of the image (guest.ld).
const PARAMS_OFFSET: usize = 0x100;
const PARAMS_MAGIC: u32 = 0x3150_4343;
/// Size of the guest image: QEMU maps it at 0xf0000 and below 4 GiB.
pub const IMAGE_SIZE: usize = 64 * 1024;

/// What the guest does (`struct params` in tests/qemu-guest/guest.c).
#[derive(Debug, Clone)]
pub struct GuestParams {
    /// vCPUs that make requests (1 or 2).
    pub ncpus: u32,
    /// Each vCPU's buffer (4 pages).
    pub buf_gpa: [u32; 2],
    /// Pages offered first in each request; 0 probes.
    pub first_npages: u32,
    /// Successful requests each vCPU makes before it reports END.
    pub requests: u32,
    /// Seconds of EAGAIN in a row after which the guest reports FAIL.
    pub budget_s: u32,
    /// Port 0x80 writes between retries after EAGAIN (a few microseconds each).
    pub retry_spins: u32,
    /// And between successful requests.
    pub pace_spins: u32,
    /// Table digests the guest accepts (FNV-1a 32); zero entries: any.
    pub digests: [u32; 2],
}

impl Default for GuestParams {
    fn default() -> Self {
        GuestParams {
            ncpus: 1,
            buf_gpa: [0x20_0000, 0x21_0000],
            first_npages: 0,
            requests: 1,
            budget_s: 30,
            retry_spins: 2000,
            pace_spins: 0,
            digests: [0, 0],
        }
    }
}

impl GuestParams {
    fn encode(&self) -> Vec<u8> {
        [
            PARAMS_MAGIC,
            self.ncpus,
            self.buf_gpa[0],
            self.buf_gpa[1],
            self.first_npages,
            self.requests,
            self.budget_s,
            self.retry_spins,
            self.pace_spins,
            self.digests[0],
            self.digests[1],
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
    }
}

/// FNV-1a, 32 bits: the digest the guest computes over the table it received.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h: u32, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The guest image built from tests/qemu-guest with the system's C compiler and binutils,
/// once per test process.
fn guest_base() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu-guest");
        let out = tempfile::tempdir().expect("tempdir");
        let o = |name: &str| out.path().join(name);
        let cflags = [
            "-m32",
            "-march=i686",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-fno-builtin",
            "-fno-tree-loop-distribute-patterns",
            "-mgeneral-regs-only",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
        ];
        run(Command::new("cc")
            .args(cflags)
            .arg("-c")
            .arg(src.join("guest.c"))
            .arg("-o")
            .arg(o("guest.o")));
        run(Command::new("cc")
            .args(["-m32", "-c"])
            .arg(src.join("entry.S"))
            .arg("-o")
            .arg(o("entry.o")));
        run(Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-nostdlib",
                "--no-warn-rwx-segments",
                "-T",
            ])
            .arg(src.join("guest.ld"))
            .arg("-o")
            .arg(o("guest.elf"))
            .arg(o("entry.o"))
            .arg(o("guest.o")));
        run(Command::new("objcopy")
            .args(["-O", "binary", "--gap-fill", "0xff"])
            .arg(o("guest.elf"))
            .arg(o("guest.bin")));
        let image = std::fs::read(o("guest.bin")).expect("guest.bin");
        assert_eq!(image.len(), IMAGE_SIZE, "guest image size");
        image
    })
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest image with `params` in place.
pub fn guest_image(params: &GuestParams) -> Vec<u8> {
    let mut image = guest_base().to_vec();
    let p = params.encode();
    assert_eq!(
        image[PARAMS_OFFSET..PARAMS_OFFSET + 4],
        [0, 0, 0, 0],
        "the image has no empty parameter block at {PARAMS_OFFSET:#x}"
    );
    image[PARAMS_OFFSET..PARAMS_OFFSET + p.len()].copy_from_slice(&p);
    image
}

/// A QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until QEMU listens) and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("QMP {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("QMP timeout");
        let writer = stream.try_clone().expect("QMP clone");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read();
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        qmp.cmd("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("QMP read");
        assert!(n > 0, "QEMU closed its monitor");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP {line:?}: {e}"))
    }

    /// Runs a command: its `return`, or the `desc` of its `error`.
    pub fn cmd(&mut self, name: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": name, "arguments": arguments });
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let r = self.read();
            if r.get("event").is_some() {
                continue;
            }
            if let Some(ret) = r.get("return") {
                return Ok(ret.clone());
            }
            return Err(r["error"]["desc"].as_str().unwrap_or("?").to_owned());
        }
    }

    /// `query-status`'s `status`.
    pub fn status(&mut self) -> String {
        let r = self.cmd("query-status", json!({})).expect("query-status");
        r["status"].as_str().unwrap_or("?").to_owned()
    }
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The sidecar's socket.
    pub socket: PathBuf,
    /// Record ABI of the stand-in: "snp-req-certs" or "coco".
    pub abi: &'static str,
    /// vCPUs.
    pub smp: u32,
    /// The guest's parameters.
    pub params: GuestParams,
    /// Start paused (-S).
    pub paused: bool,
    /// More members of the coco-sidecar object, JSON (",\"x-hold-lease\":true").
    pub object_extra: String,
    /// More properties of the guest RAM backend (",hugetlb=on,hugetlbsize=2M").
    pub ram_extra: String,
}

impl VmOptions {
    /// One vCPU, the Linux 7.0 record, the sidecar at `socket`.
    pub fn new(socket: &Path) -> VmOptions {
        VmOptions {
            socket: socket.to_owned(),
            abi: "snp-req-certs",
            smp: 1,
            params: GuestParams::default(),
            paused: false,
            object_extra: String::new(),
            ram_extra: String::new(),
        }
    }

    /// The `-object` JSON of the coco-sidecar object.
    pub fn object_json(&self) -> String {
        format!(
            "{{\"qom-type\":\"coco-sidecar\",\"id\":\"cs0\",\"socket\":{{\"type\":\"unix\",\
             \"path\":\"{}\"}},\"reconnect-ms\":100,\"x-emulate-exit\":\"{}\"{}}}",
            self.socket.display(),
            self.abi,
            self.object_extra
        )
    }
}

/// Guest RAM of the test VMs.
pub const RAM_MIB: u32 = 64;

/// A running QEMU with the test guest, killed when dropped.
#[derive(Debug)]
pub struct Vm {
    child: Option<Child>,
    /// Its monitor.
    pub qmp: Qmp,
    serial: PathBuf,
    stderr: PathBuf,
    /// Holds the image, serial log, QMP socket and QEMU's stderr.
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Starts `bin` under KVM with the test guest as its firmware and memfd guest RAM.
    pub fn start(bin: &QemuBin, opts: &VmOptions) -> Vm {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("guest.bin");
        std::fs::write(&image, guest_image(&opts.params)).expect("write image");
        let serial = dir.path().join("serial.log");
        let qmp = dir.path().join("qmp.sock");
        let stderr = dir.path().join("qemu.log");
        let mut cmd = Command::new(&bin.path);
        cmd.args([
            "-accel",
            "kvm",
            "-cpu",
            "max",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-machine", "pc,memory-backend=ram0"])
        .args(["-m", &format!("{RAM_MIB}M"), "-smp", &opts.smp.to_string()])
        .args(["-global", "apic-common.vapic=off"])
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=ram0,size={RAM_MIB}M,share=on{}",
            opts.ram_extra
        ))
        .arg("-object")
        .arg(opts.object_json())
        .arg("-bios")
        .arg(&image)
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if opts.paused {
            cmd.arg("-S");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.path.display()));
        let qmp = Qmp::connect(&qmp);
        Vm {
            child: Some(child),
            qmp,
            serial,
            stderr,
            _dir: dir,
        }
    }

    /// Every line the guest printed so far.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.serial)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// What QEMU printed on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded) for a line matching `pred`; panics with the guest's output and
    /// QEMU's stderr if none comes, or if the guest reports a failure.
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(fail) = lines.iter().find(|l| l.starts_with("FAIL")) {
                panic!("the guest failed: {fail}\n{}", self.transcript());
            }
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every vCPU's END and the final DONE.
    pub fn wait_done(&self, timeout: Duration) -> Vec<String> {
        self.wait_line("DONE", timeout, |l| l == "DONE");
        self.lines()
    }

    /// The guest's output and QEMU's stderr, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- guest serial ---\n{}\n--- QEMU stderr ---\n{}",
            self.lines().join("\n"),
            self.stderr()
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `REQ` line of the guest, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    /// vCPU (APIC ID).
    pub cpu: u32,
    /// Request number, from 1.
    pub n: u32,
    /// Pages of the buffer the table arrived in.
    pub pages: u32,
    /// ENOSPC answers before it.
    pub enospc: u32,
    /// EAGAIN answers before it.
    pub eagain: u32,
    /// Entries of the table.
    pub entries: u32,
    /// Length of the table.
    pub bytes: u32,
    /// FNV-1a 32 of the table.
    pub digest: u32,
}

impl Req {
    /// Parses `REQ cpu=0 n=1 pages=2 enospc=1 eagain=0 entries=3 bytes=4687 digest=66c47c12`.
    pub fn parse(line: &str) -> Option<Req> {
        let rest = line.strip_prefix("REQ ")?;
        let field = |name: &str, hex: bool| -> Option<u32> {
            let v = rest
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?;
            if hex {
                u32::from_str_radix(v, 16).ok()
            } else {
                v.parse().ok()
            }
        };
        Some(Req {
            cpu: field("cpu", false)?,
            n: field("n", false)?,
            pages: field("pages", false)?,
            enospc: field("enospc", false)?,
            eagain: field("eagain", false)?,
            entries: field("entries", false)?,
            bytes: field("bytes", false)?,
            digest: field("digest", true)?,
        })
    }

    /// Every REQ line in `lines`.
    pub fn all(lines: &[String]) -> Vec<Req> {
        lines.iter().filter_map(|l| Req::parse(l)).collect()
    }
}
