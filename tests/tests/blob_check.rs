//! `coco-sidecar blob check` (and `install`'s refusals) through the real binary (issue 3):
//! AMD's real ARK -> ASK -> VCEK chains, a flipped signature byte, every malformed table, the
//! synthetic VCEK/VLEK chains with AMD's TCB extensions, validity times and CRLs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use coco_protocol::table::{CertKind, Guid, Table};
use coco_tests::sidecar_bin;
use coco_tests::updaters::{output_text as text, synth};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures");
/// Inside every fixture certificate's validity.
const AT: &str = "2027-06-01T00:00:00Z";

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn blob(args: &[&str]) -> Output {
    Command::new(sidecar_bin())
        .arg("blob")
        .args(args)
        .output()
        .expect("run coco-sidecar blob")
}

/// Runs `blob check` and returns (exit code, all output).
fn check(path: &Path, extra: &[&str]) -> (i32, String) {
    let p = path.to_str().expect("utf-8 path");
    let o = blob(&[&["check", p], extra].concat());
    (o.status.code().expect("exit code"), text(&o))
}

/// DER of a PEM fixture (the AMD ones are PEM), decoded by the tool itself via export.
fn der_of(dir: &Path, kind: &str, files: &[(&str, &str)]) -> Vec<u8> {
    let src = dir.join(format!("src-{kind}"));
    std::fs::create_dir_all(&src).expect("mkdir");
    for (from, to) in files {
        std::fs::copy(fixture(from), src.join(to)).expect("copy fixture");
    }
    let b = dir.join(format!("{kind}.blob"));
    let o = blob(&[
        "import",
        src.to_str().expect("utf-8"),
        b.to_str().expect("utf-8"),
        "--allow-no-vek",
    ]);
    assert!(o.status.success(), "import: {}", text(&o));
    let bytes = std::fs::read(&b).expect("read blob");
    let t = Table::parse(&bytes).expect("valid");
    let e = t
        .entries()
        .iter()
        .find(|e| e.kind().map(CertKind::name) == Some(kind))
        .expect("entry");
    t.data(e).to_vec()
}

fn build(certs: &[(CertKind, &[u8])]) -> Vec<u8> {
    let refs: Vec<(Guid, &[u8])> = certs.iter().map(|(k, d)| (k.guid(), *d)).collect();
    Table::build(&refs).expect("valid table").into_bytes()
}

/// A table laid out without validation, for what `Table::build` refuses.
fn raw_table(certs: &[(CertKind, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; (certs.len() + 1) * 24];
    for (i, (kind, data)) in certs.iter().enumerate() {
        let at = b.len() as u32;
        b[i * 24..i * 24 + 16].copy_from_slice(&kind.guid().0);
        set_entry(&mut b, i, at, data.len() as u32);
        b.extend_from_slice(data);
    }
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

#[test]
fn real_amd_chains_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (generation, vcek) in [("milan", true), ("turin", true), ("genoa", false)] {
        let src = dir.path().join(generation);
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::copy(
            fixture(&format!("amd/ark-{generation}.pem")),
            src.join("ark.pem"),
        )
        .expect("copy");
        std::fs::copy(
            fixture(&format!("amd/ask-{generation}.pem")),
            src.join("ask.pem"),
        )
        .expect("copy");
        if vcek {
            std::fs::copy(
                fixture(&format!("amd/vcek-{generation}.der")),
                src.join("vcek.der"),
            )
            .expect("copy");
        }
        let b = dir.path().join(format!("{generation}.blob"));
        let o = blob(&[
            "import",
            src.to_str().expect("utf-8"),
            b.to_str().expect("utf-8"),
            "--allow-no-vek",
        ]);
        assert!(o.status.success(), "{generation}: {}", text(&o));
        let (code, out) = check(&b, &["--at", "2025-06-01T00:00:00Z"]);
        let name = format!("{}{}", &generation[..1].to_uppercase(), &generation[1..]);
        assert!(out.contains(&format!("ARK-{name} is self-signed")), "{out}");
        assert!(
            out.contains(&format!("is AMD's published ARK-{name} root")),
            "{out}"
        );
        assert!(out.contains("[1] ask: signed by the ARK"), "{out}");
        if vcek {
            assert_eq!(code, 0, "{generation}: {out}");
            assert!(out.contains("[2] vcek: signed by the ASK"), "{out}");
            assert!(out.contains("GOOD"), "{out}");
        } else {
            assert_eq!(code, 1, "no VCEK is a warning: {out}");
            assert!(out.contains("no VCEK or VLEK"), "{out}");
        }
    }
}

#[test]
fn real_turin_vcek_tcb_is_decoded_and_compared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ark = der_of(dir.path(), "ark", &[("amd/ark-turin.pem", "ark.pem")]);
    let ask = der_of(dir.path(), "ask", &[("amd/ask-turin.pem", "ask.pem")]);
    let vcek = std::fs::read(fixture("amd/vcek-turin.der")).expect("vcek");
    let b = write(
        dir.path(),
        "t.blob",
        &build(&[
            (CertKind::Ark, &ark),
            (CertKind::Ask, &ask),
            (CertKind::Vcek, &vcek),
        ]),
    );
    let o = blob(&["show", b.to_str().expect("utf-8")]);
    let shown = text(&o);
    assert!(o.status.success(), "{shown}");
    for needle in [
        "fmc",
        "fmcSPL 1.3.6.1.4.1.3704.1.3.9",
        "product_name   Turin",
        "hw_id          1e550a8ee5cf9f4d",
    ] {
        assert!(shown.contains(needle), "{needle} missing:\n{shown}");
    }
    let (code, out) = check(&b, &["--at", "2025-06-01T00:00:00Z"]);
    assert_eq!(code, 0, "{out}");
    let o = blob(&["show", "--json", b.to_str().expect("utf-8")]);
    let json = text(&o);
    assert!(json.contains("\"key\": \"fmc\""), "{json}");
    assert!(json.contains("\"oid\": \"1.3.6.1.4.1.3704.1.4\""), "{json}");
}

#[test]
fn one_flipped_signature_byte_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ark = der_of(dir.path(), "ark", &[("amd/ark-milan.pem", "ark.pem")]);
    let ask = der_of(dir.path(), "ask", &[("amd/ask-milan.pem", "ask.pem")]);
    let vcek = std::fs::read(fixture("amd/vcek-milan.der")).expect("vcek");
    let at = ["--at", "2025-06-01T00:00:00Z"];

    let good = write(
        dir.path(),
        "good.blob",
        &build(&[
            (CertKind::Ark, &ark),
            (CertKind::Ask, &ask),
            (CertKind::Vcek, &vcek),
        ]),
    );
    assert_eq!(check(&good, &at).0, 0);

    // The signature BIT STRING ends each certificate: its last byte is a signature byte.
    let flip = |d: &[u8]| {
        let mut d = d.to_vec();
        let last = d.len() - 1;
        d[last] ^= 0x01;
        d
    };
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "ask",
            build(&[
                (CertKind::Ark, &ark),
                (CertKind::Ask, &flip(&ask)),
                (CertKind::Vcek, &vcek),
            ]),
            "[1] ask: signature by the ARK: the signature does not verify with the key of ARK-Milan",
        ),
        (
            "ark",
            build(&[
                (CertKind::Ark, &flip(&ark)),
                (CertKind::Ask, &ask),
                (CertKind::Vcek, &vcek),
            ]),
            "[0] ark: self-signature: the signature does not verify with the key of ARK-Milan",
        ),
        (
            "vcek",
            build(&[
                (CertKind::Ark, &ark),
                (CertKind::Ask, &ask),
                (CertKind::Vcek, &flip(&vcek)),
            ]),
            "[2] vcek: signature by the ASK: the signature does not verify with the key of SEV-Milan",
        ),
    ];
    for (what, bytes, message) in cases {
        let b = write(dir.path(), &format!("{what}.blob"), &bytes);
        let (code, out) = check(&b, &at);
        assert_eq!(code, 2, "{what}: {out}");
        assert!(out.contains(message), "{what}: {out}");
        assert!(out.contains("INVALID"), "{out}");
        // install refuses it and leaves the target alone.
        let before = std::fs::read(&good).expect("read");
        let o = blob(&[
            "install",
            b.to_str().expect("utf-8"),
            good.to_str().expect("utf-8"),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains(message), "{}", text(&o));
        assert_eq!(std::fs::read(&good).expect("read"), before);
    }
}

fn set_entry(b: &mut [u8], i: usize, offset: u32, length: u32) {
    b[i * 24 + 16..i * 24 + 20].copy_from_slice(&offset.to_le_bytes());
    b[i * 24 + 20..i * 24 + 24].copy_from_slice(&length.to_le_bytes());
}

fn entry(b: &[u8], i: usize) -> (u32, u32) {
    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    (word(i * 24 + 16), word(i * 24 + 20))
}

#[test]
fn every_malformed_blob_has_a_precise_message_and_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ark, ask, vcek) = (synth("ark"), synth("ask"), synth("vcek"));
    let good = build(&[
        (CertKind::Ark, &ark),
        (CertKind::Ask, &ask),
        (CertKind::Vcek, &vcek),
    ]);
    let target = write(dir.path(), "served.blob", &good);
    let len = good.len() as u32;
    let (off0, len0) = entry(&good, 0);
    let (off1, _) = entry(&good, 1);

    let mut cases: Vec<(&str, Vec<u8>, String)> = Vec::new();
    cases.push((
        "truncated entry",
        good[..40].to_vec(),
        "no all-zero terminator entry within the 40 bytes".into(),
    ));
    cases.push((
        "missing terminator",
        good[..72].to_vec(),
        "no all-zero terminator entry within the 72 bytes".into(),
    ));
    cases.push((
        "truncated data",
        good[..good.len() - 10].to_vec(),
        format!("entry 2 ({}) data", CertKind::Vcek.guid()),
    ));
    let mut b = good.clone();
    set_entry(&mut b, 1, len + 10, 100);
    cases.push((
        "offset past the end",
        b,
        format!(
            "data {}+100 runs past the end of the {len} bytes (ask)",
            len + 10
        ),
    ));
    let mut b = good.clone();
    set_entry(&mut b, 1, off0, len0);
    cases.push(("overlapping entries", b, "entries 0 and 1 overlap".into()));
    let mut b = good.clone();
    set_entry(&mut b, 0, off0, 0);
    cases.push(("length 0", b, "has length 0 (ark)".into()));
    let mut b = good.clone();
    set_entry(&mut b, 1, off1, u32::MAX);
    cases.push((
        "giant length",
        b,
        format!("data {off1}+4294967295 runs past the end"),
    ));
    let mut b = good.clone();
    b[off0 as usize] = 0x04;
    cases.push((
        "non-DER bytes",
        b,
        "entry 0 (ark) is not a DER object of exactly".into(),
    ));
    cases.push((
        "PEM text in an entry",
        raw_table(&[(CertKind::Ark, b"-----BEGIN CERTIFICATE-----\nMIIB\n")]),
        "does not start with a SEQUENCE tag".into(),
    ));
    let mut b = good.clone();
    b.extend_from_slice(&[0; 7]);
    cases.push((
        "trailing bytes",
        b,
        "7 bytes follow the last certificate".into(),
    ));
    let mut b = good.clone();
    b[24..40].copy_from_slice(&CertKind::Ark.guid().0);
    cases.push((
        "duplicate GUID",
        b,
        "entries 0 and 1 both carry GUID".into(),
    ));
    let vlek = synth("vlek");
    let both = raw_table(&[(CertKind::Vcek, &vcek), (CertKind::Vlek, &vlek)]);
    cases.push(("VCEK and VLEK", both, "holds both a VCEK and a VLEK".into()));
    cases.push((
        "not a certificate",
        build(&[(CertKind::Ark, &[0x30, 0x03, 0x02, 0x01, 0x05])]),
        "[0] ark: not a DER X.509 certificate".into(),
    ));

    for (what, bytes, message) in cases {
        let bad = write(dir.path(), "bad.blob", &bytes);
        let (code, out) = check(&bad, &["--at", AT]);
        assert_eq!(code, 2, "{what}: {out}");
        assert!(
            out.contains(&message),
            "{what}: expected {message:?} in:\n{out}"
        );
        let o = blob(&[
            "install",
            bad.to_str().expect("utf-8"),
            target.to_str().expect("utf-8"),
        ]);
        assert_eq!(o.status.code(), Some(2), "{what}: {}", text(&o));
        assert!(text(&o).contains(&message), "{what}: {}", text(&o));
        assert!(text(&o).contains("is unchanged"), "{what}: {}", text(&o));
        assert_eq!(std::fs::read(&target).expect("read"), good, "{what}");
        // show refuses structurally broken tables too, with the same reason.
        if what != "not a certificate" {
            let o = blob(&["show", bad.to_str().expect("utf-8")]);
            assert_eq!(o.status.code(), Some(2), "{what}: {}", text(&o));
        }
    }
}

#[test]
fn synthetic_chain_tcb_and_validity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = write(
        dir.path(),
        "s.blob",
        &build(&[
            (CertKind::Ark, &synth("ark")),
            (CertKind::Ask, &synth("ask")),
            (CertKind::Vcek, &synth("vcek")),
        ]),
    );
    // Verifies, but the root is not AMD's: a warning, exit 1.
    let (code, out) = check(&b, &["--at", AT]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not one of AMD's published roots"), "{out}");
    assert!(out.contains("[2] vcek: signed by the ASK"), "{out}");
    assert!(out.contains("TCB bl=7 tee=0 snp=22 ucode=84"), "{out}");
    assert!(
        out.contains("VALID, with warnings: 0 error(s), 1 warning(s)"),
        "{out}"
    );

    let (code, out) = check(
        &b,
        &["--at", AT, "--expect-tcb", "bl=7,tee=0,snp=22,ucode=84"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("TCB matches the expected bl=7 tee=0 snp=22 ucode=84"),
        "{out}"
    );

    let (code, out) = check(&b, &["--at", AT, "--expect-tcb", "snp=23,fmc=1"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("TCB mismatch: snp is 22, expected 23, fmc is absent, expected 1"),
        "{out}"
    );

    let (code, out) = check(&b, &["--at", "2024-06-01T00:00:00Z"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("[2] vcek: not valid yet: valid from 2025-01-01T00:00:00Z"),
        "{out}"
    );
    let (code, out) = check(&b, &["--at", "2049-06-01T00:00:00Z"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("[2] vcek: expired on 2049-01-01T00:00:00Z"),
        "{out}"
    );
    let (code, out) = check(&b, &["--at", "2048-12-20T00:00:00Z"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("expires on 2049-01-01T00:00:00Z, within 30 days"),
        "{out}"
    );

    let (code, out) = check(&b, &["--expect-tcb", "boot=1"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("unknown TCB component"), "{out}");
    let (code, out) = check(&b, &["--at", "yesterday"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("--at \"yesterday\""), "{out}");
    let (code, out) = check(&dir.path().join("absent.blob"), &[]);
    assert_eq!(code, 3, "{out}");
}

#[test]
fn vlek_chain_and_swapped_signers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = write(
        dir.path(),
        "vlek.blob",
        &build(&[
            (CertKind::Ark, &synth("ark")),
            (CertKind::Ask, &synth("asvk")),
            (CertKind::Vlek, &synth("vlek")),
        ]),
    );
    let (code, out) = check(
        &b,
        &["--at", AT, "--expect-tcb", "bl=7,tee=0,snp=22,ucode=84"],
    );
    assert_eq!(code, 1, "{out}");
    // A part of the TCB is not a check of it (issue 14).
    let (code, partial) = check(&b, &["--at", AT, "--expect-tcb", "snp=22"]);
    assert_eq!(code, 2, "{partial}");
    assert!(
        partial.contains(
            "TCB not fully checked: snp=22 matched, but --expect-tcb leaves out bl, tee, ucode"
        ),
        "{partial}"
    );
    assert!(out.contains("[1] asvk: signed by the ARK"), "{out}");
    assert!(out.contains("[2] vlek: signed by the ASVK"), "{out}");
    let o = blob(&["show", b.to_str().expect("utf-8")]);
    assert!(
        text(&o).contains("coco-sidecar-test-csp  (cspID 1.3.6.1.4.1.3704.1.5)"),
        "{}",
        text(&o)
    );

    // A VLEK with the VCEK's signer: names do not match.
    let wrong = write(
        dir.path(),
        "wrong.blob",
        &build(&[
            (CertKind::Ark, &synth("ark")),
            (CertKind::Ask, &synth("ask")),
            (CertKind::Vlek, &synth("vlek")),
        ]),
    );
    let (code, out) = check(&wrong, &["--at", AT]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("[2] vlek: issued by"), "{out}");
    assert!(out.contains("do not belong together"), "{out}");

    // The ASK where the ARK should be.
    let swapped = write(
        dir.path(),
        "swapped.blob",
        &build(&[
            (CertKind::Ark, &synth("ask")),
            (CertKind::Ask, &synth("ark")),
        ]),
    );
    let (code, out) = check(&swapped, &["--at", AT]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("[0] ark: not self-issued"), "{out}");
}

#[test]
fn crl_is_verified_and_revocations_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = |crl: &str| {
        build(&[
            (CertKind::Ark, &synth("ark")),
            (CertKind::Ask, &synth("ask")),
            (CertKind::Vcek, &synth("vcek")),
            (CertKind::Crl, &synth(crl)),
        ])
    };
    let clean = write(dir.path(), "clean.blob", &chain("crl"));
    let (code, out) = check(&clean, &["--at", AT]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[3] crl: signed by the ARK"), "{out}");
    assert!(out.contains("[1] ask: not revoked by the CRL"), "{out}");
    let revoked = write(dir.path(), "revoked.blob", &chain("crl-revoked"));
    let (code, out) = check(&revoked, &["--at", AT]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("[1] ask: revoked by the CRL (serial 0101)"),
        "{out}"
    );
    let o = blob(&["show", revoked.to_str().expect("utf-8")]);
    assert!(text(&o).contains("revoked    0101"), "{}", text(&o));
}

#[test]
fn json_report_and_usage_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = write(dir.path(), "empty.blob", &[0u8; 24]);
    let o = blob(&["check", "--json", b.to_str().expect("utf-8")]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("\"level\": \"warning\""), "{out}");
    assert!(out.contains("\"size\": 24"), "{out}");
    let o = blob(&["check"]);
    assert_eq!(o.status.code(), Some(64), "usage errors are not 'invalid'");
    let o = blob(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(64));
}

/// A reader that went away (`blob show | head -1`) ends nothing in a panic: each command that
/// prints runs with standard output a pipe whose read end is already closed, and exits with
/// the status it has with a reader.
#[test]
fn printing_to_a_closed_pipe_is_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = dir.path().join("sample.blob");
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/../backend/data/sample");
    let o = blob(&["import", sample, b.to_str().expect("utf-8")]);
    assert!(o.status.success(), "import: {}", text(&o));
    let b = b.to_str().expect("utf-8");
    let exported = dir.path().join("exported");
    let exported = exported.to_str().expect("utf-8");
    for args in [
        &["blob", "show", b][..],
        &["blob", "show", "--json", b],
        &["blob", "check", "--at", AT, b],
        &["blob", "check", "--json", "--at", AT, b],
        &["blob", "export", "--force", b, exported],
        &["completions", "bash"],
        &["demo"],
    ] {
        let with_reader = Command::new(sidecar_bin())
            .args(args)
            .output()
            .expect("run");
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let closed = Command::new(sidecar_bin())
            .args(args)
            .stdout(writer)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&closed.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(closed.status.code(), with_reader.status.code(), "{args:?}");
    }
}
