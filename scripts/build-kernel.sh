#!/usr/bin/env bash
# Build (or find in the cache) the test-VM guest kernel.
#
# Debian's linux-source tarball + x86_64_defconfig + kvm_guest.config + our fragment
# scripts/kernel/vmem-guest.config, then olddefconfig and `make bzImage`.
#
# Cache: ${VMEM_GUEST_CACHE:-~/.cache/vmem-guest}/kernel/<source-version>-<fragment-hash>/
# (bzImage, config, build.log). The build tree lives in ${VMEM_GUEST_CACHE}/build/,
# never in the checkout. A rebuild happens only when the linux-source package version or
# the fragment's options (comments do not count) change.
#
#   scripts/build-kernel.sh               build if needed, print the bzImage path
#   scripts/build-kernel.sh --print-path  print the bzImage path (exit 1 if not built)
#   scripts/build-kernel.sh --force       rebuild even when cached
set -euo pipefail

# Everything runs inside main(), which bash parses whole before running it: editing
# this file while a (10-minute) build runs cannot derail the running build.
main() {
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/kernel/vmem-guest.config"
CACHE="${VMEM_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmem-guest}"
MODE="build"
case "${1:-}" in
    --print-path) MODE="print" ;;
    --force) MODE="force" ;;
    "") ;;
    *) echo "usage: $0 [--print-path|--force]" >&2; exit 2 ;;
esac

log() { echo "build-kernel: $*"; }
die() { echo "build-kernel: ERROR: $*" >&2; exit 1; }

# The newest linux-source tarball and the version of the package that ships it.
find_source() {
    TARBALL="$(ls -1 /usr/src/linux-source-*.tar.xz 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$TARBALL" ] || return 1
    SRC_PKG="$(basename "$TARBALL" .tar.xz)"           # linux-source-6.1
    SRC_VER="$(dpkg-query -W -f='${Version}' "$SRC_PKG" 2>/dev/null || true)"
    [ -n "$SRC_VER" ] || SRC_VER="$(stat -c %Y "$TARBALL")"
    # Hash only the option lines: editing the comments does not force a rebuild.
    FRAG_HASH="$(grep -E '^(CONFIG_|# CONFIG_)' "$FRAGMENT" | sort | sha256sum | cut -c1-12)"
    KEY="${SRC_PKG#linux-source-}_${SRC_VER}-${FRAG_HASH}"
    OUT_DIR="$CACHE/kernel/$KEY"
    BZIMAGE="$OUT_DIR/bzImage"
}

if [ "$MODE" = "print" ]; then
    find_source || die "linux-source is not installed (run scripts/install-vm-deps.sh)"
    [ -f "$BZIMAGE" ] || die "kernel not built yet: $BZIMAGE (run make kernel)"
    echo "$BZIMAGE"
    exit 0
fi

# Make sure the build dependencies (and the source) are installed.
bash "$HERE/install-vm-deps.sh" --kernel
find_source || die "no /usr/src/linux-source-*.tar.xz after installing linux-source"

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
SRC_DIR="$CACHE/build/src-${SRC_PKG#linux-source-}_$SRC_VER"
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
log "configuring (x86_64_defconfig + kvm_guest.config + $(basename "$FRAGMENT"))"
rm -rf "$STAGE_DIR"
mkdir -p "$STAGE_DIR"
make -s -C "$SRC_DIR" O="$STAGE_DIR" x86_64_defconfig >/dev/null
(cd "$SRC_DIR" && scripts/kconfig/merge_config.sh -m -O "$STAGE_DIR" "$STAGE_DIR/.config" \
    kernel/configs/kvm_guest.config "$FRAGMENT" >/dev/null)
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
done < <(grep -E '^CONFIG_[A-Z0-9_]+=y$' "$FRAGMENT")
if [ "${#missing[@]}" -gt 0 ]; then
    printf 'build-kernel: ERROR: required option not =y in the final .config: %s\n' "${missing[@]}" >&2
    die "fix $FRAGMENT (a dependency is probably missing); config: $OBJ_DIR/.config"
fi
log "config ok: all $(grep -cE '^CONFIG_[A-Z0-9_]+=y$' "$FRAGMENT") required options are =y"

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
source: $SRC_PKG $SRC_VER
fragment: $FRAGMENT (hash of its option lines: $FRAG_HASH)
built: $(date -u +%FT%TZ) in $(( $(date +%s) - START ))s with -j$JOBS
INFO
mv "$OUT_DIR/bzImage.tmp" "$BZIMAGE"
log "done in $(( $(date +%s) - START ))s ($(du -h "$BZIMAGE" | cut -f1))"
log "bzImage: $BZIMAGE"
echo "$BZIMAGE"
}

main "$@"
exit
