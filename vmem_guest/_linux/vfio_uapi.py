"""VFIO user API: ioctl numbers, constants and structures (linux ``include/uapi/linux/vfio.h``).

Every VFIO ioctl is declared in the kernel as ``_IO(VFIO_TYPE, VFIO_BASE + n)``
(no direction and no size, whatever the comment above each one says); the
numbers are built the same way here and pinned by ``tests/unit/test_linux_ioctl.py``.
Structures are the kernel's, native-endian (VFIO is host-native), with the
sizes the kernel's C layout gives them on LP64.
"""

from __future__ import annotations

import ctypes
from typing import Self

from vmem_guest._linux.ioctl import IO

#: ``VFIO_API_VERSION``: what VFIO_GET_API_VERSION answers.
VFIO_API_VERSION = 0

# IOMMU types (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU).
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

VFIO_TYPE = ord(";")  # 0x3B
VFIO_BASE = 100

# Container fd.
VFIO_GET_API_VERSION = IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = IO(VFIO_TYPE, VFIO_BASE + 2)
# Group fd.
VFIO_GROUP_GET_STATUS = IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = IO(VFIO_TYPE, VFIO_BASE + 6)
# Device fd.
VFIO_DEVICE_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = IO(VFIO_TYPE, VFIO_BASE + 11)
# Type1 IOMMU, on the container fd.
VFIO_IOMMU_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12)
VFIO_IOMMU_MAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 14)

# struct vfio_group_status.flags
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

# struct vfio_device_info.flags
VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1

# struct vfio_region_info.flags
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

# struct vfio_irq_info.flags
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

# struct vfio_irq_set.flags
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

# struct vfio_iommu_type1_dma_map.flags / _unmap.flags
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1

# struct vfio_iommu_type1_info.flags and its capability chain.
VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1

# vfio-pci fixed region indices.
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

# vfio-pci fixed IRQ indices.
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5


class _ArgszStructure(ctypes.Structure):
    """A VFIO argument structure; :meth:`new` fills ``argsz`` with its own size."""

    @classmethod
    def new(cls, **fields: int) -> Self:
        return cls(argsz=ctypes.sizeof(cls), **fields)


class vfio_group_status(_ArgszStructure):
    _fields_ = (("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class vfio_device_info(_ArgszStructure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
    )


class vfio_region_info(_ArgszStructure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    )


class vfio_irq_info(_ArgszStructure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class vfio_irq_set(_ArgszStructure):
    """The fixed head of ``struct vfio_irq_set``; ``data[]`` follows (see :func:`irq_set`)."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    )


class vfio_iommu_type1_dma_map(_ArgszStructure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class vfio_iommu_type1_dma_unmap(_ArgszStructure):
    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    )


class vfio_iommu_type1_info(_ArgszStructure):
    """Head of the answer to VFIO_IOMMU_GET_INFO; capabilities follow at ``cap_offset``."""

    _fields_ = (
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
    )


class vfio_info_cap_header(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint16),
        ("version", ctypes.c_uint16),
        ("next", ctypes.c_uint32),
    )


class vfio_iova_range(ctypes.Structure):
    """One usable IOVA range; ``end`` is inclusive."""

    _fields_ = (("start", ctypes.c_uint64), ("end", ctypes.c_uint64))


class vfio_iommu_type1_info_cap_iova_range(ctypes.Structure):
    """Head of the IOVA-range capability; ``nr_iovas`` vfio_iova_range entries follow."""

    _fields_ = (
        ("header", vfio_info_cap_header),
        ("nr_iovas", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    )


def irq_set(
    flags: int, index: int, start: int, eventfds: list[int] | None = None
) -> ctypes.Structure:
    """A ``vfio_irq_set`` with its payload.

    With ``eventfds`` (``DATA_EVENTFD``): ``count`` is ``len(eventfds)`` and
    ``data[]`` holds them as ``__s32`` (-1 de-assigns). Without: no payload and
    ``count`` 1 for ``DATA_NONE`` actions such as an INTx unmask, or pass an
    empty list with ``DATA_NONE | ACTION_TRIGGER`` to disable the index
    (``count`` 0).
    """
    fds = eventfds if eventfds is not None else []

    class _IrqSetEventfds(ctypes.Structure):
        _fields_ = (("head", vfio_irq_set), ("data", ctypes.c_int32 * len(fds)))

    count = len(fds) if eventfds is not None else 1
    payload = _IrqSetEventfds()
    payload.head.argsz = ctypes.sizeof(_IrqSetEventfds)
    payload.head.flags = flags
    payload.head.index = index
    payload.head.start = start
    payload.head.count = count
    for i, fd in enumerate(fds):
        payload.data[i] = fd
    return payload
