//! The domain hook proper: a pure function from (VMI JSON, libvirt domain XML) to domain XML.
//!
//! For a VMI with `spec.domain.launchSecurity.snp`, it
//! - backs guest RAM with a shared memfd (`<memoryBacking>` `<source type="memfd"/>` and
//!   `<access mode="shared"/>`, keeping hugepages and everything else there; NUMA cells that ask
//!   for private memory are made shared too), since the sidecar writes into guest RAM that QEMU
//!   shares with it as file descriptors;
//! - adds `-object coco-sidecar` to `<qemu:commandline>`, linked to the `sev-snp-guest` object
//!   libvirt generates from `<launchSecurity type="sev-snp">` (always `lsec0`), with the
//!   sidecar's socket as QEMU's container sees it.
//!
//! Anything else passes unchanged. It is idempotent: virt-launcher runs hooks again when it
//! redefines a domain, and then sends the domain with this hook's additions in it, so every
//! `coco-sidecar` object already on the command line is replaced, never added to. XML
//! namespaces are resolved, not matched by prefix: KubeVirt's own marshalling writes
//! `<qemu:commandline>` under `xmlns:qemu` for legacy hooks, while the Plugins API's
//! (libvirtxml) writes `<commandline xmlns="...qemu/1.0">`; both, and libvirt's own form, work.

use serde_json::Value;
use thiserror::Error;
use xot::{NameId, NamespaceId, Node, Xot};

/// libvirt's namespace for QEMU command-line passthrough.
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// The id libvirt gives the `sev-snp-guest` object it generates from `<launchSecurity>`.
pub const LIBVIRT_SNP_GUEST: &str = "lsec0";
/// The id of the object this hook adds.
pub const OBJECT_ID: &str = "cs0";

/// Why a domain could not be mutated.
#[derive(Debug, Error)]
pub enum DomainError {
    #[error("the VMI is not JSON: {0}")]
    VmiJson(#[from] serde_json::Error),
    #[error("the VMI is not a JSON object")]
    VmiNotObject,
    #[error("the domain is not well-formed XML (no DTD allowed): {0}")]
    Parse(#[from] xot::ParseError),
    #[error("the domain is not UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    #[error("the domain's top element is not <domain>")]
    NotDomain,
    #[error(
        "the VMI asks for SEV-SNP (spec.domain.launchSecurity.snp) but the domain has no \
         <launchSecurity type=\"sev-snp\"> ({0}); the coco-sidecar object links to the \
         sev-snp-guest object libvirt generates from it"
    )]
    NoSnpGuest(String),
    #[error("the prefix 'qemu' is bound to another namespace on <domain> ({0})")]
    QemuPrefixTaken(String),
    #[error("cannot write the domain: {0}")]
    Serialize(#[from] xot::Error),
}

/// What the hook did with a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not an SEV-SNP VMI: the domain is to be used as given, byte for byte.
    NotSnp,
    /// The mutated domain.
    Mutated(String),
}

impl Outcome {
    /// The domain to hand back: `given` unchanged, or the mutated one.
    pub fn into_domain(self, given: &[u8]) -> Vec<u8> {
        match self {
            Outcome::NotSnp => given.to_vec(),
            Outcome::Mutated(xml) => xml.into_bytes(),
        }
    }
}

/// Whether the VMI (KubeVirt's JSON) asks for an SEV-SNP guest, as virt-launcher decides it:
/// a non-null `spec.domain.launchSecurity.snp`.
pub fn wants_snp(vmi: &[u8]) -> Result<bool, DomainError> {
    let vmi: Value = serde_json::from_slice(vmi)?;
    if !vmi.is_object() {
        return Err(DomainError::VmiNotObject);
    }
    Ok(vmi
        .pointer("/spec/domain/launchSecurity/snp")
        .is_some_and(|snp| !snp.is_null()))
}

/// The `-object` argument: QEMU's JSON form, which the object's `SocketAddress` needs.
pub fn sidecar_object(socket: &str) -> String {
    format!(
        r#"{{"qom-type":"coco-sidecar","id":"{OBJECT_ID}","socket":{{"type":"unix","path":{}}},"snp-guest":"{LIBVIRT_SNP_GUEST}"}}"#,
        Value::from(socket)
    )
}

/// Whether a QEMU command-line argument creates a `coco-sidecar` object, in JSON or in the
/// dotted key=value form.
pub fn is_sidecar_object(arg: &str) -> bool {
    let arg = arg.trim();
    if arg.starts_with('{') {
        return serde_json::from_str::<Value>(arg)
            .is_ok_and(|v| v.get("qom-type").and_then(Value::as_str) == Some("coco-sidecar"));
    }
    let mut parts = arg.split(',');
    parts.next() == Some("coco-sidecar") || arg.split(',').any(|p| p == "qom-type=coco-sidecar")
}

/// The hook: `domain` mutated for `vmi`, whose sidecar QEMU reaches at `socket`.
pub fn mutate(vmi: &[u8], domain: &[u8], socket: &str) -> Result<Outcome, DomainError> {
    if !wants_snp(vmi)? {
        return Ok(Outcome::NotSnp);
    }
    let text = std::str::from_utf8(domain)?;
    let mut xot = Xot::new();
    let doc = xot.parse(text)?;
    let mut d = Domain::new(&mut xot, doc)?;
    d.check_snp_guest()?;
    d.share_memory();
    d.set_sidecar_object(socket)?;
    Ok(Outcome::Mutated(xot.to_string(doc)?))
}

/// A parsed domain and the names this hook looks for.
struct Domain<'x> {
    xot: &'x mut Xot,
    root: Node,
    qemu: NamespaceId,
}

impl<'x> Domain<'x> {
    fn new(xot: &'x mut Xot, doc: Node) -> Result<Self, DomainError> {
        let root = xot.document_element(doc)?;
        let domain = xot.add_name("domain");
        if xot.element(root).map(|e| e.name()) != Some(domain) {
            return Err(DomainError::NotDomain);
        }
        let qemu = xot.add_namespace(QEMU_NS);
        Ok(Domain { xot, root, qemu })
    }

    fn name(&mut self, local: &str) -> NameId {
        self.xot.add_name(local)
    }

    fn qemu_name(&mut self, local: &str) -> NameId {
        self.xot.add_name_ns(local, self.qemu)
    }

    /// The element children of `parent` named `name`.
    fn children_named(&self, parent: Node, name: NameId) -> Vec<Node> {
        self.xot
            .children(parent)
            .filter(|&c| self.xot.element(c).is_some_and(|e| e.name() == name))
            .collect()
    }

    fn child(&mut self, parent: Node, local: &str) -> Option<Node> {
        let name = self.name(local);
        self.children_named(parent, name).into_iter().next()
    }

    fn attribute(&mut self, node: Node, local: &str) -> Option<String> {
        let name = self.name(local);
        self.xot.get_attribute(node, name).map(str::to_owned)
    }

    fn check_snp_guest(&mut self) -> Result<(), DomainError> {
        let found = match self.child(self.root, "launchSecurity") {
            None => "it has none".to_owned(),
            Some(ls) => match self.attribute(ls, "type") {
                Some(t) if t == "sev-snp" => return Ok(()),
                Some(t) => format!("it has type=\"{t}\""),
                None => "it has no type".to_owned(),
            },
        };
        Err(DomainError::NoSnpGuest(found))
    }

    /// `<memoryBacking>` with a shared memfd source; NUMA cells not private.
    fn share_memory(&mut self) {
        let backing = match self.child(self.root, "memoryBacking") {
            Some(b) => b,
            None => {
                let name = self.name("memoryBacking");
                let b = self.xot.new_element(name);
                let sizes: Vec<Node> = ["memory", "maxMemory", "currentMemory"]
                    .iter()
                    .filter_map(|n| self.child(self.root, n))
                    .collect();
                let anchor = sizes
                    .into_iter()
                    .max_by_key(|&n| self.xot.child_index(self.root, n));
                self.place(self.root, anchor, b);
                b
            }
        };
        self.ensure_child_attribute(backing, "source", "type", "memfd");
        self.ensure_child_attribute(backing, "access", "mode", "shared");
        if let Some(numa) = self
            .child(self.root, "cpu")
            .and_then(|cpu| self.child(cpu, "numa"))
        {
            let cell = self.name("cell");
            let mem_access = self.name("memAccess");
            for c in self.children_named(numa, cell) {
                if self.xot.get_attribute(c, mem_access).is_some() {
                    self.xot.set_attribute(c, mem_access, "shared");
                }
            }
        }
    }

    /// Sets `attr` of `parent`'s child `local` to `value`, adding the child if missing.
    fn ensure_child_attribute(&mut self, parent: Node, local: &str, attr: &str, value: &str) {
        let node = match self.child(parent, local) {
            Some(n) => n,
            None => {
                let name = self.name(local);
                let n = self.xot.new_element(name);
                let anchor = self.last_element_child(parent);
                self.place(parent, anchor, n);
                n
            }
        };
        let attr = self.name(attr);
        self.xot.set_attribute(node, attr, value);
    }

    fn last_element_child(&self, parent: Node) -> Option<Node> {
        self.xot
            .reverse_children(parent)
            .find(|&c| self.xot.is_element(c))
    }

    /// Inserts `new` after `anchor`, preceded by a copy of the whitespace that precedes
    /// `anchor` (so that indentation follows its neighbours'), or first in `parent` without
    /// any. [`Domain::remove`] undoes exactly this, which keeps the hook idempotent.
    fn place(&mut self, parent: Node, anchor: Option<Node>, new: Node) {
        // Insertions next to existing nodes of a parsed tree cannot fail: both are elements
        // of one document and `new` is fresh.
        match anchor {
            Some(anchor) => {
                let indent = self
                    .xot
                    .previous_sibling(anchor)
                    .and_then(|p| self.xot.text_str(p))
                    .filter(|t| t.chars().all(char::is_whitespace))
                    .map(str::to_owned);
                let _ = self.xot.insert_after(anchor, new);
                if let Some(indent) = indent {
                    let ws = self.xot.new_text(&indent);
                    let _ = self.xot.insert_before(new, ws);
                }
            }
            None => {
                let _ = self.xot.prepend(parent, new);
            }
        }
    }

    /// Removes `node` and the whitespace right before it.
    fn remove(&mut self, node: Node) {
        if let Some(prev) = self.xot.previous_sibling(node) {
            if self
                .xot
                .text_str(prev)
                .is_some_and(|t| t.chars().all(char::is_whitespace))
            {
                let _ = self.xot.remove(prev);
            }
        }
        let _ = self.xot.remove(node);
    }

    /// Replaces every `coco-sidecar` object on the QEMU command line with the one for `socket`.
    fn set_sidecar_object(&mut self, socket: &str) -> Result<(), DomainError> {
        let commandline = self.qemu_name("commandline");
        let arg = self.qemu_name("arg");
        let value = self.name("value");
        let lines = self.children_named(self.root, commandline);
        for &line in &lines {
            for a in self.children_named(line, arg) {
                let is_ours = self
                    .xot
                    .get_attribute(a, value)
                    .is_some_and(is_sidecar_object);
                if !is_ours {
                    continue;
                }
                let option = self
                    .xot
                    .preceding_siblings(a)
                    .skip(1)
                    .find(|&p| self.xot.is_element(p))
                    .filter(|&p| {
                        self.xot.element(p).is_some_and(|e| e.name() == arg)
                            && matches!(
                                self.xot.get_attribute(p, value),
                                Some("-object" | "--object")
                            )
                    });
                self.remove(a);
                if let Some(option) = option {
                    self.remove(option);
                }
            }
        }
        let line = match lines.first() {
            Some(&l) => l,
            None => {
                self.declare_qemu_prefix()?;
                let l = self.xot.new_element(commandline);
                let anchor = self.last_element_child(self.root);
                self.place(self.root, anchor, l);
                l
            }
        };
        for v in ["-object".to_owned(), sidecar_object(socket)] {
            let a = self.xot.new_element(arg);
            self.xot.set_attribute(a, value, v);
            let anchor = self.last_element_child(line);
            match anchor {
                Some(_) => self.place(line, anchor, a),
                None => {
                    let _ = self.xot.append(line, a);
                }
            }
        }
        Ok(())
    }

    /// `xmlns:qemu` on `<domain>`, as libvirt writes it, unless already there.
    fn declare_qemu_prefix(&mut self) -> Result<(), DomainError> {
        let prefix = self.xot.add_prefix("qemu");
        match self.xot.namespaces(self.root).get(prefix).copied() {
            Some(ns) if ns == self.qemu => Ok(()),
            Some(ns) => Err(DomainError::QemuPrefixTaken(
                self.xot.namespace_str(ns).to_owned(),
            )),
            None => {
                self.xot.namespaces_mut(self.root).insert(prefix, self.qemu);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNP_VMI: &[u8] = br#"{"spec":{"domain":{"launchSecurity":{"snp":{}}}}}"#;

    #[test]
    fn only_a_non_null_snp_asks_for_snp() {
        assert!(wants_snp(SNP_VMI).expect("json"));
        for vmi in [
            &br#"{"spec":{"domain":{"launchSecurity":{"snp":null}}}}"#[..],
            br#"{"spec":{"domain":{"launchSecurity":{"sev":{}}}}}"#,
            br#"{"spec":{"domain":{}}}"#,
            br#"{}"#,
        ] {
            assert!(
                !wants_snp(vmi).expect("json"),
                "{}",
                String::from_utf8_lossy(vmi)
            );
        }
        assert!(matches!(wants_snp(b"[1]"), Err(DomainError::VmiNotObject)));
        assert!(matches!(wants_snp(b"{"), Err(DomainError::VmiJson(_))));
    }

    #[test]
    fn the_object_is_qemus_json_with_an_escaped_path() {
        let o: Value = serde_json::from_str(&sidecar_object("/run/a\"b.sock")).expect("json");
        assert_eq!(o["qom-type"], "coco-sidecar");
        assert_eq!(o["id"], "cs0");
        assert_eq!(o["snp-guest"], "lsec0");
        assert_eq!(o["socket"]["type"], "unix");
        assert_eq!(o["socket"]["path"], "/run/a\"b.sock");
    }

    #[test]
    fn sidecar_objects_are_recognised_in_both_forms() {
        assert!(is_sidecar_object(&sidecar_object("/x.sock")));
        assert!(is_sidecar_object(
            "coco-sidecar,id=cs1,socket.type=unix,socket.path=/x"
        ));
        assert!(is_sidecar_object("qom-type=coco-sidecar,id=cs1"));
        assert!(!is_sidecar_object(
            r#"{"qom-type":"sev-snp-guest","id":"coco-sidecar"}"#
        ));
        assert!(!is_sidecar_object("-object"));
        assert!(!is_sidecar_object("name=opt/coco-sidecar,file=/x"));
        assert!(!is_sidecar_object("{not json"));
    }

    #[test]
    fn a_domain_without_snp_launch_security_is_refused_for_an_snp_vmi() {
        let sev = br#"<domain type="kvm"><name>a</name><launchSecurity type="sev"/></domain>"#;
        let err = mutate(SNP_VMI, sev, "/x.sock").expect_err("refused");
        assert!(err.to_string().contains("type=\"sev\""), "{err}");
        let none = br#"<domain type="kvm"><name>a</name></domain>"#;
        assert!(matches!(
            mutate(SNP_VMI, none, "/x.sock"),
            Err(DomainError::NoSnpGuest(_))
        ));
    }

    #[test]
    fn hostile_documents_are_errors() {
        let dtd = br#"<!DOCTYPE d [<!ENTITY a "aaaa">]><domain>&a;</domain>"#;
        assert!(matches!(
            mutate(SNP_VMI, dtd, "/x"),
            Err(DomainError::Parse(_))
        ));
        assert!(matches!(
            mutate(SNP_VMI, b"<domain>", "/x"),
            Err(DomainError::Parse(_))
        ));
        assert!(matches!(
            mutate(SNP_VMI, b"\xff<domain/>", "/x"),
            Err(DomainError::NotUtf8(_))
        ));
        assert!(matches!(
            mutate(SNP_VMI, b"<other/>", "/x"),
            Err(DomainError::NotDomain)
        ));
        let taken = br#"<domain xmlns:qemu="urn:other"><launchSecurity type="sev-snp"/></domain>"#;
        assert!(matches!(
            mutate(SNP_VMI, taken, "/x"),
            Err(DomainError::QemuPrefixTaken(_))
        ));
    }

    #[test]
    fn a_non_snp_vmi_leaves_even_garbage_untouched() {
        let vmi = br#"{"spec":{"domain":{}}}"#;
        assert_eq!(mutate(vmi, b"not xml", "/x").expect("ok"), Outcome::NotSnp);
        assert_eq!(Outcome::NotSnp.into_domain(b"not xml"), b"not xml");
    }
}
