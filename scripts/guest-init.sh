#!/bin/sh
# vmem_guest test VM: PID 1 inside the guest (kernel command line `init=` points here).
#
# The root filesystem is the host's / shared read-only over 9p. This script mounts the
# kernel filesystems and scratch space where they hide nothing of the host (NOT /tmp:
# a CI checkout may live under /tmp), mounts the writable results share at its host
# path, then runs the harness's command runner (scripts/vmharness/guest_runner.py),
# which serves commands from the host over a virtio-serial port until power-off.
#
# Settings arrive as KEY=value words on the kernel command line (the kernel passes
# unknown ones to init as environment):
#   VMH_RUNNER  path of guest_runner.py      VMH_PYTHON  interpreter for it
#   VMH_SHARE   host path of the writable results share (mount tag "results")
#   VMH_MODE    "probe": print a marker and power off (accelerator probe)
#   VMH_RAMROOT a list in the share of what to copy into a RAM root (see below)
#   VMH_NO9P    with VMH_RAMROOT: leave nothing of 9p mounted (live migration, below)

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONDONTWRITEBYTECODE=1 HOME=/run/root TMPDIR=/run/tmp LANG=C.UTF-8

serve() {
    # The runner should never exit; if it dies, restart it so the host can still talk to us.
    while :; do
        "${VMH_PYTHON:-/usr/bin/python3}" -S "$VMH_RUNNER"
        echo "guest-init: runner exited with $?; restarting in 1 s"
        sleep 1
    done
}

# Inside the RAM root (below): everything is mounted already.
if [ "${1:-}" = "--serve" ]; then
    if [ "${2:-}" = "--detach" ]; then
        # The old 9p root (the share was unmounted before): a lazy unmount, so its
        # fids are clunked as the last reference goes (QEMU then lifts its blocker).
        umount -l "$3" && echo "guest-init: 9p root unmounted"
    fi
    echo "guest-init: up in the RAM root; runner ${VMH_RUNNER:-unset}"
    serve
fi

# Mount unconditionally: before our /proc is mounted, anything that asks "is this a
# mount point" would read the HOST's /proc through the 9p root.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/root /run/tmp && chmod 1777 /run/tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo 1 > /proc/sys/kernel/sysrq

if [ "${VMH_MODE:-}" = "probe" ]; then
    echo "VMH_PROBE_OK"
    echo o > /proc/sysrq-trigger
    sleep 10
fi

if [ -n "${VMH_SHARE:-}" ]; then
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "$VMH_SHARE" \
        || echo "guest-init: cannot mount the results share at $VMH_SHARE"
fi

# VMH_RAMROOT (the path of a list in the share, scripts/vmharness/ramroot.py): copy
# what the runner, the tests' commands and the agent need into a tmpfs and chroot into
# it, so the guest survives an S3 wake-up, after which the 9p root hangs for good
# (Linux's 9p virtio transport has no freeze/restore; QEMU resets it at wake-up).
if [ -n "${VMH_RAMROOT:-}" ]; then
    new=/mnt
    mount -t tmpfs -o mode=0755 tmpfs "$new"
    # One cp for the whole list: measured under single-threaded TCG on a busy host, a
    # cp per path had not finished in 300 s; one cp copied it in about 120 s.
    xargs -d '\n' -a "$VMH_RAMROOT" cp -a --parents -t "$new" \
        || echo "guest-init: RAM root: some paths were not copied"
    echo "guest-init: RAM root: $(wc -l < "$VMH_RAMROOT") paths ($(du -sm "$new" | cut -f1) MiB)"
    for dir in /proc /sys /dev /run; do
        mkdir -p "$new$dir" && mount --move "$dir" "$new$dir"
    done
    mkdir -p "$new/tmp" && chmod 1777 "$new/tmp"
    # VMH_NO9P: QEMU refuses to migrate while a 9p export is mounted in the guest (it
    # lifts the blocker once the export's root fid is clunked: hw/9pfs/9p.c
    # v9fs_attach, put_fid). A chroot would keep the 9p root mounted underneath, so
    # pivot_root moves every root and working directory into the copy and the old
    # root is then unmounted; the share goes first.
    if [ -n "${VMH_NO9P:-}" ]; then
        if [ -n "${VMH_SHARE:-}" ]; then umount "$VMH_SHARE"; fi
        mkdir -p "$new/oldroot"
        cd "$new" && pivot_root . oldroot && exec /bin/sh "$0" --serve --detach /oldroot
        echo "guest-init: pivot_root into the RAM root failed"
    fi
    if [ -n "${VMH_SHARE:-}" ]; then
        mkdir -p "$new$VMH_SHARE" && mount --move "$VMH_SHARE" "$new$VMH_SHARE"
    fi
    exec chroot "$new" /bin/sh "$0" --serve
fi

echo "guest-init: up; runner ${VMH_RUNNER:-unset}"
serve
