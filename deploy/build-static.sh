#!/usr/bin/env bash
# Builds a statically linked coco-sidecar (glibc, -C target-feature=+crt-static) for the
# container image and for nodes, writes its SHA-256 beside it (coco-sidecar.sha256, in
# sha256sum's format) and prints its path. Usage: deploy/build-static.sh [--profile release|dev]
#
# It uses its own target directory (default: $CARGO_TARGET_DIR/static, or target/static) so
# that it can run while another cargo command holds the workspace's (as the container test
# does from inside `cargo test`), and because the static flags must not mix with the normal
# build's artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = "--profile" ]; then profile="${2:?--profile needs a value}"; fi
triple=x86_64-unknown-linux-gnu
target_dir="${COCO_STATIC_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/static}"

# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts or
# proc macros, which stay dynamically linked host programs as they must.
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
  cargo build --quiet -p coco-sidecar --bin coco-sidecar \
  --profile "$profile" --target "$triple" >&2

dir=$profile
if [ "$profile" = dev ]; then dir=debug; fi
bin="$target_dir/$triple/$dir/coco-sidecar"
# A static binary has no program interpreter; refuse to hand out anything else.
if readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "build-static.sh: $bin is dynamically linked" >&2
  exit 1
fi
# The checksum travels with the binary to the node: `sha256sum --check coco-sidecar.sha256`
# there (deploy/install-node.sh does).
(cd "$(dirname "$bin")" && sha256sum coco-sidecar >coco-sidecar.sha256)
echo "$bin"
