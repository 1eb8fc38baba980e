//! `blob import` and `blob export`: a directory of certificate files, one per kind and named
//! as snphost names them (`ark.*`, `ask.*`, `asvk.*`, `vcek.*`, `vlek.*`, `crl.*`), PEM or DER,
//! to and from a GHCB certificate table. Entries with GUIDs of no known kind travel as
//! `<guid>.bin` files holding their raw bytes, so that any valid table round-trips.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use coco_protocol::table::{CertKind, Guid, Table, TableError};
use thiserror::Error;
use x509_cert::der::pem::{self, LineEnding};

use super::cert::{Cert, CertError, Crl};

/// The file stems import reads, and the kind each is stored as (ASVK under the ASK GUID).
const STEMS: [(&str, CertKind); 6] = [
    ("ark", CertKind::Ark),
    ("ask", CertKind::Ask),
    ("asvk", CertKind::Ask),
    ("vcek", CertKind::Vcek),
    ("vlek", CertKind::Vlek),
    ("crl", CertKind::Crl),
];
const SLOT_VCEK: usize = 3;
const SLOT_VLEK: usize = 4;

/// Why a directory cannot become a blob, or a blob a directory.
#[derive(Debug, Error)]
pub enum FilesError {
    /// An I/O error, with the path it happened on.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A file import does not know.
    #[error(
        "{0}: not a certificate file import reads (ark.*, ask.*, asvk.*, vcek.*, vlek.*, \
         crl.*, or <guid>.bin); move it out of the directory"
    )]
    Unknown(PathBuf),
    /// Two files for one table slot.
    #[error("{0} and {1} are both the {2}; keep one")]
    Twice(PathBuf, PathBuf, &'static str),
    /// Both a VCEK and a VLEK.
    #[error(
        "the directory has both a VCEK ({0}) and a VLEK ({1}); a blob holds one: pass \
         --use vcek or --use vlek"
    )]
    VcekAndVlek(PathBuf, PathBuf),
    /// Neither a VCEK nor a VLEK.
    #[error(
        "the directory has no vcek.* or vlek.*; verifiers then fetch the VCEK themselves: pass \
         --allow-no-vek if that is intended"
    )]
    NoVek,
    /// Nothing at all.
    #[error("{0} holds no certificate files")]
    Empty(PathBuf),
    /// `--use` names a kind the directory does not have.
    #[error("--use {0}: the directory has no {0}.* file")]
    UseMissing(&'static str),
    /// A file that is neither one DER object nor one PEM block of the right label.
    #[error("{path}: {why}")]
    Encoding {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file that does not decode as the certificate or CRL it should be.
    #[error("{path}: {source}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// The decoding error.
        source: CertError,
    },
    /// The files do not make a valid table.
    #[error("the files do not make a valid certificate table: {0}")]
    Table(#[from] TableError),
    /// Export would overwrite files.
    #[error("{0} exists; pass --force to overwrite")]
    Exists(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Output encoding of `blob export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PEM text (`-----BEGIN CERTIFICATE-----`), 64-column base64, LF line ends.
    Pem,
    /// Binary DER, the bytes exactly as in the table.
    Der,
}

/// Which of a VCEK and a VLEK to take when a directory has both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UseVek {
    /// Keep the VCEK, ignore the VLEK.
    Vcek,
    /// Keep the VLEK, ignore the VCEK.
    Vlek,
}

/// How `blob import` treats a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImportOptions {
    /// When both are present, keep this one.
    pub use_vek: Option<UseVek>,
    /// Accept a directory with neither VCEK nor VLEK.
    pub allow_no_vek: bool,
}

/// Decodes a certificate or CRL file: one DER object, or one PEM block labelled `label`.
pub fn decode_file(path: &Path, bytes: &[u8], label: &str) -> Result<Vec<u8>, FilesError> {
    let encoding = |why: String| FilesError::Encoding {
        path: path.to_owned(),
        why,
    };
    if bytes.first() == Some(&0x30) {
        return Ok(bytes.to_vec());
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| encoding("neither DER (no SEQUENCE tag) nor PEM text".into()))?;
    let blocks = text.matches("-----BEGIN ").count();
    if blocks != 1 {
        return Err(encoding(format!(
            "holds {blocks} PEM blocks; import takes exactly one {label} per file"
        )));
    }
    let start = text.find("-----BEGIN ").unwrap_or(0);
    let (found, der) =
        pem::decode_vec(&bytes[start..]).map_err(|e| encoding(format!("bad PEM: {e}")))?;
    if found != label {
        return Err(encoding(format!(
            "PEM block is \"{found}\", expected \"{label}\""
        )));
    }
    Ok(der)
}

fn label(kind: CertKind) -> &'static str {
    if kind == CertKind::Crl {
        "X509 CRL"
    } else {
        "CERTIFICATE"
    }
}

/// Reads `dir` and builds the table: ARK, ASK/ASVK, VCEK or VLEK, CRL, then opaque entries.
pub fn import(dir: &Path, opts: ImportOptions) -> Result<Table, FilesError> {
    let mut slots: BTreeMap<usize, (PathBuf, &'static str)> = BTreeMap::new();
    let mut opaque: BTreeMap<Guid, PathBuf> = BTreeMap::new();
    let mut names: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        names.push(entry.map_err(io_err(dir))?.path());
    }
    names.sort();
    for path in names {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| FilesError::Unknown(path.clone()))?;
        if !path.is_file() {
            return Err(FilesError::Unknown(path.clone()));
        }
        let stem = file
            .split('.')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if let Some(slot) = STEMS.iter().position(|(s, _)| *s == stem) {
            // ask and asvk share the ASK GUID: one slot.
            let slot = if stem == "asvk" { 1 } else { slot };
            if let Some((other, _)) = slots.get(&slot) {
                return Err(FilesError::Twice(
                    other.clone(),
                    path.clone(),
                    STEMS[slot].0,
                ));
            }
            slots.insert(slot, (path, STEMS[slot].0));
        } else if let (Some(guid), true) = (Guid::parse(&stem), file.ends_with(".bin")) {
            if CertKind::from_guid(guid).is_some() {
                return Err(FilesError::Unknown(path));
            }
            opaque.insert(guid, path);
        } else {
            return Err(FilesError::Unknown(path));
        }
    }
    let (vcek, vlek) = (SLOT_VCEK, SLOT_VLEK);
    let nothing = slots.is_empty() && opaque.is_empty();
    match opts.use_vek {
        Some(UseVek::Vcek) => {
            slots.remove(&vlek);
            if !slots.contains_key(&vcek) {
                return Err(FilesError::UseMissing("vcek"));
            }
        }
        Some(UseVek::Vlek) => {
            slots.remove(&vcek);
            if !slots.contains_key(&vlek) {
                return Err(FilesError::UseMissing("vlek"));
            }
        }
        None => match (slots.get(&vcek), slots.get(&vlek)) {
            (Some(a), Some(b)) => return Err(FilesError::VcekAndVlek(a.0.clone(), b.0.clone())),
            (None, None) if !opts.allow_no_vek && !nothing => return Err(FilesError::NoVek),
            _ => {}
        },
    }
    if slots.is_empty() && opaque.is_empty() {
        return Err(FilesError::Empty(dir.to_owned()));
    }
    let mut certs: Vec<(Guid, Vec<u8>)> = Vec::new();
    for (slot, (path, _)) in &slots {
        let kind = STEMS[*slot].1;
        let bytes = fs::read(path).map_err(io_err(path))?;
        let der = decode_file(path, &bytes, label(kind))?;
        let checked = if kind == CertKind::Crl {
            Crl::from_der(&der).map(|_| ())
        } else {
            Cert::from_der(&der).map(|_| ())
        };
        checked.map_err(|source| FilesError::Cert {
            path: path.clone(),
            source,
        })?;
        certs.push((kind.guid(), der));
    }
    for (guid, path) in &opaque {
        certs.push((*guid, fs::read(path).map_err(io_err(path))?));
    }
    let refs: Vec<(Guid, &[u8])> = certs.iter().map(|(g, d)| (*g, d.as_slice())).collect();
    Ok(Table::build(&refs)?)
}

/// The file name export gives an entry.
pub fn export_name(table: &Table, guid: Guid, format: Format) -> String {
    let ext = match format {
        Format::Pem => "pem",
        Format::Der => "der",
    };
    let has_vlek = table
        .entries()
        .iter()
        .any(|e| e.kind() == Some(CertKind::Vlek));
    match CertKind::from_guid(guid) {
        Some(CertKind::Ask) if has_vlek => format!("asvk.{ext}"),
        Some(kind) => format!("{}.{ext}", kind.name()),
        None => format!("{guid}.bin"),
    }
}

/// Writes one file per entry of `table` into `dir` (created if missing). Refuses to overwrite
/// an existing file unless `force`; checks all names before writing any. Returns the paths.
pub fn export(
    table: &Table,
    dir: &Path,
    format: Format,
    force: bool,
) -> Result<Vec<PathBuf>, FilesError> {
    let mut files = Vec::new();
    for entry in table.entries() {
        let path = dir.join(export_name(table, entry.guid, format));
        let data = table.data(entry);
        let bytes = match (entry.kind(), format) {
            (Some(kind), Format::Pem) => pem::encode_string(label(kind), LineEnding::LF, data)
                .map_err(|e| FilesError::Encoding {
                    path: path.clone(),
                    why: format!("cannot PEM-encode: {e}"),
                })?
                .into_bytes(),
            _ => data.to_vec(),
        };
        if !force && path.exists() {
            return Err(FilesError::Exists(path));
        }
        files.push((path, bytes));
    }
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut written = Vec::new();
    for (path, bytes) in files {
        fs::write(&path, bytes).map_err(io_err(&path))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_and_der_decode_alike() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let p = Path::new("x.pem");
        let text = pem::encode_string("CERTIFICATE", LineEnding::LF, &der).expect("pem");
        assert_eq!(
            decode_file(p, text.as_bytes(), "CERTIFICATE").expect("pem"),
            der
        );
        assert_eq!(decode_file(p, &der, "CERTIFICATE").expect("der"), der);
        let with_text = format!("Certificate:\n  blah\n{text}");
        assert_eq!(
            decode_file(p, with_text.as_bytes(), "CERTIFICATE").expect("leading text"),
            der
        );
        let two = format!("{text}{text}");
        assert!(decode_file(p, two.as_bytes(), "CERTIFICATE").is_err());
        assert!(decode_file(p, text.as_bytes(), "X509 CRL").is_err());
        assert!(decode_file(p, b"\xff\xfe", "CERTIFICATE").is_err());
        assert!(decode_file(p, b"hello", "CERTIFICATE").is_err());
    }
}
