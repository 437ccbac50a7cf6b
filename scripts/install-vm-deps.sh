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

exec bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" vm-deps "${WANT[@]}"
