//! What the hook returns is a domain libvirt accepts (issue 17): the golden results, and the
//! KubeVirt-shaped inputs they come from, validate against libvirt's own RelaxNG schema
//! (libvirt 10.5 or later, for `<launchSecurity type='sev-snp'>`); a result whose QEMU
//! arguments lost their namespace does not.
//!
//! `COCO_LIBVIRT_SCHEMAS` names the schema directory (tests/libvirt/fetch-schemas.sh prints
//! one). Without it, or without xmllint, one `SKIPPED:` line (`COCO_REQUIRE_LIBVIRT=1` makes
//! that a failure).

use std::path::PathBuf;
use std::process::Command;

fn schemas() -> Option<PathBuf> {
    let dir = std::env::var_os("COCO_LIBVIRT_SCHEMAS").map(PathBuf::from);
    let have_xmllint = Command::new("xmllint").arg("--version").output().is_ok();
    match dir {
        Some(d) if have_xmllint && d.join("domain.rng").is_file() => Some(d),
        _ => {
            let why = "COCO_LIBVIRT_SCHEMAS (a libvirt 10.5+ schema directory, see \
                       tests/libvirt/fetch-schemas.sh) or xmllint is missing";
            assert!(
                std::env::var("COCO_REQUIRE_LIBVIRT").as_deref() != Ok("1"),
                "COCO_REQUIRE_LIBVIRT=1 but {why}"
            );
            println!("SKIPPED: the hook's domains against libvirt's schema: {why}");
            None
        }
    }
}

fn valid(schemas: &std::path::Path, xml: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("domain.xml");
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

#[test]
fn the_hooks_domains_validate_against_libvirts_schema() {
    let Some(schemas) = schemas() else {
        return;
    };
    for (name, xml) in [
        (
            "domain-legacy.xml",
            include_str!("fixtures/domain-legacy.xml"),
        ),
        (
            "domain-plugin.xml",
            include_str!("fixtures/domain-plugin.xml"),
        ),
        (
            "domain-plugin-rerun.xml",
            include_str!("fixtures/domain-plugin-rerun.xml"),
        ),
        (
            "domain-legacy.golden.xml",
            include_str!("fixtures/domain-legacy.golden.xml"),
        ),
        (
            "domain-plugin.golden.xml",
            include_str!("fixtures/domain-plugin.golden.xml"),
        ),
    ] {
        if let Err(e) = valid(&schemas, xml) {
            panic!("{name} does not validate:\n{e}");
        }
    }
    // The schema checks the QEMU namespace: <arg> outside it is refused
    let broken = include_str!("fixtures/domain-plugin.golden.xml").replace(
        "<arg value=\"-object\"/>",
        "<arg xmlns=\"urn:not-qemu\" value=\"-object\"/>",
    );
    assert!(
        valid(&schemas, &broken).is_err(),
        "an arg outside QEMU's namespace passed"
    );
}
