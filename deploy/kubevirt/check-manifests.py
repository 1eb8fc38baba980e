#!/usr/bin/env python3
"""Checks the KubeVirt manifests in deploy/kubevirt/ (issue 17) with real checkers:

1. Kubernetes kinds (the admission policies and their bindings): kubernetes-validate in strict
   mode against Kubernetes 1.36 (admissionregistration.k8s.io/v1 MutatingAdmissionPolicy) and
   the newest it knows.
2. KubeVirt kinds (VirtualMachine, KubeVirt): TypeScript's compiler against KubeVirt's API as
   published in the npm package @kubevirt-ui-ext/kubevirt-api 1.7.0 (generated from KubeVirt's
   OpenAPI): each manifest becomes an object literal of its type, so an unknown field anywhere
   or a wrong type fails. A misspelt copy of each must fail too (the check has teeth).
3. The Plugin (plugin.kubevirt.io/v1alpha1, which that package predates): its fields against
   the Plugin API's (KubeVirt 1.9), KubeVirt's admission rules for a sidecar socketPath (under
   /var/run/kubevirt-plugin/<plugin>/, ending in .sock, at most 108 characters), and agreement
   with the admission policy: the injected container mounts that directory with subPath <plugin>
   and runs `run --plugin <plugin>`, so the hook listens where the Plugin says; the paths fit a
   Unix socket address (107 bytes); the blob hostPath is mounted read-only. The legacy variant:
   the annotation's image is the one its policy patches, with `--layout legacy`.

Usage: deploy/kubevirt/check-manifests.py [--npm-dir DIR]
Prints one line per check; exits 1 if any failed, 2 if kubernetes-validate is missing, 3 if
npm or the TypeScript check cannot be set up. The npm packages are installed once into DIR
(default /var/cache/coco-sidecar/kubevirt-api).
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NPM_PACKAGES = ["@kubevirt-ui-ext/kubevirt-api@1.7.0", "typescript@5.9"]
TS_TYPES = {("kubevirt.io/v1", "VirtualMachine"): "V1VirtualMachine",
            ("kubevirt.io/v1", "KubeVirt"): "V1KubeVirt"}
# The Plugin API of KubeVirt 1.9 (plugin.kubevirt.io/v1alpha1): field -> nested fields.
PLUGIN_SPEC = {"condition", "failureStrategy", "domainHooks", "nodeHooks",
               "mutatingAdmissionPolicies", "validatingAdmissionPolicies",
               "mutatingAdmissionWebhooks", "validatingAdmissionWebhooks"}
DOMAIN_HOOK = {"cel", "sidecar", "condition", "failureStrategy", "timeout"}
PLUGIN_ROOT = "/var/run/kubevirt-plugin/"
HOOK_SOCKET = "coco-hook.sock"
SIDECAR_SOCKET = "coco/sidecar.sock"


def _k8s_checker():
    """deploy/k8s/check-manifests.py, for its check() and kubernetes-validate schema(). Loading
    it imports PyYAML and kubernetes-validate, or exits 2 saying how to install them."""
    path = os.path.join(ROOT, "deploy", "k8s", "check-manifests.py")
    spec = importlib.util.spec_from_file_location("k8s_check_manifests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # MutatingAdmissionPolicy is admissionregistration.k8s.io/v1 from Kubernetes 1.36
    module.K8S_VERSIONS = ["1.36.0", module.kubernetes_validate.latest_version()]
    return module


K8S = _k8s_checker()
check = K8S.check
yaml = K8S.yaml


def load():
    docs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "deploy", "kubevirt", "**", "*.yaml"),
                                 recursive=True)):
        with open(path) as f:
            rel = os.path.relpath(path, ROOT)
            docs += [(rel, d) for d in yaml.safe_load_all(f) if d]
    return docs


def name(rel, doc):
    return f"{rel}: {doc['kind']}/{doc['metadata']['name']}"


# --- 1. Kubernetes kinds ------------------------------------------------------------------

def kubernetes(docs):
    for rel, doc in docs:
        if "kubevirt.io" not in doc["apiVersion"]:
            K8S.schema(rel, [doc])


# --- 2. KubeVirt kinds through tsc ---------------------------------------------------------

def npm_setup(npm_dir):
    tsc = os.path.join(npm_dir, "node_modules", ".bin", "tsc")
    if os.path.exists(tsc):
        return tsc
    if shutil.which("npm") is None:
        print("check-manifests: npm is not installed (apt-get install npm)", file=sys.stderr)
        sys.exit(3)
    os.makedirs(npm_dir, exist_ok=True)
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "--prefix",
                        npm_dir] + NPM_PACKAGES, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not os.path.exists(tsc):
        print(f"check-manifests: npm install {' '.join(NPM_PACKAGES)} failed:\n{r.stderr}",
              file=sys.stderr)
        sys.exit(3)
    return tsc


# Where a misspelt copy gets its misspelling: a field KubeVirt's API names there.
MISSPELL_AT = {"VirtualMachine": ["spec", "template", "spec", "domain"],
               "KubeVirt": ["spec", "configuration", "developerConfiguration"]}


def misspell(doc):
    """A copy of doc with the first field at MISSPELL_AT misspelt."""
    bad = json.loads(json.dumps(doc))
    node = bad
    for key in MISSPELL_AT[doc["kind"]]:
        node = node[key]
    key = sorted(node)[0]
    node[key + "x"] = node.pop(key)
    return bad


def typescript_names(doc):
    """doc with the field names the package's generator changed: KubeVirt's
    spec.configuration is `_configuration` in its TypeScript (openapi-generator avoids the
    name; its own FromJSON maps JSON `configuration` to it)."""
    doc = json.loads(json.dumps(doc))
    if doc["kind"] == "KubeVirt" and "configuration" in doc.get("spec", {}):
        doc["spec"]["_configuration"] = doc["spec"].pop("configuration")
    return doc


def typescript(docs, npm_dir):
    tsc = npm_setup(npm_dir)
    kubevirt = [(rel, d) for rel, d in docs if (d["apiVersion"], d["kind"]) in TS_TYPES]
    check(len(kubevirt) >= 4, f"{len(kubevirt)} VirtualMachine and KubeVirt manifests found")
    for label, make in (("", lambda d: d), (" (misspelt copy)", misspell)):
        for rel, doc in kubevirt:
            with tempfile.TemporaryDirectory(dir=npm_dir) as d:
                ts_type = TS_TYPES[(doc["apiVersion"], doc["kind"])]
                with open(os.path.join(d, "m.ts"), "w") as f:
                    f.write(f"import type {{ {ts_type} }} from "
                            "'@kubevirt-ui-ext/kubevirt-api/kubevirt';\n"
                            f"export const m: {ts_type} = "
                            f"{json.dumps(typescript_names(make(doc)), indent=1)};\n")
                with open(os.path.join(d, "tsconfig.json"), "w") as f:
                    json.dump({"compilerOptions": {"strict": True, "noEmit": True,
                                                   "module": "nodenext",
                                                   "moduleResolution": "nodenext",
                                                   "skipLibCheck": True},
                               "files": ["m.ts"]}, f)
                r = subprocess.run([tsc, "-p", d], capture_output=True, text=True, timeout=300)
                out = (r.stdout + r.stderr).strip().replace(d + "/", "")
                if label:
                    check(r.returncode != 0 and "does not exist in type" in out,
                          f"{name(rel, doc)}{label}: refused by KubeVirt's API types")
                else:
                    check(r.returncode == 0,
                          f"{name(rel, doc)}: KubeVirt's API types (tsc){': ' + out if out else ''}")


# --- 3. The Plugin, and agreement with the admission policies ------------------------------

def cel_string(expr, field):
    m = re.search(rf'\b{field}:\s*"([^"]*)"', expr)
    return m.group(1) if m else None


def cel_list(expr, field):
    m = re.search(rf'\b{field}:\s*\[([^\]]*)\]', expr)
    return re.findall(r'"([^"]*)"', m.group(1)) if m else []


def strings(node):
    """Every string in a parsed document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [s for n in node for s in strings(n)]
    return []


def plugin(docs):
    plugins = [(rel, d) for rel, d in docs if d["kind"] == "Plugin"]
    policies = {d["metadata"]["name"]: d for _, d in docs
                if d["kind"] == "MutatingAdmissionPolicy"}
    bindings = {d["spec"]["policyName"] for _, d in docs
                if d["kind"] == "MutatingAdmissionPolicyBinding"}
    check(set(policies) <= bindings, "every admission policy has a binding")
    check(len(plugins) == 1, "one Plugin")
    for rel, p in plugins:
        where = name(rel, p)
        pname = p["metadata"]["name"]
        check(p["apiVersion"] == "plugin.kubevirt.io/v1alpha1", f"{where}: apiVersion")
        check("namespace" not in p["metadata"], f"{where}: cluster-scoped (no namespace)")
        check(set(p["spec"]) <= PLUGIN_SPEC, f"{where}: spec fields {sorted(p['spec'])}")
        check(p["spec"].get("failureStrategy") in ("Fail", "Ignore", None),
              f"{where}: failureStrategy")
        hooks = p["spec"].get("domainHooks", [])
        check(len(hooks) == 1 and set(hooks[0]) <= DOMAIN_HOOK, f"{where}: one domain hook")
        sock = hooks[0].get("sidecar", {}).get("socketPath", "")
        # KubeVirt's own admission rules for socketPath
        check(sock.endswith(".sock"), f"{where}: socketPath ends with .sock")
        check(len(sock) <= 108, f"{where}: socketPath at most 108 characters")
        check(sock.startswith(f"{PLUGIN_ROOT}{pname}/"),
              f"{where}: socketPath under {PLUGIN_ROOT}{pname}/")
        refs = [r["name"] for r in p["spec"].get("mutatingAdmissionPolicies", [])]
        check(refs and all(r in policies for r in refs), f"{where}: its policies exist: {refs}")
        for ref in refs:
            expr = policies[ref]["spec"]["mutations"][0]["jsonPatch"]["expression"]
            mount = re.search(r'name:\s*"kubevirt-plugin-sockets",\s*mountPath:\s*"([^"]*)",'
                              r'\s*subPath:\s*"([^"]*)"', expr)
            check(mount is not None, f"{ref}: mounts kubevirt-plugin-sockets with subPath")
            if mount is None:
                continue
            mount_path, sub_path = mount.groups()
            check(sub_path == pname and mount_path == f"{PLUGIN_ROOT}{pname}",
                  f"{ref}: the container sees {PLUGIN_ROOT}{pname} as compute does")
            args = cel_list(expr, "args")
            check(args[:1] == ["run"] and "--plugin" in args and
                  args[args.index("--plugin") + 1] == pname,
                  f"{ref}: runs `run --plugin {pname}`: {args}")
            check(os.path.join(mount_path, HOOK_SOCKET) == sock,
                  f"{ref}: the hook listens at the Plugin's socketPath {sock}")
            qemu = os.path.join(mount_path, SIDECAR_SOCKET)
            check(len(qemu.encode()) <= 107, f"{ref}: QEMU's socket path {qemu} fits 107 bytes")
            certs = args[args.index("--certs") + 1] if "--certs" in args else ""
            blob = re.search(r'name:\s*"coco-sidecar-certs",\s*mountPath:\s*"([^"]*)",'
                             r'\s*readOnly:\s*true', expr)
            check(blob is not None and os.path.dirname(certs) == blob.group(1),
                  f"{ref}: the blob {certs} is on the read-only hostPath mount")
            check(cel_string(expr, "type") == "Directory" and
                  "runAsUser: 107" in expr and 'drop: ["ALL"]' in expr,
                  f"{ref}: hostPath type Directory; uid 107; no capabilities")
    # Legacy: the annotation's container is the one the legacy policy patches
    for rel, d in docs:
        if d["kind"] != "VirtualMachine":
            continue
        ann = d["spec"]["template"]["metadata"].get("annotations", {})
        if "hooks.kubevirt.io/hookSidecars" not in ann:
            continue
        sidecars = json.loads(ann["hooks.kubevirt.io/hookSidecars"])
        check(len(sidecars) == 1, f"{name(rel, d)}: one hook sidecar")
        image, args = sidecars[0]["image"], sidecars[0]["args"]
        check(args[:1] == ["run"] and args[args.index("--layout") + 1] == "legacy",
              f"{name(rel, d)}: runs `run --layout legacy`")
        legacy = [p for p in policies.values()
                  if any(image.startswith(prefix) for prefix in
                         re.findall(r'startsWith\("([^"]*)"\)', " ".join(strings(p))))]
        check(len(legacy) == 1, f"{name(rel, d)}: a policy patches its container ({image})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--npm-dir", default=os.environ.get(
        "COCO_KUBEVIRT_API_DIR", "/var/cache/coco-sidecar/kubevirt-api"))
    a = ap.parse_args()
    docs = load()
    check(bool(docs), "manifests found")
    kubernetes(docs)
    plugin(docs)
    typescript(docs, a.npm_dir)
    print(f"check-manifests: {len(K8S.passes)} passed, {len(K8S.failures)} failed")
    for f in K8S.failures:
        print(f"  failed: {f}")
    return 1 if K8S.failures else 0


if __name__ == "__main__":
    sys.exit(main())
