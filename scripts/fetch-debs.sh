#!/usr/bin/env bash
# Download Debian packages from suites this machine's apt does not use (bookworm-backports,
# bookworm-security), with a private apt configuration under the cache: nothing is
# installed and the system's apt state is not touched. Used by scripts/install-qemu.sh
# (QEMU 10.0 from backports) and scripts/build-kernel.sh (linux-source-6.12).
#
#   scripts/fetch-debs.sh version PKG PATTERN   print the newest version of PKG whose
#                                               version matches the shell PATTERN
#   scripts/fetch-debs.sh download DEST PKG=VERSION...
#                                               download the .debs into DEST
#
# The package lists live in ${VMEM_GUEST_CACHE}/apt and are refreshed only when they are
# missing or the package asked for is not in them, so a warm cache never reaches the
# network and never picks a different version on its own.
# Mirrors: $VMEM_GUEST_DEBIAN_MIRROR (default http://deb.debian.org/debian) and
# $VMEM_GUEST_DEBIAN_SECURITY (default http://deb.debian.org/debian-security).
set -euo pipefail

main() {
CACHE="${VMEM_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmem-guest}"
APT_DIR="$CACHE/apt"
MIRROR="${VMEM_GUEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${VMEM_GUEST_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"

die() { echo "fetch-debs: ERROR: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 || die "apt-get is not available (a Debian host is needed)"

# shellcheck disable=SC1091
CODENAME="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[ -n "$CODENAME" ] || die "cannot read VERSION_CODENAME from /etc/os-release"

mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
cat >"$APT_DIR/sources.list" <<SOURCES
deb $MIRROR $CODENAME main
deb $MIRROR $CODENAME-updates main
deb $MIRROR $CODENAME-backports main
deb $SECURITY $CODENAME-security main
SOURCES
APT_OPTS=(
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "Debug::NoLocking=1"
)

refresh() {
    echo "fetch-debs: reading the package lists of $CODENAME{,-updates,-backports,-security}" >&2
    apt-get "${APT_OPTS[@]}" -q update >"$APT_DIR/update.log" 2>&1 ||
        die "apt-get update failed (is $MIRROR reachable?); log: $APT_DIR/update.log"
}

# All versions of $1 that the private lists know, one per line.
versions_of() {
    apt-cache "${APT_OPTS[@]}" madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}'
}

newest_matching() {
    local pkg="$1" pattern="$2" v best=""
    while IFS= read -r v; do
        # shellcheck disable=SC2053
        [[ "$v" == $pattern ]] || continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best="$v"; fi
    done < <(versions_of "$pkg")
    echo "$best"
}

case "${1:-}" in
    version)
        [ $# -eq 3 ] || die "usage: $0 version PKG PATTERN"
        [ -n "$(ls -A "$APT_DIR/lists" 2>/dev/null | grep -v partial || true)" ] || refresh
        found="$(newest_matching "$2" "$3")"
        if [ -z "$found" ]; then
            refresh
            found="$(newest_matching "$2" "$3")"
        fi
        [ -n "$found" ] || die "no version of $2 matching '$3' in $CODENAME, -updates, -backports or -security"
        echo "$found"
        ;;
    download)
        [ $# -ge 3 ] || die "usage: $0 download DEST PKG=VERSION..."
        dest="$2"
        shift 2
        mkdir -p "$dest"
        (cd "$dest" && apt-get "${APT_OPTS[@]}" -q download "$@" >"$APT_DIR/download.log" 2>&1) ||
            die "apt-get download $* failed; log: $APT_DIR/download.log"
        ;;
    *) die "usage: $0 version PKG PATTERN | download DEST PKG=VERSION..." ;;
esac
}

main "$@"
exit
