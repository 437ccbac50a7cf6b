"""The device seen from userspace: in-kernel driver blacklisted, bound to vfio-pci,
in no-IOMMU mode and under a vIOMMU (type1). Fixtures are function-scoped: each VM
serves one test, and is gone before the next boots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, userspace_driver_config
from vmharness.guest_agent import FIND_DEVICE, bind_vfio

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]


@pytest.fixture
def noiommu_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = userspace_driver_config("noiommu", MemDevice("vm0", size=4 * GiB, block_size=2 * MiB))
    with boot_vm(cfg) as v:
        yield v


@pytest.fixture
def viommu_vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = userspace_driver_config(
        "viommu",
        MemDevice("vm0", size=4 * GiB, block_size=2 * MiB, iommu_platform=True),
        viommu=True,
    )
    with boot_vm(cfg) as v:
        yield v


def test_noiommu_bind_and_probe_file(noiommu_vm: TestVM) -> None:
    vm = noiommu_vm
    assert "initcall_blacklist=virtio_mem_driver_init" in vm.read("/proc/cmdline")
    bdfs = vm.sh(FIND_DEVICE).split()
    assert len(bdfs) == 1, bdfs
    bdf = bdfs[0]
    # Blacklisted: virtio-pci holds the PCI device but no virtio_mem driver binds it.
    assert vm.guest("ls /sys/bus/virtio/drivers/virtio_mem")[0] != 0
    bind_vfio(vm, bdf)
    vm.wait_until(
        lambda: vm.guest("test -c /dev/vfio/noiommu-0")[0] == 0, 10, what="/dev/vfio/noiommu-0"
    )
    assert vm.guest("test -w /sys/devices/system/memory/probe")[0] == 0
    assert vm.read("/sys/devices/system/memory/block_size_bytes").strip() == "8000000"
    assert vm.read("/sys/devices/system/memory/auto_online_blocks").strip() == "offline"
    # Nothing plugged: QEMU agrees.
    assert vm.query()["vm0"]["size"] == 0


def test_viommu_bind_gives_type1_group(viommu_vm: TestVM) -> None:
    vm = viommu_vm
    bdf = vm.sh(FIND_DEVICE).split()[0]
    group = vm.sh(f"basename $(readlink /sys/bus/pci/devices/{bdf}/iommu_group)").strip()
    assert group.isdigit(), group
    bind_vfio(vm, bdf)
    vm.wait_until(
        lambda: vm.guest(f"test -c /dev/vfio/{group}")[0] == 0, 10, what=f"/dev/vfio/{group}"
    )
    assert vm.guest("ls /dev/vfio/noiommu-* 2>/dev/null")[0] != 0  # a real group, not no-IOMMU
    assert vm.sh("ls /sys/class/iommu/").strip(), "no IOMMU registered in the guest"
