//! `coco-sidecar demo`: a whole certificate request flow on one machine, no hardware needed.
//! It serves an embedded sample chain (labelled SAMPLE, NOT AMD) from a temporary directory
//! and plays the VMM with the frontend client over real memfd guest memory.

use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::thread;

use coco_protocol::exit::Abi;
use coco_protocol::table::{CertKind, Table};
use coco_protocol::{Frontend, MemoryRegion};
use thiserror::Error;

use crate::config::Config;
use crate::serve::{Server, Shutdown};

/// The sample chain: ARK and ASK (RSA-4096, RSASSA-PSS) and a P-384 VCEK, made by
/// `backend/data/make-sample.sh`. Synthetic: not AMD's, attesting nothing.
pub const SAMPLE_CERTS: [(CertKind, &[u8]); 3] = [
    (CertKind::Ark, include_bytes!("../data/sample/ark.der")),
    (CertKind::Ask, include_bytes!("../data/sample/ask.der")),
    (CertKind::Vcek, include_bytes!("../data/sample/vcek.der")),
];

/// The sample certificate table.
pub fn sample_table() -> Table {
    let certs: Vec<_> = SAMPLE_CERTS
        .iter()
        .map(|(k, der)| (k.guid(), *der))
        .collect();
    // The embedded chain is fixed at build time and checked by the unit test below.
    Table::build(&certs).unwrap_or_else(|_| Table::empty())
}

/// Why the demo failed.
#[derive(Debug, Error)]
pub enum DemoError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error(transparent)]
    Server(#[from] crate::serve::server::ServerError),
    #[error(transparent)]
    Frontend(#[from] coco_protocol::FrontendError),
    #[error("guest memory: {0}")]
    Memfd(#[from] memfd::Error),
    #[error("the guest received a table that does not parse: {0}")]
    Table(#[from] coco_protocol::TableError),
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

const GUEST_RAM: u64 = 2 << 20;
const BUFFER_GPA: u64 = 0x10_0000;

/// Runs the demo and returns its report.
pub fn run() -> Result<String, DemoError> {
    let dir = std::env::temp_dir().join(format!("coco-sidecar-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Io("temporary directory", e))?;
    let result = run_in(dir.clone());
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: PathBuf) -> Result<String, DemoError> {
    let mut out = String::new();
    let table = sample_table();
    let blob = dir.join("certs.bin");
    std::fs::write(&blob, table.as_bytes()).map_err(|e| DemoError::Io("writing the blob", e))?;
    let socket = dir.join("sidecar.sock");
    let server = Server::bind(Config::new(&socket, &blob))?;
    let shutdown = Shutdown::new().map_err(|e| DemoError::Io("shutdown pipe", e))?;
    let stop = shutdown
        .handle()
        .map_err(|e| DemoError::Io("shutdown pipe", e))?;
    let serving = thread::spawn(move || server.run(&shutdown));

    let flow = (|| -> Result<(), DemoError> {
        let _ = writeln!(
            out,
            "coco-sidecar demo: a confidential VM asks for its certificate chain (no hardware \
             needed)\n\n\
             The sidecar serves a SAMPLE chain, made for this demo and not AMD's (it attests \
             nothing):\n  {} ({} certificates: ARK, ASK, VCEK; {} bytes)\n",
            blob.display(),
            table.entries().len(),
            table.as_bytes().len()
        );

        let ram = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("demo-guest-ram")?;
        ram.as_file()
            .set_len(GUEST_RAM)
            .map_err(|e| DemoError::Io("sizing guest RAM", e))?;
        ram.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow])?;

        // This process plays QEMU: it connects, shares guest RAM and forwards the guest's
        // requests as KVM hands them over.
        let mut vmm = Frontend::connect(&socket)?;
        let caps = vmm.caps()?;
        vmm.set_mem_table(&[MemoryRegion {
            guest_phys_addr: 0,
            size: GUEST_RAM,
            mmap_offset: 0,
            userspace_addr: 0,
            fd: ram.as_file().as_fd(),
        }])?;
        let _ = writeln!(
            out,
            "QEMU (played by this demo) connects to the sidecar's socket and shares the guest's \
             RAM ({} MiB) with it.\nThe sidecar can answer both kernels' certificate \
             requests, and holds the lock on the blob for a request until it reaches \
             firmware (at most {} ms).\n",
            GUEST_RAM >> 20,
            caps.lease_timeout_ms
        );

        for (step, abi) in Abi::ALL.iter().rev().enumerate() {
            let _ = writeln!(out, "{}. A guest on {}:", step + 1, kernel_name(*abi));
            let probe = vmm.request_certs(*abi, 0, BUFFER_GPA, 0)?;
            let _ = writeln!(
                out,
                "   It asks how much room the chain needs (it offers 0 pages).\n     -> {}: \
                 it needs {} page(s) of 4 KiB.",
                ret_words(probe.ret),
                probe.npages
            );
            let reply = vmm.request_certs(*abi, 0, BUFFER_GPA, probe.npages)?;
            let mut got = vec![0u8; table.as_bytes().len()];
            ram.as_file()
                .read_at(&mut got, BUFFER_GPA)
                .map_err(|e| DemoError::Io("reading guest RAM", e))?;
            let seen = Table::parse(&got)?;
            if seen != table {
                return Err(DemoError::Unexpected(
                    "guest memory differs from the blob".into(),
                ));
            }
            let kinds: Vec<&str> = seen
                .entries()
                .iter()
                .map(|e| e.kind().map_or("unknown", |k| k.name()))
                .collect();
            let _ = writeln!(
                out,
                "   It asks again with {} page(s) at guest address {BUFFER_GPA:#x}.\n     -> \
                 {}: the sidecar wrote the table into the guest's memory ({}, then the \
                 all-zero end entry); the guest hands it to its verifier with the attestation \
                 report.",
                probe.npages,
                ret_words(reply.ret),
                kinds.join(", ")
            );
            vmm.done(reply.lease)?;
            let _ = writeln!(
                out,
                "   The request reached firmware: QEMU says so, and the sidecar releases the \
                 lock it held on the blob meanwhile, so that an updater can change it.\n"
            );
        }
        Ok(())
    })();
    stop.trigger();
    match serving.join() {
        Ok(r) => r?,
        Err(_) => return Err(DemoError::Unexpected("the server thread panicked".into())),
    }
    flow?;
    let _ = writeln!(
        out,
        "Done: the sidecar stopped and removed its socket.\n\n\
         Next:\n  \
         - build a blob from AMD's certificates (snphost fetch) and check it:\n      \
         coco-sidecar blob import DIR certs.blob && coco-sidecar blob check certs.blob\n  \
         - serve it for one VM:\n      \
         coco-sidecar serve --socket /run/coco-sidecar/vm1.sock --certs certs.blob\n  \
         - point QEMU at that socket: docs/qemu.md; in Kubernetes: docs/kubernetes.md"
    );
    Ok(out)
}

/// The kernel that hands a guest's request to QEMU with records of `abi`.
fn kernel_name(abi: Abi) -> &'static str {
    match abi {
        Abi::SnpReqCerts => "Linux 7.0 or later (the KVM_EXIT_SNP_REQ_CERTS exit)",
        Abi::CocoRfc => "a kernel with the RFC series (the KVM_EXIT_COCO exit)",
    }
}

/// What a `ret` value means to the guest.
fn ret_words(ret: coco_protocol::CertsRet) -> &'static str {
    use coco_protocol::CertsRet;
    match ret {
        CertsRet::Ok => "0, success",
        CertsRet::NoSpace => "ENOSPC, too small",
        CertsRet::Again => "EAGAIN, try again soon",
        CertsRet::Io => "EIO, failed for good",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_chain_builds_a_two_page_table() {
        let t = sample_table();
        assert_eq!(t.entries().len(), 3);
        assert_eq!(t.pages(), 2);
    }
}
