//! The X.509 side of the blob tool: certificates and CRLs, AMD's TCB extensions, and the
//! RSASSA-PSS (SHA-384, MGF1-SHA-384, salt 48) signatures with which AMD signs ASKs, ASVKs,
//! VCEKs, VLEKs and CRLs.
//!
//! Pure Rust (RustCrypto: `x509-cert`, `rsa`, `p384`, `sha2`): no C toolchain, and nothing here
//! touches a private key, so the `rsa` crate's timing advisory (private-key operations) does not
//! apply.

use std::fmt;
use std::time::SystemTime;

use rsa::pkcs1::{RsaPssParams, TrailerField};
use rsa::signature::Verifier;
use rsa::traits::PublicKeyParts;
use sha2::{Digest, Sha256, Sha384};
use thiserror::Error;
use x509_cert::crl::CertificateList;
use x509_cert::der::asn1::{BitString, Ia5StringRef, ObjectIdentifier, Utf8StringRef};
use x509_cert::der::oid::db::{rfc4519, rfc5912};
use x509_cert::der::referenced::OwnedToRef;
use x509_cert::der::{Decode, Encode, Reader, SliceReader};
use x509_cert::name::Name;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;

/// AMD's arc for SEV-SNP certificate extensions.
pub const AMD_SNP_ARC: &str = "1.3.6.1.4.1.3704.1";
/// The salt length AMD's RSASSA-PSS signatures use (the SHA-384 output size).
pub const PSS_SALT_LEN: u8 = 48;

/// Why a certificate, CRL or signature is not what AMD's chain needs.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CertError {
    /// The bytes are not a DER X.509 certificate.
    #[error("not a DER X.509 certificate: {0}")]
    Decode(DerError),
    /// The bytes are not a DER X.509 CRL.
    #[error("not a DER X.509 CRL: {0}")]
    DecodeCrl(DerError),
    /// The signature algorithm is not RSASSA-PSS.
    #[error("signed with {0}, not RSASSA-PSS as AMD signs")]
    NotPss(String),
    /// RSASSA-PSS with other parameters than AMD's.
    #[error(
        "RSASSA-PSS parameters are {0}; AMD uses SHA-384, MGF1 with SHA-384, salt 48, trailer 1"
    )]
    PssParams(String),
    /// The algorithm inside the signed part differs from the outer one (RFC 5280 4.1.1.2).
    #[error("the signature algorithm inside the signed part differs from the outer one")]
    AlgorithmMismatch,
    /// The signer's key is not RSA, so it cannot have made an RSASSA-PSS signature.
    #[error("the signer's key is {0}, not RSA")]
    SignerNotRsa(String),
    /// The signature bytes do not verify.
    #[error("the signature does not verify with the key of {0}")]
    BadSignature(String),
}

/// Why bytes do not decode as the X.509 object they should be.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DerError {
    /// The DER decoder's reason.
    #[error(transparent)]
    Der(#[from] x509_cert::der::Error),
    /// No to-be-signed part where the signature covers one.
    #[error("no signed part")]
    NoSignedPart,
}

/// The kind and size of a public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyInfo {
    /// RSA with a modulus of this many bits.
    Rsa { bits: usize },
    /// A valid NIST P-384 point (what VCEKs and VLEKs sign reports with).
    P384,
    /// An EC key on another curve, or a P-384 key whose point is not valid.
    OtherEc(String),
    /// Anything else, by algorithm OID.
    Other(String),
}

impl fmt::Display for KeyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyInfo::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyInfo::P384 => f.write_str("ECDSA P-384"),
            KeyInfo::OtherEc(why) => write!(f, "EC ({why})"),
            KeyInfo::Other(oid) => write!(f, "algorithm {oid}"),
        }
    }
}

/// The value of one TCB-related extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtValue {
    /// An INTEGER (versions and security patch levels).
    Int(u64),
    /// A string (product name, CSP id).
    Text(String),
    /// Bytes (the hardware id, or a value that did not decode as expected).
    Bytes(Vec<u8>),
}

impl fmt::Display for ExtValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtValue::Int(v) => write!(f, "{v}"),
            ExtValue::Text(s) => f.write_str(s),
            ExtValue::Bytes(b) => f.write_str(&hex(b)),
        }
    }
}

/// One AMD extension (`1.3.6.1.4.1.3704.1.*`) of a VCEK or VLEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmdExtension {
    /// Dotted OID.
    pub oid: String,
    /// Short key as `--expect-tcb` takes it (`bl`, `snp`, ...) or a descriptive key.
    pub key: String,
    /// AMD's name for it (`blSPL`, `hwID`, ...).
    pub name: String,
    /// The decoded value.
    pub value: ExtValue,
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Colon-separated upper-case hex, as fingerprints are usually shown.
fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The first TLV inside the outer SEQUENCE of `der`: the exact to-be-signed bytes, as signed
/// (not a re-encoding, so a certificate that is not quite DER still verifies as signed).
fn signed_part(der: &[u8]) -> Option<&[u8]> {
    let mut reader = SliceReader::new(der).ok()?;
    reader
        .sequence(|inner| {
            let tbs = inner.tlv_bytes()?;
            // signatureAlgorithm and signatureValue: the sequence must be read to its end.
            inner.tlv_bytes()?;
            inner.tlv_bytes()?;
            Ok(tbs)
        })
        .ok()
}

fn alg_name(oid: &ObjectIdentifier) -> String {
    match *oid {
        rfc5912::ID_RSASSA_PSS => "RSASSA-PSS".into(),
        rfc5912::SHA_256_WITH_RSA_ENCRYPTION => "sha256WithRSAEncryption".into(),
        rfc5912::SHA_384_WITH_RSA_ENCRYPTION => "sha384WithRSAEncryption".into(),
        rfc5912::ECDSA_WITH_SHA_384 => "ecdsa-with-SHA384".into(),
        rfc5912::ECDSA_WITH_SHA_256 => "ecdsa-with-SHA256".into(),
        other => other.to_string(),
    }
}

/// Describes a signature algorithm, with PSS parameters when present.
pub fn describe_signature_algorithm(alg: &AlgorithmIdentifierOwned) -> String {
    match check_pss_params(alg) {
        Ok(()) => "RSASSA-PSS (SHA-384, MGF1-SHA-384, salt 48)".into(),
        Err(CertError::PssParams(p)) => format!("RSASSA-PSS ({p})"),
        Err(_) => alg_name(&alg.oid),
    }
}

/// Checks that `alg` is RSASSA-PSS with exactly AMD's parameters.
fn check_pss_params(alg: &AlgorithmIdentifierOwned) -> Result<(), CertError> {
    if alg.oid != rfc5912::ID_RSASSA_PSS {
        return Err(CertError::NotPss(alg_name(&alg.oid)));
    }
    let params = alg
        .parameters
        .as_ref()
        .ok_or_else(|| CertError::PssParams("absent (SHA-1 defaults)".into()))?;
    let der = params
        .to_der()
        .map_err(|e| CertError::PssParams(format!("not encodable: {e}")))?;
    let p = RsaPssParams::from_der(&der)
        .map_err(|e| CertError::PssParams(format!("not decodable: {e}")))?;
    let mgf_hash = p.mask_gen.parameters.as_ref().map(|h| h.oid);
    let ok = p.hash.oid == rfc5912::ID_SHA_384
        && p.mask_gen.oid == rfc5912::ID_MGF_1
        && mgf_hash == Some(rfc5912::ID_SHA_384)
        && p.salt_len == PSS_SALT_LEN
        && p.trailer_field == TrailerField::BC;
    if ok {
        Ok(())
    } else {
        Err(CertError::PssParams(format!(
            "hash {}, mask {} with {}, salt {}",
            alg_name(&p.hash.oid),
            alg_name(&p.mask_gen.oid),
            mgf_hash.map_or_else(|| "no hash".to_string(), |o| alg_name(&o)),
            p.salt_len
        )))
    }
}

/// Verifies an RSASSA-PSS SHA-384 signature over `tbs` made with `signer`'s key.
fn verify_pss(
    signer: &SubjectPublicKeyInfoOwned,
    signer_name: &str,
    tbs: &[u8],
    outer: &AlgorithmIdentifierOwned,
    inner: &AlgorithmIdentifierOwned,
    signature: &BitString,
) -> Result<(), CertError> {
    if outer != inner {
        return Err(CertError::AlgorithmMismatch);
    }
    check_pss_params(outer)?;
    let key = rsa::RsaPublicKey::try_from(signer.owned_to_ref())
        .map_err(|_| CertError::SignerNotRsa(key_info(signer).to_string()))?;
    let bad = || CertError::BadSignature(signer_name.to_string());
    let bytes = signature.as_bytes().ok_or_else(bad)?;
    let sig = rsa::pss::Signature::try_from(bytes).map_err(|_| bad())?;
    rsa::pss::VerifyingKey::<Sha384>::new_with_salt_len(key, usize::from(PSS_SALT_LEN))
        .verify(tbs, &sig)
        .map_err(|_| bad())
}

fn key_info(spki: &SubjectPublicKeyInfoOwned) -> KeyInfo {
    let oid = spki.algorithm.oid;
    if oid == rfc5912::RSA_ENCRYPTION {
        return match rsa::RsaPublicKey::try_from(spki.owned_to_ref()) {
            Ok(k) => KeyInfo::Rsa { bits: k.n().bits() },
            Err(e) => KeyInfo::Other(format!("RSA, undecodable: {e}")),
        };
    }
    if oid == rfc5912::ID_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        return match curve {
            Some(rfc5912::SECP_384_R_1) => match p384::PublicKey::try_from(spki.owned_to_ref()) {
                Ok(_) => KeyInfo::P384,
                Err(_) => KeyInfo::OtherEc("P-384, but not a valid curve point".into()),
            },
            Some(rfc5912::SECP_256_R_1) => KeyInfo::OtherEc("P-256".into()),
            Some(other) => KeyInfo::OtherEc(format!("curve {other}")),
            None => KeyInfo::OtherEc("no named curve".into()),
        };
    }
    KeyInfo::Other(alg_name(&oid))
}

fn name_string(name: &Name) -> String {
    name.to_string()
}

fn common_name(name: &Name) -> Option<String> {
    name.0.iter().flat_map(|rdn| rdn.0.iter()).find_map(|atv| {
        if atv.oid != rfc4519::CN {
            return None;
        }
        let der = atv.value.to_der().ok()?;
        Utf8StringRef::from_der(&der)
            .map(|s| s.as_str().to_owned())
            .or_else(|_| {
                x509_cert::der::asn1::PrintableStringRef::from_der(&der)
                    .map(|s| s.as_str().to_owned())
            })
            .ok()
    })
}

/// A decoded X.509 certificate and the bytes it came from.
#[derive(Debug, Clone)]
pub struct Cert {
    der: Vec<u8>,
    cert: Certificate,
}

impl Cert {
    /// Decodes one DER certificate; the bytes must be exactly one certificate.
    pub fn from_der(der: &[u8]) -> Result<Cert, CertError> {
        let cert = Certificate::from_der(der).map_err(|e| CertError::Decode(e.into()))?;
        Ok(Cert {
            der: der.to_vec(),
            cert,
        })
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Subject, RFC 4514 style.
    pub fn subject(&self) -> String {
        name_string(&self.cert.tbs_certificate.subject)
    }

    /// Issuer, RFC 4514 style.
    pub fn issuer(&self) -> String {
        name_string(&self.cert.tbs_certificate.issuer)
    }

    /// The subject's common name (`ARK-Milan`, `SEV-VCEK`, ...).
    pub fn subject_cn(&self) -> Option<String> {
        common_name(&self.cert.tbs_certificate.subject)
    }

    /// Whether subject and issuer are the same name.
    pub fn self_issued(&self) -> bool {
        self.cert.tbs_certificate.subject == self.cert.tbs_certificate.issuer
    }

    /// Whether `other` is named as this certificate's issuer.
    pub fn issued_by_name(&self, other: &Cert) -> bool {
        self.cert.tbs_certificate.issuer == other.cert.tbs_certificate.subject
    }

    /// Serial number, hex.
    pub fn serial(&self) -> String {
        hex(self.cert.tbs_certificate.serial_number.as_bytes())
    }

    fn serial_bytes(&self) -> &[u8] {
        self.cert.tbs_certificate.serial_number.as_bytes()
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.cert
            .tbs_certificate
            .validity
            .not_before
            .to_system_time()
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.cert
            .tbs_certificate
            .validity
            .not_after
            .to_system_time()
    }

    /// The subject's public key.
    pub fn key(&self) -> KeyInfo {
        key_info(&self.cert.tbs_certificate.subject_public_key_info)
    }

    /// The signature algorithm, described.
    pub fn signature_algorithm(&self) -> String {
        describe_signature_algorithm(&self.cert.signature_algorithm)
    }

    /// SHA-256 of the DER bytes, colon-separated hex.
    pub fn sha256(&self) -> String {
        colon_hex(&Sha256::digest(&self.der))
    }

    /// SHA-256 of the DER bytes.
    pub fn sha256_bytes(&self) -> [u8; 32] {
        Sha256::digest(&self.der).into()
    }

    /// Verifies that `signer`'s key made this certificate's signature, with AMD's algorithm.
    pub fn verify_signed_by(&self, signer: &Cert) -> Result<(), CertError> {
        let tbs = signed_part(&self.der).ok_or(CertError::Decode(DerError::NoSignedPart))?;
        verify_pss(
            &signer.cert.tbs_certificate.subject_public_key_info,
            &signer.subject_cn().unwrap_or_else(|| signer.subject()),
            tbs,
            &self.cert.signature_algorithm,
            &self.cert.tbs_certificate.signature,
            &self.cert.signature,
        )
    }

    /// Every extension under AMD's SEV-SNP arc, in certificate order.
    pub fn amd_extensions(&self) -> Vec<AmdExtension> {
        let Some(exts) = self.cert.tbs_certificate.extensions.as_ref() else {
            return Vec::new();
        };
        exts.iter()
            .filter_map(|e| {
                let oid = e.extn_id.to_string();
                let sub = oid.strip_prefix(AMD_SNP_ARC)?.strip_prefix('.')?.to_owned();
                Some(decode_amd_extension(&oid, &sub, e.extn_value.as_bytes()))
            })
            .collect()
    }

    /// The value of the TCB component `key` (`bl`, `tee`, `snp`, `ucode`, `fmc`, `spl4`..).
    pub fn tcb_value(&self, key: &str) -> Option<u64> {
        self.amd_extensions()
            .into_iter()
            .find(|e| e.key == key)
            .and_then(|e| match e.value {
                ExtValue::Int(v) => Some(v),
                _ => None,
            })
    }
}

fn decode_int(v: &[u8]) -> ExtValue {
    u64::from_der(v).map_or_else(|_| ExtValue::Bytes(v.to_vec()), ExtValue::Int)
}

fn decode_text(v: &[u8]) -> ExtValue {
    Ia5StringRef::from_der(v)
        .map(|s| s.as_str().to_owned())
        .or_else(|_| Utf8StringRef::from_der(v).map(|s| s.as_str().to_owned()))
        .map_or_else(|_| ExtValue::Bytes(v.to_vec()), ExtValue::Text)
}

/// The hardware id: AMD's VCEKs carry the raw bytes (64 for Milan/Genoa, 8 for Turin); some
/// encoders wrap them in an OCTET STRING, which is unwrapped when it is exactly that.
fn decode_hwid(v: &[u8]) -> ExtValue {
    match v {
        [0x04, n, rest @ ..] if usize::from(*n) == rest.len() && matches!(*n, 8 | 64) => {
            ExtValue::Bytes(rest.to_vec())
        }
        _ => ExtValue::Bytes(v.to_vec()),
    }
}

fn decode_amd_extension(oid: &str, sub: &str, v: &[u8]) -> AmdExtension {
    let (key, name, value) = match sub {
        "1" => ("struct_version", "structVersion", decode_int(v)),
        "2" => ("product_name", "productName1", decode_text(v)),
        "3.1" => ("bl", "blSPL", decode_int(v)),
        "3.2" => ("tee", "teeSPL", decode_int(v)),
        "3.3" => ("snp", "snpSPL", decode_int(v)),
        "3.4" => ("spl4", "spl_4", decode_int(v)),
        "3.5" => ("spl5", "spl_5", decode_int(v)),
        "3.6" => ("spl6", "spl_6", decode_int(v)),
        "3.7" => ("spl7", "spl_7", decode_int(v)),
        "3.8" => ("ucode", "ucodeSPL", decode_int(v)),
        "3.9" => ("fmc", "fmcSPL", decode_int(v)),
        "4" => ("hw_id", "hwID", decode_hwid(v)),
        "5" => ("csp_id", "cspID", decode_text(v)),
        other => {
            // A component a later product generation adds: SPLs are INTEGERs under .3.
            let value = if other.starts_with("3.") {
                decode_int(v)
            } else {
                ExtValue::Bytes(v.to_vec())
            };
            return AmdExtension {
                oid: oid.to_owned(),
                key: format!("amd.{other}"),
                name: format!("unknown AMD extension .{other}"),
                value,
            };
        }
    };
    AmdExtension {
        oid: oid.to_owned(),
        key: key.to_owned(),
        name: name.to_owned(),
        value,
    }
}

/// A decoded certificate revocation list.
#[derive(Debug, Clone)]
pub struct Crl {
    der: Vec<u8>,
    list: CertificateList,
}

impl Crl {
    /// Decodes one DER CRL.
    pub fn from_der(der: &[u8]) -> Result<Crl, CertError> {
        let list = CertificateList::from_der(der).map_err(|e| CertError::DecodeCrl(e.into()))?;
        Ok(Crl {
            der: der.to_vec(),
            list,
        })
    }

    /// Issuer, RFC 4514 style.
    pub fn issuer(&self) -> String {
        name_string(&self.list.tbs_cert_list.issuer)
    }

    /// When this CRL was issued.
    pub fn this_update(&self) -> SystemTime {
        self.list.tbs_cert_list.this_update.to_system_time()
    }

    /// When the next CRL is due, if said.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.list
            .tbs_cert_list
            .next_update
            .map(|t| t.to_system_time())
    }

    /// Serial numbers (hex) of the revoked certificates.
    pub fn revoked(&self) -> Vec<String> {
        self.list
            .tbs_cert_list
            .revoked_certificates
            .iter()
            .flatten()
            .map(|r| hex(r.serial_number.as_bytes()))
            .collect()
    }

    /// Whether this CRL was issued by `issuer` (by name) and lists `cert` as revoked.
    pub fn revokes(&self, cert: &Cert, issuer: &Cert) -> bool {
        self.list.tbs_cert_list.issuer == issuer.cert.tbs_certificate.subject
            && self
                .list
                .tbs_cert_list
                .revoked_certificates
                .iter()
                .flatten()
                .any(|r| r.serial_number.as_bytes() == cert.serial_bytes())
    }

    /// Whether `cert` is named as this CRL's issuer.
    pub fn issued_by_name(&self, cert: &Cert) -> bool {
        self.list.tbs_cert_list.issuer == cert.cert.tbs_certificate.subject
    }

    /// The signature algorithm, described.
    pub fn signature_algorithm(&self) -> String {
        describe_signature_algorithm(&self.list.signature_algorithm)
    }

    /// Verifies that `signer`'s key made this CRL's signature, with AMD's algorithm.
    pub fn verify_signed_by(&self, signer: &Cert) -> Result<(), CertError> {
        let tbs = signed_part(&self.der).ok_or(CertError::DecodeCrl(DerError::NoSignedPart))?;
        verify_pss(
            &signer.cert.tbs_certificate.subject_public_key_info,
            &signer.subject_cn().unwrap_or_else(|| signer.subject()),
            tbs,
            &self.list.signature_algorithm,
            &self.list.tbs_cert_list.signature,
            &self.list.signature,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNTH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/synthetic");

    fn synth(name: &str) -> Vec<u8> {
        std::fs::read(format!("{SYNTH}/{name}.der")).expect("fixture")
    }

    #[test]
    fn synthetic_chain_verifies_and_decodes() {
        let ark = Cert::from_der(&synth("ark")).expect("ark");
        let ask = Cert::from_der(&synth("ask")).expect("ask");
        let vcek = Cert::from_der(&synth("vcek")).expect("vcek");
        assert!(ark.self_issued());
        ark.verify_signed_by(&ark).expect("self-signed");
        ask.verify_signed_by(&ark).expect("ask by ark");
        vcek.verify_signed_by(&ask).expect("vcek by ask");
        assert_eq!(
            vcek.verify_signed_by(&ark),
            Err(CertError::BadSignature("ARK-Genoa".into()))
        );
        assert!(matches!(
            ark.verify_signed_by(&vcek),
            Err(CertError::SignerNotRsa(_))
        ));
        assert_eq!(ark.key(), KeyInfo::Rsa { bits: 4096 });
        assert_eq!(vcek.key(), KeyInfo::P384);
        assert_eq!(vcek.tcb_value("snp"), Some(22));
        assert_eq!(vcek.tcb_value("ucode"), Some(84));
        let exts = vcek.amd_extensions();
        assert!(exts
            .iter()
            .any(|e| e.key == "product_name" && e.value == ExtValue::Text("Genoa".into())));
        assert!(exts
            .iter()
            .any(|e| e.key == "hw_id" && matches!(&e.value, ExtValue::Bytes(b) if b.len() == 64)));
        assert_eq!(vcek.subject_cn().as_deref(), Some("SEV-VCEK"));
    }

    #[test]
    fn crl_verifies_and_lists_revocations() {
        let ark = Cert::from_der(&synth("ark")).expect("ark");
        let ask = Cert::from_der(&synth("ask")).expect("ask");
        let crl = Crl::from_der(&synth("crl-revoked")).expect("crl");
        crl.verify_signed_by(&ark).expect("signed by ark");
        assert!(crl.revokes(&ask, &ark));
        assert_eq!(crl.revoked(), vec!["0101".to_string()]);
        let clean = Crl::from_der(&synth("crl")).expect("crl");
        assert!(!clean.revokes(&ask, &ark));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            Cert::from_der(b"\x30\x03\x02\x01\x01"),
            Err(CertError::Decode(_))
        ));
        assert!(matches!(Cert::from_der(b""), Err(CertError::Decode(_))));
        assert!(matches!(
            Crl::from_der(&[0xff; 40]),
            Err(CertError::DecodeCrl(_))
        ));
        assert_eq!(
            decode_hwid(&[0x04, 0x08, 1, 2, 3, 4, 5, 6, 7, 8]),
            ExtValue::Bytes(vec![1, 2, 3, 4, 5, 6, 7, 8])
        );
        assert_eq!(decode_int(&[0x02, 0x02, 0x00, 0x80]), ExtValue::Int(128));
        assert_eq!(decode_int(&[0x05]), ExtValue::Bytes(vec![0x05]));
    }
}
