"""ioctl encoding and the VFIO uapi, pinned against the kernel's values.

Numbers and bytes below were produced by compiling against linux
``include/uapi/linux/vfio.h`` and ``asm-generic/ioctl.h`` (gcc, x86-64) and
checked against upstream's definitions: every VFIO ioctl is
``_IO(VFIO_TYPE, VFIO_BASE + n)``.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from vmem_guest._linux import ioctl as io
from vmem_guest._linux import vfio_uapi as uapi
from vmem_guest.errors import IoctlError

KERNEL_NUMBERS = {
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
    "VFIO_DEVICE_SET_IRQS": 0x3B6E,
    "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_IOMMU_GET_INFO": 0x3B70,
    "VFIO_IOMMU_MAP_DMA": 0x3B71,
    "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
}


@pytest.mark.parametrize(("name", "number"), sorted(KERNEL_NUMBERS.items()))
def test_vfio_ioctl_numbers(name: str, number: int) -> None:
    assert getattr(uapi, name) == number


def test_ioc_encoding_matches_the_kernel() -> None:
    # gcc: _IOR('x', 1, int), _IOW('x', 2, long), _IOWR(0x3B, 0xFF, char[16383])
    assert io.IOR("x", 1, ctypes.c_int) == 0x80047801
    assert io.IOW("x", 2, ctypes.c_long) == 0x40087802
    assert io.IOWR(0x3B, 0xFF, 16383) == 0xFFFF3BFF
    assert io.IO(";", 100) == 0x3B64
    req = io.IOWR(0x3B, 9, uapi.vfio_irq_info)
    assert (io.IOC_DIR(req), io.IOC_TYPE(req), io.IOC_NR(req), io.IOC_SIZE(req)) == (3, 0x3B, 9, 16)


@pytest.mark.parametrize(
    ("args"),
    [(4, 0x3B, 1, 0), (0, 256, 1, 0), (0, 0x3B, 256, 0), (0, 0x3B, 1, 1 << 14), (0, 0x3B, -1, 0)],
)
def test_ioc_rejects_fields_that_do_not_fit(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        io.IOC(*args)


def test_constants() -> None:
    assert uapi.VFIO_TYPE == 0x3B
    assert (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_NOIOMMU_IOMMU) == (3, 8)
    assert uapi.VFIO_PCI_CONFIG_REGION_INDEX == 7
    assert (uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX) == (0, 2)


# Golden bytes: C designated initialisers with the same values, dumped byte by byte.
GOLDEN = {
    "group_status": bytes.fromhex("0800000001000000"),
    "device_info": bytes.fromhex("1400000003000000090000000500000000000000"),
    "region_info": bytes.fromhex(
        "2000000007000000040000000000000000400000000000000000000000040000"
    ),
    "irq_info": bytes.fromhex("10000000070000000000000001000000"),
    "irq_set_eventfds": bytes.fromhex("1c0000002400000002000000000000000200000007000000ffffffff"),
    "irq_set_unmask": bytes.fromhex("1400000011000000000000000000000001000000"),
    "dma_map": bytes.fromhex("200000000300000000503412007f000000000010000000000010000000000000"),
    "dma_unmap": bytes.fromhex("180000000000000000000010000000000010000000000000"),
}


def test_struct_sizes() -> None:
    sizes = {
        uapi.vfio_group_status: 8,
        uapi.vfio_device_info: 20,
        uapi.vfio_region_info: 32,
        uapi.vfio_irq_info: 16,
        uapi.vfio_irq_set: 20,
        uapi.vfio_iommu_type1_dma_map: 32,
        uapi.vfio_iommu_type1_dma_unmap: 24,
    }
    for struct, size in sizes.items():
        assert ctypes.sizeof(struct) == size, struct.__name__


def test_struct_bytes_match_c() -> None:
    built = {
        "group_status": uapi.vfio_group_status.new(flags=uapi.VFIO_GROUP_FLAGS_VIABLE),
        "device_info": uapi.vfio_device_info.new(
            flags=uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET,
            num_regions=9,
            num_irqs=5,
        ),
        "region_info": uapi.vfio_region_info.new(flags=7, index=4, size=0x4000, offset=4 << 40),
        "irq_info": uapi.vfio_irq_info.new(flags=7, index=0, count=1),
        "irq_set_eventfds": uapi.irq_set(
            uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
            uapi.VFIO_PCI_MSIX_IRQ_INDEX,
            0,
            [7, -1],
        ),
        "irq_set_unmask": uapi.irq_set(
            uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK,
            uapi.VFIO_PCI_INTX_IRQ_INDEX,
            0,
        ),
        "dma_map": uapi.vfio_iommu_type1_dma_map.new(
            flags=3, vaddr=0x7F0012345000, iova=0x10000000, size=0x1000
        ),
        "dma_unmap": uapi.vfio_iommu_type1_dma_unmap.new(iova=0x10000000, size=0x1000),
    }
    for name, struct in built.items():
        assert bytes(struct) == GOLDEN[name], name


def test_irq_set_disable_has_count_zero() -> None:
    arg = uapi.irq_set(uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, [])
    assert bytes(arg) == bytes.fromhex("1400000021000000000000000000000000000000")


def test_ioctl_failure_names_ioctl_and_errno() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(IoctlError) as info:
            io.ioctl(read_fd, "VFIO_GET_API_VERSION", uapi.VFIO_GET_API_VERSION)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert info.value.ioctl == "VFIO_GET_API_VERSION"
    assert info.value.errno == errno.ENOTTY
    assert "VFIO_GET_API_VERSION failed: ENOTTY" in str(info.value)
