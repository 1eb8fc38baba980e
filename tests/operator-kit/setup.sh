#!/usr/bin/env bash
# Installs what the operator-kit tests need beyond the Rust toolchain, when it is missing:
#   systemd     systemd-analyze (verify) and systemd-socket-activate  tests/tests/deploy_systemd.rs
#   groff-base  groff, to render the generated man pages               tests/tests/deploy_systemd.rs
#   qemu-utils  qemu-img, for the disk of docs/qemu.md's command lines  tests/tests/docs_snippets.rs
#   curl        the metrics command of docs/kubernetes.md               tests/tests/docs_snippets.rs
# Idempotent; needs root (apt-get). CI runs it before the tests and sets COCO_REQUIRE_SYSTEMD=1,
# so that deploy_systemd.rs fails instead of printing SKIPPED.
set -euo pipefail

PKGS=(systemd groff-base qemu-utils curl)
missing=()
for p in "${PKGS[@]}"; do
    [ "$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[operator-kit] installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
for tool in systemd-analyze systemd-socket-activate groff qemu-img curl; do
    command -v "$tool" >/dev/null || { echo "[operator-kit] $tool is still missing" >&2; exit 1; }
done
