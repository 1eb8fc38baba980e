//! `coco-sidecar blob import | show | export` through the real binary (issue 3): round trips
//! byte for byte, PEM and DER inputs giving the same blob, and the directories import refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coco_tests::sidecar_bin;
use coco_tests::updaters::listing;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn blob(args: &[&Path]) -> Output {
    Command::new(sidecar_bin())
        .arg("blob")
        .args(args)
        .output()
        .expect("run coco-sidecar blob")
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A directory holding `files` as (fixture, name) pairs.
fn dir_with(root: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    for (from, to) in files {
        std::fs::copy(fixture(from), d.join(to)).expect("copy fixture");
    }
    d
}

fn import(dir: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![p("import"), dir, out];
    args.extend(extra.iter().map(|s| p(s)));
    blob(&args)
}

#[test]
fn import_show_export_round_trips_byte_for_byte() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let src = dir_with(
        r,
        "src",
        &[
            ("synthetic/ark.der", "ark.der"),
            ("synthetic/ask.der", "ask.der"),
            ("synthetic/vcek.der", "vcek.der"),
            ("synthetic/crl.der", "crl.der"),
        ],
    );
    let first = r.join("first.blob");
    let o = import(&src, &first, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("created (4 entries"), "{}", text(&o));

    let o = blob(&[p("show"), &first]);
    assert!(o.status.success(), "{}", text(&o));
    let shown = text(&o);
    for kind in ["] ark ", "] ask ", "] vcek ", "] crl "] {
        assert!(shown.contains(kind), "{kind} missing:\n{shown}");
    }
    assert!(
        shown.contains("snp            22  (snpSPL 1.3.6.1.4.1.3704.1.3.3)"),
        "{shown}"
    );

    let der_out = r.join("der-out");
    let o = blob(&[p("export"), &first, &der_out, p("--format"), p("der")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        listing(&der_out),
        ["ark.der", "ask.der", "crl.der", "vcek.der"]
    );
    for name in listing(&der_out) {
        assert_eq!(
            std::fs::read(der_out.join(&name)).expect("exported"),
            std::fs::read(src.join(&name)).expect("source"),
            "{name} differs after import -> export"
        );
    }
    let second = r.join("second.blob");
    let o = import(&der_out, &second, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&first).expect("first"),
        std::fs::read(&second).expect("second")
    );

    // Exporting again refuses to overwrite, unless forced.
    let o = blob(&[p("export"), &first, &der_out, p("--format"), p("der")]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("exists; pass --force"), "{}", text(&o));
    let o = blob(&[
        p("export"),
        &first,
        &der_out,
        p("--format"),
        p("der"),
        p("--force"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn pem_and_der_inputs_give_the_same_blob() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    // AMD's own PEM files plus a DER VCEK ...
    let pem_src = dir_with(
        r,
        "pem",
        &[
            ("amd/ark-milan.pem", "ark.pem"),
            ("amd/ask-milan.pem", "ask.pem"),
            ("amd/vcek-milan.der", "vcek.der"),
        ],
    );
    let from_pem = r.join("from-pem.blob");
    let o = import(&pem_src, &from_pem, &[]);
    assert!(o.status.success(), "{}", text(&o));
    // ... exported as DER and imported again: the same bytes.
    let der_src = r.join("der");
    let o = blob(&[p("export"), &from_pem, &der_src, p("--format"), p("der")]);
    assert!(o.status.success(), "{}", text(&o));
    let from_der = r.join("from-der.blob");
    let o = import(&der_src, &from_der, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&from_pem).expect("pem blob"),
        std::fs::read(&from_der).expect("der blob")
    );
    // PEM export reproduces AMD's PEM files exactly, and imports to the same blob.
    let pem_out = r.join("pem-out");
    let o = blob(&[p("export"), &from_der, &pem_out]);
    assert!(o.status.success(), "{}", text(&o));
    for (name, original) in [
        ("ark.pem", "amd/ark-milan.pem"),
        ("ask.pem", "amd/ask-milan.pem"),
    ] {
        assert_eq!(
            std::fs::read_to_string(pem_out.join(name)).expect("exported"),
            std::fs::read_to_string(fixture(original)).expect("fixture"),
            "{name}"
        );
    }
    let again = r.join("again.blob");
    let o = import(&pem_out, &again, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&again).expect("again"),
        std::fs::read(&from_pem).expect("pem blob")
    );
    // Importing the same files into the served blob again changes nothing.
    let o = import(&pem_src, &from_pem, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("unchanged"), "{}", text(&o));
}

#[test]
fn vlek_directories_and_asvk_names() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let src = dir_with(
        r,
        "vlek",
        &[
            ("synthetic/ark.der", "ark.der"),
            ("synthetic/asvk.der", "asvk.der"),
            ("synthetic/vlek.der", "vlek.der"),
            ("synthetic/vcek.der", "vcek.der"),
        ],
    );
    let b = r.join("vlek.blob");
    let o = import(&src, &b, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("pass --use vcek or --use vlek"),
        "{}",
        text(&o)
    );
    assert!(!b.exists());
    let o = import(&src, &b, &["--use", "vlek"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = r.join("out");
    let o = blob(&[p("export"), &b, &out, p("--format"), p("der")]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(listing(&out), ["ark.der", "asvk.der", "vlek.der"]);
    // --use vcek with the ASVK: imports, but the VCEK's signer is missing: refused.
    let o = import(&src, &r.join("vcek.blob"), &["--use", "vcek"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("do not belong together"), "{}", text(&o));
}

/// What, which (fixture, name) files, extra arguments, expected message.
type ImportCase<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str], &'a str);

#[test]
fn import_refuses_what_it_cannot_place() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let out = r.join("out.blob");
    let cases: [ImportCase; 7] = [
        (
            "unknown file",
            &[
                ("synthetic/ark.der", "ark.der"),
                ("synthetic/vcek.der", "vcek.der"),
                ("synthetic/ask.der", "notes.txt"),
            ],
            &[],
            "notes.txt: not a certificate file import reads",
        ),
        (
            "ask and asvk",
            &[
                ("synthetic/ask.der", "ask.der"),
                ("synthetic/asvk.der", "asvk.der"),
                ("synthetic/vcek.der", "vcek.der"),
            ],
            &[],
            "are both the ask",
        ),
        (
            "two encodings of one",
            &[
                ("synthetic/ark.der", "ark.der"),
                ("amd/ark-milan.pem", "ark.pem"),
                ("synthetic/vcek.der", "vcek.der"),
            ],
            &[],
            "are both the ark",
        ),
        (
            "no VCEK or VLEK",
            &[
                ("synthetic/ark.der", "ark.der"),
                ("synthetic/ask.der", "ask.der"),
            ],
            &[],
            "pass --allow-no-vek",
        ),
        (
            "certificate where a CRL belongs",
            &[
                ("synthetic/vcek.der", "vcek.der"),
                ("synthetic/ark.der", "crl.der"),
            ],
            &[],
            "not a DER X.509 CRL",
        ),
        (
            "PEM with the wrong label",
            &[
                ("synthetic/vcek.der", "vcek.der"),
                ("amd/ark-milan.pem", "crl.pem"),
            ],
            &[],
            "PEM block is \"CERTIFICATE\", expected \"X509 CRL\"",
        ),
        (
            "empty directory",
            &[],
            &["--allow-no-vek"],
            "holds no certificate files",
        ),
    ];
    for (i, (what, files, extra, message)) in cases.into_iter().enumerate() {
        let d = dir_with(r, &format!("case{i}"), files);
        let o = import(&d, &out, extra);
        assert_eq!(o.status.code(), Some(2), "{what}: {}", text(&o));
        assert!(text(&o).contains(message), "{what}: {}", text(&o));
        assert!(!out.exists(), "{what}: nothing is written");
    }
    // Two PEM blocks in one file (a chain file) are refused too.
    let d = r.join("chain");
    std::fs::create_dir_all(&d).expect("mkdir");
    let chain = [
        std::fs::read_to_string(fixture("amd/ask-milan.pem")).expect("ask"),
        std::fs::read_to_string(fixture("amd/ark-milan.pem")).expect("ark"),
    ]
    .concat();
    std::fs::write(d.join("ask.pem"), chain).expect("write");
    std::fs::copy(fixture("amd/vcek-milan.der"), d.join("vcek.der")).expect("copy");
    let o = import(&d, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("holds 2 PEM blocks"), "{}", text(&o));
}

#[test]
fn opaque_entries_round_trip_as_guid_files() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let src = dir_with(r, "src", &[("synthetic/vcek.der", "vcek.der")]);
    let guid = "11111111-2222-3333-4444-555555555555";
    std::fs::write(src.join(format!("{guid}.bin")), b"vendor data").expect("write");
    let b = r.join("b.blob");
    let o = import(&src, &b, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = r.join("out");
    let o = blob(&[p("export"), &b, &out]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        listing(&out),
        [format!("{guid}.bin"), "vcek.pem".to_string()]
    );
    assert_eq!(
        std::fs::read(out.join(format!("{guid}.bin"))).expect("opaque"),
        b"vendor data"
    );
    let o = blob(&[p("check"), &b, p("--at"), p("2027-06-01T00:00:00Z")]);
    assert!(
        text(&o).contains("[1] unknown: GUID 11111111"),
        "{}",
        text(&o)
    );
}

/// The statuses of docs/operations.md, "Exit statuses", that the tests above do not reach:
/// `show` and `export` 2 for an invalid blob and 3 for a missing one, `import` 3 when it
/// cannot read its directory or write beside BLOB and 4 when BLOB stays locked (by another
/// process's fcntl lock) for all of `--wait-ms`. Nothing is written in any of them.
#[test]
fn failures_exit_with_the_documented_statuses() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let invalid = r.join("invalid.blob");
    std::fs::write(&invalid, b"not a certificate table").expect("write");
    let missing = r.join("missing.blob");
    let out = r.join("out");
    for (args, status) in [
        (vec![p("show"), &invalid], 2),
        (vec![p("show"), &missing], 3),
        (vec![p("export"), &invalid, &out], 2),
        (vec![p("export"), &missing, &out], 3),
    ] {
        let o = blob(&args);
        assert_eq!(o.status.code(), Some(status), "{args:?}: {}", text(&o));
    }
    assert!(!out.exists(), "export wrote nothing");

    let src = dir_with(
        r,
        "src",
        &[
            ("synthetic/ark.der", "ark.der"),
            ("synthetic/ask.der", "ask.der"),
            ("synthetic/vcek.der", "vcek.der"),
        ],
    );
    let o = import(&r.join("no-such-dir"), &r.join("a.blob"), &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let o = import(&src, &r.join("no-such-dir").join("a.blob"), &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));

    let served = r.join("served.blob");
    let o = import(&src, &served, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let before = std::fs::read(&served).expect("read");
    let with_crl = dir_with(r, "src", &[("synthetic/crl.der", "crl.der")]);
    let updater = coco_tests::HeldLock::take("exclusive", &served);
    let o = import(&with_crl, &served, &["--wait-ms", "100"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("another updater holds the exclusive lock"),
        "{}",
        text(&o)
    );
    updater.release();
    assert_eq!(std::fs::read(&served).expect("read"), before, "unchanged");
}
