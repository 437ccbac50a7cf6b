#!/usr/bin/env bash
# Build (or find in the cache) the test-VM guest kernel.
#
# Debian's linux-source tarball + x86_64_defconfig + kvm_guest.config + our fragment
# scripts/kernel/vmem-guest.config, then olddefconfig and `make bzImage`.
#
# The kernel series is chosen explicitly: --linux SERIES, else $VMEM_GUEST_LINUX, else 6.1
# (never "the newest tarball in /usr/src", which changes under a test run when another
# linux-source is installed). 6.1 is Debian 12's own linux-source package; another series
# (6.12 from bookworm-security) is downloaded with scripts/fetch-debs.sh into the cache
# and unpacked there: /usr/src is not touched.
#
# Cache: ${VMEM_GUEST_CACHE:-~/.cache/vmem-guest}/kernel/<series>_<version>-<fragment-hash>/
# (bzImage, config, build.log). The build tree lives in ${VMEM_GUEST_CACHE}/build/,
# never in the checkout. A rebuild happens only when the linux-source package version or
# the fragment's options (comments do not count) change.
#
#   scripts/build-kernel.sh               build if needed, print the bzImage path
#   scripts/build-kernel.sh --print-path  print the bzImage path (exit 1 if not built)
#   scripts/build-kernel.sh --force       rebuild even when cached
#   scripts/build-kernel.sh --linux 6.12 [--print-path|--force]
set -euo pipefail

# Everything runs inside main(), which bash parses whole before running it: editing
# this file while a (10-minute) build runs cannot derail the running build.
main() {
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/kernel/vmem-guest.config"
CACHE="${VMEM_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmem-guest}"
MODE="build"
SERIES="${VMEM_GUEST_LINUX:-6.1}"
while [ $# -gt 0 ]; do
    case "$1" in
        --print-path) MODE="print" ;;
        --force) MODE="force" ;;
        --linux) SERIES="${2:?--linux needs a series, for example 6.12}"; shift ;;
        *) echo "usage: $0 [--linux SERIES] [--print-path|--force]" >&2; exit 2 ;;
    esac
    shift
done
[[ "$SERIES" =~ ^[0-9]+\.[0-9]+$ ]] || { echo "build-kernel: bad series '$SERIES'" >&2; exit 2; }

log() { echo "build-kernel: $*"; }
die() { echo "build-kernel: ERROR: $*" >&2; exit 1; }

# The project's fragment, then the series' own if it has one (options only the tests
# of that series' pair use: adding one rebuilds that kernel, not every kernel).
FRAGMENTS=("$FRAGMENT")
[ -f "$HERE/kernel/vmem-guest-$SERIES.config" ] && FRAGMENTS+=("$HERE/kernel/vmem-guest-$SERIES.config")
# Hash only the option lines: editing the comments does not force a rebuild.
FRAG_HASH="$(cat "${FRAGMENTS[@]}" | grep -E '^(CONFIG_|# CONFIG_)' | sort | sha256sum | cut -c1-12)"

# Sets SRC_VER, KEY, OUT_DIR, BZIMAGE for the source version $1.
key_for() {
    SRC_VER="$1"
    KEY="${SERIES}_${SRC_VER}-${FRAG_HASH}"
    OUT_DIR="$CACHE/kernel/$KEY"
    BZIMAGE="$OUT_DIR/bzImage"
}

# The system's linux-source-$SERIES (Debian 12: 6.1), if installed.
system_source() {
    TARBALL="/usr/src/linux-source-$SERIES.tar.xz"
    [ -f "$TARBALL" ] || return 1
    local ver
    ver="$(dpkg-query -W -f='${Version}' "linux-source-$SERIES" 2>/dev/null || true)"
    [ -n "$ver" ] || ver="$(stat -c %Y "$TARBALL")"
    key_for "$ver"
}

# The newest bzImage of the series already built with this fragment (no network).
cached_build() {
    local d
    d="$(ls -1d "$CACHE/kernel/${SERIES}_"*"-$FRAG_HASH" 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$d" ] && [ -f "$d/bzImage" ] || return 1
    d="$(basename "$d")"
    d="${d#"${SERIES}_"}"
    key_for "${d%-"$FRAG_HASH"}"
}

# Download linux-source-$SERIES into the cache (never /usr/src) and unpack its tarball.
fetched_source() {
    local ver dir
    ver="$(bash "$HERE/fetch-debs.sh" version "linux-source-$SERIES" '*')" ||
        die "linux-source-$SERIES is not packaged for this Debian release (looked in -security and -backports)"
    dir="$CACHE/src/linux-source-${SERIES}_$ver"
    TARBALL="$dir/usr/src/linux-source-$SERIES.tar.xz"
    if [ ! -f "$TARBALL" ]; then
        log "downloading linux-source-$SERIES $ver (about 150 MB) into $dir"
        rm -rf "$dir.partial"
        bash "$HERE/fetch-debs.sh" download "$dir.partial/debs" "linux-source-$SERIES=$ver"
        dpkg-deb -x "$dir.partial"/debs/*.deb "$dir.partial"
        rm -rf "$dir.partial/debs" "$dir"
        mv "$dir.partial" "$dir"
    fi
    key_for "$ver"
}

if [ "$MODE" = "print" ]; then
    if system_source && [ -f "$BZIMAGE" ]; then echo "$BZIMAGE"; exit 0; fi
    cached_build || die "Linux $SERIES kernel not built yet (run scripts/build-kernel.sh --linux $SERIES)"
    echo "$BZIMAGE"
    exit 0
fi

# Make sure the build dependencies (and, for 6.1, the source) are installed.
bash "$HERE/install-vm-deps.sh" --kernel
system_source || fetched_source

if [ "$MODE" != "force" ] && [ -f "$BZIMAGE" ]; then
    log "cached: $BZIMAGE"
    echo "$BZIMAGE"
    exit 0
fi

mkdir -p "$CACHE/kernel" "$CACHE/build"
# One build at a time (several checkouts/sessions may share the cache).
exec 9>"$CACHE/kernel/.lock"
if ! flock -n 9; then
    log "another build holds $CACHE/kernel/.lock; waiting for it"
    flock 9
fi
if [ "$MODE" != "force" ] && [ -f "$BZIMAGE" ]; then
    log "cached (built meanwhile): $BZIMAGE"
    echo "$BZIMAGE"
    exit 0
fi

START=$(date +%s)
SRC_DIR="$CACHE/build/src-${SERIES}_$SRC_VER"
OBJ_DIR="$CACHE/build/obj-$KEY"
if [ ! -f "$SRC_DIR/.unpacked" ]; then
    log "unpacking $TARBALL -> $SRC_DIR"
    rm -rf "$SRC_DIR"
    mkdir -p "$SRC_DIR"
    tar -xf "$TARBALL" -C "$SRC_DIR" --strip-components=1
    touch "$SRC_DIR/.unpacked"
fi

# Configure in a staging tree. A build tree left by an interrupted build with the
# same final .config is kept, so the build resumes where it stopped.
STAGE_DIR="$OBJ_DIR.config-stage"
log "configuring (x86_64_defconfig + kvm_guest.config + $(basename -a "${FRAGMENTS[@]}" | paste -sd+))"
rm -rf "$STAGE_DIR"
mkdir -p "$STAGE_DIR"
make -s -C "$SRC_DIR" O="$STAGE_DIR" x86_64_defconfig >/dev/null
(cd "$SRC_DIR" && scripts/kconfig/merge_config.sh -m -O "$STAGE_DIR" "$STAGE_DIR/.config" \
    kernel/configs/kvm_guest.config "${FRAGMENTS[@]}" >/dev/null)
make -s -C "$SRC_DIR" O="$STAGE_DIR" olddefconfig >/dev/null
if [ -f "$OBJ_DIR/.config" ] && cmp -s "$STAGE_DIR/.config" "$OBJ_DIR/.config"; then
    log "resuming the build tree in $OBJ_DIR (same .config)"
    rm -rf "$STAGE_DIR"
else
    rm -rf "$OBJ_DIR"
    mv "$STAGE_DIR" "$OBJ_DIR"
fi

# Every `CONFIG_X=y` of the fragment must have survived olddefconfig.
missing=()
while IFS= read -r line; do
    opt="${line%%=*}"
    grep -qx "$opt=y" "$OBJ_DIR/.config" || missing+=("$opt (got: $(grep -E "^$opt=|^# $opt is not set" "$OBJ_DIR/.config" || echo absent))")
done < <(cat "${FRAGMENTS[@]}" | grep -E '^CONFIG_[A-Z0-9_]+=y$')
if [ "${#missing[@]}" -gt 0 ]; then
    printf 'build-kernel: ERROR: required option not =y in the final .config: %s\n' "${missing[@]}" >&2
    die "fix ${FRAGMENTS[*]} (a dependency is probably missing); config: $OBJ_DIR/.config"
fi
log "config ok: all $(cat "${FRAGMENTS[@]}" | grep -cE '^CONFIG_[A-Z0-9_]+=y$') required options are =y"

JOBS="$(nproc)"
BUILD_LOG="$OBJ_DIR/build.log"
log "building bzImage with -j$JOBS (about 9 min on 2 cores); log: $BUILD_LOG"
make -C "$SRC_DIR" O="$OBJ_DIR" -j"$JOBS" bzImage >"$BUILD_LOG" 2>&1 &
MAKE_PID=$!
trap 'kill "$MAKE_PID" 2>/dev/null || true' INT TERM
while kill -0 "$MAKE_PID" 2>/dev/null; do
    for _ in $(seq 30); do
        kill -0 "$MAKE_PID" 2>/dev/null || break
        sleep 1
    done
    if kill -0 "$MAKE_PID" 2>/dev/null; then
        # find may meet a compiler's temporary file vanishing and exit 1: under
        # pipefail and set -e that would end this script and orphan the build.
        n="$(find "$OBJ_DIR" -name '*.o' 2>/dev/null | wc -l || true)"
        log "$(( $(date +%s) - START ))s: $n objects built; last: $(tail -n1 "$BUILD_LOG" | cut -c1-80 || true)"
    fi
done
if ! wait "$MAKE_PID"; then
    tail -n 40 "$BUILD_LOG" >&2
    die "make bzImage failed; full log: $BUILD_LOG"
fi
trap - INT TERM

mkdir -p "$OUT_DIR"
cp "$OBJ_DIR/arch/x86/boot/bzImage" "$OUT_DIR/bzImage.tmp"
cp "$OBJ_DIR/.config" "$OUT_DIR/config"
cp "$BUILD_LOG" "$OUT_DIR/build.log"
cat >"$OUT_DIR/info.txt" <<INFO
source: linux-source-$SERIES $SRC_VER ($TARBALL)
fragments: ${FRAGMENTS[*]} (hash of their option lines: $FRAG_HASH)
built: $(date -u +%FT%TZ) in $(( $(date +%s) - START ))s with -j$JOBS
INFO
mv "$OUT_DIR/bzImage.tmp" "$BZIMAGE"
log "done in $(( $(date +%s) - START ))s ($(du -h "$BZIMAGE" | cut -f1))"
log "bzImage: $BZIMAGE"
echo "$BZIMAGE"
}

main "$@"
exit
