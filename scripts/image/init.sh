#!/bin/sh
# vmem_guest conformance image: PID 1 (docs/image.md). Built into the initramfs by
# scripts/build-image.py, which puts the interpreter and vmem_guest where PATH and
# PYTHONPATH below find them.
#
# The kernel command line chooses the work:
#   vmem_guest.mode=fuzz   (default) fuzz every virtio-mem-pci device, print the report
#                          (vmem_guest/vmm_image.py), power off
#   vmem_guest.mode=agent  serve every device with `vmem-guest run` (the agent), a shell on the
#                          console; leaving the shell powers off
# and vmem_guest.examples=N, vmem_guest.max_steps=N, vmem_guest.seed=N tune the fuzzer.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp LANG=C.UTF-8
export PYTHONPATH=/usr/lib/vmem-guest/site PYTHONDONTWRITEBYTECODE=1

# The initramfs is the root: the kernel mounted nothing else (devtmpfs is mounted
# automatically only on a real root, init/do_mounts.c prepare_namespace).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
echo 1 > /proc/sys/kernel/sysrq

power_off() {
    echo "vmem-guest image: powering off"
    # sysrq o: the kernel powers off at once (kernel/power/poweroff.c, sysrq_poweroff_op).
    echo o > /proc/sysrq-trigger
    sleep 60
}

mode=fuzz
for word in $(cat /proc/cmdline); do
    case "$word" in
        vmem_guest.mode=*) mode=${word#*=} ;;
    esac
done

# vfio-pci in no-IOMMU mode: the parameter is writable at run time (Linux 6.1
# drivers/vfio/container.c: module_param_named(enable_unsafe_noiommu_mode, ...,
# S_IRUGO | S_IWUSR)),
# so a command line without vfio.enable_unsafe_noiommu_mode=1 works too.
noiommu=/sys/module/vfio/parameters/enable_unsafe_noiommu_mode
[ -w "$noiommu" ] && echo Y > "$noiommu"

echo "vmem-guest image: $(uname -r), mode $mode"
case "$mode" in
    fuzz)
        python3 -m vmem_guest.vmm_image
        echo "vmem-guest image: fuzz exited with status $?"
        ;;
    agent)
        vmem-guest run --noiommu &
        echo "vmem-guest image: agent started (pid $!); a shell follows, exit powers off"
        sh
        ;;
    *)
        echo "vmem-guest image: unknown vmem_guest.mode=$mode (fuzz or agent)"
        ;;
esac
power_off
