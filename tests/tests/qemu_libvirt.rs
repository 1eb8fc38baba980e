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

use std::path::{Path, PathBuf};
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
        coco_tests::skip_unless_required("COCO_REQUIRE_LIBVIRT", test, why);
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

/// The test guest's image in `dir` (two vCPUs, two requests each, expecting `table`), and
/// the path of its serial log.
fn guest_files(dir: &Path, table: &[u8]) -> (PathBuf, PathBuf) {
    let params = GuestParams {
        ncpus: 2,
        requests: 2,
        digests: [fnv1a32(table), 0],
        ..GuestParams::default()
    };
    let loader = dir.join("guest.bin");
    std::fs::write(&loader, guest_image(&params)).expect("write image");
    (loader, dir.join("serial.log"))
}

/// `template` with the fields every test domain has filled in.
fn fill(template: &str, name: &str, loader: &Path, emulator: &Path, serial: &Path) -> String {
    template
        .replace("@NAME@", name)
        .replace("@LOADER@", &loader.display().to_string())
        .replace("@EMULATOR@", &emulator.display().to_string())
        .replace("@SERIAL@", &serial.display().to_string())
}

/// Writes `xml` to `path` and checks it with libvirt's own schema.
fn write_valid(path: &Path, xml: &str) {
    std::fs::write(path, xml).expect("write xml");
    let out = Command::new("virt-xml-validate")
        .arg(path)
        .arg("domain")
        .output()
        .expect("virt-xml-validate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the defined domain `name`; both vCPUs get `table` twice (through the probe and
/// ENOSPC), and libvirt gave QEMU shared memfd guest RAM and the coco-sidecar object.
/// Returns libvirt's log of the QEMU command line.
fn start_served(name: &str, serial: &Path, table: &[u8], round: u32) -> String {
    virsh_ok(&["start", name]);
    for r in wait_done(serial, 4) {
        assert_eq!(r.digest, fnv1a32(table), "round {round}: {r:?}");
        assert_eq!(r.pages, 2, "round {round}: {r:?}");
        assert_eq!(r.enospc, 1, "round {round}: {r:?}");
    }
    let log =
        std::fs::read_to_string(format!("/var/log/libvirt/qemu/{name}.log")).expect("domain log");
    assert!(log.contains("memory-backend-memfd"), "{log}");
    assert!(
        log.contains("\"share\":true") || log.contains("share=on"),
        "{log}"
    );
    assert!(log.contains("\"qom-type\":\"coco-sidecar\""), "{log}");
    log
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

        let (loader, serial) = guest_files(dir.path(), &table);
        let name = format!("coco-test-{}-{}", bin.label, std::process::id());
        let xml = fill(TEMPLATE, &name, &loader, &bin.path, &serial)
            .replace("@SOCKET@", &socket.display().to_string())
            .replace("@ABI@", "snp-req-certs");
        let xml_path = dir.path().join("domain.xml");
        write_valid(&xml_path, &xml);

        virsh_ok(&["define", &xml_path.display().to_string()]);
        let _domain = Domain(name.clone());
        for round in 1..=2 {
            start_served(&name, &serial, &table, round);
            virsh_ok(&["destroy", &name]);
        }
    }
}

/// A domain shaped like the one KubeVirt's virt-launcher defines for an SEV-SNP VMI (no
/// `<memoryBacking>`, `<launchSecurity type="sev-snp">`, `xmlns:qemu` on `<domain>`), with
/// this machine's guest as firmware and the patched QEMU as emulator.
const KUBEVIRT_DOMAIN: &str = r#"<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
	<name>@NAME@</name>
	<memory unit="b">67108864</memory>
	<os>
		<type arch="x86_64" machine="q35">hvm</type>
		<loader type="rom">@LOADER@</loader>
	</os>
	<devices>
		<emulator>@EMULATOR@</emulator>
		<controller type="usb" index="0" model="none"></controller>
		<serial type="file">
			<source path="@SERIAL@" append="off"></source>
			<target port="0"></target>
		</serial>
		<memballoon model="none"></memballoon>
	</devices>
	<metadata>
		<kubevirt xmlns="http://kubevirt.io">
			<uid>5f3c1a2e-8d4b-4c6e-9a1f-2b7d8e9c0a11</uid>
		</kubevirt>
	</metadata>
	<features>
		<acpi></acpi>
	</features>
	<cpu mode="custom" match="exact" check="none">
		<model fallback="forbid">qemu64</model>
		<feature policy="disable" name="svm"></feature>
	</cpu>
	<vcpu placement="static">2</vcpu>
	<on_poweroff>destroy</on_poweroff>
	<launchSecurity type="sev-snp">
		<policy>0x30000</policy>
	</launchSecurity>
</domain>"#;

/// The KubeVirt hook's result starts under the real libvirt and its guest gets certificates
/// from the coco-sidecar that `coco-kubevirt-hook run` supervises (issue 17). This machine has
/// no SEV-SNP, so between the hook and libvirt the test makes the two changes that
/// tests/libvirt/test-guest.xml.in makes to a real SNP domain: no `<launchSecurity>`, and the
/// object stands in for the kernel's exit (`x-emulate-exit`) instead of linking to `lsec0`.
/// Everything else (memfd shared guest RAM, the object and its socket path) is the hook's.
#[test]
fn a_kubevirt_domain_after_the_hook_gets_certificates_under_libvirt() {
    let test = "a_kubevirt_domain_after_the_hook_gets_certificates_under_libvirt";
    let bins = qemu_bins(test);
    if bins.is_empty() || !libvirt_available(test) {
        return;
    }
    let hook = coco_tests::workspace_bin("coco-kubevirt-hook", "COCO_KUBEVIRT_HOOK_BIN");
    for bin in bins {
        eprintln!("{test}: QEMU {} ({})", bin.label, bin.path.display());
        let dir = tempfile::tempdir().expect("tempdir");
        let table = table_of_size(5000, 0x17);
        let blob = write_blob(dir.path(), "certs.bin", &table);
        let pod = dir.path().join("pod");
        let log = std::fs::File::create(dir.path().join("run.log")).expect("log");
        let mut run = Command::new(&hook)
            .arg("run")
            .arg("--dir")
            .arg(&pod)
            .arg("--certs")
            .arg(&blob)
            .arg("--sidecar")
            .arg(coco_tests::sidecar_bin())
            // QEMU runs as root on this machine (tests/libvirt/setup.sh)
            .args(["--allow-uid", "0"])
            .stderr(log)
            .spawn()
            .expect("coco-kubevirt-hook run");
        struct Kill<'a>(&'a mut std::process::Child);
        impl Drop for Kill<'_> {
            fn drop(&mut self) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
                let _ = self.0.wait();
            }
        }
        let _run = Kill(&mut run);

        let (loader, serial) = guest_files(dir.path(), &table);
        let name = format!("coco-kubevirt-{}-{}", bin.label, std::process::id());
        let domain = dir.path().join("kubevirt.xml");
        std::fs::write(
            &domain,
            fill(KUBEVIRT_DOMAIN, &name, &loader, &bin.path, &serial),
        )
        .expect("write domain");
        let vmi = dir.path().join("vmi.json");
        std::fs::write(
            &vmi,
            include_str!("../../kubevirt/tests/fixtures/vmi-snp.json"),
        )
        .expect("write vmi");

        let out = Command::new(&hook)
            .arg("mutate")
            .arg("--dir")
            .arg(&pod)
            .arg("--vmi")
            .arg(&vmi)
            .arg("--domain")
            .arg(&domain)
            .output()
            .expect("coco-kubevirt-hook mutate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let hooked = String::from_utf8(out.stdout).expect("utf-8");
        let socket = pod.join("coco/sidecar.sock");
        assert!(
            hooked.contains(r#"<source type="memfd"/><access mode="shared"/>"#),
            "{hooked}"
        );
        let object = format!(
            "&quot;path&quot;:&quot;{}&quot;}},&quot;snp-guest&quot;:&quot;lsec0&quot;",
            socket.display()
        );
        assert_eq!(hooked.matches(&object).count(), 1, "{hooked}");

        // This machine's stand-in for SEV-SNP, as in tests/libvirt/test-guest.xml.in
        let start = hooked.find("<launchSecurity").expect("launchSecurity");
        let end = hooked.find("</launchSecurity>").expect("closed") + "</launchSecurity>".len();
        let runnable = format!("{}{}", &hooked[..start], &hooked[end..]).replace(
            "&quot;snp-guest&quot;:&quot;lsec0&quot;",
            "&quot;x-emulate-exit&quot;:&quot;snp-req-certs&quot;",
        );
        assert!(!runnable.contains("lsec0") && !runnable.contains("launchSecurity"));
        let xml_path = dir.path().join("domain.xml");
        write_valid(&xml_path, &runnable);

        virsh_ok(&["define", &xml_path.display().to_string()]);
        let _domain = Domain(name.clone());
        let qemu_log = start_served(&name, &serial, &table, 1);
        assert!(
            qemu_log.contains(&socket.display().to_string()),
            "{qemu_log}"
        );
        virsh_ok(&["destroy", &name]);
    }
}
