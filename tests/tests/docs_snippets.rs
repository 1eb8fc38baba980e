//! The shell snippets of docs/kubernetes.md and docs/qemu.md run as they are written (issue
//! 14). Every ```sh block of the two pages is in [`PLAN`]: run, checked against what CI runs,
//! or not run with the reason; a block in neither fails the test, so a new snippet gets one.
//!
//! The blocks run in a private mount namespace (`unshare --mount`) with tmpfs over the paths
//! they use (`/var/lib/coco-sidecar`, `/run/coco-sidecar`, `/var/lib/vms`), the binary under
//! test as `coco-sidecar` on PATH, and AMD's Turin chain (tests/fixtures/amd) in
//! `/var/lib/coco-sidecar/incoming`, where `snphost fetch` would have put it. Mount points that
//! do not exist on the host are made for the run and removed after it.
//!
//! - Without root (unshare) the test prints one `SKIPPED:` line.
//! - The podman blocks need podman and runc (`SKIPPED:` without, a failure under
//!   COCO_REQUIRE_PODMAN=1); they build the static binary and the image as the page says.
//! - The QEMU command lines need a SEV-SNP host to boot; here they run with this project's
//!   QEMU 10.2 build (COCO_QEMU_BINS, or /var/cache/coco-sidecar/qemu/10.2/build) under
//!   /dev/kvm until QEMU stops at `vm-type SEV-SNP not supported by KVM`, which shows that
//!   every option before it was accepted. Without that QEMU, /dev/kvm or qemu-img: `SKIPPED:`,
//!   a failure under COCO_REQUIRE_QEMU=1.

mod deploy_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use coco_tests::updaters::output_text;
use coco_tests::{sidecar_bin, workspace_root};
use deploy_support::skipped;

/// A fenced ```sh block: the page, its first line's number, its text (indentation removed).
#[derive(Debug, Clone)]
struct Block {
    doc: &'static str,
    line: usize,
    text: String,
}

impl Block {
    /// The first line that is not a comment: what the block is known by in [`PLAN`].
    fn first_command(&self) -> &str {
        self.text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or("")
    }
}

fn blocks(doc: &'static str) -> Vec<Block> {
    let text = std::fs::read_to_string(workspace_root().join(doc)).expect("read the page");
    let mut out = Vec::new();
    let mut open: Option<(usize, usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None if trimmed == "```sh" => open = Some((i + 2, indent, String::new())),
            Some((start, _, body)) if trimmed == "```" => {
                out.push(Block {
                    doc,
                    line: *start,
                    text: std::mem::take(body),
                });
                open = None;
            }
            Some((_, indent, body)) => {
                body.push_str(line.get(*indent..).unwrap_or(line.trim_start()));
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

/// What the test does with a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Run it; blocks of one kind run in this order.
    Run(Kind, u8),
    /// Compare it with what CI runs.
    SameAsCi,
    /// Not run, and why.
    NotRun(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Only `coco-sidecar` and coreutils.
    Cli,
    /// podman and the image.
    Podman,
    /// A QEMU command line that needs SEV-SNP.
    Qemu,
}

/// Every block of the two pages, by (page, start of its first command).
const PLAN: &[(&str, &str, Plan)] = &[
    ("docs/kubernetes.md", "install -d -o 65533", Plan::Run(Kind::Cli, 0)),
    ("docs/kubernetes.md", "deploy/build-static.sh", Plan::Run(Kind::Podman, 1)),
    (
        "docs/kubernetes.md",
        "podman push",
        Plan::NotRun("pushes to a registry, and this machine reaches none"),
    ),
    ("docs/kubernetes.md", "export CONTAINERS_CONF", Plan::Run(Kind::Podman, 2)),
    ("docs/kubernetes.md", "podman rm -f vm1-sidecar", Plan::Run(Kind::Podman, 3)),
    (
        "docs/kubernetes.md",
        "bin=\"$(deploy/build-static.sh)\"",
        Plan::NotRun("copies to another host over ssh"),
    ),
    (
        "docs/kubernetes.md",
        "deploy/install-node.sh --bin",
        Plan::NotRun("installs into /; deploy_systemd.rs runs it with --root and checks the result"),
    ),
    (
        "docs/kubernetes.md",
        "systemd-sysusers",
        Plan::NotRun("needs systemd as PID 1; deploy_systemd.rs verifies the units and runs their command lines"),
    ),
    (
        "docs/kubernetes.md",
        "kubectl -n snp-vms create configmap",
        Plan::NotRun("needs a Kubernetes cluster; deploy_manifests.rs validates the manifests"),
    ),
    (
        "docs/kubernetes.md",
        "sed s/snp-node-1/$NODE/g",
        Plan::NotRun("needs a Kubernetes cluster; deploy_manifests.rs validates the Job"),
    ),
    ("docs/qemu.md", "../configure", Plan::SameAsCi),
    (
        "docs/qemu.md",
        "apt-get source",
        Plan::NotRun("builds QEMU from Debian sid's sources for tens of minutes; CI builds the same series from the pinned tarballs (qemu-patches/build-and-test.sh)"),
    ),
    ("docs/qemu.md", "coco-sidecar serve --socket /run/coco-sidecar/vm1.sock", Plan::Run(Kind::Qemu, 0)),
    (
        "docs/qemu.md",
        "snpguest certificates pem",
        Plan::NotRun("runs inside an SEV-SNP guest"),
    ),
    (
        "docs/qemu.md",
        "cargo build --workspace --bins",
        Plan::NotRun("what CI runs (.ci/run): builds both QEMU series and boots the test guest"),
    ),
];

fn plan_of(block: &Block) -> Plan {
    let first = block.first_command();
    PLAN.iter()
        .find(|(doc, start, _)| *doc == block.doc && first.starts_with(start))
        .map(|(_, _, plan)| *plan)
        .unwrap_or_else(|| {
            panic!(
                "{}:{}: a snippet the test does not know (`{first}`): add it to PLAN, to be run \
                 or with the reason it cannot be",
                block.doc, block.line
            )
        })
}

fn all_blocks() -> Vec<Block> {
    let mut all = blocks("docs/kubernetes.md");
    all.extend(blocks("docs/qemu.md"));
    all
}

#[test]
fn every_snippet_is_run_or_has_a_reason() {
    let all = all_blocks();
    assert!(all.len() >= 10, "the pages' blocks were found: {all:?}");
    for block in &all {
        plan_of(block);
    }
    // Every entry of the plan still names a block.
    for (doc, start, _) in PLAN {
        assert!(
            all.iter()
                .any(|b| b.doc == *doc && b.first_command().starts_with(start)),
            "PLAN names `{start}` in {doc}, which has no such block any more"
        );
    }
}

#[test]
fn the_documented_configure_line_is_the_one_ci_builds_with() {
    let block = all_blocks()
        .into_iter()
        .find(|b| plan_of(b) == Plan::SameAsCi)
        .expect("the configure block");
    let joined = block.text.replace("\\\n", " ");
    let mut documented: Vec<&str> = joined
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .collect();
    let script = std::fs::read_to_string(workspace_root().join("qemu-patches/build-and-test.sh"))
        .expect("build script");
    let args = script
        .split("CONFIGURE_ARGS=(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("CONFIGURE_ARGS in the build script");
    // The script adds --enable-kvm for the build the guests run on.
    let mut ci: Vec<&str> = args.split_whitespace().chain(["--enable-kvm"]).collect();
    documented.sort_unstable();
    ci.sort_unstable();
    assert_eq!(documented, ci, "docs/qemu.md:{}", block.line);
}

/// Why this machine cannot run a kind of block, if it cannot.
fn unavailable(kind: Kind) -> Option<String> {
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match kind {
        Kind::Cli => None,
        Kind::Podman if !(runs("podman", "--version") && runs("runc", "--version")) => {
            Some("podman and runc are not installed (apt-get install podman runc)".into())
        }
        Kind::Podman => None,
        Kind::Qemu if !Path::new("/dev/kvm").exists() => Some("no /dev/kvm".into()),
        Kind::Qemu if !runs("qemu-img", "--version") => {
            Some("qemu-img is not installed (apt-get install qemu-utils)".into())
        }
        Kind::Qemu if qemu_10_2().is_none() => Some(
            "no QEMU 10.2 build (COCO_QEMU_BINS=\"10.2=PATH\", or bash \
             qemu-patches/build-and-test.sh)"
                .into(),
        ),
        Kind::Qemu => None,
    }
}

fn qemu_10_2() -> Option<PathBuf> {
    let from_env = std::env::var("COCO_QEMU_BINS").ok().and_then(|bins| {
        bins.split_whitespace()
            .find_map(|b| b.strip_prefix("10.2=").map(PathBuf::from))
    });
    let path = from_env.unwrap_or_else(|| {
        PathBuf::from("/var/cache/coco-sidecar/qemu/10.2/build/qemu-system-x86_64")
    });
    path.is_file().then_some(path)
}

fn require_var(kind: Kind) -> Option<&'static str> {
    match kind {
        Kind::Cli => None,
        Kind::Podman => Some("COCO_REQUIRE_PODMAN"),
        Kind::Qemu => Some("COCO_REQUIRE_QEMU"),
    }
}

/// Directories made as mount points for the run, removed afterwards.
struct MountPoints(Vec<PathBuf>);

impl MountPoints {
    fn make(paths: &[&str]) -> MountPoints {
        let mut made = Vec::new();
        for p in paths {
            let p = Path::new(p);
            if !p.exists() {
                std::fs::create_dir(p).expect("make a mount point");
                made.push(p.to_owned());
            }
        }
        MountPoints(made)
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

const MOUNTS: [&str; 3] = ["/var/lib/coco-sidecar", "/run/coco-sidecar", "/var/lib/vms"];

/// Runs `script` with bash in a private mount namespace prepared as the module says; returns
/// (success, output).
fn run_sandboxed(script: &str, bin_dir: &Path) -> (bool, String) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/amd");
    let mut prologue = String::from("set -euo pipefail\n");
    for m in MOUNTS {
        prologue.push_str(&format!(
            "mount -t tmpfs -o mode=0755,size=64m coco-docs {m}\n"
        ));
    }
    prologue.push_str(&format!(
        "install -d /var/lib/coco-sidecar/incoming\n\
         cp {f}/ark-turin.pem /var/lib/coco-sidecar/incoming/ark.pem\n\
         cp {f}/ask-turin.pem /var/lib/coco-sidecar/incoming/ask.pem\n\
         cp {f}/vcek-turin.der /var/lib/coco-sidecar/incoming/vcek.der\n\
         export PATH={b}:$PATH\n\
         cd {w}\n",
        f = fixtures.display(),
        b = bin_dir.display(),
        w = workspace_root().display()
    ));
    let _points = MountPoints::make(&MOUNTS);
    let out = Command::new("timeout")
        .args([
            "1200",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
        ])
        .arg(format!("{prologue}{script}"))
        .output()
        .expect("run unshare");
    (out.status.success(), output_text(&out))
}

/// A directory holding `coco-sidecar` (and QEMU, when there is one) for PATH.
fn bin_dir(dir: &Path) -> PathBuf {
    let bins = dir.join("bin");
    std::fs::create_dir_all(&bins).expect("mkdir");
    std::os::unix::fs::symlink(sidecar_bin(), bins.join("coco-sidecar")).expect("symlink");
    if let Some(q) = qemu_10_2() {
        std::os::unix::fs::symlink(q, bins.join("qemu-system-x86_64")).expect("symlink");
    }
    bins
}

#[test]
fn the_pages_snippets_run_as_written() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skipped("docs snippets: not root (they run in a private mount namespace)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let bins = bin_dir(tmp.path());
    let mut plan: Vec<(Kind, u8, Block)> = all_blocks()
        .into_iter()
        .filter_map(|b| match plan_of(&b) {
            Plan::Run(kind, order) => Some((kind, order, b)),
            _ => None,
        })
        .collect();
    plan.sort_by_key(|(kind, order, b)| (*kind as u8, *order, b.line));
    let mut script = String::new();
    let mut skips = Vec::new();
    for (kind, _, block) in &plan {
        if let Some(why) = unavailable(*kind) {
            if let Some(var) = require_var(*kind) {
                assert!(
                    std::env::var_os(var).is_none_or(|v| v != "1"),
                    "{var}=1 but {why}"
                );
            }
            skips.push(format!("{}:{} ({why})", block.doc, block.line));
            continue;
        }
        script.push_str(&format!("echo '### {}:{}'\n", block.doc, block.line));
        match kind {
            // QEMU must stop where SEV-SNP is missing, and nowhere before.
            // The block starts a sidecar in the background: it is stopped with the block.
            Kind::Qemu => script.push_str(&format!(
                "qemu-img create -q -f qcow2 /var/lib/vms/vm1.qcow2 1G\n\
                 set +e\n(\n{}\nst=$?; kill $(jobs -p) 2>/dev/null; wait; exit $st\n) \
                 > /var/lib/vms/qemu.log 2>&1\nstatus=$?\nset -e\n\
                 cat /var/lib/vms/qemu.log\n\
                 grep -q 'vm-type SEV-SNP not supported by KVM' /var/lib/vms/qemu.log\n\
                 echo \"qemu stopped at SEV-SNP (status $status)\"\n",
                block.text
            )),
            _ => script.push_str(&format!("{}\n", block.text)),
        }
    }
    if plan.iter().any(|(k, _, _)| *k == Kind::Podman) {
        script = format!(
            "trap 'podman rm -f vm1-sidecar vm1-sidecar-metrics >/dev/null 2>&1; \
             podman rmi -f registry.example.com/coco-sidecar:0.1.0 >/dev/null 2>&1' EXIT\n\
             {script}"
        );
    }
    let (ok, out) = run_sandboxed(&script, &bins);
    assert!(ok, "a snippet failed (the last ### line names it):\n{out}");
    // What the blocks that ran printed, checked against what the pages say they print.
    assert!(
        out.contains("--expect-tcb bl=0,tee=0,snp=0,ucode=9,fmc=0"),
        "{out}"
    );
    if unavailable(Kind::Podman).is_none() {
        assert!(out.contains("healthy: sidecar answers"), "{out}");
        assert!(
            out.contains("blob /var/lib/coco-sidecar/certs.blob: OK: Turin VCEK"),
            "{out}"
        );
        assert!(out.contains("coco_sidecar_blob_valid 1"), "{out}");
    }
    if let (None, Some(qemu)) = (unavailable(Kind::Qemu), qemu_10_2()) {
        assert_eq!(out.matches("qemu stopped at SEV-SNP").count(), 2, "{out}");
        // QEMU stops at the accelerator before it looks at -cpu: check the models apart.
        let help = Command::new(qemu)
            .args(["-cpu", "help"])
            .output()
            .expect("-cpu help");
        let models = String::from_utf8_lossy(&help.stdout).to_string();
        for (_, _, block) in plan.iter().filter(|(k, _, _)| *k == Kind::Qemu) {
            let words: Vec<&str> = block.text.split_whitespace().collect();
            let cpu = words
                .windows(2)
                .find(|w| w[0] == "-cpu")
                .map(|w| w[1])
                .expect("a -cpu option");
            assert!(
                models
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(cpu)),
                "{}:{}: -cpu {cpu} is not a model of this QEMU:\n{models}",
                block.doc,
                block.line
            );
        }
    }
    for skip in skips {
        skipped(&format!("docs snippet {skip}"));
    }
}
