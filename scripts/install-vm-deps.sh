#!/usr/bin/env bash
# Install the Debian packages the test VM needs: QEMU, the guest-kernel build tools and
# the tools that build the systemd guest's Debian root filesystem (scripts/build-rootfs.sh).
# Idempotent: packages already installed are skipped, and `apt-get update` runs at most
# once per call (only when something is missing). Needs root (or passwordless sudo).
#
#   scripts/install-vm-deps.sh            # QEMU + kernel build deps + rootfs tools
#   scripts/install-vm-deps.sh --qemu     # only QEMU
#   scripts/install-vm-deps.sh --kernel   # only the kernel build deps
#   scripts/install-vm-deps.sh --rootfs   # only the root filesystem tools
set -euo pipefail

QEMU_PKGS=(qemu-system-x86)
KERNEL_PKGS=(linux-source build-essential bc bison flex libelf-dev libssl-dev dwarves cpio
    xz-utils)
# mmdebstrap builds the Debian root; mkfs.ext4 -d (e2fsprogs) turns it into an image.
ROOTFS_PKGS=(mmdebstrap e2fsprogs)

case "${1:-all}" in
    --qemu) WANT=("${QEMU_PKGS[@]}") ;;
    --kernel) WANT=("${KERNEL_PKGS[@]}") ;;
    --rootfs) WANT=("${ROOTFS_PKGS[@]}") ;;
    all | --all) WANT=("${QEMU_PKGS[@]}" "${KERNEL_PKGS[@]}" "${ROOTFS_PKGS[@]}") ;;
    *) echo "usage: $0 [--qemu|--kernel|--rootfs|--all]" >&2; exit 2 ;;
esac

missing=()
for p in "${WANT[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "vm-deps: all present (${WANT[*]})"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "vm-deps: missing ${missing[*]} and not root (no passwordless sudo);" \
            "install them with: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "vm-deps: missing ${missing[*]} and apt-get is not available" >&2
    exit 1
fi

echo "vm-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "vm-deps: done"
