//! `blob show`: what a blob holds, entry by entry, for people (text) and programs (`--json`).

use std::fmt::Write as _;

use coco_protocol::table::{CertKind, Table, TableError};
use serde::Serialize;
use thiserror::Error;

use super::cert::{hex, Cert, Crl, ExtValue};
use super::check::expect_tcb_value;
use super::fmt_time;

/// Why a blob cannot be shown.
#[derive(Debug, Error)]
pub enum ShowError {
    /// The table's structure is invalid, so its entries cannot be trusted to be entries.
    #[error("not a valid certificate table: {0} (`blob check` says more)")]
    Table(#[from] TableError),
    /// JSON encoding failed.
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One AMD extension, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtView {
    /// Dotted OID.
    pub oid: String,
    /// Short key (`bl`, `snp`, `hw_id`, ...).
    pub key: String,
    /// AMD's name (`blSPL`, `hwID`, ...).
    pub name: String,
    /// The value: a number, a string, or hex bytes.
    pub value: serde_json::Value,
}

/// A certificate, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertView {
    /// Subject name.
    pub subject: String,
    /// Issuer name.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// Public key kind.
    pub key: String,
    /// Signature algorithm.
    pub signature_algorithm: String,
    /// SHA-256 of the DER.
    pub sha256: String,
    /// AMD's TCB and identity extensions (VCEK, VLEK).
    pub amd_extensions: Vec<ExtView>,
}

/// A CRL, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrlView {
    /// Issuer name.
    pub issuer: String,
    /// Issue time, RFC 3339.
    pub this_update: String,
    /// Next update due, RFC 3339.
    pub next_update: Option<String>,
    /// Revoked serial numbers, hex.
    pub revoked: Vec<String>,
    /// Signature algorithm.
    pub signature_algorithm: String,
}

/// One table entry, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryView {
    /// Position in the table, from 0.
    pub index: usize,
    /// GUID.
    pub guid: String,
    /// Kind (`ark`, `ask`, `asvk`, `vcek`, `vlek`, `crl`, or `unknown`).
    pub kind: String,
    /// Offset of the data from the table's start.
    pub offset: u32,
    /// Length of the data.
    pub length: u32,
    /// The certificate, when it decodes as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertView>,
    /// The CRL, when it decodes as one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl: Option<CrlView>,
    /// Why the data does not decode, if it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A whole blob, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobView {
    /// Size in bytes.
    pub size: usize,
    /// Pages a guest must offer.
    pub pages: u64,
    /// The entries.
    pub entries: Vec<EntryView>,
    /// The VCEK's (or VLEK's) TCB as `blob check --expect-tcb` takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_tcb: Option<String>,
}

fn ext_json(v: &ExtValue) -> serde_json::Value {
    match v {
        ExtValue::Int(i) => serde_json::Value::from(*i),
        ExtValue::Text(s) => serde_json::Value::from(s.clone()),
        ExtValue::Bytes(b) => serde_json::Value::from(hex(b)),
    }
}

fn cert_view(cert: &Cert) -> CertView {
    CertView {
        subject: cert.subject(),
        issuer: cert.issuer(),
        serial: cert.serial(),
        not_before: fmt_time(cert.not_before()),
        not_after: fmt_time(cert.not_after()),
        key: cert.key().to_string(),
        signature_algorithm: cert.signature_algorithm(),
        sha256: cert.sha256(),
        amd_extensions: cert
            .amd_extensions()
            .into_iter()
            .map(|e| ExtView {
                value: ext_json(&e.value),
                oid: e.oid,
                key: e.key,
                name: e.name,
            })
            .collect(),
    }
}

fn crl_view(crl: &Crl) -> CrlView {
    CrlView {
        issuer: crl.issuer(),
        this_update: fmt_time(crl.this_update()),
        next_update: crl.next_update().map(fmt_time),
        revoked: crl.revoked(),
        signature_algorithm: crl.signature_algorithm(),
    }
}

/// Describes every entry of a structurally valid blob.
pub fn view(bytes: &[u8]) -> Result<BlobView, ShowError> {
    let table = Table::parse(bytes)?;
    let has_vlek = table
        .entries()
        .iter()
        .any(|e| e.kind() == Some(CertKind::Vlek));
    let mut expect_tcb = None;
    let entries = table
        .entries()
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let data = table.data(e);
            let kind = match e.kind() {
                Some(CertKind::Ask) if has_vlek => "asvk",
                Some(k) => k.name(),
                None => "unknown",
            };
            let mut v = EntryView {
                index,
                guid: e.guid.to_string(),
                kind: kind.to_owned(),
                offset: e.offset,
                length: e.length,
                certificate: None,
                crl: None,
                error: None,
            };
            match e.kind() {
                None => {}
                Some(CertKind::Crl) => match Crl::from_der(data) {
                    Ok(c) => v.crl = Some(crl_view(&c)),
                    Err(err) => v.error = Some(err.to_string()),
                },
                Some(kind) => match Cert::from_der(data) {
                    Ok(c) => {
                        if matches!(kind, CertKind::Vcek | CertKind::Vlek) {
                            expect_tcb = expect_tcb_value(&c);
                        }
                        v.certificate = Some(cert_view(&c));
                    }
                    Err(err) => v.error = Some(err.to_string()),
                },
            }
            v
        })
        .collect();
    Ok(BlobView {
        size: table.as_bytes().len(),
        pages: table.pages(),
        entries,
        expect_tcb,
    })
}

/// The view as pretty JSON.
pub fn to_json(view: &BlobView) -> Result<String, ShowError> {
    Ok(serde_json::to_string_pretty(view)? + "\n")
}

/// The view as text for people.
pub fn to_text(view: &BlobView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} bytes ({} page(s)), {} entries",
        view.size,
        view.pages,
        view.entries.len()
    );
    for e in &view.entries {
        let _ = writeln!(
            out,
            "\n[{}] {}  guid {}  offset {}  length {}",
            e.index, e.kind, e.guid, e.offset, e.length
        );
        if let Some(c) = &e.certificate {
            let _ = writeln!(out, "    subject    {}", c.subject);
            let _ = writeln!(out, "    issuer     {}", c.issuer);
            let _ = writeln!(out, "    serial     {}", c.serial);
            let _ = writeln!(out, "    valid      {} .. {}", c.not_before, c.not_after);
            let _ = writeln!(out, "    key        {}", c.key);
            let _ = writeln!(out, "    signature  {}", c.signature_algorithm);
            let _ = writeln!(out, "    sha256     {}", c.sha256);
            for x in &c.amd_extensions {
                let value = match &x.value {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(out, "    {:<14} {value}  ({} {})", x.key, x.name, x.oid);
            }
        }
        if let Some(c) = &e.crl {
            let _ = writeln!(out, "    issuer     {}", c.issuer);
            let _ = writeln!(out, "    updated    {}", c.this_update);
            if let Some(n) = &c.next_update {
                let _ = writeln!(out, "    next       {n}");
            }
            let _ = writeln!(out, "    signature  {}", c.signature_algorithm);
            let revoked = if c.revoked.is_empty() {
                "none".to_string()
            } else {
                c.revoked.join(", ")
            };
            let _ = writeln!(out, "    revoked    {revoked}");
        }
        if let Some(err) = &e.error {
            let _ = writeln!(out, "    error      {err}");
        }
    }
    if let Some(tcb) = &view.expect_tcb {
        let _ = writeln!(
            out,
            "\nThe TCB this blob was issued for, as `blob check` takes it; it must equal the \
             host's reported TCB (`snphost show tcb`):\n  --expect-tcb {tcb}"
        );
    }
    out
}
