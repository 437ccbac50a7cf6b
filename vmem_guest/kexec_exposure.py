"""What a kexec'd or crash kernel would be told about device memory.

The agent adds memory through the sysfs ``probe`` file, so the kernel names it plain
"System RAM" (``__add_memory`` -> ``register_memory_resource(..., "System RAM")``)
and ``add_memory_resource`` also adds a ``/sys/firmware/memmap`` entry for it
(``firmware_map_add_hotplug``). Only ``remove_memory`` takes either away, and no
sysfs file reaches it: offlining a block keeps both. So after the agent has grown a
device once, until the next boot:

* kexec-tools (``kexec -l``, the ``kexec_load`` syscall) builds the next kernel's
  memory map from ``/sys/firmware/memmap``: the next kernel boots with device memory
  that may be unplugged as RAM;
* a crash kernel's ``elfcorehdr`` lists every "System RAM" range (kexec-tools reads
  ``/proc/iomem``; ``kexec_file_load`` walks the same resources): the capture kernel
  reads unplugged device memory through ``/proc/vmcore``.

The in-kernel driver avoids both (``add_memory_driver_managed``: "System RAM
(virtio_mem)", no memmap entry; a vmcore callback). This module reads what is
exposed so ``vmem-guest doctor`` and the agent's log can say so. The kernel sources
behind each statement are in docs/kexec.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from vmem_guest._linux.procfs import PROC_ROOT
from vmem_guest._linux.sysfs import SYSFS_ROOT, read_value_or_none
from vmem_guest.units import format_size

#: The name ``__add_memory`` (the probe file's path) gives a resource and a memmap entry.
SYSTEM_RAM = "System RAM"


@dataclasses.dataclass(frozen=True, order=True)
class Span:
    """A physical address range, ``end`` inclusive (as memmap and iomem print it)."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def overlaps(self, other: Span) -> bool:
        return self.start <= other.end and other.start <= self.end

    def __str__(self) -> str:
        return f"{self.start:#x}-{self.end:#x}"


def memmap_ram(sys_root: Path = SYSFS_ROOT) -> list[Span] | None:
    """The "System RAM" entries of ``/sys/firmware/memmap`` (one directory per entry
    with ``start``, ``end`` inclusive and ``type``; drivers/firmware/memmap.c), sorted;
    None when the directory is absent (no CONFIG_FIRMWARE_MEMMAP: kexec-tools then
    reads /proc/iomem)."""
    root = sys_root / "firmware/memmap"
    try:
        entries = list(root.iterdir())
    except OSError:
        return None
    spans = []
    for entry in entries:
        if read_value_or_none(entry / "type") != SYSTEM_RAM:
            continue
        start, end = read_value_or_none(entry / "start"), read_value_or_none(entry / "end")
        if start is None or end is None:
            continue
        spans.append(Span(int(start, 16), int(end, 16)))
    return sorted(spans)


def iomem_plain_ram(proc_root: Path = PROC_ROOT) -> list[Span] | None:
    """The ``/proc/iomem`` lines named exactly "System RAM" (the name kexec-tools
    matches for a crash kernel's ranges; driver-managed "System RAM (name)" does not
    match); None when unreadable. Addresses read as zero for a reader without
    CAP_SYS_ADMIN (kernel/resource.c r_show): then None as well, they tell nothing."""
    try:
        text = (proc_root / "iomem").read_text()
    except OSError:
        return None
    spans = []
    for line in text.splitlines():
        where, _, name = line.strip().partition(" : ")
        if name != SYSTEM_RAM:
            continue
        start, _, end = where.partition("-")
        spans.append(Span(int(start, 16), int(end, 16)))
    if spans and all(span.start == span.end == 0 for span in spans):
        return None
    return sorted(spans)


@dataclasses.dataclass(frozen=True)
class LoadedImages:
    """Whether a kexec image (``kexec -l``) and a crash image (``kexec -p``) are loaded
    (/sys/kernel/kexec_loaded, kexec_crash_loaded; kernel/ksysfs.c); None: no file."""

    kexec: bool | None
    crash: bool | None

    def names(self) -> list[str]:
        """The loaded ones, in words."""
        return [
            name
            for name, loaded in (("a kexec image", self.kexec), ("a crash kernel", self.crash))
            if loaded
        ]


def loaded_images(sys_root: Path = SYSFS_ROOT) -> LoadedImages:
    def flag(name: str) -> bool | None:
        value = read_value_or_none(sys_root / "kernel" / name)
        return None if value is None else value == "1"

    return LoadedImages(kexec=flag("kexec_loaded"), crash=flag("kexec_crash_loaded"))


@dataclasses.dataclass(frozen=True)
class Exposure:
    """Device-region ranges a kexec'd or crash kernel would take as RAM."""

    memmap: tuple[Span, ...]  # /sys/firmware/memmap entries: kexec -l
    iomem: tuple[Span, ...]  # plain "System RAM" resources: kdump's elfcorehdr
    images: LoadedImages

    @property
    def exposed(self) -> bool:
        return bool(self.memmap or self.iomem)

    def summary(self) -> str:
        """One line: what is exposed and what is loaded."""
        loaded = self.images.names()
        said = (
            "; ".join(
                f"{len(spans)} {what} ({format_size(sum(s.size for s in spans))})"
                for what, spans in (
                    ("/sys/firmware/memmap RAM entries", self.memmap),
                    ("plain 'System RAM' ranges in /proc/iomem", self.iomem),
                )
                if spans
            )
            + " lie in device regions: a kexec'd kernel would boot with them as RAM and a"
            " crash kernel would read them, plugged or not"
            if self.exposed
            else "no memmap entry or plain 'System RAM' range lies in a device region"
        )
        if loaded:
            said += f"; {' and '.join(loaded)} loaded"
            if self.exposed:
                whose = "its memory map" if len(loaded) == 1 else "their memory maps"
                said += f" ({whose} may name memory unplugged since)"
        return said


def _inside(spans: Iterable[Span], regions: Iterable[Span]) -> tuple[Span, ...]:
    regions = list(regions)
    return tuple(span for span in spans if any(span.overlaps(r) for r in regions))


def examine(
    regions: Iterable[Span], sys_root: Path = SYSFS_ROOT, proc_root: Path = PROC_ROOT
) -> Exposure | None:
    """What of ``regions`` (the device regions) is exposed; None when neither
    /sys/firmware/memmap nor /proc/iomem can be read."""
    regions = list(regions)
    memmap, iomem = memmap_ram(sys_root), iomem_plain_ram(proc_root)
    if memmap is None and iomem is None:
        return None
    return Exposure(
        memmap=_inside(memmap or (), regions),
        iomem=_inside(iomem or (), regions),
        images=loaded_images(sys_root),
    )


def startup_warnings(sys_root: Path = SYSFS_ROOT) -> list[str]:
    """The agent's words at start when a kexec or crash image is loaded: its memory
    map is fixed at load time, and every memory block the agent adds or unplugs
    afterwards makes it wrong (docs/kexec.md)."""
    loaded = loaded_images(sys_root).names()
    if not loaded:
        return []
    return [
        f"{' and '.join(loaded)} loaded: memory the agent adds through 'probe' is plain"
        " System RAM with a /sys/firmware/memmap entry that no unplug removes, so a"
        " kexec'd or crash kernel would take unplugged device memory as RAM; reboot"
        " rather than kexec (see vmem-guest doctor, docs/kexec.md)"
    ]
