"""VFIO container, group and device for one PCI function.

See linux ``Documentation/driver-api/vfio.rst`` and ``include/uapi/linux/vfio.h``.

Two modes (docs/protocol.md section 3):

* ``type1``: ``/dev/vfio/N``, container IOMMU ``VFIO_TYPE1v2_IOMMU``, DMA
  buffers mapped with ``VFIO_IOMMU_MAP_DMA`` at IOVAs we choose.
* ``noiommu``: ``/dev/vfio/noiommu-N``, container type ``VFIO_NOIOMMU_IOMMU``;
  no mapping, the device sees physical addresses.

The sysfs and /dev roots are parameters so group discovery can be tested
against fake trees. Every ioctl failure raises :class:`IoctlError`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import mmap
import os
from pathlib import Path
from typing import Literal

from vmem_guest._linux import vfio_uapi as uapi
from vmem_guest._linux.eventfd import EventFd
from vmem_guest._linux.ioctl import ioctl
from vmem_guest._linux.lifetime import Closing, close_fd
from vmem_guest._linux.sysfs import SYSFS_ROOT, read_value_or_none
from vmem_guest.errors import IoctlError, TransportError
from vmem_guest.pci_address import check_bdf
from vmem_guest.transport import pci_config
from vmem_guest.transport.pci_config import PCI_CONFIG_SIZE

#: How a function is opened: behind a real IOMMU (``type1``) or without one
#: (``noiommu``). The one such type: :mod:`vmem_guest.pci` classifies functions by it.
Mode = Literal["type1", "noiommu"]

#: Where the device nodes are (``/dev/vfio``).
DEV_ROOT = Path("/dev")
#: The name vfio gives the IOMMU groups it makes up for devices without an IOMMU.
NOIOMMU_GROUP_NAME = "vfio-noiommu"


def group_node(number: int, mode: Mode, dev_root: Path = DEV_ROOT) -> Path:
    """The node of VFIO group ``number``: ``/dev/vfio/N`` (type1) or
    ``/dev/vfio/noiommu-N`` (no-IOMMU)."""
    if mode == "type1":
        return dev_root / "vfio" / str(number)
    return dev_root / "vfio" / f"noiommu-{number}"


@dataclasses.dataclass(frozen=True)
class IommuGroup:
    """Where a device's VFIO group lives."""

    number: int
    noiommu: bool
    dev_path: Path


def find_group(bdf: str, *, sysfs_root: Path = SYSFS_ROOT, dev_root: Path = DEV_ROOT) -> IommuGroup:
    """The IOMMU group of ``bdf`` from its ``iommu_group`` link.

    A no-IOMMU group is recognised by the group's ``name`` file
    (``vfio-noiommu``) or by a ``/dev/vfio/noiommu-N`` node.
    """
    link = sysfs_root / "bus/pci/devices" / check_bdf(bdf) / "iommu_group"
    try:
        target = os.readlink(link)
    except OSError as exc:
        raise TransportError(
            f"{bdf} has no IOMMU group ({exc.strerror}); is it bound to vfio-pci?", bdf=bdf
        ) from None
    name = os.path.basename(target)
    if not name.isdigit():
        raise TransportError(f"{bdf}: unexpected iommu_group link {target!r}", bdf=bdf)
    number = int(name)
    group_name = read_value_or_none(sysfs_root / "kernel/iommu_groups" / name / "name")
    noiommu_node = group_node(number, "noiommu", dev_root)
    if group_name == NOIOMMU_GROUP_NAME or noiommu_node.exists():
        return IommuGroup(number, True, noiommu_node)
    return IommuGroup(number, False, group_node(number, "type1", dev_root))


def parse_iova_ranges(info: bytes) -> list[tuple[int, int]]:
    """The IOVA ranges in a ``vfio_iommu_type1_info`` answer, as ``[start, end)``.

    Walks the capability chain with every offset bounds-checked and loops refused.
    """
    head = uapi.vfio_iommu_type1_info.from_buffer_copy(
        info[: ctypes.sizeof(uapi.vfio_iommu_type1_info)]
    )
    ranges: list[tuple[int, int]] = []
    if not head.flags & uapi.VFIO_IOMMU_INFO_CAPS:
        return ranges
    seen: set[int] = set()
    offset = head.cap_offset
    cap_size = ctypes.sizeof(uapi.vfio_iommu_type1_info_cap_iova_range)
    range_size = ctypes.sizeof(uapi.vfio_iova_range)
    while offset:
        if offset in seen or offset < ctypes.sizeof(head) or offset + 8 > len(info):
            raise TransportError(f"bad VFIO capability offset {offset}", offset=offset)
        seen.add(offset)
        header = uapi.vfio_info_cap_header.from_buffer_copy(info, offset)
        if header.id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            if offset + cap_size > len(info):
                raise TransportError("truncated IOVA range capability", offset=offset)
            cap = uapi.vfio_iommu_type1_info_cap_iova_range.from_buffer_copy(info, offset)
            first = offset + cap_size
            if first + cap.nr_iovas * range_size > len(info):
                raise TransportError(f"{cap.nr_iovas} IOVA ranges overrun the answer")
            for i in range(cap.nr_iovas):
                r = uapi.vfio_iova_range.from_buffer_copy(info, first + i * range_size)
                if r.end >= r.start:
                    ranges.append((r.start, r.end + 1))
        offset = header.next
    return ranges


def choose_iova(ranges: list[tuple[int, int]], size: int, preferred: int, align: int) -> int:
    """``preferred`` when ``[preferred, preferred + size)`` lies in one range (or no
    ranges are known), else the lowest aligned non-zero address that fits."""
    if not ranges or any(s <= preferred and preferred + size <= e for s, e in ranges):
        return preferred
    for start, end in sorted(ranges):
        candidate = max(-(-start // align) * align, align)
        if candidate + size <= end:
            return candidate
    raise TransportError(f"no IOVA range holds {size:#x} bytes", ranges=ranges)


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TransportError(f"cannot open {path}: {exc.strerror}", path=str(path)) from None


class VfioContainer:
    """``/dev/vfio/vfio``: the IOMMU context our DMA mappings live in."""

    def __init__(self, *, dev_root: Path = DEV_ROOT) -> None:
        self.fd = _open(dev_root / "vfio" / "vfio")
        self.iommu_type: int | None = None
        self._mappings: dict[int, int] = {}  # iova -> size
        try:
            version = ioctl(self.fd, "VFIO_GET_API_VERSION", uapi.VFIO_GET_API_VERSION)
            if version != uapi.VFIO_API_VERSION:
                raise TransportError(f"VFIO API version {version}, expected 0", version=version)
        except BaseException:
            self.close()
            raise

    def check_extension(self, extension: int) -> bool:
        """VFIO_CHECK_EXTENSION: does the kernel support this IOMMU type?"""
        return ioctl(self.fd, "VFIO_CHECK_EXTENSION", uapi.VFIO_CHECK_EXTENSION, extension) > 0

    def set_iommu(self, iommu_type: int) -> None:
        """VFIO_SET_IOMMU; valid once a group is attached."""
        if not self.check_extension(iommu_type):
            raise IoctlError("VFIO_CHECK_EXTENSION", errno.ENOTSUP, f"IOMMU type {iommu_type}")
        ioctl(self.fd, "VFIO_SET_IOMMU", uapi.VFIO_SET_IOMMU, iommu_type)
        self.iommu_type = iommu_type

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        """Map ``size`` bytes at ``vaddr`` for device reads and writes at ``iova`` (pins them)."""
        arg = uapi.vfio_iommu_type1_dma_map.new(
            flags=uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE,
            vaddr=vaddr,
            iova=iova,
            size=size,
        )
        ioctl(self.fd, "VFIO_IOMMU_MAP_DMA", uapi.VFIO_IOMMU_MAP_DMA, arg)
        self._mappings[iova] = size

    def unmap_dma(self, iova: int) -> None:
        """Undo :meth:`map_dma` at ``iova``."""
        size = self._mappings.pop(iova)
        arg = uapi.vfio_iommu_type1_dma_unmap.new(iova=iova, size=size)
        ioctl(self.fd, "VFIO_IOMMU_UNMAP_DMA", uapi.VFIO_IOMMU_UNMAP_DMA, arg)
        if arg.size != size:
            raise TransportError(
                f"VFIO_IOMMU_UNMAP_DMA unmapped {arg.size:#x} of {size:#x} at {iova:#x}",
                iova=iova,
            )

    def iova_ranges(self) -> list[tuple[int, int]]:
        """Usable IOVA ranges ``[start, end)`` from VFIO_IOMMU_GET_INFO (type1 only).

        An empty list means the kernel reported no IOVA-range capability.
        """
        head = uapi.vfio_iommu_type1_info.new()
        ioctl(self.fd, "VFIO_IOMMU_GET_INFO", uapi.VFIO_IOMMU_GET_INFO, head)
        if not head.flags & uapi.VFIO_IOMMU_INFO_CAPS or head.argsz <= ctypes.sizeof(head):
            return []
        size = head.argsz
        if size > 1 << 16:
            raise TransportError(f"VFIO_IOMMU_GET_INFO wants {size} bytes", argsz=size)
        buf = bytearray(size)
        buf[:4] = size.to_bytes(4, "little")
        ioctl(self.fd, "VFIO_IOMMU_GET_INFO", uapi.VFIO_IOMMU_GET_INFO, buf)
        return parse_iova_ranges(bytes(buf))

    def close(self) -> None:
        """Unmap what is still mapped, then close (closing alone would also unmap)."""
        if self.fd < 0:
            return
        for iova in list(self._mappings):
            try:
                self.unmap_dma(iova)
            except TransportError:
                logging.getLogger(__name__).warning("unmap of IOVA %#x failed", iova)
        self.fd = close_fd(self.fd)


class VfioGroup:
    """``/dev/vfio/N`` or ``/dev/vfio/noiommu-N``, attached to a container."""

    def __init__(self, group: IommuGroup, container: VfioContainer) -> None:
        self.group = group
        self.fd = _open(group.dev_path)
        try:
            status = uapi.vfio_group_status.new()
            ioctl(self.fd, "VFIO_GROUP_GET_STATUS", uapi.VFIO_GROUP_GET_STATUS, status)
            if not status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                raise TransportError(
                    f"VFIO group {group.number} is not viable: bind every device in it to vfio-pci",
                    group=group.number,
                )
            container_fd = ctypes.c_int32(container.fd)
            ioctl(self.fd, "VFIO_GROUP_SET_CONTAINER", uapi.VFIO_GROUP_SET_CONTAINER, container_fd)
        except BaseException:
            self.close()
            raise

    def device_fd(self, bdf: str) -> int:
        """VFIO_GROUP_GET_DEVICE_FD for ``bdf`` (a new fd, owned by the caller)."""
        name = bytearray(check_bdf(bdf).encode() + b"\0")
        return ioctl(self.fd, "VFIO_GROUP_GET_DEVICE_FD", uapi.VFIO_GROUP_GET_DEVICE_FD, name)

    def close(self) -> None:
        self.fd = close_fd(self.fd)


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """``struct vfio_region_info``: where a region sits in the device fd."""

    index: int
    flags: int
    size: int
    offset: int

    @property
    def mappable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP)


@dataclasses.dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info``."""

    index: int
    flags: int
    count: int


class MappedBar:
    """A BAR mmap'd from the device fd, with its base virtual address.

    Registers are accessed through ``ctypes`` at :attr:`address` (exact-width
    loads and stores, see ``transport.virtio_pci.Mmio``), never through the
    mmap object's slices: those reach the device as byte accesses.
    """

    def __init__(self, index: int, mapping: mmap.mmap) -> None:
        self.index = index
        self.size = len(mapping)
        self._mapping = mapping
        self._anchor: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * self.size).from_buffer(
            mapping
        )
        self.address = ctypes.addressof(self._anchor)

    def close(self) -> None:
        if self._anchor is not None:
            self._anchor = None
            self._mapping.close()


class VfioDevice(Closing):
    """One PCI function through VFIO: its container, group and device fd.

    Use :meth:`open`; :meth:`close` releases everything in reverse order.
    """

    def __init__(self, bdf: str, mode: Mode, container: VfioContainer, group: VfioGroup) -> None:
        self.bdf = bdf
        self.mode: Mode = mode
        self.container = container
        self.group = group
        self.log = logging.getLogger(f"vmem_guest.vfio.{bdf}")
        self.fd = -1
        self._bars: list[MappedBar] = []
        self._irq_index: int | None = None

    @classmethod
    def open(
        cls,
        bdf: str,
        *,
        mode: Mode,
        sysfs_root: Path = SYSFS_ROOT,
        dev_root: Path = DEV_ROOT,
    ) -> VfioDevice:
        """Open ``bdf`` (bound to vfio-pci) in ``mode``; the group must match the mode."""
        group_info = find_group(bdf, sysfs_root=sysfs_root, dev_root=dev_root)
        if group_info.noiommu != (mode == "noiommu"):
            kind = "no-IOMMU" if group_info.noiommu else "IOMMU"
            raise TransportError(
                f"{bdf} is in {kind} group {group_info.number}, mode {mode!r} asked",
                bdf=bdf,
                group=group_info.number,
            )
        container = VfioContainer(dev_root=dev_root)
        group: VfioGroup | None = None
        try:
            group = VfioGroup(group_info, container)
            iommu = uapi.VFIO_NOIOMMU_IOMMU if mode == "noiommu" else uapi.VFIO_TYPE1v2_IOMMU
            container.set_iommu(iommu)
            device = cls(bdf, mode, container, group)
            device.fd = group.device_fd(bdf)
        except BaseException:
            if group is not None:
                group.close()
            container.close()
            raise
        try:
            device._check_info()
        except BaseException:
            device.close()
            raise
        device.log.info("opened %s (group %d, %s)", bdf, group_info.number, mode)
        return device

    def _check_info(self) -> None:
        info = uapi.vfio_device_info.new()
        ioctl(self.fd, "VFIO_DEVICE_GET_INFO", uapi.VFIO_DEVICE_GET_INFO, info)
        if not info.flags & uapi.VFIO_DEVICE_FLAGS_PCI:
            raise TransportError(f"{self.bdf} is not a vfio-pci device", flags=info.flags)
        if info.num_regions <= uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            raise TransportError(f"{self.bdf}: {info.num_regions} regions", bdf=self.bdf)

    # -- regions --------------------------------------------------------------

    def region_info(self, index: int) -> RegionInfo:
        """VFIO_DEVICE_GET_REGION_INFO for ``index`` (BAR 0-5, ROM 6, config 7)."""
        info = uapi.vfio_region_info.new(index=index)
        ioctl(self.fd, "VFIO_DEVICE_GET_REGION_INFO", uapi.VFIO_DEVICE_GET_REGION_INFO, info)
        return RegionInfo(index=index, flags=info.flags, size=info.size, offset=info.offset)

    def bar_sizes(self) -> list[int]:
        """Sizes of BARs 0-5 (0 for an unimplemented BAR)."""
        return [self.region_info(i).size for i in range(uapi.VFIO_PCI_BAR5_REGION_INDEX + 1)]

    def _config_region(self) -> RegionInfo:
        region = self.region_info(uapi.VFIO_PCI_CONFIG_REGION_INDEX)
        if region.size < PCI_CONFIG_SIZE:
            raise TransportError(f"config region is {region.size} bytes", size=region.size)
        return region

    def config_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of PCI config space (1, 2 and 4 are single accesses)."""
        region = self._config_region()
        if offset < 0 or size <= 0 or offset + size > region.size:
            raise ValueError(f"config read {offset:#x}+{size} outside {region.size:#x}")
        try:
            data = os.pread(self.fd, size, region.offset + offset)
        except OSError as exc:
            raise TransportError(f"config read at {offset:#x} failed: {exc.strerror}") from None
        if len(data) != size:
            raise TransportError(f"config read at {offset:#x}: {len(data)} of {size} bytes")
        return data

    def config_write(self, offset: int, data: bytes) -> None:
        """Write ``data`` (one access of its exact size) to PCI config space."""
        region = self._config_region()
        if offset < 0 or not data or offset + len(data) > region.size:
            raise ValueError(f"config write {offset:#x}+{len(data)} outside {region.size:#x}")
        try:
            written = os.pwrite(self.fd, data, region.offset + offset)
        except OSError as exc:
            raise TransportError(f"config write at {offset:#x} failed: {exc.strerror}") from None
        if written != len(data):
            raise TransportError(f"config write at {offset:#x}: {written} of {len(data)} bytes")

    def config_space(self) -> bytes:
        """The standard 256 bytes of PCI config space (for the capability walk)."""
        return self.config_read(0, PCI_CONFIG_SIZE)

    def enable_bus_master(self) -> None:
        """Set Memory Space and Bus Master in PCI_COMMAND: the device may now DMA."""
        pci_config.enable_bus_master(self)

    def map_bar(self, index: int) -> MappedBar:
        """mmap BAR ``index`` (the device fd at the region's offset), read-write, shared."""
        region = self.region_info(index)
        if region.size == 0 or not region.mappable:
            raise TransportError(
                f"BAR {index} of {self.bdf} cannot be mmap'd (size {region.size:#x}, "
                f"flags {region.flags:#x})",
                bar=index,
            )
        try:
            mapping = mmap.mmap(
                self.fd,
                region.size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=region.offset,
            )
        except OSError as exc:
            raise TransportError(f"mmap of BAR {index} failed: {exc.strerror}", bar=index) from None
        bar = MappedBar(index, mapping)
        self._bars.append(bar)
        return bar

    # -- interrupts -----------------------------------------------------------

    def irq_info(self, index: int) -> IrqInfo:
        """VFIO_DEVICE_GET_IRQ_INFO for ``index`` (INTx 0, MSI 1, MSI-X 2, REQ 4)."""
        info = uapi.vfio_irq_info.new(index=index)
        ioctl(self.fd, "VFIO_DEVICE_GET_IRQ_INFO", uapi.VFIO_DEVICE_GET_IRQ_INFO, info)
        return IrqInfo(index=index, flags=info.flags, count=info.count)

    def enable_irqs(self, index: int, eventfds: list[EventFd]) -> None:
        """Route vectors ``0..len(eventfds)-1`` of ``index`` to the eventfds (ACTION_TRIGGER)."""
        info = self.irq_info(index)
        if not info.flags & uapi.VFIO_IRQ_INFO_EVENTFD or len(eventfds) > info.count:
            raise TransportError(
                f"IRQ index {index}: {len(eventfds)} eventfds, {info.count} vectors, "
                f"flags {info.flags:#x}",
                index=index,
            )
        arg = uapi.irq_set(
            uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            [e.fd for e in eventfds],
        )
        ioctl(self.fd, "VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, arg)
        self._irq_index = index

    def enable_release_request(self, eventfd: EventFd) -> bool:
        """Signal ``eventfd`` when the kernel asks for the device back (the REQ index:
        a hot-unplug waits in ``vfio_pci_core_request`` until the device fd is closed).
        False when the kernel offers no such index (it then blocks the unplug)."""
        info = self.irq_info(uapi.VFIO_PCI_REQ_IRQ_INDEX)
        if not info.flags & uapi.VFIO_IRQ_INFO_EVENTFD or info.count < 1:
            return False
        arg = uapi.irq_set(
            uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
            uapi.VFIO_PCI_REQ_IRQ_INDEX,
            0,
            [eventfd.fd],
        )
        ioctl(self.fd, "VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, arg)
        return True

    def unmask_intx(self) -> None:
        """Unmask INTx, which VFIO masks automatically when it fires (AUTOMASKED)."""
        arg = uapi.irq_set(
            uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK,
            uapi.VFIO_PCI_INTX_IRQ_INDEX,
            0,
        )
        ioctl(self.fd, "VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, arg)

    def disable_irqs(self) -> None:
        """Tear down the interrupt index enabled by :meth:`enable_irqs` (count 0)."""
        if self._irq_index is None:
            return
        arg = uapi.irq_set(
            uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
            self._irq_index,
            0,
            [],
        )
        self._irq_index = None
        ioctl(self.fd, "VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, arg)

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Disable interrupts, unmap BARs, close device, group and container."""
        if self.fd >= 0:
            try:
                self.disable_irqs()
            except IoctlError as exc:
                self.log.warning("disabling interrupts: %s", exc)
            for bar in self._bars:
                bar.close()
            self._bars.clear()
            self.fd = close_fd(self.fd)
        self.group.close()
        self.container.close()
