#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/k8s/ (issue 7), in three layers:

1. schema: every document validates with kubernetes-validate in strict mode (unknown fields are
   errors) against the oldest Kubernetes the manifests target (1.33, where native sidecar
   containers are GA) and the newest the validator knows. Works offline: the validator ships
   its schemas.
2. policy: what docs/kubernetes.md promises: non-root, read-only root file system, no
   privilege escalation, all capabilities dropped, RuntimeDefault seccomp, requests and limits
   (requests <= limits) on every container; read-only certificate hostPath in the VM pod; the
   sidecar is a native sidecar with startup, liveness and readiness probes that run
   `coco-sidecar health` on the socket it serves (readiness with the blob it serves, liveness
   without); QEMU's coco-sidecar object names that socket and links to its sev-snp-guest.
3. smoke (with --bin BINARY, the real coco-sidecar): the manifests' own command lines, with
   their container paths mapped into a temporary directory: the sidecar's `serve` arguments
   start a sidecar, every probe command passes against it, the updater Job's `blob install`
   installs a new blob (real AMD certificates from tests/fixtures/amd), and the readiness
   probe passes on the new blob.

Usage: deploy/k8s/check-manifests.py [--bin PATH] [FILE...]   (default: deploy/k8s/*.yaml)
Prints one line per check; exits 1 if any failed, 2 if kubernetes-validate is missing.
Install the validator with: python3 -m pip install kubernetes-validate==1.37.0
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import yaml
    import kubernetes_validate
except ImportError as e:  # pragma: no cover - environment check
    print(f"check-manifests: {e}: python3 -m pip install kubernetes-validate==1.37.0",
          file=sys.stderr)
    sys.exit(2)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
SIDECAR_IMAGE = re.compile(r"(^|/)coco-sidecar:")
# Container paths of the manifests, and what they become in the smoke test.
MAPPED = ["/run/coco-sidecar", "/var/lib/coco-sidecar", "/incoming"]

failures = []
passes = []


def check(ok, what):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    (passes if ok else failures).append(what)
    return ok


# --- quantities -------------------------------------------------------------------------

SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q):
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(q))
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * SUFFIX[m.group(2) or ""]


# --- schema -----------------------------------------------------------------------------

def schema(path, docs):
    for doc in docs:
        name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                check(True, f"{name}: strict schema of Kubernetes {version}")
            except kubernetes_validate.ValidationError as e:
                check(False, f"{name}: strict schema of Kubernetes {version}: "
                             f"{'.'.join(map(str, e.path))}: {e.message}")


# --- policy -----------------------------------------------------------------------------

def pod_spec(doc):
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("Job", "DaemonSet", "Deployment", "StatefulSet"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def all_containers(spec):
    return [("initContainer", c) for c in spec.get("initContainers", [])] + \
           [("container", c) for c in spec.get("containers", [])]


def effective(spec, c, key):
    """A securityContext field of the container, else of the pod."""
    return c.get("securityContext", {}).get(key, spec.get("securityContext", {}).get(key))


def policy_container(where, spec, c):
    sc = c.get("securityContext", {})
    check(effective(spec, c, "runAsNonRoot") is True, f"{where}: runAsNonRoot")
    uid = effective(spec, c, "runAsUser")
    check(uid is None or uid != 0, f"{where}: runAsUser is not 0")
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false")
    check(sc.get("privileged", False) is False, f"{where}: not privileged")
    caps = sc.get("capabilities", {})
    check(caps.get("drop") == ["ALL"] and not caps.get("add"),
          f"{where}: capabilities drop ALL, add none")
    seccomp = effective(spec, c, "seccompProfile") or {}
    check(seccomp.get("type") == "RuntimeDefault", f"{where}: seccompProfile RuntimeDefault")
    res = c.get("resources", {})
    for kind in ("cpu", "memory"):
        req = res.get("requests", {}).get(kind)
        lim = res.get("limits", {}).get(kind)
        ok = req is not None and lim is not None
        if ok:
            try:
                ok = quantity(req) <= quantity(lim)
            except ValueError as e:
                print(f"     {e}")
                ok = False
        check(ok, f"{where}: {kind} request {req} <= limit {lim}")


def arg_after(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def policy_sidecar(where, spec, c):
    args = c.get("args", [])
    sock = arg_after(args, "--socket")
    certs = arg_after(args, "--certs")
    check(args[:1] == ["serve"] and sock and certs, f"{where}: serve --socket --certs")
    check(c.get("restartPolicy") == "Always",
          f"{where}: a native sidecar (init container with restartPolicy Always)")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        cmd = c.get(probe, {}).get("exec", {}).get("command", [])
        check(cmd[:2] == ["/coco-sidecar", "health"] and arg_after(cmd, "--socket") == sock,
              f"{where}: {probe} runs coco-sidecar health on {sock}")
        probe_certs = arg_after(cmd, "--certs")
        if probe == "readinessProbe":
            check(probe_certs == certs, f"{where}: readinessProbe checks the served blob")
        else:
            check(probe_certs is None, f"{where}: {probe} does not depend on the blob")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    blob_dir = os.path.dirname(certs or "/")
    check(blob_dir in mounts and mounts[blob_dir].get("readOnly") is True,
          f"{where}: the blob directory {blob_dir} is mounted read-only")
    return sock


def policy(path, docs):
    for doc in docs:
        spec = pod_spec(doc)
        name = f"{path}: {doc['kind']}/{doc['metadata']['name']}"
        if spec is None:
            continue
        check(spec.get("automountServiceAccountToken") is False,
              f"{name}: no service account token")
        check(spec.get("securityContext", {}).get("runAsNonRoot") is True,
              f"{name}: pod runAsNonRoot")
        host_paths = {v["name"] for v in spec.get("volumes", []) if "hostPath" in v}
        sockets = []
        for kind, c in all_containers(spec):
            where = f"{name}: {kind} {c['name']}"
            policy_container(where, spec, c)
            if doc["kind"] == "Pod":
                for m in c.get("volumeMounts", []):
                    if m["name"] in host_paths:
                        check(m.get("readOnly") is True,
                              f"{where}: hostPath {m['name']} mounted read-only")
            if SIDECAR_IMAGE.search(c.get("image", "")) and c.get("args", [])[:1] == ["serve"]:
                sockets.append(policy_sidecar(where, spec, c))
        for kind, c in all_containers(spec):
            if c["name"] != "qemu":
                continue
            objects = []
            for a in c.get("args", []):
                if a.startswith("{"):
                    o = json.loads(a)
                    if o.get("qom-type") == "coco-sidecar":
                        objects.append(o)
            check(len(objects) == 1, f"{name}: QEMU has one coco-sidecar object")
            for sock in sockets:
                ok = any(o.get("socket") == {"type": "unix", "path": sock} for o in objects)
                check(ok, f"{name}: QEMU's coco-sidecar object connects to {sock}")
            for o in objects:
                guest = o.get("snp-guest")
                check(any(a.startswith("sev-snp-guest,") and f"id={guest}" in a.split(",")
                          for a in c.get("args", [])),
                      f"{name}: the coco-sidecar object links to the sev-snp-guest object")


# --- smoke ------------------------------------------------------------------------------

def remap(args, tmp, binary):
    out = []
    for a in args:
        if a == "/coco-sidecar":
            a = binary
        for p in MAPPED:
            if a == p or a.startswith(p + "/"):
                a = os.path.join(tmp, p.strip("/").replace("/", "_")) + a[len(p):]
        out.append(a)
    return out


def fixture_blob(binary, generation, dest):
    src = os.path.join(ROOT, "tests", "fixtures", "amd")
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(src, f"ark-{generation}.pem"), os.path.join(d, "ark.pem"))
        shutil.copy(os.path.join(src, f"ask-{generation}.pem"), os.path.join(d, "ask.pem"))
        shutil.copy(os.path.join(src, f"vcek-{generation}.der"), os.path.join(d, "vcek.der"))
        subprocess.run([binary, "blob", "import", d, dest], check=True,
                       stdout=subprocess.DEVNULL)


def wait_accepting(path, proc, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                return True
        except OSError:
            time.sleep(0.02)
    return False


def run(cmd, what, expect=0):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    line = (r.stdout or r.stderr).strip().splitlines()
    check(r.returncode == expect,
          f"smoke: {what}: exit {r.returncode} ({line[0] if line else 'no output'})")
    return r


def smoke(binary, docs):
    pods = [d for d in docs if d["kind"] == "Pod"]
    jobs = [d for d in docs if d["kind"] == "Job"]
    with tempfile.TemporaryDirectory() as tmp:
        for p in MAPPED:
            os.makedirs(os.path.join(tmp, p.strip("/").replace("/", "_")))
        certs_dir = os.path.join(tmp, "var_lib_coco-sidecar")
        fixture_blob(binary, "milan", os.path.join(certs_dir, "certs.blob"))
        fixture_blob(binary, "turin", os.path.join(tmp, "incoming", "certs.blob"))
        for pod in pods:
            for _, c in all_containers(pod["spec"]):
                if not (SIDECAR_IMAGE.search(c.get("image", "")) and c["args"][:1] == ["serve"]):
                    continue
                where = f"{pod['metadata']['name']}/{c['name']}"
                args = remap(c["args"], tmp, binary)
                sock = arg_after(args, "--socket")
                env = dict(os.environ, **{e["name"]: e["value"] for e in c.get("env", [])})
                proc = subprocess.Popen([binary] + args, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                try:
                    if not check(wait_accepting(sock, proc),
                                 f"smoke: {where}: serve with the manifest's arguments"):
                        continue
                    mode = os.stat(sock).st_mode & 0o777
                    want = int(arg_after(args, "--socket-mode") or "600", 8)
                    check(mode == want, f"smoke: {where}: socket mode {mode:o}")
                    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                        cmd = remap(c[probe]["exec"]["command"], tmp, binary)
                        run(cmd, f"{where}: {probe}")
                    for job in jobs:
                        for _, jc in all_containers(pod_spec(job)):
                            if jc.get("args", [])[:2] == ["blob", "install"]:
                                run([binary] + remap(jc["args"], tmp, binary),
                                    f"{job['metadata']['name']}/{jc['name']}: blob install "
                                    f"while the sidecar serves")
                    with open(os.path.join(certs_dir, "certs.blob"), "rb") as a, \
                            open(os.path.join(tmp, "incoming", "certs.blob"), "rb") as b:
                        if jobs:
                            check(a.read() == b.read(), "smoke: the served blob is the new one")
                    cmd = remap(c["readinessProbe"]["exec"]["command"], tmp, binary)
                    run(cmd, f"{where}: readinessProbe after the update")
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        _, err = proc.communicate(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        _, err = proc.communicate()
                    if proc.returncode != 0:
                        print(err.decode(errors="replace"), file=sys.stderr)
                    check(proc.returncode == 0, f"smoke: {where}: clean exit on SIGTERM")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", help="coco-sidecar binary for the smoke test")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    files = a.files or sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml")))
    check(bool(files), "manifests found")
    everything = []
    for path in files:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        rel = os.path.relpath(path, ROOT)
        schema(rel, docs)
        policy(rel, docs)
        everything += docs
    if a.bin:
        smoke(os.path.abspath(a.bin), everything)
    print(f"check-manifests: {len(passes)} passed, {len(failures)} failed")
    for f in failures:
        print(f"  failed: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
