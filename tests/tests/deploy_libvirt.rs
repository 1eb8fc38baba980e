//! The libvirt domain template for SEV-SNP guests (deploy/libvirt/snp-guest.xml, issue 11):
//! it validates against libvirt's own schema, and what it says about coco-sidecar is what the
//! test domain that a real libvirt starts (tests/libvirt/test-guest.xml.in,
//! tests/tests/qemu_libvirt.rs) says, but for the link to the guest object.
//!
//! The schema must know `<launchSecurity type='sev-snp'>` (libvirt 10.5 and later):
//! `COCO_LIBVIRT_SCHEMAS` names its directory (tests/libvirt/fetch-schemas.sh prints one).
//! Without it, or without xmllint, the validation prints one `SKIPPED:` line
//! (`COCO_REQUIRE_LIBVIRT=1` makes that a failure).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const TEMPLATE: &str = include_str!("../../deploy/libvirt/snp-guest.xml");
const TEST_DOMAIN: &str = include_str!("../libvirt/test-guest.xml.in");

/// `xml` without its comments, with every `@...@` field filled in.
fn filled(xml: &str) -> String {
    let mut text = String::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<!--") {
        text.push_str(&rest[..start]);
        let end = rest[start..].find("-->").expect("comment closed");
        rest = &rest[start + end + 3..];
    }
    text.push_str(rest);
    text.replace("@NAME@", "vm1")
        .replace("@EMULATOR@", "/usr/bin/qemu-system-x86_64")
        .replace("@FIRMWARE@", "/usr/share/ovmf/OVMF.amdsev.fd")
        .replace("@DISK@", "/var/lib/vms/vm1.qcow2")
        .replace("@LOADER@", "/var/lib/vms/guest.bin")
        .replace("@SERIAL@", "/var/log/vm1.serial")
        .replace("@SOCKET@", "/run/coco-sidecar/vm1.sock")
        .replace("@ABI@", "snp-req-certs")
}

fn schemas() -> Option<PathBuf> {
    let dir = std::env::var_os("COCO_LIBVIRT_SCHEMAS").map(PathBuf::from);
    let have_xmllint = Command::new("xmllint").arg("--version").output().is_ok();
    match dir {
        Some(d) if have_xmllint && d.join("domain.rng").is_file() => Some(d),
        _ => {
            let why = "COCO_LIBVIRT_SCHEMAS (a libvirt 10.5+ schema directory, see \
                       tests/libvirt/fetch-schemas.sh) or xmllint is missing";
            coco_tests::skip_unless_required(
                "COCO_REQUIRE_LIBVIRT",
                "the libvirt schema validation",
                why,
            );
            None
        }
    }
}

/// Whether `xml` validates against the domain schema; xmllint's complaint when not.
fn validates(schemas: &Path, name: &str, xml: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(name);
    std::fs::write(&file, xml).expect("write");
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--relaxng")
        .arg(schemas.join("domain.rng"))
        .arg(&file)
        .output()
        .expect("xmllint");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn validate(schemas: &Path, name: &str, xml: &str) {
    if let Err(e) = validates(schemas, name, xml) {
        panic!("{name} does not validate:\n{e}");
    }
}

#[test]
fn the_templates_validate_against_libvirts_schema() {
    let Some(schemas) = schemas() else {
        return;
    };
    validate(&schemas, "snp-guest.xml", &filled(TEMPLATE));
    validate(&schemas, "test-guest.xml", &filled(TEST_DOMAIN));
    // The schema is not a rubber stamp: an unknown launch security type is refused
    let wrong = filled(TEMPLATE).replace("type='sev-snp'", "type='sev-snq'");
    let ok = validates(&schemas, "wrong.xml", &wrong).is_ok();
    assert!(!ok, "the schema accepted launchSecurity type sev-snq");
}

/// What the KubeVirt domain hook returns is a domain libvirt accepts (issue 17): the
/// KubeVirt-shaped inputs of kubevirt/tests/fixtures and the hook's golden results for them;
/// an argument outside QEMU's namespace is refused.
#[test]
fn the_kubevirt_hooks_domains_validate_against_libvirts_schema() {
    let Some(schemas) = schemas() else {
        return;
    };
    let golden = include_str!("../../kubevirt/tests/fixtures/domain-plugin.golden.xml");
    for (name, xml) in [
        (
            "domain-legacy.xml",
            include_str!("../../kubevirt/tests/fixtures/domain-legacy.xml"),
        ),
        (
            "domain-plugin.xml",
            include_str!("../../kubevirt/tests/fixtures/domain-plugin.xml"),
        ),
        (
            "domain-plugin-rerun.xml",
            include_str!("../../kubevirt/tests/fixtures/domain-plugin-rerun.xml"),
        ),
        (
            "domain-legacy.golden.xml",
            include_str!("../../kubevirt/tests/fixtures/domain-legacy.golden.xml"),
        ),
        ("domain-plugin.golden.xml", golden),
    ] {
        validate(&schemas, name, xml);
    }
    let broken = golden.replace(
        "<arg value=\"-object\"/>",
        "<arg xmlns=\"urn:not-qemu\" value=\"-object\"/>",
    );
    assert!(
        validates(&schemas, "broken.xml", &broken).is_err(),
        "an argument outside QEMU's namespace passed"
    );
}

/// The text between `<tag` and `</tag>`, inclusive, the only one in `xml`.
fn element<'a>(xml: &'a str, tag: &str) -> &'a str {
    let start = xml.find(&format!("<{tag}")).expect("element");
    let close = format!("</{tag}>");
    let end = xml[start..].find(&close).expect("closed") + start + close.len();
    assert!(!xml[end..].contains(&format!("<{tag}")), "one <{tag}>");
    &xml[start..end]
}

/// The coco-sidecar object of the domain's `<qemu:commandline>`.
fn sidecar_object(xml: &str) -> serde_json::Map<String, Value> {
    let cmdline = element(xml, "qemu:commandline");
    let values: Vec<&str> = cmdline
        .split("value='")
        .skip(1)
        .filter_map(|v| v.split('\'').next())
        .collect();
    assert_eq!(values.len(), 2, "-object and its JSON: {values:?}");
    assert_eq!(values[0], "-object");
    let Value::Object(o) = serde_json::from_str(values[1]).expect("JSON object") else {
        panic!("not an object: {}", values[1]);
    };
    o
}

#[test]
fn the_template_and_the_tested_domain_agree_on_coco_sidecar() {
    let prod = filled(TEMPLATE);
    let test = filled(TEST_DOMAIN);

    // Shared memfd guest RAM, the same way
    assert_eq!(
        element(&prod, "memoryBacking"),
        element(&test, "memoryBacking")
    );
    assert!(element(&prod, "memoryBacking").contains("<source type='memfd'/>"));
    assert!(element(&prod, "memoryBacking").contains("<access mode='shared'/>"));

    // The same object, but for what links it to a guest
    let mut p = sidecar_object(&prod);
    let mut t = sidecar_object(&test);
    assert_eq!(p.remove("snp-guest"), Some(Value::from("lsec0")));
    assert_eq!(
        t.remove("x-emulate-exit"),
        Some(Value::from("snp-req-certs"))
    );
    assert_eq!(p.get("qom-type"), Some(&Value::from("coco-sidecar")));
    assert_eq!(p["socket"]["type"], "unix");
    assert_eq!(p, t, "the objects differ beyond the guest link");

    // libvirt's sev-snp-guest object is lsec0; a real guest has it, the test domain cannot
    assert!(prod.contains("<launchSecurity type='sev-snp'>"));
    assert!(!test.contains("<launchSecurity"));
}
