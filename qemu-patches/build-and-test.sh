#!/usr/bin/env bash
# Build Debian's QEMU 10.0.2 with the coco-sidecar patch series and run the
# series' qtest against a real coco-sidecar binary.
#
# Usage: qemu-patches/build-and-test.sh [--build-only]
#
# Environment:
#   COCO_SIDECAR_BIN  sidecar binary the qtest starts
#                     (default: <workspace>/target/debug/coco-sidecar, or
#                     $CARGO_TARGET_DIR/debug/coco-sidecar; the caller builds it)
#   COCO_QEMU_CACHE   cache directory (default /var/cache/coco-sidecar/qemu)
#   COCO_QEMU_JOBS    ninja parallelism (default 2)
#
# Everything heavy lives in the cache, outside the clone, and is reused:
#   $CACHE/apt/        private apt configuration, lists and archives (the
#                      machine's own apt configuration is read, never changed)
#   $CACHE/dl/         the upstream tarball from Debian's source package
#   $CACHE/src/        the extracted, patched tree (+ .coco-series: which
#                      series it carries)
#   $CACHE/build/      the meson/ninja build directory
# When the series changes, a pristine tree is extracted and patched next to
# the old one and synced over it by content, so only files whose content
# changed get a new mtime and ninja rebuilds just what depends on them.
set -euo pipefail

QEMU_DEB_VERSION='1:10.0.2+ds-2+deb13u1~bpo12+1'
QEMU_TARBALL='qemu_10.0.2+ds.orig.tar.xz'
QEMU_TARBALL_SHA256='0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1'
BACKPORTS_SUITE='bookworm-backports'

# Build dependencies: from the base suite, and the ones that must come from
# backports (QEMU 10.0 needs meson >= 1.5; the qtests' TAP output needs pycotap).
BASE_DEPS=(ninja-build gcc make libc6-dev libglib2.0-dev libpixman-1-dev flex bison
           pkgconf python3 python3-venv libslirp-dev libfdt-dev zlib1g-dev
           xz-utils patch rsync util-linux)
BACKPORTS_DEPS=(meson python3-pycotap)
MESON_MIN='1.5'

CONFIGURE_ARGS=(--target-list=x86_64-softmmu --disable-download --disable-docs
                --disable-werror --disable-install-blobs --without-default-features
                --enable-kvm --enable-tcg --enable-slirp --enable-vhost-user
                --enable-vhost-kernel --enable-vhost-net --disable-tools --disable-user
                --python=/usr/bin/python3)
QTEST_NAME='coco-sidecar-test'
# Bump when the way the tree is prepared changes, so caches are re-prepared.
TREE_RECIPE=1

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKSPACE="$(cd "$HERE/.." && pwd)"
CACHE="${COCO_QEMU_CACHE:-/var/cache/coco-sidecar/qemu}"
JOBS="${COCO_QEMU_JOBS:-2}"
SRC="$CACHE/src"
BUILD="$CACHE/build"
DL="$CACHE/dl"
APTDIR="$CACHE/apt"

BUILD_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --build-only) BUILD_ONLY=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

T0=$SECONDS
log()  { printf '[qemu %s +%4ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - T0)) "$*"; }
step() { printf '\n'; log "== $*"; }
die()  { log "ERROR: $*" >&2; exit 1; }

mkdir -p "$CACHE"
# One run at a time per cache: a second run (CI beside a developer) waits.
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    log "cache $CACHE is in use by another run; waiting for it"
    flock 9
fi

# ---------------------------------------------------------------------------
# Private apt configuration: the machine's own sources are read (never
# written); bookworm-backports (deb + deb-src) is added from the same mirror
# the machine uses for its base suite. Lists, caches and archives are private.
apt_private_setup() {
    local codename mirror keyring
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ "$codename" = bookworm ] || log "note: host is '$codename', series targets bookworm's backports"
    # The mirror serving the base suite, as the machine's apt configuration says.
    mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
              awk -v s=bookworm '$2 == s { print $1; exit }')"
    if [ -z "$mirror" ]; then
        mirror="$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
                  awk -v s="$codename" '$2 == s { print $1; exit }')"
    fi
    [ -n "$mirror" ] || die "no Debian mirror for the base suite found in /etc/apt/sources.list*"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -r "$keyring" ] || die "$keyring missing (package debian-archive-keyring)"

    mkdir -p "$APTDIR/sources.list.d" "$APTDIR/lists/partial" \
             "$APTDIR/cache/archives/partial"
    rm -f "$APTDIR/sources.list.d/"*
    # The machine's enabled source files, by reference.
    local f
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] && ln -s "$f" "$APTDIR/sources.list.d/$(basename "$f")"
    done
    cat >"$APTDIR/sources.list.d/zz-coco-backports.sources" <<EOF
Types: deb deb-src
URIs: $mirror
Suites: $BACKPORTS_SUITE
Components: main
Signed-By: $keyring
EOF
    APT_OPTS=(-o "Dir::Etc::SourceParts=$APTDIR/sources.list.d"
              -o "Dir::State::Lists=$APTDIR/lists"
              -o "Dir::Cache=$APTDIR/cache"
              -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
              -o "APT::Get::Assume-Yes=true"
              -o "Acquire::Retries=3")
    log "base mirror (from the machine's apt config): $mirror; adding $BACKPORTS_SUITE deb/deb-src privately"
}

apt_private_update() {
    local stamp="$APTDIR/lists/.updated"
    # Refresh at most every 12 hours.
    if [ -f "$stamp" ] && [ -z "$(find "$stamp" -mmin +720)" ]; then
        log "private apt lists are fresh"
        return
    fi
    log "apt-get update (private lists)"
    apt-get "${APT_OPTS[@]}" update -q >"$CACHE/apt-update.log" 2>&1 ||
        { tail -20 "$CACHE/apt-update.log"; die "apt-get update failed (log: $CACHE/apt-update.log)"; }
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
    apt_private_setup
    apt_private_update
    local bpo=() base=()
    for p in "${BACKPORTS_DEPS[@]}"; do bpo+=("$p/$BACKPORTS_SUITE"); done
    for p in "${BASE_DEPS[@]}"; do base+=("$p"); done
    log "apt-get install ${base[*]} ${bpo[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -q --no-install-recommends \
        "${base[@]}" "${bpo[@]}" >"$CACHE/apt-install.log" 2>&1 ||
        { tail -30 "$CACHE/apt-install.log"; die "apt-get install failed (log: $CACHE/apt-install.log)"; }
    log "installed (meson $(dpkg-query -W -f '${Version}' meson))"
}

# ---------------------------------------------------------------------------
fetch_tarball() {
    step "source tarball $QEMU_TARBALL"
    mkdir -p "$DL"
    local tb="$DL/$QEMU_TARBALL"
    if [ -f "$tb" ] && [ -f "$tb.ok" ]; then
        log "cached ($tb)"
        return
    fi
    if [ ! -f "$tb" ]; then
        [ -n "${APT_OPTS+x}" ] || apt_private_setup
        apt_private_update
        log "apt-get source --download-only qemu=$QEMU_DEB_VERSION"
        # The .dsc / .debian.tar.xz may answer 404 and make apt-get exit
        # non-zero; the upstream tarball is what we need, checked below.
        (cd "$DL" && apt-get "${APT_OPTS[@]}" -o APT::Sandbox::User=root source --download-only \
            "qemu=$QEMU_DEB_VERSION") >"$CACHE/apt-source.log" 2>&1 ||
            log "apt-get source exited non-zero (expected when the .dsc 404s); checking the tarball"
        [ -f "$tb" ] || { tail -20 "$CACHE/apt-source.log"; die "$QEMU_TARBALL not downloaded (log: $CACHE/apt-source.log)"; }
    fi
    local sum
    sum="$(sha256sum "$tb" | cut -d' ' -f1)"
    if [ "$sum" != "$QEMU_TARBALL_SHA256" ]; then
        mv -f "$tb" "$tb.bad"
        die "sha256 mismatch for $QEMU_TARBALL: got $sum, pinned $QEMU_TARBALL_SHA256 (moved aside to $tb.bad)"
    fi
    touch "$tb.ok"
    log "sha256 ok: $sum"
}

# ---------------------------------------------------------------------------
series_files() {
    find "$HERE" -maxdepth 1 -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort
}

series_hash() {
    {
        echo "recipe $TREE_RECIPE $QEMU_TARBALL_SHA256"
        local p
        while read -r p; do
            [ -n "$p" ] || continue
            echo "$(basename "$p") $(sha256sum <"$p" | cut -d' ' -f1)"
        done < <(series_files)
    } | sha256sum | cut -d' ' -f1
}

prepare_tree() {
    step "source tree"
    local want have=""
    want="$(series_hash)"
    [ -f "$SRC/.coco-series" ] && have="$(cat "$SRC/.coco-series")"
    local n
    n="$(series_files | grep -c . || true)"
    if [ "$have" = "$want" ]; then
        log "tree carries the current series ($n patches, ${want:0:12})"
        return
    fi
    log "series changed (${have:0:12} -> ${want:0:12}): extracting a pristine tree"
    local new="$CACHE/src.new"
    rm -rf "$new"
    mkdir -p "$new"
    tar -xJf "$DL/$QEMU_TARBALL" -C "$new" --strip-components=1
    # The +ds tarball drops the edk2 firmware images; configure insists on
    # them while bzip2 is installed. Empty stand-ins are enough: we install
    # no firmware and boot none.
    local fw n_fw=0
    for fw in $(grep -o "'edk2-[a-z0-9_-]*\.fd'" "$new/pc-bios/meson.build" | tr -d "'"); do
        [ -e "$new/pc-bios/$fw.bz2" ] || { : >"$new/pc-bios/$fw.bz2"; n_fw=$((n_fw + 1)); }
    done
    log "created $n_fw empty pc-bios/edk2-*.fd.bz2 stand-ins"
    local p
    while read -r p; do
        [ -n "$p" ] || continue
        log "patch -p1 < $(basename "$p")"
        patch -p1 -d "$new" --forward --batch --no-backup-if-mismatch -s <"$p" ||
            die "$(basename "$p") does not apply to the pristine tree"
    done < <(series_files)
    if [ -d "$SRC" ]; then
        # Sync by content: unchanged files keep their mtime (no rebuild),
        # changed or reverted files get a fresh one (ninja rebuilds them).
        rsync -rlp --checksum --delete --exclude=/.coco-series \
            --itemize-changes "$new/" "$SRC/" >"$CACHE/sync.log"
        log "synced into $SRC: $(grep -c '^[<>c*]' "$CACHE/sync.log" || true) paths changed"
        rm -rf "$new"
    else
        mv "$new" "$SRC"
    fi
    echo "$want" >"$SRC/.coco-series"
}

# ---------------------------------------------------------------------------
configure_build() {
    step "configure"
    local want
    want="$(printf '%s\n' "${CONFIGURE_ARGS[@]}" | sha256sum | cut -d' ' -f1)"
    if [ -f "$BUILD/build.ninja" ] && [ "$(cat "$BUILD/.coco-configure" 2>/dev/null)" = "$want" ]; then
        log "build dir configured ($BUILD); meson re-runs itself if meson files changed"
        return
    fi
    log "configuring a fresh build dir $BUILD"
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    (cd "$BUILD" && "$SRC/configure" "${CONFIGURE_ARGS[@]}") >"$CACHE/configure.log" 2>&1 ||
        { tail -40 "$CACHE/configure.log"; die "configure failed (log: $CACHE/configure.log)"; }
    echo "$want" >"$BUILD/.coco-configure"
    log "configured"
}

build() {
    step "build (ninja -j$JOBS)"
    local targets=(qemu-system-x86_64)
    if grep -q "$QTEST_NAME" "$SRC/tests/qtest/meson.build" 2>/dev/null; then
        targets+=("tests/qtest/$QTEST_NAME")
    fi
    log "targets: ${targets[*]} (log: $CACHE/build.log)"
    local t=$SECONDS
    if ! ninja -C "$BUILD" -j"$JOBS" "${targets[@]}" >"$CACHE/build.log" 2>&1; then
        grep -E -B2 -A8 'error|FAILED' "$CACHE/build.log" | tail -60
        die "build failed (log: $CACHE/build.log)"
    fi
    local warn
    warn="$(grep -c 'warning:' "$CACHE/build.log" || true)"
    log "built in $((SECONDS - t))s; $(grep -c '^\[' "$CACHE/build.log" || true) ninja steps, $warn compiler warnings"
    if [ "$warn" != 0 ]; then
        grep -A3 'warning:' "$CACHE/build.log" | head -40
    fi
}

# ---------------------------------------------------------------------------
run_qtest() {
    step "qtest $QTEST_NAME"
    local bin="${COCO_SIDECAR_BIN:-${CARGO_TARGET_DIR:-$WORKSPACE/target}/debug/coco-sidecar}"
    [ -x "$bin" ] || die "sidecar binary $bin not found: build it first (cargo build -p coco-sidecar) or set COCO_SIDECAR_BIN"
    local qt="$BUILD/tests/qtest/$QTEST_NAME"
    [ -x "$qt" ] || die "$qt was not built (is the series complete?)"
    log "sidecar: $bin"
    local out="$CACHE/qtest.log" rc=0
    COCO_SIDECAR_BIN="$bin" QTEST_QEMU_BINARY="$BUILD/qemu-system-x86_64" \
        timeout 600 "$qt" --tap -k 2>&1 | tee "$out" || rc=$?
    local pass fail skip
    pass="$(grep -c '^ok ' "$out" || true)"
    fail="$(grep -c '^not ok ' "$out" || true)"
    skip="$(grep -c '^ok .*# SKIP' "$out" || true)"
    pass=$((pass - skip))
    printf '\nqemu-qtest: %d passed, %d failed, %d skipped\n' "$pass" "$fail" "$skip"
    [ "$rc" = 0 ] && [ "$fail" = 0 ] && [ "$pass" -gt 0 ] ||
        die "qtest failed (exit $rc; log: $out)"
}

log "coco-sidecar QEMU $QEMU_DEB_VERSION build; cache $CACHE"
install_deps
fetch_tarball
prepare_tree
configure_build
build
if [ "$BUILD_ONLY" = 1 ]; then
    log "--build-only: not running the qtest"
else
    run_qtest
fi
log "done in $((SECONDS - T0))s"
