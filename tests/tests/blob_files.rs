//! `coco-sidecar blob import | show | export` through the real binary (issue 3): round trips
//! byte for byte, PEM and DER inputs giving the same blob, and the directories import refuses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coco_tests::sidecar_bin;
use coco_tests::updaters::{listing, output_text as text};

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
            "or pass --allow-incomplete",
        ),
        (
            "certificate where a CRL belongs",
            &[
                ("synthetic/vcek.der", "vcek.der"),
                ("synthetic/ark.der", "crl.der"),
            ],
            &["--allow-incomplete"],
            "not a DER X.509 CRL",
        ),
        (
            "PEM with the wrong label",
            &[
                ("synthetic/vcek.der", "vcek.der"),
                ("amd/ark-milan.pem", "crl.pem"),
            ],
            &["--allow-incomplete"],
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
    let o = import(&src, &b, &["--allow-incomplete"]);
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

/// The AMD Turin chain's files, as snphost writes them.
const TURIN: [(&str, &str); 3] = [
    ("amd/ark-turin.pem", "ark.pem"),
    ("amd/ask-turin.pem", "ask.pem"),
    ("amd/vcek-turin.der", "vcek.der"),
];

#[test]
fn arguments_mixed_up_are_named_with_the_fix() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let certs = dir_with(r, "certs", &TURIN);
    let good = r.join("good.blob");
    assert!(import(&certs, &good, &[]).status.success());
    // (arguments, exit status, what the message must say)
    let vcek = certs.join("vcek.der");
    let (x, under_file, no_dir) = (
        r.join("x.blob"),
        vcek.join("certs.blob"),
        r.join("no/such/dir/certs.blob"),
    );
    let cases: Vec<(Vec<&Path>, i32, String)> = vec![
        // A blob where the directory goes.
        (
            vec![p("import"), &good, &x],
            3,
            format!("DIR {}: is a file, not a directory", good.display()),
        ),
        // A directory where a blob goes.
        (
            vec![p("show"), &certs],
            3,
            format!("BLOB {}: is a directory, not a blob file", certs.display()),
        ),
        (
            vec![p("install"), &certs, &good],
            3,
            format!("NEW {}: is a directory", certs.display()),
        ),
        (
            vec![p("install"), &good, &certs],
            3,
            format!("BLOB {}: is a directory", certs.display()),
        ),
        // Under a file: the file is named, not "Not a directory (os error 20)".
        (
            vec![p("check"), &under_file],
            3,
            format!("{} is a file, not a directory", vcek.display()),
        ),
        (
            vec![p("install"), &good, &no_dir],
            3,
            format!("({} does not exist either)", r.join("no").display()),
        ),
        (
            vec![p("lock"), &certs, p("--"), p("true")],
            125,
            format!("BLOB {}: is a directory", certs.display()),
        ),
        // A blob where export's output directory goes.
        (
            vec![p("export"), &good, &good],
            3,
            format!(
                "DIR {}: is a file, not a directory: export writes",
                good.display()
            ),
        ),
        // The parent of the certificate directory: import names the one to give.
        (
            vec![p("import"), r, &x],
            2,
            format!("`coco-sidecar blob import {} BLOB`?", certs.display()),
        ),
    ];
    for (args, code, message) in cases {
        let o = blob(&args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(&message),
            "{args:?}: {message:?} in {}",
            text(&o)
        );
        assert!(!text(&o).contains("os error"), "{args:?}: {}", text(&o));
    }
    assert!(!r.join("x.blob").exists());
}

#[test]
fn an_incomplete_chain_is_refused_unless_allowed_and_warnings_are_counted() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let no_ark = dir_with(r, "no-ark", &TURIN[1..]);
    let out = r.join("out.blob");
    let o = import(&no_ark, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("the directory has no ark.*"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("--allow-incomplete"), "{}", text(&o));
    assert!(!out.exists());
    let no_ask = dir_with(r, "no-ask", &[TURIN[0], TURIN[2]]);
    let o = import(&no_ask, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("has no ask.*"), "{}", text(&o));

    // Allowed: installed, and the success line says how many warnings came with it (the
    // missing ARK, and the ASK's signature that nothing checks).
    let o = import(&no_ark, &out, &["--allow-incomplete"]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("created (2 entries"), "{stdout}");
    assert!(stdout.contains("2 warning(s), printed above"), "{stdout}");
    let complete = dir_with(r, "complete", &TURIN);
    let o = import(&complete, &r.join("ok.blob"), &[]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("; no warnings)"),
        "{}",
        text(&o)
    );

    // --strict refuses warnings without calling the blob invalid.
    let o = blob(&[p("install"), &out, &r.join("ok.blob"), p("--strict")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("refused under --strict: ")
            && text(&o).contains("is valid but has 2 warning(s)"),
        "{}",
        text(&o)
    );
    assert!(
        !text(&o).contains("not a valid certificate blob"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_broken_pem_file_is_refused_with_its_line() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let d = dir_with(r, "d", &TURIN);
    let ask = std::fs::read_to_string(d.join("ask.pem")).expect("read");
    // Line 5 of ask.pem (the 4th line of base64) gets a character base64 does not have.
    let mut lines: Vec<String> = ask.lines().map(str::to_owned).collect();
    lines[4].replace_range(10..11, "#");
    std::fs::write(d.join("ask.pem"), lines.join("\n") + "\n").expect("write");
    let o = import(&d, &r.join("x.blob"), &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "{}: line 5: '#' in column 11 is not base64",
            d.join("ask.pem").display()
        )),
        "{}",
        text(&o)
    );
    // Cut after its fourth line: no END line.
    std::fs::write(d.join("ask.pem"), lines[..4].join("\n")).expect("write");
    let o = import(&d, &r.join("x.blob"), &[]);
    assert!(
        text(&o).contains(
            "line 1: \"-----BEGIN CERTIFICATE-----\" has no \"-----END CERTIFICATE-----\" line"
        ),
        "{}",
        text(&o)
    );
}

#[test]
fn show_prints_the_expect_tcb_value_and_check_wants_all_of_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let b = r.join("turin.blob");
    assert!(import(&dir_with(r, "t", &TURIN), &b, &[]).status.success());
    // The Turin VCEK's TCB extensions (openssl asn1parse of vcek-turin.der): fmcSPL 0, blSPL
    // 0, teeSPL 0, snpSPL 0, ucodeSPL 9.
    let value = "bl=0,tee=0,snp=0,ucode=9,fmc=0";
    let o = blob(&[p("show"), &b]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("\n  --expect-tcb {value}\n")),
        "{}",
        text(&o)
    );
    let o = blob(&[p("show"), &b, p("--json")]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["expect_tcb"], value);
    // The value passes check; leaving out fmc, which a Turin VCEK carries, does not.
    let o = blob(&[p("check"), &b, p("--expect-tcb"), p(value)]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = blob(&[
        p("check"),
        &b,
        p("--expect-tcb"),
        p("bl=0,tee=0,snp=0,ucode=9"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("leaves out fmc, which this Turin VCEK carries"),
        "{}",
        text(&o)
    );
}
