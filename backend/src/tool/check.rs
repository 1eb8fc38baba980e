//! `blob check`: everything that can be known about a blob without the hardware. The table's
//! structure (what the sidecar itself checks before serving), each entry's X.509 decoding, the
//! chain ARK -> ASK (or ASVK) -> VCEK (or VLEK) with AMD's signature algorithm, validity at a
//! given time, the CRL, and the VCEK's TCB against an expected one.
//!
//! The result is a list of findings, each `ok`, `warning` or `error`, written so that a person
//! knows what to do next; [`Report::exit_code`] turns it into 0 (good), 1 (warnings only) or
//! 2 (invalid).

use std::fmt;
use std::time::{Duration, SystemTime};

use coco_protocol::table::{CertKind, Table, TableError, LINUX_GUEST_MAX_BYTES};
use serde::Serialize;
use thiserror::Error;

use super::cert::{Cert, Crl, KeyInfo};
use super::{exit, fmt_time};

/// SHA-256 of the DER of AMD's published ARKs, and their names.
pub const AMD_ARKS: [([u8; 32], &str); 3] = [
    (
        *b"\x69\xd0\x63\xb4\x53\x44\xd2\x6a\x2e\x94\xe1\xf4\x21\x0d\xe4\x9e\xf5\x55\x30\x82\x87\xd4\xc1\x74\x44\x5c\x95\x63\x9a\x54\x0b\xcd",
        "ARK-Milan",
    ),
    (
        *b"\x4c\x65\x98\xd1\x9c\x18\x71\x9c\x5d\xfd\x4a\x7d\x33\x5f\x67\x4e\x5b\xfe\x1d\x8f\x80\x0c\xea\x2c\xf2\x70\xc1\x0d\x10\x3d\xb2\xf1",
        "ARK-Genoa",
    ),
    (
        *b"\x1f\x08\x41\x61\xa4\x4b\xb6\xd9\x37\x78\xa9\x04\x87\x7d\x48\x19\xca\xfa\x5d\x05\xef\x41\x93\xb2\xde\xd9\xdd\x9c\x73\xdd\x3f\x6a",
        "ARK-Turin",
    ),
];

/// A certificate expiring sooner than this after the check time gets a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// TCB components `--expect-tcb` accepts, as the VCEK's extensions name them.
pub const TCB_KEYS: [&str; 9] = [
    "bl", "tee", "snp", "ucode", "fmc", "spl4", "spl5", "spl6", "spl7",
];

/// The TCB components of a VCEK or VLEK that `--expect-tcb` must name, in the order it prints
/// them: those of every generation, and `fmc` where the generation has it (Turin).
pub const TCB_GENERATION_KEYS: [&str; 5] = ["bl", "tee", "snp", "ucode", "fmc"];

/// The VCEK's (or VLEK's) TCB as `--expect-tcb` takes it: every component of its generation
/// that it carries (`bl=3,tee=0,snp=8,ucode=115`, and `fmc=...` on Turin). `None` without any.
pub fn expect_tcb_value(cert: &Cert) -> Option<String> {
    let parts: Vec<String> = TCB_GENERATION_KEYS
        .iter()
        .filter_map(|k| cert.tcb_value(k).map(|v| format!("{k}={v}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// The product generation a VCEK or VLEK names (`Milan-B0`, `Turin`), from its productName
/// extension.
pub fn vek_product(cert: &Cert) -> Option<String> {
    cert.amd_extensions()
        .into_iter()
        .find(|e| e.key == "product_name")
        .map(|e| e.value.to_string())
        .filter(|p| !p.is_empty())
}

/// What an operator wants to know of the blob's VCEK or VLEK at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VekSummary {
    /// `vcek` or `vlek`.
    pub kind: String,
    /// The product generation it names (`Milan-B0`, `Turin`), if it names one.
    pub product: Option<String>,
    /// Its TCB as `--expect-tcb` takes it, if it carries one.
    pub tcb: Option<String>,
    /// End of its validity, RFC 3339.
    pub not_after: String,
    /// End of its validity, seconds since the Unix epoch.
    pub not_after_unix: u64,
}

/// Bad `blob check` options.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// A malformed `--expect-tcb` item.
    #[error("--expect-tcb {item:?}: {why} (expected KEY=VALUE[,KEY=VALUE...] with KEY one of bl, tee, snp, ucode, fmc, spl4..spl7)")]
    ExpectTcb { item: String, why: &'static str },
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// A check that passed.
    Ok,
    /// Servable, but something a person should look at.
    Warning,
    /// Verifiers will reject it, or the sidecar will not serve it.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        })
    }
}

/// One result of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad.
    pub level: Level,
    /// The table entry it is about (from 0), if one.
    pub entry: Option<usize>,
    /// That entry's kind (`ark`, `ask`, `asvk`, `vcek`, `vlek`, `crl`), if known.
    pub kind: Option<String>,
    /// What was found, and what to do about it.
    pub message: String,
}

/// Everything `blob check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Size of the blob in bytes.
    pub size: usize,
    /// Entries in the table (0 when its structure is invalid).
    pub entries: usize,
    /// The time validity was checked at (RFC 3339).
    pub checked_at: String,
    /// The findings, in the order they were made.
    pub findings: Vec<Finding>,
    /// The VCEK or VLEK, when the blob has one that decodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vek: Option<VekSummary>,
}

impl Report {
    /// Number of errors.
    pub fn errors(&self) -> usize {
        self.count(Level::Error)
    }

    /// Number of warnings.
    pub fn warnings(&self) -> usize {
        self.count(Level::Warning)
    }

    fn count(&self, level: Level) -> usize {
        self.findings.iter().filter(|f| f.level == level).count()
    }

    /// 0 good, 1 warnings only, 2 invalid.
    pub fn exit_code(&self) -> u8 {
        if self.errors() > 0 {
            exit::INVALID
        } else if self.warnings() > 0 {
            exit::WARNINGS
        } else {
            exit::OK
        }
    }

    /// One-line verdict.
    pub fn verdict(&self) -> String {
        let (e, w) = (self.errors(), self.warnings());
        let word = if e > 0 {
            "INVALID"
        } else if w > 0 {
            "VALID, with warnings"
        } else {
            "GOOD"
        };
        format!("{word}: {e} error(s), {w} warning(s)")
    }

    /// Only the warnings and errors, one per line.
    pub fn problems(&self) -> String {
        self.findings
            .iter()
            .filter(|f| f.level != Level::Ok)
            .map(|f| format!("{f}\n"))
            .collect()
    }
}

impl Finding {
    /// The finding without its level: `[2] vcek: expired on ...`.
    pub fn what(&self) -> String {
        let at = match (&self.entry, &self.kind) {
            (Some(i), Some(k)) => format!("[{i}] {k}: "),
            (Some(i), None) => format!("[{i}]: "),
            (None, Some(k)) => format!("{k}: "),
            (None, None) => String::new(),
        };
        format!("{at}{}", self.message)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<8}{}", self.level.to_string(), self.what())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} bytes, {} entries, checked at {}",
            self.size, self.entries, self.checked_at
        )?;
        for finding in &self.findings {
            writeln!(f, "  {finding}")?;
        }
        writeln!(f, "{}", self.verdict())
    }
}

/// What to check against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Validity is checked at this time.
    pub at: SystemTime,
    /// TCB components the VCEK/VLEK must carry, with their values.
    pub expect_tcb: Vec<(String, u64)>,
}

impl CheckOptions {
    /// Check at the current time, expect no particular TCB.
    pub fn now() -> CheckOptions {
        CheckOptions {
            at: SystemTime::now(),
            expect_tcb: Vec::new(),
        }
    }
}

/// Parses `bl=3,tee=0,snp=8,ucode=115` (values decimal or `0x` hex).
pub fn parse_expect_tcb(text: &str) -> Result<Vec<(String, u64)>, CheckError> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let err = |why| CheckError::ExpectTcb {
            item: item.to_owned(),
            why,
        };
        let (key, value) = item.split_once('=').ok_or_else(|| err("no '='"))?;
        let key = key.trim().to_ascii_lowercase();
        if !TCB_KEYS.contains(&key.as_str()) {
            return Err(err("unknown TCB component"));
        }
        let value = value.trim();
        let value = match value.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => value.parse(),
        }
        .map_err(|_| err("the value is not a number"))?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(err("component given twice"));
        }
        out.push((key, value));
    }
    if out.is_empty() {
        return Err(CheckError::ExpectTcb {
            item: text.to_owned(),
            why: "no components",
        });
    }
    Ok(out)
}

/// What to do about a structural error.
pub fn structure_hint(e: &TableError) -> &'static str {
    match e {
        TableError::NoTerminator(_) => {
            "the file is truncated, or is not a GHCB certificate table (rebuild it with `blob import`)"
        }
        TableError::TooLarge(_) => "this is not a certificate table (a real chain is about 5 KiB)",
        TableError::EmptyEntry { .. } => "an entry must hold a certificate: rebuild the blob",
        TableError::InsideHeader { .. } => {
            "the offset points into the entry list: the table is corrupt; rebuild it"
        }
        TableError::OutOfBounds { .. } => {
            "the file is truncated, or the entry's offset or length is corrupt; rebuild it"
        }
        TableError::Overlap { .. } => "two entries share bytes: the table is corrupt; rebuild it",
        TableError::Duplicate { .. } => "each kind may appear once: rebuild the blob",
        TableError::VcekAndVlek => "keep only the one the host's firmware signs reports with",
        TableError::TrailingBytes { .. } => {
            "a rewrite that did not truncate, or junk appended: install the blob again"
        }
        TableError::NotDer { .. } => {
            "the entry is not a DER certificate of exactly its length (PEM text? torn?): rebuild it"
        }
        TableError::CertTooLarge(_) => "a certificate cannot be this large",
    }
}

/// Names a GUID by kind when it is one, for messages.
fn guid_kind(e: &TableError) -> Option<&'static str> {
    match e {
        TableError::EmptyEntry { guid, .. }
        | TableError::InsideHeader { guid, .. }
        | TableError::OutOfBounds { guid, .. }
        | TableError::Duplicate { guid, .. } => CertKind::from_guid(*guid).map(CertKind::name),
        _ => None,
    }
}

struct Checker {
    findings: Vec<Finding>,
}

impl Checker {
    fn add(&mut self, level: Level, entry: Option<(usize, &str)>, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            entry: entry.map(|(i, _)| i),
            kind: entry.map(|(_, k)| k.to_owned()),
            message: message.into(),
        });
    }
}

/// A certificate of the chain and where it sits.
struct Slot {
    index: usize,
    label: &'static str,
    cert: Cert,
}

impl Slot {
    fn at(&self) -> Option<(usize, &str)> {
        Some((self.index, self.label))
    }
}

fn product_generation(cn: &str) -> Option<String> {
    ["ARK-", "SEV-VLEK-", "SEV-"]
        .iter()
        .find_map(|p| cn.strip_prefix(p))
        .filter(|g| !g.is_empty() && *g != "VCEK" && *g != "VLEK")
        .map(str::to_owned)
}

/// Checks `bytes` as a certificate blob.
pub fn check(bytes: &[u8], opts: &CheckOptions) -> Report {
    let mut c = Checker {
        findings: Vec::new(),
    };
    let table = match Table::parse(bytes) {
        Ok(t) => Some(t),
        Err(_) if bytes.starts_with(&crate::blob::INSTALL_MARKER) => {
            c.add(
                Level::Error,
                None,
                "structure: left half-written by an interrupted `blob install`: run \
                 `coco-sidecar blob recover` on it (it finishes the install)",
            );
            None
        }
        Err(e) => {
            let kind = guid_kind(&e).map(|k| format!(" ({k})")).unwrap_or_default();
            c.add(
                Level::Error,
                None,
                format!("structure: {e}{kind}: {}", structure_hint(&e)),
            );
            None
        }
    };
    let entries = table.as_ref().map_or(0, |t| t.entries().len());
    let vek = table.and_then(|table| check_table(&mut c, &table, opts));
    Report {
        size: bytes.len(),
        entries,
        checked_at: fmt_time(opts.at),
        findings: c.findings,
        vek,
    }
}

/// Checks a structurally valid table; returns the summary of its VCEK or VLEK.
fn check_table(c: &mut Checker, table: &Table, opts: &CheckOptions) -> Option<VekSummary> {
    let len = table.as_bytes().len();
    if len > LINUX_GUEST_MAX_BYTES {
        c.add(
            Level::Warning,
            None,
            format!(
                "the table is {len} bytes: Linux guests offer at most {LINUX_GUEST_MAX_BYTES} and \
                 will get ENOSPC, never the chain; leave out the CRL or other large entries"
            ),
        );
    } else {
        c.add(
            Level::Ok,
            None,
            format!(
                "structure valid; {len} bytes ({} page(s)) fit the {LINUX_GUEST_MAX_BYTES}-byte \
                 buffer of Linux guests",
                table.pages()
            ),
        );
    }
    let has_vlek = table
        .entries()
        .iter()
        .any(|e| e.kind() == Some(CertKind::Vlek));
    let (mut ark, mut ask, mut vek, mut crl) = (None, None, None, None);
    for (index, entry) in table.entries().iter().enumerate() {
        let data = table.data(entry);
        let Some(kind) = entry.kind() else {
            c.add(
                Level::Warning,
                Some((index, "unknown")),
                format!(
                    "GUID {} is not one verifiers know; its {} bytes are served as they are",
                    entry.guid,
                    data.len()
                ),
            );
            continue;
        };
        let label = match kind {
            CertKind::Ask if has_vlek => "asvk",
            k => k.name(),
        };
        if kind == CertKind::Crl {
            match Crl::from_der(data) {
                Ok(l) => crl = Some((index, l)),
                Err(e) => c.add(Level::Error, Some((index, label)), e.to_string()),
            }
            continue;
        }
        match Cert::from_der(data) {
            Ok(cert) => {
                let slot = Slot { index, label, cert };
                match kind {
                    CertKind::Ark => ark = Some(slot),
                    CertKind::Ask => ask = Some(slot),
                    _ => vek = Some(slot),
                }
            }
            Err(e) => c.add(Level::Error, Some((index, label)), e.to_string()),
        }
    }
    check_ark(c, ark.as_ref());
    check_ask(c, ask.as_ref(), ark.as_ref(), has_vlek);
    check_vek(c, vek.as_ref(), ask.as_ref(), opts);
    for slot in [&ark, &ask, &vek].into_iter().flatten() {
        check_validity(c, slot, opts.at);
    }
    check_generations(c, [&ark, &ask, &vek]);
    if let Some((index, list)) = crl {
        check_crl(c, index, &list, ark.as_ref(), ask.as_ref(), opts.at);
    }
    vek.map(|v| VekSummary {
        kind: v.label.to_owned(),
        product: vek_product(&v.cert),
        tcb: expect_tcb_value(&v.cert),
        not_after: fmt_time(v.cert.not_after()),
        not_after_unix: v
            .cert
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

fn check_rsa_key(c: &mut Checker, slot: &Slot) -> bool {
    match slot.cert.key() {
        KeyInfo::Rsa { bits: 4096 } => true,
        KeyInfo::Rsa { bits } => {
            c.add(
                Level::Warning,
                slot.at(),
                format!("RSA-{bits} key; AMD's are RSA-4096"),
            );
            true
        }
        other => {
            c.add(
                Level::Error,
                slot.at(),
                format!(
                    "the key is {other}; AMD's {} key is RSA-4096",
                    slot.label.to_uppercase()
                ),
            );
            false
        }
    }
}

fn check_ark(c: &mut Checker, ark: Option<&Slot>) {
    let Some(ark) = ark else {
        c.add(
            Level::Warning,
            None,
            "no ARK: verifiers must already hold AMD's root for this product",
        );
        return;
    };
    check_rsa_key(c, ark);
    if !ark.cert.self_issued() {
        c.add(
            Level::Error,
            ark.at(),
            format!(
                "not self-issued (issuer {}, subject {}): an ARK is AMD's self-signed root; is \
                 this file the ASK?",
                ark.cert.issuer(),
                ark.cert.subject()
            ),
        );
        return;
    }
    match ark.cert.verify_signed_by(&ark.cert) {
        Ok(()) => c.add(
            Level::Ok,
            ark.at(),
            format!(
                "{} is self-signed (RSASSA-PSS SHA-384)",
                ark.cert.subject_cn().unwrap_or_default()
            ),
        ),
        Err(e) => c.add(
            Level::Error,
            ark.at(),
            format!("self-signature: {e}: the certificate is corrupt or forged"),
        ),
    }
    let fingerprint = ark.cert.sha256_bytes();
    match AMD_ARKS.iter().find(|(fp, _)| *fp == fingerprint) {
        Some((_, name)) => c.add(
            Level::Ok,
            ark.at(),
            format!("is AMD's published {name} root"),
        ),
        None => c.add(
            Level::Warning,
            ark.at(),
            format!(
                "not one of AMD's published roots known to this tool (ARK-Milan, ARK-Genoa, \
                 ARK-Turin; SHA-256 {}): verifiers that pin AMD's roots reject this chain",
                ark.cert.sha256()
            ),
        ),
    }
}

fn check_signed(c: &mut Checker, child: &Slot, parent: &Slot) {
    if !child.cert.issued_by_name(&parent.cert) {
        c.add(
            Level::Error,
            child.at(),
            format!(
                "issued by \"{}\", but the {} in the blob is \"{}\": the certificates do not \
                 belong together (another product generation?)",
                child.cert.issuer(),
                parent.label.to_uppercase(),
                parent.cert.subject()
            ),
        );
        return;
    }
    match child.cert.verify_signed_by(&parent.cert) {
        Ok(()) => c.add(
            Level::Ok,
            child.at(),
            format!(
                "signed by the {} (RSASSA-PSS SHA-384, salt 48)",
                parent.label.to_uppercase()
            ),
        ),
        Err(e) => c.add(
            Level::Error,
            child.at(),
            format!(
                "signature by the {}: {e}: the certificate is corrupt or forged; fetch it again",
                parent.label.to_uppercase()
            ),
        ),
    }
}

fn check_ask(c: &mut Checker, ask: Option<&Slot>, ark: Option<&Slot>, vlek: bool) {
    let name = if vlek { "ASVK" } else { "ASK" };
    let Some(ask) = ask else {
        c.add(
            Level::Warning,
            None,
            format!("no {name}: verifiers must fetch it from AMD KDS to check the chain"),
        );
        return;
    };
    check_rsa_key(c, ask);
    match ark {
        Some(ark) => check_signed(c, ask, ark),
        None => c.add(
            Level::Warning,
            ask.at(),
            "its signature is not checked: the blob has no ARK",
        ),
    }
}

fn check_vek(c: &mut Checker, vek: Option<&Slot>, ask: Option<&Slot>, opts: &CheckOptions) {
    let Some(vek) = vek else {
        c.add(
            Level::Warning,
            None,
            "no VCEK or VLEK: verifiers must fetch the chip's VCEK from AMD KDS themselves",
        );
        if !opts.expect_tcb.is_empty() {
            c.add(
                Level::Error,
                None,
                "--expect-tcb given, but there is no VCEK or VLEK to compare with",
            );
        }
        return;
    };
    match vek.cert.key() {
        KeyInfo::P384 => {}
        other => c.add(
            Level::Error,
            vek.at(),
            format!("the key is {other}; attestation reports are signed with ECDSA P-384"),
        ),
    }
    match ask {
        Some(ask) => check_signed(c, vek, ask),
        None => c.add(
            Level::Warning,
            vek.at(),
            "its signature is not checked: the blob has no ASK/ASVK",
        ),
    }
    let tcb: Vec<String> = ["bl", "tee", "snp", "ucode", "fmc"]
        .iter()
        .filter_map(|k| vek.cert.tcb_value(k).map(|v| format!("{k}={v}")))
        .collect();
    if tcb.is_empty() {
        c.add(
            Level::Warning,
            vek.at(),
            "carries none of AMD's TCB extensions (1.3.6.1.4.1.3704.1.3.*)",
        );
    } else if opts.expect_tcb.is_empty() {
        c.add(
            Level::Ok,
            vek.at(),
            format!(
                "TCB {} (compare with the host's reported TCB: --expect-tcb)",
                tcb.join(" ")
            ),
        );
    }
    if opts.expect_tcb.is_empty() {
        return;
    }
    let mut wrong = Vec::new();
    for (key, want) in &opts.expect_tcb {
        match vek.cert.tcb_value(key) {
            Some(have) if have == *want => {}
            Some(have) => wrong.push(format!("{key} is {have}, expected {want}")),
            None => wrong.push(format!("{key} is absent, expected {want}")),
        }
    }
    let expected: Vec<String> = opts
        .expect_tcb
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // A component the VEK's generation has but the option leaves out is not checked: say so
    // rather than pass (a Turin VCEK carries fmc).
    let unchecked: Vec<String> = TCB_GENERATION_KEYS
        .iter()
        .filter(|k| !opts.expect_tcb.iter().any(|(e, _)| e == *k))
        .filter_map(|k| vek.cert.tcb_value(k).map(|_| (*k).to_owned()))
        .collect();
    let name = vek.label.to_uppercase();
    if wrong.is_empty() && unchecked.is_empty() {
        c.add(
            Level::Ok,
            vek.at(),
            format!("TCB matches the expected {}", expected.join(" ")),
        );
    } else if wrong.is_empty() {
        let product = vek_product(&vek.cert).map_or(String::new(), |p| format!("{p} "));
        c.add(
            Level::Error,
            vek.at(),
            format!(
                "TCB not fully checked: {} matched, but --expect-tcb leaves out {}, which this \
                 {product}{name} carries: give every component, adding the host's reported \
                 {} (snphost show tcb)",
                expected.join(" "),
                unchecked.join(", "),
                unchecked.join(", ")
            ),
        );
    } else {
        c.add(
            Level::Error,
            vek.at(),
            format!(
                "TCB mismatch: {}: the {} was issued for another TCB than the firmware's; \
                 verifiers will reject the reports; fetch the {} for the current TCB",
                wrong.join(", "),
                name,
                name
            ),
        );
    }
}

fn check_validity(c: &mut Checker, slot: &Slot, at: SystemTime) {
    let (from, until) = (slot.cert.not_before(), slot.cert.not_after());
    if at < from {
        c.add(
            Level::Error,
            slot.at(),
            format!(
                "not valid yet: valid from {} (checked at {}); check the clock",
                fmt_time(from),
                fmt_time(at)
            ),
        );
    } else if at > until {
        c.add(
            Level::Error,
            slot.at(),
            format!(
                "expired on {} (checked at {}): fetch a current certificate",
                fmt_time(until),
                fmt_time(at)
            ),
        );
    } else if until.duration_since(at).unwrap_or_default() < EXPIRY_WARNING {
        c.add(
            Level::Warning,
            slot.at(),
            format!(
                "expires on {}, within 30 days: fetch a new one soon",
                fmt_time(until)
            ),
        );
    } else {
        c.add(
            Level::Ok,
            slot.at(),
            format!("valid {} .. {}", fmt_time(from), fmt_time(until)),
        );
    }
}

fn check_generations(c: &mut Checker, slots: [&Option<Slot>; 3]) {
    let mut seen: Vec<(String, String)> = Vec::new();
    for slot in slots.into_iter().flatten() {
        let generation = if matches!(slot.label, "vcek" | "vlek") {
            slot.cert
                .amd_extensions()
                .into_iter()
                .find(|e| e.key == "product_name")
                .map(|e| e.value.to_string())
                .and_then(|p| p.split('-').next().map(str::to_owned))
        } else {
            slot.cert
                .subject_cn()
                .as_deref()
                .and_then(product_generation)
        };
        if let Some(g) = generation.filter(|g| !g.is_empty()) {
            seen.push((slot.label.to_uppercase(), g));
        }
    }
    let first = seen.first().map(|(_, g)| g.clone());
    if let Some(first) = first {
        if seen.iter().any(|(_, g)| *g != first) {
            let list: Vec<String> = seen.iter().map(|(k, g)| format!("{k} {g}")).collect();
            c.add(
                Level::Warning,
                None,
                format!(
                    "product generations differ ({}): every certificate must come from the \
                     host CPU's generation",
                    list.join(", ")
                ),
            );
        }
    }
}

fn check_crl(
    c: &mut Checker,
    index: usize,
    crl: &Crl,
    ark: Option<&Slot>,
    ask: Option<&Slot>,
    at: SystemTime,
) {
    let here = Some((index, "crl"));
    match ark {
        None => c.add(
            Level::Warning,
            here,
            "its signature is not checked: the blob has no ARK",
        ),
        Some(ark) if !crl.issued_by_name(&ark.cert) => c.add(
            Level::Error,
            here,
            format!(
                "issued by \"{}\", not by the ARK \"{}\"",
                crl.issuer(),
                ark.cert.subject()
            ),
        ),
        Some(ark) => match crl.verify_signed_by(&ark.cert) {
            Ok(()) => {
                c.add(Level::Ok, here, "signed by the ARK");
                if let Some(ask) = ask {
                    if crl.revokes(&ask.cert, &ark.cert) {
                        c.add(
                            Level::Error,
                            ask.at(),
                            format!(
                                "revoked by the CRL (serial {}): fetch the current {} from AMD KDS",
                                ask.cert.serial(),
                                ask.label.to_uppercase()
                            ),
                        );
                    } else {
                        c.add(Level::Ok, ask.at(), "not revoked by the CRL");
                    }
                }
            }
            Err(e) => c.add(Level::Error, here, format!("signature by the ARK: {e}")),
        },
    }
    if let Some(next) = crl.next_update() {
        if next < at {
            c.add(
                Level::Warning,
                here,
                format!(
                    "stale: its next update was due on {}; fetch a fresh CRL from AMD KDS",
                    fmt_time(next)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_tcb_parses_and_refuses() {
        assert_eq!(
            parse_expect_tcb("bl=3, tee=0,snp=0x16,UCODE=115").expect("ok"),
            vec![
                ("bl".to_string(), 3),
                ("tee".to_string(), 0),
                ("snp".to_string(), 22),
                ("ucode".to_string(), 115)
            ]
        );
        assert!(parse_expect_tcb("bl").is_err());
        assert!(parse_expect_tcb("boot=1").is_err());
        assert!(parse_expect_tcb("bl=x").is_err());
        assert!(parse_expect_tcb("bl=1,bl=2").is_err());
        assert!(parse_expect_tcb(",").is_err());
    }

    #[test]
    fn generations_come_from_common_names() {
        assert_eq!(product_generation("ARK-Milan").as_deref(), Some("Milan"));
        assert_eq!(product_generation("SEV-Genoa").as_deref(), Some("Genoa"));
        assert_eq!(
            product_generation("SEV-VLEK-Turin").as_deref(),
            Some("Turin")
        );
        assert_eq!(product_generation("SEV-VCEK"), None);
    }

    #[test]
    fn structure_errors_are_invalid() {
        let r = check(b"not a table", &CheckOptions::now());
        assert_eq!(r.exit_code(), 2);
        assert!(r.findings[0].message.starts_with("structure:"));
    }
}
