//! The domain hook on domains shaped like KubeVirt's (tests/fixtures/README.md), issue 17:
//! the result is the reviewed golden file; applying the hook to its own result changes nothing;
//! a redefinition's domain with an old object gets exactly one, the new one; everything the
//! hook does not own comes through unchanged (checked by removing what it owns and comparing
//! trees); a VMI without SEV-SNP gets its domain back byte for byte.

use coco_kubevirt::domain::{mutate, Outcome, QEMU_NS};
use serde_json::Value;
use xot::{Node, Xot};

const SOCKET: &str = "/var/run/kubevirt-plugin/coco-sidecar/coco/sidecar.sock";
const SNP_VMI: &[u8] = include_bytes!("fixtures/vmi-snp.json");
const PLAIN_VMI: &[u8] = include_bytes!("fixtures/vmi-plain.json");
const LEGACY: &str = include_str!("fixtures/domain-legacy.xml");
const PLUGIN: &str = include_str!("fixtures/domain-plugin.xml");
const RERUN: &str = include_str!("fixtures/domain-plugin-rerun.xml");
const LEGACY_GOLDEN: &str = include_str!("fixtures/domain-legacy.golden.xml");
const PLUGIN_GOLDEN: &str = include_str!("fixtures/domain-plugin.golden.xml");

fn hook(domain: &str) -> String {
    match mutate(SNP_VMI, domain.as_bytes(), SOCKET).expect("mutate") {
        Outcome::Mutated(xml) => xml,
        Outcome::NotSnp => panic!("the SNP VMI was not taken as SNP"),
    }
}

#[test]
fn kubevirt_domains_become_the_golden_files() {
    assert_eq!(hook(LEGACY), LEGACY_GOLDEN.trim_end());
    assert_eq!(hook(PLUGIN), PLUGIN_GOLDEN.trim_end());
}

#[test]
fn applying_the_hook_twice_equals_once() {
    for domain in [LEGACY, PLUGIN, RERUN] {
        let once = hook(domain);
        assert_eq!(hook(&once), once);
    }
}

#[test]
fn a_vmi_without_snp_gets_its_domain_back_byte_for_byte() {
    for domain in [LEGACY, PLUGIN] {
        let out = mutate(PLAIN_VMI, domain.as_bytes(), SOCKET).expect("mutate");
        assert_eq!(out, Outcome::NotSnp);
        assert_eq!(out.into_domain(domain.as_bytes()), domain.as_bytes());
    }
}

/// What a domain says, read through namespace-resolved names.
struct Read {
    xot: Xot,
    root: Node,
}

impl Read {
    fn new(xml: &str) -> Read {
        let mut xot = Xot::new();
        let doc = xot.parse(xml).expect("well-formed");
        let root = xot.document_element(doc).expect("root");
        Read { xot, root }
    }

    fn children(&self, parent: Node, ns: &str, local: &str) -> Vec<Node> {
        self.xot
            .children(parent)
            .filter(|&c| {
                self.xot.element(c).is_some_and(|e| {
                    let (l, n) = self.xot.name_ns_str(e.name());
                    l == local && n == ns
                })
            })
            .collect()
    }

    fn one(&self, parent: Node, local: &str) -> Node {
        let c = self.children(parent, "", local);
        assert_eq!(c.len(), 1, "one <{local}>");
        c[0]
    }

    fn attr(&self, node: Node, local: &str) -> Option<String> {
        self.xot
            .attributes(node)
            .iter()
            .find(|(n, _)| self.xot.local_name_str(*n) == local)
            .map(|(_, v)| v.clone())
    }

    /// The values of `<arg>` in QEMU's namespace, in order, over every `<commandline>`.
    fn qemu_args(&self) -> Vec<String> {
        self.children(self.root, QEMU_NS, "commandline")
            .into_iter()
            .flat_map(|l| self.children(l, QEMU_NS, "arg"))
            .map(|a| self.attr(a, "value").expect("value"))
            .collect()
    }
}

fn sidecar_objects(args: &[String]) -> Vec<(usize, Value)> {
    args.iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let v: Value = serde_json::from_str(a).ok()?;
            (v["qom-type"] == "coco-sidecar").then_some((i, v))
        })
        .collect()
}

#[test]
fn the_result_has_shared_memfd_ram_and_one_linked_sidecar_object() {
    for domain in [LEGACY, PLUGIN, RERUN] {
        let out = Read::new(&hook(domain));
        let backing = out.one(out.root, "memoryBacking");
        let source = out.one(backing, "source");
        assert_eq!(out.attr(source, "type").as_deref(), Some("memfd"));
        let access = out.one(backing, "access");
        assert_eq!(out.attr(access, "mode").as_deref(), Some("shared"));

        let args = out.qemu_args();
        let objects = sidecar_objects(&args);
        assert_eq!(objects.len(), 1, "{args:?}");
        let (i, o) = &objects[0];
        assert_eq!(args[i - 1], "-object");
        assert_eq!(
            o["socket"],
            serde_json::json!({"type": "unix", "path": SOCKET})
        );
        assert_eq!(o["snp-guest"], "lsec0");
        // libvirt generates lsec0 from this element
        let ls = out.one(out.root, "launchSecurity");
        assert_eq!(out.attr(ls, "type").as_deref(), Some("sev-snp"));
    }
}

#[test]
fn hugepages_numa_and_other_arguments_are_kept() {
    for domain in [PLUGIN, RERUN] {
        let out = Read::new(&hook(domain));
        let backing = out.one(out.root, "memoryBacking");
        let page = out.one(out.one(backing, "hugepages"), "page");
        assert_eq!(out.attr(page, "size").as_deref(), Some("2"));
        assert_eq!(out.attr(page, "unit").as_deref(), Some("M"));
        let cell = out.one(out.one(out.one(out.root, "cpu"), "numa"), "cell");
        assert_eq!(out.attr(cell, "memAccess").as_deref(), Some("shared"));
        let args = out.qemu_args();
        assert_eq!(args[0], "-fw_cfg");
        assert!(args[1].starts_with("name=opt/com.coreos/config,"));
        assert_eq!(args.len(), 4, "{args:?}");
        assert!(!args.iter().any(|a| a.contains("old.sock")), "{args:?}");
    }
}

/// `xml` with the hook's additions taken out again and whitespace-only text dropped.
fn without_hook_additions(xml: &str, added_backing: bool, added_commandline: bool) -> Read {
    let mut r = Read::new(xml);
    let root = r.root;
    let backing = r.one(root, "memoryBacking");
    if added_backing {
        r.xot.remove(backing).expect("remove");
    } else {
        for local in ["source", "access"] {
            let n = r.one(backing, local);
            r.xot.remove(n).expect("remove");
        }
    }
    for line in r.children(root, QEMU_NS, "commandline") {
        if added_commandline {
            r.xot.remove(line).expect("remove");
            continue;
        }
        let args = r.children(line, QEMU_NS, "arg");
        for a in args.iter().rev().take(2) {
            r.xot.remove(*a).expect("remove");
        }
    }
    if added_commandline {
        let qemu = r.xot.add_prefix("qemu");
        r.xot.namespaces_mut(root).remove(qemu);
    }
    r.xot.remove_insignificant_whitespace(root);
    r
}

#[test]
fn nothing_the_hook_does_not_own_changes() {
    // The legacy domain has no <memoryBacking> or command line; the plugin one has both
    let mut input = Read::new(LEGACY);
    input.xot.remove_insignificant_whitespace(input.root);
    let output = without_hook_additions(&hook(LEGACY), true, true);
    let mut output = output;
    // xmlns:qemu was already on the legacy domain and stays
    let qemu = output.xot.add_prefix("qemu");
    let ns = output.xot.add_namespace(QEMU_NS);
    output.xot.namespaces_mut(output.root).insert(qemu, ns);
    assert_eq!(
        input.xot.to_string(input.root).expect("xml"),
        output.xot.to_string(output.root).expect("xml")
    );

    let mut input = Read::new(PLUGIN);
    // the only change the hook makes to what it does not add: NUMA memory becomes shared
    let cell = input.one(input.one(input.one(input.root, "cpu"), "numa"), "cell");
    let mem_access = input.xot.add_name("memAccess");
    input.xot.set_attribute(cell, mem_access, "shared");
    input.xot.remove_insignificant_whitespace(input.root);
    let output = without_hook_additions(&hook(PLUGIN), false, false);
    assert_eq!(
        input.xot.to_string(input.root).expect("xml"),
        output.xot.to_string(output.root).expect("xml")
    );
}

#[test]
fn the_qemu_namespace_is_kept_in_the_form_it_came() {
    // Legacy (KubeVirt's DomainSpec): the qemu prefix declared on <domain>
    let legacy = hook(LEGACY);
    assert!(legacy.contains(r#"xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0""#));
    assert!(legacy.contains("<qemu:commandline><qemu:arg value=\"-object\"/>"));
    // Plugins (libvirtxml): the default namespace on <commandline>, arguments unprefixed
    let plugin = hook(PLUGIN);
    assert!(plugin.contains(r#"<commandline xmlns="http://libvirt.org/schemas/domain/qemu/1.0">"#));
    assert!(!plugin.contains("qemu:"));
    // A domain with no QEMU namespace at all gets libvirt's own form
    let bare = LEGACY.replacen(
        r#" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0""#,
        "",
        1,
    );
    let out = hook(&bare);
    assert!(out.starts_with(r#"<domain xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0""#));
    assert_eq!(sidecar_objects(&Read::new(&out).qemu_args()).len(), 1);
}
