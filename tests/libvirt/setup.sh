#!/usr/bin/env bash
# Install and start a libvirt for the tests that boot the patched QEMU through it
# (tests/tests/qemu_libvirt.rs), on a machine without systemd: Debian's libvirt daemon with
# the QEMU driver, virsh and virt-xml-validate, then virtlogd and libvirtd in the background.
#
# QEMU runs as root here: /dev/kvm on these machines is root-only and there is no kvm
# group. docs/libvirt.md describes the usual set-up (QEMU as libvirt-qemu).
# Idempotent; changes /etc/libvirt/qemu.conf only when it is missing or ours.
set -euo pipefail

log() { printf '[libvirt] %s\n' "$*"; }

PKGS=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libxml2-utils)
missing=()
for p in "${PKGS[@]}"; do
    [ "$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd resolves its built-in QEMU user before it reads qemu.conf, and refuses to start
# when that user does not exist (the libvirt-daemon-system package would create it).
if ! getent passwd libvirt-qemu >/dev/null; then
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    log "created the libvirt-qemu user"
fi

conf=/etc/libvirt/qemu.conf
marker='# written by coco-sidecar tests/libvirt/setup.sh'
if [ ! -e "$conf" ] || grep -qF "$marker" "$conf"; then
    mkdir -p /etc/libvirt
    cat >"$conf" <<CONF
$marker
# No systemd, no cgroup delegation, no namespaces or security driver on these machines.
user = "root"
group = "root"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
CONF
    log "wrote $conf"
else
    log "$conf exists and is not ours; leaving it"
fi
mkdir -p /var/log/libvirt /var/lib/libvirt/qemu /run/libvirt

if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d
    log "virtlogd started"
fi
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
    log "libvirtd started"
fi
# No system QEMU: domains name the patched one in <emulator>, so ask for a list, not a
# version.
for _ in $(seq 100); do
    virsh -c qemu:///system list >/dev/null 2>&1 && break
    sleep 0.1
done
virsh -c qemu:///system list >/dev/null ||
    { tail -20 /var/log/libvirt/libvirtd.log; exit 1; }
log "libvirtd $(libvirtd --version | awk '{print $NF}') answers on qemu:///system"
