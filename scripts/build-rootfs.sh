#!/usr/bin/env bash
# Build (or find in the cache) the systemd test guest's root filesystem image: Debian 12
# with systemd, udev, logind and vmem_guest installed the way the docs say, as an ext4
# image for a virtio-blk disk (tests/vm/test_systemd_guest_vm.py boots it).
#
# Two layers, each cached under ${VMEM_GUEST_CACHE:-~/.cache/vmem-guest}/rootfs/,
# never in the checkout:
#   base-<hash>/root   mmdebstrap's minbase + scripts/rootfs/packages, customised by
#                      scripts/rootfs/base-hook.sh; <hash> covers the suite, the package
#                      list and the hook. Cold: a few minutes (downloads ~90 MB of debs).
#   image-<base>-<hash>/rootfs.ext4
#                      a copy of the base with the project installed in a chroot by
#                      scripts/rootfs/install-project.sh from the checkout's files (as
#                      docs/install.md says), plus the harness's command runner; <hash>
#                      covers the files that go into it (the package's sources, contrib/,
#                      scripts/rootfs/, the runner). Made again whenever one of them
#                      changes: about a minute.
# The newest KEEP_IMAGES images and two bases are kept. Needs root (mmdebstrap, chroot).
#
#   scripts/build-rootfs.sh               build what is missing, print the image path
#   scripts/build-rootfs.sh --print-path  print the image path (exit 1 if not built)
#   scripts/build-rootfs.sh --force       rebuild both layers
set -euo pipefail

main() {
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
CACHE="${VMEM_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmem-guest}"
SUITE=bookworm
KEEP_IMAGES=3
MODE=build
case "${1:-}" in
    "") ;;
    --print-path) MODE=print ;;
    --force) MODE=force ;;
    *) echo "usage: $0 [--print-path|--force]" >&2; exit 2 ;;
esac

log() { echo "build-rootfs: $*" >&2; }
die() { echo "build-rootfs: ERROR: $*" >&2; exit 1; }
# The project's files are the checkout's tracked ones (project_files).
git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO is not a git checkout"

BASE_HASH="$( { echo "$SUITE"; cat "$HERE/rootfs/packages" "$HERE/rootfs/base-hook.sh"; } |
    sha256sum | cut -c1-12)"
BASE_DIR="$CACHE/rootfs/base-$BASE_HASH"
PROJECT_HASH="$(project_hash)"
IMAGE_DIR="$CACHE/rootfs/image-$BASE_HASH-$PROJECT_HASH"
IMAGE="$IMAGE_DIR/rootfs.ext4"

if [ "$MODE" = print ]; then
    [ -f "$IMAGE" ] || die "root filesystem image not built yet (run scripts/build-rootfs.sh)"
    echo "$IMAGE"
    exit 0
fi
if [ "$MODE" = build ] && [ -f "$IMAGE" ]; then
    log "cached: $IMAGE"
    echo "$IMAGE"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap and chroot)"
bash "$HERE/install-vm-deps.sh" --rootfs >&2

mkdir -p "$CACHE/rootfs"
# One build at a time (several checkouts may share the cache).
exec 9>"$CACHE/rootfs/.lock"
flock -n 9 || { log "another build holds $CACHE/rootfs/.lock; waiting"; flock 9; }

if [ "$MODE" = force ] || [ ! -d "$BASE_DIR/root" ]; then
    build_base
fi
if [ "$MODE" = force ] || [ ! -f "$IMAGE" ]; then
    build_image
fi
touch "$BASE_DIR" "$IMAGE_DIR"  # the ones in use are the newest for prune_images
prune_images
echo "$IMAGE"
}

# The checkout's files that the package is built from (docs/install.md installs "from
# a checkout") and contrib/: the tracked ones, as they are in the work tree.
project_files() {
    git -C "$REPO" ls-files -z -- vmem_guest setup.cfg pyproject.toml README.md LICENSE \
        docs/man contrib
}

# A hash of every file that goes into the project layer, by content (uncommitted edits
# of tracked files count).
project_hash() {
    {
        project_files
        printf '%s\0' scripts/rootfs/install-project.sh scripts/rootfs/vmharness-runner.service \
            scripts/vmharness/guest_runner.py
    } | (cd "$REPO" && xargs -0 sha256sum) | sha256sum | cut -c1-12
}

build_base() {
    local t0=$SECONDS tmp="$BASE_DIR.partial" pkgs
    pkgs="$(grep -vE '^\s*(#|$)' "$HERE/rootfs/packages" | paste -sd, -)"
    log "building the base root ($SUITE, minbase + $pkgs) in $BASE_DIR"
    rm -rf "$tmp" "$BASE_DIR"
    mkdir -p "$tmp"
    mmdebstrap --variant=minbase --include="$pkgs" \
        --customize-hook="sh '$HERE/rootfs/base-hook.sh' \"\$1\"" \
        "$SUITE" "$tmp/root" >"$tmp/build.log" 2>&1 ||
        { tail -n 30 "$tmp/build.log" >&2; die "mmdebstrap failed (log: $tmp/build.log)"; }
    mv "$tmp" "$BASE_DIR"
    log "base root built in $((SECONDS - t0)) s ($(du -sm "$BASE_DIR/root" | cut -f1) MiB)"
}

build_image() {
    local t0=$SECONDS tmp="$IMAGE_DIR.partial" root size_mib
    log "installing the project into a copy of the base ($IMAGE_DIR)"
    rm -rf "$tmp" "$IMAGE_DIR"
    mkdir -p "$tmp"
    root="$tmp/root"
    cp -a "$BASE_DIR/root" "$root"
    # The part of the checkout the install needs, copied in: the chroot has no network.
    local stage="$root/root/vmem-guest"
    mkdir -p "$stage"
    project_files | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$stage"
    chroot "$root" /bin/sh -s /root/vmem-guest <"$HERE/rootfs/install-project.sh" \
        >"$tmp/install.log" 2>&1 ||
        { cat "$tmp/install.log" >&2; die "installing the project in the chroot failed"; }
    rm -rf "$stage"
    # The harness's command runner, started by its own unit (a test fixture).
    install -D -m 0644 "$REPO/scripts/vmharness/guest_runner.py" \
        "$root/usr/local/lib/vmharness/guest_runner.py"
    install -m 0644 "$HERE/rootfs/vmharness-runner.service" "$root/etc/systemd/system/"
    chroot "$root" systemctl enable vmharness-runner.service >>"$tmp/install.log" 2>&1
    find "$root" -name __pycache__ -path '*/vmem_guest/*' -prune -exec rm -rf {} +
    # Room for the journal, the agent's state and tests' scratch files (on QEMU's
    # snapshot overlay: the image itself is never written).
    size_mib=$(($(du -sm "$root" | cut -f1) * 5 / 4 + 256))
    mkfs.ext4 -q -F -L vmem-guest-root -d "$root" "$tmp/rootfs.ext4" "${size_mib}M" >&2
    rm -rf "$root"
    mv "$tmp" "$IMAGE_DIR"
    log "image built in $((SECONDS - t0)) s: $IMAGE (${size_mib} MiB)"
}

# Keep the newest KEEP_IMAGES images and the newest two bases (this build's are the
# newest); the others are 300-700 MB each.
prune_images() {
    local old
    ls -1dt "$CACHE/rootfs/image-"*/ 2>/dev/null | tail -n +$((KEEP_IMAGES + 1)) |
        while read -r old; do rm -rf "$old"; done
    ls -1dt "$CACHE/rootfs/base-"*/ 2>/dev/null | tail -n +3 |
        while read -r old; do rm -rf "$old"; done
}

main "$@"
