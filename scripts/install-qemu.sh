#!/usr/bin/env bash
# Install a QEMU other than the system's into a private prefix under the cache, and print
# the path of a qemu-system-x86_64 that runs it. The system QEMU is not touched.
#
#   scripts/install-qemu.sh system      the system's qemu-system-x86_64 (Debian 12: 7.2),
#                                       installed with apt when missing
#   scripts/install-qemu.sh 10.0        QEMU 10.0 from bookworm-backports, into
#                                       ${VMEM_GUEST_CACHE}/qemu/<version>/
#   scripts/install-qemu.sh --print-path 10.0
#                                       the path if installed (exit 1 if not)
#
# How (measured to run with Debian 12's libraries): `apt-get download` of
# qemu-system-x86, qemu-system-common and qemu-system-data at the newest backports
# version of the series (scripts/fetch-debs.sh), `dpkg-deb -x` of each into the prefix,
# and a wrapper bin/qemu-system-x86_64 that points the binary at the prefix's firmware
# (-L) and modules (QEMU_MODULE_DIR).
set -euo pipefail

main() {
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMEM_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmem-guest}"
MODE="install"
if [ "${1:-}" = "--print-path" ]; then MODE="print"; shift; fi
SERIES="${1:-}"

log() { echo "install-qemu: $*" >&2; }
die() { echo "install-qemu: ERROR: $*" >&2; exit 1; }
[ -n "$SERIES" ] || die "usage: $0 [--print-path] system|SERIES (for example 10.0)"

if [ "$SERIES" = "system" ]; then
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        [ "$MODE" = "install" ] || die "qemu-system-x86_64 is not installed"
        bash "$HERE/install-vm-deps.sh" --qemu >&2
    fi
    command -v qemu-system-x86_64
    exit 0
fi
[[ "$SERIES" =~ ^[0-9]+\.[0-9]+$ ]] || die "QEMU series must look like 10.0, got '$SERIES'"

# The newest cached install of the series, if any (no network needed to find it).
cached() {
    local d
    d="$(ls -1d "$CACHE/qemu/$SERIES".* 2>/dev/null | sort -V | tail -n1 || true)"
    [ -n "$d" ] && [ -x "$d/bin/qemu-system-x86_64" ] && echo "$d/bin/qemu-system-x86_64"
}

if [ "$MODE" = "print" ]; then
    cached || die "QEMU $SERIES is not installed (run scripts/install-qemu.sh $SERIES)"
    exit 0
fi
if exe="$(cached)"; then
    echo "$exe"
    exit 0
fi
# One install at a time: make test's workers may both find QEMU missing.
mkdir -p "$CACHE/qemu"
exec 9>"$CACHE/qemu/.lock"
flock -n 9 || { log "another install holds $CACHE/qemu/.lock; waiting"; flock 9; }
if exe="$(cached)"; then
    echo "$exe"
    exit 0
fi

VERSION="$(bash "$HERE/fetch-debs.sh" version qemu-system-x86 "1:$SERIES.*")" ||
    die "QEMU $SERIES is not packaged for this Debian release (looked in backports too)"
UPSTREAM="${VERSION#1:}"
UPSTREAM="${UPSTREAM%%+*}"                     # 10.0.2
PREFIX="$CACHE/qemu/$UPSTREAM"
STAGE="$PREFIX.partial"
rm -rf "$STAGE"
mkdir -p "$STAGE/debs"
log "downloading qemu-system-x86, -common, -data $VERSION (about 13 MB)"
bash "$HERE/fetch-debs.sh" download "$STAGE/debs" \
    "qemu-system-x86=$VERSION" "qemu-system-common=$VERSION" "qemu-system-data=$VERSION"
for deb in "$STAGE"/debs/*.deb; do
    log "unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$STAGE"
done
MODULES="$(ls -1d "$STAGE"/usr/lib/*/qemu 2>/dev/null | head -n1 || true)"
mkdir -p "$STAGE/bin"
# The wrapper execs (same pid): the harness's kill and wait reach QEMU itself.
cat >"$STAGE/bin/qemu-system-x86_64" <<WRAPPER
#!/bin/sh
# QEMU $VERSION from Debian's backports, unpacked by vmem_guest's scripts/install-qemu.sh.
export QEMU_MODULE_DIR="${MODULES/#$STAGE/$PREFIX}"
exec "$PREFIX/usr/bin/qemu-system-x86_64" -L "$PREFIX/usr/share/qemu" "\$@"
WRAPPER
chmod +x "$STAGE/bin/qemu-system-x86_64"
echo "$VERSION" >"$STAGE/VERSION"
rm -rf "$PREFIX"
mv "$STAGE" "$PREFIX"
if ! out="$("$PREFIX/bin/qemu-system-x86_64" --version 2>&1)"; then
    die "the unpacked QEMU does not run on this host: $out"
fi
log "installed: $(echo "$out" | head -n1)"
echo "$PREFIX/bin/qemu-system-x86_64"
}

main "$@"
exit
