#!/usr/bin/env bash
# Build Debian's QEMU with the coco-sidecar patch series and test it.
#
# Usage: qemu-patches/build-and-test.sh [--build-only] [VERSION...]
#
#   VERSION   10.2 (qemu 1:10.2.2+ds-1, Debian sid; the primary series) and/or
#             10.0 (qemu 1:10.0.13+ds-0+deb13u1, Debian 13). Default: both.
#
# For each version: install the build dependencies, fetch the pinned source
# tarball, check that the series' linux-headers lines are those of a released
# kernel, apply the series with no fuzz, run QEMU's checkpatch.pl on every
# patch, build qemu-system-x86_64 and the qtest, and run the qtest against
# the real sidecar. For the primary series, also build without KVM (the
# object must build wherever QEMU does). Then boot the test guest under KVM
# with each QEMU, directly and through libvirt (cargo test, see
# run_guest_tests). The binaries stay at $CACHE/<version>/build/.
#
# Environment:
#   COCO_SIDECAR_BIN  sidecar binary the qtest starts (default:
#                     $CARGO_TARGET_DIR/debug/coco-sidecar or
#                     <workspace>/target/debug/coco-sidecar; build it first)
#   COCO_QEMU_CACHE   cache directory (default /var/cache/coco-sidecar/qemu)
#   COCO_QEMU_JOBS    ninja parallelism (default 2)
#   COCO_QEMU_NOKVM   versions also built without KVM (default: 10.2)
#
# Everything heavy lives in the cache, outside the clone, and is reused:
#   $CACHE/apt/        private apt configurations, lists and archives (the
#                      machine's own apt configuration is read, never changed)
#   $CACHE/dl/         source tarballs and the released kernel headers
#   $CACHE/<version>/  src/ (patched tree), build/, build-nokvm/
# When a series changes, a pristine tree is extracted and patched next to the
# old one and synced over it by content, so only files whose content changed
# get a new mtime and ninja rebuilds just what depends on them.
set -euo pipefail

declare -A DEB_VERSION=([10.2]='1:10.2.2+ds-1' [10.0]='1:10.0.13+ds-0+deb13u1')
declare -A DEB_SUITE=([10.2]=sid [10.0]=trixie)
declare -A TARBALL=([10.2]='qemu_10.2.2+ds.orig.tar.xz' [10.0]='qemu_10.0.13+ds.orig.tar.xz')
declare -A TARBALL_SHA256=(
    [10.2]='be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb'
    [10.0]='6a0888e806c2ffc0c5f0733e974f9aea55491950d3c47c98669c8b236dde59ae')
ALL_VERSIONS=(10.2 10.0)

# Build dependencies: from the machine's suite, and the ones that must come
# from bookworm-backports (QEMU 10 needs meson >= 1.5).
BASE_DEPS=(ninja-build gcc make libc6-dev libglib2.0-dev libpixman-1-dev flex bison
           pkgconf python3 python3-venv libslirp-dev libfdt-dev zlib1g-dev
           device-tree-compiler xz-utils patch rsync util-linux perl)
BACKPORTS_DEPS=(meson)
MESON_MIN='1.5'
BACKPORTS_SUITE='bookworm-backports'

CONFIGURE_ARGS=(--target-list=x86_64-softmmu --disable-download --disable-docs
                --disable-werror --disable-install-blobs --without-default-features
                --enable-tcg --enable-slirp --enable-vhost-user
                --enable-vhost-kernel --enable-vhost-net --disable-tools --disable-user
                --python=/usr/bin/python3)
QTEST_NAME='coco-sidecar-test'
# Bump when the way a tree is prepared changes, so caches are re-prepared.
TREE_RECIPE=2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKSPACE="$(cd "$HERE/.." && pwd)"
CACHE="${COCO_QEMU_CACHE:-/var/cache/coco-sidecar/qemu}"
JOBS="${COCO_QEMU_JOBS:-2}"
NOKVM_VERSIONS="${COCO_QEMU_NOKVM-10.2}"
DL="$CACHE/dl"
APTDIR="$CACHE/apt"

BUILD_ONLY=0
VERSIONS=()
for arg in "$@"; do
    case "$arg" in
        --build-only) BUILD_ONLY=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        10.2|10.0) VERSIONS+=("$arg") ;;
        *) echo "unknown argument: $arg (versions: ${ALL_VERSIONS[*]})" >&2; exit 2 ;;
    esac
done
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=("${ALL_VERSIONS[@]}")

T0=$SECONDS
log()  { printf '[qemu %s +%4ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - T0)) "$*"; }
step() { printf '\n'; log "== $*"; }
die()  { log "ERROR: $*" >&2; exit 1; }

mkdir -p "$CACHE" "$DL"
# One run at a time per cache: a second run (CI beside a developer) waits.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "cache $CACHE is in use by another run; waiting for it"
    flock 9
fi

# ---------------------------------------------------------------------------
# Private apt configurations. The machine's own sources are read, never
# written; the Debian mirror is the one the machine uses for its base suite.
#   install: the machine's sources plus bookworm-backports, to install tools;
#   fetch:   deb-src of sid and trixie and deb of sid, only to download the
#            QEMU sources and the released kernel headers (never installed).
debian_mirror() {
    local codename mirror
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
              awk -v s="$codename" '$2 == s { print $1; exit }')"
    [ -n "$mirror" ] || die "no Debian mirror for '$codename' in the machine's apt sources"
    echo "$mirror"
}

APT_READY=0
apt_setup() {
    [ $APT_READY = 1 ] && return
    local mirror keyring f
    mirror="$(debian_mirror)"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -r "$keyring" ] || die "$keyring missing (package debian-archive-keyring)"
    mkdir -p "$APTDIR/install/parts" "$APTDIR/fetch/parts"
    rm -f "$APTDIR/install/parts/"* "$APTDIR/fetch/parts/"*
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] && ln -s "$f" "$APTDIR/install/parts/$(basename "$f")"
    done
    cat >"$APTDIR/install/parts/zz-coco-backports.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $BACKPORTS_SUITE
Components: main
Signed-By: $keyring
EOF
    cat >"$APTDIR/fetch/parts/coco-fetch.sources" <<EOF
Types: deb-src
URIs: $mirror
Suites: sid trixie
Components: main
Signed-By: $keyring

Types: deb
URIs: $mirror
Suites: sid
Components: main
Signed-By: $keyring
EOF
    local which
    for which in install fetch; do
        mkdir -p "$APTDIR/$which/lists/partial" "$APTDIR/$which/cache/archives/partial"
    done
    APT_READY=1
    log "Debian mirror (from the machine's apt config): $mirror"
}

# apt-get with one of the private configurations
papt() {
    local which="$1"; shift
    local cmd="$1"; shift
    local sourcelist=/etc/apt/sources.list
    [ "$which" = fetch ] && sourcelist=/dev/null
    "$cmd" -o "Dir::Etc::SourceParts=$APTDIR/$which/parts" \
        -o "Dir::Etc::SourceList=$sourcelist" \
        -o "Dir::State::Lists=$APTDIR/$which/lists" \
        -o "Dir::Cache=$APTDIR/$which/cache" \
        -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" \
        -o "APT::Get::Assume-Yes=true" -o "Acquire::Retries=3" \
        -o "APT::Sandbox::User=root" "$@"
}

apt_update() {
    local which="$1" stamp="$APTDIR/$1/lists/.updated"
    apt_setup
    if [ -f "$stamp" ] && [ -z "$(find "$stamp" -mmin +720)" ]; then
        return
    fi
    log "apt-get update ($which lists)"
    papt "$which" apt-get update -q >"$APTDIR/$which-update.log" 2>&1 ||
        { tail -20 "$APTDIR/$which-update.log"; die "apt-get update failed ($APTDIR/$which-update.log)"; }
    touch "$stamp"
}

have_pkg() {
    [ "$(dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

install_deps() {
    step "build dependencies"
    local missing=() p
    for p in "${BASE_DEPS[@]}" "${BACKPORTS_DEPS[@]}"; do
        have_pkg "$p" || missing+=("$p")
    done
    local meson_ok=0
    if have_pkg meson && dpkg --compare-versions \
        "$(dpkg-query -W -f '${Version}' meson)" ge "$MESON_MIN"; then
        meson_ok=1
    fi
    if [ ${#missing[@]} -eq 0 ] && [ $meson_ok = 1 ]; then
        log "all present (meson $(dpkg-query -W -f '${Version}' meson))"
        return
    fi
    log "missing: ${missing[*]:-} $( [ $meson_ok = 1 ] || echo "meson>=$MESON_MIN")"
    apt_update install
    local bpo=()
    for p in "${BACKPORTS_DEPS[@]}"; do bpo+=("$p/$BACKPORTS_SUITE"); done
    DEBIAN_FRONTEND=noninteractive papt install apt-get install -q --no-install-recommends \
        "${BASE_DEPS[@]}" "${bpo[@]}" >"$CACHE/apt-install.log" 2>&1 ||
        { tail -30 "$CACHE/apt-install.log"; die "apt-get install failed ($CACHE/apt-install.log)"; }
    log "installed (meson $(dpkg-query -W -f '${Version}' meson))"
}

# ---------------------------------------------------------------------------
fetch_tarball() {
    local v="$1" tb="$DL/${TARBALL[$1]}" sum
    step "$v: source tarball ${TARBALL[$v]}"
    if [ -f "$tb" ] && [ -f "$tb.ok" ]; then
        log "cached ($tb)"
        return
    fi
    if [ ! -f "$tb" ]; then
        apt_update fetch
        log "apt-get source --download-only qemu=${DEB_VERSION[$v]} (${DEB_SUITE[$v]})"
        (cd "$DL" && papt fetch apt-get source --download-only "qemu=${DEB_VERSION[$v]}") \
            >"$CACHE/apt-source-$v.log" 2>&1 ||
            log "apt-get source exited non-zero; checking the tarball"
        [ -f "$tb" ] || { tail -20 "$CACHE/apt-source-$v.log"; die "${TARBALL[$v]} not downloaded ($CACHE/apt-source-$v.log)"; }
    fi
    sum="$(sha256sum "$tb" | cut -d' ' -f1)"
    if [ "$sum" != "${TARBALL_SHA256[$v]}" ]; then
        mv -f "$tb" "$tb.bad"
        die "sha256 mismatch for ${TARBALL[$v]}: got $sum, pinned ${TARBALL_SHA256[$v]} (moved aside to $tb.bad)"
    fi
    touch "$tb.ok"
    log "sha256 ok: $sum"
}

# The released kernel's uapi headers, from Debian's linux-libc-dev (7.0 or
# later): every line the series adds to linux-headers/ must be one of theirs.
UAPI=""
fetch_uapi() {
    [ -n "$UAPI" ] && return
    local dir="$DL/linux-libc-dev" deb ver
    if [ ! -f "$dir/.ok" ]; then
        apt_update fetch
        rm -rf "$dir" && mkdir -p "$dir"
        (cd "$dir" && papt fetch apt-get download linux-libc-dev/sid) >"$CACHE/apt-uapi.log" 2>&1 ||
            { tail -10 "$CACHE/apt-uapi.log"; die "linux-libc-dev not downloaded ($CACHE/apt-uapi.log)"; }
        deb="$(ls "$dir"/linux-libc-dev_*.deb)"
        ver="$(dpkg-deb -f "$deb" Version)"
        dpkg --compare-versions "$ver" ge 7.0 || die "linux-libc-dev $ver predates Linux 7.0"
        dpkg-deb -x "$deb" "$dir/x"
        echo "$ver" >"$dir/.ok"
    fi
    UAPI="$dir/x/usr/include"
    log "released uapi: linux-libc-dev $(cat "$dir/.ok")"
}

check_headers() {
    local v="$1" patch line bad=0
    step "$v: linux-headers lines against the released uapi"
    fetch_uapi
    patch="$(ls "$HERE/$v"/0001-*.patch)"
    while IFS= read -r line; do
        [ -n "${line//[[:space:]]/}" ] || continue
        if ! grep -qxF -- "$line" "$UAPI/linux/kvm.h" "$UAPI/x86_64-linux-gnu/asm/kvm.h"; then
            log "not in the released headers: $line"
            bad=1
        fi
    done < <(sed -n '/^+++ b\/linux-headers\//,/^diff /{/^+[^+]/s/^+//p}' "$patch")
    [ $bad = 0 ] || die "$(basename "$patch") adds lines no released kernel ships"
    log "every added line is in Linux 7's uapi"
}

# ---------------------------------------------------------------------------
series_files() {
    find "$HERE/$1" -maxdepth 1 -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort
}

series_hash() {
    {
        echo "recipe $TREE_RECIPE ${TARBALL_SHA256[$1]}"
        local p
        while read -r p; do
            echo "$(basename "$p") $(sha256sum <"$p" | cut -d' ' -f1)"
        done < <(series_files "$1")
    } | sha256sum | cut -d' ' -f1
}

prepare_tree() {
    local v="$1" src="$CACHE/$1/src" want have="" n new fw n_fw=0 p
    step "$v: source tree"
    want="$(series_hash "$v")"
    [ -f "$src/.coco-series" ] && have="$(cat "$src/.coco-series")"
    n="$(series_files "$v" | grep -c .)"
    if [ "$have" = "$want" ]; then
        log "tree carries the current series ($n patches, ${want:0:12})"
        return
    fi
    log "series changed (${have:0:12} -> ${want:0:12}): extracting a pristine tree"
    new="$CACHE/$v/src.new"
    rm -rf "$new" && mkdir -p "$new"
    tar -xJf "$DL/${TARBALL[$v]}" -C "$new" --strip-components=1
    # The +ds tarball drops the edk2 firmware images; configure insists on
    # them while bzip2 is installed. Empty stand-ins do: none is installed.
    for fw in $(grep -o "'edk2-[a-z0-9_-]*\.fd'" "$new/pc-bios/meson.build" | tr -d "'"); do
        [ -e "$new/pc-bios/$fw.bz2" ] || { : >"$new/pc-bios/$fw.bz2"; n_fw=$((n_fw + 1)); }
    done
    log "created $n_fw empty pc-bios/edk2-*.fd.bz2 stand-ins"
    while read -r p; do
        log "patch -p1 --fuzz=0 < $(basename "$p")"
        patch -p1 -d "$new" --fuzz=0 --forward --batch --no-backup-if-mismatch -s <"$p" ||
            die "$v/$(basename "$p") does not apply exactly to the pristine tree"
    done < <(series_files "$v")
    if [ -d "$src" ]; then
        # Sync by content: unchanged files keep their mtime (no rebuild).
        rsync -rlp --checksum --delete --exclude=/.coco-series \
            --itemize-changes "$new/" "$src/" >"$CACHE/$v/sync.log"
        log "synced into $src: $(grep -c '^[<>c*]' "$CACHE/$v/sync.log" || true) paths changed"
        rm -rf "$new"
    else
        mv "$new" "$src"
    fi
    echo "$want" >"$src/.coco-series"
}

# QEMU's own checkpatch.pl: no error and no warning, except the one it gives
# every linux-headers change, and the missing Signed-off-by (--no-signoff),
# which a submitter adds.
run_checkpatch() {
    local v="$1" src="$CACHE/$1/src" p out bad=0 warnings errors
    step "$v: scripts/checkpatch.pl"
    while read -r p; do
        out="$(cd "$src" && perl scripts/checkpatch.pl --no-signoff "$p" 2>&1 || true)"
        errors="$(grep -c '^ERROR:' <<<"$out" || true)"
        warnings="$(grep '^WARNING:' <<<"$out" |
                    grep -vc 'imported from Linux, are you using scripts/update-linux-headers.sh' || true)"
        if [ "$errors" != 0 ] || [ "$warnings" != 0 ]; then
            printf '%s\n' "$out"
            bad=1
        fi
        log "$(basename "$p"): $(grep '^total:' <<<"$out")"
    done < <(series_files "$v")
    [ $bad = 0 ] || die "checkpatch found problems in the $v series"
}

# ---------------------------------------------------------------------------
configure_build() {
    local v="$1" build="$2" want src="$CACHE/$1/src"
    shift 2
    want="$(printf '%s\n' "${CONFIGURE_ARGS[@]}" "$@" | sha256sum | cut -d' ' -f1)"
    if [ -f "$build/build.ninja" ] && [ "$(cat "$build/.coco-configure" 2>/dev/null)" = "$want" ]; then
        log "$build configured; meson re-runs itself if meson files changed"
        return
    fi
    log "configuring a fresh build dir $build ($*)"
    rm -rf "$build" && mkdir -p "$build"
    (cd "$build" && "$src/configure" "${CONFIGURE_ARGS[@]}" "$@") >"$build.configure.log" 2>&1 ||
        { tail -40 "$build.configure.log"; die "configure failed ($build.configure.log)"; }
    echo "$want" >"$build/.coco-configure"
}

build() {
    local v="$1" build="$2" t=$SECONDS warn
    shift 2
    log "ninja -j$JOBS $* (log: $build.log)"
    if ! ninja -C "$build" -j"$JOBS" "$@" >"$build.log" 2>&1; then
        grep -E -B2 -A8 'error:|FAILED' "$build.log" | tail -60
        die "build failed ($build.log)"
    fi
    warn="$(grep -c 'warning:' "$build.log" || true)"
    log "built in $((SECONDS - t))s; $warn compiler warnings"
    if [ "$warn" != 0 ]; then
        grep -A3 'warning:' "$build.log" | head -40
    fi
}

run_qtest() {
    local v="$1" build="$CACHE/$1/build" bin out rc=0 pass fail skip qt
    step "$v: qtest $QTEST_NAME"
    bin="${COCO_SIDECAR_BIN:-${CARGO_TARGET_DIR:-$WORKSPACE/target}/debug/coco-sidecar}"
    [ -x "$bin" ] || die "sidecar binary $bin not found: build it first (cargo build -p coco-sidecar) or set COCO_SIDECAR_BIN"
    qt="$build/tests/qtest/$QTEST_NAME"
    [ -x "$qt" ] || die "$qt was not built"
    log "sidecar: $bin"
    out="$CACHE/$v/qtest.log"
    COCO_SIDECAR_BIN="$bin" QTEST_QEMU_BINARY="$build/qemu-system-x86_64" \
        timeout 600 "$qt" --tap -k >"$out" 2>&1 || rc=$?
    grep -E '^(ok|not ok|1\.\.|# (hung|SKIP))' "$out" || true
    pass="$(grep -c '^ok ' "$out" || true)"
    fail="$(grep -c '^not ok ' "$out" || true)"
    skip="$(grep -c '^ok .*# SKIP' "$out" || true)"
    pass=$((pass - skip))
    printf '\nqemu-%s-qtest: %d passed, %d failed, %d skipped\n' "$v" "$pass" "$fail" "$skip"
    [ "$rc" = 0 ] && [ "$fail" = 0 ] && [ "$pass" -gt 0 ] && [ "$skip" = 0 ] ||
        { tail -40 "$out"; die "qtest failed (exit $rc; log: $out)"; }
}

# The guest built from tests/qemu-guest boots under each QEMU built here, started directly
# and by libvirt (tests/tests/qemu_kvm.rs, qemu_libvirt.rs). KVM and libvirt requirements
# come from the caller: COCO_REQUIRE_KVM=1, COCO_REQUIRE_LIBVIRT=1 (tests/libvirt/setup.sh).
run_guest_tests() {
    local bins="" v
    for v in "${VERSIONS[@]}"; do
        bins+="$v=$CACHE/$v/build/qemu-system-x86_64 "
    done
    step "the test guest under KVM, started directly and by libvirt"
    (cd "$WORKSPACE" && COCO_QEMU_BINS="$bins" COCO_REQUIRE_QEMU=1 \
        cargo test -p coco-tests --test qemu_kvm --test qemu_libvirt -- --test-threads=1) ||
        die "the guest tests failed"
    # docs/qemu.md's command lines run against the 10.2 build (before it existed, the suite's
    # own run of this test skipped them).
    if [[ " ${VERSIONS[*]} " == *" 10.2 "* ]]; then
        step "docs/qemu.md's QEMU command lines against the 10.2 build"
        (cd "$WORKSPACE" && COCO_QEMU_BINS="$bins" COCO_REQUIRE_QEMU=1 \
            cargo test -p coco-tests --test docs_snippets) ||
            die "docs/qemu.md's commands do not run as written"
    fi
}

log "coco-sidecar QEMU series: ${VERSIONS[*]}; cache $CACHE"
install_deps
for v in "${VERSIONS[@]}"; do
    fetch_tarball "$v"
    check_headers "$v"
    prepare_tree "$v"
    run_checkpatch "$v"
    step "$v: build with KVM"
    configure_build "$v" "$CACHE/$v/build" --enable-kvm
    build "$v" "$CACHE/$v/build" qemu-system-x86_64 "tests/qtest/$QTEST_NAME"
    if [[ " $NOKVM_VERSIONS " == *" $v "* ]]; then
        step "$v: build without KVM"
        configure_build "$v" "$CACHE/$v/build-nokvm" --disable-kvm
        build "$v" "$CACHE/$v/build-nokvm" qemu-system-x86_64
        grep -q '"coco-sidecar"' <("$CACHE/$v/build-nokvm/qemu-system-x86_64" -object help 2>&1 |
                                   sed 's/ *\(.*\)/"\1"/') ||
            die "the build without KVM has no coco-sidecar object"
        log "the build without KVM has the coco-sidecar object"
    fi
    if [ "$BUILD_ONLY" = 0 ]; then
        run_qtest "$v"
    fi
done
if [ "$BUILD_ONLY" = 0 ]; then
    run_guest_tests
fi
log "done in $((SECONDS - T0))s"
