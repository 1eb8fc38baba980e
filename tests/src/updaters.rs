//! Support for the tests of the blob's updaters (`blob install`, `blob lock`, `blob recover`):
//! valid synthetic chains, the `blob` command, and waiting for what it does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use coco_protocol::table::{CertKind, Guid, Table};

use crate::{sidecar_bin, GuestMem};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/synthetic");
/// Guest RAM of the connections these tests make.
pub const MEM: u64 = 64 * 1024;

/// A certificate of the synthetic chain (`ark`, `ask`, `vcek`, `crl`, ...), DER.
pub fn synth(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(FIXTURES).join(format!("{name}.der"))).expect("fixture")
}

/// A table of synthetic certificates, which `blob install` accepts (with warnings).
pub fn synthetic_table(kinds: &[(CertKind, &str)]) -> Vec<u8> {
    let data: Vec<(Guid, Vec<u8>)> = kinds.iter().map(|(k, n)| (k.guid(), synth(n))).collect();
    let refs: Vec<(Guid, &[u8])> = data.iter().map(|(g, d)| (*g, d.as_slice())).collect();
    Table::build(&refs).expect("valid").into_bytes()
}

/// Two different valid blobs: ARK, ASK, VCEK (4687 bytes), and the same with a CRL (5547).
pub fn old_and_new() -> (Vec<u8>, Vec<u8>) {
    let chain = [
        (CertKind::Ark, "ark"),
        (CertKind::Ask, "ask"),
        (CertKind::Vcek, "vcek"),
    ];
    let old = synthetic_table(&chain);
    let new = synthetic_table(&[chain[0], chain[1], chain[2], (CertKind::Crl, "crl")]);
    (old, new)
}

/// A directory with the served blob (the old table) and a new one to install.
#[derive(Debug)]
pub struct Staged {
    /// Holds both.
    pub dir: tempfile::TempDir,
    /// The table served first.
    pub old: Vec<u8>,
    /// Its replacement.
    pub new: Vec<u8>,
    /// `certs.blob`, holding `old`.
    pub served: PathBuf,
    /// `new.blob`, holding `new`.
    pub new_path: PathBuf,
}

/// The blobs of [`old_and_new`] staged in a fresh directory.
pub fn staged() -> Staged {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = old_and_new();
    let served = dir.path().join("certs.blob");
    std::fs::write(&served, &old).expect("write");
    let new_path = dir.path().join("new.blob");
    std::fs::write(&new_path, &new).expect("write");
    Staged {
        dir,
        old,
        new,
        served,
        new_path,
    }
}

/// The names in `dir`, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `coco-sidecar blob`, arguments to follow.
pub fn blob_cmd() -> Command {
    let mut c = Command::new(sidecar_bin());
    c.arg("blob");
    c
}

/// Standard output and standard error, for messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits (at most 10 s) until `path` exists; panics if `child` ends first.
pub fn wait_for_file(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the command ended early with {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` to end (killing it and failing after `limit`) and returns its output.
pub fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("command did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A connection to `socket` with [`MEM`] bytes of guest RAM at gpa 0 filled with `fill`.
pub fn connect_with_ram(socket: &Path, fill: u8) -> (coco_protocol::Frontend, GuestMem) {
    let mem = GuestMem::new(MEM, fill);
    let mut fe = coco_protocol::Frontend::connect(socket).expect("connect and negotiate");
    fe.set_mem_table(&[mem.region(0)]).expect("memory");
    (fe, mem)
}
