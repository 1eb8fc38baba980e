//! The test guest started by a real libvirt (issue 11): the domain XML of
//! tests/libvirt/test-guest.xml.in names the patched QEMU in `<emulator>`, asks for memfd
//! shared guest RAM with `<memoryBacking>`, and adds the coco-sidecar object through
//! `<qemu:commandline>`, the way deploy/libvirt/snp-guest.xml does for a real SNP guest. The
//! guest reports what it got; `virsh destroy` and `virsh start` again work while the sidecar
//! keeps running.
//!
//! Needs `COCO_QEMU_BINS` (see qemu_kvm.rs) and a libvirtd answering on qemu:///system
//! (tests/libvirt/setup.sh starts one); otherwise one `SKIPPED:` line, or a failure with
//! `COCO_REQUIRE_LIBVIRT=1`.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use coco_tests::qemu::{fnv1a32, guest_image, qemu_bins, GuestParams, Req};
use coco_tests::{table_of_size, write_blob, Sidecar};

const URI: &str = "qemu:///system";
const TEMPLATE: &str = include_str!("../libvirt/test-guest.xml.in");

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("run virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn libvirt_available(test: &str) -> bool {
    let ok = Command::new("virsh")
        .args(["-c", URI, "list"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why = "no libvirtd answers on qemu:///system (tests/libvirt/setup.sh starts one)";
        assert!(
            std::env::var("COCO_REQUIRE_LIBVIRT").as_deref() != Ok("1"),
            "{test}: COCO_REQUIRE_LIBVIRT=1 but {why}"
        );
        println!("SKIPPED: {test}: {why}");
    }
    ok
}

/// Removes the domain, however the test ends.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

fn wait_done(serial: &Path, want_reqs: usize) -> Vec<Req> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert!(
            !lines.iter().any(|l| l.starts_with("FAIL")),
            "the guest failed:\n{text}"
        );
        if lines.iter().any(|l| l == "DONE") {
            let reqs = Req::all(&lines);
            assert_eq!(reqs.len(), want_reqs, "{text}");
            return reqs;
        }
        assert!(Instant::now() < deadline, "no DONE within 60 s:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_libvirt_domain_gets_its_certificates_and_restarts() {
    let test = "a_libvirt_domain_gets_its_certificates_and_restarts";
    let bins = qemu_bins(test);
    if bins.is_empty() || !libvirt_available(test) {
        return;
    }
    for bin in bins {
        eprintln!("{test}: QEMU {} ({})", bin.label, bin.path.display());
        let dir = tempfile::tempdir().expect("tempdir");
        let table = table_of_size(5000, 0x61);
        let blob = write_blob(dir.path(), "certs.bin", &table);
        let socket = dir.path().join("sidecar.sock");
        let _sidecar = Sidecar::start_at(
            tempfile::tempdir().expect("tempdir"),
            socket.clone(),
            &blob,
            &[],
        );

        let params = GuestParams {
            ncpus: 2,
            requests: 2,
            digests: [fnv1a32(&table), 0],
            ..GuestParams::default()
        };
        let loader = dir.path().join("guest.bin");
        std::fs::write(&loader, guest_image(&params)).expect("write image");
        let serial = dir.path().join("serial.log");
        let name = format!("coco-test-{}-{}", bin.label, std::process::id());
        let xml = TEMPLATE
            .replace("@NAME@", &name)
            .replace("@LOADER@", &loader.display().to_string())
            .replace("@EMULATOR@", &bin.path.display().to_string())
            .replace("@SERIAL@", &serial.display().to_string())
            .replace("@SOCKET@", &socket.display().to_string())
            .replace("@ABI@", "snp-req-certs");
        let xml_path = dir.path().join("domain.xml");
        std::fs::write(&xml_path, &xml).expect("write xml");

        // libvirt's own schema accepts it
        let out = Command::new("virt-xml-validate")
            .arg(&xml_path)
            .arg("domain")
            .output()
            .expect("virt-xml-validate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        virsh_ok(&["define", &xml_path.display().to_string()]);
        let _domain = Domain(name.clone());
        for round in 1..=2 {
            virsh_ok(&["start", &name]);
            let reqs = wait_done(&serial, 4);
            for r in &reqs {
                assert_eq!(r.digest, fnv1a32(&table), "round {round}: {r:?}");
                assert_eq!(r.pages, 2, "round {round}: {r:?}");
                assert_eq!(r.enospc, 1, "round {round}: {r:?}");
            }
            // libvirt made the guest RAM a shared memfd and passed the object through
            let log = std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log"))
                .expect("domain log");
            assert!(log.contains("memory-backend-memfd"), "{log}");
            assert!(
                log.contains("\"share\":true") || log.contains("share=on"),
                "{log}"
            );
            assert!(log.contains("\"qom-type\":\"coco-sidecar\""), "{log}");
            virsh_ok(&["destroy", &name]);
        }
    }
}
