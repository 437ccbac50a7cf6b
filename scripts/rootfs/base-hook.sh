#!/bin/sh
# mmdebstrap --customize-hook for the systemd test guest's base root filesystem
# (scripts/build-rootfs.sh): $1 is the root directory. Only what makes the image boot
# as a test guest is here; what the project's docs tell a user to do is in
# install-project.sh.
set -eu
root="$1"

echo vmem-guest-test > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmem-guest-test\n' > "$root/etc/hosts"
# The root is the first virtio-blk disk (QEMU -drive if=virtio,snapshot=on: every boot
# starts from the same image and nothing is written back to it).
printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' > "$root/etc/fstab"
# A fixed machine id: no first-boot set-up (systemd-firstboot, machine-id commit) on
# a root that every boot sees unchanged.
tr -d '-' < /proc/sys/kernel/random/uuid > "$root/etc/machine-id"
# Root logs in on the serial console without a password (a test image, no network).
chroot "$root" passwd -d root >/dev/null
# Nothing periodic in a guest that lives a few minutes (apt-daily, e2scrub, fstrim...).
rm -f "$root"/etc/systemd/system/timers.target.wants/*
# A persistent journal is pointless on a snapshot disk; keep it in /run.
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' > "$root/etc/systemd/journald.conf.d/volatile.conf"
