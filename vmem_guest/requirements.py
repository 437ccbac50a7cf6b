"""What the agent needs from the guest, in words: one record per requirement.

Each :class:`Requirement` says what the agent uses a kernel feature or setting for
(``need``), what is lost without it (``cost``) and how to get it (``fix``).
``vmem-guest doctor`` (:mod:`vmem_guest.doctor`) prints these for every check; the
places where ``run`` stops for a missing requirement build their error from the same
record (:meth:`Requirement.refusal`), so a refusal and the doctor's line say the same.
The reasons, with the kernel sources they rest on, are in docs/requirements.md.

This module holds text only: no OS access, importable from anywhere.
"""

from __future__ import annotations

import dataclasses
import enum


class Level(enum.Enum):
    """Whether ``run`` can start without it."""

    REQUIRED = "required"  # run refuses to start (or to serve the device)
    OPTIONAL = "optional"  # run starts, with the cost said


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One thing the agent needs: its name, level, use, cost when missing and fix."""

    name: str
    level: Level
    need: str
    cost: str
    fix: str

    def refusal(self, detail: str) -> str:
        """The one line for an error when this is missing: what was seen, what it
        costs, how to get it (``detail`` says what was found missing)."""
        return f"{detail}: {self.cost}; fix: {self.fix}"


ROOT = Requirement(
    "root",
    Level.REQUIRED,
    need="writes sysfs (probe, memory block states, PCI binding), opens /dev/vfio, "
    "reads physical addresses from /proc/self/pagemap and page flags",
    cost="run cannot start",
    fix="run vmem-guest as root",
)
LINUX = Requirement(
    "linux",
    Level.OPTIONAL,
    need="a kernel the agent is tested on (Linux 6.1 and 6.12)",
    cost="untested: older kernels may lack what the agent relies on "
    "(memfd_secret is 5.14, auto_online_blocks zone words 5.x)",
    fix="a Linux 6.1 or newer guest kernel",
)
PROBE = Requirement(
    "memory probe",
    Level.REQUIRED,
    need="adds each memory block of a device region (/sys/devices/system/memory/probe)",
    cost="the agent cannot add memory at all",
    fix="a guest kernel built with CONFIG_ARCH_MEMORY_PROBE=y (no distribution kernel "
    "enables it; see docs/requirements.md)",
)
BLOCK_SIZE = Requirement(
    "memory block size",
    Level.REQUIRED,
    need="memory is added, onlined and offlined in memory blocks "
    "(/sys/devices/system/memory/block_size_bytes); only blocks wholly inside a "
    "device region are used",
    cost="a device whose region holds no whole memory block gives the guest nothing",
    fix="a device region that is a multiple of the memory block size and starts on one "
    "(QEMU: size= a multiple of 128 MiB on x86-64)",
)
VFIO_PCI = Requirement(
    "vfio-pci",
    Level.REQUIRED,
    need="the agent drives each device through VFIO: it binds it to vfio-pci",
    cost="no device can be driven",
    fix="a kernel with CONFIG_VFIO_PCI (=y, or =m with its modules installed)",
)
UIO_PCI_GENERIC = Requirement(
    "uio_pci_generic",
    Level.OPTIONAL,
    need="the fallback where VFIO cannot be used: vmem-guest bind --uio hands a device "
    "to uio_pci_generic and run drives it through /dev/uioN (INTx), sysfs resourceN "
    "(BARs) and DMA memory at physical addresses, as in no-IOMMU mode",
    cost="no fallback: a guest without vfio-pci (or without an IOMMU and without "
    "VFIO's no-IOMMU mode) cannot drive any device",
    fix="a kernel with CONFIG_UIO_PCI_GENERIC (=y, or =m with its modules installed)",
)
DMA_ISOLATION = Requirement(
    "iommu",
    Level.REQUIRED,
    need="VFIO needs an IOMMU group: a vIOMMU (type1), or VFIO's unsafe no-IOMMU "
    "mode (CONFIG_VFIO_NOIOMMU) allowed with run --noiommu",
    cost="vfio-pci cannot take the device",
    fix="give the VM a vIOMMU (QEMU: -device intel-iommu,intremap=on, "
    "iommu_platform=on on the device, intel_iommu=on in the guest), or a kernel with "
    "CONFIG_VFIO_NOIOMMU=y, vfio.enable_unsafe_noiommu_mode=1 on its command line "
    "and run --noiommu",
)
INTERRUPT_REMAPPING = Requirement(
    "interrupt remapping",
    Level.REQUIRED,
    need="VFIO type1 attaches a group only where MSIs are isolated (interrupt "
    "remapping) or vfio_iommu_type1.allow_unsafe_interrupts=1",
    cost="VFIO refuses the device's group (EPERM) under the vIOMMU",
    fix="QEMU -device intel-iommu,intremap=on with a kernel with CONFIG_IRQ_REMAP=y "
    "(and X86_X2APIC), or vfio_iommu_type1.allow_unsafe_interrupts=1",
)
SECRETMEM = Requirement(
    "secretmem",
    Level.OPTIONAL,
    need="without an IOMMU the device sees physical addresses: the agent's DMA page "
    "comes from memfd_secret, which never moves and never lies in ZONE_MOVABLE",
    cost="the DMA page is locked anonymous memory, allocated until one lands outside "
    "every device region (up to 256 tries, else no device is served); compaction of "
    "locked pages is turned off while the agent runs, and if the page still moves "
    "the agent stops",
    fix="secretmem.enable=1 on the kernel command line (off by default on 6.1; "
    "needs CONFIG_SECRETMEM)",
)
KERNEL_DRIVER = Requirement(
    "in-kernel driver",
    Level.REQUIRED,
    need="each device must be left to the agent: the in-kernel virtio_mem driver "
    "owns the memory it plugged, and taking a device from it would strand that memory",
    cost="the agent does not take a device the in-kernel driver holds",
    fix="initcall_blacklist=virtio_mem_driver_init on the kernel command line "
    "(virtio_mem built in) or modprobe.blacklist=virtio_mem (a module), then reboot",
)
SOFT_OFFLINE = Requirement(
    "soft offline",
    Level.OPTIONAL,
    need="subblock unplug takes each page of a subblock out of use through "
    "/sys/devices/system/memory/soft_offline_page",
    cost="no subblock unplug: shrinking goes in whole memory blocks and may stop short",
    fix="a kernel with CONFIG_MEMORY_FAILURE=y",
)
KPAGEFLAGS = Requirement(
    "page flags",
    Level.OPTIONAL,
    need="subblock unplug checks every page is poisoned in /proc/kpageflags before "
    "the UNPLUG, and recovery reads it to trust holes",
    cost="no subblock unplug: shrinking goes in whole memory blocks and may stop short",
    fix="a kernel with CONFIG_PROC_PAGE_MONITOR=y, read as root",
)
DEBUGFS = Requirement(
    "debugfs",
    Level.OPTIONAL,
    need="a taken subblock is given back through debugfs hwpoison/unpoison-pfn",
    cost="no subblock unplug: shrinking goes in whole memory blocks and may stop short",
    fix="mount -t debugfs none /sys/kernel/debug (CONFIG_DEBUG_FS=y)",
)
HWPOISON_INJECT = Requirement(
    "hwpoison_inject",
    Level.OPTIONAL,
    need="hwpoison/unpoison-pfn in debugfs comes from the hwpoison_inject module",
    cost="no subblock unplug: shrinking goes in whole memory blocks and may stop short",
    fix="modprobe hwpoison_inject (CONFIG_HWPOISON_INJECT=y or =m)",
)
LOCKDOWN = Requirement(
    "lockdown",
    Level.OPTIONAL,
    need="kernel lockdown refuses debugfs writes, so no page could be given back",
    cost="no subblock unplug: shrinking goes in whole memory blocks and may stop short",
    fix="boot without lockdown (no lockdown= on the command line, Secure Boot off)",
)
AUTO_ONLINE = Requirement(
    "auto-online",
    Level.OPTIONAL,
    need="while it serves, the agent holds auto_online_blocks at its policy's online "
    "type, so one probe write adds and onlines a block, and puts the old value back "
    "on exit (after a SIGKILL, at the next start)",
    cost="the setting cannot be read: each block takes a probe and an online write, "
    "and a block the kernel auto-onlined into another zone is offlined and onlined again",
    fix="nothing to set by hand: a kernel with memory hot-plug (CONFIG_MEMORY_HOTPLUG) "
    "has the file",
)
SLEEP_INHIBITOR = Requirement(
    "sleep inhibitor",
    Level.OPTIONAL,
    need="while a device without PERSISTENT_SUSPEND holds plugged memory the agent "
    "blocks suspend with a logind sleep inhibitor (systemd-inhibit)",
    cost="suspend is not blocked: a suspend then loses that device's plugged memory "
    "(QEMU 7.2 unplugs everything at wake-up)",
    fix="run the guest with systemd as PID 1, logind and systemd-inhibit",
)
UEVENTS = Requirement(
    "uevents",
    Level.OPTIONAL,
    need="devices hot-plugged while the agent runs are seen through the kernel's "
    "uevents, read with pyudev over libudev",
    cost="devices hot-plugged later are not served until the agent restarts",
    fix="install libudev (Debian: libudev1)",
)
KEXEC = Requirement(
    "kexec and kdump",
    Level.OPTIONAL,
    need="memory added through 'probe' is plain System RAM with a /sys/firmware/memmap "
    "entry, and only the kernel's remove_memory (no sysfs file) takes either away: "
    "after a growth, a kexec'd kernel or a crash kernel must not be used",
    cost="kexec (kexec-tools reads /sys/firmware/memmap) boots the next kernel with "
    "device memory as RAM though it may be unplugged; a crash kernel's elfcorehdr lists "
    "it, so the dump reads unplugged memory",
    fix="reboot instead of kexec while device memory was ever added this boot; leave "
    "kdump off or accept dumps that read unplugged memory (kernel.kexec_load_disabled=1 "
    "forbids both until reboot); see docs/kexec.md",
)


def not_root(uid: int) -> str:
    """What is seen when the process is not root."""
    return f"running as uid {uid}, not root"


def no_probe(path: str) -> str:
    """What is seen when the probe file is missing."""
    return f"this kernel has no {path} (CONFIG_ARCH_MEMORY_PROBE)"


def no_iommu_mode(bdf: str) -> str:
    """A device with neither an IOMMU nor VFIO's no-IOMMU mode in this kernel."""
    return DMA_ISOLATION.refusal(
        f"{bdf} has no IOMMU and this kernel's vfio has no no-IOMMU mode (CONFIG_VFIO_NOIOMMU)"
    )


def noiommu_not_allowed(bdf: str) -> str:
    """A device that can be driven only in no-IOMMU mode, which was not allowed."""
    return (
        f"{bdf} is not behind an IOMMU: binding it needs VFIO's unsafe no-IOMMU mode, "
        "which lets the device DMA anywhere and taints the kernel; allow it explicitly "
        "(--noiommu) or give the VM a vIOMMU"
    )


def driven_by(bdf: str, driver: str) -> str:
    """What is seen when the in-kernel driver is bound to a device."""
    return f"{bdf} is driven by the in-kernel {driver} driver"
