#!/usr/bin/env bash
# Print a directory holding the domain XML schemas of a libvirt recent enough to know
# <launchSecurity type='sev-snp'> (10.5 and later), for tests/tests/deploy_libvirt.rs: the
# installed libvirt's when it knows it, else Debian 13's (package libvirt-common), downloaded,
# never installed, through a private apt configuration derived from the machine's own sources,
# and cached in /var/cache/coco-sidecar/libvirt-schemas.
set -euo pipefail

installed=/usr/share/libvirt/schemas
if grep -qs "sev-snp" "$installed/domaincommon.rng"; then
    echo "$installed"
    exit 0
fi

cache=/var/cache/coco-sidecar/libvirt-schemas
if [ -f "$cache/.ok" ]; then
    echo "$cache/x/usr/share/libvirt/schemas"
    exit 0
fi
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
          awk -v s="$codename" '$2 == s { print $1; exit }')"
[ -n "$mirror" ] || { echo "fetch-schemas: no Debian mirror in the apt sources" >&2; exit 1; }
rm -rf "$cache" && mkdir -p "$cache/parts" "$cache/lists/partial" "$cache/archives/partial"
cat >"$cache/parts/trixie.sources" <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceParts=$cache/parts" -o "Dir::Etc::SourceList=/dev/null"
      -o "Dir::State::Lists=$cache/lists" -o "Dir::Cache=$cache"
      -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Sandbox::User=root")
apt-get "${opts[@]}" update -q >"$cache/update.log" 2>&1
(cd "$cache" && apt-get "${opts[@]}" download libvirt-common/trixie) >"$cache/download.log" 2>&1
dpkg-deb -x "$cache"/libvirt-common_*.deb "$cache/x"
grep -qs "sev-snp" "$cache/x/usr/share/libvirt/schemas/domaincommon.rng" ||
    { echo "fetch-schemas: Debian 13's libvirt-common has no sev-snp schema" >&2; exit 1; }
touch "$cache/.ok"
echo "$cache/x/usr/share/libvirt/schemas"
