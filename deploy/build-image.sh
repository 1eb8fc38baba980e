#!/usr/bin/env bash
# Builds the coco-sidecar container image with podman.
#   deploy/build-image.sh [--tag TAG] [--bin STATIC_BINARY]
# Without --bin it builds the static binary first (deploy/build-static.sh). Uses
# deploy/podman/containers.conf unless CONTAINERS_CONF is set. Prints the image id.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=localhost/coco-sidecar:dev
bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="${2:?}"; shift 2 ;;
    --bin) bin="${2:?}"; shift 2 ;;
    *) echo "usage: $0 [--tag TAG] [--bin STATIC_BINARY]" >&2; exit 64 ;;
  esac
done
if [ -z "$bin" ]; then bin="$(deploy/build-static.sh)"; fi
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$bin" "$context/coco-sidecar"
cp deploy/Containerfile "$context/Containerfile"
podman build --quiet --layers=false --tag "$tag" --file "$context/Containerfile" "$context"
