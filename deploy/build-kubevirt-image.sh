#!/usr/bin/env bash
# Builds the coco-sidecar image for KubeVirt (deploy/Containerfile.kubevirt) with podman.
#   deploy/build-kubevirt-image.sh [--tag TAG]
# Builds both static binaries (deploy/build-static.sh) and uses deploy/podman/containers.conf
# unless CONTAINERS_CONF is set. Prints the image id.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=localhost/coco-kubevirt:dev
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="${2:?}"; shift 2 ;;
    *) echo "usage: $0 [--tag TAG]" >&2; exit 64 ;;
  esac
done
sidecar="$(deploy/build-static.sh --bin coco-sidecar)"
hook="$(deploy/build-static.sh --bin coco-kubevirt-hook)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$sidecar" "$context/coco-sidecar"
cp "$hook" "$context/coco-kubevirt-hook"
cp deploy/Containerfile.kubevirt "$context/Containerfile"
podman build --quiet --layers=false --tag "$tag" --file "$context/Containerfile" "$context"
