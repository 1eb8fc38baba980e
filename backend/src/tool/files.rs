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
use crate::argpath::{self, ArgPathError, Want};

/// The error for a directory found inside DIR, naming it as DIR when it holds what import
/// reads.
fn subdirectory(path: PathBuf) -> FilesError {
    let holds_certs = fs::read_dir(&path).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().to_ascii_lowercase();
            let stem = name.split('.').next().unwrap_or_default().to_owned();
            STEMS.iter().any(|(s, _)| *s == stem)
        })
    });
    let hint = if holds_certs {
        format!(
            " (it holds certificate files: `coco-sidecar blob import {} BLOB`?)",
            path.display()
        )
    } else {
        String::new()
    };
    FilesError::Subdirectory(path, hint)
}

/// The file stems import reads, and the kind each is stored as (ASVK under the ASK GUID).
const STEMS: [(&str, CertKind); 6] = [
    ("ark", CertKind::Ark),
    ("ask", CertKind::Ask),
    ("asvk", CertKind::Ask),
    ("vcek", CertKind::Vcek),
    ("vlek", CertKind::Vlek),
    ("crl", CertKind::Crl),
];
const SLOT_ARK: usize = 0;
const SLOT_ASK: usize = 1;
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
    /// A directory inside DIR: DIR was probably its parent.
    #[error(
        "{0} is a directory; import reads files only, so DIR must be the directory that holds \
         the certificate files themselves{1}"
    )]
    Subdirectory(PathBuf, String),
    /// DIR is not a readable directory.
    #[error(transparent)]
    Path(#[from] ArgPathError),
    /// No ARK or no ASK/ASVK, without `--allow-incomplete`.
    #[error(
        "the directory has no {0}, so the blob would not hold the whole chain and verifiers \
         would have to get it elsewhere: add {1} (`snphost fetch ca pem DIR`), or pass \
         --allow-incomplete if that is intended"
    )]
    Incomplete(&'static str, &'static str),
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
        "the directory has no vcek.* or vlek.*; verifiers then fetch the VCEK themselves: add it \
         (`snphost fetch vek pem DIR`), or pass --allow-incomplete if that is intended"
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
    #[error("{path}{whence}: {source}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// Where in it, for PEM.
        whence: String,
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
    /// Accept a directory without the ARK, the ASK/ASVK, or the VCEK/VLEK.
    pub allow_incomplete: bool,
}

/// A certificate or CRL file's DER, and where in the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The DER bytes.
    pub der: Vec<u8>,
    /// `" (the PEM block at lines B-E)"` for PEM, empty for DER: for messages about the content.
    pub whence: String,
}

/// The first line (1-based) of a PEM block's body that is not base64, and why.
fn bad_base64_line(lines: &[(usize, &str)]) -> Option<(usize, String)> {
    lines.iter().find_map(|(n, line)| {
        let line = line.trim_end_matches('\r');
        // Encapsulated headers (RFC 1421 "Proc-Type: ...") are not in certificates.
        line.char_indices()
            .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=')))
            .map(|(col, c)| (*n, format!("{c:?} in column {} is not base64", col + 1)))
    })
}

/// Decodes a certificate or CRL file: one DER object, or one PEM block labelled `label`.
/// PEM errors name the line.
pub fn decode_file(path: &Path, bytes: &[u8], label: &str) -> Result<Decoded, FilesError> {
    let encoding = |why: String| FilesError::Encoding {
        path: path.to_owned(),
        why,
    };
    if bytes.first() == Some(&0x30) {
        return Ok(Decoded {
            der: bytes.to_vec(),
            whence: String::new(),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        encoding(format!(
            "neither DER (it does not start with a SEQUENCE tag) nor PEM text (byte {} is not \
             UTF-8)",
            e.valid_up_to()
        ))
    })?;
    let lines: Vec<(usize, &str)> = text.lines().enumerate().map(|(i, l)| (i + 1, l)).collect();
    let begins: Vec<usize> = lines
        .iter()
        .filter(|(_, l)| l.starts_with("-----BEGIN "))
        .map(|(n, _)| *n)
        .collect();
    let begin = match begins.as_slice() {
        [one] => *one,
        [] => {
            return Err(encoding(format!(
                "neither DER (it does not start with a SEQUENCE tag) nor PEM (no \
                 \"-----BEGIN {label}-----\" line)"
            )))
        }
        many => {
            let at: Vec<String> = many.iter().map(usize::to_string).collect();
            return Err(encoding(format!(
                "holds {} PEM blocks (lines {}); import takes exactly one {label} per file: \
                 split it (a cert_chain file holds the ASK, then the ARK)",
                many.len(),
                at.join(", ")
            )));
        }
    };
    let header = lines[begin - 1].1.trim_end();
    let found = header
        .strip_prefix("-----BEGIN ")
        .and_then(|h| h.strip_suffix("-----"))
        .unwrap_or(header);
    if found != label {
        return Err(encoding(format!(
            "line {begin}: PEM block is \"{found}\", expected \"{label}\""
        )));
    }
    let end_line = format!("-----END {found}-----");
    let Some(end) = lines[begin..]
        .iter()
        .find(|(_, l)| l.trim_end() == end_line)
        .map(|(n, _)| *n)
    else {
        return Err(encoding(format!(
            "line {begin}: \"{header}\" has no \"{end_line}\" line after it (truncated?)"
        )));
    };
    if let Some((n, why)) = bad_base64_line(&lines[begin..end - 1]) {
        return Err(encoding(format!("line {n}: {why}")));
    }
    let offset = text
        .lines()
        .take(begin - 1)
        .map(|l| l.len() + 1)
        .sum::<usize>()
        .min(bytes.len());
    let (_, der) = pem::decode_vec(&bytes[offset..])
        .map_err(|e| encoding(format!("lines {begin}-{end}: bad PEM: {e}")))?;
    Ok(Decoded {
        der,
        whence: format!(" (the PEM block at lines {begin}-{end})"),
    })
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
    argpath::check("DIR", dir, Want::CertDir)?;
    let listing = fs::read_dir(dir).map_err(|e| argpath::explain("DIR", dir, Want::CertDir, e))?;
    for entry in listing {
        names.push(entry.map_err(io_err(dir))?.path());
    }
    names.sort();
    for path in names {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| FilesError::Unknown(path.clone()))?;
        if path.is_dir() {
            return Err(subdirectory(path));
        }
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
            let slot = if stem == "asvk" { SLOT_ASK } else { slot };
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
            (None, None) if !opts.allow_incomplete && !nothing => return Err(FilesError::NoVek),
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
        let Decoded { der, whence } = decode_file(path, &bytes, label(kind))?;
        let checked = if kind == CertKind::Crl {
            Crl::from_der(&der).map(|_| ())
        } else {
            Cert::from_der(&der).map(|_| ())
        };
        checked.map_err(|source| FilesError::Cert {
            path: path.clone(),
            whence,
            source,
        })?;
        certs.push((kind.guid(), der));
    }
    // After the files themselves: a file that is wrong (a chain file in ask.pem) is the
    // first thing to fix.
    if !opts.allow_incomplete && !nothing {
        if !slots.contains_key(&SLOT_ARK) {
            return Err(FilesError::Incomplete("ark.* (AMD's root, ARK)", "ark.pem"));
        }
        if !slots.contains_key(&SLOT_ASK) {
            let (what, file) = if slots.contains_key(&vlek) {
                ("asvk.* (the ASVK that signs VLEKs)", "asvk.pem")
            } else {
                ("ask.* (the ASK that signs VCEKs)", "ask.pem")
            };
            return Err(FilesError::Incomplete(what, file));
        }
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
    argpath::check("DIR", dir, Want::OutDir)?;
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
    fs::create_dir_all(dir).map_err(|e| argpath::explain("DIR", dir, Want::OutDir, e))?;
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
            decode_file(p, text.as_bytes(), "CERTIFICATE")
                .expect("pem")
                .der,
            der
        );
        assert_eq!(decode_file(p, &der, "CERTIFICATE").expect("der").der, der);
        let with_text = format!("Certificate:\n  blah\n{text}");
        assert_eq!(
            decode_file(p, with_text.as_bytes(), "CERTIFICATE")
                .expect("leading text")
                .der,
            der
        );
        let two = format!("{text}{text}");
        assert!(decode_file(p, two.as_bytes(), "CERTIFICATE").is_err());
        assert!(decode_file(p, text.as_bytes(), "X509 CRL").is_err());
        assert!(decode_file(p, b"\xff\xfe", "CERTIFICATE").is_err());
        assert!(decode_file(p, b"hello", "CERTIFICATE").is_err());
    }

    #[test]
    fn pem_errors_name_the_line() {
        let p = Path::new("ask.pem");
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let good = pem::encode_string("CERTIFICATE", LineEnding::LF, &der).expect("pem");
        let why = |text: &str| match decode_file(p, text.as_bytes(), "CERTIFICATE") {
            Err(FilesError::Encoding { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        // Two lines of text, then the block: a body line with a character base64 lacks.
        let broken = format!("a\nb\n{}", good.replacen("MAMC", "MA*C", 1));
        assert_eq!(why(&broken), "line 4: '*' in column 3 is not base64");
        let truncated: String = good.lines().take(1).map(|l| format!("{l}\n")).collect();
        assert!(why(&truncated).starts_with("line 1: \"-----BEGIN CERTIFICATE-----\" has no"));
        let twice = format!("{good}x\n{good}");
        assert!(
            why(&twice).starts_with("holds 2 PEM blocks (lines 1, 5)"),
            "{}",
            why(&twice)
        );
        let crl = good.replace("CERTIFICATE", "X509 CRL");
        assert_eq!(
            why(&crl),
            "line 1: PEM block is \"X509 CRL\", expected \"CERTIFICATE\""
        );
        let ok = decode_file(p, format!("x\n{good}").as_bytes(), "CERTIFICATE").expect("ok");
        assert_eq!(ok.whence, " (the PEM block at lines 2-4)");
    }
}
