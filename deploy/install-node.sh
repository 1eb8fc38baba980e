#!/usr/bin/env bash
# Puts coco-sidecar on a node outside the container image: the static binary (checked against
# its .sha256), its man pages and shell completions, the systemd units of deploy/systemd and
# the sysusers.d entry. Starts and enables nothing. docs/kubernetes.md, "A node outside the image".
#
#   deploy/install-node.sh [--root DIR] [--bin STATIC_BINARY]
#
# --bin: the binary to install (default: build one with deploy/build-static.sh); its checksum
# file, STATIC_BINARY.sha256 as build-static.sh writes it, must be beside it and match.
# --root: install under DIR instead of / (a staging tree, or a test).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

root=/
bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="${2:?--root needs a directory}"; shift 2 ;;
    --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
    *) echo "usage: $0 [--root DIR] [--bin STATIC_BINARY]" >&2; exit 64 ;;
  esac
done
if [ -z "$bin" ]; then bin="$("$here/build-static.sh")"; fi
if [ ! -f "$bin.sha256" ]; then
  echo "install-node.sh: $bin.sha256 is missing: build with deploy/build-static.sh, or copy it along" >&2
  exit 1
fi
# The checksum file names the binary by its file name: check it where it lies.
(cd "$(dirname "$bin")" && sha256sum --check --quiet "$(basename "$bin").sha256") || {
  echo "install-node.sh: $bin does not match $bin.sha256" >&2
  exit 1
}

prefix="$root/usr/local"
install -d "$prefix/bin" "$prefix/share/man/man1" \
  "$prefix/share/bash-completion/completions" "$prefix/share/zsh/site-functions" \
  "$prefix/share/fish/vendor_completions.d" "$root/etc/systemd/system" "$root/etc/sysusers.d"
install -m 0755 "$bin" "$prefix/bin/coco-sidecar"
installed="$prefix/bin/coco-sidecar"
"$installed" man "$prefix/share/man/man1" >/dev/null
"$installed" completions bash >"$prefix/share/bash-completion/completions/coco-sidecar"
"$installed" completions zsh >"$prefix/share/zsh/site-functions/_coco-sidecar"
"$installed" completions fish >"$prefix/share/fish/vendor_completions.d/coco-sidecar.fish"
for unit in "$here"/systemd/*.service "$here"/systemd/*.socket "$here"/systemd/*.path; do
  install -m 0644 "$unit" "$root/etc/systemd/system/"
done
install -m 0644 "$here/systemd/coco-sidecar.sysusers" "$root/etc/sysusers.d/coco-sidecar.conf"

cat <<NEXT
installed coco-sidecar $("$installed" --version | cut -d' ' -f2) under $root
next, on the node:
  systemd-sysusers /etc/sysusers.d/coco-sidecar.conf
  install -d -m 0755 /var/lib/coco-sidecar
  coco-sidecar blob import CERTS-DIR /var/lib/coco-sidecar/certs.blob
  systemctl daemon-reload
  systemctl enable --now coco-sidecar-blob-update.path coco-sidecar@VM.socket
NEXT
