"""What a test VM looks like: devices, memory, NUMA, IOMMU, kernel command line.

:class:`VMConfig` is pure data; :func:`qemu_argv` and :func:`kernel_cmdline` turn it
into QEMU's arguments. Nothing here starts a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .paths import GUEST_INIT, GUEST_RUNNER
from .ramroot import RAM_ROOT_LIST
from .sizes import GiB, MiB, fmt_size, parse_size


@dataclass(frozen=True)
class MemDevice:
    """One virtio-mem-pci device and its RAM backend."""

    id: str = "vm0"
    size: int = 4 * GiB  #: backend size = the device region
    block_size: int = 2 * MiB
    requested_size: int = 0
    node: int | None = None  #: NUMA node (needs VMConfig.numa_nodes > node)
    iommu_platform: bool = False  #: set automatically when the VM has a vIOMMU
    memaddr: int | None = None  #: fix the region's guest-physical address
    #: False: ``reserve=off`` on the RAM backend, so the host reserves no swap space for a
    #: region far larger than it has (only what the guest touches is ever allocated).
    reserve: bool = True


@dataclass(frozen=True)
class Dimm:
    """A cold-plugged pc-dimm (fully backed memory; used by the benchmark's floor)."""

    id: str = "dimm0"
    size: int = 4 * GiB
    node: int = 0


@dataclass(frozen=True)
class VMConfig:
    """A test VM. Defaults: 2 vCPUs, 1 GiB boot memory, one 4 GiB virtio-mem device."""

    name: str = "vm"
    cpus: int = 2
    memory: int = 1 * GiB  #: boot memory (split evenly over NUMA nodes)
    devices: tuple[MemDevice, ...] = (MemDevice(),)
    dimms: tuple[Dimm, ...] = ()
    numa_nodes: int = 0  #: 0 = no -numa options
    in_kernel_driver: bool = True  #: False adds initcall_blacklist=virtio_mem_driver_init
    noiommu: bool = False  #: vfio.enable_unsafe_noiommu_mode=1
    #: With noiommu: secretmem.enable=1 too (the agent's DMA pages in memfd_secret
    #: memory); False boots as the README's set-up does, without it.
    secretmem: bool = True
    viommu: bool = False  #: -device intel-iommu,intremap=on and intel_iommu=on
    #: pc-dimms cold-plugged but left alone by the guest (acpi_no_memhotplug).
    acpi_memhotplug: bool = True
    extra_cmdline: tuple[str, ...] = ()
    extra_qemu_args: tuple[str, ...] = ()
    maxmem: int | None = None  #: default: boot memory + all devices and dimms
    slots: int | None = None  #: default: number of dimms, at least 1
    #: The vCPU's physical address bits (``-cpu ...,phys-bits=N``). None: QEMU's default
    #: (40 under TCG: 1 TiB of guest-physical space, which a 1 TiB region does not fit).
    phys_bits: int | None = None
    #: TCG's threading (``-accel tcg,thread=...``): ``single`` runs all vCPUs in one
    #: host thread, ``multi`` a thread per vCPU. Single by default: both QEMUs the
    #: project runs crashed under multi-threaded TCG while the guest remapped PCI
    #: BARs (10.0.2 in two assertions of its I/O dispatch, Debian's 7.2 in a NULL
    #: region in ``memory_region_dispatch_write``; docs/test-vm.md section 10), and
    #: on this 2-core host with two VMs at a time single was not slower.
    tcg_thread: str = "single"
    #: Run the guest from a copy in RAM (scripts/vmharness/ramroot.py), not the 9p root,
    #: which does not survive an S3 wake-up. Slower to boot (the copy), so only where
    #: a test suspends the guest.
    ram_root: bool = False
    #: A guest QEMU can live-migrate (scripts/vmharness/migration.py): it runs from its
    #: RAM root (needs ``ram_root``) with nothing of 9p mounted, since QEMU refuses to
    #: migrate while a 9p export is mounted (docs/test-vm.md section 13). guest-init
    #: pivots into the copy and unmounts the 9p root and the share; results come out
    #: through the command channel only.
    migratable: bool = False
    #: Boot this ext4 image (scripts/build-rootfs.sh) from a virtio-blk disk with its own
    #: init, systemd, instead of the host's / over 9p with guest-init.sh. QEMU's
    #: ``snapshot=on`` keeps the image as it is. The image starts the command runner.
    root_image: Path | None = None
    #: With ``root_image``: boot a copy of it in the run directory, written in place
    #: (no ``snapshot=on``), so the disk outlives QEMU: :meth:`TestVM.restart` starts
    #: QEMU again on the same disks (a guest that hibernated resumes from them).
    persistent_root: bool = False
    #: Bytes of a second virtio-blk disk (``/dev/vdb``, raw, in the run directory) for
    #: a swap area the guest makes itself; 0: none.
    swap_disk: int = 0

    def with_devices(self, *devices: MemDevice) -> VMConfig:
        """A copy with other devices."""
        return VMConfig(**{**self.__dict__, "devices": tuple(devices)})

    def validate(self) -> None:
        """Reject configurations QEMU would refuse with a less helpful message."""
        ids = [d.id for d in self.devices] + [d.id for d in self.dimms]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate device ids: {ids}")
        for d in self.devices:
            if d.node is not None and d.node >= max(self.numa_nodes, 1):
                raise ValueError(f"{d.id}: node {d.node} but only {self.numa_nodes} NUMA nodes")
            if d.size % d.block_size or d.requested_size % d.block_size:
                raise ValueError(f"{d.id}: sizes must be multiples of the block size")
        if self.migratable and not self.ram_root:
            raise ValueError("a migratable VM runs from its RAM root: set ram_root too")
        if self.persistent_root and self.root_image is None:
            raise ValueError("persistent_root needs a root_image")
        if self.numa_nodes and self.memory % (self.numa_nodes * 128 * MiB):
            raise ValueError("boot memory must split into 128 MiB multiples per node")


def userspace_driver_config(
    name: str,
    *devices: MemDevice,
    viommu: bool = False,
    numa_nodes: int = 0,
    extra_cmdline: tuple[str, ...] = (),
) -> VMConfig:
    """A VM for the userspace driver: the in-kernel virtio_mem driver blacklisted and
    ``devices`` (one default :class:`MemDevice` when none is given) left to VFIO, in
    no-IOMMU mode, or in type1 mode under a vIOMMU with ``viommu``."""
    return VMConfig(
        name=name,
        devices=devices or (MemDevice(),),
        numa_nodes=numa_nodes,
        in_kernel_driver=False,
        noiommu=not viommu,
        viommu=viommu,
        extra_cmdline=extra_cmdline,
    )


@dataclass(frozen=True)
class RunPaths:
    """Host paths of one VM run."""

    kernel: Path
    run_dir: Path  #: results/vm/<run>/ : console.log, qemu.log
    share: Path  #: writable 9p share, mounted at the same path in the guest
    sock_dir: Path  #: short temp dir for the QMP and command sockets
    guest_init: Path = GUEST_INIT  #: the guest kernel's init= (the checkout's guest-init.sh)
    guest_runner: Path = GUEST_RUNNER  #: VMH_RUNNER, the command runner init starts
    python: str = "/usr/bin/python3"
    #: 0 for the first QEMU of a run; N for the destination of its N-th migration,
    #: which logs to qemu-N.log (the console log is shared: the destination appends).
    generation: int = 0
    console_log: Path = field(init=False)
    qemu_log: Path = field(init=False)
    qmp_sock: Path = field(init=False)
    cmd_sock: Path = field(init=False)
    root_copy: Path = field(init=False)  #: the persistent root's copy of the image
    swap_img: Path = field(init=False)  #: the swap disk

    def __post_init__(self) -> None:
        object.__setattr__(self, "root_copy", self.run_dir / "root.ext4")
        object.__setattr__(self, "swap_img", self.run_dir / "swap.img")
        object.__setattr__(self, "console_log", self.run_dir / "console.log")
        qemu_log = f"qemu-{self.generation}.log" if self.generation else "qemu.log"
        object.__setattr__(self, "qemu_log", self.run_dir / qemu_log)
        object.__setattr__(self, "qmp_sock", self.sock_dir / "qmp.sock")
        object.__setattr__(self, "cmd_sock", self.sock_dir / "cmd.sock")


def kernel_cmdline(cfg: VMConfig, paths: RunPaths, mode: str = "", *, tcg: bool = False) -> str:
    """The guest kernel command line for cfg (``tcg``: QEMU runs it under TCG)."""
    words = [
        "console=ttyS0",
        "panic=0",  # hang on panic; the harness spots "Kernel panic" in the console
        "oops=panic",
        "8250.nr_uarts=1",
    ]
    if tcg:
        # Under TCG on a loaded host the boot's check that the IO-APIC timer ticks
        # (check_timer, arch/x86/kernel/apic/io_apic.c: a few ticks within a delay
        # loop) can miss and panic "IO-APIC + timer doesn't work!" (seen in make test,
        # four VMs on two cores); the timer works. no_timer_check skips the check.
        words.append("no_timer_check")
    if cfg.root_image is not None:
        # The image's own init (systemd) and fstab; its runner needs no settings.
        words += ["root=/dev/vda", "rootfstype=ext4", "rw"]
    else:
        words += [
            "root=hostroot",
            "rootfstype=9p",
            "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose",
            "ro",
            f"init={paths.guest_init}",
            f"VMH_RUNNER={paths.guest_runner}",
            f"VMH_PYTHON={paths.python}",
            f"VMH_SHARE={paths.share}",
        ]
    if mode:
        words.append(f"VMH_MODE={mode}")
    if cfg.ram_root:
        words.append(f"VMH_RAMROOT={paths.share / RAM_ROOT_LIST}")
    if cfg.migratable:
        words.append("VMH_NO9P=1")
    if cfg.in_kernel_driver:
        words.append("memhp_default_state=online_movable")
    else:
        words.append("initcall_blacklist=virtio_mem_driver_init")
    if cfg.noiommu:
        words.append("vfio.enable_unsafe_noiommu_mode=1")
        # Lets a no-IOMMU agent keep its DMA pages in unmovable memfd_secret pages,
        # never inside a device's (movable, unpluggable) memory (transport/dma.py).
        if cfg.secretmem:
            words.append("secretmem.enable=1")
    if cfg.viommu:
        words.append("intel_iommu=on")
    if cfg.dimms and not cfg.acpi_memhotplug:
        words.append("acpi_no_memhotplug")
    words.extend(cfg.extra_cmdline)
    for w in words:
        if " " in w:
            raise ValueError(f"kernel command line word with a space: {w!r}")
    return " ".join(words)


def qemu_argv(
    cfg: VMConfig, paths: RunPaths, qemu: str, accel: str, mode: str = "", incoming: str = ""
) -> list[str]:
    """The full qemu-system-x86_64 command for cfg. ``incoming``: the URI a migration
    destination listens on (``-incoming``); its console appends to the source's log."""
    cfg.validate()
    hotplug = sum(d.size for d in cfg.devices) + sum(d.size for d in cfg.dimms)
    maxmem = cfg.maxmem if cfg.maxmem is not None else cfg.memory + hotplug
    slots = cfg.slots if cfg.slots is not None else max(1, len(cfg.dimms))
    phys_bits = f",phys-bits={cfg.phys_bits}" if cfg.phys_bits is not None else ""
    accel_args = (
        ["-accel", "kvm", "-cpu", f"host{phys_bits}"]
        if accel == "kvm"
        else ["-accel", f"tcg,thread={cfg.tcg_thread}", "-cpu", f"max{phys_bits}"]
    )
    argv = [
        qemu,
        "-name", cfg.name,
        "-machine", "q35" + (",kernel-irqchip=split" if cfg.viommu and accel == "kvm" else ""),
        *accel_args,
        "-smp", str(cfg.cpus),
        "-m", f"{fmt_size(cfg.memory)},maxmem={fmt_size(maxmem)},slots={slots}",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        # No -no-reboot: with it QEMU treats QMP system_reset as a power-off.
        "-kernel", str(paths.kernel),
        "-append", kernel_cmdline(cfg, paths, mode, tcg=accel != "kvm"),
        # append=on: a QEMU started again (TestVM.restart), or a migration's
        # destination, keeps the console before.
        "-chardev", f"file,id=con0,path={paths.console_log},append=on",
        "-serial", "chardev:con0",
        "-qmp", f"unix:{paths.qmp_sock},server=on,wait=off",
    ]  # fmt: skip
    if cfg.numa_nodes:
        per_node = cfg.memory // cfg.numa_nodes
        for n in range(cfg.numa_nodes):
            cpus = [c for c in range(cfg.cpus) if c % cfg.numa_nodes == n]
            argv += ["-object", f"memory-backend-ram,id=ram-node{n},size={fmt_size(per_node)}"]
            node = f"node,nodeid={n},memdev=ram-node{n}"
            node += "".join(f",cpus={c}" for c in cpus)
            argv += ["-numa", node]
    if cfg.viommu:
        argv += ["-device", "intel-iommu,intremap=on"]
    if cfg.root_image is not None and cfg.persistent_root:
        # A copy of the image written in place: it outlives this QEMU (TestVM.restart).
        argv += ["-drive", f"file={paths.root_copy},if=virtio,format=raw,cache=unsafe"]
    elif cfg.root_image is not None:
        # snapshot=on: writes go to a temporary overlay, the cached image stays pristine.
        drive = f"file={cfg.root_image},if=virtio,format=raw,snapshot=on,cache=unsafe"
        argv += ["-drive", drive]
    else:
        argv += [
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]
    if cfg.swap_disk:
        argv += ["-drive", f"file={paths.swap_img},if=virtio,format=raw,cache=unsafe"]
    argv += [
        "-virtfs",
        f"local,path={paths.share},mount_tag=results,security_model=none,multidevs=remap",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=cmd0,path={paths.cmd_sock},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=cmd0,name=vmharness.cmd",
    ]  # fmt: skip
    for d in cfg.devices:
        backend = f"memory-backend-ram,id=mem-{d.id},size={fmt_size(d.size)}"
        argv += ["-object", backend + ("" if d.reserve else ",reserve=off")]
        dev = (
            f"virtio-mem-pci,id={d.id},memdev=mem-{d.id},"
            f"requested-size={fmt_size(d.requested_size) if d.requested_size else 0},"
            f"block-size={fmt_size(d.block_size)}"
        )
        if d.node is not None:
            dev += f",node={d.node}"
        if d.memaddr is not None:
            dev += f",memaddr={d.memaddr:#x}"
        if d.iommu_platform or cfg.viommu:
            dev += ",iommu_platform=on"
        argv += ["-device", dev]
    for m in cfg.dimms:
        argv += ["-object", f"memory-backend-ram,id=mem-{m.id},size={fmt_size(m.size)}"]
        dimm = f"pc-dimm,id={m.id},memdev=mem-{m.id}"
        if cfg.numa_nodes:
            dimm += f",node={m.node}"
        argv += ["-device", dimm]
    argv += list(cfg.extra_qemu_args)
    if incoming:
        argv += ["-incoming", incoming]
    return argv


def parse_device(spec: str) -> MemDevice:
    """Parse a CLI device spec "id=vm0,size=4G,block=2M,requested=0,node=0,iommu=1,reserve=off"."""
    kw: dict[str, str] = dict(p.split("=", 1) for p in spec.split(",") if p)
    return MemDevice(
        id=kw.get("id", "vm0"),
        size=parse_size(kw.get("size", "4G")),
        block_size=parse_size(kw.get("block", kw.get("block_size", "2M"))),
        requested_size=parse_size(kw.get("requested", "0")),
        node=int(kw["node"]) if "node" in kw else None,
        iommu_platform=kw.get("iommu", "0") in ("1", "on", "true"),
        reserve=kw.get("reserve", "on") not in ("0", "off", "false"),
    )
