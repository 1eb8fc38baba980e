#!/usr/bin/env bash
# Builds a statically linked coco-sidecar (glibc, -C target-feature=+crt-static) for the
# container images and for nodes, writes its SHA-256 beside it (BIN.sha256, in sha256sum's
# format) and prints its path.
# Usage: deploy/build-static.sh [--profile release|dev] [--bin coco-sidecar|coco-kubevirt-hook]
#
# It uses its own target directory (default: $CARGO_TARGET_DIR/static, or target/static) so
# that it can run while another cargo command holds the workspace's (as the container test
# does from inside `cargo test`), and because the static flags must not mix with the normal
# build's artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
bin_name=coco-sidecar
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
    --bin) bin_name="${2:?--bin needs a value}"; shift 2 ;;
    *) echo "usage: $0 [--profile release|dev] [--bin coco-sidecar|coco-kubevirt-hook]" >&2; exit 64 ;;
  esac
done
case "$bin_name" in
  coco-sidecar) package=coco-sidecar ;;
  coco-kubevirt-hook) package=coco-kubevirt ;;
  *) echo "build-static.sh: unknown binary $bin_name" >&2; exit 64 ;;
esac
triple=x86_64-unknown-linux-gnu
target_dir="${COCO_STATIC_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/static}"

# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts or
# proc macros, which stay dynamically linked host programs as they must.
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
  cargo build --quiet -p "$package" --bin "$bin_name" \
  --profile "$profile" --target "$triple" >&2

dir=$profile
if [ "$profile" = dev ]; then dir=debug; fi
bin="$target_dir/$triple/$dir/$bin_name"
# A static binary has no program interpreter; refuse to hand out anything else.
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "build-static.sh: $bin is dynamically linked" >&2
  exit 1
fi
# The checksum travels with the binary to the node: `sha256sum --check coco-sidecar.sha256`
# there (deploy/install-node.sh does).
(cd "$(dirname "$bin")" && sha256sum "$bin_name" >"$bin_name.sha256")
echo "$bin"
